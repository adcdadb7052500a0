"""zyke-daemon benchmarks: every figure a ratio against a baseline measured in the same run.

    python tools/bench/run.py [--rounds 3] [--tokens 48] [--json tools/bench/results/bench.json]

Embedded model (Gemma 3 270M Q4_K_M), llama.cpp, 2 threads. Figures (tools/bench/README.md says more):

1. overhead     npc.say through the SDK and a real daemon (subprocess, loopback), constrained /
                llama-cpp-python's create_completion on the same prompt text, greedy, unconstrained,
                the same number of tokens; a new player line each round, each side reusing its own
                prompt cache
2. constrained  decode tokens/s of the daemon's backend under the NPC reply schema / llama.cpp's C API in
                a tight greedy loop (default settings), unconstrained, same prompt
3. multi-turn   time to first token at an NPC's 5th turn (another NPC talking between turns) / the same
                prompt cold
4. concurrency  aggregate tokens/s of 4 NPCs talking at once through the daemon / the same 4 requests
                one after another;
                4b: the same ratio for raw llama.cpp decoding 4 sequences in one batch (the ceiling
                batching could reach on this machine)
5. bound        raw decode tokens/s / (measured copy bandwidth / weight bytes read per token)
6. adapter      decode steps/s with the shipped default adapter (npc-default) / without any adapter: the
                same reply tokens evaluated one at a time after the same prompt, alternating rounds
7. priority     a foreground NPC's time to its first streamed piece with 4 background NPCs streaming / on
                an idle daemon (client-side, alternating rounds); 7b: 4 NPCs at once / one after another,
                on the same daemon
8. safety       decode tokens/s under the NPC schema with the safety rails on (audience minor) / off, same
                backend, alternating rounds (and TTFT on / off)
9. http         round trip of an NPC line over HTTP (POST /v1/npc/say, httpx) / over the WebSocket (the SDK),
                same daemon, same line, alternating rounds; 9b: POST /v1/chat/completions (greedy) /
                llama-cpp-python's create_chat_completion on the same messages (a new user line each round), the
                same number of tokens

10. recording  decode tokens/s (the reply's own timings) of an NPC whose replies are recorded as experience
                / of the same NPC not recorded, one daemon started with --record-experience, alternating rounds

    python tools/bench/run.py --only adapter     # one figure (names: constrained, multi_turn, raw_batching,
                                                 # daemon, bound, adapter, priority, safety, http,
                                                 # recording); the JSON holds just those: pass --json
                                                 # results/<name>.json
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
import urllib.request
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
from daemon_proc import DaemonProcess  # noqa: E402
from zyke import Client  # noqa: E402
from zyke.prompt_format import END_OF_REPLY, render_prompt, reply_schema  # noqa: E402
from zyke.protocol import NpcReply, NpcSpec, Turn  # noqa: E402
from zyke_daemon.backends.base import GenerationRequest, GenerationResult  # noqa: E402
from zyke_daemon.backends.llamacpp import LlamaCppBackend  # noqa: E402
from zyke_models.embedded import embedded_model_path  # noqa: E402

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


def request(npc: NpcSpec, tokens: int, history: list[Turn] | None = None, line: str = LINE) -> GenerationRequest:
    return GenerationRequest(prompt=render_prompt(npc, history or [], line), schema=reply_schema(npc),
                             max_tokens=tokens)


# -- figures -------------------------------------------------------------------------------------------


def raw_llama(path: Path) -> llama_cpp.Llama:
    """llama-cpp-python as its README uses it: defaults, except the thread count."""
    return llama_cpp.Llama(str(path), n_ctx=2048, n_threads=THREADS, n_threads_batch=THREADS, verbose=False)


def raw_completion_s(llm: llama_cpp.Llama, prompt: str, n_tokens: int) -> tuple[float, int]:
    """Seconds for one create_completion of exactly ``n_tokens`` (EOS banned so it cannot stop early).
    Not reset: like the daemon, it reuses whatever prefix of the previous prompt it still holds."""
    start = time.perf_counter()
    out = llm.create_completion(prompt, max_tokens=n_tokens, temperature=0.0, stop=[],
                                logit_bias={llm.token_eos(): -1e9})
    return time.perf_counter() - start, int(out["usage"]["completion_tokens"])  # type: ignore[index]


def constrained_vs_raw(path: Path, sha: str, rounds: int, tokens: int) -> dict[str, Any]:
    """Decode rates on the same prompts, alternating rounds so load drift hits both sides. The baseline is
    llama.cpp's C API in a tight loop (greedy argmax, llama.cpp's default settings): the fastest way to
    run this model from Python. Only one side's context is alive at a time: an idle llama.cpp context
    next to a busy one measurably slows it (its threads still poll for work)."""
    ours, base = [], []
    for i in range(rounds):
        line = f"{LINE} ({i})"
        backend = LlamaCppBackend(path, sha256=sha, n_ctx=2048, n_threads=THREADS)
        try:
            backend.generate(request(NPCS[0], 4), lambda _: True)  # compile the grammar
            backend.reset()
            ours.append(decode_rate(backend.generate(request(NPCS[0], tokens, line=line), lambda _: True)))
        finally:
            backend.close()
        raw = RawLlamaCpp(path)
        try:
            base.append(raw.greedy_tok_s(request(NPCS[0], 1, line=line).prompt, tokens))
        finally:
            raw.close()
    return {"constrained_tok_s": med(ours), "raw_unconstrained_tok_s": med(base), "ratio": med(ours) / med(base),
            "target": ">= 0.85"}


def one_after_another_vs_at_once(npcs: list[Any], rounds: int, tokens: int,
                                 tag: str) -> tuple[list[float], list[float], list[Any]]:
    """Aggregate tokens/s of the same requests to ``npcs`` (SDK handles), each sent when the previous reply is in,
    then all at once from threads; per round. Also returns the last round's at-once replies. ``tag`` ("<{}>")
    makes each round's at-once line new, so no reply is served from an earlier round's cache."""
    def talk(n: Any, line: str, results: list[Any]) -> None:
        n.reset()
        results.append(n.say(line, max_tokens=tokens, timeout=600))

    one: list[float] = []
    four: list[float] = []
    results: list[Any] = []
    for i in range(rounds):
        results = []
        start = time.perf_counter()
        for n in npcs:
            talk(n, f"{LINE} [{i}]", results)
        one.append(sum(r.usage.completion_tokens for r in results) / (time.perf_counter() - start))
        results = []
        threads = [threading.Thread(target=talk, args=(n, f"{LINE} {tag.format(i)}", results)) for n in npcs]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        four.append(sum(r.usage.completion_tokens for r in results) / (time.perf_counter() - start))
    return one, four, results


def adapter_cost(path: Path, sha: str, rounds: int, tokens: int) -> dict[str, Any]:
    """What the shipped default adapter costs per decode step: the SAME tokens evaluated one at a time after
    the same prompt, with and without the adapter, alternating rounds (LoRA adds a low-rank matmul to every
    adapted projection). End-to-end replies are reported too, but they are not the figure: with the adapter
    the model writes other (often shorter) lines, and the grammar's forced tokens then make a different share
    of the reply, which moves tokens/s either way without saying anything about the adapter's compute."""
    from zyke_daemon.adapters import SHIPPED_ADAPTERS, AdapterRegistry
    from zyke_daemon.config import DEFAULT_ADAPTER_NAME

    backend = LlamaCppBackend(path, sha256=sha, n_ctx=2048, n_threads=THREADS)
    try:
        gguf = AdapterRegistry([SHIPPED_ADAPTERS]).resolve(DEFAULT_ADAPTER_NAME, backend.fingerprint, "gguf")
        backend.load_adapter(DEFAULT_ADAPTER_NAME, gguf)
        req = request(NPCS[1], tokens)
        req.adapter, req.no_repeat_ngram = DEFAULT_ADAPTER_NAME, 0
        reply = backend.generate(req, lambda _: True).tokens  # the sequence both sides evaluate
        prompt = backend.tokenize(req.prompt)
        stepped: dict[str | None, list[float]] = {DEFAULT_ADAPTER_NAME: [], None: []}
        replies: dict[str | None, list[float]] = {DEFAULT_ADAPTER_NAME: [], None: []}
        for i in range(rounds):
            for adapter in stepped:
                backend.reset()
                backend._apply(adapter)
                slot = backend._slots[0]
                backend._eval(slot, prompt)
                t0 = time.perf_counter()
                for token in reply:
                    backend._eval(slot, [token])
                stepped[adapter].append(len(reply) / (time.perf_counter() - t0))
                backend.reset()
                whole = request(NPCS[1], tokens, line=f"{LINE} ({i})")
                whole.adapter, whole.no_repeat_ngram = adapter, 0
                replies[adapter].append(decode_rate(backend.generate(whole, lambda _: True)))
    finally:
        backend.close()
    with_adapter, bare = med(stepped[DEFAULT_ADAPTER_NAME]), med(stepped[None])
    return {"adapter_tok_s": with_adapter, "base_tok_s": bare, "ratio": with_adapter / bare,
            "steps_per_round": len(reply), "adapter": DEFAULT_ADAPTER_NAME, "target": ">= 0.90",
            "end_to_end_adapter_tok_s": med(replies[DEFAULT_ADAPTER_NAME]),
            "end_to_end_base_tok_s": med(replies[None]),
            "end_to_end_note": "different lines on each side: not comparable work, see adapter_cost's docstring"}


