"""The real daemon, the real embedded model, a raw websockets client on loopback."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import urllib.error
import urllib.request
from typing import Any

import pytest
import websockets
from daemon_proc import DaemonProcess
from websockets.exceptions import InvalidStatus
from zyke.prompt_format import reply_schema
from zyke.protocol import NpcSpec
from zyke.protocol.validation import first_error, validator_for

pytestmark = pytest.mark.slow

SMITH = {"id": "brom", "name": "Brom", "persona": "A grumpy dwarf blacksmith who loves his forge.",
         "actions": ["none", "trade", "repair", "attack"], "emotions": ["neutral", "angry", "pleased"]}
GUARD = {"id": "guard", "name": "Hilda", "persona": "A stern city guard at the north gate.",
         "actions": ["allow_entry", "deny_entry", "arrest"], "emotions": ["calm", "suspicious"]}
SHORT = {"max_tokens": 32}
#: Generous: requests queue behind each other on one model thread, and a loaded 2-core CI box is slow.
REQUEST_WAIT_S = 400


class Conn:
    """A minimal raw client: sends frames, collects answers by request id."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.by_id: dict[str | None, list[dict[str, Any]]] = {}
        self.waiters: dict[str | None, asyncio.Future[None]] = {}
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for message in self.ws:
            frame = json.loads(message)
            assert first_error("server", frame) is None, frame
            self.by_id.setdefault(frame.get("id"), []).append(frame)
            if frame["type"] != "reply.delta" and frame.get("id") in self.waiters:
                self.waiters.pop(frame["id"]).set_result(None)

    async def request(self, frame: dict[str, Any]) -> list[dict[str, Any]]:
        return await self.send_raw(json.dumps(frame), frame["id"])

    async def send_raw(self, text: str, rid: str | None) -> list[dict[str, Any]]:
        """Send any text and wait for the answer carrying rid (None: an error for an unreadable frame)."""
        done = asyncio.get_running_loop().create_future()
        self.waiters[rid] = done
        await self.ws.send(text)
        await asyncio.wait_for(done, REQUEST_WAIT_S)
        return self.by_id.pop(rid)


async def connect(daemon: DaemonProcess, game: str = "e2e") -> Conn:
    conn = Conn(await websockets.connect(daemon.url, max_size=None))
    [welcome] = await conn.request({"v": 1, "type": "hello", "id": "h", "token": daemon.token, "protocol": 1,
                                    "game": game})
    assert welcome["type"] == "welcome" and welcome["backend"] == "llama.cpp"
    return conn


async def define(conn: Conn, npc: dict[str, Any]) -> None:
    [defined] = await conn.request({"v": 1, "type": "npc.define", "id": f"def-{npc['id']}", "npc": npc})
    assert defined["type"] == "npc.defined"


def assert_valid_reply(frames: list[dict[str, Any]], npc: dict[str, Any], streamed: bool = False) -> dict[str, Any]:
    final = frames[-1]
    assert final["type"] == "reply", final
    spec = NpcSpec.model_validate(npc)
    assert validator_for(reply_schema(spec)).is_valid(final["reply"])
    assert final["reply"]["action"] in spec.action_names and final["reply"]["emotion"] in spec.emotion_names
    deltas = [f for f in frames if f["type"] == "reply.delta"]
    assert [d["index"] for d in deltas] == list(range(len(deltas)))
    if streamed:
        assert "".join(d["text"] for d in deltas) == final["reply"]["say"]
    else:
        assert not deltas
    return final


