"""Weighted kNN evaluation on the memory bank (the paper's protocol: k = 200, weights exp(s/T))."""
from __future__ import annotations

from typing import Dict, Iterable

import torch

from . import _checks as C
from . import ops


def knn_vote(sims: torch.Tensor, indices: torch.Tensor, bank_labels: torch.Tensor, num_classes: int,
             temperature: float) -> torch.Tensor:
    """lemniscate's weighted kNN vote: (Q, num_classes) scores, each neighbour adding exp(s / T)
    to its label's."""
    weights = (sims / temperature).exp()
    scores = torch.zeros(sims.shape[0], num_classes, dtype=weights.dtype, device=sims.device)
    return scores.scatter_add_(1, bank_labels[indices], weights)


def nearest_neighbors(query: torch.Tensor, bank: torch.Tensor, k: int, precision: str = "fp32"):
    """(similarities, indices) of the k rows of `bank` with the largest dot product, sorted
    descending; streamed over the bank, never the full query x n matrix. precision: "fp32"
    (exact), "tf32" or "bf16" products (tensor cores on CUDA)."""
    C.knn_search(query, bank, k)
    return ops.knn_topk(query, bank, k, precision)


def knn_predict(query: torch.Tensor, bank: torch.Tensor, bank_labels: torch.Tensor, num_classes: int,
                k: int = 200, temperature: float = 0.07, precision: str = "fp32") -> torch.Tensor:
    """(Q, num_classes) class scores: sum over the k nearest rows of exp(s / T), by their label."""
    C.knn_search(query, bank, k)
    C.bank_labels(bank_labels, num_classes, bank.shape[0], bank)
    C.knn_temperature(temperature)
    sims, indices = ops.knn_topk(query, bank, k, precision)
    return knn_vote(sims.float(), indices, bank_labels, num_classes, temperature)


@torch.no_grad()
def knn_evaluate(query: torch.Tensor, query_labels: torch.Tensor, bank: torch.Tensor, bank_labels: torch.Tensor,
                 num_classes: int, k: int = 200, temperature: float = 0.07,
                 recall_ks: Iterable[int] = (1, 5, 10), precision: str = "fp32") -> Dict[str, float]:
    """Accuracies in percent: weighted-kNN top-1 and top-5 (k neighbours), 1-NN top-1, and
    recall@r (a neighbour of the query's class among the r nearest). precision of the
    similarities as in nearest_neighbors."""
    C.knn_search(query, bank, k)
    C.bank_labels(bank_labels, num_classes, bank.shape[0], bank)
    C.labels(query_labels, "query_labels", num_classes, (query.shape[0],), query, "query")
    C.knn_temperature(temperature)
    recall_ks = C.recall_ks(recall_ks, bank.shape[0])
    k_search = max([k] + recall_ks)
    sims, indices = ops.knn_topk(query, bank, k_search, precision)
    return knn_accuracies(knn_hit_counts(sims, indices, query_labels, bank_labels, num_classes, k, temperature,
                                         recall_ks), recall_ks)


def knn_hit_counts(sims, indices, query_labels, bank_labels, num_classes: int, k: int, temperature: float,
                   recall_ks) -> torch.Tensor:
    """int64 [weighted-kNN top-1 hits, top-5 hits, 1-NN hits, recall@r hits for each r, queries]
    from the (Q, >= max(k, recall_ks)) nearest rows, sorted."""
    neighbour_labels = bank_labels[indices]
    scores = knn_vote(sims[:, :k].float(), indices[:, :k], bank_labels, num_classes, temperature)
    hits = scores.topk(min(5, num_classes), dim=1).indices == query_labels.unsqueeze(1)
    counts = [hits[:, 0].sum(), hits.any(1).sum(), (neighbour_labels[:, 0] == query_labels).sum()]
    counts += [(neighbour_labels[:, :r] == query_labels.unsqueeze(1)).any(1).sum() for r in recall_ks]
    counts.append(torch.tensor(query_labels.shape[0], device=query_labels.device))
    return torch.stack([c.to(torch.int64) for c in counts])


def knn_accuracies(counts: torch.Tensor, recall_ks) -> Dict[str, float]:
    """knn_hit_counts' counts in percent of the queries."""
    counts = counts.tolist()
    total = max(counts[-1], 1)
    out = {"knn_top1": 100.0 * counts[0] / total, "knn_top5": 100.0 * counts[1] / total,
           "nn1_top1": 100.0 * counts[2] / total}
    for r, c in zip(recall_ks, counts[3:-1]):
        out[f"recall@{r}"] = 100.0 * c / total
    return out
