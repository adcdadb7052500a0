"""Adapter swap latency against a full base-model reload, on the llama.cpp backend (embedded model).

    python tools/bench/adapter_swap.py [--rounds 20] [--json out.json]

Prints each figure and the ratios: what a per-request adapter switch costs next to what it would cost
to serve another fine-tune by reloading the model. Both are measured in this process, on this machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import llama_cpp

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
from lora_fixtures import make_random_lora
from zyke_daemon.adapters import AdapterRegistry
from zyke_daemon.backends.llamacpp import LlamaCppBackend
from zyke_models.embedded import embedded_model_path


def median_ms(samples: list[float]) -> float:
    return round(statistics.median(samples) * 1000, 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    path, sha = embedded_model_path()
    with tempfile.TemporaryDirectory() as tmp:
        registry = AdapterRegistry([Path(tmp) / "adapters"])
        for name, seed in [("a", 1), ("b", 2)]:
            registry.register(name, make_random_lora(Path(tmp) / name, path, seed=seed), f"sha256:{sha}")
        ggufs = {n: registry.resolve(n, f"sha256:{sha}", "gguf") for n in ("a", "b")}

        reloads = []
        for _ in range(max(3, args.rounds // 5)):
            start = time.perf_counter()
            llama_cpp.Llama(str(path), n_ctx=4096, n_threads=args.threads, verbose=False).close()
            reloads.append(time.perf_counter() - start)

        backend = LlamaCppBackend(path, sha256=sha, n_ctx=4096, n_threads=args.threads)
        loads, swaps = [], []
        for _ in range(args.rounds):
            for name, gguf in ggufs.items():
                backend.unload_adapter(name)
                start = time.perf_counter()
                backend.load_adapter(name, gguf)
                loads.append(time.perf_counter() - start)
            for name in ("a", None, "b", None):
                start = time.perf_counter()
                backend._apply(name)  # what generate() does when a request names another adapter
                swaps.append(time.perf_counter() - start)
        backend.close()

    result = {
        "machine": {"threads": args.threads},
        "full_reload_ms": median_ms(reloads),
        "adapter_load_ms": median_ms(loads),
        "adapter_swap_ms": median_ms(swaps),
        "swap_over_reload": round(statistics.median(swaps) / statistics.median(reloads), 6),
        "load_over_reload": round(statistics.median(loads) / statistics.median(reloads), 6),
    }
    print(f"full base reload     {result['full_reload_ms']:10.3f} ms")
    print(f"adapter load (file)  {result['adapter_load_ms']:10.3f} ms   {result['load_over_reload']:.4f} x reload")
    print(f"adapter swap (live)  {result['adapter_swap_ms']:10.3f} ms   {result['swap_over_reload']:.6f} x reload")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
