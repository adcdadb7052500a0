"""The synchronous Python SDK against a real daemon over loopback (no mocks)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from conftest import game_name
from daemon_proc import DaemonProcess
from pydantic import ValidationError
from zyke import (
    Cancelled,
    Choice,
    Client,
    ConnectionLost,
    Npc,
    NpcResponse,
    ProtocolError,
    UnknownAction,
    ZykeError,
    ZykeTimeout,
)
from zyke.choices import build_choices

PERSONA = "A grumpy dwarf blacksmith who loves his forge."
ACTIONS = ["none", "trade", "repair", "attack"]
EMOTIONS = ["neutral", "angry", "pleased"]
SHORT = {"max_tokens": 24}
LONG_LINE = "Tell me the whole long story of your forge, every detail, from the very beginning."


def brom(client: Client, npc_id: str = "brom") -> Npc:
    return client.npc(npc_id, persona=PERSONA, actions=ACTIONS, emotions=EMOTIONS, name="Brom")


def assert_valid(reply: NpcResponse, npc: Npc) -> None:
    assert isinstance(reply, NpcResponse)
    assert reply.npc == npc.id
    assert reply.action in npc.actions
    assert reply.emotion in npc.emotions
    assert reply.finish_reason in ("stop", "length")
    assert reply.usage.completion_tokens > 0
    assert reply.timings.total_ms >= reply.timings.ttft_ms


def test_core_package_has_no_heavy_imports() -> None:
    code = ("import sys, zyke; from zyke import Client, AsyncClient; "
            "print(sorted(m for m in ('torch', 'numpy', 'llama_cpp', 'jsonschema') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_version_and_exports() -> None:
    import zyke

    assert zyke.__version__ == "0.1.0"
    for name in zyke.__all__:
        assert hasattr(zyke, name), name


@pytest.mark.slow
def test_say_returns_a_valid_typed_reply(client: Client) -> None:
    npc = brom(client)
    reply = npc.say("Can you fix my sword?", state={"location": "forge", "gold": 12}, options=SHORT)
    assert_valid(reply, npc)
    assert str(reply) == reply.say
    # the turn, with the state sent, is in the NPC's history on the daemon
    history = npc.save()["history"]
    assert [t["player"] for t in history] == ["Can you fix my sword?"]
    assert history[0]["state"] == {"location": "forge", "gold": 12}
    assert history[0]["reply"]["say"] == reply.say


@pytest.mark.slow
def test_stream_deltas_concatenate_to_the_reply(client: Client) -> None:
    npc = brom(client)
    stream = npc.stream("And how much for the repair?", max_tokens=24, temperature=0)
    pieces = list(stream)
    assert pieces, "a streamed reply sends at least one delta"
    assert stream.response is not None
    assert "".join(pieces) == stream.response.say == stream.text
    assert_valid(stream.response, npc)


@pytest.mark.slow
def test_two_npcs_from_two_threads_on_one_client(client: Client) -> None:
    npcs = [brom(client, "brom"), client.npc("mira", persona="A cheerful elf innkeeper.",
                                             actions=["none", "serve", "gossip"], emotions=["happy", "curious"])]
    results: dict[str, list[NpcResponse]] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(2)

    def talk(npc: Npc) -> None:
        try:
            start.wait()
            results[npc.id] = [npc.say(f"{npc.id}, line {i}", max_tokens=16) for i in range(2)]
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=talk, args=(npc,)) for npc in npcs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors
    for npc in npcs:
        assert len(results[npc.id]) == 2
        for reply in results[npc.id]:
            assert_valid(reply, npc)  # each answer reached the thread that asked
        assert [t["player"] for t in npc.save()["history"]] == [f"{npc.id}, line 0", f"{npc.id}, line 1"]


@pytest.mark.slow
def test_cancel_a_stream_then_keep_talking(client: Client) -> None:
    npc = brom(client)
    stream = npc.stream(LONG_LINE, max_tokens=400)
    first = next(stream)
    assert first
    stream.cancel()
    with pytest.raises(Cancelled) as info:
        for _ in stream:
            pass
    assert info.value.code == "cancelled"
    assert info.value.request_id == stream.request_id
    assert stream.response is None

    # breaking out of the loop abandons the request: the daemon cancels it and records no turn
    for _ in npc.stream(LONG_LINE, max_tokens=400):
        break
    after = npc.say("Fine. Good day.", **SHORT)
    assert_valid(after, npc)
    assert [t["player"] for t in npc.save()["history"]] == ["Fine. Good day."]


@pytest.mark.slow
def test_timeout_cancels_and_the_client_stays_usable(client: Client) -> None:
    npc = brom(client)
    with pytest.raises(ZykeTimeout) as info:
        npc.say(LONG_LINE, max_tokens=400, timeout=0.01)
    assert isinstance(info.value, TimeoutError)
    assert info.value.code == "timeout"
    assert_valid(npc.say("Hello?", **SHORT), npc)

    client.timeout = 0.01  # the per-client default applies when a call gives none
    with pytest.raises(ZykeTimeout):
        npc.say(LONG_LINE, max_tokens=400)
    assert_valid(npc.say("Hello again?", timeout=300, **SHORT), npc)


@pytest.mark.slow
def test_save_load_round_trip(client: Client, tmp_path: Path) -> None:
    npc = brom(client)
    npc.say("My name is Arin.", **SHORT)
    npc.say("I need a new axe.", **SHORT)
    saved = npc.save()
    path = tmp_path / "save.json"
    path.write_text(json.dumps(saved))  # JSON-able as is
    assert [t["player"] for t in saved["history"]] == ["My name is Arin.", "I need a new axe."]

    npc.reset()
    assert npc.save()["history"] == []
    npc.load(json.loads(path.read_text()))
    assert npc.save() == saved
    with pytest.raises(ValueError):
        client.npc("other", persona="Someone else.").load(saved)


@pytest.mark.slow
def test_reconnects_after_a_daemon_restart_keeping_the_npc(fresh_daemon: DaemonProcess) -> None:
    with Client(fresh_daemon.url, fresh_daemon.token, timeout=300) as client:
        npc = brom(client)
        npc.say("Remember me, I am Arin.", **SHORT)
        fresh_daemon.restart()
        reply = npc.say("Do you remember me?", **SHORT)  # same object, new connection
        assert_valid(reply, npc)
        assert client.connected
        history = npc.save()["history"]
        assert [t["player"] for t in history] == ["Remember me, I am Arin.", "Do you remember me?"]


@pytest.mark.slow
def test_in_flight_request_fails_typed_when_the_daemon_goes_away(fresh_daemon: DaemonProcess,
                                                                  request: pytest.FixtureRequest) -> None:
    with Client(fresh_daemon.url, fresh_daemon.token, game=game_name(request), timeout=300) as client:
        npc = brom(client)
        stream = npc.stream(LONG_LINE, max_tokens=400)
        next(stream)
        fresh_daemon.stop()
        with pytest.raises(ConnectionLost) as info:
            for _ in stream:
                pass
        assert isinstance(info.value, ZykeError)
        # the daemon comes back while the next call is already retrying (within reconnect_window)
        starter = threading.Thread(target=fresh_daemon.start)
        starter.start()
        try:
            assert_valid(npc.say("Are you back?", **SHORT), npc)
        finally:
            starter.join()
        assert [t["player"] for t in npc.save()["history"]] == ["Are you back?"]


def test_actions_can_be_names_a_mixed_list_or_a_dict_of_descriptions() -> None:
    assert build_choices(["none", "trade"]) == ["none", "trade"]
    trade = Choice(name="trade", description="buy or sell goods")
    assert build_choices(["none", trade, {"name": "flee", "description": "run away"}]) == [
        "none", trade, Choice(name="flee", description="run away")]
    # a dict keeps its order; None leaves a name bare
    assert build_choices({"trade": "buy or sell goods", "none": None}) == [trade, "none"]
    with pytest.raises(TypeError, match="not the string"):
        build_choices("none")
    # checked before anything is sent, like every other malformed definition
    with Client("ws://127.0.0.1:9", "t") as client, pytest.raises(ValidationError, match="more than once: trade"):
        client.npc("brom", persona="p", actions=["trade", trade])


@pytest.mark.slow
def test_descriptions_and_allowed_actions(client: Client) -> None:
    actions = {"none": None, "ferry_across": "take the player over the river on the raft",
               "refuse": "will not take the player"}
    npc = client.npc("tam", persona="A taciturn ferryman on the Grey River.", actions=actions,
                     emotions={"neutral": None, "wary": "distrustful of the player"}, name="Old Tam")
    assert npc.actions == ["none", "ferry_across", "refuse"] and npc.emotions == ["neutral", "wary"]
    assert npc.spec.actions[1] == Choice(name="ferry_across", description=actions["ferry_across"])
    assert_valid(npc.say("Is the river calm tonight?", **SHORT), npc)

    forced = npc.say("Take me across, quick!", allowed_actions=["none"], **SHORT)
    assert_valid(forced, npc)
    assert forced.action == "none"
    stream = npc.stream("Please, I can pay.", allowed_actions=["refuse"], **SHORT)
    assert "".join(stream) == stream.text
    assert stream.response is not None and stream.response.action == "refuse"

    with pytest.raises(UnknownAction) as info:
        npc.say("Take me across.", allowed_actions=["none", "fly"], **SHORT)
    assert isinstance(info.value, ProtocolError) and info.value.code == "unknown_action"
    assert "fly" in info.value.message and "ferry_across" in info.value.message
    assert_valid(npc.say("Never mind.", **SHORT), npc)  # the connection carries on
    history = npc.save()["history"]
    assert [t.get("allowed_actions") for t in history] == [None, ["none"], ["refuse"], None]


def test_an_error_code_newer_than_the_sdk_still_fails_its_request_with_that_code() -> None:
    """Error codes are an open set (docs/PROTOCOL.md): an unknown one is a ProtocolError carrying it."""
    from zyke.aio import _Conn, _route

    conn = _Conn(ws=None, welcome=None, loop=None)  # type: ignore[arg-type]  # routing touches neither
    queue = conn.register("s1")
    _route(conn, json.dumps({"v": 1, "type": "error", "id": "s1", "code": "from_the_future", "message": "new"}))
    item = queue.get_nowait()
    assert type(item) is ProtocolError
    assert (item.code, item.message, item.request_id) == ("from_the_future", "new", "s1")
    known = conn.register("s2")
    _route(conn, json.dumps({"v": 1, "type": "error", "id": "s2", "code": "unknown_action", "message": "m"}))
    assert known.get_nowait().code == "unknown_action"  # a known code still parses as an Error frame


def test_say_submit_and_stream_reject_unknown_keywords(client: Client) -> None:
    """The keywords are one TypedDict (``**kwargs: Unpack[SayOptions]``); a misspelt one is still a TypeError,
    raised at the call (``submit`` included: not inside its future) and before anything is sent."""
    from zyke.say_options import SAY_KEYWORDS

    assert SAY_KEYWORDS == {"state", "options", "adapter", "timeout", "max_tokens", "temperature", "top_p", "top_k",
                            "seed", "stop", "repeat_penalty", "no_repeat_ngram", "allowed_actions", "priority",
                            "deadline_ms"}
    npc = brom(client)
    for method in (npc.say, npc.submit, npc.stream):
        expected = rf"Npc\.{method.__name__}\(\) got an unexpected keyword argument 'temprature'"
        with pytest.raises(TypeError, match=expected):
            method("Hi", temprature=0.5)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="allowed_actions must be a list"):
        npc.say("Hi", allowed_actions="none")
    assert npc.save().get("history", []) == []
