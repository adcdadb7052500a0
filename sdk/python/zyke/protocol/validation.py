"""Frame validation against the shipped JSON Schemas (jsonschema, Draft 2020-12).

The raw dict is validated before any pydantic model sees it: the schemas are the contract the
Godot and Unity bridges are generated from, so they, not the Python models, decide what is valid.

It lives with the protocol, not in the daemon, so that everything that checks a frame or a reply checks it
the same way: the daemon's core and HTTP API, training's data checks and evaluation, and game code
(``validator_for(reply_schema(npc)).is_valid(reply)``). It needs jsonschema, which the SDK's base install
leaves out to stay light: ``pip install "zyke[validate]"`` (the daemon's extra has it).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from functools import cache
from typing import Any

from jsonschema import Draft202012Validator, ValidationError, validators
from jsonschema.protocols import Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from .schemas import SCHEMA_BASE, all_schemas, frame_types

#: The most of a client's value an error message quotes: a 60 KB bad field must not come back as 60 KB.
MAX_QUOTE_CHARS = 200


def clip(text: str, limit: int = MAX_QUOTE_CHARS) -> str:
    """``text`` cut to ``limit`` characters, saying how much was left out."""
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text) - limit} more characters)"


def quote(value: Any) -> str:
    """``repr(value)`` for an error message, clipped (a client's value can be as large as the frame cap)."""
    return clip(repr(value))


@cache
def _ecma_regex(pattern: str) -> re.Pattern[str]:
    """Compile a schema pattern so that ``$`` means what ECMA-262 (JSON Schema's dialect) means: the end of the
    text. Python's ``$`` also matches before a final newline, which let ``"brom\\n"`` past the schema and into
    pydantic (whose Rust engine refuses it), so the client got ``internal`` instead of ``bad_frame``."""
    out: list[str] = []
    i, in_class = 0, False
    while i < len(pattern):
        c = pattern[i]
        if c == "\\":
            out.append(pattern[i:i + 2])
            i += 2
            continue
        if in_class:
            in_class = c != "]"
        elif c == "[":
            in_class = True
        elif c == "$":
            c = r"\Z"
        out.append(c)
        i += 1
    return re.compile("".join(out))


def _pattern(validator: Any, pattern: str, instance: Any, schema: dict[str, Any]) -> Iterator[ValidationError]:
    if validator.is_type(instance, "string") and not _ecma_regex(pattern).search(instance):
        yield ValidationError(f"{quote(instance)} does not match {pattern!r}")


def _frozen(value: Any) -> Any:
    """A hashable stand-in equal exactly when JSON Schema calls two values equal (1 == 1.0, true != 1).

    Recursive, but only ever on frames whose depth the core has already bounded."""
    if isinstance(value, bool):
        return ("bool", value)
    if isinstance(value, int | float):
        return ("num", value)
    if isinstance(value, str):
        return ("str", value)
    if isinstance(value, list | tuple):
        return ("array", tuple(_frozen(v) for v in value))
    if isinstance(value, dict):
        return ("object", frozenset((k, _frozen(v)) for k, v in value.items()))
    return ("other", repr(value))


def _unique_items(validator: Any, unique: bool, instance: Any, schema: dict[str, Any]) -> Iterator[ValidationError]:
    """uniqueItems in one hashing pass. jsonschema's own check falls back to comparing every pair when items
    do not sort (labels mixed with objects): one 61 KB frame of such items froze the daemon for 55 s."""
    if not unique or not validator.is_type(instance, "array"):
        return
    seen: set[Any] = set()
    for item in instance:
        key = _frozen(item)
        if key in seen:
            yield ValidationError(f"array has non-unique elements (repeated: {quote(item)})")
            return
        seen.add(key)


#: Draft 2020-12 with ECMA-262 ``$`` in patterns and a linear uniqueItems (see the two functions above).
SchemaValidator: type[Validator] = validators.extend(  # type: ignore[no-untyped-call]
    Draft202012Validator, {"pattern": _pattern, "uniqueItems": _unique_items})


def _own_dialect(doc: dict[str, Any]) -> dict[str, Any]:
    """``doc`` without its ``$schema``: jsonschema switches to the stock validator class of a document's declared
    dialect when it follows a ``$ref``, which would drop the two keyword fixes of ``SchemaValidator`` there."""
    return {k: v for k, v in doc.items() if k != "$schema"}


@cache
def _registry() -> Registry:
    return Registry().with_resources(
        (uri, Resource.from_contents(_own_dialect(doc), default_specification=DRAFT202012))
        for uri, doc in all_schemas().items()
    )


@cache
def validator(name: str) -> Validator:
    """A validator for a schema by its path below schemas/ (``"frames/npc.say"``, ``"npc_reply"``)."""
    return SchemaValidator({"$ref": f"{SCHEMA_BASE}{name}.json"}, registry=_registry())


def validator_for(schema: dict[str, Any]) -> Validator:
    """A validator for an ad-hoc schema (a reply schema narrowed to one NPC's enums)."""
    return SchemaValidator(_own_dialect(schema), registry=_registry())


def first_error(name: str, instance: Any) -> str | None:
    """The most relevant validation error as one readable line, or None when the instance is valid."""
    return describe(validator(name), instance)


def describe(v: Validator, instance: Any) -> str | None:
    errors = sorted(v.iter_errors(instance), key=lambda e: (len(e.path), e.message))
    if not errors:
        return None
    err = max(errors, key=lambda e: len(e.absolute_path))
    where = clip("/".join(str(p) for p in err.absolute_path) or "(frame)")
    # jsonschema's messages quote the whole bad value ("'xxxx…' is too long"): clip it
    return f"{where}: {clip(err.message, 2 * MAX_QUOTE_CHARS)}"


def client_frame_types() -> tuple[str, ...]:
    return frame_types()[0]
