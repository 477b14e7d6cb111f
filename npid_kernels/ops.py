"""The npid operators: loading the compiled library, fake (meta) implementations for
torch.compile, nce_scores' autograd formula (the fused losses' is in C++,
csrc/include/npid/autograd.h), and thin Python entry points.

The schemas live in csrc/include/npid/schemas.h. Loss ops return (per-sample loss, grad_x) from one
pass over the gathered bank rows; their autograd backward only scales the saved grad_x,
so no (B, K+1, d) tensor exists in forward or backward. The bank never receives a
gradient (it is a buffer updated by momentum_update_, as in lemniscate). Every loss takes
`proximal` (the paper's eq. 10: lambda * ||x_b - bank[y_b]||^2 added to each sample's loss)
and returns, last, positive_sq_dist = ||x_b - bank[y_b]||^2 per sample from the same pass
(the entry points append it with with_sq_dist=True).
"""
from __future__ import annotations

import contextlib
import math
from typing import Optional

import torch

from . import _C  # noqa: F401  (loads the library; registers torch.ops.npid.*)
from ._checks import _values_readable, all_finite

# The operator library the entry points below call. The tests swap in `npid_emu`, the CUDA
# launchers built against the CPU emulator (scripts/build_emu.py), with _calls_into().
npid = torch.ops.npid

__all__ = [
    "sample_negatives", "nce_scores", "nce_init_z_", "nce_estimate_z_", "nce_loss", "nce_loss_and_z_stat",
    "z_ema_update_",
    "softmax_ce_loss", "shared_negative_rows", "shared_nce_loss", "shared_nce_loss_and_z_stat", "shared_softmax_ce_loss", "momentum_update_", "full_softmax_loss", "full_softmax_loss_and_grad", "round_to_precision", "knn_topk", "cuda_available", "PRECISIONS",
]


def cuda_available() -> bool:
    """Whether the compiled library holds CUDA kernels (and a GPU is visible)."""
    return torch.cuda.is_available() and torch._C._dispatch_has_kernel_for_dispatch_key("npid::nce_loss", "CUDA")


# ---------------------------------------------------------------- fake implementations and autograd

def _same_device(x, x_name="x", **others):
    """The device check of csrc/include/npid/checks.h, in the fakes: a meta tensor among real ones
    sends the call to the fake (Meta) kernel, which would otherwise return uninitialised memory."""
    for name, t in others.items():
        if t is not None:
            torch._check(t.device == x.device, lambda: f"{name} is on {t.device} but {x_name} is on {x.device}")


