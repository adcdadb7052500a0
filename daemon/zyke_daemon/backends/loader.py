"""Pick and load a backend from the daemon's config.

``auto`` runs transformers on a machine with a CUDA GPU (and torch, transformers and PEFT installed),
where it is fast and takes any checkpoint, and llama.cpp everywhere else: on a CPU the Q4_K_M GGUF
under llama.cpp is several times faster than fp32 PyTorch. A GGUF file named with ``--model`` always
goes to llama.cpp, which is the only backend that reads one.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from zyke_models.embedded import has_gguf_magic, resolve_model

from ..config import DaemonConfig
from ..errors import ModelLoadError
from .base import Backend

BACKENDS = ("auto", "llama.cpp", "transformers")


def load_backend(config: DaemonConfig) -> Backend:
    if config.backend not in BACKENDS:
        raise ModelLoadError(f"unknown backend {config.backend!r}; choose one of {', '.join(BACKENDS)}")
    if choose_backend(config) == "transformers":
        return _load_transformers(config)
    path, sha256 = resolve_model(config.model)
    from .llamacpp import LlamaCppBackend

    return LlamaCppBackend(path, sha256=sha256, n_ctx=config.n_ctx, n_threads=config.n_threads,
                           max_loaded_adapters=config.max_loaded_adapters)


def choose_backend(config: DaemonConfig) -> str:
    """The backend ``config`` names, with ``auto`` resolved (see the module docstring)."""
    if config.backend != "auto":
        return config.backend
    if config.model is not None and _is_gguf(Path(config.model).expanduser()):
        return "llama.cpp"
    if not all(importlib.util.find_spec(m) for m in ("torch", "transformers", "peft")):
        return "llama.cpp"
    import torch

    return "transformers" if torch.cuda.is_available() else "llama.cpp"


def _load_transformers(config: DaemonConfig) -> Backend:
    model = config.model
    if model is not None and _is_gguf(Path(model).expanduser()):
        raise ModelLoadError(f"{model} is a GGUF file: the transformers backend needs a checkpoint directory "
                             "or a Hugging Face Hub name (or --backend llama.cpp)")
    try:
        from .hf import TransformersBackend
    except ImportError as exc:
        raise ModelLoadError(f"the transformers backend needs torch, transformers and peft ({exc}): "
                             "pip install 'zyke[train]'") from exc
    return TransformersBackend(model, device=config.device, dtype=config.dtype, quantization=config.quantization,
                               attn_implementation=config.attn_implementation, compile=config.compile,
                               max_loaded_adapters=config.max_loaded_adapters)


def _is_gguf(path: Path) -> bool:
    try:
        return has_gguf_magic(path)
    except OSError:  # a directory, a Hub name, or nothing there
        return False
