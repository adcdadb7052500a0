"""The Unity bridge (examples/unity_bridge): package metadata, .meta files and the sample scene, and its
C# core built with Mono's mcs and run under mono against a real daemon (define, say, stream, typed errors,
cancel, state, reconnect, define before the daemon is up, unserialisable state). The MonoBehaviour layer is
type-checked against small UnityEngine stubs (Tests~/UnityStubs)."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from daemon_proc import DaemonProcess

BRIDGE = Path(__file__).resolve().parent.parent / "examples" / "unity_bridge"
CORE = sorted((BRIDGE / "Runtime" / "Core").glob("*.cs"))
MCS = shutil.which("mcs")
MONO = shutil.which("mono")
needs_mono = pytest.mark.skipif(not (MCS and MONO), reason="mcs/mono not installed (apt-get install mono-devel)")


def test_package_json() -> None:
    package = json.loads((BRIDGE / "package.json").read_text())
    assert package["name"] == "dev.zyke.npc"
    assert package["version"]
    for sample in package["samples"]:
        assert (BRIDGE / sample["path"]).is_dir()
    assert (BRIDGE / "README.md").is_file()


def test_core_asmdef_has_no_engine_dependency() -> None:
    core = json.loads((BRIDGE / "Runtime" / "Core" / "Zyke.Core.asmdef").read_text())
    assert core["noEngineReferences"] is True and core["references"] == []
    unity = json.loads((BRIDGE / "Runtime" / "Unity" / "Zyke.Unity.asmdef").read_text())
    assert "Zyke.Core" in unity["references"]
    for path in CORE:
        assert "UnityEngine" not in path.read_text(), f"{path.name} must not use UnityEngine"


def _mcs(out: Path, sources: list[Path], *extra: str) -> None:
    cmd = [MCS, "-langversion:7", "-warnaserror+", "-nowarn:1591", f"-out:{out}", "-r:System.Net.Http.dll",
           *extra, *map(str, sources)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"mcs failed:\n{result.stdout}\n{result.stderr}"


@pytest.fixture(scope="module")
def e2e_exe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not (MCS and MONO):
        pytest.skip("mcs/mono not installed (apt-get install mono-devel)")
    out = tmp_path_factory.mktemp("unity-build") / "e2e.exe"
    _mcs(out, [*CORE, BRIDGE / "Tests~" / "E2E" / "Program.cs"])
    return out


@needs_mono
def test_unity_layer_type_checks_against_stubs(tmp_path: Path) -> None:
    stubs = tmp_path / "UnityEngine.dll"
    _mcs(stubs, [BRIDGE / "Tests~" / "UnityStubs" / "UnityEngine.cs"], "-target:library")
    core = tmp_path / "Zyke.Core.dll"
    _mcs(core, CORE, "-target:library")
    unity = tmp_path / "Zyke.Unity.dll"
    _mcs(unity, sorted((BRIDGE / "Runtime" / "Unity").glob("*.cs")), "-target:library", f"-r:{stubs}", f"-r:{core}")
    _mcs(tmp_path / "Samples.dll", sorted((BRIDGE / "Samples~").rglob("*.cs")), "-target:library",
         f"-r:{stubs}", f"-r:{core}", f"-r:{unity}")


def _meta_tool():
    tool = BRIDGE.parent.parent / "tools" / "gen_unity_meta.py"
    spec = importlib.util.spec_from_file_location("gen_unity_meta", tool)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _imported_paths() -> list[Path]:
    """Every file and folder Unity imports from the package: all but dot files, .meta files, folders
    ending in "~" themselves (Unity skips them) and Tests~ (never imported)."""
    out = []
    for path in sorted(BRIDGE.rglob("*")):
        rel = path.relative_to(BRIDGE)
        if any(part.startswith(".") for part in rel.parts) or path.suffix == ".meta" or rel.parts[0] == "Tests~":
            continue
        if path.is_dir() and path.name.endswith("~"):
            continue
        out.append(path)
    return out


def test_every_asset_and_folder_has_a_meta_file() -> None:
    """Installed from a git URL the package is read-only: Unity imports nothing without committed .meta files."""
    paths = _imported_paths()
    assert any(p.suffix == ".cs" for p in paths) and any(p.is_dir() for p in paths)
    guids: dict[str, Path] = {}
    tool = _meta_tool()
    for path in paths:
        meta = path.with_name(path.name + ".meta")
        assert meta.is_file(), f"{meta.relative_to(BRIDGE)} is missing; run: python tools/gen_unity_meta.py"
        text = meta.read_text(encoding="utf-8")
        m = re.search(r"^guid: ([0-9a-f]{32})$", text, re.M)
        assert text.startswith("fileFormatVersion: 2\n") and m, meta
        assert m.group(1) not in guids, f"{path} and {guids[m.group(1)]} share a GUID"
        guids[m.group(1)] = path
        # Stable: the GUID is derived from the path, so it never changes between checkouts.
        assert m.group(1) == tool.guid(path.relative_to(BRIDGE).as_posix())
        assert ("folderAsset: yes" in text) == path.is_dir(), meta
        if path.suffix == ".cs":
            assert "MonoImporter:" in text, meta
    for meta in BRIDGE.rglob("*.meta"):
        assert meta.with_suffix("") in paths, f"{meta.relative_to(BRIDGE)} belongs to no asset"
    assert tool.problems() == []


def _unity_docs(path: Path) -> dict[int, tuple[int, str, str]]:
    """A .unity file's objects: anchor -> (class id, type name, body)."""
    text = path.read_text(encoding="utf-8")
    assert text.startswith("%YAML 1.1\n%TAG !u! tag:unity3d.com,2011:\n")
    docs = {}
    for m in re.finditer(r"^--- !u!(\d+) &(\d+)\n(\w+):\n((?:(?!--- ).*\n)*)", text, re.M):
        anchor = int(m.group(2))
        assert anchor not in docs, f"anchor {anchor} twice"
        docs[anchor] = (int(m.group(1)), m.group(3), m.group(4))
    assert sum(1 for line in text.splitlines() if line.startswith("--- ")) == len(docs)
    return docs


