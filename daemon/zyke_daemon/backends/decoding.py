"""The decode loop both backends share: mask, pick, feed the grammar, stream, stop.

A backend only supplies two things: the logits for the next token, and a way to append a token.
Everything that defines *what* gets generated (the llguidance grammar from the reply schema, greedy
or seeded sampling, the repeat penalty, max_tokens, cancellation, streaming of decoded text) lives
here once, so llama.cpp and transformers behave the same for the same request.

Why a loop of our own rather than each library's sampler: llama-cpp-python's GBNF sampler scans
all 262,144 tokens of Gemma 3's vocabulary each step (decoding falls to about a third of its speed);
llguidance computes the allowed-token mask incrementally in about 1 ms.
"""

from __future__ import annotations

import codecs
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from llguidance import LLMatcher, LLTokenizer
from zyke.prompt_format import ITEM_SEPARATOR, KEY_SEPARATOR

from .base import FinishReason, GenerationRequest, GenerationResult, OnText


@lru_cache(maxsize=64)
def compile_schema(schema_json: str) -> str:
    """llguidance grammar for a reply schema, written with the separators prompt_format renders.

    Keyed by the schema JSON as built (never key-sorted: property order is the order the model writes)."""
    schema = json.loads(schema_json)
    schema["x-guidance"] = {"whitespace_flexible": False, "item_separator": ITEM_SEPARATOR,
                            "key_separator": KEY_SEPARATOR}
    return LLMatcher.grammar_from_json_schema(schema)


@dataclass
class BatchItem:
    """A request handed to a batching backend, with where its outcome goes (called on the model thread)."""

    request: GenerationRequest
    on_text: OnText
    done: Callable[[GenerationResult | BaseException], None]


def run_serially(generate: Callable[[GenerationRequest, OnText], GenerationResult],
                 take: Callable[[int], list[BatchItem]]) -> None:
    """``run_batch`` for a backend that generates one reply at a time: same contract, no lockstep."""
    while items := take(1):
        for item in items:
            try:
                outcome: GenerationResult | BaseException = generate(item.request, item.on_text)
            except Exception as exc:  # reported to that request alone
                outcome = exc
            item.done(outcome)