def safety_cost(path: Path, sha: str, rounds: int, tokens: int) -> dict[str, Any]:
    """What the safety rail costs while decoding (docs/SAFETY.md): the same constrained request with the minor
    audience's matcher and without, in one backend, alternating, each from a cold slot. The rail judges each
    picked token of the say line (the line so far re-read with the token), so its cost grows with the line.

    On a shared machine the two sides' tok/s swing more than the rail costs, so the rail's own time is also
    measured inside the same runs (every ``SayContentGuard.judge`` call timed) and reported as its share of
    the rails-on decode time: ``1 - share`` is the ratio the rail alone accounts for."""
    from zyke_daemon.backends.decoding import SayContentGuard
    from zyke_daemon.safety import Rails

    matcher = Rails().matcher()
    judge = SayContentGuard.judge
    spent = [0.0, 0]

    def timed(self: SayContentGuard, after: str) -> tuple[str | None, bool]:
        t0 = time.perf_counter()
        try:
            return judge(self, after)
        finally:
            spent[0] += time.perf_counter() - t0
            spent[1] += 1

    backend = LlamaCppBackend(path, sha256=sha, n_ctx=2048, n_threads=THREADS)
    SayContentGuard.judge = timed  # type: ignore[method-assign]
    try:
        backend.generate(request(NPCS[1], 4), lambda _: True)  # compile the grammar
        on_tok_s, off_tok_s, on_ttft, off_ttft, blocked, on_decode_s = [], [], [], [], 0, 0.0
        for i in range(rounds):
            for safety, rates, ttfts in ((matcher, on_tok_s, on_ttft), (None, off_tok_s, off_ttft)):
                backend.reset()
                req = request(NPCS[1], tokens, line=f"{LINE} ({i})")
                req.safety = safety
                r = backend.generate(req, lambda _: True)
                rates.append(decode_rate(r))
                ttfts.append(r.ttft_s * 1000)
                blocked += sum(r.safety_blocks.values())
                if safety is not None:
                    on_decode_s += r.total_s
    finally:
        SayContentGuard.judge = judge  # type: ignore[method-assign]
        backend.close()
    share = spent[0] / max(on_decode_s, 1e-9)
    return {"rails_on_tok_s": med(on_tok_s), "rails_off_tok_s": med(off_tok_s), "ratio": med(on_tok_s) / med(off_tok_s),
            "rail_us_per_judged_token": spent[0] / max(spent[1], 1) * 1e6, "rail_share_of_decode": share,
            "ratio_accounted": 1 - share, "ttft_on_ms": med(on_ttft), "ttft_off_ms": med(off_ttft),
            "tokens_set_aside": blocked, "target": ">= 0.90"}


