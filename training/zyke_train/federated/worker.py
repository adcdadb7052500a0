"""The volunteer side of the shared trainer (``zyke-train contribute``): fetch a task, train, send ΔB.

For each task: ``GET /get_lora_weights`` (frozen A + current B of the live version) and ``GET /get_task``
(the version, the LoRA and training settings, the examples and/or block references), check the local base model
is the one the trainer trains (same fingerprint), train the adapter's ``B`` only on the task's data, and
``POST /submit_update`` with ``ΔB = B_trained - B_received`` as safetensors plus the training metrics.

A task may name ``zyke-train blocks`` blocks by reference (manifest sha256, and per shard its sha256 and global
block indices) instead of carrying text: the worker reads exactly those rows from its own copy (``--blocks-dir``)
through ``blocks.read_blocks_by_ref``, which refuses a copy whose manifest or shards differ. Such a task is skipped
and reported (``BlocksUnavailable``), never trained on other data.

The local loop is small and lives here, not in ``zyke_train.train.train``: that function runs a whole
fine-tuning job (its own fresh LoRA init, Accelerate, checkpoints, output directories), while FFA-LoRA
needs a few steps that start from the trainer's weights with every ``lora_A`` frozen. What can be shared
is shared: tokenisation (``tokenize_examples``), block windows (``block_items``), batching (``collate``) and the
loss (``completion_loss_sum``; a block window's "completion" is all of it but its first token, so blocks get loss
on every token) come from ``zyke_train.train_data`` and ``zyke_train.batching``, so a contributed update optimises
exactly what a local ``zyke-train train`` run optimises, on exactly the text the daemon serves.

Network faults (refused or reset connections, timeouts, 5xx, 429) are retried with exponential backoff
and jitter; a re-sent upload whose first copy was accepted comes back ``duplicate`` and counts as done,
because the trainer keys updates by task id. A typed rejection is not retried: it is printed with what to
do about it, and an authentication rejection stops the run.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from ..train_data import Tokenized

log = logging.getLogger(__name__)

#: What to tell a volunteer for each rejection reason the trainer can give.
HINTS = {
    "missing_token": "pass --token (or set ZYKE_TRAINER_TOKEN) with the token the trainer's operator gave you",
    "unknown_token": "the trainer does not know this token; ask its operator for a valid one",
    "unknown_task": "the trainer did not issue this task to you (restarted with a new secret?); fetching a new one",
    "stale": "the shared adapter moved on while you trained; fetching a new task",
    "too_large": "the update is over the trainer's size cap; is the LoRA rank the task asked for?",
    "malformed": "the upload was not a valid safetensors delta; please report this",
    "wrong_keys": "the delta's tensors do not match the adapter; update zyke-train",
    "wrong_shape": "the delta's shapes do not match the adapter; update zyke-train",
    "wrong_dtype": "the delta must be float32; update zyke-train",
    "non_finite": "training diverged (NaN or inf); try a lower learning rate or check your hardware",
    "norm_too_large": "the update moved too far (norm over the trainer's cap); nothing was counted",
    "bad_metrics": "the reported metrics were not plausible; please report this",
}
FATAL = {"missing_token", "unknown_token"}


class ContributeError(Exception):
    """The run cannot go on (bad token, wrong base model, trainer unreachable after retries)."""


class BlocksUnavailable(ContributeError):
    """A task names blocks this worker cannot vouch for: no ``--blocks-dir``, a missing shard, or a manifest or
    shard whose sha256 differs from the task's. Only this task is skipped (and reported); training on whatever the
    local copy holds instead would send the trainer an update for data it never asked for."""


@dataclass
class Outcome:
    task_id: str
    version: int
    status: str  # accepted | duplicate | rejected | skipped (a task whose blocks this worker cannot supply)
    reason: str | None
    detail: str
    metrics: dict[str, float | int]


class TrainerClient:
    """Plain urllib (no extra dependency) with bounded retries on network faults."""

    def __init__(self, url: str, token: str | None, attempts: int = 6, backoff: float = 0.5,
                 timeout: float = 120.0, on_event: Callable[[str], None] = print) -> None:
        self.url = url.rstrip("/")
        self.token = token
        self.attempts = attempts
        self.backoff = backoff
        self.timeout = timeout
        self.on_event = on_event

    def request(self, method: str, path: str, body: bytes | None = None,
                query: dict[str, Any] | None = None) -> tuple[int, dict[str, str], bytes]:
        """``(status, headers, body)``; 4xx comes back as is (typed rejections), faults are retried."""
        url = self.url + path + ("?" + urllib.parse.urlencode(query) if query else "")
        headers = {"Content-Type": "application/octet-stream"} if body is not None else {}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        last: Exception | None = None
        for attempt in range(self.attempts):
            if attempt:
                delay = min(10.0, self.backoff * 2 ** (attempt - 1)) * (0.5 + random.random() / 2)
                self.on_event(f"  retrying {method} {path} in {delay:.1f}s ({last})")
                time.sleep(delay)
            req = urllib.request.Request(url, data=body, method=method, headers=headers)
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    return resp.status, dict(resp.headers), resp.read()
            except urllib.error.HTTPError as exc:
                payload = exc.read()
                if exc.code >= 500 or exc.code == 429:
                    last = exc
                    continue
                return exc.code, dict(exc.headers), payload
            except (urllib.error.URLError, OSError, TimeoutError) as exc:
                last = exc
        raise ContributeError(f"trainer at {self.url} unreachable after {self.attempts} attempts: {last}")


class LocalModel:
    """The base model with an FFA LoRA on top, loaded once and re-armed with each task's weights."""

    def __init__(self, base: Path, lora: dict[str, Any]) -> None:
        import torch
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch.manual_seed(0)
        self.lora = dict(lora)
        self.tokenizer = AutoTokenizer.from_pretrained(str(base))
        model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
        config = LoraConfig(r=int(lora["r"]), lora_alpha=float(lora["alpha"]), lora_dropout=0.0, bias="none",
                            target_modules=list(lora["target_modules"]), task_type="CAUSAL_LM")
        self.model = get_peft_model(model, config)

    def load(self, weights: dict[str, np.ndarray]) -> None:
        import torch
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(self.model, {k: torch.from_numpy(np.array(v)) for k, v in weights.items()})
        missing = [k for k in result.missing_keys if "lora_" in k]
        if missing:
            raise ContributeError(f"the trainer's adapter does not cover {missing[:3]}")
        for name, param in self.model.named_parameters():
            param.requires_grad = ".lora_B." in name  # FFA-LoRA: A stays the shared, seeded projection

    def b_state(self) -> dict[str, np.ndarray]:
        from peft import get_peft_model_state_dict

        return {k: v.detach().cpu().float().numpy().copy()
                for k, v in get_peft_model_state_dict(self.model).items() if ".lora_B." in k}


