"""Where NPIDLoss's bank rows live: the module holding them (NPIDLoss.bank, state-dict key
"bank.memory") answers what depends on that: which bank and row ids the loss ops run on (the whole
bank, or the rows a step needs fetched from their owners, with the real n for NCE's Pn = 1/n), how
Z and the argument checks are agreed across ranks, and how the momentum update reaches the rows.

LocalBank: one process. ReplicatedBank: every rank holds the whole bank. ShardedBank: rank r holds
rows bank_shard_range(n, G, r). The distributed banks initialise their rows from the seed in fixed
row blocks, so the bank does not depend on the world size or the placement.
"""
from __future__ import annotations

import contextlib
import math
from typing import List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn

from . import _checks as C
from . import knn, ops
from .dist_utils import (_all_gather_padded, _all_to_all, _exchange_counts, _exchange_sizes, all_reduce,
                         bank_shard_range, get_rank, get_world_size, refused_together)


def lemniscate_bank_init(num_data: int, dim: int, dtype=torch.float32, device=None, generator=None) -> torch.Tensor:
    """lemniscate's memory initialisation: uniform in [-s, s], s = 1 / sqrt(dim / 3), rows not normalised."""
    stdv = 1.0 / math.sqrt(dim / 3)
    bank = torch.rand(num_data, dim, device=device, generator=generator).mul_(2 * stdv).add_(-stdv)
    return bank.to(dtype)


class MemoryBank(nn.Module):
    """The (num_data, dim) memory bank V, one row per training instance, as a buffer `memory`.

    dtype may be float32 (faithful), float64, or bfloat16/float16 (half the bytes per step).
    """

    def __init__(self, num_data: int, dim: int = 128, dtype: torch.dtype = torch.float32, device=None,
                 generator: Optional[torch.Generator] = None):
        super().__init__()
        C.bank_size(num_data, dim)
        self.register_buffer("memory", lemniscate_bank_init(num_data, dim, dtype, device, generator))

    @property
    def num_data(self) -> int:
        return self.memory.shape[0]

    @property
    def dim(self) -> int:
        return self.memory.shape[1]

    @torch.no_grad()
    def update_(self, features: torch.Tensor, indices: torch.Tensor, momentum: float = 0.5) -> None:
        """memory[indices] <- normalise(momentum * memory[indices] + (1 - momentum) * features)."""
        C.batch(features, indices, self.memory)
        if not 0 <= momentum <= 1:
            raise ValueError(f"momentum must be in [0, 1], got {momentum}")
        ops.momentum_update_(self.memory, features, indices, momentum)

    def nearest_neighbors(self, query: torch.Tensor, k: int):
        return knn.nearest_neighbors(query, self.memory, k)

    def extra_repr(self) -> str:
        return f"num_data={self.num_data}, dim={self.dim}, dtype={self.memory.dtype}"


class _WholeBankRows:
    """The loss ops run on this rank's `memory`, the whole bank, drawing their rows in-kernel."""

    def sampled_rows(self, indices, idx, rng_state, num_negatives: int, exclude_positive: bool):
        """(bank, positives, the per-sample ops' row arguments, n_data) for per-sample negatives."""
        rows = dict(idx=idx, rng_state=None if idx is not None else rng_state, num_negatives=num_negatives,
                    exclude_positive=exclude_positive)
        return self.memory, indices, rows, None

    def shared_rows(self, indices, rows, rng_state, num_negatives: int, exclude_positive: bool):
        """(bank, positives, the shared-negative ops' row arguments, n_data)."""
        shared = dict(rows=rows, rng_state=rng_state, num_negatives=num_negatives, exclude_positive=exclude_positive)
        return self.memory, indices, shared, None

    def full_softmax_loss(self, features, indices, temperature: float, precision: str, proximal: float):
        """(per-sample loss, ||x - v_y||^2) of the exact softmax over the whole bank."""
        return ops.full_softmax_loss(features, self.memory, indices, temperature, precision, proximal=proximal,
                                     with_sq_dist=True)


