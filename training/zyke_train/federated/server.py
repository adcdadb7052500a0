"""The shared trainer's HTTP service (``zyke-train trainer serve``): a FastAPI app around the pure modules.

FastAPI + uvicorn rather than a home-made server: request parsing, an OpenAPI description at
``/openapi.json`` (what the fuzz test drives) and a maintained HTTP stack. The app is a thin shell: checks
live in ``validate``, maths in ``aggregate``, durability in ``store``; this module authenticates, caps and
reads bodies, serialises state changes under one lock, and runs the round ticker.

Endpoints: ``GET /get_task`` (a signed task: version, LoRA and training settings, the examples to train on
and/or references to ``zyke-train blocks`` blocks the worker holds a copy of),
``GET /get_lora_weights`` (the live adapter as safetensors: frozen A + current B), ``POST /submit_update``
(a ΔB as a safetensors body, metrics as query parameters), ``GET /status``, ``GET /health``,
``GET /metrics`` (Prometheus text).

Task ids are signed (HMAC with a secret kept in ``CHECKPOINT_DIR``) over version, data slice, a nonce and the
worker (and, for block tasks, the blocks manifest's sha256 and the slice length), so issuing a task costs no disk
write, a task cannot be forged or used by another worker, and the trainer can tell from the id alone what the task
held (the cap on the sample count a worker may report).

Blocks go out by reference, not by value: a block task names the manifest's sha256 and, per shard, the shard's
sha256 and the global block indices to train on. The worker reads them from its own copy of the folder (and
refuses the task if its copy differs), so a task stays a few hundred bytes however large the blocks are.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import re
import secrets
import struct
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CollectorRegistry, Gauge, Histogram, generate_latest
from prometheus_client import Counter as PromCounter
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from ..blocks import MANIFEST, BlocksError, block_refs, read_manifest
from . import aggregate
from .store import AcceptRecord, RoundStore
from .validate import Reason, Rejected, check_delta, check_metrics, check_staleness, parse_safetensors

log = logging.getLogger(__name__)

#: HTTP status per rejection reason: auth 401/403, unknown task 404, stale 409, size 413, the rest 400.
STATUS = {Reason.MISSING_TOKEN: 401, Reason.UNKNOWN_TOKEN: 403, Reason.UNKNOWN_TASK: 404, Reason.STALE: 409,
          Reason.TOO_LARGE: 413, Reason.DUPLICATE: 200}
#: The data-slice field of a task id: the examples' start (the pre-blocks format), ``b`` + the blocks' start, or both.
SLICE = re.compile(r"(?P<examples>\d{1,9})?(?:b(?P<blocks>\d{1,9}))?")


@dataclass
class TrainerConfig:
    """Everything ``trainer serve`` takes; the CLI fills it from flags and the env vars of the same names."""

    checkpoint_dir: Path
    base: Path
    #: JSONL of NPC rows or rendered examples, handed out inline; None when tasks carry blocks only.
    data: Path | None
    tokens: list[str]
    #: A ``zyke-train blocks`` folder whose blocks are handed out by reference (workers hold a copy).
    blocks: Path | None = None
    num_tasks_per_round: int = 2
    round_timeout_sec: float = 600.0
    min_updates_per_round: int = 1
    tick_interval_sec: float = 5.0
    max_staleness: int = 2
    delta_norm_max: float = 10.0
    max_body_bytes: int = 64 << 20
    aggregation: str = "mean"
    trim_fraction: float = 0.1
    server_lr: float = 1.0
    rank: int = 4
    alpha: float = 8.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    seed: int = 0
    examples_per_task: int = 8
    blocks_per_task: int = 4
    local_steps: int = 2
    lr: float = 1e-3
    max_seq_len: int = 256
    adapter_name: str | None = "zyke-shared"


class BlockRef(BaseModel):
    """Blocks of one shard: its file name and sha256 (as the manifest records them) and global block indices."""

    shard: str
    sha256: str
    indices: list[int]


class TaskBlocks(BaseModel):
    """A task's blocks, by reference: the worker proves it holds the same folder by the manifest's sha256."""

    manifest_sha256: str
    block_size: int
    refs: list[BlockRef]


class Task(BaseModel):
    task_id: str
    version: int
    base_fingerprint: str
    seed: int
    lora: dict[str, Any]
    train: dict[str, Any]
    #: Empty for a blocks-only task; defaulted so a task without the key (or a worker sending none) still parses.
    examples: list[dict[str, str]] = Field(default_factory=list)
    #: None for an examples-only task: what a worker from before blocks existed receives and ignores.
    blocks: TaskBlocks | None = None
    max_staleness: int


class Verdict(BaseModel):
    status: str  # accepted | duplicate | rejected
    reason: str | None = None
    detail: str = ""
    version: int | None = None
    pending: int | None = None


def target_shapes(base: Path, targets: list[str]) -> dict[str, tuple[int, int]]:
    """PEFT module prefix -> (out, in) of every targeted Linear, read from the checkpoint's safetensors headers
    only (no weights loaded, no torch)."""
    shapes: dict[str, tuple[int, int]] = {}
    files = sorted(base.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{base} has no safetensors weights")
    for path in files:
        with path.open("rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        for key, info in header.items():
            parts = key.split(".")
            if key == "__metadata__" or len(parts) < 3 or parts[-1] != "weight" or parts[-2] not in targets:
                continue
            if len(info["shape"]) == 2:
                shapes["base_model.model." + ".".join(parts[:-1])] = (int(info["shape"][0]), int(info["shape"][1]))
    if not shapes:
        raise ValueError(f"no {targets} weights found in {base}")
    return shapes


def load_blocks_manifest(path: Path) -> tuple[dict[str, Any], str]:
    """A blocks folder's manifest and its sha256, every shard's sha256 checked once at start: the trainer hands out
    references to these bytes, so it must not vouch for a shard that went missing or changed since ``blocks``."""
    from zyke_models.embedded import sha256_file

    try:
        manifest = read_manifest(path)
        for shard in manifest["shards"]:
            file = path / shard["file"]
            if not file.is_file():
                raise BlocksError(f"block shard {file} is missing")
            if sha256_file(file) != shard["sha256"]:
                raise BlocksError(f"block shard {file} does not match the sha256 in its manifest")
        if int(manifest.get("block_size", 0)) < 2:
            raise BlocksError(f"{path / MANIFEST} has no usable block_size")
    except BlocksError as exc:
        raise ValueError(str(exc)) from exc
    if not sum(s["blocks"] for s in manifest["shards"]):
        raise ValueError(f"{path} holds no blocks")
    return manifest, sha256_file(path / MANIFEST)


def load_examples(path: Path) -> list[dict[str, str]]:
    """``{prompt, completion}`` pairs from rendered examples or raw NPC rows (rendered by ``npc_data``)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    first = next((json.loads(line) for line in lines if line.strip()), None)
    if first is not None and {"prompt", "completion"} <= set(first):
        rows = [json.loads(line) for line in lines if line.strip()]
        return [{"prompt": r["prompt"], "completion": r["completion"]} for r in rows]
    from ..npc_data import process

    result = process([(str(path), lines)])
    return [{"prompt": e.prompt, "completion": e.completion} for e in result.examples]


