import os

import pytest
import torch

# The CUDA ops never sync by default (CUDA graphs, torch.compile): bad rows give NaN results.
# NPID_CUDA_SYNC_CHECKS=1 makes them check on the device, sync and raise the CPU's messages,
# which is what the bad-input tests assert on both devices.
os.environ.setdefault("NPID_CUDA_SYNC_CHECKS", "1")

import npid_kernels  # noqa: F401  (loads the compiled ops)
from npid_kernels import ops

HAS_CUDA = ops.cuda_available()

# "emu": the CUDA code on the CPU emulator (tests/emulation.py), tensors on the CPU.
DEVICES = [
    "cpu",
    "emu",
    pytest.param("cuda", marks=pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU visible (or the extension was built CPU-only)")),
]
if os.environ.get("NPID_TEST_DEVICES"):
    DEVICES = [d for d in DEVICES if getattr(d, "values", (d,))[0] in os.environ["NPID_TEST_DEVICES"].split(",")]


@pytest.fixture(scope="session")
def emulated_cuda():
    """Loads the emulated CUDA library (building it the first time, a few minutes)."""
    import emulation

    return emulation.load()


@pytest.fixture(params=DEVICES)
def device(request):
    if request.param != "emu":
        yield request.param
        return
    request.getfixturevalue("emulated_cuda")
    with ops._calls_into("npid_emu"):
        yield "cpu"


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| in float64 (0 when both are zero)."""
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    denom = e.norm().item()
    diff = (a - e).norm().item()
    return diff / denom if denom > 0 else diff


def unit_rows(*shape, dtype=torch.float64, device="cpu", generator=None):
    x = torch.randn(*shape, dtype=torch.float64, generator=generator)
    return torch.nn.functional.normalize(x, dim=-1).to(dtype=dtype, device=device)
