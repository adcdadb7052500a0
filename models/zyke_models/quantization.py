"""The bitsandbytes settings a base model is loaded with: the transformers backend (``--quantization``) and QLoRA
training (``zyke-train train --qlora``) load the same 4-bit NF4 base."""

from __future__ import annotations

import importlib.util
from typing import Any

from .errors import ModelLoadError

QUANTIZATIONS = (None, "4bit", "8bit")


def quantization_config(quantization: str | None, compute_dtype: Any) -> Any:
    """bitsandbytes 4-bit (NF4, for the weights; compute in ``compute_dtype``, a ``torch.dtype``) or 8-bit, or
    None. transformers is imported here, not at module level."""
    if quantization not in QUANTIZATIONS:
        raise ModelLoadError(f"unknown quantization {quantization!r}; use 4bit or 8bit")
    if quantization is None:
        return None
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ModelLoadError(f"{quantization} quantization needs bitsandbytes: pip install 'zyke[gpu]'")
    from transformers import BitsAndBytesConfig

    if quantization == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=compute_dtype)
    return BitsAndBytesConfig(load_in_8bit=True)
