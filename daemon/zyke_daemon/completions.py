"""OpenAI-style completions as jobs of the daemon's one model queue.

A chat or text completion from the HTTP API is queued, scheduled, batched, timed out and counted like an
NPC's line (worker.py's batch loop takes it as it takes a ``SayJob``), so WebSocket and
HTTP traffic share the model thread fairly: each HTTP request is a client of its own in the fair queue. What
differs is the middle: the prompt is the caller's (rendered by openai_format.py), the output is free text or
JSON under the caller's schema, and no NPC session records it. No sockets here: the server carries the results
to the HTTP side through the request's ``HttpPeer``.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from zyke.protocol import ErrorCode

from .backends.base import GenerationRequest
from .core import ConnectionCore, error_frame, outcome_error, token_cap
from .errors import DaemonError
from .openai_format import StopScanner
from .scheduler import NORMAL

log = logging.getLogger(__name__)


@dataclass
class CompletionJob:
    """One completion waiting for, or in, the model: the fields the queue, the dispatcher and the batch read on
    a ``SayJob`` (request_id, conn, npc_id, adapter, rank, cancel, timers), plus the request itself."""

    request_id: str
    conn: ConnectionCore
    prompt: str
    #: the JSON Schema the output is decoded under (None: free text)
    schema: dict[str, Any] | None
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    stops: list[str]
    adapter: str | None
    enqueued_at: float
    stream: bool = False
    top_k: int = 0
    repeat_penalty: float = 1.0
    #: for /metrics (``zyke_requests_total{type=...}``)
    kind: str = "chat.completions"
    #: parse special-token text in the prompt (a chat template's turn markers)
    special: bool = True
    rank: int = NORMAL
    deadline_at: float | None = None
    queued_rank: int | None = None
    cancel: threading.Event = field(default_factory=threading.Event)
    started_at: float | None = None
    timed_out: bool = False
    timer: Any = field(default=None, repr=False, compare=False)

    @property
    def npc_id(self) -> str:
        """The queue's group and the batch's "one reply per NPC" key: a completion is alone in its group."""
        return f"~{self.request_id}"


@dataclass
class CompletionResult:
    text: str
    finish_reason: str  # "stop" or "length", as OpenAI names them
    prompt_tokens: int
    completion_tokens: int


class CompletionRun:
    """One completion in the model: what ``worker.JobRun`` is to an NPC line (made and prepared on the model
    thread, text as it is decoded, the outcome on the loop thread). ``server`` is the ``worker.Worker``."""

    def __init__(self, server: Any, peer: Any, job: CompletionJob) -> None:
        self.server, self.peer, self.job = server, peer, job
        self.loop: asyncio.AbstractEventLoop = server.loop
        job.started_at = time.monotonic()
        self.scanner = StopScanner(job.stops)
        self.matcher = server.core.rails.matcher()
        self.fed = 0  # characters of the output handed to on_text (a word the rail held at the end is not)

    def prepare(self) -> GenerationRequest:
        """The generation request (model thread: it may load the adapter). ``max_tokens`` shrinks to what the
        context leaves after the prompt, as llama.cpp's server does; a prompt that leaves nothing is ``too_long``."""
        server, job = self.server, self.job
        backend = server.backend
        server.ensure_adapter(job.adapter, job.request_id)
        n_ctx = server.config.n_ctx
        prompt_tokens = backend.count_tokens(job.prompt)
        room = n_ctx - prompt_tokens
        if room < 1:
            raise DaemonError(ErrorCode.TOO_LONG, f"the prompt is {prompt_tokens} tokens; the context holds {n_ctx}",
                              job.request_id)
        return GenerationRequest(
            prompt=job.prompt, schema=job.schema, max_tokens=min(token_cap(server.config, job.rank, job.max_tokens),
                                                                 room),
            temperature=job.temperature, top_p=job.top_p, top_k=job.top_k, seed=job.seed,
            repeat_penalty=job.repeat_penalty,
            no_repeat_ngram=0, adapter=job.adapter, cancel=job.cancel, special=job.special,
            # the daemon's safety rails (docs/SAFETY.md) over the whole output, at the daemon's audience
            safety=self.matcher, guard_whole_text=True,
        )

    def on_text(self, piece: str) -> bool:
        """Model thread: release what no stop string can still claim; False ends generation at a stop string."""
        self.fed += len(piece)
        out = self.scanner.feed(piece)
        if out and self.job.stream:
            self.loop.call_soon_threadsafe(self.peer.delta, out)
        return not self.scanner.stopped

    def finish(self, outcome: Any) -> None:
        """Hand the result (or the typed error) to the waiting HTTP request. Loop thread; nothing to prefill."""
        job, peer, metrics = self.job, self.peer, self.server.metrics
        if job.timer is not None:
            job.timer.cancel()
        try:
            error = outcome_error(outcome, job.request_id, job.timed_out, self.server.config.request_timeout_s)
            if error is None and outcome.finish_reason == "cancelled":  # a completion has no partial reply to send
                error = DaemonError(ErrorCode.CANCELLED, "the request was cancelled", job.request_id)
            if error is not None:
                raise error
        except DaemonError as exc:
            peer.send(error_frame(exc.code, exc.message, job.request_id))
            return None
        finally:
            peer.core.job_done(job)
        held = outcome.text[self.fed:]  # a word the rail held, waiting to see what it became, when the text ended
        if held and not self.scanner.stopped and (
                self.matcher is None or self.matcher.check(outcome.text, final=True) is None):
            released = self.scanner.feed(held)
            if released and job.stream:
                peer.delta(released)
        tail = "" if self.scanner.stopped else self.scanner.flush()
        if tail and job.stream:
            peer.delta(tail)
        for category, count in outcome.safety_blocks.items():
            metrics.safety_blocked.labels(category, "decode").inc(count)
        metrics.tokens.inc(outcome.completion_tokens)
        metrics.ttft.observe(outcome.ttft_s)
        metrics.latency.observe(time.monotonic() - job.enqueued_at)
        reason = "stop" if outcome.finish_reason == "stop" or self.scanner.stopped else "length"
        peer.complete(CompletionResult(self.scanner.text, reason, outcome.prompt_tokens, outcome.completion_tokens))
        return None
