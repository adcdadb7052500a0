"""Which package may import which (docs/ARCHITECTURE.md, "Import rules"), read from the source with ``ast``.

The layering is what keeps the SDK light and the protocol core testable without a socket: a game that
installs ``zyke`` must never pull in a model runtime, and the sans-I/O core must never reach for the event
loop. These rules are cheap to break by accident (one convenient import), so the test command checks them.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {
    "zyke": ROOT / "sdk" / "python" / "zyke",
    "zyke_models": ROOT / "models" / "zyke_models",
    "zyke_daemon": ROOT / "daemon" / "zyke_daemon",
    "zyke_train": ROOT / "training" / "zyke_train",
}
#: package -> top-level modules it must never import, anywhere in it (also inside functions)
FORBIDDEN = {
    # the SDK a game imports: websockets, pydantic, platformdirs and the standard library (and jsonschema in
    # zyke.protocol.validation, the zyke[validate] extra)
    "zyke": {"zyke_models", "zyke_daemon", "zyke_train", "torch", "transformers", "peft", "numpy", "llama_cpp",
             "llguidance"},
    # the model artifacts both the daemon and training import: they import neither, nor the training stack
    "zyke_models": {"zyke_daemon", "zyke_train", "trl", "accelerate", "datasets"},
    # the daemon never needs the training stack
    "zyke_daemon": {"zyke_train", "trl", "accelerate", "datasets"},
}
#: Daemon modules that are only re-exports of ``zyke_models`` (kept for the daemon's own imports): training imports
#: the model artifacts from ``zyke_models``, never through these, nor the modules that moved there.
ARTIFACT_MODULES = {"zyke_daemon.adapters", "zyke_daemon.errors", "zyke_daemon.config", "zyke_daemon.embedded",
                    "zyke_daemon.hf_checkpoint", "zyke_daemon.lora_gguf", "zyke_daemon.files"}
#: What training may still import from the daemon: the daemon itself, run for evaluation (its backends). Reply
#: validation lives with the protocol (``zyke.protocol.validation``), so it is no daemon import.
TRAIN_MAY_IMPORT_FROM_DAEMON = {"zyke_daemon.backends.base", "zyke_daemon.backends.hf", "zyke_daemon.backends.llamacpp"}
#: sans-I/O modules: they keep protocol state and decide, the shells do the I/O
SANS_IO = [PACKAGES["zyke"] / "protocol", PACKAGES["zyke_daemon"] / "core.py", PACKAGES["zyke_daemon"] / "scheduler.py"]
IO_MODULES = {"asyncio", "websockets", "socket", "selectors", "http", "urllib"}


def imported_roots(path: Path) -> set[str]:
    """Top-level names of every module ``path`` imports (relative imports excluded)."""
    roots: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


def sources(target: Path) -> list[Path]:
    return sorted(target.rglob("*.py")) if target.is_dir() else [target]


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_stay_in_their_layer(package: str) -> None:
    broken = {str(path.relative_to(ROOT)): sorted(imported_roots(path) & FORBIDDEN[package])
              for path in sources(PACKAGES[package])}
    assert {k: v for k, v in broken.items() if v} == {}


def imported_modules(path: Path) -> set[str]:
    """Full dotted names of the modules ``path`` imports absolutely (``from a.b import c`` gives ``a.b``)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def test_training_imports_model_artifacts_from_zyke_models() -> None:
    daemon_imports = {str(path.relative_to(ROOT)): sorted(m for m in imported_modules(path)
                                                          if m == "zyke_daemon" or m.startswith("zyke_daemon."))
                      for path in sources(PACKAGES["zyke_train"])}
    artifacts = {k: [m for m in v if m in ARTIFACT_MODULES or m == "zyke_daemon"] for k, v in daemon_imports.items()}
    assert {k: v for k, v in artifacts.items() if v} == {}
    others = {k: [m for m in v if m not in TRAIN_MAY_IMPORT_FROM_DAEMON] for k, v in daemon_imports.items()}
    assert {k: v for k, v in others.items() if v} == {}


def test_sans_io_core_does_no_io() -> None:
    broken = {str(path.relative_to(ROOT)): sorted(imported_roots(path) & IO_MODULES)
              for target in SANS_IO for path in sources(target)}
    assert {k: v for k, v in broken.items() if v} == {}


def test_the_checker_sees_imports_inside_functions(tmp_path: Path) -> None:
    sample = tmp_path / "m.py"
    sample.write_text("import json\n\ndef f():\n    from torch import nn\n    import asyncio.events\n")
    assert imported_roots(sample) == {"json", "torch", "asyncio"}
    assert imported_modules(sample) == {"json", "torch", "asyncio.events"}


#: Optional dependencies of the SDK: only the named modules may import them, so ``pip install zyke`` stays enough
#: for ``import zyke`` and everything it imports.
SDK_OPTIONAL = {"jsonschema": {"protocol/validation.py"}, "referencing": {"protocol/validation.py"}}


def test_sdk_optional_dependencies_stay_in_their_module() -> None:
    users = {name: {str(path.relative_to(PACKAGES["zyke"])) for path in sources(PACKAGES["zyke"])
                    if name in imported_roots(path)} for name in SDK_OPTIONAL}
    assert users == SDK_OPTIONAL
    # and nothing imports that module on the way in: the base install never loads jsonschema
    importers = [str(path.relative_to(ROOT)) for path in sources(PACKAGES["zyke"])
                 if "zyke.protocol.validation" in imported_modules(path)
                 or (path.parent.name == "protocol" and "validation" in
                     {n.module for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.ImportFrom)
                      and n.level == 1})]
    assert importers == []
