"""The proximal term (the paper's eq. 10) fused into every loss op: lambda * ||x_b - v||^2 added to
each sample's loss and 2 lambda (x_b - v) to its gradient, v = bank[y_b] (column 0 of an explicit
idx) as stored, and the positive_sq_dist output ||x_b - v||^2, on every device (CPU C++, the CUDA
code under the emulator, a GPU when present) against the float64 reference, in both CPU pair
orders, with a 16-bit bank, under the reduced-precision modes (whose rounding the term must not
see), with in-kernel sampling and exclude_positive; lambda = 0 bit for bit the call without it;
gradcheck and torch.compile."""
import pytest
import torch

from npid_kernels import ops
from npid_kernels import reference as R

from conftest import DEVICES, relative_error, unit_rows

T = 0.07
LAMBDAS = [0.0, 0.05, 1.0, 7.5]
OPS = ["nce", "softmax_ce", "shared_nce", "shared_softmax_ce", "full_softmax"]


def problem(B, K, n, d, device, dtype=torch.float64, bank_dtype=None, seed=0):
    """x, bank, y, idx (column 0 = y), shared rows, rng_state; some positives close to their
    features (a trained bank lags the features by a little), others far."""
    g = torch.Generator().manual_seed(seed)
    x = unit_rows(B, d, generator=g)
    bank = unit_rows(n, d, generator=g)
    y = torch.randperm(n, generator=g)[:B] if B <= n else torch.randint(0, n, (B,), generator=g)
    near = torch.nn.functional.normalize(x + 0.1 * torch.randn(B, d, dtype=torch.float64, generator=g), dim=1)
    bank[y[: B // 2]] = near[: B // 2]
    idx = torch.randint(0, n, (B, K + 1), generator=g)
    idx[:, 0] = y
    rows = torch.randint(0, n, (K,), generator=g)
    rng_state = torch.tensor([int(torch.randint(0, 2**62, (1,), generator=g)), 2 * seed + 1])
    return [t.to(device) for t in (x.to(dtype), bank.to(bank_dtype or dtype), y, idx, rows, rng_state)]


def acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def call(op, x, bank, y, z, *, idx=None, rows=None, rng_state=None, K=-1, proximal=0.0, exclude_positive=False,
         precision="fp32"):
    """(loss, positive_sq_dist) of one entry point of npid_kernels.ops."""
    common = dict(temperature=T, proximal=proximal, with_sq_dist=True)
    sampling = dict(rng_state=rng_state, num_negatives=K, exclude_positive=exclude_positive)
    if op == "nce":
        return ops.nce_loss(x, bank, y, z, idx=idx, **sampling, **common)
    if op == "softmax_ce":
        return ops.softmax_ce_loss(x, bank, y, idx=idx, **sampling, **common)
    shared = dict(rows=rows, rng_state=rng_state, num_negatives=K if rows is None else -1,
                  exclude_positive=exclude_positive, precision=precision)
    if op == "shared_nce":
        return ops.shared_nce_loss(x, bank, y, z, **shared, **common)
    if op == "shared_softmax_ce":
        return ops.shared_softmax_ce_loss(x, bank, y, **shared, **common)
    return ops.full_softmax_loss(x, bank, y, T, precision, proximal, with_sq_dist=True)


def reference_idx(op, y, idx, rows, rng_state, n, K, sampled, exclude_positive):
    """The rows the op scores as a per-sample (B, K+1) idx (None for the full softmax)."""
    if op in ("nce", "softmax_ce"):
        return R.sample_negatives(y.cpu(), rng_state.cpu(), n, K, exclude_positive) if sampled else idx.cpu()
    if op in ("shared_nce", "shared_softmax_ce"):
        noise = R.shared_noise_rows(rng_state.cpu(), n, K) if sampled else rows.cpu()
        return R.shared_negatives_idx(y.cpu(), noise, rng_state.cpu(), n, exclude_positive)
    return None


def reference(op, xr, bank, y, idx, z, proximal, precision="fp32"):
    """The float64 reference loss; `precision` rounds the products' operands (the scans' modes),
    never the proximal term's row."""
    if op == "full_softmax":
        return R.full_softmax_loss(xr, bank, y, T, precision, proximal)
    xp = R.round_to_precision(xr, precision)
    bp = R.round_to_precision(bank.double(), precision)
    if op in ("nce", "shared_nce"):
        loss = R.nce_loss(xp, bp, y, idx, z, T)
    else:
        loss = R.softmax_ce_loss(xp, bp, y, idx, T)
    return R.with_proximal(loss, xr, bank.double(), idx[:, 0], proximal)


def run(op, x, bank, y, z, **kw):
    """(loss, grad_x through autograd, positive_sq_dist) of one call with backward, weighted so
    that every sample's gradient counts."""
    xs = x.detach().clone().requires_grad_(True)
    loss, sq = call(op, xs, bank, y, z, **kw)
    weights = torch.linspace(0.5, 1.5, x.shape[0], dtype=loss.dtype, device=loss.device)
    (loss * weights).sum().backward()
    return loss.detach(), xs.grad, sq


def expected(op, x, bank, y, idx, z, proximal, precision="fp32"):
    xr = x.detach().double().cpu().requires_grad_(True)
    bank_cpu = bank.cpu()
    want = reference(op, xr, bank_cpu, y.cpu(), idx, z, proximal, precision)
    weights = torch.linspace(0.5, 1.5, x.shape[0], dtype=torch.float64)
    (grad,) = torch.autograd.grad((want * weights).sum(), xr)
    positives = y.cpu() if idx is None else idx[:, 0]
    return want.detach(), grad, R.positive_sq_dist(xr.detach(), bank_cpu.double(), positives)


def z_for(x, bank, idx, n):
    if idx is None:
        return None
    return R.estimate_z(R.nce_scores(x.double().cpu(), bank.double().cpu(), idx, T), n).reshape(1)


# ------------------------------------------------------------------ against the reference

@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("proximal", LAMBDAS)
@pytest.mark.parametrize("sampled", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_matches_reference(device, op, proximal, sampled, dtype):
    if op == "full_softmax" and sampled:
        pytest.skip("the full softmax scans every row")
    B, K, n, d = 5, 40, 300, 24
    x, bank, y, idx, rows, rng_state = problem(B, K, n, d, device, dtype=dtype, seed=3)
    ridx = reference_idx(op, y, idx, rows, rng_state, n, K, sampled, False)
    z = z_for(x, bank, ridx, n)
    kw = dict(rng_state=rng_state, K=K) if sampled else dict(idx=idx, rows=rows)
    if op.startswith("shared") and not sampled:
        kw["rng_state"] = rng_state
    zz = None if z is None else z.to(device=device, dtype=dtype)
    loss, grad, sq = run(op, x, bank, y, zz, proximal=proximal, **kw)
    want_loss, want_grad, want_sq = expected(op, x, bank, y, ridx, z, proximal)
    tol = 1e-11 if dtype == torch.float64 else 1e-5
    assert loss.dtype == dtype and grad.dtype == dtype
    assert sq.dtype == acc_dtype(dtype) and sq.shape == (B,) and not sq.requires_grad
    assert relative_error(loss, want_loss) < tol
    assert relative_error(grad, want_grad) < tol
    assert relative_error(sq, want_sq) < tol


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("bank_dtype", [torch.bfloat16, torch.float16])
def test_16_bit_bank_rows_convert_exactly(device, op, bank_dtype):
    """A 16-bit bank: v is its row converted to float32 exactly, so the float64 reference on the
    same 16-bit values is matched to float32 rounding."""
    B, K, n, d = 6, 50, 400, 64
    x, bank, y, idx, rows, rng_state = problem(B, K, n, d, device, dtype=torch.float32, bank_dtype=bank_dtype,
                                               seed=5)
    ridx = reference_idx(op, y, idx, rows, rng_state, n, K, False, False)
    z = z_for(x, bank, ridx, n)
    loss, grad, sq = run(op, x, bank, y, None if z is None else z.float().to(device), idx=idx, rows=rows,
                         proximal=1.0)
    want_loss, want_grad, want_sq = expected(op, x, bank, y, ridx, z, 1.0)
    assert relative_error(loss, want_loss) < 1e-5 and relative_error(grad, want_grad) < 1e-5
    assert relative_error(sq, want_sq) < 1e-6


@pytest.mark.parametrize("op", ["shared_nce", "shared_softmax_ce", "full_softmax"])
@pytest.mark.parametrize("precision", ["tf32", "bf16"])
def test_reduced_precision_leaves_the_term_unrounded(device, op, precision):
    """tf32 / bf16 round the products' operands; the proximal term and positive_sq_dist use x and
    the row as stored: loss(lambda) - loss(0) = lambda * sq and grad(lambda) - grad(0) =
    2 lambda (x - v) with the unrounded v, and sq is the unrounded distance, measurably not the
    rounded one."""
    B, K, n, d = 5, 200, 300, 64
    x, bank, y, idx, rows, rng_state = problem(B, K, n, d, device, dtype=torch.float32, seed=11)
    z = torch.tensor([30.0], device=device)
    lam = 7.5
    loss0, grad0, sq0 = run(op, x, bank, y, z, rows=rows, precision=precision)
    loss1, grad1, sq1 = run(op, x, bank, y, z, rows=rows, precision=precision, proximal=lam)
    v = bank[y].double()
    exact = (x.double() - v).pow(2).sum(1)
    rounded = (R.round_to_precision(x.double(), precision) - R.round_to_precision(v, precision)).pow(2).sum(1)
    assert relative_error(sq0, exact) < 1e-6 and torch.equal(sq0, sq1)
    assert relative_error(rounded, exact) > 2e-5  # what a rounded row would have given
    weights = torch.linspace(0.5, 1.5, B, dtype=torch.float64, device=device)
    assert relative_error(loss1.double() - loss0.double(), lam * exact) < 1e-5
    assert relative_error(grad1.double() - grad0.double(), 2 * lam * weights[:, None] * (x.double() - v)) < 2e-5
    # and the loss itself: the reference on rounded operands plus the unrounded term
    ridx = reference_idx(op, y, idx, rows, rng_state, n, K, False, False)
    want_loss, want_grad, _ = expected(op, x, bank, y, ridx, z.double().cpu(), lam, precision)
    assert relative_error(loss1, want_loss) < 2e-5
    assert relative_error(grad1, want_grad) < {"tf32": 2e-3, "bf16": 1e-2}[precision]


@pytest.mark.parametrize("op", ["nce", "softmax_ce", "shared_nce", "shared_softmax_ce"])
def test_exclude_positive(device, op):
    B, K, n, d = 5, 40, 7, 16  # K >> n: many draws would hit the positive without the exclusion
    x, bank, y, idx, rows, rng_state = problem(B, K, n, d, device, seed=2)
    ridx = reference_idx(op, y, idx, rows, rng_state, n, K, True, True)
    z = z_for(x, bank, ridx, n)
    loss, grad, sq = run(op, x, bank, y, None if z is None else z.to(device), rng_state=rng_state, K=K,
                         exclude_positive=True, proximal=0.5)
    want_loss, want_grad, want_sq = expected(op, x, bank, y, ridx, z, 0.5)
    assert relative_error(loss, want_loss) < 1e-11 and relative_error(grad, want_grad) < 1e-11
    assert relative_error(sq, want_sq) < 1e-12


@pytest.mark.parametrize("op", ["nce", "softmax_ce"])
def test_positive_is_idx_column_zero(device, op):
    """With an explicit idx the positive is its column 0 (the modules check it equals y)."""
    B, K, n, d = 4, 10, 50, 8
    x, bank, y, idx, rows, rng_state = problem(B, K, n, d, device, seed=4)
    other = (y + 1) % n
    z = z_for(x, bank, idx.cpu(), n)
    _, _, sq = run(op, x, bank, other, None if z is None else z.to(device), idx=idx, proximal=1.0)
    assert relative_error(sq, R.positive_sq_dist(x.cpu(), bank.cpu(), idx[:, 0].cpu())) < 1e-12


# ------------------------------------------------------------------ lambda = 0 is the call without it

def raw_calls(x, bank, y, idx, rows, rng_state, z, K):
    """Each raw op's argument list without `proximal` (the schema's default)."""
    return {
        "nce": (ops.npid.nce_loss, (x, bank, y, idx, None, z, K, T, -1, False)),
        "nce sampled": (ops.npid.nce_loss, (x, bank, y, None, rng_state, z, K, T, -1, True)),
        "softmax_ce": (ops.npid.softmax_ce_loss, (x, bank, y, idx, None, K, T, False)),
        "softmax_ce sampled": (ops.npid.softmax_ce_loss, (x, bank, y, None, rng_state, K, T, True)),
        "shared_nce": (ops.npid.shared_nce_loss, (x, bank, y, rows, rng_state, z, K, T, True, -1, "fp32", 16)),
        "shared_softmax_ce": (ops.npid.shared_softmax_ce_loss, (x, bank, y, None, rng_state, K, T, False, "tf32", -1)),
        "full_softmax": (ops.npid.full_softmax_loss, (x, bank, y, T, "fp32", True)),
        "full_softmax bf16 no grad": (ops.npid.full_softmax_loss, (x, bank, y, T, "bf16", False)),
    }


@pytest.mark.parametrize("dtype,bank_dtype", [(torch.float64, torch.float64), (torch.float32, torch.float32),
                                              (torch.float32, torch.bfloat16)])
def test_zero_is_bit_identical_to_the_call_without_it(device, dtype, bank_dtype):
    x, bank, y, idx, rows, rng_state = problem(6, 60, 200, 37, device, dtype=dtype, bank_dtype=bank_dtype)
    z = torch.tensor([150.0], dtype=dtype, device=device)
    for name, (op, args) in raw_calls(x, bank, y, idx, rows, rng_state, z, 60).items():
        without, with_zero = op(*args), op(*args, 0.0)
        assert len(without) == len(with_zero)
        for a, b in zip(without, with_zero):
            assert a.dtype == b.dtype and torch.equal(a, b), name
    # the entry points: with_sq_dist only appends
    plain = ops.nce_loss(x, bank, y, z, idx=idx, temperature=T)
    loss, sq = ops.nce_loss(x, bank, y, z, idx=idx, temperature=T, proximal=0.0, with_sq_dist=True)
    assert torch.equal(plain, loss)
    assert torch.equal(sq, ops.npid.nce_loss(x, bank, y, idx, None, z, 60, T)[3])
    assert len(ops.full_softmax_loss_and_grad(x, bank, y, T)) == 2


# ------------------------------------------------------------------ the CPU kernels' two pair orders

# (B, K, n, d): pairs < n; pairs ~ 5 n with runs longer than a block of 32 pairs; several chunks of
# tiles (B * (K+1) >= 2 * 16384) with d not a multiple of the vector width.
ORDER_SHAPES = [(3, 20, 500, 16), (16, 300, 1000, 128), (40, 1000, 3000, 37)]


@pytest.mark.parametrize("order", ["sample", "tile"])
@pytest.mark.parametrize("op", ["nce", "softmax_ce"])
@pytest.mark.parametrize("B,K,n,d", ORDER_SHAPES)
@pytest.mark.parametrize("dtype,bank_dtype", [(torch.float64, torch.float64), (torch.float32, torch.float32),
                                              (torch.float32, torch.bfloat16)])
def test_both_cpu_pair_orders(order, op, B, K, n, d, dtype, bank_dtype):
    x, bank, y, idx, rows, rng_state = problem(B, K, n, d, "cpu", dtype=dtype, bank_dtype=bank_dtype, seed=B + K)
    ridx = R.sample_negatives(y, rng_state, n, K)
    z = z_for(x, bank, ridx, n)
    with ops._cpu_pair_order(order):
        loss0, grad0, sq0 = run(op, x, bank, y, None if z is None else z.to(dtype), rng_state=rng_state, K=K)
        loss, grad, sq = run(op, x, bank, y, None if z is None else z.to(dtype), rng_state=rng_state, K=K,
                             proximal=1.0)
    want_loss, want_grad, want_sq = expected(op, x, bank, y, ridx, z, 1.0)
    tol = 1e-11 if dtype == torch.float64 else 1e-5
    assert relative_error(loss, want_loss) < tol and relative_error(grad, want_grad) < tol
    assert relative_error(sq, want_sq) < tol and torch.equal(sq, sq0)
    want_loss0, _, _ = expected(op, x, bank, y, ridx, z, 0.0)
    assert relative_error(loss0, want_loss0) < tol


# ------------------------------------------------------------------ autograd, opcheck, torch.compile

# gradcheck in double through the emulator is slow: the emulated device is in the slow tier.
@pytest.mark.parametrize("device", [pytest.param(d, marks=pytest.mark.slow) if d == "emu" else d for d in DEVICES],
                         indirect=True)
@pytest.mark.parametrize("op", OPS)
def test_gradcheck(device, op):
    x, bank, y, idx, rows, rng_state = problem(3, 6, 11, 5, device)
    z = torch.tensor([8.0], dtype=torch.float64, device=device)
    xs = x.clone().requires_grad_(True)

    def loss(v):
        return call(op, v, bank, y, z, idx=idx, rows=rows, rng_state=rng_state, proximal=0.8)[0]

    assert torch.autograd.gradcheck(loss, (xs,))


def test_compile_fullgraph_with_proximal(device):
    x, bank, y, idx, rows, rng_state = problem(4, 30, 60, 16, device, dtype=torch.float32)
    z = torch.tensor([40.0], device=device)

    def step(v):
        total = 0
        for op in OPS:
            loss, sq = call(op, v, bank, y, z, idx=idx, rows=rows, rng_state=rng_state, proximal=0.25)
            total = total + loss.mean() + sq.mean()
        return total

    xs = x.clone().requires_grad_(True)
    eager = step(xs)
    eager.backward()
    xc = x.clone().requires_grad_(True)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(xc)
    compiled.backward()
    assert relative_error(compiled, eager) < 1e-6 and relative_error(xc.grad, xs.grad) < 1e-6


def test_full_softmax_without_grad_keeps_zeros(device):
    """compute_grad=False: the term is in the loss, grad_x stays zeros."""
    x, bank, y, *_ = problem(4, 1, 300, 16, device, dtype=torch.float32)
    loss, grad, sq = ops.npid.full_softmax_loss(x, bank, y, T, "fp32", False, 2.0)
    base = ops.npid.full_softmax_loss(x, bank, y, T, "fp32", False)[0]
    assert not grad.any() and relative_error(loss - base, 2.0 * sq) < 1e-5
