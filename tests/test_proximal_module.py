"""The proximal term (the paper's eq. 10) at the level of NPIDLoss and the driver: every bank loss
gains lambda * ||x_b - v_{y_b}||^2 per sample, v the bank row before the step's update, and its
gradient 2 lambda (x_b - v_{y_b}); loss_parts splits the loss without a host sync; bad lambdas are
refused; and the term does what it is for: it pulls a feature toward its bank row. The kernels'
own term is checked against the float64 reference op by op in test_ops.py."""
import csv
import json
import math

import pytest
import torch
import torch.nn.functional as F

from npid_kernels import NPIDLoss
from npid_kernels.train import main

from conftest import unit_rows

N, D, K, T = 53, 16, 9, 0.07
LAMBDA = 2.5

# (loss, extra NPIDLoss arguments): every bank loss, every NCE Z mode, both kinds of negatives.
SETTINGS = [
    ("nce", dict(z_mode="first-batch")),
    ("nce", dict(z_mode="ema", z_momentum=0.9)),
    ("nce", dict(z_mode="batch")),
    ("softmax-ce", {}),
    ("softmax", {}),
    ("nce", dict(negatives="shared", z_mode="batch")),
    ("softmax-ce", dict(negatives="shared")),
    ("nce", dict(exclude_positive=True, z_mode="batch")),
]
IDS = ["nce-first-batch", "nce-ema", "nce-batch", "softmax-ce", "softmax", "shared-nce", "shared-softmax-ce",
       "nce-exclude-positive"]


def _pair(loss, extra, proximal, dtype=torch.float64, bank_dtype=None):
    """Two modules with the same bank, Z and sampler: lambda = 0 and lambda = `proximal`."""
    torch.manual_seed(3)
    plain = NPIDLoss(N, D, K, T, 0.5, loss=loss, seed=11, bank_dtype=bank_dtype or dtype, **extra)
    with_term = NPIDLoss(N, D, K, T, 0.5, loss=loss, seed=11, bank_dtype=bank_dtype or dtype, proximal=proximal,
                         **extra)
    with_term.load_state_dict(plain.state_dict())
    return plain, with_term


def _step(module, x, y):
    x = x.clone().requires_grad_(True)
    bank_before = module.memory.clone()
    loss = module(x, y)
    loss.backward()
    return loss.detach(), x.grad, bank_before


@pytest.mark.parametrize("loss,extra", SETTINGS, ids=IDS)
def test_term_and_gradient_added_to_every_bank_loss(loss, extra):
    plain, with_term = _pair(loss, extra, LAMBDA)
    g = torch.Generator().manual_seed(5)
    for step in range(3):  # the bank, Z and the sampler move on identically in both
        x = unit_rows(8, D, dtype=torch.float64, generator=g)
        y = torch.randperm(N, generator=g)[:8]
        loss0, grad0, bank0 = _step(plain, x, y)
        loss1, grad1, bank1 = _step(with_term, x, y)
        assert torch.equal(bank0, bank1)
        diff = x - bank0[y]  # the rows as they were before this step's update
        sq = (diff * diff).sum(1)
        assert loss1.item() == pytest.approx(loss0.item() + LAMBDA * sq.mean().item(), rel=1e-12, abs=1e-12), step
        torch.testing.assert_close(grad1, grad0 + 2 * LAMBDA * diff / x.shape[0], rtol=1e-12, atol=1e-12)
        parts = with_term.loss_parts
        assert parts["instance_loss"].item() == pytest.approx(loss0.item(), rel=1e-12, abs=1e-12)
        assert parts["proximal_loss"].item() == pytest.approx(LAMBDA * sq.mean().item(), rel=1e-12)
        assert parts["positive_sq_dist"].item() == pytest.approx(sq.mean().item(), rel=1e-12)
        assert plain.loss_parts["positive_sq_dist"].item() == pytest.approx(sq.mean().item(), rel=1e-12)
        assert plain.loss_parts["proximal_loss"].item() == 0.0
        if loss == "nce":
            assert torch.equal(plain.z, with_term.z)  # Z comes from the noise scores, not from the term


