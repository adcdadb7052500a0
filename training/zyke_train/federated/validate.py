"""Checks on a worker's update: pure functions over bytes and numpy arrays, each failure a typed reason.

The shared trainer takes uploads from machines it does not control, so every check here assumes the bytes
are hostile:

- ``parse_safetensors`` reads the safetensors format by hand (8-byte little-endian header length, a JSON
  header, raw little-endian tensor data) and checks the header's claims against the body's real size
  *before* anything is allocated: a header that promises a 10 GB tensor in a 1 kB body is refused, not
  allocated. The tensors it returns are zero-copy views of the body. Nothing is ever unpickled.
- ``check_delta`` compares the tensors with what the current adapter expects (exact key set, shapes,
  float32), then looks for NaN/inf, then bounds the global L2 norm.
- ``check_metrics`` refuses non-finite or out-of-range training metrics, which would otherwise end up in
  aggregation weights or dashboards.

Because they touch no sockets and no disk, the same checks can run inside another federated engine
(``zyke_train.federated.flower``) and be tested directly.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import numpy as np

from .aggregate import delta_norm

#: A delta's header lists at most a few hundred tensors; a larger header is an attack or a mistake.
MAX_HEADER_BYTES = 1 << 20
_DTYPES: dict[str, np.dtype[Any]] = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2"),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U8": np.dtype("u1"), "BOOL": np.dtype("?"),
}


class Reason(StrEnum):
    """Why an update was refused; the worker sees this string in the response's ``reason``."""

    MISSING_TOKEN = "missing_token"
    UNKNOWN_TOKEN = "unknown_token"
    UNKNOWN_TASK = "unknown_task"
    STALE = "stale"
    TOO_LARGE = "too_large"
    MALFORMED = "malformed"
    WRONG_KEYS = "wrong_keys"
    WRONG_SHAPE = "wrong_shape"
    WRONG_DTYPE = "wrong_dtype"
    NON_FINITE = "non_finite"
    NORM_TOO_LARGE = "norm_too_large"
    BAD_METRICS = "bad_metrics"
    DUPLICATE = "duplicate"


@dataclass
class Rejected(Exception):
    """A refused update: a typed ``reason`` plus a human sentence for the worker's log."""

    reason: Reason
    detail: str

    def __str__(self) -> str:
        return f"{self.reason.value}: {self.detail}"


@dataclass(frozen=True)
class Metrics:
    """What a worker reports about its local training (all finite, counts non-negative)."""

    train_loss_mean: float
    train_loss_last: float
    grad_norm_mean: float
    steps: int
    duration: float
    num_samples: int

    def as_dict(self) -> dict[str, float | int]:
        return dict(self.__dict__)


def parse_safetensors(body: bytes, max_header: int = MAX_HEADER_BYTES) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """``(tensors, metadata)`` from safetensors bytes, or ``Rejected(MALFORMED)``.

    Every offset is checked against the body before a view is made; the tensors must tile the data
    section exactly (no gaps, no overlaps, no trailing bytes), as the format requires.
    """
    if len(body) < 8:
        raise Rejected(Reason.MALFORMED, "shorter than a safetensors header")
    (n,) = struct.unpack("<Q", body[:8])
    if n > max_header or n > len(body) - 8:
        raise Rejected(Reason.MALFORMED, f"header length {n} does not fit (body {len(body)} bytes)")
    try:
        header = json.loads(body[8:8 + n].decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise Rejected(Reason.MALFORMED, f"header is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise Rejected(Reason.MALFORMED, "header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise Rejected(Reason.MALFORMED, "__metadata__ must map strings to strings")
    data = memoryview(body)[8 + n:]
    spans: list[tuple[int, int, str]] = []
    tensors: dict[str, np.ndarray] = {}
    for name, info in header.items():
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise Rejected(Reason.MALFORMED, f"tensor {name!r}: entry must have dtype, shape, data_offsets")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if dtype not in _DTYPES:
            raise Rejected(Reason.WRONG_DTYPE, f"tensor {name!r}: unknown dtype {dtype!r}")
        if (not isinstance(shape, list) or len(shape) > 8
                or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 1 << 40 for d in shape)):
            raise Rejected(Reason.MALFORMED, f"tensor {name!r}: bad shape {shape!r}")
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)):
            raise Rejected(Reason.MALFORMED, f"tensor {name!r}: bad data_offsets {offsets!r}")
        begin, end = offsets
        size = math.prod(shape) * _DTYPES[dtype].itemsize
        if not 0 <= begin <= end <= len(data) or end - begin != size:
            raise Rejected(Reason.MALFORMED, f"tensor {name!r}: offsets {offsets} do not fit {dtype}{shape} "
                                             f"in {len(data)} data bytes")
        spans.append((begin, end, name))
        tensors[name] = np.frombuffer(data[begin:end], dtype=_DTYPES[dtype]).reshape(shape) if size else \
            np.zeros(shape, dtype=_DTYPES[dtype])
        if dtype == "BF16":  # bf16 has no numpy dtype; mark it so check_delta reports the dtype precisely
            tensors[name] = tensors[name].view(np.dtype([("bf16", "<u2")]))
    position = 0
    for begin, end, name in sorted(spans):
        if begin != position:
            raise Rejected(Reason.MALFORMED, f"tensor {name!r} starts at {begin}, expected {position}")
        position = end
    if position != len(data):
        raise Rejected(Reason.MALFORMED, f"{len(data) - position} trailing bytes after the tensors")
    return tensors, {str(k): v for k, v in metadata.items()}


