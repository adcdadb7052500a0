"""The daemon's HTTP surface, on the WebSocket's port: health, metrics, the OpenAI-compatible API, ``/v1/npc/say``.

One ASGI app (served by uvicorn, see server.py) takes every connection to the port. Its outer layer applies the
rules that held before there was an HTTP API: the Host header must name this machine (DNS rebinding), a
WebSocket goes to the daemon's own connection handling, and ``/v1`` needs the daemon's token as
``Authorization: Bearer``, a trusted Origin when a browser sends one, and a body within the size cap. The routes
are FastAPI's, so ``/openapi.json`` describes them. Nothing here calls the model: generation requests become
jobs of the daemon's one queue (completions.py for OpenAI-style requests, ``npc.say`` frames through a virtual
connection for ``/v1/npc/say``). docs/HTTP.md is the user's page for all of it.
"""

from __future__ import annotations

import hmac
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator
from copy import deepcopy
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response, StreamingResponse
from llguidance import LLMatcher
from starlette.exceptions import HTTPException as StarletteHTTPException
from zyke.protocol import SCHEMA_BASE, ErrorCode, load_schema
from zyke.protocol.validation import describe, validator_for

from . import __version__
from .asgi_ws import Receive, Scope, Send, header, refuse
from .backends.decoding import compile_schema
from .completions import CompletionJob, CompletionResult
from .config import BASE_ADAPTER
from .core import Submit, error_frame
from .openai_format import (
    ADAPTER_SEPARATOR,
    DEFAULT_COMPLETION_TOKENS,
    ApiError,
    ChatCompletionRequest,
    CompletionRequest,
    check_sampling,
    error_body,
    now,
    output_schema,
    render_chat,
    usage,
)

if TYPE_CHECKING:
    from .server import DaemonServer, HttpPeer

log = logging.getLogger(__name__)

#: The largest HTTP request body, as a multiple of the WebSocket frame cap (``max_frame_bytes``): a batch of
#: ``/v1/npc/say`` requests may carry several NPC definitions; each request in it is still held to the frame cap.
BODY_FRAMES = 4
#: The HTTP status an error frame's code is answered with on ``/v1/npc/say`` (and an OpenAI-style error's).
STATUS_OF_CODE: dict[str, int] = {
    "bad_json": 400, "bad_frame": 400, "unknown_type": 400, "unsupported_version": 400, "unknown_action": 400,
    "too_long": 400, "frame_too_large": 413, "not_authenticated": 401, "unauthorized": 401, "duplicate_id": 409,
    "unknown_npc": 404, "unknown_adapter": 404, "unknown_request": 404, "adapter_rejected": 422,
    "queue_full": 429, "rate_limited": 429, "too_many_connections": 429, "timeout": 504, "expired": 408,
    "cancelled": 409, "generation_failed": 502, "model_error": 503, "internal": 500,
}


def _status(code: str) -> int:
    return STATUS_OF_CODE.get(code, 400)


def _npc_path(path: str) -> bool:
    return path.startswith("/v1/npc/")


