"""Weighted kNN evaluation with the queries split across ranks and the bank replicated or sharded
(each rank holding a contiguous block of rows): the numbers knn_evaluate gives on all queries."""
from __future__ import annotations

import math
from typing import Dict, Iterable, Optional, Tuple

import torch

from . import _checks as C
from . import ops
from .dist_utils import (_all_gather_padded, _all_to_all, _exchange_sizes, all_reduce, get_world_size,
                         refused_together)
from .knn import knn_accuracies, knn_hit_counts, knn_vote


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
        C.knn_search(query, bank, k if k is not None else 1)
    else:
        _check_shard(query, bank, bank_offset)
    C.bank_labels(bank_labels, num_classes, n, bank)
    if temperature is not None:
        C.knn_temperature(temperature)
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
    with refused_together(get_world_size(process_group) > 1 and bank_offset is not None, process_group):
        if bank_offset is None:
            C.knn_search(query, bank, k)
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
    with refused_together(get_world_size(process_group) > 1 and bank_offset is not None, process_group):
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
    with refused_together(get_world_size(process_group) > 1, process_group):
        n = _knn_checks(bank, bank_labels, num_classes, bank_offset, query, None, temperature)
        C.count(k, "k", 1, n, f"n_data = {n}")
        C.labels(query_labels, "query_labels", num_classes, (query.shape[0],), query, "query")
        recall_ks = C.recall_ks(recall_ks, n)
    k_search = max([k] + recall_ks)
    sims, rows = distributed_knn_topk(query, bank, k_search, bank_offset=bank_offset, process_group=process_group,
                                      precision=precision)
    counts = knn_hit_counts(sims, rows, query_labels, bank_labels, num_classes, k, temperature, recall_ks)
    return knn_accuracies(all_reduce(counts, process_group), recall_ks)