def _register_python_side(ns: str) -> None:
    """Fakes (torch.compile, opcheck) and autograd formulas for the ops of library `ns`."""

    @torch.library.register_fake(f"{ns}::sample_negatives")
    def _(y, rng_state, n_data, num_negatives, exclude_positive=False):
        _same_device(y, "y", rng_state=rng_state)
        return y.new_empty((y.shape[0], num_negatives + 1))

    @torch.library.register_fake(f"{ns}::nce_scores")
    def _(x, bank, idx, temperature):
        _same_device(x, bank=bank, idx=idx)
        torch._check(idx.shape[0] == x.shape[0], lambda: "idx and x must have the same batch size")
        return x.new_empty(idx.shape)

    @torch.library.register_fake(f"{ns}::nce_scores_backward")
    def _(grad_out, out, x, bank, idx, temperature):
        _same_device(x, bank=bank, idx=idx, grad_out=grad_out)
        return torch.empty_like(x, memory_format=torch.contiguous_format)

    @torch.library.register_fake(f"{ns}::nce_init_z_")
    def _(z, scores, n_data):
        _same_device(scores, "scores", z=z)
        return None

    @torch.library.register_fake(f"{ns}::nce_estimate_z_")
    def _(z, x, bank, y, idx, rng_state, num_negatives, temperature, n_data=-1, exclude_positive=False):
        _same_device(x, z=z, bank=bank, y=y, idx=idx, rng_state=rng_state)
        return None

    def _loss_and_grad_fake(x):
        return x.new_empty((x.shape[0],)), torch.empty_like(x, memory_format=torch.contiguous_format)

    def _sq_dist_fake(x):
        """positive_sq_dist: (B,) in the accumulation dtype (float64 for double x, else float32)."""
        return (x.new_empty((x.shape[0],), dtype=torch.float64 if x.dtype == torch.float64 else torch.float32),)

    def _noise_exp_sum_fake(x):
        return (x.new_empty((x.shape[0],), dtype=torch.float64),)

    @torch.library.register_fake(f"{ns}::nce_loss")
    def _(x, bank, y, idx, rng_state, z, num_negatives, temperature, n_data=-1, exclude_positive=False,
          proximal=0.0):
        _same_device(x, bank=bank, y=y, idx=idx, rng_state=rng_state, z=z)
        return _loss_and_grad_fake(x) + _noise_exp_sum_fake(x) + _sq_dist_fake(x)

    @torch.library.register_fake(f"{ns}::softmax_ce_loss")
    def _(x, bank, y, idx, rng_state, num_negatives, temperature, exclude_positive=False, proximal=0.0):
        _same_device(x, bank=bank, y=y, idx=idx, rng_state=rng_state)
        return _loss_and_grad_fake(x) + _sq_dist_fake(x)

    @torch.library.register_fake(f"{ns}::shared_nce_loss")
    def _(x, bank, y, rows, rng_state, z, num_negatives, temperature, exclude_positive=False, n_data=-1,
          precision="fp32", chunk_rows=-1, proximal=0.0):
        _same_device(x, bank=bank, y=y, rows=rows, rng_state=rng_state, z=z)
        return _loss_and_grad_fake(x) + _noise_exp_sum_fake(x) + _sq_dist_fake(x)

    @torch.library.register_fake(f"{ns}::shared_softmax_ce_loss")
    def _(x, bank, y, rows, rng_state, num_negatives, temperature, exclude_positive=False, precision="fp32",
          chunk_rows=-1, proximal=0.0):
        _same_device(x, bank=bank, y=y, rows=rows, rng_state=rng_state)
        return _loss_and_grad_fake(x) + _sq_dist_fake(x)

    @torch.library.register_fake(f"{ns}::full_softmax_loss")
    def _(x, bank, y, temperature, precision="fp32", compute_grad=True, proximal=0.0):
        _same_device(x, bank=bank, y=y)
        return _loss_and_grad_fake(x) + _sq_dist_fake(x)

    @torch.library.register_fake(f"{ns}::momentum_update_")
    def _(bank, x, y, momentum):
        _same_device(x, bank=bank, y=y)
        return None

    @torch.library.register_fake(f"{ns}::knn_topk")
    def _(query, bank, k, precision="fp32"):
        _same_device(query, "query", bank=bank)
        return query.new_empty((query.shape[0], k)), query.new_empty((query.shape[0], k), dtype=torch.int64)

    # autograd

    def _scores_setup(ctx, inputs, output):
        x, bank, idx, temperature = inputs
        ctx.save_for_backward(output, x, bank, idx)
        ctx.temperature = temperature

    def _scores_backward(ctx, grad_out):
        out, x, bank, idx = ctx.saved_tensors
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = getattr(torch.ops, ns).nce_scores_backward(grad_out.contiguous(), out, x, bank, idx, ctx.temperature)
        return grad_x, None, None, None

    torch.library.register_autograd(f"{ns}::nce_scores", _scores_backward, setup_context=_scores_setup)

    # The fused losses (nce_loss, softmax_ce_loss, full_softmax_loss, shared_*_loss) have their
    # autograd in C++ (csrc/include/npid/autograd.h): backward scales the saved grad_x.


_register_python_side("npid")


