"""Fixed-seed runs of NPIDLoss and of DistributedNPIDLoss at world size 1 (both bank modes), whose
losses, gradients, banks, Z, sampler states and state dicts tests/test_loss_golden.py compares
bit for bit with tests/data/loss_golden.pt.

The fixture pins the loss's behaviour across refactors of the modules: regenerate it only when a
change of the numbers is intended (`python tests/loss_golden.py`, from the repository root with
the package importable), and say why in the commit.
"""
from __future__ import annotations

import os
import pathlib
import tempfile
from typing import Dict

import torch
import torch.distributed as dist
import torch.nn.functional as F

from npid_kernels import NPIDLoss
from npid_kernels.distributed import DistributedNPIDLoss

PATH = pathlib.Path(__file__).resolve().parent / "data" / "loss_golden.pt"
N, D, K, B, T, MOMENTUM, SEED = 19, 6, 4, 5, 0.07, 0.5, 1234
TRAIN_STEPS, STEPS = 3, 4  # three training steps, then one in eval mode (no update, no advance)
SAVED_AFTER = 2  # the state dict recorded after the first two steps
PLACEMENTS = ("local", "replicated", "sharded")

# name -> the loss's keyword arguments (and "features": the features' dtype)
CASES = {
    "nce-first-batch": dict(loss="nce"),
    "nce-ema": dict(loss="nce", z_mode="ema", z_momentum=0.7),
    "nce-batch": dict(loss="nce", z_mode="batch"),
    "nce-z-given": dict(loss="nce", z=3.5),
    "nce-float64": dict(loss="nce", bank_dtype=torch.float64, features=torch.float64),
    "nce-bf16-bank": dict(loss="nce", bank_dtype=torch.bfloat16),
    "nce-exclude": dict(loss="nce", exclude_positive=True),
    "softmax-ce": dict(loss="softmax-ce"),
    "softmax-ce-exclude": dict(loss="softmax-ce", exclude_positive=True),
    "softmax": dict(loss="softmax"),
    "softmax-bf16": dict(loss="softmax", precision="bf16"),
    "shared-nce-first-batch": dict(loss="nce", negatives="shared", num_negatives=40),
    "shared-nce-ema": dict(loss="nce", negatives="shared", num_negatives=7, z_mode="ema", z_momentum=0.7),
    "shared-nce-batch": dict(loss="nce", negatives="shared", num_negatives=7, z_mode="batch"),
    "shared-softmax-ce": dict(loss="softmax-ce", negatives="shared", num_negatives=7),
    "shared-softmax-ce-exclude": dict(loss="softmax-ce", negatives="shared", num_negatives=7,
                                      exclude_positive=True),
    "shared-nce-exclude-tf32": dict(loss="nce", negatives="shared", num_negatives=7, exclude_positive=True,
                                    precision="tf32"),
}


def applies(case: str, placement: str) -> bool:
    """Shared negatives with exclude_positive need the whole bank on every rank."""
    kwargs = CASES[case]
    return not (placement == "sharded" and kwargs.get("negatives") == "shared" and kwargs.get("exclude_positive"))


def make(case: str, placement: str, seed=SEED):
    kwargs = dict(CASES[case])
    kwargs.pop("features", None)
    kwargs.setdefault("num_negatives", K)
    torch.manual_seed(7)  # NPIDLoss initialises its bank from the global generator
    if placement == "local":
        return NPIDLoss(N, D, temperature=T, momentum=MOMENTUM, seed=seed, **kwargs)
    return DistributedNPIDLoss(N, D, temperature=T, momentum=MOMENTUM, seed=seed, mode=placement, **kwargs)


def batch(case: str, step: int):
    g = torch.Generator().manual_seed(100 + step)
    x = F.normalize(torch.randn(B, D, dtype=torch.float64, generator=g), dim=1)
    y = torch.randperm(N, generator=g)[:B]
    y[-1] = y[0]  # a duplicate: the later sample's update wins
    return x.to(CASES[case].get("features", torch.float32)), y


def step(crit, case: str, t: int) -> Dict[str, torch.Tensor]:
    crit.train(t < TRAIN_STEPS)
    x, y = batch(case, t)
    x.requires_grad_(True)
    loss = crit(x, y)
    loss.backward()
    return {"loss": loss.detach(), "grad": x.grad, "memory": crit.memory.detach().clone(),
            "z": crit.z.detach().clone(), "rng_state": crit.rng_state.detach().clone()}


def record() -> Dict[str, torch.Tensor]:
    """Every case on every placement: the fixture's flat {name: tensor} dict."""
    out = {}
    for placement in PLACEMENTS:
        for case in CASES:
            if not applies(case, placement):
                continue
            crit = make(case, placement)
            steps = []
            for t in range(STEPS):
                steps.append(step(crit, case, t))
                if t == SAVED_AFTER - 1:  # the checkpoint a run saves before step SAVED_AFTER
                    for key, value in crit.state_dict().items():
                        out[f"{placement}/{case}/state_dict/{key}"] = value.clone()
            for key in steps[0]:
                out[f"{placement}/{case}/{key}"] = torch.stack([s[key] for s in steps])
    torch.manual_seed(3)
    out["local/seed-drawn/rng_state"] = NPIDLoss(N, D, K).rng_state.clone()
    return out


class single_process_group:
    """A gloo process group of one process (torch.distributed's code paths at world size 1)."""

    def __enter__(self):
        self.dir = tempfile.TemporaryDirectory()
        store = dist.FileStore(os.path.join(self.dir.name, "store"), 1)
        dist.init_process_group("gloo", store=store, rank=0, world_size=1)
        return self

    def __exit__(self, *exc):
        dist.destroy_process_group()
        self.dir.cleanup()
        return False


if __name__ == "__main__":
    with single_process_group():
        golden = record()
    PATH.parent.mkdir(exist_ok=True)
    torch.save(golden, PATH, _use_new_zipfile_serialization=False)  # the zip format's per-tensor overhead is 4x
    print(f"{PATH}: {len(golden)} tensors, {PATH.stat().st_size} bytes")
