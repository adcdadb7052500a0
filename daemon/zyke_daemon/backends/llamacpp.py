"""The llama.cpp backend (llama-cpp-python): GGUF base model, GGUF LoRA adapters swapped per request.

Generation runs through the shared decode loop (decoding.py); this module only evaluates tokens and
hands out logits. The context keeps the tokens it last evaluated, and a new prompt that shares a
prefix with them (the same NPC one turn later) only evaluates its new suffix. That cache belongs to
one adapter set: llama.cpp does not invalidate the KV cache when adapters change (the trap of
llama.cpp issue 26207), so switching adapters drops it.

Adapters are loaded with ``llama_adapter_lora_init`` (milliseconds) and applied to the live context
with ``llama_set_adapters_lora`` (about 0.1 ms), never by reloading the base model. Loaded adapters
are kept in an LRU with a cap.
"""

from __future__ import annotations

import ctypes
import logging
import os
import time
import warnings
from collections import OrderedDict
from pathlib import Path

import llama_cpp
import llguidance.llamacpp
import numpy as np
from zyke.protocol import ModelInfo

from ..embedded import sha256_file
from ..errors import ModelLoadError
from .base import GenerationRequest, GenerationResult, OnText
from .decoding import decode

log = logging.getLogger(__name__)


class LlamaCppBackend:
    name = "llama.cpp"
    adapter_kind = "gguf"

    def __init__(self, model_path: Path, sha256: str | None = None, n_ctx: int = 4096,
                 n_threads: int | None = None, max_loaded_adapters: int = 8) -> None:
        try:
            self.llm = llama_cpp.Llama(str(model_path), n_ctx=n_ctx, n_threads=n_threads or min(4, os.cpu_count() or 1),
                                       n_batch=512, verbose=False)
        except (ValueError, RuntimeError) as exc:
            raise ModelLoadError(f"llama.cpp could not load {model_path}: {exc}") from exc
        sha256 = sha256 or sha256_file(model_path)
        self.model = ModelInfo(name=model_path.name, sha256=sha256, n_ctx=n_ctx)
        self.fingerprint = f"sha256:{sha256}"
        self._vocab = llama_cpp.llama_model_get_vocab(self.llm._model.model)
        self._n_vocab = self.llm.n_vocab()
        eot = llama_cpp.llama_vocab_eot(self._vocab)
        self._eos = {self.llm.token_eos()} | ({eot} if eot >= 0 else set())
        with warnings.catch_warnings():  # it calls a deprecated llama.cpp getter once per token (262k times)
            warnings.simplefilter("ignore", DeprecationWarning)
            self.tokenizer = llguidance.llamacpp.lltokenizer_from_vocab(self._vocab)
        self._piece = ctypes.create_string_buffer(256)
        self._adapters: OrderedDict[str, llama_cpp.llama_adapter_lora_p] = OrderedDict()
        self._max_adapters = max_loaded_adapters
        self._active: str | None = None

    # -- Backend protocol

    def count_tokens(self, text: str) -> int:
        return len(self.llm.tokenize(text.encode("utf-8"), add_bos=True))

    def close(self) -> None:
        self._apply(None)
        for name in list(self._adapters):
            self.unload_adapter(name)
        self.llm.close()

    def generate(self, request: GenerationRequest, on_text: OnText) -> GenerationResult:
        started = time.perf_counter()
        self._apply(request.adapter)
        prompt = self.llm.tokenize(request.prompt.encode("utf-8"), add_bos=True)
        cached = self._reuse_prefix(prompt)
        self.llm.eval(prompt[cached:])
        ctx = self.llm._ctx.ctx

        def next_logits() -> np.ndarray:
            return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, -1), shape=(self._n_vocab,))

        return decode(request, self.tokenizer, self._n_vocab, self._eos, next_logits,
                      lambda token: self.llm.eval([token]), self._token_bytes, on_text,
                      prompt_tokens=len(prompt), cached_tokens=cached, started=started)

    # -- adapters

    @property
    def loaded_adapters(self) -> list[str]:
        return list(self._adapters)

    def load_adapter(self, name: str, gguf_path: Path) -> None:
        """Load a GGUF LoRA (idempotent); the least recently used one is freed past the cap."""
        if name in self._adapters:
            self._adapters.move_to_end(name)
            return
        handle = llama_cpp.llama_adapter_lora_init(self.llm._model.model, str(gguf_path).encode())
        if not handle:
            raise ModelLoadError(f"llama.cpp could not load the LoRA adapter {gguf_path}")
        self._adapters[name] = handle
        while len(self._adapters) > self._max_adapters:
            self.unload_adapter(next(iter(self._adapters)))  # least recently used; never the one just loaded

    def unload_adapter(self, name: str) -> None:
        handle = self._adapters.pop(name, None)
        if handle is None:
            return
        if self._active == name:
            self._apply(None)
        llama_cpp.llama_adapter_lora_free(handle)

    def _apply(self, name: str | None) -> None:
        if name == self._active:
            return
        ctx = self.llm._ctx.ctx
        if name is None:
            llama_cpp.llama_set_adapters_lora(ctx, None, 0, None)
        else:
            if name not in self._adapters:
                raise ModelLoadError(f"adapter {name!r} is not loaded")
            self._adapters.move_to_end(name)
            arr = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(self._adapters[name])
            llama_cpp.llama_set_adapters_lora(ctx, arr, 1, (ctypes.c_float * 1)(1.0))
        self._active = name
        self.llm.n_tokens = 0  # the cached prefix was computed under other weights

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

    def _token_bytes(self, token: int) -> bytes:
        n = llama_cpp.llama_token_to_piece(self._vocab, token, self._piece, len(self._piece), 0, False)
        return bytes(self._piece[:n]) if n > 0 else b""
