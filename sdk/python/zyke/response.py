"""What ``npc.say`` returns, and how generation options are given.

The wire's ``reply`` frame nests the NPC's line under ``reply``; game code mostly wants
``response.say`` / ``.emotion`` / ``.action``, so ``NpcResponse`` lifts those to the top and keeps
the rest (usage, timings, finish reason) next to them for logging and tuning.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from .errors import ZykeError
from .protocol import FeedbackLabel, GenerationOptions, NpcReply, Reply, Safety, Timings, Usage

OptionsLike = GenerationOptions | Mapping[str, Any] | None
#: A feedback label: a ``FeedbackLabel`` or a dict with some of ``action``, ``emotion``, ``say``.
LabelLike = FeedbackLabel | Mapping[str, str] | None
#: Who rated a reply: ``"game"`` (the default), ``"player"`` or ``"simulated"``.
Source = Literal["game", "player", "simulated"]
#: id(response) -> how to rate it (its client's feedback call). Kept beside the model, not in it, so a response
#: stays a plain value: equal, picklable and copyable whatever client it came through.
_RATERS: dict[int, Callable[..., Any]] = {}


class NpcResponse(BaseModel):
    """One NPC reply: what it says and does, plus how the daemon produced it.

    ``say``, ``emotion`` and ``action`` are guaranteed by the daemon to be valid for the NPC (emotion
    and action among the labels it was defined with). ``finish_reason`` is ``"length"`` when
    ``max_tokens`` cut the line short.
    """

    model_config = ConfigDict(frozen=True)

    npc: str
    request_id: str
    reply: NpcReply
    finish_reason: Literal["stop", "length"]
    adapter: str | None = None
    usage: Usage
    timings: Timings
    #: set when a safety rail intervened (the player's line was deflected, or words were kept out of the line)
    safety: Safety | None = None
    def rate(self, reward: float, *, label: LabelLike = None, source: Source | None = None,
             note: str | None = None) -> Any:
        """Rate this reply after the fact: ``reward`` in [-1, 1] (+1: the player laughed, the quest went on; -1: it
        broke the scene), ``label`` what would have been right (``{"action": "refuse"}``). Recorded with the reply
        when the daemon and the NPC record experience (docs/EXPERIENCE.md); raises ``NotRecording``,
        ``UnknownReply`` or ``BadLabel`` otherwise.

        From a ``Client`` this blocks until the daemon stored it; from an ``AsyncClient`` it returns an awaitable
        (``await reply.rate(1)``). The same as ``npc.feedback(reply.request_id, ...)``."""
        rater = _RATERS.get(id(self))
        if rater is None:
            raise ZykeError("this response was not received through a client (a copy?); use "
                            "npc.feedback(response.request_id, ...)")
        return rater(self.request_id, reward, label=label, source=source, note=note)

    def _bind(self, rater: Callable[..., Any]) -> NpcResponse:
        """Tie ``rate`` to a client's feedback call ``rater(reply_id, reward, label=, source=, note=)``."""
        key = id(self)
        if key not in _RATERS:
            weakref.finalize(self, _RATERS.pop, key, None)
        _RATERS[key] = rater
        return self

    @property
    def say(self) -> str:
        """The line the NPC speaks."""
        return self.reply.say

    @property
    def emotion(self) -> str:
        """One of the NPC's declared emotions."""
        return self.reply.emotion

    @property
    def action(self) -> str:
        """One of the NPC's declared actions."""
        return self.reply.action

    @property
    def target(self) -> str | None:
        """Who or what the action is aimed at, when the model said."""
        return self.reply.target

    @property
    def args(self) -> dict[str, Any]:
        """Free-form action arguments (empty when none)."""
        return self.reply.args or {}

    def __str__(self) -> str:
        return self.say

    @classmethod
    def from_frame(cls, frame: Reply) -> NpcResponse:
        return cls(npc=frame.npc, request_id=frame.id, reply=frame.reply, finish_reason=frame.finish_reason,
                   adapter=frame.adapter, usage=frame.usage, timings=frame.timings, safety=frame.safety)


def build_options(options: OptionsLike = None, *, max_tokens: int | None = None,
                  temperature: float | None = None, top_p: float | None = None, top_k: int | None = None,
                  seed: int | None = None, stop: Sequence[str] | None = None,
                  repeat_penalty: float | None = None,
                  no_repeat_ngram: int | None = None) -> GenerationOptions | None:
    """Merge an options object (or dict) with keyword overrides; ``None`` when nothing is set.

    Validated here, so a bad value (``temperature=5``) fails in the caller's frame with a pydantic
    ``ValidationError`` instead of a round trip later.
    """
    if isinstance(options, GenerationOptions):
        merged = options.model_dump(exclude_none=True)
    else:
        merged = dict(options or {})
    overrides = {"max_tokens": max_tokens, "temperature": temperature, "top_p": top_p, "top_k": top_k,
                 "seed": seed, "stop": list(stop) if stop is not None else None,
                 "repeat_penalty": repeat_penalty, "no_repeat_ngram": no_repeat_ngram}
    merged.update({k: v for k, v in overrides.items() if v is not None})
    return GenerationOptions.model_validate(merged) if merged else None
