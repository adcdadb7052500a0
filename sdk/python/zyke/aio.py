"""The asyncio client: ``AsyncClient`` and its NPC and stream handles, what game code calls.

One WebSocket to the daemon carries every request, many multiplexed on it by id; that machinery (the
socket, its reader task, the hello handshake, reconnecting, each request's lifecycle) is connection.py's.
The synchronous ``zyke.Client`` runs this same code on a background thread.

Reconnecting is lazy: when the socket drops, requests in flight fail with ``ConnectionLost`` (a say is
never retried behind the game's back, since the daemon may have recorded the turn), and the next call
reconnects and re-defines every NPC this client defined, whose history the daemon kept.

One request lifecycle. ``AsyncNpc``, ``AsyncReplyStream`` (and, through them, the synchronous
``Client``) never touch an ``AsyncClient``'s private members: a handle receives the client's
``_Requests``, a small object the client owns and whose un-underscored methods are the whole
internal interface between them (ids, the NPCs defined, ``request``, ``say``, ``stream``). The
client keeps the connection (its ``_Connector``); ``_Requests`` keeps what each request needs, and
each request's register -> send -> await -> cleanup is written once, in connection.py. A separate
object rather than un-underscored methods on ``AsyncClient``: game code sees the client's surface,
and this interface is not part of it. The sync client only schedules these coroutines on its loop
thread (client.py).
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable, Mapping, Sequence
from types import TracebackType
from typing import Any, Self, Unpack

from .choices import ChoicesLike, build_choices

# The ``X as X`` names were defined here before connection.py held them: still importable from zyke.aio (tests
# import _Conn and _route from here).
from .connection import _NOT_SENT_MESSAGE as _NOT_SENT_MESSAGE
from .connection import MAX_FRAME_BYTES, _Connector, _Requests
from .connection import F as F
from .connection import _Call as _Call
from .connection import _Conn as _Conn
from .connection import _deadline as _deadline
from .connection import _expect as _expect
from .connection import _Item as _Item
from .connection import _next as _next
from .connection import _NotSent as _NotSent
from .connection import _Request as _Request
from .connection import _route as _route
from .connection import _timeout_error as _timeout_error
from .connection import _unknown_code_error as _unknown_code_error
from .connection import log as log
from .errors import ZykeError
from .protocol import (
    AdapterInfo,
    AdapterList,
    AdapterLoad,
    Adapters,
    AdapterUnload,
    Feedback,
    FeedbackLabel,
    NpcDefaults,
    NpcDefine,
    NpcDefined,
    NpcReset,
    NpcSay,
    NpcSpec,
    NpcState,
    NpcStateFrame,
    NpcStateGet,
    NpcStateSet,
    Ok,
    Ping,
    Pong,
    ReplyDelta,
    Welcome,
)
from .protocol.models import Audience, Priority
from .response import LabelLike, NpcResponse, OptionsLike, Source, build_options
from .say_options import DEFAULT, SayOptions, Timeout, say_frame

__all__ = [
    "DEFAULT_CONNECT_TIMEOUT",
    "DEFAULT_RECONNECT_WINDOW",
    "DEFAULT_TIMEOUT",
    "MAX_FRAME_BYTES",
    "AsyncClient",
    "AsyncNpc",
    "AsyncReplyStream",
]

DEFAULT_TIMEOUT = 60.0
DEFAULT_CONNECT_TIMEOUT = 30.0
DEFAULT_RECONNECT_WINDOW = 10.0


class AsyncClient:
    """Talk to the local Zyke daemon from asyncio code.

    With no arguments it finds the daemon by itself: ``ZYKE_URL`` or the daemon's runtime file for the
    address, ``ZYKE_TOKEN`` or the token file for the token (both re-read on every reconnect, so a
    daemon restarted on another port is found again). ``url``/``token`` override that.

    ``timeout`` is the default number of seconds a request may take once sent (``None``: wait as long
    as the daemon does); every call can override it. ``connect_timeout`` bounds opening the socket and
    the hello handshake (which waits while the daemon loads its model). ``reconnect_window`` is how
    long a call keeps retrying, with backoff, to reach a daemon it was connected to before.
    ``game`` namespaces NPC ids and saved sessions on the daemon. ``autostart=True`` starts a local
    daemon when none answers and stops it on close.

    Use it as ``async with AsyncClient() as client:`` or call ``aclose()``. An instance belongs to the
    event loop that first uses it.
    """

    def __init__(self, url: str | None = None, token: str | None = None, *, game: str | None = None,
                 timeout: float | None = DEFAULT_TIMEOUT, connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
                 reconnect_window: float = DEFAULT_RECONNECT_WINDOW, autostart: bool = False,
                 autostart_timeout: float = 180.0, client_name: str = "zyke-python") -> None:
        self.game = game
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.reconnect_window = reconnect_window
        self.autostart = autostart
        self.autostart_timeout = autostart_timeout
        self.client_name = client_name
        self._connector = _Connector(self, url, token, _rater_for)
        self._requests = self._connector.requests

    # -- public surface

    @property
    def url(self) -> str:
        """The daemon's address this client uses now (explicit, autostarted, or discovered)."""
        return self._connector.url

    @property
    def daemon_info(self) -> Welcome | None:
        """The daemon's ``welcome`` (version, model, limits) of the current connection, if connected."""
        conn = self._connector.conn
        return conn.welcome if conn is not None and conn.alive else None

    @property
    def connected(self) -> bool:
        conn = self._connector.conn
        return conn is not None and conn.alive

    @property
    def closed(self) -> bool:
        return self._connector.closed

    async def connect(self) -> Welcome:
        """Connect now (calls connect lazily anyway); returns the daemon's welcome."""
        return (await self._connector.connect()).welcome

    async def npc(self, npc_id: str, persona: str, actions: ChoicesLike = ("none",),
                  emotions: ChoicesLike = ("neutral",), *, name: str | None = None,
                  adapter: str | None = None, max_history: int | None = None,
                  default_emotion: str | None = None, default_action: str | None = None,
                  options: OptionsLike = None, priority: Priority | None = None,
                  audience: Audience | None = None, refusal_action: str | None = None,
                  blocked_words: Sequence[str] | None = None, record: bool | None = None) -> AsyncNpc:
        """Define (or update) an NPC on the daemon and return a handle to talk to it.

        An NPC that already exists keeps its conversation history, so a game can define its NPCs on
        every start. ``actions``/``emotions`` are the only labels replies may use: a list of names, a
        list mixing names and ``Choice``/``{"name", "description"}`` dicts, or a dict of name to
        description (``{"trade": "buy or sell goods"}``, order kept). The model reads descriptions, so
        labels it never saw in training (``ferry_across``) still get used when they fit. ``adapter`` is
        the NPC's default LoRA adapter and ``options`` its default generation options;
        ``default_emotion`` / ``default_action`` are what the daemon falls back to when the model is cut off.
        ``priority`` (``"foreground"``, ``"normal"``, ``"background"``) is how soon the daemon serves this
        NPC's lines when a call names none (docs/SCHEDULING.md; needs the daemon's ``priority`` capability).
        ``audience`` (``"minor"``, ``"teen"``, ``"adult"``) narrows the daemon's safety audience for this NPC (it
        can never loosen it), ``refusal_action`` is the declared action a deflected reply takes, and
        ``blocked_words`` are extra words it never says (docs/SAFETY.md). ``record=True`` opts the NPC in to
        experience recording (its replies and the feedback on them are kept on this machine when the daemon
        records too, ``zyke-daemon start --record-experience``; docs/EXPERIENCE.md).
        """
        defaults = None
        opts = build_options(options)
        if default_emotion is not None or default_action is not None or opts is not None or priority is not None:
            defaults = NpcDefaults(emotion=default_emotion, action=default_action, options=opts, priority=priority)
        spec = NpcSpec(id=npc_id, name=name, persona=persona, actions=build_choices(actions, "actions"),
                       emotions=build_choices(emotions, "emotions"), defaults=defaults, adapter=adapter,
                       max_history=max_history, audience=audience, refusal_action=refusal_action,
                       blocked_words=list(blocked_words) if blocked_words is not None else None,
                       record=record)
        return await self.define(spec)

    async def define(self, spec: NpcSpec) -> AsyncNpc:
        """Define an NPC from a ready ``NpcSpec`` (see ``npc`` for the keyword form)."""
        requests = self._requests
        await requests.request(NpcDefine(id=requests.new_id("d"), npc=spec), NpcDefined)
        requests.npcs[spec.id] = spec
        return AsyncNpc(requests, spec.id)

    async def get_npc(self, npc_id: str) -> AsyncNpc:
        """A handle to an NPC the daemon already knows (from an earlier run), without redefining it.

        Raises ``UnknownNpc`` when the daemon has no NPC of that id in this game.
        """
        requests = self._requests
        frame = await requests.request(NpcStateGet(id=requests.new_id("g"), npc=npc_id), NpcStateFrame)
        requests.npcs[npc_id] = frame.state.npc
        return AsyncNpc(requests, npc_id)

    async def adapters(self) -> list[AdapterInfo]:
        """The LoRA adapters the daemon can serve (names to pass as ``adapter=``)."""
        return (await self._requests.request(AdapterList(id=self._requests.new_id("a")), Adapters)).adapters

    async def load_adapter(self, name: str) -> list[AdapterInfo]:
        """Load a registered adapter now rather than on its first line (avoids that line's load delay)."""
        return (await self._requests.request(AdapterLoad(id=self._requests.new_id("a"), name=name), Adapters)).adapters

    async def unload_adapter(self, name: str) -> list[AdapterInfo]:
        """Free a loaded adapter; a later line that names it loads it again."""
        frame = AdapterUnload(id=self._requests.new_id("a"), name=name)
        return (await self._requests.request(frame, Adapters)).adapters

    async def ping(self, timeout: Timeout = DEFAULT) -> None:
        """One round trip to the daemon; raises if it does not answer."""
        await self._requests.request(Ping(id=self._requests.new_id("p")), Pong, timeout=timeout)

    async def aclose(self) -> None:
        """Close the connection (requests in flight fail with ConnectionLost); stop an autostarted daemon."""
        await self._connector.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.aclose()


