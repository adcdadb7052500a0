"""Ship an adapter inside the installed package: the default NPC every game gets on the embedded model.

``zyke-train ship build/npc-default/adapter --report training/reports/npc_default_eval.json`` writes the
adapter into ``zyke_models/shipped_adapters/`` (an adapter root with its own ``manifest.json``), in half
precision (the PEFT safetensors and the GGUF twin are about 5 MB each instead of 10), with the base
fingerprint and sha256 of every file as any registered adapter has, plus the command that made it and
its evaluation table, so what ships says how it was made and how good it is.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from zyke_models.adapters import PEFT_FILES, SHIPPED_ADAPTERS, AdapterEntry, AdapterRegistry
from zyke_models.names import DEFAULT_ADAPTER_NAME


def half_precision_copy(peft_dir: Path, out: Path) -> Path:
    """``out`` holds the PEFT adapter with its floating tensors in float16 (safetensors, no pickle)."""
    import numpy as np
    from safetensors.numpy import load_file, save_file

    out.mkdir(parents=True, exist_ok=True)
    shutil.copy2(peft_dir / "adapter_config.json", out / "adapter_config.json")
    tensors = load_file(str(peft_dir / "adapter_model.safetensors"))
    save_file({k: v.astype(np.float16) if v.dtype.kind == "f" else v for k, v in tensors.items()},
              str(out / "adapter_model.safetensors"))
    return out


def evaluation_summary(report: dict[str, Any], label: str) -> dict[str, Any]:
    """The adapter's evaluation numbers (and the base model's, for comparison) without the replies."""
    npc = report["npc"]
    return {"created": report.get("created"), "scenarios_file": npc.get("scenarios_file"),
            "backend": npc.get("backend"),
            "results": {k: v for k, v in npc["results"].items() if k in (label, "base")}}


def ship(peft_dir: Path, name: str = DEFAULT_ADAPTER_NAME, root: Path = SHIPPED_ADAPTERS,
         recipe: str | None = None, report: dict[str, Any] | None = None) -> AdapterEntry:
    """Register ``peft_dir`` under ``name`` in the shipped root, fingerprinted against the embedded model."""
    from zyke_models.embedded import embedded_model_path

    missing = [f for f in PEFT_FILES if not (peft_dir / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{peft_dir} is not a PEFT adapter directory (missing {', '.join(missing)})")
    path, sha = embedded_model_path()
    evaluation = evaluation_summary(report, name) if report else None
    with tempfile.TemporaryDirectory() as tmp:
        half = half_precision_copy(peft_dir, Path(tmp) / "peft")
        return AdapterRegistry([root]).register(name, half, f"sha256:{sha}", base_name=path.name,
                                                recipe=recipe, evaluation=evaluation)


def load_report(path: Path | None) -> dict[str, Any] | None:
    return json.loads(path.read_text(encoding="utf-8")) if path else None