def multi_turn(backend: LlamaCppBackend, rounds: int) -> dict[str, Any]:
    """5th-turn TTFT from the slots (another NPC talks between each turn, and each turn is followed by the
    daemon's idle-time prefill) vs the same prompt cold."""
    npc, other = NPCS[0], NPCS[1]
    lines = ["Hello there!", "Do you have a room?", "How much is it?", "Is breakfast included?",
             "Any rumours lately?"]
    warm, cold = [], []
    for _ in range(rounds):
        backend.reset()
        history: list[Turn] = []
        other_history: list[Turn] = []
        for line in lines[:-1]:
            for who, past in ((npc, history), (other, other_history)):
                req = request(who, 40, past, line)
                result = backend.generate(req, lambda _: True)
                past.append(Turn(player=line, reply=_reply(result.text, who)))
                # what the daemon does once its queue is empty (the player is reading and typing)
                backend.prefill_idle(req.prompt + result.text + END_OF_REPLY, None, lambda: False)
        fifth = request(npc, 4, history, lines[-1])
        r = backend.generate(fifth, lambda _: True)
        warm.append(r.ttft_s)
        backend.reset()
        cold.append(backend.generate(fifth, lambda _: True).ttft_s)
    return {"ttft_turn5_ms": med(warm) * 1000, "ttft_cold_ms": med(cold) * 1000, "ratio": med(warm) / med(cold),
            "prompt_tokens": r.prompt_tokens, "cached_tokens": r.cached_tokens, "target": "<= 0.3"}


def _reply(text: str, npc: NpcSpec) -> NpcReply:
    try:
        return NpcReply.model_validate_json(text)
    except ValueError:
        return NpcReply(say="Hm.", emotion=npc.emotion_names[0], action=npc.action_names[0])


