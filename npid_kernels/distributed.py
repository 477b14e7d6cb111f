"""Multi-process NPID through torch.distributed (torchrun): a memory bank that stays consistent
across ranks, replicated or sharded, distributed kNN evaluation, and world-size-independent
checkpoints. See docs/distributed.md for the command lines and the throughput model.

Semantics (what "the same as one process" means here):

* Every rank feeds its local batch (features, indices); the loss it returns is the mean of
  its own samples' losses, and the gradient is w.r.t. its own features, exactly the
  contract of :class:`npid_kernels.NPIDLoss`. With equal local batches and DDP's gradient
  averaging, the backbone sees the gradient of the mean loss over the global batch.
* Negatives are drawn per rank. Rank r of G draws its negatives (per-sample, or its batch's
  shared set with negatives="shared") from the Philox stream
  ``rng_state = [seed, offset + r]`` (the same stream ``NPIDLoss`` would use at that offset),
  and after every training step the shared offset advances by G. A rank's rows are therefore
  ``ops.sample_negatives(indices_r, [seed, offset + r], n, K)``; concatenating the ranks'
  idx in rank order gives the idx that a single-process ``NPIDLoss`` fed the global batch
  would need to compute the very same losses. Streams never repeat, whatever the world size
  of the run that saved the checkpoint.
* Z (NCE) is estimated on the first step from every rank's first batch: each rank computes
  mean(exp scores)·n over its B_r·(K+1) rows, and the ranks combine them weighted by their
  row counts (an all_reduce), which is exactly the single-process estimate on the global batch.
* The momentum update is applied with the global batch in rank order (all_gather in the
  replicated mode; routed to the owning rank, keeping that order, in the sharded mode), so
  duplicates follow the single-process rule: the last occurrence in the global batch wins.
  Replicated banks therefore stay bit-identical on every rank.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import nn

from . import ops
from . import _checks as C
from .knn import _check_labels, _check_recall_ks, _check_search, _check_temperature
from .nn import _check_bank_dtype, _check_batch, _check_idx, _check_loss_args
from .reference import knn_vote, round_to_precision

__all__ = [
    "DistInfo", "init_distributed", "cleanup_distributed", "is_dist", "get_rank", "get_world_size",
    "is_main_process", "barrier", "wrap_ddp", "DistributedEvalSampler", "bank_shard_range",
    "all_gather_varsize", "DistributedNPIDLoss", "distributed_knn_topk", "distributed_knn_predict",
    "distributed_knn_evaluate",
]

MODES = ("replicated", "sharded")


# ---------------------------------------------------------------- process-group helpers

@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: Optional[str]  # None: single process, no process group

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def is_dist() -> bool:
    """Whether a default process group exists (False in a plain single-process run)."""
    return dist.is_available() and dist.is_initialized()


def get_rank(group=None) -> int:
    return dist.get_rank(group) if is_dist() else 0


def get_world_size(group=None) -> int:
    return dist.get_world_size(group) if is_dist() else 1


def is_main_process(group=None) -> bool:
    """True on rank 0 (and in a single-process run): the rank that logs and saves checkpoints."""
    return get_rank(group) == 0


def barrier(group=None) -> None:
    if is_dist() and get_world_size(group) > 1:
        dist.barrier(group)


def init_distributed(backend: Optional[str] = None, timeout: Optional[timedelta] = None) -> DistInfo:
    """Set up torch.distributed from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK,
    MASTER_ADDR, MASTER_PORT).

    Without WORLD_SIZE in the environment (a plain ``python train.py``) nothing is initialised
    and a single-process DistInfo is returned; every function in this module then works as
    world size 1. On CUDA machines the process binds to ``cuda:LOCAL_RANK`` and the backend
    defaults to NCCL; elsewhere to gloo (CPU). Calling it twice returns the existing state.
    """
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and backend in (None, "nccl")
    if use_cuda:
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
    device = torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")
    if is_dist():
        return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device, dist.get_backend())
    if "WORLD_SIZE" not in os.environ:
        return DistInfo(0, 1, 0, device, None)
    backend = backend or ("nccl" if use_cuda else "gloo")
    kwargs = {} if timeout is None else {"timeout": timeout}
    dist.init_process_group(backend=backend, init_method="env://", **kwargs)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device, backend)


def cleanup_distributed() -> None:
    """Tear the process group down once every rank is done with its collectives: a rank that
    destroys it while a peer is still inside one (e.g. rank 0 saving after a gather) can leave
    gloo's threads running at exit ("terminate called without an active exception")."""
    if is_dist():
        dist.barrier()
        dist.destroy_process_group()


def wrap_ddp(model: nn.Module, device=None, sync_bn: bool = False, **ddp_kwargs) -> nn.Module:
    """Move the backbone to `device` and wrap it in DistributedDataParallel (optionally with
    SyncBatchNorm). In a single-process run the model is only moved. The NPID loss module is
    NOT wrapped: its bank is a buffer kept consistent by DistributedNPIDLoss itself."""
    if device is not None:
        model = model.to(device)
    if get_world_size() == 1:
        return model
    if sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    if device.type == "cuda":
        ddp_kwargs.setdefault("device_ids", [device.index if device.index is not None else torch.cuda.current_device()])
    return nn.parallel.DistributedDataParallel(model, **ddp_kwargs)


class DistributedEvalSampler(torch.utils.data.Sampler):
    """Rank r of G gets dataset items r, r+G, r+2G, ... in order, with no padding (torch's
    DistributedSampler repeats items to even out the ranks, which would count some test images
    twice). Use it for the kNN queries; the counts are summed across ranks exactly.
    For training, torch's DistributedSampler is the right choice: a dataset that returns
    (image, target, index) keeps returning its own instance index whatever the sampler."""

    def __init__(self, data_source, num_replicas: Optional[int] = None, rank: Optional[int] = None):
        self.length = data_source if isinstance(data_source, int) else len(data_source)
        self.num_replicas = get_world_size() if num_replicas is None else num_replicas
        self.rank = get_rank() if rank is None else rank
        if not 0 <= self.rank < self.num_replicas:
            raise ValueError(f"rank must be in [0, {self.num_replicas}), got {self.rank}")

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.length, self.num_replicas))

    def __len__(self) -> int:
        return len(range(self.rank, self.length, self.num_replicas))


