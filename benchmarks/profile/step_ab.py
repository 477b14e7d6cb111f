"""The NCE step of issue 17 (B = 64, K = 4096, n = 50,000, d = 128, fp32: nce_loss forward +
backward + momentum_update_) with idx given and drawn in-kernel, interleaved 5 steps each per
repetition; prints both medians (ms) and their ratio. With `forward`, the forwards of nce_loss
and softmax_ce_loss with idx instead, 3 calls each per repetition.

    python benchmarks/profile/step_ab.py REPS [forward]

To compare two builds, run it alternately with each on PYTHONPATH (the VM's speed drifts
between minutes, so only alternated runs compare)."""
import json
import sys
import time

import torch
import torch.nn.functional as F

from npid_kernels import ops

B, K, N, D, T = 64, 4096, 50_000, 128, 0.07


def main(reps, forward_only=False):
    torch.manual_seed(0)
    bank = F.normalize(torch.randn(N, D), dim=1)
    y = torch.randint(0, N, (B,))
    rng = torch.tensor([1234, 0])
    idx = ops.sample_negatives(y, rng, N, K)
    z = torch.tensor([N * 1.2])
    x0 = F.normalize(torch.randn(B, D), dim=1)

    def step(mode):
        x = x0.clone().requires_grad_(True)
        sampling = dict(idx=idx) if mode == "idx" else dict(rng_state=rng, num_negatives=K)
        ops.nce_loss(x, bank, y, z, temperature=T, **sampling).mean().backward()
        ops.momentum_update_(bank, x.detach(), y, 0.5)

    def forward(loss):
        if loss == "nce":
            ops.nce_loss(x0, bank, y, z, idx=idx, temperature=T)
        else:
            ops.softmax_ce_loss(x0, bank, y, idx=idx, temperature=T)

    run, modes, calls = (forward, ["nce", "softmax_ce"], 3) if forward_only else (step, ["idx", "insample"], 5)
    times = {mode: [] for mode in modes}
    for mode in times:  # warm-up
        for _ in range(10):
            run(mode)
    for _ in range(reps):
        for mode, seconds in times.items():
            for _ in range(calls):
                t0 = time.perf_counter()
                run(mode)
                seconds.append(time.perf_counter() - t0)
    median = {mode: sorted(s)[len(s) // 2] * 1e3 for mode, s in times.items()}
    ratio = "" if forward_only else f"insample/idx {median['insample'] / median['idx']:.3f}"
    print(json.dumps({mode: round(ms, 2) for mode, ms in median.items()}), ratio)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 40, "forward" in sys.argv[2:])
