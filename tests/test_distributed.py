"""Multi-process NPID (npid_kernels.distributed) on the CPU: 2 processes, gloo backend.

Each scenario starts two worker processes the way torchrun does (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT in the environment; the workers are this file run as a script), and
the workers save what they computed. The assertions run here, against single-process NPIDLoss /
knn_evaluate runs fed the concatenated global batch:

* replicated mode: after every step both ranks' banks are identical and equal the single-process
  bank; each rank's loss and gradient are those of its half of the global batch; Z agreed;
* sharded mode equals the replicated mode (losses, gradients, banks, Z), with n not a multiple
  of the world size and duplicate indices across and within ranks;
* checkpoints: 2 steps, save, exit, new processes load and run 2 more == 4 uninterrupted steps;
  the 2-rank checkpoint loads into a plain NPIDLoss (and continues identically), and a
  NPIDLoss state dict loads at world size 2 (every run here starts from one);
* distributed kNN (replicated and sharded bank, uneven and empty query splits) == knn_evaluate.
"""
from __future__ import annotations

import os
import pathlib
import socket
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from npid_kernels import NPIDLoss, knn_evaluate, knn_predict, ops
from npid_kernels.distributed import (DistributedNPIDLoss, all_gather_varsize, bank_shard_range,
                                      distributed_knn_evaluate, distributed_knn_predict, init_distributed,
                                      is_main_process, wrap_ddp)

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with the gloo backend is not available")

HERE = pathlib.Path(__file__).resolve()
WORLD = 2
N, D, K, T, MOMENTUM = 37, 12, 5, 0.07, 0.5   # n odd: the shards hold 19 and 18 rows
STEP_SIZES = [(4, 4), (4, 4), (4, 4), (3, 5)]  # local batch per rank per step (the last uneven)
LOSSES = ("nce", "softmax-ce", "softmax")
DTYPES = {"float32": torch.float32, "float64": torch.float64}
MODES = ("replicated", "sharded")
D_IN, DDP_STEPS, LR = 20, 3, 0.5   # the DDP check: a linear "backbone" trained for 3 equal steps
TOL = {"float32": dict(rtol=1e-6, atol=1e-6), "float64": dict(rtol=1e-12, atol=1e-12)}
# sharded NCE / softmax-CE run the replicated mode's kernels on the fetched rows (TOL); the sharded
# exact softmax combines per-shard logsumexps, summed in another order
TOL_SHARDED = {"float32": dict(rtol=2e-5, atol=2e-6), "float64": dict(rtol=1e-10, atol=1e-12)}


# ---------------------------------------------------------------- launching workers

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(scenario: str, outdir: pathlib.Path, world: int, timeout: float):
    port = _free_port()
    procs, logs = [], []
    for rank in range(world):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                   LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
        log = open(outdir / f"{scenario}_rank{rank}.log", "w")
        logs.append(log)
        procs.append(subprocess.Popen([sys.executable, str(HERE), scenario, str(outdir)], env=env,
                                      stdout=log, stderr=subprocess.STDOUT))
    deadline = time.monotonic() + timeout
    try:
        for p in procs:
            p.wait(timeout=max(deadline - time.monotonic(), 1))
    except subprocess.TimeoutExpired:
        pass
    finally:
        for p in procs:  # only the processes started here
            if p.poll() is None:
                p.kill()
                p.wait()
        for log in logs:
            log.close()
    text = "\n".join(f"--- rank {r} (exit {p.returncode}):\n" + (outdir / f"{scenario}_rank{r}.log").read_text()[-4000:]
                     for r, p in enumerate(procs))
    markers = [outdir / f"{scenario}_rank{r}.initfailed" for r in range(world)]
    init_failed = any(m.exists() for m in markers)
    for m in markers:
        m.unlink(missing_ok=True)
    return procs, text, init_failed


def launch(scenario: str, outdir: pathlib.Path, world: int = WORLD, timeout: float = 180.0) -> None:
    """Run `python test_distributed.py scenario outdir` as `world` ranks, torchrun-style. A group
    that cannot even start (e.g. the free port was taken meanwhile) is retried once, then skipped."""
    for attempt in range(2):
        procs, text, init_failed = _start(scenario, outdir, world, timeout)
        if not init_failed:
            break
    if init_failed:
        pytest.skip("could not start a 2-process gloo group on this machine:\n" + text)
    if any(p.returncode != 0 for p in procs):
        pytest.fail(f"worker processes for {scenario!r} failed or timed out:\n{text}")


# ---------------------------------------------------------------- shared data

def make_batches(seed: int = 0):
    """Global batches: (features (sum sizes, D) float64 unit rows, indices, sizes) per step, with
    duplicate indices across ranks (step 1) and within a rank (step 2)."""
    g = torch.Generator().manual_seed(seed)
    batches = []
    for t, sizes in enumerate(STEP_SIZES):
        total = sum(sizes)
        x = F.normalize(torch.randn(total, D, dtype=torch.float64, generator=g), dim=1)
        y = torch.randperm(N, generator=g)[:total]
        if t == 1:
            y[sizes[0] + 1] = y[1]  # rank 1's second sample is rank 0's second: rank 1 must win
        if t == 2:
            y[3] = y[0]             # within rank 0: the later one wins
        batches.append((x, y, list(sizes)))
    return batches


