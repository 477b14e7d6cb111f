"""The CUDA code's own paths, executed on the CPU emulator (tests/emulation.py): launch plans
forced through NPID_CUDA_SM_COUNT (single split, split + finalize), the fast kernel's register
layouts and the general kernel, 16-bit banks and unaligned bank views, in-kernel sampling
against the CPU sampler bit for bit, the momentum update's duplicate rule on both of its paths,
the default no-sync error semantics, and NPIDLoss training steps against the CPU kernels.
What this proves and what it cannot: docs/emulation.md."""
import os

import pytest
import torch

from npid_kernels import ops
from npid_kernels import reference as R
from npid_kernels.distributed import DistributedNPIDLoss
from npid_kernels.nn import NPIDLoss

from conftest import relative_error, unit_rows

T = 0.07


@pytest.fixture(autouse=True)
def emu(emulated_cuda):
    return torch.ops.npid_emu


@pytest.fixture
def no_sync_checks(monkeypatch):
    """The CUDA ops' default: never sync, report bad input through NaN results / skipped rows."""
    monkeypatch.setenv("NPID_CUDA_SYNC_CHECKS", "0")


def problem(B, K, n, d, dtype=torch.float64, bank_dtype=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = unit_rows(B, d, generator=g).to(dtype)
    bank = unit_rows(n, d, generator=g).to(bank_dtype or dtype)
    y = torch.randint(0, n, (B,), generator=g)
    idx = torch.randint(0, n, (B, K + 1), generator=g)
    idx[:, 0] = y
    if K >= 2:
        idx[:, 2] = idx[:, 1]
    return x, bank, y, idx


def reference_z(x, bank, idx):
    return R.estimate_z(R.nce_scores(x.double(), bank.double(), idx, T), bank.shape[0]).reshape(1)


# (B, K, n, d) and the kernel they take: fast (d = 3, 128), fast with 8 elements per lane
# (d = 130: element loads), general (d = 600: more than 128 float4 vectors).
LAYOUTS = [(2, 40, 50, 3), (1, 600, 900, 128), (5, 300, 400, 130), (3, 520, 600, 600)]
SM_COUNTS = ["1", "132", "65536"]
BANK_DTYPES = [(torch.float64, torch.float64), (torch.float32, torch.float32), (torch.float32, torch.bfloat16)]
# Under a sanitizer (tests/test_emulator.py, 3-10x slower) every kernel variant and launch plan
# once, at the smallest shapes that still reach them (more than 256 columns split a sample).
if os.environ.get("NPID_SANITIZED_RUN"):
    LAYOUTS = [(2, 40, 50, 3), (1, 300, 400, 128), (2, 260, 300, 130), (1, 260, 300, 600)]
    SM_COUNTS = ["1", "65536"]
    BANK_DTYPES = BANK_DTYPES[2:]


@pytest.mark.parametrize("sms", SM_COUNTS)
@pytest.mark.parametrize("B,K,n,d", LAYOUTS)
def test_launch_plans_match_reference(emu, monkeypatch, sms, B, K, n, d):
    """1 SM: one split per sample (the block writes the result); many SMs: the columns split
    over several blocks and the finalize kernel merges them."""
    monkeypatch.setenv("NPID_CUDA_SM_COUNT", sms)
    x, bank, y, idx = problem(B, K, n, d)
    z = reference_z(x, bank, idx)
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 2e-6)):
        xs, bs, zs = x.to(dtype), bank.to(dtype), z.to(dtype)
        loss, grad, noise_exp, _ = emu.nce_loss(xs.clone().requires_grad_(), bs, y, idx, None, zs, K, T)
        xr = x.clone().requires_grad_()
        want = R.nce_loss(xr, bank, y, idx, z, T)
        want.sum().backward()
        assert relative_error(loss, want) < tol and relative_error(grad, xr.grad) < tol
        assert noise_exp.dtype == torch.float64
        assert relative_error(noise_exp, R.noise_exp_sum(x, bank, idx, T)) < tol
        loss, grad, _ = emu.softmax_ce_loss(xs, bs, y, idx, None, K, T)
        xr = x.clone().requires_grad_()
        want = R.softmax_ce_loss(xr, bank, y, idx, T)
        want.sum().backward()
        assert relative_error(loss, want) < tol and relative_error(grad, xr.grad) < tol
        scores = emu.nce_scores(xs, bs, idx, T)
        assert relative_error(scores, R.nce_scores(x, bank, idx, T)) < tol
        go = torch.rand(idx.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        got = emu.nce_scores_backward(go.to(dtype), scores, xs, bs, idx, T)
        xr = x.clone().requires_grad_()
        (R.nce_scores(xr, bank, idx, T) * go).sum().backward()
        assert relative_error(got, xr.grad) < tol
        zz = torch.tensor([-1.0], dtype=torch.float64)
        emu.nce_estimate_z_(zz, xs, bs, y, idx, None, K, T)
        assert relative_error(zz, z) < tol


# The proximal term is formed where each launch plan writes its result (emit_final): by the scan
# block itself (one split), or by the finalize kernel (splits, and the general kernel's warps).
PROXIMAL_PLANS = [(sms, *layout) for sms in SM_COUNTS for layout in LAYOUTS]
if os.environ.get("NPID_SANITIZED_RUN"):  # one case per place the term is formed
    PROXIMAL_PLANS = [("1", 2, 40, 50, 3), ("65536", 1, 260, 300, 600)]


@pytest.mark.parametrize("sms,B,K,n,d", PROXIMAL_PLANS)
def test_proximal_term_in_every_launch_plan(emu, monkeypatch, sms, B, K, n, d):
    monkeypatch.setenv("NPID_CUDA_SM_COUNT", sms)
    x, bank, y, idx = problem(B, K, n, d, bank_dtype=torch.float32, seed=1)
    z = reference_z(x, bank, idx)
    lam = 0.75
    for dtype, bank_dtype, tol in ((torch.float64, torch.float64, 1e-12), (torch.float32, torch.bfloat16, 2e-6)):
        bs = bank.to(bank_dtype)
        exact_bank = bs.double()
        want_sq = R.positive_sq_dist(x, exact_bank, y)
        for name, args, reference in (
                ("nce_loss", (x.to(dtype), bs, y, idx, None, z.to(dtype), K, T, -1, False, lam),
                 lambda xr: R.nce_loss(xr, exact_bank, y, idx, z, T, proximal=lam)),
                ("softmax_ce_loss", (x.to(dtype), bs, y, idx, None, K, T, False, lam),
                 lambda xr: R.softmax_ce_loss(xr, exact_bank, y, idx, T, proximal=lam))):
            out = getattr(emu, name)(*args)
            loss, grad, sq = out[0], out[1], out[-1]
            xr = x.clone().requires_grad_()
            want = reference(xr)
            want.sum().backward()
            assert sq.dtype == (torch.float64 if dtype == torch.float64 else torch.float32), name
            assert relative_error(loss, want) < tol and relative_error(grad, xr.grad) < tol, name
            assert relative_error(sq, want_sq) < tol, name
            without = getattr(emu, name)(*args[:-1])  # lambda = 0: only the statistic
            assert torch.equal(without[-1], sq), name


@pytest.mark.parametrize("bank_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d", [64, 130])
@pytest.mark.parametrize("aligned", [True, False])
def test_bank_dtypes_and_views(emu, bank_dtype, d, aligned):
    """16-byte vector loads (aligned base, d * size a multiple of 16) or element loads (a view
    starting one element into its storage): both read the same rows."""
    x, bank, y, idx = problem(4, 200, 300, d, dtype=torch.float32)
    storage = torch.zeros(bank.numel() + 1, dtype=bank_dtype)
    view = storage[1:] if not aligned else storage[:-1]
    view = view.view(bank.shape)
    view.copy_(bank.to(bank_dtype))
    assert (view.data_ptr() % 16 == 0) == aligned
    exact_bank = view.double()
    z = reference_z(x, exact_bank, idx)
    loss, grad, noise_exp, _ = emu.nce_loss(x, view, y, idx, None, z.float(), 200, T)
    assert relative_error(loss, R.nce_loss(x.double(), exact_bank, y, idx, z, T)) < 2e-6
    assert relative_error(noise_exp, R.noise_exp_sum(x.double(), exact_bank, idx, T)) < 2e-6
    loss, grad, _ = emu.softmax_ce_loss(x, view, y, idx, None, 200, T)
    assert relative_error(loss, R.softmax_ce_loss(x.double(), exact_bank, y, idx, T)) < 2e-6


def test_bfloat16_features(emu):
    x, bank, y, idx = problem(3, 100, 200, 64, dtype=torch.bfloat16)
    loss, grad, _ = emu.softmax_ce_loss(x, bank, y, idx, None, 100, T)
    assert loss.dtype == torch.bfloat16
    assert relative_error(loss, R.softmax_ce_loss(x.double(), bank.double(), y, idx, T)) < 1e-2


@pytest.mark.parametrize("sms", ["1", "132"])
def test_in_kernel_sampling_equals_cpu_sampler_bit_for_bit(emu, monkeypatch, sms):
    """The rows the kernels draw from rng_state are sample_negatives' rows (CPU kernel): the
    losses with in-kernel sampling equal the losses with those rows passed as idx, bit for bit."""
    monkeypatch.setenv("NPID_CUDA_SM_COUNT", sms)
    x, bank, y, _ = problem(6, 500, 1000, 128, dtype=torch.float32)
    rng = torch.tensor([2**61 + 12345, 77])
    idx = torch.ops.npid.sample_negatives(y, rng, 1000, 500)  # the CPU kernel
    assert torch.equal(emu.sample_negatives(y, rng, 1000, 500), idx)
    z = torch.tensor([3000.0])
    for a, b in [(emu.nce_loss(x, bank, y, None, rng, z, 500, T), emu.nce_loss(x, bank, y, idx, None, z, 500, T)),
                 (emu.softmax_ce_loss(x, bank, y, None, rng, 500, T), emu.softmax_ce_loss(x, bank, y, idx, None, 500, T))]:
        assert all(torch.equal(u, v) for u, v in zip(a, b))
    za, zb = torch.tensor([-1.0]), torch.tensor([-1.0])
    emu.nce_estimate_z_(za, x, bank, y, None, rng, 500, T)
    emu.nce_estimate_z_(zb, x, bank, y, idx, None, 500, T)
    assert torch.equal(za, zb)


def test_fp32_math_matches_cpu_kernels(emu):
    """The CPU kernels and the CUDA code compute fp32 terms with the same float functions."""
    x, bank, y, idx = problem(8, 400, 2000, 128, dtype=torch.float32)
    z = reference_z(x, bank, idx).float()
    for name, args in [("nce_loss", (x, bank, y, idx, None, z, 400, T)),
                       ("softmax_ce_loss", (x, bank, y, idx, None, 400, T))]:
        got, want = getattr(emu, name)(*args), getattr(torch.ops.npid, name)(*args)
        assert len(got) == len(want) and all(relative_error(g, w) < 1e-6 for g, w in zip(got, want))


@pytest.mark.parametrize("B", [64, 2100])  # <= 2048: each warp scans y; above: sorted runs
@pytest.mark.parametrize("dtype,bank_dtype", BANK_DTYPES)
def test_momentum_update_duplicates_last_wins(emu, B, dtype, bank_dtype):
    n, d = 50, 24
    g = torch.Generator().manual_seed(B)
    bank = unit_rows(n, d, generator=g).to(bank_dtype)
    x = unit_rows(B, d, generator=g).to(dtype)
    y = torch.randint(0, n, (B,), generator=g)  # many duplicates
    want = R.momentum_update(bank.to(dtype), x, y, 0.3).to(bank_dtype)
    got = bank.clone()
    emu.momentum_update_(got, x, y, 0.3)
    tol = {torch.float64: 1e-15, torch.float32: 1e-6, torch.bfloat16: 1e-2}[bank_dtype]
    assert relative_error(got, want) < tol
    untouched = torch.ones(n, dtype=torch.bool)
    untouched[y] = False
    assert torch.equal(got[untouched], bank[untouched])


# ------------------------------------------------------------------ default error semantics (no sync)

def test_no_sync_out_of_range_rows_give_nan(emu, no_sync_checks):
    x, bank, y, idx = problem(4, 20, 50, 16, dtype=torch.float32)
    bad = idx.clone()
    bad[1, 5] = 50  # one past the bank
    bad[2, 0] = -1
    z = reference_z(x, bank, idx).float()
    for loss, grad, *rest, sq_dist in (emu.nce_loss(x, bank, y, bad, None, z, 20, T),
                                       emu.softmax_ce_loss(x, bank, y, bad, None, 20, T)):
        assert bool(loss[1:3].isnan().all()) and bool(grad[1:3].isnan().all())
        assert all(bool(r[1:3].isnan().all()) and bool(r[[0, 3]].isfinite().all()) for r in rest)
        assert bool(loss[[0, 3]].isfinite().all()) and bool(grad[[0, 3]].isfinite().all())
        # positive_sq_dist depends on the positive's row alone: NaN only where that is outside the bank
        assert sq_dist[2].isnan() and bool(sq_dist[[0, 1, 3]].isfinite().all())
    scores = emu.nce_scores(x, bank, bad, T)
    assert scores[1, 5].isnan() and scores[2, 0].isnan() and int(scores.isnan().sum()) == 2
    grad = emu.nce_scores_backward(torch.ones_like(scores), scores.nan_to_num(), x, bank, bad, T)
    assert bool(grad[1:3].isnan().all()) and bool(grad[[0, 3]].isfinite().all())
    zz = torch.tensor([-1.0])
    emu.nce_estimate_z_(zz, x, bank, y, bad, None, 20, T)
    assert zz.item() == -1.0  # left unset ...
    loss, grad, *_ = emu.nce_loss(x, bank, y, idx, None, zz, 20, T)
    assert bool(loss.isnan().all())  # ... so the next loss is NaN, not silently wrong
    y_bad = y.clone()
    y_bad[0] = 50
    assert emu.sample_negatives(y_bad, torch.tensor([1, 2]), 50, 5)[0, 0].item() == 50  # copied as given
    loss, grad, sq_dist = emu.full_softmax_loss(x, bank, y_bad, T, "fp32", True)
    assert loss[0].isnan() and bool(loss[1:].isfinite().all())
    assert sq_dist[0].isnan() and bool(sq_dist[1:].isfinite().all())


def test_no_sync_nan_features_leave_z_unset(emu, no_sync_checks):
    x, bank, y, idx = problem(3, 10, 30, 8, dtype=torch.float32)
    x[1, 2] = float("nan")
    z = torch.tensor([-1.0])
    emu.nce_estimate_z_(z, x, bank, y, idx, None, 10, T)
    assert z.item() == -1.0


def test_no_sync_momentum_update_skips_bad_samples(emu, no_sync_checks):
    n, d = 10, 6
    bank = unit_rows(n, d, dtype=torch.float32, generator=torch.Generator().manual_seed(0))
    x = unit_rows(5, d, dtype=torch.float32, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 1, 12, 3, 4])
    x[1, 0] = float("nan")           # non-finite features: skipped
    x[3] = -bank[3]                  # momentum 0.5: the mix is exactly zero, no direction: skipped
    got = bank.clone()
    emu.momentum_update_(got, x, y, 0.5)  # y[2] = 12 is outside the bank: skipped
    assert bool(got.isfinite().all())
    assert torch.equal(got[[1, 2, 3, 5, 6, 7, 8, 9]], bank[[1, 2, 3, 5, 6, 7, 8, 9]])
    want = R.momentum_update(bank, x[[0, 4]], y[[0, 4]], 0.5)
    assert relative_error(got, want) < 1e-6


