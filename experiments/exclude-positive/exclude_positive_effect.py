"""What exclude_positive changes, per step, at small n (issue 17, item 2).

A negative equal to its sample's own row pulls the feature away from the row it should match. Its
share of a step is ~K/n collisions per sample: negligible for ImageNet, not for small banks. This
script measures it on a trained bank (the features of a finished run, default the committed Table 1
NCE row): for banks of the first n rows, B samples whose features are their own rows, the same
Philox stream with and without exclude_positive, per-sample and shared negatives, NCE (Z estimated
from the step) and softmax-CE. It reports the collisions per sample, the share of the negatives'
gradient weight (sum of dloss/ds over the noise columns) that falls on colliding columns, and the
change of the batch loss and of grad_x (relative norm of the difference), beside the change that
merely drawing from another stream makes (per-sample exclusion draws every row differently, so its
change includes that sampling noise; the shared mode replaces only the colliding columns).

    python experiments/exclude-positive/exclude_positive_effect.py [CHECKPOINT [OUT_DIR]]
"""
from __future__ import annotations

import json
import os
import sys

import torch

from npid_kernels import ops
from npid_kernels.checkpoint import load as load_checkpoint
from npid_kernels import reference as R

T = 0.07


def nce_weights(x, bank, idx, z, n):
    """dloss/ds of each noise column (per-sample NCE terms, float64)."""
    p = R.nce_scores(x, bank, idx, T)[:, 1:] / z
    c = idx.shape[1] - 1
    return p / (p + c / n + R.NCE_EPS)


def softmax_weights(x, bank, idx):
    return torch.softmax(R.gathered_scores(x, bank, idx, T), dim=1)[:, 1:]


def measure(bank_all, n, K, negatives, loss, B=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    bank = bank_all[:n].double()
    y = torch.randperm(n, generator=g)[:B] if B <= n else torch.randint(0, n, (B,), generator=g)
    x = bank[y].clone()
    out = {}
    for exclude, rng in ((False, torch.tensor([12345 + seed, 7])), (True, torch.tensor([12345 + seed, 7])),
                         ("other stream", torch.tensor([12345 + seed, 8]))):
        if negatives == "shared":
            rows = ops.shared_negative_rows(rng, n, K)
            idx = R.shared_negatives_idx(y, rows, rng, n, exclude is True)
        else:
            idx = ops.sample_negatives(y, rng, n, K, exclude_positive=exclude is True)
        z = R.estimate_z(R.nce_scores(x, bank, idx, T)[:, 1:], n)
        xs = x.clone().requires_grad_(True)
        per_sample = R.nce_loss(xs, bank, y, idx, z, T) if loss == "nce" else R.softmax_ce_loss(xs, bank, y, idx, T)
        mean = per_sample.mean()
        (grad,) = torch.autograd.grad(mean, xs)
        collide = idx[:, 1:] == y.unsqueeze(1)
        w = nce_weights(x, bank, idx, z, n) if loss == "nce" else softmax_weights(x, bank, idx)
        out[exclude] = {"loss": float(mean.detach()), "grad": grad, "collisions_per_sample": float(collide.sum(1).double().mean()),
                        "weight_share_on_collisions": float((w * collide).sum() / w.sum())}
    keep, excl, other = out[False], out[True], out["other stream"]
    return {"n": n, "K": K, "negatives": negatives, "loss": loss,
            "collisions_per_sample": keep["collisions_per_sample"],
            "weight_share_on_collisions": keep["weight_share_on_collisions"],
            "loss_keep": keep["loss"], "loss_exclude": excl["loss"],
            "grad_rel_change": float((keep["grad"] - excl["grad"]).norm() / excl["grad"].norm()),
            # the same change between two streams without the exclusion: the step's sampling noise
            "grad_rel_change_other_stream": float((keep["grad"] - other["grad"]).norm() / other["grad"].norm())}


def main(argv):
    ckpt = argv[1] if len(argv) > 1 else "results/table1-cpu/nce-4096/checkpoint.pt"
    out_dir = argv[2] if len(argv) > 2 else "results/exclude-positive"
    bank = load_checkpoint(ckpt)["criterion"]["bank.memory"]  # weights_only: the file's code never runs
    rows = []
    for n in (100, 1000, 20000):
        for negatives, K in (("per-sample", min(4096, n - 1)), ("shared", 4096)):
            for loss in ("nce", "softmax-ce"):
                rows.append(measure(bank, n, K, negatives, loss))
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "effect.json"), "w") as f:
        json.dump({"checkpoint": ckpt, "batch": 64, "temperature": T, "rows": rows}, f, indent=1)
    lines = ["| n | negatives | K | loss | collisions / sample | share of negative weight on them | loss kept → excluded | grad change | grad change, another stream (sampling noise) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['n']} | {r['negatives']} | {r['K']} | {r['loss']} | {r['collisions_per_sample']:.2f} | "
                     f"{100 * r['weight_share_on_collisions']:.1f}% | {r['loss_keep']:.4f} → {r['loss_exclude']:.4f} | "
                     f"{100 * r['grad_rel_change']:.1f}% | {100 * r['grad_rel_change_other_stream']:.1f}% |")
    text = "\n".join(lines) + "\n"
    with open(os.path.join(out_dir, "effect.md"), "w") as f:
        f.write(f"Command: python experiments/exclude-positive/exclude_positive_effect.py {ckpt} {out_dir}\n\n" + text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
