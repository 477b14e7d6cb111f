"""The CPU fused losses visit their (sample, row) pairs in sample order or by tiles of bank rows
(csrc/cpu/pair_order.h), chosen by problem size or forced with ops._cpu_pair_order. Both orders
must give the float64 reference's loss and gradient; tile order must not depend on the thread
count, and must merge per-chunk partial sums right, also for samples with no pairs in a chunk."""
import pytest
import torch

from npid_kernels import ops
from npid_kernels import reference as R

from conftest import relative_error, unit_rows

T = 0.07
ORDERS = ["sample", "tile"]


@pytest.fixture
def order(request):
    with ops._cpu_pair_order(request.param):
        yield request.param


def problem(B, K, n, d, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = unit_rows(B, d, generator=g).to(dtype)
    bank = unit_rows(n, d, generator=g).to(dtype)
    y = torch.randint(0, n, (B,), generator=g)
    idx = torch.randint(0, n, (B, K + 1), generator=g)
    idx[:, 0] = y
    if K >= 2:
        idx[:, 2] = idx[:, 1]  # a row twice for one sample
    rng_state = torch.tensor([int(torch.randint(0, 2**62, (1,), generator=g)), seed + 1])
    return x, bank, y, idx, rng_state


def run_loss(loss_name, x, bank, y, z, **kw):
    """(loss, grad_x, noise_exp_sum or None) of one op call with backward."""
    xs = x.detach().clone().requires_grad_(True)
    if loss_name == "nce":
        loss, _, sums, _ = ops.npid.nce_loss(xs, bank, y, kw.get("idx"), kw.get("rng_state"), z,
                                          kw.get("num_negatives", -1), T, -1, kw.get("exclude_positive", False))
    else:
        loss = ops.softmax_ce_loss(xs, bank, y, temperature=T, **kw)
        sums = None
    loss.sum().backward()
    return loss.detach(), xs.grad, sums


def close(actual, expected, tol):
    """Relative error below tol, measured against max(||expected||, 1): at n = 1 the softmax's
    true gradient is exactly zero and only rounding is left."""
    diff = (actual.double() - expected.double()).norm().item()
    return diff <= tol * max(expected.double().norm().item(), 1.0)


def reference(loss_name, x, bank, y, idx, z):
    xr = x.detach().double().clone().requires_grad_(True)
    if loss_name == "nce":
        loss = R.nce_loss(xr, bank.double(), y, idx, z.double(), T)
    else:
        loss = R.softmax_ce_loss(xr, bank.double(), y, idx, T)
    loss.sum().backward()
    return loss.detach(), xr.grad


# (B, K, n, d): pairs < n; pairs ~ 5 n (the ratio) with runs of one sample in one tile
# longer than a block of 32 pairs (d = 128: tiles of 128 rows, ~38 pairs per run); several
# chunks of tiles (B * (K+1) >= 2 * 16384); d not a multiple of the vector width; n = 1; and
# banks that end in a partial tile (d = 37: 256-row tiles, n = 3000; d = 16: 1024-row tiles,
# n = 12,293).
SHAPES = [(3, 20, 500, 16), (16, 300, 1000, 128), (40, 1000, 3000, 37), (7, 9, 1, 5),
          (16, 1000, 12_293, 16)]


@pytest.mark.parametrize("order", ORDERS, indirect=True)
@pytest.mark.parametrize("loss_name", ["nce", "softmax_ce"])
@pytest.mark.parametrize("B,K,n,d", SHAPES)
@pytest.mark.parametrize("dtype,bank_dtype", [(torch.float64, torch.float64), (torch.float32, torch.float32),
                                              (torch.float32, torch.bfloat16)])
def test_both_orders_match_the_reference(order, loss_name, B, K, n, d, dtype, bank_dtype):
    x, bank, y, idx, _ = problem(B, K, n, d)
    bank = bank.to(bank_dtype)
    z = R.estimate_z(R.nce_scores(x, bank.double(), idx, T), n).reshape(1)
    loss, grad, sums = run_loss(loss_name, x.to(dtype), bank, y, z.to(dtype), idx=idx)
    want_loss, want_grad = reference(loss_name, x, bank, y, idx, z)
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    assert close(loss, want_loss, tol) and close(grad, want_grad, tol)
    if sums is not None:
        assert relative_error(sums, R.noise_exp_sum(x, bank.double(), idx, T)) < tol


@pytest.mark.parametrize("loss_name", ["nce", "softmax_ce"])
@pytest.mark.parametrize("B,K,n,d", [(24, 700, 2000, 64), (16, 1000, 12_293, 16)])
def test_orders_agree_with_in_kernel_sampling_and_exclude_positive(loss_name, B, K, n, d):
    """In-kernel rows (with and without exclude_positive) are the rows sample_negatives draws,
    in either order; the two orders agree to rounding."""
    x, bank, y, _, rng_state = problem(B, K, n, d, dtype=torch.float32)
    z = torch.tensor([n * 1.5])
    for exclude in (False, True):
        idx = ops.sample_negatives(y, rng_state, n, K, exclude_positive=exclude)
        results = {}
        for order in ORDERS:
            with ops._cpu_pair_order(order):
                drawn = run_loss(loss_name, x, bank, y, z, rng_state=rng_state, num_negatives=K, exclude_positive=exclude)
                given = run_loss(loss_name, x, bank, y, z, idx=idx)
            assert torch.equal(drawn[0], given[0]) and torch.equal(drawn[1], given[1])
            results[order] = drawn
        assert relative_error(results["tile"][0], results["sample"][0]) < 1e-5
        assert relative_error(results["tile"][1], results["sample"][1]) < 1e-5


@pytest.mark.parametrize("loss_name", ["nce", "softmax_ce"])
@pytest.mark.parametrize("B,K,n,d", [(48, 900, 4000, 40),  # 43k pairs: several chunks
                                     (16, 2000, 12_293, 24)])  # and samples split over threads
@pytest.mark.parametrize("order", ["tile"], indirect=True)
def test_tile_order_does_not_depend_on_the_thread_count(order, loss_name, B, K, n, d):
    x, bank, y, idx, rng_state = problem(B, K, n, d, dtype=torch.float32)
    z = torch.tensor([1.5 * n])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run_loss(loss_name, x, bank, y, z, idx=idx)
        one_drawn = run_loss(loss_name, x, bank, y, z, rng_state=rng_state, num_negatives=K)
        torch.set_num_threads(max(3, threads))
        many = run_loss(loss_name, x, bank, y, z, idx=idx)
        many_drawn = run_loss(loss_name, x, bank, y, z, rng_state=rng_state, num_negatives=K)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(one + one_drawn, many + many_drawn):
        assert a is None or torch.equal(a, b)


@pytest.mark.parametrize("loss_name", ["nce", "softmax_ce"])
@pytest.mark.parametrize("order", ["tile"], indirect=True)
def test_tile_order_merges_samples_missing_from_some_chunks(order, loss_name):
    """Sample 0's rows all sit at the bank's start and sample 1's at its end, so each misses
    most chunks of tiles; the merge must skip those chunks, not add NaN or zeros."""
    B, K, n, d = 40, 1000, 3000, 32
    x, bank, y, idx, _ = problem(B, K, n, d)
    idx[0] = torch.randint(0, 50, (K + 1,))
    idx[1] = torch.randint(n - 50, n, (K + 1,))
    y[0], y[1] = idx[0, 0], idx[1, 0]
    z = torch.tensor([n * 1.1], dtype=torch.float64)
    loss, grad, _ = run_loss(loss_name, x, bank, y, z, idx=idx)
    want_loss, want_grad = reference(loss_name, x, bank, y, idx, z)
    assert relative_error(loss, want_loss) < 1e-12 and relative_error(grad, want_grad) < 1e-12


@pytest.mark.parametrize("order", ORDERS, indirect=True)
def test_nce_with_a_far_too_small_z_stays_finite(order):
    """lemniscate's Z fixed on a random first batch can be orders of magnitude too small, and
    every negative's log(1 + P / c) term is then large: a sample's product of the terms' factors
    passes double's range many times over (~1e300 after a few dozen pairs here) and must be
    folded into the sum in time, in whatever runs and blocks the pairs come. Loss and gradient
    still match float64."""
    B, K, n, d = 16, 2000, 3000, 32
    x, bank, y, idx, _ = problem(B, K, n, d)
    bank = (0.5 * bank + 0.5 * x[torch.randint(0, B, (n,))])  # rows close to the features: large P
    bank = torch.nn.functional.normalize(bank, dim=1)
    z = torch.tensor([1e-6], dtype=torch.float64)
    for dtype in (torch.float64, torch.float32):
        loss, grad, _ = run_loss("nce", x.to(dtype), bank.to(dtype), y, z.to(dtype), idx=idx)
        want_loss, want_grad = reference("nce", x, bank, y, idx, z)
        assert torch.isfinite(want_loss).all() and want_loss.min() > 1e4  # the products overflow
        tol = 1e-12 if dtype == torch.float64 else 2e-5
        assert close(loss, want_loss, tol) and close(grad, want_grad, tol)


@pytest.mark.parametrize("order", ORDERS, indirect=True)
@pytest.mark.parametrize("loss_name", ["nce", "softmax_ce"])
def test_both_orders_gradcheck(order, loss_name):
    x, bank, y, idx, _ = problem(3, 6, 11, 5)
    z = torch.tensor([15.0], dtype=torch.float64)
    xs = x.clone().requires_grad_(True)
    if loss_name == "nce":
        fn = lambda x: ops.nce_loss(x, bank, y, z, idx=idx, temperature=T)
    else:
        fn = lambda x: ops.softmax_ce_loss(x, bank, y, idx=idx, temperature=T)
    assert torch.autograd.gradcheck(fn, (xs,))


@pytest.mark.parametrize("order", ORDERS, indirect=True)
@pytest.mark.parametrize("bad_row", [-1, 3000])
def test_both_orders_refuse_rows_outside_the_bank(order, bad_row):
    x, bank, y, idx, _ = problem(40, 1000, 3000, 16, dtype=torch.float32)
    idx[17, 400] = bad_row
    before = bank.clone()
    with pytest.raises(RuntimeError, match=rf"idx holds row {bad_row}, outside the bank \[0, 3000\)"):
        ops.nce_loss(x, bank, y, torch.tensor([3000.0]), idx=idx, temperature=T)
    with pytest.raises(RuntimeError, match=rf"idx holds row {bad_row}, outside the bank"):
        ops.softmax_ce_loss(x, bank, y, idx=idx, temperature=T)
    assert torch.equal(bank, before)


def test_the_default_order_follows_the_pairs_per_bank_row():
    """Unforced, many pairs per bank row (the issue's shape, scaled down) take tile order and
    fewer pairs than rows sample order: each default is bit-identical to the forced order."""
    assert torch.ops.npid._cpu_pair_order() == "auto"
    for (B, K, n), expected in [((16, 1023, 3000), "tile"), ((4, 1023, 40000), "sample")]:
        x, bank, y, idx, _ = problem(B, K, n, 32, dtype=torch.float32)
        z = torch.tensor([n * 1.2])
        default = run_loss("nce", x, bank, y, z, idx=idx)
        forced = {}
        for order in ORDERS:
            with ops._cpu_pair_order(order):
                forced[order] = run_loss("nce", x, bank, y, z, idx=idx)
        assert torch.ops.npid._cpu_pair_order() == "auto"  # the context restored it
        other = "sample" if expected == "tile" else "tile"
        assert not torch.equal(forced["tile"][1], forced["sample"][1])  # the orders are distinguishable
        assert torch.equal(default[1], forced[expected][1]), (B, K, n, expected, other)


@pytest.mark.parametrize("order", ORDERS, indirect=True)
def test_softmax_ce_scores_far_below_the_max_match_float64(order):
    """T = 0.004 puts the scores in [-250, 250]: exp(s - max) of most rows is below float32's
    smallest normal (-87) or underflows to zero (-104), the ranges where the vectorised exp of
    the fused losses handles its exponent in two steps. The loss and grad still match float64."""
    g = torch.Generator().manual_seed(11)
    B, K, n, d, temperature = 6, 700, 500, 16, 0.004
    x = torch.nn.functional.normalize(torch.randn(B, d, generator=g, dtype=torch.float64), dim=1)
    bank = torch.nn.functional.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    y = torch.randint(0, n, (B,), generator=g)
    idx = ops.sample_negatives(y, torch.tensor([5, 6]), n, K)
    x32 = x.float().requires_grad_(True)
    got = ops.softmax_ce_loss(x32, bank.float(), y, idx=idx, temperature=temperature)
    got.sum().backward()
    x64 = x.clone().requires_grad_(True)
    want = R.softmax_ce_loss(x64, bank, y, idx, temperature)
    want.sum().backward()
    torch.testing.assert_close(got.double(), want, rtol=2e-4, atol=2e-3)
    torch.testing.assert_close(x32.grad.double(), x64.grad, rtol=2e-4, atol=2e-2)
