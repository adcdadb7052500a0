"""Federated LoRA aggregation: pure functions over numpy arrays (no HTTP, no files, no torch).

Why not average the adapters as they are
----------------------------------------
A LoRA adapter changes a weight matrix by ``ΔW = s · B · A`` (``B``: outxr, ``A``: rxin, ``s = alpha/r``).
What a federated round should produce is the weighted mean of the clients' *updates to W*,
``Σ_k w_k · B_k · A_k`` (weights ``w_k`` summing to 1). Averaging ``A`` and ``B`` separately gives
``(Σ_k w_k B_k)(Σ_j w_j A_j) = Σ_k Σ_j w_k w_j B_k A_j``, which carries cross terms ``B_k A_j`` (k ≠ j) that no
client ever trained; it is not the mean of the ``B·A`` (FlowerTune and OpenFedLLM average this way anyway).

The method: FFA-LoRA (exact)
----------------------------
Zyke's shared trainer uses FFA-LoRA (Sun et al., 2024): every ``A`` is drawn once from a seed the trainer
owns (``init_adapter``), shipped with the weights, and **frozen**; workers train only ``B``. With one shared
``A``, the product is linear in ``B``::

    Σ_k w_k · B_k · A = (Σ_k w_k · B_k) · A

so averaging ``B`` alone *is* averaging ``B·A``, exactly, with no SVD and no residual, and the update a
worker sends is half the size of a full adapter. The cost is expressiveness (a random frozen ``A`` is a
fixed random projection of the input); FFA-LoRA reports quality on par with LoRA at the same rank, and it
behaves better under differential-privacy noise, which matters once volunteers contribute.

A worker sends ``ΔB_k = B_k - B_{v_k}`` where ``v_k`` is the version it started from. The new version is::

    B_{v+1} = B_v + η · Σ_k w_k ΔB_k,     w_k ∝ n_k / (1 + s_k)^0.5

with ``n_k`` the number of examples the worker trained on (capped by the trainer to what the task held),
``s_k = v - v_k`` its staleness and ``η`` the server learning rate (1 by default). The staleness discount is
FedBuff's polynomial weight (Nguyen et al., 2022; Meta FLSim): a delta computed against an older ``B`` is
still a descent direction for the shared model, just a less reliable one. When every update is fresh and
η = 1 this reduces to FedAvg on ``B``, and ``B_{v+1}·A`` is exactly the sample-weighted mean of the workers'
``B_k·A`` (``tests/test_federated_aggregate.py`` checks that equality).

Robust options
--------------
``mean`` trusts every accepted update. Against a few bad or hostile workers whose updates still pass
validation (finite, under the norm cap), ``trimmed_mean`` (coordinate-wise: drop the ``β`` fraction of
largest and smallest values per coordinate, average the rest) and ``median`` (coordinate-wise median; Yin et
al., 2018) bound the influence of any single worker. Both ignore the sample weights on purpose: ``n_k`` is a
number the worker reports, and a robust estimator that lets an attacker choose its own weight is not robust.
They still apply to ``ΔB`` only, so with a shared ``A`` the result remains a valid rank-r adapter.

FlexLoRA (for adapters whose A was trained too)
-----------------------------------------------
``flexlora_merge`` is the exact alternative for clients that train both factors (Bai et al., 2024): it forms
``Σ_k w_k B_k A_k`` in full and returns the best rank-r factorisation of it (truncated SVD, Eckart-Young),
split as ``B = U·√S``, ``A = √S·Vᵀ``. It costs an outxin matrix per module, so the HTTP trainer uses FFA; it
is here so the same maths can run inside an engine whose clients train full LoRA.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

Method = Literal["mean", "trimmed_mean", "median"]
METHODS: tuple[str, ...] = ("mean", "trimmed_mean", "median")
#: FedBuff's polynomial staleness exponent: weight ∝ 1 / (1 + staleness) ** STALENESS_EXPONENT.
STALENESS_EXPONENT = 0.5

Tensors = Mapping[str, np.ndarray]


@dataclass(frozen=True)
class Update:
    """One accepted worker update: ``delta`` holds ``ΔB`` per adapter key (the lora_B keys only)."""

    delta: Tensors
    num_samples: int
    staleness: int


def staleness_weight(staleness: int, exponent: float = STALENESS_EXPONENT) -> float:
    """FedBuff's discount ``1 / (1 + s)^exponent``: 1 for a fresh update, slowly less for older ones."""
    if staleness < 0:
        raise ValueError(f"staleness cannot be negative (got {staleness})")
    return float((1.0 + staleness) ** -exponent)


def update_weights(updates: Sequence[Update]) -> np.ndarray:
    """Normalised weights ``n_k / (1+s_k)^0.5 / Σ``; every weight is positive when every update has samples."""
    raw = np.array([u.num_samples * staleness_weight(u.staleness) for u in updates], dtype=np.float64)
    if raw.size == 0 or not np.all(raw > 0):
        raise ValueError("every update needs at least one sample")
    return raw / float(raw.sum())


