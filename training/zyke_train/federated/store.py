"""Durable round state of the shared trainer: checkpoints, accepted updates and the journal that ties them.

The promise: an update the trainer acknowledged is never lost, and a kill at any instant never leaves a
checkpoint that a restart would trust half-written. How it is kept, under ``CHECKPOINT_DIR``:

- ``updates/<task_id>.safetensors``: an accepted delta, written to a temporary file, fsynced, renamed into
  place and the directory fsynced, **before** its journal line is written;
- ``journal.jsonl``: one JSON line per accepted update (task, worker, round, weight inputs, file sha256),
  appended and fsynced before the HTTP answer goes out. A torn last line (a kill mid-write) is dropped and
  truncated on restart: that update was never acknowledged, so dropping it breaks no promise;
- ``checkpoints/v<N>/``: adapter version N as a PEFT adapter directory (``adapter_model.safetensors`` with
  the frozen A and the current B, ``adapter_config.json``) plus ``round.json`` (what it was made from). It
  is written whole in a temporary directory, fsynced and renamed;
- ``CURRENT``: which checkpoint is live, replaced atomically (temp + fsync + ``os.replace``) after the
  checkpoint is complete. It is the single source of truth for the version.

On start the store reads ``CURRENT``, loads that checkpoint, and replays the journal: every accepted task id
is remembered (a resubmission is a duplicate, counted once, across restarts), and the accepts whose round is
the current version are the pending round. An accept journaled for round N is consumed by exactly the
checkpoint N+1, so a kill between accept and aggregation replays it into the same round, and a kill between
writing checkpoint N+1 and switching ``CURRENT`` simply aggregates round N again from the same inputs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import save
from zyke_models.files import atomic_write_bytes, fsync_dir, write_bytes_synced

from .validate import parse_safetensors

log = logging.getLogger(__name__)

ADAPTER_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
#: Old checkpoints kept beside the live one (for inspection and rollback); the rest are removed.
KEEP_CHECKPOINTS = 3


@dataclass(frozen=True)
class AcceptRecord:
    """One acknowledged update, as journaled."""

    task_id: str
    worker: str
    task_version: int
    round: int
    staleness: int
    num_samples: int
    norm: float
    metrics: dict[str, float | int]
    sha256: str
    accepted_at: float = field(default_factory=time.time)


@dataclass
class PendingUpdate:
    record: AcceptRecord
    delta: dict[str, np.ndarray]


class RoundStore:
    """The trainer's state on disk and its in-memory mirror. Not thread-safe: the server serialises calls."""

    def __init__(self, root: Path, initial: Callable[[], tuple[dict[str, np.ndarray], dict[str, Any]]]) -> None:
        """``initial()`` gives version 0 (tensors, PEFT adapter config), used only when no checkpoint exists."""
        self.root = root
        self.updates_dir = root / "updates"
        self.checkpoints_dir = root / "checkpoints"
        self.journal_path = root / "journal.jsonl"
        for d in (self.updates_dir, self.checkpoints_dir):
            d.mkdir(parents=True, exist_ok=True)
        self.secret = self._secret()
        self.accepted_ids: set[str] = set()
        self.accepted_total = 0
        self.pending: list[PendingUpdate] = []
        current = self._read_current()
        if current is None:
            tensors, config = initial()
            self._write_checkpoint(0, tensors, config, {"version": 0, "made_from": []})
            self._switch_current(0)
            current = 0
        self.version = current
        self.adapter, self.adapter_config = self._load_checkpoint(current)
        self.round_started = time.monotonic()
        self._replay()
        self._collect_garbage()

    # -- queries

    @property
    def checkpoint_dir(self) -> Path:
        return self.checkpoint_path(self.version)

    def checkpoint_path(self, version: int) -> Path:
        return self.checkpoints_dir / f"v{version:06d}"

    def adapter_bytes(self) -> bytes:
        return (self.checkpoint_dir / ADAPTER_FILE).read_bytes()

    # -- accepting

    def accept(self, record: AcceptRecord, body: bytes, delta: dict[str, np.ndarray]) -> None:
        """Make ``body`` and its journal line durable; only then is the update part of the round."""
        if record.task_id in self.accepted_ids:
            raise ValueError(f"task {record.task_id} was already accepted")
        atomic_write_bytes(self.updates_dir / f"{record.task_id}.safetensors", body)
        line = json.dumps({"event": "accept", **asdict(record)}, sort_keys=True) + "\n"
        with self.journal_path.open("ab") as fh:
            fh.write(line.encode())
            fh.flush()
            os.fsync(fh.fileno())
        fsync_dir(self.root)
        self.accepted_ids.add(record.task_id)
        self.accepted_total += 1
        self.pending.append(PendingUpdate(record, {k: np.array(v) for k, v in delta.items()}))

    # -- rounds

    def commit_round(self, tensors: Mapping[str, np.ndarray], info: dict[str, Any]) -> int:
        """Write version+1 from the pending round and make it live; returns the new version."""
        new = self.version + 1
        made_from = [asdict(p.record) for p in self.pending]
        self._write_checkpoint(new, tensors, self.adapter_config, {**info, "version": new, "made_from": made_from})
        self._switch_current(new)
        self.version = new
        self.adapter = {k: np.array(v) for k, v in tensors.items()}
        self.pending = []
        self.round_started = time.monotonic()
        self._collect_garbage()
        return new

    # -- internals

    def _secret(self) -> bytes:
        path = self.root / "secret"
        if not path.exists():
            atomic_write_bytes(path, secrets.token_bytes(32))
            os.chmod(path, 0o600)
        return path.read_bytes()

    def _read_current(self) -> int | None:
        try:
            version = int(json.loads((self.root / "CURRENT").read_text())["version"])
        except FileNotFoundError:
            return None
        if not (self.checkpoint_path(version) / "round.json").is_file():
            raise RuntimeError(f"CURRENT names checkpoint v{version}, which is missing: refusing to start over it")
        return version

    def _switch_current(self, version: int) -> None:
        atomic_write_bytes(self.root / "CURRENT", json.dumps({"version": version}).encode())

    def _write_checkpoint(self, version: int, tensors: Mapping[str, np.ndarray], config: dict[str, Any],
                          info: dict[str, Any]) -> None:
        final = self.checkpoint_path(version)
        tmp = Path(tempfile.mkdtemp(prefix=f".v{version:06d}.", suffix=".partial", dir=self.checkpoints_dir))
        try:
            write_bytes_synced(tmp / ADAPTER_FILE, save({k: np.ascontiguousarray(v) for k, v in tensors.items()}))
            write_bytes_synced(tmp / CONFIG_FILE, json.dumps(config, indent=2).encode())
            write_bytes_synced(tmp / "round.json", json.dumps(info, indent=2).encode())
            fsync_dir(tmp)
            if final.exists():  # a checkpoint written before a kill, never made live: made again from the same inputs
                shutil.rmtree(final)
            os.rename(tmp, final)
            fsync_dir(self.checkpoints_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def _load_checkpoint(self, version: int) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        path = self.checkpoint_path(version)
        tensors, _ = parse_safetensors((path / ADAPTER_FILE).read_bytes(), max_header=64 << 20)
        config = json.loads((path / CONFIG_FILE).read_text())
        return {k: np.array(v) for k, v in tensors.items()}, config

    def _replay(self) -> None:
        if not self.journal_path.exists():
            return
        raw = self.journal_path.read_bytes()
        good_end = 0
        for line in raw.splitlines(keepends=True):
            if not line.endswith(b"\n"):
                break
            try:
                event = json.loads(line)
                event.pop("event")
                record = AcceptRecord(**event)
            except (ValueError, TypeError, KeyError):
                break
            good_end += len(line)
            self.accepted_ids.add(record.task_id)
            self.accepted_total += 1
            if record.round != self.version:
                continue
            body = (self.updates_dir / f"{record.task_id}.safetensors").read_bytes()
            if hashlib.sha256(body).hexdigest() != record.sha256:
                raise RuntimeError(f"update {record.task_id} does not match its journaled sha256")
            delta, _ = parse_safetensors(body)
            self.pending.append(PendingUpdate(record, {k: np.array(v) for k, v in delta.items()}))
        if good_end < len(raw):
            log.warning("journal: dropping a torn tail of %d bytes (never acknowledged)", len(raw) - good_end)
            with self.journal_path.open("r+b") as fh:
                fh.truncate(good_end)
                os.fsync(fh.fileno())
        log.info("replayed journal: version %d, %d pending, %d accepted in all", self.version, len(self.pending),
                 self.accepted_total)

    def _collect_garbage(self) -> None:
        """Drop consumed update files, unfinished temporaries and checkpoints older than the kept ones."""
        keep = {f"{p.record.task_id}.safetensors" for p in self.pending}
        for path in self.updates_dir.iterdir():
            if path.name not in keep:
                path.unlink(missing_ok=True)
        for path in self.checkpoints_dir.iterdir():
            if path.name.endswith(".partial"):
                shutil.rmtree(path, ignore_errors=True)
            elif path.name.startswith("v") and path.name[1:].isdigit():
                if int(path.name[1:]) < self.version - KEEP_CHECKPOINTS or int(path.name[1:]) > self.version:
                    shutil.rmtree(path, ignore_errors=True)

