"""The adapter registry and LoRA hot swap, on the real llama.cpp backend and a live daemon."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from daemon_proc import DaemonProcess
from lora_fixtures import make_random_lora
from test_daemon_e2e import Conn, connect, define
from zyke import AdapterRejected, Client, UnknownAdapter
from zyke.prompt_format import render_prompt, reply_schema
from zyke.protocol import ErrorCode, NpcSpec
from zyke_daemon.adapters import AdapterRegistry
from zyke_daemon.backends.base import GenerationRequest
from zyke_daemon.backends.llamacpp import LlamaCppBackend
from zyke_daemon.errors import DaemonError
from zyke_models.embedded import embedded_model_path

NPC = NpcSpec(id="mira", name="Mira", persona="A cheerful innkeeper in a mountain village.",
              actions=["none", "serve_drink", "rent_room"], emotions=["happy", "annoyed"])


@pytest.fixture(scope="module")
def base() -> tuple[Path, str]:
    path, sha = embedded_model_path()
    return path, f"sha256:{sha}"


@pytest.fixture
def registry(tmp_path: Path, base: tuple[Path, str]) -> AdapterRegistry:
    reg = AdapterRegistry([tmp_path / "adapters"])
    reg.register("calm", make_random_lora(tmp_path / "src-calm", base[0], seed=1), base[1])
    return reg


def test_register_writes_both_twins_with_hashes(registry: AdapterRegistry, base: tuple[Path, str]) -> None:
    root, entry = registry.entries()["calm"]
    assert (entry.rank, entry.alpha, entry.targets) == (4, 8.0, ["q_proj", "v_proj"])
    assert set(entry.sha256) == {"calm/peft/adapter_config.json", "calm/peft/adapter_model.safetensors",
                                 "calm/adapter.gguf"}
    assert registry.resolve("calm", base[1], "gguf") == root / "calm" / "adapter.gguf"
    assert registry.resolve("calm", base[1], "peft") == root / "calm" / "peft"
    [info] = registry.infos(loaded=["calm"])
    assert info.loaded and info.base == base[1]


def test_resolve_refuses_what_it_should(registry: AdapterRegistry, base: tuple[Path, str], tmp_path: Path) -> None:
    def code(name: str, fingerprint: str = base[1]) -> ErrorCode:
        with pytest.raises(DaemonError) as err:
            registry.resolve(name, fingerprint, "gguf")
        return err.value.code

    assert code("nope") == ErrorCode.UNKNOWN_ADAPTER
    assert code("calm", "sha256:" + "0" * 64) == ErrorCode.ADAPTER_REJECTED  # trained on another base
    gguf = registry.default_root / "calm" / "adapter.gguf"
    gguf.write_bytes(gguf.read_bytes() + b"tampered")
    assert code("calm") == ErrorCode.ADAPTER_REJECTED  # sha256 no longer matches
    # a hand-edited manifest cannot point outside its directory (the protocol must not read files)
    manifest = registry.default_root / "manifest.json"
    data = json.loads(manifest.read_text())
    data["adapters"]["calm"]["gguf"] = "../../etc/passwd"
    manifest.write_text(json.dumps(data))
    with pytest.raises(DaemonError, match="leaves the adapter directory"):
        registry.resolve("calm", base[1], "gguf")


@pytest.mark.slow
def test_llamacpp_hot_swap_changes_output_and_unload_restores(tmp_path: Path, base: tuple[Path, str]) -> None:
    reg = AdapterRegistry([tmp_path / "adapters"])
    for name, seed in [("a", 1), ("b", 2)]:
        reg.register(name, make_random_lora(tmp_path / f"src-{name}", base[0], seed=seed), base[1])
    backend = LlamaCppBackend(base[0], n_ctx=1024, n_threads=2, max_loaded_adapters=1)
    try:
        prompt = render_prompt(NPC, [], "Do you have a room for tonight?")

        def run(adapter: str | None) -> str:
            req = GenerationRequest(prompt=prompt, schema=reply_schema(NPC), max_tokens=24, adapter=adapter)
            return backend.generate(req, lambda _: True).text

        plain = run(None)
        backend.load_adapter("a", reg.resolve("a", base[1], "gguf"))
        with_a = run("a")
        backend.load_adapter("b", reg.resolve("b", base[1], "gguf"))  # cap 1: "a" is freed (LRU)
        assert backend.loaded_adapters == ["b"]
        with_b = run("b")
        assert len({plain, with_a, with_b}) == 3
        assert run(None) == plain  # the base again, exactly (and the prefix cache did not leak across)
        backend.unload_adapter("b")
        assert backend.loaded_adapters == [] and run(None) == plain
    finally:
        backend.close()


@pytest.fixture
def adapter_daemon(tmp_path: Path, base: tuple[Path, str]) -> Iterator[DaemonProcess]:
    """A daemon whose data dir has adapters 'a' and 'b', registered through the real zyke-train CLI; the shipped
    default adapter is switched off so that an NPC naming no adapter runs on the bare base model."""
    proc = DaemonProcess(tmp_path / "home", extra_args=["--default-adapter", "none"])
    for name, seed in [("a", 1), ("b", 2)]:
        src = make_random_lora(tmp_path / f"src-{name}", base[0], seed=seed)
        out = subprocess.run([sys.executable, "-m", "zyke_train", "register", name, str(src)], env=proc.env,
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        assert f"registered {name}" in out.stdout
    proc.start()
    yield proc
    proc.stop()


def _npc(npc_id: str, adapter: str | None) -> dict[str, Any]:
    # same display name and persona for every id, so the prompts are identical apart from the adapter
    return {"id": npc_id, "name": "Mira", "persona": NPC.persona, "actions": NPC.actions, "emotions": NPC.emotions,
            "adapter": adapter}


@pytest.mark.slow
def test_interleaved_adapters_on_a_live_daemon_never_mix(adapter_daemon: DaemonProcess) -> None:
    line = "Do you have a room for tonight?"

    async def say(conn: Conn, npc_id: str, rid: str) -> dict[str, Any]:
        frames = await conn.request({"v": 1, "type": "npc.say", "id": rid, "npc": npc_id, "input": line,
                                     "options": {"max_tokens": 24}})
        assert frames[-1]["type"] == "reply", frames[-1]
        return frames[-1]

    async def main() -> None:
        c1, c2 = await connect(adapter_daemon, game="mix"), await connect(adapter_daemon, game="mix")
        [listing] = await c1.request({"v": 1, "type": "adapter.list", "id": "l"})
        assert {a["name"] for a in listing["adapters"]} == {"a", "b", "npc-default"}  # + the shipped one
        solo: dict[str | None, dict[str, Any]] = {}
        for adapter in ["a", None, "b"]:
            await define(c1, _npc(f"solo-{adapter}", adapter))
            solo[adapter] = (await say(c1, f"solo-{adapter}", f"solo-{adapter}"))["reply"]
        assert len({json.dumps(r) for r in solo.values()}) == 3, "the adapters do not change the output"
        order = ["a", None, "b", "b", None, "a"]
        for i, adapter in enumerate(order):
            await define(c1, _npc(f"mix-{i}", adapter))
        replies = await asyncio.gather(*(say(c1 if i % 2 else c2, f"mix-{i}", f"mix-{i}")
                                         for i, _ in enumerate(order)))
        for adapter, frame in zip(order, replies, strict=True):
            assert frame.get("adapter") == adapter
            assert frame["reply"] == solo[adapter]
        # adapter.unload frees it; the next line that names it loads it again
        [after] = await c1.request({"v": 1, "type": "adapter.unload", "id": "u", "name": "a"})
        assert not next(x for x in after["adapters"] if x["name"] == "a")["loaded"]
        [loaded] = await c1.request({"v": 1, "type": "adapter.load", "id": "ld", "name": "a"})
        assert next(x for x in loaded["adapters"] if x["name"] == "a")["loaded"]
        [err] = await c1.request({"v": 1, "type": "adapter.load", "id": "bad", "name": "zzz"})
        assert err["code"] == "unknown_adapter"
        await c1.ws.close()
        await c2.ws.close()

    asyncio.run(main())


@pytest.mark.slow
def test_a_tampered_adapter_is_rejected_by_the_daemon(adapter_daemon: DaemonProcess) -> None:
    gguf = adapter_daemon.home / "data" / "adapters" / "b" / "adapter.gguf"
    gguf.write_bytes(gguf.read_bytes()[:-16])

    async def main() -> None:
        conn = await connect(adapter_daemon, game="tamper")
        await define(conn, _npc("t", None))
        frames = await conn.request({"v": 1, "type": "npc.say", "id": "s", "npc": "t", "input": "Hi",
                                     "adapter": "b", "options": {"max_tokens": 8}})
        assert frames[-1]["code"] == "adapter_rejected" and "sha256" in frames[-1]["message"]
        ok = await conn.request({"v": 1, "type": "npc.say", "id": "s2", "npc": "t", "input": "Hi",
                                 "options": {"max_tokens": 8}})
        assert ok[-1]["type"] == "reply"
        await conn.ws.close()

    asyncio.run(main())
    # the same through the SDK: typed errors, and explicit load/unload
    with Client(adapter_daemon.url, adapter_daemon.token, game="tamper") as client:
        npc = client.npc("t", NPC.persona, NPC.actions, NPC.emotions)
        with pytest.raises(AdapterRejected):
            npc.say("Hi", adapter="b", max_tokens=8)
        with pytest.raises(UnknownAdapter):
            client.load_adapter("zzz")
        assert next(a for a in client.load_adapter("a") if a.name == "a").loaded
        assert not next(a for a in client.unload_adapter("a") if a.name == "a").loaded


def test_evaluate_checks_an_adapter_against_the_base_it_runs_on(tmp_path: Path) -> None:
    """`zyke-train evaluate --model DIR --perplexity ...` looks adapters up by the fingerprint of DIR, not of the
    embedded base (it once always used the embedded one, refusing every adapter trained on another base)."""
    import numpy as np
    from safetensors.numpy import save_file
    from zyke_models.hf_checkpoint import base_fingerprint
    from zyke_train.evaluate import EvalError, peft_dir_for

    other = tmp_path / "other-base"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "gemma3_text", "hidden_size": 8}))
    save_file({"w": np.ones((2, 2), dtype=np.float32)}, str(other / "model.safetensors"))
    registry = AdapterRegistry([tmp_path / "adapters"])
    lora = make_random_lora(tmp_path / "lora", embedded_model_path()[0], seed=3)
    registry.register("on-other", lora, base_fingerprint(other))

    found = peft_dir_for("on-other", registry, model=str(other))
    assert (found / "adapter_model.safetensors").is_file()
    with pytest.raises(EvalError, match="on-other"):
        peft_dir_for("on-other", registry)  # the embedded base is not the one it was trained on


def test_registering_a_new_version_replaces_the_old_and_leaves_nothing_behind(tmp_path: Path) -> None:
    """The shared trainer re-registers its adapter every round: the new files replace the old ones whole, and the
    old version (moved aside before it is deleted, so the name never points at nothing) leaves no folder."""
    path, sha = embedded_model_path()
    registry = AdapterRegistry([tmp_path / "adapters"])
    first = registry.register("shared", make_random_lora(tmp_path / "v1", path, seed=1), f"sha256:{sha}")
    second = registry.register("shared", make_random_lora(tmp_path / "v2", path, seed=2), f"sha256:{sha}")
    assert first.sha256 != second.sha256
    resolved = registry.resolve("shared", f"sha256:{sha}", "gguf")
    assert resolved.is_file() and resolved.parent == tmp_path / "adapters" / "shared"
    assert sorted(p.name for p in (tmp_path / "adapters").iterdir()) == ["manifest.json", "shared"]