def test_bfloat16_bank_uses_the_stored_row_unrounded_to_the_features():
    """A bf16 bank row enters the term as its exact float value; the features stay float32."""
    plain, with_term = _pair("nce", dict(z_mode="batch"), LAMBDA, dtype=torch.float32, bank_dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(6)
    x = unit_rows(8, D, dtype=torch.float32, generator=g)
    y = torch.randperm(N, generator=g)[:8]
    loss0, grad0, bank0 = _step(plain, x, y)
    loss1, grad1, _ = _step(with_term, x, y)
    diff = x.double() - bank0[y].double()
    sq = (diff * diff).sum(1)
    assert loss1.item() == pytest.approx(loss0.item() + LAMBDA * sq.mean().item(), rel=1e-5)
    torch.testing.assert_close(grad1.double(), grad0.double() + 2 * LAMBDA * diff / 8, rtol=1e-5, atol=1e-6)


def test_lambda_pulls_a_feature_toward_its_bank_row():
    """Gradient steps on a fixed batch of free features: with lambda > 0 each feature's distance to
    its own bank row falls faster than with lambda = 0 (the bank's update alone also closes it)."""
    g = torch.Generator().manual_seed(9)
    start = unit_rows(16, D, dtype=torch.float64, generator=g)
    y = torch.randperm(N, generator=g)[:16]
    distances = {}
    for lam in (0.0, 10.0):
        torch.manual_seed(0)
        crit = NPIDLoss(N, D, K, T, 0.5, loss="nce", z_mode="batch", seed=1, bank_dtype=torch.float64, proximal=lam)
        free = start.clone().requires_grad_(True)
        opt = torch.optim.SGD([free], lr=0.05)
        first = None
        for _ in range(6):
            x = F.normalize(free, dim=1)
            gap = (x.detach() - crit.memory[y]).norm(dim=1).mean().item()
            first = gap if first is None else first
            loss = crit(x, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        distances[lam] = (x.detach() - crit.memory[y]).norm(dim=1).mean().item()
        assert first > 0
    assert distances[10.0] < 0.8 * distances[0.0], distances


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf"), -1e-9])
def test_bad_lambda_is_refused_by_name(bad):
    with pytest.raises(ValueError, match="proximal"):
        NPIDLoss(N, D, K, T, proximal=bad)


@pytest.mark.parametrize("bad", ["10", True, None])
def test_lambda_of_the_wrong_type_is_refused_by_name(bad):
    with pytest.raises(TypeError, match="proximal"):
        NPIDLoss(N, D, K, T, proximal=bad)


def test_lambda_zero_is_the_plain_loss_bit_for_bit():
    a = NPIDLoss(N, D, K, T, seed=4, z_mode="batch")
    b = NPIDLoss(N, D, K, T, seed=4, z_mode="batch", proximal=0.0)
    b.load_state_dict(a.state_dict())
    g = torch.Generator().manual_seed(2)
    x = unit_rows(8, D, dtype=torch.float32, generator=g)
    y = torch.randperm(N, generator=g)[:8]
    la, ga, _ = _step(a, x, y)
    lb, gb, _ = _step(b, x, y)
    assert torch.equal(la, lb) and torch.equal(ga, gb) and torch.equal(a.memory, b.memory)
    assert "proximal" not in repr(a) and "proximal=3.0" in repr(NPIDLoss(N, D, K, T, proximal=3.0))


DIGITS = ["train", "--dataset", "digits", "--arch", "small-cnn", "--loss", "nce", "--nce-k", "64", "--z-mode",
          "batch", "--eval-every", "100", "--knn-source", "bank", "--batch-size", "256"]


def test_driver_logs_the_parts_per_step_and_records_lambda(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(DIGITS + ["--epochs", "2", "--max-epochs-this-run", "1", "--proximal", "10",
                          "--out-dir", str(out)]) == 0
    assert "proximal lambda=10.0" in capsys.readouterr().out
    # a resume with another lambda is allowed, and said
    assert main(DIGITS + ["--epochs", "2", "--proximal", "30", "--resume", "--out-dir", str(out)]) == 0
    assert "proximal: 10.0 -> 30.0" in capsys.readouterr().out
    steps = list(csv.DictReader((out / "steps.csv").open()))
    assert len(steps) == 2 * (1438 // 256)
    for row in steps:
        total, instance, prox = float(row["loss"]), float(row["instance_loss"]), float(row["proximal_loss"])
        assert total == pytest.approx(instance + prox, rel=1e-6)
        lam = 10.0 if row["epoch"] == "1" else 30.0
        assert prox == pytest.approx(lam * float(row["positive_sq_dist"]), rel=1e-9) and prox > 0
    log = list(csv.DictReader((out / "log.csv").open()))
    assert [float(r["proximal"]) for r in log] == [10.0, 30.0]
    for r in log:
        assert float(r["loss"]) == pytest.approx(float(r["instance_loss"]) + float(r["proximal_loss"]), rel=1e-6)
    res = json.loads((out / "results.json").read_text())
    assert res["proximal"] == 30.0
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["config"]["proximal"] == 30.0


@pytest.mark.parametrize("flags,message", [
    (["--proximal", "-1"], "--proximal"),
    (["--proximal", "nan"], "--proximal"),
    (["--proximal", "inf"], "--proximal"),
    (["--proximal", "10", "--loss", "supervised"], "--proximal applies to the memory-bank losses"),
])
def test_driver_refuses_a_bad_lambda_before_writing_anything(tmp_path, capsys, flags, message):
    out = tmp_path / "never"
    assert main(DIGITS + ["--epochs", "1", "--out-dir", str(out)] + flags) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not out.exists()
