"""The embedded GGUF as a transformers checkpoint, and the fingerprint that says which base an adapter fits.

The transformers backend and PEFT training need a transformers checkpoint, but the only weights Zyke
ships are the embedded Gemma 3 270M Q4_K_M GGUF. transformers can read a GGUF directly, but that costs
about 90 s every time (37 s building the tokenizer from GGUF metadata, 55 s dequantizing the tensors),
so it is done once and saved as an fp32 safetensors checkpoint in the cache (about 1 GB, 4 s to write).
fp32 because the dequantized Q4_K values are exact in fp32; bf16 would round them and move the model
away from what llama.cpp runs, which the adapter parity between the two backends relies on.

The checkpoint is written to a temporary directory beside its final place and renamed into it, so a
killed conversion never leaves a half checkpoint that a later run would trust. ``zyke_base.json`` in it
records the GGUF it came from (name, sha256) and the files' sizes; a later call reuses the checkpoint only
when that marker matches the embedded model and the files are whole.

Nothing here imports torch or transformers at module level: ``base_fingerprint`` is used by the daemon's
adapter registry, which must work on a llama.cpp-only install.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import shutil
import tempfile
import time
from pathlib import Path

from .embedded import EMBEDDED_NAME, embedded_model_path, has_gguf_magic, sha256_file
from .errors import ModelLoadError

log = logging.getLogger(__name__)

HF_DIR_NAME = "gemma-3-270m-hf"
MARKER = "zyke_base.json"
#: Weight files hashed for a plain transformers checkpoint's fingerprint (sharded or not).
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def embedded_hf_checkpoint(cache: Path | None = None) -> Path:
    """Directory of the embedded model as a transformers checkpoint, converting it on first use (~90 s)."""
    gguf_path, sha256 = embedded_model_path(cache)
    target = gguf_path.parent / HF_DIR_NAME
    if _marker_ok(target, sha256):
        return target
    return convert_gguf_to_hf(gguf_path, target, sha256)


def convert_gguf_to_hf(gguf_path: Path, target: Path, source_sha256: str) -> Path:
    """Dequantize ``gguf_path`` into an fp32 transformers checkpoint at ``target`` (atomically)."""
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as exc:
        raise ModelLoadError("converting the embedded model needs torch and transformers: "
                             "pip install 'zyke[train]'") from exc
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    try:
        started = time.perf_counter()
        log.info("converting %s to a transformers checkpoint at %s (once; about 90 s)", gguf_path.name, target)
        log.info("[1/3] building the tokenizer from the GGUF metadata (about 40 s)")
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        log.info("[2/3] dequantizing the GGUF tensors to fp32 (about 60 s)")
        model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                                     dtype=torch.float32)
        # The model remembers it came from a (quantized) GGUF and save_pretrained refuses such models;
        # its weights are plain fp32 tensors by now, so it is saved as an ordinary checkpoint.
        model.hf_quantizer = None
        model.is_quantized = False
        model.quantization_method = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        log.info("[3/3] writing the checkpoint")
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        del model
        files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file()}
        (tmp / MARKER).write_text(json.dumps({"source": gguf_path.name, "source_sha256": source_sha256,
                                              "files": files}, indent=2) + "\n")
        _install(tmp, target, source_sha256)
        log.info("converted in %.0f s", time.perf_counter() - started)
        return target
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _install(tmp: Path, target: Path, sha256: str) -> None:
    """Rename the finished checkpoint into place. Another process may have finished first: keep its copy
    when it is valid, replace a stale or broken one."""
    if target.exists():
        if _marker_ok(target, sha256):
            return
        stale = target.with_name(f".{target.name}.stale-{time.time_ns()}")
        target.rename(stale)
        shutil.rmtree(stale, ignore_errors=True)
    try:
        tmp.rename(target)
    except OSError:
        if not _marker_ok(target, sha256):  # lost a race to a process whose checkpoint is not valid
            raise


def _marker_ok(target: Path, sha256: str) -> bool:
    """The checkpoint came from this GGUF and every file it was written with is there, at its size."""
    try:
        marker = json.loads((target / MARKER).read_text())
    except (OSError, ValueError):
        return False
    if marker.get("source_sha256") != sha256 or not marker.get("files"):
        return False
    try:
        return all((target / name).stat().st_size == size for name, size in marker["files"].items())
    except OSError:
        return False


# -- base fingerprints

_hash_cache: dict[tuple[str, int, int], str] = {}


def base_fingerprint(path: Path) -> str:
    """``"sha256:<hex>"`` naming the base model at ``path``, equal for every form of the same base.

    - a checkpoint carrying ``zyke_base.json`` (converted from a GGUF here): the GGUF's sha256, so an
      adapter trained on the converted embedded model matches the embedded GGUF that llama.cpp runs;
    - a GGUF file: its sha256 (for the embedded model that is the sha256 the package declares);
    - another transformers checkpoint: sha256 over ``config.json`` and the weight files' bytes, in name
      order with each name hashed in. Those are what an adapter depends on (architecture and weights);
      tokenizer and generation files are left out because transformers rewrites them on save across
      versions without changing the model, which would make the same base look like two.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        marker = path / MARKER
        if marker.is_file():
            try:
                source: str = json.loads(marker.read_text())["source_sha256"]
                return "sha256:" + source
            except (ValueError, KeyError) as exc:
                raise ValueError(f"{marker} is not a valid Zyke base marker") from exc
        return "sha256:" + _checkpoint_digest(path)
    if path.is_file():
        if not has_gguf_magic(path):
            raise ValueError(f"{path} is neither a GGUF file nor a transformers checkpoint directory")
        return "sha256:" + _file_digest(path)
    raise FileNotFoundError(f"no model at {path}")


def _file_digest(path: Path) -> str:
    """sha256 of a file, trusting the embedded model's verified marker and memoizing by (path, size, mtime)
    so the registry can ask repeatedly without re-hashing a large file each time."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _hash_cache:
        sidecar = path.with_suffix(path.suffix + ".sha256")
        if path.name == EMBEDDED_NAME and sidecar.is_file():
            _hash_cache[key] = sidecar.read_text().strip()  # written by embedded.py after verifying it
        else:
            _hash_cache[key] = sha256_file(path)
    return _hash_cache[key]


def _checkpoint_digest(path: Path) -> str:
    config = path / "config.json"
    if not config.is_file():
        raise ValueError(f"{path} has no config.json: not a transformers checkpoint")
    weights = sorted(p for p in path.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))
    if not weights:
        raise ValueError(f"{path} has no weight files")
    digest = hashlib.sha256()
    for file in [config, *weights]:
        digest.update(file.name.encode() + b"\0")
        with file.open("rb") as fh:
            for block in iter(functools.partial(fh.read, 1 << 20), b""):
                digest.update(block)
        digest.update(b"\0")
    return digest.hexdigest()
