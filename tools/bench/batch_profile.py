"""Where the time of 4 NPCs at once goes, on the llama.cpp backend (no daemon, no sockets).

    python tools/bench/batch_profile.py [--rounds 3] [--tokens 32] [--no-adapter] [--json out.json]

The same 4 requests as figure 4 of run.py (the bench NPCs, a new line each round, the shipped default adapter
unless --no-adapter), one after another and then in one ``run_batch``; every ``llama_decode`` is timed and
sorted by kind:

- ``rows``: one token for each of several replies in one call (what batching shares: the weights are read once);
- ``single``: one token of one reply (the one-after-another side's decode steps);
- ``chunk``: several tokens of one sequence: a prompt's uncached tail, or a token with the grammar's forced
  tokens after it. These are evaluated alone on both sides, because a multi-token chunk beside other sequences is
  split by llama.cpp into other micro-batches and rounds differently (docs/ARCHITECTURE.md, "Exact batching").

The printed bound is what exact batching can reach with these replies: the one-after-another time over the
at-once time if the rows were free apart from their measured cost, i.e. chunks cost the same on both sides.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as bench  # the figures' NPCs, line and machine description
from zyke_daemon.backends.base import BatchItem, GenerationRequest, GenerationResult
from zyke_daemon.backends.llamacpp import LlamaCppBackend
from zyke_models.embedded import embedded_model_path


class TimedBackend(LlamaCppBackend):
    """The backend, with every model call timed by kind."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.spent: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])

    def _decode(self, rows: list[tuple[int, int, int, bool]]) -> None:
        start = time.perf_counter()
        super()._decode(rows)
        kind = "rows" if len({seq for seq, *_ in rows}) > 1 else "single" if len(rows) == 1 else "chunk"
        self.spent[kind][0] += 1
        self.spent[kind][1] += time.perf_counter() - start


def item(npc: Any, line: str, tokens: int, adapter: str | None,
         out: list[GenerationResult | BaseException]) -> BatchItem:
    def prepare() -> GenerationRequest:
        req = bench.request(npc, tokens, line=line)  # figure 4's request, under the adapter
        req.adapter = adapter
        return req
    return BatchItem(prepare, lambda _: True, out.append)


def measure(backend: TimedBackend, items: list[BatchItem], at_once: bool) -> dict[str, Any]:
    backend.spent.clear()
    queue = list(items)

    def take(n: int, adapter: object) -> list[BatchItem]:
        got = queue[:n] if at_once else queue[:1] if fresh else []
        del queue[:len(got)]
        fresh.clear()
        return got

    start = time.perf_counter()
    while queue:  # one after another: one request per run_batch, nothing joins it
        fresh = [True]
        backend.run_batch(take)
    wall = time.perf_counter() - start
    return {"wall_s": wall, **{kind: {"calls": n, "s": s} for kind, (n, s) in backend.spent.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--no-adapter", action="store_true", help="the bare model instead of the shipped default")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    path, sha = embedded_model_path()
    backend = TimedBackend(path, sha256=sha, n_threads=bench.THREADS)
    adapter = None
    if not args.no_adapter:
        from zyke_daemon.adapters import SHIPPED_ADAPTERS, AdapterRegistry
        from zyke_daemon.config import DEFAULT_ADAPTER_NAME
        adapter = DEFAULT_ADAPTER_NAME
        backend.load_adapter(adapter, AdapterRegistry([SHIPPED_ADAPTERS]).resolve(adapter, backend.fingerprint,
                                                                                  "gguf"))
    rounds = []
    for i in range(args.rounds):
        side: dict[str, Any] = {}
        for name, at_once, tag in (("one_after_another", False, f" [{i}]"), ("at_once", True, f" <{i}>")):
            out: list[GenerationResult | BaseException] = []
            items = [item(npc, bench.LINE + tag, args.tokens, adapter, out) for npc in bench.NPCS]
            side[name] = measure(backend, items, at_once)
            side[name]["tokens"] = sum(len(r.tokens) for r in out if isinstance(r, GenerationResult))
        one, four = side["one_after_another"], side["at_once"]
        chunks = four.get("chunk", {"s": 0.0})["s"]
        side["ratio"] = (four["tokens"] / four["wall_s"]) / (one["tokens"] / one["wall_s"])
        side["chunk_share_at_once"] = chunks / four["wall_s"]
        rounds.append(side)
        print(f"round {i}: at once / one after another {side['ratio']:.2f}; at once: "
              + ", ".join(f"{k} {four[k]['calls']} calls {four[k]['s']:.2f} s" for k in ("rows", "single", "chunk")
                          if k in four)
              + f" of {four['wall_s']:.2f} s (chunks {side['chunk_share_at_once']:.0%}); one after another: "
              + ", ".join(f"{k} {one[k]['calls']} calls {one[k]['s']:.2f} s" for k in ("single", "chunk") if k in one)
              + f" of {one['wall_s']:.2f} s")
    if args.json:
        args.json.write_text(json.dumps({"machine": bench.machine(), "adapter": adapter, "tokens": args.tokens,
                                         "rounds": rounds}, indent=1))


if __name__ == "__main__":
    main()
