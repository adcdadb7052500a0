"""The synchronous client: for game loops that are not asyncio code.

A ``Client`` owns one background thread running an asyncio loop and the ``AsyncClient`` that holds
the WebSocket. Every method hands a coroutine to that loop (``run_coroutine_threadsafe``) and waits
for its result, so the caller needs no event loop, and any number of threads can use one client at
once: their requests are multiplexed on the one connection and answered independently.

For a game loop that must not block a frame, ``npc.submit(...)`` returns a
``concurrent.futures.Future`` to poll with ``done()``; ``future.cancel()`` cancels the line on the
daemon.

No request logic lives here: ``Npc`` and ``ReplyStream`` wrap the async handles and hand their
coroutines to ``_LoopThread``, the one internal interface the sync handles get (``run`` blocks on
a coroutine, ``schedule`` returns its future); a request's lifecycle is the async client's
(aio.py, on connection.py). The sync side only makes ``response.rate(...)`` block, as every sync call does.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Mapping, Sequence
from types import TracebackType
from typing import Any, Self, TypeVar, Unpack

from .aio import (
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_RECONNECT_WINDOW,
    DEFAULT_TIMEOUT,
    AsyncClient,
    AsyncNpc,
    AsyncReplyStream,
)
from .choices import ChoicesLike
from .errors import ZykeError
from .protocol import AdapterInfo, NpcSpec, NpcState, Priority, Welcome
from .protocol.models import Audience
from .response import LabelLike, NpcResponse, OptionsLike, Source
from .say_options import DEFAULT, SayOptions, Timeout, check_say_options

T = TypeVar("T")


class _LoopThread:
    """The background thread running the asyncio loop a ``Client``'s ``AsyncClient`` lives on.

    The internal interface of the sync handles: ``run`` (block on a coroutine; interrupting the wait
    cancels it, which cancels the request on the daemon) and ``schedule`` (its future). Not for game code.
    """

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._run_loop, name="zyke-client", daemon=True)
        self.thread.start()
        self.closed = False

    def _run_loop(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def schedule(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        if self.closed:
            coro.close()
            raise ZykeError("this client is closed")
        if threading.current_thread() is self.thread:
            coro.close()
            raise RuntimeError("a Client method was called from the client's own loop thread "
                               "(it would deadlock)")
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        future = self.schedule(coro)
        try:
            return future.result()
        except BaseException:
            future.cancel()  # e.g. KeyboardInterrupt while waiting: stop the work on the daemon too
            raise

    def stop(self, last: Coroutine[Any, Any, None], wait: float) -> None:
        """Run ``last`` (closing the connection) for up to ``wait`` seconds, then stop the loop and its thread."""
        try:
            asyncio.run_coroutine_threadsafe(last, self.loop).result(wait)
        except concurrent.futures.TimeoutError:
            pass
        finally:
            self.closed = True
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(5)
            if not self.thread.is_alive():
                self.loop.close()


class Client:
    """Talk to the local Zyke daemon from ordinary (threaded, blocking) code.

    ``Client()`` finds the daemon and its token by itself (``ZYKE_URL`` / ``ZYKE_TOKEN``, else the
    files the daemon writes); ``url``/``token`` override that. It connects on first use and
    reconnects by itself after a daemon restart. The other arguments are ``AsyncClient``'s:
    ``timeout`` (default seconds per request, ``None`` for no limit), ``connect_timeout``,
    ``reconnect_window``, ``game`` (namespace for NPC ids) and ``autostart`` (start a local daemon
    if none answers, stop it on close).

    Safe to share between threads. Close it with ``close()`` or use ``with Client() as client:``.
    """

    def __init__(self, url: str | None = None, token: str | None = None, *, game: str | None = None,
                 timeout: float | None = DEFAULT_TIMEOUT, connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
                 reconnect_window: float = DEFAULT_RECONNECT_WINDOW, autostart: bool = False,
                 autostart_timeout: float = 180.0, client_name: str = "zyke-python") -> None:
        self._async = AsyncClient(url, token, game=game, timeout=timeout, connect_timeout=connect_timeout,
                                  reconnect_window=reconnect_window, autostart=autostart,
                                  autostart_timeout=autostart_timeout, client_name=client_name)
        self._runner = _LoopThread()
        self._close_lock = threading.Lock()

    # -- public surface

    @property
    def url(self) -> str:
        return self._async.url

    @property
    def timeout(self) -> float | None:
        return self._async.timeout

    @timeout.setter
    def timeout(self, value: float | None) -> None:
        self._async.timeout = value

    @property
    def daemon_info(self) -> Welcome | None:
        """The daemon's ``welcome`` (version, model, limits) of the current connection, if connected."""
        return self._async.daemon_info

    @property
    def connected(self) -> bool:
        return self._async.connected

    def connect(self) -> Welcome:
        """Connect now instead of on first use, to fail early (``DaemonNotRunning``, bad token...)."""
        return self._runner.run(self._async.connect())

    def npc(self, npc_id: str, persona: str, actions: ChoicesLike = ("none",),
            emotions: ChoicesLike = ("neutral",), *, name: str | None = None, adapter: str | None = None,
            max_history: int | None = None, default_emotion: str | None = None,
            default_action: str | None = None, options: OptionsLike = None,
            priority: Priority | None = None, audience: Audience | None = None,
            refusal_action: str | None = None, blocked_words: Sequence[str] | None = None,
            record: bool | None = None) -> Npc:
        """Define (or update) an NPC and return a handle to talk to it.

        An NPC that already exists keeps its conversation history, so a game can define its NPCs on
        every start. Replies only ever use the given ``actions`` and ``emotions``: lists of names, lists
        mixing names and ``Choice``/``{"name", "description"}`` dicts, or dicts of name to description
        (``{"trade": "buy or sell goods"}``; the model reads the descriptions). ``adapter`` and
        ``options`` are the NPC's defaults for every line (a call's own arguments win), and so is ``priority``
        (``"foreground"``, ``"normal"`` or ``"background"``: how soon the daemon serves its lines).
        ``audience`` narrows the daemon's safety audience for this NPC (``"minor"``, ``"teen"``, ``"adult"``;
        never looser than the daemon's), ``refusal_action`` is the action a deflected reply takes and
        ``blocked_words`` extra words it never says (docs/SAFETY.md). ``record=True`` opts the NPC in to
        experience recording, which the daemon must have on too (docs/EXPERIENCE.md).
        """
        anpc = self._runner.run(self._async.npc(npc_id, persona, actions, emotions, name=name, adapter=adapter,
                                                max_history=max_history, default_emotion=default_emotion,
                                                default_action=default_action, options=options, priority=priority,
                                                audience=audience, refusal_action=refusal_action,
                                                blocked_words=blocked_words, record=record))
        return Npc(self._runner, anpc)

    def define(self, spec: NpcSpec) -> Npc:
        """Define an NPC from a ready ``NpcSpec``."""
        return Npc(self._runner, self._runner.run(self._async.define(spec)))

    def get_npc(self, npc_id: str) -> Npc:
        """A handle to an NPC the daemon already knows, without redefining it (``UnknownNpc`` if none)."""
        return Npc(self._runner, self._runner.run(self._async.get_npc(npc_id)))

    def adapters(self) -> list[AdapterInfo]:
        """The LoRA adapters the daemon can serve."""
        return self._runner.run(self._async.adapters())

    def load_adapter(self, name: str) -> list[AdapterInfo]:
        """Load a registered adapter now rather than on its first line (avoids that line's load delay)."""
        return self._runner.run(self._async.load_adapter(name))

    def unload_adapter(self, name: str) -> list[AdapterInfo]:
        """Free a loaded adapter; a later line that names it loads it again."""
        return self._runner.run(self._async.unload_adapter(name))

    def ping(self, timeout: Timeout = DEFAULT) -> None:
        """One round trip to the daemon; raises if it does not answer."""
        self._runner.run(self._async.ping(timeout))

    def close(self) -> None:
        """Close the connection, stop an autostarted daemon and the background thread. Idempotent."""
        with self._close_lock:
            if self._runner.closed:
                return
            if threading.current_thread() is self._runner.thread:
                raise RuntimeError("Client.close() called from the client's own loop thread")
            self._runner.stop(self._async.aclose(), 30)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __del__(self) -> None:
        # A forgotten client must not leave an autostarted daemon running.
        runner = getattr(self, "_runner", None)
        if runner is not None and not runner.closed:
            with contextlib.suppress(Exception):
                self.close()