def test_two_npcs_with_different_enums_concurrently(daemon: DaemonProcess) -> None:
    async def main() -> None:
        conn = await connect(daemon)
        await define(conn, SMITH)
        await define(conn, GUARD)
        lines = [("brom", SMITH, "Can you fix my sword?"), ("guard", GUARD, "Let me through, I'm a merchant."),
                 ("brom", SMITH, "What do you sell?"), ("guard", GUARD, "I have papers from the duke.")]
        results = await asyncio.gather(*(
            conn.request({"v": 1, "type": "npc.say", "id": f"say{i}", "npc": npc_id, "input": text,
                          "state": {"time": "dusk"}, "stream": True, "options": SHORT})
            for i, (npc_id, _, text) in enumerate(lines)))
        for frames, (_, npc, _) in zip(results, lines, strict=True):
            final = assert_valid_reply(frames, npc, streamed=True)
            assert final["usage"]["completion_tokens"] > 0
        await conn.ws.close()

    asyncio.run(main())


def test_npcs_talking_at_once_are_batched_and_get_the_replies_they_get_one_by_one(daemon: DaemonProcess) -> None:
    npcs = [SMITH, GUARD, {**SMITH, "id": "brom-2", "name": "Brom the Younger"},
            {**GUARD, "id": "guard-2", "name": "Ilse"}]
    lines = ["Can you fix my sword?", "Let me through, I'm a merchant.", "What do you sell?", "I have papers."]

    def say(npc: dict[str, Any], text: str, i: int, tag: str) -> dict[str, Any]:
        return {"v": 1, "type": "npc.say", "id": f"{tag}{i}", "npc": npc["id"], "input": text, "options": SHORT}

    def singles() -> float:
        """How many batches so far held one reply only (the zyke_batch_replies histogram's first bucket)."""
        with urllib.request.urlopen(f"{daemon.http}/metrics") as resp:
            lines = resp.read().decode().splitlines()
        return next(float(ln.split()[-1]) for ln in lines if ln.startswith('zyke_batch_replies_bucket{le="1.0"}'))

    async def main() -> None:
        conn = await connect(daemon)
        for npc in npcs:
            await define(conn, npc)  # an NPC an earlier test defined keeps its history: reset it
            await conn.request({"v": 1, "type": "npc.reset", "id": f"clear-{npc['id']}", "npc": npc["id"]})
        one_by_one = []
        for i, (npc, text) in enumerate(zip(npcs, lines, strict=True)):
            one_by_one.append(await conn.request(say(npc, text, i, "solo")))
            await conn.request({"v": 1, "type": "npc.reset", "id": f"reset{i}", "npc": npc["id"]})
        singles_before = singles()
        together = await asyncio.gather(*(conn.request(say(npc, text, i, "batch"))
                                          for i, (npc, text) in enumerate(zip(npcs, lines, strict=True))))
        for solo, batched, npc in zip(one_by_one, together, npcs, strict=True):
            assert assert_valid_reply(batched, npc)["reply"] == assert_valid_reply(solo, npc)["reply"]
        # the first request may start alone; the other three joined it or a later batch
        assert singles() - singles_before <= 1
        await conn.ws.close()

    asyncio.run(main())


def test_bad_inputs_get_their_codes_while_a_good_request_completes(daemon: DaemonProcess) -> None:
    async def main() -> None:
        conn = await connect(daemon)
        await define(conn, SMITH)
        good = asyncio.create_task(conn.request({"v": 1, "type": "npc.say", "id": "good", "npc": "brom",
                                                 "input": "Good morning!", "stream": True, "options": SHORT}))
        bad_cases: list[tuple[str | dict[str, Any], str | None, str]] = [
            ("not json at all", None, "bad_json"),
            ({"v": 1, "type": "npc.say", "id": "b1", "npc": "brom"}, "b1", "bad_frame"),
            ({"v": 1, "type": "npc.fly", "id": "b2"}, "b2", "unknown_type"),
            ({"v": 1, "type": "npc.say", "id": "b3", "npc": "nobody", "input": "hi"}, "b3", "unknown_npc"),
            ({"v": 1, "type": "ping", "id": "b4", "pad": "x" * 70_000}, None, "frame_too_large"),
            ({"v": 1, "type": "hello", "id": "b5", "token": "wrong", "protocol": 1}, "b5", "unauthorized"),
            ({"v": 9, "type": "ping", "id": "b6"}, "b6", "unsupported_version"),
        ]
        for frame, rid, code in bad_cases:
            [err] = await conn.send_raw(frame if isinstance(frame, str) else json.dumps(frame), rid)
            assert (err["type"], err["code"]) == ("error", code)
        assert_valid_reply(await good, SMITH, streamed=True)
        # the connection is still authenticated and usable
        [pong] = await conn.request({"v": 1, "type": "ping", "id": "alive"})
        assert pong["type"] == "pong"
        await conn.ws.close()

    asyncio.run(main())