class Trainer:
    """State and logic behind the endpoints (usable without HTTP: the tests call it directly too)."""

    def __init__(self, config: TrainerConfig, register: Callable[[str, Path], None] | None = None) -> None:
        from zyke_models.hf_checkpoint import base_fingerprint

        if config.aggregation not in aggregate.METHODS:
            raise ValueError(f"aggregation must be one of {aggregate.METHODS}")
        self.config = config
        self.tokens = {t: hashlib.sha256(t.encode()).hexdigest()[:12] for t in config.tokens if t}
        if not self.tokens:
            raise ValueError("at least one worker token is needed")
        self.fingerprint = base_fingerprint(config.base)
        if config.data is None and config.blocks is None:
            raise ValueError("give --data (examples), --blocks (a blocks folder) or both")
        self.examples = load_examples(config.data) if config.data is not None else []
        if config.data is not None and not self.examples:
            raise ValueError(f"{config.data} holds no usable examples")
        self.blocks_manifest: dict[str, Any] | None = None
        self.blocks_sha256 = ""
        self.num_blocks = 0
        if config.blocks is not None:
            self.blocks_manifest, self.blocks_sha256 = load_blocks_manifest(config.blocks)
            self.num_blocks = sum(s["blocks"] for s in self.blocks_manifest["shards"])
        shapes = target_shapes(config.base, config.target_modules)
        peft_config = {"peft_type": "LORA", "r": config.rank, "lora_alpha": config.alpha,
                       "target_modules": sorted(config.target_modules), "lora_dropout": 0.0, "bias": "none",
                       "task_type": "CAUSAL_LM", "init_lora_weights": True, "zyke_ffa_seed": config.seed}
        self.store = RoundStore(config.checkpoint_dir,
                                lambda: (aggregate.init_adapter(shapes, config.rank, config.seed), peft_config))
        self.expected = {k: tuple(self.store.adapter[k].shape) for k in aggregate.b_keys(self.store.adapter)}
        self.lock = threading.Lock()
        self.rejected: Counter[str] = Counter()
        self.next_slice = 0
        self.next_block = 0
        self.registered_version: int | None = None
        self.register = register
        self.wake = asyncio.Event()
        self.metrics = _Metrics()
        self.metrics.version.set(self.store.version)
        self.metrics.pending.set(len(self.store.pending))

    # -- tasks

    def worker_of(self, authorization: str | None) -> str:
        if not authorization:
            raise Rejected(Reason.MISSING_TOKEN, "send Authorization: Bearer <worker token>")
        scheme, _, token = authorization.partition(" ")
        for known, worker in self.tokens.items():
            if scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), known.encode()):
                return worker
        raise Rejected(Reason.UNKNOWN_TOKEN, "this worker token is not known to the trainer")

    @property
    def examples_in_task(self) -> int:
        return min(self.config.examples_per_task, len(self.examples))

    @property
    def blocks_in_task(self) -> int:
        return min(self.config.blocks_per_task, self.num_blocks)

    def _sign(self, version: int, slice_key: str, nonce: str, worker: str) -> str:
        """HMAC over everything that decides what the task trains on. An examples-only slice key is the bare start,
        so the message (and every id issued before blocks existed) is unchanged; a block slice also binds the
        manifest's sha256 and the slice length, so no id can be replayed against other blocks."""
        msg = f"{version}|{slice_key}|{nonce}|{worker}"
        if "b" in slice_key:
            msg += f"|blocks:{self.blocks_sha256}:{self.blocks_in_task}"
        return hmac.new(self.store.secret, msg.encode(), hashlib.sha256).hexdigest()[:32]

    def _slice(self, start: int) -> list[dict[str, str]]:
        n = self.examples_in_task
        return [self.examples[(start + i) % len(self.examples)] for i in range(n)]

    def block_indices(self, start: int) -> list[int]:
        """The global block indices of the block slice starting at ``start`` (wrapping like ``_slice``)."""
        return [(start + i) % self.num_blocks for i in range(self.blocks_in_task)]

    def _task_blocks(self, start: int) -> TaskBlocks:
        assert self.blocks_manifest is not None
        refs = block_refs(self.blocks_manifest, self.block_indices(start))
        return TaskBlocks(manifest_sha256=self.blocks_sha256, block_size=int(self.blocks_manifest["block_size"]),
                          refs=[BlockRef(**r) for r in refs])

    def new_task(self, worker: str) -> Task:
        """The next slice of every configured source (examples inline, blocks by reference), signed for ``worker``."""
        c = self.config
        with self.lock:
            version, start, block_start = self.store.version, self.next_slice, self.next_block
            if self.examples:
                self.next_slice = (start + c.examples_per_task) % len(self.examples)
            if self.num_blocks:
                self.next_block = (block_start + c.blocks_per_task) % self.num_blocks
        slice_key = (str(start) if self.examples else "") + (f"b{block_start}" if self.num_blocks else "")
        nonce = secrets.token_hex(6)
        return Task(task_id=f"{version}-{slice_key}-{nonce}-{self._sign(version, slice_key, nonce, worker)}",
                    version=version, base_fingerprint=self.fingerprint, seed=c.seed,
                    lora={"r": c.rank, "alpha": c.alpha, "target_modules": sorted(c.target_modules)},
                    train={"steps": c.local_steps, "lr": c.lr, "max_seq_len": c.max_seq_len},
                    examples=self._slice(start) if self.examples else [],
                    blocks=self._task_blocks(block_start) if self.num_blocks else None,
                    max_staleness=c.max_staleness)

    def parse_task(self, task_id: str, worker: str) -> tuple[int, int]:
        """``(version, max samples)`` of a task this trainer issued to ``worker``: the samples are what the task
        held (examples plus blocks), the most a worker can honestly say it trained on."""
        parts = task_id.split("-")
        if len(parts) == 4 and parts[0].isdigit() and len(parts[0]) < 10:
            m = SLICE.fullmatch(parts[1])
            if m and parts[1] and (m["examples"] is None or self.examples) and (m["blocks"] is None or self.num_blocks):
                version = int(parts[0])
                if hmac.compare_digest(parts[3], self._sign(version, parts[1], parts[2], worker)):
                    samples = (self.examples_in_task if m["examples"] is not None else 0) + \
                              (self.blocks_in_task if m["blocks"] is not None else 0)
                    return version, samples
        raise Rejected(Reason.UNKNOWN_TASK, "this task id was not issued to this worker by this trainer")

    # -- submissions

    def submit(self, worker: str, task_id: str, base_version: int, raw_metrics: dict[str, Any], body: bytes) -> Verdict:
        """Validate and (durably) accept one update; raises ``Rejected`` with a typed reason otherwise."""
        task_version, max_samples = self.parse_task(task_id, worker)
        if base_version != task_version:
            raise Rejected(Reason.MALFORMED, f"base_version {base_version} is not the task's version {task_version}")
        with self.lock:
            if task_id in self.store.accepted_ids:
                raise Rejected(Reason.DUPLICATE, "this task's update was already accepted; it is counted once")
            staleness = check_staleness(task_version, self.store.version, self.config.max_staleness)
        delta, _meta = parse_safetensors(body)
        norm = check_delta(delta, self.expected, self.config.delta_norm_max)
        metrics = check_metrics(raw_metrics, max_samples=max_samples)
        with self.lock:  # re-check under the lock: the round may have moved or a twin request won meanwhile
            if task_id in self.store.accepted_ids:
                raise Rejected(Reason.DUPLICATE, "this task's update was already accepted; it is counted once")
            staleness = check_staleness(task_version, self.store.version, self.config.max_staleness)
            record = AcceptRecord(task_id=task_id, worker=worker, task_version=task_version, round=self.store.version,
                                  staleness=staleness, num_samples=metrics.num_samples, norm=norm,
                                  metrics=metrics.as_dict(), sha256=hashlib.sha256(body).hexdigest())
            self.store.accept(record, body, delta)
            pending, version = len(self.store.pending), self.store.version
        self.metrics.accepted.inc()
        self.metrics.pending.set(pending)
        log.info("accepted %s from %s (staleness %d, norm %.3g, %d samples)", task_id, worker, staleness, norm,
                 metrics.num_samples)
        return Verdict(status="accepted", version=version, pending=pending,
                       detail=f"{pending}/{self.config.num_tasks_per_round} updates in round {version + 1}")

    def reject(self, exc: Rejected) -> JSONResponse:
        self.rejected[exc.reason.value] += 1
        self.metrics.rejected.labels(exc.reason.value).inc()
        status = "duplicate" if exc.reason == Reason.DUPLICATE else "rejected"
        return JSONResponse(Verdict(status=status, reason=exc.reason.value, detail=exc.detail,
                                    version=self.store.version).model_dump(), status_code=STATUS.get(exc.reason, 400))

    # -- rounds

    def round_due(self) -> bool:
        n = len(self.store.pending)
        if n >= self.config.num_tasks_per_round:
            return True
        elapsed = time.monotonic() - self.store.round_started
        return elapsed >= self.config.round_timeout_sec and n >= max(1, self.config.min_updates_per_round)

    def maybe_aggregate(self) -> int | None:
        """Aggregate the pending round if it is due; returns the new version (or None)."""
        with self.lock:
            if not self.round_due():
                return None
            started = time.perf_counter()
            updates = [aggregate.Update(p.delta, p.record.num_samples, self.store.version - p.record.task_version)
                       for p in self.store.pending]
            method = self.config.aggregation
            tensors = aggregate.ffa_round(self.store.adapter, updates, method,  # type: ignore[arg-type]
                                          self.config.trim_fraction, self.config.server_lr)
            weights = aggregate.update_weights(updates).tolist()
            version = self.store.commit_round(tensors, {"aggregation": method, "weights": weights,
                                                       "server_lr": self.config.server_lr})
            checkpoint = self.store.checkpoint_dir
        self.metrics.rounds.inc()
        self.metrics.version.set(version)
        self.metrics.pending.set(0)
        self.metrics.aggregation_seconds.observe(time.perf_counter() - started)
        log.info("round done: version %d from %d updates (%s)", version, len(updates), method)
        self.publish(version, checkpoint)
        return version

    def publish(self, version: int, checkpoint: Path) -> None:
        """Register the new version with the daemon's adapter registry (and its GGUF twin). A failure is
        logged and counted; the checkpoint stays the source of truth and the next round tries again."""
        if self.register is None or not self.config.adapter_name:
            return
        try:
            self.register(self.config.adapter_name, checkpoint)
            self.registered_version = version
        except Exception:
            self.metrics.registration_failures.inc()
            log.exception("registering version %d as %r failed", version, self.config.adapter_name)

    def status(self) -> dict[str, Any]:
        with self.lock:
            return {"round": self.store.version + 1, "version": self.store.version,
                    "pending": len(self.store.pending), "accepted_total": self.store.accepted_total,
                    "accepted_by_worker": dict(Counter(p.record.worker for p in self.store.pending)),
                    "rejected": dict(self.rejected), "aggregation": self.config.aggregation,
                    "num_tasks_per_round": self.config.num_tasks_per_round,
                    "adapter_name": self.config.adapter_name, "registered_version": self.registered_version,
                    "base_fingerprint": self.fingerprint}


