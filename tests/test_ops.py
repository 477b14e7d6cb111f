"""Every op against the pure-PyTorch reference in float64 on fresh random inputs, at odd
shapes, plus gradcheck in double and torch.library.opcheck."""
import math
import os
import subprocess
import sys

import pytest
import torch

from npid_kernels import ops
from npid_kernels import reference as R

from conftest import DEVICES, relative_error, unit_rows

T = 0.07

# (B, K, n, d): B = 1, K = 1, d = 3 and 130, n < K, and one mid-sized case.
SHAPES = [(1, 1, 5, 3), (3, 7, 50, 130), (5, 40, 9, 16), (4, 300, 1000, 128), (2, 5, 2, 1)]


def make_problem(B, K, n, d, device, dtype=torch.float64, bank_dtype=None, seed=0, repeated=True):
    g = torch.Generator().manual_seed(seed)
    x = unit_rows(B, d, generator=g)
    bank = unit_rows(n, d, generator=g)
    y = torch.randint(0, n, (B,), generator=g)
    idx = torch.randint(0, n, (B, K + 1), generator=g)
    if repeated and K >= 2:
        idx[:, 2] = idx[:, 1]  # the same row twice for a sample
    idx[:, 0] = y
    rng_state = torch.tensor([int(torch.randint(0, 2**62, (1,), generator=g)), seed * 7 + 1])
    bank = bank.to(bank_dtype or dtype)
    return [t.to(device) for t in (x.to(dtype), bank, y, idx, rng_state)]


def leaf(x, dtype=None):
    """A fresh leaf copy of x that requires grad."""
    return x.detach().to(dtype or x.dtype).clone().requires_grad_(True)


def reference_z(x, bank, idx):
    return R.estimate_z(R.nce_scores(x.double(), bank.double(), idx, T), bank.shape[0])


# ------------------------------------------------------------------ sampling

@pytest.mark.parametrize("B,K,n", [(1, 1, 2), (3, 17, 5), (7, 64, 1_281_167), (2, 3, 2**31 - 1),
                                   (4, 61, 2**31 - 1)])
@pytest.mark.parametrize("state", [(0, 0), (12345, 3), (-5, 2**40 + 7), (2**62 + 11, 2**33)])
@pytest.mark.parametrize("exclude_positive", [False, True])
def test_sample_negatives_matches_reference(device, B, K, n, state, exclude_positive):
    """K = 61 and 64: samples that start on either half of a Philox call and hold whole
    vector groups of draws as well as partial ones; positives at both ends of the bank."""
    y = torch.randint(0, n, (B,), device=device)
    y[0], y[-1] = 0, n - 1
    rng_state = torch.tensor(state, device=device)
    idx = ops.sample_negatives(y, rng_state, n, K, exclude_positive)
    assert idx.shape == (B, K + 1) and idx.dtype == torch.int64
    assert torch.equal(idx[:, 0], y)
    assert int(idx.min()) >= 0 and int(idx.max()) < n
    if exclude_positive:
        assert not (idx[:, 1:] == y[:, None]).any()
    assert torch.equal(idx.cpu(), R.sample_negatives(y.cpu(), rng_state.cpu(), n, K, exclude_positive))


def test_sample_negatives_uniform_and_fresh_per_offset():
    n, K = 10, 20_000
    y = torch.zeros(2, dtype=torch.int64)
    idx = ops.sample_negatives(y, torch.tensor([7, 0]), n, K)
    counts = torch.bincount(idx[:, 1:].reshape(-1), minlength=n).double()
    expected = 2 * K / n
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    assert chi2 < 40, f"chi^2 = {chi2} with 9 degrees of freedom: not uniform"
    other = ops.sample_negatives(y, torch.tensor([7, 1]), n, K)
    assert (other != idx).float().mean() > 0.8  # a new offset gives a new stream


# ------------------------------------------------------------------ NCE scores (NCEAverage)

@pytest.mark.parametrize("B,K,n,d", SHAPES)
def test_nce_scores_matches_reference(device, B, K, n, d):
    x, bank, y, idx, _ = make_problem(B, K, n, d, device)
    out = ops.nce_scores(x, bank, idx, T)
    assert relative_error(out, R.nce_scores(x, bank, idx, T)) < 1e-12


@pytest.mark.parametrize("B,K,n,d", SHAPES)
def test_nce_scores_float32(device, B, K, n, d):
    x, bank, y, idx, _ = make_problem(B, K, n, d, device)
    out = ops.nce_scores(x.float(), bank.float(), idx, T)
    assert out.dtype == torch.float32
    assert relative_error(out, R.nce_scores(x, bank, idx, T)) < 1e-5


# gradcheck in double through the emulator takes 20-40 s a shape: the emulated device is in the slow tier.
@pytest.mark.parametrize("device", [pytest.param(d, marks=pytest.mark.slow) if d == "emu" else d for d in DEVICES],
                         indirect=True)
@pytest.mark.parametrize("B,K,n,d", SHAPES[:3])
def test_nce_scores_gradcheck(device, B, K, n, d):
    x, bank, y, idx, _ = make_problem(B, K, n, d, device)
    x.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: ops.nce_scores(x, bank, idx, T), (x,))


# ------------------------------------------------------------------ Z