def test_sync_checks_raise_the_cpu_messages(emu, monkeypatch):
    monkeypatch.setenv("NPID_CUDA_SYNC_CHECKS", "1")
    x, bank, y, idx = problem(2, 5, 20, 8, dtype=torch.float32)
    bad = idx.clone()
    bad[1, 3] = 20
    with pytest.raises(RuntimeError, match="idx holds row 20, outside the bank"):
        emu.nce_loss(x, bank, y, bad, None, torch.tensor([20.0]), 5, T)
    with pytest.raises(RuntimeError, match="z must be set"):
        emu.nce_loss(x, bank, y, idx, None, torch.tensor([-1.0]), 5, T)
    before = bank.clone()
    with pytest.raises(RuntimeError, match="outside the bank"):
        emu.momentum_update_(bank, x, torch.tensor([0, 20]), 0.5)
    assert torch.equal(bank, before)


# ------------------------------------------------------------------ NPIDLoss on the CUDA code

@pytest.mark.parametrize("loss,z_mode", [("nce", "first-batch"), ("nce", "ema"), ("nce", "batch"),
                                         ("softmax-ce", "first-batch"), ("softmax", "first-batch")])
def test_npid_loss_training_steps_match_cpu(loss, z_mode):
    """Three steps of NPIDLoss (sampling, Z, loss, backward, bank update): the CUDA code on the
    emulator and the CPU kernels keep the same bank, Z and sampler state."""
    n, d, B = 300, 32, 16
    modules, results = [], []
    for emulated in (False, True):
        torch.manual_seed(0)
        crit = NPIDLoss(num_data=n, dim=d, num_negatives=100, temperature=T, momentum=0.5, loss=loss,
                        z_mode=z_mode, z_momentum=0.9)
        g = torch.Generator().manual_seed(5)
        losses, grads = [], []
        for _ in range(3):
            x = unit_rows(B, d, dtype=torch.float32, generator=g).requires_grad_()
            y = torch.randint(0, n, (B,), generator=g)
            if emulated:
                with ops._calls_into("npid_emu"):
                    value = crit(x, y)
                    value.backward()
            else:
                value = crit(x, y)
                value.backward()
            losses.append(value.detach())
            grads.append(x.grad)
        modules.append(crit)
        results.append((torch.stack(losses), torch.stack(grads)))
    (l0, g0), (l1, g1) = results
    assert relative_error(l1, l0) < 1e-5 and relative_error(g1, g0) < 1e-5
    assert relative_error(modules[1].memory, modules[0].memory) < 1e-6
    assert torch.equal(modules[1].rng_state, modules[0].rng_state)
    if loss == "nce":
        assert relative_error(modules[1].z, modules[0].z) < 1e-6


