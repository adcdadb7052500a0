"""The OpenAI-compatible API's wire format: request models, response and error bodies, and the chat prompt.

Requests are pydantic models so FastAPI validates them and describes them in ``/openapi.json``; they ignore
fields they do not know, because the clients that speak this API (the ``openai`` package, Open WebUI,
LangChain) send many optional ones (``user``, ``logit_bias``, ``presence_penalty``...) that a local NPC model has
no use for. What is honoured is listed in docs/HTTP.md. Free of sockets and of the model: the routes
(http_api.py) and the model-thread side (completions.py) both use it.
"""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

#: Completion tokens when the request names no max_tokens. OpenAI's default is "until the context is full";
#: on a CPU that is minutes of a small model rambling, so the daemon stops earlier (docs/HTTP.md).
DEFAULT_COMPLETION_TOKENS = 256
#: The most completion tokens one request may ask for (the context bounds it further).
MAX_COMPLETION_TOKENS = 32768
#: Stop strings per request, as OpenAI allows.
MAX_STOP = 4
#: How the daemon names a model with an adapter: ``<base model id>:<adapter name>`` (docs/HTTP.md).
ADAPTER_SEPARATOR = ":"

#: The prompt for a model without a chat template (the embedded Gemma 3 270M is a base model): a plain
#: transcript the model continues after ``Assistant:``, cut where it starts writing the user's next line.
FALLBACK_ROLES = {"system": "System", "developer": "System", "user": "User", "assistant": "Assistant",
                  "tool": "Tool"}
FALLBACK_STOPS = ["\nUser:", "\nSystem:"]


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


class TextPart(_Lenient):
    type: Literal["text"]
    text: str


class ChatMessage(_Lenient):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    #: text, or a list of content parts of which only text parts are supported (images are refused)
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None

    def text(self) -> str:
        """The message as text; a non-text content part is the caller's error (ValueError)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        texts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError(f"content part of type {str(part.get('type'))[:40]!r} is not supported: "
                                 "this model reads text only")
            texts.append(part["text"])
        return "".join(texts)


class JsonSchemaFormat(_Lenient):
    name: str = Field(default="response", max_length=64)
    description: str | None = None
    #: the JSON Schema the output is decoded under (llguidance's JSON Schema support)
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Lenient):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StreamOptions(_Lenient):
    include_usage: bool | None = None


class _Sampling(_Lenient):
    """The generation fields both endpoints share."""

    model: str = Field(min_length=1, max_length=256)
    max_tokens: int | None = Field(default=None, ge=1, le=MAX_COMPLETION_TOKENS)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int | None = Field(default=None, ge=1, le=128)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    response_format: ResponseFormat | None = None
    #: llama.cpp server's extras, honoured by name as its OpenAI-compatible endpoints do (off by default)
    repeat_penalty: float | None = Field(default=None, ge=1, le=2)
    top_k: int | None = Field(default=None, ge=0, le=1000)

    def stops(self) -> list[str]:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return [s for s in stop if s]


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1, max_length=512)
    #: the newer name of max_tokens (o-series clients send it)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=MAX_COMPLETION_TOKENS)


class CompletionRequest(_Sampling):
    prompt: str | list[str]


class ApiError(Exception):
    """An error the API answers with an OpenAI-style body and an HTTP status."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """``{"error": {"message", "type", "param", "code"}}``: what OpenAI answers and its clients parse."""
    return {"error": {"message": message[:1000], "type": type_, "param": param, "code": code}}


def check_sampling(request: _Sampling) -> None:
    """The rules pydantic's field types do not say: n must be 1, at most four stop strings, a json_schema
    response_format carries a schema."""
    if request.n is not None and request.n != 1:
        raise ApiError(400, "n must be 1: this daemon returns one choice per request", param="n",
                       code="unsupported_value")
    stops = [request.stop] if isinstance(request.stop, str) else (request.stop or [])
    if len(stops) > MAX_STOP or any(len(s) > 256 for s in stops):
        raise ApiError(400, f"stop takes at most {MAX_STOP} strings of at most 256 characters", param="stop")
    fmt = request.response_format
    if fmt is not None and fmt.type == "json_schema" and (fmt.json_schema is None or not fmt.json_schema.schema_):
        raise ApiError(400, "response_format json_schema needs json_schema.schema", param="response_format")


def output_schema(request: _Sampling) -> dict[str, Any] | None:
    """The JSON Schema to decode under (None: free text)."""
    fmt = request.response_format
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return {"type": "object"}
    assert fmt.json_schema is not None
    return fmt.json_schema.schema_


def render_chat(messages: list[ChatMessage], template: tuple[str, str, str] | None) -> tuple[str, list[str]]:
    """The prompt for ``messages`` and the stop strings it implies.

    With the model's own chat template (GGUF ``tokenizer.chat_template``, or the transformers tokenizer's), the
    template renders it in a sandbox as llama.cpp's server and llama-cpp-python do (``add_generation_prompt``).
    Without one, the documented fallback: one ``Role: text`` line per message, then ``Assistant:``, stopping
    where the model starts the user's next line."""
    texts = [(m.role, m.text()) for m in messages]
    if template is None:
        lines = [f"{FALLBACK_ROLES[role]}: {text}" for role, text in texts]
        return "\n".join([*lines, "Assistant:"]), list(FALLBACK_STOPS)
    source, bos, eos = template
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise ApiError(400, f"the model's chat template refused the messages: {message}", param="messages")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    try:
        prompt = env.from_string(source).render(
            messages=[{"role": role, "content": text} for role, text in texts], bos_token=bos, eos_token=eos,
            add_generation_prompt=True, raise_exception=raise_exception)
    except TemplateError as exc:
        raise ApiError(400, f"the model's chat template failed on these messages: {exc}", param="messages") from None
    if bos and prompt.startswith(bos):  # the tokenizer adds BOS itself
        prompt = prompt[len(bos):]
    return prompt, [eos] if eos else []


class StopScanner:
    """Cuts generated text at the first stop string, holding back a tail that may be the start of one so that
    streamed deltas never show text the final answer will not have."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = stops
        self.text = ""  # everything released so far
        self._pending = ""
        self.stopped = False

    def feed(self, piece: str) -> str:
        """Take a generated piece; return the text that may be released now."""
        if self.stopped:
            return ""
        buf = self._pending + piece
        cut = min((i for i in (buf.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            self._pending = ""
            out = buf[:cut]
        else:
            hold = max((k for s in self.stops for k in range(1, len(s)) if buf.endswith(s[:k])), default=0)
            out, self._pending = buf[:len(buf) - hold], buf[len(buf) - hold:]
        self.text += out
        return out

    def flush(self) -> str:
        """The held-back tail, once generation ended without reaching a stop string."""
        out, self._pending = self._pending, ""
        self.text += out
        return out


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def now() -> int:
    return int(time.time())
