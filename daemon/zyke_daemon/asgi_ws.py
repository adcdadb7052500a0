"""WebSockets under uvicorn, shaped like the websockets library's connection object the server was written for.

The daemon's port speaks HTTP with request bodies (the OpenAI-compatible API, ``/v1/npc/say``) and the WebSocket
protocol. The websockets library's own server cannot read a request body, so uvicorn serves the port and hands
each WebSocket to the daemon as ASGI events; ``AsgiWebSocket`` turns those back into the small surface
``server._Peer`` and ``DaemonServer._serve_connection`` use (``send``, ``close``, ``state``, ``transport.abort``,
``async for message in ws``), so the per-connection logic stayed as it was. uvicorn's WebSocket protocol is the
websockets library's sans-I/O ``ServerProtocol`` (``ws="websockets-sansio"``), so framing, ``max_size`` and
keepalive pings are the same code as before.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, MutableMapping
from typing import Any

from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.exceptions import ConnectionClosedError, ConnectionClosedOK
from websockets.frames import Close
from websockets.protocol import State

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


class WsProtocol(WebSocketsSansIOProtocol):
    """uvicorn's sans-I/O WebSocket protocol, dropping the socket when a keepalive ping goes unanswered.

    uvicorn only ``close()``s the transport then, and asyncio keeps a transport open until its write buffer is
    flushed: a client that stopped reading (its answers piled up in that buffer) was never dropped, so its
    handler waited forever. The websockets library's own server aborted it; this does too."""

    def keepalive_timeout(self) -> None:
        super().keepalive_timeout()
        if self.transport is not None:
            self.transport.abort()


class _Transport:
    """``ws.transport.abort()``: drop the socket of a client that does not take its close frame."""

    def __init__(self, send: Send) -> None:
        self._send = send

    def abort(self) -> None:
        # uvicorn's ASGI ``send`` is a bound method of the connection's protocol object, which holds the transport
        transport = getattr(getattr(self._send, "__self__", None), "transport", None)
        if transport is not None:
            transport.abort()


class AsgiWebSocket:
    """One accepted WebSocket, with the websockets-library surface the daemon's connection handling uses."""

    def __init__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.scope = scope
        self._receive = receive
        self._send = send
        self.state = State.OPEN
        self.transport = _Transport(send)
        self.close_code: int | None = None

    @property
    def remote_address(self) -> tuple[str, int] | None:
        client = self.scope.get("client")
        return tuple(client) if client else None

    def _closed(self) -> ConnectionClosedOK | ConnectionClosedError:
        code = self.close_code if self.close_code is not None else 1006
        rcvd = Close(code, "") if code not in (1005, 1006) else None
        return ConnectionClosedOK(rcvd, None) if code in (1000, 1001) else ConnectionClosedError(rcvd, None)

    async def send(self, data: str | bytes, text: bool | None = None) -> None:
        if self.state is not State.OPEN:
            raise self._closed()
        if isinstance(data, bytes) and text:
            message: dict[str, Any] = {"type": "websocket.send", "text": data.decode("utf-8")}
        elif isinstance(data, bytes):
            message = {"type": "websocket.send", "bytes": data}
        else:
            message = {"type": "websocket.send", "text": data}
        try:
            await self._send(message)
        except (OSError, RuntimeError) as exc:  # uvicorn's ClientDisconnected is an OSError
            self.state = State.CLOSED
            raise self._closed() from exc

    async def close(self, code: int = 1000, reason: str = "") -> None:
        if self.state is not State.OPEN:
            return
        self.state = State.CLOSING
        try:
            await self._send({"type": "websocket.close", "code": code, "reason": reason})
        except (OSError, RuntimeError):
            self.state = State.CLOSED

    async def __aiter__(self) -> AsyncIterator[str | bytes]:
        while True:
            message = await self._receive()
            kind = message["type"]
            if kind == "websocket.receive":
                text = message.get("text")
                yield text if text is not None else message.get("bytes") or b""
            elif kind == "websocket.disconnect":
                self.state = State.CLOSED
                self.close_code = message.get("code")
                return


async def refuse(send: Send, status: int, body: bytes, content_type: str = "text/plain") -> None:
    """Answer the opening handshake with a plain HTTP response (403 for a refused Host or Origin), as the
    websockets library's server did, instead of accepting the WebSocket."""
    await send({"type": "websocket.http.response.start", "status": status,
                "headers": [(b"content-type", content_type.encode()), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "websocket.http.response.body", "body": body})


def header(scope: Scope, name: bytes) -> str | None:
    """An ASGI request header by its lower-case name (the first one), or None."""
    headers: Iterable[tuple[bytes, bytes]] = scope.get("headers", ())
    for key, value in headers:
        if key == name:
            return value.decode("latin-1")
    return None