def task_block_rows(task: dict[str, Any], blocks_dir: Path | None, tokenizer: Any) -> tuple[list[str], np.ndarray]:
    """``(ids, rows)`` of the blocks a task names, read from the local copy and checked against the task's manifest
    and shard sha256 and against ``tokenizer`` (vocabulary, EOS); ids are ``shard:global_index``. A task without
    blocks gives none. Raises ``BlocksUnavailable`` instead of ever substituting other rows."""
    from ..blocks import BlocksError, read_blocks_by_ref

    spec = task.get("blocks")
    if not spec:
        return [], np.zeros((0, 0), np.int32)
    if blocks_dir is None:
        raise BlocksUnavailable("this task names blocks by reference; pass --blocks-dir with a local copy of the "
                                "trainer's blocks folder")
    try:
        refs = list(spec["refs"])
        rows = read_blocks_by_ref(blocks_dir, refs, manifest_sha256=str(spec["manifest_sha256"]),
                                  vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id)
        ids = [f"{r['shard']}:{int(i)}" for r in refs for i in r["indices"]]
    except (KeyError, TypeError, ValueError) as exc:
        raise BlocksUnavailable(f"the task's block references are malformed ({exc})") from exc
    except BlocksError as exc:
        raise BlocksUnavailable(f"{exc}; the task's blocks are not in {blocks_dir} (copy the trainer's blocks "
                                "folder again)") from exc
    if rows.shape[1] != int(spec.get("block_size", rows.shape[1])):
        raise BlocksUnavailable(f"{blocks_dir} holds blocks of {rows.shape[1]} tokens, the task "
                                f"{spec.get('block_size')}")
    return ids, rows