def initial_state(loss: str, dtype: torch.dtype):
    torch.manual_seed(1000 + LOSSES.index(loss))
    return NPIDLoss(N, D, K, T, MOMENTUM, loss=loss, bank_dtype=dtype, seed=4242).state_dict()


def local_part(x, y, sizes, rank):
    lo = sum(sizes[:rank])
    return x[lo:lo + sizes[rank]], y[lo:lo + sizes[rank]]


def rank_idx(y, sizes, seed, offset):
    """The documented per-rank negatives: rank r draws from Philox [seed, offset + r]."""
    parts = []
    for r in range(len(sizes)):
        _, y_r = local_part(y, y, sizes, r)
        parts.append(ops.sample_negatives(y_r, torch.tensor([seed, offset + r]), N, K))
    return torch.cat(parts)


def make_config(outdir: pathlib.Path):
    g = torch.Generator().manual_seed(7)
    cfg = {"batches": make_batches(),
           "inputs": [torch.randn(sum(STEP_SIZES[t]), D_IN, generator=g) for t in range(DDP_STEPS)],
           "init": {(loss, name): initial_state(loss, dt) for loss in LOSSES for name, dt in DTYPES.items()}}
    torch.save(cfg, outdir / "config.pt")
    return cfg


# ---------------------------------------------------------------- workers (run as a script)

def _run_steps(crit, batches, steps, rank, dtype):
    out = []
    for t in steps:
        x_all, y_all, sizes = batches[t]
        x, y = local_part(x_all, y_all, sizes, rank)
        x = x.to(dtype).clone().requires_grad_(True)
        rng_used = crit.rank_rng_state().clone()
        loss = crit(x, y)
        loss.backward()
        out.append({"loss": loss.detach().clone(), "grad": x.grad.clone(), "local_memory": crit.memory.clone(),
                    "full": crit.full_state_dict(rank0_only=False), "rng_used": rng_used,
                    "parts": {key: value.clone() for key, value in crit.loss_parts.items()}})
    return out


def _make(loss, dtype, mode, seed=999):
    return DistributedNPIDLoss(N, D, K, T, MOMENTUM, loss=loss, bank_dtype=dtype, seed=seed, mode=mode)


def worker_train(outdir, rank):
    cfg = torch.load(outdir / "config.pt", weights_only=True)
    results = {}
    for (loss, name), sd in cfg["init"].items():
        for mode in MODES:
            crit = _make(loss, DTYPES[name], mode)
            # sharded: only rank 0 passes the dict (it is broadcast); replicated: every rank does
            crit.load_full_state_dict(sd if (rank == 0 or mode == "replicated") else None)
            results[(loss, name, mode)] = _run_steps(crit, cfg["batches"], range(len(STEP_SIZES)), rank, DTYPES[name])
    results["is_main"] = is_main_process()
    results["ddp"] = {mode: _train_ddp(cfg, rank, mode) for mode in MODES}
    # Fresh banks (seed 77, nothing loaded) do not depend on the mode or the world size.
    results["fresh"] = {mode: _make("nce", torch.float32, mode, seed=77).full_state_dict(rank0_only=False)
                        for mode in MODES}
    torch.save(results, outdir / f"train_rank{rank}.pt")


def _backbone(rank):
    torch.manual_seed(rank)  # different initial weights per rank: DDP must broadcast rank 0's
    return torch.nn.Linear(D_IN, D, bias=False)