def daemon_figures(llm: llama_cpp.Llama, rounds: int, tokens: int) -> dict[str, Any]:
    """Round trip through the SDK vs raw llama-cpp-python, and 4 NPCs at once vs one, on one daemon."""
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as home:
        daemon = DaemonProcess(Path(home)).start()
        try:
            with Client(daemon.url, daemon.token, game="bench") as client:
                npcs = [client.define(spec) for spec in NPCS]
                for n in npcs:  # warm-up: page the model in, compile the grammars
                    n.say(LINE, max_tokens=4)
                    n.reset()
                sdk, raw = [], []
                raw_completion_s(llm, request(NPCS[0], 1).prompt, 4)  # the same warm-up for the baseline
                for i in range(rounds):
                    line = f"{LINE} (take {i})"  # a new line: both sides reuse only the prompt head
                    npcs[0].reset()
                    time.sleep(1.0)
                    start = time.perf_counter()
                    reply = npcs[0].say(line, max_tokens=tokens)
                    sdk.append(time.perf_counter() - start)
                    n_tokens = reply.usage.completion_tokens
                    time.sleep(1.0)  # let the daemon's idle-time prefill finish: it would slow the baseline
                    seconds, produced = raw_completion_s(llm, request(NPCS[0], 1, line=line).prompt, n_tokens)
                    assert produced == n_tokens, (produced, n_tokens)
                    raw.append(seconds)
                out["overhead"] = {"sdk_daemon_ms": med(sdk) * 1000, "raw_llama_cpp_ms": med(raw) * 1000,
                                   "ratio": med(sdk) / med(raw), "tokens": n_tokens, "target": "<= 1.05"}

                one, four, last = one_after_another_vs_at_once(npcs, rounds, tokens, "<{}>")
                ttfts = [r.timings.ttft_ms for r in last]
                out["concurrency"] = {"one_npc_tok_s": med(one), "four_npcs_tok_s": med(four),
                                      "ratio": med(four) / med(one), "ttft_ms_four": ttfts, "target": ">= 1.5"}
        finally:
            daemon.stop()
    return out


def priority_figures(rounds: int, tokens: int) -> dict[str, Any]:
    """Foreground time to first streamed piece, client-side (queue, prefill and first tokens included), with 4
    background NPCs streaming vs on an idle daemon, alternating rounds; and, on the same daemon, 4 NPCs at once
    vs one after another (figure 4's measure, repeated here so the ratios come from one run)."""
    fg_spec = NpcSpec(id="tam", name="Tam", persona="An old ferryman who has seen every storm on the river.",
                      actions=["none", "ferry", "refuse"], emotions=["calm", "wary"])
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as home:
        daemon = DaemonProcess(Path(home)).start()
        try:
            with Client(daemon.url, daemon.token, game="bench-priority") as client:
                bg = [client.define(spec) for spec in NPCS]
                fg = client.define(fg_spec)
                for n in [*bg, fg]:  # warm-up: page the model in, compile the grammars
                    n.say(LINE, max_tokens=4)
                    n.reset()

                def first_piece_s(i: int) -> tuple[float, Any]:
                    fg.reset()
                    start = time.perf_counter()
                    with fg.stream(f"Can you take me across? ({i})", max_tokens=tokens, priority="foreground",
                                   timeout=600) as stream:
                        first = None
                        for _ in stream:
                            first = first or time.perf_counter() - start
                        return first or time.perf_counter() - start, stream.response

                def chatter(n: Any, line: str, started: threading.Event, results: list[Any]) -> None:
                    n.reset()
                    with n.stream(line, max_tokens=tokens, priority="background", timeout=600) as stream:
                        for _ in stream:
                            started.set()
                        results.append(stream.response)

                idle, loaded, waits, paused = [], [], [], []
                for i in range(rounds):
                    time.sleep(1.0)  # the idle-time prefill of the last turns is done
                    idle.append(first_piece_s(i)[0])
                    results: list[Any] = []
                    started = [threading.Event() for _ in bg]
                    threads = [threading.Thread(target=chatter, args=(n, f"{LINE} <{i}>", e, results))
                               for n, e in zip(bg, started, strict=True)]
                    for t in threads:
                        t.start()
                    for e in started:  # all four are streaming
                        e.wait(600)
                    seconds, reply = first_piece_s(i + rounds)
                    loaded.append(seconds)
                    waits.append(reply.timings.queue_ms)
                    for t in threads:
                        t.join()
                    paused.append(sum(r.usage.completion_tokens for r in results))
                out["priority"] = {
                    "fg_first_piece_idle_ms": med(idle) * 1000, "fg_first_piece_4_background_ms": med(loaded) * 1000,
                    "ratio": med(loaded) / med(idle), "fg_queue_ms_4_background": waits,
                    "background_tokens_per_round": paused, "target": "<= 1.3"}

                one, four, _ = one_after_another_vs_at_once(bg, rounds, tokens, "<<{}>>")
                out["concurrency_priority_run"] = {"one_npc_tok_s": med(one), "four_npcs_tok_s": med(four),
                                                   "ratio": med(four) / med(one), "target": ">= 1.5"}
                with urllib.request.urlopen(f"{daemon.http}/metrics", timeout=10) as resp:
                    metrics = resp.read().decode()
                out["priority"]["preemptions"] = sum(
                    float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                    if line.startswith("zyke_preemptions_total"))
        finally:
            daemon.stop()
    return out