def _rater_for(requests: _Requests, npc_id: str) -> Callable[..., Awaitable[None]]:
    """What a reply's ``rate`` calls: its NPC's ``AsyncNpc.feedback`` (connection.py knows no handles)."""
    return AsyncNpc(requests, npc_id).feedback


class AsyncNpc:
    """A handle to one NPC defined through an ``AsyncClient``. Cheap; make as many as you like."""

    def __init__(self, requests: _Requests, npc_id: str) -> None:
        self._requests = requests
        self.id = npc_id

    @property
    def spec(self) -> NpcSpec:
        """The NPC's current definition (updated by ``load``)."""
        return self._requests.npcs[self.id]

    @property
    def name(self) -> str:
        return self.spec.display_name

    @property
    def actions(self) -> list[str]:
        """The declared actions' names (descriptions, if any, are in ``spec.actions``)."""
        return self.spec.action_names

    @property
    def emotions(self) -> list[str]:
        """The declared emotions' names."""
        return self.spec.emotion_names

    def __repr__(self) -> str:
        return f"AsyncNpc({self.id!r})"

    async def say(self, text: str, **kwargs: Unpack[SayOptions]) -> NpcResponse:
        """Say a line to the NPC and wait for its whole reply.

        The keywords (``state``, generation options, ``adapter``, ``timeout``, ``allowed_actions``,
        ``priority``, ``deadline_ms``...) are ``zyke.say_options.SayOptions``'s, documented there; an
        unknown one is a ``TypeError``. When ``timeout`` expires the request is cancelled on the daemon
        and ``ZykeTimeout`` raised; cancelling the awaiting task cancels it on the daemon too.
        """
        frame = say_frame(self.id, self._requests.new_id("s"), text, False, kwargs, "AsyncNpc.say")
        return await self._requests.say(frame, kwargs.get("timeout", DEFAULT))

    def stream(self, text: str, **kwargs: Unpack[SayOptions]) -> AsyncReplyStream:
        """Say a line and get the reply as it is generated: ``async for piece in npc.stream(...)``.

        Each item is the next piece of the spoken line (a ``str``); they concatenate to the final
        ``stream.response.say``. The request is sent on the first iteration. Leaving the loop early
        and closing the stream (``async with`` does it) cancels the request on the daemon. The
        keywords are ``say``'s (``zyke.say_options.SayOptions``).
        """
        frame = say_frame(self.id, self._requests.new_id("s"), text, True, kwargs, "AsyncNpc.stream")
        return AsyncReplyStream(self._requests, frame, kwargs.get("timeout", DEFAULT))

    async def save(self) -> dict[str, Any]:
        """The NPC's full state (definition and history) as a JSON-ready dict for a game's save file."""
        request = NpcStateGet(id=self._requests.new_id("g"), npc=self.id)
        frame = await self._requests.request(request, NpcStateFrame)
        return frame.state.model_dump(mode="json", exclude_none=True)

    async def load(self, state: NpcState | Mapping[str, Any]) -> None:
        """Restore a state from ``save()``: its history and definition replace the current ones."""
        parsed = state if isinstance(state, NpcState) else NpcState.model_validate(state)
        if parsed.npc.id != self.id:
            raise ValueError(f"this state belongs to NPC {parsed.npc.id!r}, not {self.id!r}")
        request = NpcStateSet(id=self._requests.new_id("l"), state=parsed)
        frame = await self._requests.request(request, NpcStateFrame)
        self._requests.npcs[self.id] = frame.state.npc

    async def reset(self) -> None:
        """Forget the conversation history; the definition stays."""
        await self._requests.request(NpcReset(id=self._requests.new_id("r"), npc=self.id), Ok)

    async def feedback(self, reply_id: str | NpcResponse, reward: float, *, label: LabelLike = None,
                       source: Source | None = None, note: str | None = None, timeout: Timeout = DEFAULT) -> None:
        """Rate one of this NPC's replies after the fact (``reply_id``: its ``response.request_id``, or the
        response itself): ``reward`` in [-1, 1], ``label`` what would have been right (``{"action": "refuse"}``,
        an action the turn allowed, an emotion the NPC declared, or a ``say`` line), ``source`` who rated
        (``"game"``, ``"player"``, ``"simulated"``), ``note`` free text never trained on.

        Recorded with the reply when the daemon records experience and the NPC was defined with ``record=True``
        (docs/EXPERIENCE.md); returns once it is stored. Raises ``NotRecording`` (recording is off for the daemon
        or the NPC), ``UnknownReply`` (no such recorded reply), ``BadLabel``, ``ExperienceFull``; a bad value
        (``reward=2``) raises pydantic's ``ValidationError`` before anything is sent. Not retried after a lost
        connection (``ConnectionLost``): the daemon may have recorded it.
        """
        rid = reply_id.request_id if isinstance(reply_id, NpcResponse) else reply_id
        parsed = label if label is None or isinstance(label, FeedbackLabel) else FeedbackLabel.model_validate(
            dict(label))
        frame = Feedback(id=self._requests.new_id("f"), npc=self.id, reply_id=rid, reward=reward, label=parsed,
                         source=source, note=note)
        await self._requests.request(frame, Ok, timeout=timeout, idempotent=False)


