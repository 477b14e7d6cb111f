"""A sweep of every public entry point with bad input: wrong dtype, device, shape, out-of-range
row, NaN, empty batch, k >= n, non-tensor. Each error names the argument the caller passed, in
the caller's own API (NPIDLoss: features/indices; the lemniscate drop-ins: x/y; idx only for an
idx the caller passed; kNN: query/bank/bank_labels/query_labels/k), and a refused call leaves
the module's state (bank, Z, sampler) exactly as it was. Non-contiguous input is not an error.
The ops' own checks (dtype, shape, rows, rng_state, Z, temperature, k, precision) get a clear
error, never a crash or a silent wrong answer, and a failed call leaves the bank (and Z) exactly
as they were; so do the modules' constructors.

The wrong device is a "meta" tensor, so the device checks run on CPU-only machines too."""
import re

import pytest
import torch

from npid_kernels import (AliasSampler, LinearAverage, MemoryBank, NCEAverage, NCECriterion, NPIDLoss,
                          knn_evaluate, knn_predict, nearest_neighbors, ops)
from npid_kernels.distributed import (DistributedNPIDLoss, distributed_knn_evaluate, distributed_knn_predict,
                                      distributed_knn_topk)
from npid_kernels.baselines import SupervisedLoss

from conftest import unit_rows

N, D, K, B = 50, 16, 7, 4
T = 0.07


def modules(device):
    """(id, module, forward taking (features, indices, idx) and running backward, names of its
    (features, indices) arguments, whether it takes idx)."""
    def npid(loss, cls=NPIDLoss, **kw):
        return cls(N, D, K, loss=loss, seed=0, device=device, **kw)

    def loss_call(m):
        def call(f, i, idx=None):
            out = m(f, i, idx=idx) if idx is not None else m(f, i)
            out.backward()
        return call

    def drop_in_call(m, takes_idx):
        def call(f, i, idx=None):
            out = m(f, i, idx=idx) if takes_idx and idx is not None else m(f, i)
            out.sum().backward()  # the drop-ins update the bank in backward
        return call

    out = []
    for loss in ("nce", "softmax-ce", "softmax"):
        m = npid(loss)
        out.append((f"NPIDLoss-{loss}", m, loss_call(m), ("features", "indices"), loss != "softmax"))
    for mode in ("replicated", "sharded"):
        m = npid("nce", DistributedNPIDLoss, mode=mode)
        out.append((f"DistributedNPIDLoss-{mode}", m, loss_call(m), ("features", "indices"), True))
    m = NCEAverage(D, N, K).to(device)
    out.append(("NCEAverage", m, drop_in_call(m, True), ("x", "y"), True))
    m = LinearAverage(D, N).to(device)
    out.append(("LinearAverage", m, drop_in_call(m, False), ("x", "y"), False))
    m = SupervisedLoss(torch.arange(N) % 5, 5, D, device=device)
    out.append(("SupervisedLoss", m, loss_call(m), ("features", "indices"), False))
    bank = MemoryBank(N, D, device=device)
    out.append(("MemoryBank.update_", bank, lambda f, i, idx=None: bank.update_(f.detach() if torch.is_tensor(f) else f, i),
                ("features", "indices"), False))
    return out


MODULE_IDS = ["NPIDLoss-nce", "NPIDLoss-softmax-ce", "NPIDLoss-softmax", "DistributedNPIDLoss-replicated",
              "DistributedNPIDLoss-sharded", "NCEAverage", "LinearAverage", "SupervisedLoss", "MemoryBank.update_"]


def batch(device):
    g = torch.Generator().manual_seed(3)
    x = unit_rows(B, D, dtype=torch.float32, generator=g).to(device).requires_grad_(True)
    y = torch.tensor([0, 5, 9, N - 1], device=device)
    idx = torch.randint(0, N, (B, K + 1), generator=g).to(device)
    idx[:, 0] = y
    return x, y, idx


