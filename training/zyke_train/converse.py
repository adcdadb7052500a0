"""Repetition across turns (``zyke-train converse``): scripted conversations through the real daemon.

The product requirement this measures: in 6-turn scripted conversations over at least 10 NPCs, no reply
shares a 6-gram (six consecutive words) with an earlier reply of the same NPC, unless the player asked
it to repeat itself. ``zyke-train evaluate`` scores single replies to single scenarios, so it cannot see
an NPC that answers "How much?" and then "Come on, how much really?" with the same sentence; this module
holds whole conversations, in order, with the daemon keeping the history, as a game would.

Pure logic plus one loop over an SDK client: loading the script file, the word 6-gram check, running one
script against a ``zyke.Client`` (or anything shaped like one, so tests can pass a fake) and the summary.
The click command in ``cli.py`` only parses flags, connects and prints.

Definitions (the README's table repeats them):

- Words: the reply lowercased, apostrophes dropped (``don't`` is one word, ``dont``), every other
  punctuation or symbol character turned into a space (``ten-gold`` is two words), split on whitespace.
- A turn *repeats* when its reply shares at least one word n-gram (n=6) with the reply of any earlier
  turn of the same conversation. Turns listed in the script's ``repeat_ok`` (0-based; the player asked
  the NPC to say it again) are not checked, but their replies still count as earlier replies for the
  turns after them. Conversations are checked separately: each one starts with ``npc.reset()``.
- ``replies_with_repeat.rate`` is over the *checked* replies: turns that have an earlier reply and are
  not in ``repeat_ok`` (five per 6-turn conversation without ``repeat_ok``).
- ``distinct_lines_rate``: distinct normalized lines (the words above, joined) among the replies not in
  ``repeat_ok``, over their count, across the whole run: 1.0 when no NPC ever said the same line twice.
"""

from __future__ import annotations

import json
import time
import unicodedata
from collections import Counter
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from pydantic import ValidationError
from zyke.protocol import NpcSpec

#: Words per n-gram: the product requirement's "6 consecutive words".
NGRAM = 6
#: Keys a script line may have; anything else is a typo worth failing on before minutes of generation.
SCRIPT_KEYS = frozenset({"id", "npc", "turns", "repeat_ok"})
TURN_KEYS = frozenset({"input", "state"})
_APOSTROPHES = frozenset("'\u2018\u2019`")


class ScriptError(ValueError):
    """The script file cannot be read or a line in it is malformed (the message names file and line)."""


@dataclass(frozen=True)
class Turn:
    """One player line and the game state the NPC should know when it hears it."""

    input: str
    state: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Script:
    """One scripted conversation: an NPC, its player lines in order, and the turns allowed to repeat."""

    id: str
    npc: NpcSpec
    turns: tuple[Turn, ...]
    repeat_ok: frozenset[int] = frozenset()


@dataclass(frozen=True)
class Overlap:
    """Turn ``turn``'s reply shares these word n-grams with the reply of the earlier turn ``earlier_turn``."""

    turn: int
    earlier_turn: int
    ngrams: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"turn": self.turn, "earlier_turn": self.earlier_turn, "ngrams": list(self.ngrams)}


@dataclass(frozen=True)
class TurnResult:
    """What the daemon answered to one scripted turn, as the report keeps it."""

    index: int
    input: str
    state: dict[str, Any]
    say: str
    emotion: str
    action: str
    finish_reason: str
    adapter: str | None
    repeat_ok: bool
    valid: bool

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "input": self.input, "state": self.state, "say": self.say,
                "emotion": self.emotion, "action": self.action, "finish_reason": self.finish_reason,
                "adapter": self.adapter, "repeat_ok": self.repeat_ok, "valid": self.valid}


