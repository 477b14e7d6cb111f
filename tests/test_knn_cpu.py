"""The CPU kNN kernel's own paths (csrc/cpu/knn_cpu.cpp), on every vector ISA the CPU has:
the dot-product kernel for a few queries, the query panels of each width and their padding,
several work items, the bank split into slices (a small Q) and the slices' merge, k up to n,
ties (the smaller row first, across slices too), NaN, the compaction of a full candidate list
(with ties at the k-th value and with NaN), precisions and bank dtypes, strided banks, and
results that do not depend on the thread count. test_ops.py has the op's general tests."""
import pytest
import torch

from npid_kernels import ops
from npid_kernels import reference as R

from conftest import unit_rows

ISAS = ["baseline", "avx2", "avx512"]


@pytest.fixture(params=ISAS)
def isa(request):
    with ops._cpu_isa(request.param) as running:
        if running != request.param:
            pytest.skip(f"this CPU has no {request.param} (best: {running})")
        yield running


def check_against_reference(q, bank, k, precision="fp32"):
    sims, idx = ops.knn_topk(q, bank, k, precision)
    ref_sims, ref_idx = R.knn_topk(q.double(), bank.double(), k, precision)
    assert sims.shape == idx.shape == (q.shape[0], k)
    tol = 1e-12 if q.dtype == torch.float64 else 2e-6
    assert (sims.double() - ref_sims).abs().max().item() <= tol
    # the returned rows have the returned similarities (near-ties may swap rows)
    rounded = R.round_to_precision(q.double(), precision) @ R.round_to_precision(bank.double(), precision).t()
    assert (rounded.gather(1, idx) - ref_sims).abs().max().item() <= tol
    assert all(len(set(row)) == k for row in idx.tolist())
    assert bool((sims[:, :-1] >= sims[:, 1:]).all())
    return sims, idx


