"""Check NPC dataset rows and render them into training examples (``zyke-train npc-data``).

A row (``schemas/npc_example.json``) is an NPC, the conversation so far, the game state, the player's
line and the reply the NPC should give. Before a row becomes a training example it must pass two checks:

1. the row schema, so a typo'd field never trains silently (the schemas, not Python models, are the
   contract, as in the daemon);
2. the reply schema narrowed to that row's own NPC (``zyke.prompt_format.reply_schema``), for the reply
   *and* every history reply: the daemon decodes under that narrowed schema, so a reply outside it
   (an action the NPC never declared, an extra ``target`` key, a line over the length cap) teaches the
   model something it can never produce at run time. History replies matter too because they are in
   the prompt the model learns to continue.

Good rows are rendered only through ``zyke.prompt_format.render_example``, the same module the daemon
renders with, so training and serving can never drift. Bad rows are not fatal: they come back as
``Rejection`` records (file, line, id, reason) that the CLI prints and writes as JSON, so one bad line
in a large hand-written file doesn't block everything else.

Everything here is pure (no printing, no exit codes); ``zyke_train.cli`` is the thin shell around it.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from jsonschema.protocols import Validator
from pydantic import ValidationError
from zyke.prompt_format import render_example, reply_schema
from zyke.protocol.models import NpcReply, NpcSpec, Turn
from zyke.protocol.validation import validator, validator_for

#: The row schema's name below schemas/.
ROW_SCHEMA = "npc_example"


class InputError(Exception):
    """An input file could not be read at all (missing, unreadable, not UTF-8): the CLI exits 2."""


@dataclass(frozen=True)
class Rejection:
    """A row that will not be trained on, and why; ``line`` is 1-based like an editor's."""

    file: str
    line: int
    id: str | None
    reason: str


@dataclass(frozen=True)
class Example:
    """One training example: loss belongs on ``completion`` only (see ``render_example``)."""

    id: str
    prompt: str
    completion: str

    def to_json(self) -> str:
        return json.dumps({"id": self.id, "prompt": self.prompt, "completion": self.completion}, ensure_ascii=False)


@dataclass
class Result:
    """What a run produced: the examples in input order, the rejections, and rows read per file."""

    examples: list[Example] = field(default_factory=list)
    rejections: list[Rejection] = field(default_factory=list)
    rows_per_file: Counter[str] = field(default_factory=Counter)

    @property
    def rows(self) -> int:
        return sum(self.rows_per_file.values())

    def report(self, out: str | None = None) -> dict[str, Any]:
        """The JSON report: totals, per-file counts and every rejection."""
        bad_per_file = Counter(r.file for r in self.rejections)
        return {
            "rows": self.rows,
            "good": len(self.examples),
            "bad": len(self.rejections),
            "out": out,
            "files": [
                {"file": f, "rows": n, "good": n - bad_per_file[f], "bad": bad_per_file[f]}
                for f, n in self.rows_per_file.items()
            ],
            "rejected": [asdict(r) for r in self.rejections],
        }


def read_lines(path: Path) -> list[str]:
    """All lines of an input file, read up front so an unreadable file fails before any output is written."""
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read {path}: {exc}") from exc


@cache
def _row_validator() -> Validator:
    return validator(ROW_SCHEMA)


def first_error(v: Validator, instance: Any, where: str = "") -> str | None:
    """The most specific schema error as one line (``"reply/action: 'x' is not one of [...]"``), or None.

    The deepest error is the useful one: for a bad history reply it names ``history/1/reply/action``
    rather than just saying that ``history`` is invalid.
    """
    errors = list(v.iter_errors(instance))
    if not errors:
        return None
    err = max(errors, key=lambda e: (len(e.absolute_path), e.message))
    parts = ([where] if where else []) + [str(p) for p in err.absolute_path]
    return f"{'/'.join(parts) or '(row)'}: {err.message}"


def check_row(row: Any) -> str | None:
    """Why a parsed row is unfit for training, or None when it is fit.

    Checks the row schema first (so the narrowed check can trust the NPC's shape), then each history
    reply and the reply against the reply schema narrowed to this NPC's enums, and to the turn's
    ``allowed_actions`` when the game narrowed them (the daemon decodes that turn under that enum).
    """
    error = first_error(_row_validator(), row)
    if error is not None:
        return error
    try:
        npc = NpcSpec.model_validate(row["npc"])
    except ValidationError as exc:  # the schema and the models mirror each other; this is a safety net
        return f"npc: {exc.errors()[0]['msg']}"
    turns = [(f"history/{i}", t) for i, t in enumerate(row.get("history", []))] + [("", row)]
    for where, turn in turns:
        allowed = turn.get("allowed_actions")
        undeclared = [a for a in allowed or [] if a not in npc.action_names]
        if undeclared:
            return f"{where or '(row)'}/allowed_actions: {', '.join(undeclared)} not declared by NPC {npc.id!r}"
        narrowed = validator_for(reply_schema(npc, allowed_actions=allowed))
        error = first_error(narrowed, turn["reply"], f"{where}/reply" if where else "reply")
        if error is not None:
            return f"{error} (not allowed for NPC {npc.id!r}{' this turn' if allowed else ''})"
    return None


def render_row(row: dict[str, Any]) -> Example:
    """A checked row as a training example, rendered only by ``zyke.prompt_format.render_example``."""
    npc = NpcSpec.model_validate(row["npc"])
    history = [Turn.model_validate(t) for t in row.get("history", [])]
    reply = NpcReply.model_validate(row["reply"])
    prompt, completion = render_example(npc, history, row["input"], reply, row.get("state"),
                                        row.get("allowed_actions"))
    return Example(id=row["id"], prompt=prompt, completion=completion)


def process_file(
    name: str,
    lines: Iterable[str],
    result: Result,
    seen_ids: dict[str, str],
    on_line: Callable[[], None] | None = None,
) -> None:
    """Check and render one file's lines into ``result``.

    ``seen_ids`` maps each accepted id to where it was first seen, across all files of a run: a
    duplicate id would make it impossible to tell whether a held-out example leaked into training.
    Blank lines are skipped (not counted as rows) so a trailing newline or a spacer is harmless.
    """
    for lineno, text in enumerate(lines, start=1):
        if on_line is not None:
            on_line()
        if not text.strip():
            continue
        result.rows_per_file[name] += 1
        try:
            row = json.loads(text)
        except json.JSONDecodeError as exc:
            result.rejections.append(Rejection(name, lineno, None, f"bad JSON: {exc.msg} (column {exc.colno})"))
            continue
        row_id = row.get("id") if isinstance(row, dict) and isinstance(row.get("id"), str) else None
        reason = check_row(row)
        if reason is None and row_id in seen_ids:
            reason = f"duplicate id (first seen at {seen_ids[row_id]})"
        if reason is not None:
            result.rejections.append(Rejection(name, lineno, row_id, reason))
            continue
        seen_ids[row["id"]] = f"{name}:{lineno}"
        result.examples.append(render_row(row))


def process(
    sources: Sequence[tuple[str, Sequence[str]]],
    on_line: Callable[[], None] | None = None,
) -> Result:
    """Check and render every ``(file name, lines)`` source, in order; ``on_line`` drives a progress bar."""
    result = Result()
    seen_ids: dict[str, str] = {}
    for name, lines in sources:
        result.rows_per_file[name] += 0  # a file with no rows still shows up in the report
        process_file(name, lines, result, seen_ids, on_line)
    return result