def test_unauthenticated_connection_cannot_talk(daemon: DaemonProcess) -> None:
    async def main() -> None:
        conn = Conn(await websockets.connect(daemon.url))
        [err] = await conn.request({"v": 1, "type": "npc.define", "id": "d", "npc": SMITH})
        assert err["code"] == "not_authenticated"
        await conn.ws.close()

    asyncio.run(main())


def test_cancel_a_running_request_and_carry_on(daemon: DaemonProcess) -> None:
    async def main() -> None:
        conn = await connect(daemon)
        await define(conn, SMITH)
        long = asyncio.create_task(conn.request({"v": 1, "type": "npc.say", "id": "long", "npc": "brom",
                                                 "input": "Tell me the whole history of your clan.",
                                                 "stream": True, "options": {"max_tokens": 600}}))
        while not conn.by_id.get("long"):  # wait until it is really generating
            await asyncio.sleep(0.05)
        [ok] = await conn.request({"v": 1, "type": "cancel", "id": "c", "target": "long"})
        assert ok["type"] == "ok"
        frames = await long
        assert frames[-1]["type"] == "error" and frames[-1]["code"] == "cancelled"
        assert_valid_reply(await conn.request({"v": 1, "type": "npc.say", "id": "after", "npc": "brom",
                                               "input": "Sorry.", "options": SHORT}), SMITH)
        await conn.ws.close()

    asyncio.run(main())


def test_history_survives_a_restart(fresh_daemon: DaemonProcess) -> None:
    async def talk() -> dict[str, Any]:
        conn = await connect(fresh_daemon, game="restart")
        await define(conn, SMITH)
        final = assert_valid_reply(await conn.request({"v": 1, "type": "npc.say", "id": "s", "npc": "brom",
                                                       "input": "I need a horseshoe.", "options": SHORT}), SMITH)
        await conn.ws.close()
        return final

    async def state() -> dict[str, Any]:
        conn = await connect(fresh_daemon, game="restart")
        await define(conn, SMITH)  # a game re-defines its NPCs on start; history must be kept
        [frame] = await conn.request({"v": 1, "type": "npc.state.get", "id": "g", "npc": "brom"})
        await conn.ws.close()
        return frame["state"]

    final = asyncio.run(talk())
    fresh_daemon.restart()
    saved = asyncio.run(state())
    assert saved["history"] == [{"player": "I need a horseshoe.", "reply": final["reply"]}]


def completed_replies(daemon: DaemonProcess) -> float:
    """Replies the daemon finished and sent (the count of its npc.say latency histogram)."""
    with urllib.request.urlopen(f"{daemon.http}/metrics") as resp:
        lines = resp.read().decode().splitlines()
    return next(float(ln.split()[-1]) for ln in lines if ln.startswith("zyke_request_latency_seconds_count"))


