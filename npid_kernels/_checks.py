"""Argument checks of the Python entry points (nn modules, kNN functions, distributed wrappers),
in the caller's own vocabulary: NPIDLoss's `features`/`indices`, the lemniscate drop-ins' `x`/`y`,
kNN's `query`/`bank_labels`, and `idx` only for an idx the caller passed. They run before any
kernel, so a refused call leaves the bank (and Z) as they were.

Value checks (out-of-range rows, NaN/inf) read the tensor's values: always on the CPU; on CUDA
only with NPID_CUDA_SYNC_CHECKS=1, because reading a CUDA tensor's values syncs the host and
the CUDA hot path is designed not to (bad rows then give NaN results, see
csrc/cuda/host_common.h). Under torch.compile they are left to the ops' own checks.

Errors: TypeError (not a tensor), IndexError (a row outside the bank), ValueError (the rest).
The modules share them from here, not from one another.
"""
from __future__ import annotations

import math
import operator
import os
from typing import Optional, Sequence

import torch


def _values_readable(t: torch.Tensor) -> bool:
    """Whether the values of t may be read here without a hidden device sync or graph break."""
    if torch.compiler.is_compiling():
        return False
    if t.device.type == "cpu":
        return True
    # As csrc/cuda/host_common.h's sync_checks_enabled: set and not "0", and no graph capture.
    return (t.device.type == "cuda" and os.environ.get("NPID_CUDA_SYNC_CHECKS", "0") not in ("", "0")
            and not torch.cuda.is_current_stream_capturing())


def all_finite(t: torch.Tensor) -> bool:
    """Whether every value of t is finite. A finite sum means they all are (NaN and inf carry
    into it); only a sum that overflowed needs the elementwise test. One reduction: ~5 us on a
    CPU batch of features, where isfinite(t).all() takes ~45 us (1% of a training step)."""
    return math.isfinite(t.sum().item()) or bool(torch.isfinite(t).all())


def _shape(shape: Sequence) -> str:
    return "(" + ", ".join(str(s) for s in shape) + (",)" if len(shape) == 1 else ")")


def tensor(t, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def same_device(t: torch.Tensor, name: str, ref: torch.Tensor, ref_name: str) -> None:
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}")


def features(t, name: str, dim: int, *, allow_empty: bool = False, finite: bool = True) -> None:
    """A (batch, dim) floating-point tensor, non-empty, finite."""
    tensor(t, name)
    if t.dim() != 2 or t.shape[1] != dim:
        raise ValueError(f"{name} must have shape (batch, {dim}), got {tuple(t.shape)}")
    if t.shape[0] == 0 and not allow_empty:
        raise ValueError(f"{name} is an empty batch (batch size 0)")
    if not t.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor (float32 or float64), got {t.dtype}")
    if finite and t.numel() and _values_readable(t) and not all_finite(t):
        raise ValueError(f"{name} holds NaN or inf")


def rows(t, name: str, n: int, shape: Sequence[int], ref: torch.Tensor, ref_name: str,
         what: str = "the bank", check_range: bool = True) -> None:
    """An int64 tensor of the given shape on ref's device whose values are rows in [0, n)."""
    tensor(t, name)
    if t.dtype != torch.int64:
        raise ValueError(f"{name} must be int64 (torch.long), got {t.dtype}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {_shape(shape)}, got {tuple(t.shape)}")
    same_device(t, name, ref, ref_name)
    if check_range:
        in_range(t, name, n, what)


def in_range(t: torch.Tensor, name: str, n: int, what: str = "the bank") -> None:
    """Every value in [0, n); the error names the first one outside (in t's order), as the ops do.
    (Two compares: int64 aminmax is ~15x slower on the CPU.)"""
    if t.numel() and _values_readable(t):
        outside = (t < 0) | (t >= n)
        if bool(outside.any()):
            bad = int(t.reshape(-1)[outside.reshape(-1).nonzero()[0, 0]])
            raise IndexError(f"{name} holds row {bad}, outside {what} [0, {n})")


def labels(t, name: str, num_classes: int, shape: Sequence[int], ref: torch.Tensor, ref_name: str) -> None:
    """Integer class labels of the given shape on ref's device, in [0, num_classes)."""
    tensor(t, name)
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor, got {t.dtype}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {_shape(shape)}, got {tuple(t.shape)}")
    same_device(t, name, ref, ref_name)
    if t.numel() and _values_readable(t):
        lo, hi = torch.aminmax(t)
        if int(lo) < 0 or int(hi) >= num_classes:
            raise ValueError(f"{name} must be in [0, num_classes = {num_classes}), got values in "
                             f"[{int(lo)}, {int(hi)}]")