def build_app(server: DaemonServer) -> Any:
    """The ASGI app of ``server``'s port."""
    from .server import host_allowed

    api = _routes(server)
    config = server.config
    body_cap = BODY_FRAMES * config.max_frame_bytes

    async def plain(send: Send, status: int, body: bytes, content_type: str = "text/plain",
                    headers: list[tuple[bytes, bytes]] | None = None) -> None:
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", content_type.encode()),
                                (b"content-length", str(len(body)).encode()), *(headers or [])]})
        await send({"type": "http.response.body", "body": body})

    async def refused(send: Send, path: str, status: int, code: str, message: str, kind: str,
                      headers: list[tuple[bytes, bytes]] | None = None) -> None:
        """A refusal by the outer layer, typed like the route's own errors: an error frame with ``code`` on
        /v1/npc, else an OpenAI-style error (a wrong token is OpenAI's ``invalid_api_key``)."""
        if _npc_path(path):
            body = error_frame(ErrorCode(code), message, None)
        else:
            body = error_body(message, kind, None, "invalid_api_key" if status == 401 else code)
        await plain(send, status, json.dumps(body).encode(), "application/json", headers)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            return  # lifespan is off; nothing else is spoken
        host = header(scope, b"host")
        if host is not None and not host_allowed(host, config):
            text = b"Host not allowed: this daemon answers loopback names; add another with --allow-host\n"
            if scope["type"] == "websocket":
                await receive()
                await refuse(send, HTTPStatus.FORBIDDEN, text)
            else:
                await plain(send, HTTPStatus.FORBIDDEN, text)
            return
        if scope["type"] == "websocket":
            await server.websocket(scope, receive, send)
            return
        path = scope["path"]
        if not (path == "/v1" or path.startswith("/v1/")):
            await api(scope, receive, send)
            return
        origin = header(scope, b"origin")
        cors: list[tuple[bytes, bytes]] = []
        if origin is not None:
            if origin not in config.allowed_origins:
                await refused(send, path, 403, "unauthorized", f"Origin {origin[:200]!r} is not allowed; start the "
                              "daemon with --allow-origin to let a browser page call it", "permission_error")
                return
            cors = [(b"access-control-allow-origin", origin.encode("latin-1")), (b"vary", b"Origin")]
            if scope["method"] == "OPTIONS":  # a browser's preflight for a trusted page
                await plain(send, 204, b"", headers=[*cors, (b"access-control-allow-methods", b"GET, POST"),
                                                     (b"access-control-allow-headers",
                                                      b"authorization, content-type"),
                                                     (b"access-control-max-age", b"600")])
                return
        auth = header(scope, b"authorization") or ""
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), server.token.encode()):
            await refused(send, path, 401, "unauthorized", "missing or wrong token: send Authorization: Bearer "
                          "<the daemon's token> (its token file, or ZYKE_TOKEN)", "invalid_request_error",
                          [(b"www-authenticate", b"Bearer"), *cors])
            return
        length = header(scope, b"content-length")
        if length is not None and (not length.isdigit() or int(length) > body_cap):
            await refused(send, path, 413, "frame_too_large", f"the request body is over {body_cap} bytes",
                          "invalid_request_error", cors)
            return
        body = bytearray()
        while True:  # read it all here: a chunked body is held to the cap as well
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if len(body) > body_cap:
                await refused(send, path, 413, "frame_too_large", f"the request body is over {body_cap} bytes",
                              "invalid_request_error", cors)
                return
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Any:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()  # then the client's disconnect, which a stream watches for

        async def send_cors(message: Any) -> None:
            if cors and message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *cors]}
            await send(message)

        try:
            await api(scope, replay, send_cors)
        finally:  # a streamed answer whose client left before it began: its job is cancelled here
            for cleanup in scope.get("zyke.cleanup", ()):
                cleanup()

    return app


# --- the routes -------------------------------------------------------------------------------------------------------


