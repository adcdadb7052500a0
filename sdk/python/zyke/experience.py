"""Recorded play experience: the versioned JSONL format (docs/EXPERIENCE.md), its models and its reader.

One record is one NPC reply as a game saw it: the NPC (its ``NpcSpec``), the conversation before the
line, the game state, the player's line, the reply, the adapter that wrote it, and the feedback the game
sent afterwards (a reward in [-1, 1], optionally a label: the action, emotion or line that would have been
right). Feedback that arrives after the reply was written is appended as a *feedback line* naming the
reply, and the reader merges it into the record.

This module lives in the SDK because three parties share it: the daemon writes the format (its recorder
validates every line with these models before appending it), ``zyke-daemon experience export`` reads it,
and ``zyke-train`` (``zyke_train.experience``) turns it into training rows. The daemon must not import
training code, and the SDK must not import the daemon, so the one definition sits here.

Why a reader this strict:

- **Versioned.** Every line carries ``v``; an unknown version is refused with a typed error instead of
  being half-read, so a file from a newer daemon never trains silently on misread fields.
- **Bounded.** Files, lines and record counts have caps (``Limits``): an experience file is written by a
  game running on a player's machine, and reading it must not take unbounded memory.
- **Typed errors.** Every problem is an ``ExperienceError`` subclass that names file and line; a torn last
  line (the writer killed mid-append) is reported as such and skipped, not treated as corruption.
- **Consistent.** Replies and labels must use the record's own NPC's emotions and actions (as the daemon
  decodes), so a label naming an undeclared action cannot teach the model something it can never say.
- **Private by construction.** ``extra="forbid"`` everywhere except the game state: a line cannot carry a
  token or any field the format does not name.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, model_validator

from .protocol.models import AdapterName, FeedbackLabel, Label, NpcId, NpcReply, NpcSpec, Turn

__all__ = [
    "FEEDBACK_KIND",
    "FORMAT_VERSION",
    "MAX_FEEDBACK",
    "REPLY_ID_PATTERN",
    "BadRecord",
    "ExperienceError",
    "ExperienceRecord",
    "ExperienceTooLarge",
    "Feedback",
    "FeedbackLabel",
    "FeedbackLine",
    "Limits",
    "ReadResult",
    "ReplyId",
    "TornLine",
    "UnsupportedVersion",
    "iter_lines",
    "label_problem",
    "parse_entry",
    "parse_line",
    "read_experience",
]

#: The format version this reader understands (``v`` of every line).
FORMAT_VERSION = 1
#: The ``kind`` of a feedback line (a record has no ``kind``).
FEEDBACK_KIND = "feedback"
#: The most feedback entries one record holds (the reader refuses more; the daemon answers ``experience_full``).
MAX_FEEDBACK = 64
REPLY_ID_PATTERN = r"^[A-Za-z0-9_.:-]{1,128}$"
#: A reply's id as the daemon assigns it (the request id of the npc.say it answered).
ReplyId = Annotated[str, StringConstraints(pattern=REPLY_ID_PATTERN)]


class ExperienceError(Exception):
    """Anything wrong with an experience file; ``file`` and ``line`` (1-based, 0: the whole file) say where."""

    def __init__(self, file: str, line: int, reason: str) -> None:
        super().__init__(f"{file}:{line}: {reason}" if line else f"{file}: {reason}")
        self.file = file
        self.line = line
        self.reason = reason


class ExperienceTooLarge(ExperienceError):
    """The file, a line or the record count is over its ``Limits``."""


class UnsupportedVersion(ExperienceError):
    """A line of a format version this reader does not know (written by a newer daemon)."""


class BadRecord(ExperienceError):
    """A line that is not a valid record or feedback line (bad JSON, schema or consistency error, or feedback
    for a reply no earlier line records)."""


class TornLine(ExperienceError):
    """The last line has no newline and does not parse: a writer killed mid-append. Skipped, not fatal."""


@dataclass(frozen=True)
class Limits:
    """Caps on what one read may hold, and where the daemon's recorder stops writing. The defaults fit a long
    play session (a record is ~1-4 KB)."""

    max_file_bytes: int = 64 << 20
    max_line_bytes: int = 256 << 10
    max_records: int = 100_000


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Feedback(_Model):
    """One rating of the reply, sent by the game after the fact (several may arrive for one reply)."""

    time: datetime
    reward: float = Field(ge=-1.0, le=1.0)
    label: FeedbackLabel | None = None
    #: Who rated: the game's code, the player, or a simulation (e.g. labels from a training split).
    source: Literal["game", "player", "simulated"] = "game"
    note: Annotated[str, StringConstraints(max_length=200)] | None = None


def label_problem(spec: NpcSpec, allowed_actions: list[str] | None, label: FeedbackLabel | None) -> str | None:
    """Why ``label`` cannot be a label of a reply by ``spec`` under ``allowed_actions``, or None.

    One rule for the daemon (which refuses such feedback with ``bad_label``) and the reader (which refuses
    such a record), so a rating the daemon accepted never makes its record unreadable."""
    if label is None:
        return None
    allowed = allowed_actions or spec.action_names
    if label.action is not None and label.action not in allowed:
        return f"label action {label.action!r} is not an allowed action (allowed: {', '.join(allowed)})"
    if label.emotion is not None and label.emotion not in spec.emotion_names:
        return (f"label emotion {label.emotion!r} is not a declared emotion "
                f"(declared: {', '.join(spec.emotion_names)})")
    return None


class ExperienceRecord(_Model):
    """One reply with its context and feedback; the line format of an experience file (``v`` = 1)."""

    v: Literal[1]
    time: datetime
    game: NpcId | None = None
    reply_id: ReplyId
    npc: NpcId
    spec: NpcSpec
    history: list[Turn] = Field(default_factory=list, max_length=200)
    state: dict[str, Any] | None = None
    allowed_actions: list[Label] | None = Field(None, min_length=1, max_length=64)
    input: Annotated[str, StringConstraints(min_length=1, max_length=4000)]
    reply: NpcReply
    adapter: AdapterName | None = None
    feedback: list[Feedback] = Field(default_factory=list, max_length=MAX_FEEDBACK)

    @model_validator(mode="after")
    def _consistent(self) -> ExperienceRecord:
        if self.npc != self.spec.id:
            raise ValueError(f"npc {self.npc!r} is not the spec's id {self.spec.id!r}")
        actions, emotions = set(self.spec.action_names), set(self.spec.emotion_names)
        allowed = set(self.allowed_actions) if self.allowed_actions else actions
        if not allowed <= actions:
            raise ValueError(f"allowed_actions {sorted(allowed - actions)} are not declared by the NPC")
        if self.reply.action not in allowed or self.reply.emotion not in emotions:
            raise ValueError(f"reply uses {self.reply.action!r}/{self.reply.emotion!r}, outside the NPC's "
                             "allowed actions/emotions")
        for i, fb in enumerate(self.feedback):
            problem = label_problem(self.spec, self.allowed_actions, fb.label)
            if problem:
                raise ValueError(f"feedback/{i}/{problem}")
        return self

    @property
    def key(self) -> tuple[str | None, str, str]:
        """What feedback lines name a record by: (game, npc, reply_id)."""
        return self.game, self.npc, self.reply_id

    @property
    def reward(self) -> float | None:
        """The mean reward of the feedback entries (None without feedback)."""
        return sum(f.reward for f in self.feedback) / len(self.feedback) if self.feedback else None

    @property
    def label(self) -> FeedbackLabel | None:
        """The labels merged, later entries winning field by field (the game may correct itself)."""
        merged: dict[str, Any] = {}
        for fb in self.feedback:
            if fb.label is not None:
                merged |= fb.label.model_dump(exclude_none=True)
        return FeedbackLabel(**merged) if merged else None


class FeedbackLine(_Model):
    """A rating that arrived after its reply was written: merged by the reader into the latest earlier record
    with the same (game, npc, reply_id). The daemon appends these instead of rewriting the record, so an
    append-only file stays the whole story and a kill -9 can only tear the last line."""

    v: Literal[1]
    kind: Literal["feedback"]
    game: NpcId | None = None
    npc: NpcId
    reply_id: ReplyId
    feedback: Feedback

    @property
    def key(self) -> tuple[str | None, str, str]:
        return self.game, self.npc, self.reply_id


@dataclass
class ReadResult:
    records: list[ExperienceRecord] = field(default_factory=list)
    #: Lines that were skipped (``strict=False``): bad records, orphan feedback and a torn last line.
    problems: list[ExperienceError] = field(default_factory=list)
    #: Feedback lines merged into their records.
    feedback_lines: int = 0


def parse_entry(text: str, file: str = "<line>", line: int = 1) -> ExperienceRecord | FeedbackLine:
    """One record or feedback line from one JSONL line; raises ``UnsupportedVersion`` or ``BadRecord``."""
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BadRecord(file, line, f"not JSON ({exc.msg}, column {exc.colno})") from exc
    if not isinstance(raw, dict):
        raise BadRecord(file, line, "a record is a JSON object")
    if raw.get("v") != FORMAT_VERSION:
        raise UnsupportedVersion(file, line, f"format version {raw.get('v')!r}; this reader knows "
                                             f"{FORMAT_VERSION} (update zyke)")
    model: type[ExperienceRecord | FeedbackLine] = FeedbackLine if "kind" in raw else ExperienceRecord
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = "/".join(str(p) for p in err["loc"]) or "(record)"
        raise BadRecord(file, line, f"{where}: {err['msg']}") from exc


def parse_line(text: str, file: str = "<line>", line: int = 1) -> ExperienceRecord:
    """One record from one JSONL line; raises ``UnsupportedVersion`` or ``BadRecord`` (also for a feedback
    line, which is not a record on its own)."""
    entry = parse_entry(text, file, line)
    if not isinstance(entry, ExperienceRecord):
        raise BadRecord(file, line, "a feedback line, not a record")
    return entry


def iter_lines(path: Path, limits: Limits) -> Iterator[tuple[int, str, bool]]:
    """``(line number, text, ends with a newline)`` of a file within ``limits``; raises ExperienceTooLarge."""
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise ExperienceError(str(path), 0, f"cannot read: {exc}") from exc
    if size > limits.max_file_bytes:
        raise ExperienceTooLarge(str(path), 0, f"{size} bytes, over the {limits.max_file_bytes}-byte cap")
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            if len(raw) > limits.max_line_bytes:
                raise ExperienceTooLarge(str(path), lineno, f"line of {len(raw)} bytes, over the "
                                                            f"{limits.max_line_bytes}-byte cap")
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise BadRecord(str(path), lineno, f"not UTF-8 ({exc.reason})") from exc
            yield lineno, text, text.endswith("\n")


def _merge(record: ExperienceRecord, entry: FeedbackLine) -> str | None:
    """Append a feedback line's rating to its record, or say why it cannot be (the record stays as it was)."""
    if len(record.feedback) >= MAX_FEEDBACK:
        return f"reply {entry.reply_id!r} of NPC {entry.npc!r} already has {MAX_FEEDBACK} ratings"
    problem = label_problem(record.spec, record.allowed_actions, entry.feedback.label)
    if problem:
        return f"feedback/{problem}"
    record.feedback.append(entry.feedback)
    return None


