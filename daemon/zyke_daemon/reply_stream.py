"""Turn the reply JSON as it is generated into deltas of the spoken line.

The model writes ``{"say": "Aye, hand it over.", "emotion": ...}``; a game wants to show
``Aye, hand it over.`` as it appears, not JSON. Because ``say`` is the first key (prompt_format),
the line can be cut out of the growing text and JSON-unescaped as it goes. The deltas concatenate
to exactly the final reply's ``say``.
"""

from __future__ import annotations

import json
import re
from typing import Any

_OPEN = re.compile(r'^\s*\{\s*"say"\s*:\s*"')


class SayExtractor:
    def __init__(self) -> None:
        self._raw = ""
        self._emitted = ""
        self._done = False

    def feed(self, text: str) -> str:
        """Add generated text; return the new part of the spoken line (possibly empty)."""
        if self._done:
            return ""
        self._raw += text
        match = _OPEN.match(self._raw)
        if not match:
            return ""
        body, closed = _string_body(self._raw[match.end():])
        try:
            decoded: str = json.loads(f'"{body}"')  # a JSON string literal decodes to a str
        except json.JSONDecodeError:
            return ""
        self._done = closed
        delta = decoded[len(self._emitted):]
        self._emitted = decoded
        return delta

    @property
    def text(self) -> str:
        return self._emitted

    @property
    def closed(self) -> bool:
        """The line's closing quote has been generated."""
        return self._done


def _string_body(rest: str) -> tuple[str, bool]:
    """The JSON string content up to its closing quote (or a safe cut point if it is still open)."""
    i = 0
    while i < len(rest):
        ch = rest[i]
        if ch == "\\":
            if i + 1 >= len(rest):
                return rest[:i], False
            if rest[i + 1] == "u" and i + 6 > len(rest):
                return rest[:i], False
            if rest[i + 1] == "u" and rest[i + 2 : i + 4].lower() in ("d8", "d9", "da", "db") and i + 12 > len(rest):
                return rest[:i], False  # a surrogate pair (\ud8xx-\udbxx) is decoded once both halves are here
            i += 6 if rest[i + 1] == "u" else 2
            continue
        if ch == '"':
            return rest[:i], True
        i += 1
    return rest, False


class ReplyAssembler:
    """Follows one generation: yields say-deltas, applies stop strings, and builds the final reply.

    A generation can end before its JSON closes (max_tokens, a stop string, or a cancel). The game
    still gets a schema-valid reply then: the line spoken so far, and the NPC's default emotion and
    action unless the model already wrote them.
    """

    def __init__(self, emotions: list[str], actions: list[str], default_emotion: str | None,
                 default_action: str | None, stop: list[str] | None = None) -> None:
        self._extractor = SayExtractor()
        self._raw: list[str] = []
        self._emotions = emotions
        self._actions = actions
        self._default_emotion = default_emotion if default_emotion in emotions else emotions[0]
        self._default_action = default_action if default_action in actions else _neutral_action(actions)
        self._stop = stop or []
        self.stopped_by_string = False
        self._say_cut: str | None = None
        self._sent = 0

    def feed(self, text: str) -> tuple[str, bool]:
        """Add generated text; return (new spoken text, keep generating).

        With stop strings, text that could be the start of one is held back until it is clear it
        is not, so a client never sees the half of a stop string it will not get in the reply.
        """
        self._raw.append(text)
        self._extractor.feed(text)
        said = self._extractor.text
        if not self._stop:
            return self._advance(len(said)), True
        hits = [i for i in (said.find(s) for s in self._stop) if i >= 0]
        if hits:
            self._say_cut = said[: min(hits)]
            self.stopped_by_string = True
            return self._advance(len(self._say_cut)), False
        safe = len(said) if self._extractor.closed else len(said) - _pending_prefix(said, self._stop)
        return self._advance(safe), True

    def _advance(self, upto: int) -> str:
        said = self._say_cut if self._say_cut is not None else self._extractor.text
        delta = said[self._sent:upto] if upto > self._sent else ""
        self._sent = max(self._sent, upto)
        return delta

    @property
    def raw(self) -> str:
        return "".join(self._raw)

    def reply(self) -> tuple[dict[str, Any], bool]:
        """(reply dict, complete): complete is True when the model closed its JSON itself."""
        if self._say_cut is None:
            try:
                data = json.loads(self.raw)
                if isinstance(data, dict):
                    return data, True
            except json.JSONDecodeError:
                pass
        say = self._say_cut if self._say_cut is not None else self._extractor.text
        tail = self.raw
        return {
            "say": say.strip(),
            "emotion": _complete_value(tail, "emotion", self._emotions) or self._default_emotion,
            "action": _complete_value(tail, "action", self._actions) or self._default_action,
        }, False


def _pending_prefix(text: str, stops: list[str]) -> int:
    """Length of the longest end of text that is the beginning of a stop string."""
    for n in range(min(len(text), max(len(s) for s in stops) - 1), 0, -1):
        if any(s.startswith(text[-n:]) for s in stops):
            return n
    return 0


def _complete_value(raw: str, key: str, allowed: list[str]) -> str | None:
    match = re.search(rf'"{key}"\s*:\s*"([^"\\]*)"', raw)
    return match.group(1) if match and match.group(1) in allowed else None


def _neutral_action(actions: list[str]) -> str:
    for candidate in ("none", "idle", "talk", "nothing"):
        if candidate in actions:
            return candidate
    return actions[0]