def nan_at(x, b, j):
    x = x.detach().clone()
    x[b, j] = float("nan")
    return x.requires_grad_(True)


# (id, function of (x, y, idx) -> (features, indices, idx), exception, message with {f} {i} placeholders)
BATCH_CASES = [
    ("features-int", lambda x, y, i: (x.detach().long(), y, None), ValueError, "{f} must be a floating-point tensor"),
    ("features-1d", lambda x, y, i: (x.detach()[0], y, None), ValueError, r"{f} must have shape \(batch, 16\)"),
    ("features-dim", lambda x, y, i: (x.detach()[:, :15], y, None), ValueError, r"{f} must have shape \(batch, 16\), got \(4, 15\)"),
    ("features-empty", lambda x, y, i: (x.detach()[:0], y[:0], None), ValueError, "{f} is an empty batch"),
    ("features-nan", lambda x, y, i: (nan_at(x, 2, 3), y, None), ValueError, "{f} holds NaN or inf"),
    ("features-inf", lambda x, y, i: (x.detach() / 0.0, y, None), ValueError, "{f} holds NaN or inf"),
    ("features-device", lambda x, y, i: (torch.empty(B, D, device="meta"), y, None), ValueError,
     "{f} is on meta but the module's bank is on"),
    ("features-list", lambda x, y, i: (x.tolist(), y, None), TypeError, "{f} must be a torch.Tensor, got list"),
    ("indices-int32", lambda x, y, i: (x, y.int(), None), ValueError, r"{i} must be int64 \(torch.long\), got torch.int32"),
    ("indices-float", lambda x, y, i: (x, y.float(), None), ValueError, "{i} must be int64"),
    ("indices-short", lambda x, y, i: (x, y[:3], None), ValueError, r"{i} must have shape \(4,\), got \(3,\)"),
    ("indices-2d", lambda x, y, i: (x, y[:, None], None), ValueError, r"{i} must have shape \(4,\), got \(4, 1\)"),
    ("indices-n", lambda x, y, i: (x, y.clone().fill_(N), None), IndexError, r"{i} holds row 50, outside the bank \[0, 50\)"),
    ("indices-500", lambda x, y, i: (x, torch.tensor([1, 500, 2, 3], device=y.device), None), IndexError, "{i} holds row 500"),
    ("indices-negative", lambda x, y, i: (x, y - 1, None), IndexError, "{i} holds row -1"),
    ("indices-device", lambda x, y, i: (x, torch.empty(B, dtype=torch.int64, device="meta"), None), ValueError,
     "{i} is on meta but {f} is on"),
    ("indices-list", lambda x, y, i: (x, y.tolist(), None), TypeError, "{i} must be a torch.Tensor"),
]

IDX_CASES = [
    ("idx-shape", lambda x, y, i: (x, y, i[:, :5]), ValueError, r"idx must have shape \(4, 8\), got \(4, 5\)"),
    ("idx-batch", lambda x, y, i: (x, y, i[:3]), ValueError, r"idx must have shape \(4, 8\), got \(3, 8\)"),
    ("idx-int32", lambda x, y, i: (x, y, i.int()), ValueError, "idx must be int64"),
    # The ops check idx's rows in their own pass (RuntimeError), DistributedNPIDLoss before fetching (IndexError)
    ("idx-row", lambda x, y, i: (x, y, torch.cat([i[:, :1], i[:, 1:].clone().fill_(N + 7)], 1)),
     (IndexError, RuntimeError), r"idx holds row 57, outside the bank \[0, 50\)"),
    ("idx-negative", lambda x, y, i: (x, y, torch.cat([i[:, :1], i[:, 1:] - N], 1)), (IndexError, RuntimeError),
     "idx holds row -"),
    ("idx-device", lambda x, y, i: (x, y, torch.empty(B, K + 1, dtype=torch.int64, device="meta")), ValueError,
     "idx is on meta but {f} is on"),
]


def snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_unchanged(module, before, what):
    after = module.state_dict()
    assert after.keys() == before.keys()
    for key, value in before.items():
        assert torch.equal(after[key], value), f"{what}: {key} changed by a refused call"


@pytest.mark.parametrize("case", BATCH_CASES + IDX_CASES, ids=[c[0] for c in BATCH_CASES + IDX_CASES])
def test_modules_refuse_bad_batches_in_their_own_words(device, case):
    name, make, error, message = case
    x, y, idx = batch(device)
    for module_id, module, call, (f, i), takes_idx in modules(device):
        if name.startswith("idx") and not takes_idx:
            continue
        call(x, y, idx if takes_idx else None)  # a valid step first (sets Z), then the bad one
        before = snapshot(module)
        features, indices, bad_idx = make(x, y, idx)
        pattern = "^" + message.format(f=f, i=i)
        with pytest.raises(error, match=pattern) as info:
            call(features, indices, bad_idx if bad_idx is not None else (idx if takes_idx else None))
        not_passed = {"features", "indices", "x", "y", "idx"} - {f, i} - ({"idx"} if name.startswith("idx") else set())
        named = set(re.findall(r"\b(features|indices|x|y|idx)\b", str(info.value)))
        assert not named & not_passed, f"{module_id}: {info.value!r} names an argument the caller did not pass"
        assert_unchanged(module, before, module_id)


def test_the_issue_examples():
    """The issue's three: y outside the bank, y of the wrong length (drop-ins), and
    LinearAverage's y no longer left to cross_entropy."""
    x = unit_rows(9, D, dtype=torch.float32)
    lem = NCEAverage(D, 500, K)
    with pytest.raises(IndexError, match=r"^y holds row 500, outside the bank \[0, 500\)$"):
        lem(x, torch.full((9,), 500))
    with pytest.raises(ValueError, match=r"^y must have shape \(9,\), got \(8,\)$"):
        lem(x, torch.arange(8))
    with pytest.raises(IndexError, match=r"^y holds row 501, outside the bank \[0, 500\)$"):
        LinearAverage(D, 500)(x, torch.full((9,), 501))
    with pytest.raises(IndexError, match=r"^indices holds row 500"):
        NPIDLoss(500, D, K)(x, torch.full((9,), 500))


def test_npid_loss_idx_must_hold_the_positives_and_applies_to_sampled_losses():
    x, y, idx = batch("cpu")
    module = NPIDLoss(N, D, K, seed=0)
    before = snapshot(module)
    bad = idx.clone()
    bad[2, 0] = 11
    with pytest.raises(ValueError, match=r"^idx\[:, 0\] must equal indices \(the positives\): idx\[2, 0\] = 11 "
                                         r"but indices\[2\] = 9"):
        module(x, y, idx=bad)
    assert_unchanged(module, before, "NPIDLoss")
    with pytest.raises(ValueError, match="idx applies to loss='nce' and 'softmax-ce'"):
        NPIDLoss(N, D, K, loss="softmax")(x, y, idx=idx)
    # The drop-in overwrites column 0 with y, as lemniscate does: any column 0 is accepted.
    lem = NCEAverage(D, N, K)
    bad[:, 0] = -1
    assert lem(x, y, idx=bad).shape == (B, K + 1)


def test_bank_dtype_mismatch_names_the_callers_argument():
    x, y, _ = batch("cpu")
    with pytest.raises(ValueError, match=r"^features is torch.float64 but the module's bank is torch.float32"):
        NPIDLoss(N, D, K)(x.double(), y)
    with pytest.raises(ValueError, match=r"^x is torch.float64 but the module's bank is torch.float32"):
        NCEAverage(D, N, K)(x.double(), y)
    bank = NPIDLoss(N, D, K, bank_dtype=torch.bfloat16)
    assert torch.isfinite(bank(x.double(), y))  # a bf16 bank takes float64 features


