"""Benchmarks of the sampled losses (NCE and softmax-CE / InfoNCE over K negatives).

provider:
  torch          the pure-PyTorch reference (npid_kernels.reference.nce_loss / softmax_ce_loss;
                 step: reference.nce_step, and bench_common.softmax_ce_step which mirrors it)
  torch_compile  torch.compile(dynamic=False) of those same reference functions
  npid           our fused ops with an explicit idx (ops.nce_loss / ops.softmax_ce_loss;
                 step adds ops.momentum_update_)
  npid_insample  the same ops drawing the negatives in-kernel (idx=None, rng_state)
  npid_sample_order
                 CPU only: npid with the (sample, row) pairs visited in sample order
                 (ops._cpu_pair_order("sample")), the order without sorting; npid itself
                 uses whichever order csrc/cpu/pair_order.h's use_tile_order() picks
  npid_proximal  npid with the paper's proximal term (eq. 10) at lambda = PROXIMAL, fused into
                 the same pass: beside npid (lambda = 0) in each case's group, what the term costs
pass:
  forward           loss (batch mean) with x requiring grad, as in training
  forward_backward  loss + torch.autograd.grad(loss, x)
  step              loss + loss.backward() + the momentum update of bank[y]

Sampling is outside the timing for the explicit-idx providers: idx is drawn once per case
with ops.sample_negatives (column 0 = y). npid_insample draws the same rows in-kernel from
the same rng_state, inside the timing. Z (NCE) is fixed, estimated once per case.

Before timing, every case runs once and is checked against the float64 reference (loss,
grad_x, and for step the updated bank rows and the untouched rest of the bank), so a broken
provider fails instead of reporting a fast time.
"""
from __future__ import annotations

import contextlib
import dataclasses
import time
from typing import Dict

import pytest
import torch

from npid_kernels import ops
from npid_kernels import reference as ref

from .bench_common import (
    make_pass,
    DTYPES, MOMENTUM, PASSES, TEMPERATURE, check_bank_update, check_close, compiled, elem_size,
    expected_rows, make_generator, nce_shapes, require_compile, run_benchmark, settings_from_config,
    softmax_ce_step, sync, unit_rows,
)

LOSSES = ("nce", "softmax-ce")
PROVIDERS = ("torch", "torch_compile", "npid", "npid_insample", "npid_sample_order", "npid_proximal")
PROXIMAL = 0.5  # lambda of npid_proximal

LOSS_TOL = 2e-5  # relative error of the batch-mean loss vs the float64 reference (fp32 paths reach ~1e-7)
GRAD_TOL = 2e-4  # relative error (norm) of grad_x (fp32 paths reach ~2e-6)


def pytest_generate_tests(metafunc):
    if metafunc.function.__name__ != "test_nce":
        return
    s = settings_from_config(metafunc.config)
    # Order: the first parametrize varies slowest, so each (loss, shape) block runs its
    # passes x providers together and shares one cached input set and reference.
    metafunc.parametrize("loss", LOSSES)
    metafunc.parametrize("B,K,N,D,bank_dtype", nce_shapes(s))
    metafunc.parametrize("pass_", PASSES)
    metafunc.parametrize("provider", PROVIDERS)


@dataclasses.dataclass
class Case:
    bank: torch.Tensor       # (N, D) in bank_dtype, unit rows
    x: torch.Tensor          # (B, D) fp32 unit features, each near its own bank row
    y: torch.Tensor          # (B,) distinct rows
    idx: torch.Tensor        # (B, K+1) from ops.sample_negatives(y, rng_state)
    rng_state: torch.Tensor  # [seed, offset] on the device
    z: torch.Tensor          # (1,) fp32 NCE normalisation constant
    expected: Dict[str, Dict[str, torch.Tensor]] = dataclasses.field(default_factory=dict)


_CASES: Dict[tuple, Case] = {}


def get_case(B, K, N, D, bank_dtype, device) -> Case:
    key = (B, K, N, D, bank_dtype, device)
    if key not in _CASES:
        _CASES.clear()  # one input set alive at a time (the parametrization keeps a shape's tests together)
        g = make_generator("nce", *key)
        bank32 = unit_rows(N, D, g)
        y = torch.randperm(N, generator=g)[:B]
        x = torch.nn.functional.normalize(bank32[y] + 0.5 * torch.randn(B, D, generator=g), dim=1)
        seed = int(torch.randint(0, 2**62, (1,), generator=g))
        rng_state = torch.tensor([seed, 0], dtype=torch.int64, device=device)
        bank = bank32.to(DTYPES[bank_dtype]).to(device)
        y, x = y.to(device), x.to(device)
        idx = ops.sample_negatives(y, rng_state, N, K)
        with torch.no_grad():  # lemniscate's Z from the first batch, here from this batch, in float64
            z = ref.estimate_z(ref.nce_scores(x.double(), bank.double(), idx, TEMPERATURE), N)
        _CASES[key] = Case(bank, x, y, idx, rng_state, z.float().reshape(1))
    return _CASES[key]


