"""Recorded play experience: the versioned JSONL format, its reader, and what training makes of it.

One record is one NPC reply as a game saw it: the NPC (its ``NpcSpec``), the conversation before the
line, the game state, the player's line, the reply, the adapter that wrote it, and the feedback the game
sent afterwards (a reward in [-1, 1], optionally a label: the action, emotion or line that would have been
right). The format is documented in ``docs/EXPERIENCE.md``; this module is its reference reader, so the
daemon (which will write it) and training (which reads it) share one definition.

Why a reader this strict:

- **Versioned.** Every record carries ``v``; an unknown version is refused with a typed error instead of
  being half-read, so a file from a newer daemon never trains silently on misread fields.
- **Bounded.** Files, lines and record counts have caps (``Limits``): an experience file is written by a
  game running on a player's machine, and reading it must not take unbounded memory.
- **Typed errors.** Every problem is an ``ExperienceError`` subclass that names file and line; a torn last
  line (the writer killed mid-append) is reported as such and skipped, not treated as corruption.
- **Consistent.** Replies and labels must use the record's own NPC's emotions and actions (as the daemon
  decodes), so a label naming an undeclared action cannot teach the model something it can never say.
- **Private by construction.** ``extra="forbid"`` everywhere except the game state: a record cannot carry a
  token or any field the format does not name.

``to_npc_row`` and ``to_reward_row`` turn records into the two training inputs (``zyke-train blocks
--experience``): NPC dataset rows (``schemas/npc_example.json``) for ``zyke-train train``, and reward rows
for ``zyke-train rl``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, model_validator
from zyke.protocol.models import AdapterName, Label, NpcId, NpcReply, NpcSpec, Turn

#: The format version this reader understands (``v`` of every record).
FORMAT_VERSION = 1
#: A reply's id as the daemon assigns it (the request id of the npc.say it answered).
ReplyId = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_.:-]{1,128}$")]


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
    """A record of a format version this reader does not know (written by a newer daemon)."""


class BadRecord(ExperienceError):
    """A line that is not a valid record (bad JSON, schema or consistency error)."""


class TornLine(ExperienceError):
    """The last line has no newline and does not parse: a writer killed mid-append. Skipped, not fatal."""


@dataclass(frozen=True)
class Limits:
    """Caps on what one read may hold. The defaults fit a long play session (a record is ~1-4 KB)."""

    max_file_bytes: int = 64 << 20
    max_line_bytes: int = 256 << 10
    max_records: int = 100_000


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FeedbackLabel(_Model):
    """What would have been right. ``action`` is the common case ("should have been refuse")."""

    action: Label | None = None
    emotion: Label | None = None
    say: Annotated[str, StringConstraints(max_length=600)] | None = None

    @model_validator(mode="after")
    def _not_empty(self) -> FeedbackLabel:
        if self.action is None and self.emotion is None and self.say is None:
            raise ValueError("a label needs at least one of action, emotion, say")
        return self


class Feedback(_Model):
    """One rating of the reply, sent by the game after the fact (several may arrive for one reply)."""

    time: datetime
    reward: float = Field(ge=-1.0, le=1.0)
    label: FeedbackLabel | None = None
    #: Who rated: the game's code, the player, or a simulation (e.g. labels from a training split).
    source: Literal["game", "player", "simulated"] = "game"
    note: Annotated[str, StringConstraints(max_length=200)] | None = None


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
    feedback: list[Feedback] = Field(default_factory=list, max_length=64)

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
            if fb.label and fb.label.action is not None and fb.label.action not in allowed:
                raise ValueError(f"feedback/{i}/label/action {fb.label.action!r} is not an allowed action")
            if fb.label and fb.label.emotion is not None and fb.label.emotion not in emotions:
                raise ValueError(f"feedback/{i}/label/emotion {fb.label.emotion!r} is not a declared emotion")
        return self

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


@dataclass
class ReadResult:
    records: list[ExperienceRecord] = field(default_factory=list)
    #: Lines that were skipped (``strict=False``): bad records and a torn last line.
    problems: list[ExperienceError] = field(default_factory=list)


def parse_line(text: str, file: str = "<line>", line: int = 1) -> ExperienceRecord:
    """One record from one JSONL line; raises ``UnsupportedVersion`` or ``BadRecord``."""
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BadRecord(file, line, f"not JSON ({exc.msg}, column {exc.colno})") from exc
    if not isinstance(raw, dict):
        raise BadRecord(file, line, "a record is a JSON object")
    if raw.get("v") != FORMAT_VERSION:
        raise UnsupportedVersion(file, line, f"format version {raw.get('v')!r}; this reader knows "
                                             f"{FORMAT_VERSION} (update zyke-train)")
    try:
        return ExperienceRecord.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = "/".join(str(p) for p in err["loc"]) or "(record)"
        raise BadRecord(file, line, f"{where}: {err['msg']}") from exc


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


def read_experience(paths: Iterable[Path], limits: Limits = Limits(), strict: bool = False) -> ReadResult:
    """Every record of the files, in order. ``strict``: the first problem raises; otherwise bad lines are
    collected in ``problems`` and skipped. A file over its caps or of an unknown version always raises: the
    first means it is not an experience file of ours, the second that skipping would hide every record."""
    result = ReadResult()
    for path in paths:
        for lineno, text, complete in iter_lines(path, limits):
            if not text.strip():
                continue
            try:
                record = parse_line(text, str(path), lineno)
            except UnsupportedVersion:
                raise
            except BadRecord as exc:
                problem: ExperienceError = exc if complete else TornLine(str(path), lineno, f"torn last line "
                                                                                             f"({exc.reason})")
                if strict and complete:
                    raise
                result.problems.append(problem)
                continue
            if len(result.records) >= limits.max_records:
                raise ExperienceTooLarge(str(path), lineno, f"more than {limits.max_records} records")
            result.records.append(record)
    return result


def record_id(record: ExperienceRecord) -> str:
    """A row id that is stable for a record and valid in ``schemas/npc_example.json``."""
    digest = hashlib.sha256(f"{record.game}|{record.npc}|{record.reply_id}".encode()).hexdigest()[:12]
    return f"exp-{record.npc[:40]}-{digest}"


def _context(record: ExperienceRecord) -> dict[str, Any]:
    row: dict[str, Any] = {"id": record_id(record), "npc": record.spec.model_dump(exclude_none=True),
                           "history": [t.model_dump(exclude_none=True) for t in record.history],
                           "input": record.input}
    if record.state:
        row["state"] = record.state
    if record.allowed_actions:
        row["allowed_actions"] = list(record.allowed_actions)
    return row


def corrected_reply(record: ExperienceRecord) -> dict[str, str]:
    """The recorded reply with the label's fields put in (only say, emotion, action: what the daemon decodes)."""
    reply = {"say": record.reply.say, "emotion": record.reply.emotion, "action": record.reply.action}
    label = record.label
    if label is not None:
        reply |= label.model_dump(exclude_none=True)
    return reply


