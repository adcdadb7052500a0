"""The llama.cpp backend (llama-cpp-python) with llguidance for schema-constrained decoding.

Why not llama-cpp-python's own grammar sampler: with Gemma 3's 262,144-token vocabulary it scans
every token each step and decoding drops to about a third of its unconstrained speed. llguidance
computes the allowed-token mask incrementally (about 1 ms a token here, against about 17 ms for the
decode itself), so this backend runs its own small decode loop: evaluate, mask, pick, feed the
matcher. Owning the loop also gives exact control of seeds, stop conditions and cancellation.

The context keeps the tokens it last evaluated; a new prompt that shares a prefix with them (the
same NPC's persona and history, one turn later) only evaluates the new suffix.
"""

from __future__ import annotations

import codecs
import ctypes
import json
import logging
import os
import time
import warnings
from functools import lru_cache
from pathlib import Path
from typing import Any

import llama_cpp
import llguidance
import llguidance.llamacpp
import numpy as np
from llguidance import LLMatcher
from zyke.prompt_format import ITEM_SEPARATOR, KEY_SEPARATOR
from zyke.protocol import ModelInfo

from ..errors import ModelLoadError
from .base import GenerationRequest, GenerationResult, OnText

log = logging.getLogger(__name__)


@lru_cache(maxsize=64)
def compile_schema(schema_json: str) -> str:
    """llguidance grammar for a reply schema, written with the separators prompt_format renders.

    Keyed by the schema JSON as built (never key-sorted: property order is the order the model writes)."""
    schema = json.loads(schema_json)
    schema["x-guidance"] = {"whitespace_flexible": False, "item_separator": ITEM_SEPARATOR,
                            "key_separator": KEY_SEPARATOR}
    return LLMatcher.grammar_from_json_schema(schema)


class LlamaCppBackend:
    name = "llama.cpp"

    def __init__(self, model_path: Path, sha256: str | None = None, n_ctx: int = 4096,
                 n_threads: int | None = None) -> None:
        try:
            self.llm = llama_cpp.Llama(str(model_path), n_ctx=n_ctx, n_threads=n_threads or min(4, os.cpu_count() or 1),
                                       n_batch=512, verbose=False)
        except (ValueError, RuntimeError) as exc:
            raise ModelLoadError(f"llama.cpp could not load {model_path}: {exc}") from exc
        self.model = ModelInfo(name=model_path.name, sha256=sha256, n_ctx=n_ctx)
        self._vocab = llama_cpp.llama_model_get_vocab(self.llm._model.model)
        self._n_vocab = self.llm.n_vocab()
        self._eos = {self.llm.token_eos()} | _end_of_turn_tokens(self.llm)
        with warnings.catch_warnings():  # it calls a deprecated llama.cpp getter once per token (262k times)
            warnings.simplefilter("ignore", DeprecationWarning)
            self.tokenizer = llguidance.llamacpp.lltokenizer_from_vocab(self._vocab)
        self._bitmask = np.zeros((self._n_vocab + 31) // 32, dtype=np.int32)
        self._piece = ctypes.create_string_buffer(256)

    # -- Backend protocol

    def count_tokens(self, text: str) -> int:
        return len(self.llm.tokenize(text.encode("utf-8"), add_bos=True))

    def close(self) -> None:
        self.llm.close()

    def generate(self, request: GenerationRequest, on_text: OnText) -> GenerationResult:
        started = time.perf_counter()
        matcher = LLMatcher(self.tokenizer, compile_schema(json.dumps(request.schema)))
        if matcher.is_error():
            raise RuntimeError(f"reply schema did not compile: {matcher.get_error()}")
        prompt = self.llm.tokenize(request.prompt.encode("utf-8"), add_bos=True)
        cached = self._reuse_prefix(prompt)
        self.llm.eval(prompt[cached:])
        rng = np.random.default_rng(request.seed)
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        completion = 0
        ttft = 0.0
        finish: Any = "length"
        text: list[str] = []
        generated: list[int] = []
        while completion < request.max_tokens:
            if request.cancel.is_set():
                finish = "cancelled"
                break
            token = self._pick(matcher, request, rng, generated)
            if completion == 0:
                ttft = time.perf_counter() - started
            if token in self._eos:
                finish = "stop"
                break
            if not matcher.consume_token(token):
                raise RuntimeError(f"grammar rejected token {token}: {matcher.get_error()}")
            completion += 1
            generated.append(token)
            piece = decoder.decode(self._token_bytes(token))
            text.append(piece)
            keep_going = on_text(piece) if piece else True
            if matcher.is_stopped() or not keep_going:
                finish = "stop"
                break
            self.llm.eval([token])
        return GenerationResult(text="".join(text), finish_reason=finish, prompt_tokens=len(prompt),
                                completion_tokens=completion, cached_tokens=cached, ttft_s=ttft,
                                total_s=time.perf_counter() - started)

    # -- internals

    def _reuse_prefix(self, prompt: list[int]) -> int:
        """Keep the evaluated tokens this prompt starts with; at least one token is always re-evaluated
        so there are fresh logits to sample from."""
        have = self.llm.input_ids[: self.llm.n_tokens]
        limit = min(len(have), len(prompt) - 1)
        same = 0
        if limit > 0:
            diff = np.flatnonzero(have[:limit] != np.asarray(prompt[:limit]))
            same = int(diff[0]) if diff.size else limit
        self.llm.n_tokens = same
        return same

    def _pick(self, matcher: LLMatcher, request: GenerationRequest, rng: np.random.Generator,
              generated: list[int]) -> int:
        matcher.unsafe_compute_mask_ptr(self._bitmask.ctypes.data, self._bitmask.nbytes)
        allowed = np.unpackbits(self._bitmask.view(np.uint8), bitorder="little")[: self._n_vocab].astype(bool)
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self.llm._ctx.ctx, -1),
                                       shape=(self._n_vocab,))
        if request.repeat_penalty != 1.0 and generated:
            logits = penalize_repeats(logits, generated, request.repeat_penalty)
        if request.temperature <= 0:
            candidates = np.flatnonzero(allowed)
            return int(candidates[np.argmax(logits[candidates])])
        return sample(logits, allowed, request.temperature, request.top_p, request.top_k, rng)

    def _token_bytes(self, token: int) -> bytes:
        n = llama_cpp.llama_token_to_piece(self._vocab, token, self._piece, len(self._piece), 0, False)
        return bytes(self._piece[:n]) if n > 0 else b""


def penalize_repeats(logits: np.ndarray, generated: list[int], penalty: float, window: int = 64) -> np.ndarray:
    """llama.cpp's repeat penalty over this reply's recent tokens: a small greedy model otherwise
    loops on one sentence until max_tokens ("I'm sorry, I can't repair your sword. I'm sorry, ...")."""
    recent = np.unique(np.asarray(generated[-window:]))
    out = logits.copy()
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


def _end_of_turn_tokens(llm: llama_cpp.Llama) -> set[int]:
    eot = llama_cpp.llama_vocab_eot(llama_cpp.llama_model_get_vocab(llm._model.model))
    return {eot} if eot >= 0 else set()
