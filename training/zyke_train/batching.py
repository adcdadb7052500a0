"""Batches for ``zyke-train train``: a deterministic order per (seed, epoch), left-padded collation, and the
completion-only loss over only the completion logits.

Why left padding: every completion then sits at the end of its row, so the model is asked for the last
``max completion + 1`` logits only (``logits_to_keep``); with Gemma 3's 262,144-token vocabulary the output
projection over every prompt position would cost more than the rest of the model on a CPU.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

from .train_data import Tokenized

#: Batches are sorted by length inside windows of this many batches (length bucketing with some shuffle).
BUCKET_WINDOW = 32


def epoch_subset(actions: Sequence[str | None], max_share: dict[str, float], seed: int, epoch: int) -> list[int]:
    """Indices used in one epoch: rows whose action is capped by ``max_share`` (e.g. ``{"none": 0.35}``)
    are subsampled to at most that share of the epoch, a different random subset each epoch, so a
    dataset where most replies do nothing does not teach the model to always do nothing. Pure in
    (seed, epoch), like ``epoch_batches``."""
    rng = random.Random(f"subset:{seed}:{epoch}")
    keep = [i for i, a in enumerate(actions) if a not in max_share]
    for action, share in sorted(max_share.items()):
        rows = [i for i, a in enumerate(actions) if a == action]
        if share >= 1.0:
            keep.extend(rows)
            continue
        others = len(actions) - len(rows)
        limit = min(len(rows), int(share * others / max(1e-9, 1.0 - share)))
        keep.extend(rng.sample(rows, limit))
    return sorted(keep)


def epoch_batches(lengths: Sequence[int], batch_size: int, seed: int, epoch: int,
                  subset: Sequence[int] | None = None) -> list[list[int]]:
    """Index batches for one epoch (over ``subset`` when given): shuffled, sorted by length within windows
    (little padding), then the batches shuffled again. A pure function of (seed, epoch), which is what
    makes resuming exact."""
    rng = random.Random(f"{seed}:{epoch}")
    order = list(range(len(lengths))) if subset is None else list(subset)
    rng.shuffle(order)
    window = batch_size * BUCKET_WINDOW
    batches: list[list[int]] = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start:start + window], key=lambda i: lengths[i])
        batches.extend(chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size))
    rng.shuffle(batches)
    return batches


def collate(items: Sequence[Tokenized], pad_id: int) -> dict[str, Any]:
    """Left-padded tensors; ``keep`` is how many trailing logits the loss needs (longest completion + 1)."""
    import torch

    width = max(len(t) for t in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    labels = torch.full((len(items), width), -100, dtype=torch.long)
    weights = torch.zeros((len(items), width), dtype=torch.float32)
    for row, t in enumerate(items):
        seq = t.prompt + t.completion
        ids[row, width - len(seq):] = torch.tensor(seq)
        mask[row, width - len(seq):] = 1
        labels[row, width - len(t.completion):] = torch.tensor(t.completion)
        weights[row, width - len(t.completion):] = torch.tensor(t.weights or [1.0] * len(t.completion))
    keep = min(width, max(len(t.completion) for t in items) + 1)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "weights": weights, "keep": keep,
            "tokens": int(mask.sum()), "targets": int((labels != -100).sum()), "weight": float(weights.sum())}


def completion_loss_sum(model: Any, batch: dict[str, Any]) -> Any:
    """Summed cross-entropy over the completion tokens (times their ``weights`` when the batch has them),
    computing logits only where labels are."""
    import torch.nn.functional as F

    mask = batch["attention_mask"]
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding must not shift the positions
    keep = batch["keep"]
    out = model(input_ids=batch["input_ids"], attention_mask=mask, position_ids=position_ids,
                logits_to_keep=keep, use_cache=False)
    logits = out.logits[:, :-1].float()
    targets = batch["labels"][:, -(keep - 1):]
    losses = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100,
                             reduction="none")
    if "weights" in batch:
        losses = losses * batch["weights"][:, -(keep - 1):].reshape(-1)
    return losses.sum()
