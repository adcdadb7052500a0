"""The decode loop both backends share: mask, pick, feed the grammar, stream, stop.

A backend only supplies two things: the logits for the next token, and a way to append a token.
Everything that defines *what* gets generated (the llguidance grammar from the reply schema, greedy
or seeded sampling, the repeat penalty, max_tokens, cancellation, streaming of decoded text) lives
here once, so llama.cpp and transformers behave the same for the same request.

Why a loop of our own rather than each library's sampler: llama-cpp-python's GBNF sampler scans
all 262,144 tokens of Gemma 3's vocabulary each step (decoding falls to about a third of its speed);
llguidance computes the allowed-token mask incrementally in about 1 ms, and with the two tricks in
``decode`` the constrained loop runs at the speed of raw llama.cpp (``tools/bench/run.py``).
"""

from __future__ import annotations

import codecs
import json
import time
from collections.abc import Callable
from concurrent.futures import Executor
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


class SequenceDecoder:
    """One reply, one step at a time: the state of the decode loop without the loop, so that a backend
    can advance several replies in one model call (``LlamaCppBackend.run_batch``).

    ``step(logits, fast_forward)`` takes the logits for the next position and returns the tokens to
    evaluate next (the picked token, plus the grammar's forced tokens when ``fast_forward``), or None
    when the reply is finished; ``result()`` then describes it.
    """

    def __init__(self, request: GenerationRequest, tokenizer: LLTokenizer, n_vocab: int, eos: set[int],
                 token_bytes: Callable[[int], bytes], on_text: OnText, prompt_tokens: int, cached_tokens: int,
                 started: float) -> None:
        self.request, self._n_vocab, self._eos = request, n_vocab, eos
        self._token_bytes, self._on_text = token_bytes, on_text
        self._prompt_tokens, self._cached_tokens, self._started = prompt_tokens, cached_tokens, started
        self._matcher = LLMatcher(tokenizer, compile_schema(json.dumps(request.schema)))
        if self._matcher.is_error():
            raise RuntimeError(f"reply schema did not compile: {self._matcher.get_error()}")
        self._bitmask = np.zeros((n_vocab + 31) // 32, dtype=np.int32)
        self._mask_ready = False
        self._rng = np.random.default_rng(request.seed)
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.generated: list[int] = []
        self._text: list[str] = []
        self._ttft = 0.0
        self._finish: FinishReason = "length"
        self.done = False

    def compute_mask(self) -> None:
        """The allowed tokens for the next position; depends only on the tokens chosen so far, so it may
        run while the model evaluates them."""
        self._matcher.unsafe_compute_mask_ptr(self._bitmask.ctypes.data, self._bitmask.nbytes)
        self._mask_ready = True

    def check_cancel(self) -> bool:
        if not self.done and self.request.cancel.is_set():
            self._finish, self.done = "cancelled", True
        return self.done

    def step(self, logits: np.ndarray, fast_forward: bool = True) -> list[int] | None:
        if self.check_cancel() or self._stop_if(len(self.generated) >= self.request.max_tokens, "length"):
            return None
        if not self._mask_ready:
            self.compute_mask()
        self._mask_ready = False
        logits = logits[: self._n_vocab]
        if self.request.repeat_penalty != 1.0 and self.generated:
            logits = penalize_repeats(logits, self.generated, self.request.repeat_penalty)
        token = pick(logits, self._bitmask, self._n_vocab, self.request, self._rng)
        if not self.generated:
            self._ttft = time.perf_counter() - self._started
        if self._stop_if(token in self._eos, "stop"):
            return None
        feed = [token]
        keep_going = self._emit(token)
        if fast_forward and keep_going and not self._matcher.is_stopped():
            for forced in self._matcher.compute_ff_tokens()[: self.request.max_tokens - len(self.generated)]:
                if forced in self._eos:
                    break
                feed.append(forced)
                if not (keep_going := self._emit(forced)) or self._matcher.is_stopped():
                    break
        if self._stop_if(self._matcher.is_stopped() or not keep_going, "stop"):
            return None
        if self._stop_if(len(self.generated) >= self.request.max_tokens, "length"):
            return None
        return feed

    def result(self) -> GenerationResult:
        return GenerationResult(text="".join(self._text), finish_reason=self._finish,
                                prompt_tokens=self._prompt_tokens, completion_tokens=len(self.generated),
                                cached_tokens=self._cached_tokens, ttft_s=self._ttft,
                                total_s=time.perf_counter() - self._started, tokens=list(self.generated))

    def _stop_if(self, condition: bool, reason: FinishReason) -> bool:
        if condition:
            self._finish, self.done = reason, True
        return condition

    def _emit(self, token: int) -> bool:
        if not self._matcher.consume_token(token):
            raise RuntimeError(f"grammar rejected token {token}: {self._matcher.get_error()}")
        self.generated.append(token)
        piece = self._utf8.decode(self._token_bytes(token))
        self._text.append(piece)
        return self._on_text(piece) if piece else True


def decode(
    request: GenerationRequest,
    tokenizer: LLTokenizer,
    n_vocab: int,
    eos: set[int],
    next_logits: Callable[[], np.ndarray],
    advance: Callable[[list[int]], None],
    token_bytes: Callable[[int], bytes],
    on_text: OnText,
    prompt_tokens: int,
    cached_tokens: int,
    started: float,
    executor: Executor | None = None,
    fast_forward: bool = True,
) -> GenerationResult:
    """Generate one constrained reply. ``next_logits`` must return float32 logits of length >= n_vocab
    for the position after everything advanced so far (the prompt has already been evaluated);
    ``advance`` evaluates one or more tokens in one model call.

    Two things make the grammar nearly free:

    * **Forced tokens are not sampled.** Where the schema allows only one continuation (``", "emotion":
      "``, the rest of an enum value once its first token picks it) llguidance's ``compute_ff_tokens``
      returns it as tokens; they are appended without asking the model and evaluated together with
      the sampled token in one model call, so a reply costs fewer model calls than it has tokens.
    * **The next mask is computed while the model runs.** Given an ``executor``, ``advance`` runs on
      its thread (llama.cpp releases the GIL) while this thread computes the mask for the next step,
      which depends only on the tokens already chosen.
    """
    seq = SequenceDecoder(request, tokenizer, n_vocab, eos, token_bytes, on_text, prompt_tokens, cached_tokens,
                          started)
    while (feed := seq.step(next_logits(), fast_forward)) is not None:
        if executor is None:
            advance(feed)
        else:
            running = executor.submit(advance, feed)
            seq.compute_mask()
            running.result()
    return seq.result()


def is_allowed(bitmask: np.ndarray, token: int) -> bool:
    return bool((int(bitmask[token >> 5]) >> (token & 31)) & 1)


def allowed_tokens(bitmask: np.ndarray, n_vocab: int) -> np.ndarray:
    return np.flatnonzero(np.unpackbits(bitmask.view(np.uint8), bitorder="little")[:n_vocab])


def pick(logits: np.ndarray, bitmask: np.ndarray, n_vocab: int, request: GenerationRequest,
         rng: np.random.Generator) -> int:
    """The next token among those the grammar allows (``bitmask``: llguidance's packed mask).

    Greedy first tries the unconstrained argmax: when the grammar allows it (most tokens of the spoken
    line), it is the constrained argmax too, and the 262,144-entry mask is never unpacked."""
    if request.temperature <= 0:
        best = int(np.argmax(logits))
        if is_allowed(bitmask, best):
            return best
        candidates = allowed_tokens(bitmask, n_vocab)
        return int(candidates[np.argmax(logits[candidates])])
    allowed = np.zeros(n_vocab, dtype=bool)
    allowed[allowed_tokens(bitmask, n_vocab)] = True
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
