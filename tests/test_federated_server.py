"""The shared trainer over real HTTP on loopback (a subprocess): rejections, rounds, torn uploads, crashes.

The base is a fake checkpoint holding only what the trainer reads (config + targeted weights), and deltas
are made by hand, so these tests need no model and run in seconds.
"""

from __future__ import annotations

import json
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from federated_proc import (
    GOOD_METRICS,
    TOKENS,
    TrainerProcess,
    all_blocks,
    fake_base,
    make_delta,
    write_blocks,
    write_data,
)
from safetensors.numpy import load, save
from zyke_models.embedded import sha256_file
from zyke_train.blocks import BlocksError, read_blocks_by_ref
from zyke_train.federated.server import Trainer, TrainerConfig
from zyke_train.federated.validate import Rejected
from zyke_train.federated.worker import BlocksUnavailable, task_block_rows


@pytest.fixture
def trainer_factory(tmp_path: Path) -> Iterator:  # type: ignore[type-arg]
    started: list[TrainerProcess] = []

    def make(*args: str, **env: str) -> TrainerProcess:
        proc = TrainerProcess(tmp_path / "home", fake_base(tmp_path / "base"), write_data(tmp_path / "data.jsonl"),
                              args=["--examples-per-task", "4", *args], env_extra=env)
        started.append(proc)
        return proc.start()

    yield make
    for proc in started:
        proc.stop(signal.SIGKILL)


def _b(weights: bytes) -> dict[str, np.ndarray]:
    return {k: v for k, v in load(weights).items() if "lora_B" in k}


def test_every_rejection_reason_is_typed_and_counted(trainer_factory) -> None:  # type: ignore[no-untyped-def]
    t = trainer_factory("--num-tasks-per-round", "100", "--max-body-bytes", "4096", "--delta-norm-max", "1.0")
    code, verdict = t.get("/get_task", token=None)
    assert (code, verdict["status"], verdict["reason"]) == (401, "rejected", "missing_token")
    assert t.get("/get_task", token="nope")[1]["reason"] == "unknown_token"
    assert t.get("/get_lora_weights", token="nope")[0] == 403
    status, task = t.get("/get_task")
    assert status == 200 and task["version"] == 0 and len(task["examples"]) == 4

    def reason(delta, token: str | None = TOKENS[0], the_task=task, **metrics) -> str:  # type: ignore[no-untyped-def]
        code, verdict = t.submit(the_task, delta, token, **metrics)
        assert code >= 400 and verdict["status"] == "rejected", verdict
        return verdict["reason"]

    good = make_delta(1)
    some = next(iter(good))
    assert reason(good, token=None) == "missing_token"
    assert reason(good, token="nope") == "unknown_token"
    assert reason(good, token=TOKENS[1]) == "unknown_task"  # task ids are bound to their worker
    assert reason(good, the_task={**task, "task_id": task["task_id"][:-4] + "0000"}) == "unknown_task"
    assert reason({k: v for k, v in good.items() if k != some}) == "wrong_keys"
    assert reason({**good, some: np.zeros((1, 1), np.float32)}) == "wrong_shape"
    assert reason({**good, some: good[some].astype(np.float16)}) == "wrong_dtype"
    nan = good[some].copy()
    nan[0, 0] = np.nan
    assert reason({**good, some: nan}) == "non_finite"
    assert reason(good, train_loss_mean="nan") == "non_finite"
    assert reason(good, grad_norm_mean="inf") == "non_finite"
    assert reason({k: v * 1000 for k, v in good.items()}) == "norm_too_large"
    assert reason(save(good) + b"\0" * 5000) == "too_large"
    assert reason(b"not safetensors at all") == "malformed"
    assert reason(good, num_samples=99) == "bad_metrics"
    assert reason(good, steps="many") == "malformed"  # FastAPI's own validation, answered in the same shape
    assert t.submit(task, good)[1]["status"] == "accepted"
    code, verdict = t.submit(task, good)  # a retry of an accepted upload: idempotent, counted once
    assert (code, verdict["status"], verdict["reason"]) == (200, "duplicate", "duplicate")
    status = t.get("/status")[1]
    assert status["accepted_total"] == 1 and status["pending"] == 1
    for r in ("missing_token", "unknown_token", "unknown_task", "wrong_keys", "wrong_shape", "wrong_dtype",
              "non_finite", "norm_too_large", "too_large", "malformed", "bad_metrics", "duplicate"):
        assert status["rejected"].get(r, 0) >= 1, r
    metrics = t.get("/metrics")[1].decode()
    assert 'zyke_trainer_updates_rejected_total{reason="norm_too_large"} 1.0' in metrics
    assert "zyke_trainer_updates_accepted_total 1.0" in metrics
    assert "/submit_update" in t.get("/openapi.json")[1]["paths"]


