"""Pick and load a backend from the daemon's config."""

from __future__ import annotations

from ..config import DaemonConfig
from ..embedded import resolve_model
from ..errors import ModelLoadError
from .base import Backend

BACKENDS = ("auto", "llama.cpp")


def load_backend(config: DaemonConfig) -> Backend:
    if config.backend not in BACKENDS:
        raise ModelLoadError(f"unknown backend {config.backend!r}; choose one of {', '.join(BACKENDS)}")
    path, sha256 = resolve_model(config.model)
    from .llamacpp import LlamaCppBackend

    return LlamaCppBackend(path, sha256=sha256, n_ctx=config.n_ctx, n_threads=config.n_threads)