class RawLlamaCpp:
    """llama.cpp's C API with its default model and context settings, driven in a tight loop."""

    def __init__(self, path: Path) -> None:
        params = llama_cpp.llama_context_default_params()
        params.n_ctx, params.n_batch, params.n_seq_max = 4096, 512, 4
        params.n_threads = params.n_threads_batch = THREADS
        self.model = llama_cpp.llama_model_load_from_file(str(path).encode(), llama_cpp.llama_model_default_params())
        self.ctx = llama_cpp.llama_init_from_model(self.model, params)
        self.batch = llama_cpp.llama_batch_init(512, 0, 4)
        self.vocab = llama_cpp.llama_model_get_vocab(self.model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)

    def close(self) -> None:
        llama_cpp.llama_batch_free(self.batch)
        llama_cpp.llama_free(self.ctx)
        llama_cpp.llama_model_free(self.model)

    def tokenize(self, text: str) -> list[int]:
        data = text.encode()
        out = (llama_cpp.llama_token * 4096)()
        n = llama_cpp.llama_tokenize(self.vocab, data, len(data), out, 4096, True, False)
        return list(out[:n])

    def _decode(self, items: list[tuple[int, int, int]]) -> None:
        """(token, position, sequence) per row, logits for every row."""
        b = self.batch
        for i, (token, pos, seq) in enumerate(items):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = token, pos, 1, True
            b.seq_id[i][0] = seq
        b.n_tokens = len(items)
        if llama_cpp.llama_decode(self.ctx, b) != 0:
            raise RuntimeError("llama_decode failed")

    def _prefill(self, tokens: list[int], seqs: int) -> None:
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self.ctx), True)
        for seq in range(seqs):
            self._decode([(t, i, seq) for i, t in enumerate(tokens)])

    def greedy_tok_s(self, prompt: str, tokens: int) -> float:
        """Greedy unconstrained decode rate after the prompt (prefill not timed)."""
        ids = self.tokenize(prompt)
        self._prefill(ids, 1)
        start = time.perf_counter()
        for step in range(tokens):
            logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self.ctx, -1), shape=(self.n_vocab,))
            self._decode([(int(np.argmax(logits)), len(ids) + step, 0)])
        return tokens / (time.perf_counter() - start)

    def batched_tok_s(self, prompt: str, tokens: int, seqs: int) -> float:
        """Aggregate decode rate with ``seqs`` sequences in every llama_decode (prefill not timed)."""
        ids = self.tokenize(prompt)
        self._prefill(ids, seqs)
        start = time.perf_counter()
        for step in range(tokens):
            self._decode([(1000 + step, len(ids) + step, seq) for seq in range(seqs)])
        return seqs * tokens / (time.perf_counter() - start)


def raw_batching(raw: RawLlamaCpp, tokens: int) -> dict[str, Any]:
    """What several sequences per llama_decode could gain on this machine at best."""
    prompt = request(NPCS[0], 1).prompt
    one = med([raw.batched_tok_s(prompt, tokens, 1) for _ in range(3)])
    four = med([raw.batched_tok_s(prompt, tokens, 4) for _ in range(3)])
    return {"one_seq_tok_s": one, "four_seq_tok_s": four, "ratio": four / one}


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


