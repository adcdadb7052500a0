"""The daemon's HTTP API (issue 16), spoken by clients nobody here wrote: the official ``openai`` package, ``httpx``
and schemathesis, against the real daemon and the real embedded model over loopback.

What must hold: the OpenAI-compatible endpoints answer as OpenAI's clients expect (sync, streaming, JSON decoded
under a schema), a model id picks an adapter and gives exactly what the same adapter gives over the WebSocket,
``/v1/npc/say`` shares NPCs with the WebSocket protocol, every refusal is a typed error, and no body makes the
daemon answer 5xx.
"""

from __future__ import annotations

import json
import re
import signal
from collections.abc import Iterator
from typing import Any

import httpx
import jsonschema
import openai
import pytest
import schemathesis
from daemon_proc import DaemonProcess
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from websockets.sync.client import connect
from zyke.prompt_format import render_prompt, render_reply, reply_schema
from zyke.protocol import NpcSpec
from zyke.protocol.validation import first_error, validator_for
from zyke_daemon.openai_format import ChatMessage, StopScanner, render_chat

pytestmark = pytest.mark.slow

SMITH = {"id": "brom", "name": "Brom", "persona": "A grumpy dwarf blacksmith who loves his forge.",
         "actions": ["none", "trade", "repair", "attack"], "emotions": ["neutral", "angry", "pleased"]}
#: a loaded 2-core box queues requests behind each other on one model thread
WAIT_S = 400
FUZZ_EXAMPLES = 30