class Npc:
    """A handle to one NPC defined through a ``Client``. Safe to use from several threads."""

    def __init__(self, runner: _LoopThread, anpc: AsyncNpc) -> None:
        self._runner = runner
        self._async = anpc
        self.id = anpc.id

    @property
    def spec(self) -> NpcSpec:
        """The NPC's current definition (updated by ``load``)."""
        return self._async.spec

    @property
    def name(self) -> str:
        return self._async.name

    @property
    def actions(self) -> list[str]:
        return self._async.actions

    @property
    def emotions(self) -> list[str]:
        return self._async.emotions

    def __repr__(self) -> str:
        return f"Npc({self.id!r})"

    def say(self, text: str, **kwargs: Unpack[SayOptions]) -> NpcResponse:
        """Say a line and block until the whole reply is there.

        The keywords (``state``, generation options, ``adapter``, ``timeout``, ``allowed_actions``,
        ``priority``, ``deadline_ms``...) are ``zyke.say_options.SayOptions``'s, documented there; an
        unknown one is a ``TypeError``. When ``timeout`` expires the request is cancelled on the daemon
        and ``ZykeTimeout`` raised.
        """
        check_say_options(kwargs, "Npc.say")
        return self._runner.run(self._rated(self._async.say(text, **kwargs)))

    def submit(self, text: str, **kwargs: Unpack[SayOptions]) -> concurrent.futures.Future[NpcResponse]:
        """Like ``say`` but returns at once with a future, for a game loop that polls each frame.

        ``future.done()`` / ``future.result()`` as usual; ``future.cancel()`` cancels the line on the daemon.
        The keywords are ``say``'s; an unknown one raises ``TypeError`` here, not in the future.
        """
        check_say_options(kwargs, "Npc.submit")
        return self._runner.schedule(self._rated(self._async.say(text, **kwargs)))

    def stream(self, text: str, **kwargs: Unpack[SayOptions]) -> ReplyStream:
        """Say a line and iterate over the reply's text as it is generated.

        The pieces concatenate to ``stream.response.say``; ``stream.response`` (emotion, action...) is
        set once the loop ends. Breaking out of the loop, ``close()`` or leaving a ``with`` block cancels
        an unfinished request on the daemon; ``cancel()`` makes the iteration raise ``Cancelled``.
        The keywords are ``say``'s.
        """
        check_say_options(kwargs, "Npc.stream")
        return ReplyStream(self._runner, self._async.stream(text, **kwargs), self._bind)

    def _bind(self, response: NpcResponse | None) -> NpcResponse | None:
        """``response.rate(...)`` through this handle: it blocks, as every call of the sync client does."""
        return response._bind(self.feedback) if response is not None else None

    async def _rated(self, say: Awaitable[NpcResponse]) -> NpcResponse:
        response = await say
        self._bind(response)
        return response

    def save(self) -> dict[str, Any]:
        """The NPC's full state (definition and history) as a JSON-ready dict for a save file."""
        return self._runner.run(self._async.save())

    def load(self, state: NpcState | Mapping[str, Any]) -> None:
        """Restore a state from ``save()``: its history and definition replace the current ones."""
        self._runner.run(self._async.load(state))

    def reset(self) -> None:
        """Forget the conversation history; the definition stays."""
        self._runner.run(self._async.reset())

    def feedback(self, reply_id: str | NpcResponse, reward: float, *, label: LabelLike = None,
                 source: Source | None = None, note: str | None = None, timeout: Timeout = DEFAULT) -> None:
        """Rate one of this NPC's replies after the fact; blocks until the daemon stored it. ``reply_id`` is the
        response's ``request_id`` (or the response), ``reward`` in [-1, 1], ``label`` what would have been right
        (``{"action": "refuse"}``). Needs recording on for the daemon and this NPC (``record=True``); see
        ``AsyncNpc.feedback`` for the errors. ``response.rate(...)`` is the same call."""
        self._runner.run(self._async.feedback(reply_id, reward, label=label, source=source, note=note,
                                              timeout=timeout))


