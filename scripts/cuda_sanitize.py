"""Smoke test of every npid CUDA op at odd shapes, for compute-sanitizer and as a quick GPU
correctness check against the CPU ops.

    python scripts/cuda_sanitize.py                      # plain run, prints OK
    compute-sanitizer --tool memcheck  python scripts/cuda_sanitize.py --quick
    compute-sanitizer --tool racecheck python scripts/cuda_sanitize.py --quick
    compute-sanitizer --tool initcheck python scripts/cuda_sanitize.py --quick

Every op is called on CUDA (B = 1, K = 1, d = 3 / 31 / 130 / 1030, n < K, repeated indices,
float32 / float64 / bfloat16 features with float32 / float64 / bfloat16 / float16 banks, a
bank whose base is not 16-byte aligned, idx = None with an rng_state on the GPU, batches small
enough to split the columns over several blocks and large enough not to), and each result is
compared with the CPU op on CPU copies of the inputs. Out-of-range indices must give NaN
results (or a skipped bank row) without a crash, and raise the CPU's message when
NPID_CUDA_SYNC_CHECKS=1. The ops are also captured into a CUDA graph once (no host sync
allowed inside). `--device cpu` runs the same script CPU against CPU (to check the script).
Exits 1 on the first group of failures, after printing them all.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import traceback

import torch

try:
    import npid_kernels  # noqa: F401  (registers torch.ops.npid.*)
except ImportError:  # pragma: no cover - fall back to the bare library
    import npid_kernels._C  # noqa: F401

npid = torch.ops.npid
T = 0.07
FAILURES: list[str] = []


def tol(dtype: torch.dtype) -> dict:
    if dtype == torch.float64:
        return dict(rtol=1e-9, atol=1e-11)
    if dtype == torch.bfloat16:
        return dict(rtol=3e-2, atol=3e-2)
    if dtype == torch.float16:
        return dict(rtol=3e-3, atol=3e-3)
    return dict(rtol=2e-4, atol=2e-5)


def check_close(name: str, got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, nan_ok=False):
    got_c = got.detach().cpu()
    want_c = want.detach().cpu()
    if got_c.shape != want_c.shape:
        FAILURES.append(f"{name}: shape {tuple(got_c.shape)} != {tuple(want_c.shape)}")
        return
    if got_c.dtype != want_c.dtype:
        FAILURES.append(f"{name}: dtype {got_c.dtype} != {want_c.dtype}")
        return
    g, w = got_c.double(), want_c.double()
    if not torch.allclose(g, w, equal_nan=nan_ok, **tol(dtype)):
        diff = (g - w).abs()
        diff[torch.isnan(diff)] = float("inf")
        i = int(diff.argmax())
        FAILURES.append(f"{name}: max |diff| {diff.max().item():.3g} at flat {i}: got "
                        f"{g.flatten()[i].item():.9g}, want {w.flatten()[i].item():.9g}")


def unit_rows(n, d, gen, dtype):
    x = torch.randn(n, d, generator=gen, dtype=torch.float64)
    return torch.nn.functional.normalize(x, dim=1).to(dtype)


def misaligned_copy(t: torch.Tensor) -> torch.Tensor:
    """Same values, storage offset of one element: the base is not 16-byte aligned."""
    flat = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    out = flat[1:].view(t.shape)
    out.copy_(t)
    return out


def cpu_features(x: torch.Tensor) -> torch.Tensor:
    """The CPU ops take float32/float64 features; bf16 features are compared as float32
    (the CUDA kernels convert them exactly) and the CPU result rounded back to bf16."""
    x = x.cpu()
    return x.float() if x.dtype == torch.bfloat16 else x


def back(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.to(dtype) if t.is_floating_point() else t


# ----------------------------------------------------------------------------- cases

def case_sampled_row_ops(dev, B, K, d, n, xdt, bdt, gen, tag, misaligned=False, repeat=False):
    x = unit_rows(B, d, gen, torch.float64).to(xdt)
    bank = unit_rows(n, d, gen, torch.float64).to(bdt)
    y = torch.randint(0, n, (B,), generator=gen)
    if repeat and B > 1:
        y[-1] = y[0]
    idx = torch.randint(0, n, (B, K + 1), generator=gen)
    idx[:, 0] = y
    if repeat:
        idx[:, -1] = idx[:, 1]  # the same row twice in one sample
    rng = torch.tensor([1234567 + B, 17 * K], dtype=torch.int64)
    z_val = float(n) * 1.7

    xd, bankd = x.to(dev), bank.to(dev)
    if misaligned:
        bankd = misaligned_copy(bankd)
    yd, idxd, rngd = y.to(dev), idx.to(dev), rng.to(dev)
    xc = cpu_features(x)
    name = f"[{tag} B={B} K={K} d={d} n={n} x={xdt} bank={bdt}{' misaligned' if misaligned else ''}]"

    # sample_negatives: exact
    got = npid.sample_negatives(yd, rngd, n, K)
    want = npid.sample_negatives(y, rng, n, K)
    if not torch.equal(got.cpu(), want):
        FAILURES.append(f"{name} sample_negatives differs from CPU")

    # nce_scores and backward
    got = npid.nce_scores(xd, bankd, idxd, T)
    want = back(npid.nce_scores(xc, bank, idx, T), xdt)
    check_close(f"{name} nce_scores", got, want, xdt)
    go = torch.randn(B, K + 1, generator=gen, dtype=torch.float64).to(xdt)
    got_b = npid.nce_scores_backward(go.to(dev), got, xd, bankd, idxd, T)
    want_b = back(npid.nce_scores_backward(cpu_features(go), got.cpu().to(xc.dtype), xc, bank, idx, T), xdt)
    check_close(f"{name} nce_scores_backward", got_b, want_b, xdt)

    for use_idx in (True, False):
        src = f"{name} {'idx' if use_idx else 'philox'}"
        i_d, r_d = (idxd, None) if use_idx else (None, rngd)
        i_c, r_c = (idx, None) if use_idx else (None, rng)
        for zdt in (torch.float32, torch.float64):
            # nce_estimate_z_ from an unset z, and a set z left alone
            z_d = torch.zeros(1, dtype=zdt, device=dev)
            z_c = torch.zeros(1, dtype=zdt)
            npid.nce_estimate_z_(z_d, xd, bankd, yd, i_d, r_d, K, T)
            npid.nce_estimate_z_(z_c, xc, bank, y, i_c, r_c, K, T)
            check_close(f"{src} nce_estimate_z_ z={zdt}", z_d, z_c, torch.float32)
            z_set = torch.full((1,), 3.5, dtype=zdt, device=dev)
            npid.nce_estimate_z_(z_set, xd, bankd, yd, i_d, r_d, K, T)
            if z_set.item() != 3.5:
                FAILURES.append(f"{src} nce_estimate_z_ overwrote a set z")
            # nce_loss
            z_d = torch.full((1,), z_val, dtype=zdt, device=dev)
            z_c = torch.full((1,), z_val, dtype=zdt)
            loss, grad, _, _ = npid.nce_loss(xd, bankd, yd, i_d, r_d, z_d, K, T)
            loss_c, grad_c, _, _ = npid.nce_loss(xc, bank, y, i_c, r_c, z_c, K, T)
            check_close(f"{src} nce_loss loss z={zdt}", loss, back(loss_c, xdt), xdt)
            check_close(f"{src} nce_loss grad z={zdt}", grad, back(grad_c, xdt), xdt)
            if use_idx:  # the sharded mode's call: the noise distribution of a larger bank
                n_data = 3 * n + 1
                z_d.fill_(-1.0)
                z_c.fill_(-1.0)
                npid.nce_estimate_z_(z_d, xd, bankd, yd, i_d, None, K, T, n_data)
                npid.nce_estimate_z_(z_c, xc, bank, y, i_c, None, K, T, n_data)
                check_close(f"{src} nce_estimate_z_ n_data z={zdt}", z_d, z_c, torch.float32)
                loss, grad, _, _ = npid.nce_loss(xd, bankd, yd, i_d, None, z_d, K, T, n_data)
                loss_c, grad_c, _, _ = npid.nce_loss(xc, bank, y, i_c, None, z_c, K, T, n_data)
                check_close(f"{src} nce_loss n_data loss z={zdt}", loss, back(loss_c, xdt), xdt)
                check_close(f"{src} nce_loss n_data grad z={zdt}", grad, back(grad_c, xdt), xdt)
        loss, grad, _ = npid.softmax_ce_loss(xd, bankd, yd, i_d, r_d, K, T)
        loss_c, grad_c, _ = npid.softmax_ce_loss(xc, bank, y, i_c, r_c, K, T)
        check_close(f"{src} softmax_ce_loss loss", loss, back(loss_c, xdt), xdt)
        check_close(f"{src} softmax_ce_loss grad", grad, back(grad_c, xdt), xdt)
        # the proximal term (eq. 10) and positive_sq_dist, from the positive's row in emit_final
        z_d, z_c = torch.full((1,), z_val, device=dev), torch.full((1,), z_val)
        for op, args_d, args_c in (
                ("nce_loss", (xd, bankd, yd, i_d, r_d, z_d, K, T, -1, False, 0.3),
                 (xc, bank, y, i_c, r_c, z_c, K, T, -1, False, 0.3)),
                ("softmax_ce_loss", (xd, bankd, yd, i_d, r_d, K, T, False, 0.3), (xc, bank, y, i_c, r_c, K, T, False, 0.3))):
            out_d, out_c = getattr(npid, op)(*args_d), getattr(npid, op)(*args_c)
            for what, i in (("loss", 0), ("grad", 1), ("positive_sq_dist", -1)):
                check_close(f"{src} {op} proximal {what}", out_d[i], back(out_c[i], xdt), xdt)

    # nce_init_z_ from the scores, in every scores dtype
    for sdt in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        s = (torch.rand(B, K + 1, generator=gen, dtype=torch.float64) + 0.5).to(sdt)
        z_d = torch.zeros(1, device=dev)
        z_c = torch.zeros(1)
        npid.nce_init_z_(z_d, s.to(dev), n)
        npid.nce_init_z_(z_c, s, n)
        check_close(f"{name} nce_init_z_ scores={sdt}", z_d, z_c, torch.float32)
    z_d = torch.full((1,), 2.0, device=dev)
    npid.nce_init_z_(z_d, torch.ones(3, device=dev), n)
    if z_d.item() != 2.0:
        FAILURES.append(f"{name} nce_init_z_ overwrote a set z")


def case_bad_indices(dev, gen):
    B, K, d, n = 3, 40, 16, 50
    x = unit_rows(B, d, gen, torch.float32).to(dev)
    bank = unit_rows(n, d, gen, torch.float32).to(dev)
    y = torch.tensor([0, 5, 49], device=dev)
    idx = torch.randint(0, n, (B, K + 1), generator=gen).to(dev)
    idx[:, 0] = y
    idx[1, 7] = n + 5
    idx[2, 0] = -3
    z = torch.full((1,), 60.0, device=dev)
    name = "[bad indices]"
    os.environ.pop("NPID_CUDA_SYNC_CHECKS", None)
    if dev == "cuda":
        # No crash, NaN where the CPU would raise, good samples still right.
        scores = npid.nce_scores(x, bank, idx, T)
        if not (torch.isnan(scores[1, 7]) and torch.isnan(scores[2, 0])):
            FAILURES.append(f"{name} nce_scores: out-of-range entries are not NaN")
        if torch.isnan(scores[0]).any() or torch.isnan(scores[1, :7]).any():
            FAILURES.append(f"{name} nce_scores: NaN in valid entries")
        for op, args in (("nce_loss", (x, bank, y, idx, None, z, K, T)),
                         ("softmax_ce_loss", (x, bank, y, idx, None, K, T))):
            loss, grad = getattr(npid, op)(*args)
            if not (torch.isnan(loss[1:]).all() and torch.isnan(grad[1:]).all()):
                FAILURES.append(f"{name} {op}: samples with bad rows are not NaN")
            if torch.isnan(loss[0]) or torch.isnan(grad[0]).any():
                FAILURES.append(f"{name} {op}: NaN in a good sample")
        g = npid.nce_scores_backward(torch.ones(B, K + 1, device=dev), torch.ones(B, K + 1, device=dev),
                                     x, bank, idx, T)
        if not torch.isnan(g[1:]).all() or torch.isnan(g[0]).any():
            FAILURES.append(f"{name} nce_scores_backward: NaN pattern wrong")
        zz = torch.zeros(1, device=dev)
        npid.nce_estimate_z_(zz, x, bank, y, idx, None, K, T)
        if zz.item() != 0.0:
            FAILURES.append(f"{name} nce_estimate_z_ set z despite a bad row")
        yb = y.clone()
        yb[2] = n
        loss, _, _ = npid.full_softmax_loss(x, bank, yb, T)
        if not torch.isnan(loss[2]) or torch.isnan(loss[:2]).any():
            FAILURES.append(f"{name} full_softmax_loss: NaN pattern wrong")
        rng = torch.tensor([5, 0], device=dev)
        loss, _, _, _ = npid.nce_loss(x, bank, yb, None, rng, z, K, T)
        if not torch.isnan(loss[2]) or torch.isnan(loss[:2]).any():
            FAILURES.append(f"{name} nce_loss (philox, bad y): NaN pattern wrong")
        # momentum: bad y and non-finite x skipped, other rows updated
        bank2 = bank.clone()
        xm = x.clone()
        xm[1, 2] = float("nan")
        npid.momentum_update_(bank2, xm, torch.tensor([n + 1, 7, 9], device=dev), 0.5)
        expect = bank.clone().cpu()
        npid.momentum_update_(expect, x.cpu()[2:], torch.tensor([9]), 0.5)
        check_close(f"{name} momentum_update_ skip", bank2, expect, torch.float32)
        torch.cuda.synchronize()

    # NPID_CUDA_SYNC_CHECKS=1 (or the CPU): the CPU's messages, nothing written.
    os.environ["NPID_CUDA_SYNC_CHECKS"] = "1"
    try:
        expectations = [
            ("nce_loss idx", lambda: npid.nce_loss(x, bank, y, idx, None, z, K, T), "outside the bank"),
            ("softmax idx", lambda: npid.softmax_ce_loss(x, bank, y, idx, None, K, T), "outside the bank"),
            ("nce_scores idx", lambda: npid.nce_scores(x, bank, idx, T), "outside the bank"),
            ("nce_loss z unset", lambda: npid.nce_loss(x, bank, y, idx.clamp(0, n - 1), None, -z, K, T), "z must be set"),
            ("momentum y", lambda: npid.momentum_update_(bank, x, torch.tensor([0, 1, n], device=dev), 0.5), "is outside the bank"),
            ("momentum nan", lambda: npid.momentum_update_(bank, x * float("nan"), y, 0.5), "NaN or inf"),
            ("full softmax y", lambda: npid.full_softmax_loss(x, bank, y - 1, T), "y holds row -1"),
        ]
        before = bank.clone()
        for what, fn, msg in expectations:
            try:
                fn()
                if dev == "cuda":
                    torch.cuda.synchronize()
                FAILURES.append(f"{name} {what}: no error with NPID_CUDA_SYNC_CHECKS=1")
            except RuntimeError as e:
                if msg not in str(e):
                    FAILURES.append(f"{name} {what}: unexpected message {str(e)[:200]!r}")
        if not torch.equal(bank, before):
            FAILURES.append(f"{name} a failed momentum_update_ changed the bank")
    finally:
        os.environ.pop("NPID_CUDA_SYNC_CHECKS", None)


def case_momentum(dev, B, d, n, xdt, bdt, gen, mom=0.5):
    x = unit_rows(B, d, gen, torch.float64).to(xdt)
    bank = (torch.rand(n, d, generator=gen, dtype=torch.float64) * 2 - 1).to(bdt)
    y = torch.randint(0, n, (B,), generator=gen)  # duplicates likely when B ~ n
    if B > 2:
        y[1] = y[0]
    bank_d = bank.to(dev, copy=True)
    npid.momentum_update_(bank_d, x.to(dev), y.to(dev), mom)
    bank_c = bank.clone()
    npid.momentum_update_(bank_c, cpu_features(x), y, mom)
    check_close(f"[momentum B={B} d={d} n={n} x={xdt} bank={bdt}]", bank_d, bank_c, bdt)


def case_full_softmax_knn(dev, B, d, n, xdt, bdt, gen, k, precision="fp32"):
    x = unit_rows(B, d, gen, torch.float64).to(xdt)
    bank = unit_rows(n, d, gen, torch.float64).to(bdt)
    y = torch.randint(0, n, (B,), generator=gen)
    name = f"[bank scan B={B} d={d} n={n} x={xdt} bank={bdt} {precision}]"
    xc = cpu_features(x)
    # tf32 / bf16: tensor cores may round the operands differently from the CPU's emulation
    cmp_dt = xdt if precision == "fp32" else torch.bfloat16
    loss, grad, _ = npid.full_softmax_loss(x.to(dev), bank.to(dev), y.to(dev), T, precision)
    loss_c, grad_c, _ = npid.full_softmax_loss(xc, bank, y, T, precision)
    check_close(f"{name} full_softmax_loss loss", loss, back(loss_c, xdt), cmp_dt)
    check_close(f"{name} full_softmax_loss grad", grad, back(grad_c, xdt), cmp_dt)
    loss_only, _, _ = npid.full_softmax_loss(x.to(dev), bank.to(dev), y.to(dev), T, precision, False)
    check_close(f"{name} full_softmax_loss without grad", loss_only, back(loss_c, xdt), cmp_dt)
    sims, ids = npid.knn_topk(x.to(dev), bank.to(dev), k, precision)
    sims_c, ids_c = npid.knn_topk(xc, bank, k, precision)
    check_close(f"{name} knn_topk sims", sims, back(sims_c, xdt), cmp_dt)
    # Indices: consistent with the similarities (near-ties may swap between GEMMs).
    recomputed = (xc.double()[:, None, :] * bank.double()[ids.cpu()]).sum(-1)
    check_close(f"{name} knn_topk ids consistent", recomputed.to(sims.dtype), sims.cpu(), cmp_dt)
    if ids.dtype != torch.int64 or ids.shape != (B, k):
        FAILURES.append(f"{name} knn_topk ids shape/dtype {ids.shape} {ids.dtype}")


def case_cuda_graph(gen):
    """Every loss op captured in a CUDA graph: fails if any of them syncs the host."""
    B, K, d, n = 8, 64, 128, 500
    x = unit_rows(B, d, gen, torch.float32).cuda()
    bank = unit_rows(n, d, gen, torch.float32).cuda()
    y = torch.randint(0, n, (B,), generator=gen).cuda()
    rng = torch.tensor([7, 0], device="cuda")
    z = torch.zeros(1, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up (workspace allocations) outside the capture
        for _ in range(2):
            npid.nce_loss(x, bank, y, None, rng, torch.ones(1, device="cuda"), K, T)
            npid.softmax_ce_loss(x, bank, y, None, rng, K, T)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    bank_g = bank.clone()
    with torch.cuda.graph(graph):
        npid.nce_estimate_z_(z, x, bank_g, y, None, rng, K, T)
        loss, grad, _, _ = npid.nce_loss(x, bank_g, y, None, rng, z, K, T)
        sloss, sgrad, _ = npid.softmax_ce_loss(x, bank_g, y, None, rng, K, T)
        npid.momentum_update_(bank_g, x, y, 0.5)
    graph.replay()
    torch.cuda.synchronize()
    z_c = torch.zeros(1)
    npid.nce_estimate_z_(z_c, x.cpu(), bank.cpu(), y.cpu(), None, rng.cpu(), K, T)
    check_close("[graph] z", z, z_c, torch.float32)
    loss_c, grad_c, _, _ = npid.nce_loss(x.cpu(), bank.cpu(), y.cpu(), None, rng.cpu(), z_c, K, T)
    check_close("[graph] nce_loss", loss, loss_c, torch.float32)
    check_close("[graph] nce grad", grad, grad_c, torch.float32)
    sl_c, _, _ = npid.softmax_ce_loss(x.cpu(), bank.cpu(), y.cpu(), None, rng.cpu(), K, T)
    check_close("[graph] softmax_ce_loss", sloss, sl_c, torch.float32)
    bank_c = bank.cpu().clone()
    npid.momentum_update_(bank_c, x.cpu(), y.cpu(), 0.5)
    check_close("[graph] momentum", bank_g, bank_c, torch.float32)


def case_accuracy(dev, gen):
    """fp32 against the float64 CPU op: the design target is ~1e-6 relative loss error."""
    B, K, d, n = 16, 4096, 128, 100_000
    x = unit_rows(B, d, gen, torch.float32)
    bank = unit_rows(n, d, gen, torch.float32)
    y = torch.randint(0, n, (B,), generator=gen)
    rng = torch.tensor([3, 1])
    z64 = torch.full((1,), 1.3 * n, dtype=torch.float64)
    loss, *_ = npid.nce_loss(x.to(dev), bank.to(dev), y.to(dev), None, rng.to(dev), z64.to(dev).float(), K, T)
    ref, *_ = npid.nce_loss(x.double(), bank.double(), y, None, rng, z64, K, T)
    rel = ((loss.cpu().double() - ref).abs() / ref.abs()).max().item()
    sloss, *_ = npid.softmax_ce_loss(x.to(dev), bank.to(dev), y.to(dev), None, rng.to(dev), K, T)
    sref, *_ = npid.softmax_ce_loss(x.double(), bank.double(), y, None, rng, K, T)
    srel = ((sloss.cpu().double() - sref).abs() / sref.abs()).max().item()
    print(f"fp32 loss max relative error vs float64: nce {rel:.2e}, softmax-ce {srel:.2e}")
    if rel > 1e-5 or srel > 1e-5:
        FAILURES.append(f"[accuracy] fp32 relative loss error nce {rel:.2e} softmax {srel:.2e} > 1e-5")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--quick", action="store_true", help="fewer shapes (for the sanitizers)")
    args = parser.parse_args()
    dev = args.device
    if dev == "cuda":
        if not torch.cuda.is_available():
            print("no CUDA device visible", file=sys.stderr)
            return 2
        if not torch._C._dispatch_has_kernel_for_dispatch_key("npid::nce_loss", "CUDA"):
            print("npid_kernels was built without CUDA kernels", file=sys.stderr)
            return 2
    gen = torch.Generator().manual_seed(0)

    dtype_pairs = [
        (torch.float32, torch.float32), (torch.float32, torch.bfloat16), (torch.float32, torch.float16),
        (torch.float64, torch.float64), (torch.float64, torch.bfloat16), (torch.float64, torch.float16),
    ]
    if dev == "cuda":
        dtype_pairs += [(torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float16)]
    # (B, K, d, n): odd shapes; B < #SMs splits the columns over blocks, B >= #SMs does not.
    shapes = [(1, 1, 3, 5), (3, 7, 130, 50), (2, 40, 128, 20), (5, 300, 31, 1000), (1, 700, 64, 300),
              (4, 33, 24, 64), (2, 9, 1030, 40), (140, 20, 128, 500), (3, 50, 160, 100),
              (2, 30, 264, 60), (2, 30, 500, 60), (1, 600, 130, 200), (2, 20, 1000, 50)]
    if args.quick:
        shapes = [(1, 1, 3, 5), (3, 7, 130, 50), (2, 40, 128, 20), (1, 700, 64, 300), (2, 9, 1030, 40),
                  (3, 50, 160, 100), (1, 600, 130, 200)]
    steps = []
    for xdt, bdt in dtype_pairs:
        for (B, K, d, n) in shapes:
            steps.append(("rows", lambda B=B, K=K, d=d, n=n, xdt=xdt, bdt=bdt:
                          case_sampled_row_ops(dev, B, K, d, n, xdt, bdt, gen, "rows", repeat=True)))
        steps.append(("misaligned", lambda xdt=xdt, bdt=bdt:
                      case_sampled_row_ops(dev, 3, 50, 16, 100, xdt, bdt, gen, "rows", misaligned=True)))
        steps.append(("momentum", lambda xdt=xdt, bdt=bdt: case_momentum(dev, 6, 130, 8, xdt, bdt, gen)))
        steps.append(("bank scan", lambda xdt=xdt, bdt=bdt: case_full_softmax_knn(dev, 5, 33, 300, xdt, bdt, gen, 7)))
    steps += [
        ("momentum large batch (sorted path)", lambda: case_momentum(dev, 3000, 16, 1000, torch.float32, torch.float32, gen)),
        ("momentum mu=0", lambda: case_momentum(dev, 64, 128, 80, torch.float32, torch.bfloat16, gen, mom=0.0)),
        ("knn k = n", lambda: case_full_softmax_knn(dev, 3, 16, 20, torch.float32, torch.float32, gen, 20)),
        ("bank scan tf32", lambda: case_full_softmax_knn(dev, 4, 40, 500, torch.float32, torch.float32, gen, 9, "tf32")),
        ("bank scan bf16", lambda: case_full_softmax_knn(dev, 4, 40, 500, torch.float32, torch.bfloat16, gen, 9, "bf16")),
        ("bad indices", lambda: case_bad_indices(dev, gen)),
    ]
    if not args.quick:
        steps += [
            ("full softmax several chunks", lambda: case_full_softmax_knn(dev, 2, 128, 40000, torch.float32, torch.float32, gen, 200)),
            ("accuracy", lambda: case_accuracy(dev, gen)),
        ]
    if dev == "cuda":
        steps.append(("cuda graph", lambda: case_cuda_graph(gen)))

    for what, fn in steps:
        try:
            fn()
        except Exception:  # noqa: BLE001 - report and go on
            FAILURES.append(f"{what}: exception\n{traceback.format_exc()}")
    if dev == "cuda":
        torch.cuda.synchronize()
    if FAILURES:
        print(f"{len(FAILURES)} FAILURES:")
        for f in FAILURES:
            print("  " + f)
        return 1
    print(f"OK ({len(steps)} groups, device {torch.cuda.get_device_name() if dev == 'cuda' else 'cpu'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
