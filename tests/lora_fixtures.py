"""Small PEFT LoRA adapters for the embedded model, made from random numbers (no torch, no training).

Plumbing tests (registry, hot swap, isolation between NPCs) need adapters that really change the
model's output, not trained ones; tests/test_backend_hf.py trains a real one for the parity test.
Shapes are read from the embedded GGUF, so the adapters load in llama.cpp.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from gguf import GGUFReader
from safetensors.numpy import save_file

GGUF_TO_MODULE = {"attn_q": "self_attn.q_proj", "attn_v": "self_attn.v_proj"}


def make_random_lora(out: Path, base_gguf: Path, seed: int, rank: int = 4, scale: float = 0.05) -> Path:
    """Write a PEFT adapter dir (adapter_config.json + adapter_model.safetensors) on q_proj and v_proj."""
    rng = np.random.default_rng(seed)
    tensors: dict[str, np.ndarray] = {}
    for t in GGUFReader(str(base_gguf)).tensors:
        parts = t.name.split(".")  # blk.N.attn_q.weight
        if len(parts) != 4 or parts[2] not in GGUF_TO_MODULE:
            continue
        n_in, n_out = (int(x) for x in t.shape)  # GGUF lists dims innermost first: (in, out)
        prefix = f"base_model.model.model.layers.{parts[1]}.{GGUF_TO_MODULE[parts[2]]}"
        tensors[f"{prefix}.lora_A.weight"] = (rng.standard_normal((rank, n_in)) * scale).astype(np.float32)
        tensors[f"{prefix}.lora_B.weight"] = (rng.standard_normal((n_out, rank)) * scale).astype(np.float32)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    (out / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": ["q_proj", "v_proj"],
        "lora_dropout": 0.0, "bias": "none", "task_type": "CAUSAL_LM"}))
    return out