def test_non_contiguous_batches_give_the_contiguous_result(device):
    x, y, idx = batch(device)
    wide = torch.stack([x.detach(), x.detach()], 2).reshape(B, 2 * D)[:, ::2]
    y_wide = torch.stack([y, y], 1).reshape(-1)[::2]
    idx_t = idx.t().contiguous().t()
    assert not (wide.is_contiguous() or y_wide.is_contiguous() or idx_t.is_contiguous())
    for (module_id, m1, call1, _, takes_idx), (_, m2, call2, _, _) in zip(modules(device), modules(device)):
        m2.load_state_dict(m1.state_dict())
        call1(x.detach().clone().requires_grad_(True), y, idx if takes_idx else None)
        call2(wide.requires_grad_(True), y_wide, idx_t if takes_idx else None)
        for key, value in m1.state_dict().items():
            assert torch.equal(value, m2.state_dict()[key]), (module_id, key)
        wide = wide.detach()


def test_nce_criterion_refuses_what_nce_average_cannot_output():
    crit = NCECriterion(N)
    with pytest.raises(ValueError, match=r"^x must be NCEAverage's output"):
        crit(torch.rand(4))
    with pytest.raises(ValueError, match=r"^x must be NCEAverage's output"):
        crit(torch.rand(0, 8))
    with pytest.raises(ValueError, match=r"^x must be NCEAverage's output"):
        crit(torch.rand(4, 1))
    with pytest.raises(TypeError, match=r"^x must be a torch.Tensor"):
        crit([[0.1, 0.2]])


def test_alias_sampler_draw_rows_checks_y():
    sampler = AliasSampler(torch.ones(N))
    with pytest.raises(IndexError, match=r"^y holds row 50, outside the bank \[0, 50\)"):
        sampler.draw_rows(torch.tensor([1, 50]), K)
    with pytest.raises(ValueError, match=r"^y must be int64"):
        sampler.draw_rows(torch.tensor([1.0, 2.0]), K)
    with pytest.raises(ValueError, match=r"^num_negatives must be >= 1, got 0"):
        sampler.draw_rows(torch.tensor([1, 2]), 0)


# ---------------------------------------------------------------- kNN, local and distributed (world size 1)

def knn_problem(device):
    g = torch.Generator().manual_seed(4)
    bank = unit_rows(N, D, dtype=torch.float32, generator=g).to(device)
    query = unit_rows(6, D, dtype=torch.float32, generator=g).to(device)
    labels = torch.randint(0, 3, (N,), generator=g).to(device)
    query_labels = torch.randint(0, 3, (6,), generator=g).to(device)
    return query, bank, labels, query_labels


KNN_ENTRIES = {
    "nearest_neighbors": lambda q, b, l, ql, k: nearest_neighbors(q, b, k),
    "MemoryBank.nearest_neighbors": None,  # built in the test (its bank is its own)
    "knn_predict": lambda q, b, l, ql, k: knn_predict(q, b, l, 3, k=k),
    "knn_evaluate": lambda q, b, l, ql, k: knn_evaluate(q, ql, b, l, 3, k=k),
    "distributed_knn_topk": lambda q, b, l, ql, k: distributed_knn_topk(q, b, k),
    "distributed_knn_predict": lambda q, b, l, ql, k: distributed_knn_predict(q, b, l, 3, k=k),
    "distributed_knn_evaluate": lambda q, b, l, ql, k: distributed_knn_evaluate(q, ql, b, l, 3, k=k),
    "distributed_knn_topk-sharded": lambda q, b, l, ql, k: distributed_knn_topk(q, b, k, bank_offset=0),
}

