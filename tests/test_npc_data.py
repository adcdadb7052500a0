"""`zyke-train npc-data` through the real CLI, and the shipped starter NPC dataset."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from zyke.prompt_format import render_prompt, render_reply
from zyke.protocol import load_schema
from zyke.protocol.models import NpcReply, NpcSpec, Turn
from zyke.protocol.validation import first_error
from zyke_train.cli import main
from zyke_train.npc_data import check_row, render_row

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "training" / "data"
TRAIN, HELDOUT = DATA / "npc_train.jsonl", DATA / "npc_heldout.jsonl"

NPC = {"id": "brom", "name": "Brom", "persona": "A gruff dwarven blacksmith.",
       "actions": ["none", "trade", "repair"], "emotions": ["neutral", "pleased", "annoyed"]}


def _row(row_id: str, **overrides: Any) -> dict[str, Any]:
    row: dict[str, Any] = {
        "id": row_id, "npc": NPC,
        "history": [{"player": "Morning!", "state": {"location": "forge"},
                     "reply": {"say": "Mind the sparks.", "emotion": "neutral", "action": "none"}}],
        "state": {"location": "forge", "gold": 12},
        "input": "Can you fix my sword?",
        "reply": {"say": "Ten gold. Back by dusk.", "emotion": "pleased", "action": "repair"},
        "tags": ["service"],
    }
    row.update(overrides)
    return row


GOOD_2 = _row("good-2", history=[], input="Bye!", reply={"say": "Aye.", "emotion": "neutral", "action": "none"})
del GOOD_2["state"]  # no state and no history: the prompt has neither


def _fixture(tmp_path: Path) -> Path:
    """Good and bad rows; the comments give each line's number, which the report must match."""
    no_npc = _row("missing-npc")
    del no_npc["npc"]
    bad_history = [{"player": "Hi", "reply": {"say": "Hm.", "emotion": "furious", "action": "none"}}]
    lines = [
        json.dumps(_row("good-1")),                                                                     # 1
        '{"id": "broken", "npc": ',                                                                      # 2 bad JSON
        "",                                                                                              # 3 skipped
        json.dumps(no_npc),                                                                              # 4 no npc
        json.dumps(_row("bad-action", reply={"say": "Hah!", "emotion": "pleased", "action": "dance"})),  # 5
        json.dumps(_row("bad-history", history=bad_history)),                                            # 6
        json.dumps(GOOD_2),                                                                              # 7
        json.dumps(_row("good-1")),                                                                      # 8 dup id
    ]
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_npc_data_reports_bad_rows_and_renders_good_ones(tmp_path: Path) -> None:
    src = _fixture(tmp_path)
    out, report_path = tmp_path / "out" / "examples.jsonl", tmp_path / "report.json"
    result = CliRunner().invoke(main, ["npc-data", str(src), "--out", str(out), "--report", str(report_path)])
    assert result.exit_code == 0, result.output
    assert "total: 7 rows, 2 good, 5 bad" in result.output
    assert f"{src}:5" in result.output and "bad-action" in result.output  # the printed table

    report = json.loads(report_path.read_text(encoding="utf-8"))
    assert (report["rows"], report["good"], report["bad"]) == (7, 2, 5)
    rejected = {r["line"]: r for r in report["rejected"]}
    assert sorted(rejected) == [2, 4, 5, 6, 8]
    assert all(r["file"] == str(src) for r in rejected.values())
    assert rejected[2]["id"] is None and rejected[2]["reason"].startswith("bad JSON")
    assert rejected[4]["id"] == "missing-npc" and "'npc' is a required property" in rejected[4]["reason"]
    assert rejected[5]["id"] == "bad-action" and rejected[5]["reason"].startswith("reply/action: 'dance'")
    assert rejected[6]["id"] == "bad-history" and rejected[6]["reason"].startswith("history/0/reply/emotion")
    assert rejected[8]["id"] == "good-1" and "duplicate id" in rejected[8]["reason"] and ":1" in rejected[8]["reason"]

    examples = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [e["id"] for e in examples] == ["good-1", "good-2"]
    rows = {"good-1": _row("good-1"), "good-2": GOOD_2}
    for example in examples:
        row = rows[example["id"]]
        assert set(example) == {"id", "prompt", "completion"}
        expected = render_prompt(NpcSpec.model_validate(row["npc"]), [Turn.model_validate(t) for t in row["history"]],
                                 row["input"], row.get("state"))
        assert example["prompt"] == expected
        assert example["completion"].endswith("\n")
        assert json.loads(example["completion"]) == row["reply"]
        assert example["completion"] == render_reply(NpcReply.model_validate(row["reply"])) + "\n"
    assert '[Game state: {"gold": 12, "location": "forge"}]' in examples[0]["prompt"]
    assert "[Game state" not in examples[1]["prompt"]


