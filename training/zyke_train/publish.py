"""``zyke-train publish``: put a registered adapter on the Hugging Face Hub, with a model card.

What is uploaded is built in a folder first (``--dry-run`` stops there, so it can be checked offline):
the PEFT files (for the transformers backend), the GGUF twin (for llama.cpp), ``zyke_adapter.json`` (the
registry entry: base fingerprint, rank, targets, sha256 of each file, so a downloader can verify the files
and that they fit its base) and a generated ``README.md`` card. The files are checked against the
registry's sha256 before anything is written: a file changed since registration is not published.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from zyke_models.adapters import AdapterEntry
from zyke_models.embedded import sha256_file
from zyke_models.errors import HubError
from zyke_models.hub import upload_folder

from .adapters import default_registry

#: Evaluation reports looked for in the adapter's folder when --eval-report is not given.
EVAL_NAMES = ("eval_report.json", "eval.json")


class PublishError(Exception):
    """Nothing to publish, files changed since registration, no token, or the Hub unreachable."""


def _find_adapter(name: str) -> tuple[Path, AdapterEntry]:
    found = default_registry().entries().get(name)
    if found is None:
        raise PublishError(f"no adapter named {name!r} is registered (zyke-train adapters lists them)")
    return found


def build_folder(name: str, out: Path, repo_id: str, eval_report: Path | None = None,
                 base_model: str | None = None) -> list[Path]:
    """Write the upload folder for adapter ``name`` into ``out`` and return its files."""
    root, entry = _find_adapter(name)
    for rel, digest in entry.sha256.items():
        path = root / rel
        if not path.is_file() or sha256_file(path) != digest:
            raise PublishError(f"{path} is missing or changed since it was registered; re-register the adapter")
    if eval_report is None:
        eval_report = next((root / name / n for n in EVAL_NAMES if (root / name / n).is_file()), None)
    report = json.loads(eval_report.read_text(encoding="utf-8")) if eval_report else None

    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    files: dict[str, str] = {}
    if entry.peft:
        for f in sorted((root / entry.peft).iterdir()):
            if f.is_file():
                shutil.copy2(f, out / f.name)
                files[f.name] = sha256_file(out / f.name)
    if entry.gguf:
        gguf_name = f"{name}.gguf"
        shutil.copy2(root / entry.gguf, out / gguf_name)
        files[gguf_name] = sha256_file(out / gguf_name)
    meta = {"name": entry.name, "base": entry.base, "base_name": entry.base_name, "rank": entry.rank,
            "alpha": entry.alpha, "targets": entry.targets, "files": files}
    (out / "zyke_adapter.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    if report is not None:
        (out / "eval_report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    (out / "README.md").write_text(model_card(entry, repo_id, files, report, base_model), encoding="utf-8")
    return sorted(p for p in out.iterdir() if p.is_file())


def model_card(entry: AdapterEntry, repo_id: str, files: dict[str, str], report: Any | None,
               base_model: str | None) -> str:
    """A Hub model card: YAML front matter (library, tags, base model when known) and what a user needs to
    load the adapter safely: the exact base it was trained on, its shape, and its evaluation."""
    front = ["---", "library_name: peft", "tags:", "  - zyke", "  - lora", "  - gguf", "  - npc"]
    if base_model:
        front.append(f"base_model: {base_model}")
    front.append("---")
    lines = [
        *front, "",
        f"# {entry.name}", "",
        "A LoRA adapter for NPC dialogue, made with Zyke `zyke-train` "
        "(PEFT files for transformers, GGUF twin for llama.cpp).", "",
        "## Base model", "",
        f"- fingerprint: `{entry.base}`" + (f" ({entry.base_name})" if entry.base_name else ""),
        "- Zyke refuses to load an adapter on any base whose fingerprint differs: an adapter trained on one "
        "model produces garbage on another.", "",
        "## Adapter", "",
        f"- rank: {entry.rank}, alpha: {entry.alpha:g}",
        f"- target modules: {', '.join(entry.targets)}", "",
        "| file | sha256 |", "| --- | --- |",
        *[f"| `{f}` | `{d}` |" for f, d in files.items()], "",
        "## Evaluation", "",
    ]
    if report is None:
        lines.append("No evaluation report was published with this adapter.")
    else:
        scalars = {k: v for k, v in report.items() if isinstance(v, int | float | str)} if isinstance(
            report, dict) else {}
        if scalars:
            lines += ["| metric | value |", "| --- | --- |", *[f"| {k} | {v} |" for k, v in scalars.items()], ""]
        lines.append("The full report is in `eval_report.json`.")
    lines += ["", "## Use", "", "```bash",
              f"huggingface-cli download {repo_id} --local-dir {entry.name}",
              f"zyke-train register {entry.name} {entry.name}", "```", ""]
    return "\n".join(lines)


def upload(folder: Path, repo_id: str, token: str | None = None, private: bool = False) -> str:
    """Create the repo if needed and upload the folder (through ``zyke_models.hub``, as ``train --hf-push`` does);
    returns the commit URL."""
    try:
        return upload_folder(folder, repo_id, f"Upload Zyke adapter {folder.name}", token=token,
                             private=private).commit_url
    except HubError as exc:
        if exc.failure == "no_package":
            raise PublishError("publishing needs huggingface_hub: pip install 'zyke[train]'") from exc
        if exc.failure == "no_token":
            raise PublishError(exc.message) from exc
        raise PublishError(f"{exc.message} (offline, or the token cannot write there?)") from exc
