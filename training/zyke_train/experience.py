"""Recorded play experience: the versioned JSONL format, its reader, and what training makes of it.

One record is one NPC reply as a game saw it: the NPC (its ``NpcSpec``), the conversation before the
line, the game state, the player's line, the reply, the adapter that wrote it, and the feedback the game
sent afterwards (a reward in [-1, 1], optionally a label: the action, emotion or line that would have been
right). The format is documented in ``docs/EXPERIENCE.md``; its models and reader are ``zyke.experience`` (the
SDK's, so the daemon that writes it and training that reads it share one definition), re-exported here.

Why the reader is as strict as it is (versioned, bounded, typed errors, consistent labels, no field the format
does not name): ``zyke.experience``'s docstring.

``to_npc_row`` and ``to_reward_row`` turn records into the two training inputs (``zyke-train blocks
--experience``): NPC dataset rows (``schemas/npc_example.json``) for ``zyke-train train``, and reward rows
for ``zyke-train rl``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

# The format's models and reader live in the SDK (``zyke.experience``), shared with the daemon's recorder and
# ``zyke-daemon experience export``; they are re-exported here so training code keeps one import.
from zyke.experience import (
    FORMAT_VERSION,
    BadRecord,
    ExperienceError,
    ExperienceRecord,
    ExperienceTooLarge,
    Feedback,
    FeedbackLabel,
    FeedbackLine,
    Limits,
    ReadResult,
    ReplyId,
    TornLine,
    UnsupportedVersion,
    iter_lines,
    parse_entry,
    parse_line,
    read_experience,
)

__all__ = [
    "FORMAT_VERSION",
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
    "convert",
    "corrected_reply",
    "iter_lines",
    "parse_entry",
    "parse_line",
    "read_experience",
    "record_id",
    "to_npc_row",
    "to_reward_row",
]

_DEFAULT_LIMITS = Limits()  # frozen: safe as a shared default


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


def convert(paths: Iterable[Path], out: Path, min_reward: float = 0.5, limits: Limits = _DEFAULT_LIMITS
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
