"""zyke-daemon benchmarks: every figure a ratio against a baseline measured in the same run.

    python tools/bench/run.py [--rounds 3] [--tokens 48] [--json tools/bench/results/bench.json]

Embedded model (Gemma 3 270M Q4_K_M), llama.cpp backend, 2 threads. Figures (see README.md here):

1. overhead     a) npc.say through the SDK and a real daemon (subprocess, loopback) / the daemon
                   backend's own generate() in-process, same prompt and schema (protocol+SDK+socket cost)
                c) backend generate() (constrained) / raw llama-cpp-python greedy, unconstrained, the
                   same prompt and number of tokens (what our decode loop and grammar cost)
2. constrained  tokens/s under the NPC reply schema / tokens/s of the same loop with no grammar
3. multi-turn   time to first token at the 5th turn (another NPC talking in between) / the same prompt cold
4. concurrency  aggregate tokens/s of 4 NPCs talking at once through the daemon / one NPC alone
5. bound        decode tokens/s / (measured copy bandwidth / weight bytes read per token)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
from daemon_proc import DaemonProcess  # noqa: E402
from zyke import Client  # noqa: E402
from zyke.prompt_format import render_prompt, reply_schema  # noqa: E402
from zyke.protocol import NpcReply, NpcSpec, Turn  # noqa: E402
from zyke_daemon.backends.base import GenerationRequest, GenerationResult  # noqa: E402
from zyke_daemon.backends.llamacpp import LlamaCppBackend  # noqa: E402
from zyke_daemon.embedded import embedded_model_path  # noqa: E402

NPCS = [
    NpcSpec(id="mira", name="Mira", persona="A cheerful innkeeper in a mountain village.",
            actions=["none", "serve_drink", "rent_room", "kick_out"], emotions=["happy", "annoyed", "neutral"]),
    NpcSpec(id="brom", name="Brom", persona="A grumpy dwarf blacksmith who loves his forge.",
            actions=["none", "trade", "repair", "attack"], emotions=["neutral", "angry", "pleased"]),
    NpcSpec(id="hilda", name="Hilda", persona="A stern city guard at the north gate.",
            actions=["none", "allow_entry", "deny_entry", "arrest"], emotions=["calm", "suspicious"]),
    NpcSpec(id="pip", name="Pip", persona="A nervous young apprentice wizard who talks too much.",
            actions=["none", "cast_spell", "flee"], emotions=["nervous", "excited"]),
]
LINE = "Tell me everything about this place and the people who live here."
THREADS = 2


def machine() -> dict[str, Any]:
    cpu = "unknown"
    with open("/proc/cpuinfo") as fh:
        for line in fh:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_kb = next((int(line.split()[1]) for line in open("/proc/meminfo") if line.startswith("MemTotal")), 0)
    return {"cpu": cpu, "cores": os.cpu_count(), "ram_gb": round(mem_kb / 2**20, 1),
            "python": platform.python_version(), "llama_cpp_python": llama_cpp.__version__,
            "threads": THREADS, "load_avg_1m_at_start": os.getloadavg()[0],
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}


def med(xs: list[float]) -> float:
    return statistics.median(xs)


def decode_rate(r: GenerationResult) -> float:
    return max(r.completion_tokens - 1, 1) / max(r.total_s - r.ttft_s, 1e-9)


def request(npc: NpcSpec, tokens: int, history: list[Turn] | None = None, line: str = LINE,
            constrained: bool = True) -> GenerationRequest:
    return GenerationRequest(prompt=render_prompt(npc, history or [], line),
                             schema=reply_schema(npc) if constrained else {}, max_tokens=tokens)


# -- figures -------------------------------------------------------------------------------------------


def constrained_vs_free(backend: LlamaCppBackend, rounds: int, tokens: int) -> dict[str, Any]:
    """Same loop, same prompt; warm prefix so both time decoding, interleaved so load drift hits both."""
    free, cons = [], []
    for _ in range(rounds):
        for constrained, out in ((False, free), (True, cons)):
            r = backend.generate(request(NPCS[0], tokens, constrained=constrained), lambda _: True)
            out.append(decode_rate(r))
    return {"constrained_tok_s": med(cons), "unconstrained_tok_s": med(free), "ratio": med(cons) / med(free),
            "target": ">= 0.85"}


def raw_llama(path: Path, prompt: str, n_tokens: int) -> float:
    """Seconds for raw llama-cpp-python: prompt eval + greedy unconstrained decode of n_tokens."""
    llm = llama_cpp.Llama(str(path), n_ctx=2048, n_threads=THREADS, n_threads_batch=THREADS, verbose=False)
    try:
        toks = llm.tokenize(prompt.encode(), add_bos=True)
        best = []
        for _ in range(3):
            llm.reset()
            start = time.perf_counter()
            llm.eval(toks)
            for _ in range(n_tokens - 1):
                llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])
            int(np.argmax(llm.scores[llm.n_tokens - 1]))
            best.append(time.perf_counter() - start)
        return med(best)
    finally:
        llm.close()


def backend_cold(backend: LlamaCppBackend, req: GenerationRequest, rounds: int) -> tuple[float, GenerationResult]:
    times, last = [], None
    for _ in range(rounds):
        backend.reset()
        start = time.perf_counter()
        last = backend.generate(req, lambda _: True)
        times.append(time.perf_counter() - start)
    assert last is not None
    return med(times), last


def multi_turn(backend: LlamaCppBackend, rounds: int) -> dict[str, Any]:
    """5th-turn TTFT on the slots (another NPC talks between each turn) vs the same prompt cold."""
    npc, other = NPCS[0], NPCS[1]
    lines = ["Hello there!", "Do you have a room?", "How much is it?", "Is breakfast included?",
             "Any rumours lately?"]
    warm, cold = [], []
    for _ in range(rounds):
        backend.reset()
        history: list[Turn] = []
        other_history: list[Turn] = []
        result = None
        for line in lines:
            result = backend.generate(request(npc, 40, history, line), lambda _: True)
            history.append(Turn(player=line, reply=_reply(result.text, npc)))
            o = backend.generate(request(other, 16, other_history, line), lambda _: True)
            other_history.append(Turn(player=line, reply=_reply(o.text, other)))
        history.pop()
        fifth = request(npc, 4, history, lines[-1])
        r = backend.generate(fifth, lambda _: True)  # the 5th turn again: its slot holds turns 1-4
        warm.append(r.ttft_s)
        backend.reset()
        cold.append(backend.generate(fifth, lambda _: True).ttft_s)
        cached, prompt_tokens = r.cached_tokens, r.prompt_tokens
    return {"ttft_turn5_ms": med(warm) * 1000, "ttft_cold_ms": med(cold) * 1000, "ratio": med(warm) / med(cold),
            "prompt_tokens": prompt_tokens, "cached_tokens": cached, "target": "<= 0.3"}


def _reply(text: str, npc: NpcSpec) -> NpcReply:
    try:
        return NpcReply.model_validate_json(text)
    except ValueError:
        return NpcReply(say="Hm.", emotion=npc.emotions[0], action=npc.actions[0])


def daemon_figures(backend: LlamaCppBackend, rounds: int, tokens: int) -> dict[str, Any]:
    """Round trip through the SDK vs in-process generate, and 4 NPCs at once vs one, on one daemon."""
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as home:
        daemon = DaemonProcess(Path(home)).start()
        try:
            with Client(daemon.url, daemon.token, game="bench") as client:
                npcs = [client.define(spec) for spec in NPCS]
                for n in npcs:  # warm-up: page the model in, compile the grammars
                    n.say(LINE, max_tokens=4)
                    n.reset()
                sdk, local = [], []
                for _ in range(rounds):
                    npcs[0].reset()  # history empty, so the daemon's prompt is exactly `req` below
                    start = time.perf_counter()
                    reply = npcs[0].say(LINE, max_tokens=tokens)
                    sdk.append(time.perf_counter() - start)
                    req = request(NPCS[0], tokens)
                    start = time.perf_counter()
                    local_result = backend.generate(req, lambda _: True)  # warm slot, as in the daemon
                    local.append(time.perf_counter() - start)
                assert reply.usage.completion_tokens == local_result.completion_tokens, "not the same reply"
                out["overhead"] = {"sdk_daemon_ms": med(sdk) * 1000, "in_process_ms": med(local) * 1000,
                                   "ratio": med(sdk) / med(local), "tokens": local_result.completion_tokens,
                                   "target": "<= 1.05"}

                def talk(n: Any, results: list[Any]) -> None:
                    n.reset()
                    results.append(n.say(LINE, max_tokens=tokens, timeout=600))

                one, four = [], []
                for _ in range(rounds):
                    results: list[Any] = []
                    start = time.perf_counter()
                    talk(npcs[0], results)
                    one.append(sum(r.usage.completion_tokens for r in results) / (time.perf_counter() - start))
                    results = []
                    threads = [threading.Thread(target=talk, args=(n, results)) for n in npcs]
                    start = time.perf_counter()
                    for t in threads:
                        t.start()
                    for t in threads:
                        t.join()
                    four.append(sum(r.usage.completion_tokens for r in results) / (time.perf_counter() - start))
                    ttfts = [r.timings.ttft_ms for r in results]
                out["concurrency"] = {"one_npc_tok_s": med(one), "four_npcs_tok_s": med(four),
                                      "ratio": med(four) / med(one), "ttft_ms_four": ttfts,
                                      "target": ">= 1.5"}
        finally:
            daemon.stop()
    return out


def bound(path: Path, decode_tok_s: float) -> dict[str, Any]:
    """Weight bytes read per decoded token / copy bandwidth. Counted: every tensor's bytes in full
    except token_embd's input-side use (one row per token, negligible); token_embd IS counted in full
    because the tied output matrix reads all 262,144 rows every token. KV cache reads are not counted."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    weights = sum(int(t.n_bytes) for t in reader.tensors)
    embd = next(t for t in reader.tensors if t.name == "token_embd.weight")
    row = int(embd.n_bytes) // int(embd.shape[1])
    per_token = weights + row  # all weights (output matrix = token_embd, read in full) + the input row
    a = np.ones(2**30 // 8, dtype=np.float64)  # 1 GiB
    b = np.empty_like(a)
    times = []
    for _ in range(5):
        start = time.perf_counter()
        np.copyto(b, a)
        times.append(time.perf_counter() - start)
    bandwidth = 2 * a.nbytes / min(times)  # read + write
    limit = bandwidth / per_token
    return {"bytes_per_token": per_token, "copy_bandwidth_gb_s": bandwidth / 1e9, "bound_tok_s": limit,
            "decode_tok_s": decode_tok_s, "fraction": decode_tok_s / limit}


# -- main ----------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--json", type=Path, default=ROOT / "tools" / "bench" / "results" / "bench.json")
    args = parser.parse_args()
    os.environ.setdefault("ZYKE_N_THREADS", str(THREADS))

    path, sha = embedded_model_path()
    result: dict[str, Any] = {"machine": machine(), "model": path.name}
    backend = LlamaCppBackend(path, sha256=sha, n_ctx=2048, n_threads=THREADS)
    try:
        backend.generate(request(NPCS[0], 4), lambda _: True)  # page the weights in
        result["constrained"] = constrained_vs_free(backend, args.rounds, args.tokens)
        cons_s, cons = backend_cold(backend, request(NPCS[0], args.tokens), args.rounds)
        raw_s = raw_llama(path, request(NPCS[0], 1).prompt, cons.completion_tokens)
        result["backend_vs_raw"] = {"backend_constrained_ms": cons_s * 1000, "raw_unconstrained_ms": raw_s * 1000,
                                    "tokens": cons.completion_tokens, "ratio": cons_s / raw_s}
        result["multi_turn"] = multi_turn(backend, max(1, args.rounds - 1))
        result |= daemon_figures(backend, args.rounds, args.tokens)
    finally:
        backend.close()
    result["bound"] = bound(path, result["constrained"]["unconstrained_tok_s"])
    result["machine"]["load_avg_1m_at_end"] = os.getloadavg()[0]
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    print(table(result))
    print(f"\nwritten to {args.json}")


def table(r: dict[str, Any]) -> str:
    m = r["machine"]
    rows = [
        ("1a overhead: SDK+daemon npc.say / in-process backend.generate (same prompt, schema, tokens)",
         f"{r['overhead']['sdk_daemon_ms']:.0f} / {r['overhead']['in_process_ms']:.0f} ms",
         r["overhead"]["ratio"], "<= 1.05"),
        ("1c backend constrained / raw llama-cpp-python unconstrained (cold, same tokens)",
         f"{r['backend_vs_raw']['backend_constrained_ms']:.0f} / {r['backend_vs_raw']['raw_unconstrained_ms']:.0f} ms",
         r["backend_vs_raw"]["ratio"], "(report)"),
        ("2 constrained / unconstrained decode tok/s (same loop)",
         f"{r['constrained']['constrained_tok_s']:.1f} / {r['constrained']['unconstrained_tok_s']:.1f} tok/s",
         r["constrained"]["ratio"], ">= 0.85"),
        ("3 TTFT 5th turn (slots, another NPC between turns) / same prompt cold",
         f"{r['multi_turn']['ttft_turn5_ms']:.0f} / {r['multi_turn']['ttft_cold_ms']:.0f} ms",
         r["multi_turn"]["ratio"], "<= 0.3"),
        ("4 aggregate tok/s, 4 NPCs at once / 1 NPC (through the daemon)",
         f"{r['concurrency']['four_npcs_tok_s']:.1f} / {r['concurrency']['one_npc_tok_s']:.1f} tok/s",
         r["concurrency"]["ratio"], ">= 1.5"),
        ("5 decode tok/s / memory-bandwidth bound",
         f"{r['bound']['decode_tok_s']:.1f} / {r['bound']['bound_tok_s']:.1f} tok/s",
         r["bound"]["fraction"], "(report)"),
    ]
    out = [f"Machine: {m['cpu']}, {m['cores']} cores, {m['ram_gb']} GB RAM, Python {m['python']}, "
           f"llama-cpp-python {m['llama_cpp_python']}, {m['threads']} threads, {m['date']}, "
           f"load avg {m['load_avg_1m_at_start']:.1f} -> {m['load_avg_1m_at_end']:.1f}", "",
           "| Figure | Measured | Ratio | Target |", "|---|---|---|---|"]
    out += [f"| {name} | {measured} | {ratio:.3f} | {target} |" for name, measured, ratio, target in rows]
    return "\n".join(out)


if __name__ == "__main__":
    main()
