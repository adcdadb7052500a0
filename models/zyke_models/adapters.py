"""The adapter registry: which LoRA adapters this daemon may serve, and proof that each fits its base.

An adapter is served by name only. Names map to files through ``manifest.json`` files in registered
roots (the user data dir's ``adapters/`` and every ``--adapter-dir``), so the protocol never takes a
path and cannot be turned into a file reader. Each entry records:

- ``peft``: the PEFT adapter directory (for the transformers backend) and ``gguf``: its GGUF export
  (for llama.cpp), both relative to the root; a path that resolves outside its root is refused;
- ``base``: the fingerprint of the base model it was trained on (``sha256:...``, not a name): an
  adapter trained on one model silently produces garbage on another, so loading refuses a mismatch;
- ``rank``, ``alpha``, ``targets`` and a ``sha256`` of every file, checked before the files are loaded.

``register`` copies a PEFT adapter into the default root and writes its GGUF twin, so one adapter,
trained once, runs on both backends. The daemon serves through this registry and training registers through it,
so what training writes is exactly what the daemon checks when it loads.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from zyke.protocol import AdapterInfo, ErrorCode
from zyke.protocol.models import AdapterName

from .embedded import sha256_file
from .errors import DaemonError
from .files import atomic_write_text, move_aside
from .lora_gguf import export_peft_to_gguf
from .names import BASE_ADAPTER

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
PEFT_FILES = ("adapter_config.json", "adapter_model.safetensors")
#: Adapters shipped inside the package: an adapter root like any other (manifest, hashes, base check).
SHIPPED_ADAPTERS = Path(__file__).resolve().parent / "shipped_adapters"


class AdapterEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: AdapterName
    base: str
    base_name: str | None = None
    peft: str | None = None
    gguf: str | None = None
    rank: int = Field(ge=1)
    alpha: float
    targets: list[str]
    sha256: dict[str, str]
    #: how it was made (the command that reproduces it) and what it scored, for shipped adapters
    recipe: str | None = None
    evaluation: dict[str, Any] | None = None


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    v: Literal[1] = 1
    adapters: dict[str, AdapterEntry] = Field(default_factory=dict)


class AdapterRegistry:
    def __init__(self, roots: list[Path], on_corrupt: Callable[[Path], None] | None = None) -> None:
        if not roots:
            raise ValueError("at least one adapter root is needed")
        self.roots = [r.expanduser().resolve() for r in roots]
        #: told about each manifest that does not parse (the server counts them in /metrics)
        self.on_corrupt = on_corrupt
        self._reported: set[Path] = set()

    @property
    def default_root(self) -> Path:
        return self.roots[0]

    def entries(self) -> dict[str, tuple[Path, AdapterEntry]]:
        """Every adapter by name with its root. Manifests are re-read so a newly trained adapter shows up
        without a daemon restart; the first root that names an adapter wins."""
        found: dict[str, tuple[Path, AdapterEntry]] = {}
        for root in self.roots:
            for name, entry in self._read(root).adapters.items():
                if name in found:
                    log.warning("adapter %r in %s is shadowed by the one in %s", name, root, found[name][0])
                    continue
                found[name] = (root, entry)
        return found

    def infos(self, loaded: list[str]) -> list[AdapterInfo]:
        return [AdapterInfo(name=n, base=e.base, rank=e.rank, targets=e.targets, loaded=n in loaded)
                for n, (_, e) in sorted(self.entries().items())]

    def resolve(self, name: str, base_fingerprint: str, kind: Literal["gguf", "peft"],
                request_id: str | None = None) -> Path:
        """The checked file (gguf) or directory (peft) to load for this backend, or a typed error."""
        found = self.entries().get(name)
        if found is None:
            raise DaemonError(ErrorCode.UNKNOWN_ADAPTER, f"no adapter named {name!r} is registered", request_id)
        root, entry = found

        def reject(why: str) -> DaemonError:
            return DaemonError(ErrorCode.ADAPTER_REJECTED, f"adapter {name!r}: {why}", request_id)

        if entry.base != base_fingerprint:
            raise reject(f"it was trained on base {entry.base} but this daemon serves {base_fingerprint}")
        rel = entry.gguf if kind == "gguf" else entry.peft
        if rel is None:
            raise reject(f"it has no {kind} files (re-register it to export them)")
        target = _confined(root, rel)
        if target is None:
            raise reject(f"its path {rel!r} leaves the adapter directory {root}")
        files = [target] if kind == "gguf" else [target / f for f in PEFT_FILES]
        for path in files:
            key = path.relative_to(root).as_posix()
            if not path.is_file():
                raise reject(f"{key} is missing")
            if entry.sha256.get(key) != sha256_file(path):
                raise reject(f"{key} does not match its recorded sha256 (changed since it was registered)")
        return target

    def register(self, name: str, peft_dir: Path, base_fingerprint: str, base_name: str | None = None,
                 arch: str = "gemma3", recipe: str | None = None,
                 evaluation: dict[str, Any] | None = None) -> AdapterEntry:
        """Copy a PEFT adapter into the default root, export its GGUF twin, record both in the manifest."""
        if name == BASE_ADAPTER:
            raise ValueError(f"{BASE_ADAPTER!r} is reserved: it names the bare base model")
        config = json.loads((peft_dir / "adapter_config.json").read_text())
        root = self.default_root
        dest = root / name
        staging = Path(tempfile.mkdtemp(dir=_mkdir(root), prefix=f".{name}."))
        try:
            (staging / "peft").mkdir()
            for f in PEFT_FILES:
                shutil.copy2(peft_dir / f, staging / "peft" / f)
            export_peft_to_gguf(staging / "peft", staging / "adapter.gguf", arch=arch)
            # the old version moves aside by a rename and is deleted only after the new one is in place: a reader
            # (a daemon resolving the name, a test) never finds the folder missing while a slow rmtree runs
            old = Path(tempfile.mkdtemp(dir=root, prefix=f".{name}.old.")) / name if dest.exists() else None
            if old is not None:
                dest.rename(old)
            staging.rename(dest)
            if old is not None:
                shutil.rmtree(old.parent, ignore_errors=True)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        rels = [f"{name}/peft/{f}" for f in PEFT_FILES] + [f"{name}/adapter.gguf"]
        entry = AdapterEntry(
            name=name, base=base_fingerprint, base_name=base_name, peft=f"{name}/peft", gguf=f"{name}/adapter.gguf",
            rank=int(config["r"]), alpha=float(config["lora_alpha"]), targets=sorted(config["target_modules"]),
            sha256={rel: sha256_file(root / rel) for rel in rels}, recipe=recipe, evaluation=evaluation)
        manifest = self._read(root)
        manifest.adapters[name] = entry
        self._write(root, manifest)
        return entry

    def remove(self, name: str) -> bool:
        root = self.default_root
        manifest = self._read(root)
        if manifest.adapters.pop(name, None) is None:
            return False
        self._write(root, manifest)
        shutil.rmtree(root / name, ignore_errors=True)
        return True

    # -- manifest files

    def _read(self, root: Path) -> Manifest:
        path = root / MANIFEST
        if not path.exists():
            return Manifest()
        try:
            return Manifest.model_validate_json(path.read_bytes())
        except FileNotFoundError:
            return Manifest()
        except (OSError, ValueError, RecursionError) as exc:  # ValueError: bad UTF-8 or JSON (ValidationError too)
            # This runs on every npc.say: an error escaping here once took every NPC down. The root's adapters are
            # unavailable until the manifest is fixed or re-registered; the bad file is kept aside for a human.
            if path not in self._reported:
                # the package's own manifest is part of the install, not user data: reported, never moved
                shipped = root == SHIPPED_ADAPTERS
                if shipped:
                    log.error("the shipped adapter manifest %s does not parse: %s", path, str(exc)[:300])
                if shipped or move_aside(path, exc) is None:
                    self._reported.add(path)  # e.g. a read-only folder: log it once, not on every request
                if self.on_corrupt is not None:
                    self.on_corrupt(path)
            return Manifest()

    def _write(self, root: Path, manifest: Manifest) -> None:
        atomic_write_text(_mkdir(root) / MANIFEST, manifest.model_dump_json(indent=2))


def _confined(root: Path, rel: str) -> Path | None:
    """root/rel with symlinks resolved, or None when that is not inside root."""
    target = (root / rel).resolve()
    return target if target.is_relative_to(root) else None


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path