def expected(case: Case, loss: str, proximal: float = 0.0) -> Dict[str, torch.Tensor]:
    """float64 reference: batch-mean loss, its grad w.r.t. x, and bank[y] after the update."""
    key = f"{loss} proximal={proximal}"
    if key not in case.expected:
        xd = case.x.double().requires_grad_()
        bd = case.bank.double()
        if loss == "nce":
            per_sample = ref.nce_loss(xd, bd, case.y, case.idx, case.z.double(), TEMPERATURE, proximal=proximal)
        else:
            per_sample = ref.softmax_ce_loss(xd, bd, case.y, case.idx, TEMPERATURE, proximal=proximal)
        mean = per_sample.mean()
        (grad,) = torch.autograd.grad(mean, xd)
        case.expected[key] = {
            "per_sample": per_sample.detach(), "loss": mean.detach(), "grad": grad,
            "rows": expected_rows(case.bank, case.x, case.y, MOMENTUM),
        }
    return case.expected[key]


def make_call(provider: str, loss: str, pass_: str, case: Case, K: int):
    """(loss_fn(x, bank) -> per-sample loss, step_fn(x, bank) -> mean loss) for a provider."""
    T, y, idx, z = TEMPERATURE, case.y, case.idx, case.z
    if provider in ("torch", "torch_compile"):
        wrap = compiled if provider == "torch_compile" else (lambda f: f)
        if pass_ == "step":
            if loss == "nce":
                step = wrap(ref.nce_step)
                return None, lambda x, bank: step(x, bank, y, idx, z, T, MOMENTUM)
            step = wrap(softmax_ce_step)
            return None, lambda x, bank: step(x, bank, y, idx, T, MOMENTUM)
        if loss == "nce":
            f = wrap(ref.nce_loss)
            return (lambda x, bank: f(x, bank, y, idx, z, T)), None
        f = wrap(ref.softmax_ce_loss)
        return (lambda x, bank: f(x, bank, y, idx, T)), None

    if provider == "npid_insample":  # negatives drawn in-kernel from rng_state, the same rows as idx
        sampling = dict(rng_state=case.rng_state, num_negatives=K, temperature=T)
    else:
        sampling = dict(idx=idx, temperature=T)
    if provider == "npid_proximal":
        sampling["proximal"] = PROXIMAL
    order = (lambda: ops._cpu_pair_order("sample")) if provider == "npid_sample_order" else contextlib.nullcontext
    if loss == "nce":
        def loss_fn(x, bank):
            with order():
                return ops.nce_loss(x, bank, y, z, **sampling)
    else:
        def loss_fn(x, bank):
            with order():
                return ops.softmax_ce_loss(x, bank, y, **sampling)

    def step_fn(x, bank):
        mean = loss_fn(x, bank).mean()
        mean.backward()
        ops.momentum_update_(bank, x, y, MOMENTUM)
        return mean

    return loss_fn, step_fn


def test_nce(benchmark, settings, loss, pass_, B, K, N, D, bank_dtype, provider):
    device = settings.device
    if provider == "torch_compile":
        require_compile(settings)
    if provider == "npid_sample_order" and device != "cpu":
        pytest.skip("the pair order is a choice of the CPU kernels")
    case = get_case(B, K, N, D, bank_dtype, device)
    proximal = PROXIMAL if provider == "npid_proximal" else 0.0
    exp = expected(case, loss, proximal)
    info: Dict[str, object] = {"op": loss, "pass": pass_, "provider": provider, "proximal": proximal}
    benchmark.group = f"{loss} {pass_} B={B} K={K} N={N} D={D} {bank_dtype}"

    loss_fn, step_fn = make_call(provider, loss, pass_, case, K)

    # ---- correctness, once, on private copies (the first call also compiles for torch_compile)
    x_check = case.x.detach().clone().requires_grad_()
    bank_check = case.bank.clone() if pass_ == "step" else case.bank
    t0 = time.perf_counter()
    out, grad = make_pass(pass_, loss_fn, step_fn, x_check, bank_check, device)()
    first_call_s = time.perf_counter() - t0
    if provider == "torch_compile":
        info["compile_s"] = first_call_s  # first call: dynamo + inductor compile plus one run
    check_close("loss", out, exp["loss"], LOSS_TOL, info)
    if pass_ != "forward":
        check_close("grad", grad, exp["grad"], GRAD_TOL, info)
    if pass_ == "step":
        check_bank_update(case.bank, bank_check, case.y, exp["rows"], info)
    if provider == "npid_insample":
        # in-kernel sampling must draw exactly the rows ops.sample_negatives drew
        explicit = make_call("npid", loss, "forward", case, K)[0](case.x, case.bank)
        insample = loss_fn(case.x, case.bank)
        check_close("insample_vs_idx", insample, explicit, 1e-6, info)
    del x_check, bank_check, out, grad

    # ---- timing
    x = case.x.detach().clone().requires_grad_()
    bank = case.bank.clone() if pass_ == "step" else case.bank
    run = make_pass(pass_, loss_fn, step_fn, x, bank, device)

    def timed():
        run()  # outputs (and the autograd graph they hold) are freed inside the timed call

    bank_bytes = elem_size(case.bank.dtype)
    bytes_moved = B * (K + 1) * D * bank_bytes
    formula = "B*(K+1)*D*bank_elem_size (one read of the gathered rows)"
    if pass_ == "step":
        bytes_moved += 2 * B * D * bank_bytes
        formula += " + 2*B*D*bank_elem_size (read and write of the updated rows)"
    run_benchmark(benchmark, timed, settings, info, bytes_moved, formula)