class LocalBank(_WholeBankRows, MemoryBank):
    """One process: Z is estimated by a device op (no host sync), the update is update_'s."""

    world_size, rank = 1, 0
    checks_idx_range = False  # the ops check an explicit idx's rows in their pass over them

    checks_agreed = staticmethod(contextlib.nullcontext)  # no other rank to agree with

    def estimate_z_(self, z, features, bank, y, rows: int, **kwargs) -> bool:
        """Z from this batch where unset, by a device op; never known set (finding out would sync)."""
        ops.nce_estimate_z_(z, features, bank, y, **kwargs)
        return False

    def noise_stat(self, noise_exp_sum, count):
        """The step's (sum of the noise exp-scores, their count) over every rank's batch."""
        return noise_exp_sum, count


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
    out = torch.empty(end - start, dim, dtype=dtype, device=device)
    for block in range(start // _INIT_CHUNK, -(-end // _INIT_CHUNK)):
        lo, hi = block * _INIT_CHUNK, min((block + 1) * _INIT_CHUNK, num_data)
        rows = lemniscate_bank_init(hi - lo, dim, generator=torch.Generator().manual_seed(_mix(seed, block)))
        a, b = max(lo, start), min(hi, end)
        out[a - start:b - start] = rows[a - lo:b - lo].to(device=device, dtype=dtype)
    return out


class _GroupBank(nn.Module):
    """A bank placed across the ranks of a process group (None: the default group; no process group
    at all: world size 1). Holds `memory`, rows [row_start, row_end) of the bank."""

    checks_idx_range = True  # the sharded bank fetches an idx's rows (collectives) before any op
    sharded: bool  # this rank holds rows bank_shard_range(n, G, rank), else the whole bank

    def __init__(self, num_data: int, dim: int, dtype, device, seed: int, process_group=None,
                 equal_batches: bool = False):
        super().__init__()
        self.num_data, self.dim = num_data, dim
        self.process_group, self.equal_batches = process_group, bool(equal_batches)
        self.world_size, self.rank = get_world_size(process_group), get_rank(process_group)
        self.shard_rows = -(-num_data // self.world_size) if self.sharded else num_data
        self.row_start, self.row_end = (bank_shard_range(num_data, self.world_size, self.rank) if self.sharded
                                        else (0, num_data))
        self.register_buffer("memory", _init_rows(seed, num_data, dim, self.row_start, self.row_end, dtype, device))

    def checks_agreed(self):
        """The value checks (rows in range, finite features) read this rank's batch: the ranks agree
        on the outcome, so that a refused batch stops every rank instead of leaving the others
        waiting in a collective. Only where values are read (CPU, or NPID_CUDA_SYNC_CHECKS=1 on
        CUDA): an all_reduce and a host read per step."""
        agree = self.world_size > 1 and C._values_readable(self.memory)
        return refused_together(agree, self.process_group)

    def estimate_z_(self, z, features, bank, y, rows: int, **kwargs) -> bool:
        """The first-batch Z over the global batch: each rank's nce_estimate_z_ on its `rows` scores,
        weighted by the row counts (one all_reduce), as one process on the global batch. Returns
        whether Z is set (one host read). A rank whose estimate fails or stays unset (the CUDA op
        leaves it unset when the mean score is not finite) contributes NaN instead of raising, so
        that all ranks reach the all_reduce and raise together, the failing one with its message."""
        if float(z.item()) > 0:
            return True
        z_local = torch.full((1,), -1.0, dtype=torch.float64, device=features.device)
        error = None
        try:
            ops.nce_estimate_z_(z_local, features, bank, y, **kwargs)
        except RuntimeError as e:
            error = e
        z_local = torch.where(z_local > 0, z_local, float("nan"))
        # z = (sum_r z_r * rows_r) / sum_r rows_r: the estimate on the whole first global batch.
        stats = all_reduce(torch.stack([z_local.reshape(()).double() * rows,
                                        torch.tensor(float(rows), dtype=torch.float64, device=z_local.device)]),
                           self.process_group)
        if error is not None:
            raise error
        value = stats[0] / stats[1]
        if not torch.isfinite(value) or value <= 0:
            raise RuntimeError(f"the Z estimate agreed across ranks is {value.item()}, not a positive number "
                               "(NaN or inf features on some rank?)")
        with torch.no_grad():
            z.fill_(value.item())
        return True

    def noise_stat(self, noise_exp_sum, count):
        """The global batch's (sum of the noise exp-scores, their count): the ranks all_reduce the
        same two numbers, so every rank applies the same Z update (a device collective, no host
        sync). The sum comes back as one "sample" for z_ema_update_."""
        stats = all_reduce(torch.stack([noise_exp_sum.sum().double(),
                                        torch.tensor(float(count), dtype=torch.float64, device=noise_exp_sum.device)]),
                           self.process_group)
        return stats[0:1], stats[1]

    def batch_sizes(self, size: int, device) -> List[int]:
        if self.equal_batches:
            return [int(size)] * self.world_size
        return _exchange_sizes(size, device, self.process_group)

    def extra_repr(self) -> str:
        return (f"rows=[{self.row_start}, {self.row_end}) of {self.num_data}, dim={self.dim}, "
                f"dtype={self.memory.dtype}, rank={self.rank} of {self.world_size}")


class ReplicatedBank(_WholeBankRows, _GroupBank):
    """Every rank holds the whole bank; the update is all_gathered so the copies stay bit-identical."""

    sharded = False

    @torch.no_grad()
    def update_(self, features: torch.Tensor, indices: torch.Tensor, momentum: float) -> None:
        """The momentum update with the global batch in rank order: duplicates follow the
        single-process rule (the last occurrence in the global batch wins)."""
        if self.world_size > 1:
            sizes = self.batch_sizes(features.shape[0], features.device)
            features = torch.cat(_all_gather_padded(features.contiguous(), sizes, self.process_group))
            indices = torch.cat(_all_gather_padded(indices.contiguous(), sizes, self.process_group))
        ops.momentum_update_(self.memory, features, indices, momentum)


class ShardedBank(_GroupBank):
    """Rank r holds rows bank_shard_range(n, G, r): the rows a step needs are fetched from their
    owners with all_to_all and the update is routed to the owners."""

    sharded = True

    def fetch_rows(self, rows: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(fetched, inverse): the distinct bank rows `rows` refers to, fetched from their owners
        (all_to_all of the row ids, all_to_all of the rows back), and rows' positions in them."""
        unique, inverse = torch.unique(rows, sorted=True, return_inverse=True)
        if unique.numel() and (unique[0] < 0 or unique[-1] >= self.num_data):
            bad = unique[0] if unique[0] < 0 else unique[-1]
            raise IndexError(f"row {int(bad)} is outside the bank [0, {self.num_data})")
        owner = unique // self.shard_rows  # sorted rows: already grouped by owner, in rank order
        send, recv = _exchange_counts(torch.bincount(owner, minlength=self.world_size), self.process_group)
        requested = _all_to_all(unique, send, recv, self.process_group)
        served = self.memory.index_select(0, requested - self.row_start)
        fetched = _all_to_all(served, recv, send, self.process_group)
        return fetched, inverse

    def sampled_rows(self, indices, idx, rng_state, num_negatives: int, exclude_positive: bool):
        """The same kernels as on the whole bank, run on the fetched rows and told the real n (NCE's
        c = K/n and Z = mean score * n would otherwise use the fetched rows' count)."""
        if idx is None:
            idx = ops.sample_negatives(indices, rng_state, self.num_data, num_negatives, exclude_positive)
        fetched, local_idx = self.fetch_rows(idx.reshape(-1))
        local_idx = local_idx.view(idx.shape)
        return fetched, local_idx[:, 0].contiguous(), dict(idx=local_idx), self.num_data

    def shared_rows(self, indices, rows, rng_state, num_negatives: int, exclude_positive: bool):
        """This rank's m rows and its positives, fetched from their owners (exclude_positive is
        refused here: its replacement rows are drawn from the whole bank inside the op)."""
        if rows is None:
            rows = ops.shared_negative_rows(rng_state, self.num_data, num_negatives)
        fetched, inverse = self.fetch_rows(torch.cat([indices, rows]))
        batch = indices.shape[0]
        return fetched, inverse[:batch].contiguous(), dict(rows=inverse[batch:].contiguous()), self.num_data

    def full_softmax_loss(self, features, indices, temperature: float, precision: str, proximal: float):
        return _ShardedFullSoftmax.apply(features, indices, self, temperature, precision, proximal)

    @torch.no_grad()
    def update_(self, features: torch.Tensor, indices: torch.Tensor, momentum: float) -> None:
        """Route every (feature, index) to the rank owning the row. A stable sort by owner keeps
        each rank's order, and all_to_all concatenates sources in rank order, so each owner sees
        its rows in global-batch order (last duplicate wins)."""
        if indices.numel() and (indices.min() < 0 or indices.max() >= self.num_data):
            raise IndexError(f"indices must be in [0, {self.num_data})")
        owner = indices // self.shard_rows
        order = torch.sort(owner, stable=True).indices
        send, recv = _exchange_counts(torch.bincount(owner, minlength=self.world_size), self.process_group)
        mine_idx = _all_to_all(indices[order], send, recv, self.process_group)
        mine_x = _all_to_all(features[order].contiguous(), send, recv, self.process_group)
        if mine_idx.numel():
            ops.momentum_update_(self.memory, mine_x, mine_idx - self.row_start, momentum)

    def full_softmax_loss_and_grad(self, x: torch.Tensor, y: torch.Tensor, temperature: float, precision: str,
                                   proximal: float = 0.0):
        """Per-sample exact softmax loss, grad_x and ||x - v_y||^2 with the bank split across ranks.

        Every rank streams its shard for every rank's queries with the fused full_softmax_loss
        (against its own row 0, from which the shard's logsumexp lse_r and softmax-weighted
        mean row E_r are recovered), the ranks' lse_r are all_gathered and combined
        (lse = logsumexp_r lse_r), and sum_r exp(lse_r - lse) E_r is summed at the query's rank
        (all_to_all). loss = lse - s_pos, grad_x = (sum_r ... - w_pos) / T, as in one process. The
        proximal term uses the positive's fetched row unrounded, as the fused ops do."""
        memory = self.memory
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        inv_t = 1.0 / temperature
        sizes = self.batch_sizes(x.shape[0], x.device)
        queries = torch.cat(_all_gather_padded(x.contiguous(), sizes, self.process_group))
        q_all = queries.shape[0]
        if memory.shape[0] > 0:
            first_row = queries.new_zeros(q_all, dtype=torch.int64)
            loss_r, grad_r = ops.full_softmax_loss_and_grad(queries, memory, first_row, temperature, precision)
            # The op formed every product from operands rounded to `precision`; so do we.
            w0 = ops.round_to_precision(memory[0].to(acc), precision)
            lse_r = loss_r.to(acc) + (ops.round_to_precision(queries.to(acc), precision) * w0).sum(1) * inv_t
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
        fetched, inverse = self.fetch_rows(y)
        w_pos = ops.round_to_precision(fetched.index_select(0, inverse).to(acc), precision)
        start = sum(sizes[:self.rank])
        loss = lse[start:start + x.shape[0]] - (ops.round_to_precision(x.to(acc), precision) * w_pos).sum(1) * inv_t
        grad_x = (expected_row - w_pos) * inv_t
        diff = x.to(acc) - fetched.index_select(0, inverse).to(acc)
        sq_dist = (diff * diff).sum(1)
        if proximal:
            loss = loss + proximal * sq_dist
            grad_x = grad_x + (2.0 * proximal) * diff
        return loss.to(x.dtype), grad_x.to(x.dtype), sq_dist


class _ShardedFullSoftmax(torch.autograd.Function):
    """Exact non-parametric softmax with the bank split across ranks; loss and grad_x in the
    forward (the bank is constant), backward scales the saved grad_x like the fused ops."""

    @staticmethod
    def forward(ctx, x, y, bank, temperature, precision, proximal):
        with torch.no_grad():
            loss, grad_x, sq_dist = bank.full_softmax_loss_and_grad(x.detach(), y, temperature, precision, proximal)
        ctx.save_for_backward(grad_x)
        ctx.mark_non_differentiable(sq_dist)
        return loss, sq_dist

    @staticmethod
    def backward(ctx, grad_loss, grad_sq_dist):
        (grad_x,) = ctx.saved_tensors
        return grad_loss.unsqueeze(1) * grad_x, None, None, None, None, None
