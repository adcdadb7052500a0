"""zyke-daemon: serves NPC replies from a local model over the Zyke WebSocket protocol."""

__version__ = "0.1.0"
