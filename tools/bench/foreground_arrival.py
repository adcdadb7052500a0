"""A player's line arriving while 4 background NPCs start talking: how long it waits, with and without ``urgent``.

    python tools/bench/foreground_arrival.py [--rounds 8] [--json out.json]

On the llama.cpp backend itself (embedded model, no adapter, no daemon): each round starts cold (``reset()``),
hands 4 background lines (the bench NPCs, 48 tokens) to ``run_batch`` at once, and a foreground line arrives
50-450 ms later, while their prompts are being prefilled. Measured from its arrival: the wait until the batch loop
takes it (``preempt``), and its first streamed piece. Rounds alternate between ``run_batch(..., urgent=...)`` (newcomers
not yet prefilled wait for the foreground line: what the daemon does) and without it (every newcomer handed over is
prefilled first), with the same arrival times; the ratio is with / without.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as bench  # the figures' NPCs, line and machine description
from zyke.protocol import NpcSpec
from zyke_daemon.backends.base import BatchItem, GenerationRequest, GenerationResult
from zyke_daemon.backends.llamacpp import LlamaCppBackend
from zyke_models.embedded import embedded_model_path

SHOPKEEPER = NpcSpec(id="tam", name="Tam", persona="A shopkeeper who sells rope and lamps.",
                     actions=["none", "trade"], emotions=["neutral", "happy"])


def one_round(backend: LlamaCppBackend, delay: float, use_urgent: bool, tag: str) -> tuple[float, float]:
    """Seconds from the foreground line's arrival to its admission and to its first streamed piece."""
    done: list[GenerationResult | BaseException] = []
    def line(npc: NpcSpec) -> Callable[[], GenerationRequest]:
        return lambda: bench.request(npc, 48, line=f"{bench.LINE} {tag}")

    background = [BatchItem(line(n), lambda _: True, done.append, priority=2) for n in bench.NPCS]
    marks: dict[str, float] = {}

    def on_text(_: str) -> bool:
        marks.setdefault("first", time.perf_counter())
        return True

    foreground = [BatchItem(lambda: bench.request(SHOPKEEPER, 16, line=f"How much for a lamp? {tag}"), on_text,
                            done.append, priority=0)]

    def take(n: int, adapter: object) -> list[BatchItem]:
        got = background[:n]
        del background[:n]
        return got

    def preempt(n: int, adapter: object) -> list[BatchItem]:
        if "arrived" in marks and foreground:
            marks["taken"] = time.perf_counter()
            return [foreground.pop()]
        return []

    def urgent() -> bool:
        return "arrived" in marks and bool(foreground)

    backend.reset()
    timer = threading.Timer(delay, lambda: marks.setdefault("arrived", time.perf_counter()))
    timer.start()
    backend.run_batch(take, preempt=preempt, urgent=urgent if use_urgent else None)
    timer.join()
    return marks["taken"] - marks["arrived"], marks["first"] - marks["arrived"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=8, help="rounds per side")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    path, sha = embedded_model_path()
    backend = LlamaCppBackend(path, sha256=sha, n_threads=bench.THREADS)
    rng = random.Random(1)
    sides: dict[str, dict[str, list[float]]] = {"with": {"wait": [], "first": []}, "without": {"wait": [], "first": []}}
    machine = bench.machine()
    for i in range(args.rounds):
        delay = 0.05 + rng.random() * 0.4
        for name in (("with", "without") if i % 2 == 0 else ("without", "with")):
            wait, first = one_round(backend, delay, name == "with", f"<{i}>")
            sides[name]["wait"].append(wait * 1000)
            sides[name]["first"].append(first * 1000)
    backend.close()
    out: dict[str, Any] = {"machine": machine, "rounds": args.rounds}
    for key in ("wait", "first"):
        w, wo = statistics.median(sides["with"][key]), statistics.median(sides["without"][key])
        out[key] = {"with_urgent_ms": round(w, 1), "without_ms": round(wo, 1), "ratio": round(w / wo, 3),
                    "samples_with": [round(x) for x in sides["with"][key]],
                    "samples_without": [round(x) for x in sides["without"][key]]}
        print(f"foreground {'wait until taken' if key == 'wait' else 'first piece'}: {w:.0f} ms with urgent / "
              f"{wo:.0f} ms without = {w / wo:.2f}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