def test_rounds_by_count_weighting_staleness_and_registration(trainer_factory) -> None:  # type: ignore[no-untyped-def]
    t = trainer_factory("--num-tasks-per-round", "2", "--max-staleness", "1", "--tick-interval-sec", "0.2")
    w0 = _b(t.get("/get_lora_weights")[1])
    tasks = [t.get("/get_task", token=TOKENS[i % 2])[1] for i in range(4)]
    deltas = [make_delta(i) for i in range(4)]
    assert t.submit(tasks[0], deltas[0], TOKENS[0], num_samples=4)[1]["status"] == "accepted"
    assert t.submit(tasks[1], deltas[1], TOKENS[1], num_samples=1)[1]["status"] == "accepted"
    t.wait_version(1)
    w1 = _b(t.get("/get_lora_weights")[1])
    for k in w0:  # sample-weighted: 4 and 1 samples
        np.testing.assert_allclose(w1[k], w0[k] + (4 * deltas[0][k] + 1 * deltas[1][k]) / 5, rtol=1e-5, atol=1e-7)
    # a v0 task is now 1 version stale (allowed, discounted by 1/sqrt(2)); a fresh v1 task joins it
    fresh = t.get("/get_task")[1]
    assert fresh["version"] == 1
    assert t.submit(tasks[2], deltas[2], TOKENS[0])[1]["status"] == "accepted"
    assert t.submit(fresh, deltas[3], TOKENS[0])[1]["status"] == "accepted"
    t.wait_version(2)
    w2 = _b(t.get("/get_lora_weights")[1])
    ws = np.array([1 / np.sqrt(2), 1.0])
    ws /= ws.sum()
    for k in w0:
        np.testing.assert_allclose(w2[k], w1[k] + ws[0] * deltas[2][k] + ws[1] * deltas[3][k], rtol=1e-5, atol=1e-7)
    code, verdict = t.submit(tasks[3], deltas[3], TOKENS[1])  # v0 task, now 2 behind: beyond MAX_STALENESS
    assert (code, verdict["reason"]) == (409, "stale")
    for _ in range(600):  # version 2 is registered after it is served: wait for that, by the trainer's own word
        if t.get("/status")[1]["registered_version"] == 2:
            break
        time.sleep(0.1)
    assert t.get("/status")[1]["registered_version"] == 2
    manifest = json.loads((t.home / "data" / "adapters" / "manifest.json").read_text())
    assert "zyke-shared" in manifest["adapters"]  # registered for the daemon, GGUF twin included
    assert (t.home / "data" / "adapters" / "zyke-shared" / "adapter.gguf").is_file()


def test_round_timeout_with_min_updates(trainer_factory) -> None:  # type: ignore[no-untyped-def]
    t = trainer_factory(NUM_TASKS_PER_ROUND="10", ROUND_TIMEOUT_SEC="1", MIN_UPDATES_PER_ROUND="1",
                        TICK_INTERVAL_SEC="0.2")
    assert t.submit(t.get("/get_task")[1], make_delta(0))[1]["status"] == "accepted"
    status = t.wait_version(1, timeout=15)
    assert status["pending"] == 0 and status["round"] == 2


