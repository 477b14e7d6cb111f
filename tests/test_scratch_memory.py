"""The CPU kernels' scratch memory is counted (npid_kernels.ops.cpu_scratch_bytes), so that the
benchmarks' peak memory includes it: every buffer is returned, and the peak covers what the
kernels are known to allocate."""
import torch
import torch.nn.functional as F

from npid_kernels import ops


def unit(*shape, seed):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def scratch_of(call):
    live_before, _ = ops.cpu_scratch_bytes(reset_peak=True)
    call()
    live_after, peak = ops.cpu_scratch_bytes()
    return live_before, live_after, peak


def test_tile_order_codes_are_counted_and_returned():
    """Tile order (B * (K+1) >= n and >= 4096 pairs) sorts 4-byte codes of every pair."""
    B, K, n, d = 32, 255, 1000, 16
    x, bank = unit(B, d, seed=1).requires_grad_(), unit(n, d, seed=2)
    y = torch.randint(0, n, (B,), generator=torch.Generator().manual_seed(3))
    rng = torch.tensor([5, 0], dtype=torch.int64)
    z = torch.tensor(float(n))

    def step():
        loss = ops.nce_loss(x, bank, y, z, rng_state=rng, num_negatives=K, temperature=0.07)
        loss.sum().backward()
        ops.momentum_update_(bank, x.detach(), y, 0.5)

    before, after, peak = scratch_of(step)
    assert before == after == 0
    assert peak >= B * (K + 1) * 4


def test_every_cpu_kernel_returns_its_scratch():
    n, d, B = 300, 8, 4
    x, bank = unit(B, d, seed=4), unit(n, d, seed=5)
    y = torch.arange(B) * 7
    calls = [
        lambda: ops.softmax_ce_loss(x, bank, y, rng_state=torch.zeros(2, dtype=torch.int64), num_negatives=50,
                                    temperature=0.1),
        lambda: ops.full_softmax_loss(x, bank, y, 0.1),
        lambda: ops.knn_topk(x, bank, 20),
        lambda: ops.momentum_update_(bank, x, torch.tensor([1, 1, 2, 3]), 0.5),
    ]
    for call in calls:
        before, after, peak = scratch_of(call)
        assert before == after == 0
    # kNN keeps 2k candidates per query: it must show in the peak
    _, _, peak = scratch_of(lambda: ops.knn_topk(x, bank, 20))
    assert peak >= B * 2 * 20 * 4
