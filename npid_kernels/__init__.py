"""npid_kernels: fused kernels for non-parametric instance discrimination (Wu et al., CVPR 2018)."""
from . import ops, reference
from .knn import knn_evaluate, knn_predict, nearest_neighbors
from .nn import (
    AliasSampler,
    LinearAverage,
    MemoryBank,
    NCEAverage,
    NCECriterion,
    NCELoss,
    NPIDLoss,
    ParametricInstanceLoss,
)

__version__ = "0.1.0"

__all__ = [
    "ops", "reference", "MemoryBank", "NCEAverage", "NCECriterion", "LinearAverage", "NPIDLoss",
    "NCELoss", "ParametricInstanceLoss", "AliasSampler", "knn_predict", "knn_evaluate", "nearest_neighbors",
]
