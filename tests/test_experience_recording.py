"""Experience recording (docs/EXPERIENCE.md): the reader's feedback lines, the recorder's file discipline, and the
whole path over a real daemon on loopback: opt-in twice, records with the right fields and no token, feedback
merged by the training reader, typed errors that keep the connection, export/clear, and kill -9."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import websockets
from click.testing import CliRunner
from daemon_proc import DaemonProcess
from zyke import AsyncClient, BadLabel, Client, NotRecording, UnknownReply
from zyke.experience import (
    BadRecord,
    ExperienceRecord,
    Limits,
    TornLine,
    UnsupportedVersion,
    read_experience,
)
from zyke.protocol import ErrorCode
from zyke_daemon.errors import DaemonError
from zyke_daemon.experience import ExperienceRecorder

SPEC = {"id": "brom", "name": "Brom", "persona": "A gruff dwarven blacksmith.",
        "actions": ["none", "trade", "repair", "refuse"], "emotions": ["neutral", "annoyed"]}
SHORT = {"max_tokens": 24, "temperature": 0}


def record(reply_id: str = "r-1", game: str | None = "karak", **overrides: Any) -> dict[str, Any]:
    rec = {"v": 1, "time": "2026-11-30T12:00:00Z", "game": game, "reply_id": reply_id, "npc": "brom", "spec": SPEC,
           "history": [], "state": {"location": "forge"}, "input": "Fix my sword, now!",
           "reply": {"say": "Ten gold.", "emotion": "neutral", "action": "repair"}, "adapter": "npc-default",
           "feedback": []}
    return rec | overrides


def feedback_line(reply_id: str = "r-1", reward: float = 1.0, game: str | None = "karak",
                  **fb: Any) -> dict[str, Any]:
    return {"v": 1, "kind": "feedback", "game": game, "npc": "brom", "reply_id": reply_id,
            "feedback": {"time": "2026-11-30T12:00:05Z", "reward": reward, **fb}}


def line(value: dict[str, Any]) -> bytes:
    return (json.dumps(value) + "\n").encode()


def write(path: Path, rows: list[dict[str, Any]], tail: str = "") -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + tail)
    return path


# -- the reader: feedback lines ---------------------------------------------------------------------------


def test_feedback_lines_merge_into_the_latest_earlier_record(tmp_path: Path) -> None:
    path = write(tmp_path / "exp.jsonl", [
        record("r-1"), feedback_line("r-1", -1.0, label={"action": "refuse"}),
        record("r-2"), feedback_line("r-2", 0.5), feedback_line("r-2", 1.0, label={"emotion": "annoyed"}),
        record("r-1", input="Again?"),  # a reused id: later feedback rates this one
        feedback_line("r-1", 0.25),
        record("r-1", game="other"),  # another game's reply with the same id stays apart
    ])
    result = read_experience([path], strict=True)
    assert [(r.reply_id, r.input, r.game) for r in result.records] == [
        ("r-1", "Fix my sword, now!", "karak"), ("r-2", "Fix my sword, now!", "karak"), ("r-1", "Again?", "karak"),
        ("r-1", "Fix my sword, now!", "other")]
    first, second, third, fourth = result.records
    assert first.reward == -1.0 and first.label is not None and first.label.action == "refuse"
    assert second.reward == 0.75 and second.label is not None and second.label.emotion == "annoyed"
    assert third.reward == 0.25 and fourth.feedback == [] and result.feedback_lines == 4
    assert result.problems == []


@pytest.mark.parametrize(("bad", "why"), [
    (feedback_line("nobody"), "which no earlier line records"),
    (feedback_line(label={"action": "dance"}), "not an allowed action"),
    (feedback_line(label={"emotion": "joyful"}), "not a declared emotion"),
    (feedback_line(reward=3.0), "less than or equal to 1"),
    (feedback_line() | {"token": "secret"}, "Extra inputs"),
])
def test_a_bad_feedback_line_is_a_typed_problem_and_the_record_stays(tmp_path: Path, bad: dict[str, Any],
                                                                     why: str) -> None:
    path = write(tmp_path / "exp.jsonl", [record(), bad, feedback_line(reward=0.5)])
    with pytest.raises(BadRecord) as err:
        read_experience([path], strict=True)
    assert err.value.line == 2 and why in err.value.reason
    result = read_experience([path])
    assert len(result.records) == 1 and result.records[0].reward == 0.5 and len(result.problems) == 1


def test_feedback_past_64_ratings_is_skipped_and_a_torn_feedback_line_is_torn(tmp_path: Path) -> None:
    rows = [record()] + [feedback_line(reward=0.0)] * 65
    path = write(tmp_path / "exp.jsonl", rows, tail='{"v": 1, "kind": "feedback", "ga')
    result = read_experience([path])
    assert len(result.records[0].feedback) == 64
    assert [type(p) for p in result.problems] == [BadRecord, TornLine]
    with pytest.raises(UnsupportedVersion):
        read_experience([write(tmp_path / "v2.jsonl", [record(), feedback_line() | {"v": 2}])])


# -- the recorder: file discipline ------------------------------------------------------------------------

KEY = ("karak", "brom", "r-1")


def test_recorder_appends_whole_lines_and_cuts_a_torn_tail_left_by_a_kill(tmp_path: Path) -> None:
    path = tmp_path / "experience" / "experience.jsonl"
    path.parent.mkdir()
    path.write_bytes(line(record("r-0")) + b'{"v": 1, "time": "2026-11-30T12:0')  # a daemon killed mid-append
    recorder = ExperienceRecorder(path)
    try:
        assert recorder.record(KEY, line(record())).result() is True
        recorder.feedback(KEY, line(feedback_line())).result()
        assert recorder.records == 2
    finally:
        recorder.close()
    result = read_experience([path], strict=True)  # the torn line is gone, not glued to the next record
    assert [r.reply_id for r in result.records] == ["r-0", "r-1"] and result.records[1].reward == 1.0


def test_recorder_refuses_invalid_lines_unknown_replies_and_stops_at_its_caps(tmp_path: Path) -> None:
    path = tmp_path / "experience.jsonl"
    recorder = ExperienceRecorder(path, Limits(max_records=2))
    try:
        assert recorder.record(KEY, line(record() | {"token": "secret"})).result() is False  # never written
        with pytest.raises(DaemonError) as err:
            recorder.feedback(KEY, line(feedback_line())).result()
        assert err.value.code == ErrorCode.UNKNOWN_REPLY
        assert recorder.record(KEY, line(record())).result() is True
        assert recorder.record(("karak", "brom", "r-2"), line(record("r-2"))).result() is True
        assert recorder.record(("karak", "brom", "r-3"), line(record("r-3"))).result() is False  # max_records
        recorder.feedback(KEY, line(feedback_line())).result()  # feedback on a recorded reply still lands
        # cleared while running: the next line starts a new file, and the old replies cannot be rated
        path.unlink()
        with pytest.raises(DaemonError) as err:
            recorder.feedback(KEY, line(feedback_line())).result()
        assert err.value.code == ErrorCode.UNKNOWN_REPLY
        assert recorder.record(("karak", "brom", "r-4"), line(record("r-4"))).result() is True
    finally:
        recorder.close()
    assert [r.reply_id for r in read_experience([path], strict=True).records] == ["r-4"]
    assert b"secret" not in path.read_bytes()
    assert path.stat().st_mode & 0o777 == 0o600  # the player's own: not readable by other users
    small = ExperienceRecorder(tmp_path / "small.jsonl", Limits(max_file_bytes=4096))
    try:  # the file cap keeps a reserve for feedback: records stop first
        written = sum(small.record((None, "brom", f"r-{i}"), line(record(f"r-{i}", game=None))).result()
                      for i in range(20))
        assert 0 < written < 20
        with pytest.raises(DaemonError) as err:
            for _ in range(100):
                small.feedback((None, "brom", "r-0"), line(feedback_line("r-0", game=None))).result()
        assert err.value.code == ErrorCode.EXPERIENCE_FULL
    finally:
        small.close()
    assert (tmp_path / "small.jsonl").stat().st_size <= 4096
    read_experience([tmp_path / "small.jsonl"], strict=True)


# -- a real daemon on loopback ----------------------------------------------------------------------------


def experience_file(daemon: DaemonProcess) -> Path:
    return daemon.home / "data" / "experience" / "experience.jsonl"


def wait_for_records(path: Path, n: int, timeout: float = 30) -> list[ExperienceRecord]:
    """The recorder writes off the event loop, just after the reply is sent: wait for it."""
    deadline = time.monotonic() + timeout
    while True:
        records = read_experience([path]).records if path.exists() else []
        if len(records) >= n or time.monotonic() > deadline:
            return records
        time.sleep(0.05)


@pytest.fixture(scope="module")
def recording(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    proc = DaemonProcess(tmp_path_factory.mktemp("zyke-recording"), extra_args=["--record-experience"]).start()
    yield proc
    proc.stop()


@pytest.mark.slow
def test_recording_is_off_by_default(daemon: DaemonProcess) -> None:
    with Client(daemon.url, daemon.token, game="off-by-default", timeout=300) as client:
        brom = client.npc("brom", SPEC["persona"], SPEC["actions"], SPEC["emotions"], record=True)
        reply = brom.say("Fix my sword.", options=SHORT)
        with pytest.raises(NotRecording) as err:
            reply.rate(1.0)
        assert err.value.code == "not_recording" and "--record-experience" in err.value.message
        client.ping()  # the connection carries on
    assert not (daemon.home / "data" / "experience").exists()


@pytest.mark.slow
def test_a_daemon_that_records_leaves_npcs_that_did_not_opt_in_alone(recording: DaemonProcess) -> None:
    with Client(recording.url, recording.token, game="no-opt-in", timeout=300) as client:
        mira = client.npc("mira", "A quiet herbalist.", ["none", "trade"], ["neutral"])
        reply = mira.say("Any herbs?", options=SHORT)
        with pytest.raises(NotRecording) as err:
            mira.feedback(reply.request_id, 1.0)
        assert "record: true" in err.value.message
    records = read_experience([experience_file(recording)]).records if experience_file(recording).exists() else []
    assert not [r for r in records if r.game == "no-opt-in"]


@pytest.mark.slow
def test_recorded_replies_and_feedback_reach_the_training_reader(recording: DaemonProcess, tmp_path: Path) -> None:
    from zyke_train.experience import convert

    path = experience_file(recording)
    before = len(wait_for_records(path, 0))
    with Client(recording.url, recording.token, game="karak", timeout=300) as client:
        brom = client.npc("brom", SPEC["persona"], SPEC["actions"], SPEC["emotions"], record=True)
        first = brom.say("Fix my sword, now!", state={"location": "forge"}, options=SHORT)
        second = brom.say("And my shield?", allowed_actions=["none", "refuse"], options=SHORT)
        first.rate(-1.0, label={"action": "refuse"})
        brom.feedback(second.request_id, 1.0, source="player", note="the player laughed")
        # typed errors, one frame each; the connection keeps working
        with pytest.raises(BadLabel):
            second.rate(0.5, label={"action": "repair"})  # not allowed on that turn
        with pytest.raises(BadLabel):
            brom.feedback(first.request_id, 0.5, label={"emotion": "joyful"})
        with pytest.raises(UnknownReply):
            brom.feedback("s-does-not-exist", 1.0)
        client.ping()
    records = [r for r in wait_for_records(path, before + 2) if r.game == "karak"]
    assert [r.input for r in records] == ["Fix my sword, now!", "And my shield?"]
    one, two = records
    assert (one.npc, one.reply_id, one.spec.record, one.state) == ("brom", first.request_id, True,
                                                                   {"location": "forge"})
    assert one.reply.say == first.say and one.reply.action == first.action and one.adapter == first.adapter
    assert one.history == [] and [t.player for t in two.history] == ["Fix my sword, now!"]
    assert two.allowed_actions == ["none", "refuse"] and two.reply.action in {"none", "refuse"}
    assert one.reward == -1.0 and one.label is not None and one.label.action == "refuse"
    assert two.reward == 1.0 and two.feedback[0].source == "player" and two.feedback[0].note == "the player laughed"
    raw = path.read_bytes()
    assert recording.token.encode() not in raw and b'"hello"' not in raw and b"token" not in raw
    # what training makes of it: the labelled reply teaches refuse, both become reward rows
    manifest = convert([path], tmp_path / "rows")
    assert manifest["counts"]["labelled"] >= 1 and manifest["counts"]["reward_rows"] >= 2
    rows = [json.loads(x) for x in (tmp_path / "rows" / "npc_rows.jsonl").read_text().splitlines()]
    assert any(r["input"] == "Fix my sword, now!" and r["reply"]["action"] == "refuse" for r in rows)


@pytest.mark.slow
def test_async_client_rates_and_a_malformed_feedback_frame_costs_one_error(recording: DaemonProcess) -> None:
    path = experience_file(recording)

    async def main() -> tuple[str, list[dict[str, Any]]]:
        async with AsyncClient(recording.url, recording.token, game="async-game", timeout=300) as client:
            brom = await client.npc("brom", SPEC["persona"], SPEC["actions"], SPEC["emotions"], record=True)
            reply = await brom.say("Good day.", options=SHORT)
            await reply.rate(0.5, label={"say": "Good day to you."})
        async with websockets.connect(recording.url) as ws:
            await ws.send(json.dumps({"v": 1, "type": "hello", "id": "h", "token": recording.token, "protocol": 1,
                                      "game": "async-game"}))
            json.loads(await ws.recv())
            answers = []
            for frame in ({"v": 1, "type": "feedback", "id": "f1", "npc": "brom", "reply_id": reply.request_id},
                          {"v": 1, "type": "feedback", "id": "f2", "npc": "brom", "reply_id": reply.request_id,
                           "reward": 1, "label": {}},
                          {"v": 1, "type": "feedback", "id": "f3", "npc": "brom", "reply_id": reply.request_id,
                           "reward": 1, "token": recording.token},
                          {"v": 1, "type": "ping", "id": "p"}):
                await ws.send(json.dumps(frame))
                answers.append(json.loads(await ws.recv()))
            return reply.request_id, answers

    rid, answers = asyncio.run(main())
    assert [(a["type"], a.get("code")) for a in answers] == [("error", "bad_frame")] * 3 + [("pong", None)]
    [rec] = [r for r in wait_for_records(path, 1) if r.game == "async-game"]
    assert rec.reply_id == rid and rec.reward == 0.5 and rec.label is not None
    assert rec.label.say == "Good day to you."


@pytest.mark.slow
def test_export_and_clear_from_the_command_line(recording: DaemonProcess, tmp_path: Path) -> None:
    from zyke_daemon.cli import cli

    with Client(recording.url, recording.token, game="cli-game", timeout=300) as client:
        brom = client.npc("brom", SPEC["persona"], SPEC["actions"], SPEC["emotions"], record=True)
        reply = brom.say("Hello there.", options=SHORT)
        reply.rate(1.0)
        path = experience_file(recording)
        records = wait_for_records(path, 1)
        env = {"ZYKE_DATA_DIR": str(recording.home / "data")}
        runner = CliRunner()
        shown = runner.invoke(cli, ["experience", "path"], env=env)
        assert shown.exit_code == 0 and shown.output.strip() == str(path)
        out = tmp_path / "export.jsonl"
        exported = runner.invoke(cli, ["experience", "export", "--out", str(out)], env=env)
        assert exported.exit_code == 0, exported.output
        again = read_experience([out], strict=True).records
        assert len(again) == len(read_experience([path]).records) >= len(records) >= 1
        assert all("kind" not in json.loads(x) for x in out.read_text().splitlines())  # feedback merged in
        assert any(r.game == "cli-game" and r.reward == 1.0 for r in again)
        cleared = runner.invoke(cli, ["experience", "clear", "--yes"], env=env)
        assert cleared.exit_code == 0 and f"deleted {len(again)} records" in cleared.output
        assert not path.exists()
        # the daemon carries on: the old reply can no longer be rated, a new one is recorded in a new file
        with pytest.raises(UnknownReply):
            reply.rate(1.0)
        brom.say("Still here?", options=SHORT)
        assert [r.input for r in wait_for_records(path, 1)] == ["Still here?"]
        nothing = runner.invoke(cli, ["experience", "clear", "--yes"], env={"ZYKE_DATA_DIR": str(tmp_path / "none")})
        assert nothing.exit_code == 0 and "nothing to delete" in nothing.output


@pytest.mark.slow
def test_kill_9_mid_stream_leaves_a_file_that_reads_cleanly(tmp_path: Path) -> None:
    proc = DaemonProcess(tmp_path / "home", extra_args=["--record-experience"]).start()
    path = experience_file(proc)
    try:
        client = Client(proc.url, proc.token, game="crash", timeout=300)
        brom = client.npc("brom", SPEC["persona"], SPEC["actions"], SPEC["emotions"], record=True)
        futures = [brom.submit(f"Line {i}: what do you sell?", options={"max_tokens": 48}) for i in range(6)]
        futures[0].result()
        wait_for_records(path, 1)
        stream = brom.stream("Tell me about your forge.", options={"max_tokens": 96})
        next(iter(stream))  # mid-stream
        proc.stop(signal.SIGKILL)
        client.close()
        result = read_experience([path])
        assert len(result.records) >= 1
        assert all(isinstance(p, TornLine) for p in result.problems) and len(result.problems) <= 1
        # the worst a kill can do is a torn last line: the next daemon cuts it off before appending
        with path.open("ab") as fh:
            fh.write(b'{"v":1,"time":"2026-11-30T12:00:00Z","game":"crash","reply_')
        kept = len(result.records)
        proc.start()
        with Client(proc.url, proc.token, game="crash", timeout=300) as again:
            again.npc("brom", SPEC["persona"], SPEC["actions"], SPEC["emotions"], record=True).say(
                "Back again.", options=SHORT)
        records = wait_for_records(path, kept + 1)
        assert len(read_experience([path], strict=True).records) == kept + 1 == len(records)
    finally:
        proc.stop()
