"""zyke-daemon: serves NPC replies from a local model over the Zyke WebSocket protocol."""

from zyke import __version__

__all__ = ["__version__"]
