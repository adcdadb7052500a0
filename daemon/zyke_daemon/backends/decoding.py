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
    for the position after everything advanced so far (the prompt has already been evaluated)."""
    matcher = LLMatcher(tokenizer, compile_schema(json.dumps(request.schema)))
    if matcher.is_error():
        raise RuntimeError(f"reply schema did not compile: {matcher.get_error()}")
    bitmask = np.zeros((n_vocab + 31) // 32, dtype=np.int32)
    rng = np.random.default_rng(request.seed)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    generated: list[int] = []
    text: list[str] = []
    ttft = 0.0
    finish: FinishReason = "length"
    while len(generated) < request.max_tokens:
        if request.cancel.is_set():
            finish = "cancelled"
            break
        matcher.unsafe_compute_mask_ptr(bitmask.ctypes.data, bitmask.nbytes)
        allowed = np.unpackbits(bitmask.view(np.uint8), bitorder="little")[:n_vocab].astype(bool)
        logits = next_logits()[:n_vocab]
        if request.repeat_penalty != 1.0 and generated:
            logits = penalize_repeats(logits, generated, request.repeat_penalty)
        token = pick(logits, allowed, request, rng)
        if not generated:
            ttft = time.perf_counter() - started
        if token in eos:
            finish = "stop"
            break
        if not matcher.consume_token(token):
            raise RuntimeError(f"grammar rejected token {token}: {matcher.get_error()}")
        generated.append(token)
        piece = decoder.decode(token_bytes(token))
        text.append(piece)
        keep_going = on_text(piece) if piece else True
        if matcher.is_stopped() or not keep_going:
            finish = "stop"
            break
        advance(token)
    return GenerationResult(text="".join(text), finish_reason=finish, prompt_tokens=prompt_tokens,
                            completion_tokens=len(generated), cached_tokens=cached_tokens, ttft_s=ttft,
                            total_s=time.perf_counter() - started, tokens=generated)


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