def _routes(server: DaemonServer) -> FastAPI:
    api = FastAPI(title="zyke-daemon", version=__version__, docs_url=None, redoc_url=None,
                  openapi_url="/openapi.json",
                  description="The Zyke daemon's HTTP API: an OpenAI-compatible subset under /v1 and a plain-HTTP "
                              "NPC endpoint, on the same port as its WebSocket protocol. /v1 needs "
                              "Authorization: Bearer <the daemon's token>. See docs/HTTP.md.")
    started = now()
    templates: dict[int, tuple[str, str, str] | None] = {}

    @api.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @api.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        param = ".".join(loc) or None
        message = f"{param + ': ' if param else ''}{first.get('msg', 'invalid request body')}"
        if first.get("type") == "json_invalid":
            message = "the request body is not valid JSON"
        return JSONResponse(error_body(message, "invalid_request_error", param, "invalid_request_body"),
                            status_code=400)

    @api.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        path = request.url.path
        message = "not found: try /health, /metrics, /v1/models, /v1/chat/completions, /v1/completions, " \
                  "/v1/npc/say, /openapi.json or a WebSocket" if exc.status_code == 404 else str(exc.detail)
        if _npc_path(path):
            return JSONResponse(error_frame(ErrorCode.BAD_FRAME, message, None), status_code=exc.status_code)
        if path.startswith("/v1"):
            return JSONResponse(error_body(message, "invalid_request_error", None, "not_found"
                                           if exc.status_code == 404 else "method_not_allowed"),
                                status_code=exc.status_code)
        return Response(message + "\n", status_code=exc.status_code, media_type="text/plain")

    @api.exception_handler(Exception)
    async def crashed(request: Request, exc: Exception) -> JSONResponse:  # a bug: typed, logged, never a traceback
        log.error("HTTP %s %s failed", request.method, request.url.path, exc_info=exc)
        if _npc_path(request.url.path):
            return JSONResponse(error_frame(ErrorCode.INTERNAL, "internal error; see the daemon log", None),
                                status_code=500)
        return JSONResponse(error_body("internal error; see the daemon log", "server_error", None, "internal"),
                            status_code=500)

    @api.get("/health", tags=["daemon"], summary="Whether the model is loaded (no token needed)")
    async def health() -> JSONResponse:
        status, doc = server.health()
        return JSONResponse(doc, status_code=status)

    @api.get("/metrics", tags=["daemon"], summary="Prometheus metrics (no token needed)",
             response_class=Response, responses={200: {"content": {"text/plain": {}}}})
    async def metrics() -> Response:
        return Response(server.render_metrics(), media_type="text/plain; version=0.0.4; charset=utf-8")

    def ready() -> DaemonServer:
        if server.load_error is not None:
            raise ApiError(503, f"the model failed to load: {server.load_error}", "server_error", None,
                           "model_error")
        if server.backend is None or server.core is None:
            raise ApiError(503, "the model is still loading; retry in a moment", "server_error", None,
                           "model_loading")
        return server

    def base_id() -> str:
        assert server.backend is not None
        return server.backend.model.name.removesuffix(".gguf")

    def compatible_adapters() -> list[str]:
        backend = server.backend
        assert backend is not None
        return [a.name for a in server._adapters() if a.base in (None, backend.fingerprint)]

    def adapter_of(model: str) -> str | None:
        """The adapter a model id names (None: the bare base model); an unknown id is a 404 as OpenAI's."""
        base = base_id()
        if model == base:
            return None
        name = model.removeprefix(base + ADAPTER_SEPARATOR)
        if name == BASE_ADAPTER:
            return None
        if name in compatible_adapters():
            return name
        raise ApiError(404, f"the model {model[:200]!r} does not exist; GET /v1/models lists {base!r} and "
                       f"'{base}{ADAPTER_SEPARATOR}<adapter>' for each registered adapter", param="model",
                       code="model_not_found")

    @api.get("/v1/models", tags=["openai"], summary="The base model and one model id per registered adapter")
    async def models() -> dict[str, Any]:
        ready()
        base = base_id()
        ids = [base, *(f"{base}{ADAPTER_SEPARATOR}{name}" for name in compatible_adapters())]
        return {"object": "list",
                "data": [{"id": i, "object": "model", "created": started, "owned_by": "zyke"} for i in ids]}

    def chat_template() -> tuple[str, str, str] | None:
        backend = server.backend
        key = id(backend)
        if key not in templates:
            templates[key] = backend.chat_template() if backend is not None else None
        return templates[key]

    def job_for(body: ChatCompletionRequest | CompletionRequest, prompt: str, stops: list[str], kind: str,
                special: bool) -> CompletionJob:
        check_sampling(body)
        adapter = adapter_of(body.model)
        schema = output_schema(body)
        if schema is not None:
            check_schema(schema)
        assert server.core is not None
        requested = body.max_completion_tokens if isinstance(body, ChatCompletionRequest) else None
        return CompletionJob(
            request_id=f"{'chatcmpl' if kind == 'chat.completions' else 'cmpl'}-{secrets.token_hex(12)}",
            conn=None,  # type: ignore[arg-type]  # set by run_job
            prompt=prompt, schema=schema,
            max_tokens=requested or body.max_tokens or DEFAULT_COMPLETION_TOKENS,
            temperature=body.temperature if body.temperature is not None else 1.0,
            top_p=body.top_p if body.top_p is not None else 1.0,
            seed=body.seed % 2**63 if body.seed is not None else None,
            stops=[*body.stops(), *stops], adapter=adapter, enqueued_at=time.monotonic(), stream=bool(body.stream),
            kind=kind, special=special, top_k=body.top_k or 0,
            repeat_penalty=body.repeat_penalty if body.repeat_penalty is not None else 1.0,
        )

    @api.post("/v1/chat/completions", tags=["openai"], summary="OpenAI-style chat completion (stream: SSE)")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        ready()
        try:
            prompt, stops = render_chat(body.messages, chat_template())
        except ValueError as exc:
            raise ApiError(400, str(exc), param="messages") from None
        job = job_for(body, prompt, stops, "chat.completions", special=True)
        return await run_job(job, body.model, request, chat=True)

    @api.post("/v1/completions", tags=["openai"], summary="OpenAI-style text completion (stream: SSE)")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        ready()
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if len(prompts) != 1:
            raise ApiError(400, "prompt must be one string: this daemon answers one prompt per request",
                           param="prompt", code="unsupported_value")
        job = job_for(body, prompts[0], [], "completions", special=True)
        return await run_job(job, body.model, request, chat=False)

    def check_schema(schema: dict[str, Any]) -> None:
        """Refuse, as the caller's error, a response_format schema llguidance cannot decode under."""
        try:
            grammar = compile_schema(json.dumps(schema))
            # (is it an error, messages), checked against the model's own tokenizer, as decoding will use it
            tokenizer = server.backend.tokenizer if server.backend is not None else None
            failed, problems = LLMatcher.validate_grammar_with_warnings(grammar, tokenizer)
        except Exception as exc:  # its compiler raises ValueError or RuntimeError by case
            raise ApiError(400, f"response_format schema is not supported: {str(exc)[:500]}",
                           param="response_format") from None
        if failed:
            raise ApiError(400, f"response_format schema is not supported: {'; '.join(problems)[:500]}",
                           param="response_format")

    def api_error_of(frame: dict[str, Any]) -> ApiError:
        code = frame["code"]
        status = _status(code)
        kind = "invalid_request_error" if status < 500 else "server_error"
        named = {"too_long": "context_length_exceeded", "unknown_adapter": "model_not_found",
                 "queue_full": "rate_limit_exceeded"}
        return ApiError(status, frame["message"], kind, None, named.get(code, code))

    async def run_job(job: CompletionJob, model: str, request: Request, chat: bool) -> Response:
        if server.http_inflight >= server.config.max_connections:
            raise ApiError(429, f"the daemon already serves {server.config.max_connections} HTTP requests "
                           "(max_connections); retry", code="rate_limit_exceeded")
        peer = server.http_connection("default")
        job.conn = peer.core
        peer.core.pending[job.request_id] = job
        server.http_inflight += 1
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                server.http_inflight -= 1
                server.release(peer)

        try:
            server._apply(peer, Submit(job))
            first = await peer.events.get()
        except BaseException:
            release()
            raise
        if first[0] == "frame":
            release()
            raise api_error_of(first[1])
        if not job.stream:
            release()
            return JSONResponse(_final(job, model, first[1], chat))
        request.scope.setdefault("zyke.cleanup", []).append(release)  # the stream's own finally may never run
        return StreamingResponse(_stream(job, model, chat, first, peer, release), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def _stream(job: CompletionJob, model: str, chat: bool, first: tuple[str, Any], peer: HttpPeer,
                      release: Any) -> AsyncIterator[bytes]:
        created = now()
        kind = "chat.completion.chunk" if chat else "text_completion"

        def chunk(choices: list[dict[str, Any]], **extra: Any) -> bytes:
            doc = {"id": job.request_id, "object": kind, "created": created, "model": model, "choices": choices,
                   **extra}
            return b"data: " + json.dumps(doc, ensure_ascii=False).encode() + b"\n\n"

        def piece(text: str | None, finish: str | None) -> dict[str, Any]:
            if chat:
                return {"index": 0, "delta": {} if text is None else {"content": text}, "finish_reason": finish,
                        "logprobs": None}
            return {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}

        try:
            if chat:
                yield chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None,
                              "logprobs": None}])
            event = first
            while True:
                kind_, value = event
                if kind_ == "delta":
                    yield chunk([piece(value, None)])
                elif kind_ == "done":
                    result: CompletionResult = value
                    yield chunk([piece(None, result.finish_reason)])
                    yield chunk([], usage=usage(result.prompt_tokens, result.completion_tokens))
                    break
                else:  # an error frame after the stream began (a timeout): OpenAI's in-stream error event
                    error = api_error_of(value)
                    yield b"data: " + json.dumps(error.body()).encode() + b"\n\n"
                    break
                event = await peer.events.get()
            yield b"data: [DONE]\n\n"
        finally:
            release()  # the client may have left mid-stream: its job is cancelled here

    def _final(job: CompletionJob, model: str, result: CompletionResult, chat: bool) -> dict[str, Any]:
        if chat:
            choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": result.text},
                                      "finish_reason": result.finish_reason, "logprobs": None}
        else:
            choice = {"index": 0, "text": result.text, "finish_reason": result.finish_reason, "logprobs": None}
        return {"id": job.request_id, "object": "chat.completion" if chat else "text_completion", "created": now(),
                "model": model, "choices": [choice], "usage": usage(result.prompt_tokens, result.completion_tokens)}

    _npc_routes(api, server)
    api.openapi = lambda: _openapi(api)  # type: ignore[method-assign]
    return api