@contextlib.contextmanager
def _calls_into(namespace: str):
    """Route the entry points of this module (and so the nn modules and knn functions built on
    them) to another operator library with the same schemas, e.g. the emulated CUDA one."""
    global npid
    saved, npid = npid, getattr(torch.ops, namespace)
    try:
        yield
    finally:
        npid = saved


@contextlib.contextmanager
def _cpu_switch(name: str, value: str):
    """Sets a run-time switch of the CPU kernels (csrc/cpu/cpu_switches.cpp) for the block, yields
    the value in effect (an ISA is capped at what the CPU has), and restores the previous one."""
    get, set_ = getattr(torch.ops.npid, f"_cpu_{name}"), getattr(torch.ops.npid, f"_set_cpu_{name}")
    before = get()
    set_(value)
    try:
        yield get()
    finally:
        set_(before)


def _cpu_isa(isa: str):
    """Tests and experiments: run the CPU hot loops with "baseline", "avx2" or "avx512" inside the block."""
    return _cpu_switch("isa", isa)


def _cpu_pair_order(order: str):
    """Tests and experiments: the CPU fused losses visit their pairs in "sample" or "tile" order inside
    the block ("auto", the default, picks by problem size)."""
    return _cpu_switch("pair_order", order)


# ---------------------------------------------------------------- Python entry points

def _finite(t: torch.Tensor, name: str) -> None:
    """The loss and search kernels return NaN for non-finite features; refuse them where the values
    can be read without a sync (CPU; CUDA with NPID_CUDA_SYNC_CHECKS=1)."""
    if isinstance(t, torch.Tensor) and t.numel() and _values_readable(t) and not all_finite(t):
        raise ValueError(f"{name} holds NaN or inf")


def _check_proximal(proximal) -> float:
    """The proximal weight lambda as the ops take it: a finite number >= 0."""
    if isinstance(proximal, bool) or not isinstance(proximal, (int, float)) or not math.isfinite(proximal) \
            or proximal < 0:
        raise ValueError(f"proximal must be a finite number >= 0 (the weight of the proximal term), got {proximal!r}")
    return float(proximal)


def _returned(outputs, keep, with_sq_dist: bool):
    """The entry points' results: the outputs at positions `keep`, plus positive_sq_dist (the ops'
    last output) when asked for; a single tensor when that is all there is."""
    picked = tuple(outputs[i] for i in keep) + ((outputs[-1],) if with_sq_dist else ())
    return picked[0] if len(picked) == 1 else picked


def sample_negatives(y: torch.Tensor, rng_state: torch.Tensor, n_data: int, num_negatives: int,
                     exclude_positive: bool = False) -> torch.Tensor:
    """(B, K+1) int64 rows, column 0 = y, the rest uniform in [0, n_data): the same rows the
    fused losses draw in-kernel from the same rng_state = [seed, offset]. exclude_positive: the
    rest uniform over the n_data - 1 rows other than y[b] (a negative never equals its positive)."""
    return npid.sample_negatives(y, rng_state, n_data, num_negatives, exclude_positive)


def shared_negative_rows(rng_state: torch.Tensor, n_data: int, num_negatives: int) -> torch.Tensor:
    """The (m,) noise rows the shared-negative losses draw in-kernel from rng_state: sample 0 of
    a one-sample sample_negatives draw."""
    first = torch.zeros(1, dtype=torch.int64, device=rng_state.device)
    return npid.sample_negatives(first, rng_state, n_data, num_negatives, False)[0, 1:]


def nce_scores(x: torch.Tensor, bank: torch.Tensor, idx: torch.Tensor, temperature: float) -> torch.Tensor:
    """exp(bank[idx[b, k]] . x[b] / T), (B, K+1), differentiable w.r.t. x (lemniscate's
    NCEAverage before the division by Z)."""
    _finite(x, "x")
    return npid.nce_scores(x, bank, idx, temperature)


