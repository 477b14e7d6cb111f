"""Bit-identity check for the csrc-fronts refactor (issue #34, item 4): runs every CPU op on fixed
seeds and saves losses, gradients, banks, Z and rng_state, so that two builds can be compared
with torch.equal.

    PYTHONPATH=/work/main         python3 golden.py run  before.pt
    PYTHONPATH=/work/wt-refactor  python3 golden.py run  after.pt
    python3 golden.py compare before.pt after.pt

`run` records, for each case, every tensor it produced (or the error message it raised).
`compare` says which cases differ (torch.equal on every tensor, dtypes and shapes included)
and exits 1 if any does. The cases: NPIDLoss training steps over the whole matrix of losses,
Z modes, negatives, exclude_positive, bank dtypes, proximal, explicit idx and the CPU pair
orders, under each vector ISA the CPU has; then the ops called one by one (scores and their
backward, Z estimation, sampling, the momentum update, the full softmax at each precision,
the shared losses with chunking, double features, odd feature dims, kNN).
"""
import itertools
import sys

import torch
import torch.nn.functional as F

npid_kernels = ops = NPIDLoss = None  # imported by run(): compare needs no build

N, D_IN, D, B, K = 300, 24, 32, 16, 64
STEPS = 3
ISAS = ("baseline", "avx2", "avx512")


def module_case(out, name, steps=STEPS, idx_mode=False, **kw):
    torch.manual_seed(1234)
    W = torch.randn(D_IN, D, dtype=torch.float64).float().requires_grad_(True)
    module = NPIDLoss(N, D, seed=77, **kw)
    rec = {}
    try:
        for step in range(steps):
            inputs = torch.randn(B, D_IN)
            indices = torch.randint(0, N, (B,))
            feats = F.normalize(inputs @ W, dim=1)
            feats.retain_grad()
            idx = None
            if idx_mode:
                g = torch.Generator().manual_seed(step)
                if kw.get("negatives") == "shared":
                    idx = torch.randint(0, N, (K,), generator=g)
                else:
                    idx = torch.cat([indices[:, None], torch.randint(0, N, (B, K), generator=g)], 1)
            W.grad = None
            loss = module(feats, indices, idx)
            loss.backward()
            rec[f"{step}.loss"] = loss.detach().clone()
            rec[f"{step}.feat_grad"] = feats.grad.clone()
            rec[f"{step}.W_grad"] = W.grad.clone()
            rec[f"{step}.bank"] = module.memory.detach().clone()
            rec[f"{step}.z"] = module.z.clone()
            rec[f"{step}.rng_state"] = module.rng_state.clone()
            for part, v in module.loss_parts.items():
                rec[f"{step}.{part}"] = v.clone()
    except Exception as e:  # noqa: BLE001 - the message is part of the behaviour compared
        rec["error"] = f"{type(e).__name__}: {e}"
    out[name] = rec


def module_matrix(out, isa):
    bank_dtypes = {"f32": torch.float32, "bf16": torch.bfloat16}
    for (bname, bdt), prox, excl in itertools.product(bank_dtypes.items(), (0.0, 10.0), (False, True)):
        common = dict(num_negatives=K, bank_dtype=bdt, proximal=prox, exclude_positive=excl)
        tag = f"{isa}/bank={bname}/prox={prox}/excl={excl}"
        for order in ("sample", "tile", "auto"):
            with ops._cpu_pair_order(order):
                for z_mode in ("first-batch", "ema", "batch"):
                    module_case(out, f"{tag}/nce/per-sample/{z_mode}/order={order}", loss="nce", z_mode=z_mode, **common)
                module_case(out, f"{tag}/softmax-ce/per-sample/order={order}", loss="softmax-ce", **common)
                if not excl:  # an explicit idx with exclude_positive is refused by the module
                    module_case(out, f"{tag}/nce/per-sample/idx/order={order}", idx_mode=True, loss="nce", **common)
                    module_case(out, f"{tag}/softmax-ce/per-sample/idx/order={order}", idx_mode=True,
                                loss="softmax-ce", **common)
        for precision in ("fp32", "bf16"):
            for z_mode in ("first-batch", "ema", "batch"):
                module_case(out, f"{tag}/nce/shared/{z_mode}/{precision}", loss="nce", negatives="shared",
                            z_mode=z_mode, precision=precision, **common)
            module_case(out, f"{tag}/softmax-ce/shared/{precision}", loss="softmax-ce", negatives="shared",
                        precision=precision, **common)
            module_case(out, f"{tag}/nce/shared/idx/{precision}", idx_mode=True, loss="nce", negatives="shared",
                        precision=precision, **common)
        if not excl:
            for precision in ("fp32", "tf32", "bf16"):
                module_case(out, f"{tag}/softmax/{precision}", loss="softmax", precision=precision,
                            **{k: v for k, v in common.items() if k != "exclude_positive"})


