"""Checkpoints of the npid-train driver: plain data, written atomically, resumed bit for bit.

A checkpoint holds everything the next epoch depends on: the encoder, the optimizer (momentum
buffers), the NPIDLoss state (bank, Z, the Philox sampler's counter), the torch / numpy /
python (and CUDA) RNG states, the finished epoch and the per-epoch history. The learning-rate
schedule is a pure function of the epoch and the data order and augmentation of an epoch are
derived from (seed, epoch), so a run split into pieces lands exactly where one run would.

A checkpoint is data, not code: it holds tensors, str, int, float, bool, None and dicts, lists
and tuples of them only (`check_plain` refuses anything else before a byte is written), and it is
read with `torch.load(weights_only=True)`, whose unpickler builds only those types and never calls
what a file names. A file from elsewhere can therefore be opened without running anything inside
it. Format 1 (before this rule) pickled numpy's and Python's RNG states as objects and cannot be
read that way; `npid-train convert-checkpoint` rewrites such a file, which the user runs explicitly
on a file they trust, since that conversion has to unpickle it in full.
"""
from __future__ import annotations

import os
import pickle
import random
from typing import Dict, Optional

import numpy as np
import torch

FORMAT = "npid-train/2"
LEGACY_FORMAT = "npid-train/1"  # numpy / Python RNG states pickled as objects; the "format" key may be absent

# Settings that must be equal to resume a run: they fix the shapes of the saved state or the
# meaning of the bank. Others (epochs, lr, batch size, ...) may change on resume, with a warning,
# since the pieces then no longer add up to one run with the final settings.
CONFIG_KEYS = ("dataset", "arch", "low_dim", "cifar_stem", "loss", "nce_k", "nce_t", "bank_dtype",
               "train_fraction", "seed", "image_size", "width", "negatives", "exclude_positive", "holdout")
SCHEDULE_KEYS = ("epochs", "lr", "schedule", "batch_size", "momentum", "weight_decay", "nce_m", "augment", "hflip",
                 "z_mode", "z_momentum", "proximal")
# Settings added after checkpoints were first written, with the value the older runs trained with.
SCHEDULE_DEFAULTS = {"proximal": 0.0}
REQUIRED_KEYS = ("model", "criterion", "config", "args", "epoch")

_PLAIN_SCALARS = (str, int, float, bool, type(None), torch.Tensor)


def check_plain(obj, where: str = "checkpoint") -> None:
    """Raise TypeError naming the first value that weights_only loading could not rebuild (only
    tensors, str, int, float, bool, None and dicts / lists / tuples of them are written)."""
    if isinstance(obj, dict):
        for key, value in obj.items():
            if not isinstance(key, (str, int)):
                raise TypeError(f"{where}: key {key!r} is a {type(key).__name__}; checkpoints hold str or int keys")
            check_plain(value, f"{where}[{key!r}]")
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            check_plain(value, f"{where}[{i}]")
    elif not isinstance(obj, _PLAIN_SCALARS) or type(obj).__module__ not in ("builtins", "torch"):
        # (the module test refuses subclasses of the plain types, numpy's float64 among them)
        raise TypeError(f"{where} is a {type(obj).__module__}.{type(obj).__qualname__}; checkpoints hold "
                        "tensors, str, int, float, bool, None and dicts / lists / tuples of them only")


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


def save(ckpt: Dict, path: str) -> None:
    """Write a checkpoint (a dict with REQUIRED_KEYS) in FORMAT, refusing non-plain values first."""
    ckpt = {"format": FORMAT, **ckpt}
    check_plain(ckpt)
    save_atomic(ckpt, path)


def _numpy_state_plain(state) -> Dict:
    kind, keys, pos, has_gauss, cached_gaussian = state
    return {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys, dtype=np.uint32).astype(np.int64)),
            "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)}


def _python_state_plain(state) -> Dict:
    version, internal, gauss_next = state
    return {"version": int(version), "internal": torch.tensor(internal, dtype=torch.int64),
            "gauss_next": None if gauss_next is None else float(gauss_next)}


def rng_state() -> Dict:
    """The torch / numpy / python (/ CUDA) generators' states, as tensors and plain values."""
    return {"torch": torch.get_rng_state(), "numpy": _numpy_state_plain(np.random.get_state()),
            "python": _python_state_plain(random.getstate()),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: Dict) -> None:
    torch.set_rng_state(state["torch"].cpu())
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"].tolist()), p["gauss_next"]))
    if state.get("cuda") is not None and torch.cuda.is_available():
        saved = [s.cpu() for s in state["cuda"]]
        if len(saved) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(saved)
        else:  # another number of visible GPUs: restore what there is room for
            for index, s in enumerate(saved[: torch.cuda.device_count()]):
                torch.cuda.set_rng_state(s, index)


