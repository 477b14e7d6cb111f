"""Benchmarks of the ops that scan the whole bank: the exact non-parametric softmax and kNN top-k.

Full softmax (test_full_softmax), providers:
  torch          cross_entropy(x @ bank.T / T, y) (bench_common.torch_full_softmax_loss), materialises
                 B x N logits
  torch_compile  torch.compile(dynamic=False) of the same function
  npid           ops.full_softmax_loss (streams the bank in chunks, online logsumexp)
and passes forward / forward_backward / step (loss + backward + momentum update of bank[y];
torch: bench_common.full_softmax_step, which mirrors reference.nce_step).

Both benchmarks take a precision of the x . bank products: fp32; tf32 (torch: allow_tf32 on; npid:
precision="tf32"; the GPU only, on the CPU torch has no TF32); bf16 (torch: operands cast to bf16,
its matmul returns bf16; npid: precision="bf16", fp32 output). Results are checked against the
exact float64 answer with a tolerance per precision.

kNN top-k (test_knn, inference only, pass "forward"), providers:
  torch          chunked: for every 1,000 queries, (q @ bank.T).topk(k) (bench_common style,
                 the bank converted to the query dtype once per call); fewer queries a chunk
                 when 1,000 x N similarities would pass 2^28 (1 GiB of fp32)
  torch_compile  the same loop with the per-chunk matmul + topk compiled
  faiss          faiss-cpu IndexFlatIP.search (exact inner product), the CPU, an fp32 bank and
                 fp32 products only; the index (a copy of the bank) is built before timing, at
                 torch's thread count (faiss.omp_set_num_threads). Skipped, with the reason,
                 where faiss is not installed (pip install faiss-cpu; an optional benchmark
                 dependency, never npid_kernels')
  npid           ops.knn_topk
Queries are fp32 (ops.knn_topk takes fp32/fp64 queries with any bank dtype). Every kNN case also
records peak_rss_extra_bytes (bench_common.measure_peak_rss_bytes), which sees faiss's own
buffers; faiss's peak_extra_bytes is that measure, since the torch allocator sees none of them.

Every case is checked once against float64 before timing: loss/grad/bank rows for the
softmax; for kNN the top-k similarities of the first 256 queries and, for those, that the
returned indices really have the returned similarities.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Dict

import pytest
import torch

from npid_kernels import ops
from npid_kernels import reference as ref

from .bench_common import (
    make_pass,
    DTYPES, KNN_FAISS_SHAPES, MOMENTUM, PASSES, TEMPERATURE, check_bank_update, check_close, compiled,
    elem_size, expected_rows, full_softmax_shapes, full_softmax_step, knn_shapes, make_generator,
    measure_peak_rss_bytes, require_compile, run_benchmark, scan_precisions, settings_from_config, sync,
    torch_full_softmax_loss, torch_matmul_precision, unit_rows,
)

FS_PROVIDERS = ("torch", "torch_compile", "npid")
KNN_PROVIDERS = ("torch", "torch_compile", "faiss", "npid")
KNN_CHUNK = 1000          # queries per chunk for the torch providers
KNN_CHUNK_VALUES = 1 << 28  # ... at most this many similarities per chunk
KNN_CHECK_QUERIES = 256   # queries checked against the float64 reference
# vs the exact float64 answer; tf32 / bf16 round the operands (and torch's bf16 matmul its output)
LOSS_TOL = {"fp32": 2e-5, "tf32": 2e-3, "bf16": 1e-2}
GRAD_TOL = {"fp32": 2e-4, "tf32": 1e-2, "bf16": 5e-2}
KNN_ABS_TOL = {"fp32": 1e-4, "tf32": 2e-3, "bf16": 2e-2}  # similarities of unit vectors


def pytest_generate_tests(metafunc):
    s = settings_from_config(metafunc.config)
    if metafunc.function.__name__ == "test_full_softmax":
        metafunc.parametrize("B,N,D,bank_dtype", full_softmax_shapes(s))
        metafunc.parametrize("pass_", PASSES)
        metafunc.parametrize("precision", scan_precisions(s))
        metafunc.parametrize("provider", FS_PROVIDERS)
    elif metafunc.function.__name__ == "test_knn":
        metafunc.parametrize("Q,N,D,bank_dtype,topk", knn_shapes(s))
        metafunc.parametrize("precision", scan_precisions(s))
        metafunc.parametrize("provider", KNN_PROVIDERS)


# ---------------------------------------------------------------- full softmax


@dataclasses.dataclass
class FsCase:
    bank: torch.Tensor
    x: torch.Tensor
    y: torch.Tensor
    expected: Dict[str, torch.Tensor]


_FS: Dict[tuple, FsCase] = {}


def get_fs_case(B, N, D, bank_dtype, device) -> FsCase:
    key = (B, N, D, bank_dtype, device)
    if key not in _FS:
        _FS.clear()
        g = make_generator("full_softmax", *key)
        bank32 = unit_rows(N, D, g)
        y = torch.randperm(N, generator=g)[:B]
        x = torch.nn.functional.normalize(bank32[y] + 0.5 * torch.randn(B, D, generator=g), dim=1)
        bank, x, y = bank32.to(DTYPES[bank_dtype]).to(device), x.to(device), y.to(device)
        xd = x.double().requires_grad_()
        mean = ref.full_softmax_loss(xd, bank.double(), y, TEMPERATURE).mean()
        (grad,) = torch.autograd.grad(mean, xd)
        exp = {"loss": mean.detach(), "grad": grad, "rows": expected_rows(bank, x, y, MOMENTUM)}
        _FS[key] = FsCase(bank, x, y, exp)
    return _FS[key]


def fs_pass(provider: str, pass_: str, precision: str, case: FsCase, x: torch.Tensor, bank: torch.Tensor,
            device: str):
    T, y = TEMPERATURE, case.y
    if provider == "npid":
        def loss_fn(x, bank):
            return ops.full_softmax_loss(x, bank, y, T, precision)

        def step_fn(x, bank):
            mean = loss_fn(x, bank).mean()
            mean.backward()
            ops.momentum_update_(bank, x, y, MOMENTUM)
            return mean
    else:
        wrap = compiled if provider == "torch_compile" else (lambda f: f)
        if pass_ == "step":
            step = wrap(full_softmax_step)
            loss_fn, step_fn = None, (lambda x, bank: step(x, bank, y, T, MOMENTUM, precision))
        else:
            f = wrap(torch_full_softmax_loss)
            loss_fn, step_fn = (lambda x, bank: f(x, bank, y, T, precision)), None

    run = make_pass(pass_, loss_fn, step_fn, x, bank, device)

    def run_at_precision():
        with torch_matmul_precision(precision):
            return run()
    return run_at_precision


def test_full_softmax(benchmark, settings, pass_, B, N, D, bank_dtype, precision, provider):
    device = settings.device
    if provider == "torch_compile":
        require_compile(settings)
    case = get_fs_case(B, N, D, bank_dtype, device)
    info: Dict[str, object] = {"op": "full_softmax", "pass": pass_, "provider": provider, "precision": precision}
    benchmark.group = f"full_softmax {pass_} B={B} N={N} D={D} {bank_dtype} {precision}"

    x_check = case.x.detach().clone().requires_grad_()
    bank_check = case.bank.clone() if pass_ == "step" else case.bank
    t0 = time.perf_counter()
    out, grad = fs_pass(provider, pass_, precision, case, x_check, bank_check, device)()
    if provider == "torch_compile":
        info["compile_s"] = time.perf_counter() - t0
    check_close("loss", out, case.expected["loss"], LOSS_TOL[precision], info)
    if pass_ != "forward":
        check_close("grad", grad, case.expected["grad"], GRAD_TOL[precision], info)
    if pass_ == "step":
        check_bank_update(case.bank, bank_check, case.y, case.expected["rows"], info)
    del x_check, bank_check, out, grad

    x = case.x.detach().clone().requires_grad_()
    bank = case.bank.clone() if pass_ == "step" else case.bank
    run = fs_pass(provider, pass_, precision, case, x, bank, device)

    def timed():
        run()

    eb = elem_size(case.bank.dtype)
    bytes_moved, formula = N * D * eb, "N*D*bank_elem_size (one read of the bank)"
    if pass_ == "step":
        bytes_moved += 2 * B * D * eb
        formula += " + 2*B*D*bank_elem_size (read and write of the updated rows)"
    run_benchmark(benchmark, timed, settings, info, bytes_moved, formula)


# ---------------------------------------------------------------- kNN top-k


def knn_chunk_topk(q: torch.Tensor, bank_t: torch.Tensor, k: int):
    """One chunk of the torch kNN: similarities to every bank row, then top-k."""
    return (q.to(bank_t.dtype) @ bank_t).topk(k, dim=1, largest=True, sorted=True)


def torch_knn(query: torch.Tensor, bank: torch.Tensor, k: int, chunk_fn=knn_chunk_topk, chunk: int = KNN_CHUNK,
              precision: str = "fp32"):
    """Pure-PyTorch chunked kNN top-k: never more than chunk x N similarities at once (chunk
    lowered so that they stay within KNN_CHUNK_VALUES); bf16: the bank and each query chunk cast
    to bf16 (bf16 similarities)."""
    chunk = max(1, min(chunk, KNN_CHUNK_VALUES // bank.shape[0]))
    bank_t = bank.to(torch.bfloat16 if precision == "bf16" else query.dtype).t()
    sims, idx = [], []
    for q in query.split(chunk):
        s, i = chunk_fn(q, bank_t, k)
        sims.append(s)
        idx.append(i)
    return torch.cat(sims), torch.cat(idx)


@dataclasses.dataclass
class KnnCase:
    bank: torch.Tensor
    query: torch.Tensor
    expected_sims: torch.Tensor  # float64 top-k of the first KNN_CHECK_QUERIES queries


_KNN: Dict[tuple, KnnCase] = {}


def get_knn_case(Q, N, D, bank_dtype, topk, device) -> KnnCase:
    key = (Q, N, D, bank_dtype, topk, device)
    if key not in _KNN:
        _KNN.clear()
        g = make_generator("knn", *key)
        bank32 = unit_rows(N, D, g)
        near = torch.randint(0, N, (Q,), generator=g)  # queries near some bank row, as test features are
        query = torch.nn.functional.normalize(bank32[near] + 0.7 * torch.randn(Q, D, generator=g), dim=1)
        bank, query = bank32.to(DTYPES[bank_dtype]).to(device), query.to(device)
        m = min(Q, KNN_CHECK_QUERIES)
        sims = reference_knn_sims(query[:m], bank, topk)
        _KNN[key] = KnnCase(bank, query, sims)
    return _KNN[key]


def reference_knn_sims(query: torch.Tensor, bank: torch.Tensor, k: int, rows: int = 1 << 16) -> torch.Tensor:
    """reference.knn_topk's similarities in float64, the bank taken `rows` at a time (an
    ImageNet-sized bank in float64 with 256 queries' similarities would be ~4 GB at once)."""
    best = None
    for start in range(0, bank.shape[0], rows):
        sims, _ = ref.knn_topk(query.double(), bank[start:start + rows].double(), min(k, min(rows, bank.shape[0] - start)))
        best = sims if best is None else torch.cat([best, sims], 1).topk(min(k, best.shape[1] + sims.shape[1]), dim=1).values
    return best


