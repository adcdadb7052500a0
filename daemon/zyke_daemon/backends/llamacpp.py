"""The llama.cpp backend (llama-cpp-python): GGUF base model, GGUF LoRA adapters swapped per request.

Generation runs through the shared decode loop (decoding.py); this module evaluates tokens and hands
out logits, driving llama.cpp's low-level API itself for one reason: **KV slots**.

One context holds ``n_slots`` llama.cpp sequences, each with a KV stream of its own
(``kv_unified=False``). A slot remembers the tokens it evaluated and the adapter they were evaluated
under. A new prompt takes the slot that already holds the longest reusable prefix of it: the same NPC
one turn later extends its own slot and only its new turn is evaluated, NPCs talking in turn no longer
evict each other, and an NPC whose persona another slot already holds starts from a copy of that
slot. Slots are keyed by adapter because llama.cpp does not invalidate the KV cache when adapters
change (the trap of llama.cpp issue 26207). The least recently used slot is recycled.

A cached reply must be the reply a cold start gives, token for token, and on a CPU that is not free:
measured on this model, logits depend on how a sequence's tokens were grouped into llama.cpp
micro-batches (a token decoded alone vs. the same token inside a prompt chunk differ by up to 1.0).
So prompts are always evaluated in chunks whose boundaries sit at multiples of ``PREFILL_CHUNK``
positions, and only the chunk-aligned part of an earlier *prompt* is ever reused; the model's own
reply tokens (evaluated one step at a time) and a trailing partial chunk are evaluated again. Then a
reused prefix holds bit-identical KV to a cold run, which ``tests/test_fast_paths.py`` checks. Weight
repacking is off (``use_extra_bufts``): its kernels take another path for one row than for several,
and on the measured CPU it was not faster for this model anyway.

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
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

import llama_cpp
import llguidance.llamacpp
import numpy as np
from llama_cpp._internals import LlamaModel
from llama_cpp._utils import suppress_stdout_stderr
from zyke.protocol import ModelInfo
from zyke_models.embedded import sha256_file

from ..errors import ModelLoadError
from .base import ANY_ADAPTER, BatchItem, GenerationRequest, GenerationResult, OnText, TakeItems
from .decoding import SequenceDecoder, decode

log = logging.getLogger(__name__)
# llama-cpp-python prints llama.cpp's log lines whenever its logger's level allows them, and an unset level
# allows all of them: every KV copy and graph reservation (thousands of debug lines) in the daemon's log.
logging.getLogger("llama-cpp-python").setLevel(logging.WARNING)


#: Prompt chunk size and alignment, in tokens (see the module docstring). 32 evaluates prompts as fast as
#: llama.cpp's default 512 on the measured CPU while re-evaluating at most 31 tokens of an old prompt.
PREFILL_CHUNK = 32


@dataclass
class _Slot:
    """One llama.cpp sequence id (its own KV stream) and what it holds."""

    seq_id: int
    adapter: str | None = None
    tokens: list[int] = field(default_factory=list)  # evaluated, in position order
    reusable: int = 0  # leading tokens evaluated in aligned prompt chunks: exactly what a cold run computes
    last_used: int = 0


@dataclass
class _Arrived:
    """A newcomer taken from the queue and prepared, not yet prefilled (``run_batch``'s ``urgent``)."""

    item: BatchItem
    request: GenerationRequest
    started: float


@dataclass
class _Running:
    item: BatchItem
    slot: _Slot
    decoder: SequenceDecoder
    feed: list[int]
    row: int = -1  # its logits' row in the batched llama_decode of the last step
    logits: np.ndarray | None = None  # or its own logits, when its tokens were evaluated alone
    pauses: int = 0  # times it gave its seat to a foreground reply (at most once)
    waited: int = 0  # foreground replies admitted while it was paused (it resumes first after starve_after)
    held: int = 0  # steps it sat out while a foreground reply decoded its first tokens


class LlamaCppBackend:
    name = "llama.cpp"
    adapter_kind: Literal["gguf", "peft"] = "gguf"
    supports_batching: ClassVar[bool] = True
    supports_idle_prefill: ClassVar[bool] = True

    def __init__(self, model_path: Path, sha256: str | None = None, n_ctx: int = 4096,
                 n_threads: int | None = None, max_loaded_adapters: int = 8, n_slots: int = 6) -> None:
        threads = n_threads or min(4, os.cpu_count() or 1)
        mparams = llama_cpp.llama_model_default_params()
        mparams.use_extra_bufts = False  # no weight repacking: see the module docstring
        try:
            self._model = LlamaModel(path_model=str(model_path), params=mparams, verbose=False)
        except (ValueError, RuntimeError) as exc:
            raise ModelLoadError(f"llama.cpp could not load {model_path}: {exc}") from exc
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = n_ctx * n_slots  # not unified: each slot gets a stream of n_ctx cells
        params.n_batch = 512
        params.n_ubatch = PREFILL_CHUNK
        params.n_seq_max = n_slots
        params.kv_unified = False
        params.swa_full = True  # cutting a slot's tail must leave every earlier position in every layer
        params.n_threads = params.n_threads_batch = threads
        params.no_perf = True
        with suppress_stdout_stderr(disable=False):  # llama.cpp prints its whole graph reservation
            self._ctx = llama_cpp.llama_init_from_model(self._model.model, params)
        if not self._ctx:
            raise ModelLoadError(f"llama.cpp could not create a context for {model_path}")
        self._mem = llama_cpp.llama_get_memory(self._ctx)
        if b"LLAMAFILE = 1" in llama_cpp.llama_print_system_info():
            log.info("llama.cpp was built with llamafile matmuls: under a LoRA adapter a batched reply can differ "
                     "from the same reply alone by rounding (install llama-cpp-python with "
                     "CMAKE_ARGS=-DGGML_LLAMAFILE=OFF for exact batching, as tools/test.sh does)")
        self._batch = llama_cpp.llama_batch_init(512, 0, 1)
        self._n_ctx = n_ctx
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
        #: the decode loop's two speed-ups (decoding.decode); tests turn them off to compare
        self.overlap = True
        self.fast_forward = True
        #: priorities in ``run_batch`` (the daemon sets them from its config; docs/SCHEDULING.md)
        self.foreground_solo_tokens = 8
        self.starve_after = 4
        self.background_tokens_per_s: float | None = None
        self.preemptions = 0  # replies paused for a foreground one, ever (the daemon's /metrics)
        self._budget = 0.0
        self._budget_at = time.perf_counter()
        #: llama_decode runs here while the decode loop computes the next grammar mask
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="llama-decode")

    # -- Backend protocol

    def tokenize(self, text: str, special: bool = False) -> list[int]:
        tokens: list[int] = self._model.tokenize(text.encode("utf-8"), add_bos=True, special=special)
        return tokens

    def count_tokens(self, text: str) -> int:
        return len(self.tokenize(text))

    def chat_template(self) -> tuple[str, str, str] | None:
        """The model's own chat template (GGUF ``tokenizer.chat_template``) with its BOS and EOS texts, or None
        when the file carries none (the embedded Gemma 3 270M is a base model: none)."""
        template = self._model.metadata().get("tokenizer.chat_template")
        if not template:
            return None
        vocab = self._vocab
        bos, eos = llama_cpp.llama_vocab_bos(vocab), llama_cpp.llama_vocab_eos(vocab)
        text = llama_cpp.llama_vocab_get_text
        return template, (text(vocab, bos) or b"").decode() if bos >= 0 else "", \
            (text(vocab, eos) or b"").decode() if eos >= 0 else ""

    def close(self) -> None:
        if not self._ctx:
            return
        self._apply(None)
        for name in list(self._adapters):
            self.unload_adapter(name)
        self._executor.shutdown()
        llama_cpp.llama_batch_free(self._batch)
        llama_cpp.llama_free(self._ctx)
        self._ctx = None
        self._model.close()  # type: ignore[no-untyped-call]  # llama_cpp leaves LlamaModel.close unannotated

    def generate(self, request: GenerationRequest, on_text: OnText) -> GenerationResult:
        started = time.perf_counter()
        try:
            slot, n_prompt, cached = self._start(request)
        except _PrefillStopped as stopped:
            return stopped.result(started)
        try:
            return decode(request, self.tokenizer, self._n_vocab, self._eos, self._logits,
                          lambda tokens: self._eval(slot, tokens), self._token_bytes, on_text,
                          prompt_tokens=n_prompt, cached_tokens=cached, started=started,
                          executor=self._executor if self.overlap else None, fast_forward=self.fast_forward)
        except BaseException:
            self._clear(slot)  # a half-evaluated slot is worth nothing
            raise

    def run_batch(self, take: TakeItems, max_batch: int = 4, preempt: TakeItems | None = None,
                  urgent: Callable[[], bool] | None = None) -> None:
        """Decode several replies in lockstep until none is left: one ``llama_decode`` per step carries
        the next token of every running reply, each in its own slot.

        On a CPU the weights are then read once for several tokens (raw llama.cpp measured 1.6-1.7x
        the aggregate decode speed of one sequence with four, on 2 cores). ``take(n, adapter)`` is
        called before every step and hands over up to ``n`` new replies for that adapter
        (``ANY_ADAPTER`` when nothing runs): replies that arrive while others decode join at the next
        step. A newcomer's prompt is evaluated alone, in the same aligned chunks as ever.

        A reply's token with the grammar's forced tokens after it is evaluated in a call of its own,
        as ``generate`` evaluates it, and lone tokens of all replies share one call, one row each: a
        row of one token gives the same numbers alone or beside other sequences (repacking is off).
        So a batched reply is, bit for bit, the reply ``generate`` gives alone. One reply failing ends
        only that reply.

        Priorities (``BatchItem.priority``, docs/SCHEDULING.md): ``preempt(n, adapter)`` hands over queued
        foreground replies, asked before every step even when the batch is full; one then takes the seat
        of a running lower-priority reply, which is *paused*: it keeps its slot (its KV) and its decoder
        and simply sits out the steps until a seat is free again. Sitting out steps changes none of its
        numbers (the row argument above), so a paused reply still ends as its solo run does. A reply is
        paused at most once, a paused one resumes ahead of the queue after ``starve_after`` foreground
        admissions, and the context keeps its spare stream, so at most ``n_slots - 1 - max_batch``
        replies are paused at a time. Lower-priority replies also sit out the steps while a foreground
        reply decodes its first ``foreground_solo_tokens`` (at most that many steps in all, each), and
        background replies the steps over the ``background_tokens_per_s`` budget.

        ``urgent()`` says a foreground reply waits in the queue. Newcomers handed over together are prefilled one
        by one, each alone; when ``urgent()`` turns true between two of them, the rest wait (prepared, holding no
        slot) until the foreground reply is seated at the next step, so a player's line that arrives while
        background NPCs start talking waits for one prompt, not for all of them.
        """
        # Always a KV stream to spare: a batch that occupied every stream of the context changed a reply
        # (measured: 4 replies in a 4-stream context, one differed from its solo run; with 5, none).
        max_batch = min(max_batch, len(self._slots) - 1)
        running: list[_Running] = []
        paused: list[_Running] = []
        arrived: list[_Arrived] = []  # handed over and prepared, prefill put off for a foreground reply
        while True:
            for r in running:  # the logits of the last step, for the replies it evaluated
                if r.row >= 0 or r.logits is not None:
                    self._advance(r, r.logits if r.logits is not None else self._logits(r.row))
            running = [r for r in running if r.feed]
            for r in [r for r in paused if r.decoder.check_cancel()]:  # cancelled (or timed out) while paused
                paused.remove(r)
                r.item.done(r.decoder.result())
            self._seat(running, paused, arrived, take, preempt, urgent, max_batch)
            if not running:
                if arrived:  # every reply seated this time failed or finished at once: seat the rest
                    continue
                return
            stepping = self._stepping(running)
            if not stepping:  # only background replies, over their budget: wait for it to refill
                time.sleep(min(0.05, 1.0 / max(self.background_tokens_per_s or 1.0, 1.0)))
                continue
            try:
                self._step(stepping)
            except Exception as exc:  # the model call failed: every reply in it fails
                for r in running + paused:
                    self._clear(r.slot)
                    r.item.done(exc)
                for a in arrived:
                    a.item.done(exc)
                return

    def _seat(self, running: list[_Running], paused: list[_Running], arrived: list[_Arrived], take: TakeItems,
              preempt: TakeItems | None, urgent: Callable[[], bool] | None, max_batch: int) -> None:
        """Fill the batch for the next step: starved paused replies, then queued foreground replies (pausing a
        lower-priority reply when no seat is free), then the other paused replies, then newcomers put off last
        time, then anything queued (the newcomers after the first wait again if ``urgent()``)."""
        def adapter() -> object:
            busy = running or paused
            if busy:
                return busy[0].decoder.request.adapter
            return arrived[0].request.adapter if arrived else ANY_ADAPTER

        def admit(item: BatchItem) -> None:
            a = self._prepare(item)
            if a is not None:
                start(a)

        def start(a: _Arrived) -> None:
            r = self._admit(a, running + paused)
            if r is not None:
                running.append(r)

        for r in [r for r in paused if r.waited >= self.starve_after > 0]:
            if len(running) < max_batch:
                paused.remove(r)
                running.append(r)
        if preempt is not None:
            victims = sorted((r for r in running if r.item.priority > 0 and not r.pauses),
                             key=lambda r: -r.item.priority)
            # every newcomer takes a new stream (a paused reply keeps its own), and one stays spare
            seats = min(max_batch - len(running) + len(victims), len(self._slots) - 1 - len(running) - len(paused))
            for item in preempt(seats, adapter()) if seats > 0 else []:
                if len(running) >= max_batch:
                    victim = victims.pop(0)
                    running.remove(victim)
                    victim.pauses += 1
                    paused.append(victim)
                    self.preemptions += 1
                for r in paused:
                    r.waited += 1
                admit(item)
        while paused and len(running) < max_batch:
            running.append(paused.pop(0))
        seats = min(max_batch - len(running), len(self._slots) - 1 - len(running) - len(paused))
        if seats <= 0:
            return
        incoming = arrived[:seats]
        del arrived[:seats]
        if len(incoming) < seats:
            incoming += [a for a in map(self._prepare, take(seats - len(incoming), adapter())) if a is not None]
        for n, a in enumerate(incoming):
            if n and running and urgent is not None and urgent():  # the batch's adapter is set: the rest can wait
                arrived[:0] = incoming[n:]
                return
            start(a)

    def _stepping(self, running: list[_Running]) -> list[_Running]:
        """The replies the next step evaluates: all of them, except lower-priority ones while a foreground reply
        decodes its first ``foreground_solo_tokens`` (each sits out at most that many steps in all, however many
        foreground replies start), and background ones over the ``background_tokens_per_s`` budget. Sitting out
        changes no number."""
        solo = self.foreground_solo_tokens
        head = solo > 0 and any(r.item.priority == 0 and len(r.decoder.generated) < solo for r in running)
        out = []
        now = time.perf_counter()
        rate = self.background_tokens_per_s
        if rate:
            self._budget = min(rate, self._budget + (now - self._budget_at) * rate)
        self._budget_at = now
        for r in running:
            if head and r.item.priority > 0 and r.held < solo:
                r.held += 1
                continue
            if rate and r.item.priority >= 2:
                if self._budget < 1:
                    continue
                self._budget -= len(r.feed)
            out.append(r)
        return out

    def _prepare(self, item: BatchItem) -> _Arrived | None:
        """Build a newcomer's request (its prompt, its adapter loaded); None when that failed (it is answered)."""
        started = time.perf_counter()
        try:
            return _Arrived(item, item.prepare(), started)
        except Exception as exc:
            item.done(exc)
            return None

    def _admit(self, arrived: _Arrived, running: list[_Running]) -> _Running | None:
        """Place and prefill a prepared newcomer, and pick its first token."""
        item, request, started = arrived.item, arrived.request, arrived.started
        slot = None
        try:
            if running and request.adapter != running[0].decoder.request.adapter:
                raise RuntimeError("a batch cannot mix adapters")
            slot, n_prompt, cached = self._start(request, busy={r.slot.seq_id for r in running})
            decoder = SequenceDecoder(request, self.tokenizer, self._n_vocab, self._eos, self._token_bytes,
                                      item.on_text, prompt_tokens=n_prompt, cached_tokens=cached, started=started)
        except _PrefillStopped as stopped:
            item.done(stopped.result(started))
            return None
        except Exception as exc:
            item.done(exc)
            return None
        r = _Running(item, slot, decoder, feed=[])
        self._advance(r, self._logits())
        return r if r.feed else None

    def _advance(self, r: _Running, logits: np.ndarray) -> None:
        """Pick the reply's next token(s); a finished (or failed) reply gets its result and leaves."""
        r.row, r.logits = -1, None
        try:
            feed = r.decoder.step(logits, fast_forward=self.fast_forward)
        except Exception as exc:
            self._clear(r.slot)
            r.feed = []
            r.item.done(exc)
            return
        r.feed = feed or []
        if feed is None:
            r.item.done(r.decoder.result())

    def _step(self, running: list[_Running]) -> None:
        """Evaluate every running reply's pending tokens: a picked token with forced tokens after it in a
        call of its own (exactly as ``generate`` evaluates it; beside other sequences llama.cpp would
        regroup those rows into other micro-batches, which was measured to change replies), then every
        lone token together in one call, one row per reply."""
        singles = [r for r in running if len(r.feed) == 1]
        for r in running:
            if len(r.feed) > 1:
                self._eval(r.slot, r.feed)
                r.logits = self._logits().copy()  # the next call overwrites llama.cpp's buffer
                r.feed = []
        if not singles:
            return
        self._decode([(r.slot.seq_id, len(r.slot.tokens), r.feed[0], True) for r in singles])
        for row, r in enumerate(singles):
            r.row = row
            r.slot.tokens.append(r.feed.pop())

    def prefill_idle(self, text: str, adapter: str | None, stop: Callable[[], bool]) -> int:
        """Evaluate ``text`` into its slot in aligned chunks, checking ``stop`` between chunks; returns
        how many tokens were evaluated.

        The daemon calls this with the last prompt plus its reply when its queue is empty. A reply's
        own tokens were evaluated one step at a time, which a cold run would not reproduce exactly, so
        the next turn would evaluate them again; done here, that work happens while the player reads
        and types, and the next turn only evaluates its new line."""
        tokens = self.tokenize(text)
        self._apply(adapter)
        slot, start = self._take_slot(tokens, adapter)
        try:  # whole chunks only: a trailing partial one would be evaluated again anyway
            return self._prefill(slot, tokens[:len(tokens) - len(tokens) % PREFILL_CHUNK], start, stop) - start
        except BaseException:
            self._clear(slot)
            raise

    def reset(self) -> None:
        """Forget every slot, so the next prompt starts cold (tests and benchmarks use it)."""
        llama_cpp.llama_memory_clear(self._mem, True)
        for slot in self._slots:
            slot.tokens, slot.adapter, slot.reusable, slot.last_used = [], None, 0, 0

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
            if slot.adapter == name:
                self._clear(slot)
        llama_cpp.llama_adapter_lora_free(handle)

    def _apply(self, name: str | None) -> None:
        """Set the context's adapter; slots computed under other weights stay, keyed by their adapter."""
        if name == self._active:
            return
        if name is None:
            llama_cpp.llama_set_adapters_lora(self._ctx, None, 0, None)
        else:
            if name not in self._adapters:
                raise ModelLoadError(f"adapter {name!r} is not loaded")
            self._adapters.move_to_end(name)
            # llama_cpp types the adapter handle as c_void_p but its ctypes array element as POINTER(c_void_p)
            arr = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(self._adapters[name])  # type: ignore[misc]
            llama_cpp.llama_set_adapters_lora(self._ctx, arr, 1, (ctypes.c_float * 1)(1.0))
        self._active = name

    # -- slots

    def _take_slot(self, prompt: list[int], adapter: str | None,
                   busy: set[int] | frozenset[int] = frozenset()) -> tuple[_Slot, int]:
        """The slot this prompt runs in and how many of its leading tokens that slot already holds
        (a multiple of PREFILL_CHUNK, and short of the whole prompt: the last token is always evaluated
        again so there are logits to sample from)."""
        best, keep = None, 0
        free = [s for s in self._slots if s.seq_id not in busy]
        for slot in free:
            if slot.adapter == adapter and slot.reusable:
                n = _common_prefix(slot.tokens, prompt, min(slot.reusable, len(prompt) - 1))
                n -= n % PREFILL_CHUNK
                if n > keep:
                    best, keep = slot, n
        others = [s for s in free if s is not best]
        if best is not None and (keep == best.reusable or not others):
            target = best  # this slot's own conversation one turn on, or the only slot free: cut its tail
        else:
            target = min(others, key=lambda s: (bool(s.tokens), s.last_used))
            self._clear(target)
            if best is not None:  # another NPC's slot shares the prefix (a common persona): copy it
                llama_cpp.llama_memory_seq_cp(self._mem, best.seq_id, target.seq_id, -1, -1)
                target.tokens = list(best.tokens)
        if len(target.tokens) > keep and not llama_cpp.llama_memory_seq_rm(self._mem, target.seq_id, keep, -1):
            self._clear(target)
            keep = 0
        del target.tokens[keep:]
        target.adapter, target.reusable, target.last_used = adapter, keep, next(self._clock)
        return target, keep

    def _clear(self, slot: _Slot) -> None:
        llama_cpp.llama_memory_seq_rm(self._mem, slot.seq_id, -1, -1)
        slot.tokens, slot.reusable, slot.adapter = [], 0, None

    # -- model calls

    def _start(self, request: GenerationRequest,
               busy: set[int] | frozenset[int] = frozenset()) -> tuple[_Slot, int, int]:
        """Apply the request's adapter, place its prompt in a slot and evaluate what the slot lacks;
        returns the slot, the prompt's length and how many of its tokens were reused."""
        self._apply(request.adapter)
        prompt = self.tokenize(request.prompt, request.special)
        if len(prompt) + request.max_tokens > self._n_ctx:
            raise ValueError(f"prompt ({len(prompt)} tokens) plus max_tokens exceeds the context ({self._n_ctx})")
        slot, cached = self._take_slot(prompt, request.adapter, busy)
        try:
            # cancel (and the daemon's timeout, which sets it) is checked between chunks: a prompt of thousands of
            # tokens no longer holds the model until it is all evaluated (issue 14: 195 s for one say)
            reached = self._prefill(slot, prompt, cached, request.cancel.is_set)
        except BaseException:
            self._clear(slot)
            raise
        if reached < len(prompt):  # the chunks evaluated so far stay in the slot, aligned and reusable
            raise _PrefillStopped(len(prompt), cached)
        return slot, len(prompt), cached

    def _prefill(self, slot: _Slot, tokens: list[int], start: int, stop: Callable[[], bool] | None = None) -> int:
        """Evaluate tokens[start:] in chunks that end at multiples of PREFILL_CHUNK (see the docstring),
        checking ``stop`` between chunks; returns the position reached."""
        pos = start
        while pos < len(tokens) and not (stop and stop()):
            end = min(len(tokens), (pos // PREFILL_CHUNK + 1) * PREFILL_CHUNK)
            self._eval(slot, tokens[pos:end])
            pos = end
        slot.reusable = pos - pos % PREFILL_CHUNK
        return pos

    def _eval(self, slot: _Slot, tokens: list[int]) -> None:
        """One llama_decode of ``tokens`` appended to the slot; logits are kept for the last one only."""
        pos = len(slot.tokens)
        self._decode([(slot.seq_id, pos + i, token, i == len(tokens) - 1) for i, token in enumerate(tokens)])
        slot.tokens.extend(tokens)

    def _decode(self, rows: list[tuple[int, int, int, bool]]) -> None:
        """One llama_decode of ``(sequence, position, token, wants logits)`` rows."""
        batch = self._batch
        for i, (seq_id, pos, token, logits) in enumerate(rows):
            batch.token[i] = token
            batch.pos[i] = pos
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = seq_id
            batch.logits[i] = logits
        batch.n_tokens = len(rows)
        rc = llama_cpp.llama_decode(self._ctx, batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode failed ({rc})")

    def _logits(self, row: int = -1) -> np.ndarray:
        """Logits of a row of the last llama_decode (-1: its last row), a view on llama.cpp's buffer."""
        return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self._ctx, row), shape=(self._n_vocab,))

    def score_continuations(self, prefix: str, continuations: Sequence[str], adapter: str | None = None) -> list[float]:
        """Total log-probability of each continuation after ``prefix``.

        Used to compare choosing an NPC's action by constrained greedy decoding with choosing it by the
        likelihood of each allowed label (``zyke-train evaluate`` reports both). A total, not a per-token
        mean: after a label's first token the rest are near-certain, so a mean ranks long labels over the
        one the model prefers (measured: 0.17 action accuracy scored by the mean against 0.65 greedy). The
        prefix is evaluated once into a slot; each continuation is evaluated after it and then cut off again."""
        self._apply(adapter)
        base = self.tokenize(prefix)
        slot, cached = self._take_slot(base, adapter)
        try:
            self._prefill(slot, base, cached)
            first = _log_softmax(self._logits())
            n = len(slot.tokens)
            scores = []
            for text in continuations:
                tokens = self._model.tokenize(text.encode("utf-8"), add_bos=False, special=False)
                total = float(first[tokens[0]])
                if len(tokens) > 1:
                    self._decode([(slot.seq_id, n + i, t, True) for i, t in enumerate(tokens[:-1])])
                    for i, nxt in enumerate(tokens[1:]):
                        total += float(_log_softmax(self._logits(i))[nxt])
                    llama_cpp.llama_memory_seq_rm(self._mem, slot.seq_id, n, -1)
                scores.append(total)
            return scores
        except BaseException:
            self._clear(slot)
            raise

    def _token_bytes(self, token: int) -> bytes:
        n = llama_cpp.llama_token_to_piece(self._vocab, token, self._piece, len(self._piece), 0, False)
        return self._piece.raw[:n] if n > 0 else b""


class _PrefillStopped(Exception):
    """The request was cancelled while its prompt was being evaluated: it ends as a cancelled result."""

    def __init__(self, prompt_tokens: int, cached_tokens: int) -> None:
        super().__init__("cancelled during prefill")
        self.prompt_tokens, self.cached_tokens = prompt_tokens, cached_tokens

    def result(self, started: float) -> GenerationResult:
        return GenerationResult(text="", finish_reason="cancelled", prompt_tokens=self.prompt_tokens,
                                completion_tokens=0, cached_tokens=self.cached_tokens,
                                total_s=time.perf_counter() - started)


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits.astype(np.float64) - float(np.max(logits))
    return shifted - float(np.log(np.exp(shifted).sum()))


def _common_prefix(have: list[int], want: list[int], limit: int) -> int:
    if limit <= 0:
        return 0
    a, b = np.asarray(have[:limit]), np.asarray(want[:limit])
    n = min(a.size, b.size)
    diff = np.flatnonzero(a[:n] != b[:n])
    return int(diff[0]) if diff.size else n
