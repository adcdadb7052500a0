"""The daemon's sans-I/O core: frames in, actions out. No sockets, no asyncio, no threads started.

``ConnectionCore.receive`` takes one raw WebSocket message and returns what should happen: frames to
send, a generation job to queue, a job to cancel. The server (server.py) carries those actions out.
Keeping the protocol here means every rule (auth, validation, routing, per-client caps, error codes)
is tested by calling plain methods, and the server stays a thin shell (the websockets library's own
design, applied one level up).
"""

from __future__ import annotations

import hmac
import itertools
import json
import logging
import math
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal, TypeAlias, assert_never

from pydantic import TypeAdapter, ValidationError
from zyke.experience import FEEDBACK_KIND, FORMAT_VERSION, MAX_FEEDBACK, REPLY_ID_PATTERN, label_problem
from zyke.experience import Limits as ExperienceLimits
from zyke.prompt_format import allowed_action_names, render_prompt, reply_schema
from zyke.protocol import (
    PROTOCOL_VERSION,
    AdapterInfo,
    Adapters,
    AnyClientFrame,
    ClientFrame,
    Error,
    ErrorCode,
    Feedback,
    GenerationOptions,
    ModelInfo,
    NpcDefine,
    NpcDefined,
    NpcReply,
    NpcReset,
    NpcSay,
    NpcSpec,
    NpcStateFrame,
    NpcStateGet,
    NpcStateSet,
    Ok,
    Ping,
    Pong,
    Reply,
    Safety,
    SafetyBlock,
    Timings,
    Turn,
    Usage,
    Welcome,
    dump_frame,
)
from zyke.protocol.models import AdapterList, AdapterLoad, AdapterUnload, Cancel, Hello, Limits
from zyke.protocol.validation import client_frame_types, clip, describe, first_error, quote, validator_for

from . import __version__
from .backends.base import DEFAULT_NO_REPEAT_NGRAM, DEFAULT_REPEAT_PENALTY, GenerationRequest, GenerationResult
from .config import BASE_ADAPTER, DaemonConfig
from .errors import DaemonError
from .reply_stream import ReplyAssembler
from .safety import Screen, deflection_note, rails_for, refusal_action, safe_prefix
from .scheduler import BACKGROUND, NORMAL, rank_of
from .sessions import SessionStore

log = logging.getLogger(__name__)

#: What this daemon supports beyond the v1 base; a client checks here before using an additive feature an
#: older v1 daemon would refuse as bad_frame (docs/PROTOCOL.md): "choices" (described actions and emotions),
#: "allowed_actions" (npc.say narrowing the actions of one line).
CAPABILITIES = ["stream", "constrained", "cancel", "npc.state", "adapters", "choices", "allowed_actions",
                "priority", "safety", "feedback"]
DEFAULT_MAX_TOKENS = 96
_CLIENT_FRAME: TypeAdapter[AnyClientFrame] = TypeAdapter(ClientFrame)

#: How deep a free-form object (``state``, a turn's ``state``, a reply's ``args``) may nest. Game state is a few
#: levels deep; a few hundred levels broke saving the session (pydantic's serializer has a recursion limit) and,
#: after a restart, loading it, so the daemon refuses it when it arrives instead.
MAX_FREEFORM_DEPTH = 32
#: How large one free-form object may be, as compact JSON: it is rendered into every prompt and saved with every
#: turn of the history (up to 200), so the frame cap alone would let one NPC's session grow to megabytes.
MAX_FREEFORM_BYTES = 16 * 1024
#: How deep a whole frame may nest: the deepest free-form field sits six levels down (npc.state.set's
#: state/history/turn/reply/args), so this leaves room for it and refuses anything deeper before validation,
#: which (like repr and pydantic) recurses.
MAX_FRAME_DEPTH = MAX_FREEFORM_DEPTH + 8
#: The longest message an error frame carries; the parts that quote the client are clipped shorter still.
MAX_ERROR_MESSAGE_CHARS = 1000
#: The only frames answered before hello: everything else is refused before any costly validation.
_BEFORE_HELLO = frozenset({"hello", "ping"})
#: How many recorded replies feedback can still name (oldest forgotten first): a game rates a reply seconds or
#: minutes after it, and each entry holds a reference to an NPC spec, so the index stays small.
MAX_RECORDED_REPLIES = 10_000
_REPLY_ID = re.compile(REPLY_ID_PATTERN)

if TYPE_CHECKING:
    from .completions import CompletionJob

#: what a connection has in flight: npc.say lines, and on the server's HTTP peers completions (``http_api``)
PendingJob: TypeAlias = "SayJob | CompletionJob"


# --- actions the server carries out ---------------------------------------------------------------


@dataclass
class Send:
    frame: dict[str, Any]


@dataclass
class Submit:
    job: PendingJob


@dataclass
class CancelJob:
    job: PendingJob


@dataclass
class AdapterOp:
    """Load or unload an adapter: work for the model thread, answered with an adapters frame."""

    request_id: str
    op: Literal["load", "unload"]
    name: str