def test_disconnect_cancels_queued_work(daemon: DaemonProcess) -> None:
    before = completed_replies(daemon)

    async def main() -> None:
        quitter = await connect(daemon)
        await define(quitter, SMITH)
        for i in range(4):
            await quitter.ws.send(json.dumps({"v": 1, "type": "npc.say", "id": f"q{i}", "npc": "brom",
                                              "input": "Talk forever.", "options": {"max_tokens": 400}}))
        await asyncio.sleep(0.3)
        await quitter.ws.close()
        # another client is served: the dropped connection's queued work does not block it
        other = await connect(daemon)
        await define(other, GUARD)
        frames = await asyncio.wait_for(
            other.request({"v": 1, "type": "npc.say", "id": "x", "npc": "guard", "input": "Hello.",
                           "options": SHORT}), REQUEST_WAIT_S)
        assert_valid_reply(frames, GUARD)
        await other.ws.close()

    asyncio.run(main())
    # the other client's reply, and at most the quitter's first one if it finished before the close: the three
    # still queued were dropped, not decoded for nobody (served, they would count here too)
    assert 1 <= completed_replies(daemon) - before <= 2


def test_health_metrics_and_origin_policy(daemon: DaemonProcess) -> None:
    with urllib.request.urlopen(f"{daemon.http}/health") as resp:
        health = json.loads(resp.read())
    assert health["status"] == "ready" and health["model"].endswith(".gguf")
    with urllib.request.urlopen(f"{daemon.http}/metrics") as resp:
        metrics = resp.read().decode()
    assert "zyke_requests_total" in metrics and "zyke_time_to_first_token_seconds_bucket" in metrics
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(f"{daemon.http}/nope")
    assert err.value.code == 404

    async def browser() -> None:
        with pytest.raises(InvalidStatus) as refused:
            await websockets.connect(daemon.url, origin="https://evil.example")
        assert refused.value.response.status_code == 403

    asyncio.run(browser())


def test_cli_status_and_stop(fresh_daemon: DaemonProcess) -> None:
    run = [sys.executable, "-m", "zyke_daemon"]
    status = subprocess.run([*run, "status", "--json"], env=fresh_daemon.env, capture_output=True, text=True)
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["port"] == fresh_daemon.port
    stopped = subprocess.run([*run, "stop"], env=fresh_daemon.env, capture_output=True, text=True)
    assert stopped.returncode == 0, stopped.stderr
    assert fresh_daemon.proc is not None and fresh_daemon.proc.wait(10) == 0
    again = subprocess.run([*run, "status"], env=fresh_daemon.env, capture_output=True, text=True)
    assert again.returncode == 1 and "not running" in again.stderr


def test_bad_model_path_is_a_clear_startup_error(tmp_path: Any) -> None:
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"not a gguf")
    env = DaemonProcess(tmp_path).env
    for model, message in [(tmp_path / "missing.gguf", "model file not found"), (fake, "is not a GGUF file")]:
        out = subprocess.run([sys.executable, "-m", "zyke_daemon", "start", "--port", "0", "--model", str(model)],
                             env=env, capture_output=True, text=True, timeout=60)
        assert out.returncode == 1 and message in out.stderr


def word_ngrams(text: str, n: int) -> set[tuple[str, ...]]:
    words = text.split()
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def test_the_same_question_three_times_gets_three_replies_that_copy_no_run_of_words(daemon: DaemonProcess) -> None:
    """The daemon's default no-repeat ban: no reply repeats a 6-word run of an earlier one, and
    ``no_repeat_ngram: 0`` (per request or per NPC) is accepted and turns it off."""
    lines = ["Can you fix my sword?", "Can you fix my sword, please?", "Can you fix my old sword?"]

    async def three_turns(conn: Conn, npc: dict[str, Any], options: dict[str, Any]) -> list[str]:
        await define(conn, npc)
        await conn.request({"v": 1, "type": "npc.reset", "id": f"reset-{npc['id']}", "npc": npc["id"]})
        says = []
        for i, text in enumerate(lines):
            frames = await conn.request({"v": 1, "type": "npc.say", "id": f"{npc['id']}-{i}", "npc": npc["id"],
                                         "input": text, "options": options})
            says.append(assert_valid_reply(frames, npc)["reply"]["say"])
        return says

    async def main() -> tuple[list[str], list[str], list[str]]:
        conn = await connect(daemon, game="no-repeat")
        banned = await three_turns(conn, SMITH, {"max_tokens": 48})
        off = await three_turns(conn, {**SMITH, "id": "brom-off"}, {"max_tokens": 48, "no_repeat_ngram": 0})
        npc_off = await three_turns(conn, {**SMITH, "id": "brom-npc-off",
                                           "defaults": {"options": {"no_repeat_ngram": 0}}}, {"max_tokens": 48})
        await conn.ws.close()
        return banned, off, npc_off

    banned, off, npc_off = asyncio.run(main())
    for i, later in enumerate(banned):
        for earlier in banned[:i]:
            assert not word_ngrams(later, 6) & word_ngrams(earlier, 6), (earlier, later)
    # turned off per request or per NPC, the same conversation is the old decoding, identical either way
    assert off == npc_off


