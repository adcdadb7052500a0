"""What the daemon needs from a model backend, independent of llama.cpp or transformers."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol

from zyke.protocol import ModelInfo

from ..scheduler import ANY_ADAPTER as _ANY_ADAPTER

if TYPE_CHECKING:
    from llguidance import LLTokenizer

    from ..safety import Matcher

FinishReason = Literal["stop", "length", "cancelled"]

#: Like llama.cpp's default (1.1), a little stronger: greedy decoding of a 270M model loops otherwise.
DEFAULT_REPEAT_PENALTY = 1.15
#: The spoken line may not repeat any run of this many tokens from the NPC's earlier replies (or from
#: itself): the base model otherwise copies its previous reply word for word on the next turn. Four
#: tokens is about three words: a copied sentence is cut within its first words, while phrases of
#: three tokens or fewer ("Hello there", "I see") stay free to recur.
DEFAULT_NO_REPEAT_NGRAM = 4


@dataclass
class GenerationRequest:
    prompt: str
    #: the JSON Schema the output is decoded under (an NPC's reply schema narrowed to its enums, or an HTTP API
    #: response_format schema); None decodes free text (the OpenAI-compatible API without response_format)
    schema: dict[str, Any] | None
    max_tokens: int = 96
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    repeat_penalty: float = DEFAULT_REPEAT_PENALTY
    #: the n of the no-repeat n-gram rule over the say string (0: off); see decoding.SayNgramBan
    no_repeat_ngram: int = DEFAULT_NO_REPEAT_NGRAM
    #: the say lines of the NPC's earlier replies, as rendered into this prompt: n-grams to ban
    history_says: list[str] = field(default_factory=list)
    adapter: str | None = None
    cancel: threading.Event = field(default_factory=threading.Event)
    #: the safety rail's blocked terms for this NPC (None: safe mode off); see decoding.SayContentGuard
    safety: Matcher | None = None
    #: parse special-token text in the prompt (``<start_of_turn>`` of a chat template) as those tokens; NPC
    #: prompts never do, so a player's line cannot forge a turn marker
    special: bool = False
    #: the safety rail judges the whole output as text (the HTTP API's completions), not only the say string of
    #: an NPC reply
    guard_whole_text: bool = False


@dataclass
class GenerationResult:
    text: str
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0
    ttft_s: float = 0.0
    total_s: float = 0.0
    tokens: list[int] = field(default_factory=list)
    #: tokens the safety rail set aside while decoding, by category (empty: it never intervened)
    safety_blocks: dict[str, int] = field(default_factory=dict)


#: Called with each decoded piece of text; returns False to stop generating (a stop string was hit).
OnText = Callable[[str], bool]

#: A batching backend's adapter filter when nothing runs yet: any adapter may start the batch (the scheduler's
#: sentinel: its batch admission rule, ``scheduler.admits``, reads the same one).
ANY_ADAPTER = _ANY_ADAPTER


@dataclass
class BatchItem:
    """A reply to run in a batch (``run_batch`` of a backend that has one): ``prepare`` builds its request
    on the model thread (it may load an adapter), ``done`` receives its result or its own exception."""

    prepare: Callable[[], GenerationRequest]
    on_text: OnText
    done: Callable[[GenerationResult | BaseException], None]
    #: the scheduler rank (0 foreground, 1 normal, 2 background): a foreground reply may pause a running
    #: lower-priority one, and lower-priority replies wait while a foreground reply decodes its first tokens
    priority: int = 1


#: ``take(n, adapter)`` of ``run_batch``: up to ``n`` new replies for that adapter (``ANY_ADAPTER``: any adapter).
TakeItems = Callable[[int, object], list[BatchItem]]


class Backend(Protocol):
    """What every backend is and has. Capabilities are declared, never probed: each backend class sets every
    ``supports_*`` flag itself, and the server reads the flags (a backend that sets one also satisfies the
    matching protocol below, ``BatchingBackend`` or ``IdlePrefillBackend``; tests/test_backend_contract.py checks
    both, with mypy and at run time)."""

    name: str
    model: ModelInfo
    #: sha256-based fingerprint of the base weights; adapters trained on another base are refused
    fingerprint: str
    #: which of an adapter's files this backend loads: the GGUF export or the PEFT directory
    adapter_kind: Literal["gguf", "peft"]
    #: it decodes several replies in lockstep (``BatchingBackend.run_batch``); without it the server runs each
    #: reply as a batch of one (``run_batch_of_one``)
    supports_batching: ClassVar[bool]
    #: it can evaluate a conversation into its prefix cache while nobody waits (``IdlePrefillBackend``)
    supports_idle_prefill: ClassVar[bool]

    @property
    def loaded_adapters(self) -> list[str]: ...

    @property
    def tokenizer(self) -> LLTokenizer:
        """The llguidance tokenizer its grammars are compiled for (the HTTP API checks schemas against it)."""
        ...

    @property
    def preemptions(self) -> int:
        """Replies paused for a foreground one, ever (/metrics); 0 for a backend that never pauses one."""
        ...

    def chat_template(self) -> tuple[str, str, str] | None:
        """The model's own chat template with its BOS and EOS texts, or None when the model has none."""
        ...

    def load_adapter(self, name: str, path: Path) -> None: ...

    def unload_adapter(self, name: str) -> None: ...

    def count_tokens(self, text: str) -> int: ...

    def generate(self, request: GenerationRequest, on_text: OnText) -> GenerationResult: ...

    def close(self) -> None: ...


class BatchingBackend(Backend, Protocol):
    """A backend with ``supports_batching``: lockstep batches, with the priority rules of docs/SCHEDULING.md
    (the daemon sets these from its config)."""

    foreground_solo_tokens: int
    starve_after: int
    background_tokens_per_s: float | None

    def run_batch(self, take: TakeItems, max_batch: int = 4, preempt: TakeItems | None = None,
                  urgent: Callable[[], bool] | None = None) -> None: ...


class IdlePrefillBackend(Backend, Protocol):
    """A backend with ``supports_idle_prefill``."""

    def prefill_idle(self, text: str, adapter: str | None, stop: Callable[[], bool]) -> int:
        """Evaluate ``text`` into the prefix cache, checking ``stop`` between chunks; the tokens evaluated."""
        ...


def run_batch_of_one(backend: Backend, take: TakeItems) -> None:
    """``run_batch`` for a backend without batching: the one reply ``take`` hands over, generated alone. Its
    exception is its outcome, as a batching backend reports a failed reply."""
    for item in take(1, ANY_ADAPTER):
        outcome: GenerationResult | BaseException
        try:
            outcome = backend.generate(item.prepare(), item.on_text)
        except Exception as exc:
            outcome = exc
        item.done(outcome)