def check_delta(delta: Mapping[str, np.ndarray], expected: Mapping[str, tuple[int, ...]], norm_max: float) -> float:
    """Check a ``ΔB`` against the expected keys and shapes (float32 only); returns its global L2 norm."""
    got, want = set(delta), set(expected)
    if got != want:
        missing, extra = sorted(want - got), sorted(got - want)
        raise Rejected(Reason.WRONG_KEYS, f"missing {missing[:3]}{'...' if len(missing) > 3 else ''} "
                                          f"unexpected {extra[:3]}{'...' if len(extra) > 3 else ''}")
    for key in sorted(want):
        arr = delta[key]
        if tuple(arr.shape) != tuple(expected[key]):
            raise Rejected(Reason.WRONG_SHAPE, f"{key}: shape {tuple(arr.shape)}, expected {tuple(expected[key])}")
        if arr.dtype != np.dtype("<f4"):
            raise Rejected(Reason.WRONG_DTYPE, f"{key}: dtype {arr.dtype}, expected float32")
    for key in sorted(want):
        if not np.all(np.isfinite(delta[key])):
            raise Rejected(Reason.NON_FINITE, f"{key} holds NaN or inf")
    norm = delta_norm(delta)
    if not math.isfinite(norm) or norm > norm_max:
        raise Rejected(Reason.NORM_TOO_LARGE, f"delta L2 norm {norm:.4g} is above the cap {norm_max:.4g}")
    return norm


def check_metrics(raw: Mapping[str, Any], max_samples: int) -> Metrics:
    """Typed, finite metrics; ``num_samples`` must be in ``1..max_samples`` (the examples the task held)."""
    fields = ("train_loss_mean", "train_loss_last", "grad_norm_mean", "steps", "duration", "num_samples")
    try:
        floats = {k: float(raw[k]) for k in fields}
    except (KeyError, TypeError, ValueError, OverflowError) as exc:
        raise Rejected(Reason.BAD_METRICS, f"metrics are incomplete or not numbers: {exc}") from None
    bad = [k for k, v in floats.items() if not math.isfinite(v)]
    if bad:
        raise Rejected(Reason.NON_FINITE, f"metrics {', '.join(bad)} are NaN or inf")
    try:
        metrics = Metrics(
            train_loss_mean=float(raw["train_loss_mean"]), train_loss_last=float(raw["train_loss_last"]),
            grad_norm_mean=float(raw["grad_norm_mean"]), steps=_int(raw["steps"]), duration=float(raw["duration"]),
            num_samples=_int(raw["num_samples"]))
    except (KeyError, TypeError, ValueError, OverflowError) as exc:
        raise Rejected(Reason.BAD_METRICS, f"metrics are incomplete or not numbers: {exc}") from None
    if metrics.steps < 1 or metrics.duration < 0 or metrics.grad_norm_mean < 0:
        raise Rejected(Reason.BAD_METRICS, "steps must be >= 1, duration and grad_norm_mean >= 0")
    if not 1 <= metrics.num_samples <= max_samples:
        raise Rejected(Reason.BAD_METRICS, f"num_samples {metrics.num_samples} is outside 1..{max_samples} "
                                           "(the examples this task held)")
    return metrics


def check_staleness(task_version: int, current_version: int, max_staleness: int) -> int:
    """Versions behind the current one; refused beyond ``max_staleness`` (or from the future)."""
    staleness = current_version - task_version
    if staleness < 0:
        raise Rejected(Reason.UNKNOWN_TASK, f"task version {task_version} is newer than {current_version}")
    if staleness > max_staleness:
        raise Rejected(Reason.STALE, f"update is {staleness} versions behind (the cap is {max_staleness}); "
                                     "fetch a new task")
    return staleness


def _int(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError("a boolean is not a count")
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError(f"{value} is not a whole number")
        return int(value)
    return int(value)
