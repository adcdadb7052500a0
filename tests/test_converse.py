"""``zyke-train converse``: the word 6-gram repeat check, the conversation scripts, and the command against a
real daemon.

The unit tests pin the definition the product requirement is measured by (six consecutive words, case and
punctuation ignored, turns where the player asked for a repeat exempt), because a looser or stricter check
would silently move the number the requirement is judged on. The slow test runs the real CLI on two scripts.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from daemon_proc import DaemonProcess
from zyke.protocol.models import NpcSpec
from zyke_train.cli import main
from zyke_train.converse import (
    NGRAM,
    Overlap,
    ScriptError,
    converse,
    find_overlaps,
    format_table,
    load_scripts,
    ngrams,
    summarize,
    words,
)

SCRIPTS = Path(__file__).resolve().parents[1] / "training" / "data" / "conversations.jsonl"


# -- words and the overlap check


def test_words_lowercase_and_strip_punctuation() -> None:
    assert words("Ten GOLD, friend -- don't haggle!") == ["ten", "gold", "friend", "dont", "haggle"]
    assert words("gold.Come back\u2014now\u2026 \u201cPlease\u201d, it\u2019s $5") == [
        "gold", "come", "back", "now", "please", "its", "5"]
    assert words("  ") == []


def test_ngrams_are_six_words_in_order_each_once() -> None:
    assert NGRAM == 6
    assert ngrams("a b c d e f g") == ["a b c d e f", "b c d e f g"]
    assert ngrams("a b c d e") == []  # five words: no 6-gram at all
    assert ngrams("x x x x x x x x") == ["x x x x x x"]


def test_a_shared_six_gram_across_turns_is_found_with_both_turns() -> None:
    replies = ["The toll is three silver a head, traveller.",
               "Hello there.",
               "As I said, the toll is three silver a head."]
    assert find_overlaps(replies) == [
        Overlap(turn=2, earlier_turn=0, ngrams=("the toll is three silver a", "toll is three silver a head"))]


def test_a_five_word_overlap_is_not_a_repeat() -> None:
    assert find_overlaps(["one two three four five six", "zero one two three four five seven"]) == []
    # one more shared word makes it a 6-gram
    assert find_overlaps(["one two three four five six", "zero one two three four five six"]) == [
        Overlap(1, 0, ("one two three four five six",))]


def test_case_and_punctuation_do_not_hide_a_repeat() -> None:
    found = find_overlaps(["Three silver a head, double after DARK!",
                           "three... silver; a HEAD double after dark"])
    assert [(o.turn, o.earlier_turn) for o in found] == [(1, 0)]
    assert found[0].ngrams[0] == "three silver a head double after"


def test_repeat_ok_turns_are_exempt_but_still_count_as_earlier_replies() -> None:
    line = "Bring the astrolabe back from the drowned chapel."
    assert find_overlaps(["Hello.", line, line], repeat_ok={2}) == []
    found = find_overlaps([line, line, line], repeat_ok={1})
    assert [(o.turn, o.earlier_turn) for o in found] == [(2, 0), (2, 1)]


def test_every_earlier_turn_is_compared_not_only_the_previous_one() -> None:
    a = "Mind the river spirits and keep your hands inside the barge."
    found = find_overlaps([a, "Two silver.", "No.", "Fine.", a.upper()])
    assert [(o.turn, o.earlier_turn) for o in found] == [(4, 0)]


# -- the conversation loop, with a fake client (no daemon)


@dataclass
class FakeReply:
    say: str
    emotion: str = "neutral"
    action: str = "none"
    finish_reason: str = "stop"
    adapter: str | None = "npc-default"


@dataclass
class FakeNpc:
    lines: list[str]
    calls: list[tuple[str, Any]] = field(default_factory=list)

    def reset(self) -> None:
        self.calls.append(("reset", None))

    def say(self, text: str, *, state: Mapping[str, Any] | None = None, adapter: str | None = None,
            max_tokens: int | None = None) -> FakeReply:
        self.calls.append(("say", (text, state, adapter, max_tokens)))
        return FakeReply(self.lines.pop(0), action="bogus" if text == "break" else "none")


@dataclass
class FakeClient:
    npc_handle: FakeNpc
    defined: list[dict[str, Any]] = field(default_factory=list)

    def npc(self, npc_id: str, persona: str, actions: Any = ("none",), emotions: Any = ("neutral",), *,
            name: str | None = None) -> FakeNpc:
        self.defined.append({"id": npc_id, "persona": persona, "actions": actions, "emotions": emotions,
                             "name": name})
        return self.npc_handle


def test_converse_resets_first_then_says_every_turn_and_checks_the_replies() -> None:
    script = load_scripts(SCRIPTS)[0]
    repeated = "Three silver a head and double after dark, that is the fare."
    npc = FakeNpc(["Evening.", repeated, "Still three silver.", "No.", repeated, "Get on then."])
    result = converse(FakeClient(npc), script, max_tokens=24, adapter="my-adapter")
    assert npc.calls[0] == ("reset", None)
    says = [c[1] for c in npc.calls[1:]]
    assert [s[0] for s in says] == [t.input for t in script.turns]
    assert all(s[1] == t.state and s[2] == "my-adapter" and s[3] == 24
               for s, t in zip(says, script.turns, strict=True))
    assert result.repeating_turns == [4]
    assert result.overlaps[0].earlier_turn == 1
    summary = summarize([result])
    assert summary["replies_with_repeat"] == {"count": 1, "rate": 0.2}
    assert summary["replies_checked"] == 5
    assert summary["distinct_lines_rate"] == round(5 / 6, 4)
    assert summary["adapter"] == "npc-default"
    assert summary["invalid_replies"] == 0
    assert "turn 4 ~ turn 1" in format_table([result])


def test_a_reply_outside_the_declared_labels_is_marked_invalid() -> None:
    script = load_scripts(SCRIPTS)[0]
    script = type(script)(script.id, script.npc, (type(script.turns[0])("break", {}),))
    result = converse(FakeClient(FakeNpc(["Hm."])), script, max_tokens=8)
    assert not result.turns[0].valid
    assert summarize([result])["invalid_replies"] == 1


# -- the script file


def test_the_script_file_is_valid_and_big_enough() -> None:
    rows = [json.loads(line) for line in SCRIPTS.read_text(encoding="utf-8").splitlines() if line.strip()]
    assert len(rows) >= 12
    for row in rows:
        assert set(row) == {"id", "npc", "turns", "repeat_ok"}
        NpcSpec.model_validate(row["npc"])
        assert len(row["turns"]) == 6, row["id"]
        assert all(isinstance(t["input"], str) and isinstance(t.get("state", {}), dict) for t in row["turns"])
    assert len({row["npc"]["id"] for row in rows}) >= 10
    assert len({row["id"] for row in rows}) == len(rows)
    # plain labels and described actions, mixed within one NPC
    assert any({type(a) for a in row["npc"]["actions"]} == {str, dict} for row in rows)
    # at least one "say that again" turn, marked in repeat_ok
    asks = [(row, i) for row in rows for i, t in enumerate(row["turns"]) if "say that again" in t["input"].lower()]
    assert asks and all(i in row["repeat_ok"] for row, i in asks)
    assert len(load_scripts(SCRIPTS)) == len(rows)


def test_the_scripts_do_not_reuse_training_npcs() -> None:
    data = SCRIPTS.parent
    names, ids, personas = set(), set(), set()
    for path in data.glob("*.jsonl"):
        if path == SCRIPTS:
            continue
        for line in path.read_text(encoding="utf-8").splitlines():
            npc = json.loads(line)["npc"]
            names.add(npc.get("name"))
            ids.add(npc["id"])
            personas.add(npc["persona"])
    for script in load_scripts(SCRIPTS):
        assert script.npc.name not in names and script.npc.id not in ids and script.npc.persona not in personas


@pytest.mark.parametrize(("mutate", "message"), [
    (lambda r: r.update(repeat_ok=[6]), "repeat_ok"),
    (lambda r: r.update(repeat_ok=[0]), "repeat_ok"),
    (lambda r: r.update(extra=1), "unknown keys"),
    (lambda r: r["turns"].__setitem__(0, {"input": ""}), "turn 0"),
    (lambda r: r["npc"].update(actions=[]), "bad npc"),
])
def test_bad_scripts_are_rejected_with_file_and_line(tmp_path: Path, mutate: Any, message: str) -> None:
    rows = [json.loads(line) for line in SCRIPTS.read_text(encoding="utf-8").splitlines()[:2]]
    mutate(rows[1])
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    with pytest.raises(ScriptError, match=f"bad.jsonl:2: .*{message}"):
        load_scripts(path)


def test_one_npc_id_with_two_definitions_is_rejected(tmp_path: Path) -> None:
    rows = [json.loads(line) for line in SCRIPTS.read_text(encoding="utf-8").splitlines()[:2]]
    rows[1]["npc"] = {**rows[0]["npc"], "persona": "Someone else entirely."}
    path = tmp_path / "clash.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    with pytest.raises(ScriptError, match="defined differently"):
        load_scripts(path)


# -- the command


def test_an_unreachable_daemon_exits_2_with_a_clear_message(tmp_path: Path) -> None:
    with socket.socket() as sock:  # a port nothing listens on once this socket is closed
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    report = tmp_path / "r.json"
    result = CliRunner().invoke(main, ["converse", "--script", str(SCRIPTS), "--url", f"ws://127.0.0.1:{port}",
                                       "--token", "x", "--report", str(report)])
    assert result.exit_code == 2
    assert "cannot reach the Zyke daemon" in result.output
    assert not report.exists()


def test_a_bad_script_file_exits_2(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"id": "x"}\n', encoding="utf-8")
    result = CliRunner().invoke(main, ["converse", "--script", str(path), "--url", "ws://127.0.0.1:9"])
    assert result.exit_code == 2
    assert "bad.jsonl:1" in result.output


@pytest.mark.slow
def test_converse_against_a_real_daemon(daemon: DaemonProcess, tmp_path: Path) -> None:
    rows = {r["id"]: r for r in map(json.loads, SCRIPTS.read_text(encoding="utf-8").splitlines())}
    chosen = [rows["astrolabe-briefing"], rows["store-lantern-haggle"]]  # one with repeat_ok, one without
    script = tmp_path / "two.jsonl"
    script.write_text("".join(json.dumps(r) + "\n" for r in chosen), encoding="utf-8")
    report_path = tmp_path / "reports" / "conversations.json"
    result = CliRunner().invoke(main, ["converse", "--script", str(script), "--report", str(report_path),
                                       "--url", daemon.url, "--token", daemon.token, "--max-tokens", "24"])
    assert result.exit_code == 0, result.output
    assert "astrolabe-briefing" in result.output and "replies with a repeated 6-gram" in result.output

    report = json.loads(report_path.read_text(encoding="utf-8"))
    summary = report["summary"]
    assert summary["conversations"] == 2 and summary["npcs"] == 2 and summary["turns"] == 12
    assert summary["replies_checked"] == 9  # 2 x 5 later turns, less astrolabe-briefing's repeat_ok turn
    assert 0 <= summary["replies_with_repeat"]["count"] <= 9
    assert summary["replies_with_repeat"]["rate"] == pytest.approx(summary["replies_with_repeat"]["count"] / 9,
                                                                   abs=1e-4)
    assert 0 < summary["distinct_lines_rate"] <= 1
    assert summary["invalid_replies"] == 0
    assert report["max_tokens"] == 24 and report["daemon"]["backend"]

    assert [c["id"] for c in report["conversations"]] == ["astrolabe-briefing", "store-lantern-haggle"]
    adapters = set()
    for conv, row in zip(report["conversations"], chosen, strict=True):
        spec = NpcSpec.model_validate(row["npc"])
        assert conv["repeat_ok"] == row["repeat_ok"]
        assert [t["input"] for t in conv["turns"]] == [t["input"] for t in row["turns"]]
        for turn in conv["turns"]:
            assert isinstance(turn["say"], str)
            assert turn["emotion"] in spec.emotion_names and turn["action"] in spec.action_names
            assert turn["valid"] is True
            assert turn["repeat_ok"] == (turn["index"] in row["repeat_ok"])
            adapters.add(turn["adapter"])
        for overlap in conv["overlaps"]:
            assert overlap["earlier_turn"] < overlap["turn"] and overlap["turn"] not in row["repeat_ok"]
            later, earlier = conv["turns"][overlap["turn"]]["say"], conv["turns"][overlap["earlier_turn"]]["say"]
            for gram in overlap["ngrams"]:
                assert len(gram.split()) == 6 and gram in ngrams(later) and gram in ngrams(earlier)
        assert conv["replies_with_repeat"] == len({o["turn"] for o in conv["overlaps"]})
    assert summary["adapter"] == (adapters.pop() if len(adapters) == 1 else sorted(adapters, key=str))