# --- /v1/npc/say ------------------------------------------------------------------------------------------------------

#: The npc.say fields an HTTP request carries over as they are.
_SAY_FIELDS = ("input", "state", "options", "adapter", "allowed_actions", "priority", "deadline_ms", "safety_report")
_REQUEST_SCHEMA = f"{SCHEMA_BASE}http/npc.say.json"


def _npc_routes(api: FastAPI, server: DaemonServer) -> None:
    request_schema = _bundle(load_schema("http/npc.say"))
    response_schema = _bundle(load_schema("http/npc.say.response"))

    @api.post("/v1/npc/say", tags=["npc"], summary="An NPC's line over plain HTTP (one, or several in order)",
              openapi_extra={"requestBody": {"required": True,
                                             "content": {"application/json": {"schema": request_schema}}}},
              responses={200: {"content": {"application/json": {"schema": response_schema}}},
                         400: {"description": "A typed error frame (bad_json, bad_frame, unknown_action...)"},
                         404: {"description": "unknown_npc or unknown_adapter, as an error frame"}})
    async def npc_say(request: Request) -> JSONResponse:
        def fail(code: ErrorCode, message: str, rid: str | None = None) -> JSONResponse:
            server.metrics.errors.labels(code.value).inc()
            return JSONResponse(error_frame(code, message, rid), status_code=_status(code.value))

        try:
            raw = json.loads(await request.body(), parse_constant=_no_constant)
        except RecursionError:
            return fail(ErrorCode.BAD_FRAME, "the body nests too deeply")
        except ValueError as exc:
            return fail(ErrorCode.BAD_JSON, f"the body is not JSON: {str(exc)[:200]}")
        if not isinstance(raw, dict):
            return fail(ErrorCode.BAD_FRAME, "the body must be a JSON object")
        batch = "requests" in raw
        try:
            problem = describe(validator_for({"$ref": f"{_REQUEST_SCHEMA}#/$defs/{'Batch' if batch else 'Single'}"}),
                               raw)
        except RecursionError:
            problem = "the body nests too deeply"
        if problem:
            return fail(ErrorCode.BAD_FRAME, f"invalid /v1/npc/say body: {problem}")
        if server.load_error is not None:
            return fail(ErrorCode.MODEL_ERROR, f"the model failed to load: {server.load_error}")
        if server.core is None:
            return fail(ErrorCode.MODEL_ERROR, "the model is still loading; retry in a moment")
        items: list[dict[str, Any]] = raw["requests"] if batch else [raw]
        ids = [item.get("id") or f"r{i}" for i, item in enumerate(items)]
        if len(set(ids)) != len(ids):
            return fail(ErrorCode.DUPLICATE_ID, "two requests of the batch carry the same id")
        if server.http_inflight >= server.config.max_connections:
            return fail(ErrorCode.TOO_MANY_CONNECTIONS, f"the daemon already serves "
                        f"{server.config.max_connections} HTTP requests (max_connections); retry")
        server.http_inflight += 1
        peer = server.http_connection(raw.get("game") or "default")
        try:
            answers = await _say_all(server, peer, items, ids)
        finally:
            server.http_inflight -= 1
            server.release(peer)
        if batch:
            return JSONResponse({"replies": answers})
        answer = answers[0]
        return JSONResponse(answer, status_code=200 if answer["type"] == "reply" else _status(answer["code"]))