def positive_column(idx: torch.Tensor, positives: torch.Tensor, name: str) -> None:
    """idx[:, 0] must be the positives (the loss takes its positive row from idx[:, 0], the bank
    update from `positives`)."""
    if _values_readable(idx):
        differ = (idx[:, 0] != positives).nonzero()
        if differ.numel():
            b = int(differ[0, 0])
            raise ValueError(f"idx[:, 0] must equal {name} (the positives): idx[{b}, 0] = {int(idx[b, 0])} "
                             f"but {name}[{b}] = {int(positives[b])}")


def count(value, name: str, low: int, high: Optional[int] = None, high_name: str = "") -> None:
    """An int in [low, high]."""
    if isinstance(value, bool) or not hasattr(type(value), "__index__"):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    value = operator.index(value)
    if value < low or (high is not None and value > high):
        bound = f"[{low}, {high_name or high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be {'in ' if high is not None else ''}{bound}, got {value}")


def bank_size(num_data: int, dim: int, num_negatives: Optional[int] = None) -> None:
    if num_data < 1 or dim < 1:
        raise ValueError(f"the bank needs num_data >= 1 and dim >= 1, got {num_data} x {dim}")
    if num_negatives is not None and not 1 <= num_negatives < num_data:
        raise ValueError(f"K (num_negatives) must be in [1, num_data = {num_data}), got {num_negatives}")


def batch(x, indices, memory: torch.Tensor, names=("features", "indices"), num_data: Optional[int] = None):
    """A module's (features, indices) batch against its bank, in the caller's names (NPIDLoss:
    features/indices; the lemniscate drop-ins: x/y): shapes, dtypes, devices, and on the CPU
    (or with NPID_CUDA_SYNC_CHECKS=1) rows in [0, num_data) and finite features. num_data: the
    bank's rows (default memory.shape[0]; a shard passes the whole bank's)."""
    f, i = names
    features(x, f, memory.shape[1])
    if x.device != memory.device:
        raise ValueError(f"{f} is on {x.device} but the module's bank is on {memory.device} "
                         "(move the module with .to())")
    rows(indices, i, memory.shape[0] if num_data is None else num_data, (x.shape[0],), x, f)


def knn_search(query, bank, k: int, k_name: str = "k") -> None:
    """query (Q, d) and bank (n, d), float, same device, finite (on the CPU), 1 <= k <= n."""
    tensor(bank, "bank")
    if bank.dim() != 2 or bank.shape[0] == 0 or bank.shape[1] == 0:
        raise ValueError(f"bank must be a non-empty 2-D (n_data, dim) tensor, got shape {tuple(bank.shape)}")
    if not bank.is_floating_point():
        raise ValueError(f"bank must be a floating-point tensor, got {bank.dtype}")
    features(query, "query", bank.shape[1], allow_empty=True)
    same_device(query, "query", bank, "bank")
    count(k, k_name, 1, bank.shape[0], f"n_data = {bank.shape[0]}")
    if bank.numel() and _values_readable(bank) and not all_finite(bank):
        raise ValueError("bank holds NaN or inf")


def knn_temperature(temperature) -> None:
    if not (isinstance(temperature, (int, float)) and temperature > 0 and temperature != float("inf")):
        raise ValueError(f"temperature must be positive and finite, got {temperature}")


def bank_labels(t, num_classes: int, n: int, bank: torch.Tensor) -> None:
    """The labels of all n bank rows, in [0, num_classes), also on CUDA (kNN evaluation)."""
    count(num_classes, "num_classes", 1)
    labels(t, "bank_labels", num_classes, (n,), bank, "bank")
    if t.numel() and (t.min() < 0 or t.max() >= num_classes):
        raise ValueError(f"bank_labels must be in [0, num_classes = {num_classes})")


def recall_ks(values, n: int):
    """The r of recall@r: ints >= 1; those above n are left out (the neighbours of all n rows)."""
    values = list(values)
    for r in values:
        count(r, "recall_ks entries", 1)
    return sorted(set(int(r) for r in values if r <= n))


def proximal(value, name: str = "proximal") -> None:
    """The proximal term's lambda: a finite number >= 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} (lambda of the proximal term) must be a number, got {type(value).__name__}")
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} (lambda of the proximal term) must be a finite number >= 0, got {value!r}")