class SequenceDecoder:
    """One reply being generated, one token at a time: the whole per-token semantics of a request.

    A backend that decodes several sequences in one batch (llama.cpp, lockstep) keeps one of these per
    sequence and calls :meth:`step` with that sequence's logits; :func:`decode` drives a single one.
    Either way the same code decides every token, so batched and solo replies are identical.

    An empty ``request.schema`` means unconstrained (no grammar): the daemon always sends a reply schema,
    so only benchmarks use it, to measure what the grammar costs in the very same loop.
    """

    def __init__(self, request: GenerationRequest, tokenizer: LLTokenizer, n_vocab: int, eos: set[int],
                 token_bytes: Callable[[int], bytes], on_text: OnText, prompt_tokens: int, cached_tokens: int,
                 started: float) -> None:
        self.request = request
        self.matcher: LLMatcher | None = None
        if request.schema:
            self.matcher = LLMatcher(tokenizer, compile_schema(json.dumps(request.schema)))
            if self.matcher.is_error():
                raise RuntimeError(f"reply schema did not compile: {self.matcher.get_error()}")
        self.n_vocab = n_vocab
        self.eos = eos
        self.token_bytes = token_bytes
        self.on_text = on_text
        self.prompt_tokens = prompt_tokens
        self.cached_tokens = cached_tokens
        self.started = started
        self.bitmask = np.zeros((n_vocab + 31) // 32, dtype=np.int32)
        self.rng = np.random.default_rng(request.seed)
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.generated: list[int] = []
        self.text: list[str] = []
        self.ttft = 0.0
        self.finish: FinishReason = "length"
        self.done = request.max_tokens <= 0

    def check_cancel(self) -> bool:
        """Stop before spending a model step on a cancelled request; True when it is now done."""
        if not self.done and self.request.cancel.is_set():
            self.finish = "cancelled"
            self.done = True
        return self.done

    def step(self, logits: np.ndarray) -> int | None:
        """Pick the next token from ``logits`` (float32, length >= n_vocab, for the position after
        everything fed so far). Returns the token the backend must feed to the model next, or None when
        the reply is finished (then nothing is to be fed)."""
        if self.check_cancel():
            return None
        request = self.request
        logits = logits[: self.n_vocab]
        if request.repeat_penalty != 1.0 and self.generated:
            logits = penalize_repeats(logits, self.generated, request.repeat_penalty)
        if self.matcher is not None:
            self.matcher.unsafe_compute_mask_ptr(self.bitmask.ctypes.data, self.bitmask.nbytes)
        token = self._pick(logits)
        if not self.generated:
            self.ttft = time.perf_counter() - self.started
        if token in self.eos:
            return self._end("stop")
        if self.matcher is not None and not self.matcher.consume_token(token):
            raise RuntimeError(f"grammar rejected token {token}: {self.matcher.get_error()}")
        self.generated.append(token)
        piece = self.decoder.decode(self.token_bytes(token))
        self.text.append(piece)
        keep_going = self.on_text(piece) if piece else True
        if (self.matcher is not None and self.matcher.is_stopped()) or not keep_going:
            return self._end("stop")
        if len(self.generated) >= request.max_tokens:
            return self._end("length")
        return token

    def result(self) -> GenerationResult:
        return GenerationResult(text="".join(self.text), finish_reason=self.finish, prompt_tokens=self.prompt_tokens,
                                completion_tokens=len(self.generated), cached_tokens=self.cached_tokens,
                                ttft_s=self.ttft, total_s=time.perf_counter() - self.started,
                                tokens=self.generated)

    def _end(self, finish: FinishReason) -> None:
        self.finish = finish
        self.done = True
        return None

    def _pick(self, logits: np.ndarray) -> int:
        request = self.request
        if request.temperature <= 0:
            # Greedy: the unmasked argmax is usually allowed (the grammar mostly agrees with the model),
            # which one bit test confirms without unpacking the 262k-entry mask.
            best = int(np.argmax(logits))
            if self.matcher is None or self._allows(best):
                return best
        if self.matcher is None:
            mask = np.ones(self.n_vocab, dtype=bool)
        else:
            mask = np.unpackbits(self.bitmask.view(np.uint8), bitorder="little")[: self.n_vocab].astype(bool)
        return pick(logits, mask, request, self.rng)

    def _allows(self, token: int) -> bool:
        return bool((int(self.bitmask[token >> 5]) >> (token & 31)) & 1)


def decode(
    request: GenerationRequest,
    tokenizer: LLTokenizer,
    n_vocab: int,
    eos: set[int],
    next_logits: Callable[[], np.ndarray],
    advance: Callable[[int], None],
    token_bytes: Callable[[int], bytes],
    on_text: OnText,
    prompt_tokens: int,
    cached_tokens: int,
    started: float,
) -> GenerationResult:
    """Generate one constrained reply. ``next_logits`` must return float32 logits of length >= n_vocab
    for the position after everything advanced so far (the prompt has already been evaluated).

    A thin driver of :class:`SequenceDecoder`, kept with this signature for the backends that generate
    one reply at a time (transformers)."""
    seq = SequenceDecoder(request, tokenizer, n_vocab, eos, token_bytes, on_text, prompt_tokens, cached_tokens,
                          started)
    while not seq.check_cancel():
        token = seq.step(next_logits())
        if token is None:
            break
        advance(token)
    return seq.result()


def pick(logits: np.ndarray, allowed: np.ndarray, request: GenerationRequest, rng: np.random.Generator) -> int:
    if request.temperature <= 0:
        candidates = np.flatnonzero(allowed)
        return int(candidates[np.argmax(logits[candidates])])
    return sample(logits, allowed, request.temperature, request.top_p, request.top_k, rng)


def penalize_repeats(logits: np.ndarray, generated: list[int], penalty: float, window: int = 64) -> np.ndarray:
    """llama.cpp's repeat penalty over this reply's recent tokens: a small greedy model otherwise
    loops on one sentence until max_tokens ("I'm sorry, I can't repair your sword. I'm sorry, ...")."""
    recent = np.unique(np.asarray(generated[-window:]))
    out = np.array(logits, dtype=np.float32, copy=True)
    values = out[recent]
    out[recent] = np.where(values > 0, values / penalty, values * penalty)
    return out


def sample(logits: np.ndarray, allowed: np.ndarray, temperature: float, top_p: float, top_k: int,
           rng: np.random.Generator) -> int:
    """Temperature, top-k and top-p sampling over the allowed tokens, reproducible for a given rng."""
    candidates = np.flatnonzero(allowed)
    scores = logits[candidates].astype(np.float64) / temperature
    if 0 < top_k < candidates.size:
        keep = np.argpartition(scores, -top_k)[-top_k:]
        candidates, scores = candidates[keep], scores[keep]
    order = np.argsort(scores)[::-1]
    candidates, scores = candidates[order], scores[order]
    probs = np.exp(scores - scores[0])
    probs /= probs.sum()
    if top_p < 1.0:
        cut = int(np.searchsorted(np.cumsum(probs), top_p)) + 1
        candidates, probs = candidates[:cut], probs[:cut] / probs[:cut].sum()
    return int(candidates[rng.choice(candidates.size, p=probs)])