async def _say_all(server: DaemonServer, peer: HttpPeer, items: list[dict[str, Any]],
                   ids: list[str]) -> list[dict[str, Any]]:
    """Feed each request to the virtual connection as the npc.define (when it carries a whole NPC) and npc.say
    frames a WebSocket client would send, and collect their answers in order. Up to ``max_queued_per_client`` run
    at once, but never two for one NPC: a later line to an NPC must see the earlier one's reply in its history,
    and a definition must not change under a line still waiting."""
    answers: list[dict[str, Any] | None] = [None] * len(items)
    pending: dict[str, int] = {}
    busy: set[str] = set()
    window = max(1, server.config.max_queued_per_client)
    waiting = list(range(len(items)))

    def npc_id(item: dict[str, Any]) -> str:
        npc = item["npc"]
        ident: str = npc["id"] if isinstance(npc, dict) else npc
        return ident

    def submit(i: int) -> None:
        item, rid = items[i], ids[i]
        if isinstance(item["npc"], dict):
            define = {"v": 1, "type": "npc.define", "id": rid, "npc": item["npc"]}
            actions = peer.core.receive(_frame_text(define))
            errors = [a for a in actions if getattr(a, "frame", {}).get("type") == "error"]
            if errors:  # answered with the define's error; the line is not sent
                for action in errors:
                    server._apply(peer, action)
                pending[rid] = i
                return
            for action in actions:
                server._apply(peer, action)
        say = {"v": 1, "type": "npc.say", "id": rid, "npc": npc_id(item),
               **{k: item[k] for k in _SAY_FIELDS if k in item}}
        pending[rid] = i
        for action in peer.core.receive(_frame_text(say)):
            server._apply(peer, action)

    while waiting or pending:
        for i in list(waiting):
            if len(pending) >= window:
                break
            if npc_id(items[i]) in busy:
                continue
            waiting.remove(i)
            busy.add(npc_id(items[i]))
            submit(i)
        kind, frame = await peer.events.get()
        if kind != "frame" or frame.get("type") not in ("reply", "error") or frame.get("id") not in pending:
            continue  # npc.defined, or something of no request of this body
        i = pending.pop(frame["id"])
        busy.discard(npc_id(items[i]))
        answers[i] = frame
    return [a for a in answers if a is not None]


