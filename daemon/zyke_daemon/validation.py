"""Frame validation against the shipped JSON Schemas (jsonschema, Draft 2020-12).

The raw dict is validated before any pydantic model sees it: the schemas are the contract the
Godot and Unity bridges are generated from, so they, not the Python models, decide what is valid.
"""

from __future__ import annotations

from functools import cache
from typing import Any

from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from zyke.protocol import SCHEMA_BASE, all_schemas, frame_types


@cache
def _registry() -> Registry:
    return Registry().with_resources(
        (uri, Resource.from_contents(doc)) for uri, doc in all_schemas().items()
    )


@cache
def validator(name: str) -> Draft202012Validator:
    """A validator for a schema by its path below schemas/ (``"frames/npc.say"``, ``"npc_reply"``)."""
    return Draft202012Validator({"$ref": f"{SCHEMA_BASE}{name}.json"}, registry=_registry())


def validator_for(schema: dict[str, Any]) -> Draft202012Validator:
    """A validator for an ad-hoc schema (a reply schema narrowed to one NPC's enums)."""
    return Draft202012Validator(schema, registry=_registry())


def first_error(name: str, instance: Any) -> str | None:
    """The most relevant validation error as one readable line, or None when the instance is valid."""
    return describe(validator(name), instance)


def describe(v: Draft202012Validator, instance: Any) -> str | None:
    errors = sorted(v.iter_errors(instance), key=lambda e: (len(e.path), e.message))
    if not errors:
        return None
    err = max(errors, key=lambda e: len(e.absolute_path))
    where = "/".join(str(p) for p in err.absolute_path) or "(frame)"
    return f"{where}: {err.message}"


def client_frame_types() -> tuple[str, ...]:
    return frame_types()[0]
