"""The keywords of ``npc.say``, defined once.

``AsyncNpc.say``, ``AsyncNpc.stream``, ``Npc.say``, ``Npc.submit`` and ``Npc.stream`` all take
``text`` and then the keywords of ``SayOptions`` (``**kwargs: Unpack[SayOptions]``, PEP 692), so a
type checker and an IDE know every keyword and its type, and the list lives in one place. A ``**kwargs``
parameter accepts any name at run time, so ``check_say_options`` turns an unknown keyword into the
same ``TypeError`` Python raises for a misspelt argument (``Npc.say() got an unexpected keyword
argument 'temprature'``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, TypedDict

from .protocol import NpcSay, Priority
from .response import OptionsLike, build_options


class _Unset:
    """Marks "use the client's default" where ``None`` already means "no timeout"."""

    def __repr__(self) -> str:
        return "DEFAULT"


#: ``timeout=DEFAULT``: the client's ``timeout`` (``None`` would mean "no limit").
DEFAULT: Any = _Unset()
Timeout = float | None | _Unset


class SayOptions(TypedDict, total=False):
    """The keywords every way of saying a line takes (``npc.say``, ``npc.stream``, ``npc.submit``); all optional.

    - ``state``: the game state the NPC should know about this turn (location, gold, quest flags), a dict
      of JSON values.
    - ``options``: generation options as a ``GenerationOptions`` or a dict; the keywords below override it.
    - ``adapter``: the LoRA adapter for this line (the NPC's default otherwise).
    - ``timeout``: seconds this line may take once sent (``None``: as long as the daemon takes; omitted:
      the client's ``timeout``). When it expires the request is cancelled on the daemon and ``ZykeTimeout``
      raised (also a ``TimeoutError``). Cancelling the awaiting task (async), ``future.cancel()``
      (``submit``) or closing an unfinished stream cancels the line on the daemon too.
    - ``max_tokens``, ``temperature``, ``top_p``, ``top_k``, ``seed``, ``stop`` (strings that end the
      line), ``repeat_penalty``, ``no_repeat_ngram``: generation options (``GenerationOptions``); a bad
      value (``temperature=5``) raises pydantic's ``ValidationError`` before anything is sent.
    - ``allowed_actions``: narrows this line to some of the NPC's declared actions (``["none", "refuse"]``
      while the shop is closed); a list, never a bare string. A name the NPC did not declare raises
      ``UnknownAction`` (code ``unknown_action``) from the daemon.
    - ``priority``: ``"foreground"`` (the NPC the player talks to), ``"normal"`` or ``"background"``
      (chatter); overrides the NPC's default for this line (docs/SCHEDULING.md).
    - ``deadline_ms``: drop the line with ``Expired`` if it has not started within that many milliseconds.

    Any other keyword is a ``TypeError``.
    """

    state: Mapping[str, Any] | None
    options: OptionsLike
    adapter: str | None
    timeout: Timeout
    max_tokens: int | None
    temperature: float | None
    top_p: float | None
    top_k: int | None
    seed: int | None
    stop: Sequence[str] | None
    repeat_penalty: float | None
    no_repeat_ngram: int | None
    allowed_actions: Sequence[str] | None
    priority: Priority | None
    deadline_ms: int | None


SAY_KEYWORDS: frozenset[str] = SayOptions.__required_keys__ | SayOptions.__optional_keys__


def check_say_options(kwargs: Mapping[str, object], method: str) -> None:
    """Raise the ``TypeError`` Python raises for an unknown keyword (``**kwargs`` would accept it)."""
    unknown = kwargs.keys() - SAY_KEYWORDS
    if unknown:
        raise TypeError(f"{method}() got an unexpected keyword argument {min(unknown)!r}")


def say_frame(npc: str, request_id: str, text: str, stream: bool, kwargs: SayOptions, method: str) -> NpcSay:
    """The ``npc.say`` frame for these keywords (checked and validated here, in the caller's frame)."""
    check_say_options(kwargs, method)
    allowed_actions = kwargs.get("allowed_actions")
    if isinstance(allowed_actions, str):  # list("none") would become ["n", "o", "n", "e"]
        raise TypeError(f"allowed_actions must be a list of action names, not the string {allowed_actions!r}")
    options = build_options(kwargs.get("options"), max_tokens=kwargs.get("max_tokens"),
                            temperature=kwargs.get("temperature"), top_p=kwargs.get("top_p"),
                            top_k=kwargs.get("top_k"), seed=kwargs.get("seed"), stop=kwargs.get("stop"),
                            repeat_penalty=kwargs.get("repeat_penalty"),
                            no_repeat_ngram=kwargs.get("no_repeat_ngram"))
    state = kwargs.get("state")
    return NpcSay(id=request_id, npc=npc, input=text, state=dict(state) if state is not None else None,
                  options=options, stream=stream or None, adapter=kwargs.get("adapter"),
                  allowed_actions=list(allowed_actions) if allowed_actions is not None else None,
                  priority=kwargs.get("priority"), deadline_ms=kwargs.get("deadline_ms"))
