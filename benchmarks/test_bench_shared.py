"""Benchmarks of shared negatives (one set of m noise rows per step, scored by GEMM tiles) against
per-sample negatives (K = m rows gathered for every sample) and pure PyTorch, for m up to 65,536.

provider:
  torch_shared          pure PyTorch, shared negatives as a PyTorch user writes them (MoCo's form):
                        one GEMM for the B x m logits (reference.shared_nce_loss / shared_softmax_ce_loss)
  torch_shared_compile  torch.compile(dynamic=False) of the same functions
  torch_per_sample      pure PyTorch per-sample negatives (reference.nce_step), m = 4096 only: its
                        (B, m+1, D) gather is 2 GiB at m = 65,536
  npid_per_sample       our fused per-sample ops, K = m negatives per sample drawn in-kernel
  npid_shared           our shared-negative ops, the m rows drawn in-kernel
pass: step (loss + backward + the momentum update of bank[y]: what a training step costs).

Every provider is checked once against a float64 reference before it is timed: the shared ones on
the rows ops.shared_negative_rows draws, the per-sample ones on the rows ops.sample_negatives draws
(the reference computed sample by sample, never the whole (B, m+1, D) gather).
"""
from __future__ import annotations

import dataclasses
import time
from typing import Dict

import torch

from npid_kernels import ops
from npid_kernels import reference as ref

from .bench_common import (
    DTYPES, MOMENTUM, TEMPERATURE, _case, _fmt_n, check_bank_update, check_close, compiled, elem_size,
    expected_rows, make_generator, make_pass, require_compile, run_benchmark, settings_from_config,
    softmax_ce_step, torch_momentum_update_, unit_rows,
)

LOSSES = ("nce", "softmax-ce")
PROVIDERS = ("torch_shared", "torch_shared_compile", "torch_per_sample", "npid_per_sample", "npid_shared")
LOSS_TOL = 2e-5
GRAD_TOL = 2e-4


def shared_shapes(settings):
    """(B, m, N, D, bank_dtype)."""
    if settings.size == "quick":
        shapes, large = [(8, m, 4096, 64, "float32") for m in (256, 1024)], False
    elif settings.device == "cuda":
        shapes = [(256, m, 1_281_167, 128, dt) for dt in ("float32", "bfloat16") for m in (4096, 16384, 65536)]
        large = True
    else:  # issue 17's CPU shape: B = 64, CIFAR-sized bank
        shapes, large = [(64, m, 50_000, 128, "float32") for m in (4096, 16384, 65536)], True
    return [_case(s, large, f"B{s[0]}-m{s[1]}-N{_fmt_n(s[2])}-D{s[3]}-{s[4]}") for s in shapes]


def pytest_generate_tests(metafunc):
    if metafunc.function.__name__ != "test_shared":
        return
    s = settings_from_config(metafunc.config)
    metafunc.parametrize("loss", LOSSES)
    metafunc.parametrize("B,m,N,D,bank_dtype", shared_shapes(s))
    metafunc.parametrize("provider", PROVIDERS)


@dataclasses.dataclass
class Case:
    bank: torch.Tensor
    x: torch.Tensor
    y: torch.Tensor
    rng_state: torch.Tensor
    rows: torch.Tensor       # (m,) the shared rows drawn in-kernel from rng_state
    idx: torch.Tensor        # (B, m+1) the per-sample rows drawn in-kernel from rng_state
    z_shared: torch.Tensor   # NCE's Z for each mode, from its own noise scores (float64 estimate)
    z_per_sample: torch.Tensor
    expected: Dict[tuple, Dict[str, torch.Tensor]] = dataclasses.field(default_factory=dict)


_CASES: Dict[tuple, Case] = {}


def _per_sample_reference(loss, x, bank, y, idx, z):
    """float64 per-sample loss, computed 8 samples at a time (bounded memory)."""
    parts = []
    for b0 in range(0, x.shape[0], 8):
        sl = slice(b0, b0 + 8)
        if loss == "nce":
            parts.append(ref.nce_loss(x[sl], bank, y[sl], idx[sl], z, TEMPERATURE, n_data=bank.shape[0]))
        else:
            parts.append(ref.softmax_ce_loss(x[sl], bank, y[sl], idx[sl], TEMPERATURE))
    return torch.cat(parts)


def get_case(B, m, N, D, bank_dtype, device) -> Case:
    key = (B, m, N, D, bank_dtype, device)
    if key not in _CASES:
        _CASES.clear()
        g = make_generator("shared", *key)
        bank32 = unit_rows(N, D, g)
        y = torch.randperm(N, generator=g)[:B]
        x = torch.nn.functional.normalize(bank32[y] + 0.5 * torch.randn(B, D, generator=g), dim=1)
        rng_state = torch.tensor([int(torch.randint(0, 2**62, (1,), generator=g)), 0], device=device)
        bank = bank32.to(DTYPES[bank_dtype]).to(device)
        y, x = y.to(device), x.to(device)
        rows = ops.shared_negative_rows(rng_state, N, m)
        idx = ops.sample_negatives(y, rng_state, N, m)
        with torch.no_grad():
            xd, bd = x.double(), bank.double()
            z_shared = (xd @ bd.index_select(0, rows).t() / TEMPERATURE).exp().mean() * N
            z_per = torch.cat([ref.nce_scores(xd[b:b + 8], bd, idx[b:b + 8], TEMPERATURE)[:, 1:].flatten()
                               for b in range(0, B, 8)]).mean() * N
        _CASES[key] = Case(bank, x, y, rng_state, rows, idx, z_shared.float().reshape(1), z_per.float().reshape(1))
    return _CASES[key]