@dataclass(frozen=True)
class ConversationResult:
    """One script's replies and the overlaps found among them."""

    script: Script
    turns: tuple[TurnResult, ...]
    overlaps: tuple[Overlap, ...]

    @property
    def repeating_turns(self) -> list[int]:
        """The turns whose reply repeats an earlier one (each counted once, however many overlaps)."""
        return sorted({o.turn for o in self.overlaps})

    @property
    def checked(self) -> int:
        """Replies that could repeat: not the first turn and not a turn in ``repeat_ok``."""
        return sum(1 for t in self.turns if t.index > 0 and not t.repeat_ok)

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.script.id, "npc": self.script.npc.id, "name": self.script.npc.display_name,
                "repeat_ok": sorted(self.script.repeat_ok), "checked": self.checked,
                "replies_with_repeat": len(self.repeating_turns), "turns": [t.to_dict() for t in self.turns],
                "overlaps": [o.to_dict() for o in self.overlaps]}


# -- words and n-grams


def words(text: str) -> list[str]:
    """The reply as the requirement counts words: lowercase, punctuation stripped, split on whitespace.

    Apostrophes are dropped so a contraction stays one word; other punctuation and symbols become spaces
    so that "gold.Come" or an em dash without spaces cannot glue two words into one the other reply lacks.
    """
    out: list[str] = []
    for ch in text.lower():
        if ch in _APOSTROPHES:
            continue
        out.append(" " if unicodedata.category(ch)[0] in "PS" else ch)
    return "".join(out).split()


def ngrams(text: str, n: int = NGRAM) -> list[str]:
    """The text's word n-grams in order of first appearance, each once, as space-joined strings."""
    toks = words(text)
    return list(dict.fromkeys(" ".join(toks[i:i + n]) for i in range(len(toks) - n + 1)))


def find_overlaps(replies: Sequence[str], repeat_ok: Collection[int] = (), n: int = NGRAM) -> list[Overlap]:
    """Every (turn, earlier turn) pair whose replies share a word n-gram, with the shared n-grams.

    ``replies`` are one NPC's replies in conversation order. Turns in ``repeat_ok`` are skipped as the
    later turn (the player asked for a repeat) but still serve as earlier turns for what follows.
    """
    grams = [ngrams(reply, n) for reply in replies]
    sets = [set(g) for g in grams]
    found: list[Overlap] = []
    for i, mine in enumerate(grams):
        if i in repeat_ok:
            continue
        for j in range(i):
            shared = tuple(g for g in mine if g in sets[j])
            if shared:
                found.append(Overlap(i, j, shared))
    return found


# -- the script file


def load_scripts(path: Path) -> list[Script]:
    """Read and check a conversations JSONL file; any malformed line fails the whole file.

    Failing early matters because a run costs minutes of generation: a typo in turn 5 of script 12
    should not surface after eleven conversations. An NPC id used by several scripts must carry the same
    definition in each, so "NPCs" in the summary means distinct characters.
    """
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ScriptError(f"cannot read {path}: {exc}") from exc
    scripts: list[Script] = []
    ids: set[str] = set()
    specs: dict[str, NpcSpec] = {}
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        script = _parse_script(line, where)
        if script.id in ids:
            raise ScriptError(f"{where}: script id {script.id!r} is used twice")
        earlier = specs.setdefault(script.npc.id, script.npc)
        if earlier != script.npc:
            raise ScriptError(f"{where}: NPC {script.npc.id!r} is defined differently by an earlier script")
        ids.add(script.id)
        scripts.append(script)
    if not scripts:
        raise ScriptError(f"{path} holds no scripts")
    return scripts