FERRYMAN = {"id": "tam", "name": "Old Tam",
            "persona": "A taciturn ferryman on the Grey River who takes coin and asks no questions.",
            "actions": ["none", {"name": "ferry_across", "description": "take the player over the river on the raft"},
                        {"name": "refuse", "description": "will not take the player"}, "attack"],
            "emotions": ["neutral", {"name": "wary", "description": "distrustful of the player"}, "pleased"]}


def test_described_actions_and_allowed_actions_over_the_real_daemon(daemon: DaemonProcess) -> None:
    """Descriptions are accepted and decoded under; allowed_actions holds the model to a subset, turn after
    turn; an undeclared label is unknown_action and a name clash bad_frame, and the connection carries on."""
    def say(rid: str, text: str, **extra: Any) -> dict[str, Any]:
        return {"v": 1, "type": "npc.say", "id": rid, "npc": "tam", "input": text, "options": SHORT, **extra}

    async def main() -> None:
        conn = await connect(daemon, game="choices")
        await define(conn, FERRYMAN)
        await conn.request({"v": 1, "type": "npc.reset", "id": "reset", "npc": "tam"})
        assert_valid_reply(await conn.request(say("plain", "Evening. Is the river calm tonight?")), FERRYMAN)

        only_none = assert_valid_reply(await conn.request(
            say("none", "Take me across the river, quick!", allowed_actions=["none"])), FERRYMAN)
        assert only_none["reply"]["action"] == "none"

        lines = ["Take me across, I can pay.", "Please, the guards are after me!", "I'll give you ten gold."]
        for i, text in enumerate(lines):
            frames = await conn.request(say(f"narrow{i}", text, allowed_actions=["refuse", "attack"],
                                            stream=i % 2 == 0))
            final = assert_valid_reply(frames, FERRYMAN, streamed=i % 2 == 0)
            assert final["reply"]["action"] in {"refuse", "attack"}, final["reply"]

        [err] = await conn.request(say("bad", "Take me across.", allowed_actions=["none", "fly"]))
        assert (err["type"], err["code"], err["id"]) == ("error", "unknown_action", "bad")
        assert "fly" in err["message"] and "ferry_across" in err["message"]
        assert_valid_reply(await conn.request(say("after", "Fine, never mind.")), FERRYMAN)

        clash = {**FERRYMAN, "id": "tam-2", "actions": ["refuse", {"name": "refuse", "description": "no"}]}
        [bad] = await conn.request({"v": 1, "type": "npc.define", "id": "clash", "npc": clash})
        assert (bad["type"], bad["code"]) == ("error", "bad_frame") and "refuse" in bad["message"]

        [state] = await conn.request({"v": 1, "type": "npc.state.get", "id": "state", "npc": "tam"})
        history = state["state"]["history"]
        assert state["state"]["npc"]["actions"] == FERRYMAN["actions"]
        assert [t.get("allowed_actions") for t in history] == [None, ["none"], *[["refuse", "attack"]] * 3, None]
        await conn.ws.close()

    asyncio.run(main())