def http_figures(llm: llama_cpp.Llama, rounds: int, tokens: int) -> dict[str, Any]:
    """An NPC line over HTTP vs over the WebSocket (one daemon, alternating rounds, a new line each round, the
    NPC reset so both sides see the same history), and the OpenAI-style chat endpoint vs llama-cpp-python's own
    create_chat_completion (greedy; the raw side makes exactly the tokens the daemon made, EOS banned)."""
    import httpx

    out: dict[str, Any] = {}
    spec = NPCS[1]
    messages = [{"role": "system", "content": spec.persona}, {"role": "user", "content": LINE}]
    with tempfile.TemporaryDirectory() as home:
        daemon = DaemonProcess(Path(home)).start()
        try:
            with Client(daemon.url, daemon.token, game="bench") as client, \
                    httpx.Client(base_url=daemon.http, headers={"Authorization": f"Bearer {daemon.token}"},
                                 timeout=600) as web:
                npc = client.define(spec)
                npc.say(LINE, max_tokens=4)  # warm-up: the model paged in, the grammar compiled
                ws_s, http_s = [], []
                for i in range(rounds):
                    for side in ("ws", "http"):
                        npc.reset()
                        time.sleep(1.0)  # the idle-time prefill of the last turn must not slow this one
                        line = f"{LINE} (take {i})"
                        start = time.perf_counter()
                        if side == "ws":
                            npc.say(line, max_tokens=tokens)
                            ws_s.append(time.perf_counter() - start)
                        else:
                            answer = web.post("/v1/npc/say", json={"game": "bench", "npc": spec.id, "input": line,
                                                                   "options": {"max_tokens": tokens}})
                            assert answer.status_code == 200, answer.text
                            http_s.append(time.perf_counter() - start)
                out["http_say"] = {"http_ms": med(http_s) * 1000, "websocket_ms": med(ws_s) * 1000,
                                   "ratio": med(http_s) / med(ws_s), "target": "<= 1.05"}
                model = web.get("/v1/models").json()["data"][0]["id"]
                body = {"model": model, "messages": messages, "max_tokens": tokens, "temperature": 0}
                web.post("/v1/chat/completions", json={**body, "max_tokens": 2})
                llm.create_chat_completion(messages=messages, max_tokens=2, temperature=0.0)  # warm-up
                ours, raw, produced = [], [], 0
                for i in range(rounds):
                    # a new user line each round: both sides reuse only the prompt head they already hold
                    messages = [messages[0], {"role": "user", "content": f"{LINE} (take {i})"}]
                    body = {**body, "messages": messages}
                    time.sleep(1.0)
                    start = time.perf_counter()
                    reply = web.post("/v1/chat/completions", json=body).json()
                    ours.append(time.perf_counter() - start)
                    produced = reply["usage"]["completion_tokens"]
                    time.sleep(1.0)
                    start = time.perf_counter()
                    done = llm.create_chat_completion(messages=messages, max_tokens=produced, temperature=0.0,
                                                      stop=[], logit_bias={llm.token_eos(): -1e9})
                    raw.append(time.perf_counter() - start)
                    assert done["usage"]["completion_tokens"] == produced  # type: ignore[index]
                out["http_chat"] = {"daemon_ms": med(ours) * 1000, "llama_cpp_python_ms": med(raw) * 1000,
                                    "ratio": med(ours) / med(raw), "tokens": produced, "target": "<= 1.10"}
        finally:
            daemon.stop()
    return out


def recording_cost(rounds: int, tokens: int) -> dict[str, Any]:
    """Experience recording's cost (docs/EXPERIENCE.md): one daemon recording, the same NPC twice (opted in and
    not), alternating rounds, a new line each round; decode tokens/s as the daemon timed each reply, and the round
    trip. The record is written on the recorder's thread after the reply is sent, so what it can cost shows up in
    the next replies' decoding, which alternating rounds measure."""
    with tempfile.TemporaryDirectory() as home:
        daemon = DaemonProcess(Path(home), extra_args=["--record-experience"]).start()
        try:
            with Client(daemon.url, daemon.token, game="bench") as client:
                recorded = client.define(NPCS[1].model_copy(update={"id": "brom_recorded", "record": True}))
                plain = client.define(NPCS[1].model_copy(update={"id": "brom_plain"}))
                for n in (recorded, plain):  # warm-up: the model paged in, the grammar compiled
                    n.say(LINE, max_tokens=4)
                tok_s: dict[str, list[float]] = {"on": [], "off": []}
                trip: dict[str, list[float]] = {"on": [], "off": []}
                for i in range(max(rounds, 3)):
                    for side, npc in (("on", recorded), ("off", plain)) if i % 2 == 0 else (("off", plain),
                                                                                         ("on", recorded)):
                        npc.reset()
                        time.sleep(1.0)  # the idle-time prefill of the last turn must not slow this one
                        start = time.perf_counter()
                        reply = npc.say(f"{LINE} (take {i})", max_tokens=tokens, temperature=0)
                        trip[side].append(time.perf_counter() - start)
                        tok_s[side].append(reply.timings.tokens_per_s or 0.0)
            lines = (Path(home) / "data" / "experience" / "experience.jsonl").read_bytes().splitlines(keepends=True)
        finally:
            daemon.stop()
    # What one record costs, timed directly (on a shared machine the two sides above swing by more): building
    # the line as the core does (model dumps and json) and the recorder's validate-and-append, per reply.
    from zyke.experience import ExperienceRecord
    from zyke_daemon.core import jsonl
    from zyke_daemon.experience import ExperienceRecorder

    records = [ExperienceRecord.model_validate_json(x) for x in lines]
    build, write = [], []
    with tempfile.TemporaryDirectory() as scratch:
        recorder = ExperienceRecorder(Path(scratch) / "experience.jsonl")
        for i in range(200):
            rec = records[i % len(records)]
            start = time.perf_counter()
            line = jsonl({**rec.model_dump(mode="json", exclude={"spec", "history", "reply"}),
                          "spec": rec.spec.model_dump(mode="json", exclude_none=True),
                          "history": [t.model_dump(mode="json", exclude_none=True) for t in rec.history],
                          "reply": rec.reply.model_dump(mode="json", exclude_none=True)})
            build.append(time.perf_counter() - start)
            start = time.perf_counter()
            recorder._append_record(("bench", rec.npc, f"r{i}"), line)
            write.append(time.perf_counter() - start)
        recorder.close()
    per_reply_s = med(build) + med(write)
    decode_s = tokens / med(tok_s["off"])
    return {"recording_on_tok_s": med(tok_s["on"]), "recording_off_tok_s": med(tok_s["off"]),
            "ratio": med(tok_s["on"]) / med(tok_s["off"]), "round_trip_on_ms": med(trip["on"]) * 1000,
            "round_trip_off_ms": med(trip["off"]) * 1000, "records_written": len(lines),
            "build_us": med(build) * 1e6, "append_us": med(write) * 1e6,
            "share_of_decode": per_reply_s / decode_s, "target": ">= 0.98 (recording <= 2% of decode)"}