def nce_init_z_(z: torch.Tensor, scores: torch.Tensor, n_data: int) -> None:
    """Where z <= 0 (not set yet): z = mean(scores) * n_data, without a host sync on the GPU."""
    npid.nce_init_z_(z, scores.detach(), n_data)


def nce_estimate_z_(z, x, bank, y, *, idx=None, rng_state=None, num_negatives: int = -1, temperature: float = 0.07,
                    n_data: Optional[int] = None, exclude_positive: bool = False) -> None:
    """nce_init_z_ computed from the rows themselves (the fused path's first step). n_data: see nce_loss."""
    npid.nce_estimate_z_(z, x.detach(), bank, y, idx, rng_state, num_negatives, temperature,
                         -1 if n_data is None else n_data, exclude_positive)


def nce_loss(x, bank, y, z, *, idx: Optional[torch.Tensor] = None, rng_state: Optional[torch.Tensor] = None,
             num_negatives: int = -1, temperature: float = 0.07, n_data: Optional[int] = None,
             exclude_positive: bool = False, proximal: float = 0.0, with_sq_dist: bool = False):
    """Per-sample NCE loss (lemniscate's NCECriterion times the batch size), one fused pass.
    Rows come from idx (B, K+1) if given, else K = num_negatives are drawn in-kernel
    (exclude_positive: none equal to the sample's own row, see sample_negatives).
    n_data: the bank size n of the noise distribution when `bank` holds only the rows idx
    points into (a shard's fetched rows); default bank.shape[0].
    proximal = lambda adds the paper's proximal term lambda * ||x_b - bank[y_b]||^2 (eq. 10; the
    positive is idx[:, 0] when idx is given). with_sq_dist: return (loss, positive_sq_dist), the
    latter (B,) ||x_b - bank[y_b]||^2 in float32 (float64 for double x), not differentiable."""
    _finite(x, "x")
    proximal = _check_proximal(proximal)
    out = npid.nce_loss(x, bank, y, idx, rng_state, z, num_negatives, temperature,
                        -1 if n_data is None else n_data, exclude_positive, proximal)
    return _returned(out, (0,), with_sq_dist)


def nce_loss_and_z_stat(x, bank, y, z, *, idx: Optional[torch.Tensor] = None,
                        rng_state: Optional[torch.Tensor] = None, num_negatives: int = -1,
                        temperature: float = 0.07, n_data: Optional[int] = None, exclude_positive: bool = False,
                        proximal: float = 0.0, with_sq_dist: bool = False):
    """(per-sample NCE loss, noise_exp_sum) from the same fused pass as nce_loss.
    noise_exp_sum (B,) float64, not differentiable: per sample, the sum of exp(s_k) over the
    K noise columns (k >= 1, the positive left out). n * noise_exp_sum.sum() / (B * K) is the
    step's Monte Carlo estimate of Z = sum_j exp(v_j . x / T) under uniform noise.
    proximal, with_sq_dist: as nce_loss (positive_sq_dist appended last)."""
    _finite(x, "x")
    proximal = _check_proximal(proximal)
    out = npid.nce_loss(x, bank, y, idx, rng_state, z, num_negatives, temperature,
                        -1 if n_data is None else n_data, exclude_positive, proximal)
    return _returned(out, (0, 2), with_sq_dist)


def z_ema_update_(z: torch.Tensor, noise_exp_sum: torch.Tensor, num_noise, n_data: int, alpha: float) -> None:
    """Z <- alpha * Z + (1 - alpha) * n * sum(noise_exp_sum) / num_noise, in place with device
    ops (no host sync). num_noise: the number of noise scores summed (B * K; a device tensor
    when it comes from an all_reduce across ranks). A non-finite estimate leaves Z unchanged."""
    if not 0 <= alpha < 1:
        raise ValueError(f"alpha (z_momentum) must be in [0, 1), got {alpha}")
    with torch.no_grad():
        estimate = noise_exp_sum.sum().double() * float(n_data) / num_noise
        new = z.double() * alpha + estimate * (1.0 - alpha)
        ok = torch.isfinite(new) & (new > 0)
        z.copy_(torch.where(ok, new, z.double()).to(z.dtype))


