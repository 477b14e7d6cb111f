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

from typing import Dict, Optional

import torch
import torch.distributed as dist

from .dist_utils import (DistInfo, DistributedEvalSampler, _comm_device, all_gather_varsize, all_reduce,
                         bank_shard_range, barrier, cleanup_distributed, get_rank, get_world_size, global_rank,
                         init_distributed, is_dist, is_main_process, wrap_ddp)
from .distributed_knn import distributed_knn_evaluate, distributed_knn_predict, distributed_knn_topk
from .nn import NPIDLoss

__all__ = [
    "DistInfo", "init_distributed", "cleanup_distributed", "is_dist", "get_rank", "get_world_size",
    "is_main_process", "barrier", "wrap_ddp", "DistributedEvalSampler", "bank_shard_range",
    "all_gather_varsize", "DistributedNPIDLoss", "distributed_knn_topk", "distributed_knn_predict",
    "distributed_knn_evaluate",
]

MODES = ("replicated", "sharded")


class DistributedNPIDLoss(NPIDLoss):
    """NPIDLoss with its bank placed across a process group (NPIDLoss(placement=mode)): the same
    arguments and forward contract, plus

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
        negatives: as NPIDLoss; with "shared" each rank scores its own set of m rows (drawn from its
            stream, see the module docstring) against its batch. exclude_positive with shared
            negatives needs the replicated mode (the replacement rows are drawn from the whole bank).
        z_mode: as NPIDLoss; the "ema" and "batch" updates use the global batch's noise scores
            (the ranks all_reduce [their sum, their count]: no host sync), so every rank keeps one Z.

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
                 exclude_positive: bool = False, proximal: float = 0.0):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        super().__init__(num_data, dim, num_negatives, temperature, momentum, loss, bank_dtype, z, seed, device,
                         precision, z_mode, z_momentum, negatives, exclude_positive, placement=mode,
                         process_group=process_group, equal_batches=equal_batches, proximal=proximal)
        self.mode, self.process_group = mode, process_group
        self.row_start, self.row_end = self.bank.row_start, self.bank.row_end

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
                dist.broadcast(buf, src=global_rank(self.process_group, r), group=self.process_group)
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
        everyone_has = bool(all_reduce(torch.tensor([int(have)]), self.process_group, dist.ReduceOp.MIN).item())
        if not everyone_has and self.rank == 0 and not have:
            raise ValueError("load_full_state_dict: rank 0 must pass the state dict")
        # Validate (on rank 0 when only it has the dict) and tell everyone, so no rank hangs.
        problem = ""
        if have:
            problem = self._check_full_state(state_dict)
        if self.world_size > 1 and not everyone_has:
            bad = torch.tensor([1 if problem else 0], dtype=torch.int64, device=comm)
            dist.broadcast(bad, src=global_rank(self.process_group, 0), group=self.process_group)
            if bad.item() and not problem:
                problem = "rank 0's state dict does not match this module (see rank 0's error)"
        if problem:
            raise ValueError(problem)
        if everyone_has:
            self.bank.memory.copy_(state_dict["bank.memory"][self.row_start:self.row_end])
            self.z.copy_(state_dict["z"].reshape(self.z.shape))
            self.rng_state.copy_(state_dict["rng_state"].reshape(self.rng_state.shape))
        else:
            z = torch.tensor([float(state_dict["z"].reshape(-1)[0]) if have else 0.0], dtype=torch.float64, device=comm)
            dist.broadcast(z, src=global_rank(self.process_group, 0), group=self.process_group)
            rng = state_dict["rng_state"].reshape(2).to(comm).clone() if have else \
                torch.empty(2, dtype=torch.int64, device=comm)
            dist.broadcast(rng, src=global_rank(self.process_group, 0), group=self.process_group)
            self.z.fill_(z.item())
            self.rng_state.copy_(rng)
            for r in range(self.world_size):
                start, end = (0, self.num_data) if self.mode == "replicated" else \
                    bank_shard_range(self.num_data, self.world_size, r)
                if end == start:
                    continue
                buf = state_dict["bank.memory"][start:end].to(device=comm, dtype=memory.dtype).contiguous() if have \
                    else torch.empty(end - start, self.dim, dtype=memory.dtype, device=comm)
                dist.broadcast(buf, src=global_rank(self.process_group, 0), group=self.process_group)
                if self.mode == "replicated" or r == self.rank:
                    self.bank.memory.copy_(buf)
                if self.mode == "replicated":
                    break
        self._z_known = False

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
