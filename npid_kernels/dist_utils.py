"""torch.distributed plumbing for the multi-process modules: process-group helpers (torchrun's
environment, DDP wrapping, an evaluation sampler without padding), the bank's shard layout, and
the collectives they use, which short-circuit at world size 1 (no process group needed).
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Iterator, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import nn

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


def all_reduce(t: torch.Tensor, group, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """t reduced over the group's ranks (on the backend's device), back on t's device."""
    if get_world_size(group) == 1:
        return t
    comm = t.to(_comm_device(group, t.device))
    dist.all_reduce(comm, op=op, group=group)
    return comm.to(t.device)


def global_rank(group, group_rank: int) -> int:
    """The global rank of `group`'s rank `group_rank` (what broadcast's src takes)."""
    if group is None or not is_dist():
        return group_rank
    return dist.get_global_rank(group, group_rank)


def agreed_seed(seed: Optional[int], group) -> int:
    """`seed`, or one drawn from torch's global generator on the group's rank 0 and broadcast, so
    that every rank agrees on it."""
    if seed is None:
        seed = int(torch.randint(0, 2**62, (1,)).item())
        if get_world_size(group) > 1:
            t = torch.tensor([seed], dtype=torch.int64, device=_comm_device(group, torch.device("cpu")))
            dist.broadcast(t, src=global_rank(group, 0), group=group)
            seed = int(t.item())
    return int(seed)


@contextlib.contextmanager
def refused_together(agree: bool, group):
    """Around argument checks: with agree=True (several ranks) the ranks exchange whether their
    checks passed (one all_reduce) and all raise when any refused: the refusing rank with its own
    error, the others with a ValueError naming it. agree=False: errors as they come."""
    if not agree:
        yield
        return
    try:
        yield
    except (TypeError, ValueError, IndexError):
        _highest_refusing(group, refused=True)
        raise
    bad = _highest_refusing(group, refused=False)
    if bad:
        raise ValueError(f"rank {bad - 1} refused its arguments (see its error); every rank stops so that "
                         "none waits in a collective")


def _highest_refusing(group, refused: bool) -> int:
    """1 + the highest rank whose checks refused, 0 when all passed."""
    flag = torch.tensor([get_rank(group) + 1 if refused else 0], dtype=torch.int64)
    return int(all_reduce(flag, group, dist.ReduceOp.MAX).item())
