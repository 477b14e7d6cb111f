"""The product's own copies of what the oracle (npid_kernels.reference) also computes, checked
against it: the kNN vote, the precision rounding of the "tf32"/"bf16" products, and lemniscate's
NCE criterion (the drop-in NCECriterion's). Neither side imports the other."""
import pytest
import torch

from npid_kernels import ops
from npid_kernels import reference as R
from npid_kernels.knn import knn_vote
from npid_kernels.nn import nce_criterion


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_knn_vote(dtype):
    g = torch.Generator().manual_seed(0)
    sims = torch.rand(7, 5, generator=g, dtype=torch.float64).to(dtype) * 2 - 1
    indices = torch.randint(0, 30, (7, 5), generator=g)
    labels = torch.randint(0, 4, (30,), generator=g)
    assert torch.equal(knn_vote(sims, indices, labels, 4, 0.07), R.knn_vote(sims, indices, labels, 4, 0.07))


@pytest.mark.parametrize("precision", ops.PRECISIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_round_to_precision(precision, dtype):
    g = torch.Generator().manual_seed(1)
    t = torch.randn(200, generator=g, dtype=torch.float64).to(dtype)
    t[:4] = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0], dtype=dtype)
    t[4:8] = torch.tensor([1 + 2**-11, 1 + 3 * 2**-11, 1 + 2**-8, 1 + 3 * 2**-8], dtype=dtype)  # ties to even
    mine, oracle = ops.round_to_precision(t, precision), R.round_to_precision(t, precision)
    assert mine.dtype == oracle.dtype and torch.equal(mine.isnan(), oracle.isnan())
    assert torch.equal(mine.nan_to_num(), oracle.nan_to_num())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_nce_criterion(dtype):
    g = torch.Generator().manual_seed(2)
    probs = torch.rand(6, 9, generator=g, dtype=torch.float64).to(dtype) * 1e-3
    probs[0, 0] = 0.0  # eps keeps the logs finite
    assert torch.equal(nce_criterion(probs, 1000), R.nce_criterion(probs, 1000))
