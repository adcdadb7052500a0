"""The pure maths and checks of the shared trainer (zyke_train.federated.aggregate / validate): no HTTP."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
from safetensors.numpy import save
from zyke_train.federated import aggregate as agg
from zyke_train.federated.validate import (
    Reason,
    Rejected,
    check_delta,
    check_metrics,
    check_staleness,
    parse_safetensors,
)

SHAPES = {"base_model.model.model.layers.0.self_attn.q_proj": (12, 10),
          "base_model.model.model.layers.0.self_attn.v_proj": (6, 10)}
RANK = 4


def _adapter() -> dict[str, np.ndarray]:
    return agg.init_adapter(SHAPES, RANK, seed=7)


def test_init_is_seeded_frozen_a_and_zero_b() -> None:
    a1, a2 = _adapter(), _adapter()
    assert all(np.array_equal(a1[k], a2[k]) for k in a1)  # anyone with the seed rebuilds the same A
    assert not np.array_equal(a1[next(k for k in a1 if "lora_A" in k)], agg.init_adapter(SHAPES, RANK, 8)[
        next(k for k in a1 if "lora_A" in k)])
    assert all(not v.any() for k, v in a1.items() if "lora_B" in k)
    assert agg.b_keys(a1) == sorted(k for k in a1 if "lora_B" in k)


def test_ffa_aggregate_is_the_weighted_mean_of_the_workers_b_times_a() -> None:
    """The exact property of FFA-LoRA: (B_v + Σ w_k ΔB_k)·A == Σ w_k (B_v + ΔB_k)·A, with w_k ∝ n_k/(1+s_k)^0.5."""
    rng = np.random.default_rng(0)
    current = _adapter()
    for k in agg.b_keys(current):  # a non-zero current B, as after a few rounds
        current[k] = rng.standard_normal(current[k].shape).astype(np.float32)
    samples, staleness = [8, 3, 5], [0, 1, 2]
    updates = [agg.Update({k: (rng.standard_normal(current[k].shape) * 0.1).astype(np.float32)
                           for k in agg.b_keys(current)}, n, s) for n, s in zip(samples, staleness, strict=True)]
    new = agg.ffa_round(current, updates)
    raw = np.array([n / (1 + s) ** 0.5 for n, s in zip(samples, staleness, strict=True)])
    w = raw / raw.sum()
    for prefix in SHAPES:
        a, b_key = current[f"{prefix}.lora_A.weight"], f"{prefix}.lora_B.weight"
        assert np.array_equal(new[f"{prefix}.lora_A.weight"], a)  # A never moves
        workers = [(current[b_key] + u.delta[b_key]) @ a for u in updates]  # each worker's own B_k·A
        expected = sum(wk * m for wk, m in zip(w, workers, strict=True))
        np.testing.assert_allclose(new[b_key] @ a, expected, rtol=1e-5, atol=1e-6)


def test_staleness_weight_is_fedbuffs() -> None:
    assert agg.staleness_weight(0) == 1.0
    assert agg.staleness_weight(3) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        agg.staleness_weight(-1)


def test_robust_methods_resist_an_outlier() -> None:
    key = "k.lora_B.weight"
    honest = [agg.Update({key: np.full((3, 2), 0.1 + 0.01 * i, np.float32)}, 4, 0) for i in range(4)]
    evil = agg.Update({key: np.full((3, 2), 50.0, np.float32)}, 1000, 0)
    mean = agg.aggregate_deltas([*honest, evil], "mean")[key]
    med = agg.aggregate_deltas([*honest, evil], "median")[key]
    trimmed = agg.aggregate_deltas([*honest, evil], "trimmed_mean", trim_fraction=0.2)[key]
    assert mean.max() > 40  # the plain mean follows the outlier (it even trusts its claimed 1000 samples)
    assert 0.1 <= med.min() and med.max() <= 0.14
    assert 0.1 <= trimmed.min() and trimmed.max() <= 0.14


def test_flexlora_is_the_best_rank_r_approximation() -> None:
    rng = np.random.default_rng(1)
    factors = [(rng.standard_normal((9, 2)), rng.standard_normal((2, 7))) for _ in range(3)]
    w = [1.0, 2.0, 3.0]
    full = sum(wk / 6 * (b @ a) for wk, (b, a) in zip(w, factors, strict=True))
    b6, a6 = agg.flexlora_merge(factors, w, rank=6)  # rank(sum) <= 6: exact
    np.testing.assert_allclose(b6 @ a6, full, atol=1e-5)
    b2, a2 = agg.flexlora_merge(factors, w, rank=2)
    s = np.linalg.svd(full, compute_uv=False)
    assert np.linalg.norm(full - b2 @ a2) == pytest.approx(np.sqrt((s[2:] ** 2).sum()), rel=1e-4)  # Eckart-Young
    naive = sum(wk / 6 * b for wk, (b, _) in zip(w, factors, strict=True)) @ sum(
        wk / 6 * a for wk, (_, a) in zip(w, factors, strict=True))
    assert np.linalg.norm(full - naive) > np.linalg.norm(full - b2 @ a2)  # averaging A and B apart is worse


# -- validation

EXPECTED = {"x.lora_B.weight": (4, 2), "y.lora_B.weight": (3, 2)}


def _good() -> dict[str, np.ndarray]:
    return {k: np.full(s, 0.01, np.float32) for k, s in EXPECTED.items()}


def _reason(fn, *args, **kwargs) -> Reason:  # type: ignore[no-untyped-def]
    with pytest.raises(Rejected) as err:
        fn(*args, **kwargs)
    return err.value.reason


def test_parse_safetensors_roundtrip_and_lies() -> None:
    tensors, _ = parse_safetensors(save(_good(), metadata={"a": "b"}))
    assert {k: v.shape for k, v in tensors.items()} == EXPECTED
    header = json.dumps({"t": {"dtype": "F32", "shape": [1 << 30, 1 << 10], "data_offsets": [0, 16]}}).encode()
    lying = struct.pack("<Q", len(header)) + header + b"\0" * 16  # promises 4 TiB in 16 bytes: never allocated
    assert _reason(parse_safetensors, lying) == Reason.MALFORMED
    assert _reason(parse_safetensors, struct.pack("<Q", 1 << 40) + b"{}") == Reason.MALFORMED
    assert _reason(parse_safetensors, b"\x03") == Reason.MALFORMED
    assert _reason(parse_safetensors, save(_good()) + b"trailing") == Reason.MALFORMED
    assert _reason(parse_safetensors, struct.pack("<Q", 2) + b"[]") == Reason.MALFORMED
    assert _reason(parse_safetensors, b"\x80\x00\x00\x00\x00\x00\x00\x00" + b"\xff" * 128) == Reason.MALFORMED


def test_check_delta_reasons() -> None:
    assert check_delta(_good(), EXPECTED, 1.0) == pytest.approx(np.sqrt(14 * 1e-4))
    assert _reason(check_delta, {"x.lora_B.weight": _good()["x.lora_B.weight"]}, EXPECTED, 1.0) == Reason.WRONG_KEYS
    assert _reason(check_delta, {**_good(), "z": np.zeros(1, np.float32)}, EXPECTED, 1.0) == Reason.WRONG_KEYS
    assert _reason(check_delta, {**_good(), "y.lora_B.weight": np.zeros((2, 3), np.float32)}, EXPECTED,
                   1.0) == Reason.WRONG_SHAPE
    assert _reason(check_delta, {**_good(), "y.lora_B.weight": np.zeros((3, 2), np.float64)}, EXPECTED,
                   1.0) == Reason.WRONG_DTYPE
    for bad in (np.nan, np.inf):
        arr = np.zeros((3, 2), np.float32)
        arr[1, 1] = bad
        assert _reason(check_delta, {**_good(), "y.lora_B.weight": arr}, EXPECTED, 1.0) == Reason.NON_FINITE
    assert _reason(check_delta, {k: v * 1000 for k, v in _good().items()}, EXPECTED, 1.0) == Reason.NORM_TOO_LARGE


def test_check_metrics_and_staleness() -> None:
    good = {"train_loss_mean": 1.0, "train_loss_last": 0.9, "grad_norm_mean": 0.2, "steps": 2, "duration": 1.0,
            "num_samples": 4}
    assert check_metrics(good, 8).num_samples == 4
    assert _reason(check_metrics, {**good, "train_loss_mean": float("nan")}, 8) == Reason.NON_FINITE
    assert _reason(check_metrics, {**good, "duration": float("inf")}, 8) == Reason.NON_FINITE
    assert _reason(check_metrics, {**good, "num_samples": 9}, 8) == Reason.BAD_METRICS
    assert _reason(check_metrics, {k: v for k, v in good.items() if k != "steps"}, 8) == Reason.BAD_METRICS
    assert check_staleness(3, 5, 2) == 2
    assert _reason(check_staleness, 2, 5, 2) == Reason.STALE
    assert _reason(check_staleness, 6, 5, 2) == Reason.UNKNOWN_TASK
