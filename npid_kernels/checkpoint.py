"""Checkpoints of the npid-train driver: written atomically, resumed bit for bit.

A checkpoint holds everything the next epoch depends on: the encoder, the optimizer (momentum
buffers), the NPIDLoss state (bank, Z, the Philox sampler's counter), the torch / numpy /
python (and CUDA) RNG states, the finished epoch and the per-epoch history. The learning-rate
schedule is a pure function of the epoch and the data order and augmentation of an epoch are
derived from (seed, epoch), so a run split into pieces lands exactly where one run would.
"""
from __future__ import annotations

import os
import random
from typing import Dict

import numpy as np
import torch

FORMAT = "npid-train/1"

# Settings that must be equal to resume a run: they fix the shapes of the saved state or the
# meaning of the bank. Others (epochs, lr, batch size, ...) may change on resume, with a warning,
# since the pieces then no longer add up to one run with the final settings.
CONFIG_KEYS = ("dataset", "arch", "low_dim", "cifar_stem", "loss", "nce_k", "nce_t", "bank_dtype",
               "train_fraction", "seed", "image_size", "width", "negatives", "exclude_positive")
SCHEDULE_KEYS = ("epochs", "lr", "schedule", "batch_size", "momentum", "weight_decay", "nce_m", "augment", "hflip",
                 "z_mode", "z_momentum")


def save_atomic(obj, path: str, write=torch.save) -> None:
    """write(obj, file) (torch.save; json.dump for text) to a temporary file beside `path`, then
    rename over it: a run killed while saving leaves the previous file intact, never a torn one
    (scripts take an existing results.json as "this run has finished")."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp.{os.getpid()}")
    try:
        with open(tmp, "wb" if write is torch.save else "w") as f:
            write(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def rng_state() -> Dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: Dict) -> None:
    torch.set_rng_state(state["torch"].cpu())
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        saved = [s.cpu() for s in state["cuda"]]
        if len(saved) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(saved)
        else:  # another number of visible GPUs: restore what there is room for
            for index, s in enumerate(saved[: torch.cuda.device_count()]):
                torch.cuda.set_rng_state(s, index)


def load(path: str) -> Dict:
    """Load an npid-train checkpoint onto the CPU (load_state_dict then copies each tensor to
    its module's device; the RNG states must stay CPU byte tensors), with a clear error for a
    missing or foreign file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # a torn or non-torch file
        raise ValueError(f"cannot read checkpoint {path!r}: {error}") from error
    required = ("model", "criterion", "config", "args", "epoch")
    if not isinstance(ckpt, dict) or ckpt.get("format", FORMAT) != FORMAT or any(k not in ckpt for k in required):
        raise ValueError(f"{path!r} is not an npid-train checkpoint (expected a dict with {', '.join(required)})")
    return ckpt


def check_compatible(ckpt: Dict, config: Dict, num_data: int, path: str) -> None:
    """Raise ValueError when the checkpoint was written by another configuration or for a
    dataset of another size."""
    saved = ckpt["config"]
    # (keys a checkpoint lacks, written by an earlier version of the driver, are not compared)
    mismatch = {k: (saved[k], v) for k, v in config.items() if k in CONFIG_KEYS and k in saved and saved[k] != v}
    if mismatch:
        detail = ", ".join(f"{k}: {a!r} in the checkpoint, {b!r} now" for k, (a, b) in mismatch.items())
        raise ValueError(f"{path} was written by another configuration ({detail}); "
                         "use another --out-dir or the same settings")
    check_bank_rows(ckpt, num_data, path)


def check_bank_rows(ckpt: Dict, num_data: int, path: str) -> None:
    """Raise ValueError when the checkpoint's bank does not have one row per training image."""
    rows = ckpt["criterion"]["bank.memory"].shape[0]
    if rows != num_data:
        raise ValueError(f"{path}: the checkpoint's bank has {rows} rows but the dataset has {num_data} "
                         "training images (another dataset, split or --train-fraction?)")


def changed_schedule(ckpt: Dict, config: Dict) -> Dict:
    """Settings that differ from the checkpoint's but may change on resume."""
    saved = ckpt["config"]
    return {k: (saved.get(k), config[k]) for k in SCHEDULE_KEYS if k in config and k in saved and saved[k] != config[k]}