def test_sample_has_a_scene_with_the_sample_component() -> None:
    import yaml

    package = json.loads((BRIDGE / "package.json").read_text())
    [sample] = package["samples"]
    scenes = sorted((BRIDGE / sample["path"]).glob("*.unity"))
    assert scenes, "the sample has no scene"
    guid_of = {}
    for meta in BRIDGE.rglob("*.cs.meta"):
        guid_of[re.search(r"^guid: (\w+)$", meta.read_text(), re.M).group(1)] = meta.with_suffix("")
    for scene in scenes:
        assert scene.with_name(scene.name + ".meta").is_file()
        docs = _unity_docs(scene)
        bodies = {anchor: yaml.safe_load(body) for anchor, (_, _, body) in docs.items()}
        scripts = {}
        for anchor, (_class_id, kind, body) in docs.items():
            fields = bodies[anchor]
            # every local reference resolves
            for ref in re.findall(r"\{fileID: (\d+)\}", body):
                assert int(ref) == 0 or int(ref) in docs, f"{scene.name}: &{anchor} refers to missing &{ref}"
            if kind == "GameObject":
                for item in fields["m_Component"]:
                    component = item["component"]["fileID"]
                    assert bodies[component]["m_GameObject"] == {"fileID": anchor}
            if kind == "MonoBehaviour":
                script = fields["m_Script"]
                assert script["fileID"] == 11500000 and script["type"] == 3
                path = guid_of.get(script["guid"])
                assert path, f"{scene.name}: &{anchor} uses a script GUID no .cs.meta in the package has"
                scripts[path.stem] = fields
                source = path.read_text(encoding="utf-8")
                for key in fields:
                    if not key.startswith("m_"):
                        assert re.search(rf"public [\w.<>\[\]]+ {key}\b", source), f"{path.name} has no field {key}"
        assert {"TavernDemo", "ZykeNPC"} <= scripts.keys()
        npc = scripts["ZykeNPC"]
        # The scene's NPC is one the daemon accepts as it is.
        from zyke.protocol import NpcSpec

        spec = NpcSpec.model_validate({"id": npc["npcId"], "persona": npc["persona"], "actions": npc["actions"],
                                       "emotions": npc["emotions"], "name": npc["displayName"],
                                       "defaults": {"action": npc["defaultAction"], "emotion": npc["defaultEmotion"]}})
        assert spec.defaults.action in spec.action_names and spec.defaults.emotion in spec.emotion_names


