"""The llama.cpp backend (llama-cpp-python): GGUF base model, GGUF LoRA adapters, several NPCs at once.

Generation runs through the shared per-sequence decode step (decoding.py); this module evaluates
tokens and hands out logits. It drives llama.cpp's low-level API itself, for two reasons:

* **KV slots.** One context holds ``n_slots`` llama.cpp sequences (``n_seq_max``) in a unified KV
  cache. Each slot remembers the tokens it has evaluated and the adapter they were evaluated under.
  A new prompt takes the slot with the longest common prefix under the same adapter: the same NPC one
  turn later extends its own slot (only the new turn is evaluated), a second NPC sharing a persona
  prefix gets that prefix copied into a slot of its own (``llama_memory_seq_cp``, no recompute), and
  alternating NPCs no longer evict each other. Slots are keyed by adapter because llama.cpp does not
  invalidate the KV cache when adapters change (the trap of llama.cpp issue 26207): a prefix computed
  under other weights is never reused. Least recently used slots are evicted (``llama_memory_seq_rm``).
  Removing a slot's tail at an arbitrary position needs every layer to keep every position, so the
  context runs Gemma 3's sliding-window layers with a full-size cache (``swa_full``).
* **Batching.** :meth:`run_batch` decodes up to ``max_batch`` replies in lockstep: one ``llama_decode``
  per step carries one token per sequence (plus any prompt still to prefill), and each sequence's
  logits (``llama_get_logits_ith``) go to its own :class:`SequenceDecoder` with its own llguidance
  matcher. On a CPU this reads the weights once for several tokens, which is where the aggregate
  speed-up comes from. The adapter set belongs to the context, so one batch is one adapter.

Adapters are loaded with ``llama_adapter_lora_init`` (milliseconds) and applied to the live context
with ``llama_set_adapters_lora`` (about 0.1 ms), never by reloading the base model. Loaded adapters
are kept in an LRU with a cap.
"""

from __future__ import annotations

import ctypes
import itertools
import logging
import os
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import llama_cpp
import llguidance.llamacpp
import numpy as np
from llama_cpp._internals import LlamaModel
from llama_cpp._utils import suppress_stdout_stderr
from zyke.protocol import ModelInfo

from ..embedded import sha256_file
from ..errors import ModelLoadError
from .base import GenerationRequest, GenerationResult, OnText
from .decoding import BatchItem, SequenceDecoder

log = logging.getLogger(__name__)

_UNSET = object()


@dataclass
class _Slot:
    """One llama.cpp sequence id and what its KV cells hold."""

    seq_id: int
    adapter: str | None = None
    tokens: list[int] = field(default_factory=list)  # evaluated, in position order
    prompt_len: int = 0  # tokens of the prompt that produced it; past that is the model's own reply
    last_used: int = 0
    busy: bool = False


@dataclass
class _Running:
    """A sequence in a batch: its slot, its decoder, and the tokens still to feed."""

    item: BatchItem
    slot: _Slot
    decoder: SequenceDecoder
    pending: list[int]
    logits_index: int = -1


