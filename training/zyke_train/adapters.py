"""Export, register and merge LoRA adapters: the last step from a trained PEFT adapter to a served one.

Registration goes through the registry the daemon serves from (``zyke_models.adapters``), so what training
writes is exactly what the daemon checks when it loads: base fingerprint, file hashes, the GGUF twin.
"""

from __future__ import annotations

from pathlib import Path

from zyke.paths import data_dir
from zyke_models.adapters import SHIPPED_ADAPTERS, AdapterEntry, AdapterRegistry
from zyke_models.embedded import embedded_model_path, sha256_file
from zyke_models.errors import DaemonError
from zyke_models.hf_checkpoint import base_fingerprint, embedded_hf_checkpoint
from zyke_models.lora_gguf import export_peft_to_gguf

from .errors import AdapterError

#: Files of a PEFT adapter folder: what a run can start from (``train --init-adapter``, ``rl --adapter``).
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def default_registry(extra: list[Path] | None = None) -> AdapterRegistry:
    return AdapterRegistry([data_dir() / "adapters", *(extra or []), SHIPPED_ADAPTERS])


def resolve_adapter(adapter: str, flag: str = "--adapter") -> Path:
    """A PEFT folder as given, or a registered adapter's PEFT folder (hash-checked by the registry); ``flag`` names
    the option in the error."""
    path = Path(adapter).expanduser()
    if path.is_dir():
        missing = [f for f in ADAPTER_FILES if not (path / f).is_file()]
        if missing:
            raise AdapterError(f"{path} is not a PEFT adapter folder (missing {', '.join(missing)})")
        return path
    registry = default_registry()
    found = registry.entries().get(adapter)
    if found is None:
        raise AdapterError(f"{flag} {adapter!r}: neither a PEFT folder nor a registered adapter "
                           "(zyke-train adapters lists them)")
    try:
        return registry.resolve(adapter, found[1].base, "peft")
    except DaemonError as exc:
        raise AdapterError(f"{flag} {adapter!r}: {exc}") from exc


def export_gguf(peft_dir: Path, out: Path | None = None, arch: str = "gemma3") -> Path:
    return export_peft_to_gguf(peft_dir, out or peft_dir / "adapter.gguf", arch=arch)


def register(name: str, peft_dir: Path, base: Path | None = None, arch: str = "gemma3") -> AdapterEntry:
    """Register an adapter for the daemon, fingerprinted against ``base`` (default: the embedded model)."""
    if base is None:
        path, sha = embedded_model_path()
        return default_registry().register(name, peft_dir, f"sha256:{sha}", base_name=path.name, arch=arch)
    fingerprint = base_fingerprint(base) if base.is_dir() else f"sha256:{sha256_file(base)}"
    return default_registry().register(name, peft_dir, fingerprint, base_name=base.name, arch=arch)


def merge(peft_dir: Path, out: Path, base: Path | None = None) -> Path:
    """Fold an adapter into its base weights (PEFT merge_and_unload) and save a plain checkpoint."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_dir = base or embedded_hf_checkpoint()
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, str(peft_dir)).merge_and_unload()
    merged.save_pretrained(str(out))
    AutoTokenizer.from_pretrained(str(base_dir)).save_pretrained(str(out))
    return out