KNN_CASES = [
    ("query-int", lambda q, b, l, ql, k: (q.long(), b, l, ql, k), ValueError, "query must be a floating-point tensor"),
    ("query-dim", lambda q, b, l, ql, k: (q[:, :5], b, l, ql, k), ValueError, r"query must have shape \(batch, 16\)"),
    ("query-nan", lambda q, b, l, ql, k: (q.clone().fill_(float("nan")), b, l, ql, k), ValueError, "query holds NaN or inf"),
    ("query-device", lambda q, b, l, ql, k: (torch.empty(6, D, device="meta"), b, l, ql, k), ValueError,
     "query is on meta but bank is on"),
    ("query-list", lambda q, b, l, ql, k: (q.tolist(), b, l, ql, k), TypeError, "query must be a torch.Tensor"),
    ("bank-nan", lambda q, b, l, ql, k: (q, b.clone().fill_(float("nan")), l, ql, k), ValueError, "bank holds NaN or inf"),
    ("k-0", lambda q, b, l, ql, k: (q, b, l, ql, 0), ValueError, r"k must be (in \[1, n_data = 50\]|>= 1), got 0"),
    ("k-n+1", lambda q, b, l, ql, k: (q, b, l, ql, N + 1), ValueError, r"k must be in \[1, n_data = 50\], got 51"),
    ("k-float", lambda q, b, l, ql, k: (q, b, l, ql, 2.5), TypeError, "k must be an int, got float"),
]
LABEL_CASES = [
    ("bank_labels-range", lambda q, b, l, ql, k: (q, b, l + 3, ql, k), ValueError, r"bank_labels must be in \[0, num_classes = 3\)"),
    ("bank_labels-float", lambda q, b, l, ql, k: (q, b, l.float(), ql, k), ValueError, "bank_labels must be an integer tensor"),
    ("bank_labels-short", lambda q, b, l, ql, k: (q, b, l[:10], ql, k), ValueError, "bank"),
]
QUERY_LABEL_CASES = [
    ("query_labels-range", lambda q, b, l, ql, k: (q, b, l, ql.clone().fill_(-1), k), ValueError, r"query_labels must be in \[0, num_classes = 3\)"),
    ("query_labels-short", lambda q, b, l, ql, k: (q, b, l, ql[:2], k), ValueError, r"query_labels must have shape \(6,\)"),
]


def knn_combinations():
    """(entry, case) pairs where the entry takes the argument the case spoils."""
    out = []
    for entry in KNN_ENTRIES:
        takes_labels = entry in ("knn_predict", "knn_evaluate", "distributed_knn_predict", "distributed_knn_evaluate")
        for case in KNN_CASES + (LABEL_CASES if takes_labels else []) + \
                (QUERY_LABEL_CASES if entry.endswith("evaluate") else []):
            if entry == "distributed_knn_topk-sharded" and case[0] == "k-n+1":
                continue  # a shard's search takes any k >= 1 (the other ranks' rows count too)
            if entry == "MemoryBank.nearest_neighbors" and case[0].startswith("bank"):
                continue  # the module's own bank
            out.append(pytest.param(entry, case, id=f"{entry}-{case[0]}"))
    return out


@pytest.mark.parametrize("entry,case", knn_combinations())
def test_knn_entry_points_refuse_bad_input(device, entry, case):
    name, make, error, message = case
    q, b, l, ql = knn_problem(device)
    assert KNN_ENTRIES[entry] is None or KNN_ENTRIES[entry](q, b, l, ql, 5) is not None  # valid input works
    args = make(q, b, l, ql, 5)
    if entry == "MemoryBank.nearest_neighbors":
        bank = MemoryBank(N, D, device=device)
        before = bank.memory.clone()
        with pytest.raises(error, match="^" + message):
            bank.nearest_neighbors(args[0], args[4])
        assert torch.equal(bank.memory, before)
        return
    with pytest.raises(error, match="^" + message):
        KNN_ENTRIES[entry](*args)


