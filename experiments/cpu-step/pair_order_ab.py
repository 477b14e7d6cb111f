"""Sample order vs tile order of the CPU fused losses (csrc/cpu/pair_order.h), timed interleaved.

    python experiments/cpu-step/pair_order_ab.py OUT.json [REPS]

The training step of issue 17 (B = 64, K = 4096, d = 128, fp32 bank: loss forward + backward
+ momentum_update_), idx given or drawn in-kernel, for NCE and softmax-CE at n = 50k and, for
NCE, at n = 130k / 260k / 400k (where use_tile_order() switches). Each repetition runs every
configuration for 5 steps in turn, so a slow phase of a shared VM hits all of them alike;
min / p25 / median over all repetitions are written to OUT.json."""
import json
import os
import platform
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from npid_kernels import ops

B, K, D, T = 64, 4096, 128, 0.07
CASES = [("nce", 50_000), ("softmax_ce", 50_000), ("nce", 130_000), ("nce", 260_000), ("nce", 400_000)]


def make_step(loss_name, n):
    g = torch.Generator().manual_seed(0)
    bank = F.normalize(torch.randn(n, D, generator=g), dim=1)
    y = torch.randint(0, n, (B,), generator=g)
    rng = torch.tensor([1234, 0])
    idx = ops.sample_negatives(y, rng, n, K)
    z = torch.tensor([n * 1.2])
    x0 = F.normalize(torch.randn(B, D, generator=g), dim=1)

    def step(sampling):
        kw = dict(idx=idx) if sampling == "idx" else dict(rng_state=rng, num_negatives=K)
        x = x0.clone().requires_grad_(True)
        if loss_name == "nce":
            loss = ops.nce_loss(x, bank, y, z, temperature=T, **kw)
        else:
            loss = ops.softmax_ce_loss(x, bank, y, temperature=T, **kw)
        loss.mean().backward()
        ops.momentum_update_(bank, x.detach(), y, 0.5)
    return step


def main():
    out, reps = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 20
    results = []
    for loss_name, n in CASES:
        step = make_step(loss_name, n)
        configs = [(order, sampling) for order in ("sample", "tile") for sampling in ("idx", "insample")]
        times = {c: [] for c in configs}
        for _ in range(reps):
            for order, sampling in configs:
                torch.ops.npid._set_cpu_pair_order(order)
                step(sampling)
                for _ in range(5):
                    t0 = time.perf_counter()
                    step(sampling)
                    times[(order, sampling)].append(time.perf_counter() - t0)
        for (order, sampling), ts in times.items():
            ts.sort()
            row = dict(loss=loss_name, n=n, B=B, K=K, d=D, order=order, sampling=sampling, steps=len(ts),
                       min_ms=ts[0] * 1e3, p25_ms=ts[len(ts) // 4] * 1e3, median_ms=ts[len(ts) // 2] * 1e3)
            results.append(row)
            print(f"{loss_name:10s} n={n:7d} {order:6s} {sampling:8s} min {row['min_ms']:6.2f}  "
                  f"p25 {row['p25_ms']:6.2f}  median {row['median_ms']:6.2f} ms", flush=True)
    torch.ops.npid._set_cpu_pair_order("auto")
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                            cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    with open(out, "w") as f:
        json.dump(dict(device="cpu", cpu=platform.processor() or platform.machine(), threads=torch.get_num_threads(),
                       torch=torch.__version__, commit=commit, date=time.strftime("%Y-%m-%d %H:%M"),
                       command=" ".join(sys.argv), results=results), f, indent=1)


if __name__ == "__main__":
    main()