def aggregate_deltas(updates: Sequence[Update], method: Method = "mean",
                     trim_fraction: float = 0.1) -> dict[str, np.ndarray]:
    """Combine the updates' ``ΔB`` into one delta per key (float64 maths, float32 result).

    All updates must carry the same keys and shapes (``validate.check_delta`` guarantees it for the HTTP
    trainer). ``trim_fraction`` is the share cut from *each* end for ``trimmed_mean``; at least one value
    per coordinate always remains.
    """
    if not updates:
        raise ValueError("nothing to aggregate")
    keys = sorted(updates[0].delta)
    for u in updates[1:]:
        if sorted(u.delta) != keys:
            raise ValueError("updates disagree on their keys")
    if method not in METHODS:
        raise ValueError(f"unknown aggregation method {method!r} (one of {', '.join(METHODS)})")
    if not 0.0 <= trim_fraction < 0.5:
        raise ValueError("trim_fraction must be in [0, 0.5)")
    weights = update_weights(updates) if method == "mean" else None
    out: dict[str, np.ndarray] = {}
    for key in keys:
        stack = np.stack([np.asarray(u.delta[key], dtype=np.float64) for u in updates])
        if method == "mean":
            assert weights is not None
            merged = np.tensordot(weights, stack, axes=1)
        elif method == "median":
            merged = np.median(stack, axis=0)
        else:
            merged = _trimmed_mean(stack, trim_fraction)
        out[key] = merged.astype(np.float32)
    return out


def _trimmed_mean(stack: np.ndarray, trim_fraction: float) -> np.ndarray:
    n = stack.shape[0]
    cut = min(int(np.floor(trim_fraction * n)), (n - 1) // 2)
    ordered = np.sort(stack, axis=0)
    return np.asarray(ordered[cut:n - cut].mean(axis=0))  # numpy types a mean over an axis as Any


def apply_delta(current: Tensors, delta: Tensors, server_lr: float = 1.0) -> dict[str, np.ndarray]:
    """``current + η·delta`` for the keys in ``delta``; other keys (the frozen A) pass through unchanged."""
    out = {k: np.array(v, copy=True) for k, v in current.items()}
    for key, d in delta.items():
        if key not in out or out[key].shape != d.shape:
            raise ValueError(f"delta key {key!r} does not fit the current adapter")
        out[key] = (out[key].astype(np.float64) + server_lr * d.astype(np.float64)).astype(out[key].dtype)
    return out


def ffa_round(current: Tensors, updates: Sequence[Update], method: Method = "mean", trim_fraction: float = 0.1,
              server_lr: float = 1.0) -> dict[str, np.ndarray]:
    """One FFA-LoRA round: the next adapter (A unchanged, B moved by the aggregated ΔB)."""
    return apply_delta(current, aggregate_deltas(updates, method, trim_fraction), server_lr)


def init_adapter(shapes: Mapping[str, tuple[int, int]], rank: int, seed: int) -> dict[str, np.ndarray]:
    """Version 0 of an FFA adapter: ``A`` drawn from ``seed``, ``B`` zero (so the adapter starts as a no-op).

    ``shapes`` maps each PEFT module prefix (``base_model.model.model.layers.0.self_attn.q_proj``) to the
    base weight's ``(out, in)``. ``A`` follows PEFT's default init, kaiming-uniform with ``a=√5``, which is
    ``U(-1/√in, 1/√in)``; each module draws from its own stream (seed, module name) so the result does not
    depend on dict order. Anyone holding the seed can rebuild the same ``A``.
    """
    out: dict[str, np.ndarray] = {}
    for prefix in sorted(shapes):
        n_out, n_in = shapes[prefix]
        rng = np.random.default_rng([seed, *prefix.encode()])
        bound = 1.0 / np.sqrt(n_in)
        out[f"{prefix}.lora_A.weight"] = rng.uniform(-bound, bound, size=(rank, n_in)).astype(np.float32)
        out[f"{prefix}.lora_B.weight"] = np.zeros((n_out, rank), dtype=np.float32)
    return out


def b_keys(adapter: Tensors) -> list[str]:
    """The trainable keys of an FFA adapter (what a worker's delta must hold, no more, no less)."""
    return sorted(k for k in adapter if ".lora_B." in k)


def delta_norm(delta: Tensors) -> float:
    """Global L2 norm over every tensor of a delta (float64 accumulation, so float32 overflow is not an issue)."""
    return float(np.sqrt(sum(float(np.sum(np.square(v, dtype=np.float64))) for v in delta.values())))


def flexlora_merge(factors: Sequence[tuple[np.ndarray, np.ndarray]], weights: Sequence[float],
                   rank: int) -> tuple[np.ndarray, np.ndarray]:
    """FlexLoRA for one module: the rank-``rank`` ``(B, A)`` closest (Frobenius) to ``Σ_k w_k B_k A_k``.

    ``weights`` are normalised here. Returns ``B`` (outxrank) and ``A`` (rankxin); ``B @ A`` is the truncated
    SVD of the weighted sum, which equals the sum itself when its rank is at most ``rank``.
    """
    w = np.asarray(weights, dtype=np.float64)
    if len(factors) != w.size or w.size == 0 or np.any(w < 0) or w.sum() <= 0:
        raise ValueError("one non-negative weight per client, not all zero")
    w = w / w.sum()
    full = sum(wk * (np.asarray(b, np.float64) @ np.asarray(a, np.float64))
               for wk, (b, a) in zip(w, factors, strict=True))
    u, s, vt = np.linalg.svd(full, full_matrices=False)
    root = np.sqrt(s[:rank])
    return (u[:, :rank] * root).astype(np.float32), (root[:, None] * vt[:rank]).astype(np.float32)
