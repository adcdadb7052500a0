"""examples/tavern.py runs unattended against a real daemon: two scripted lines, a save, a quit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from daemon_proc import DaemonProcess

TAVERN = Path(__file__).resolve().parent.parent / "examples" / "tavern.py"


@pytest.mark.slow
def test_tavern_plays_a_script(daemon: DaemonProcess, tmp_path: Path) -> None:
    save = tmp_path / "save.json"
    script = tmp_path / "lines.txt"
    script.write_text(f"Evening, Brom.\n/talk mira\nAn ale, please!\n/save {save}\n/quit\n")
    env = dict(os.environ, ZYKE_URL=daemon.url, ZYKE_TOKEN=daemon.token)
    run = subprocess.run([sys.executable, str(TAVERN), "--script", str(script), "--max-tokens", "24",
                          "--game", "test_tavern"], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "\nBrom: " in run.stdout and "\nMira: " in run.stdout
    assert "\n  [" not in run.stdout, f"a line failed: {run.stdout}"
    data = json.loads(save.read_text())
    assert [t["player"] for t in data["npcs"]["brom"]["history"]][-1] == "Evening, Brom."
    assert [t["player"] for t in data["npcs"]["mira"]["history"]][-1] == "An ale, please!"
    assert run.stdout.rstrip().endswith("You leave the tavern.")


def test_tavern_without_a_daemon_exits_with_the_hint(tmp_path: Path) -> None:
    env = dict(os.environ, ZYKE_URL="ws://127.0.0.1:9", ZYKE_TOKEN="x")
    run = subprocess.run([sys.executable, str(TAVERN)], input="Hello\n", env=env, capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 1
    assert "zyke-daemon start" in run.stderr