def faiss_or_skip(settings, precision: str, bank_dtype: str):
    """The faiss module, or a pytest.skip saying why this case has no faiss provider."""
    if settings.device != "cpu":
        pytest.skip("faiss provider: faiss-cpu, CPU runs only")
    if precision != "fp32" or bank_dtype != "float32":
        pytest.skip("faiss provider: IndexFlatIP keeps a float32 bank and forms fp32 products only")
    try:
        import faiss
    except ImportError as exc:
        pytest.skip(f"faiss provider: faiss is not installed ({exc}); pip install faiss-cpu to compare with it")
    return faiss


def test_knn(benchmark, settings, Q, N, D, bank_dtype, topk, precision, provider):
    device = settings.device
    if device == "cpu" and (Q, N) in KNN_FAISS_SHAPES and precision != "fp32":
        pytest.skip("the faiss comparison shapes run at fp32 only")
    if provider == "torch_compile":
        require_compile(settings)
    faiss = faiss_or_skip(settings, precision, bank_dtype) if provider == "faiss" else None
    case = get_knn_case(Q, N, D, bank_dtype, topk, device)
    info: Dict[str, object] = {"op": "knn", "pass": "forward", "provider": provider, "precision": precision}
    benchmark.group = f"knn Q={Q} N={N} D={D} {bank_dtype} k={topk} {precision}"

    index = None
    if provider == "npid":
        def call():
            return ops.knn_topk(case.query, case.bank, topk, precision)
    elif provider == "faiss":
        faiss.omp_set_num_threads(torch.get_num_threads())
        t0 = time.perf_counter()
        index = faiss.IndexFlatIP(D)
        index.add(case.bank.numpy())
        info["index_build_s"] = time.perf_counter() - t0
        info["faiss_version"] = faiss.__version__
        query_np = case.query.numpy()

        def call():
            sims, idx = index.search(query_np, topk)
            return torch.from_numpy(sims), torch.from_numpy(idx)
    else:
        chunk_fn = compiled(knn_chunk_topk) if provider == "torch_compile" else knn_chunk_topk

        def call():
            return torch_knn(case.query, case.bank, topk, chunk_fn, precision=precision)

    def run():
        with torch.no_grad(), torch_matmul_precision(precision):
            out = call()
        sync(device)
        return out

    t0 = time.perf_counter()
    sims, idx = run()
    if provider == "torch_compile":
        info["compile_s"] = time.perf_counter() - t0
    assert sims.shape == (Q, topk) and idx.shape == (Q, topk)
    m = case.expected_sims.shape[0]
    err = (sims[:m].double() - case.expected_sims).abs().max().item()
    info["check_sims_max_abs_err"] = err
    tol = KNN_ABS_TOL[precision]
    assert err <= tol, f"top-k similarities off by {err:.3g} (> {tol:g}) vs float64"
    recomputed = torch.einsum("qd,qkd->qk", case.query[:m].double(), case.bank[idx[:m]].double())
    err = (recomputed - case.expected_sims).abs().max().item()
    info["check_index_sims_max_abs_err"] = err
    assert err <= tol, f"the returned indices' similarities are off by {err:.3g} vs float64"
    assert bool((sims[:, :-1] >= sims[:, 1:]).all()), "top-k similarities are not sorted descending"
    del sims, idx, recomputed

    def timed():
        run()

    eb = elem_size(case.bank.dtype)
    bytes_moved = N * D * eb + Q * D * case.query.element_size()
    formula = "N*D*bank_elem_size + Q*D*4 (one read of the bank and the queries)"
    if device == "cpu":
        info["peak_rss_extra_bytes"] = measure_peak_rss_bytes(timed)[0]
    run_benchmark(benchmark, timed, settings, info, bytes_moved, formula,
                  measure_peak=measure_peak_rss_bytes if provider == "faiss" else None)
    del index
