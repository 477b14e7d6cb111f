"""The NCE step of issue 17 (B = 64, K = 4096, n = 50,000, d = 128, fp32: nce_loss forward +
backward + momentum_update_) with idx given and drawn in-kernel, interleaved 5 steps each per
repetition; prints both medians (ms) and their ratio. With `forward`, the forwards of nce_loss
and softmax_ce_loss with idx instead, 3 calls each per repetition. With `torch`, the steps also
alternate with the pure-PyTorch step the benchmarks compare against (reference.nce_step, one
call per repetition), and each repetition's ratio torch / npid is printed as a summary (the
VM's speed drifts between minutes, by as much as the ratio's margin: steps timed seconds apart
share the drift, pytest-benchmark's providers, timed one after another, do not).

    python experiments/cpu-step/step_ab.py REPS [forward|torch]

To compare two builds, run it alternately with each on PYTHONPATH (the VM's speed drifts
between minutes, so only alternated runs compare)."""
import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from npid_kernels import ops
from npid_kernels import reference

B, K, N, D, T, MOMENTUM = 64, 4096, 50_000, 128, 0.07, 0.5


def main(reps, mode_set="step"):
    torch.manual_seed(0)
    bank = F.normalize(torch.randn(N, D), dim=1)
    y = torch.randint(0, N, (B,))
    rng = torch.tensor([1234, 0])
    idx = ops.sample_negatives(y, rng, N, K)
    z = torch.tensor([N * 1.2])
    x0 = F.normalize(torch.randn(B, D), dim=1)

    def step(mode):
        x = x0.clone().requires_grad_(True)
        if mode == "torch":
            reference.nce_step(x, bank, y, idx, z, T, MOMENTUM)
            return
        sampling = dict(idx=idx) if mode == "idx" else dict(rng_state=rng, num_negatives=K)
        ops.nce_loss(x, bank, y, z, temperature=T, **sampling).mean().backward()
        ops.momentum_update_(bank, x.detach(), y, MOMENTUM)

    def forward(loss):
        if loss == "nce":
            ops.nce_loss(x0, bank, y, z, idx=idx, temperature=T)
        else:
            ops.softmax_ce_loss(x0, bank, y, idx=idx, temperature=T)

    if mode_set == "forward":
        run, calls = forward, {"nce": 3, "softmax_ce": 3}
    elif mode_set == "torch":
        run, calls = step, {"idx": 5, "insample": 5, "torch": 1}
    else:
        run, calls = step, {"idx": 5, "insample": 5}
    times = {mode: [] for mode in calls}
    for mode in times:  # warm-up
        for _ in range(10 if mode != "torch" else 2):
            run(mode)
    rounds = []
    for _ in range(reps):
        this_round = {}
        for mode, seconds in times.items():
            for _ in range(calls[mode]):
                t0 = time.perf_counter()
                run(mode)
                seconds.append(time.perf_counter() - t0)
            this_round[mode] = statistics.median(seconds[-calls[mode]:])
        rounds.append(this_round)
    median = {mode: sorted(s)[len(s) // 2] * 1e3 for mode, s in times.items()}
    ratio = "" if mode_set == "forward" else f"insample/idx {median['insample'] / median['idx']:.3f}"
    print(json.dumps({mode: round(ms, 2) for mode, ms in median.items()}), ratio)
    if mode_set == "torch":
        for mode in ("idx", "insample"):
            per_round = sorted(r["torch"] / r[mode] for r in rounds)
            spread = ""
            if len(per_round) > 1:  # quartiles need two repetitions
                q = statistics.quantiles(per_round, n=4)
                spread = f", quartiles {q[0]:.1f}-{q[2]:.1f}x"
            print(f"torch/{mode} per repetition: median {statistics.median(per_round):.1f}x"
                  f"{spread}, range {per_round[0]:.1f}-{per_round[-1]:.1f}x")


if __name__ == "__main__":
    mode_set = sys.argv[2] if len(sys.argv) > 2 else "step"
    if mode_set not in ("step", "forward", "torch"):
        sys.exit(f"usage: step_ab.py REPS [forward|torch], got mode {mode_set!r}")
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 40, mode_set)
