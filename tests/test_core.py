"""The sans-I/O core, driven by plain method calls: no socket, no model, no event loop."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from zyke.protocol import ErrorCode, ModelInfo
from zyke.protocol.validation import first_error
from zyke_daemon.backends.base import GenerationResult
from zyke_daemon.config import DaemonConfig
from zyke_daemon.core import CancelJob, ConnectionCore, DaemonCore, Send, Submit
from zyke_daemon.errors import DaemonError
from zyke_daemon.sessions import SessionStore

TOKEN = "secret"
BROM = {"id": "brom", "name": "Brom", "persona": "A grumpy dwarf smith.", "actions": ["none", "repair"],
        "emotions": ["neutral", "angry"], "defaults": {"emotion": "neutral", "action": "none"}}


def make_daemon(tmp_path: Path, **cfg: Any) -> DaemonCore:
    return DaemonCore(DaemonConfig(**cfg), SessionStore(tmp_path / "npcs"), TOKEN,
                      ModelInfo(name="test.gguf"), "test")


def send(conn: ConnectionCore, frame: Any) -> list[Any]:
    return conn.receive(frame if isinstance(frame, str | bytes) else json.dumps(frame))


def frames(actions: list[Any]) -> list[dict[str, Any]]:
    out = [a.frame for a in actions if isinstance(a, Send)]
    for f in out:
        assert first_error("server", f) is None, f
    return out


def hello(conn: ConnectionCore, **extra: Any) -> None:
    [welcome] = frames(send(conn, {"v": 1, "type": "hello", "id": "h", "token": TOKEN, "protocol": 1, **extra}))
    assert welcome["type"] == "welcome"


def error_code(actions: list[Any]) -> str:
    [frame] = frames(actions)
    assert frame["type"] == "error", frame
    return frame["code"]


@pytest.fixture
def conn(tmp_path: Path) -> ConnectionCore:
    c = make_daemon(tmp_path).connect()
    hello(c)
    return c


def test_ping_works_before_hello_but_nothing_else_does(tmp_path: Path) -> None:
    c = make_daemon(tmp_path).connect()
    assert frames(send(c, {"v": 1, "type": "ping", "id": "p"})) == [{"v": 1, "type": "pong", "id": "p"}]
    assert error_code(send(c, {"v": 1, "type": "npc.define", "id": "d", "npc": BROM})) == "not_authenticated"


def test_wrong_token_is_refused_and_the_connection_can_retry(tmp_path: Path) -> None:
    c = make_daemon(tmp_path).connect()
    actions = send(c, {"v": 1, "type": "hello", "id": "h", "token": "nope", "protocol": 1})
    assert error_code(actions) == "unauthorized"
    assert frames(actions)[0]["id"] == "h"
    hello(c)


@pytest.mark.parametrize(("raw", "code", "rid"), [
    ("{not json", "bad_json", None),
    (b"\xff\xfe", "bad_json", None),
    ("[1, 2]", "bad_frame", None),
    ({"v": 2, "type": "ping", "id": "a"}, "unsupported_version", "a"),
    ({"v": 1, "type": "npc.dance", "id": "b"}, "unknown_type", "b"),
    ({"v": 1, "type": "npc.say", "id": "c", "npc": "brom"}, "bad_frame", "c"),
    ({"v": 1, "type": "npc.say", "id": "d", "npc": "ghost", "input": "hi"}, "unknown_npc", "d"),
    ({"v": 1, "type": "cancel", "id": "e", "target": "nothing"}, "unknown_request", "e"),
    ({"v": 1, "type": "npc.reset", "id": "f", "npc": "ghost"}, "unknown_npc", "f"),
    ({"v": 1, "type": "npc.state.get", "id": "g", "npc": "ghost"}, "unknown_npc", "g"),
    ({"v": 1, "type": "hello", "id": "h2", "token": TOKEN, "protocol": 7}, "unsupported_version", "h2"),
])
def test_bad_input_gets_its_code_and_the_request_id(conn: ConnectionCore, raw: Any, code: str,
                                                    rid: str | None) -> None:
    actions = send(conn, raw)
    assert error_code(actions) == code
    assert frames(actions)[0]["id"] == rid
    assert frames(send(conn, {"v": 1, "type": "ping", "id": "still"}))[0]["type"] == "pong"


def test_oversize_frame_is_refused_without_parsing(tmp_path: Path) -> None:
    c = make_daemon(tmp_path, max_frame_bytes=100).connect()
    assert error_code(send(c, {"v": 1, "type": "ping", "id": "x" * 200})) == "frame_too_large"


def test_define_rejects_defaults_outside_the_enums(conn: ConnectionCore) -> None:
    npc = {**BROM, "defaults": {"action": "fly"}}
    assert error_code(send(conn, {"v": 1, "type": "npc.define", "id": "d", "npc": npc})) == "bad_frame"


def test_say_queues_a_job_with_merged_options(conn: ConnectionCore) -> None:
    npc = {**BROM, "defaults": {"options": {"max_tokens": 20, "temperature": 0.5}}}
    frames(send(conn, {"v": 1, "type": "npc.define", "id": "d", "npc": npc}))
    [submit] = send(conn, {"v": 1, "type": "npc.say", "id": "s", "npc": "brom", "input": "hi",
                           "options": {"temperature": 0.9, "seed": 3}})
    assert isinstance(submit, Submit)
    assert submit.job.options.model_dump(exclude_none=True) == {"max_tokens": 20, "temperature": 0.9, "seed": 3}
    assert error_code(send(conn, {"v": 1, "type": "npc.say", "id": "s", "npc": "brom", "input": "again"})) \
        == "duplicate_id"


def test_queue_cap_per_connection(tmp_path: Path) -> None:
    c = make_daemon(tmp_path, max_queued_per_client=2).connect()
    hello(c)
    frames(send(c, {"v": 1, "type": "npc.define", "id": "d", "npc": BROM}))
    for i in range(2):
        assert isinstance(send(c, {"v": 1, "type": "npc.say", "id": f"s{i}", "npc": "brom", "input": "hi"})[0], Submit)
    assert error_code(send(c, {"v": 1, "type": "npc.say", "id": "s9", "npc": "brom", "input": "hi"})) == "queue_full"


def test_unknown_adapter_is_refused(conn: ConnectionCore) -> None:
    frames(send(conn, {"v": 1, "type": "npc.define", "id": "d", "npc": BROM}))
    actions = send(conn, {"v": 1, "type": "npc.say", "id": "s", "npc": "brom", "input": "hi", "adapter": "nope"})
    assert error_code(actions) == "unknown_adapter"


def test_cancel_sets_the_jobs_event_and_acks(conn: ConnectionCore) -> None:
    frames(send(conn, {"v": 1, "type": "npc.define", "id": "d", "npc": BROM}))
    [submit] = send(conn, {"v": 1, "type": "npc.say", "id": "s", "npc": "brom", "input": "hi"})
    cancel_job, ack = send(conn, {"v": 1, "type": "cancel", "id": "c", "target": "s"})
    assert isinstance(cancel_job, CancelJob) and cancel_job.job is submit.job
    assert submit.job.cancel.is_set()
    assert ack.frame == {"v": 1, "type": "ok", "id": "c"}


def test_close_cancels_everything_in_flight(conn: ConnectionCore) -> None:
    frames(send(conn, {"v": 1, "type": "npc.define", "id": "d", "npc": BROM}))
    jobs = [send(conn, {"v": 1, "type": "npc.say", "id": f"s{i}", "npc": "brom", "input": "hi"})[0].job
            for i in range(3)]
    assert conn.close() == jobs
    assert all(job.cancel.is_set() for job in jobs)


def _finish(daemon: DaemonCore, conn: ConnectionCore, text: str, rid: str = "s", **say: Any) -> dict[str, Any]:
    [submit] = send(conn, {"v": 1, "type": "npc.say", "id": rid, "npc": "brom", "input": "Fix this?", **say})
    request = daemon.prepare(submit.job, count_tokens=lambda s: len(s.split()), n_ctx=4096)
    assembler = daemon.assembler(submit.job)
    for ch in text:
        assembler.feed(ch)
    result = GenerationResult(text=text, finish_reason="stop", prompt_tokens=10, completion_tokens=5)
    frame = daemon.finish(submit.job, result, assembler)
    conn.job_done(submit.job)
    allowed = say.get("allowed_actions", ["none", "repair"])
    assert request.schema["properties"]["action"]["enum"] == [a for a in ["none", "repair"] if a in allowed]
    return frame


def test_finish_records_the_turn_and_persists_it(tmp_path: Path) -> None:
    daemon = make_daemon(tmp_path)
    conn = daemon.connect()
    hello(conn, game="tavern")
    frames(send(conn, {"v": 1, "type": "npc.define", "id": "d", "npc": BROM}))
    frame = _finish(daemon, conn, '{"say": "Aye.", "emotion": "angry", "action": "repair"}', state={"gold": 3})
    assert first_error("frames/reply", frame) is None
    assert frame["reply"] == {"say": "Aye.", "emotion": "angry", "action": "repair"}
    saved = json.loads((tmp_path / "npcs" / "tavern" / "brom.json").read_text())
    assert saved["history"] == [{"player": "Fix this?", "state": {"gold": 3}, "reply": frame["reply"]}]
    # a new daemon on the same directory sees the conversation
    again = make_daemon(tmp_path).connect()
    hello(again, game="tavern")
    [state] = frames(send(again, {"v": 1, "type": "npc.state.get", "id": "g", "npc": "brom"}))
    assert state["state"]["history"][0]["reply"]["say"] == "Aye."


def test_truncated_generation_still_gives_a_valid_reply(tmp_path: Path) -> None:
    daemon = make_daemon(tmp_path)
    conn = daemon.connect()
    hello(conn)
    frames(send(conn, {"v": 1, "type": "npc.define", "id": "d", "npc": BROM}))
    frame = _finish(daemon, conn, '{"say": "I will fix it when the')
    assert frame["finish_reason"] == "length"
    assert frame["reply"] == {"say": "I will fix it when the", "emotion": "neutral", "action": "none"}


def test_a_reply_outside_the_enums_is_refused(tmp_path: Path) -> None:
    daemon = make_daemon(tmp_path)
    conn = daemon.connect()
    hello(conn)
    frames(send(conn, {"v": 1, "type": "npc.define", "id": "d", "npc": BROM}))
    with pytest.raises(DaemonError) as err:
        _finish(daemon, conn, '{"say": "Hi", "emotion": "angry", "action": "fly"}')
    assert err.value.code == ErrorCode.GENERATION_FAILED


def test_state_set_then_get_round_trips_and_reset_clears(conn: ConnectionCore) -> None:
    state = {"v": 1, "npc": BROM, "history": [
        {"player": "Hello", "reply": {"say": "Hmph.", "emotion": "neutral", "action": "none"}}]}
    [out] = frames(send(conn, {"v": 1, "type": "npc.state.set", "id": "s", "state": state}))
    assert out["state"] == state
    [got] = frames(send(conn, {"v": 1, "type": "npc.state.get", "id": "g", "npc": "brom"}))
    assert got["state"] == state
    assert frames(send(conn, {"v": 1, "type": "npc.reset", "id": "r", "npc": "brom"}))[0]["type"] == "ok"
    [got] = frames(send(conn, {"v": 1, "type": "npc.state.get", "id": "g2", "npc": "brom"}))
    assert got["state"]["history"] == []


def test_redefining_keeps_history_but_trims_to_max_history(conn: ConnectionCore) -> None:
    turn = {"player": "Hello", "reply": {"say": "Hmph.", "emotion": "neutral", "action": "none"}}
    frames(send(conn, {"v": 1, "type": "npc.state.set", "id": "s", "state": {"v": 1, "npc": BROM,
                                                                             "history": [turn] * 5}}))
    [defined] = frames(send(conn, {"v": 1, "type": "npc.define", "id": "d", "npc": {**BROM, "max_history": 2}}))
    assert defined["history_turns"] == 2


def test_games_are_separate_namespaces(tmp_path: Path) -> None:
    daemon = make_daemon(tmp_path)
    a, b = daemon.connect(), daemon.connect()
    hello(a, game="one")
    hello(b, game="two")
    frames(send(a, {"v": 1, "type": "npc.define", "id": "d", "npc": BROM}))
    assert error_code(send(b, {"v": 1, "type": "npc.state.get", "id": "g", "npc": "brom"})) == "unknown_npc"


def test_prompt_drops_oldest_turns_to_fit_the_context(conn: ConnectionCore) -> None:
    turn = {"player": "word " * 50, "reply": {"say": "ok", "emotion": "neutral", "action": "none"}}
    frames(send(conn, {"v": 1, "type": "npc.state.set", "id": "s", "state": {"v": 1, "npc": BROM,
                                                                             "history": [turn] * 10}}))
    [submit] = send(conn, {"v": 1, "type": "npc.say", "id": "q", "npc": "brom", "input": "last",
                           "options": {"max_tokens": 50}})
    request = conn.daemon.prepare(submit.job, count_tokens=lambda s: len(s.split()), n_ctx=300)
    assert len(request.prompt.split()) <= 300 - 50
    assert request.prompt.count("Player:") < 11
    assert request.prompt.rstrip().endswith("Brom:")


# --- described actions and emotions, allowed_actions ------------------------------------------------

DESCRIBED = {**BROM, "actions": ["none", {"name": "repair", "description": "mend the player's gear for coin"}],
             "emotions": [{"name": "neutral", "description": "calm"}, "angry"]}


def test_welcome_announces_the_additive_features(tmp_path: Path) -> None:
    c = make_daemon(tmp_path).connect()
    [welcome] = frames(send(c, {"v": 1, "type": "hello", "id": "h", "token": TOKEN, "protocol": 1}))
    assert {"choices", "allowed_actions"} <= set(welcome["capabilities"])


def test_described_actions_are_defined_and_rendered(conn: ConnectionCore) -> None:
    [defined] = frames(send(conn, {"v": 1, "type": "npc.define", "id": "d", "npc": DESCRIBED}))
    assert defined["type"] == "npc.defined"
    [submit] = send(conn, {"v": 1, "type": "npc.say", "id": "s", "npc": "brom", "input": "hi"})
    request = conn.daemon.prepare(submit.job, count_tokens=lambda s: len(s.split()), n_ctx=4096)
    assert "- repair (mend the player's gear for coin)\n" in request.prompt
    assert request.schema["properties"]["action"]["enum"] == ["none", "repair"]
    assert request.schema["properties"]["emotion"]["enum"] == ["neutral", "angry"]
    [state] = frames(send(conn, {"v": 1, "type": "npc.state.get", "id": "g", "npc": "brom"}))
    assert state["state"]["npc"]["actions"] == DESCRIBED["actions"]  # saved as given, descriptions kept


@pytest.mark.parametrize("frame", [
    {"v": 1, "type": "npc.define", "id": "d",
     "npc": {**BROM, "actions": ["repair", {"name": "repair", "description": "mend gear"}]}},
    {"v": 1, "type": "npc.state.set", "id": "d", "state": {"v": 1, "history": [], "npc": {
        **BROM, "emotions": [{"name": "angry", "description": "a"}, {"name": "angry", "description": "b"}]}}},
])
def test_a_name_declared_twice_across_forms_is_a_bad_frame(conn: ConnectionCore, frame: dict[str, Any]) -> None:
    """The schema cannot see the clash (the items differ), the model can: the client hears bad_frame."""
    actions = send(conn, frame)
    assert error_code(actions) == "bad_frame"
    [error] = frames(actions)
    assert error["id"] == "d" and "declared more than once" in error["message"]
    assert "repair" in error["message"] or "angry" in error["message"]
    assert frames(send(conn, {"v": 1, "type": "ping", "id": "p"}))[0]["type"] == "pong"


def test_an_undeclared_allowed_action_is_unknown_action_and_the_connection_carries_on(conn: ConnectionCore) -> None:
    frames(send(conn, {"v": 1, "type": "npc.define", "id": "d", "npc": BROM}))
    actions = send(conn, {"v": 1, "type": "npc.say", "id": "s", "npc": "brom", "input": "hi",
                          "allowed_actions": ["none", "fly", "dance"]})
    assert error_code(actions) == "unknown_action"
    [error] = frames(actions)
    assert error["id"] == "s"
    assert "fly, dance" in error["message"] and "declared: none, repair" in error["message"]
    assert not conn.pending  # nothing queued for the refused line
    [submit] = send(conn, {"v": 1, "type": "npc.say", "id": "s2", "npc": "brom", "input": "hi",
                           "allowed_actions": ["repair"]})
    assert isinstance(submit, Submit)


def test_allowed_actions_narrow_the_prompt_schema_and_the_recorded_turn(tmp_path: Path) -> None:
    daemon = make_daemon(tmp_path)
    conn = daemon.connect()
    hello(conn)
    frames(send(conn, {"v": 1, "type": "npc.define", "id": "d", "npc": BROM}))
    frame = _finish(daemon, conn, '{"say": "Aye.", "emotion": "angry", "action": "repair"}',
                    allowed_actions=["repair"])
    assert frame["reply"]["action"] == "repair"
    [state] = frames(send(conn, {"v": 1, "type": "npc.state.get", "id": "g", "npc": "brom"}))
    assert state["state"]["history"][0]["allowed_actions"] == ["repair"]
    # the next prompt shows the earlier turn as it was said, then this turn without a narrowing
    [submit] = send(conn, {"v": 1, "type": "npc.say", "id": "next", "npc": "brom", "input": "Thanks."})
    prompt = daemon.prepare(submit.job, count_tokens=lambda s: len(s.split()), n_ctx=4096).prompt
    assert prompt.count("[Actions allowed now: repair]\nPlayer: Fix this?\n") == 1
    assert prompt.endswith("Player: Thanks.\nBrom: ")


def test_a_declared_but_disallowed_action_is_refused(tmp_path: Path) -> None:
    daemon = make_daemon(tmp_path)
    conn = daemon.connect()
    hello(conn)
    frames(send(conn, {"v": 1, "type": "npc.define", "id": "d", "npc": BROM}))
    with pytest.raises(DaemonError) as err:
        _finish(daemon, conn, '{"say": "Aye.", "emotion": "angry", "action": "repair"}', allowed_actions=["none"])
    assert err.value.code == ErrorCode.GENERATION_FAILED


def test_a_cut_off_reply_falls_back_to_an_allowed_action(tmp_path: Path) -> None:
    """The NPC's default action (repair) is not allowed this turn, so the fallback is an allowed one."""
    daemon = make_daemon(tmp_path)
    conn = daemon.connect()
    hello(conn)
    npc = {**BROM, "actions": ["attack", "repair", "none"], "defaults": {"action": "repair"}}
    frames(send(conn, {"v": 1, "type": "npc.define", "id": "d", "npc": npc}))
    [submit] = send(conn, {"v": 1, "type": "npc.say", "id": "s", "npc": "brom", "input": "Fix this?",
                           "allowed_actions": ["attack", "none"]})
    assembler = daemon.assembler(submit.job)
    assembler.feed('{"say": "I will fix it when the')
    result = GenerationResult(text="", finish_reason="length", prompt_tokens=10, completion_tokens=5)
    frame = daemon.finish(submit.job, result, assembler)
    assert frame["finish_reason"] == "length"
    assert frame["reply"]["action"] == "none"