# Q: 1-6 the dot kernel; 7, 17, 33 a narrow / middle / wide last panel; 300 several items.
# n = 20000 with a small Q: the bank is split into slices. k = n - 1 and k = n: one slice.
# (70, 20000, 128): five panels and slices of ~10 blocks of 512 rows, the last one ragged, so
# each block's passes request the next block.
@pytest.mark.parametrize("Q,n,d,k", [
    (1, 20000, 16, 50), (5, 3000, 37, 200), (6, 20000, 3, 7), (7, 1000, 33, 10), (17, 5000, 8, 100),
    (33, 20000, 16, 200), (300, 2000, 24, 20), (3, 300, 5, 299), (40, 257, 9, 257), (2, 1, 4, 1),
    (70, 20000, 128, 100),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_knn_paths_match_reference(isa, Q, n, d, k, dtype):
    g = torch.Generator().manual_seed(Q * 1000 + n + d)
    q = unit_rows(Q, d, generator=g).to(dtype)
    bank = unit_rows(n, d, generator=g).to(dtype)
    check_against_reference(q, bank, k)


@pytest.mark.parametrize("Q", [1, 4, 9, 40])
def test_knn_ties_smaller_row_first_across_slices(isa, Q):
    """Every row stored ~8 times: exact ties, spread over the whole bank and so over the slices
    and over many compactions of the candidate lists (k = 200 of 24,000 rows)."""
    g = torch.Generator().manual_seed(5)
    rows = unit_rows(3000, 16, generator=g, dtype=torch.float32)
    bank = rows[torch.randint(0, 3000, (24000,), generator=g)]
    q = unit_rows(Q, 16, generator=g, dtype=torch.float32)
    sims, idx = check_against_reference(q, bank, 200)
    same = sims[:, 1:] == sims[:, :-1]
    assert bool(same.any()) and bool((idx[:, 1:] > idx[:, :-1])[same].all())


@pytest.mark.parametrize("Q", [1, 20])
def test_knn_exact_order_with_many_equal_values(isa, Q):
    """Few distinct values (multiples of 1/8 in 4 features, exact in float32), so the k-th value
    is shared by many rows at every compaction: the result must be exactly the float64 ranking
    with ties broken by the smaller row."""
    g = torch.Generator().manual_seed(11)
    bank = torch.randint(-4, 5, (9000, 4), generator=g).float() / 8
    q = torch.randint(-4, 5, (Q, 4), generator=g).float() / 8
    k = 300
    sims, idx = ops.knn_topk(q, bank, k)
    exact = q.double() @ bank.double().t()
    order = torch.stack([torch.tensor(sorted(range(bank.shape[0]), key=lambda j: (-e[j].item(), j)))
                         for e in exact])[:, :k]
    assert torch.equal(idx, order)
    assert torch.equal(sims.double(), exact.gather(1, order))


@pytest.mark.parametrize("Q", [1, 20])
def test_knn_nan_rows_rank_first(isa, Q):
    """More NaN rows than a full candidate list holds (the compaction's NaN path): the k best are
    the first k NaN rows, smaller row first, as torch.topk ranks NaN; then the others."""
    g = torch.Generator().manual_seed(2)
    bank = unit_rows(6000, 8, generator=g, dtype=torch.float32)
    nan_rows = torch.arange(7, 6000, 13)  # 461 rows
    bank[nan_rows] = float("nan")
    q = unit_rows(Q, 8, generator=g, dtype=torch.float32)
    k = 50
    sims, idx = ops.knn_topk(q, bank, k)
    assert bool(sims.isnan().all())
    assert torch.equal(idx, nan_rows[:k].expand(Q, k))
    sims, idx = ops.knn_topk(q, bank, 470)
    assert torch.equal(idx[:, :461], nan_rows.expand(Q, 461))
    assert not sims[:, 461:].isnan().any()
    clean = torch.ones(6000, dtype=torch.bool)
    clean[nan_rows] = False
    ref_sims, _ = R.knn_topk(q.double(), bank[clean].double(), 9)
    assert (sims[:, 461:].double() - ref_sims).abs().max().item() < 2e-6
    q_nan = q.clone()
    q_nan[0] = float("nan")
    sims, idx = ops.knn_topk(q_nan, bank, 5)
    assert bool(sims[0].isnan().all()) and bool(((idx >= 0) & (idx < 6000)).all())


@pytest.mark.parametrize("Q", [2, 30])
@pytest.mark.parametrize("precision", ["fp32", "tf32", "bf16"])
@pytest.mark.parametrize("bank_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_knn_precisions_and_bank_dtypes(isa, Q, precision, bank_dtype):
    g = torch.Generator().manual_seed(9)
    q = unit_rows(Q, 48, generator=g, dtype=torch.float32)
    bank = unit_rows(9000, 48, generator=g).to(bank_dtype)
    check_against_reference(q, bank, 40, precision)
    check_against_reference(q.double(), bank if bank_dtype != torch.float32 else bank.double(), 40, precision)


@pytest.mark.parametrize("Q", [3, 40])
def test_knn_strided_banks(isa, Q):
    g = torch.Generator().manual_seed(4)
    bank = unit_rows(5000, 20, generator=g, dtype=torch.float32)
    q = unit_rows(Q, 20, generator=g, dtype=torch.float32)
    expected = ops.knn_topk(q, bank, 30)
    rows_strided = torch.cat([bank, torch.zeros_like(bank)], 1)[:, :20]  # row stride 40
    columns_strided = torch.stack([bank, bank], 2).reshape(5000, 40)[:, ::2]  # column stride 2
    for b in (rows_strided, columns_strided):
        assert not b.is_contiguous()
        got = ops.knn_topk(q, b, 30)
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


def test_knn_independent_of_threads():
    """The threads split the bank into slices for a small Q: the similarities are formed the same
    way whatever the split, so the results are the same bit for bit."""
    g = torch.Generator().manual_seed(8)
    bank = unit_rows(40000, 16, generator=g, dtype=torch.float32)
    before = torch.get_num_threads()
    try:
        for Q in (1, 10, 200):
            q = unit_rows(Q, 16, generator=g, dtype=torch.float32)
            results = []
            for threads in (1, 2, 3):
                torch.set_num_threads(threads)
                results.append(ops.knn_topk(q, bank, 100))
            for sims, idx in results[1:]:
                assert torch.equal(sims, results[0][0]) and torch.equal(idx, results[0][1])
    finally:
        torch.set_num_threads(before)


def test_knn_no_queries():
    sims, idx = ops.knn_topk(torch.empty(0, 8), unit_rows(10, 8, dtype=torch.float32), 3)
    assert sims.shape == idx.shape == (0, 3)