def _frame_text(frame: dict[str, Any]) -> str:
    """A frame as the text a WebSocket client would send. A lone UTF-16 surrogate (JSON's ``\\ud800`` escape, valid
    in the body) cannot be UTF-8 text: it stays escaped, so the core refuses it as ``bad_frame``, as it does on a
    WebSocket."""
    text = json.dumps(frame, ensure_ascii=False)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(frame)
    return text


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


# --- the OpenAPI description ------------------------------------------------------------------------------------------


def _bundle(schema: dict[str, Any]) -> dict[str, Any]:
    """A schema of schemas/ with every ``$ref`` inlined, for ``/openapi.json``: the ``$id``s are names, not
    addresses anything could fetch (the daemon has no network), and OpenAPI tools resolve refs by URL. The shared
    definitions nest only a few levels and none refers to itself, so inlining terminates."""

    def resolve(ref: str, base: str) -> tuple[dict[str, Any], str]:
        address, _, pointer = ref.partition("#")
        doc_id = address if address.startswith("http") else (base if not address else
                                                             base.rsplit("/", 1)[0] + "/" + address)
        name = doc_id.removeprefix(SCHEMA_BASE).removesuffix(".json")
        node: Any = load_schema(name)
        for part in [p for p in pointer.split("/") if p]:
            node = node[part]
        return node, doc_id

    def walk(node: Any, base: str, depth: int = 0) -> Any:
        if depth > 64:
            raise RecursionError("a schema refers to itself")
        if isinstance(node, list):
            return [walk(v, base, depth) for v in node]
        if not isinstance(node, dict):
            return node
        out = {k: walk(v, base, depth) for k, v in node.items()
               if k not in ("$schema", "$id", "$defs", "$ref", "examples")}
        if "$ref" in node:
            target, target_base = resolve(node["$ref"], base)
            inlined = walk(deepcopy(target), target_base, depth + 1)
            out = {**inlined, **out} if out else inlined
        return out

    bundled: dict[str, Any] = walk(schema, schema["$id"])
    return bundled


def _openapi(api: FastAPI) -> dict[str, Any]:
    if api.openapi_schema is None:
        doc = get_openapi(title=api.title, version=api.version, description=api.description, routes=api.routes)
        doc.setdefault("components", {})["securitySchemes"] = {
            "bearer": {"type": "http", "scheme": "bearer", "description": "The daemon's token"}}
        for path, operations in doc["paths"].items():
            if path.startswith("/v1"):
                for operation in operations.values():
                    operation["security"] = [{"bearer": []}]
                    operation.setdefault("responses", {}).setdefault(
                        "401", {"description": "Missing or wrong token"})
        api.openapi_schema = doc
    return api.openapi_schema
