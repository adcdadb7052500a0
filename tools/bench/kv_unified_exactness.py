"""Does one llama_decode of several sequences' unequal runs give each sequence its solo logits? (docs/SCHEDULING.md)

    .venv/bin/python tools/bench/kv_unified_exactness.py

Why: half the time of 4 NPCs at once goes to prompt tails and the grammar's forced runs, evaluated one sequence per
call. With the daemon's KV layout (one stream per slot, ``kv_unified=False``) llama.cpp splits a call of unequal runs
into equal micro-batches, so merging them saves nothing; a unified KV cache keeps such a call in one micro-batch.
This checks whether that stays exact: three prompts are prefilled (in the daemon's aligned chunks), then each
sequence's run (a few tokens, unequal) is evaluated in a call of its own on a fresh context, or all three in one call,
and the last logits of each run are compared. Prints the largest absolute difference per sequence for both layouts.
Measured 2026-12-01 on the embedded model: per slot 0.0 for all three, unified 0.60-0.72, so unified KV would change
replies (differences of this size did before) and the scheduler keeps per-slot streams.
"""

from __future__ import annotations

import llama_cpp
import numpy as np
from zyke_daemon.backends.llamacpp import PREFILL_CHUNK, LlamaCppBackend
from zyke_models.embedded import embedded_model_path

PROMPTS = ("You are Brom, a blacksmith in Karak. The player asks: can you fix my sword? Answer:",
           "You are Mira, an innkeeper. The player wants a room for the night and asks the price. Answer:",
           "You are Voss, a gate guard. The player asks to pass the gate without papers. Answer:")
RUNS = (" The blade is chipped", " Ten", " No")
SLOTS = 5


def backend(unified: bool) -> LlamaCppBackend:
    """The daemon's backend; with ``unified`` its context is rebuilt with one KV buffer for every sequence."""
    path, sha256 = embedded_model_path()
    b = LlamaCppBackend(path, sha256, n_ctx=2048, n_threads=2, n_slots=SLOTS)
    if unified:
        llama_cpp.llama_free(b._ctx)
        params = llama_cpp.llama_context_default_params()
        params.n_ctx, params.n_batch, params.n_ubatch, params.n_seq_max = 2048 * SLOTS, 512, PREFILL_CHUNK, SLOTS
        params.kv_unified, params.swa_full, params.no_perf = True, True, True
        params.n_threads = params.n_threads_batch = 2
        b._ctx = llama_cpp.llama_init_from_model(b._model.model, params)
        b._mem = llama_cpp.llama_get_memory(b._ctx)
    return b


def prefill(b: LlamaCppBackend, seq: int, text: str) -> None:
    b._prefill(b._slots[seq], b.tokenize(text), 0)


def max_differences(unified: bool) -> list[float]:
    solo = []
    for prompt, run in zip(PROMPTS, RUNS, strict=True):
        b = backend(unified)
        prefill(b, 0, prompt)
        b._eval(b._slots[0], b.tokenize(run))
        solo.append(b._logits().copy())
        b.close()
    b = backend(unified)
    rows: list[tuple[int, int, int, bool]] = []
    last = []
    for seq, (prompt, run) in enumerate(zip(PROMPTS, RUNS, strict=True)):
        prefill(b, seq, prompt)
        tokens, start = b.tokenize(run), len(b._slots[seq].tokens)
        rows += [(seq, start + k, token, k == len(tokens) - 1) for k, token in enumerate(tokens)]
        last.append(len(rows) - 1)
    b._decode(rows)
    together = [b._logits(row).copy() for row in last]
    b.close()
    return [float(np.abs(s - t).max()) for s, t in zip(solo, together, strict=True)]


def main() -> None:
    for unified in (False, True):
        diffs = ", ".join(f"{d:.3g}" for d in max_differences(unified))
        print(f"{'unified KV' if unified else 'per-slot KV'}: largest |solo - together| per sequence: {diffs}")


if __name__ == "__main__":
    main()