def expected(case: Case, loss: str, shared: bool) -> Dict[str, torch.Tensor]:
    key = (loss, shared)
    if key not in case.expected:
        xd = case.x.double().requires_grad_()
        bd = case.bank.double()
        if shared:
            if loss == "nce":
                per_sample = ref.shared_nce_loss(xd, bd, case.y, case.rows, case.z_shared.double(), TEMPERATURE)
            else:
                per_sample = ref.shared_softmax_ce_loss(xd, bd, case.y, case.rows, TEMPERATURE)
        else:
            per_sample = _per_sample_reference(loss, xd, bd, case.y, case.idx, case.z_per_sample.double())
        mean = per_sample.mean()
        (grad,) = torch.autograd.grad(mean, xd)
        case.expected[key] = {"loss": mean.detach(), "grad": grad,
                              "rows": expected_rows(case.bank, case.x, case.y, MOMENTUM)}
    return case.expected[key]


def shared_step_torch(loss):
    def step(x, bank, y, rows, z, temperature, momentum):
        if loss == "nce":
            mean = ref.shared_nce_loss(x, bank, y, rows, z, temperature).mean()
        else:
            mean = ref.shared_softmax_ce_loss(x, bank, y, rows, temperature).mean()
        mean.backward()
        torch_momentum_update_(bank, x, y, momentum)
        return mean
    return step


def make_step(provider: str, loss: str, case: Case, m: int):
    T, y = TEMPERATURE, case.y
    if provider in ("torch_shared", "torch_shared_compile"):
        step = shared_step_torch(loss)
        if provider == "torch_shared_compile":
            step = compiled(step)
        return lambda x, bank: step(x, bank, y, case.rows, case.z_shared, T, MOMENTUM)
    if provider == "torch_per_sample":
        if loss == "nce":
            return lambda x, bank: ref.nce_step(x, bank, y, case.idx, case.z_per_sample, T, MOMENTUM)
        return lambda x, bank: softmax_ce_step(x, bank, y, case.idx, T, MOMENTUM)
    if provider == "npid_shared":
        common = dict(rng_state=case.rng_state, num_negatives=m, temperature=T)
        if loss == "nce":
            loss_fn = lambda x, bank: ops.shared_nce_loss(x, bank, y, case.z_shared, **common)  # noqa: E731
        else:
            loss_fn = lambda x, bank: ops.shared_softmax_ce_loss(x, bank, y, **common)  # noqa: E731
    else:  # npid_per_sample
        common = dict(rng_state=case.rng_state, num_negatives=m, temperature=T)
        if loss == "nce":
            loss_fn = lambda x, bank: ops.nce_loss(x, bank, y, case.z_per_sample, **common)  # noqa: E731
        else:
            loss_fn = lambda x, bank: ops.softmax_ce_loss(x, bank, y, **common)  # noqa: E731

    def step(x, bank):
        mean = loss_fn(x, bank).mean()
        mean.backward()
        ops.momentum_update_(bank, x, y, MOMENTUM)
        return mean
    return step


def test_shared(benchmark, settings, loss, B, m, N, D, bank_dtype, provider):
    import pytest

    device = settings.device
    if provider == "torch_per_sample" and m > 4096:
        pytest.skip("pure-PyTorch per-sample negatives: only at m = 4096 (a (B, m+1, D) gather)")
    if provider == "torch_shared_compile":
        require_compile(settings)
    case = get_case(B, m, N, D, bank_dtype, device)
    shared = "shared" in provider
    exp = expected(case, loss, shared)
    info: Dict[str, object] = {"op": f"{loss} step", "provider": provider, "negatives": "shared" if shared else
                               "per-sample", "m": m}
    benchmark.group = f"{loss} step B={B} m={m} N={N} D={D} {bank_dtype}"
    step_fn = make_step(provider, loss, case, m)

    x_check = case.x.detach().clone().requires_grad_()
    bank_check = case.bank.clone()
    t0 = time.perf_counter()
    out, grad = make_pass("step", None, step_fn, x_check, bank_check, device)()
    if provider == "torch_shared_compile":
        info["compile_s"] = time.perf_counter() - t0
    check_close("loss", out, exp["loss"], LOSS_TOL, info)
    check_close("grad", grad, exp["grad"], GRAD_TOL, info)
    check_bank_update(case.bank, bank_check, case.y, exp["rows"], info)
    del x_check, bank_check, out, grad

    x = case.x.detach().clone().requires_grad_()
    bank = case.bank.clone()
    run = make_pass("step", None, step_fn, x, bank, device)
    rows_read = m if shared else B * (m + 1)
    bytes_moved = (rows_read + (B if shared else 0) + 2 * B) * D * elem_size(case.bank.dtype)
    formula = ("(m + B)*D*bank_elem_size (the shared rows and the positives, once) + 2*B*D (update)" if shared else
               "B*(m+1)*D*bank_elem_size (the gathered rows) + 2*B*D (update)")
    run_benchmark(benchmark, lambda: run(), settings, info, bytes_moved, formula)