@pytest.fixture(scope="module")
def api(daemon: DaemonProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{daemon.http}/v1", api_key=daemon.token, max_retries=0, timeout=WAIT_S)


@pytest.fixture(scope="module")
def web(daemon: DaemonProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=daemon.http, headers={"Authorization": f"Bearer {daemon.token}"},
                      timeout=WAIT_S) as client:
        yield client


@pytest.fixture(scope="module")
def base(api: openai.OpenAI) -> str:
    return api.models.list().data[0].id


def ws_say(daemon: DaemonProcess, game: str, frames: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Send frames over a real WebSocket (after hello) and return the final answer to each."""
    answers = []
    with connect(daemon.url, max_size=None) as ws:
        ws.send(json.dumps({"v": 1, "type": "hello", "id": "h", "token": daemon.token, "protocol": 1, "game": game}))
        assert json.loads(ws.recv(WAIT_S))["type"] == "welcome"
        for frame in frames:
            ws.send(json.dumps(frame))
            while (answer := json.loads(ws.recv(WAIT_S)))["type"] == "reply.delta":
                pass
            assert answer["id"] == frame["id"], answer
            answers.append(answer)
    return answers


# --- the OpenAI-compatible API, through the official client --------------------------------------------------------


def test_models_list_the_base_and_each_adapter_as_a_model_id(api: openai.OpenAI, base: str) -> None:
    ids = [m.id for m in api.models.list().data]
    assert ids[0] == base and base.startswith("gemma-3-270m")
    assert f"{base}:npc-default" in ids  # the shipped adapter, addressed as <base>:<adapter>
    assert all(m.object == "model" and m.owned_by == "zyke" for m in api.models.list().data)


def test_chat_completion_sync_and_streamed_deltas_add_up_to_the_same_text(api: openai.OpenAI, base: str) -> None:
    request: dict[str, Any] = {"model": base, "max_tokens": 24, "temperature": 0, "seed": 7,
                               "messages": [{"role": "system", "content": "You are a tavern keeper."},
                                            {"role": "user", "content": "What is on the menu tonight?"}]}
    whole = api.chat.completions.create(**request)
    choice = whole.choices[0]
    assert whole.object == "chat.completion" and choice.message.role == "assistant"
    assert choice.message.content and choice.finish_reason in ("stop", "length")
    assert whole.usage is not None and whole.usage.completion_tokens >= 1 and whole.usage.prompt_tokens > 10
    assert "\nUser:" not in choice.message.content  # the fallback transcript's stop strings cut it there
    assert "\nSystem:" not in choice.message.content

    chunks = list(api.chat.completions.create(**request, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == choice.finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage is not None  # the final usage chunk
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_the_stream_is_server_sent_events_ending_with_done(web: httpx.Client, base: str) -> None:
    body = {"model": base, "prompt": "The blacksmith said", "max_tokens": 12, "temperature": 0, "stream": True}
    with web.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "text_completion" for c in chunks)
    assert chunks[-1]["usage"]["completion_tokens"] >= 1
    streamed = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
    whole = web.post("/v1/completions", json={**body, "stream": False}).json()
    assert streamed == whole["choices"][0]["text"]


def test_response_format_json_schema_is_decoded_under_the_schema(api: openai.OpenAI, base: str) -> None:
    schema = {"type": "object", "additionalProperties": False, "required": ["name", "mood", "gold"],
              "properties": {"name": {"type": "string", "maxLength": 24}, "mood": {"enum": ["happy", "grim"]},
                             "gold": {"type": "integer", "minimum": 0, "maximum": 999}}}
    for seed in (1, 2):
        reply = api.chat.completions.create(
            model=base, max_tokens=64, temperature=0.9, seed=seed,
            messages=[{"role": "user", "content": "Describe a shopkeeper as JSON."}],
            response_format={"type": "json_schema", "json_schema": {"name": "shopkeeper", "schema": schema}})
        assert reply.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(reply.choices[0].message.content or ""), schema)
    anything = api.chat.completions.create(model=base, max_tokens=48, temperature=0,
                                           messages=[{"role": "user", "content": "A JSON object, please."}],
                                           response_format={"type": "json_object"})
    if anything.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(anything.choices[0].message.content or ""), dict)


def test_a_model_id_picks_the_adapter_exactly_as_the_websocket_does(daemon: DaemonProcess, web: httpx.Client,
                                                                     base: str, request: pytest.FixtureRequest) -> None:
    """The same prompt under the same adapter gives the same text over both: /v1/completions with the NPC's
    rendered prompt and its reply schema as response_format, and npc.say over a WebSocket with the same decoding
    options (the NPC default repeat penalty, which llama.cpp's name carries over HTTP; no no-repeat rule, which
    has no OpenAI counterpart)."""
    spec = NpcSpec.model_validate(SMITH)
    line, state = "Can you fix my sword?", {"gold": 12}
    options = {"temperature": 0, "max_tokens": 96, "repeat_penalty": 1.15, "no_repeat_ngram": 0}
    game = re.sub(r"[^A-Za-z0-9_.-]", "_", request.node.name)[-40:]
    texts = {}
    for adapter, model in (("npc-default", f"{base}:npc-default"), ("base", base)):
        defined, said = ws_say(daemon, f"{game}-{adapter}", [
            {"v": 1, "type": "npc.define", "id": "d", "npc": SMITH},
            {"v": 1, "type": "npc.say", "id": "s", "npc": "brom", "input": line, "state": state, "adapter": adapter,
             "options": options}])
        assert defined["type"] == "npc.defined"
        assert said["type"] == "reply", said
        http = web.post("/v1/completions", json={
            "model": model, "prompt": render_prompt(spec, [], line, state), "max_tokens": 96, "temperature": 0,
            "repeat_penalty": 1.15,
            "response_format": {"type": "json_schema", "json_schema": {"name": "reply", "schema": reply_schema(spec)}},
        }).json()
        choice = http["choices"][0]
        assert choice["finish_reason"] == said["finish_reason"], (http, said)
        if adapter == "npc-default":
            assert said["finish_reason"] == "stop", said  # the NPC adapter ends its reply
        if said["finish_reason"] == "stop":
            assert json.loads(choice["text"]) == said["reply"]
            assert choice["text"] == render_reply(said["reply"])  # token for token, not only the same JSON
        else:  # cut by max_tokens: the WebSocket reply completes the cut JSON, so compare the line's start
            assert choice["text"].startswith('{"say": "' + said["reply"]["say"][:40].replace('"', '\\"'))
        texts[adapter] = choice["text"]
    assert texts["npc-default"] != texts["base"]  # and the adapter does change the output


def test_the_safety_rail_keeps_blocked_words_out_of_completions(daemon: DaemonProcess, web: httpx.Client,
                                                               base: str) -> None:
    """The daemon's rail (audience minor by default) judges every token of a completion: told by its schema it may
    only write one blocked word, the model cannot, and the reply stops short instead."""
    before = _blocked(daemon)
    body = {"model": base, "prompt": "He shouted:", "max_tokens": 8, "temperature": 0,
            "response_format": {"type": "json_schema", "json_schema": {"name": "w", "schema": {"enum": ["shit"]}}}}
    choice = web.post("/v1/completions", json=body).json()["choices"][0]
    assert "shit" not in choice["text"] and choice["finish_reason"] == "length"
    assert _blocked(daemon) > before


def _blocked(daemon: DaemonProcess) -> float:
    metrics = httpx.get(f"{daemon.http}/metrics", timeout=30).text
    return sum(float(m) for m in re.findall(r'^zyke_safety_blocked_total\{category="profanity",stage="decode"\} (\S+)',
                                            metrics, re.M))


# --- /v1/npc/say ----------------------------------------------------------------------------------------------------


def test_npc_say_over_http_shares_npcs_with_the_websocket(daemon: DaemonProcess, web: httpx.Client,
                                                          request: pytest.FixtureRequest) -> None:
    game = re.sub(r"[^A-Za-z0-9_.-]", "_", request.node.name)[-40:]
    one = web.post("/v1/npc/say", json={"game": game, "npc": SMITH, "input": "Hello there.",
                                        "options": {"max_tokens": 40}})
    assert one.status_code == 200, one.text
    reply = one.json()
    assert first_error("frames/reply", reply) is None and reply["id"] == "r0"
    assert validator_for(reply_schema(NpcSpec.model_validate(SMITH))).is_valid(reply["reply"])
    # a batch, answered in order; the second line to brom sees the first in its history
    batch = web.post("/v1/npc/say", json={"game": game, "requests": [
        {"id": "a", "npc": "brom", "input": "How much for a repair?", "options": {"max_tokens": 40}},
        {"id": "b", "npc": "brom", "input": "Fine, do it.", "allowed_actions": ["none", "repair"],
         "options": {"max_tokens": 40}},
        {"id": "c", "npc": "nobody", "input": "Hi."},
        {"id": "d", "npc": "brom", "input": "Fly!", "allowed_actions": ["fly"]}]})
    assert batch.status_code == 200, batch.text
    replies = batch.json()["replies"]
    assert first_error("http/npc.say.response", batch.json()) is None
    assert [r["id"] for r in replies] == ["a", "b", "c", "d"]
    assert [r["type"] for r in replies] == ["reply", "reply", "error", "error"]
    assert replies[1]["reply"]["action"] in ("none", "repair")
    assert replies[2]["code"] == "unknown_npc" and replies[3]["code"] == "unknown_action"
    # the WebSocket of the same game sees the same NPC and all three turns
    [state] = ws_say(daemon, game, [{"v": 1, "type": "npc.state.get", "id": "g", "npc": "brom"}])
    assert [t["player"] for t in state["state"]["history"]] == ["Hello there.", "How much for a repair?",
                                                                "Fine, do it."]
    assert state["state"]["history"][1]["reply"] == replies[0]["reply"]
    # and an NPC defined over the WebSocket answers over HTTP
    ws_say(daemon, game, [{"v": 1, "type": "npc.define", "id": "d", "npc": {**SMITH, "id": "hilda"}}])
    again = web.post("/v1/npc/say", json={"game": game, "npc": "hilda", "input": "Hi.", "options": {"max_tokens": 24}})
    assert again.status_code == 200 and again.json()["npc"] == "hilda"


@pytest.mark.parametrize(("body", "status", "code"), [
    ({"npc": "nobody", "input": "Hi."}, 404, "unknown_npc"),
    ({"npc": "brom"}, 400, "bad_frame"),
    ({"npc": "brom", "input": "Hi.", "stream": True}, 400, "bad_frame"),
    ({"npc": {**SMITH, "actions": []}, "input": "Hi."}, 400, "bad_frame"),
    ({"npc": "brom", "input": "Hi.", "adapter": "no-such-adapter"}, 404, "unknown_adapter"),
    ({"requests": []}, 400, "bad_frame"),
    ({"requests": [{"id": "x", "npc": "a", "input": "1"}, {"id": "x", "npc": "b", "input": "2"}]}, 409,
     "duplicate_id"),
])
def test_npc_say_refusals_are_typed_error_frames(web: httpx.Client, body: dict[str, Any], status: int,
                                                 code: str) -> None:
    if body.get("adapter"):
        assert web.post("/v1/npc/say", json={"npc": SMITH, "input": "Hi.", "options": {"max_tokens": 8}}) \
            .status_code == 200  # brom exists in the default game, so the adapter is what is refused
    response = web.post("/v1/npc/say", json=body)
    assert response.status_code == status, response.text
    assert response.json()["type"] == "error" and response.json()["code"] == code
    assert first_error("frames/error", response.json()) is None


def test_npc_say_bodies_that_are_not_json(web: httpx.Client) -> None:
    for raw, code in ((b"{", "bad_json"), (b"[1, 2]", "bad_frame"), (b'{"npc": NaN}', "bad_json"),
                      (b"[" * 50_000 + b"]" * 50_000, "bad_frame")):
        response = web.post("/v1/npc/say", content=raw, headers={"Content-Type": "application/json"})
        assert response.status_code in (400, 413), (raw[:20], response.text)
        assert response.json()["code"] in (code, "frame_too_large")


# --- refusals: token, Origin, Host, size, bad bodies ----------------------------------------------------------------


def test_the_token_guards_v1_and_errors_are_openai_shaped(daemon: DaemonProcess, base: str) -> None:
    wrong = openai.OpenAI(base_url=f"{daemon.http}/v1", api_key="not-the-token", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as refused:
        wrong.models.list()
    assert refused.value.status_code == 401 and refused.value.code == "invalid_api_key"
    with httpx.Client(base_url=daemon.http, timeout=30) as anonymous:
        for method, path in (("GET", "/v1/models"), ("POST", "/v1/chat/completions"), ("POST", "/v1/npc/say")):
            response = anonymous.request(method, path, json={})
            assert response.status_code == 401, (path, response.text)
            assert response.headers["www-authenticate"] == "Bearer"
        assert anonymous.get("/v1/models").json()["error"]["type"] == "invalid_request_error"
        assert anonymous.post("/v1/npc/say", json={}).json()["code"] == "unauthorized"
        assert anonymous.get("/health").status_code == 200  # health and metrics need no token, as before
        assert anonymous.get("/openapi.json").status_code == 200


def test_browser_origins_and_foreign_host_names_are_refused(daemon: DaemonProcess, web: httpx.Client) -> None:
    evil = web.get("/v1/models", headers={"Origin": "https://evil.example"})
    assert evil.status_code == 403 and evil.json()["error"]["type"] == "permission_error"
    rebound = web.get("/v1/models", headers={"Host": "evil.example"})
    assert rebound.status_code == 403
    preflight = web.options("/v1/chat/completions", headers={"Origin": "https://evil.example"})
    assert preflight.status_code == 403


def test_browser_origin_allowed_by_the_daemon_gets_cors(tmp_path: Any) -> None:
    proc = DaemonProcess(tmp_path / "home", extra_args=["--allow-origin", "https://tool.example"]).start()
    try:
        with httpx.Client(base_url=proc.http, timeout=60) as web:
            preflight = web.options("/v1/models", headers={"Origin": "https://tool.example",
                                                           "Access-Control-Request-Method": "GET"})
            assert preflight.status_code == 204
            assert preflight.headers["access-control-allow-origin"] == "https://tool.example"
            assert "authorization" in preflight.headers["access-control-allow-headers"]
            models = web.get("/v1/models", headers={"Origin": "https://tool.example",
                                                    "Authorization": f"Bearer {proc.token}"})
            assert models.status_code == 200 and models.headers["access-control-allow-origin"] == "https://tool.example"
    finally:
        proc.stop()


@pytest.mark.parametrize(("body", "param"), [
    ({"messages": [{"role": "user", "content": "hi"}]}, "model"),
    ({"model": "MODEL"}, "messages"),
    ({"model": "MODEL", "messages": []}, "messages"),
    ({"model": "MODEL", "messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
    ({"model": "MODEL", "messages": [{"role": "user", "content": "hi"}], "n": 2}, "n"),
    ({"model": "MODEL", "messages": [{"role": "user", "content": "hi"}], "temperature": 5}, "temperature"),
    ({"model": "MODEL", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, "max_tokens"),
    ({"model": "MODEL", "messages": [{"role": "user", "content": "hi"}], "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"model": "MODEL", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages"),
    ({"model": "MODEL", "messages": [{"role": "user", "content": "hi"}],
      "response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format"),
    ({"model": "MODEL", "messages": [{"role": "user", "content": "hi"}],
      "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}},
     "response_format"),
])
def test_malformed_chat_requests_are_typed_400s(web: httpx.Client, base: str, body: dict[str, Any],
                                                param: str) -> None:
    body = json.loads(json.dumps(body).replace("MODEL", base))
    response = web.post("/v1/chat/completions", json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert (error["param"] or "").startswith(param), error


def test_other_refusals(web: httpx.Client, base: str, api: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as missing:
        api.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert missing.value.code == "model_not_found"
    not_json = web.post("/v1/chat/completions", content=b"{nope", headers={"Content-Type": "application/json"})
    assert not_json.status_code == 400 and not_json.json()["error"]["type"] == "invalid_request_error"
    huge = web.post("/v1/chat/completions", json={"model": base, "messages": [{"role": "user",
                                                                              "content": "x" * 300_000}]})
    assert huge.status_code == 413 and huge.json()["error"]["code"] == "frame_too_large"
    too_long = web.post("/v1/completions", json={"model": base, "prompt": "word " * 12_000, "max_tokens": 4})
    assert too_long.status_code == 400 and too_long.json()["error"]["code"] == "context_length_exceeded"
    assert web.get("/v1/nothing").status_code == 404 and web.get("/v1/nothing").json()["error"]["code"] == "not_found"
    assert web.get("/v1/chat/completions").status_code == 405


def test_http_requests_are_counted_with_the_websocket_ones(daemon: DaemonProcess) -> None:
    metrics = httpx.get(f"{daemon.http}/metrics", timeout=30).text
    assert re.search(r'^zyke_requests_total\{type="chat\.completions"\} [1-9]', metrics, re.M)
    assert re.search(r'^zyke_requests_total\{type="completions"\} [1-9]', metrics, re.M)


# --- the OpenAPI description, fuzzed ---------------------------------------------------------------------------------


class _FuzzDaemon(DaemonProcess):
    @property
    def env(self) -> dict[str, str]:  # every reply at most 4 tokens: the fuzzer's valid bodies stay quick
        return {**super().env, "ZYKE_NORMAL_MAX_TOKENS": "4"}


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    proc = _FuzzDaemon(tmp_path_factory.mktemp("http-fuzz")).start()
    yield proc
    proc.stop(signal.SIGKILL)


def test_openapi_fuzzing_never_gets_a_server_error(fuzzed: DaemonProcess) -> None:
    schema = schemathesis.openapi.from_url(fuzzed.http + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/health", "/metrics", "/v1/models", "/v1/chat/completions",
                                             "/v1/completions", "/v1/npc/say"}
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck),
                  database=None)
        def fuzz(case: schemathesis.Case) -> None:
            for headers in (None, {"Authorization": f"Bearer {fuzzed.token}"}):
                response = case.call(base_url=fuzzed.http, headers=headers, timeout=120)
                assert response.status_code < 500, (case.method, case.path, response.status_code,
                                                    response.text[:500])
                case.validate_response(response, checks=[not_a_server_error])
                if response.status_code >= 400 and case.path.startswith("/v1"):
                    body = response.json()
                    assert "error" in body or body.get("type") == "error", body  # typed, never a bare 4xx

        fuzz()
    assert fuzzed.proc is not None and fuzzed.proc.poll() is None


# --- the pieces, without a daemon ------------------------------------------------------------------------------------


def test_stop_strings_are_cut_and_never_streamed() -> None:
    scanner = StopScanner(["\nUser:"])
    released = [scanner.feed(p) for p in ["Hello", " there\n", "Us", "er: more"]]
    assert "".join(released) == "Hello there" and scanner.stopped and scanner.text == "Hello there"
    partial = StopScanner(["\nUser:"])
    assert partial.feed("a\nUs") == "a" and partial.flush() == "\nUs" and partial.text == "a\nUs"


def test_chat_prompt_uses_the_models_template_or_the_documented_fallback() -> None:
    messages = [ChatMessage(role="system", content="Be brief."), ChatMessage(role="user", content="Hi!")]
    prompt, stops = render_chat(messages, None)
    assert prompt == "System: Be brief.\nUser: Hi!\nAssistant:" and stops == ["\nUser:", "\nSystem:"]
    gemma = ("{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' "
             "else m['role'] }}\n{{ m['content'] }}<end_of_turn>\n{% endfor %}"
             "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")
    prompt, stops = render_chat(messages, (gemma, "<bos>", "<eos>"))
    assert prompt == ("<start_of_turn>system\nBe brief.<end_of_turn>\n<start_of_turn>user\nHi!<end_of_turn>\n"
                      "<start_of_turn>model\n")  # the BOS text dropped: the tokenizer adds BOS itself
    assert stops == ["<eos>"]


def test_http_schemas_examples_validate() -> None:
    from zyke.protocol import load_schema

    for name in ("http/npc.say", "http/npc.say.response"):
        for example in load_schema(name)["examples"]:
            assert first_error(name, example) is None
