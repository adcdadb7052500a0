"""Ask a real daemon for held-out NPC lines with and without a registered adapter, by name.

Starts ``zyke-daemon`` (llama.cpp, the embedded model) in a subprocess with data and config dirs of its own
and the user's adapter registry (or ``ZYKE_DATA_DIR``'s) as ``--adapter-dir``, says the first ``--n``
held-out scenarios without history of each chosen NPC through the Python SDK with ``adapter=None`` and
``adapter=NAME``, and prints both replies. Used to produce ``npc_daemon_demo.txt`` after the documented run
in training/README.md:

    python training/reports/daemon_demo.py --adapter npc-starter > training/reports/npc_daemon_demo.txt
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from zyke import Client
from zyke.paths import data_dir

HELDOUT = Path(__file__).resolve().parents[1] / "data" / "npc_heldout.jsonl"


def start_daemon(home: Path, token: str) -> tuple[subprocess.Popen[bytes], int]:
    """A daemon on a free port with dirs of its own, serving the adapters registered in the user's registry."""
    adapters = data_dir() / "adapters"
    env = dict(os.environ, ZYKE_CONFIG_DIR=str(home / "config"), ZYKE_DATA_DIR=str(home / "data"), ZYKE_TOKEN=token,
               ZYKE_N_THREADS="2")
    runtime = home / "data" / "daemon.json"
    proc = subprocess.Popen([sys.executable, "-m", "zyke_daemon", "start", "--port", "0", "--adapter-dir",
                             str(adapters)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            port = json.loads(runtime.read_text())["port"]
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as resp:
                if json.loads(resp.read())["status"] == "ready":
                    return proc, port
        except (OSError, ValueError, KeyError):
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("daemon did not become ready")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--adapter", required=True)
    parser.add_argument("--n", type=int, default=3, help="scenarios per NPC")
    parser.add_argument("--npcs", default="ferrin,zephyra,brom")
    args = parser.parse_args()
    rows = [json.loads(line) for line in HELDOUT.read_text().splitlines() if line.strip()]
    token = "demo-token-0123456789"
    with tempfile.TemporaryDirectory() as home:
        proc, port = start_daemon(Path(home), token)
        try:
            with Client(f"ws://127.0.0.1:{port}", token, game="demo") as client:
                names = [a.name for a in client.adapters()]
                print(f"daemon on port {port}; registered adapters: {', '.join(names)}")
                for npc_id in args.npcs.split(","):
                    for row in [r for r in rows if r["npc"]["id"] == npc_id and not r.get("history")][: args.n]:
                        spec = row["npc"]
                        print(f"\n[{row['id']}] {spec['name']}; state {json.dumps(row.get('state') or {})}")
                        print(f"  player:   {row['input']}")
                        print(f"  expected: {json.dumps(row['reply'], ensure_ascii=False)}")
                        for adapter in (None, args.adapter):
                            npc = client.npc(f"{row['id']}-{adapter or 'base'}", spec["persona"], spec["actions"],
                                             spec["emotions"], name=spec["name"])
                            r = npc.say(row["input"], state=row.get("state"), adapter=adapter, timeout=600)
                            reply = {"say": r.say, "emotion": r.emotion, "action": r.action}
                            print(f"  {adapter or 'base':<12} {json.dumps(reply, ensure_ascii=False)}")
        finally:
            proc.terminate()
            proc.wait(30)


if __name__ == "__main__":
    main()