def op_case(out, name, fn):
    rec = {}
    try:
        res = fn()
        res = res if isinstance(res, (tuple, list)) else (res,)
        for i, t in enumerate(res):
            if isinstance(t, torch.Tensor):
                rec[str(i)] = t.detach().clone()
    except Exception as e:  # noqa: BLE001
        rec["error"] = f"{type(e).__name__}: {e}"
    out[name] = rec


def data(xdt, bdt, d, b=B, n=N, seed=5):
    g = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(b, d, generator=g, dtype=torch.float64), dim=1).to(xdt)
    bank = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1).to(bdt)
    y = torch.randint(0, n, (b,), generator=g)
    idx = torch.cat([y[:, None], torch.randint(0, n, (b, K), generator=g)], 1)
    return x, bank, y, idx


def with_grad(loss_fn, x):
    x = x.clone().requires_grad_(True)
    res = loss_fn(x)
    per = res[0] if isinstance(res, tuple) else res
    per.sum().backward()
    return tuple(res if isinstance(res, tuple) else (res,)) + (x.grad,)


def op_matrix(out, isa):
    T = 0.07
    rng = torch.tensor([99, 3])
    combos = [(torch.float32, torch.float32), (torch.float32, torch.bfloat16), (torch.float32, torch.float16),
              (torch.float64, torch.float64), (torch.float64, torch.bfloat16)]
    for (xdt, bdt), d, b in itertools.product(combos, (32, 130), (1, B)):
        x, bank, y, idx = data(xdt, bdt, d, b)
        tag = f"{isa}/x={xdt}/bank={bdt}/d={d}/B={b}"
        z = torch.tensor([float(N) * 1.5], dtype=torch.float64 if xdt == torch.float64 else torch.float32)
        op_case(out, f"{tag}/sample_negatives", lambda: ops.sample_negatives(y, rng, N, K, False))
        op_case(out, f"{tag}/sample_negatives/excl", lambda: ops.sample_negatives(y, rng, N, K, True))
        op_case(out, f"{tag}/shared_negative_rows", lambda: ops.shared_negative_rows(rng, N, K))
        op_case(out, f"{tag}/nce_scores+bwd", lambda: with_grad(lambda v: ops.nce_scores(v, bank, idx, T), x))

        def init_z():
            zz = torch.tensor([-1.0])
            ops.nce_init_z_(zz, ops.nce_scores(x, bank, idx, T), N)
            return zz
        op_case(out, f"{tag}/nce_init_z_", init_z)
        for rows in ("idx", "rng", "rng-excl"):
            kw = dict(idx=idx) if rows == "idx" else dict(rng_state=rng, num_negatives=K,
                                                           exclude_positive=rows == "rng-excl")

            def est_z():
                zz = torch.tensor([-1.0], dtype=torch.float64)
                ops.nce_estimate_z_(zz, x, bank, y, temperature=T, **kw)
                return zz
            op_case(out, f"{tag}/{rows}/nce_estimate_z_", est_z)
            for order in ("sample", "tile"):
                with ops._cpu_pair_order(order):
                    for prox in (0.0, 3.0):
                        op_case(out, f"{tag}/{rows}/{order}/prox={prox}/nce_loss", lambda: with_grad(
                            lambda v: ops.nce_loss_and_z_stat(v, bank, y, z, temperature=T, proximal=prox,
                                                              with_sq_dist=True, **kw), x))
                        if rows == "idx":  # n_data (a shard's fetched rows) goes with an explicit idx
                            op_case(out, f"{tag}/{rows}/{order}/prox={prox}/nce_loss/n_data", lambda: with_grad(
                                lambda v: ops.nce_loss_and_z_stat(v, bank, y, z, temperature=T, proximal=prox,
                                                                  n_data=4 * N, with_sq_dist=True, **kw), x))
                        op_case(out, f"{tag}/{rows}/{order}/prox={prox}/softmax_ce_loss", lambda: with_grad(
                            lambda v: ops.softmax_ce_loss(v, bank, y, temperature=T, proximal=prox,
                                                          with_sq_dist=True, **kw), x))
        for prox, excl, precision, chunk in itertools.product((0.0, 3.0), (False, True), ("fp32", "tf32", "bf16"),
                                                              (-1, 40)):
            sk = dict(temperature=T, proximal=prox, exclude_positive=excl, precision=precision, chunk_rows=chunk,
                      with_sq_dist=True)
            stag = f"{tag}/shared/prox={prox}/excl={excl}/{precision}/chunk={chunk}"
            op_case(out, f"{stag}/shared_nce/rng", lambda: with_grad(
                lambda v: ops.shared_nce_loss_and_z_stat(v, bank, y, z, rng_state=rng, num_negatives=K, **sk), x))
            op_case(out, f"{stag}/shared_nce/rows", lambda: with_grad(
                lambda v: ops.shared_nce_loss_and_z_stat(v, bank, y, z, rows=idx[0, 1:], rng_state=rng, **sk), x))
            if not excl:  # n_data (a shard's fetched rows) is refused with exclude_positive
                op_case(out, f"{stag}/shared_nce/rows/n_data", lambda: with_grad(
                    lambda v: ops.shared_nce_loss_and_z_stat(v, bank, y, z, rows=idx[0, 1:], n_data=2 * N, **sk), x))
            op_case(out, f"{stag}/shared_softmax_ce/rng", lambda: with_grad(
                lambda v: ops.shared_softmax_ce_loss(v, bank, y, rng_state=rng, num_negatives=K, **sk), x))
            op_case(out, f"{stag}/shared_softmax_ce/rows", lambda: with_grad(
                lambda v: ops.shared_softmax_ce_loss(v, bank, y, rows=idx[0, 1:], rng_state=rng, **sk), x))
        for precision, prox in itertools.product(("fp32", "tf32", "bf16"), (0.0, 3.0)):
            op_case(out, f"{tag}/full_softmax/{precision}/prox={prox}", lambda: with_grad(
                lambda v: ops.full_softmax_loss(v, bank, y, T, precision, proximal=prox, with_sq_dist=True), x))
            op_case(out, f"{tag}/full_softmax_and_grad/{precision}/prox={prox}",
                    lambda: ops.full_softmax_loss_and_grad(x, bank, y, T, precision, proximal=prox,
                                                           with_sq_dist=True))
        if xdt != torch.float64 or bdt == torch.float64:
            for precision in ("fp32", "bf16"):
                op_case(out, f"{tag}/knn_topk/{precision}", lambda: ops.knn_topk(x, bank.to(xdt), 7, precision))

        def momentum():
            bk = bank.clone()
            yy = torch.cat([y, y[:3]])  # duplicates: the last wins
            xx = torch.cat([x, x[:3].flip(0)]).to(xdt)
            ops.momentum_update_(bk, xx, yy, 0.5)
            return bk
        op_case(out, f"{tag}/momentum_update_", momentum)
    # Bad rows: the messages are behaviour too.
    x, bank, y, idx = data(torch.float32, torch.float32, 32)
    z = torch.tensor([450.0])
    bad_idx = idx.clone()
    bad_idx[3, 5] = N + 7
    op_case(out, f"{isa}/errors/nce_loss/idx", lambda: ops.nce_loss(x, bank, y, z, idx=bad_idx))
    op_case(out, f"{isa}/errors/nce_scores/idx", lambda: ops.nce_scores(x, bank, bad_idx, T))
    bad_y = y.clone()
    bad_y[2] = -4
    op_case(out, f"{isa}/errors/softmax_ce/y", lambda: ops.softmax_ce_loss(x, bank, bad_y, rng_state=rng,
                                                                           num_negatives=K))
    op_case(out, f"{isa}/errors/shared_nce/rows", lambda: ops.shared_nce_loss(x, bank, y, z, rows=bad_idx[3, 1:]))
    op_case(out, f"{isa}/errors/full_softmax/y", lambda: ops.full_softmax_loss(x, bank, y + N))
    # One bad row: with several, the CPU reports whichever a thread records first (either build).
    op_case(out, f"{isa}/errors/sample_negatives/y", lambda: ops.sample_negatives(bad_y, rng, N, K))


