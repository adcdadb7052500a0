"""Adapter names with a fixed meaning, shared by the registry, the daemon's settings and training."""

from __future__ import annotations

#: The adapter an NPC on the embedded model speaks with unless the game or the daemon's settings name
#: another: the base model alone is a script-continuing text model, not an NPC. It ships inside this
#: package (``zyke_models/shipped_adapters``, see ``adapters.SHIPPED_ADAPTERS``).
DEFAULT_ADAPTER_NAME = "npc-default"
#: The adapter name a game uses on ``npc.define`` / ``npc.say`` for "no adapter: the bare base model".
BASE_ADAPTER = "base"