def test_knn_non_contiguous_and_empty_queries(device):
    q, b, l, ql = knn_problem(device)
    qt, bt = q.t().contiguous().t(), torch.stack([b, b], 2).reshape(N, 2 * D)[:, ::2]
    assert not (qt.is_contiguous() or bt.is_contiguous())
    assert torch.equal(nearest_neighbors(qt, bt, 5)[1], nearest_neighbors(q, b, 5)[1])
    # the same neighbours; the GEMM blocks a strided bank differently, so the sums may differ in the last bits
    torch.testing.assert_close(knn_predict(qt, bt, l, 3, k=5), knn_predict(q, b, l, 3, k=5), rtol=1e-5, atol=0)
    assert nearest_neighbors(q[:0], b, 5)[1].shape == (0, 5)
    assert distributed_knn_evaluate(q[:0], ql[:0], b, l, 3, k=5)["knn_top1"] == 0.0


# ---------------------------------------------------------------- the ops (their own argument names)

def ops_calls(x, bank, y, idx):
    z = torch.tensor([50.0], device=x.device)
    rng = torch.tensor([1, 0], device=x.device)
    return {
        "nce_scores": lambda: ops.nce_scores(x, bank, idx, 0.07),
        "nce_loss": lambda: ops.nce_loss(x, bank, y, z, idx=idx, num_negatives=K),
        "nce_loss-sampling": lambda: ops.nce_loss(x, bank, y, z, rng_state=rng, num_negatives=K),
        "softmax_ce_loss": lambda: ops.softmax_ce_loss(x, bank, y, idx=idx, num_negatives=K),
        "full_softmax_loss": lambda: ops.full_softmax_loss(x, bank, y),
        "nce_estimate_z_": lambda: ops.nce_estimate_z_(torch.tensor([-1.0], device=x.device), x, bank, y, idx=idx,
                                                       num_negatives=K),
        "momentum_update_": lambda: ops.momentum_update_(bank, x, y, 0.5),
    }


@pytest.mark.parametrize("op", list(ops_calls(*[torch.zeros(1)] * 4)))
def test_ops_refuse_non_finite_features(device, op):
    x, y, idx = batch(device)
    x = nan_at(x, 1, 2).detach()
    bank = unit_rows(N, D, dtype=torch.float32).to(device)
    before = bank.clone()
    name = "x"
    # nce_estimate_z_'s own (C++) message: "x (or bank) holds NaN or inf features: ... z left unset"
    with pytest.raises((ValueError, RuntimeError), match=rf"^{name}( \(or bank\))? holds NaN or inf"):
        ops_calls(x, bank, y, idx)[op]()
        if x.is_cuda:
            torch.cuda.synchronize()
    assert torch.equal(bank, before)


TAKES = {"nce_scores": ("bank", "idx"), "nce_loss-sampling": ("bank", "y"), "full_softmax_loss": ("bank", "y"),
         "momentum_update_": ("bank", "y")}


@pytest.mark.parametrize("op,which", [(op, which) for op in ops_calls(*[torch.zeros(1)] * 4)
                                      for which in TAKES.get(op, ("bank", "y", "idx"))])
def test_ops_refuse_a_meta_tensor_among_real_ones(which, op):
    """A meta tensor sends the call to the fake kernel, which returned uninitialised memory."""
    x, y, idx = batch("cpu")
    x = x.detach()
    bank = unit_rows(N, D, dtype=torch.float32)
    args = {"bank": bank, "y": y, "idx": idx}
    args[which] = torch.empty_like(args[which], device="meta")
    with pytest.raises(RuntimeError, match=f"{which} is on meta but x is on cpu"):
        ops_calls(x, args["bank"], args["y"], args["idx"])[op]()


def test_knn_topk_refuses_a_meta_bank():
    with pytest.raises(RuntimeError, match="bank is on meta but query is on cpu"):
        ops.knn_topk(unit_rows(3, D, dtype=torch.float32), torch.empty(N, D, device="meta"), 3)