def _not_a_checkpoint(path: str, what: str) -> ValueError:
    return ValueError(f"{path} is not an npid-train checkpoint ({what}); expected a file written by "
                      f"`npid-train train` (format {FORMAT}, a dict with {', '.join(REQUIRED_KEYS)})")


def load(path: str) -> Dict:
    """Load an npid-train checkpoint onto the CPU without running anything stored in it
    (load_state_dict then copies each tensor to its module's device; the RNG states must stay
    CPU tensors). A missing, foreign, torn or unsafe file raises FileNotFoundError / ValueError
    with one line naming it."""
    if os.path.isdir(path):
        raise _not_a_checkpoint(path, "it is a directory")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle.UnpicklingError from weights_only, RuntimeError from a torn zip, ...
        refused = _refused_global(error)
        if refused is None:  # a torn file, or not a torch file at all
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise _not_a_checkpoint(path, f"torch.load cannot read it: {first}") from None
        # weights_only stopped at a global before building or calling it: the file names code or a
        # type outside tensors and plain values (format-1 checkpoints name numpy's array type).
        raise ValueError(f"{path} was not loaded: it names {refused}, which a checkpoint of format {FORMAT} never "
                         "holds, and nothing in it ran. If it is an npid-train checkpoint of format 1 from a source "
                         f"you trust, rewrite it with `npid-train convert-checkpoint {path}` (which unpickles it "
                         "in full)") from None
    if not isinstance(ckpt, dict):
        raise _not_a_checkpoint(path, f"it holds a {type(ckpt).__name__}")
    if ckpt.get("format") != FORMAT:
        raise _not_a_checkpoint(path, f"its format is {ckpt.get('format')!r}" if "format" in ckpt
                                else "it has no 'format' entry")
    missing = [k for k in REQUIRED_KEYS if k not in ckpt]
    if missing:
        raise _not_a_checkpoint(path, f"it lacks {', '.join(missing)}")
    return ckpt


def _refused_global(error: Exception) -> Optional[str]:
    """The global that weights_only refused to build ("Unsupported global: GLOBAL a.b ..."), or None
    when the load failed for another reason."""
    message = str(error)
    if not isinstance(error, pickle.UnpicklingError) or "GLOBAL " not in message:
        return None
    return message.split("GLOBAL ", 1)[1].split()[0]


def convert_legacy(path: str, output: Optional[str] = None) -> str:
    """Rewrite a format-1 checkpoint in FORMAT (in place unless `output` is given); returns the path
    written. This unpickles `path` in full, which runs any code the file names: the caller asks for
    it explicitly, for a file they trust."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in REQUIRED_KEYS):
        raise _not_a_checkpoint(path, "even unpickled in full it is not a dict with the driver's entries")
    if ckpt.get("format", LEGACY_FORMAT) == FORMAT:
        raise ValueError(f"{path} is already in format {FORMAT}: nothing to convert")
    if ckpt.get("format", LEGACY_FORMAT) != LEGACY_FORMAT:
        raise _not_a_checkpoint(path, f"its format is {ckpt['format']!r}")
    rng = ckpt["rng"]
    ckpt["rng"] = {"torch": rng["torch"], "numpy": _numpy_state_plain(rng["numpy"]),
                   "python": _python_state_plain(rng["python"]), "cuda": rng.get("cuda")}
    ckpt["args"] = {k: _plain_value(v) for k, v in dict(ckpt["args"]).items()}
    ckpt["config"] = {k: _plain_value(v) for k, v in ckpt["config"].items()}
    ckpt["history"] = [{k: _plain_value(v) for k, v in row.items()} for row in ckpt.get("history", [])]
    ckpt["format"] = FORMAT
    output = output or path
    save(ckpt, output)
    return output


def _plain_value(value):
    """numpy scalars (float(np.mean(...)) was not always applied in format 1) as Python values."""
    return value.item() if isinstance(value, np.generic) else value


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
    saved = dict(SCHEDULE_DEFAULTS, **ckpt["config"])
    return {k: (saved.get(k), config[k]) for k in SCHEDULE_KEYS if k in config and k in saved and saved[k] != config[k]}