@dataclass
class Close:
    """Close the connection because a documented cap was reached (after the frames already sent): ``code`` is the
    WebSocket close code, ``cap`` the config name of the cap (counted in /metrics)."""

    code: int
    reason: str
    cap: str


@dataclass
class RecordFeedback:
    """Append a feedback line to the experience file (the recorder, experience.py), then answer ``ok`` (or the
    recorder's typed error) to ``request_id``. ``key`` is the rated reply's (game, npc, reply_id)."""

    request_id: str
    key: tuple[str, str, str]
    line: bytes


Action = Send | Submit | CancelJob | AdapterOp | Close | RecordFeedback


@dataclass
class RecordedReply:
    """What checking feedback on a recorded reply needs: the NPC as it replied and the turn's allowed actions."""

    spec: NpcSpec
    allowed: list[str] | None
    ratings: int = 0


@dataclass
class SayJob:
    """One npc.say waiting for, or in, the model. The prompt is built when it runs, not when queued,
    so a second line queued for the same NPC sees the first one's reply in its history."""

    request_id: str
    conn: ConnectionCore
    frame: NpcSay
    enqueued_at: float
    adapter: str | None
    options: GenerationOptions
    #: the scheduler rank (scheduler.FOREGROUND / NORMAL / BACKGROUND) from npc.say or the NPC's defaults
    rank: int = NORMAL
    #: monotonic time after which the job, if still queued, is dropped with ``expired`` (None: never)
    deadline_at: float | None = None
    #: the rank it was scheduled at: ``rank``, or more urgent when a later line to the same NPC lifted it (the
    #: token cap still follows ``rank``)
    queued_rank: int | None = None
    cancel: threading.Event = field(default_factory=threading.Event)
    started_at: float | None = None
    #: what screening the player's line found (safety.Rails.screen_input), set once when the job first runs
    screen: Screen | None = None
    #: what the safety rails did to the reply (None: nothing), set by ``DaemonCore.finish``
    safety: Safety | None = None
    #: set when ``request_timeout_s`` ran out, counted from ``enqueued_at``: the wait in the queue counts, so a
    #: say stuck behind a long one gets ``timeout`` on time instead of waiting for the model without limit
    timed_out: bool = False
    #: the server's handle on that deadline (an asyncio TimerHandle), cancelled when the job ends
    timer: Any = field(default=None, repr=False, compare=False)
    #: the history turns the prompt showed (set by ``DaemonCore.prepare``), what an experience record holds
    prompt_history: list[Turn] | None = field(default=None, repr=False, compare=False)
    #: the experience record of the finished reply, ``(key, JSONL line)``, for the recorder to append (set by
    #: ``DaemonCore.finish`` when the daemon and the NPC both record)
    experience: tuple[tuple[str, str, str], bytes] | None = field(default=None, repr=False, compare=False)

    @property
    def npc_id(self) -> str:
        return self.frame.npc


# --- shared state ---------------------------------------------------------------------------------