def test_nearest_neighbors_refuses_a_non_finite_bank():
    """(ops.knn_topk itself ranks NaN as torch.topk does: test_ops.py)"""
    bank = unit_rows(N, D, dtype=torch.float32)
    bank[7, 1] = float("inf")
    with pytest.raises(ValueError, match="^bank holds NaN or inf"):
        nearest_neighbors(unit_rows(3, D, dtype=torch.float32), bank, 3)


# ---------------------------------------------------------------- the ops: one bad argument per call

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
OP_CASES = [
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
    ("nce proximal negative", lambda x, b, y, i, z, r: ops.npid.nce_loss(x, b, y, i, None, z, 7, T, -1, False, -0.5),
     r"proximal must be a finite number >= 0 \(the weight of the proximal term\), got -0.5"),
    ("softmax-ce proximal nan", lambda x, b, y, i, z, r: ops.npid.softmax_ce_loss(x, b, y, i, None, 7, T, False, float("nan")),
     r"proximal must be a finite number >= 0 .*got nan"),
    ("shared nce proximal inf", lambda x, b, y, i, z, r: ops.npid.shared_nce_loss(x, b, y, None, r, z, 7, T, False, -1, "fp32", -1,
                                                                                   float("inf")),
     r"proximal must be a finite number >= 0 .*got inf"),
    ("shared softmax-ce proximal -inf",
     lambda x, b, y, i, z, r: ops.npid.shared_softmax_ce_loss(x, b, y, None, r, 7, T, False, "fp32", -1, float("-inf")),
     r"proximal must be a finite number >= 0 .*got -inf"),
    ("full softmax proximal negative", lambda x, b, y, i, z, r: ops.npid.full_softmax_loss(x, b, y, T, "fp32", True, -1e-9),
     r"proximal must be a finite number >= 0 .*got -1e-09"),
]


@pytest.mark.parametrize("case", OP_CASES, ids=[c[0] for c in OP_CASES])
def test_bad_input_clear_error(problem, case):
    _, fn, message = case
    with pytest.raises(RuntimeError, match=message):
        fn(*problem)
        if problem[0].is_cuda:
            torch.cuda.synchronize()


def proximal_entry_points(x, bank, y, idx, z, rng):
    """Every entry point of npid_kernels.ops that takes `proximal`, as a function of it."""
    shared = dict(rng_state=rng, num_negatives=7, temperature=T)
    return {
        "nce_loss": lambda p: ops.nce_loss(x, bank, y, z, idx=idx, temperature=T, proximal=p),
        "nce_loss_and_z_stat": lambda p: ops.nce_loss_and_z_stat(x, bank, y, z, idx=idx, temperature=T, proximal=p),
        "softmax_ce_loss": lambda p: ops.softmax_ce_loss(x, bank, y, idx=idx, temperature=T, proximal=p),
        "shared_nce_loss_and_z_stat": lambda p: ops.shared_nce_loss_and_z_stat(x, bank, y, z, proximal=p, **shared),
        "shared_nce_loss": lambda p: ops.shared_nce_loss(x, bank, y, z, proximal=p, with_sq_dist=True, **shared),
        "shared_softmax_ce_loss": lambda p: ops.shared_softmax_ce_loss(x, bank, y, proximal=p, **shared),
        "full_softmax_loss": lambda p: ops.full_softmax_loss(x, bank, y, T, proximal=p),
        "full_softmax_loss_and_grad": lambda p: ops.full_softmax_loss_and_grad(x, bank, y, T, proximal=p),
    }


@pytest.mark.parametrize("value", [-1.0, -1e-300, float("nan"), float("inf"), float("-inf"), "0.5", None, True])
def test_proximal_must_be_a_finite_non_negative_number(problem, value):
    """The entry points refuse a bad proximal before any kernel runs, in their caller's words."""
    for name, fn in proximal_entry_points(*problem).items():
        with pytest.raises(ValueError, match=r"proximal must be a finite number >= 0"):
            fn(value)
        fn(0.5)  # and accept a good one


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


# ---------------------------------------------------------------- module construction

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
