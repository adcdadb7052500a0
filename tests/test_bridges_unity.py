"""The Unity bridge (examples/unity_bridge): package metadata, and its C# core built with Mono's mcs
and run under mono against a real daemon (define, say, stream, typed errors, cancel, state, reconnect).
The MonoBehaviour layer is type-checked against small UnityEngine stubs (Tests~/UnityStubs)."""

from __future__ import annotations

import json
import shutil
import subprocess
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


def _run(exe: Path, mode: str, url: str = "ws://unused", token: str = "unused") -> str:
    result = subprocess.run([MONO, "--debug", str(exe), mode, url, token], capture_output=True, text=True, timeout=300)
    print(result.stdout)
    assert result.returncode == 0, f"{result.stdout[-4000:]}\n{result.stderr[-2000:]}"
    assert "PASSED" in result.stdout
    return result.stdout


def test_json_reader_writer(e2e_exe: Path) -> None:
    _run(e2e_exe, "json")


def test_csharp_client_end_to_end(e2e_exe: Path, daemon: DaemonProcess) -> None:
    from zyke_daemon.validation import validator

    out = _run(e2e_exe, "e2e", daemon.url, daemon.token)
    for needle in ["unknown_npc", "deltas concatenate to say", "ZykeAuthException", "ZykeCancelledException",
                   "npc.state.set restored", "npc.define with described actions", "allowed_actions [none]",
                   "undeclared allowed action: code unknown_action"]:
        assert needle in out
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


def test_csharp_client_reconnects_after_daemon_restart(e2e_exe: Path, fresh_daemon: DaemonProcess) -> None:
    proc = subprocess.Popen([MONO, "--debug", str(e2e_exe), "reconnect", fresh_daemon.url, fresh_daemon.token],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("READY_FOR_RESTART"):
                break
        else:
            pytest.fail("".join(lines))
        fresh_daemon.restart()
        proc.stdin.write("\n")
        proc.stdin.flush()
        rest, _ = proc.communicate(timeout=240)
        out = "".join(lines) + rest
        print(out)
        assert proc.returncode == 0, out
        assert "reconnected" in out and "after restart: action" in out
    finally:
        if proc.poll() is None:
            proc.kill()