class DaemonCore:
    """State shared by all connections: config, sessions, what the model is."""

    def __init__(self, config: DaemonConfig, sessions: SessionStore, token: str, model: ModelInfo,
                 backend_name: str, adapters: Callable[[], list[AdapterInfo]] = list,
                 default_adapter: str | None = None) -> None:
        self.config = config
        self.sessions = sessions
        if sessions.max_frame_bytes is None:  # every state npc.state.get hands out must fit npc.state.set
            sessions.max_frame_bytes = config.max_frame_bytes
        self.token = token
        self.model = model
        self.backend_name = backend_name
        self.adapters = adapters
        #: what an NPC that names no adapter speaks with (checked against the served model by the server)
        self.default_adapter = default_adapter
        #: the safety rails from the daemon's own configuration only (docs/SAFETY.md)
        self.rails = rails_for(config)
        #: seconds, for the per-connection rate limit (a test steps it by hand)
        self.clock: Callable[[], float] = time.monotonic
        self._conn_ids = itertools.count(1)
        #: recorded replies feedback may name, by (game, npc, reply_id), oldest first (``MAX_RECORDED_REPLIES``)
        self.recorded: OrderedDict[tuple[str, str, str], RecordedReply] = OrderedDict()
        #: the experience format's caps: a record line over ``max_line_bytes`` drops its oldest history turns
        self.experience_limits = ExperienceLimits()

    def connect(self) -> ConnectionCore:
        return ConnectionCore(self, next(self._conn_ids))

    # -- generation, split so the server can run the middle part on the model thread

    def prepare(self, job: SayJob, count_tokens: Callable[[str], int], n_ctx: int) -> GenerationRequest:
        """Build the model request: prompt from the session (oldest turns dropped to fit n_ctx)."""
        session = self.sessions.get(job.conn.game, job.npc_id)
        if session is None:
            raise DaemonError(ErrorCode.UNKNOWN_NPC, f"NPC {job.npc_id!r} was removed", job.request_id)
        opts = job.options
        max_tokens = token_cap(self.config, job.rank, opts.max_tokens or DEFAULT_MAX_TOKENS)
        history = list(session.history)
        budget = n_ctx - max_tokens - 8
        allowed = self.turn_actions(job, session.spec)
        note = deflection_note(session.spec.display_name) if self.screen(job, session.spec).tripped else None
        while True:
            prompt = render_prompt(session.spec, history, job.frame.input, job.frame.state, allowed, note)
            tokens = count_tokens(prompt)
            if tokens <= budget:
                break
            if not history:  # a typed error, not the backend's "exceeds the context" as internal
                raise DaemonError(ErrorCode.TOO_LONG,
                                  f"the prompt (persona, state and input) is {tokens} tokens; {max(budget, 0)} fit "
                                  f"(context {n_ctx} less max_tokens {max_tokens}): shorten the input or the state",
                                  job.request_id)
            history.pop(0)
        job.prompt_history = history
        return GenerationRequest(
            prompt=prompt,
            schema=reply_schema(session.spec, allowed_actions=allowed),
            max_tokens=max_tokens,
            temperature=opts.temperature if opts.temperature is not None else 0.0,
            top_p=opts.top_p if opts.top_p is not None else 1.0,
            top_k=opts.top_k or 0,
            seed=opts.seed,
            repeat_penalty=opts.repeat_penalty if opts.repeat_penalty is not None else DEFAULT_REPEAT_PENALTY,
            no_repeat_ngram=opts.no_repeat_ngram if opts.no_repeat_ngram is not None else DEFAULT_NO_REPEAT_NGRAM,
            # only the turns the prompt shows: a reply dropped to fit n_ctx is no longer there to copy
            history_says=[t.reply.say for t in history],
            adapter=job.adapter,
            cancel=job.cancel,
            safety=self.rails.matcher(session.spec.audience, session.spec.blocked_words or ()),
        )

    def assembler(self, job: SayJob) -> ReplyAssembler:
        """Follows the generation; a reply cut short falls back to an action this turn allows."""
        spec = self._spec(job)
        defaults = spec.defaults
        allowed = self.turn_actions(job, spec)
        return ReplyAssembler(
            spec.emotion_names, allowed_action_names(spec, allowed),
            defaults.emotion if defaults else None, defaults.action if defaults else None,
            job.options.stop,
        )

    def finish(self, job: SayJob, result: GenerationResult, assembler: ReplyAssembler) -> dict[str, Any]:
        """Validate the reply, record the turn, and build the reply frame (or raise a typed error)."""
        if result.finish_reason == "cancelled":
            raise DaemonError(ErrorCode.CANCELLED, "the request was cancelled", job.request_id)
        spec = self._spec(job)
        allowed = self.turn_actions(job, spec)
        data, complete = assembler.reply()
        decode_blocks = dict(result.safety_blocks)
        matcher = self.rails.matcher(spec.audience, spec.blocked_words or ())
        if matcher is not None and isinstance(data.get("say"), str):
            category = matcher.check(data["say"])
            if category is not None:  # the decoder could not keep it out (a grammar-forced end): cut it
                data["say"] = safe_prefix(matcher, data["say"])
                decode_blocks[category] = decode_blocks.get(category, 0) + 1
        problem = describe(validator_for(reply_schema(spec, allowed_actions=allowed)), data) \
            or first_error("npc_reply", data)
        if problem:
            raise DaemonError(ErrorCode.GENERATION_FAILED, f"model reply failed validation: {problem}",
                              job.request_id)
        reply = NpcReply.model_validate(data)
        turn = Turn(player=job.frame.input, state=job.frame.state, allowed_actions=allowed, reply=reply)
        self.sessions.record(job.conn.game, job.npc_id, turn)
        now = time.monotonic()
        started = job.started_at or now
        gen_s = max(result.total_s - result.ttft_s, 1e-9)
        finish = "stop" if complete or assembler.stopped_by_string else "length"
        frame = Reply(
            id=job.request_id, npc=job.npc_id, reply=reply, finish_reason=finish, adapter=job.adapter,
            usage=Usage(prompt_tokens=result.prompt_tokens, completion_tokens=result.completion_tokens,
                        cached_tokens=result.cached_tokens),
            timings=Timings(
                queue_ms=round((started - job.enqueued_at) * 1000, 3),
                ttft_ms=round(result.ttft_s * 1000, 3),
                total_ms=round((now - job.enqueued_at) * 1000, 3),
                tokens_per_s=round(max(result.completion_tokens - 1, 0) / gen_s, 2),
            ),
        )
        safety = self._safety(job, spec, decode_blocks)
        if safety is not None and job.frame.safety_report:  # opt-in: an older client never sees the field
            frame.safety = safety
        job.safety = safety  # counted in /metrics whether or not the client asked to see it
        if self.config.record_experience and spec.record:
            job.experience = self._experience(job, spec, allowed, reply)
        return dump_frame(frame)

    def _experience(self, job: SayJob, spec: NpcSpec, allowed: list[str] | None,
                    reply: NpcReply) -> tuple[tuple[str, str, str], bytes] | None:
        """The reply as one experience record line (docs/EXPERIENCE.md), and its key; None when the format cannot
        hold it (a request id outside its ReplyId pattern, an empty player line). Registers the reply so feedback
        can name it. Pure: the recorder (experience.py) appends the line off the event loop."""
        if not job.frame.input or not _REPLY_ID.match(job.request_id):
            log.debug("not recording reply %r: its id or input does not fit the experience format", job.request_id)
            return None
        history = [t.model_dump(mode="json", exclude_none=True) for t in job.prompt_history or ()]
        record = {"v": FORMAT_VERSION, "time": _utc_now(), "game": job.conn.game, "reply_id": job.request_id,
                  "npc": job.npc_id, "spec": spec.model_dump(mode="json", exclude_none=True), "history": history,
                  "state": job.frame.state, "allowed_actions": allowed, "input": job.frame.input,
                  "reply": reply.model_dump(mode="json", exclude_none=True), "adapter": job.adapter, "feedback": []}
        line = jsonl(record)
        cap = self.experience_limits.max_line_bytes
        while len(line) > cap and history:  # rare: a long history of large states; the oldest turns go first
            del history[: max(1, len(history) // 4)]
            line = jsonl(record)
        if len(line) > cap:
            log.warning("not recording reply %r: %d bytes, over the experience line cap", job.request_id, len(line))
            return None
        key = (job.conn.game, job.npc_id, job.request_id)
        self.recorded.pop(key, None)  # a reused request id: feedback now rates the newer reply, as the reader does
        self.recorded[key] = RecordedReply(spec, allowed)
        while len(self.recorded) > MAX_RECORDED_REPLIES:
            self.recorded.popitem(last=False)
        return key, line

    def screen(self, job: SayJob, spec: NpcSpec) -> Screen:
        """The player's line screened by the rails, once per job (the first step that needs it)."""
        if job.screen is None:
            job.screen = self.rails.screen_input(job.frame.input, spec.audience, spec.blocked_words or ())
        return job.screen

    def turn_actions(self, job: SayJob, spec: NpcSpec) -> list[str] | None:
        """The actions this turn allows: the game's narrowing (``allowed_actions``), and when the rails
        screened the player's line, only the NPC's refusal action (when it declares one)."""
        allowed = allowed_actions(spec, job.frame.allowed_actions, job.request_id)
        if self.screen(job, spec).tripped:
            refusal = refusal_action(spec.action_names, allowed, spec.refusal_action)
            if refusal is not None:
                return [refusal]
        return allowed

    def _safety(self, job: SayJob, spec: NpcSpec, decode_blocks: dict[str, int]) -> Safety | None:
        """The reply's safety field (None when no rail intervened), logged without the offending text."""
        blocks = [SafetyBlock(stage="input", category=c) for c in (job.screen.categories if job.screen else ())]
        blocks += [SafetyBlock(stage="decode", category=c, count=n) for c, n in decode_blocks.items()]
        if not blocks:
            return None
        audience = self.rails.effective(spec.audience)
        log.info("safety: request %s npc %s audience %s: %s", job.request_id, job.npc_id, audience,
                 ", ".join(f"{b.stage}/{b.category}" + (f"x{b.count}" if b.count else "") for b in blocks))
        return Safety(intervened=True, audience=audience, blocks=blocks)

    def _spec(self, job: SayJob) -> NpcSpec:
        session = self.sessions.get(job.conn.game, job.npc_id)
        if session is None:
            raise DaemonError(ErrorCode.UNKNOWN_NPC, f"NPC {job.npc_id!r} was removed", job.request_id)
        return session.spec


# --- one connection -------------------------------------------------------------------------------


class ConnectionCore:
    def __init__(self, daemon: DaemonCore, conn_id: int) -> None:
        self.daemon = daemon
        self.conn_id = conn_id
        self.authenticated = False
        self.game = "default"
        self.pending: dict[str, PendingJob] = {}
        self.auth_failures = 0
        # a token bucket: rate_limit_burst frames at once, rate_limit_per_s sustained
        self._allowance = float(daemon.config.rate_limit_burst)
        self._last_frame = daemon.clock()

    def receive(self, data: str | bytes) -> list[Action]:
        """Handle one WebSocket message. Never raises for bad input: errors become error frames."""
        request_id: str | None = None
        try:
            raw = self._decode(data)
            request_id = _request_id(raw)
            if not self._within_rate():  # parsed only far enough to name the refused request
                cfg = self.daemon.config
                raise DaemonError(ErrorCode.RATE_LIMITED,
                                  f"over {cfg.rate_limit_per_s:g} frames/s on this connection (bursts of "
                                  f"{cfg.rate_limit_burst}); this frame was not handled, send it again later",
                                  request_id)
            problem = _scan(raw)
            if problem:
                raise DaemonError(ErrorCode.BAD_FRAME, problem, request_id)
            frame = self._validate(raw, request_id)
            return self._route(frame)
        except DaemonError as exc:
            return [Send(error_frame(exc.code, exc.message, exc.request_id or request_id))]
        except Exception:  # a bug, not the client's fault: answer it and keep the connection (not a 1011)
            log.exception("connection %s: unexpected error on a frame", self.conn_id)
            return [Send(error_frame(ErrorCode.INTERNAL, "internal error; see the daemon log", request_id))]

    def job_done(self, job: PendingJob) -> None:
        self.pending.pop(job.request_id, None)

    def _within_rate(self) -> bool:
        """Take one frame from the connection's allowance (refilled at ``rate_limit_per_s``; 0 turns it off)."""
        cfg = self.daemon.config
        if cfg.rate_limit_per_s <= 0:
            return True
        now = self.daemon.clock()
        self._allowance = min(float(cfg.rate_limit_burst),
                              self._allowance + (now - self._last_frame) * cfg.rate_limit_per_s)
        self._last_frame = now
        if self._allowance < 1:
            return False
        self._allowance -= 1
        return True

    def close(self) -> list[PendingJob]:
        """The socket is gone: every job of this connection must be cancelled."""
        jobs = list(self.pending.values())
        for job in jobs:
            job.cancel.set()
        self.pending.clear()
        return jobs

    # -- parsing

    def _decode(self, data: str | bytes) -> Any:
        limit = self.daemon.config.max_frame_bytes
        size = len(data.encode("utf-8") if isinstance(data, str) else data)
        if size > limit:
            raise DaemonError(ErrorCode.FRAME_TOO_LARGE, f"frame is {size} bytes; the limit is {limit}")
        try:
            raw = json.loads(data, parse_constant=_refuse_constant, parse_float=_finite_float)
        except _NonFinite as exc:
            raise DaemonError(ErrorCode.BAD_FRAME, str(exc)) from None
        except RecursionError:
            raise DaemonError(ErrorCode.BAD_FRAME, f"frame nests deeper than {MAX_FRAME_DEPTH} levels") from None
        except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, an integer of over 4,300 digits
            raise DaemonError(ErrorCode.BAD_JSON, f"frame is not JSON: {clip(str(exc))}") from None
        return raw

    def _validate(self, raw: Any, request_id: str | None) -> AnyClientFrame:
        if not isinstance(raw, dict):
            raise DaemonError(ErrorCode.BAD_FRAME, "a frame must be a JSON object")
        if raw.get("v") != PROTOCOL_VERSION:
            raise DaemonError(ErrorCode.UNSUPPORTED_VERSION,
                              f"frame version {quote(raw.get('v'))} is not supported; "
                              f"this daemon speaks v{PROTOCOL_VERSION}",
                              request_id)
        kind = raw.get("type")
        if kind not in client_frame_types():
            raise DaemonError(ErrorCode.UNKNOWN_TYPE,
                              f"unknown frame type {quote(kind)}; expected one of {', '.join(client_frame_types())}",
                              request_id)
        if not self.authenticated and kind not in _BEFORE_HELLO:
            # before the schema: validating a large frame costs time a stranger must not be able to spend
            raise DaemonError(ErrorCode.NOT_AUTHENTICATED, "send hello with the daemon's token first", request_id)
        problem = _freeform_problem(kind, raw)
        if problem:
            raise DaemonError(ErrorCode.BAD_FRAME, f"invalid {kind} frame: {problem}", request_id)
        problem = first_error(f"frames/{kind}", raw)
        if problem:
            raise DaemonError(ErrorCode.BAD_FRAME, f"invalid {kind} frame: {problem}", request_id)
        try:
            return _CLIENT_FRAME.validate_python(raw)
        except ValidationError as exc:
            rule = _rule_broken(exc, kind)
            if rule is not None:
                raise DaemonError(ErrorCode.BAD_FRAME, f"invalid {kind} frame: {rule}", request_id) from None
            # the schemas passed it and no model rule refused it, so this is model/schema drift
            raise DaemonError(ErrorCode.INTERNAL, f"frame passed the schema but not the model: {clip(str(exc))}",
                              request_id) from None

    # -- routing

    def _route(self, frame: AnyClientFrame) -> list[Action]:
        if isinstance(frame, Ping):
            return [Send(dump_frame(Pong(id=frame.id)))]
        if isinstance(frame, Hello):
            return self._hello(frame)
        if not self.authenticated:
            raise DaemonError(ErrorCode.NOT_AUTHENTICATED, "send hello with the daemon's token first",
                              getattr(frame, "id", None))
        sessions = self.daemon.sessions
        match frame:
            case NpcDefine():
                self._check_spec(frame.npc, frame.id)
                session = sessions.define(self.game, frame.npc)
                return [Send(dump_frame(NpcDefined(id=frame.id, npc=frame.npc.id,
                                                   history_turns=len(session.history))))]
            case NpcSay():
                return self._say(frame)
            case Feedback():
                return self._feedback(frame)
            case Cancel():
                job = self.pending.get(frame.target)
                if job is None:
                    raise DaemonError(ErrorCode.UNKNOWN_REQUEST,
                                      f"no queued or running request {frame.target!r} on this connection", frame.id)
                job.cancel.set()
                return [CancelJob(job), Send(dump_frame(Ok(id=frame.id)))]
            case NpcReset():
                if sessions.reset(self.game, frame.npc) is None:
                    raise _unknown_npc(frame.npc, frame.id)
                return [Send(dump_frame(Ok(id=frame.id)))]
            case NpcStateGet():
                found = sessions.get(self.game, frame.npc)
                if found is None:
                    raise _unknown_npc(frame.npc, frame.id)
                return [Send(dump_frame(NpcStateFrame(id=frame.id, state=found.state())))]
            case NpcStateSet():
                self._check_spec(frame.state.npc, frame.id)
                session = sessions.restore(self.game, frame.state)
                return [Send(dump_frame(NpcStateFrame(id=frame.id, state=session.state())))]
            case AdapterLoad() | AdapterUnload():
                if frame.name not in {a.name for a in self.daemon.adapters()}:
                    raise DaemonError(ErrorCode.UNKNOWN_ADAPTER, f"no adapter named {frame.name!r} is registered",
                                      frame.id)
                return [AdapterOp(frame.id, "load" if isinstance(frame, AdapterLoad) else "unload", frame.name)]
            case AdapterList():
                return [Send(dump_frame(Adapters(id=frame.id, adapters=self.daemon.adapters())))]
            case _:  # every client frame has its case: a new frame type fails the type check until it has one
                assert_never(frame)

    def _hello(self, frame: Hello) -> list[Action]:
        if not hmac.compare_digest(frame.token.encode(), self.daemon.token.encode()):
            self.auth_failures += 1
            limit = self.daemon.config.max_auth_failures
            wrong = DaemonError(ErrorCode.UNAUTHORIZED,
                                "wrong token; clients read it from the daemon's token file or ZYKE_TOKEN", frame.id)
            if 0 < limit <= self.auth_failures:  # guessing costs a new connection (and its hello timeout) per try
                return [Send(error_frame(wrong.code, f"{wrong.message}; closing after {self.auth_failures} wrong "
                                                      "tokens", frame.id)),
                        Close(1008, f"max_auth_failures: {self.auth_failures} wrong tokens", "max_auth_failures")]
            raise wrong
        if frame.protocol != PROTOCOL_VERSION:
            raise DaemonError(ErrorCode.UNSUPPORTED_VERSION,
                              f"client speaks protocol {frame.protocol}; this daemon speaks {PROTOCOL_VERSION}",
                              frame.id)
        self.authenticated = True
        self.game = frame.game or "default"
        cfg = self.daemon.config
        return [Send(dump_frame(Welcome(
            id=frame.id, protocol=PROTOCOL_VERSION, daemon_version=__version__, model=self.daemon.model,
            backend=self.daemon.backend_name, capabilities=CAPABILITIES,
            limits=Limits(max_frame_bytes=cfg.max_frame_bytes, max_queued_per_client=cfg.max_queued_per_client,
                          request_timeout_s=cfg.request_timeout_s),
        )))]

    def _say(self, frame: NpcSay) -> list[Action]:
        session = self.daemon.sessions.get(self.game, frame.npc)
        if session is None:
            raise _unknown_npc(frame.npc, frame.id)
        if frame.id in self.pending:
            raise DaemonError(ErrorCode.DUPLICATE_ID, f"request {frame.id!r} is already in flight", frame.id)
        if len(self.pending) >= self.daemon.config.max_queued_per_client:
            raise DaemonError(ErrorCode.QUEUE_FULL,
                              f"{len(self.pending)} requests already in flight on this connection "
                              f"(limit {self.daemon.config.max_queued_per_client}); wait for a reply", frame.id)
        allowed_actions(session.spec, frame.allowed_actions, frame.id)
        adapter = frame.adapter if frame.adapter is not None else session.spec.adapter
        if adapter is None:
            adapter = self.daemon.default_adapter
        elif adapter == BASE_ADAPTER:
            adapter = None
        known = {a.name for a in self.daemon.adapters()}
        if adapter is not None and adapter not in known:
            raise DaemonError(ErrorCode.UNKNOWN_ADAPTER, f"no adapter named {adapter!r} is registered", frame.id)
        defaults = session.spec.defaults.options if session.spec.defaults and session.spec.defaults.options else None
        options = _merge_options(defaults, frame.options)
        spec_defaults = session.spec.defaults
        rank = rank_of(frame.priority or (spec_defaults.priority if spec_defaults else None))
        now = time.monotonic()
        deadline_ms = frame.deadline_ms
        if deadline_ms is None and rank == BACKGROUND:
            deadline_ms = self.daemon.config.background_deadline_ms
        job = SayJob(request_id=frame.id, conn=self, frame=frame, enqueued_at=now, adapter=adapter,
                     options=options, rank=rank,
                     deadline_at=now + deadline_ms / 1000 if deadline_ms is not None else None)
        self.pending[frame.id] = job
        return [Submit(job)]

    def _feedback(self, frame: Feedback) -> list[Action]:
        """A rating of a recorded reply: checked here against the NPC as it replied (the same rules the
        experience reader applies, so an accepted rating never makes its record unreadable), written by the
        recorder, answered ``ok`` once it is on disk."""
        daemon = self.daemon
        if not daemon.config.record_experience:
            raise DaemonError(ErrorCode.NOT_RECORDING, "this daemon does not record experience; start it with "
                              "--record-experience (docs/EXPERIENCE.md)", frame.id)
        key = (self.game, frame.npc, frame.reply_id)
        entry = daemon.recorded.get(key)
        if entry is None:
            session = daemon.sessions.get(self.game, frame.npc)
            if session is None:
                raise _unknown_npc(frame.npc, frame.id)
            if not session.spec.record:
                raise DaemonError(ErrorCode.NOT_RECORDING, f"NPC {frame.npc!r} does not record experience; define "
                                  "it with record: true", frame.id)
            raise DaemonError(ErrorCode.UNKNOWN_REPLY,
                              f"no recorded reply {clip(frame.reply_id, 64)!r} of NPC {frame.npc!r}: feedback names "
                              f"the npc.say id of a reply recorded since the daemon started (the last "
                              f"{MAX_RECORDED_REPLIES})", frame.id)
        problem = label_problem(entry.spec, entry.allowed, frame.label)
        if problem:
            raise DaemonError(ErrorCode.BAD_LABEL, f"NPC {frame.npc!r}: {problem}", frame.id)
        if entry.ratings >= MAX_FEEDBACK:
            raise DaemonError(ErrorCode.EXPERIENCE_FULL, f"reply {frame.reply_id!r} already has {MAX_FEEDBACK} "
                              "ratings, the most one record holds", frame.id)
        entry.ratings += 1
        rating: dict[str, Any] = {"time": _utc_now(), "reward": frame.reward, "source": frame.source or "game"}
        if frame.label is not None:
            rating["label"] = frame.label.model_dump(exclude_none=True)
        if frame.note is not None:
            rating["note"] = frame.note
        line = {"v": FORMAT_VERSION, "kind": FEEDBACK_KIND, "game": self.game, "npc": frame.npc,
                "reply_id": frame.reply_id, "feedback": rating}
        return [RecordFeedback(frame.id, key, jsonl(line))]

    def _check_spec(self, spec: NpcSpec, request_id: str) -> None:
        defaults = spec.defaults
        if defaults and defaults.emotion and defaults.emotion not in spec.emotion_names:
            raise DaemonError(ErrorCode.BAD_FRAME, f"default emotion {defaults.emotion!r} is not in emotions",
                              request_id)
        if defaults and defaults.action and defaults.action not in spec.action_names:
            raise DaemonError(ErrorCode.BAD_FRAME, f"default action {defaults.action!r} is not in actions",
                              request_id)
        if spec.refusal_action and spec.refusal_action not in spec.action_names:
            raise DaemonError(ErrorCode.BAD_FRAME, f"refusal_action {spec.refusal_action!r} is not in actions",
                              request_id)


def token_cap(config: DaemonConfig, rank: int, max_tokens: int) -> int:
    """``max_tokens`` under the daemon's per-priority cap (``background_max_tokens``, ``normal_max_tokens``):
    a game asks background NPCs for short barks, and a misconfigured one still cannot make them long."""
    cap = {BACKGROUND: config.background_max_tokens, NORMAL: config.normal_max_tokens}.get(rank)
    return min(max_tokens, cap) if cap else max_tokens


def jsonl(value: dict[str, Any]) -> bytes:
    """One experience file line: compact UTF-8 JSON and its newline, appended by the recorder in one write."""
    return (json.dumps(value, ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8")


def _utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def error_frame(code: ErrorCode, message: str, request_id: str | None) -> dict[str, Any]:
    """An error frame; the message is capped so an error never costs more to send than a line of text."""
    return dump_frame(Error(id=request_id, code=code, message=clip(message, MAX_ERROR_MESSAGE_CHARS)))


def outcome_error(outcome: Any, request_id: str, timed_out: bool, timeout_s: float) -> DaemonError | None:
    """The typed error a generation's ``outcome`` ends in, or None when it is a result to serve. Shared by NPC lines
    (``worker.JobRun``) and HTTP completions (``completions.CompletionRun``): a typed error passes through, any other
    exception is logged and becomes ``internal``, and a reply cancelled by its timer is ``timeout`` (one that ended
    just in time is served)."""
    if isinstance(outcome, DaemonError):
        return outcome
    if isinstance(outcome, BaseException):
        log.error("request %s failed", request_id, exc_info=outcome)
        return DaemonError(ErrorCode.INTERNAL, "internal error; see the daemon log", request_id)
    if timed_out and outcome.finish_reason == "cancelled":
        return DaemonError(ErrorCode.TIMEOUT, f"no reply within {timeout_s:g} s", request_id)
    return None


class _NonFinite(ValueError):
    """NaN or an infinity in a frame: not JSON (RFC 8259), though Python's parser takes them."""


def _refuse_constant(name: str) -> float:
    raise _NonFinite(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e400 parses as inf
        raise _NonFinite(f"number {clip(text, 40)} is out of range")
    return value


def _scan(raw: Any) -> str | None:
    """What makes a parsed frame unsafe to go on with, or None: nesting deeper than MAX_FRAME_DEPTH, or a string
    with a lone UTF-16 surrogate (JSON's ``\\ud800`` escape), which cannot be encoded to send any answer back.

    Iterative, so it never depends on the recursion limit that the frame is being checked against."""
    stack: list[tuple[Any, int]] = [(raw, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, dict):
            if depth > MAX_FRAME_DEPTH:
                return f"frame nests deeper than {MAX_FRAME_DEPTH} levels"
            for key, item in value.items():
                if not _encodable(key):
                    return "frame has a key with a lone UTF-16 surrogate; text must be valid Unicode"
                stack.append((item, depth + 1))
        elif isinstance(value, list):
            if depth > MAX_FRAME_DEPTH:
                return f"frame nests deeper than {MAX_FRAME_DEPTH} levels"
            stack.extend((item, depth + 1) for item in value)
        elif isinstance(value, str) and not _encodable(value):
            return "frame has a string with a lone UTF-16 surrogate; text must be valid Unicode"
    return None


def _encodable(text: str) -> bool:
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _depth(value: Any) -> int:
    """How many levels of objects and arrays ``value`` nests (0 for a scalar); iterative."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)
        else:
            deepest = max(deepest, depth)
            continue
        deepest = max(deepest, depth + 1)
    return deepest


def _freeform_problem(kind: str, raw: dict[str, Any]) -> str | None:
    """The first free-form field of a client frame that nests or weighs too much, as a message, or None.

    JSON Schema only says these are objects; their depth and size are checked here, before the schema and the
    models walk them (the frame's overall depth is already bounded by ``_scan``)."""
    fields: list[tuple[str, Any]] = []
    if kind == "npc.say":
        fields.append(("state", raw.get("state")))
    elif kind == "npc.state.set":
        state = raw.get("state")
        history = state.get("history") if isinstance(state, dict) else None
        for i, turn in enumerate(history if isinstance(history, list) else []):
            if isinstance(turn, dict):
                reply = turn.get("reply")
                fields.append((f"state/history/{i}/state", turn.get("state")))
                fields.append((f"state/history/{i}/reply/args", reply.get("args") if isinstance(reply, dict) else None))
    for where, value in fields:
        if value is None:
            continue
        if _depth(value) > MAX_FREEFORM_DEPTH:
            return f"{where}: nests deeper than {MAX_FREEFORM_DEPTH} levels"
        size = len(json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode("utf-8"))
        if size > MAX_FREEFORM_BYTES:
            return f"{where}: {size} bytes as JSON; the limit is {MAX_FREEFORM_BYTES}"
    return None


def allowed_actions(spec: NpcSpec, requested: list[str] | None, request_id: str | None) -> list[str] | None:
    """The actions one npc.say allows (None: every declared one), refusing labels the NPC never declared.

    An undeclared label is the game's bug, not the model's, so it gets its own code (unknown_action)
    naming the bad labels and the declared ones, instead of a narrowed enum the model cannot satisfy.
    Checked when the say arrives and again when it runs: an npc.define in between may drop actions.
    """
    if requested is None:
        return None
    declared = spec.action_names
    unknown = [a for a in requested if a not in declared]
    if unknown:
        raise DaemonError(ErrorCode.UNKNOWN_ACTION,
                          f"allowed_actions names actions NPC {spec.id!r} did not declare: {', '.join(unknown)} "
                          f"(declared: {', '.join(declared)})", request_id)
    return list(requested)


def _unknown_npc(npc: str, request_id: str) -> DaemonError:
    return DaemonError(ErrorCode.UNKNOWN_NPC, f"no NPC named {npc!r} is defined; send npc.define first", request_id)


def _rule_broken(exc: ValidationError, kind: str) -> str | None:
    """The client's mistake a model validator caught, or None when the failure is schema drift.

    A few rules cannot be written in JSON Schema (action and emotion names unique across bare labels
    and described ones); the models check them with validators that raise ValueError, which pydantic
    reports as ``value_error``. Those are bad frames, not internal errors.
    """
    errors = exc.errors()
    if not errors or any(e["type"] != "value_error" for e in errors):
        return None
    err = errors[0]
    loc = [str(p) for p in err["loc"]]
    where = "/".join(loc[1:] if loc and loc[0] == kind else loc) or "(frame)"
    return f"{where}: {str(err['msg']).removeprefix('Value error, ')}"


def _request_id(raw: Any) -> str | None:
    rid = raw.get("id") if isinstance(raw, dict) else None
    # an id with a lone surrogate could not be sent back, so the error for it carries none
    return rid if isinstance(rid, str) and 0 < len(rid) <= 64 and _encodable(rid) else None


def _merge_options(base: GenerationOptions | None, override: GenerationOptions | None) -> GenerationOptions:
    merged = (base.model_dump(exclude_none=True) if base else {}) | (
        override.model_dump(exclude_none=True) if override else {})
    return GenerationOptions.model_validate(merged)