def test_an_action_dropped_by_a_redefine_before_the_line_runs_is_unknown_action(conn: ConnectionCore) -> None:
    frames(send(conn, {"v": 1, "type": "npc.define", "id": "d", "npc": BROM}))
    [submit] = send(conn, {"v": 1, "type": "npc.say", "id": "s", "npc": "brom", "input": "hi",
                           "allowed_actions": ["repair"]})
    frames(send(conn, {"v": 1, "type": "npc.define", "id": "d2", "npc": {**BROM, "actions": ["none"]}}))
    with pytest.raises(DaemonError) as err:
        conn.daemon.prepare(submit.job, count_tokens=lambda s: len(s.split()), n_ctx=4096)
    assert err.value.code == ErrorCode.UNKNOWN_ACTION and err.value.request_id == "s"


# --- experience recording: the feedback frame (docs/EXPERIENCE.md) -----------------------------------------


def _recording(tmp_path: Path, record: bool = True, **cfg: Any) -> tuple[DaemonCore, ConnectionCore]:
    daemon = make_daemon(tmp_path, **{"record_experience": True, **cfg})
    conn = daemon.connect()
    hello(conn, game="tavern")
    frames(send(conn, {"v": 1, "type": "npc.define", "id": "d", "npc": {**BROM, "record": record}}))
    return daemon, conn