def test_npc_data_extra_reply_keys_are_rejected(tmp_path: Path) -> None:
    """target/args are valid protocol but never decoded, so training on them would teach the impossible."""
    src = tmp_path / "rows.jsonl"
    reply = {"say": "Out!", "emotion": "annoyed", "action": "none", "target": "player"}
    src.write_text(json.dumps(_row("with-target", reply=reply)) + "\n", encoding="utf-8")
    out, report = tmp_path / "o.jsonl", tmp_path / "r.json"
    result = CliRunner().invoke(main, ["npc-data", str(src), "--out", str(out), "--report", str(report)])
    assert result.exit_code == 0
    (rejection,) = json.loads(report.read_text())["rejected"]
    assert rejection["reason"].startswith("reply: Additional properties")


def test_npc_data_unreadable_input_exits_2(tmp_path: Path) -> None:
    out = tmp_path / "o.jsonl"
    result = CliRunner().invoke(main, ["npc-data", str(tmp_path / "missing.jsonl"), "--out", str(out)])
    assert result.exit_code == 2
    assert not out.exists()
    binary = tmp_path / "binary.jsonl"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    assert CliRunner().invoke(main, ["npc-data", str(binary), "--out", str(out)]).exit_code == 2


def test_console_script_runs(tmp_path: Path) -> None:
    """The installed `zyke-train` entry point, as a user runs it."""
    exe = Path(sys.executable).parent / "zyke-train"
    if not exe.exists():
        pytest.skip("zyke-train console script not installed in this environment")
    out = tmp_path / "o.jsonl"
    proc = subprocess.run([str(exe), "npc-data", str(HELDOUT), "--out", str(out)],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "0 bad" in proc.stdout
    assert len(out.read_text(encoding="utf-8").splitlines()) == len(HELDOUT.read_text().splitlines())


def test_row_schema_example_validates() -> None:
    schema = load_schema("npc_example")
    assert schema["$id"] == "https://zyke.dev/schemas/v1/npc_example.json"
    for example in schema["examples"]:
        assert first_error("npc_example", example) is None
        assert check_row(example) is None


def test_allowed_actions_rows_are_checked_and_rendered() -> None:
    """A row's allowed_actions narrow its reply (as the daemon decodes) and appear in its prompt."""
    described = {**NPC, "actions": ["none", {"name": "trade", "description": "buy or sell goods"}, "repair"]}
    good = _row("narrowed", npc=described, allowed_actions=["none", "repair"])
    assert check_row(good) is None
    example = render_row(good)
    assert "- trade (buy or sell goods)\n" in example.prompt
    assert example.prompt.endswith("[Actions allowed now: none, repair]\nPlayer: Can you fix my sword?\nBrom: ")

    outside = _row("outside", allowed_actions=["none", "trade"])  # the reply repairs
    assert check_row(outside) == "reply/action: 'repair' is not one of ['none', 'trade'] " \
                                 "(not allowed for NPC 'brom' this turn)"
    undeclared = _row("undeclared", allowed_actions=["repair", "fly"])
    assert check_row(undeclared) == "(row)/allowed_actions: fly not declared by NPC 'brom'"
    history = [{"player": "Hi", "allowed_actions": ["trade"],
                "reply": {"say": "Hm.", "emotion": "neutral", "action": "none"}}]
    assert check_row(_row("old-turn", history=history)).startswith("history/0/reply/action: 'none'")


# --- the shipped dataset ------------------------------------------------------------------------


def _load(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def test_shipped_dataset_validates_fully(tmp_path: Path) -> None:
    out, report = tmp_path / "examples.jsonl", tmp_path / "report.json"
    args = ["npc-data", str(TRAIN), str(HELDOUT), "--out", str(out), "--report", str(report)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    data = json.loads(report.read_text(encoding="utf-8"))
    assert data["bad"] == 0, data["rejected"][:5]
    assert data["rows"] == data["good"] >= 400


def test_shipped_dataset_shape_and_split() -> None:
    train, heldout = _load(TRAIN), _load(HELDOUT)
    rows = train + heldout
    assert len(rows) >= 400
    personas = {r["npc"]["id"] for r in rows}
    assert len(personas) >= 12
    train_ids, heldout_ids = {r["id"] for r in train}, {r["id"] for r in heldout}
    assert len(train_ids) == len(train) and len(heldout_ids) == len(heldout)
    assert not train_ids & heldout_ids
    assert 0.10 <= len(heldout) / len(rows) <= 0.20
    train_personas = {r["npc"]["id"] for r in train}
    unseen = {r["npc"]["id"] for r in heldout} - train_personas
    assert len(unseen) >= 2, "held-out must include personas training never sees"
    assert {r["npc"]["id"] for r in heldout} & train_personas, "held-out must also sample the trained personas"
    # each persona declares its own enums, and the lines stay short
    for r in rows:
        assert 3 <= len(r["npc"]["actions"]) <= 7 and 3 <= len(r["npc"]["emotions"]) <= 6
        assert len(r["reply"]["say"]) <= 200
    assert sum("state" in r for r in rows) >= len(rows) // 3
    assert sum(bool(r["history"]) for r in rows) >= len(rows) // 4


def test_shipped_dataset_is_reproducible() -> None:
    """The JSONL files are exactly what make_dataset.py builds from sources/ (no hand edits drift)."""
    proc = subprocess.run([sys.executable, str(DATA / "make_dataset.py"), "--check"],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