def softmax_ce_loss(x, bank, y, *, idx: Optional[torch.Tensor] = None, rng_state: Optional[torch.Tensor] = None,
                    num_negatives: int = -1, temperature: float = 0.07, exclude_positive: bool = False,
                    proximal: float = 0.0, with_sq_dist: bool = False):
    """Per-sample -log softmax over the positive and K negatives (InfoNCE), one fused pass.
    proximal, with_sq_dist: as nce_loss."""
    _finite(x, "x")
    proximal = _check_proximal(proximal)
    out = npid.softmax_ce_loss(x, bank, y, idx, rng_state, num_negatives, temperature, exclude_positive, proximal)
    return _returned(out, (0,), with_sq_dist)


def shared_nce_loss_and_z_stat(x, bank, y, z, *, rows: Optional[torch.Tensor] = None,
                               rng_state: Optional[torch.Tensor] = None, num_negatives: int = -1,
                               temperature: float = 0.07, exclude_positive: bool = False,
                               n_data: Optional[int] = None, precision: str = "fp32",
                               chunk_rows: int = -1, proximal: float = 0.0, with_sq_dist: bool = False):
    """NCE with shared negatives: one set of m = num_negatives noise rows (explicit (m,) `rows`, or
    drawn in-kernel from rng_state, see shared_negative_rows) scored against every sample by a
    GEMM, chunk_rows rows at a time; the positive is each sample's own row y[b]. Pn = 1/n and
    c = m / n as with per-sample noise. Returns (per-sample loss, noise_exp_sum): the latter (B,)
    float64 sums exp(s) over the m noise columns, so n * noise_exp_sum.sum() / (B * m) estimates Z.
    A noise row equal to a sample's positive stays a negative for it (lemniscate keeps such
    collisions) unless exclude_positive, which replaces that column for that sample by a row
    uniform over the other n - 1 (Philox, deterministic). precision: as full_softmax_loss.
    proximal, with_sq_dist: as nce_loss (the proximal term uses the stored row, whatever precision)."""
    _finite(x, "x")
    proximal = _check_proximal(proximal)
    out = npid.shared_nce_loss(x, bank, y, rows, rng_state, z, num_negatives, temperature, exclude_positive,
                               -1 if n_data is None else n_data, precision, chunk_rows, proximal)
    return _returned(out, (0, 2), with_sq_dist)


def shared_nce_loss(x, bank, y, z, *, with_sq_dist: bool = False, **kwargs):
    """Per-sample NCE loss with shared negatives (and positive_sq_dist with with_sq_dist); arguments as
    shared_nce_loss_and_z_stat."""
    out = shared_nce_loss_and_z_stat(x, bank, y, z, with_sq_dist=with_sq_dist, **kwargs)
    return (out[0], out[2]) if with_sq_dist else out[0]


def shared_softmax_ce_loss(x, bank, y, *, rows: Optional[torch.Tensor] = None,
                           rng_state: Optional[torch.Tensor] = None, num_negatives: int = -1,
                           temperature: float = 0.07, exclude_positive: bool = False, precision: str = "fp32",
                           chunk_rows: int = -1, proximal: float = 0.0, with_sq_dist: bool = False):
    """Per-sample -log softmax over [own row, the m shared noise rows] (InfoNCE with shared
    negatives, MoCo's form with NPID's bank); arguments as shared_nce_loss_and_z_stat."""
    _finite(x, "x")
    proximal = _check_proximal(proximal)
    out = npid.shared_softmax_ce_loss(x, bank, y, rows, rng_state, num_negatives, temperature, exclude_positive,
                                      precision, chunk_rows, proximal)
    return _returned(out, (0,), with_sq_dist)