def train_task(local: LocalModel, task: dict[str, Any], batch_size: int = 4, blocks_dir: Path | None = None,
               on_batch: Callable[[list[Tokenized]], None] | None = None) -> dict[str, float | int]:
    """A few AdamW steps on ``B`` over the task's examples (completion-only loss) and blocks (loss on every token);
    returns the metrics.

    A task with blocks runs at least one pass over all their windows (more steps than the task's when needed), so
    every token of exactly the named blocks is trained on. ``on_batch`` is called with each step's items (the
    token ids that step trains on): how a caller can check what was trained, without reaching into the loop."""
    import torch

    from ..batching import collate, completion_loss_sum
    from ..train_data import block_items, tokenize_examples

    settings = task["train"]
    steps, lr, max_len = int(settings["steps"]), float(settings["lr"]), int(settings["max_seq_len"])
    block_ids, block_rows = task_block_rows(task, blocks_dir, local.tokenizer)  # before any step: refuse early
    examples = [(f"example:{i}", e["prompt"], e["completion"]) for i, e in enumerate(task.get("examples") or [])]
    items, _ = tokenize_examples(local.tokenizer, examples, max_len)
    items += block_items(zip(block_ids, block_rows, strict=True), max_len)
    if not items:
        raise ContributeError(f"task {task.get('task_id')} has nothing to train on")
    if block_ids:
        steps = max(steps, math.ceil(len(items) / batch_size))
    params = [p for p in local.model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    pad = local.tokenizer.pad_token_id if local.tokenizer.pad_token_id is not None else 0
    local.model.train()
    losses: list[float] = []
    norms: list[float] = []
    seen: set[str] = set()
    started = time.perf_counter()
    for step in range(steps):
        idx = [(step * batch_size + j) % len(items) for j in range(min(batch_size, len(items)))]
        chosen = [items[i] for i in idx]
        seen.update(t.id.partition("#")[0] for t in chosen)  # a sample is an example or a block, not a window
        if on_batch is not None:
            on_batch(chosen)
        batch = collate(chosen, pad)
        loss = completion_loss_sum(local.model, batch) / max(1, batch["targets"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(params, max_norm=1.0)))
        optimizer.step()
        losses.append(float(loss.detach()))
    local.model.eval()
    return {"train_loss_mean": float(np.mean(losses)), "train_loss_last": losses[-1],
            "grad_norm_mean": float(np.mean(norms)), "steps": steps, "duration": time.perf_counter() - started,
            "num_samples": len(seen)}


def contribute(trainer_url: str, token: str | None, num_tasks: int = 1, base: Path | None = None,
               on_event: Callable[[str], None] = print, client: TrainerClient | None = None,
               blocks_dir: Path | None = None) -> list[Outcome]:
    """Run ``num_tasks`` tasks against the trainer; returns what became of each. ``blocks_dir`` is the local copy
    of the trainer's blocks folder, read for tasks that name blocks; a task whose blocks it cannot supply is
    reported as ``skipped`` (reason ``blocks_unavailable``) and the run goes on."""
    from safetensors.numpy import save
    from zyke_models.hf_checkpoint import base_fingerprint, embedded_hf_checkpoint

    from .validate import Rejected, parse_safetensors

    client = client or TrainerClient(trainer_url, token, on_event=on_event)
    base = base or embedded_hf_checkpoint()
    local: LocalModel | None = None
    fingerprint = base_fingerprint(base)
    outcomes: list[Outcome] = []
    for n in range(1, num_tasks + 1):
        task = _get_json(client, "/get_task")
        if task["base_fingerprint"] != fingerprint:
            raise ContributeError(f"the trainer trains base {task['base_fingerprint']} but {base} is {fingerprint}; "
                                  "pass --base with the trainer's base model")
        status, headers, body = client.request("GET", "/get_lora_weights")
        _raise_for(status, body)
        served = int({k.lower(): v for k, v in headers.items()}.get("x-zyke-version", -1))
        if served != task["version"]:  # a round ended between the two calls: take a fresh task
            on_event(f"[{n}/{num_tasks}] the adapter moved to version {served}; fetching a new task")
            task = _get_json(client, "/get_task")
            status, headers, body = client.request("GET", "/get_lora_weights")
            _raise_for(status, body)
        try:
            weights, _ = parse_safetensors(body, max_header=64 << 20)
        except Rejected as exc:
            raise ContributeError(f"the trainer sent unreadable weights: {exc}") from exc
        if local is None or local.lora != task["lora"]:
            on_event(f"loading base model {base}")
            local = LocalModel(base, task["lora"])
        local.load(weights)
        before = local.b_state()
        n_blocks = sum(len(r.get("indices", [])) for r in (task.get("blocks") or {}).get("refs", []))
        on_event(f"[{n}/{num_tasks}] task {task['task_id']}: version {task['version']}, "
                 f"{len(task.get('examples') or [])} examples, {n_blocks} blocks, {task['train']['steps']} steps")
        try:
            metrics = train_task(local, task, blocks_dir=blocks_dir)
        except BlocksUnavailable as exc:
            outcomes.append(Outcome(task["task_id"], task["version"], "skipped", "blocks_unavailable", str(exc), {}))
            on_event(f"[{n}/{num_tasks}] skipped (blocks_unavailable): {exc}")
            continue
        after = local.b_state()
        delta = {k: np.ascontiguousarray(after[k] - before[k], dtype=np.float32) for k in sorted(after)}
        on_event(f"[{n}/{num_tasks}] trained in {metrics['duration']:.1f}s: loss {metrics['train_loss_mean']:.4f} "
                 f"(last {metrics['train_loss_last']:.4f}); uploading")
        query = {"task_id": task["task_id"], "base_version": task["version"], **metrics}
        status, _, reply = client.request("POST", "/submit_update", body=save(delta), query=query)
        verdict = _json(reply)
        outcome = Outcome(task["task_id"], task["version"], str(verdict.get("status", "rejected")),
                          verdict.get("reason"), str(verdict.get("detail", "")), metrics)
        outcomes.append(outcome)
        if outcome.status in ("accepted", "duplicate"):
            on_event(f"[{n}/{num_tasks}] {outcome.status}: {outcome.detail}")
            continue
        reason = outcome.reason or f"http_{status}"
        on_event(f"[{n}/{num_tasks}] rejected ({reason}): {outcome.detail}. {HINTS.get(reason, '')}".rstrip())
        if reason in FATAL:
            raise ContributeError(f"{reason}: {HINTS[reason]}")
    return outcomes


def _get_json(client: TrainerClient, path: str) -> dict[str, Any]:
    status, _, body = client.request("GET", path)
    _raise_for(status, body)
    return _json(body)


def _raise_for(status: int, body: bytes) -> None:
    if status == 200:
        return
    verdict = _json(body)
    reason = str(verdict.get("reason") or f"http_{status}")
    raise ContributeError(f"{reason}: {verdict.get('detail', '')} {HINTS.get(reason, '')}".strip())


def _json(body: bytes) -> dict[str, Any]:
    try:
        value = json.loads(body)
    except ValueError:
        return {"status": "rejected", "detail": body[:200].decode("utf-8", "replace")}
    return value if isinstance(value, dict) else {"status": "rejected", "detail": str(value)[:200]}