def _feedback(conn: ConnectionCore, **fields: Any) -> list[Any]:
    return send(conn, {"v": 1, "type": "feedback", "id": "f", "npc": "brom", "reply_id": "s", "reward": 1,
                       **fields})


def test_a_recording_npcs_reply_becomes_a_valid_record_line(tmp_path: Path) -> None:
    from zyke.experience import ExperienceRecord, parse_entry

    daemon, conn = _recording(tmp_path)
    _finish(daemon, conn, '{"say": "Aye.", "emotion": "angry", "action": "repair"}', rid="s1", state={"gold": 3})
    [submit] = send(conn, {"v": 1, "type": "npc.say", "id": "s2", "npc": "brom", "input": "And now?",
                           "allowed_actions": ["none"]})
    daemon.prepare(submit.job, count_tokens=lambda s: len(s.split()), n_ctx=4096)
    assembler = daemon.assembler(submit.job)
    assembler.feed('{"say": "No.", "emotion": "neutral", "action": "none"}')
    daemon.finish(submit.job, GenerationResult(text="", finish_reason="stop", prompt_tokens=1, completion_tokens=1),
                  assembler)
    key, line = submit.job.experience
    assert key == ("tavern", "brom", "s2") and line.endswith(b"\n") and line.count(b"\n") == 1
    record = parse_entry(line.decode())
    assert isinstance(record, ExperienceRecord)
    assert (record.game, record.npc, record.reply_id, record.input) == ("tavern", "brom", "s2", "And now?")
    assert record.allowed_actions == ["none"] and record.reply.say == "No." and record.feedback == []
    # the history is what the prompt showed: the first line, with its state
    assert [t.player for t in record.history] == ["Fix this?"] and record.history[0].state == {"gold": 3}
    assert TOKEN.encode() not in line


