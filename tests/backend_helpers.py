"""Reference computations the backend tests compare with; not part of the backends (issue 15: test-only helpers
leave the production classes). They reach into the backends' internals on purpose: each is the plainest way to get
the numbers a backend's own paths must match."""

from __future__ import annotations

from typing import Any

import numpy as np
from zyke_daemon.backends.llamacpp import LlamaCppBackend


def llama_greedy(backend: LlamaCppBackend, prompt: str, n: int, adapter: str | None = None) -> list[int]:
    """Plain greedy continuation on llama.cpp from a cold slot: no grammar, no repeat penalty, ``adapter`` applied
    (None: the base). A reference that parity tests compare the transformers backend with."""
    backend.reset()
    backend._apply(adapter)
    tokens = backend.tokenize(prompt)
    slot, _ = backend._take_slot(tokens, adapter)
    backend._prefill(slot, tokens, 0)
    out: list[int] = []
    while len(out) < n and (token := int(np.argmax(backend._logits()))) not in backend._eos:
        out.append(token)
        backend._eval(slot, [token])
    backend._clear(slot)
    return out


def hf_generate_batch(backend: Any, prompts: list[str], adapters: list[str | None],
                      max_new_tokens: int) -> list[list[int]]:
    """Greedy, unconstrained continuations of several prompts on a ``TransformersBackend``, each row with its own
    adapter (None: the base), in one batched ``generate`` call with left padding: PEFT's mixed-adapter batches, rows
    with different adapters (or none) in one forward pass. Returns each row's new tokens up to EOS."""
    import torch
    from zyke_daemon.backends.hf import BASE_ROW
    from zyke_daemon.errors import ModelLoadError

    if len(prompts) != len(adapters):
        raise ValueError("one adapter (or None) per prompt")
    unknown = {a for a in adapters if a is not None and a not in backend._adapters}
    if unknown:
        raise ModelLoadError(f"adapter(s) not loaded: {', '.join(sorted(unknown))}")
    tok = backend.hf_tokenizer
    side = tok.padding_side
    tok.padding_side = "left"
    try:
        enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=True).to(backend.device)
    finally:
        tok.padding_side = side
    kwargs: dict[str, Any] = {}
    if backend._adapters:  # a PeftModel: name every row's adapter
        kwargs["adapter_names"] = [a if a is not None else BASE_ROW for a in adapters]
    pad = tok.pad_token_id if tok.pad_token_id is not None else min(backend._eos)
    with backend._lock, torch.inference_mode():
        out = backend.lm.generate(**enc, **kwargs, max_new_tokens=max_new_tokens, do_sample=False,
                                  temperature=None, top_p=None, top_k=None, pad_token_id=pad,
                                  eos_token_id=sorted(backend._eos))
    rows: list[list[int]] = []
    for row in out[:, enc["input_ids"].shape[1]:].tolist():
        cut = next((i for i, t in enumerate(row) if t in backend._eos), len(row))
        rows.append(row[:cut])
    return rows