def test_meta_tool_check_flag() -> None:
    ok = subprocess.run([sys.executable, str(BRIDGE.parent.parent / "tools" / "gen_unity_meta.py"), "--check"],
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr


def test_meta_tool_reports_missing_and_orphaned(tmp_path: Path) -> None:
    tool = _meta_tool()
    package = tmp_path / "pkg"
    (package / "Runtime").mkdir(parents=True)
    (package / "Runtime" / "A.cs").write_text("class A {}")
    (package / "Tests~").mkdir()
    (package / "Tests~" / "Stub.cs").write_text("class S {}")
    assert sorted(tool.problems(package)) == ["missing Runtime.meta", "missing Runtime/A.cs.meta"]
    tool.write(package)
    assert tool.problems(package) == [] and not (package / "Tests~" / "Stub.cs.meta").exists()
    (package / "Runtime" / "A.cs").unlink()
    assert tool.problems(package) == ["orphaned Runtime/A.cs.meta"]


def _run(exe: Path, mode: str, url: str = "ws://unused", token: str = "unused") -> str:
    result = subprocess.run([MONO, "--debug", str(exe), mode, url, token], capture_output=True, text=True, timeout=300)
    print(result.stdout)
    assert result.returncode == 0, f"{result.stdout[-4000:]}\n{result.stderr[-2000:]}"
    assert "PASSED" in result.stdout
    return result.stdout


def test_json_reader_writer_spec_repair_and_argument_errors(e2e_exe: Path) -> None:
    out = _run(e2e_exe, "json")
    # Inspector defaults the daemon refused are made valid (NpcSpecRepair, which ZykeNPC uses).
    for needle in ['GameObject name "Brom (1)" -> id brom_1', "repair: empty persona",
                   "default action outside the list", "one warning (persona) and eight errors reported"]:
        assert needle in out, needle
    # An unserialisable state is an argument error at once, not a connection error (no daemon runs here).
    for what in ["NaN", "an object the writer does not know", "a cycle"]:
        assert f"offline: state with {what}: ZykeArgumentException invalid_argument at once" in out, what


def test_csharp_client_end_to_end(e2e_exe: Path, daemon: DaemonProcess) -> None:
    from zyke.protocol.validation import validator

    out = _run(e2e_exe, "e2e", daemon.url, daemon.token)
    for needle in ["unknown_npc", "deltas concatenate to say", "ZykeAuthException", "ZykeCancelledException",
                   "npc.state.set restored", "npc.define with described actions", "allowed_actions [none]",
                   "undeclared allowed action: code unknown_action", "feedback without recording: code not_recording",
                   "connected: state with NaN: ZykeArgumentException invalid_argument",
                   "bad state: the connection stays up", "repaired inspector defaults accepted by the daemon (brom_1)"]:
        assert needle in out, needle
    [allowed] = [json.loads(line.split(" ", 1)[1]) for line in out.splitlines()
                 if line.startswith("ALLOWED_REPLY_JSON ")]
    validator("npc_reply").validate(allowed)
    assert allowed["action"] == "none" and allowed["emotion"] in {"neutral", "wary"}
    replies = [json.loads(line.split(" ", 1)[1]) for line in out.splitlines() if line.startswith("REPLY_JSON ")]
    assert len(replies) == 2
    check = validator("npc_reply")
    for reply in replies:
        check.validate(reply)
        assert reply["action"] in {"none", "trade", "repair", "attack"}
        assert reply["emotion"] in {"neutral", "angry", "pleased"}


def run_e2e_around(e2e_exe: Path, mode: str, daemon: DaemonProcess, ready: str,
                   between: Callable[[], object]) -> str:
    """Run the Mono program in ``mode`` until it prints ``ready``, call ``between`` (stop, start or restart the
    daemon), let the program go on, and return all it printed; fails the test if it exits non-zero."""
    proc = subprocess.Popen([MONO, "--debug", str(e2e_exe), mode, daemon.url, daemon.token],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if line.startswith(ready):
                break
        else:
            pytest.fail("".join(lines))
        between()
        proc.stdin.write("\n")
        proc.stdin.flush()
        rest, _ = proc.communicate(timeout=240)
        out = "".join(lines) + rest
        print(out)
        assert proc.returncode == 0, out
        return out
    finally:
        if proc.poll() is None:
            proc.kill()


def test_csharp_client_reconnects_after_daemon_restart(e2e_exe: Path, fresh_daemon: DaemonProcess) -> None:
    out = run_e2e_around(e2e_exe, "reconnect", fresh_daemon, "READY_FOR_RESTART", fresh_daemon.restart)
    assert "reconnected" in out and "after restart: action" in out


def test_csharp_client_defines_before_the_daemon_is_up(e2e_exe: Path, fresh_daemon: DaemonProcess) -> None:
    """An NPC defined while the daemon is down is remembered and defined on connect: the first say after
    the daemon starts is answered (it used to fail with unknown_npc for good)."""
    fresh_daemon.stop()
    out = run_e2e_around(e2e_exe, "define-before-connect", fresh_daemon, "READY_FOR_START", fresh_daemon.start)
    assert "define while the daemon is down: ZykeConnectionException" in out
    assert "the definition is remembered for the connect" in out
    assert "daemon down: state with NaN: ZykeArgumentException invalid_argument at once" in out
    assert "no unknown_npc: action" in out