@pytest.mark.parametrize(("cfg", "record"), [({"record_experience": False}, True), ({}, False)])
def test_nothing_is_recorded_unless_the_daemon_and_the_npc_opt_in(tmp_path: Path, cfg: dict[str, Any],
                                                                   record: bool) -> None:
    daemon, conn = _recording(tmp_path, record, **cfg)
    [submit] = send(conn, {"v": 1, "type": "npc.say", "id": "s", "npc": "brom", "input": "Fix this?"})
    daemon.prepare(submit.job, count_tokens=lambda s: len(s.split()), n_ctx=4096)
    assembler = daemon.assembler(submit.job)
    assembler.feed('{"say": "Aye.", "emotion": "angry", "action": "repair"}')
    daemon.finish(submit.job, GenerationResult(text="", finish_reason="stop", prompt_tokens=1, completion_tokens=1),
                  assembler)
    assert submit.job.experience is None and not daemon.recorded
    assert error_code(_feedback(conn)) == "not_recording"


def test_feedback_is_checked_against_the_recorded_reply_and_becomes_a_feedback_line(tmp_path: Path) -> None:
    from zyke.experience import FeedbackLine, parse_entry
    from zyke_daemon.core import RecordFeedback

    daemon, conn = _recording(tmp_path)
    _finish(daemon, conn, '{"say": "Aye.", "emotion": "angry", "action": "repair"}', allowed_actions=["none", "repair"])
    [action] = _feedback(conn, reward=-1, label={"action": "none", "emotion": "neutral"}, source="player", note="x")
    assert isinstance(action, RecordFeedback) and action.request_id == "f" and action.key == ("tavern", "brom", "s")
    line = parse_entry(action.line.decode())
    assert isinstance(line, FeedbackLine) and line.feedback.reward == -1.0 and line.feedback.source == "player"
    assert line.feedback.label is not None and line.feedback.label.action == "none" and line.feedback.note == "x"
    # typed errors, one frame each, and the connection carries on
    assert error_code(_feedback(conn, reply_id="nope")) == "unknown_reply"
    assert error_code(_feedback(conn, label={"action": "dance"})) == "bad_label"
    assert error_code(_feedback(conn, label={"emotion": "joyful"})) == "bad_label"
    assert error_code(_feedback(conn, npc="mira")) == "unknown_npc"
    assert error_code(_feedback(conn, reward=1.5)) == "bad_frame"
    assert error_code(_feedback(conn, label={})) == "bad_frame"
    assert error_code(_feedback(conn, token=TOKEN)) == "bad_frame"
    assert error_code(send(conn, '{"v": 1, "type": "feedback", "id": "f", "npc": "brom", "reply_id": "s", '
                                 '"reward": NaN}')) == "bad_frame"
    [ok] = _feedback(conn)
    assert isinstance(ok, RecordFeedback)
    # a record holds at most 64 ratings: the 65th is refused before it reaches the file
    for _ in range(62):
        _feedback(conn)
    assert error_code(_feedback(conn)) == "experience_full"


def test_feedback_on_a_narrowed_turn_must_use_an_allowed_action(tmp_path: Path) -> None:
    daemon, conn = _recording(tmp_path)
    _finish(daemon, conn, '{"say": "No.", "emotion": "angry", "action": "none"}', allowed_actions=["none"])
    assert error_code(_feedback(conn, label={"action": "repair"})) == "bad_label"
    assert not isinstance(_feedback(conn, label={"action": "none"})[0], Send)


def test_welcome_announces_feedback(tmp_path: Path) -> None:
    c = make_daemon(tmp_path).connect()
    [welcome] = frames(send(c, {"v": 1, "type": "hello", "id": "h", "token": TOKEN, "protocol": 1}))
    assert "feedback" in welcome["capabilities"]