# -- main ----------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--json", type=Path, default=ROOT / "tools" / "bench" / "results" / "bench.json")
    parser.add_argument("--only", action="append", choices=FIGURES, help="run just this figure (repeatable)")
    args = parser.parse_args()
    only = set(args.only or FIGURES)

    path, sha = embedded_model_path()
    result: dict[str, Any] = {"machine": machine(), "model": path.name}
    if only & {"constrained", "bound"}:
        result["constrained"] = constrained_vs_raw(path, sha, args.rounds, args.tokens)
    if "multi_turn" in only:
        backend = LlamaCppBackend(path, sha256=sha, n_ctx=2048, n_threads=THREADS)
        try:
            result["multi_turn"] = multi_turn(backend, max(1, args.rounds - 1))
        finally:
            backend.close()
    if "raw_batching" in only:
        raw = RawLlamaCpp(path)
        try:
            result["raw_batching"] = raw_batching(raw, args.tokens)
        finally:
            raw.close()
    if "daemon" in only:
        llm = raw_llama(path)
        try:
            result |= daemon_figures(llm, args.rounds, args.tokens)
        finally:
            llm.close()
    if "bound" in only:
        result["bound"] = bound(path, result["constrained"]["raw_unconstrained_tok_s"])
    if "priority" in only:
        result |= priority_figures(args.rounds, args.tokens)
    if "adapter" in only:
        result["adapter"] = adapter_cost(path, sha, args.rounds, args.tokens)
    if "safety" in only:
        result["safety"] = safety_cost(path, sha, args.rounds, args.tokens)
    if "http" in only:
        llm = raw_llama(path)
        try:
            result |= http_figures(llm, args.rounds, args.tokens)
        finally:
            llm.close()
    if "recording" in only:
        result["recording"] = recording_cost(args.rounds, args.tokens)
    result["machine"]["load_avg_1m_at_end"] = os.getloadavg()[0]
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    print(table(result))
    print(f"\nwritten to {args.json}")


FIGURES = ("constrained", "multi_turn", "raw_batching", "daemon", "bound", "adapter", "priority", "safety", "http",
           "recording")


def table(r: dict[str, Any]) -> str:
    m = r["machine"]
    rows = [row for key, row in _rows(r) if key in r]
    out = [f"Machine: {m['cpu']}, {m['cores']} cores, {m['ram_gb']} GB RAM, Python {m['python']}, "
           f"llama-cpp-python {m['llama_cpp_python']}, {m['threads']} threads, {m['date']}, "
           f"load avg {m['load_avg_1m_at_start']:.1f} -> {m['load_avg_1m_at_end']:.1f}", "",
           "| Figure | Measured | Ratio | Target |", "|---|---|---|---|"]
    out += [f"| {name} | {measured} | {ratio:.3f} | {target} |" for name, measured, ratio, target in rows]
    return "\n".join(out)


