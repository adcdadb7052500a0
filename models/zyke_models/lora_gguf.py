"""Export a PEFT LoRA adapter to a GGUF LoRA that llama.cpp loads on top of its base model.

"Train once, run everywhere": an adapter trained with PEFT on the transformers checkpoint must also run
on the CPU backend. llama.cpp reads LoRA adapters as GGUF files with ``general.type = adapter``,
``adapter.type = lora``, ``adapter.lora.alpha`` and tensors ``blk.N.<tensor>.weight.lora_a|lora_b``
holding PEFT's ``lora_A`` (r x in) and ``lora_B`` (out x r) as they are; llama.cpp scales by
``alpha / r`` itself, as PEFT does.

Only numpy, safetensors and gguf are needed (no torch), so the daemon can export an adapter that was
registered without its GGUF twin. The safetensors file is read as data; nothing is unpickled.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
from gguf import GGUFWriter
from safetensors.numpy import load_file

#: PEFT module name -> llama.cpp tensor name, for the decoder architectures Zyke targets (Gemma, Llama,
#: Qwen, Mistral: all name their projections alike).
MODULE_TO_GGUF = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_KEY = re.compile(r"layers\.(\d+)\.(.+)\.lora_([AB])(?:\.[^.]+)?\.weight$")


class LoraExportError(ValueError):
    """The adapter uses something llama.cpp's LoRA loader cannot express."""


def export_peft_to_gguf(adapter_dir: Path, out_path: Path, arch: str = "gemma3") -> Path:
    """Write ``out_path`` (a GGUF LoRA) from a PEFT adapter directory; returns the path written."""
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    if config.get("peft_type") != "LORA":
        raise LoraExportError(f"{adapter_dir} is a {config.get('peft_type')} adapter, not LoRA")
    if config.get("use_dora"):
        raise LoraExportError("DoRA adapters cannot be exported to llama.cpp")
    if config.get("modules_to_save"):
        raise LoraExportError("modules_to_save (full copies of layers) cannot be exported to llama.cpp")
    rank = int(config["r"])
    alpha = float(config["lora_alpha"])
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    pairs: dict[tuple[int, str], dict[str, np.ndarray]] = {}
    for key, value in tensors.items():
        match = _KEY.search(key)
        if not match:
            raise LoraExportError(f"cannot map {key!r}: LoRA on embeddings or the lm_head is not supported")
        layer, module, ab = int(match[1]), match[2], match[3]
        if module not in MODULE_TO_GGUF:
            raise LoraExportError(f"cannot map module {module!r} to a llama.cpp tensor")
        pairs.setdefault((layer, module), {})[ab] = value
    writer = GGUFWriter(str(out_path), arch)
    writer.add_type("adapter")
    writer.add_string("adapter.type", "lora")
    writer.add_float32("adapter.lora.alpha", alpha)
    for (layer, module), ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            raise LoraExportError(f"layer {layer} {module} has lora_{''.join(ab)} only")
        # kept in half precision when the PEFT file is (a shipped adapter is half the size); else float32
        out_dtype = np.float16 if ab["A"].dtype == np.float16 else np.float32
        lora_a, lora_b = ab["A"].astype(np.float32), ab["B"].astype(np.float32)
        r = lora_a.shape[0]
        # llama.cpp has one alpha per file: fold any per-module alpha/rank into B so B·A·scale is unchanged
        short = module.split(".")[-1]
        module_alpha = float(alpha_pattern.get(short, alpha))
        module_rank = int(rank_pattern.get(short, rank))
        fold = (module_alpha / module_rank) / (alpha / r) if (module_alpha, module_rank) != (alpha, r) else 1.0
        name = f"blk.{layer}.{MODULE_TO_GGUF[module]}.weight"
        writer.add_tensor(f"{name}.lora_a", np.ascontiguousarray(lora_a.astype(out_dtype)))
        writer.add_tensor(f"{name}.lora_b", np.ascontiguousarray((lora_b * fold).astype(out_dtype)))
    out_path.parent.mkdir(parents=True, exist_ok=True)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out_path