def _train_ddp(cfg, rank, mode):
    """A DDP-wrapped linear backbone trained with the loss: the real training-loop shape."""
    model = wrap_ddp(_backbone(rank), torch.device("cpu"))
    assert isinstance(model, torch.nn.parallel.DistributedDataParallel)
    crit = _make("nce", torch.float32, mode)
    crit.load_full_state_dict(cfg["init"][("nce", "float32")])
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    for t in range(DDP_STEPS):
        x_all, y_all, sizes = cfg["batches"][t]
        inputs, y = local_part(cfg["inputs"][t], y_all, sizes, rank)
        loss = crit(F.normalize(model(inputs), dim=1), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {"weight": model.module.weight.detach().clone(), "bank": crit.full_state_dict(rank0_only=False)["bank.memory"]}


def worker_ckpt_save(outdir, rank):
    cfg = torch.load(outdir / "config.pt", weights_only=True)
    for mode in MODES:
        crit = _make("nce", torch.float32, mode)
        crit.load_full_state_dict(cfg["init"][("nce", "float32")])
        _run_steps(crit, cfg["batches"], [0, 1], rank, torch.float32)
        sd = crit.full_state_dict()  # rank 0 only
        if rank == 0:
            torch.save(sd, outdir / f"ckpt_{mode}.pt")
        else:
            assert sd is None
    dist.barrier()
    os._exit(0)  # "killed": no clean shutdown of the process group


def worker_ckpt_resume(outdir, rank):
    cfg = torch.load(outdir / "config.pt", weights_only=True)
    results = {}
    for mode in MODES:
        for saved_by in MODES:
            crit = _make("nce", torch.float32, mode, seed=31337)  # loading must replace everything
            sd = torch.load(outdir / f"ckpt_{saved_by}.pt", weights_only=True) if (rank == 0 or mode == "replicated") else None
            crit.load_full_state_dict(sd)
            results[(mode, saved_by)] = _run_steps(crit, cfg["batches"], [2, 3], rank, torch.float32)
    torch.save(results, outdir / f"resume_rank{rank}.pt")


def worker_knn(outdir, rank):
    cfg = torch.load(outdir / "knn.pt", weights_only=True)
    results = {}
    for split_id, sizes in enumerate(cfg["splits"]):
        q, ql = local_part(cfg["query"], cfg["query_labels"], sizes, rank)
        for mode in MODES:
            if mode == "replicated":
                bank, offset = cfg["bank"], None
            else:
                start, end = bank_shard_range(cfg["bank"].shape[0], WORLD, rank)
                bank, offset = cfg["bank"][start:end].clone(), start
            metrics = distributed_knn_evaluate(q, ql, bank, cfg["bank_labels"], cfg["classes"], cfg["k"], T,
                                               cfg["recall_ks"], bank_offset=offset)
            scores = distributed_knn_predict(q, bank, cfg["bank_labels"], cfg["classes"], cfg["k"], T,
                                             bank_offset=offset)
            results[(split_id, mode)] = {"metrics": metrics, "scores": all_gather_varsize(scores)}
    torch.save(results, outdir / f"knn_rank{rank}.pt")


def worker_nan_z(outdir, rank):
    """Rank 1's first batch holds NaN features: in both modes both ranks must raise (none may hang
    in a collective), rank 1 naming its features, rank 0 naming rank 1. (On CUDA without
    NPID_CUDA_SYNC_CHECKS the batch is not read; rank 1's Z estimate then fails and the ranks agree
    on that instead: "the Z estimate agreed across ranks is nan".)"""
    messages = {}
    for mode in MODES:
        crit = DistributedNPIDLoss(N, D, K, T, MOMENTUM, loss="nce", seed=5, mode=mode)
        x = F.normalize(torch.randn(4, D, generator=torch.Generator().manual_seed(rank)), dim=1)
        if rank == 1:
            x[2] = float("nan")
        try:
            crit(x, torch.arange(4) + 4 * rank)
            messages[mode] = "no error"
        except (RuntimeError, ValueError) as e:
            messages[mode] = str(e)
        # After a good step (Z set), rank 1 passes a row outside the bank: both ranks stop.
        crit(F.normalize(torch.randn(4, D), dim=1), torch.arange(4) + 4 * rank)
        try:
            crit(F.normalize(torch.randn(4, D), dim=1), torch.arange(4) + (N if rank == 1 else 0))
            messages[mode + "-row"] = "no error"
        except (IndexError, ValueError) as e:
            messages[mode + "-row"] = str(e)
    torch.save(messages, outdir / f"nan_z_rank{rank}.pt")


def worker_z_modes(outdir, rank):
    """The "ema" and "batch" Z modes in both bank modes: Z per step on each rank (they must agree,
    and equal a single process fed the global batch)."""
    cfg = torch.load(outdir / "config.pt", weights_only=True)
    results = {}
    for z_mode in ("ema", "batch"):
        for mode in MODES:
            crit = DistributedNPIDLoss(N, D, K, T, MOMENTUM, loss="nce", bank_dtype=torch.float64, seed=999,
                                       mode=mode, z_mode=z_mode, z_momentum=0.7)
            crit.load_full_state_dict(cfg["init"][("nce", "float64")])
            steps = _run_steps(crit, cfg["batches"], range(len(STEP_SIZES)), rank, torch.float64)
            results[(z_mode, mode)] = [{"z": st["full"]["z"], "loss": st["loss"], "grad": st["grad"]}
                                       for st in steps]
    torch.save(results, outdir / f"z_modes_rank{rank}.pt")


SHARED_M = 50  # shared negatives: m > N (draws with replacement)


def worker_shared(outdir, rank):
    """negatives="shared" in both bank modes (exclude_positive: replicated only), NCE with the "ema"
    Z mode (first step estimated, then averaged) and softmax-CE."""
    cfg = torch.load(outdir / "config.pt", weights_only=True)
    results = {}
    for loss in ("nce", "softmax-ce"):
        for mode, exclude in (("replicated", False), ("replicated", True), ("sharded", False)):
            crit = DistributedNPIDLoss(N, D, SHARED_M, T, MOMENTUM, loss=loss, bank_dtype=torch.float64, seed=999,
                                       mode=mode, z_mode="ema", z_momentum=0.7, negatives="shared",
                                       exclude_positive=exclude)
            crit.load_full_state_dict(cfg["init"][(loss, "float64")] if (rank == 0 or mode == "replicated") else None)
            results[(loss, mode, exclude)] = _run_steps(crit, cfg["batches"], range(len(STEP_SIZES)), rank,
                                                        torch.float64)
    torch.save(results, outdir / f"shared_rank{rank}.pt")


PROXIMAL = 3.0


def worker_proximal(outdir, rank):
    """The proximal term in both bank modes, every bank loss (float64)."""
    cfg = torch.load(outdir / "config.pt", weights_only=True)
    results = {}
    for loss in LOSSES:
        for mode in MODES:
            crit = DistributedNPIDLoss(N, D, K, T, MOMENTUM, loss=loss, bank_dtype=torch.float64, seed=999,
                                       mode=mode, proximal=PROXIMAL)
            crit.load_full_state_dict(cfg["init"][(loss, "float64")] if (rank == 0 or mode == "replicated") else None)
            results[(loss, mode)] = _run_steps(crit, cfg["batches"], range(len(STEP_SIZES)), rank, torch.float64)
    torch.save(results, outdir / f"proximal_rank{rank}.pt")


WORKERS = {"proximal": worker_proximal, "shared": worker_shared, "z_modes": worker_z_modes, "train": worker_train, "ckpt_save": worker_ckpt_save, "ckpt_resume": worker_ckpt_resume,
           "knn": worker_knn, "nan_z": worker_nan_z}


def _worker_main(scenario: str, outdir: str):
    outdir = pathlib.Path(outdir)
    rank = int(os.environ["RANK"])
    torch.set_num_threads(1)
    try:
        info = init_distributed(backend="gloo")
        assert info.world_size == WORLD and info.rank == rank and info.backend == "gloo"
    except Exception as exc:  # the environment cannot run the test (no loopback, ...)
        (outdir / f"{scenario}_rank{rank}.initfailed").write_text(repr(exc))
        raise
    WORKERS[scenario](outdir, rank)
    dist.barrier()
    dist.destroy_process_group()


# ---------------------------------------------------------------- single-process expectations

def single_process_run(loss, name, init_sd, batches, steps, offset0=None, **z_args):
    """NPIDLoss fed the concatenated global batches with the ranks' negatives: per step
    (per-rank expected losses, per-rank expected grads, bank after, z)."""
    dtype = DTYPES[name]
    proximal = z_args.get("proximal", 0.0)
    ref = NPIDLoss(N, D, K, T, MOMENTUM, loss=loss, bank_dtype=dtype, seed=1, **z_args)
    ref.load_state_dict(init_sd)
    seed, offset = (int(v) for v in init_sd["rng_state"])
    offset = offset if offset0 is None else offset0
    out = []
    for t in steps:
        x_all, y_all, sizes = batches[t]
        idx = None if loss == "softmax" else rank_idx(y_all, sizes, seed, offset + WORLD * (t - steps[0]))
        bank_before = ref.memory.clone()
        z_before = ref.z.clone()
        ref(x_all.to(dtype).requires_grad_(True), y_all, idx=idx)  # estimates Z, updates the bank
        z_used = ref.z
        if z_args.get("z_mode") == "ema":  # the step's loss used the Z from before the step (first: the estimate)
            z_used = z_before.clone()
            ops.nce_estimate_z_(z_used, x_all.to(dtype), bank_before, y_all, idx=idx, temperature=T)
        xs = x_all.to(dtype).clone().requires_grad_(True)
        if loss == "nce":
            per_sample = ops.nce_loss(xs, bank_before, y_all, z_used, idx=idx, temperature=T, proximal=proximal)
        elif loss == "softmax-ce":
            per_sample = ops.softmax_ce_loss(xs, bank_before, y_all, idx=idx, temperature=T, proximal=proximal)
        else:
            per_sample = ops.full_softmax_loss(xs, bank_before, y_all, T, proximal=proximal)
        rank_losses = [local_part(per_sample, per_sample, sizes, r)[0].mean() for r in range(WORLD)]
        (grad,) = torch.autograd.grad(sum(rank_losses), xs)
        sq_dist = ((x_all.to(dtype) - bank_before[y_all].to(dtype)) ** 2).sum(1)
        out.append({"losses": [l.detach() for l in rank_losses],
                    "sq_dists": [local_part(sq_dist, sq_dist, sizes, r)[0].mean() for r in range(WORLD)],
                    "grads": [local_part(grad, grad, sizes, r)[0] for r in range(WORLD)],
                    "bank": ref.memory.clone(), "z": ref.z.clone(), "offset": offset + WORLD * (t - steps[0])})
    return out, ref


@pytest.fixture(scope="module")
def train_runs(tmp_path_factory):
    outdir = tmp_path_factory.mktemp("npid_dist_train")
    cfg = make_config(outdir)
    launch("train", outdir)
    ranks = [torch.load(outdir / f"train_rank{r}.pt", weights_only=True) for r in range(WORLD)]
    return outdir, cfg, ranks


def close(a, b, **tol):
    return torch.allclose(a.double(), b.double(), **tol)


# ---------------------------------------------------------------- tests

@pytest.mark.slow  # two worker processes, torchrun-style
@pytest.mark.parametrize("name", list(DTYPES))
@pytest.mark.parametrize("loss", LOSSES)
def test_replicated_equals_single_process(train_runs, loss, name):
    _, cfg, ranks = train_runs
    expected, _ = single_process_run(loss, name, cfg["init"][(loss, name)], cfg["batches"], list(range(len(STEP_SIZES))))
    got = [ranks[r][(loss, name, "replicated")] for r in range(WORLD)]
    tol = TOL[name]
    seed = int(cfg["init"][(loss, name)]["rng_state"][0])
    for t, exp in enumerate(expected):
        banks = [got[r][t]["local_memory"] for r in range(WORLD)]
        assert torch.equal(banks[0], banks[1]), f"step {t}: the ranks' replicated banks differ"
        assert close(banks[0], exp["bank"], **tol), f"step {t}: bank differs from the single-process run"
        assert not torch.equal(banks[0], cfg["init"][(loss, name)]["bank.memory"])
        for r in range(WORLD):
            step = got[r][t]
            assert close(step["loss"], exp["losses"][r], **tol), (t, r, step["loss"].item(), exp["losses"][r].item())
            assert close(step["grad"], exp["grads"][r], **tol), f"step {t} rank {r}: grad differs"
            assert close(step["full"]["z"], exp["z"], **tol), f"step {t} rank {r}: Z {step['full']['z']} vs {exp['z']}"
            assert close(step["full"]["bank.memory"], exp["bank"], **tol)
            if loss != "softmax":
                assert step["rng_used"].tolist() == [seed, WORLD * t + r]
    if loss == "nce":
        assert got[0][0]["full"]["z"].item() > 0
        assert got[0][0]["full"]["z"].item() == got[1][0]["full"]["z"].item(), "Z not agreed"


@pytest.mark.slow  # two worker processes, torchrun-style
@pytest.mark.parametrize("name", list(DTYPES))
@pytest.mark.parametrize("loss", LOSSES)
def test_sharded_equals_replicated(train_runs, loss, name):
    _, cfg, ranks = train_runs
    tol = TOL_SHARDED[name] if loss == "softmax" else TOL[name]
    for r in range(WORLD):
        shard = ranks[r][(loss, name, "sharded")]
        repl = ranks[r][(loss, name, "replicated")]
        start, end = bank_shard_range(N, WORLD, r)
        for t, (s, p) in enumerate(zip(shard, repl)):
            assert s["local_memory"].shape == (end - start, D)
            assert close(s["local_memory"], p["local_memory"][start:end], **tol), f"step {t} rank {r}: shard differs"
            assert close(s["full"]["bank.memory"], p["full"]["bank.memory"], **tol), f"step {t}: gathered bank differs"
            assert close(s["loss"], p["loss"], **tol), (t, r, s["loss"].item(), p["loss"].item())
            assert close(s["grad"], p["grad"], **tol), f"step {t} rank {r}: grad differs"
            assert close(s["full"]["z"], p["full"]["z"], **tol)
            assert torch.equal(s["rng_used"], p["rng_used"])
            assert torch.equal(s["full"]["rng_state"], p["full"]["rng_state"])


@pytest.mark.slow  # two worker processes, torchrun-style
def test_ddp_training_equals_single_process(train_runs):
    """DDP backbone + DistributedNPIDLoss == one process on the global batch (mean loss)."""
    _, cfg, ranks = train_runs
    assert ranks[0]["is_main"] and not ranks[1]["is_main"]
    torch.manual_seed(0)
    model = torch.nn.Linear(D_IN, D, bias=False)  # rank 0's initial weights
    initial = model.weight.detach().clone()
    ref = NPIDLoss(N, D, K, T, MOMENTUM, loss="nce")
    init = cfg["init"][("nce", "float32")]
    ref.load_state_dict(init)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    for t in range(DDP_STEPS):
        _, y_all, sizes = cfg["batches"][t]
        idx = rank_idx(y_all, sizes, int(init["rng_state"][0]), WORLD * t)
        loss = ref(F.normalize(model(cfg["inputs"][t]), dim=1), y_all, idx=idx)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert (model.weight - initial).abs().max() > 1e-3  # it trained
    for r in range(WORLD):
        for mode in MODES:
            got = ranks[r]["ddp"][mode]
            assert torch.allclose(got["weight"], model.weight, rtol=1e-5, atol=1e-6), (r, mode)
            assert torch.allclose(got["bank"], ref.memory, rtol=1e-5, atol=1e-6), (r, mode)


@pytest.mark.slow  # two worker processes, torchrun-style
def test_fresh_bank_independent_of_mode_and_world_size(train_runs):
    _, _, ranks = train_runs
    fresh = ranks[0]["fresh"]
    single = DistributedNPIDLoss(N, D, K, T, MOMENTUM, seed=77).full_state_dict()
    for mode in MODES:
        assert torch.equal(fresh[mode]["bank.memory"], single["bank.memory"]), mode
        assert torch.equal(ranks[1]["fresh"][mode]["bank.memory"], single["bank.memory"]), mode
    stdv = (3 / D) ** 0.5
    assert single["bank.memory"].abs().max() <= stdv and single["bank.memory"].std() > 0.4 * stdv


@pytest.mark.slow  # two worker processes, torchrun-style
def test_checkpoint_resume_equals_uninterrupted(train_runs):
    outdir, cfg, ranks = train_runs
    launch("ckpt_save", outdir)
    launch("ckpt_resume", outdir)
    resumed = [torch.load(outdir / f"resume_rank{r}.pt", weights_only=True) for r in range(WORLD)]
    for mode in MODES:
        final = ranks[0][("nce", "float32", mode)][-1]["full"]  # 4 uninterrupted steps
        for r in range(WORLD):
            for saved_by in MODES:
                got = resumed[r][(mode, saved_by)][-1]
                got_losses = [s["loss"] for s in resumed[r][(mode, saved_by)]]
                ref_losses = [s["loss"] for s in ranks[r][("nce", "float32", mode)][2:]]
                if saved_by == mode:  # the same operations in the same order: bit-identical
                    assert torch.equal(got["full"]["bank.memory"], final["bank.memory"]), (mode, r)
                    assert torch.equal(got["full"]["z"], final["z"]) and torch.equal(got["full"]["rng_state"], final["rng_state"])
                    assert all(torch.equal(a, b) for a, b in zip(got_losses, ref_losses))
                else:  # a checkpoint of the other mode: the same up to rounding
                    assert close(got["full"]["bank.memory"], final["bank.memory"], **TOL_SHARDED["float32"]), (mode, saved_by)
                    assert torch.equal(got["full"]["rng_state"], final["rng_state"])
                    assert all(close(a, b, **TOL_SHARDED["float32"]) for a, b in zip(got_losses, ref_losses))

    # The 2-rank checkpoint in a plain single-process NPIDLoss, continued with the global batches.
    ckpt = torch.load(outdir / "ckpt_replicated.pt", weights_only=True)
    assert set(ckpt) == set(NPIDLoss(N, D, K).state_dict())
    assert ckpt["rng_state"].tolist()[1] == 2 * WORLD
    expected, ref = single_process_run("nce", "float32", ckpt, cfg["batches"], [2, 3])
    final = ranks[0][("nce", "float32", "replicated")][-1]["full"]
    assert close(ref.memory, final["bank.memory"], **TOL["float32"])
    assert close(ref.z, final["z"], **TOL["float32"])
    sharded_ckpt = torch.load(outdir / "ckpt_sharded.pt", weights_only=True)
    assert close(sharded_ckpt["bank.memory"], ckpt["bank.memory"], **TOL_SHARDED["float32"])


@pytest.mark.slow  # two worker processes, torchrun-style
def test_distributed_knn_equals_knn_evaluate(tmp_path):
    g = torch.Generator().manual_seed(3)
    n, d, classes, k = 61, 16, 4, 5
    bank = F.normalize(torch.randn(n, d, generator=g), dim=1)
    bank_labels = torch.randint(0, classes, (n,), generator=g)
    query = F.normalize(torch.randn(13, d, generator=g), dim=1)
    query_labels = torch.randint(0, classes, (13,), generator=g)
    cfg = {"bank": bank, "bank_labels": bank_labels, "query": query, "query_labels": query_labels,
           "classes": classes, "k": k, "recall_ks": (1, 3, 100), "splits": [[7, 6], [13, 0]]}
    torch.save(cfg, tmp_path / "knn.pt")
    launch("knn", tmp_path)
    expected = knn_evaluate(query, query_labels, bank, bank_labels, classes, k, T, cfg["recall_ks"])
    expected_scores = knn_predict(query, bank, bank_labels, classes, k, T)
    assert set(expected) == {"knn_top1", "knn_top5", "nn1_top1", "recall@1", "recall@3"}
    for r in range(WORLD):
        got = torch.load(tmp_path / f"knn_rank{r}.pt", weights_only=True)
        for split_id in range(len(cfg["splits"])):
            for mode in MODES:
                res = got[(split_id, mode)]
                assert res["metrics"] == expected, (r, split_id, mode, res["metrics"], expected)
                assert torch.allclose(res["scores"], expected_scores, rtol=1e-6, atol=1e-6), (r, split_id, mode)


@pytest.mark.slow  # two worker processes, torchrun-style
def test_z_modes_agree_across_ranks_and_equal_single_process(train_runs):
    """ema and batch Z: the ranks all_reduce the step's noise statistics, so both keep the same Z,
    the one a single process computes from the global batch (the EMA of the global estimate)."""
    outdir, cfg, _ = train_runs
    launch("z_modes", outdir)
    ranks = [torch.load(outdir / f"z_modes_rank{r}.pt", weights_only=True) for r in range(WORLD)]
    for z_mode in ("ema", "batch"):
        expected, _ = single_process_run("nce", "float64", cfg["init"][("nce", "float64")], cfg["batches"],
                                         list(range(len(STEP_SIZES))), z_mode=z_mode, z_momentum=0.7)
        zs = [e["z"] for e in expected]
        assert len({float(z) for z in zs}) == len(zs), "Z must change every step in these modes"
        for mode in MODES:
            tol = TOL["float64"] if mode == "replicated" else TOL_SHARDED["float64"]
            for t, exp in enumerate(expected):
                z0, z1 = ranks[0][(z_mode, mode)][t]["z"], ranks[1][(z_mode, mode)][t]["z"]
                assert torch.equal(z0, z1), (z_mode, mode, t)  # bit-identical across ranks
                assert close(z0, exp["z"], **tol), (z_mode, mode, t, z0, exp["z"])
                for r in range(WORLD):
                    got = ranks[r][(z_mode, mode)][t]
                    assert close(got["loss"], exp["losses"][r], **tol), (z_mode, mode, t, r)
                    assert close(got["grad"], exp["grads"][r], **tol), (z_mode, mode, t, r)


def shared_single_process(loss, init_sd, batches, exclude):
    """What each rank must compute with shared negatives: its batch against its own set of rows
    drawn from [seed, offset + r] (ops.shared_negative_rows), the bank and Z before the step, Z
    agreed from the global batch's noise columns (first step: estimated; then the EMA)."""
    bank = init_sd["bank.memory"].clone()
    seed, offset = (int(v) for v in init_sd["rng_state"])
    z = None
    out = []
    for x_all, y_all, sizes in batches:
        states = [torch.tensor([seed, offset + r]) for r in range(WORLD)]
        parts = [local_part(x_all, y_all, sizes, r) for r in range(WORLD)]
        kwargs = [dict(rows=ops.shared_negative_rows(states[r], N, SHARED_M), rng_state=states[r], temperature=T,
                       exclude_positive=exclude) for r in range(WORLD)]
        one = torch.ones(1, dtype=torch.float64)
        noise = sum(ops.shared_nce_loss_and_z_stat(x, bank, y, one, **kw)[1].sum() for (x, y), kw in zip(parts, kwargs))
        estimate = noise * N / (sum(sizes) * SHARED_M)
        z_used = estimate.reshape(1).float() if z is None else z  # the module's Z buffer is float32
        losses, grads = [], []
        for (x, y), kw in zip(parts, kwargs):
            xs = x.clone().requires_grad_(True)
            if loss == "nce":
                per_sample = ops.shared_nce_loss(xs, bank, y, z_used, **kw)
            else:
                per_sample = ops.shared_softmax_ce_loss(xs, bank, y, **kw)
            losses.append(per_sample.mean().detach())
            grads.append(torch.autograd.grad(per_sample.mean(), xs)[0])
        z = (0.7 * z_used.double() + 0.3 * estimate).float()
        bank = bank.clone()
        ops.momentum_update_(bank, x_all, y_all, MOMENTUM)
        out.append({"losses": losses, "grads": grads, "bank": bank, "z": z, "offset": offset})
        offset += WORLD
    return out


@pytest.mark.slow  # two worker processes, torchrun-style
def test_shared_negatives_equal_single_process(train_runs):
    outdir, cfg, _ = train_runs
    launch("shared", outdir)
    ranks = [torch.load(outdir / f"shared_rank{r}.pt", weights_only=True) for r in range(WORLD)]
    for loss in ("nce", "softmax-ce"):
        for mode, exclude in (("replicated", False), ("replicated", True), ("sharded", False)):
            expected = shared_single_process(loss, cfg["init"][(loss, "float64")], cfg["batches"], exclude)
            for t, exp in enumerate(expected):
                for r in range(WORLD):
                    got = ranks[r][(loss, mode, exclude)][t]
                    where = (loss, mode, exclude, t, r)
                    assert int(got["rng_used"][1]) == exp["offset"] + r, where
                    assert close(got["loss"], exp["losses"][r], **TOL["float64"]), where
                    assert close(got["grad"], exp["grads"][r], **TOL["float64"]), where
                    assert close(got["full"]["bank.memory"], exp["bank"], **TOL["float64"]), where
                    if loss == "nce":
                        assert close(got["full"]["z"], exp["z"], **TOL["float64"]), where


@pytest.mark.slow  # two worker processes, torchrun-style
def test_failed_z_estimate_raises_on_every_rank(tmp_path):
    launch("nan_z", tmp_path, timeout=120.0)
    got = [torch.load(tmp_path / f"nan_z_rank{r}.pt", weights_only=True) for r in range(WORLD)]
    for mode in MODES:
        assert got[1][mode] == "features holds NaN or inf", (mode, got[1][mode])  # its own message
        assert got[0][mode].startswith("rank 1 refused its arguments"), (mode, got[0][mode])
        assert got[1][mode + "-row"].startswith(f"indices holds row {N}, outside the bank"), got[1][mode + "-row"]
        assert got[0][mode + "-row"].startswith("rank 1 refused its arguments"), got[0][mode + "-row"]


# ---------------------------------------------------------------- world size 1 (no process group)

@pytest.mark.parametrize("loss,precision", [(loss, "fp32") for loss in LOSSES] + [("softmax", "tf32"), ("softmax", "bf16")])
def test_world_size_one_is_npid_loss(loss, precision):
    """Without a process group the module is NPIDLoss: same in-kernel negatives, same Z, bank, state
    (the sharded exact softmax rebuilds the loss from the op's outputs, at every precision)."""
    torch.manual_seed(5)
    ref = NPIDLoss(N, D, K, T, MOMENTUM, loss=loss, seed=11)
    for mode in MODES:
        crit = DistributedNPIDLoss(N, D, K, T, MOMENTUM, loss=loss, seed=3, mode=mode, precision=precision)
        crit.load_full_state_dict(ref.state_dict())
        mirror = NPIDLoss(N, D, K, T, MOMENTUM, loss=loss, precision=precision)
        mirror.load_state_dict(ref.state_dict())
        g = torch.Generator().manual_seed(9)
        for _ in range(3):
            x = F.normalize(torch.randn(6, D, generator=g), dim=1)
            y = torch.randint(0, N, (6,), generator=g)
            x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
            l1, l2 = mirror(x1, y), crit(x2, y)
            l1.backward()
            l2.backward()
            assert close(l1, l2, rtol=1e-6, atol=1e-6) and close(x1.grad, x2.grad, rtol=1e-5, atol=1e-6), mode
            assert close(mirror.memory, crit.memory, rtol=1e-6, atol=1e-6)
        sd = crit.full_state_dict()
        assert torch.equal(sd["rng_state"], mirror.rng_state) and close(sd["z"], mirror.z, rtol=1e-6, atol=0)
        if mode == "replicated":  # the very same kernels on the same inputs
            assert torch.equal(sd["bank.memory"], mirror.memory)


@pytest.mark.parametrize("z_mode", ["ema", "batch"])
def test_world_size_one_z_modes_are_npid_loss(z_mode):
    torch.manual_seed(5)
    ref = NPIDLoss(N, D, K, T, MOMENTUM, loss="nce", seed=11)
    for mode in MODES:
        crit = DistributedNPIDLoss(N, D, K, T, MOMENTUM, loss="nce", seed=3, mode=mode, z_mode=z_mode, z_momentum=0.9)
        crit.load_full_state_dict(ref.state_dict())
        mirror = NPIDLoss(N, D, K, T, MOMENTUM, loss="nce", z_mode=z_mode, z_momentum=0.9)
        mirror.load_state_dict(ref.state_dict())
        g = torch.Generator().manual_seed(9)
        for _ in range(3):
            x = F.normalize(torch.randn(6, D, generator=g), dim=1)
            y = torch.randint(0, N, (6,), generator=g)
            assert close(mirror(x, y), crit(x, y), rtol=1e-6, atol=1e-6), mode
            assert close(mirror.z, crit.z, rtol=1e-6, atol=0), mode


def test_bad_arguments():
    with pytest.raises(ValueError, match="mode"):
        DistributedNPIDLoss(N, D, K, mode="mirrored")
    with pytest.raises(ValueError, match="z_mode"):
        DistributedNPIDLoss(N, D, K, z_mode="running")
    with pytest.raises(ValueError, match="z_momentum"):
        DistributedNPIDLoss(N, D, K, z_mode="ema", z_momentum=1.0)
    crit = DistributedNPIDLoss(N, D, K, seed=1)
    with pytest.raises(ValueError, match="shape"):
        crit.load_full_state_dict({"bank.memory": torch.zeros(N + 1, D), "z": torch.ones(1), "rng_state": torch.zeros(2)})
    with pytest.raises(ValueError, match="lacks"):
        crit.load_full_state_dict({"bank.memory": torch.zeros(N, D)})
    bank = F.normalize(torch.randn(10, D), dim=1)
    with pytest.raises(ValueError, match="k must be"):
        distributed_knn_evaluate(bank[:2], torch.zeros(2, dtype=torch.long), bank, torch.zeros(10, dtype=torch.long), 2, k=11)
    with pytest.raises(ValueError, match="bank_offset"):
        distributed_knn_predict(bank[:2], bank[:5], torch.zeros(10, dtype=torch.long), 2, k=3)
    assert bank_shard_range(37, 2, 0) == (0, 19) and bank_shard_range(37, 2, 1) == (19, 37)
    assert bank_shard_range(5, 4, 3) == (5, 5)  # an empty shard


if __name__ == "__main__":
    _worker_main(sys.argv[1], sys.argv[2])


@pytest.mark.slow  # two worker processes, torchrun-style
def test_proximal_term_in_both_modes_equals_single_process(tmp_path):
    """lambda > 0 with the bank replicated and sharded (the exact softmax's sharded path adds the
    term from the fetched rows itself): losses, gradients, banks and loss_parts as one process."""
    cfg = make_config(tmp_path)
    launch("proximal", tmp_path)
    ranks = [torch.load(tmp_path / f"proximal_rank{r}.pt", weights_only=True) for r in range(WORLD)]
    tol = TOL["float64"]
    for loss in LOSSES:
        expected, _ = single_process_run(loss, "float64", cfg["init"][(loss, "float64")], cfg["batches"],
                                         list(range(len(STEP_SIZES))), proximal=PROXIMAL)
        plain, _ = single_process_run(loss, "float64", cfg["init"][(loss, "float64")], cfg["batches"],
                                      list(range(len(STEP_SIZES))))
        for mode in MODES:
            for t, exp in enumerate(expected):
                assert not close(exp["losses"][0], plain[t]["losses"][0], **tol)  # the term is really there
                for r in range(WORLD):
                    step = ranks[r][(loss, mode)][t]
                    assert close(step["loss"], exp["losses"][r], **tol), (loss, mode, t, r)
                    assert close(step["grad"], exp["grads"][r], **tol), (loss, mode, t, r)
                    assert close(step["full"]["bank.memory"], exp["bank"], **tol), (loss, mode, t, r)
                    parts = step["parts"]
                    assert close(parts["positive_sq_dist"], exp["sq_dists"][r], **tol), (loss, mode, t, r)
                    assert close(parts["proximal_loss"], PROXIMAL * exp["sq_dists"][r], **tol)
                    assert close(parts["instance_loss"], plain[t]["losses"][r], **tol), (loss, mode, t, r)
