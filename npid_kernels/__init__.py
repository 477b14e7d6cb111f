"""npid_kernels: fused kernels for non-parametric instance discrimination (Wu et al., CVPR 2018).
The tests' oracle, npid_kernels.reference, is imported on its own: nothing here depends on it."""
from . import ops
from .knn import knn_evaluate, knn_predict, nearest_neighbors
from .nn import (
    AliasSampler,
    LinearAverage,
    NCEAverage,
    NCECriterion,
    NCELoss,
    NPIDLoss,
    ParametricInstanceLoss,
)
from .placement import MemoryBank

__version__ = "0.1.0"

__all__ = [
    "ops", "MemoryBank", "NCEAverage", "NCECriterion", "LinearAverage", "NPIDLoss", "NCELoss",
    "ParametricInstanceLoss", "AliasSampler", "knn_predict", "knn_evaluate", "nearest_neighbors",
]
