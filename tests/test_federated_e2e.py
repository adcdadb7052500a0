"""End to end on loopback: a trainer subprocess, real `zyke-train contribute` workers training real LoRA
steps, rounds aggregated and registered; and the aggregated adapter of the embedded model served by name by
a real daemon.

The two-round, two-worker run uses a tiny random Gemma 3 (the mechanics, not the quality, are under test);
the daemon test uses the real embedded checkpoint with the smallest settings that still train (r=4, one
step, one short example), because llama.cpp can only serve an adapter of the model it runs.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from daemon_proc import DaemonProcess
from federated_proc import TOKENS, TrainerProcess, all_blocks, tiny_base, write_blocks, write_data
from safetensors.numpy import load
from test_daemon_e2e import connect, define

pytestmark = pytest.mark.slow
DATA = Path(__file__).resolve().parents[1] / "training" / "data" / "npc_train.jsonl"


def _contribute(trainer: TrainerProcess, token: str, num_tasks: int, base: Path | None,
                blocks_dir: Path | None = None) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-m", "zyke_train", "contribute", "--trainer-url", trainer.url, "--num-tasks",
           str(num_tasks), "--token", token]
    if base is not None:
        cmd += ["--base", str(base)]
    if blocks_dir is not None:
        cmd += ["--blocks-dir", str(blocks_dir)]
    return subprocess.Popen(cmd, env=trainer.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_two_workers_two_rounds_on_a_tiny_model(tmp_path: Path) -> None:
    base = tiny_base(tmp_path / "tiny")
    trainer = TrainerProcess(tmp_path / "home", base, write_data(tmp_path / "data.jsonl"),
                             args=["--num-tasks-per-round", "2", "--local-steps", "2", "--examples-per-task", "2",
                                   "--max-seq-len", "48", "--lr", "0.05", "--tick-interval-sec", "0.2",
                                   "--max-staleness", "2", "--delta-norm-max", "100"]).start()
    try:
        w0 = load(trainer.get("/get_lora_weights")[1])
        workers = [_contribute(trainer, token, 2, base) for token in TOKENS]
        outputs = [w.communicate(timeout=400)[0] for w in workers]
        for w, out in zip(workers, outputs, strict=True):
            assert w.returncode == 0, out
            assert "done: 2/2 updates accepted" in out and "[1/2] task" in out and "loss" in out
        status = trainer.wait_version(2, timeout=30)
        assert status["accepted_total"] == 4 and status["pending"] == 0 and status["rejected"] == {}
        w2 = load(trainer.get("/get_lora_weights")[1])
        for key in w0:
            if "lora_A" in key:
                assert np.array_equal(w0[key], w2[key])  # FFA: A is frozen everywhere
        assert any(np.abs(w2[k]).max() > 0 for k in w2 if "lora_B" in k)  # B learned something
        rounds = [json.loads((trainer.home / "ckpt" / "checkpoints" / f"v{v:06d}" / "round.json").read_text())
                  for v in (1, 2)]
        assert [len(r["made_from"]) for r in rounds] == [2, 2]
        assert len({m["task_id"] for r in rounds for m in r["made_from"]}) == 4  # each update counted once
        assert len({m["worker"] for r in rounds for m in r["made_from"]}) == 2  # both workers contributed
    finally:
        trainer.stop(signal.SIGKILL)


def _tiny_blocks(base: Path, path: Path) -> Path:
    """Blocks in the tiny model's vocabulary (its tokenizer is the embedded model's), 16 tokens each."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(base))
    return write_blocks(path, shards=(3, 4), block_size=16, vocab_size=len(tok), eos_token_id=tok.eos_token_id)