def test_a_worker_killed_mid_upload_counts_nothing(trainer_factory) -> None:  # type: ignore[no-untyped-def]
    t = trainer_factory()
    task = t.get("/get_task")[1]
    body = save(make_delta(0))
    query = f"task_id={task['task_id']}&base_version=0&train_loss_mean=1&train_loss_last=1&grad_norm_mean=1" \
            "&steps=1&duration=1&num_samples=1"
    for _ in range(3):
        with socket.create_connection(("127.0.0.1", t.port), timeout=5) as sock:
            sock.sendall(f"POST /submit_update?{query} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKENS[0]}"
                         f"\r\nContent-Type: application/octet-stream\r\nContent-Length: {len(body)}\r\n\r\n".encode()
                         + body[: len(body) // 2])
    time.sleep(0.5)
    assert t.get("/health") == (200, {"status": "ok", "version": 0})
    status = t.get("/status")[1]
    assert (status["accepted_total"], status["pending"]) == (0, 0)
    assert t.submit(task, make_delta(0))[1]["status"] == "accepted"  # the same task, sent whole, still goes in


def test_sigkill_between_accept_and_aggregate_loses_nothing(trainer_factory) -> None:  # type: ignore[no-untyped-def]
    t = trainer_factory("--num-tasks-per-round", "2", "--tick-interval-sec", "0.2")
    w0 = _b(t.get("/get_lora_weights")[1])
    ta, tb = t.get("/get_task", TOKENS[0])[1], t.get("/get_task", TOKENS[1])[1]
    da, db = make_delta(10), make_delta(11)
    assert t.submit(ta, da, TOKENS[0])[1]["status"] == "accepted"
    t.stop(signal.SIGKILL)  # acknowledged, not yet aggregated
    t.start()
    status = t.get("/status")[1]
    assert (status["version"], status["pending"], status["accepted_total"]) == (0, 1, 1)
    assert t.submit(ta, da, TOKENS[0])[1]["status"] == "duplicate"  # idempotent across the restart
    assert t.submit(tb, db, TOKENS[1])[1]["status"] == "accepted"
    status = t.wait_version(1)
    assert status["accepted_total"] == 2
    w1 = _b(t.get("/get_lora_weights")[1])
    for k in w0:
        np.testing.assert_allclose(w1[k], w0[k] + (da[k] + db[k]) / 2, rtol=1e-5, atol=1e-7)
    made_from = json.loads((t.home / "ckpt" / "checkpoints" / "v000001" / "round.json").read_text())["made_from"]
    assert sorted(m["task_id"] for m in made_from) == sorted([ta["task_id"], tb["task_id"]])
    t.stop(signal.SIGKILL)  # and after the round: the version survives, nothing is pending twice
    t.start()
    status = t.get("/status")[1]
    assert (status["version"], status["pending"], status["accepted_total"]) == (1, 0, 2)


def test_torn_journal_tail_is_dropped(trainer_factory) -> None:  # type: ignore[no-untyped-def]
    t = trainer_factory("--num-tasks-per-round", "5")
    assert t.submit(t.get("/get_task")[1], make_delta(0))[1]["status"] == "accepted"
    t.stop(signal.SIGKILL)
    with (t.home / "ckpt" / "journal.jsonl").open("ab") as fh:
        fh.write(b'{"event": "accept", "task_id": "half-writ')  # a kill in the middle of a journal write
    t.start()
    assert (t.get("/status")[1]["pending"], t.get("/status")[1]["accepted_total"]) == (1, 1)


# -- blocks by reference


def _trainer(tmp_path: Path, blocks: Path | None, data: Path | None = None, **settings: object) -> Trainer:
    """A Trainer called directly (no HTTP): task building and the sample cap are plain methods."""
    config = TrainerConfig(checkpoint_dir=tmp_path / "ckpt", base=fake_base(tmp_path / "base"), data=data,
                           tokens=list(TOKENS), blocks=blocks, **settings)  # type: ignore[arg-type]
    return Trainer(config)


def _indices(task: dict) -> list[int]:  # type: ignore[type-arg]
    return [i for r in task["blocks"]["refs"] for i in r["indices"]]


def test_block_tasks_name_exactly_the_expected_indices(tmp_path: Path) -> None:
    blocks = write_blocks(tmp_path / "blocks", shards=(3, 4))
    trainer = _trainer(tmp_path, blocks, blocks_per_task=3)
    worker = trainer.worker_of(f"Bearer {TOKENS[0]}")
    manifest = json.loads((blocks / "manifest.json").read_text())
    sha = {s["file"]: s["sha256"] for s in manifest["shards"]}
    tasks = [trainer.new_task(worker).model_dump() for _ in range(3)]
    assert [_indices(t) for t in tasks] == [[0, 1, 2], [3, 4, 5], [6, 0, 1]]  # slices wrap like the examples'
    assert [[r["shard"] for r in t["blocks"]["refs"]] for t in tasks] == [
        ["blocks-00000.safetensors"], ["blocks-00001.safetensors"],
        ["blocks-00001.safetensors", "blocks-00000.safetensors"]]
    for task in tasks:
        assert task["examples"] == []
        assert task["blocks"]["manifest_sha256"] == sha256_file(blocks / "manifest.json")
        assert task["blocks"]["block_size"] == 16
        assert all(r["sha256"] == sha[r["shard"]] for r in task["blocks"]["refs"])
        rows = read_blocks_by_ref(blocks, task["blocks"]["refs"], task["blocks"]["manifest_sha256"])
        np.testing.assert_array_equal(rows, all_blocks(blocks)[_indices(task)])
    # the id binds the slice: the same id cannot be pointed at other blocks
    version, key, nonce, sig = tasks[0]["task_id"].split("-")
    assert key == "b0"
    with pytest.raises(Rejected) as err:
        trainer.parse_task(f"{version}-b3-{nonce}-{sig}", worker)
    assert err.value.reason.value == "unknown_task"
    # n_k is capped by the blocks the task held
    with pytest.raises(Rejected) as err:
        trainer.submit(worker, tasks[0]["task_id"], 0, {**GOOD_METRICS, "num_samples": 4}, save(make_delta(0)))
    assert err.value.reason.value == "bad_metrics"
    verdict = trainer.submit(worker, tasks[0]["task_id"], 0, {**GOOD_METRICS, "num_samples": 3}, save(make_delta(0)))
    assert verdict.status == "accepted"


def test_examples_and_blocks_together_and_a_trainer_that_refuses_bad_blocks(tmp_path: Path) -> None:
    blocks = write_blocks(tmp_path / "blocks", shards=(2,))
    trainer = _trainer(tmp_path, blocks, data=write_data(tmp_path / "data.jsonl"), examples_per_task=4,
                       blocks_per_task=5)
    worker = trainer.worker_of(f"Bearer {TOKENS[0]}")
    task = trainer.new_task(worker).model_dump()
    assert len(task["examples"]) == 4 and _indices(task) == [0, 1]  # only 2 blocks exist: no block twice
    assert trainer.parse_task(task["task_id"], worker) == (0, 6)
    legacy = _trainer(tmp_path / "legacy", None, data=write_data(tmp_path / "data.jsonl"), examples_per_task=4)
    old = legacy.new_task(worker).model_dump()
    assert old["blocks"] is None and old["task_id"].split("-")[1] == "0"  # the pre-blocks id format
    assert legacy.parse_task(old["task_id"], worker) == (0, 4)
    raw = bytearray((blocks / "blocks-00000.safetensors").read_bytes())
    raw[-1] ^= 0xFF
    (blocks / "blocks-00000.safetensors").write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="does not match the sha256"):
        _trainer(tmp_path / "again", blocks)
    with pytest.raises(ValueError, match="--data"):
        _trainer(tmp_path / "none", None)


class _Vocab:
    """What the block reader asks of a tokenizer (its size and EOS id), without loading one."""

    eos_token_id = 1

    def __len__(self) -> int:
        return 1000


def test_tampered_missing_or_foreign_blocks_are_refused_with_a_typed_error(tmp_path: Path) -> None:
    blocks = write_blocks(tmp_path / "blocks", shards=(3, 4))
    trainer = _trainer(tmp_path, blocks, blocks_per_task=3)
    task = trainer.new_task(trainer.worker_of(f"Bearer {TOKENS[0]}")).model_dump()  # blocks 0..2, shard 0
    ids, rows = task_block_rows(task, blocks, _Vocab())
    assert ids == [f"blocks-00000.safetensors:{i}" for i in range(3)]
    np.testing.assert_array_equal(rows, all_blocks(blocks)[:3])

    def copy(name: str) -> Path:
        import shutil

        return Path(shutil.copytree(blocks, tmp_path / name))

    tampered = copy("tampered")
    raw = bytearray((tampered / "blocks-00000.safetensors").read_bytes())
    raw[-3] ^= 0x01  # one token id changed, file still valid safetensors
    (tampered / "blocks-00000.safetensors").write_bytes(bytes(raw))
    missing = copy("missing")
    (missing / "blocks-00000.safetensors").unlink()
    foreign = write_blocks(tmp_path / "foreign", shards=(3, 4), seed=1)  # same layout, other tokens
    cases = {tampered: "does not match the sha256", missing: "is missing", foreign: "manifest the task names",
             tmp_path / "nowhere": "not a blocks folder"}
    for folder, message in cases.items():
        with pytest.raises(BlocksUnavailable, match=message):
            task_block_rows(task, folder, _Vocab())
        with pytest.raises(BlocksError):
            read_blocks_by_ref(folder, task["blocks"]["refs"], task["blocks"]["manifest_sha256"])
    with pytest.raises(BlocksUnavailable, match="--blocks-dir"):
        task_block_rows(task, None, _Vocab())
    forged = {**task["blocks"], "refs": [{**task["blocks"]["refs"][0], "indices": [3]}]}  # block 3 is in shard 1
    with pytest.raises(BlocksUnavailable, match=r"holds blocks 0\.\.2"):
        task_block_rows({**task, "blocks": forged}, blocks, _Vocab())


def test_a_blocks_only_trainer_over_http(tmp_path: Path) -> None:
    from click.testing import CliRunner
    from zyke_train.cli import main

    result = CliRunner().invoke(main, ["trainer", "serve", "--checkpoint-dir", str(tmp_path / "x"), "--base",
                                       str(fake_base(tmp_path / "base")), "--token", "t"])
    assert result.exit_code == 2 and "--blocks" in result.output
    blocks = write_blocks(tmp_path / "blocks", shards=(3, 4))
    t = TrainerProcess(tmp_path / "home", fake_base(tmp_path / "base"), None,
                       args=["--blocks", str(blocks), "--blocks-per-task", "2"]).start()
    try:
        status, task = t.get("/get_task")
        assert status == 200 and task["examples"] == [] and _indices(task) == [0, 1]
        assert t.get("/get_task")[1]["blocks"]["refs"][0]["indices"] == [2]
        assert t.submit(task, make_delta(0), num_samples=3)[1]["reason"] == "bad_metrics"
        assert t.submit(task, make_delta(0), num_samples=2)[1]["status"] == "accepted"
        assert "TaskBlocks" in json.dumps(t.get("/openapi.json")[1]["components"])
    finally:
        t.stop(signal.SIGKILL)
