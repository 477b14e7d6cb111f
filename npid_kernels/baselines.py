"""Reference training that is not NPID, for the tables that set NPID beside it."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import _checks as C
from .nn import MemoryBank


class SupervisedLoss(nn.Module):
    """The supervised reference of the paper's comparisons: the same encoder and low-dim head
    trained with the labels. Each class has a learned prototype; P(c|v) = softmax_c(w_c·v / T)
    over the L2-normalised prototypes and features (the non-parametric softmax's form, with
    classes instead of instances), and the loss is the cross-entropy against each image's label.
    Like the parametric baseline, it keeps a momentum record of each instance's features
    (`memory`) for the per-epoch kNN monitor; the loss never reads it.

    forward(features, indices) looks the labels up by instance index and returns the batch-mean
    cross-entropy."""

    def __init__(self, labels: torch.Tensor, num_classes: int, dim: int = 128, temperature: float = 0.07,
                 momentum: float = 0.5, device=None):
        super().__init__()
        if labels.dim() != 1 or labels.dtype != torch.int64:
            raise TypeError(f"labels must be a 1-d int64 tensor, got {labels.dtype} of shape {tuple(labels.shape)}")
        if labels.numel() and not (0 <= int(labels.min()) and int(labels.max()) < num_classes):
            raise ValueError(f"labels must lie in [0, {num_classes}), got [{int(labels.min())}, {int(labels.max())}]")
        if not temperature > 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        self.temperature, self.momentum = float(temperature), float(momentum)
        self.register_buffer("labels", labels.to(device))
        self.prototypes = nn.Parameter(F.normalize(torch.randn(num_classes, dim, device=device), dim=1))
        self.bank = MemoryBank(labels.numel(), dim, torch.float32, device)

    @property
    def memory(self) -> torch.Tensor:
        return self.bank.memory

    def forward(self, features: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        C.batch(features, indices, self.bank.memory)
        features = features.to(self.prototypes.dtype)
        logits = features @ F.normalize(self.prototypes, dim=1).t() / self.temperature
        loss = F.cross_entropy(logits, self.labels[indices])
        if self.training:
            self.bank.update_(features.detach(), indices, self.momentum)
        return loss

    def extra_repr(self) -> str:
        return (f"num_data={self.labels.numel()}, classes={self.prototypes.shape[0]}, dim={self.prototypes.shape[1]}, "
                f"temperature={self.temperature}, momentum={self.momentum}")