def run(path):
    global npid_kernels, ops, NPIDLoss
    import npid_kernels
    from npid_kernels import ops
    from npid_kernels.nn import NPIDLoss
    out = {"_meta": {"npid_kernels": npid_kernels.__file__, "torch": str(torch.__version__)}}
    torch.set_num_threads(2)
    for isa in ISAS:
        with ops._cpu_isa(isa) as got:
            if got != isa:
                print(f"ISA {isa} not available (got {got}), skipped", file=sys.stderr)
                continue
            module_matrix(out, isa)
            op_matrix(out, isa)
    torch.save(out, path)
    n_tensors = sum(len(v) for k, v in out.items() if k != "_meta")
    n_err = sum("error" in v for k, v in out.items() if k != "_meta")
    print(f"{path}: {len(out) - 1} cases, {n_tensors} records ({n_err} cases end in an error), "
          f"from {npid_kernels.__file__}")


def compare(path_a, path_b):
    a, b = torch.load(path_a, weights_only=True), torch.load(path_b, weights_only=True)
    print("A:", a["_meta"], "\nB:", b["_meta"])
    keys_a, keys_b = set(a) - {"_meta"}, set(b) - {"_meta"}
    bad = []
    if keys_a != keys_b:
        bad.append(f"case sets differ: only A {sorted(keys_a - keys_b)[:5]}, only B {sorted(keys_b - keys_a)[:5]}")
    n_tensors = 0
    for case in sorted(keys_a & keys_b):
        ra, rb = a[case], b[case]
        if set(ra) != set(rb):
            bad.append(f"{case}: records differ {sorted(ra)} vs {sorted(rb)}")
            continue
        for k in ra:
            va, vb = ra[k], rb[k]
            if isinstance(va, torch.Tensor):
                n_tensors += 1
                same = va.dtype == vb.dtype and va.shape == vb.shape and torch.equal(va, vb)
                if not same and va.dtype == vb.dtype and va.shape == vb.shape and va.is_floating_point():
                    # NaN == NaN bitwise (torch.equal says no): same bits is identical too.
                    same = torch.equal(va.contiguous().view(torch.uint8), vb.contiguous().view(torch.uint8))
            else:
                same = va == vb
            if not same:
                bad.append(f"{case}/{k}: differs" + ("" if isinstance(va, torch.Tensor) else f": {va!r} vs {vb!r}"))
    errors = sum("error" in a[c] for c in keys_a)
    print(f"{len(keys_a & keys_b)} cases, {n_tensors} tensors compared ({errors} cases compared by their error "
          f"message); {len(bad)} differences")
    for line in bad[:50]:
        print("  ", line)
    return 1 if bad else 0


if __name__ == "__main__":
    if sys.argv[1] == "run":
        run(sys.argv[2])
    else:
        sys.exit(compare(sys.argv[2], sys.argv[3]))