PRECISIONS = ("fp32", "tf32", "bf16")


def round_to_precision(t: torch.Tensor, precision: str) -> torch.Tensor:
    """t rounded (to nearest even) to the format whose products a "tf32"/"bf16" scan forms, kept in
    t's dtype (float64 through float32, as in the kernels); "fp32" leaves t unchanged. Not
    differentiable: for the products of tensors the kernels read."""
    if precision == "fp32":
        return t
    f = t.float()
    if precision == "bf16":
        return f.to(torch.bfloat16).to(t.dtype)
    bits = torch.where(f.isnan(), 0.0, f).view(torch.int32)
    bits = (bits + ((bits >> 13) & 1) + 0x0FFF) & ~0x1FFF  # drop 13 of 23 mantissa bits
    return torch.where(f.isnan(), f, bits.view(torch.float32)).to(t.dtype)


def full_softmax_loss(x, bank, y, temperature: float = 0.07, precision: str = "fp32", proximal: float = 0.0, *,
                      with_sq_dist: bool = False):
    """Per-sample exact non-parametric softmax loss over the whole bank, streamed in chunks.

    precision of the x . bank products: "fp32" (exact, also when TF32 is enabled globally),
    "tf32" or "bf16" (both operands rounded to that format, tensor cores on CUDA). Sums and
    the logsumexp stay in float32 (float64 for double x) in every mode. Without autograd
    (no_grad, or x not requiring grad) the gradient's GEMM is skipped.
    proximal, with_sq_dist: as nce_loss (the proximal term uses the stored rows, whatever precision)."""
    _finite(x, "x")
    proximal = _check_proximal(proximal)
    compute_grad = torch.is_grad_enabled() and x.requires_grad
    out = npid.full_softmax_loss(x, bank, y, temperature, precision, compute_grad, proximal)
    return _returned(out, (0,), with_sq_dist)


def full_softmax_loss_and_grad(x, bank, y, temperature: float = 0.07, precision: str = "fp32",
                               proximal: float = 0.0, *, with_sq_dist: bool = False):
    """(per-sample loss, its gradient w.r.t. x) of full_softmax_loss, both from the one pass and
    outside autograd (a sharded bank combines the shards' gradients itself); with_sq_dist appends
    positive_sq_dist."""
    _finite(x, "x")
    proximal = _check_proximal(proximal)
    out = npid.full_softmax_loss(x, bank, y, temperature, precision, True, proximal)
    return _returned(out, (0, 1), with_sq_dist)


def momentum_update_(bank: torch.Tensor, x: torch.Tensor, y: torch.Tensor, momentum: float = 0.5) -> None:
    """bank[y] <- normalise(momentum * bank[y] + (1 - momentum) * x) in place; duplicates: last wins."""
    npid.momentum_update_(bank, x.detach(), y, momentum)


def knn_topk(query: torch.Tensor, bank: torch.Tensor, k: int, precision: str = "fp32"):
    """(similarities, indices) of the k largest query . bank rows, sorted descending;
    precision of the products as in full_softmax_loss. NaN rows and queries are not refused here
    (they rank as torch.topk ranks NaN); nearest_neighbors and the kNN functions refuse them."""
    return npid.knn_topk(query, bank, k, precision)


def cpu_scratch_bytes(reset_peak: bool = False):
    """(live, peak): bytes the CPU kernels hold in scratch buffers now, and at most since the last
    reset (both read before `reset_peak` restarts the peak from what is live). These buffers are
    outside ATen's allocator, so torch's memory statistics do not see them; the benchmarks add the
    peak to the allocator's to report a call's whole extra memory."""
    live, peak = torch.ops.npid._cpu_scratch_bytes(bool(reset_peak))
    return live, peak
