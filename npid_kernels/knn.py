"""Weighted kNN evaluation on the memory bank (the paper's protocol: k = 200, weights exp(s/T))."""
from __future__ import annotations

from typing import Dict, Iterable

import torch

from . import _checks as C
from . import ops
from .reference import knn_vote


def _check_search(query, bank, k: int, k_name: str = "k") -> None:
    """query (Q, d) and bank (n, d), float, same device, finite (on the CPU), 1 <= k <= n."""
    C.tensor(bank, "bank")
    if bank.dim() != 2 or bank.shape[0] == 0 or bank.shape[1] == 0:
        raise ValueError(f"bank must be a non-empty 2-D (n_data, dim) tensor, got shape {tuple(bank.shape)}")
    if not bank.is_floating_point():
        raise ValueError(f"bank must be a floating-point tensor, got {bank.dtype}")
    C.features(query, "query", bank.shape[1], allow_empty=True)
    C.same_device(query, "query", bank, "bank")
    C.count(k, k_name, 1, bank.shape[0], f"n_data = {bank.shape[0]}")
    if bank.numel() and C._values_readable(bank) and not C.all_finite(bank):
        raise ValueError("bank holds NaN or inf")


def _check_temperature(temperature) -> None:
    if not (isinstance(temperature, (int, float)) and temperature > 0 and temperature != float("inf")):
        raise ValueError(f"temperature must be positive and finite, got {temperature}")


def nearest_neighbors(query: torch.Tensor, bank: torch.Tensor, k: int, precision: str = "fp32"):
    """(similarities, indices) of the k rows of `bank` with the largest dot product, sorted
    descending; streamed over the bank, never the full query x n matrix. precision: "fp32"
    (exact), "tf32" or "bf16" products (tensor cores on CUDA)."""
    _check_search(query, bank, k)
    return ops.knn_topk(query, bank, k, precision)


def knn_predict(query: torch.Tensor, bank: torch.Tensor, bank_labels: torch.Tensor, num_classes: int,
                k: int = 200, temperature: float = 0.07, precision: str = "fp32") -> torch.Tensor:
    """(Q, num_classes) class scores: sum over the k nearest rows of exp(s / T), by their label."""
    _check_search(query, bank, k)
    _check_labels(bank, bank_labels, num_classes)
    _check_temperature(temperature)
    sims, indices = ops.knn_topk(query, bank, k, precision)
    return knn_vote(sims.float(), indices, bank_labels, num_classes, temperature)


@torch.no_grad()
def knn_evaluate(query: torch.Tensor, query_labels: torch.Tensor, bank: torch.Tensor, bank_labels: torch.Tensor,
                 num_classes: int, k: int = 200, temperature: float = 0.07,
                 recall_ks: Iterable[int] = (1, 5, 10), precision: str = "fp32") -> Dict[str, float]:
    """Accuracies in percent: weighted-kNN top-1 and top-5 (k neighbours), 1-NN top-1, and
    recall@r (a neighbour of the query's class among the r nearest). precision of the
    similarities as in nearest_neighbors."""
    _check_search(query, bank, k)
    _check_labels(bank, bank_labels, num_classes)
    C.labels(query_labels, "query_labels", num_classes, (query.shape[0],), query, "query")
    _check_temperature(temperature)
    recall_ks = _check_recall_ks(recall_ks, bank.shape[0])
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
    C.count(num_classes, "num_classes", 1)
    C.labels(bank_labels, "bank_labels", num_classes, (bank.shape[0],), bank, "bank")
    if bank_labels.numel() and (bank_labels.min() < 0 or bank_labels.max() >= num_classes):  # also on CUDA (eval)
        raise ValueError(f"bank_labels must be in [0, num_classes = {num_classes})")


def _check_recall_ks(recall_ks, n: int):
    """The r of recall@r: ints >= 1; those above n are left out (the neighbours of all n rows)."""
    recall_ks = list(recall_ks)
    for r in recall_ks:
        C.count(r, "recall_ks entries", 1)
    return sorted(set(int(r) for r in recall_ks if r <= n))