def _rows(r: dict[str, Any]) -> list[tuple[str, Any]]:
    """(result key, table row) for each figure present: a partial run (``--only``) prints its own rows."""
    rows: list[tuple[str, Any]] = []

    def add(key: str, name: str, measured: Any, ratio: Any, target: str) -> None:
        if key in r:
            rows.append((key, (name, measured(r[key]), ratio(r[key]), target)))

    add("overhead", "1 overhead: SDK+daemon npc.say (constrained) / llama-cpp-python create_completion (same "
        "prompt, greedy, unconstrained, same tokens), new line each round",
        lambda f: f"{f['sdk_daemon_ms']:.0f} / {f['raw_llama_cpp_ms']:.0f} ms", lambda f: f["ratio"], "<= 1.05")
    add("constrained", "2 decode tok/s: backend under the NPC schema / llama.cpp C API greedy loop, unconstrained",
        lambda f: f"{f['constrained_tok_s']:.1f} / {f['raw_unconstrained_tok_s']:.1f} tok/s",
        lambda f: f["ratio"], ">= 0.85")
    add("multi_turn", "3 TTFT 5th turn (another NPC between turns) / same prompt cold",
        lambda f: f"{f['ttft_turn5_ms']:.0f} / {f['ttft_cold_ms']:.0f} ms", lambda f: f["ratio"], "<= 0.3")
    add("concurrency", "4 aggregate tok/s through the daemon: 4 NPCs at once / the same 4 one after another",
        lambda f: f"{f['four_npcs_tok_s']:.1f} / {f['one_npc_tok_s']:.1f} tok/s", lambda f: f["ratio"], ">= 1.5")
    add("raw_batching", "4b raw llama.cpp decode tok/s, 4 sequences per llama_decode / 1 (batching's ceiling here)",
        lambda f: f"{f['four_seq_tok_s']:.1f} / {f['one_seq_tok_s']:.1f} tok/s", lambda f: f["ratio"], "(report)")
    add("bound", "5 raw decode tok/s / memory-bandwidth bound",
        lambda f: f"{f['decode_tok_s']:.1f} / {f['bound_tok_s']:.1f} tok/s", lambda f: f["fraction"], "(report)")
    add("adapter", "6 decode steps/s, same tokens: shipped default adapter / no adapter",
        lambda f: f"{f['adapter_tok_s']:.1f} / {f['base_tok_s']:.1f} tok/s", lambda f: f["ratio"], ">= 0.90")
    add("priority", "7 foreground time to first streamed piece (client-side): 4 background NPCs streaming / idle",
        lambda f: f"{f['fg_first_piece_4_background_ms']:.0f} / {f['fg_first_piece_idle_ms']:.0f} ms",
        lambda f: f["ratio"], "<= 1.3")
    add("concurrency_priority_run", "7b aggregate tok/s: 4 NPCs at once / one after another (same run as 7)",
        lambda f: f"{f['four_npcs_tok_s']:.1f} / {f['one_npc_tok_s']:.1f} tok/s", lambda f: f["ratio"], ">= 1.5")
    add("safety", "8 decode tok/s under the NPC schema: safety rails on (minor) / off; TTFT on / off",
        lambda f: f"{f['rails_on_tok_s']:.1f} / {f['rails_off_tok_s']:.1f} tok/s; TTFT {f['ttft_on_ms']:.0f} / "
                  f"{f['ttft_off_ms']:.0f} ms; the rail itself {f['rail_us_per_judged_token']:.0f} us/token, "
                  f"{100 * f['rail_share_of_decode']:.2f}% of decode time",
        lambda f: f["ratio"], ">= 0.90")
    add("http_say", "9 NPC line round trip: POST /v1/npc/say (httpx) / npc.say over the WebSocket (SDK)",
        lambda f: f"{f['http_ms']:.0f} / {f['websocket_ms']:.0f} ms", lambda f: f["ratio"], "<= 1.05")
    add("http_chat", "9b POST /v1/chat/completions / llama-cpp-python create_chat_completion (greedy, same tokens)",
        lambda f: f"{f['daemon_ms']:.0f} / {f['llama_cpp_python_ms']:.0f} ms ({f['tokens']} tokens)",
        lambda f: f["ratio"], "<= 1.10")
    add("recording", "10 decode tok/s: NPC recorded as experience / the same NPC not recorded (one daemon "
        "recording, alternating rounds); round trip on / off; one record's cost timed directly",
        lambda f: f"{f['recording_on_tok_s']:.1f} / {f['recording_off_tok_s']:.1f} tok/s; "
                  f"{f['round_trip_on_ms']:.0f} / {f['round_trip_off_ms']:.0f} ms; a record {f['build_us']:.0f} us "
                  f"to build + {f['append_us']:.0f} us to append, {100 * f['share_of_decode']:.3f}% of a reply's "
                  "decode time",
        lambda f: f["ratio"], ">= 0.98")
    return rows


if __name__ == "__main__":
    main()
