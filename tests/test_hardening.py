"""Hostile and unlucky input (issue 14): every case gets a typed error or is served, and the connection carries on.

Most cases drive the sans-I/O core directly (no socket, no model); the Host header check runs the real server
code over loopback, in-process, with a model load that never finishes (/health answers while loading).
"""

from __future__ import annotations

import asyncio
import http.client
import json
import threading
from pathlib import Path
from typing import Any

import jsonschema._utils
import pytest
from pydantic import TypeAdapter
from zyke.protocol import CLIENT_FRAMES, ErrorCode, ModelInfo, NpcSpec, load_schema
from zyke.protocol.validation import first_error
from zyke_daemon import core as core_module
from zyke_daemon.adapters import MANIFEST, AdapterRegistry
from zyke_daemon.config import DaemonConfig
from zyke_daemon.core import (
    MAX_ERROR_MESSAGE_CHARS,
    MAX_FREEFORM_BYTES,
    MAX_FREEFORM_DEPTH,
    ConnectionCore,
    DaemonCore,
    Submit,
)
from zyke_daemon.errors import DaemonError
from zyke_daemon.server import DaemonServer, host_allowed
from zyke_daemon.sessions import SessionStore

TOKEN = "secret"
BROM = {"id": "brom", "name": "Brom", "persona": "A grumpy dwarf smith.", "actions": ["none", "repair"],
        "emotions": ["neutral", "angry"], "defaults": {"emotion": "neutral", "action": "none"}}
PING = {"v": 1, "type": "ping", "id": "still-here"}


def make_daemon(tmp_path: Path, registry: AdapterRegistry | None = None, **cfg: Any) -> DaemonCore:
    adapters = (lambda: registry.infos([])) if registry is not None else list
    return DaemonCore(DaemonConfig(**cfg), SessionStore(tmp_path / "npcs"), TOKEN, ModelInfo(name="test.gguf"),
                      "test", adapters=adapters)


def send(conn: ConnectionCore, frame: Any) -> list[Any]:
    return conn.receive(frame if isinstance(frame, str | bytes) else json.dumps(frame))


def frames(actions: list[Any]) -> list[dict[str, Any]]:
    out = [a.frame for a in actions if isinstance(a, core_module.Send)]
    for f in out:
        assert first_error("server", f) is None, f
        json.dumps(f, ensure_ascii=False).encode("utf-8")  # sendable: no lone surrogate comes back
    return out


def error(actions: list[Any]) -> dict[str, Any]:
    [frame] = frames(actions)
    assert frame["type"] == "error", frame
    return frame


def hello(conn: ConnectionCore, game: str | None = None) -> None:
    extra = {"game": game} if game else {}
    [welcome] = frames(send(conn, {"v": 1, "type": "hello", "id": "h", "token": TOKEN, "protocol": 1, **extra}))
    assert welcome["type"] == "welcome"


def carries_on(conn: ConnectionCore) -> None:
    """The connection still answers a good request after the bad one."""
    assert frames(send(conn, PING)) == [{"v": 1, "type": "pong", "id": "still-here"}]


@pytest.fixture
def conn(tmp_path: Path) -> ConnectionCore:
    c = make_daemon(tmp_path).connect()
    hello(c)
    frames(send(c, {"v": 1, "type": "npc.define", "id": "d", "npc": BROM}))
    return c


def nested(depth: int, leaf: Any = 1) -> Any:
    value = leaf
    for _ in range(depth):
        value = {"k": value}
    return value


# --- 1. one unauthenticated frame froze the daemon -------------------------------------------------------------


def _mixed_labels_frame(n: int) -> dict[str, Any]:
    """Labels mixed with described labels do not sort, which sent jsonschema's uniqueItems to compare every pair."""
    items: list[Any] = [f"a{i}" if i % 2 else {"name": f"n{i}", "description": "d"} for i in range(n)]
    return {"v": 1, "type": "npc.define", "id": "big", "npc": {**BROM, "actions": items}}


