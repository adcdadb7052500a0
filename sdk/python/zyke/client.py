"""The synchronous client: for game loops that are not asyncio code.

A ``Client`` owns one background thread running an asyncio loop and the ``AsyncClient`` that holds
the WebSocket. Every method hands a coroutine to that loop (``run_coroutine_threadsafe``) and waits
for its result, so the caller needs no event loop, and any number of threads can use one client at
once: their requests are multiplexed on the one connection and answered independently.

For a game loop that must not block a frame, ``npc.submit(...)`` returns a
``concurrent.futures.Future`` to poll with ``done()``; ``future.cancel()`` cancels the line on the
daemon.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
from collections.abc import Awaitable, Coroutine, Iterator, Mapping, Sequence
from types import TracebackType
from typing import Any, Self, TypeVar

from .aio import (
    DEFAULT,
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_RECONNECT_WINDOW,
    DEFAULT_TIMEOUT,
    AsyncClient,
    AsyncNpc,
    AsyncReplyStream,
    Timeout,
)
from .choices import ChoicesLike
from .errors import ZykeError
from .protocol import AdapterInfo, NpcSpec, NpcState, Priority, Welcome
from .protocol.models import Audience
from .response import LabelLike, NpcResponse, OptionsLike, Source

T = TypeVar("T")


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
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run_loop, name="zyke-client", daemon=True)
        self._thread.start()
        self._close_lock = threading.Lock()
        self._closed = False

    def _run_loop(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_forever()

    def _submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        if self._closed:
            coro.close()
            raise ZykeError("this client is closed")
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError("a Client method was called from the client's own loop thread "
                               "(it would deadlock)")
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        future = self._submit(coro)
        try:
            return future.result()
        except BaseException:
            future.cancel()  # e.g. KeyboardInterrupt while waiting: stop the work on the daemon too
            raise

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
        return self._call(self._async.connect())

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
        anpc = self._call(self._async.npc(npc_id, persona, actions, emotions, name=name, adapter=adapter,
                                          max_history=max_history, default_emotion=default_emotion,
                                          default_action=default_action, options=options, priority=priority,
                                          audience=audience, refusal_action=refusal_action,
                                          blocked_words=blocked_words, record=record))
        return Npc(self, anpc)

    def define(self, spec: NpcSpec) -> Npc:
        """Define an NPC from a ready ``NpcSpec``."""
        return Npc(self, self._call(self._async.define(spec)))

    def get_npc(self, npc_id: str) -> Npc:
        """A handle to an NPC the daemon already knows, without redefining it (``UnknownNpc`` if none)."""
        return Npc(self, self._call(self._async.get_npc(npc_id)))

    def adapters(self) -> list[AdapterInfo]:
        """The LoRA adapters the daemon can serve."""
        return self._call(self._async.adapters())

    def load_adapter(self, name: str) -> list[AdapterInfo]:
        """Load a registered adapter now rather than on its first line (avoids that line's load delay)."""
        return self._call(self._async.load_adapter(name))

    def unload_adapter(self, name: str) -> list[AdapterInfo]:
        """Free a loaded adapter; a later line that names it loads it again."""
        return self._call(self._async.unload_adapter(name))

    def ping(self, timeout: Timeout = DEFAULT) -> None:
        """One round trip to the daemon; raises if it does not answer."""
        self._call(self._async.ping(timeout))

    def _bound(self, response: NpcResponse | None) -> NpcResponse | None:
        """``response.rate(...)`` through this client: it blocks, as every call of the sync client does."""
        if response is not None:
            def rate(reply_id: str, reward: float, **kw: Any) -> None:
                Npc(self, AsyncNpc(self._async, response.npc)).feedback(reply_id, reward, **kw)

            response._bind(rate)
        return response

    async def _bound_async(self, say: Awaitable[NpcResponse]) -> NpcResponse:
        response = await say
        self._bound(response)
        return response

    def close(self) -> None:
        """Close the connection, stop an autostarted daemon and the background thread. Idempotent."""
        with self._close_lock:
            if self._closed:
                return
            if threading.current_thread() is self._thread:
                raise RuntimeError("Client.close() called from the client's own loop thread")
            try:
                asyncio.run_coroutine_threadsafe(self._async.aclose(), self._loop).result(30)
            except concurrent.futures.TimeoutError:
                pass
            finally:
                self._closed = True
                self._loop.call_soon_threadsafe(self._loop.stop)
                self._thread.join(5)
                if not self._thread.is_alive():
                    self._loop.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __del__(self) -> None:
        # A forgotten client must not leave an autostarted daemon running.
        if not getattr(self, "_closed", True):
            with contextlib.suppress(Exception):
                self.close()


class Npc:
    """A handle to one NPC defined through a ``Client``. Safe to use from several threads."""

    def __init__(self, client: Client, anpc: AsyncNpc) -> None:
        self._client = client
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

    def say(self, text: str, *, state: Mapping[str, Any] | None = None, options: OptionsLike = None,
            adapter: str | None = None, timeout: Timeout = DEFAULT, max_tokens: int | None = None,
            temperature: float | None = None, top_p: float | None = None, top_k: int | None = None,
            seed: int | None = None, stop: Sequence[str] | None = None,
            repeat_penalty: float | None = None, no_repeat_ngram: int | None = None,
            allowed_actions: Sequence[str] | None = None, priority: Priority | None = None,
            deadline_ms: int | None = None) -> NpcResponse:
        """Say a line and block until the whole reply is there.

        ``state`` is the game state the NPC should know this turn. Generation options come as keywords
        or an ``options`` object/dict (keywords win); ``adapter`` picks a LoRA adapter for this line.
        ``allowed_actions`` narrows this line to some of the NPC's declared actions; a name it did not
        declare raises ``UnknownAction`` (code ``unknown_action``, from the daemon).
        When ``timeout`` expires the request is cancelled on the daemon and ``ZykeTimeout`` raised.
        ``priority`` overrides the NPC's default for this line; ``deadline_ms`` drops it with ``Expired`` if it
        has not started within that many milliseconds (docs/SCHEDULING.md).
        """
        return self._client._call(self._client._bound_async(self._async.say(
            text, state=state, options=options, adapter=adapter, timeout=timeout, max_tokens=max_tokens,
            temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, stop=stop,
            repeat_penalty=repeat_penalty, no_repeat_ngram=no_repeat_ngram, allowed_actions=allowed_actions,
            priority=priority, deadline_ms=deadline_ms)))

    def submit(self, text: str, *, state: Mapping[str, Any] | None = None, options: OptionsLike = None,
               adapter: str | None = None, timeout: Timeout = DEFAULT, max_tokens: int | None = None,
               temperature: float | None = None, top_p: float | None = None, top_k: int | None = None,
               seed: int | None = None, stop: Sequence[str] | None = None, repeat_penalty: float | None = None,
               no_repeat_ngram: int | None = None,
               allowed_actions: Sequence[str] | None = None, priority: Priority | None = None,
               deadline_ms: int | None = None) -> concurrent.futures.Future[NpcResponse]:
        """Like ``say`` but returns at once with a future, for a game loop that polls each frame.

        ``future.done()`` / ``future.result()`` as usual; ``future.cancel()`` cancels the line on the daemon.
        """
        return self._client._submit(self._client._bound_async(self._async.say(
            text, state=state, options=options, adapter=adapter, timeout=timeout, max_tokens=max_tokens,
            temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, stop=stop,
            repeat_penalty=repeat_penalty, no_repeat_ngram=no_repeat_ngram, allowed_actions=allowed_actions,
            priority=priority, deadline_ms=deadline_ms)))

    def stream(self, text: str, *, state: Mapping[str, Any] | None = None, options: OptionsLike = None,
               adapter: str | None = None, timeout: Timeout = DEFAULT, max_tokens: int | None = None,
               temperature: float | None = None, top_p: float | None = None, top_k: int | None = None,
               seed: int | None = None, stop: Sequence[str] | None = None,
               repeat_penalty: float | None = None, no_repeat_ngram: int | None = None,
               allowed_actions: Sequence[str] | None = None, priority: Priority | None = None,
               deadline_ms: int | None = None) -> ReplyStream:
        """Say a line and iterate over the reply's text as it is generated.

        The pieces concatenate to ``stream.response.say``; ``stream.response`` (emotion, action...) is
        set once the loop ends. Breaking out of the loop, ``close()`` or leaving a ``with`` block cancels
        an unfinished request on the daemon; ``cancel()`` makes the iteration raise ``Cancelled``.
        """
        astream = self._async.stream(
            text, state=state, options=options, adapter=adapter, timeout=timeout, max_tokens=max_tokens,
            temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, stop=stop,
            repeat_penalty=repeat_penalty, no_repeat_ngram=no_repeat_ngram, allowed_actions=allowed_actions,
            priority=priority, deadline_ms=deadline_ms)
        return ReplyStream(self._client, astream)

    def save(self) -> dict[str, Any]:
        """The NPC's full state (definition and history) as a JSON-ready dict for a save file."""
        return self._client._call(self._async.save())

    def load(self, state: NpcState | Mapping[str, Any]) -> None:
        """Restore a state from ``save()``: its history and definition replace the current ones."""
        self._client._call(self._async.load(state))

    def reset(self) -> None:
        """Forget the conversation history; the definition stays."""
        self._client._call(self._async.reset())

    def feedback(self, reply_id: str | NpcResponse, reward: float, *, label: LabelLike = None,
                 source: Source | None = None, note: str | None = None, timeout: Timeout = DEFAULT) -> None:
        """Rate one of this NPC's replies after the fact; blocks until the daemon stored it. ``reply_id`` is the
        response's ``request_id`` (or the response), ``reward`` in [-1, 1], ``label`` what would have been right
        (``{"action": "refuse"}``). Needs recording on for the daemon and this NPC (``record=True``); see
        ``AsyncNpc.feedback`` for the errors. ``response.rate(...)`` is the same call."""
        self._client._call(self._async.feedback(reply_id, reward, label=label, source=source, note=note,
                                                timeout=timeout))


class ReplyStream:
    """A streamed reply: iterate for pieces of text, then read ``response``.

    Use one stream from one thread at a time. ``text`` holds what arrived so far.
    """

    def __init__(self, client: Client, astream: AsyncReplyStream) -> None:
        self._client = client
        self._async = astream

    @property
    def request_id(self) -> str:
        return self._async.request_id

    @property
    def text(self) -> str:
        return self._async.text

    @property
    def response(self) -> NpcResponse | None:
        """The final reply, once the iteration has ended."""
        return self._client._bound(self._async.response)

    @property
    def done(self) -> bool:
        return self._async.done

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        piece = self._client._call(self._async._next_piece())
        if piece is None:
            raise StopIteration
        return piece

    def final(self) -> NpcResponse:
        """Consume what is left and return the whole reply."""
        return self._client._call(self._client._bound_async(self._async.final()))

    def cancel(self) -> None:
        """Stop the generation on the daemon; the next iteration raises ``Cancelled``."""
        self._client._call(self._async.cancel())

    def close(self) -> None:
        """Abandon the stream; an unfinished request is cancelled on the daemon."""
        if not self._async.done and not self._client._closed:
            self._client._call(self._async.aclose())

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __del__(self) -> None:
        # ``for piece in npc.stream(...): break`` drops the last reference here: cancel without blocking.
        astream = getattr(self, "_async", None)
        if astream is not None and not astream.done and not self._client._closed:
            with contextlib.suppress(Exception):
                self._client._loop.call_soon_threadsafe(astream._abandon)