def test_nce_init_z_sets_once(device):
    x, bank, y, idx, _ = make_problem(4, 9, 30, 8, device)
    scores = ops.nce_scores(x, bank, idx, T)
    z = torch.tensor([-1.0], dtype=torch.float64, device=device)
    ops.nce_init_z_(z, scores, 30)
    assert z.item() == pytest.approx(R.estimate_z(scores, 30).item(), rel=1e-12)
    ops.nce_init_z_(z, scores * 10, 30)  # already set: Z is fixed after the first batch
    assert z.item() == pytest.approx(R.estimate_z(scores, 30).item(), rel=1e-12)


@pytest.mark.parametrize("sampled", [False, True])
@pytest.mark.parametrize("z_dtype", [torch.float32, torch.float64])
def test_nce_estimate_z_matches_reference(device, sampled, z_dtype):
    B, K, n, d = 6, 33, 100, 20
    x, bank, y, idx, rng_state = make_problem(B, K, n, d, device)
    if sampled:
        idx = R.sample_negatives(y.cpu(), rng_state.cpu(), n, K).to(device)
    z = torch.tensor([-1.0], dtype=z_dtype, device=device)
    kwargs = dict(rng_state=rng_state) if sampled else dict(idx=idx)
    ops.nce_estimate_z_(z, x, bank, y, num_negatives=K, temperature=T, **kwargs)
    assert z.item() == pytest.approx(reference_z(x, bank, idx).item(), rel=1e-6 if z_dtype == torch.float32 else 1e-12)
    before = z.clone()
    ops.nce_estimate_z_(z, x * 0.5, bank, y, num_negatives=K, temperature=T, **kwargs)
    assert torch.equal(z, before)


# ------------------------------------------------------------------ fused losses

LOSSES = {
    "nce": (lambda x, bank, y, z, **kw: ops.nce_loss(x, bank, y, z, **kw),
            lambda x, bank, y, idx, z: R.nce_loss(x, bank, y, idx, z, T)),
    "softmax_ce": (lambda x, bank, y, z, **kw: ops.softmax_ce_loss(x, bank, y, **kw),
                   lambda x, bank, y, idx, z: R.softmax_ce_loss(x, bank, y, idx, T)),
}


def reference_loss_and_grad(loss_name, x, bank, y, idx, z):
    xr = x.detach().double().clone().requires_grad_(True)
    loss = LOSSES[loss_name][1](xr, bank.double(), y, idx, z.double())
    loss.sum().backward()
    return loss.detach(), xr.grad