def test_a_frame_before_hello_is_refused_before_any_schema_validation(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    validations: list[str] = []
    real = core_module.first_error
    monkeypatch.setattr(core_module, "first_error", lambda name, raw: validations.append(name) or real(name, raw))
    c = make_daemon(tmp_path).connect()
    frame = _mixed_labels_frame(2600)
    assert len(json.dumps(frame)) < DaemonConfig().max_frame_bytes
    refused = error(send(c, frame))
    assert refused["code"] == ErrorCode.NOT_AUTHENTICATED and refused["id"] == "big"
    assert validations == []
    carries_on(c)
    hello(c)


def test_unique_items_is_checked_in_linear_time(conn: ConnectionCore, monkeypatch: pytest.MonkeyPatch) -> None:
    """Counts jsonschema's pairwise comparisons (millions for this frame before), not seconds."""
    comparisons = 0
    real = jsonschema._utils.equal

    def counting(one: Any, two: Any) -> bool:
        nonlocal comparisons
        comparisons += 1
        return real(one, two)

    monkeypatch.setattr(jsonschema._utils, "equal", counting)
    refused = error(send(conn, _mixed_labels_frame(2600)))
    assert refused["code"] == ErrorCode.BAD_FRAME  # over maxItems (64)
    assert comparisons < 100
    carries_on(conn)


def test_duplicates_are_still_found_across_both_label_forms(conn: ConnectionCore) -> None:
    npc = {**BROM, "actions": ["none", {"name": "none", "description": "d"}]}
    refused = error(send(conn, {"v": 1, "type": "npc.define", "id": "d2", "npc": npc}))
    assert refused["code"] == ErrorCode.BAD_FRAME and "none" in refused["message"]
    same = {**BROM, "actions": [{"name": "x", "description": "d"}, {"description": "d", "name": "x"}]}
    assert error(send(conn, {"v": 1, "type": "npc.define", "id": "d3", "npc": same}))["code"] == ErrorCode.BAD_FRAME
    say = {"v": 1, "type": "npc.say", "id": "s", "npc": "brom", "input": "hi", "allowed_actions": ["none", "none"]}
    assert error(send(conn, say))["code"] == ErrorCode.BAD_FRAME
    carries_on(conn)


# --- 2. a game named ".." escaped the sessions folder ------------------------------------------------------------


@pytest.mark.parametrize("name", ["..", ".", "..."])
def test_dot_ids_are_refused_as_bad_frame(tmp_path: Path, name: str) -> None:
    c = make_daemon(tmp_path).connect()
    bad = error(send(c, {"v": 1, "type": "hello", "id": "h", "token": TOKEN, "protocol": 1, "game": name}))
    assert bad["code"] == ErrorCode.BAD_FRAME
    hello(c)
    for frame in ({"v": 1, "type": "npc.define", "id": "x", "npc": {**BROM, "id": name}},
                  {"v": 1, "type": "npc.say", "id": "x", "npc": name, "input": "hi"},
                  {"v": 1, "type": "npc.state.get", "id": "x", "npc": name},
                  {"v": 1, "type": "npc.state.set", "id": "x", "state": {"v": 1, "npc": {**BROM, "id": name},
                                                                        "history": []}}):
        assert error(send(c, frame))["code"] == ErrorCode.BAD_FRAME, frame
    carries_on(c)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing written anywhere


def test_ids_with_dots_inside_are_still_fine(tmp_path: Path) -> None:
    c = make_daemon(tmp_path).connect()
    hello(c, game="v1.2")
    [defined] = frames(send(c, {"v": 1, "type": "npc.define", "id": "d", "npc": {**BROM, "id": ".brom.v2"}}))
    assert defined["type"] == "npc.defined"
    assert (tmp_path / "npcs" / "v1.2" / ".brom.v2.json").is_file()


@pytest.mark.parametrize(("game", "npc_id"), [("..", "daemon"), (".", "x"), ("g", ".."), ("g", "."), ("a/b", "x")])
def test_the_session_store_itself_refuses_paths_outside_its_folder(tmp_path: Path, game: str, npc_id: str) -> None:
    """The second lock, for a caller that skipped the protocol's validation."""
    store = SessionStore(tmp_path / "data" / "npcs")
    spec = NpcSpec.model_construct(**{**NpcSpec.model_validate(BROM).__dict__, "id": npc_id})
    with pytest.raises(DaemonError) as err:
        store.define(game, spec)
    assert err.value.code == ErrorCode.BAD_FRAME
    with pytest.raises(DaemonError):
        store.get(game, npc_id)
    assert list(tmp_path.rglob("*.json")) == []


# --- 3. "brom\n" got internal --------------------------------------------------------------------------------


@pytest.mark.parametrize("frame", [
    {"v": 1, "type": "npc.say", "id": "x", "npc": "brom\n", "input": "hi"},
    {"v": 1, "type": "npc.reset", "id": "x", "npc": "brom\n"},
    {"v": 1, "type": "npc.state.get", "id": "x", "npc": "brom\n"},
    {"v": 1, "type": "npc.define", "id": "x", "npc": {**BROM, "id": "brom\n"}},
    {"v": 1, "type": "npc.define", "id": "x", "npc": {**BROM, "actions": ["none\n"]}},
    {"v": 1, "type": "npc.say", "id": "x", "npc": "brom", "input": "hi", "adapter": "npc-default\n"},
    {"v": 1, "type": "adapter.load", "id": "x", "name": "npc-default\n"},
])
def test_a_trailing_newline_is_a_bad_frame_in_schema_and_model_alike(conn: ConnectionCore,
                                                                      frame: dict[str, Any]) -> None:
    refused = error(send(conn, frame))
    assert refused["code"] == ErrorCode.BAD_FRAME and refused["id"] == "x"
    with pytest.raises(ValueError):
        TypeAdapter(CLIENT_FRAMES[frame["type"]]).validate_python(frame)
    carries_on(conn)


def test_a_game_with_a_trailing_newline_is_a_bad_frame(tmp_path: Path) -> None:
    c = make_daemon(tmp_path).connect()
    frame = {"v": 1, "type": "hello", "id": "h", "token": TOKEN, "protocol": 1, "game": "tavern\n"}
    assert error(send(c, frame))["code"] == ErrorCode.BAD_FRAME
    hello(c, game="tavern")


# --- 4. deep state, deep JSON, huge integers, surrogates, NaN ------------------------------------------------------


def test_state_at_the_depth_limit_is_served_saved_and_loaded_again(tmp_path: Path) -> None:
    daemon = make_daemon(tmp_path)
    c = daemon.connect()
    hello(c)
    frames(send(c, {"v": 1, "type": "npc.define", "id": "d", "npc": BROM}))
    state = nested(MAX_FREEFORM_DEPTH)
    [submit] = send(c, {"v": 1, "type": "npc.say", "id": "s", "npc": "brom", "input": "hi", "state": state})
    assert isinstance(submit, Submit)
    turn = {"player": "hi", "state": state, "reply": {"say": "Aye.", "emotion": "neutral", "action": "none"}}
    [out] = frames(send(c, {"v": 1, "type": "npc.state.set", "id": "set",
                            "state": {"v": 1, "npc": BROM, "history": [turn]}}))
    assert out["state"]["history"][0]["state"] == state
    again = make_daemon(tmp_path).connect()  # a restart: loaded from disk, nothing dropped
    hello(again)
    [got] = frames(send(again, {"v": 1, "type": "npc.state.get", "id": "g", "npc": "brom"}))
    assert got["state"]["history"][0]["state"] == state


@pytest.mark.parametrize("depth", [MAX_FREEFORM_DEPTH + 1, 200, 255, 300])
def test_state_nested_too_deep_is_a_bad_frame_and_nothing_is_saved(tmp_path: Path, depth: int) -> None:
    daemon = make_daemon(tmp_path)
    c = daemon.connect()
    hello(c)
    frames(send(c, {"v": 1, "type": "npc.define", "id": "d", "npc": BROM}))
    say = {"v": 1, "type": "npc.say", "id": "s", "npc": "brom", "input": "hi", "state": nested(depth)}
    refused = error(send(c, say))
    assert refused["code"] == ErrorCode.BAD_FRAME and refused["id"] == "s" and "deeper" in refused["message"]
    turn = {"player": "hi", "state": nested(depth), "reply": {"say": "Aye.", "emotion": "neutral", "action": "none"}}
    args_turn = {"player": "hi", "reply": {"say": "Aye.", "emotion": "neutral", "action": "none",
                                           "args": nested(depth)}}
    for bad in (turn, args_turn):
        frame = {"v": 1, "type": "npc.state.set", "id": "set", "state": {"v": 1, "npc": BROM, "history": [bad]}}
        assert error(send(c, frame))["code"] == ErrorCode.BAD_FRAME
    carries_on(c)
    again = make_daemon(tmp_path).connect()
    hello(again)
    [got] = frames(send(again, {"v": 1, "type": "npc.state.get", "id": "g", "npc": "brom"}))
    assert got["state"]["history"] == []


def test_state_over_the_size_limit_is_a_bad_frame(conn: ConnectionCore) -> None:
    state = {"notes": "x" * (MAX_FREEFORM_BYTES + 1)}
    refused = error(send(conn, {"v": 1, "type": "npc.say", "id": "s", "npc": "brom", "input": "hi", "state": state}))
    assert refused["code"] == ErrorCode.BAD_FRAME and "limit" in refused["message"]
    carries_on(conn)


@pytest.mark.parametrize(("raw", "code"), [
    ("[" * 3000 + "]" * 3000, ErrorCode.BAD_FRAME),
    ("[" * 60_000, ErrorCode.BAD_FRAME),
    ('{"v": 1, "type": "ping", "id": "p", "x": ' + "[" * 60 + "]" * 60 + "}", ErrorCode.BAD_FRAME),
    ('{"v": 1, "type": "ping", "id": "p", "n": ' + "9" * 4301 + "}", ErrorCode.BAD_JSON),
    ('{"v": ' + "1" * 5000 + ', "type": "ping", "id": "p"}', ErrorCode.BAD_JSON),
    ('{"v": 1, "type": "ping", "id": "\\ud800"}', ErrorCode.BAD_FRAME),
    ('{"v": 1, "type": "ping", "id": "a\\udfff"}', ErrorCode.BAD_FRAME),
    ('{"v": 1, "type": "ping", "id": "p", "\\ud83d": 1}', ErrorCode.BAD_FRAME),
    ('{"v": 1, "type": "npc.say", "id": "s", "npc": "brom", "input": "hi", "options": {"temperature": NaN}}',
     ErrorCode.BAD_FRAME),
    ('{"v": 1, "type": "npc.say", "id": "s", "npc": "brom", "input": "hi", "options": {"top_p": Infinity}}',
     ErrorCode.BAD_FRAME),
    ('{"v": 1, "type": "npc.say", "id": "s", "npc": "brom", "input": "hi", "state": {"x": -Infinity}}',
     ErrorCode.BAD_FRAME),
    ('{"v": 1, "type": "npc.say", "id": "s", "npc": "brom", "input": "hi", "options": {"temperature": 1e400}}',
     ErrorCode.BAD_FRAME),
])
def test_unparseable_or_unsendable_json_gets_an_error_frame_not_a_closed_connection(conn: ConnectionCore, raw: str,
                                                                                    code: ErrorCode) -> None:
    assert error(send(conn, raw))["code"] == code
    carries_on(conn)


def test_a_surrogate_pair_is_fine(conn: ConnectionCore) -> None:
    assert frames(send(conn, '{"v": 1, "type": "ping", "id": "\\ud83d\\ude00"}')) == [
        {"v": 1, "type": "pong", "id": "\U0001F600"}]


# --- 5. corrupt session files and manifests ----------------------------------------------------------------------


@pytest.mark.parametrize("corrupt", ["bad-utf8", "directory", "not-json", "deep"])
def test_a_corrupt_session_is_moved_aside_and_the_npc_defined_again(tmp_path: Path, corrupt: str) -> None:
    path = tmp_path / "npcs" / "default" / "brom.json"
    path.parent.mkdir(parents=True)
    if corrupt == "bad-utf8":
        path.write_bytes(b'{"v": 1, "npc": {"id": "brom", "persona": "\xff\xfe"}}')
    elif corrupt == "directory":
        (path / "inside").mkdir(parents=True)
    elif corrupt == "not-json":
        path.write_text('{"v": 1, "npc": ')
    else:  # what an older daemon could save: state nested deeper than any parser's recursion limit
        turn = '{"player": "hi", "state": ' + '{"k": ' * 3000 + "1" + "}" * 3000 + \
            ', "reply": {"say": "Aye.", "emotion": "neutral", "action": "none"}}'
        path.write_text('{"v": 1, "npc": ' + json.dumps(BROM) + ', "history": [' + turn + "]}")
    daemon = make_daemon(tmp_path)
    seen: list[Path] = []
    daemon.sessions.on_corrupt = seen.append
    c = daemon.connect()
    hello(c)
    for _ in range(2):  # every request is answered, and the file is reported once
        refused = error(send(c, {"v": 1, "type": "npc.say", "id": "s", "npc": "brom", "input": "hi"}))
        assert refused["code"] == ErrorCode.UNKNOWN_NPC
    assert seen == [path]
    [aside] = [p for p in path.parent.iterdir() if p.name.startswith("brom.json.corrupt-")]
    assert aside.name.removeprefix("brom.json.corrupt-").isdigit()
    [defined] = frames(send(c, {"v": 1, "type": "npc.define", "id": "d", "npc": BROM}))
    assert defined == {"v": 1, "type": "npc.defined", "id": "d", "npc": "brom", "history_turns": 0}
    assert isinstance(send(c, {"v": 1, "type": "npc.say", "id": "s2", "npc": "brom", "input": "hi"})[0], Submit)
    assert json.loads(path.read_text())["npc"]["id"] == "brom"


@pytest.mark.parametrize("content", [b"\xff\xfe{", b"{not json", b'{"v": 1, "adapters": {"x": 1}}'])
def test_a_corrupt_manifest_is_moved_aside_and_npc_say_keeps_working(tmp_path: Path, content: bytes) -> None:
    root = tmp_path / "adapters"
    root.mkdir()
    (root / MANIFEST).write_bytes(content)
    seen: list[Path] = []
    registry = AdapterRegistry([root], on_corrupt=seen.append)
    daemon = make_daemon(tmp_path, registry=registry, default_adapter=None)
    c = daemon.connect()
    hello(c)
    frames(send(c, {"v": 1, "type": "npc.define", "id": "d", "npc": BROM}))
    for i in range(2):
        assert isinstance(send(c, {"v": 1, "type": "npc.say", "id": f"s{i}", "npc": "brom", "input": "hi"})[0],
                          Submit)
    assert error(send(c, {"v": 1, "type": "adapter.load", "id": "a", "name": "x"}))["code"] \
        == ErrorCode.UNKNOWN_ADAPTER
    assert seen == [root / MANIFEST]
    assert not (root / MANIFEST).exists()
    assert [p.name.split("-")[0] for p in root.iterdir()] == ["manifest.json.corrupt"]


# --- 6. a prompt longer than the context ---------------------------------------------------------------------------


def test_a_prompt_longer_than_the_context_is_too_long(conn: ConnectionCore) -> None:
    [submit] = send(conn, {"v": 1, "type": "npc.say", "id": "long", "npc": "brom", "input": "word " * 500,
                           "options": {"max_tokens": 50}})
    with pytest.raises(DaemonError) as err:
        conn.daemon.prepare(submit.job, count_tokens=lambda s: len(s.split()), n_ctx=300)
    assert err.value.code == ErrorCode.TOO_LONG and err.value.request_id == "long"
    assert "too_long" in load_schema("common")["$defs"]["ErrorCode"]["enum"]
    # the same line fits a larger context
    conn.job_done(submit.job)
    request = conn.daemon.prepare(submit.job, count_tokens=lambda s: len(s.split()), n_ctx=4096)
    assert request.prompt.rstrip().endswith("Brom:")


# --- 8. error frames quote at most a little of the input -------------------------------------------------------------


@pytest.mark.parametrize("frame", [
    {"v": 1, "type": "npc.say", "id": "s", "npc": "brom", "input": "x" * 60_000},
    {"v": 1, "type": "npc.say", "id": "s", "npc": "b" * 60_000, "input": "hi"},
    {"v": 1, "type": "x" * 60_000, "id": "s"},
    {"v": "x" * 60_000, "type": "ping", "id": "s"},
    {"v": 1, "type": "npc.say", "id": "s", "npc": "brom", "input": "hi", "allowed_actions": ["a" * 30_000] * 2},
    {"v": 1, "type": "npc.say", "id": "s", "npc": "brom", "input": "hi", "extra_" + "k" * 60_000: 1},
])
def test_error_messages_quote_at_most_a_little_of_the_input(conn: ConnectionCore, frame: dict[str, Any]) -> None:
    refused = error(send(conn, frame))
    assert len(refused["message"]) <= MAX_ERROR_MESSAGE_CHARS + 40
    assert len(json.dumps(refused)) < 2_000
    carries_on(conn)


def test_an_unexpected_exception_is_an_internal_error_not_a_closed_connection(
        conn: ConnectionCore, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(frame: Any) -> list[Any]:
        raise RuntimeError("a bug")

    monkeypatch.setattr(conn, "_route", boom)
    refused = error(send(conn, PING))
    assert refused["code"] == ErrorCode.INTERNAL and refused["id"] == "still-here"
    monkeypatch.undo()
    carries_on(conn)


# --- 7. the Host header (DNS rebinding) ------------------------------------------------------------------------------


@pytest.mark.parametrize(("host", "config", "allowed"), [
    ("127.0.0.1:7341", {}, True),
    ("localhost:7341", {}, True),
    ("LOCALHOST.", {}, True),
    ("[::1]:7341", {}, True),
    ("127.0.0.2", {}, True),
    ("evil.example", {}, False),
    ("evil.example:7341", {}, False),
    ("127.0.0.1.evil.example", {}, False),
    ("192.168.1.5:7341", {}, False),
    ("192.168.1.5:7341", {"host": "0.0.0.0"}, True),
    ("evil.example", {"host": "0.0.0.0"}, False),
    ("192.168.1.5", {"host": "192.168.1.5"}, True),
    ("gamebox.lan:7341", {"allowed_hosts": ("gamebox.lan",)}, True),
    ("evil.example", {"allowed_hosts": ("*",)}, True),
])
def test_host_allowed(host: str, config: dict[str, Any], allowed: bool) -> None:
    assert host_allowed(host, DaemonConfig(**config)) is allowed


def _get(port: int, path: str, host: str) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.putrequest("GET", path, skip_host=True)
        conn.putheader("Host", host)
        conn.endheaders()
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


def test_health_and_metrics_answer_only_loopback_host_names_over_the_real_server(tmp_path: Path) -> None:
    release = threading.Event()

    def load() -> Any:  # /health answers "loading" meanwhile: no model needed to test the HTTP side
        release.wait(60)
        return None  # never used: the server is stopping by then

    async def main() -> None:
        server = DaemonServer(DaemonConfig(port=0), SessionStore(tmp_path / "npcs"), TOKEN, load=load,
                              registry=AdapterRegistry([tmp_path / "adapters"]), write_runtime_file=False)
        await server.start()
        port = server.port
        assert port is not None
        try:
            for path in ("/health", "/metrics"):
                for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}"):
                    assert await asyncio.to_thread(_get, port, path, host) == 200, (path, host)
                for host in ("evil.example", f"evil.example:{port}"):
                    assert await asyncio.to_thread(_get, port, path, host) == 403, (path, host)
            # and after the refusals the server still answers
            assert await asyncio.to_thread(_get, port, "/health", f"127.0.0.1:{port}") == 200
        finally:
            release.set()
            await server.stop()

    asyncio.run(main())