class _Recorded:
    """An operator library that records which of its ops are looked up."""

    def __init__(self, library):
        self.library, self.calls = library, []

    def __getattr__(self, name):
        self.calls.append(name)
        return getattr(self.library, name)


def test_sharded_exact_softmax_runs_on_the_routed_library(monkeypatch):
    """The sharded bank's exact softmax (world size 1, no process group: the shard is the whole
    bank) calls its op through npid_kernels.ops, so the CUDA code runs it on the emulator; loss,
    gradient and bank match the CPU kernels'."""
    n, d, B = 60, 16, 8
    results = []
    for library in (torch.ops.npid, torch.ops.npid_emu):
        recorded = _Recorded(library)
        monkeypatch.setattr(ops, "npid", recorded)
        crit = DistributedNPIDLoss(n, d, temperature=T, loss="softmax", bank_dtype=torch.float64, seed=3,
                                   mode="sharded")
        g = torch.Generator().manual_seed(5)
        steps = []
        for _ in range(2):
            x = unit_rows(B, d, generator=g).requires_grad_()
            value = crit(x, torch.randint(0, n, (B,), generator=g))
            value.backward()
            steps.append(torch.cat([value.detach().reshape(1), x.grad.reshape(-1)]))
        assert {"full_softmax_loss", "momentum_update_"} <= set(recorded.calls)
        results.append((torch.stack(steps), crit.memory.clone()))
    (cpu_steps, cpu_bank), (emu_steps, emu_bank) = results
    assert relative_error(emu_steps, cpu_steps) < 1e-12
    assert relative_error(emu_bank, cpu_bank) < 1e-12
