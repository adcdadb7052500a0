"""Write the Unity package's .meta files (examples/unity_bridge).

Unity imports a package installed from a git URL read-only and cannot write .meta files into it, so
every asset and folder needs a committed one; and their GUIDs must never change, since scenes refer
to scripts by GUID (Samples~/Tavern/Tavern.unity does). Each GUID is therefore uuid5 of the file's
path inside the package: stable, and the same on every machine.

Folders ending in "~" are not imported by Unity and get no .meta; the contents of Samples~ do (Unity
copies a sample into Assets/ with them, keeping the scene's script references), the contents of
Tests~ do not (the UnityEngine stubs there must never be imported). Dot files are skipped.

    python tools/gen_unity_meta.py           # write missing/changed .meta files, remove orphaned ones
    python tools/gen_unity_meta.py --check   # exit 1 listing what is missing, stale or orphaned
"""

from __future__ import annotations

import sys
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "examples" / "unity_bridge"
PACKAGE_NAME = "dev.zyke.npc"
NAMESPACE = uuid.uuid5(uuid.NAMESPACE_DNS, PACKAGE_NAME)
NOT_IMPORTED = {"Tests~"}

_TAIL = "  externalObjects: {}\n  userData: \n  assetBundleName: \n  assetBundleVariant: \n"
_MONO = ("MonoImporter:\n  externalObjects: {}\n  serializedVersion: 2\n  defaultReferences: []\n  executionOrder: 0\n"
         "  icon: {instanceID: 0}\n  userData: \n  assetBundleName: \n  assetBundleVariant: \n")


def guid(rel: str) -> str:
    """The GUID of the asset at ``rel`` (a POSIX path inside the package)."""
    return uuid.uuid5(NAMESPACE, rel).hex


def _importer(path: Path, rel: str) -> str:
    if path.is_dir():
        return "folderAsset: yes\nDefaultImporter:\n" + _TAIL
    if path.suffix == ".cs":
        return _MONO
    if path.suffix == ".asmdef":
        return "AssemblyDefinitionImporter:\n" + _TAIL
    if rel == "package.json":
        return "PackageManifestImporter:\n" + _TAIL
    if path.suffix in {".json", ".md", ".txt", ".xml", ".yaml", ".yml"}:
        return "TextScriptImporter:\n" + _TAIL
    return "DefaultImporter:\n" + _TAIL


def meta_text(path: Path, rel: str) -> str:
    return f"fileFormatVersion: 2\nguid: {guid(rel)}\n" + _importer(path, rel)


def assets(package: Path = PACKAGE) -> list[tuple[Path, str]]:
    """Every path Unity imports, with its package-relative POSIX path."""
    out: list[tuple[Path, str]] = []

    def walk(folder: Path) -> None:
        for child in sorted(folder.iterdir()):
            if child.name.startswith(".") or child.suffix == ".meta":
                continue
            rel = child.relative_to(package).as_posix()
            if child.is_dir():
                if child.name in NOT_IMPORTED:
                    continue
                if not child.name.endswith("~"):
                    out.append((child, rel))
                walk(child)
            else:
                out.append((child, rel))

    walk(package)
    return out


def expected(package: Path = PACKAGE) -> dict[Path, str]:
    """The .meta file each asset needs, and its text."""
    return {path.with_name(path.name + ".meta"): meta_text(path, rel) for path, rel in assets(package)}


def problems(package: Path = PACKAGE) -> list[str]:
    want = expected(package)
    out = []
    for meta, text in want.items():
        rel = meta.relative_to(package).as_posix()
        if not meta.is_file():
            out.append(f"missing {rel}")
        elif meta.read_text(encoding="utf-8") != text:
            out.append(f"stale {rel}")
    for meta in sorted(package.rglob("*.meta")):
        if meta not in want:
            out.append(f"orphaned {meta.relative_to(package).as_posix()}")
    return out


def write(package: Path = PACKAGE) -> list[str]:
    changed = []
    want = expected(package)
    for meta, text in want.items():
        if not meta.is_file() or meta.read_text(encoding="utf-8") != text:
            meta.write_text(text, encoding="utf-8")
            changed.append(meta.relative_to(package).as_posix())
    for meta in sorted(package.rglob("*.meta")):
        if meta not in want:
            meta.unlink()
            changed.append(f"removed {meta.relative_to(package).as_posix()}")
    return changed


def main(argv: list[str]) -> int:
    if "--check" in argv:
        found = problems()
        for line in found:
            print(line, file=sys.stderr)
        if found:
            print("run: python tools/gen_unity_meta.py", file=sys.stderr)
        return 1 if found else 0
    for line in write():
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
