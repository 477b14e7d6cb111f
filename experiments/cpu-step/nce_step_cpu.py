"""The CPU NCE step of issue 17 (B=64, K=4096, n=50,000, d=128, fp32): loss fwd + bwd + bank
update, idx given or drawn in-kernel; run under perf. argv: mode (idx|insample) seconds"""
import sys, time
import torch
import torch.nn.functional as F
from npid_kernels import ops

mode, seconds = sys.argv[1], float(sys.argv[2])
torch.manual_seed(0)
B, K, n, d, T = 64, 4096, 50_000, 128, 0.07
bank = F.normalize(torch.randn(n, d), dim=1)
y = torch.randint(0, n, (B,))
rng = torch.tensor([1234, 0], dtype=torch.int64)
idx = ops.sample_negatives(y, rng, n, K)
z = torch.tensor([n * 1.2])
sampling = dict(idx=idx, temperature=T) if mode == "idx" else dict(rng_state=rng, num_negatives=K, temperature=T)
x0 = F.normalize(torch.randn(B, d), dim=1)

def step():
    x = x0.clone().requires_grad_(True)
    loss = ops.nce_loss(x, bank, y, z, **sampling).mean()
    loss.backward()
    ops.momentum_update_(bank, x.detach(), y, 0.5)

for _ in range(20):
    step()
times = []
end = time.perf_counter() + seconds
while time.perf_counter() < end:
    t0 = time.perf_counter(); step(); times.append(time.perf_counter() - t0)
times.sort()
print(f"{mode}: median {times[len(times)//2]*1e3:.2f} ms over {len(times)} steps, threads {torch.get_num_threads()}")