class LlamaCppBackend:
    name = "llama.cpp"
    adapter_kind = "gguf"

    def __init__(self, model_path: Path, sha256: str | None = None, n_ctx: int = 4096,
                 n_threads: int | None = None, max_loaded_adapters: int = 8, n_slots: int = 8,
                 max_batch: int = 4, kv_unified: bool = False, n_batch: int = 512,
                 repack: bool = False, n_ubatch: int = 8) -> None:
        threads = n_threads or min(4, os.cpu_count() or 1)
        mparams = llama_cpp.llama_model_default_params()
        # No weight repacking: the repacked CPU kernels take a different path for one row than for
        # several, so a reply's logits would depend on how many other NPCs share its batch (measured:
        # 0.2 RMS on the logits, enough to flip greedy near-ties). Without it every token's numbers are
        # the same alone or batched, and a reply is reproducible whatever else the daemon is doing.
        mparams.use_extra_bufts = repack
        try:
            self._model = LlamaModel(path_model=str(model_path), params=mparams, verbose=False)
        except (ValueError, RuntimeError) as exc:
            raise ModelLoadError(f"llama.cpp could not load {model_path}: {exc}") from exc
        self.llm = _LlmCompat(self)
        if max_batch >= n_slots:
            raise ValueError("n_slots must exceed max_batch: a batch needs a free slot for each new sequence")
        params = llama_cpp.llama_context_default_params()
        # Unified: one pool of n_ctx cells that all slots share (prefix copies cost no memory). Not
        # unified (the default): a stream of n_ctx cells per slot, laid out exactly as in a cold
        # single-sequence run, so a reply does not depend on what the other slots hold.
        params.n_ctx = n_ctx if kv_unified else n_ctx * n_slots
        params.n_batch = n_batch
        # At most 8 rows per llama.cpp micro-batch: above a small row count its CPU matmuls take another
        # path, so a prompt evaluated whole gave other logits than the same prompt evaluated as a cached
        # prefix plus its suffix (measured up to 1.2 apart with 11- to 512-row micro-batches, identical
        # at 4 and 8). Capped, a reply is the same cold, warm from a slot, or batched with other NPCs.
        params.n_ubatch = min(n_batch, n_ubatch)
        params.n_seq_max = n_slots
        params.kv_unified = kv_unified
        params.swa_full = True
        params.n_threads = params.n_threads_batch = threads
        params.no_perf = True
        with suppress_stdout_stderr(disable=False):  # llama.cpp prints its whole graph reservation
            self._ctx = llama_cpp.llama_init_from_model(self._model.model, params)
        if not self._ctx:
            raise ModelLoadError(f"llama.cpp could not create a context for {model_path}")
        self._mem = llama_cpp.llama_get_memory(self._ctx)
        self._unified = kv_unified
        self._n_batch = n_batch
        self._batch = llama_cpp.llama_batch_init(n_batch, 0, 1)
        self.max_batch = max_batch
        self._slots = [_Slot(i) for i in range(n_slots)]
        self._clock = itertools.count(1)

        sha256 = sha256 or sha256_file(model_path)
        self.model = ModelInfo(name=model_path.name, sha256=sha256, n_ctx=n_ctx)
        self.fingerprint = f"sha256:{sha256}"
        self._vocab = llama_cpp.llama_model_get_vocab(self._model.model)
        self._n_vocab = self._model.n_vocab()
        eot = llama_cpp.llama_vocab_eot(self._vocab)
        self._eos = {self._model.token_eos()} | ({eot} if eot >= 0 else set())
        with warnings.catch_warnings():  # it calls a deprecated llama.cpp getter once per token (262k times)
            warnings.simplefilter("ignore", DeprecationWarning)
            self.tokenizer = llguidance.llamacpp.lltokenizer_from_vocab(self._vocab)
        self._piece = ctypes.create_string_buffer(256)
        self._adapters: OrderedDict[str, llama_cpp.llama_adapter_lora_p] = OrderedDict()
        self._max_adapters = max_loaded_adapters
        self._active: str | None = None

    # -- Backend protocol

    def count_tokens(self, text: str) -> int:
        return len(self.tokenize(text))

    def tokenize(self, text: str) -> list[int]:
        return self._model.tokenize(text.encode("utf-8"), add_bos=True, special=False)

    def close(self) -> None:
        self._apply(None)
        for name in list(self._adapters):
            self.unload_adapter(name)
        if self._ctx:
            llama_cpp.llama_batch_free(self._batch)
            llama_cpp.llama_free(self._ctx)
            self._ctx = None
        self._model.close()

    def generate(self, request: GenerationRequest, on_text: OnText) -> GenerationResult:
        """One reply: a batch of one (same code path, same tokens as when batched)."""
        out: list[GenerationResult | BaseException] = []
        items = [BatchItem(request, on_text, out.append)]
        self.run_batch(lambda n: [items.pop()] if items and n else [])
        if isinstance(out[0], BaseException):
            raise out[0]
        return out[0]

    def run_batch(self, take: Callable[[int], list[BatchItem]]) -> None:
        """Decode replies in lockstep until none is left.

        ``take(n)`` is called at the start and at every step boundary and returns up to ``n`` new items
        to join (or none): requests arriving while others decode join at the next step instead of
        waiting for the batch to end. Every item in one batch must name the same adapter (the first one
        sets it; a mismatch is reported to that item). Each item's ``done`` gets its result or its own
        exception; one item failing does not stop the others.
        """
        running: list[_Running] = []
        adapter: object = _UNSET
        while True:
            if len(running) < self.max_batch:
                for item in take(self.max_batch - len(running)):
                    if adapter is _UNSET:
                        adapter = item.request.adapter
                    try:
                        if item.request.adapter != adapter:
                            raise RuntimeError("a batch cannot mix adapters")
                        running.append(self._admit(item))
                    except Exception as exc:  # reported to that request alone
                        item.done(exc)
            running = [r for r in running if not self._finish_if_cancelled(r)]
            if not running:
                return
            try:
                self._step(running)
            except Exception as exc:  # the model call failed: every sequence in it fails
                for r in running:
                    self._release(r)
                    r.item.done(exc)
                return
            still: list[_Running] = []
            for r in running:
                if r.logits_index < 0:  # prompt still prefilling
                    still.append(r)
                    continue
                try:
                    token = r.decoder.step(self._logits(r.logits_index))
                except Exception as exc:  # this sequence's grammar or callback failed
                    self._release(r)
                    r.item.done(exc)
                    continue
                if token is None:
                    self._release(r)
                    r.item.done(r.decoder.result())
                else:
                    r.pending = [token]
                    still.append(r)
            running = still

    def reset(self) -> None:
        """Forget every slot (a cold start for the next prompt); tests and benchmarks use it."""
        llama_cpp.llama_memory_clear(self._mem, True)
        for slot in self._slots:
            slot.tokens, slot.adapter, slot.prompt_len, slot.last_used = [], None, 0, 0

    # -- adapters

    @property
    def loaded_adapters(self) -> list[str]:
        return list(self._adapters)

    def load_adapter(self, name: str, gguf_path: Path) -> None:
        """Load a GGUF LoRA (idempotent); the least recently used one is freed past the cap."""
        if name in self._adapters:
            self._adapters.move_to_end(name)
            return
        handle = llama_cpp.llama_adapter_lora_init(self._model.model, str(gguf_path).encode())
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
        for slot in self._slots:  # a later adapter of the same name may hold other weights
            if slot.adapter == name and not slot.busy:
                self._clear(slot)
        llama_cpp.llama_adapter_lora_free(handle)

    def _apply(self, name: str | None) -> None:
        """Set the context's adapter. Cached slots stay: they are keyed by adapter, so a prefix is only
        ever reused under the weights that computed it."""
        if name == self._active:
            return
        if name is None:
            llama_cpp.llama_set_adapters_lora(self._ctx, None, 0, None)
        else:
            if name not in self._adapters:
                raise ModelLoadError(f"adapter {name!r} is not loaded")
            self._adapters.move_to_end(name)
            arr = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(self._adapters[name])
            llama_cpp.llama_set_adapters_lora(self._ctx, arr, 1, (ctypes.c_float * 1)(1.0))
        self._active = name

    # -- slots

    def _admit(self, item: BatchItem) -> _Running:
        started = time.perf_counter()
        request = item.request
        self._apply(request.adapter)
        prompt = self.tokenize(request.prompt)
        slot, cached = self._take_slot(prompt, request.adapter)
        decoder = SequenceDecoder(request, self.tokenizer, self._n_vocab, self._eos, self._token_bytes,
                                  item.on_text, prompt_tokens=len(prompt), cached_tokens=cached, started=started)
        slot.prompt_len = len(prompt)
        return _Running(item, slot, decoder, pending=prompt[cached:])

    def _take_slot(self, prompt: list[int], adapter: str | None) -> tuple[_Slot, int]:
        """The slot this prompt will use and how many of its tokens are already there. At least one
        token is always left to evaluate, so there are fresh logits to sample from."""
        limit = len(prompt) - 1
        best, same = None, 0
        for slot in self._slots:
            if slot.tokens and slot.adapter == adapter:
                n = _common_prefix(slot.tokens, prompt, limit)
                if n > same:
                    best, same = slot, n
        if best is not None and not best.busy and same >= min(best.prompt_len, len(best.tokens)):
            # this slot's own conversation, one turn on: keep it, drop whatever reply tail differs
            target = best
            self._truncate(target, same)
        else:
            target = min((s for s in self._slots if not s.busy and s is not best),
                         key=lambda s: (bool(s.tokens), s.last_used))
            self._clear(target)
            if best is not None and same > 0:  # another NPC's prefix (a shared persona): copy, not recompute
                if self._unified:
                    llama_cpp.llama_memory_seq_cp(self._mem, best.seq_id, target.seq_id, 0, same)
                else:  # across streams llama.cpp copies a whole sequence; then the tail is cut
                    llama_cpp.llama_memory_seq_cp(self._mem, best.seq_id, target.seq_id, -1, -1)
                    target.tokens = list(best.tokens)
                    self._truncate(target, same)
                target.tokens = prompt[:same]
        target.adapter, target.busy, target.last_used = adapter, True, next(self._clock)
        return target, same

    def _truncate(self, slot: _Slot, keep: int) -> None:
        if keep < len(slot.tokens):
            if not llama_cpp.llama_memory_seq_rm(self._mem, slot.seq_id, keep, -1):
                self._clear(slot)
                return
            del slot.tokens[keep:]

    def _clear(self, slot: _Slot) -> None:
        llama_cpp.llama_memory_seq_rm(self._mem, slot.seq_id, -1, -1)
        slot.tokens, slot.prompt_len = [], 0

    def _evict_one(self) -> bool:
        """Free KV cells when the cache is full: drop the least recently used idle slot."""
        idle = [s for s in self._slots if s.tokens and not s.busy]
        if not idle:
            return False
        self._clear(min(idle, key=lambda s: s.last_used))
        return True

    def _release(self, r: _Running) -> None:
        r.slot.busy = False
        r.slot.last_used = next(self._clock)

    def _finish_if_cancelled(self, r: _Running) -> bool:
        if r.decoder.check_cancel():
            self._release(r)
            r.item.done(r.decoder.result())
            return True
        return False

    # -- the model step

    def _step(self, running: list[_Running]) -> None:
        """One llama_decode: every decoding sequence's next token first, then as much prompt as fits."""
        batch, n = self._batch, 0
        order = sorted(running, key=lambda r: len(r.pending) > 1)
        fed: list[tuple[_Running, int]] = []
        for r in order:
            r.logits_index = -1
            take = min(len(r.pending), self._n_batch - n)
            if take <= 0:
                continue
            pos = len(r.slot.tokens)
            for i in range(take):
                batch.token[n] = r.pending[i]
                batch.pos[n] = pos + i
                batch.n_seq_id[n] = 1
                batch.seq_id[n][0] = r.slot.seq_id
                batch.logits[n] = 0
                n += 1
            if take == len(r.pending):
                batch.logits[n - 1] = 1
                r.logits_index = n - 1
            fed.append((r, take))
        batch.n_tokens = n
        while (rc := llama_cpp.llama_decode(self._ctx, batch)) == 1:  # no room in the KV cache
            if not self._evict_one():
                raise RuntimeError("the KV cache is full with running replies; lower max_batch or raise kv_cells")
        if rc != 0:
            raise RuntimeError(f"llama_decode failed ({rc})")
        for r, take in fed:
            r.slot.tokens.extend(r.pending[:take])
            del r.pending[:take]

    def _logits(self, index: int) -> np.ndarray:
        return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self._ctx, index), shape=(self._n_vocab,))

    def _token_bytes(self, token: int) -> bytes:
        n = llama_cpp.llama_token_to_piece(self._vocab, token, self._piece, len(self._piece), 0, False)
        return bytes(self._piece[:n]) if n > 0 else b""


class _LlmCompat:
    """The two calls tests and tools made on the former ``llama_cpp.Llama`` attribute, kept working."""

    def __init__(self, backend: LlamaCppBackend) -> None:
        self._backend = backend

    def tokenize(self, text: bytes, add_bos: bool = True) -> list[int]:
        return self._backend._model.tokenize(text, add_bos=add_bos, special=False)

    def reset(self) -> None:
        self._backend.reset()


def _common_prefix(have: list[int], want: list[int], limit: int) -> int:
    n = min(len(have), limit)
    if n <= 0:
        return 0
    diff = np.flatnonzero(np.asarray(have[:n]) != np.asarray(want[:n]))
    return int(diff[0]) if diff.size else n
