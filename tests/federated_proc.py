"""Helpers for the federated trainer tests: a real ``zyke-train trainer serve`` subprocess on loopback, fake and
tiny base checkpoints, and hand-made deltas.

A subprocess, not a thread, so a test can SIGKILL the trainer between accept and aggregate exactly as a crash
would, and restart it on the same checkpoint directory.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import save, save_file
from zyke_models.embedded import sha256_file

TOKENS = ("worker-token-a", "worker-token-b")
#: (out, in) of q_proj and v_proj in the fake base: small, so tests build deltas by hand in microseconds.
FAKE_SHAPES = {"q_proj": (8, 6), "v_proj": (4, 6)}


def fake_base(path: Path, layers: int = 2) -> Path:
    """A 'checkpoint' with only config.json and the targeted weights: all the trainer reads (no torch)."""
    path.mkdir(parents=True, exist_ok=True)
    tensors = {f"model.layers.{i}.self_attn.{m}.weight": np.zeros(shape, np.float32)
               for i in range(layers) for m, shape in FAKE_SHAPES.items()}
    save_file(tensors, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps({"model_type": "fake"}))
    return path


def tiny_base(path: Path) -> Path:
    """A tiny random Gemma3ForCausalLM with the embedded model's tokenizer (the vocab must match it)."""
    import torch
    from transformers import AutoTokenizer, Gemma3ForCausalLM, Gemma3TextConfig
    from zyke_models.hf_checkpoint import embedded_hf_checkpoint

    tok = AutoTokenizer.from_pretrained(str(embedded_hf_checkpoint()))
    cfg = Gemma3TextConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=512,
                           sliding_window=64)
    torch.manual_seed(0)
    Gemma3ForCausalLM(cfg).save_pretrained(str(path))
    tok.save_pretrained(str(path))
    return path


def write_data(path: Path, n: int = 12) -> Path:
    """Short rendered examples (short sequences keep CPU training cheap)."""
    with path.open("w") as fh:
        for i in range(n):
            fh.write(json.dumps({"id": f"ex{i}", "prompt": f"Player: hello {i}\nNPC:",
                                 "completion": f' {{"say": "Welcome, traveller {i}."}}'}) + "\n")
    return path


def write_blocks(path: Path, shards: tuple[int, ...] = (3, 4), block_size: int = 16, vocab_size: int = 1000,
                 eos_token_id: int = 1, seed: int = 0) -> Path:
    """A ``zyke-train blocks`` folder written the way ``make_blocks`` writes one (int32 ``input_ids`` shards, a
    manifest with every shard's sha256 and first global block index), from seeded random ids instead of a corpus:
    no tokenizer run, and each block is distinct, so a test can tell exactly which rows were read."""
    path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    entries: list[dict[str, Any]] = []
    for n, count in enumerate(shards):
        name = f"blocks-{n:05d}.safetensors"
        ids = rng.integers(2, min(vocab_size, 5000), size=(count, block_size)).astype(np.int32)
        save_file({"input_ids": ids}, str(path / name), metadata={"block_size": str(block_size), "tokenizer": "test"})
        entries.append({"file": name, "blocks": count, "first_block": sum(e["blocks"] for e in entries),
                        "sha256": sha256_file(path / name)})
    manifest = {"tokenizer": "test", "vocab_size": vocab_size, "bos_token_id": None, "eos_token_id": eos_token_id,
                "block_size": block_size, "steps_per_block": 1, "env_id": None, "npc_type": None, "dtype": "int32",
                "tensor": "input_ids", "blocks": sum(shards), "shards": entries}
    (path / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return path


def all_blocks(path: Path) -> np.ndarray:
    """Every block of a folder in global index order, read straight from the shards (the test's ground truth)."""
    from safetensors.numpy import load_file

    manifest = json.loads((path / "manifest.json").read_text())
    return np.concatenate([load_file(str(path / s["file"]))["input_ids"] for s in manifest["shards"]])


def b_shapes(layers: int = 2, rank: int = 4) -> dict[str, tuple[int, int]]:
    return {f"base_model.model.model.layers.{i}.self_attn.{m}.lora_B.weight": (shape[0], rank)
            for i in range(layers) for m, shape in FAKE_SHAPES.items()}


def make_delta(seed: int, scale: float = 0.01, **overrides: np.ndarray) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    delta = {k: (rng.standard_normal(s) * scale).astype(np.float32) for k, s in b_shapes().items()}
    delta.update(overrides)
    return delta


GOOD_METRICS = {"train_loss_mean": 1.5, "train_loss_last": 1.2, "grad_norm_mean": 0.3, "steps": 2, "duration": 0.5,
                "num_samples": 4}


@dataclass
class TrainerProcess:
    home: Path
    base: Path
    data: Path | None
    args: list[str] = field(default_factory=list)
    env_extra: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None
    port: int | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.home / "trainer.log"

    @property
    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(ZYKE_DATA_DIR=str(self.home / "data"), ZYKE_CONFIG_DIR=str(self.home / "config"),
                   TRAINER_TOKENS=" ".join(TOKENS), **self.env_extra)
        return env

    def start(self, timeout: float = 60) -> TrainerProcess:
        self.home.mkdir(parents=True, exist_ok=True)
        port_file = self.home / "port"
        port_file.unlink(missing_ok=True)
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "zyke_train", "trainer", "serve", "--port", str(self.port or 0),
                 "--port-file", str(port_file), "--checkpoint-dir", str(self.home / "ckpt"), "--base", str(self.base),
                 *(["--data", str(self.data)] if self.data is not None else []), *self.args], env=self.env,
                stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"trainer exited {self.proc.returncode}:\n{self.log_path.read_text()[-3000:]}")
            try:
                self.port = int(port_file.read_text())
                if self.get("/health")[0] == 200:
                    return self
            except (OSError, ValueError):
                pass
            time.sleep(0.1)
        raise RuntimeError(f"trainer not ready after {timeout}s:\n{self.log_path.read_text()[-3000:]}")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def request(self, method: str, path: str, token: str | None = TOKENS[0], body: bytes | None = None,
                query: dict[str, Any] | None = None) -> tuple[int, Any]:
        url = self.url + path + ("?" + urllib.parse.urlencode(query) if query else "")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        req = urllib.request.Request(url, data=body, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                status, raw, ctype = resp.status, resp.read(), resp.headers.get("content-type", "")
        except urllib.error.HTTPError as exc:
            status, raw, ctype = exc.code, exc.read(), exc.headers.get("content-type", "")
        return status, (json.loads(raw) if "json" in ctype else raw)

    def get(self, path: str, token: str | None = TOKENS[0]) -> tuple[int, Any]:
        return self.request("GET", path, token)

    def submit(self, task: dict[str, Any], delta: dict[str, np.ndarray] | bytes, token: str | None = TOKENS[0],
               **metrics: Any) -> tuple[int, Any]:
        body = delta if isinstance(delta, bytes) else save(delta)
        query = {"task_id": task["task_id"], "base_version": task["version"], **GOOD_METRICS, **metrics}
        return self.request("POST", "/submit_update", token, body, query)

    def wait_version(self, version: int, timeout: float = 30) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = self.get("/status")[1]
            if status["version"] >= version:
                return status
            time.sleep(0.1)
        raise AssertionError(f"version {version} not reached: {self.get('/status')[1]}")