class ReplyStream:
    """A streamed reply: iterate for pieces of text, then read ``response``.

    Use one stream from one thread at a time. ``text`` holds what arrived so far.
    """

    def __init__(self, runner: _LoopThread, astream: AsyncReplyStream,
                 bind: Callable[[NpcResponse | None], NpcResponse | None]) -> None:
        self._runner = runner
        self._async = astream
        self._bind = bind  # makes the final response's ``rate`` blocking

    @property
    def request_id(self) -> str:
        return self._async.request_id

    @property
    def text(self) -> str:
        return self._async.text

    @property
    def response(self) -> NpcResponse | None:
        """The final reply, once the iteration has ended."""
        return self._bind(self._async.response)

    @property
    def done(self) -> bool:
        return self._async.done

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        piece = self._runner.run(_next_piece(self._async))
        if piece is None:
            raise StopIteration
        return piece

    def final(self) -> NpcResponse:
        """Consume what is left and return the whole reply."""
        return self._runner.run(self._final())

    def cancel(self) -> None:
        """Stop the generation on the daemon; the next iteration raises ``Cancelled``."""
        self._runner.run(self._async.cancel())

    def close(self) -> None:
        """Abandon the stream; an unfinished request is cancelled on the daemon."""
        if not self._async.done and not self._runner.closed:
            self._runner.run(self._async.aclose())

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    async def _final(self) -> NpcResponse:
        response = await self._async.final()
        self._bind(response)
        return response

    def __del__(self) -> None:
        # ``for piece in npc.stream(...): break`` drops the last reference here: cancel without blocking.
        astream = getattr(self, "_async", None)
        if astream is not None and not astream.done and not self._runner.closed:
            with contextlib.suppress(Exception):
                self._runner.schedule(astream.aclose()).add_done_callback(_ignore)


async def _next_piece(astream: AsyncReplyStream) -> str | None:
    """The stream's next piece of text, or None at its end."""
    return await anext(astream, None)


def _ignore(future: concurrent.futures.Future[None]) -> None:
    """Retrieve a background close's outcome (nothing to report from a finalizer)."""
    if not future.cancelled():
        future.exception()