def bank_shard_range(num_data: int, world_size: int, rank: int) -> Tuple[int, int]:
    """Rows [start, end) of the bank owned by `rank` in the sharded mode: contiguous blocks
    of ceil(n / G) rows (the last ranks may own fewer, possibly zero, rows)."""
    size = -(-num_data // world_size)
    start = min(rank * size, num_data)
    return start, min(start + size, num_data)


# ---------------------------------------------------------------- collectives (world size 1 short-circuits)

def _comm_device(group, fallback: torch.device) -> torch.device:
    """NCCL needs CUDA tensors for everything, gloo is happy with CPU ones."""
    if is_dist() and dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return fallback


def _exchange_sizes(size: int, device, group) -> List[int]:
    """Every rank's value of `size`, in rank order (one tiny all_gather)."""
    world = get_world_size(group)
    if world == 1:
        return [int(size)]
    mine = torch.tensor([size], dtype=torch.int64, device=_comm_device(group, device))
    out = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(out, mine, group=group)
    return [int(t.item()) for t in out]


def _all_gather_padded(tensor: torch.Tensor, sizes: Sequence[int], group) -> List[torch.Tensor]:
    """all_gather of per-rank tensors whose first dimensions are `sizes` (pads to the max)."""
    if len(sizes) == 1:
        return [tensor]
    longest = max(sizes)
    padded = tensor
    if tensor.shape[0] < longest:
        padded = torch.cat([tensor, tensor.new_zeros((longest - tensor.shape[0],) + tuple(tensor.shape[1:]))])
    out = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(out, padded.contiguous(), group=group)
    return [t[:s] for t, s in zip(out, sizes)]


def all_gather_varsize(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """Concatenate every rank's `tensor` (first dimensions may differ) in rank order."""
    sizes = _exchange_sizes(tensor.shape[0], tensor.device, group)
    return torch.cat(_all_gather_padded(tensor, sizes, group))


def _all_to_all(tensor: torch.Tensor, send_counts: Sequence[int], recv_counts: Sequence[int], group) -> torch.Tensor:
    """all_to_all_single along dim 0: send_counts[q] rows of `tensor` go to rank q."""
    if len(send_counts) == 1:
        return tensor
    out = tensor.new_empty((sum(recv_counts),) + tuple(tensor.shape[1:]))
    dist.all_to_all_single(out, tensor.contiguous(), output_split_sizes=list(recv_counts),
                           input_split_sizes=list(send_counts), group=group)
    return out


def _exchange_counts(send_counts: torch.Tensor, group) -> Tuple[List[int], List[int]]:
    """(send, recv) split lists from this rank's per-destination counts."""
    if send_counts.numel() == 1:
        counts = send_counts.tolist()
        return counts, counts
    recv = torch.empty_like(send_counts)
    dist.all_to_all_single(recv, send_counts, group=group)
    return send_counts.tolist(), recv.tolist()


# ---------------------------------------------------------------- the loss module

_INIT_CHUNK = 1 << 16  # bank initialisation is generated in fixed row blocks, one seed each


def _mix(seed: int, block: int) -> int:
    """A per-block generator seed (splitmix64 of seed ^ block), < 2^63 for manual_seed."""
    z = (seed ^ (block * 0x9E3779B97F4A7C15)) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (z ^ (z >> 31)) & 0x7FFFFFFFFFFFFFFF


def _init_rows(seed: int, num_data: int, dim: int, start: int, end: int, dtype, device) -> torch.Tensor:
    """Rows [start, end) of lemniscate's uniform [-s, s] initialisation (s = 1/sqrt(d/3)),
    generated in fixed blocks of rows so that any rank can produce any range and the bank
    does not depend on the world size or the mode."""
    stdv = 1.0 / math.sqrt(dim / 3)
    out = torch.empty(end - start, dim, dtype=dtype, device=device)
    for block in range(start // _INIT_CHUNK, -(-end // _INIT_CHUNK)):
        lo, hi = block * _INIT_CHUNK, min((block + 1) * _INIT_CHUNK, num_data)
        g = torch.Generator().manual_seed(_mix(seed, block))
        rows = torch.rand(hi - lo, dim, generator=g).mul_(2 * stdv).add_(-stdv)
        a, b = max(lo, start), min(hi, end)
        out[a - start:b - start] = rows[a - lo:b - lo].to(device=device, dtype=dtype)
    return out


class _BankShard(nn.Module):
    """Holds the `memory` buffer: the whole bank (replicated) or this rank's rows (sharded)."""

    def __init__(self, memory: torch.Tensor):
        super().__init__()
        self.register_buffer("memory", memory)


class _ShardedFullSoftmax(torch.autograd.Function):
    """Exact non-parametric softmax with the bank split across ranks; loss and grad_x in the
    forward (the bank is constant), backward scales the saved grad_x like the fused ops."""

    @staticmethod
    def forward(ctx, x, y, module):
        with torch.no_grad():
            loss, grad_x = module._sharded_full_softmax(x.detach(), y)
        ctx.save_for_backward(grad_x)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        (grad_x,) = ctx.saved_tensors
        return grad_loss.unsqueeze(1) * grad_x, None, None


class DistributedNPIDLoss(nn.Module):
    """NPIDLoss for torch.distributed: same arguments and forward contract, plus

    Args:
        mode: "replicated" (every rank holds the whole bank; the update is all_gathered so the
            copies stay bit-identical) or "sharded" (rank r holds rows bank_shard_range(n, G, r);
            the rows a step needs are fetched from their owners with all_to_all and the update
            is routed to the owners). Both modes compute the same losses.
        process_group: the group to use (None: the default group; no process group at all:
            world size 1, and the module behaves exactly like NPIDLoss).
        seed: Philox seed and bank-initialisation seed; None draws one on rank 0 and
            broadcasts it (every rank must agree on it).
        equal_batches: promise that every rank's batch has the same size every step (e.g.
            DistributedSampler with drop_last=True); skips one tiny size exchange per step.
        negatives, exclude_positive: as NPIDLoss. Shared negatives: each rank scores its own set of m
            rows (drawn from its stream, see the module docstring) against its batch; the sharded
            mode fetches those rows and the batch's positives from their owners.
            exclude_positive with shared negatives needs the replicated mode (the replacement
            rows are drawn from the whole bank inside the op).
        z_mode, z_momentum: as NPIDLoss; with "ema" the ranks all_reduce the step's
            [sum of noise exp-scores, their count] (one small device collective, no host sync)
            and apply the same update, so every rank keeps the same Z: the EMA of the global
            batch's estimate.
        device: where the bank lives (move it later with .to() as usual).

    forward(features, indices, idx=None) -> the mean loss over this rank's batch. All ranks
    must call it together (it runs collectives). In training mode the bank rows of the global
    batch are momentum-updated before it returns. Negatives: see the module docstring.

    Checkpoints: full_state_dict() returns {'bank.memory', 'z', 'rng_state'} for the whole bank
    (the keys of NPIDLoss.state_dict()), load_full_state_dict(sd) takes such a dict, so a
    checkpoint moves freely between world sizes, modes and NPIDLoss. (The ordinary
    state_dict() holds this rank's memory: the whole bank when replicated, the shard when
    sharded; it only fits a run with the same mode and world size.)
    """

    def __init__(self, num_data: int, dim: int = 128, num_negatives: int = 4096, temperature: float = 0.07,
                 momentum: float = 0.5, loss: str = "nce", bank_dtype: torch.dtype = torch.float32,
                 z: Optional[float] = None, seed: Optional[int] = None, mode: str = "replicated",
                 process_group=None, device=None, equal_batches: bool = False, precision: str = "fp32",
                 z_mode: str = "first-batch", z_momentum: float = 0.99, negatives: str = "per-sample",
                 exclude_positive: bool = False):
        super().__init__()
        _check_loss_args(loss, num_data, dim, num_negatives, temperature, momentum, precision, z_mode, z_momentum, z,
                         negatives, exclude_positive)
        if mode == "sharded" and negatives == "shared" and exclude_positive:
            raise ValueError("exclude_positive with negatives='shared' needs mode='replicated': the replacement "
                             "rows are drawn from the whole bank inside the op")
        self.precision = precision
        self.negatives, self.exclude_positive = negatives, exclude_positive
        self.z_mode, self.z_momentum = z_mode, float(z_momentum)
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.num_data, self.dim = int(num_data), int(dim)
        self.num_negatives = int(num_negatives)
        self.temperature = float(temperature)
        self.momentum = float(momentum)
        self.loss_type = loss
        self.mode = mode
        self.process_group = process_group
        self.equal_batches = bool(equal_batches)
        self.world_size = get_world_size(process_group)
        self.rank = get_rank(process_group)
        if mode == "sharded":
            self.row_start, self.row_end = bank_shard_range(self.num_data, self.world_size, self.rank)
            self.shard_rows = -(-self.num_data // self.world_size)
        else:
            self.row_start, self.row_end, self.shard_rows = 0, self.num_data, self.num_data
        seed = self._agree_on_seed(seed, device)
        self.bank = _BankShard(_init_rows(seed, self.num_data, self.dim, self.row_start, self.row_end,
                                          bank_dtype, device))
        self.register_buffer("z", torch.tensor([-1.0 if z is None else float(z)], device=device))
        self.register_buffer("rng_state", torch.tensor([seed, 0], dtype=torch.int64, device=device))
        self._z_ready = False
        self.register_load_state_dict_post_hook(DistributedNPIDLoss._reset_z_flag)

    # ------------------------------------------------------------ small helpers

    def _agree_on_seed(self, seed: Optional[int], device) -> int:
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,)).item())
            if self.world_size > 1:
                t = torch.tensor([seed], dtype=torch.int64, device=_comm_device(self.process_group, torch.device("cpu")))
                dist.broadcast(t, src=self._global_rank(0), group=self.process_group)
                seed = int(t.item())
        return int(seed)

    def _global_rank(self, group_rank: int) -> int:
        if self.process_group is None or not is_dist():
            return group_rank
        return dist.get_global_rank(self.process_group, group_rank)

    @staticmethod
    def _reset_z_flag(module, incompatible_keys):
        module._z_ready = False

    @property
    def memory(self) -> torch.Tensor:
        """This rank's bank: the whole (n, d) bank, or rows [row_start, row_end) when sharded."""
        return self.bank.memory

    def rank_rng_state(self) -> torch.Tensor:
        """[seed, offset + rank]: the Philox stream this rank draws its next step's negatives
        from (ops.sample_negatives(indices, loss.rank_rng_state(), n, K) gives the rows)."""
        shift = torch.tensor([0, self.rank], dtype=torch.int64, device=self.rng_state.device)
        return self.rng_state + shift

    # ------------------------------------------------------------ Z

    def _z_unset(self) -> bool:
        if self._z_ready:
            return False
        if float(self.z.item()) > 0:  # one host read, on the first step only
            self._z_ready = True
            return False
        return True

    def _estimate_and_agree_on_z(self, features, bank, y, rows: int, **kwargs) -> None:
        """This rank's first-batch Z estimate (nce_estimate_z_), agreed across ranks. A rank whose
        estimate fails (NaN features, a bad row) or stays unset (the CUDA op leaves Z unset when
        the mean score is not finite) contributes NaN instead of raising, so that every rank
        reaches the all_reduce and all raise together, the failing one with its own message."""
        z_local = torch.full((1,), -1.0, dtype=torch.float64, device=features.device)
        error = None
        try:
            ops.nce_estimate_z_(z_local, features, bank, y, **kwargs)
        except RuntimeError as e:
            error = e
        z_local = torch.where(z_local > 0, z_local, float("nan"))
        # z = (sum_r z_r * rows_r) / sum_r rows_r: the estimate on the whole first global batch.
        stats = torch.stack([z_local.reshape(()).double() * rows,
                             torch.tensor(float(rows), dtype=torch.float64, device=z_local.device)])
        if self.world_size > 1:
            stats = stats.to(_comm_device(self.process_group, stats.device))
            dist.all_reduce(stats, group=self.process_group)
        if error is not None:
            raise error
        value = stats[0] / stats[1]
        if not torch.isfinite(value) or value <= 0:
            raise RuntimeError(f"the Z estimate agreed across ranks is {value.item()}, not a positive number "
                               "(NaN or inf features on some rank?)")
        with torch.no_grad():
            self.z.fill_(value.item())
        self._z_ready = True

    def _nce(self, features, bank, y, **kwargs):
        """The fused NCE loss with the current Z; in "ema" mode (training) Z is then updated
        from the global batch's noise scores: all ranks reduce the same two numbers."""
        if self.z_mode == "batch":  # Z from this step's global noise scores, before the loss (an extra pass)
            with torch.no_grad():
                _, noise_exp_sum = ops.nce_loss_and_z_stat(features.detach(), bank, y, torch.ones_like(self.z),
                                                           **kwargs)
            self._agreed_z_update_(noise_exp_sum, features.shape[0], kwargs.get("idx"), 0.0)
            return ops.nce_loss(features, bank, y, self.z, **kwargs)
        if not (self.z_mode == "ema" and self.training):
            return ops.nce_loss(features, bank, y, self.z, **kwargs)
        per_sample, noise_exp_sum = ops.nce_loss_and_z_stat(features, bank, y, self.z, **kwargs)
        self._agreed_z_update_(noise_exp_sum, features.shape[0], kwargs.get("idx"), self.z_momentum)
        return per_sample

    def _shared_nce(self, features, bank, y, **kwargs):
        """NCE with shared negatives. Z from the shared noise columns, agreed across ranks: on the
        first step (unset Z) and, in the "batch" mode, before every step's loss; "ema" after it."""
        batch, m = features.shape[0], self.num_negatives
        if self.z_mode == "batch" or self._z_unset():
            with torch.no_grad():
                _, stat = ops.shared_nce_loss_and_z_stat(features.detach(), bank, y, torch.ones_like(self.z), **kwargs)
            self._agreed_z_update_(stat, batch, None, 0.0, noise_per_sample=m)
            self._z_ready = self.z_mode != "batch"
        per_sample, stat = ops.shared_nce_loss_and_z_stat(features, bank, y, self.z, **kwargs)
        if self.z_mode == "ema" and self.training:
            self._agreed_z_update_(stat, batch, None, self.z_momentum, noise_per_sample=m)
        return per_sample

    def _agreed_z_update_(self, noise_exp_sum, batch: int, idx, alpha: float,
                          noise_per_sample: Optional[int] = None) -> None:
        """Z <- alpha Z + (1 - alpha) n * (global sum of noise exp-scores) / (their global count):
        the ranks all_reduce the same two numbers, so every rank applies the same update."""
        if noise_per_sample is None:
            noise_per_sample = (idx.shape[1] if idx is not None else self.num_negatives + 1) - 1
        stats = torch.stack([noise_exp_sum.sum().double(),
                             torch.tensor(float(batch * noise_per_sample), dtype=torch.float64,
                                          device=noise_exp_sum.device)])
        if self.world_size > 1:
            comm = stats.to(_comm_device(self.process_group, stats.device))
            dist.all_reduce(comm, group=self.process_group)
            stats = comm.to(stats.device)
        # z_ema_update_ averages sum / count: pass the global sum as one "sample".
        ops.z_ema_update_(self.z, stats[0:1], stats[1], self.num_data, alpha)

    # ------------------------------------------------------------ forward

    def forward(self, features: torch.Tensor, indices: torch.Tensor, idx: Optional[torch.Tensor] = None) -> torch.Tensor:
        memory = self.bank.memory
        # The value checks (rows in range, finite features) read this rank's batch: the ranks agree
        # on the outcome, so that a refused batch stops every rank instead of leaving the others
        # waiting in a collective. Only where values are read (CPU, or NPID_CUDA_SYNC_CHECKS=1 on
        # CUDA): an all_reduce and a host read per step.
        agree = self.world_size > 1 and C._values_readable(memory)
        with _refused_together(agree, self.process_group, memory.device):
            _check_batch(features, indices, memory, num_data=self.num_data)
            if idx is not None and self.negatives == "shared":
                C.rows(idx, "idx", self.num_data, (self.num_negatives,), features, "features")
            elif idx is not None and self.exclude_positive:
                raise ValueError("exclude_positive applies to in-kernel sampling; an explicit idx is used as given")
            elif idx is not None:
                if self.loss_type == "softmax":
                    raise ValueError("idx applies to loss='nce' and 'softmax-ce' (sampled rows); loss='softmax' "
                                     "scans the whole bank")
                # the range too: in the sharded mode the rows are fetched (collectives) before any op
                _check_idx(idx, features.shape[0], self.num_negatives, self.num_data, features, "features",
                           indices, "indices", check_range=True)
            if features.dtype == torch.float16 or (features.dtype == torch.bfloat16 and not features.is_cuda):
                features = features.float()
            _check_bank_dtype(features, memory)
        # Shared negatives advance the stream with explicit rows too (exclude_positive reads it).
        sample_here = (idx is None and self.loss_type != "softmax") or self.negatives == "shared"
        if self.mode == "replicated":
            per_sample = self._replicated_loss(features, indices, idx, memory)
        else:
            per_sample = self._sharded_loss(features, indices, idx)
        if self.training:
            self._update_bank(features.detach(), indices)
            if sample_here:
                with torch.no_grad():
                    self.rng_state[1] += self.world_size  # every rank used one stream this step
        return per_sample.mean()

    def _replicated_loss(self, features, indices, idx, memory):
        if self.negatives == "shared":
            shared = dict(rows=idx, rng_state=self.rank_rng_state(), num_negatives=self.num_negatives,
                          temperature=self.temperature, exclude_positive=self.exclude_positive,
                          precision=self.precision)
            if self.loss_type == "nce":
                return self._shared_nce(features, memory, indices, **shared)
            return ops.shared_softmax_ce_loss(features, memory, indices, **shared)
        sampling = dict(idx=idx, rng_state=None if idx is not None else self.rank_rng_state(),
                        num_negatives=self.num_negatives, temperature=self.temperature,
                        exclude_positive=self.exclude_positive)
        if self.loss_type == "nce":
            if self._z_unset():
                columns = idx.shape[1] if idx is not None else self.num_negatives + 1
                self._estimate_and_agree_on_z(features, memory, indices, features.shape[0] * columns, **sampling)
            return self._nce(features, memory, indices, **sampling)
        if self.loss_type == "softmax-ce":
            return ops.softmax_ce_loss(features, memory, indices, **sampling)
        return ops.full_softmax_loss(features, memory, indices, self.temperature, self.precision)

    def _sharded_loss(self, features, indices, idx):
        if self.loss_type == "softmax":
            return _ShardedFullSoftmax.apply(features, indices, self)
        if self.negatives == "shared":
            return self._sharded_shared_loss(features, indices, idx)
        if idx is None:
            idx = ops.sample_negatives(indices, self.rank_rng_state(), self.num_data, self.num_negatives,
                                       self.exclude_positive)
        rows, local_idx = self._fetch_rows(idx.reshape(-1))
        local_idx = local_idx.view(idx.shape)
        if self.loss_type == "softmax-ce":
            # The same kernel on the same row values as the replicated mode: identical results.
            return ops.softmax_ce_loss(features, rows, local_idx[:, 0].contiguous(), idx=local_idx,
                                       temperature=self.temperature)
        # NCE: the same fused kernel on the fetched rows, told the real n for Pn = 1/n (c = K/n
        # and Z = mean score * n would otherwise use the fetched rows' count).
        y_local = local_idx[:, 0].contiguous()
        if self._z_unset():
            self._estimate_and_agree_on_z(features, rows, y_local, local_idx.numel(), idx=local_idx,
                                          temperature=self.temperature, n_data=self.num_data)
        return self._nce(features, rows, y_local, idx=local_idx, temperature=self.temperature, n_data=self.num_data)

    def _sharded_shared_loss(self, features, indices, rows):
        """Shared negatives on a sharded bank: this rank's m rows and its positives are fetched
        from their owners, then the replicated mode's op runs on them, told the real n."""
        if rows is None:
            rows = ops.shared_negative_rows(self.rank_rng_state(), self.num_data, self.num_negatives)
        fetched, inverse = self._fetch_rows(torch.cat([indices, rows]))
        batch = features.shape[0]
        y_local, rows_local = inverse[:batch].contiguous(), inverse[batch:].contiguous()
        common = dict(rows=rows_local, temperature=self.temperature, precision=self.precision)
        if self.loss_type == "nce":
            return self._shared_nce(features, fetched, y_local, n_data=self.num_data, **common)
        return ops.shared_softmax_ce_loss(features, fetched, y_local, **common)

    # ------------------------------------------------------------ sharded-bank traffic

    def _fetch_rows(self, rows: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(fetched, inverse): the distinct bank rows `rows` refers to, fetched from their owners
        (all_to_all of the row ids, all_to_all of the rows back), and rows' positions in them."""
        memory = self.bank.memory
        unique, inverse = torch.unique(rows, sorted=True, return_inverse=True)
        if unique.numel() and (unique[0] < 0 or unique[-1] >= self.num_data):
            bad = unique[0] if unique[0] < 0 else unique[-1]
            raise IndexError(f"row {int(bad)} is outside the bank [0, {self.num_data})")
        owner = unique // self.shard_rows  # sorted rows: already grouped by owner, in rank order
        send, recv = _exchange_counts(torch.bincount(owner, minlength=self.world_size), self.process_group)
        requested = _all_to_all(unique, send, recv, self.process_group)
        served = memory.index_select(0, requested - self.row_start)
        fetched = _all_to_all(served, recv, send, self.process_group)
        return fetched, inverse

    def _update_bank(self, features: torch.Tensor, indices: torch.Tensor) -> None:
        memory = self.bank.memory
        with torch.no_grad():
            if self.mode == "replicated":
                if self.world_size > 1:
                    sizes = self._batch_sizes(features.shape[0], features.device)
                    features = torch.cat(_all_gather_padded(features.contiguous(), sizes, self.process_group))
                    indices = torch.cat(_all_gather_padded(indices.contiguous(), sizes, self.process_group))
                ops.momentum_update_(memory, features, indices, self.momentum)
                return
            # Sharded: route every (feature, index) to the rank owning the row. A stable sort by
            # owner keeps each rank's order, and all_to_all concatenates sources in rank order,
            # so each owner sees its rows in global-batch order (last duplicate wins).
            if indices.numel() and (indices.min() < 0 or indices.max() >= self.num_data):
                raise IndexError(f"indices must be in [0, {self.num_data})")
            owner = indices // self.shard_rows
            order = torch.sort(owner, stable=True).indices
            send, recv = _exchange_counts(torch.bincount(owner, minlength=self.world_size), self.process_group)
            mine_idx = _all_to_all(indices[order], send, recv, self.process_group)
            mine_x = _all_to_all(features[order].contiguous(), send, recv, self.process_group)
            if mine_idx.numel():
                ops.momentum_update_(memory, mine_x, mine_idx - self.row_start, self.momentum)

    def _batch_sizes(self, size: int, device) -> List[int]:
        if self.equal_batches:
            return [int(size)] * self.world_size
        return _exchange_sizes(size, device, self.process_group)

    def _sharded_full_softmax(self, x: torch.Tensor, y: torch.Tensor):
        """Per-sample exact softmax loss and grad_x with the bank split across ranks.

        Every rank streams its shard for every rank's queries with the fused full_softmax_loss
        (against its own row 0, from which the shard's logsumexp lse_r and softmax-weighted
        mean row E_r are recovered), the ranks' lse_r are all_gathered and combined
        (lse = logsumexp_r lse_r), and sum_r exp(lse_r - lse) E_r is summed at the query's rank
        (all_to_all). loss = lse - s_pos, grad_x = (sum_r ... - w_pos) / T, as in one process."""
        memory = self.bank.memory
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        inv_t = 1.0 / self.temperature
        sizes = self._batch_sizes(x.shape[0], x.device)
        queries = torch.cat(_all_gather_padded(x.contiguous(), sizes, self.process_group))
        q_all = queries.shape[0]
        if memory.shape[0] > 0:
            loss_r, grad_r = torch.ops.npid.full_softmax_loss(queries, memory, queries.new_zeros(q_all, dtype=torch.int64),
                                                             self.temperature, self.precision)
            # The op formed every product from operands rounded to self.precision; so do we.
            w0 = round_to_precision(memory[0].to(acc), self.precision)
            lse_r = loss_r.to(acc) + (round_to_precision(queries.to(acc), self.precision) * w0).sum(1) * inv_t
            mean_row = grad_r.to(acc) / inv_t + w0
        else:
            lse_r = torch.full((q_all,), -math.inf, dtype=acc, device=x.device)
            mean_row = torch.zeros(q_all, self.dim, dtype=acc, device=x.device)
        if self.world_size > 1:
            parts = [torch.empty_like(lse_r) for _ in range(self.world_size)]
            dist.all_gather(parts, lse_r, group=self.process_group)
            lse = torch.logsumexp(torch.stack(parts), dim=0)
        else:
            lse = lse_r
        weighted = (lse_r - lse).exp().unsqueeze(1) * mean_row
        mine = _all_to_all(weighted, sizes, [x.shape[0]] * self.world_size, self.process_group)
        expected_row = mine.view(self.world_size, x.shape[0], self.dim).sum(0)
        fetched, inverse = self._fetch_rows(y)
        w_pos = round_to_precision(fetched.index_select(0, inverse).to(acc), self.precision)
        start = sum(sizes[:self.rank])
        loss = lse[start:start + x.shape[0]] - (round_to_precision(x.to(acc), self.precision) * w_pos).sum(1) * inv_t
        grad_x = (expected_row - w_pos) * inv_t
        return loss.to(x.dtype), grad_x.to(x.dtype)

    # ------------------------------------------------------------ checkpoints

    @torch.no_grad()
    def full_state_dict(self, rank0_only: bool = True) -> Optional[Dict[str, torch.Tensor]]:
        """{'bank.memory': the whole (n, d) bank, 'z', 'rng_state'} on the CPU, the keys of
        NPIDLoss.state_dict(): save it once (on rank 0) and load it at any world size, in either
        mode, or into a plain NPIDLoss. A collective in the sharded mode: call it on every rank.
        Returns None on ranks other than 0 unless rank0_only=False."""
        keep = not rank0_only or self.rank == 0
        if self.mode == "replicated" or self.world_size == 1:
            bank = self.bank.memory.detach().cpu().clone() if keep else None
        else:
            memory = self.bank.memory
            comm = _comm_device(self.process_group, memory.device)
            bank = torch.empty(self.num_data, self.dim, dtype=memory.dtype) if keep else None
            for r in range(self.world_size):
                start, end = bank_shard_range(self.num_data, self.world_size, r)
                if end == start:
                    continue
                buf = memory.detach().to(comm).contiguous() if r == self.rank else \
                    torch.empty(end - start, self.dim, dtype=memory.dtype, device=comm)
                dist.broadcast(buf, src=self._global_rank(r), group=self.process_group)
                if keep:
                    bank[start:end] = buf.cpu()
        if not keep:
            return None
        return {"z": self.z.detach().cpu().clone(), "rng_state": self.rng_state.detach().cpu().clone(),
                "bank.memory": bank}

    @torch.no_grad()
    def load_full_state_dict(self, state_dict: Optional[Dict[str, torch.Tensor]]) -> None:
        """Load a whole-bank state ({'bank.memory', 'z', 'rng_state'}, from full_state_dict or
        NPIDLoss.state_dict()); each rank keeps its rows. A collective: call it on every rank.
        Ranks other than 0 may pass None, rank 0's dict is then broadcast (so only rank 0 needs
        to read the checkpoint file)."""
        have = state_dict is not None
        memory = self.bank.memory
        comm = _comm_device(self.process_group, memory.device)
        everyone_has = have
        if self.world_size > 1:
            flag = torch.tensor([1 if have else 0], dtype=torch.int64, device=comm)
            dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=self.process_group)
            everyone_has = bool(flag.item())
        if not everyone_has and self.rank == 0 and not have:
            raise ValueError("load_full_state_dict: rank 0 must pass the state dict")
        # Validate (on rank 0 when only it has the dict) and tell everyone, so no rank hangs.
        problem = ""
        if have:
            problem = self._check_full_state(state_dict)
        if self.world_size > 1 and not everyone_has:
            bad = torch.tensor([1 if problem else 0], dtype=torch.int64, device=comm)
            dist.broadcast(bad, src=self._global_rank(0), group=self.process_group)
            if bad.item() and not problem:
                problem = "rank 0's state dict does not match this module (see rank 0's error)"
        if problem:
            raise ValueError(problem)
        if everyone_has:
            self.bank.memory.copy_(state_dict["bank.memory"][self.row_start:self.row_end])
            self.z.copy_(state_dict["z"].reshape(self.z.shape))
            self.rng_state.copy_(state_dict["rng_state"].reshape(self.rng_state.shape))
        else:
            small = torch.zeros(3, dtype=torch.float64, device=comm)
            if have:
                small[0] = float(state_dict["z"].reshape(-1)[0])
            dist.broadcast(small, src=self._global_rank(0), group=self.process_group)
            rng = state_dict["rng_state"].reshape(2).to(comm).clone() if have else \
                torch.empty(2, dtype=torch.int64, device=comm)
            dist.broadcast(rng, src=self._global_rank(0), group=self.process_group)
            self.z.fill_(small[0].item())
            self.rng_state.copy_(rng)
            for r in range(self.world_size):
                start, end = (0, self.num_data) if self.mode == "replicated" else \
                    bank_shard_range(self.num_data, self.world_size, r)
                if end == start:
                    continue
                buf = state_dict["bank.memory"][start:end].to(device=comm, dtype=memory.dtype).contiguous() if have \
                    else torch.empty(end - start, self.dim, dtype=memory.dtype, device=comm)
                dist.broadcast(buf, src=self._global_rank(0), group=self.process_group)
                if self.mode == "replicated" or r == self.rank:
                    self.bank.memory.copy_(buf)
                if self.mode == "replicated":
                    break
        self._z_ready = False

    def _check_full_state(self, sd) -> str:
        missing = [k for k in ("bank.memory", "z", "rng_state") if k not in sd]
        if missing:
            return f"state dict lacks {missing} (expected NPIDLoss / full_state_dict keys)"
        shape = tuple(sd["bank.memory"].shape)
        if shape != (self.num_data, self.dim):
            return f"bank.memory has shape {shape}, expected the whole bank ({self.num_data}, {self.dim})"
        if sd["rng_state"].numel() != 2 or sd["z"].numel() != 1:
            return "rng_state must hold [seed, offset] and z one value"
        return ""

    def extra_repr(self) -> str:
        z = f", z_mode={self.z_mode!r}" if self.loss_type == "nce" else ""
        return (f"num_data={self.num_data}, dim={self.dim}, mode={self.mode!r}, rows=[{self.row_start}, {self.row_end}), "
                f"world_size={self.world_size}, loss={self.loss_type!r}, num_negatives={self.num_negatives}, "
                f"temperature={self.temperature}, momentum={self.momentum}{z}"
                + (f", negatives={self.negatives!r}" if self.negatives != "per-sample" else "")
                + (", exclude_positive=True" if self.exclude_positive else ""))


# ---------------------------------------------------------------- distributed kNN

class _refused_together:
    """Context manager around argument checks: with agree=True (several ranks) the ranks exchange
    whether their checks passed (one all_reduce) and all raise when any refused: the refusing rank
    with its own error, the others with a ValueError naming it. agree=False: errors as they come."""

    def __init__(self, agree: bool, group, device):
        self.agree, self.group, self.device = agree, group, device

    def __enter__(self):
        return self

    def __exit__(self, kind, error, traceback):
        if not self.agree:
            return False
        refused = kind is not None and issubclass(kind, (TypeError, ValueError, IndexError))
        if kind is not None and not refused:
            return False  # not an argument error: let it through as is
        rank = get_rank(self.group)
        flag = torch.tensor([rank + 1 if refused else 0], dtype=torch.int64,
                            device=_comm_device(self.group, torch.device(self.device)))
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        bad = int(flag.item())
        if refused or not bad:
            return False  # re-raise this rank's own error, or all passed
        raise ValueError(f"rank {bad - 1} refused its arguments (see its error); every rank stops so that "
                         "none waits in a collective")


def _knn_checks(bank, bank_labels, num_classes, bank_offset, query=None, k=None, temperature=None):
    C.tensor(bank, "bank")
    C.tensor(bank_labels, "bank_labels")
    if bank_labels.dim() != 1:
        raise ValueError(f"bank_labels must be 1-D (the labels of all n bank rows), got {tuple(bank_labels.shape)}")
    n = bank_labels.shape[0]
    if bank_offset is None and bank.shape[0] != n:
        raise ValueError(f"bank has {bank.shape[0]} rows but bank_labels {n} (a sharded bank needs bank_offset)")
    if bank_offset is not None and not (0 <= bank_offset and bank_offset + bank.shape[0] <= n):
        raise ValueError(f"shard rows [{bank_offset}, {bank_offset + bank.shape[0]}) are outside [0, {n})")
    if bank_offset is None:
        _check_search(query, bank, k if k is not None else 1)
        _check_labels(bank, bank_labels, num_classes)
    else:
        _check_shard(query, bank, bank_offset)
        C.count(num_classes, "num_classes", 1)
        C.labels(bank_labels, "bank_labels", num_classes, (n,), bank, "bank")
        if n and (bank_labels.min() < 0 or bank_labels.max() >= num_classes):
            raise ValueError(f"bank_labels must be in [0, num_classes = {num_classes})")
    if temperature is not None:
        _check_temperature(temperature)
    return n


def _check_shard(query, bank, bank_offset) -> None:
    """A sharded search: this rank's shard may be empty, k may exceed its rows."""
    C.tensor(bank, "bank")
    if bank.dim() != 2 or not bank.is_floating_point():
        raise ValueError(f"bank must be a 2-D float (rows, dim) tensor (this rank's shard), got "
                         f"{tuple(bank.shape)} {bank.dtype}")
    C.features(query, "query", bank.shape[1], allow_empty=True)
    C.same_device(query, "query", bank, "bank")
    C.count(bank_offset, "bank_offset", 0)
    if bank.numel() and C._values_readable(bank) and not C.all_finite(bank):
        raise ValueError("bank holds NaN or inf")


@torch.no_grad()
def distributed_knn_topk(query: torch.Tensor, bank: torch.Tensor, k: int, *, bank_offset: Optional[int] = None,
                         process_group=None, precision: str = "fp32") -> Tuple[torch.Tensor, torch.Tensor]:
    """(similarities, global row indices) of the k nearest bank rows for this rank's queries.

    bank_offset None: `bank` is the whole bank on every rank (each rank searches its own
    queries, no communication). Otherwise `bank` is this rank's shard holding global rows
    [bank_offset, bank_offset + len(bank)): the queries are all_gathered, every rank computes
    the top-k over its shard for all of them, the candidates are sent to the queries' ranks
    (all_to_all) and merged there. precision of the products as in knn_topk."""
    with _refused_together(get_world_size(process_group) > 1 and bank_offset is not None, process_group,
                           bank.device if isinstance(bank, torch.Tensor) else "cpu"):
        if bank_offset is None:
            _check_search(query, bank, k)
        else:
            _check_shard(query, bank, bank_offset)
            C.count(k, "k", 1)
    if bank_offset is None:
        if query.shape[0] == 0:
            return query.new_empty((0, k)), torch.empty(0, k, dtype=torch.int64, device=query.device)
        return ops.knn_topk(query, bank, k, precision)
    world = get_world_size(process_group)
    sizes = _exchange_sizes(query.shape[0], query.device, process_group)
    longest = max(sizes)
    padded = torch.cat([query, query.new_zeros(longest - query.shape[0], query.shape[1])]) if query.shape[0] < longest else query
    everyone = torch.cat(_all_gather_padded(padded.contiguous(), [longest] * world, process_group))
    sims = torch.full((everyone.shape[0], k), -math.inf, dtype=query.dtype, device=query.device)
    rows = torch.full((everyone.shape[0], k), -1, dtype=torch.int64, device=query.device)
    k_here = min(k, bank.shape[0])
    if k_here > 0 and everyone.shape[0] > 0:
        s, i = ops.knn_topk(everyone, bank, k_here, precision)
        sims[:, :k_here] = s
        rows[:, :k_here] = i + bank_offset
    per_rank = [longest] * world
    sims = _all_to_all(sims, per_rank, per_rank, process_group).view(world, longest, k)[:, :query.shape[0]]
    rows = _all_to_all(rows, per_rank, per_rank, process_group).view(world, longest, k)[:, :query.shape[0]]
    sims = sims.permute(1, 0, 2).reshape(query.shape[0], world * k)
    rows = rows.permute(1, 0, 2).reshape(query.shape[0], world * k)
    best, where = sims.topk(k, dim=1, largest=True, sorted=True)
    return best, rows.gather(1, where)


@torch.no_grad()
def distributed_knn_predict(query: torch.Tensor, bank: torch.Tensor, bank_labels: torch.Tensor, num_classes: int,
                            k: int = 200, temperature: float = 0.07, *, bank_offset: Optional[int] = None,
                            process_group=None, precision: str = "fp32") -> torch.Tensor:
    """knn_predict for this rank's queries: (Q_local, num_classes) weighted-kNN class scores
    over the whole bank (replicated, or sharded with bank_offset). bank_labels holds the labels
    of all n rows on every rank. Gather the ranks' results with all_gather_varsize."""
    with _refused_together(get_world_size(process_group) > 1 and bank_offset is not None, process_group,
                           bank.device if isinstance(bank, torch.Tensor) else "cpu"):
        n = _knn_checks(bank, bank_labels, num_classes, bank_offset, query, k, temperature)
        C.count(k, "k", 1, n, f"n_data = {n}")
    sims, rows = distributed_knn_topk(query, bank, k, bank_offset=bank_offset, process_group=process_group,
                                      precision=precision)
    return knn_vote(sims.float(), rows, bank_labels, num_classes, temperature)


@torch.no_grad()
def distributed_knn_evaluate(query: torch.Tensor, query_labels: torch.Tensor, bank: torch.Tensor,
                             bank_labels: torch.Tensor, num_classes: int, k: int = 200, temperature: float = 0.07,
                             recall_ks: Iterable[int] = (1, 5, 10), *, bank_offset: Optional[int] = None,
                             process_group=None, precision: str = "fp32") -> Dict[str, float]:
    """knn_evaluate with the queries split across ranks (each rank passes its own queries,
    e.g. from DistributedEvalSampler; any counts, even zero) and the bank replicated
    (bank_offset None) or sharded (this rank's rows start at bank_offset). The hit counts are
    summed across ranks, so every rank returns the numbers knn_evaluate gives on all queries."""
    with _refused_together(get_world_size(process_group) > 1, process_group,
                           bank.device if isinstance(bank, torch.Tensor) else "cpu"):
        n = _knn_checks(bank, bank_labels, num_classes, bank_offset, query, None, temperature)
        C.count(k, "k", 1, n, f"n_data = {n}")
        C.labels(query_labels, "query_labels", num_classes, (query.shape[0],), query, "query")
        recall_ks = _check_recall_ks(recall_ks, n)
    k_search = max([k] + recall_ks)
    sims, rows = distributed_knn_topk(query, bank, k_search, bank_offset=bank_offset, process_group=process_group,
                                      precision=precision)
    neighbour_labels = bank_labels[rows]
    scores = knn_vote(sims[:, :k].float(), rows[:, :k], bank_labels, num_classes, temperature)
    ranked = scores.topk(min(5, num_classes), dim=1).indices
    hits = ranked == query_labels.unsqueeze(1)
    counts = [hits[:, 0].sum(), hits.any(1).sum(), (neighbour_labels[:, 0] == query_labels).sum()]
    counts += [(neighbour_labels[:, :r] == query_labels.unsqueeze(1)).any(1).sum() for r in recall_ks]
    counts.append(torch.tensor(query.shape[0], device=query.device))
    counts = torch.stack([c.to(torch.int64) for c in counts])
    if get_world_size(process_group) > 1:
        counts = counts.to(_comm_device(process_group, counts.device))
        dist.all_reduce(counts, group=process_group)
    counts = counts.tolist()
    total = max(counts[-1], 1)
    out = {"knn_top1": 100.0 * counts[0] / total, "knn_top5": 100.0 * counts[1] / total,
           "nn1_top1": 100.0 * counts[2] / total}
    for r, c in zip(recall_ks, counts[3:-1]):
        out[f"recall@{r}"] = 100.0 * c / total
    return out
