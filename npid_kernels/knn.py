"""Weighted kNN evaluation on the memory bank (the paper's protocol: k = 200, weights exp(s/T))."""
from __future__ import annotations

from typing import Dict, Iterable

import torch

from . import ops
from .reference import knn_vote


def nearest_neighbors(query: torch.Tensor, bank: torch.Tensor, k: int, precision: str = "fp32"):
    """(similarities, indices) of the k rows of `bank` with the largest dot product, sorted
    descending; streamed over the bank, never the full query x n matrix. precision: "fp32"
    (exact), "tf32" or "bf16" products (tensor cores on CUDA)."""
    return ops.knn_topk(query, bank, k, precision)


def knn_predict(query: torch.Tensor, bank: torch.Tensor, bank_labels: torch.Tensor, num_classes: int,
                k: int = 200, temperature: float = 0.07, precision: str = "fp32") -> torch.Tensor:
    """(Q, num_classes) class scores: sum over the k nearest rows of exp(s / T), by their label."""
    _check_labels(bank, bank_labels, num_classes)
    sims, indices = ops.knn_topk(query, bank, k, precision)
    return knn_vote(sims.float(), indices, bank_labels, num_classes, temperature)


@torch.no_grad()
def knn_evaluate(query: torch.Tensor, query_labels: torch.Tensor, bank: torch.Tensor, bank_labels: torch.Tensor,
                 num_classes: int, k: int = 200, temperature: float = 0.07,
                 recall_ks: Iterable[int] = (1, 5, 10), precision: str = "fp32") -> Dict[str, float]:
    """Accuracies in percent: weighted-kNN top-1 and top-5 (k neighbours), 1-NN top-1, and
    recall@r (a neighbour of the query's class among the r nearest). precision of the
    similarities as in nearest_neighbors."""
    _check_labels(bank, bank_labels, num_classes)
    if query_labels.shape[0] != query.shape[0]:
        raise ValueError(f"query_labels has {query_labels.shape[0]} entries but query has {query.shape[0]} rows")
    recall_ks = sorted(set(int(r) for r in recall_ks if r <= bank.shape[0]))
    k_search = max([k] + recall_ks)
    sims, indices = ops.knn_topk(query, bank, k_search, precision)
    neighbour_labels = bank_labels[indices]
    scores = knn_vote(sims[:, :k].float(), indices[:, :k], bank_labels, num_classes, temperature)
    ranked = scores.topk(min(5, num_classes), dim=1).indices
    hits = ranked == query_labels.unsqueeze(1)
    total = max(query.shape[0], 1)
    out = {
        "knn_top1": 100.0 * hits[:, 0].sum().item() / total,
        "knn_top5": 100.0 * hits.any(1).sum().item() / total,
        "nn1_top1": 100.0 * (neighbour_labels[:, 0] == query_labels).sum().item() / total,
    }
    for r in recall_ks:
        out[f"recall@{r}"] = 100.0 * (neighbour_labels[:, :r] == query_labels.unsqueeze(1)).any(1).sum().item() / total
    return out


def _check_labels(bank, bank_labels, num_classes):
    if bank_labels.shape != (bank.shape[0],):
        raise ValueError(f"bank_labels must have shape ({bank.shape[0]},), got {tuple(bank_labels.shape)}")
    if bank_labels.numel() and (bank_labels.min() < 0 or bank_labels.max() >= num_classes):
        raise ValueError(f"bank_labels must be in [0, num_classes = {num_classes})")