class _Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.accepted = PromCounter("zyke_trainer_updates_accepted", "Updates accepted (durable)", registry=r)
        self.rejected = PromCounter("zyke_trainer_updates_rejected", "Updates refused, by reason", ["reason"],
                                    registry=r)
        self.rounds = PromCounter("zyke_trainer_rounds", "Rounds aggregated by this process", registry=r)
        self.registration_failures = PromCounter("zyke_trainer_registration_failures",
                                                 "Aggregated versions that could not be registered", registry=r)
        self.version = Gauge("zyke_trainer_version", "Live adapter version", registry=r)
        self.pending = Gauge("zyke_trainer_pending_updates", "Accepted updates waiting for the round", registry=r)
        self.aggregation_seconds = Histogram("zyke_trainer_aggregation_seconds", "Time to aggregate a round",
                                             registry=r)


def default_register(base: Path) -> Callable[[str, Path], None]:
    """Register through ``zyke_train.adapters.register``: the daemon's registry, GGUF twin included."""
    def register(name: str, peft_dir: Path) -> None:
        from ..adapters import register as register_adapter

        register_adapter(name, peft_dir, base)
    return register


def create_app(config: TrainerConfig, register: Callable[[str, Path], None] | None = None) -> FastAPI:
    """The FastAPI app; ``register`` (default: the daemon registry) is called with each new version."""
    trainer = Trainer(config, register if register is not None else default_register(config.base))

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        trainer.wake = asyncio.Event()
        if trainer.store.version > 0:  # a kill after a checkpoint but before its registration: register it now
            await asyncio.to_thread(trainer.publish, trainer.store.version, trainer.store.checkpoint_dir)
        ticker = asyncio.create_task(_tick(trainer))
        try:
            yield
        finally:
            ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await ticker

    app = FastAPI(title="Zyke shared trainer", version="1", lifespan=lifespan,
                  description="Federated FFA-LoRA rounds: tasks out, validated deltas in, aggregated adapters.")
    app.state.trainer = trainer

    @app.exception_handler(RequestValidationError)
    async def bad_request(_request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [{"loc": list(e.get("loc", ())), "msg": str(e.get("msg", ""))} for e in exc.errors()]
        trainer.rejected[Reason.MALFORMED.value] += 1
        trainer.metrics.rejected.labels(Reason.MALFORMED.value).inc()
        return JSONResponse({"status": "rejected", "reason": Reason.MALFORMED.value,
                             "detail": json.dumps(errors)[:2000]}, status_code=422)

    @app.get("/health")
    def health() -> dict[str, Any]:
        return {"status": "ok", "version": trainer.store.version}

    @app.get("/status")
    def status() -> dict[str, Any]:
        return trainer.status()

    @app.get("/metrics", response_class=PlainTextResponse)
    def metrics() -> Response:
        return Response(generate_latest(trainer.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/get_task", response_model=Task, responses={401: {"model": Verdict}, 403: {"model": Verdict}})
    def get_task(authorization: str | None = Header(default=None, max_length=512)) -> Any:
        try:
            return trainer.new_task(trainer.worker_of(authorization))
        except Rejected as exc:
            return trainer.reject(exc)

    @app.get("/get_lora_weights", response_class=Response,
             responses={200: {"content": {"application/octet-stream": {}}}, 401: {"model": Verdict},
                        403: {"model": Verdict}})
    def get_lora_weights(authorization: str | None = Header(default=None, max_length=512)) -> Response:
        try:
            trainer.worker_of(authorization)
        except Rejected as exc:
            return trainer.reject(exc)
        with trainer.lock:
            body, version = trainer.store.adapter_bytes(), trainer.store.version
        return Response(body, media_type="application/octet-stream", headers={"X-Zyke-Version": str(version)})

    body_doc = {"requestBody": {"required": True, "content": {"application/octet-stream": {
        "schema": {"type": "string", "format": "binary"}}}}}

    @app.post("/submit_update", response_model=Verdict, openapi_extra=body_doc,
              responses={400: {"model": Verdict}, 401: {"model": Verdict}, 403: {"model": Verdict},
                         404: {"model": Verdict}, 409: {"model": Verdict}, 413: {"model": Verdict},
                         422: {"model": Verdict}})
    async def submit_update(
        request: Request,
        task_id: str = Query(max_length=128),
        base_version: int = Query(ge=0, le=2**31),
        train_loss_mean: float = Query(), train_loss_last: float = Query(), grad_norm_mean: float = Query(),
        steps: int = Query(ge=0, le=2**31), duration: float = Query(), num_samples: int = Query(ge=0, le=2**31),
        authorization: str | None = Header(default=None, max_length=512),
    ) -> Any:
        try:
            worker = trainer.worker_of(authorization)
            body = await _read_capped(request, config.max_body_bytes)
        except Rejected as exc:
            return trainer.reject(exc)
        except ClientDisconnect:
            log.info("a worker disconnected mid-upload; nothing counted")
            return Response(status_code=400)
        raw = {"train_loss_mean": train_loss_mean, "train_loss_last": train_loss_last,
               "grad_norm_mean": grad_norm_mean, "steps": steps, "duration": duration, "num_samples": num_samples}
        try:
            verdict = await run_in_threadpool(trainer.submit, worker, task_id, base_version, raw, body)
        except Rejected as exc:
            return trainer.reject(exc)
        trainer.wake.set()
        return verdict

    return app


async def _read_capped(request: Request, cap: int) -> bytes:
    """The body, refusing (before reading) a declared length over ``cap`` and (while reading) a longer one."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise Rejected(Reason.MALFORMED, "Content-Length is not a number")
        if int(declared) > cap:
            raise Rejected(Reason.TOO_LARGE, f"body of {declared} bytes is over the {cap}-byte cap")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > cap:
            raise Rejected(Reason.TOO_LARGE, f"body is over the {cap}-byte cap")
        chunks.append(chunk)
    return b"".join(chunks)


async def _tick(trainer: Trainer) -> None:
    """Every TICK_INTERVAL_SEC (or at once after an accept), aggregate the round if it is due."""
    while True:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(trainer.wake.wait(), timeout=trainer.config.tick_interval_sec)
        trainer.wake.clear()
        try:
            await asyncio.to_thread(trainer.maybe_aggregate)
        except Exception:  # a failed round must not stop the ticker; the updates stay pending on disk
            log.exception("aggregation failed; will retry on the next tick")

