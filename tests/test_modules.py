"""The nn modules against lemniscate's formulas (written here in float64,
the way lemniscate's lib/NCEAverage.py, NCECriterion.py and LinearAverage.py compute them),
NPIDLoss state round-trips, and torch.compile(fullgraph=True)."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

from npid_kernels import (AliasSampler, LinearAverage, MemoryBank, NCEAverage, NCECriterion, NCELoss, NPIDLoss,
                          ParametricInstanceLoss, ops)
from npid_kernels import reference as R

from conftest import relative_error, unit_rows

T, MOMENTUM = 0.07, 0.5
# lemniscate keeps T in a float32 `params` buffer, so its effective temperature is float32(0.07);
# the drop-ins do the same.
T32 = float(torch.tensor(T, dtype=torch.float32))


def lemniscate_nce_step(memory, x, y, idx, K, T, momentum, Z=None):
    """One lemniscate NCE step on float64 copies: returns (loss, grad_x, new memory, Z)."""
    memory = memory.clone().double()
    x = x.detach().double().clone().requires_grad_(True)
    n, d = memory.shape
    B = x.shape[0]
    idx = idx.clone()
    idx[:, 0] = y
    weight = memory.index_select(0, idx.view(-1)).view(B, K + 1, d)
    out = torch.bmm(weight, x.view(B, d, 1)).div(T).exp().view(B, K + 1)
    if Z is None:
        Z = (out.mean() * n).item()
    P = out / Z
    eps, Pn = 1e-7, 1.0 / n
    lnPmt = torch.log(P[:, 0] / (P[:, 0] + K * Pn + eps))
    lnPon = torch.log((K * Pn) / (P[:, 1:] + K * Pn + eps))
    loss = -(lnPmt.sum() + lnPon.sum()) / B
    loss.backward()
    with torch.no_grad():
        pos = memory.index_select(0, y) * momentum + x * (1 - momentum)
        memory.index_copy_(0, y, pos / pos.pow(2).sum(1, keepdim=True).pow(0.5))
    return loss.detach(), x.grad, memory, Z


def test_memory_init_like_lemniscate():
    torch.manual_seed(0)
    bank = MemoryBank(5000, 128).memory
    stdv = 1.0 / math.sqrt(128 / 3)
    assert bank.shape == (5000, 128) and bank.dtype == torch.float32
    assert bank.min() >= -stdv and bank.max() <= stdv
    assert abs(bank.std().item() - stdv / math.sqrt(3)) < 0.01 * stdv
    assert NCEAverage(16, 100, 10).memory.shape == (100, 16)
    assert LinearAverage(16, 100).memory.shape == (100, 16)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_nce_average_and_criterion_equal_lemniscate(device, dtype):
    torch.manual_seed(1)
    B, d, n, K = 6, 24, 200, 31
    lem = NCEAverage(d, n, K, T, MOMENTUM).to(device=device, dtype=dtype)
    criterion = NCECriterion(n)
    memory0 = lem.memory.clone()
    x = unit_rows(B, d, device=device, dtype=dtype).requires_grad_(True)
    y = torch.randint(0, n, (B,), device=device)
    y[1] = y[0]  # a duplicate instance in the batch
    idx = torch.randint(0, n, (B, K + 1), device=device)
    out = lem(x, y, idx=idx)
    loss = criterion(out, y)
    loss.backward()
    ref_loss, ref_grad, ref_memory, ref_z = lemniscate_nce_step(memory0, x, y, idx, K, T32, MOMENTUM)
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    assert lem.params[2].item() == pytest.approx(ref_z, rel=1e-6)
    assert relative_error(loss, ref_loss) < tol
    assert relative_error(x.grad, ref_grad) < tol
    assert relative_error(lem.memory, ref_memory) < tol
    # Z stays fixed on the next batch; the step uses the updated memory
    x2 = unit_rows(B, d, device=device, dtype=dtype).requires_grad_(True)
    idx2 = torch.randint(0, n, (B, K + 1), device=device)
    memory1 = lem.memory.clone()
    loss2 = criterion(lem(x2, y, idx=idx2), y)
    loss2.backward()
    ref_loss2, ref_grad2, ref_memory2, _ = lemniscate_nce_step(memory1, x2, y, idx2, K, T32, MOMENTUM, Z=ref_z)
    assert relative_error(loss2, ref_loss2) < tol
    assert relative_error(x2.grad, ref_grad2) < tol
    assert relative_error(lem.memory, ref_memory2) < tol


@pytest.fixture
def default_dtype(request):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(request.param)
    yield request.param
    torch.set_default_dtype(previous)


@pytest.mark.parametrize("default_dtype", [torch.float64, torch.float32], indirect=True)
def test_drop_ins_take_t_from_their_params_buffer_like_lemniscate(default_dtype):
    """lemniscate builds `params` and `memory` in torch's default dtype and reads T as
    params[1].item(): float32(T) under the default float32, T exactly under float64. The
    drop-ins do the same, so both match lemniscate to rounding (float64: 1e-13; a T rounded to
    float32 would be ~1e-8 off)."""
    torch.manual_seed(5)
    B, d, n, K = 6, 24, 200, 31
    lem = NCEAverage(d, n, K, T, MOMENTUM)
    assert lem.params.dtype == default_dtype and lem.memory.dtype == default_dtype
    t_lem = lem.params[1].item()
    assert t_lem == (T if default_dtype == torch.float64 else T32) and lem.T == t_lem
    memory0 = lem.memory.clone()
    x = unit_rows(B, d, dtype=default_dtype).requires_grad_(True)
    y = torch.randint(0, n, (B,))
    idx = torch.randint(0, n, (B, K + 1))
    loss = NCECriterion(n)(lem(x, y, idx=idx), y)
    loss.backward()
    ref_loss, ref_grad, ref_memory, _ = lemniscate_nce_step(memory0, x, y, idx, K, t_lem, MOMENTUM)
    tol = 1e-13 if default_dtype == torch.float64 else 2e-5
    assert relative_error(loss, ref_loss) < tol
    assert relative_error(x.grad, ref_grad) < tol
    assert relative_error(lem.memory, ref_memory) < tol

    lin = LinearAverage(d, n, T, MOMENTUM)
    assert lin.params.dtype == default_dtype and lin.T == lin.params[0].item()
    xl = x.detach().clone().requires_grad_(True)
    ref = xl.detach() @ lin.memory.t() / lin.params[0].item()  # lemniscate: mm(x, memory.t()).div_(T)
    assert relative_error(lin(xl, y), ref) < (1e-15 if default_dtype == torch.float64 else 1e-6)


def test_drop_ins_reread_params_after_conversion_and_loading():
    lem = NCEAverage(8, 50, 10, T, MOMENTUM)
    assert lem.T == T32
    lem.double()  # the float32 buffer's value, now in float64: still float32(T), as lemniscate would read it
    assert lem.params.dtype == torch.float64 and lem.T == T32
    other = NCEAverage(8, 50, 10, 0.2, 0.3)
    other.load_state_dict(lem.state_dict())
    assert (other.T, other.momentum) == (T32, MOMENTUM)
    lin = LinearAverage(8, 50, 0.2, 0.3)
    lin.load_state_dict(LinearAverage(8, 50, T, MOMENTUM).state_dict())
    assert (lin.T, lin.momentum) == (T32, MOMENTUM)


def test_nce_average_samples_and_overwrites_column_zero():
    torch.manual_seed(2)
    lem = NCEAverage(8, 50, 10)
    x = unit_rows(4, 8, dtype=torch.float32)
    y = torch.tensor([3, 7, 7, 49])
    with torch.no_grad():
        out = lem(x, y)
    assert out.shape == (4, 11)
    expected_pos = (lem.memory[y] * x).sum(1).div(T32).exp() / lem.params[2]
    assert torch.allclose(out[:, 0], expected_pos, rtol=1e-5)


def test_nce_average_no_update_without_grad():
    lem = NCEAverage(8, 50, 10)
    before = lem.memory.clone()
    with torch.no_grad():
        lem(unit_rows(4, 8, dtype=torch.float32), torch.tensor([1, 2, 3, 4]))
    assert torch.equal(before, lem.memory)


def test_linear_average_with_cross_entropy_equals_lemniscate(device):
    torch.manual_seed(3)
    B, d, n = 5, 16, 40
    lem = LinearAverage(d, n, T, MOMENTUM).to(device=device, dtype=torch.float64)
    memory0 = lem.memory.clone()
    x = unit_rows(B, d, device=device).requires_grad_(True)
    y = torch.randint(0, n, (B,), device=device)
    loss = F.cross_entropy(lem(x, y), y)
    loss.backward()
    xr = x.detach().clone().requires_grad_(True)
    ref_loss = F.cross_entropy(xr @ memory0.t() / T32, y)
    ref_loss.backward()
    pos = memory0[y] * MOMENTUM + x.detach() * (1 - MOMENTUM)
    ref_memory = memory0.clone().index_copy_(0, y, pos / pos.norm(dim=1, keepdim=True))
    assert relative_error(loss, ref_loss) < 1e-12
    assert relative_error(x.grad, xr.grad) < 1e-12
    assert relative_error(lem.memory, ref_memory) < 1e-12


def test_npid_loss_equals_nce_average_with_same_z_and_idx(device):
    torch.manual_seed(4)
    B, d, n, K = 8, 32, 300, 63
    fused = NPIDLoss(n, d, K, T, MOMENTUM, device=device)
    lem = NCEAverage(d, n, K, T, MOMENTUM).to(device)
    lem.memory.copy_(fused.memory)
    x = unit_rows(B, d, device=device, dtype=torch.float32)
    y = torch.randperm(n, device=device)[:B]
    idx = torch.randint(0, n, (B, K + 1), device=device)
    idx[:, 0] = y
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    loss_a = fused(xa, y, idx=idx)
    loss_a.backward()
    loss_b = NCECriterion(n)(lem(xb, y, idx=idx), y)
    loss_b.backward()
    assert fused.z.item() == pytest.approx(lem.params[2].item(), rel=1e-5)
    assert relative_error(loss_a, loss_b) < 1e-5
    assert relative_error(xa.grad, xb.grad) < 1e-5
    assert relative_error(fused.memory, lem.memory) < 1e-6


@pytest.mark.parametrize("loss", ["nce", "softmax-ce", "softmax"])
def test_npid_loss_matches_reference_step(device, loss):
    torch.manual_seed(5)
    B, d, n, K = 6, 20, 100, 15
    module = NPIDLoss(n, d, K, T, MOMENTUM, loss=loss, device=device)
    memory0 = module.memory.clone()
    x = unit_rows(B, d, device=device, dtype=torch.float32).requires_grad_(True)
    y = torch.randint(0, n, (B,), device=device)
    rng_state0 = module.rng_state.clone()
    out = module(x, y)
    out.backward()
    idx = R.sample_negatives(y.cpu(), rng_state0.cpu(), n, K).to(device)
    xr = x.detach().double().requires_grad_(True)
    bank = memory0.double()
    if loss == "nce":
        z = R.estimate_z(R.nce_scores(xr.detach(), bank, idx, T), n)
        ref = R.nce_loss(xr, bank, y, idx, z, T).mean()
    elif loss == "softmax-ce":
        ref = R.softmax_ce_loss(xr, bank, y, idx, T).mean()
    else:
        ref = R.full_softmax_loss(xr, bank, y, T).mean()
    ref.backward()
    assert relative_error(out, ref) < 1e-5
    assert relative_error(x.grad, xr.grad) < 1e-5
    assert relative_error(module.memory, R.momentum_update(memory0, x.detach(), y, MOMENTUM)) < 1e-6
    if loss != "softmax":
        assert module.rng_state[1].item() == rng_state0[1].item() + 1


@pytest.mark.parametrize("z_mode", ["ema", "batch"])
def test_npid_loss_z_modes_match_reference(z_mode):
    """Three steps against the float64 reference. ema: the step's loss uses the Z from before the
    step (the first step: lemniscate's first-batch estimate), then Z <- a Z + (1 - a) n mean exp(s_k)
    over the step's B*K noise scores. batch: Z = n mean exp(s_k) over the step's own noise scores."""
    torch.manual_seed(5)
    B, d, n, K, alpha = 6, 20, 100, 15, 0.8
    module = NPIDLoss(n, d, K, T, MOMENTUM, loss="nce", z_mode=z_mode, z_momentum=alpha)
    z_ref = None
    for step in range(3):
        memory0, rng0 = module.memory.clone().double(), module.rng_state.clone()
        x = unit_rows(B, d, dtype=torch.float32).requires_grad_(True)
        y = torch.randint(0, n, (B,))
        out = module(x, y)
        out.backward()
        idx = R.sample_negatives(y, rng0, n, K)
        xr = x.detach().double().requires_grad_(True)
        estimate = n * R.noise_exp_sum(xr.detach(), memory0, idx, T).sum() / (B * K)
        if z_mode == "batch":
            z_used = estimate
        else:
            z_used = R.estimate_z(R.nce_scores(xr.detach(), memory0, idx, T), n) if z_ref is None else z_ref
        ref = R.nce_loss(xr, memory0, y, idx, z_used, T).mean()
        ref.backward()
        z_ref = R.z_ema(z_used, R.noise_exp_sum(xr.detach(), memory0, idx, T), B * K, n, alpha) \
            if z_mode == "ema" else estimate
        assert relative_error(out, ref) < 1e-5, step
        assert relative_error(x.grad, xr.grad) < 1e-5, step
        assert relative_error(module.z, z_ref) < 1e-6, step
    module.eval()  # no training step: ema leaves Z alone, batch sets it from the batch's own noise rows
    before, memory0, rng0 = module.z.clone(), module.memory.clone().double(), module.rng_state.clone()
    x, y = unit_rows(B, d, dtype=torch.float32), torch.arange(B)
    module(x, y)
    if z_mode == "ema":
        assert torch.equal(before, module.z)
    else:
        idx = R.sample_negatives(y, rng0, n, K)
        assert relative_error(module.z, n * R.noise_exp_sum(x.double(), memory0, idx, T).sum() / (B * K)) < 1e-6
        assert relative_error(module.z, before) > 1e-3  # not the last training step's Z kept


def test_npid_loss_z_mode_first_batch_keeps_z():
    module = NPIDLoss(100, 8, 10, T, MOMENTUM, loss="nce")
    assert module.z_mode == "first-batch"
    module(unit_rows(4, 8, dtype=torch.float32), torch.arange(4))
    z = module.z.clone()
    module(unit_rows(4, 8, dtype=torch.float32) * -1, torch.arange(4, 8))
    assert torch.equal(z, module.z)


@pytest.mark.parametrize("kwargs,match", [
    (dict(z_mode="running"), "z_mode must be one of"),
    (dict(z_mode="ema", z_momentum=1.0), r"z_momentum .* must be in \[0, 1\)"),
    (dict(z_mode="ema", z_momentum=-0.1), "z_momentum"),
    (dict(z=0.0), "z must be a positive finite number"),
    (dict(z=float("nan")), "z must be a positive finite number"),
])
def test_npid_loss_bad_z_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        NPIDLoss(100, 8, 10, **kwargs)


def test_npid_loss_eval_mode_leaves_bank_alone():
    module = NPIDLoss(50, 8, 5)
    module.eval()
    before = module.memory.clone()
    module(unit_rows(3, 8, dtype=torch.float32), torch.tensor([0, 1, 2]))
    assert torch.equal(before, module.memory)


def test_npid_loss_state_dict_round_trip():
    torch.manual_seed(6)
    a = NPIDLoss(120, 16, 10, seed=123)
    x = unit_rows(4, 16, dtype=torch.float32)
    y = torch.tensor([5, 6, 7, 8])
    a(x, y)
    state = copy.deepcopy(a.state_dict())
    assert set(state) == {"bank.memory", "z", "rng_state"}
    b = NPIDLoss(120, 16, 10, seed=999)
    b.load_state_dict(state)
    x2 = unit_rows(4, 16, dtype=torch.float32)
    assert torch.equal(a(x2, y), b(x2, y))  # same bank, Z and sampler stream
    assert torch.equal(a.memory, b.memory) and torch.equal(a.rng_state, b.rng_state)


def test_npid_loss_same_seed_reproducible_and_nce_loss_alias():
    assert NCELoss is NPIDLoss
    x = unit_rows(4, 16, dtype=torch.float32)
    y = torch.tensor([1, 2, 3, 4])
    torch.manual_seed(0)
    a = NPIDLoss(60, 16, 10, seed=5)
    torch.manual_seed(0)
    b = NPIDLoss(60, 16, 10, seed=5)
    assert torch.equal(a(x, y), b(x, y))


@pytest.mark.parametrize("bank_dtype", [torch.bfloat16, torch.float16])
def test_npid_loss_16bit_bank(bank_dtype):
    torch.manual_seed(7)
    module = NPIDLoss(500, 32, 50, bank_dtype=bank_dtype)
    x = unit_rows(8, 32, dtype=torch.float32).requires_grad_(True)
    y = torch.arange(8)
    loss = module(x, y)
    loss.backward()
    assert module.memory.dtype == bank_dtype and torch.isfinite(loss) and torch.isfinite(x.grad).all()
    assert torch.allclose(module.memory[y].float().norm(dim=1), torch.ones(8), atol=1e-2)


@pytest.mark.parametrize("loss", ["nce", "softmax-ce", "softmax"])
def test_npid_loss_compiles_fullgraph_with_same_results(loss):
    torch.manual_seed(8)
    B, d, n, K = 8, 16, 64, 12
    eager = NPIDLoss(n, d, K, loss=loss, seed=11)
    compiled_module = copy.deepcopy(eager)
    compiled = torch.compile(compiled_module, fullgraph=True, backend="aot_eager")
    for step in range(3):
        x = unit_rows(B, d, dtype=torch.float32)
        y = torch.randint(0, n, (B,))
        xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        la, lb = eager(xa, y), compiled(xb, y)
        la.backward()
        lb.backward()
        assert torch.allclose(la, lb, rtol=1e-6, atol=1e-7), step
        assert torch.allclose(xa.grad, xb.grad, rtol=1e-6, atol=1e-7)
        assert torch.equal(eager.memory, compiled_module.memory)
        assert torch.equal(eager.z, compiled_module.z) and torch.equal(eager.rng_state, compiled_module.rng_state)


def test_npid_loss_compiles_with_inductor():
    torch.manual_seed(9)
    eager = NPIDLoss(64, 16, 12, seed=3)
    compiled_module = copy.deepcopy(eager)
    compiled = torch.compile(compiled_module, fullgraph=True)
    x = unit_rows(8, 16, dtype=torch.float32)
    y = torch.randint(0, 64, (8,))
    for _ in range(2):
        assert torch.allclose(eager(x, y), compiled(x, y), rtol=1e-6)
    assert torch.equal(eager.memory, compiled_module.memory)


def test_alias_sampler_distribution():
    probs = torch.tensor([0.5, 0.25, 0.125, 0.125, 0.0])
    sampler = AliasSampler(probs)
    g = torch.Generator().manual_seed(0)
    draws = sampler.draw(200_000, generator=g)
    freq = torch.bincount(draws, minlength=5).double() / draws.numel()
    assert torch.allclose(freq, probs.double(), atol=5e-3)
    rows = sampler.draw_rows(torch.tensor([4, 1]), 7, generator=g)
    assert rows.shape == (2, 8) and rows[:, 0].tolist() == [4, 1]
    with pytest.raises(ValueError, match="probs"):
        AliasSampler(torch.tensor([1.0, -1.0]))


def test_parametric_instance_loss_is_cross_entropy_over_instance_ids():
    """Eq. 1 of the paper (with the non-parametric softmax's T): P(i|v) = softmax_i(W v / T),
    the loss -log P(y|v); written out in float64 against the module, gradients included."""
    torch.manual_seed(10)
    n, d, B = 40, 8, 6
    module = ParametricInstanceLoss(n, d, temperature=T, momentum=MOMENTUM).double()
    x = unit_rows(B, d, dtype=torch.float64).requires_grad_(True)
    y = torch.tensor([3, 0, 39, 3, 17, 8])
    W = module.weight.detach().clone().requires_grad_(True)
    logits = x @ W.t() / T
    expected = -(logits.gather(1, y[:, None]).squeeze(1) - logits.logsumexp(1)).mean()
    expected.backward()
    bank_before = module.memory.clone()
    loss = module(x, y)
    assert relative_error(loss.detach(), expected.detach()) < 1e-14
    x_grad = x.grad.clone()
    x.grad = None
    loss.backward()
    assert relative_error(x.grad, x_grad) < 1e-13 and relative_error(module.weight.grad, W.grad) < 1e-13
    assert torch.autograd.gradcheck(lambda f, w: F.cross_entropy(f @ w.t() / T, y), (x.detach().requires_grad_(True), W))
    # the feature record follows NPID's bank rule (the loss never reads it); untouched rows stay
    updated = R.momentum_update(bank_before.clone(), x.detach(), y, MOMENTUM)
    assert torch.allclose(module.memory, updated, rtol=1e-12, atol=1e-12)
    module.eval()
    before = module.memory.clone()
    module(x.detach(), y)
    assert torch.equal(before, module.memory)


def test_parametric_instance_loss_learns_and_refuses_bad_input():
    """SGD on W alone separates fixed random features: the loss falls well below log n; and bad
    input is refused in the caller's names before W or the record change."""
    torch.manual_seed(11)
    n, d = 64, 16
    module = ParametricInstanceLoss(n, d)
    x, y = unit_rows(n, d, dtype=torch.float32), torch.arange(n)
    opt = torch.optim.SGD(module.parameters(), lr=0.5, momentum=0.9)
    first = None
    for _ in range(50):
        loss = module(x, y)
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert first > 2.0 and loss.item() < 0.1 * first, (first, loss.item())
    state = {k: v.clone() for k, v in module.state_dict().items()}
    assert set(state) == {"weight", "bank.memory"}
    with pytest.raises(IndexError, match="indices"):
        module(x[:2], torch.tensor([0, n]))
    with pytest.raises(ValueError, match="features"):
        module(x[:2, :5], y[:2])
    with pytest.raises(ValueError, match="features holds NaN"):
        module(torch.full((2, d), float("nan")), y[:2])
    for key, value in module.state_dict().items():
        assert torch.equal(value, state[key]), key
    with pytest.raises(ValueError, match="temperature"):
        ParametricInstanceLoss(n, d, temperature=0.0)