def read_experience(paths: Iterable[Path], limits: Limits = Limits(), strict: bool = False) -> ReadResult:
    """Every record of the files, in order, with their feedback lines merged in. ``strict``: the first problem
    raises; otherwise bad lines are collected in ``problems`` and skipped. A file over its caps or of an
    unknown version always raises: the first means it is not an experience file of ours, the second that
    skipping would hide every record.

    A feedback line joins the latest earlier record (in these files, in this order) with its (game, npc,
    reply_id); one naming no earlier record, or whose label the record's NPC could not use, is a problem."""
    result = ReadResult()
    latest: dict[tuple[str | None, str, str], ExperienceRecord] = {}
    for path in paths:
        for lineno, text, complete in iter_lines(path, limits):
            if not text.strip():
                continue
            try:
                entry = parse_entry(text, str(path), lineno)
                if isinstance(entry, FeedbackLine):
                    record = latest.get(entry.key)
                    problem = (f"feedback for reply {entry.reply_id!r} of NPC {entry.npc!r}, which no earlier "
                               "line records") if record is None else _merge(record, entry)
                    if problem:
                        raise BadRecord(str(path), lineno, problem)
                    result.feedback_lines += 1
                    continue
            except UnsupportedVersion:
                raise
            except BadRecord as exc:
                problem_: ExperienceError = exc if complete else TornLine(str(path), lineno, f"torn last line "
                                                                                              f"({exc.reason})")
                if strict and complete:
                    raise
                result.problems.append(problem_)
                continue
            if len(result.records) >= limits.max_records:
                raise ExperienceTooLarge(str(path), lineno, f"more than {limits.max_records} records")
            result.records.append(entry)
            latest[entry.key] = entry
    return result
