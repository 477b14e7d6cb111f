"""Bad input gets a clear error naming the argument, never a crash or a silent wrong
answer, and a failed call leaves the bank (and Z) exactly as they were."""
import pytest
import torch

from npid_kernels import LinearAverage, NCEAverage, NPIDLoss, ops

from conftest import unit_rows

T = 0.07


@pytest.fixture
def problem(device):
    g = torch.Generator().manual_seed(0)
    x = unit_rows(4, 16, generator=g, dtype=torch.float32).to(device)
    bank = unit_rows(50, 16, generator=g, dtype=torch.float32).to(device)
    y = torch.tensor([0, 5, 9, 49], device=device)
    idx = torch.randint(0, 50, (4, 8), generator=g).to(device)
    idx[:, 0] = y
    z = torch.tensor([50.0], device=device)
    rng = torch.tensor([1, 0], device=device)
    return x, bank, y, idx, z, rng


def nce(x, bank, y, idx, z, rng=None):
    return ops.npid.nce_loss(x, bank, y, idx, rng, z, 7, T)


# Each case: (description, callable taking the problem tuple, expected message regex).
CASES = [
    ("x int", lambda x, b, y, i, z, r: nce(x.long(), b, y, i, z), r"x must be float32 or float64"),
    ("x 1-D", lambda x, b, y, i, z, r: nce(x[0], b, y, i, z), r"x must be 2-D"),
    ("bank 3-D", lambda x, b, y, i, z, r: nce(x, b[None], y, i, z), r"bank must be 2-D"),
    ("bank int", lambda x, b, y, i, z, r: nce(x, b.int(), y, i, z), r"bank dtype must be"),
    ("bank float64 with x float32", lambda x, b, y, i, z, r: nce(x, b.double(), y, i, z), r"bank dtype must be"),
    ("dim mismatch", lambda x, b, y, i, z, r: nce(x[:, :15], b, y, i, z), r"bank rows have dim 16 but x has dim 15"),
    ("idx out of range", lambda x, b, y, i, z, r: nce(x, b, y, i.clone().fill_(50), z), r"idx holds row 50, outside the bank \[0, 50\)"),
    ("idx negative", lambda x, b, y, i, z, r: nce(x, b, y, i.clone().fill_(-3), z), r"idx holds row -3"),
    ("idx int32", lambda x, b, y, i, z, r: nce(x, b, y, i.int(), z), r"idx must be int64"),
    ("idx wrong batch", lambda x, b, y, i, z, r: nce(x, b, y, i[:3], z), r"idx has 3 rows but x has batch 4"),
    ("idx wrong K", lambda x, b, y, i, z, r: ops.npid.nce_loss(x, b, y, i, None, z, 9, T), r"idx has 8 columns but num_negatives \+ 1 = 10"),
    ("y out of range (sampling)", lambda x, b, y, i, z, r: nce(x, b, y + 1, None, z, r), r"y holds row 50"),
    ("y 2-D", lambda x, b, y, i, z, r: nce(x, b, y[:, None], i, z), r"y must be 1-D"),
    ("y wrong length", lambda x, b, y, i, z, r: nce(x, b, y[:2], i, z), r"y has 2 entries but x has batch 4"),
    ("neither idx nor rng_state", lambda x, b, y, i, z, r: nce(x, b, y, None, z), r"pass either idx or rng_state"),
    ("rng_state shape", lambda x, b, y, i, z, r: nce(x, b, y, None, z, r[:1]), r"rng_state must be a \(2,\) tensor"),
    ("rng_state float", lambda x, b, y, i, z, r: nce(x, b, y, None, z, r.float()), r"rng_state must be int64"),
    ("z unset", lambda x, b, y, i, z, r: nce(x, b, y, i, -z), r"z must be set"),
    ("n_data with in-kernel sampling", lambda x, b, y, i, z, r: ops.npid.nce_loss(x, b, y, None, r, z, 7, T, 100),
     r"n_data needs an explicit idx"),
    ("n_data 0", lambda x, b, y, i, z, r: ops.npid.nce_loss(x, b, y, i, None, z, 7, T, 0), r"n_data must be >= 1"),
    ("estimate z n_data 0", lambda x, b, y, i, z, r: ops.npid.nce_estimate_z_(-z, x, b, y, i, None, 7, T, 0),
     r"n_data must be >= 1"),
    ("z two elements", lambda x, b, y, i, z, r: nce(x, b, y, i, z.repeat(2)), r"z must hold one element"),
    ("temperature 0", lambda x, b, y, i, z, r: ops.npid.nce_loss(x, b, y, i, None, z, 7, 0.0), r"temperature must be positive"),
    ("scores idx out of range", lambda x, b, y, i, z, r: ops.nce_scores(x, b, i + 1, T), r"idx holds row 50"),
    ("softmax-ce idx out of range", lambda x, b, y, i, z, r: ops.npid.softmax_ce_loss(x, b, y, i.clone().fill_(99), None, 7, T), r"idx holds row 99"),
    ("full softmax y out of range", lambda x, b, y, i, z, r: ops.full_softmax_loss(x, b, y - 1, T), r"y holds row -1"),
    ("knn k > n", lambda x, b, y, i, z, r: ops.knn_topk(x, b, 51), r"k must be in \[1, n_data = 50\]"),
    ("knn k = 0", lambda x, b, y, i, z, r: ops.knn_topk(x, b, 0), r"k must be in"),
    ("full softmax precision", lambda x, b, y, i, z, r: ops.full_softmax_loss(x, b, y, T, "fp16"),
     r"precision must be 'fp32', 'tf32' or 'bf16', got 'fp16'"),
    ("knn precision", lambda x, b, y, i, z, r: ops.knn_topk(x, b, 3, "TF32"), r"precision must be .* got 'TF32'"),
    ("sample negatives K = 0", lambda x, b, y, i, z, r: ops.sample_negatives(y, r, 50, 0), r"num_negatives must be >= 1"),
    ("sample negatives y out of range", lambda x, b, y, i, z, r: ops.sample_negatives(y, r, 40, 3), r"y holds row 49"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_clear_error(problem, case):
    _, fn, message = case
    with pytest.raises(RuntimeError, match=message):
        fn(*problem)
        if problem[0].is_cuda:
            torch.cuda.synchronize()


@pytest.mark.parametrize("bad", ["y out of range", "y negative", "nan features", "inf features", "dim mismatch", "x int"])
def test_momentum_update_bad_input_leaves_bank_unchanged(problem, bad):
    x, bank, y, *_ = problem
    before = bank.clone()
    if bad == "y out of range":
        args, message = (x, torch.tensor([0, 1, 2, 50], device=x.device)), r"y\[3\] = 50 is outside the bank"
    elif bad == "y negative":
        args, message = (x, torch.tensor([-1, 1, 2, 3], device=x.device)), r"y\[0\] = -1"
    elif bad == "nan features":
        args, message = (torch.where(torch.arange(16, device=x.device) == 3, float("nan"), x), y), r"x holds NaN or inf"
    elif bad == "inf features":
        args, message = (x.clone().index_fill_(0, torch.tensor([2], device=x.device), float("inf")), y), r"x holds NaN or inf"
    elif bad == "dim mismatch":
        args, message = (x[:, :8], y), r"bank rows have dim 16 but x has dim 8"
    else:
        args, message = (x.long(), y), r"x must be float32 or float64"
    with pytest.raises(RuntimeError, match=message):
        ops.momentum_update_(bank, *args, 0.5)
    assert torch.equal(bank, before)


def test_momentum_update_zero_norm_row_is_an_error_not_nan(problem):
    x, bank, y, *_ = problem
    before = bank.clone()
    with pytest.raises(RuntimeError, match="zero norm"):
        ops.momentum_update_(bank, -bank[y], y, 0.5)  # 0.5 * row + 0.5 * (-row) = 0
    assert torch.equal(bank, before)


def test_momentum_update_needs_contiguous_bank(problem):
    x, bank, y, *_ = problem
    wide = torch.zeros(50, 32, device=bank.device)
    with pytest.raises(RuntimeError, match="bank must be contiguous"):
        ops.momentum_update_(wide[:, ::2], x, y, 0.5)


def test_momentum_out_of_range(problem):
    x, bank, y, *_ = problem
    with pytest.raises(RuntimeError, match="momentum must be in"):
        ops.momentum_update_(bank, x, y, 1.5)


def test_non_contiguous_inputs_work(problem):
    x, bank, y, idx, z, rng = problem
    xt = x.t().contiguous().t()
    bank_wide = torch.stack([bank, bank], dim=2).reshape(50, 32)[:, ::2]  # strided rows, same values
    idx_t = idx.t().contiguous().t()
    assert not (xt.is_contiguous() or bank_wide.is_contiguous() or idx_t.is_contiguous())
    expected = nce(x, bank, y, idx, z)[0]
    assert torch.equal(nce(xt, bank_wide, y, idx_t, z)[0], expected)
    assert torch.equal(ops.nce_scores(xt, bank_wide, idx_t, T), ops.nce_scores(x, bank, idx, T))
    assert torch.equal(ops.knn_topk(xt, bank_wide, 3)[1], ops.knn_topk(x, bank, 3)[1])


def test_nan_first_batch_leaves_z_unset(problem):
    x, bank, y, idx, z, rng = problem
    z = torch.tensor([-1.0], device=x.device)
    with pytest.raises(RuntimeError, match="NaN or inf"):
        ops.nce_estimate_z_(z, x * float("nan"), bank, y, idx=idx, num_negatives=7, temperature=T)
    assert z.item() == -1.0


@pytest.mark.parametrize("loss", ["nce", "softmax-ce", "softmax"])
def test_npid_loss_nan_features_error_and_state_untouched(loss):
    module = NPIDLoss(50, 16, 7, loss=loss)
    module(unit_rows(4, 16, dtype=torch.float32), torch.tensor([1, 2, 3, 4]))  # sets Z
    state = {k: v.clone() for k, v in module.state_dict().items()}
    x = unit_rows(4, 16, dtype=torch.float32)
    x[1, 3] = float("nan")
    with pytest.raises(ValueError, match="features holds NaN or inf"):
        module(x, torch.tensor([1, 2, 3, 4]))
    for key, value in module.state_dict().items():
        assert torch.equal(value, state[key]), key


@pytest.mark.parametrize("module_fn,x_name,y_name", [
    (lambda: NPIDLoss(50, 16, 7), "features", "indices"),
    (lambda: NCEAverage(16, 50, 7), "x", "y"),
    (lambda: LinearAverage(16, 50), "x", "y"),
], ids=["NPIDLoss", "NCEAverage", "LinearAverage"])
def test_modules_reject_bad_batches(module_fn, x_name, y_name):
    """Errors name the module's own arguments (forward(features, indices) / forward(x, y))."""
    module = module_fn()
    x = unit_rows(4, 16, dtype=torch.float32)
    with pytest.raises(ValueError, match=f"{x_name} is an empty batch"):
        module(x[:0], torch.zeros(0, dtype=torch.int64))
    with pytest.raises(ValueError, match=rf"^{x_name} must have shape \(batch, 16\)"):
        module(x[:, :8], torch.arange(4))
    with pytest.raises(ValueError, match=rf"^{y_name} must have shape \(4,\), got \(3,\)"):
        module(x, torch.arange(3))


@pytest.mark.parametrize("K", [50, 51, 0])
def test_k_must_be_below_n(K):
    with pytest.raises(ValueError, match=r"K \(num_negatives\) must be in \[1, num_data = 50\)"):
        NPIDLoss(50, 16, K)
    with pytest.raises(ValueError, match=r"K \(num_negatives\)"):
        NCEAverage(16, 50, K)


def test_npid_loss_bad_arguments():
    with pytest.raises(ValueError, match="loss must be one of"):
        NPIDLoss(50, 16, 7, loss="hinge")
    with pytest.raises(ValueError, match="temperature must be positive"):
        NPIDLoss(50, 16, 7, temperature=0)
    with pytest.raises(ValueError, match="momentum must be in"):
        NPIDLoss(50, 16, 7, momentum=2)
    with pytest.raises(ValueError, match="precision must be one of"):
        NPIDLoss(50, 16, 7, loss="softmax", precision="fp16")
    with pytest.raises(ValueError, match="applies to loss='softmax'"):
        NPIDLoss(50, 16, 7, loss="nce", precision="bf16")


def test_npid_loss_out_of_range_indices_leave_bank_unchanged():
    module = NPIDLoss(50, 16, 7)
    before = module.memory.clone()
    with pytest.raises(IndexError, match=r"^indices holds row 50, outside the bank \[0, 50\)"):
        module(unit_rows(2, 16, dtype=torch.float32), torch.tensor([3, 50]))
    assert torch.equal(module.memory, before)
