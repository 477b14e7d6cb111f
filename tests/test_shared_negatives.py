"""Shared negatives (one set of m noise rows per step, scored by GEMM tiles) and exclude_positive,
on every device (CPU C++, the CUDA code under the emulator, a GPU when present), against the
pure-PyTorch reference in float64: the shared losses are per-sample losses whose idx row b is
[y_b, rows...], so reference.shared_negatives_idx + the per-sample reference is their ground
truth."""
import pytest
import torch

from npid_kernels import ops
from npid_kernels import reference as R
from npid_kernels.nn import NPIDLoss

from conftest import relative_error, unit_rows
from script_modules import load_script

T = 0.07


def problem(B, m, n, d, device, dtype=torch.float64, bank_dtype=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = unit_rows(B, d, generator=g).to(dtype)
    bank = unit_rows(n, d, generator=g).to(bank_dtype or dtype)
    y = torch.randint(0, n, (B,), generator=g)
    rows = torch.randint(0, n, (m,), generator=g)
    rows[0] = y[0]  # at least one collision, and a repeated row
    if m > 2:
        rows[2] = rows[1]
    rng_state = torch.tensor([int(torch.randint(0, 2**62, (1,), generator=g)), 2 * seed + 1])
    return [t.to(device) for t in (x, bank, y, rows, rng_state)]


def shared_idx(y, rows, rng_state, n, exclude_positive):
    return R.shared_negatives_idx(y.cpu(), rows.cpu(), rng_state.cpu(), n, exclude_positive)


# ------------------------------------------------------------------ exclude_positive sampling

@pytest.mark.parametrize("B,K,n", [(1, 1, 2), (4, 33, 5), (3, 64, 1_281_167)])
@pytest.mark.parametrize("state", [(0, 0), (2**62 + 11, 2**33), (-5, -(2**63))])
def test_exclude_positive_sampling_matches_reference(device, B, K, n, state):
    y = torch.randint(0, n, (B,), device=device)
    y[0] = n - 1  # the last row: the shifted draw must stay inside [0, n)
    rng_state = torch.tensor(state, device=device)
    idx = ops.sample_negatives(y, rng_state, n, K, exclude_positive=True)
    assert torch.equal(idx[:, 0], y)
    assert int(idx.min()) >= 0 and int(idx.max()) < n
    assert not (idx[:, 1:] == y.unsqueeze(1)).any()
    assert torch.equal(idx.cpu(), R.sample_negatives(y.cpu(), rng_state.cpu(), n, K, exclude_positive=True))


def test_exclude_positive_is_uniform_over_the_other_rows():
    n, K = 6, 60_000
    y = torch.tensor([0, 3, 5])
    idx = ops.sample_negatives(y, torch.tensor([9, 4]), n, K, exclude_positive=True)
    for b in range(3):
        counts = torch.bincount(idx[b, 1:], minlength=n).double()
        assert counts[y[b]] == 0
        others = counts[torch.arange(n) != y[b]]
        expected = K / (n - 1)
        assert (others - expected).abs().max() < 5 * expected**0.5  # 5 sigma


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_per_sample_losses_with_exclude_positive_use_the_drawn_rows(device, dtype):
    """In-kernel exclude sampling scores exactly the rows sample_negatives(exclude_positive) draws."""
    x, bank, y, _, rng_state = problem(5, 8, 7, 16, device, dtype=dtype)
    K = 40  # K >> n: many draws would hit the positive without the exclusion
    idx = ops.sample_negatives(y, rng_state, 7, K, exclude_positive=True)
    z = torch.tensor([3.0], device=device, dtype=dtype)
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    fused = ops.nce_loss(x, bank, y, z, rng_state=rng_state, num_negatives=K, temperature=T, exclude_positive=True)
    assert relative_error(fused, ops.nce_loss(x, bank, y, z, idx=idx, temperature=T)) < tol
    fused = ops.softmax_ce_loss(x, bank, y, rng_state=rng_state, num_negatives=K, temperature=T,
                                exclude_positive=True)
    assert relative_error(fused, ops.softmax_ce_loss(x, bank, y, idx=idx, temperature=T)) < tol
    want = R.softmax_ce_loss(x.double().cpu(), bank.double().cpu(), y.cpu(), idx.cpu(), T)
    assert relative_error(fused, want) < tol
    zz = torch.tensor([-1.0], device=device, dtype=torch.float64)
    ops.nce_estimate_z_(zz, x, bank, y, rng_state=rng_state, num_negatives=K, temperature=T, exclude_positive=True)
    assert relative_error(zz, R.estimate_z(R.nce_scores(x.double().cpu(), bank.double().cpu(), idx.cpu(), T), 7)) < tol


def test_exclude_positive_refuses_an_explicit_idx(device):
    x, bank, y, _, rng_state = problem(2, 4, 9, 8, device)
    idx = ops.sample_negatives(y, rng_state, 9, 4)
    with pytest.raises(RuntimeError, match="exclude_positive applies to in-kernel sampling"):
        ops.nce_loss(x, bank, y, torch.tensor([1.0], device=device, dtype=x.dtype), idx=idx, temperature=T,
                     exclude_positive=True)


# ------------------------------------------------------------------ shared negatives against the reference

def test_shared_rows_are_sample_zero_of_a_one_sample_draw(device):
    rng_state = torch.tensor([123456789, 17], device=device)
    rows = ops.shared_negative_rows(rng_state, 1000, 333)
    assert rows.shape == (333,) and torch.equal(rows.cpu(), R.shared_noise_rows(rng_state.cpu(), 1000, 333))
    x, bank, y, _, _ = problem(3, 1, 1000, 8, device)
    z = torch.tensor([50.0], device=device, dtype=x.dtype)
    drawn = ops.shared_nce_loss(x, bank, y, z, rng_state=rng_state, num_negatives=333, temperature=T)
    explicit = ops.shared_nce_loss(x, bank, y, z, rows=rows, temperature=T)
    assert torch.equal(drawn, explicit)


# (B, m, n, d, chunk_rows): m > n (draws with replacement; NCE's c > 1), chunks that do not divide
# m, a single-row chunk, d = 1 and 130, B = 1.
SHARED_SHAPES = [(4, 40, 7, 16, 16), (1, 9, 50, 3, 4), (6, 300, 1000, 130, 128), (3, 20, 5, 1, 1), (5, 64, 64, 32, -1)]


@pytest.mark.parametrize("B,m,n,d,chunk", SHARED_SHAPES)
@pytest.mark.parametrize("exclude_positive", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_shared_losses_match_reference(device, B, m, n, d, chunk, exclude_positive, dtype):
    x, bank, y, rows, rng_state = problem(B, m, n, d, device, dtype=dtype, seed=B + m)
    idx = shared_idx(y, rows, rng_state, n, exclude_positive)
    if exclude_positive:
        assert not (idx[:, 1:] == y.cpu().unsqueeze(1)).any()
    else:
        assert (idx[:, 1:] == y.cpu().unsqueeze(1)).any()  # the collision is kept
    xr, bankr, yr = x.double().cpu().requires_grad_(True), bank.double().cpu(), y.cpu()
    z = R.estimate_z(R.nce_scores(xr.detach(), bankr, idx, T), n).reshape(1)
    tol = 1e-11 if dtype == torch.float64 else 5e-6
    common = dict(rows=rows, rng_state=rng_state, temperature=T, exclude_positive=exclude_positive, chunk_rows=chunk)

    xs = x.detach().clone().requires_grad_(True)
    loss, stat = ops.shared_nce_loss_and_z_stat(xs, bank, y, z.to(device=device, dtype=dtype), **common)
    want = R.nce_loss(xr, bankr, yr, idx, z, T)
    assert relative_error(loss, want) < tol
    assert relative_error(stat, R.noise_exp_sum(xr.detach(), bankr, idx, T)) < tol
    weights = torch.linspace(0.5, 1.5, B, dtype=torch.float64)
    (loss * weights.to(device=device, dtype=dtype)).sum().backward()
    (grad_want,) = torch.autograd.grad((want * weights).sum(), xr)
    assert relative_error(xs.grad, grad_want) < tol

    xs = x.detach().clone().requires_grad_(True)
    loss = ops.shared_softmax_ce_loss(xs, bank, y, **common)
    want = R.softmax_ce_loss(xr, bankr, yr, idx, T)
    assert relative_error(loss, want) < tol
    (loss * weights.to(device=device, dtype=dtype)).sum().backward()
    (grad_want,) = torch.autograd.grad((want * weights).sum(), xr)
    assert relative_error(xs.grad, grad_want) < tol


def test_shared_losses_equal_the_per_sample_kernels_on_the_same_rows(device):
    """The GEMM path and the gather path are two implementations of one loss."""
    x, bank, y, rows, rng_state = problem(8, 500, 3000, 64, device, dtype=torch.float32)
    idx = shared_idx(y, rows, rng_state, 3000, False).to(device)
    z = torch.tensor([300.0], device=device)
    assert relative_error(ops.shared_nce_loss(x, bank, y, z, rows=rows, temperature=T),
                          ops.nce_loss(x, bank, y, z, idx=idx, temperature=T)) < 2e-6
    assert relative_error(ops.shared_softmax_ce_loss(x, bank, y, rows=rows, temperature=T),
                          ops.softmax_ce_loss(x, bank, y, idx=idx, temperature=T)) < 2e-6


def test_shared_losses_with_a_16_bit_bank(device):
    x, bank, y, rows, rng_state = problem(4, 200, 300, 32, device, dtype=torch.float32)
    half = bank.bfloat16()
    idx = shared_idx(y, rows, rng_state, 300, False)
    z = torch.tensor([30.0], device=device)
    want = R.nce_loss(x.double().cpu(), half.double().cpu(), y.cpu(), idx, z.double().cpu(), T)
    assert relative_error(ops.shared_nce_loss(x, half, y, z, rows=rows, temperature=T), want) < 5e-6


@pytest.mark.parametrize("precision", ["tf32", "bf16"])
def test_shared_losses_in_reduced_precision(device, precision):
    """The products of operands rounded to TF32 / bf16 (tensor cores on CUDA), sums in fp32."""
    x, bank, y, rows, rng_state = problem(5, 300, 400, 64, device, dtype=torch.float32)
    idx = shared_idx(y, rows, rng_state, 400, False)
    xr = R.round_to_precision(x.double().cpu(), precision)
    br = R.round_to_precision(bank.double().cpu(), precision)
    got = ops.shared_softmax_ce_loss(x, bank, y, rows=rows, temperature=T, precision=precision)
    want = R.softmax_ce_loss(xr, br, y.cpu(), idx, T)
    assert relative_error(got, want) < 2e-5
    exact = R.softmax_ce_loss(x.double().cpu(), bank.double().cpu(), y.cpu(), idx, T)
    assert relative_error(got, exact) > 1e-7  # the rounding is real, not a silent fp32 run
    z = torch.tensor([40.0], device=device)
    got = ops.shared_nce_loss(x, bank, y, z, rows=rows, temperature=T, precision=precision)
    assert relative_error(got, R.nce_loss(xr, br, y.cpu(), idx, z.double().cpu(), T)) < 2e-5


@pytest.mark.parametrize("exclude_positive", [False, True])
def test_shared_gradcheck(exclude_positive):
    x, bank, y, rows, rng_state = problem(3, 12, 6, 5, "cpu")
    z = torch.tensor([4.0], dtype=torch.float64)
    common = dict(rows=rows, rng_state=rng_state, temperature=0.5, exclude_positive=exclude_positive, chunk_rows=5)
    xs = x.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda v: ops.shared_nce_loss(v, bank, y, z, **common), (xs,))
    assert torch.autograd.gradcheck(lambda v: ops.shared_softmax_ce_loss(v, bank, y, **common), (xs,))


def test_shared_ops_compile_fullgraph(device):
    x, bank, y, rows, rng_state = problem(4, 50, 60, 16, device, dtype=torch.float32)
    z = torch.tensor([5.0], device=device)

    def step(v):
        a = ops.shared_nce_loss(v, bank, y, z, rng_state=rng_state, num_negatives=50, temperature=T)
        b = ops.shared_softmax_ce_loss(v, bank, y, rows=rows, rng_state=rng_state, temperature=T,
                                       exclude_positive=True)
        return (a + b).mean()

    xs = x.clone().requires_grad_(True)
    eager = step(xs)
    eager.backward()
    xc = x.clone().requires_grad_(True)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(xc)
    compiled.backward()
    assert relative_error(compiled, eager) < 1e-6 and relative_error(xc.grad, xs.grad) < 1e-6


# ------------------------------------------------------------------ bad input

def test_shared_bad_input_names_the_argument(device):
    x, bank, y, rows, rng_state = problem(3, 10, 20, 8, device)
    z = torch.tensor([5.0], device=device, dtype=x.dtype)
    cases = {
        "rows must be int64": dict(rows=rows.int()),
        r"rows must be 1-D": dict(rows=rows.view(2, 5)),
        "rows holds row 20, outside the bank": dict(rows=torch.cat([rows, torch.tensor([20], device=device)])),
        "rows holds row -1, outside the bank": dict(rows=torch.cat([rows, torch.tensor([-1], device=device)])),
        "rows has 10 entries but num_negatives = 4": dict(rows=rows, num_negatives=4),
        "pass either rows or rng_state": dict(num_negatives=4),
        "chunk_rows must be >= 1": dict(rows=rows, chunk_rows=0),
        "precision must be": dict(rows=rows, precision="fp16"),
        "exclude_positive draws the replacement rows from rng_state": dict(rows=rows, exclude_positive=True),
        "n_data needs explicit rows": dict(rng_state=rng_state, num_negatives=4, n_data=100),
    }
    for message, kwargs in cases.items():
        with pytest.raises((RuntimeError, ValueError), match=message):
            ops.shared_nce_loss(x, bank, y, z, temperature=T, **kwargs)
    with pytest.raises(RuntimeError, match="y holds row 20"):
        ops.shared_softmax_ce_loss(x, bank, torch.tensor([0, 20, 1], device=device), rows=rows, temperature=T)
    with pytest.raises(RuntimeError, match="z must be set"):
        ops.shared_nce_loss(x, bank, y, torch.tensor([-1.0], device=device), rows=rows, temperature=T)
    with pytest.raises(ValueError, match="x holds NaN"):
        ops.shared_softmax_ce_loss(torch.full_like(x, float("nan")), bank, y, rows=rows, temperature=T)


def test_npidloss_shared_refusals_leave_the_bank_alone(device):
    crit = NPIDLoss(20, 8, num_negatives=30, negatives="shared", seed=1, device=device)
    before = crit.memory.clone()
    x = torch.nn.functional.normalize(torch.randn(3, 8), dim=1).to(device)
    y = torch.tensor([1, 2, 3], device=device)
    with pytest.raises(IndexError, match="idx holds row 25"):
        crit(x, y, idx=torch.tensor([0, 25] * 15, device=device))  # a row outside the bank
    with pytest.raises(ValueError, match="idx"):
        crit(x, y, idx=torch.zeros(29, dtype=torch.int64, device=device))  # not m rows
    with pytest.raises(ValueError, match="features"):
        crit(torch.full_like(x, float("nan")), y)
    assert torch.equal(crit.memory, before) and int(crit.rng_state[1]) == 0
    with pytest.raises(ValueError, match="loss='softmax' scans the whole bank"):
        NPIDLoss(20, 8, loss="softmax", negatives="shared")
    with pytest.raises(ValueError, match="negatives must be one of"):
        NPIDLoss(20, 8, negatives="batch")
    with pytest.raises(ValueError, match="num_negatives"):
        NPIDLoss(20, 8, num_negatives=0, negatives="shared")


# ------------------------------------------------------------------ the module

@pytest.mark.parametrize("loss", ["nce", "softmax-ce"])
@pytest.mark.parametrize("z_mode", ["first-batch", "ema", "batch"])
def test_npidloss_shared_step_is_the_ops_composed(device, loss, z_mode):
    if loss == "softmax-ce" and z_mode != "first-batch":
        pytest.skip("z_mode applies to NCE")
    n, d, m, B = 300, 16, 500, 6  # m > n
    crit = NPIDLoss(n, d, num_negatives=m, loss=loss, negatives="shared", z_mode=z_mode, z_momentum=0.9,
                    seed=5, device=device).double()
    g = torch.Generator().manual_seed(0)
    bank0 = crit.memory.clone()
    for step in range(3):
        x = unit_rows(B, d, generator=g).to(device).requires_grad_(True)
        y = torch.randint(0, n, (B,), generator=g).to(device)
        rows = R.shared_noise_rows(crit.rng_state.cpu(), n, m)
        idx = R.shared_negatives_idx(y.cpu(), rows, crit.rng_state.cpu(), n, False)
        xr = x.detach().cpu().requires_grad_(True)
        z_before = crit.z.clone().cpu().double()
        out = crit(x, y)
        out.backward()
        noise = R.noise_exp_sum(xr.detach(), bank0, idx, T).sum() * n / (B * m)
        if loss == "nce":
            # Z from this step's own noise columns on the first step (unset) and in the batch mode.
            z_used = noise if (z_mode == "batch" or step == 0) else z_before
            want = R.nce_loss(xr, bank0, y.cpu(), idx, z_used, T).mean()
            z_after = 0.9 * z_used + 0.1 * noise if z_mode == "ema" else z_used
            assert relative_error(crit.z, z_after) < 1e-10
        else:
            want = R.softmax_ce_loss(xr, bank0, y.cpu(), idx, T).mean()
        want.backward()
        assert relative_error(out, want) < 1e-10 and relative_error(x.grad, xr.grad) < 1e-10
        bank0 = R.momentum_update(bank0, xr.detach(), y.cpu(), 0.5)
        assert relative_error(crit.memory, bank0) < 1e-12
        assert int(crit.rng_state[1]) == step + 1


def test_npidloss_shared_first_batch_z_survives_a_state_dict_round_trip():
    crit = NPIDLoss(50, 8, num_negatives=64, negatives="shared", seed=3)
    x = torch.nn.functional.normalize(torch.randn(4, 8), dim=1)
    y = torch.arange(4)
    crit(x, y)
    z = float(crit.z)
    assert z > 0
    fresh = NPIDLoss(50, 8, num_negatives=64, negatives="shared", seed=9)
    crit(x, y)
    assert float(crit.z) == z  # first-batch: fixed after the first step
    fresh.load_state_dict(crit.state_dict())
    fresh(x, y)
    assert float(fresh.z) == z


def test_exclude_positive_effect_script_measures_collisions():
    """experiments/exclude-positive/exclude_positive_effect.py on a random bank: at n = 10 with
    K = 9 about 0.9 negatives per sample are the positive and carry part of the gradient weight;
    excluding them changes the gradient; at n = 5,000 collisions are rare."""
    script = load_script("experiments/exclude-positive/exclude_positive_effect.py")
    bank = unit_rows(5000, 16, dtype=torch.float32)
    small = script.measure(bank, 10, 9, "per-sample", "nce", B=64)
    assert 0.5 < small["collisions_per_sample"] < 1.4
    assert 0 < small["weight_share_on_collisions"] < 1 and small["grad_rel_change"] > 0.01
    shared = script.measure(bank, 10, 50, "shared", "softmax-ce", B=64)
    assert shared["collisions_per_sample"] > 2 and shared["loss_exclude"] < shared["loss_keep"]
    large = script.measure(bank, 5000, 100, "shared", "nce", B=64)
    assert large["collisions_per_sample"] < 0.2


def test_exclude_positive_training_script_pairs_runs_by_seed():
    """experiments/exclude-positive/exclude_positive_training.py's table: per row, excluded - kept
    paired by seed."""
    script = load_script("experiments/exclude-positive/exclude_positive_training.py")
    runs = []
    for i, row in enumerate(script.ROWS):
        for seed, base in ((0, 90.0), (1, 80.0)):
            runs.append(dict(row=row, exclude_positive=False, seed=seed, knn_bank=base + i, knn_features=base))
            runs.append(dict(row=row, exclude_positive=True, seed=seed, knn_bank=base + i + 1 + seed,
                             knn_features=base - 2))
    table, summary = script.summarise(runs, [0, 1])
    assert len(table.splitlines()) == 2 + len(script.ROWS)
    for row in script.ROWS:
        assert summary[row]["knn_bank"]["paired_diff"] == [1.0, 2.0]
        assert summary[row]["knn_bank"]["mean_diff"] == 1.5
        assert summary[row]["knn_features"]["mean_diff"] == -2.0 and summary[row]["knn_features"]["sd_diff"] == 0
    assert "+1.50 ± 0.71" in table and "-2.00 ± 0.00" in table