def to_npc_row(record: ExperienceRecord, min_reward: float = 0.5) -> dict[str, Any] | None:
    """An NPC dataset row to train on, or None when the record teaches nothing by imitation.

    A labelled record becomes a row with the corrected reply (whatever its reward: the label says what
    was right). An unlabelled one becomes a row with the reply as given when its mean reward is at least
    ``min_reward`` (the game liked it). Negative unlabelled feedback says only what was wrong: that is
    for ``rl``, not for imitation."""
    if record.label is None and (record.reward is None or record.reward < min_reward):
        return None
    return _context(record) | {"reply": corrected_reply(record), "tags": ["experience"]}


def to_reward_row(record: ExperienceRecord) -> dict[str, Any] | None:
    """A reward row for ``zyke-train rl`` (None without feedback): the prompt's context, the recorded reply,
    its mean reward and the merged label. Format in docs/EXPERIENCE.md."""
    if not record.feedback:
        return None
    label = record.label
    return _context(record) | {
        "recorded": {"say": record.reply.say, "emotion": record.reply.emotion, "action": record.reply.action},
        "reward": record.reward,
        "label": label.model_dump(exclude_none=True) if label else None,
        "adapter": record.adapter,
    }


def convert(paths: Iterable[Path], out: Path, min_reward: float = 0.5, limits: Limits = Limits()
            ) -> dict[str, Any]:
    """``zyke-train blocks --experience``: write ``npc_rows.jsonl`` and ``reward_rows.jsonl`` into ``out``
    (plus ``experience_manifest.json`` with the counts) and return the counts.

    NPC rows are checked with ``npc_data.check_row`` (the same checks ``zyke-train npc-data`` makes), so
    a row written here is a row ``train`` accepts."""
    from .npc_data import check_row

    paths = list(paths)
    result = read_experience(paths, limits)
    out.mkdir(parents=True, exist_ok=True)
    counts = {"records": len(result.records), "skipped_lines": len(result.problems), "npc_rows": 0,
              "reward_rows": 0, "labelled": 0, "rejected_rows": 0}
    rejected: list[str] = []
    with (out / "npc_rows.jsonl").open("w", encoding="utf-8") as npc_fh, \
            (out / "reward_rows.jsonl").open("w", encoding="utf-8") as reward_fh:
        for record in result.records:
            counts["labelled"] += record.label is not None
            row = to_npc_row(record, min_reward)
            if row is not None:
                reason = check_row(row)
                if reason is None:
                    npc_fh.write(json.dumps(row, ensure_ascii=False) + "\n")
                    counts["npc_rows"] += 1
                else:
                    counts["rejected_rows"] += 1
                    rejected.append(f"{record.reply_id}: {reason}")
            reward = to_reward_row(record)
            if reward is not None:
                reward_fh.write(json.dumps(reward, ensure_ascii=False) + "\n")
                counts["reward_rows"] += 1
    manifest = {"format_version": FORMAT_VERSION, "sources": [str(p) for p in paths], "min_reward": min_reward,
                "counts": counts, "problems": [str(p) for p in result.problems][:100], "rejected": rejected[:100]}
    (out / "experience_manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest
