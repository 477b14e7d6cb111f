"""NPIDLoss and DistributedNPIDLoss (world size 1, replicated and sharded) against the values
recorded in tests/data/loss_golden.pt (tests/loss_golden.py): losses, gradients, banks, Z and
sampler states bit for bit, the state dicts' keys, and a recorded state dict loaded into a fresh
module continuing exactly as the module that saved it."""
import pytest
import torch

import loss_golden as G


@pytest.fixture(scope="module")
def golden():
    return torch.load(G.PATH, weights_only=True)


@pytest.fixture(scope="module")
def process_group():
    with G.single_process_group():
        yield


def _expect_equal(golden, prefix, t, got):
    """Step t's outputs against the recorded ones (stacked over the steps)."""
    for key, value in got.items():
        expected = golden[f"{prefix}/{key}"][t]
        assert value.dtype == expected.dtype and torch.equal(value, expected), f"{prefix} step {t}: {key} differs"


CASES = [(p, c) for p in G.PLACEMENTS for c in G.CASES if G.applies(c, p)]


@pytest.mark.parametrize("placement,case", CASES)
def test_steps_bit_identical(golden, process_group, placement, case):
    crit = G.make(case, placement)
    for t in range(G.STEPS):
        _expect_equal(golden, f"{placement}/{case}", t, G.step(crit, case, t))


@pytest.mark.parametrize("placement,case", CASES)
def test_recorded_state_dict_loads_and_continues(golden, process_group, placement, case):
    prefix = f"{placement}/{case}/state_dict/"
    saved = {k[len(prefix):]: v for k, v in golden.items() if k.startswith(prefix)}
    crit = G.make(case, placement, seed=G.SEED + 1)
    assert list(crit.state_dict()) == list(saved)
    crit.load_state_dict(saved)
    for t in range(G.SAVED_AFTER, G.STEPS):
        _expect_equal(golden, f"{placement}/{case}", t, G.step(crit, case, t))


def test_drawn_seed(golden):
    """seed=None: the bank is initialised from torch's global generator, then the seed drawn from it."""
    torch.manual_seed(3)
    assert torch.equal(G.NPIDLoss(G.N, G.D, G.K).rng_state, golden["local/seed-drawn/rng_state"])