@pytest.mark.parametrize("loss_name", sorted(LOSSES))
@pytest.mark.parametrize("B,K,n,d", SHAPES)
@pytest.mark.parametrize("sampled", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fused_loss_matches_reference(device, loss_name, B, K, n, d, sampled, dtype):
    x, bank, y, idx, rng_state = make_problem(B, K, n, d, device)
    if sampled:
        idx = R.sample_negatives(y.cpu(), rng_state.cpu(), n, K).to(device)
    z = reference_z(x, bank, idx)
    kwargs = dict(rng_state=rng_state) if sampled else dict(idx=idx)
    xs = leaf(x, dtype)
    loss = LOSSES[loss_name][0](xs, bank.to(dtype), y, z.to(dtype).reshape(1), num_negatives=K, temperature=T, **kwargs)
    loss.sum().backward()
    expected_loss, expected_grad = reference_loss_and_grad(loss_name, x, bank, y, idx, z)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert loss.dtype == dtype and xs.grad.dtype == dtype
    assert relative_error(loss, expected_loss) < tol
    assert relative_error(xs.grad, expected_grad) < tol


@pytest.mark.parametrize("loss_name", sorted(LOSSES))
@pytest.mark.parametrize("bank_dtype", [torch.bfloat16, torch.float16])
def test_fused_loss_16bit_bank_within_twice_pytorch_error(device, loss_name, bank_dtype):
    """A 16-bit bank: our error against the float64 truth (on the fp32 bank) may be at most
    twice that of the same math done by PyTorch on the 16-bit bank."""
    B, K, n, d = 8, 512, 2000, 128
    x, bank, y, idx, _ = make_problem(B, K, n, d, device)
    z = reference_z(x, bank, idx)
    expected_loss, expected_grad = reference_loss_and_grad(loss_name, x, bank, y, idx, z)
    low_bank = bank.to(bank_dtype)
    torch_loss, torch_grad = reference_loss_and_grad(loss_name, x.float(), low_bank.float(), y, idx, z.float())
    xs = leaf(x, torch.float32)
    loss = LOSSES[loss_name][0](xs, low_bank, y, z.float().reshape(1), idx=idx, num_negatives=K, temperature=T)
    loss.sum().backward()
    assert relative_error(loss, expected_loss) <= 2 * relative_error(torch_loss, expected_loss) + 1e-6
    assert relative_error(xs.grad, expected_grad) <= 2 * relative_error(torch_grad, expected_grad) + 1e-6


def test_nce_loss_negatives_keep_precision_when_p_much_smaller_than_c(device):
    """With P/c ~ 1e-6 the negatives' terms are tiny; log1p keeps them, a naive fp32
    log(c / (P + c)) would round them to zero."""
    B, K, n, d = 2, 64, 100, 16
    x, bank, y, idx, _ = make_problem(B, K, n, d, device)
    z = reference_z(x, bank, idx) * 1e6
    loss = ops.nce_loss(x.float(), bank.float(), y, z.float().reshape(1), idx=idx, num_negatives=K, temperature=T)
    expected = R.nce_loss(x, bank, y, idx, z, T)
    negatives = expected - torch.log1p((K / n + R.NCE_EPS) / (R.nce_scores(x, bank, idx, T)[:, 0] / z))
    assert negatives.min() < 1e-3  # the regime this test is about
    assert relative_error(loss, expected) < 1e-6


@pytest.mark.parametrize("loss_name", sorted(LOSSES))
@pytest.mark.parametrize("sampled", [False, True])
def test_fused_loss_gradcheck(device, loss_name, sampled):
    B, K, n, d = 3, 6, 11, 5
    x, bank, y, idx, rng_state = make_problem(B, K, n, d, device)
    z = reference_z(x, bank, idx).reshape(1)
    kwargs = dict(rng_state=rng_state) if sampled else dict(idx=idx)
    x.requires_grad_(True)
    fn = LOSSES[loss_name][0]
    assert torch.autograd.gradcheck(lambda x: fn(x, bank, y, z, num_negatives=K, temperature=T, **kwargs), (x,))


def test_fused_loss_in_kernel_sampling_equals_explicit_idx(device):
    B, K, n, d = 5, 100, 700, 32
    x, bank, y, _, rng_state = make_problem(B, K, n, d, device, dtype=torch.float32)
    idx = ops.sample_negatives(y, rng_state, n, K)
    z = torch.tensor([float(n)], device=device)
    a = ops.nce_loss(x, bank, y, z, rng_state=rng_state, num_negatives=K, temperature=T)
    b = ops.nce_loss(x, bank, y, z, idx=idx, num_negatives=K, temperature=T)
    assert torch.equal(a, b)


@pytest.mark.parametrize("B,K,n,d", SHAPES)
@pytest.mark.parametrize("sampled", [False, True])
@pytest.mark.parametrize("dtype,bank_dtype", [(torch.float64, torch.float64), (torch.float32, torch.float32),
                                              (torch.float32, torch.bfloat16)])
def test_nce_loss_noise_exp_sum_matches_reference(device, B, K, n, d, sampled, dtype, bank_dtype):
    """nce_loss's third output: per sample, sum_{k>=1} exp(s_k) over the noise columns only
    (the positive, column 0, left out), float64, from the same pass as the loss; the loss and
    grad_x are those of the two-output call."""
    x, bank, y, idx, rng_state = make_problem(B, K, n, d, device)
    if sampled:
        idx = R.sample_negatives(y.cpu(), rng_state.cpu(), n, K).to(device)
    z = reference_z(x, bank, idx).reshape(1)
    low_bank = bank.to(bank_dtype)
    kwargs = dict(rng_state=rng_state) if sampled else dict(idx=idx)
    loss, sums = ops.nce_loss_and_z_stat(x.to(dtype), low_bank, y, z.to(dtype), num_negatives=K, temperature=T,
                                         **kwargs)
    assert sums.dtype == torch.float64 and sums.shape == (B,) and not sums.requires_grad
    expected = R.noise_exp_sum(x.double(), low_bank.double(), idx, T)
    assert relative_error(sums, expected) < (1e-12 if dtype == torch.float64 else 1e-5)
    assert torch.equal(loss, ops.nce_loss(x.to(dtype), low_bank, y, z.to(dtype), num_negatives=K, temperature=T,
                                          **kwargs))
    # the positive really is left out: a positive score changed alone leaves the sums unchanged
    if K >= 1 and not sampled:
        moved = idx.clone()
        moved[:, 0] = (moved[:, 0] + 1) % n
        _, again = ops.nce_loss_and_z_stat(x.to(dtype), low_bank, y, z.to(dtype), idx=moved, temperature=T)
        assert torch.equal(again, sums)


def test_nce_loss_third_output_is_not_differentiable_and_backward_ignores_it(device):
    x, bank, y, idx, _ = make_problem(3, 7, 50, 16, device)
    z = reference_z(x, bank, idx).reshape(1)
    xs = leaf(x)
    loss, _, sums, sq_dist = ops.npid.nce_loss(xs, bank, y, idx, None, z, 7, T)
    assert loss.requires_grad and not sums.requires_grad and not sq_dist.requires_grad
    (loss.sum() + 0 * sums.sum() + 0 * sq_dist.sum()).backward()
    _, expected_grad = reference_loss_and_grad("nce", x, bank, y, idx, z)
    assert relative_error(xs.grad, expected_grad) < 1e-12


@pytest.mark.parametrize("alpha", [0.0, 0.5, 0.99])
@pytest.mark.parametrize("z_dtype", [torch.float64, torch.float32])
def test_z_ema_update_matches_reference(device, alpha, z_dtype):
    B, K, n, d = 5, 40, 300, 24
    x, bank, y, idx, _ = make_problem(B, K, n, d, device)
    z0 = reference_z(x, bank, idx).reshape(1) * 3.0
    z = z0.to(z_dtype).clone()
    _, sums = ops.nce_loss_and_z_stat(x, bank, y, z0, idx=idx, temperature=T)
    ops.z_ema_update_(z, sums, B * K, n, alpha)
    expected = R.z_ema(z0.to(z_dtype).double(), R.noise_exp_sum(x, bank, idx, T), B * K, n, alpha)
    assert relative_error(z.double(), expected) < (1e-12 if z_dtype == torch.float64 else 1e-6)
    # n * mean exp(s) over uniform noise is an unbiased estimate of the true Z (alpha = 0, many rows)
    many = torch.randint(0, n, (B, 20001), device=device)
    many[:, 0] = y
    fresh = torch.tensor([1.0], dtype=torch.float64, device=device)
    _, sums = ops.nce_loss_and_z_stat(x, bank, y, fresh, idx=many, temperature=T)
    ops.z_ema_update_(fresh, sums, B * 20000, n, 0.0)
    assert relative_error(fresh, R.true_z(x, bank, T).mean()) < 0.05


def test_z_ema_update_rejects_bad_alpha_and_keeps_z_on_a_non_finite_estimate(device):
    z = torch.tensor([5.0], dtype=torch.float64, device=device)
    for alpha in (1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="alpha"):
            ops.z_ema_update_(z, torch.ones(2, dtype=torch.float64, device=device), 2, 10, alpha)
    ops.z_ema_update_(z, torch.tensor([float("nan"), 1.0], dtype=torch.float64, device=device), 2, 10, 0.5)
    assert z.item() == 5.0


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_nce_on_fetched_rows_with_n_data_equals_whole_bank(device, dtype):
    """What sharded training does: only the rows idx needs, idx renumbered into them, and n_data =
    the real bank size for Pn = 1/n. Loss, grad and Z equal the call on the whole bank."""
    B, K, n, d = 6, 40, 3000, 24
    x, bank, y, idx, _ = make_problem(B, K, n, d, device, dtype=dtype)
    rows, local = torch.unique(idx, return_inverse=True)
    fetched, local = bank[rows], local.view(idx.shape)
    z_whole = torch.tensor([-1.0], dtype=torch.float64, device=device)
    z_fetched = z_whole.clone()
    ops.nce_estimate_z_(z_whole, x, bank, y, idx=idx, temperature=T)
    ops.nce_estimate_z_(z_fetched, x, fetched, local[:, 0].contiguous(), idx=local, temperature=T, n_data=n)
    assert relative_error(z_fetched, z_whole) < 1e-12
    whole, xw, ew, _ = ops.npid.nce_loss(x, bank, y, idx, None, z_whole, K, T)
    part, xp, ep, _ = ops.npid.nce_loss(x, fetched, local[:, 0].contiguous(), local, None, z_whole, K, T, n)
    assert relative_error(part, whole) < 1e-12 and relative_error(xp, xw) < 1e-12 and relative_error(ep, ew) < 1e-12
    # Without n_data the fetched rows' count would set c = K / len(rows): a different loss.
    wrong, *_ = ops.npid.nce_loss(x, fetched, local[:, 0].contiguous(), local, None, z_whole, K, T)
    assert relative_error(wrong, whole) > 1e-3


# ------------------------------------------------------------------ exact softmax over the bank

@pytest.mark.parametrize("B,n,d", [(1, 1, 3), (4, 37, 130), (3, 8192 + 5, 16), (2, 20000, 128)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_full_softmax_loss_matches_reference(device, B, n, d, dtype):
    x, bank, y, _, _ = make_problem(B, 1, n, d, device)
    xs = leaf(x, dtype)
    loss = ops.full_softmax_loss(xs, bank.to(dtype), y, T)
    loss.sum().backward()
    xr = leaf(x)
    expected = R.full_softmax_loss(xr, bank, y, T)
    expected.sum().backward()
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert relative_error(loss, expected) < tol
    assert relative_error(xs.grad, xr.grad) < tol


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_full_softmax_loss_forward_only(device, precision):
    """Without autograd the op skips the gradient's GEMM: the same loss, and grad_x is zeros."""
    x, bank, y, _, _ = make_problem(5, 1, 9000, 40, device, dtype=torch.float32)
    with torch.no_grad():
        loss_nograd = ops.full_softmax_loss(x, bank, y, T, precision)
    loss_plain = ops.full_softmax_loss(x, bank, y, T, precision)  # x does not require grad
    xg = leaf(x)
    loss_grad = ops.full_softmax_loss(xg, bank, y, T, precision)
    expected = R.full_softmax_loss(x.double(), bank.double(), y, T, precision)
    for loss in (loss_nograd, loss_plain, loss_grad):
        assert relative_error(loss, expected) < 1e-5
    loss_only, grad_x, _ = ops.npid.full_softmax_loss(x, bank, y, T, precision, False)
    assert torch.equal(loss_only, loss_plain) and not grad_x.any()


def test_full_softmax_loss_gradcheck(device):
    x, bank, y, _, _ = make_problem(3, 1, 13, 7, device)
    x.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: ops.full_softmax_loss(x, bank, y, T), (x,))


def test_full_softmax_loss_bf16_bank(device):
    x, bank, y, _, _ = make_problem(4, 1, 3000, 64, device)
    xr = leaf(x)
    expected = R.full_softmax_loss(xr, bank, y, T)
    torch_bf16 = R.full_softmax_loss(x.float(), bank.bfloat16().float(), y, T)
    loss = ops.full_softmax_loss(x.float(), bank.bfloat16(), y, T)
    assert relative_error(loss, expected) <= 2 * relative_error(torch_bf16, expected) + 1e-6


# ------------------------------------------------------------------ precision modes (tf32 / bf16 scans)

def test_round_to_precision_rounds_to_nearest_even():
    # 1 + 2^-11 lies halfway between TF32's 1 and 1 + 2^-10: ties go to the even mantissa (1);
    # 1 + 3 * 2^-11 lies halfway between 1 + 2^-10 (odd) and 1 + 2^-9 (even): up.
    t = torch.tensor([1 + 2**-11, 1 + 3 * 2**-11, 1 + 2**-11 + 2**-20, -(1 + 3 * 2**-11),
                      float("inf"), float("-inf"), 0.0, 3.0e38], dtype=torch.float32)
    expected = torch.tensor([1.0, 1 + 2**-9, 1 + 2**-10, -(1 + 2**-9), float("inf"), float("-inf"), 0.0, 3.0e38])
    rounded = R.round_to_precision(t, "tf32")
    assert torch.equal(rounded[:7], expected[:7])
    assert abs(rounded[7].item() - 3.0e38) <= 3.0e38 * 2**-11  # large finite values stay finite
    assert torch.isnan(R.round_to_precision(torch.tensor([float("nan")]), "tf32")).all()
    bits = R.round_to_precision(torch.randn(1000, dtype=torch.float64), "tf32").float().view(torch.int32)
    assert (bits & 0x1FFF).eq(0).all()  # 13 low mantissa bits cleared
    assert torch.equal(R.round_to_precision(t, "bf16"), t.bfloat16().float())
    with pytest.raises(ValueError, match="precision must be"):
        R.round_to_precision(t, "fp16")


@pytest.mark.parametrize("precision", ["tf32", "bf16"])
def test_scan_rounds_operands_like_the_reference(device, precision):
    """With one-hot queries each similarity is a single product bank[i, j] * 1, so knn_topk
    returns the bank's values as the kernel rounded them: they must equal the reference's
    rounding bit for bit, ties to even included (CUDA's TF32 conversion is the hardware's)."""
    if device == "cuda" and precision == "tf32":
        pytest.skip("tensor cores convert fp32 to tf32 their own way")
    g = torch.Generator().manual_seed(7)
    ties = [1 + 2**-11, 1 + 3 * 2**-11, 1 + 2**-8 + 2**-9, 1 + 2**-9, -(1 + 3 * 2**-11), 2**-140, 3.0e38]
    column = torch.cat([torch.tensor(ties), torch.randn(500, generator=g) * 10.0 ** torch.randint(-5, 5, (500,), generator=g)])
    bank = torch.zeros(column.numel(), 3)
    bank[:, 1] = column
    query = torch.eye(3)[1:2]
    sims, idx = ops.knn_topk(query.to(device), bank.to(device), column.numel(), precision)
    expected = R.round_to_precision(column, precision)
    assert torch.equal(sims[0].cpu(), expected[idx[0].cpu()])
    assert torch.equal(sims[0].cpu().sort().values, expected.sort().values)


def pytorch_path_at(precision, x, bank):
    """x @ bank.T as a PyTorch user gets it at `precision`: bf16 operands through torch's own
    bf16 matmul (its output rounded to bf16), tf32 as tensor cores form it (operands rounded,
    products summed in fp32); differentiable w.r.t. x."""
    if precision == "bf16":
        return (x.bfloat16() @ bank.bfloat16().t()).float()
    return R.round_to_precision(x, "tf32") @ R.round_to_precision(bank.float(), "tf32").t()


# On CPU the operands are rounded to nearest even exactly as the reference does; CUDA's tensor
# cores may convert fp32 to tf32 differently (truncation), so there the bound is that format's
# relative precision.
def scan_tolerance(device, precision):
    return 1e-5 if device == "cpu" or precision == "bf16" else 2e-3


@pytest.mark.parametrize("precision", ["tf32", "bf16"])
@pytest.mark.parametrize("B,n,d", [(3, 8192 + 5, 16), (5, 3000, 128)])
def test_full_softmax_loss_precision(device, precision, B, n, d):
    x, bank, y, _, _ = make_problem(B, 1, n, d, device, seed=n + d)
    xs = leaf(x, torch.float32)
    loss = ops.full_softmax_loss(xs, bank.float(), y, T, precision)
    loss.sum().backward()
    # 1. The same math as the reference on rounded operands (p is rounded too before the
    #    second GEMM, hence the looser bound on the gradient).
    xr = leaf(x)
    rounded = R.full_softmax_loss(xr, bank, y, T, precision)
    rounded.sum().backward()
    assert relative_error(loss, rounded) < scan_tolerance(device, precision)
    assert relative_error(xs.grad, xr.grad) < {"tf32": 2e-3, "bf16": 1e-2}[precision]
    # 2. Against the exact float64 answer: within 2x PyTorch's own error at this precision.
    xe = leaf(x)
    exact = R.full_softmax_loss(xe, bank, y, T)
    exact.sum().backward()
    xt = leaf(x, torch.float32)
    torch_loss = torch.nn.functional.cross_entropy(pytorch_path_at(precision, xt, bank.float()) / T, y, reduction="none")
    torch_loss.sum().backward()
    assert relative_error(loss, exact) <= 2 * relative_error(torch_loss, exact) + 1e-6
    assert relative_error(xs.grad, xe.grad) <= 2 * relative_error(xt.grad, xe.grad) + 1e-6
    # 3. The mode is really applied, in the reference and in the op (an op silently running in
    #    fp32 would be ~1e-7 from exact; these modes are 4e-5 and more).
    assert relative_error(rounded, exact) > 1e-5
    assert relative_error(loss, exact) > 5e-6


def test_full_softmax_loss_fp32_ignores_global_tf32(device):
    """precision='fp32' stays exact when the user turned TF32 on for the whole process."""
    x, bank, y, _, _ = make_problem(4, 1, 5000, 64, device, dtype=torch.float32)
    expected = R.full_softmax_loss(x.double(), bank.double(), y, T)
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        loss = ops.full_softmax_loss(x, bank, y, T)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    assert relative_error(loss, expected) < 1e-5
    assert torch.backends.cuda.matmul.allow_tf32 == previous


@pytest.mark.parametrize("precision", ["tf32", "bf16"])
@pytest.mark.parametrize("bank_dtype", [torch.float32, torch.bfloat16])
def test_knn_topk_precision(device, precision, bank_dtype):
    q = unit_rows(30, 48, device=device, dtype=torch.float32)
    bank = unit_rows(20000, 48, device=device).to(bank_dtype)
    sims, idx = ops.knn_topk(q, bank, 50, precision)
    ref_sims, ref_idx = R.knn_topk(q.double(), bank.double(), 50, precision)
    tol = scan_tolerance(device, precision)
    assert (sims.double() - ref_sims).abs().max() < tol
    # Same neighbours up to near-ties: the rounded-operand similarity of each returned row
    # equals the reference's at that rank.
    rounded = R.round_to_precision(q.double(), precision) @ R.round_to_precision(bank.double(), precision).t()
    assert (rounded.gather(1, idx) - ref_sims).abs().max() < 2 * tol
    assert (idx == ref_idx).float().mean() > 0.95
    exact_sims, _ = R.knn_topk(q.double(), bank.double(), 50)
    if bank_dtype == torch.float32 or precision == "tf32":  # a bf16 bank is already exact in bf16
        # the rounding is really applied, in the reference and in the op
        assert (ref_sims - exact_sims).abs().max() > 1e-5
        assert (sims.double() - exact_sims.to(sims.device)).abs().max() > 1e-5


# ------------------------------------------------------------------ momentum update

@pytest.mark.parametrize("B,n,d", [(1, 1, 3), (6, 4, 130), (64, 1000, 128), (9, 50, 7)])
@pytest.mark.parametrize("bank_dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_momentum_update_matches_reference(device, B, n, d, bank_dtype):
    g = torch.Generator().manual_seed(B * n + d)
    x = unit_rows(B, d, generator=g).to(device)
    bank = unit_rows(n, d, generator=g).to(device=device, dtype=bank_dtype)
    y = torch.randint(0, n, (B,), generator=g).to(device)  # n small: duplicates likely
    xd = x if bank_dtype == torch.float64 else x.float()
    expected = R.momentum_update(bank, xd, y, 0.5)
    ops.momentum_update_(bank, xd, y, 0.5)
    tol = {torch.float64: 1e-15, torch.float32: 1e-6, torch.bfloat16: 1e-2, torch.float16: 2e-3}[bank_dtype]
    assert relative_error(bank, expected) < tol
    rows = bank[y].double()
    assert torch.allclose(rows.norm(dim=1), torch.ones(B, dtype=torch.float64, device=device), atol=10 * tol)


def test_momentum_update_duplicates_last_occurrence_wins(device):
    bank = unit_rows(4, 8, device=device)
    old = bank.clone()
    x = unit_rows(3, 8, device=device)
    y = torch.tensor([2, 2, 2], device=device)
    ops.momentum_update_(bank, x, y, 0.25)
    mixed = 0.25 * old[2] + 0.75 * x[2]
    assert torch.allclose(bank[2], mixed / mixed.norm(), atol=1e-15)
    assert torch.equal(bank[[0, 1, 3]], old[[0, 1, 3]])


@pytest.mark.parametrize("momentum", [0.0, 1.0])
def test_momentum_update_extremes(device, momentum):
    bank = unit_rows(5, 6, device=device) * 3  # rows not unit (lemniscate's init)
    x = unit_rows(2, 6, device=device)
    y = torch.tensor([1, 4], device=device)
    expected = R.momentum_update(bank, x, y, momentum)
    ops.momentum_update_(bank, x, y, momentum)
    assert torch.allclose(bank, expected, atol=1e-14)


# ------------------------------------------------------------------ kNN

@pytest.mark.parametrize("Q,n,d,k", [(1, 1, 3, 1), (5, 300, 130, 7), (40, 9000, 16, 200), (3, 50, 8, 50)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_knn_topk_matches_reference(device, Q, n, d, k, dtype):
    q = unit_rows(Q, d, device=device).to(dtype)
    bank = unit_rows(n, d, device=device).to(dtype)
    sims, idx = ops.knn_topk(q, bank, k)
    ref_sims, ref_idx = R.knn_topk(q, bank, k)
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    assert relative_error(sims, ref_sims) < tol
    # The same neighbours, in the same order except among (near-)ties: each returned row's
    # exact similarity must equal the reference's at that rank.
    exact = q.double() @ bank.double().t()
    assert torch.allclose(exact.gather(1, idx), ref_sims.double(), rtol=0, atol=1e-5 if dtype == torch.float32 else 1e-12)
    assert (idx == ref_idx).float().mean() > 0.99
    assert all(len(set(row)) == k for row in idx.tolist())


def test_knn_topk_exact_ties_and_nan_rows(device):
    """Rows stored several times tie exactly: the same similarities as the reference, sorted,
    and on the CPU the smaller row first (the documented order). A NaN bank row ranks first,
    as torch.topk ranks NaN; a NaN query gives NaN similarities, no crash."""
    g = torch.Generator().manual_seed(3)
    rows = unit_rows(700, 24, generator=g)
    bank = rows[torch.randint(0, 700, (3000,), generator=g)]  # every row ~4 times
    q = unit_rows(9, 24, generator=g)
    sims, idx = ops.knn_topk(q.to(device), bank.to(device), 50)
    ref_sims, _ = R.knn_topk(q, bank, 50)
    assert torch.allclose(sims.cpu(), ref_sims, rtol=0, atol=1e-12)
    assert bool((sims[:, :-1] >= sims[:, 1:]).all())
    if device == "cpu" and ops.npid.name == "npid":  # the CPU kernel's order (not the emulated CUDA one)
        same = sims[:, 1:] == sims[:, :-1]
        assert same.any() and bool((idx[:, 1:] > idx[:, :-1])[same].all())
    bank_nan = bank.clone()
    bank_nan[1234] = float("nan")
    sims, idx = ops.knn_topk(q.to(device), bank_nan.to(device), 5)
    assert bool((idx[:, 0] == 1234).all()) and bool(sims[:, 0].isnan().all()) and not sims[:, 1:].isnan().any()
    # -inf similarities (an overflowing dot product) are neighbours like any other
    q_big = torch.tensor([[1e30, 0.0]], device=device)
    bank_big = torch.tensor([[-1e30, 0.0], [-2e30, 0.0], [1.0, 0.0]], device=device)
    sims, idx = ops.knn_topk(q_big, bank_big, 3)
    assert idx[0, 0].item() == 2 and sorted(idx[0, 1:].tolist()) == [0, 1]
    assert sims[0, 0].item() == torch.tensor(1e30).item() and bool(sims[0, 1:].isneginf().all())
    q_nan = q.clone()
    q_nan[2] = float("nan")
    sims, idx = ops.knn_topk(q_nan.to(device), bank.to(device), 5)
    assert bool(sims[2].isnan().all()) and not sims[[0, 1, 3]].isnan().any()
    assert bool(((idx >= 0) & (idx < 3000)).all())


def test_knn_topk_bf16_bank(device):
    q = unit_rows(20, 32, device=device, dtype=torch.float32)
    bank = unit_rows(5000, 32, device=device).bfloat16()
    sims, idx = ops.knn_topk(q, bank, 10)
    ref_sims, _ = R.knn_topk(q, bank.float(), 10)
    assert relative_error(sims, ref_sims) < 1e-6


# ------------------------------------------------------------------ opcheck

def opcheck_cases(device):
    x, bank, y, idx, rng_state = make_problem(3, 5, 17, 10, device, dtype=torch.float32)
    xg = x.clone().requires_grad_(True)
    z = torch.tensor([17.0], device=device)
    scores = ops.nce_scores(x, bank, idx, T)
    return [
        (ops.npid.sample_negatives, (y, rng_state, 17, 5)),
        (ops.npid.nce_scores, (xg, bank, idx, T)),
        (ops.npid.nce_scores_backward, (torch.ones_like(scores), scores, x, bank, idx, T)),
        (ops.npid.nce_init_z_, (torch.tensor([-1.0], device=device), scores, 17)),
        (ops.npid.nce_estimate_z_, (torch.tensor([-1.0], device=device), x, bank, y, None, rng_state, 5, T)),
        (ops.npid.nce_estimate_z_, (torch.tensor([-1.0], device=device), x, bank, y, idx, None, 5, T)),
        (ops.npid.nce_loss, (xg, bank, y, idx, None, z, 5, T)),
        (ops.npid.nce_loss, (xg, bank, y, None, rng_state, z, 5, T)),
        (ops.npid.nce_loss, (xg, bank, y, idx, None, z, 5, T, 1000)),
        (ops.npid.softmax_ce_loss, (xg, bank, y, idx, None, 5, T)),
        (ops.npid.softmax_ce_loss, (xg, bank, y, None, rng_state, 5, T)),
        (ops.npid.sample_negatives, (y, rng_state, 17, 5, True)),
        (ops.npid.nce_loss, (xg, bank, y, None, rng_state, z, 5, T, -1, True)),
        (ops.npid.softmax_ce_loss, (xg, bank, y, None, rng_state, 5, T, True)),
        (ops.npid.shared_nce_loss, (xg, bank, y, None, rng_state, z, 30, T)),
        (ops.npid.shared_nce_loss, (xg, bank, y, idx[:, 1:].reshape(-1), rng_state, z, -1, T, True, -1, "fp32", 4)),
        (ops.npid.shared_softmax_ce_loss, (xg, bank, y, None, rng_state, 30, T, True, "bf16")),
        (ops.npid.shared_softmax_ce_loss, (xg, bank, y, idx[:, 1:].reshape(-1), None, -1, T)),
        (ops.npid.momentum_update_, (bank.clone(), x, y, 0.5)),
        (ops.npid.full_softmax_loss, (xg, bank, y, T)),
        (ops.npid.full_softmax_loss, (xg, bank, y, T, "bf16")),
        (ops.npid.full_softmax_loss, (x, bank, y, T, "fp32", False)),
        (ops.npid.knn_topk, (x, bank, 4)),
        (ops.npid.knn_topk, (x, bank, 4, "tf32")),
        # the proximal term (lambda > 0) of every loss
        (ops.npid.nce_loss, (xg, bank, y, idx, None, z, 5, T, -1, False, 0.3)),
        (ops.npid.softmax_ce_loss, (xg, bank, y, None, rng_state, 5, T, True, 0.3)),
        (ops.npid.shared_nce_loss, (xg, bank, y, None, rng_state, z, 30, T, False, -1, "tf32", -1, 0.3)),
        (ops.npid.shared_softmax_ce_loss, (xg, bank, y, idx[:, 1:].reshape(-1), None, -1, T, False, "fp32", 7, 0.3)),
        (ops.npid.full_softmax_loss, (xg, bank, y, T, "bf16", True, 0.3)),
        (ops.npid.full_softmax_loss, (x, bank, y, T, "fp32", False, 0.3)),
    ]


def test_opcheck_every_op(device):
    cases = opcheck_cases(device)
    covered = {op._qualified_op_name for op, _ in cases}
    library = ops.npid.name  # "npid", or "npid_emu" on the emulated device
    # The leading-underscore ops are the CPU kernels' switches and scratch counters (no tensors,
    # nothing to opcheck).
    declared = {name for name in torch._C._dispatch_get_all_op_names()
                if name.startswith(library + "::") and not name.startswith(library + "::_")}
    assert declared and declared <= covered, f"ops without an opcheck case: {declared - covered}"
    for op, args in cases:
        torch.library.opcheck(op, args)


# ------------------------------------------------------------------ every CPU vector ISA path

ISAS = ["baseline", "avx2", "avx512"]


@pytest.mark.parametrize("isa", ISAS)
def test_cpu_isa_paths_agree(isa):
    """The hot loops are compiled for AVX-512, AVX2 and the baseline ISA; the narrower
    paths are only taken on older CPUs, so run them here on purpose."""
    before = torch.ops.npid._cpu_isa()
    with ops._cpu_isa(isa) as running:
        if running != isa:
            assert ISAS.index(running) < ISAS.index(isa)  # capped at what the CPU has
            pytest.skip(f"this CPU has no {isa} (best: {running})")
        assert torch.ops.npid._cpu_isa() == isa  # what the kernels below dispatch on
        g = torch.Generator().manual_seed(3)
        x = torch.nn.functional.normalize(torch.randn(5, 37, generator=g, dtype=torch.float64), dim=1)
        bank = torch.nn.functional.normalize(torch.randn(300, 37, generator=g, dtype=torch.float64), dim=1)
        y = torch.randint(0, 300, (5,), generator=g)
        idx = ops.sample_negatives(y, torch.tensor([1, 2]), 300, 50)
        z = R.estimate_z(R.nce_scores(x, bank, idx, T), 300).reshape(1)
        for dt in (torch.float64, torch.float32):
            tol = 1e-12 if dt == torch.float64 else 1e-5
            got = ops.nce_loss(x.to(dt), bank.to(dt), y, z.to(dt), idx=idx, num_negatives=50, temperature=T)
            assert relative_error(got, R.nce_loss(x, bank, y, idx, z, T)) < tol
            got = ops.softmax_ce_loss(x.to(dt), bank.to(dt), y, idx=idx, num_negatives=50, temperature=T)
            assert relative_error(got, R.softmax_ce_loss(x, bank, y, idx, T)) < tol
        # The in-kernel draw (AVX2 lanes or scalar Philox) against the pure-PyTorch Philox; K odd so
        # that samples start on either half of a Philox call.
        for K, ex in ((4095, False), (33, True), (1, False)):
            rng = torch.tensor([12345, 678])
            yy = torch.randint(0, 300, (9,), generator=g)
            assert torch.equal(ops.sample_negatives(yy, rng, 300, K, exclude_positive=ex),
                               R.sample_negatives(yy, rng, 300, K, exclude_positive=ex))
    assert torch.ops.npid._cpu_isa() == before  # restored after the block


def test_cpu_isa_environment_override_is_read_at_load():
    """NPID_CPU_ISA (docs/cpu.md) lowers the ISA for the whole process, and the private switches
    refuse unknown names."""
    script = "import torch, npid_kernels; print(torch.ops.npid._cpu_isa())"
    result = subprocess.run([sys.executable, "-c", script], env=dict(os.environ, NPID_CPU_ISA="baseline"),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.split() == ["baseline"], result.stderr
    with pytest.raises(RuntimeError, match="cpu isa must be baseline, avx2 or avx512, got 'sse'"):
        torch.ops.npid._set_cpu_isa("sse")
    with pytest.raises(RuntimeError, match="pair order must be auto, sample or tile, got 'row'"):
        torch.ops.npid._set_cpu_pair_order("row")


# ------------------------------------------------------------------ behaviours both paths define the same way

def test_strided_rng_state_is_read_through_its_stride(device):
    """A (2,) view with stride 2 holds [seed, offset] at elements 0 and 2 of its storage."""
    y = torch.tensor([1, 2, 3], device=device)
    strided = torch.tensor([7, 99, 5, 99], device=device)[::2]
    contiguous = torch.tensor([7, 5], device=device)
    assert torch.equal(ops.sample_negatives(y, strided, 50, 9), ops.sample_negatives(y, contiguous, 50, 9))
    x, bank, _, _, _ = make_problem(3, 9, 50, 8, device, dtype=torch.float32)
    z = torch.tensor([40.0], device=device)
    for fn in (lambda r: ops.nce_loss(x, bank, y, z, rng_state=r, num_negatives=9, temperature=T),
               lambda r: ops.softmax_ce_loss(x, bank, y, rng_state=r, num_negatives=9, temperature=T)):
        assert torch.equal(fn(strided), fn(contiguous))


@pytest.mark.parametrize("scale", [1e30, 1e-30])
def test_momentum_update_normalises_rows_far_from_unit_length(device, scale):
    """|w|^2 of a float32 row of 1e30s overflows and of 1e-30s underflows; the row is still
    normalised (rescaled by its largest entry first), never written as zeros, NaN, or skipped."""
    g = torch.Generator().manual_seed(0)
    bank = unit_rows(6, 16, dtype=torch.float32, device=device, generator=g)
    direction = unit_rows(2, 16, generator=g)
    x = (direction * scale).float().to(device)
    y = torch.tensor([1, 4], device=device)
    got = bank.clone()
    ops.momentum_update_(got, x, y, 0.0)
    assert relative_error(got[y], direction) < 1e-6
    assert torch.equal(got[[0, 2, 3, 5]], bank[[0, 2, 3, 5]])
