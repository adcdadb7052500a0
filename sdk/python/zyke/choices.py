"""How a game gives an NPC's actions and emotions: bare names, described ones, or a mix.

The wire (``NpcSpec.actions``) takes a list whose items are a label or a ``Choice`` (name and
description). Game code reads better with a dict, ``{"trade": "buy or sell goods", "none": None}``,
so the SDK accepts that too and keeps its order (the order the prompt lists them in). Validation is
left to ``NpcSpec``, so a bad label or a name given twice fails in the caller's frame with pydantic's
``ValidationError``, as every other malformed definition does.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from .protocol import Choice

#: One action or emotion: a bare name, a ``Choice``, or a ``{"name": ..., "description": ...}`` dict.
ChoiceItem = str | Choice | Mapping[str, str]
#: A whole list: items as above, or a dict of name to description (``None`` for a bare name).
ChoicesLike = Sequence[ChoiceItem] | Mapping[str, str | None]


def build_choices(items: ChoicesLike, what: str = "actions") -> list[str | Choice]:
    """The wire form of an action or emotion list, in the order given."""
    if isinstance(items, str):  # list("none") would silently become ["n", "o", "n", "e"]
        raise TypeError(f"{what} must be a list or a dict of names, not the string {items!r}")
    if isinstance(items, Mapping):
        return [name if desc is None else Choice(name=name, description=desc) for name, desc in items.items()]
    return [item if isinstance(item, str | Choice) else Choice.model_validate(dict(item)) for item in items]