def test_a_worker_trains_on_exactly_the_referenced_blocks(tmp_path: Path) -> None:
    import shutil

    from safetensors.numpy import save
    from zyke_train.federated.server import Trainer, TrainerConfig
    from zyke_train.federated.worker import BlocksUnavailable, LocalModel, train_task
    from zyke_train.train_data import Tokenized

    base = tiny_base(tmp_path / "tiny")
    blocks = _tiny_blocks(base, tmp_path / "blocks")
    trainer = Trainer(TrainerConfig(checkpoint_dir=tmp_path / "ckpt", base=base, data=None, tokens=list(TOKENS),
                                    blocks=blocks, blocks_per_task=3, local_steps=1, lr=0.05, max_seq_len=48))
    worker = trainer.worker_of(f"Bearer {TOKENS[0]}")
    trainer.new_task(worker)
    task = trainer.new_task(worker).model_dump()  # the second slice: blocks 3, 4, 5 of shard 1
    local = LocalModel(base, task["lora"])
    local.load(trainer.store.adapter)
    before = local.b_state()
    copy = Path(shutil.copytree(blocks, tmp_path / "worker-copy"))  # the worker's own copy of the folder
    trained: list[Tokenized] = []
    metrics = train_task(local, task, batch_size=2, blocks_dir=copy, on_batch=trained.extend)
    expected = all_blocks(blocks)
    assert {t.id for t in trained} == {f"blocks-00001.safetensors:{i}" for i in (3, 4, 5)}
    for item in trained:  # one window per block (16 tokens <= max_seq_len): the window is the whole block
        np.testing.assert_array_equal(item.prompt + item.completion, expected[int(item.id.rsplit(":", 1)[1])])
    assert metrics["num_samples"] == 3 and metrics["steps"] == 2  # one step was too few to cover 3 blocks
    after = local.b_state()
    assert any(np.abs(after[k] - before[k]).max() > 0 for k in after)
    delta = {k: (after[k] - before[k]).astype(np.float32) for k in after}
    verdict = trainer.submit(worker, task["task_id"], 0, dict(metrics), save(delta))
    assert verdict.status == "accepted"

    raw = bytearray((copy / "blocks-00001.safetensors").read_bytes())
    raw[-1] ^= 0x01
    (copy / "blocks-00001.safetensors").write_bytes(bytes(raw))
    trained.clear()
    with pytest.raises(BlocksUnavailable, match="sha256"):
        train_task(local, task, blocks_dir=copy, on_batch=trained.extend)
    assert trained == []  # refused before a single step, nothing else trained instead


def test_a_worker_contributes_a_blocks_task_over_loopback(tmp_path: Path) -> None:
    import shutil

    base = tiny_base(tmp_path / "tiny")
    blocks = _tiny_blocks(base, tmp_path / "blocks")
    trainer = TrainerProcess(tmp_path / "home", base, None,
                             args=["--blocks", str(blocks), "--blocks-per-task", "3", "--num-tasks-per-round", "1",
                                   "--local-steps", "1", "--max-seq-len", "48", "--lr", "0.05",
                                   "--tick-interval-sec", "0.2", "--delta-norm-max", "100"]).start()
    try:
        copy = Path(shutil.copytree(blocks, tmp_path / "worker-copy"))
        worker = _contribute(trainer, TOKENS[0], 1, base, copy)
        out = worker.communicate(timeout=400)[0]
        assert worker.returncode == 0, out
        assert "3 blocks" in out and "done: 1/1 updates accepted" in out
        status = trainer.wait_version(1, timeout=30)
        assert status["accepted_total"] == 1 and status["rejected"] == {}
        made_from = json.loads((trainer.home / "ckpt" / "checkpoints" / "v000001" / "round.json").read_text())
        assert [m["num_samples"] for m in made_from["made_from"]] == [3]
    finally:
        trainer.stop(signal.SIGKILL)


def test_the_daemon_serves_the_aggregated_adapter_of_the_embedded_model(tmp_path: Path) -> None:
    from zyke_models.hf_checkpoint import embedded_hf_checkpoint

    home = tmp_path / "home"
    trainer = TrainerProcess(home, embedded_hf_checkpoint(), DATA,
                             args=["--num-tasks-per-round", "1", "--local-steps", "1", "--examples-per-task", "1",
                                   "--max-seq-len", "64", "--rank", "4", "--lr", "0.01", "--tick-interval-sec", "0.2",
                                   "--delta-norm-max", "100", "--adapter-name", "shared-npc"]).start(timeout=120)
    try:
        worker = _contribute(trainer, TOKENS[0], 1, None)
        out = worker.communicate(timeout=500)[0]
        assert worker.returncode == 0, out
        status = trainer.wait_version(1, timeout=60)
        assert status["registered_version"] == 1
    finally:
        trainer.stop(signal.SIGKILL)
    daemon = DaemonProcess(home).start()  # same ZYKE_DATA_DIR: the trainer registered into its adapter root
    try:
        npc = {"id": "mira", "name": "Mira", "persona": "A cheerful innkeeper.", "actions": ["none", "serve_drink"],
               "emotions": ["happy", "annoyed"], "adapter": "shared-npc"}

        async def main() -> None:
            conn = await connect(daemon, game="federated")
            [listing] = await conn.request({"v": 1, "type": "adapter.list", "id": "l"})
            assert "shared-npc" in {a["name"] for a in listing["adapters"]}
            await define(conn, npc)
            frames = await conn.request({"v": 1, "type": "npc.say", "id": "s", "npc": "mira",
                                         "input": "A room for the night?", "options": {"max_tokens": 16}})
            assert frames[-1]["type"] == "reply", frames[-1]
            assert frames[-1].get("adapter") == "shared-npc"
            await conn.ws.close()

        asyncio.run(main())
    finally:
        daemon.stop()
