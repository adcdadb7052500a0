"""Checkpoints of ``zyke-train train`` without pickle: adapter and optimizer as safetensors, the rest as JSON.

Nothing is read back with ``pickle``/``torch.load``, so a checkpoint from elsewhere cannot run code. A checkpoint is
written to a temporary directory and renamed, so ``--resume-latest`` never picks up a half-written one.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

from .errors import TrainError

CHECKPOINT_PREFIX = "checkpoint-"
STATE_FILE = "trainer_state.json"


def checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (those with a trainer state) as (step, dir), oldest first."""
    found = []
    for d in output_dir.glob(f"{CHECKPOINT_PREFIX}*"):
        suffix = d.name[len(CHECKPOINT_PREFIX):]
        if d.is_dir() and suffix.isdigit() and (d / STATE_FILE).is_file():
            found.append((int(suffix), d))
    return sorted(found)


def save_checkpoint(output_dir: Path, step: int, model: Any, optimizer: Any, scheduler: Any,
                    state: dict[str, Any], keep: int) -> Path:
    """Write checkpoint-<step> atomically (temp dir + rename) and drop all but the newest ``keep``."""
    import torch
    from safetensors.torch import save_file

    final = output_dir / f"{CHECKPOINT_PREFIX}{step:06d}"
    tmp = output_dir / f".{final.name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(str(tmp))
    tensors, meta = _optimizer_to_tensors(optimizer)
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    rng_tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            rng_tensors[f"torch_cuda_{i}"] = s
    save_file(rng_tensors, str(tmp / "rng.safetensors"))
    sched = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
    py_state = random.getstate()
    (tmp / "optimizer.json").write_text(json.dumps(meta, indent=1))
    (tmp / "scheduler.json").write_text(json.dumps(sched, indent=1))
    (tmp / "rng.json").write_text(json.dumps({"python": [py_state[0], list(py_state[1]), py_state[2]]}))
    (tmp / STATE_FILE).write_text(json.dumps(state, indent=1))  # last: marks the checkpoint complete
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    for _, old in checkpoints(output_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path, model: Any, optimizer: Any, scheduler: Any) -> dict[str, Any]:
    """Restore adapter weights, optimizer, scheduler and RNG from ``path``; returns its trainer state.
    Everything is read with safetensors or json: no code can be smuggled in through a checkpoint."""
    import torch
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    weights = load_file(str(path / "adapter_model.safetensors"))
    result = set_peft_model_state_dict(model, weights)
    missing = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
    if missing:
        raise TrainError(f"{path}: adapter weights do not fit this model ({missing[:3]}...)")
    meta = json.loads((path / "optimizer.json").read_text())
    _optimizer_from_tensors(optimizer, load_file(str(path / "optimizer.safetensors")), meta)
    sched = json.loads((path / "scheduler.json").read_text())
    sched["lr_lambdas"] = [None] * len(scheduler.lr_lambdas)
    scheduler.load_state_dict(sched)
    rng = load_file(str(path / "rng.safetensors"))
    torch.set_rng_state(rng["torch_cpu"])
    cuda = [rng[k] for k in sorted(rng) if k.startswith("torch_cuda_")]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    py = json.loads((path / "rng.json").read_text())["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    state: dict[str, Any] = json.loads((path / STATE_FILE).read_text())  # written by save_checkpoint
    return state


def _optimizer_to_tensors(optimizer: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """An optimizer's state as flat tensors (``state.<param>.<name>``) plus JSON for everything else."""
    import torch

    sd = optimizer.state_dict()
    tensors: dict[str, Any] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, pstate in sd["state"].items():
        for name, value in pstate.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{pid}.{name}"] = value.detach().contiguous().cpu()
            else:
                scalars.setdefault(str(pid), {})[name] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _optimizer_from_tensors(optimizer: Any, tensors: dict[str, Any], meta: dict[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        _, pid, name = key.split(".", 2)
        state.setdefault(int(pid), {})[name] = value
    for pid, values in meta.get("scalars", {}).items():
        state.setdefault(int(pid), {}).update(values)
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