def _parse_script(line: str, where: str) -> Script:
    try:
        raw = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ScriptError(f"{where}: not JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise ScriptError(f"{where}: a script must be a JSON object")
    unknown = set(raw) - SCRIPT_KEYS
    missing = {"id", "npc", "turns"} - set(raw)
    if unknown or missing:
        problems = ([f"unknown keys {sorted(unknown)}"] if unknown else []) + (
            [f"missing keys {sorted(missing)}"] if missing else [])
        raise ScriptError(f"{where}: {', '.join(problems)}")
    sid = raw["id"]
    if not isinstance(sid, str) or not sid.strip():
        raise ScriptError(f"{where}: id must be a non-empty string")
    try:
        npc = NpcSpec.model_validate(raw["npc"])
    except ValidationError as exc:
        raise ScriptError(f"{where}: bad npc: {exc}") from exc
    turns_raw = raw["turns"]
    if not isinstance(turns_raw, list) or not turns_raw:
        raise ScriptError(f"{where}: turns must be a non-empty list")
    turns: list[Turn] = []
    for index, turn in enumerate(turns_raw):
        if not isinstance(turn, dict) or set(turn) - TURN_KEYS or "input" not in turn:
            raise ScriptError(f"{where}: turn {index} must be {{\"input\": str, \"state\": object}}")
        text, state = turn["input"], turn.get("state", {})
        if not isinstance(text, str) or not text.strip() or not isinstance(state, dict):
            raise ScriptError(f"{where}: turn {index}: input must be a non-empty string and state an object")
        turns.append(Turn(text, state))
    repeat_ok = raw.get("repeat_ok", [])
    if (not isinstance(repeat_ok, list)
            or not all(isinstance(i, int) and not isinstance(i, bool) and 0 < i < len(turns) for i in repeat_ok)):
        raise ScriptError(f"{where}: repeat_ok must list turn indices from 1 to {len(turns) - 1} (0-based)")
    return Script(sid, npc, tuple(turns), frozenset(repeat_ok))


# -- talking to the daemon


class ReplyLike(Protocol):
    """What the loop reads from ``npc.say`` (``zyke.NpcResponse`` has it)."""

    @property
    def say(self) -> str: ...
    @property
    def emotion(self) -> str: ...
    @property
    def action(self) -> str: ...
    @property
    def finish_reason(self) -> str: ...
    @property
    def adapter(self) -> str | None: ...


class NpcLike(Protocol):
    """The NPC handle calls the loop makes (``zyke.client.Npc`` has them)."""

    def reset(self) -> None: ...
    def say(self, text: str, *, state: Mapping[str, Any] | None = ..., adapter: str | None = ...,
            max_tokens: int | None = ...) -> ReplyLike: ...


class ClientLike(Protocol):
    """The client call the loop makes (``zyke.Client`` has it)."""

    def npc(self, npc_id: str, persona: str, actions: Any = ..., emotions: Any = ..., *,
            name: str | None = ...) -> NpcLike: ...


def converse(client: ClientLike, script: Script, *, max_tokens: int, adapter: str | None = None,
             on_turn: Callable[[], None] | None = None) -> ConversationResult:
    """Hold one scripted conversation with the daemon and check its replies for repeats.

    The NPC is (re)defined from the script and reset first, so history from an earlier run or another
    script cannot leak into this one. ``on_turn`` (no arguments) is called after each reply, for a
    progress bar.
    """
    spec = script.npc
    npc = client.npc(spec.id, spec.persona, spec.actions, spec.emotions, name=spec.name)
    npc.reset()
    emotions, actions = set(spec.emotion_names), set(spec.action_names)
    results: list[TurnResult] = []
    for index, turn in enumerate(script.turns):
        reply = npc.say(turn.input, state=turn.state, adapter=adapter, max_tokens=max_tokens)
        results.append(TurnResult(
            index=index, input=turn.input, state=turn.state, say=reply.say, emotion=reply.emotion,
            action=reply.action, finish_reason=reply.finish_reason, adapter=reply.adapter,
            repeat_ok=index in script.repeat_ok, valid=reply.emotion in emotions and reply.action in actions))
        if on_turn is not None:
            on_turn()
    overlaps = find_overlaps([r.say for r in results], script.repeat_ok)
    return ConversationResult(script, tuple(results), tuple(overlaps))


# -- the report


def summarize(results: Sequence[ConversationResult]) -> dict[str, Any]:
    """The run's numbers: how many replies repeat an earlier one, and how varied the lines are overall."""
    turns = [t for r in results for t in r.turns]
    checked = sum(r.checked for r in results)
    repeating = sum(len(r.repeating_turns) for r in results)
    lines = [" ".join(words(t.say)) for t in turns if not t.repeat_ok]
    adapters = Counter(t.adapter for t in turns)
    return {
        "conversations": len(results),
        "npcs": len({r.script.npc.id for r in results}),
        "turns": len(turns),
        "replies_checked": checked,
        "replies_with_repeat": {"count": repeating, "rate": round(repeating / checked, 4) if checked else 0.0},
        "distinct_lines_rate": round(len(set(lines)) / len(lines), 4) if lines else 0.0,
        "invalid_replies": sum(not t.valid for t in turns),
        "cut_replies": sum(t.finish_reason == "length" for t in turns),
        # the adapter the daemon says it used (null: the base model); a list only if replies disagree
        "adapter": next(iter(adapters)) if len(adapters) == 1 else sorted(adapters, key=str),
        "ngram": NGRAM,
    }


def build_report(results: Sequence[ConversationResult], *, script_path: str, max_tokens: int,
                 requested_adapter: str | None, daemon: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The JSON report: run settings, the summary, and every conversation turn by turn."""
    return {"created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "script": script_path,
            "max_tokens": max_tokens, "requested_adapter": requested_adapter, "daemon": dict(daemon or {}),
            "summary": summarize(results), "conversations": [r.to_dict() for r in results]}


def format_table(results: Sequence[ConversationResult], max_ngram_lines: int = 20) -> str:
    """A short per-conversation table, the repeats found (one example n-gram each) and the summary."""
    ids = [r.script.id for r in results]
    npcs = [r.script.npc.display_name for r in results]
    w1 = max(len("conversation"), *map(len, ids)) if ids else len("conversation")
    w2 = max(len("npc"), *map(len, npcs)) if npcs else len("npc")
    rows = [f"{'conversation':<{w1}}  {'npc':<{w2}}  turns  repeats  distinct"]
    for r, sid, name in zip(results, ids, npcs, strict=True):
        said = [" ".join(words(t.say)) for t in r.turns if not t.repeat_ok]
        rows.append(f"{sid:<{w1}}  {name:<{w2}}  {len(r.turns):>5}  {len(r.repeating_turns):>3}/{r.checked:<3}  "
                    f"{len(set(said))}/{len(said)}")
    overlaps = [(r.script.id, o) for r in results for o in r.overlaps]
    if overlaps:
        rows.append("")
        rows.append(f"{len(overlaps)} overlapping pairs (turn ~ earlier turn: first shared {NGRAM}-gram):")
        for sid, o in overlaps[:max_ngram_lines]:
            more = f" (+{len(o.ngrams) - 1} more)" if len(o.ngrams) > 1 else ""
            rows.append(f"  {sid} turn {o.turn} ~ turn {o.earlier_turn}: \"{o.ngrams[0]}\"{more}")
        if len(overlaps) > max_ngram_lines:
            rows.append(f"  ... and {len(overlaps) - max_ngram_lines} more (see --report)")
    s = summarize(results)
    rows.append("")
    rows.append(f"{s['conversations']} conversations, {s['npcs']} NPCs, {s['turns']} turns; "
                f"replies with a repeated {NGRAM}-gram: {s['replies_with_repeat']['count']}/{s['replies_checked']} "
                f"({s['replies_with_repeat']['rate']:.3f}); distinct lines rate {s['distinct_lines_rate']:.3f}; "
                f"invalid {s['invalid_replies']}, cut by max-tokens {s['cut_replies']}; adapter {s['adapter']}")
    return "\n".join(rows)
