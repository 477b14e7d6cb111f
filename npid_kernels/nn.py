"""nn modules: lemniscate drop-ins (NCEAverage, NCECriterion, LinearAverage) and the
recommended fast path, NPIDLoss (alias NCELoss): sampling, one-pass loss and the bank
update in one module whose state_dict holds the bank, Z and the sampler state, with the bank
on one process or placed across a process group (npid_kernels.placement).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from . import _checks as C
from . import ops
from .dist_utils import agreed_seed
from .placement import LocalBank, MemoryBank, ReplicatedBank, ShardedBank, lemniscate_bank_init

LOSSES = ("nce", "softmax-ce", "softmax")
Z_MODES = ("first-batch", "ema", "batch")
NEGATIVES = ("per-sample", "shared")
PLACEMENTS = ("local", "replicated", "sharded")
NCE_EPS = 1e-7  # lemniscate's NCECriterion eps


def _check_bank_dtype(features: torch.Tensor, memory: torch.Tensor, name: str = "features"):
    if memory.dtype != features.dtype and memory.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"{name} is {features.dtype} but the module's bank is {memory.dtype}: the bank must be "
                         f"in {name}'s dtype or bfloat16/float16 (convert {name}, or the module with .to(dtype))")


def _check_idx(idx, batch: int, num_negatives: int, num_data: int, features: torch.Tensor, features_name: str,
               positives: Optional[torch.Tensor] = None, positives_name: str = "indices",
               check_range: bool = False):
    """An explicit (batch, K+1) idx. positives given: idx[:, 0] must equal them (NPIDLoss);
    None: column 0 is overwritten (the drop-ins, as lemniscate) and not checked. The rows' range
    is left to the ops by default: they check it in their pass over the rows (CPU; CUDA with
    NPID_CUDA_SYNC_CHECKS=1), before any output or bank row is written, with the message
    "idx holds row r, outside the bank [0, n)"; a second pass over B x (K+1) rows here would
    cost ~10% of a CPU step."""
    C.rows(idx, "idx", num_data, (batch, num_negatives + 1), features, features_name, check_range=False)
    if check_range:
        C.in_range(idx if positives is not None else idx[:, 1:], "idx", num_data)
    if positives is not None:
        C.positive_column(idx, positives, positives_name)


def _check_loss_args(loss: str, num_data: int, dim: int, num_negatives: int, temperature: float, momentum: float,
                     precision: str = "fp32", z_mode: str = "first-batch", z_momentum: float = 0.99,
                     z: Optional[float] = None, negatives: str = "per-sample", exclude_positive: bool = False,
                     proximal: float = 0.0):
    """NPIDLoss's constructor checks (every placement's)."""
    C.proximal(proximal)
    if negatives not in NEGATIVES:
        raise ValueError(f"negatives must be one of {NEGATIVES}, got {negatives!r}")
    if not isinstance(exclude_positive, bool):
        raise TypeError(f"exclude_positive must be a bool, got {type(exclude_positive).__name__}")
    if loss == "softmax" and (negatives != "per-sample" or exclude_positive):
        raise ValueError("negatives='shared' and exclude_positive apply to the sampled losses 'nce' and "
                         "'softmax-ce'; loss='softmax' scans the whole bank")
    if z_mode not in Z_MODES:
        raise ValueError(f"z_mode must be one of {Z_MODES}, got {z_mode!r}")
    if not (isinstance(z_momentum, (int, float)) and 0 <= z_momentum < 1):
        raise ValueError(f"z_momentum (the EMA's alpha) must be in [0, 1), got {z_momentum!r}")
    if z is not None and not (math.isfinite(z) and z > 0):
        raise ValueError(f"z must be a positive finite number (or None to estimate it), got {z!r}")
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    if precision not in ops.PRECISIONS:
        raise ValueError(f"precision must be one of {ops.PRECISIONS}, got {precision!r}")
    if precision != "fp32" and loss != "softmax" and negatives != "shared":
        raise ValueError(f"precision={precision!r} applies to loss='softmax' and negatives='shared' (GEMMs); "
                         f"per-sample negatives gather rows and always compute in fp32")
    C.bank_size(num_data, dim, None if loss == "softmax" or negatives == "shared" else num_negatives)
    if negatives == "shared":  # m >= n is allowed: m draws with replacement, NCE's c = m / n > 1
        C.count(num_negatives, "num_negatives (m, the shared noise rows)", 1)
    if exclude_positive and num_data < 2:
        raise ValueError("exclude_positive needs num_data >= 2")
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if not 0 <= momentum <= 1:
        raise ValueError(f"momentum must be in [0, 1], got {momentum}")


class _UpdateBankAfterBackward(torch.autograd.Function):
    """Identity on the features whose backward runs the momentum update, after the loss's
    backward has read the bank (lemniscate updates the memory in backward, too)."""

    @staticmethod
    def forward(ctx, x, memory, y, momentum):
        ctx.memory, ctx.y, ctx.momentum = memory, y, momentum
        ctx.features = x.detach()
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        ops.momentum_update_(ctx.memory, ctx.features, ctx.y, ctx.momentum)
        return grad, None, None, None


class _LemniscateParams(nn.Module):
    """The drop-ins' `params` buffer, read the way lemniscate reads it (params[i].item() in its
    forward/backward): T and momentum are the buffer's values in the buffer's own dtype, float32(T)
    under torch's default float32 dtype, T exactly under float64. They are cached as Python floats
    (an .item() every step would sync the GPU) and re-read whenever the buffer can change: after
    .to()/.double()/.cuda() and after load_state_dict."""

    _T_SLOT, _MOMENTUM_SLOT = 0, 1

    def _init_params(self, values) -> None:
        self.register_buffer("params", torch.tensor(values))  # torch's default dtype, as lemniscate
        self._read_params()
        self.register_load_state_dict_post_hook(lambda module, incompatible: module._read_params())

    def _read_params(self) -> None:
        if self.params.is_meta:
            return
        values = self.params.detach().cpu()
        self.T = float(values[self._T_SLOT])
        self.momentum = float(values[self._MOMENTUM_SLOT])

    def _apply(self, fn, *args, **kwargs):
        out = super()._apply(fn, *args, **kwargs)
        self._read_params()
        return out


class NCEAverage(_LemniscateParams):
    """Drop-in for lemniscate's lib/NCEAverage.py: forward(x, y) returns P (B, K+1), the
    normalised exp scores of the positive (column 0) and K uniform noise rows; the memory
    is updated during backward. Z (params[2]) is estimated from the first batch on the device.

    forward(x, y, idx=None): an explicit (B, K+1) idx replaces sampling (column 0 is
    overwritten with y, as lemniscate does).
    """

    def __init__(self, inputSize: int, outputSize: int, K: int, T: float = 0.07, momentum: float = 0.5,
                 Z: Optional[float] = None):
        super().__init__()
        C.bank_size(outputSize, inputSize, K)
        self.nLem = outputSize
        self.K = K
        # params = [K, T, Z, momentum] as lemniscate's buffer (it holds Z, and T/momentum as read).
        self._T_SLOT, self._MOMENTUM_SLOT = 1, 3
        self._init_params([K, T, -1 if Z is None else Z, momentum])
        self.register_buffer("memory", lemniscate_bank_init(outputSize, inputSize, torch.get_default_dtype()))

    def forward(self, x: torch.Tensor, y: torch.Tensor, idx: Optional[torch.Tensor] = None) -> torch.Tensor:
        C.batch(x, y, self.memory, ("x", "y"))
        _check_bank_dtype(x, self.memory, "x")
        batch = x.shape[0]
        if idx is None:
            idx = torch.randint(0, self.nLem, (batch, self.K + 1), device=x.device)
        else:
            _check_idx(idx, batch, self.K, self.nLem, x, "x")  # column 0 is y's, as in lemniscate
            idx = idx.clone()
        idx[:, 0] = y
        if torch.is_grad_enabled() and x.requires_grad:
            x = _UpdateBankAfterBackward.apply(x, self.memory, y, self.momentum)
        scores = ops.nce_scores(x, self.memory, idx, self.T)
        z = self.params[2:3]
        ops.nce_init_z_(z, scores, self.nLem)
        return scores / z


def nce_criterion(probs: torch.Tensor, n_data: int) -> torch.Tensor:
    """lemniscate's NCECriterion on NCEAverage's output P (B, K+1): per-sample losses, in the
    log1p forms of -log(P0 / (P0 + c + eps)) and -log(c / (Pk + c + eps)), c = K / n."""
    c = (probs.shape[1] - 1) / n_data
    positive = torch.log1p((c + NCE_EPS) / probs[:, 0])
    negatives = torch.log1p((probs[:, 1:] + NCE_EPS) / c).sum(1)
    return positive + negatives


class NCECriterion(nn.Module):
    """Drop-in for lemniscate's NCECriterion(nLem): the NCE loss of NCEAverage's output,
    summed over the K+1 columns and averaged over the batch (eps = 1e-7)."""

    def __init__(self, nLem: int):
        super().__init__()
        self.nLem = nLem

    def forward(self, x: torch.Tensor, targets: Optional[torch.Tensor] = None) -> torch.Tensor:
        C.tensor(x, "x")
        if x.dim() != 2 or x.shape[0] == 0 or x.shape[1] < 2 or not x.is_floating_point():
            raise ValueError(f"x must be NCEAverage's output, a non-empty float (batch, K+1) tensor with K >= 1, "
                             f"got {tuple(x.shape)} {x.dtype}")
        return nce_criterion(x, self.nLem).sum() / x.shape[0]


class LinearAverage(_LemniscateParams):
    """Drop-in for lemniscate's lib/LinearAverage.py: forward(x, y) returns the logits
    x @ memory.T / T over every instance (feed them to nn.CrossEntropyLoss); the memory is
    updated during backward. For large banks prefer NPIDLoss(loss="softmax"), which never
    materialises the B x n logits."""

    def __init__(self, inputSize: int, outputSize: int, T: float = 0.07, momentum: float = 0.5):
        super().__init__()
        C.bank_size(outputSize, inputSize)
        self.nLem = outputSize
        self._init_params([T, momentum])  # params = [T, momentum], read as lemniscate reads them
        self.register_buffer("memory", lemniscate_bank_init(outputSize, inputSize, torch.get_default_dtype()))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        C.batch(x, y, self.memory, ("x", "y"))  # y in range here, not in cross_entropy or backward
        _check_bank_dtype(x, self.memory, "x")
        if torch.is_grad_enabled() and x.requires_grad:
            x = _UpdateBankAfterBackward.apply(x, self.memory, y, self.momentum)
        return x @ self.memory.to(x.dtype).t() / self.T


class NPIDLoss(nn.Module):
    """NPID in one module: sample negatives, compute the loss in one fused pass, update the bank.

    Args:
        num_data: n, the number of training instances (bank rows).
        dim: feature dimension d (128 in the paper).
        num_negatives: K noise rows per sample for "nce" and "softmax-ce" (4096 in the paper);
            with negatives="shared", m, the noise rows shared by the batch (may exceed num_data).
        temperature: T (0.07).
        momentum: the bank's momentum update, bank[i] <- normalise(momentum * bank[i] + (1 - momentum) * x)
            after each step (0.5; lemniscate's memory momentum). Not the proximal term below.
        loss: "nce" (NCE with Z estimated on the first batch, lemniscate's NCECriterion),
            "softmax-ce" (InfoNCE over the same rows, positive first), or
            "softmax" (the exact non-parametric softmax over all n rows, streamed).
        bank_dtype: float32, or bfloat16/float16 to halve the bank traffic.
        z: the NCE normalisation constant to start from; None estimates it on the first
            batch (lemniscate: Z = n * mean exp(s) over the first batch's K+1 columns).
        z_mode: "first-batch" (lemniscate: Z stays at its first value) or "ema": after every
            training step Z <- z_momentum * Z + (1 - z_momentum) * n * mean(exp(s_k)), the
            mean over the step's B*K noise scores (positives left out), computed by the fused
            loss pass and applied with device ops (no host sync). A step's loss uses the Z from
            before the step. Z tracks the bank as it changes from random to trained features
            (see docs/training.md, "NCE and Z").
            "batch": Z = n * mean(exp(s_k)) over this step's own B*K noise scores, from an
            extra pass over the same rows before the loss (about twice the cost of the loss),
            so the step's loss uses a Z that matches its bank. The mode that trains on small
            banks whose rows change fast (digits, see docs/training.md).
        z_momentum: the EMA's alpha in [0, 1) (0.99; 0 uses the previous step's estimate alone).
        seed: seed of the in-kernel Philox sampler; None draws one from torch's global RNG.
        precision: products of the "softmax" loss's scan over the bank and of the shared
            negatives' GEMMs: "fp32" (exact), "tf32" or "bf16" (tensor cores on CUDA; sums stay fp32).
        negatives: "per-sample" (lemniscate: K rows drawn for each sample, gathered and scored
            row by row) or "shared": one set of m = num_negatives rows drawn per step and scored
            against the whole batch by a GEMM (m * d bank elements read per step instead of
            B * m * d, so m = 65,536 as in MoCo is affordable). NCE keeps Pn = 1/n and c = m / n;
            its Z is estimated from the same noise columns in every z_mode (n * mean exp(s) over
            the step's B * m noise scores). A shared row equal to a sample's own row stays a
            negative for it (as lemniscate keeps collisions) unless exclude_positive.
        exclude_positive: no negative equals its sample's positive. Per-sample: the negatives are
            drawn uniform over the other n - 1 rows in-kernel. Shared: each such column is replaced,
            for that sample only, by a row uniform over the other n - 1 (deterministic Philox;
            on CUDA one host sync per step to list the collisions).
        proximal: lambda >= 0 of the paper's proximal regularisation (eq. 10): each sample's loss gains
            lambda * ||x_b - v_{y_b}||^2, with v_{y_b} its own bank row as stored before this step's
            update (the feature the previous epoch left there), and its gradient 2 lambda (x_b - v_{y_b}).
            Computed by the fused ops from the positive row they read anyway. 0 (default) leaves it out
            (lemniscate has only the momentum update); the paper uses 10, 30, 50 (Figure 3).
        placement: where the bank lives: "local" (this process), or across the ranks of
            process_group (None: the default group) "replicated" or "sharded", as
            DistributedNPIDLoss(mode=...) documents; equal_batches as there. Every placement
            computes the same losses.

    forward(features, indices, idx=None) returns the batch-mean loss. After it, `loss_parts` holds the
    batch means of its parts as detached device tensors (no host sync): "instance_loss" (the NCE or
    softmax term), "proximal_loss" (lambda ||x - v||^2) and "positive_sq_dist" (||x - v||^2, also
    when lambda = 0). `features` should be
    L2-normalised (B, dim); `indices` (B,) are the instances' rows. In training mode the
    bank rows `indices` are momentum-updated right after the loss is computed (the loss's
    backward never reads the bank, so this is lemniscate's update-in-backward, earlier).
    An explicit (B, K+1) idx (column 0 = indices) replaces sampling, e.g. for non-uniform
    noise drawn with AliasSampler; with negatives="shared" idx is the (m,) noise rows.
    """

    def __init__(self, num_data: int, dim: int = 128, num_negatives: int = 4096, temperature: float = 0.07,
                 momentum: float = 0.5, loss: str = "nce", bank_dtype: torch.dtype = torch.float32,
                 z: Optional[float] = None, seed: Optional[int] = None, device=None, precision: str = "fp32",
                 z_mode: str = "first-batch", z_momentum: float = 0.99, negatives: str = "per-sample",
                 exclude_positive: bool = False, placement: str = "local", process_group=None,
                 equal_batches: bool = False, proximal: float = 0.0):
        super().__init__()
        _check_loss_args(loss, num_data, dim, num_negatives, temperature, momentum, precision, z_mode, z_momentum, z,
                         negatives, exclude_positive, proximal)
        if placement not in PLACEMENTS:
            raise ValueError(f"placement must be one of {PLACEMENTS}, got {placement!r}")
        if placement == "sharded" and negatives == "shared" and exclude_positive:
            raise ValueError("exclude_positive with negatives='shared' needs the replicated placement "
                             "(mode='replicated'): the replacement rows are drawn from the whole bank inside the op")
        self.loss_type, self.placement, self.precision = loss, placement, precision
        self.negatives, self.exclude_positive = negatives, exclude_positive
        self.z_mode, self.z_momentum = z_mode, float(z_momentum)
        self.num_data, self.dim, self.num_negatives = int(num_data), int(dim), int(num_negatives)
        self.temperature, self.momentum, self.proximal = float(temperature), float(momentum), float(proximal)
        self.loss_parts = {}
        if placement == "local":
            self.bank = LocalBank(num_data, dim, bank_dtype, device)
            if seed is None:
                seed = int(torch.randint(0, 2**62, (1,)).item())
        else:
            seed = agreed_seed(seed, process_group)
            placed = ReplicatedBank if placement == "replicated" else ShardedBank
            self.bank = placed(self.num_data, self.dim, bank_dtype, device, seed, process_group, equal_batches)
        self.world_size, self.rank = self.bank.world_size, self.bank.rank
        self.register_buffer("z", torch.tensor([-1.0 if z is None else float(z)], device=device))
        self.register_buffer("rng_state", torch.tensor([seed, 0], dtype=torch.int64, device=device))
        self._z_known = False  # whether Z has been seen set on the host (reset by load_state_dict)
        self.register_load_state_dict_post_hook(lambda module, incompatible: setattr(module, "_z_known", False))

    @property
    def memory(self) -> torch.Tensor:
        """This rank's bank: the whole (n, d) bank, or its shard's rows when sharded."""
        return self.bank.memory

    def rank_rng_state(self) -> torch.Tensor:
        """[seed, offset + rank]: the Philox stream this rank draws its next step's negatives
        from (ops.sample_negatives(indices, loss.rank_rng_state(), n, K) gives the rows)."""
        shift = torch.tensor([0, self.rank], dtype=torch.int64, device=self.rng_state.device)
        return self.rng_state + shift

    def forward(self, features: torch.Tensor, indices: torch.Tensor, idx: Optional[torch.Tensor] = None) -> torch.Tensor:
        # The step for every placement; the bank (npid_kernels.placement) says where the rows are
        # and how the ranks agree.
        memory = self.bank.memory
        with self.bank.checks_agreed():
            C.batch(features, indices, memory, num_data=self.num_data)
            if idx is not None and self.negatives == "shared":
                C.rows(idx, "idx", self.num_data, (self.num_negatives,), features, "features")
            elif idx is not None and self.exclude_positive:
                raise ValueError("exclude_positive applies to in-kernel sampling; an explicit idx is used as given")
            elif idx is not None:
                if self.loss_type == "softmax":
                    raise ValueError("idx applies to loss='nce' and 'softmax-ce' (sampled rows); loss='softmax' "
                                     "scans the whole bank")
                _check_idx(idx, features.shape[0], self.num_negatives, self.num_data, features, "features",
                           indices, "indices", check_range=self.bank.checks_idx_range)
            if features.dtype == torch.float16 or (features.dtype == torch.bfloat16 and not features.is_cuda):
                features = features.float()  # e.g. autocast output; bf16 features are native on CUDA only
            _check_bank_dtype(features, memory)
        stream = self.rng_state if self.rank == 0 else self.rank_rng_state()  # this rank's Philox stream
        if self.negatives == "shared":
            per_sample, sq_dist = self._shared_loss(features, indices, idx, stream)
        elif self.loss_type == "softmax":
            per_sample, sq_dist = self.bank.full_softmax_loss(features, indices, self.temperature, self.precision,
                                                              self.proximal)
        else:
            per_sample, sq_dist = self._sampled_loss(features, indices, idx, stream)
        self._record_parts(per_sample, sq_dist)
        if self.training:
            self.bank.update_(features.detach(), indices, self.momentum)
            # Shared negatives advance the stream with explicit rows too (exclude_positive reads it).
            if (idx is None and self.loss_type != "softmax") or self.negatives == "shared":
                with torch.no_grad():
                    self.rng_state[1] += self.world_size  # a fresh Philox stream per rank for the next step
        return per_sample.mean()

    def _sampled_loss(self, features, indices, idx, stream) -> torch.Tensor:
        """Per-sample negatives: K rows drawn for each sample (or the explicit idx)."""
        bank, y, rows, n_data = self.bank.sampled_rows(indices, idx, stream, self.num_negatives, self.exclude_positive)
        sampling = dict(rows, temperature=self.temperature)
        if self.loss_type == "softmax-ce":
            return ops.softmax_ce_loss(features, bank, y, proximal=self.proximal, with_sq_dist=True, **sampling)
        sampling["n_data"] = n_data
        columns = rows["idx"].shape[1] if rows["idx"] is not None else self.num_negatives + 1
        if not self._z_known:
            self._z_known = self.bank.estimate_z_(self.z, features, bank, y, features.shape[0] * columns, **sampling)
        return self._nce(lambda x, z, proximal: ops.nce_loss_and_z_stat(x, bank, y, z, proximal=proximal,
                                                                        with_sq_dist=True, **sampling),
                         features, features.shape[0] * (columns - 1), self.z_mode == "batch")

    def _shared_loss(self, features, indices, rows, stream) -> torch.Tensor:
        """negatives="shared": one set of m noise rows per rank and step, scored by GEMM tiles. NCE's
        first Z comes from the shared noise columns too."""
        bank, y, shared, n_data = self.bank.shared_rows(indices, rows, stream, self.num_negatives,
                                                        self.exclude_positive)
        shared.update(temperature=self.temperature, precision=self.precision)
        if self.loss_type != "nce":
            return ops.shared_softmax_ce_loss(features, bank, y, proximal=self.proximal, with_sq_dist=True, **shared)
        return self._nce(lambda x, z, proximal: ops.shared_nce_loss_and_z_stat(
                             x, bank, y, z, n_data=n_data, proximal=proximal, with_sq_dist=True, **shared),
                         features, features.shape[0] * self.num_negatives, self.z_mode == "batch" or self._z_unset())

    def _nce(self, loss_and_stat, features, noise: int, z_from_step: bool):
        """NCE's Z modes around loss_and_stat(features, Z, proximal) -> (per-sample loss, per-sample
        sums of the `noise` noise exp-scores, per-sample ||x - v||^2). z_from_step: Z is first set
        from this step's own noise scores (an extra pass, "batch"); "ema" (training) averages the
        loss pass's into Z after the loss. Returns (per-sample loss, ||x - v||^2)."""
        if z_from_step:
            with torch.no_grad():
                _, stat, _ = loss_and_stat(features.detach(), torch.ones_like(self.z), 0.0)
            self._z_update_(stat, noise, 0.0)
        per_sample, stat, sq_dist = loss_and_stat(features, self.z, self.proximal)
        if self.z_mode == "ema" and self.training:
            self._z_update_(stat, noise, self.z_momentum)
        return per_sample, sq_dist

    @torch.no_grad()
    def _record_parts(self, per_sample: torch.Tensor, sq_dist: torch.Tensor) -> None:
        """loss_parts: the step's batch means, kept on the device."""
        sq_dist = sq_dist.detach().to(torch.float64)
        proximal = sq_dist * self.proximal
        self.loss_parts = {"instance_loss": (per_sample.detach().to(torch.float64) - proximal).mean(),
                           "proximal_loss": proximal.mean(), "positive_sq_dist": sq_dist.mean()}

    def _z_unset(self) -> bool:
        """Whether Z still needs its first estimate: one host read until Z is set."""
        if not self._z_known:
            self._z_known = float(self.z) > 0
        return not self._z_known

    def _z_update_(self, noise_exp_sum, noise: int, alpha: float) -> None:
        """Z <- alpha Z + (1 - alpha) n * (sum of the noise exp-scores) / (their count), over every
        rank's batch (alpha 0: the step's own estimate)."""
        total, count = self.bank.noise_stat(noise_exp_sum, noise)
        ops.z_ema_update_(self.z, total, count, self.num_data, alpha)

    def extra_repr(self) -> str:
        extra = f", precision={self.precision!r}" if self.precision != "fp32" else ""
        extra += f", negatives={self.negatives!r}" if self.negatives != "per-sample" else ""
        extra += ", exclude_positive=True" if self.exclude_positive else ""
        if self.loss_type == "nce":
            extra += f", z_mode={self.z_mode!r}" + (f", z_momentum={self.z_momentum}" if self.z_mode == "ema" else "")
        extra += f", proximal={self.proximal}" if self.proximal else ""
        extra += f", placement={self.placement!r}" if self.placement != "local" else ""
        return (f"loss={self.loss_type!r}, num_negatives={self.num_negatives}, temperature={self.temperature}, "
                f"momentum={self.momentum}{extra}")


NCELoss = NPIDLoss


class ParametricInstanceLoss(nn.Module):
    """The paper's parametric-softmax baseline (its eq. 1, Table 1's "Param. Softmax" row): an
    n-way linear classifier over instance ids, P(i|v) = exp(w_i . v / T) / sum_j exp(w_j . v / T),
    trained jointly with the encoder by cross-entropy against each image's own index. W
    (num_data, dim) is a parameter (give `criterion.parameters()` to the optimizer), initialised
    as the memory bank is; v are the encoder's L2-normalised features. Eq. 1 has no T: with
    normalised v and SGD at NPID's learning rate, untempered logits stay near 0 and the loss
    near log n for many epochs, so the baseline shares the non-parametric softmax's T (and its
    scale) and differs from it only in W being learned instead of being the bank of features.
    Every step reads and updates all of W: one (B, d) x (d, n) GEMM forward and two backward.

    W says nothing about unseen images; the baseline is judged on the encoder's features (kNN
    on features recomputed on the training images, linear probe). For the driver's per-epoch
    kNN monitor the module also keeps each instance's latest features, momentum-averaged as
    NPID's bank is (`memory`, updated in training mode after the loss; the loss never reads it).

    forward(features, indices) returns the batch-mean cross-entropy.
    """

    def __init__(self, num_data: int, dim: int = 128, temperature: float = 0.07, momentum: float = 0.5,
                 device=None):
        super().__init__()
        C.bank_size(num_data, dim)
        if not temperature > 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        self.temperature, self.momentum = float(temperature), float(momentum)
        self.weight = nn.Parameter(lemniscate_bank_init(num_data, dim, device=device))
        self.bank = MemoryBank(num_data, dim, torch.float32, device)  # .double() converts both

    @property
    def memory(self) -> torch.Tensor:
        return self.bank.memory

    def forward(self, features: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        C.batch(features, indices, self.bank.memory)
        features = features.to(self.weight.dtype)  # e.g. autocast's bf16 output
        logits = features @ self.weight.t() / self.temperature
        loss = nn.functional.cross_entropy(logits, indices)
        if self.training:
            self.bank.update_(features.detach(), indices, self.momentum)
        return loss

    def extra_repr(self) -> str:
        return (f"num_data={self.weight.shape[0]}, dim={self.weight.shape[1]}, temperature={self.temperature}, "
                f"momentum={self.momentum}")


class AliasSampler(nn.Module):
    """Walker/Vose alias table for drawing from any noise distribution over the bank rows in
    O(1) per draw (lemniscate's AliasMethod). Draws are (B, K+1) index tensors to pass as idx."""

    def __init__(self, probs: torch.Tensor):
        super().__init__()
        probs = torch.as_tensor(probs, dtype=torch.float64).flatten()
        if probs.numel() == 0 or (probs < 0).any() or not torch.isfinite(probs).all() or probs.sum() <= 0:
            raise ValueError("probs must be a non-empty vector of finite, non-negative weights with a positive sum")
        n = probs.numel()
        scaled = (probs / probs.sum() * n).tolist()
        prob, alias = [0.0] * n, list(range(n))
        small = [i for i, p in enumerate(scaled) if p < 1.0]
        large = [i for i, p in enumerate(scaled) if p >= 1.0]
        while small and large:
            s, g = small.pop(), large.pop()
            prob[s], alias[s] = scaled[s], g
            scaled[g] -= 1.0 - scaled[s]
            (small if scaled[g] < 1.0 else large).append(g)
        for i in small + large:
            prob[i] = 1.0
        self.register_buffer("prob", torch.tensor(prob, dtype=torch.float32))
        self.register_buffer("alias", torch.tensor(alias, dtype=torch.int64))

    def draw(self, *shape: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        n = self.prob.numel()
        device = self.prob.device
        k = torch.randint(0, n, shape, device=device, generator=generator)
        keep = torch.rand(shape, device=device, generator=generator) < self.prob[k]
        return torch.where(keep, k, self.alias[k])

    def draw_rows(self, y: torch.Tensor, num_negatives: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """(B, K+1) rows for the losses' idx argument: column 0 = y, the rest drawn from the table."""
        C.tensor(y, "y")
        C.rows(y, "y", self.prob.numel(), (y.shape[0],) if y.dim() == 1 else ("batch",), self.prob, "the sampler")
        C.count(num_negatives, "num_negatives", 1)
        rows = self.draw(y.shape[0], num_negatives + 1, generator=generator)
        rows[:, 0] = y
        return rows