class AsyncReplyStream:
    """A streamed reply: async-iterate for pieces of text, then read ``response``.

    ``cancel()`` stops the generation on the daemon (iteration then raises ``Cancelled``); ``aclose()``
    (or leaving an ``async with`` block) abandons it quietly, cancelling it on the daemon when unfinished.
    """

    def __init__(self, requests: _Requests, frame: NpcSay, timeout: Timeout) -> None:
        self._requests = requests
        self._call = requests.stream(frame, timeout)
        self.text = ""
        """The spoken text received so far."""
        self.response: NpcResponse | None = None
        """The final reply once the stream is exhausted."""

    @property
    def request_id(self) -> str:
        return self._call.frame.id

    @property
    def done(self) -> bool:
        return self._call.done

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> str:
        piece = await self._next_piece()
        if piece is None:
            raise StopAsyncIteration
        return piece

    async def _next_piece(self) -> str | None:
        """The next piece of text, or None at the end."""
        call = self._call
        if call.done:
            return None
        if not call.started:
            await call.start()
        item = await call.next()
        if isinstance(item, ReplyDelta):
            self.text += item.text
            return item.text
        call.finish()
        self.response = self._requests.response(item)
        return None

    async def final(self) -> NpcResponse:
        """Consume what is left of the stream and return the whole reply."""
        while await self._next_piece() is not None:
            pass
        if self.response is None:
            raise ZykeError("the stream was closed before the reply arrived")
        return self.response

    async def cancel(self) -> None:
        """Stop the generation on the daemon; the next iteration raises ``Cancelled``.

        Does nothing when the reply has already fully arrived.
        """
        await self._call.cancel()

    async def aclose(self) -> None:
        """Abandon the stream; an unfinished request is cancelled on the daemon."""
        self._call.abandon()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.aclose()

    def __del__(self) -> None:
        # Breaking out of ``async for`` without closing: still stop the work on the daemon.
        call = getattr(self, "_call", None)
        if call is not None:
            with contextlib.suppress(Exception):
                call.abandon_threadsafe()
