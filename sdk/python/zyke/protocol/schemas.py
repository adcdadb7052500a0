"""Read the protocol's JSON Schemas from the installed package (never from the source tree).

Only the standard library is used here so the light SDK can ship the schemas without jsonschema;
validators are built from these documents in ``zyke.protocol.validation``.
"""

from __future__ import annotations

import json
from functools import cache
from importlib.resources import files
from typing import Any

SCHEMA_BASE = "https://zyke.dev/schemas/v1/"
PROTOCOL_VERSION = 1
#: The bodies of the daemon's plain-HTTP NPC endpoint (``POST /v1/npc/say``, docs/HTTP.md), below schemas/http/.
HTTP_SCHEMAS = ("http/npc.say", "http/npc.say.response")


@cache
def load_schema(name: str) -> dict[str, Any]:
    """Return a schema by its path below schemas/, without ``.json`` (``"common"``, ``"frames/npc.say"``)."""
    resource = files("zyke.schemas").joinpath(f"{name}.json")
    schema: dict[str, Any] = json.loads(resource.read_text(encoding="utf-8"))
    return schema


@cache
def frame_types() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The frame types a client may send and those the daemon sends, in schema order."""

    def names(union: str) -> tuple[str, ...]:
        refs = [entry["$ref"] for entry in load_schema(union)["oneOf"]]
        return tuple(ref.removeprefix(f"{SCHEMA_BASE}frames/").removesuffix(".json") for ref in refs)

    return names("client"), names("server")


def all_schemas() -> dict[str, dict[str, Any]]:
    """Every schema document keyed by its ``$id``, ready for a ``referencing`` registry."""
    client, server = frame_types()
    names = ["common", "npc_reply", "npc_example", "client", "server", *(f"frames/{t}" for t in client + server),
             *HTTP_SCHEMAS]
    return {load_schema(n)["$id"]: load_schema(n) for n in names}
