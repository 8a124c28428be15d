"""Randomness: derived streams, and blocks that draw from torch's global generators without moving them."""

from __future__ import annotations

import pytest
import torch

from distillkit import registry
from distillkit.condense import Condenser
from distillkit.config import parse_sets, resolve
from distillkit.data import load_split, resolve_root
from distillkit.seeding import derive_seed, seeded
from distillkit.models import random_embedder

#: the CUDA cases run only where CUDA is; a skip here is a case not run, not a pass
DEVICES = [pytest.param("cpu"),
           pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))]


@pytest.fixture(scope="module")
def mnist():
    registry.load_plugins()
    return load_split(registry.create("datasets", "mnist"), resolve_root(), train=True)


def _global_states(device: str) -> list[torch.Tensor]:
    """Every global generator a run on ``device`` could move: the CPU one and each CUDA device's."""
    return [torch.get_rng_state()] + (torch.cuda.get_rng_state_all() if device == "cuda" else [])


def _assert_unchanged(before: list[torch.Tensor], device: str) -> None:
    after = _global_states(device)
    assert len(after) == len(before) and all(torch.equal(a, b) for a, b in zip(before, after))


@pytest.mark.parametrize("device", DEVICES)
def test_seeded_seeds_the_cpu_and_the_named_device_and_restores_both(device):
    before = _global_states(device)
    cpu = torch.Generator().manual_seed(derive_seed(3, "init"))
    on_device = cpu if device == "cpu" else torch.Generator(device).manual_seed(derive_seed(3, "init"))
    expected = [torch.rand(5, generator=cpu), torch.rand(5, device=device, generator=on_device)]
    for _ in range(2):  # the same keys draw the same numbers, on the CPU and on the device
        with seeded(3, "init", device=device):
            drawn = [torch.rand(5), torch.rand(5, device=device)]
        assert all(torch.equal(a, b) for a, b in zip(drawn, expected))
        _assert_unchanged(before, device)
    with seeded(3, "other", device=device):
        assert not torch.equal(torch.rand(5), expected[0])
    _assert_unchanged(before, device)


@pytest.mark.parametrize("device", DEVICES)
def test_random_networks_and_condense_iterations_leave_global_generators_alone(mnist, device, one_thread):
    """DM builds a new random network every iteration: none of them may move torch's global generators
    (on CUDA, ``torch.manual_seed`` inside ``seeded`` used to reseed every device and never restore them)."""
    real = mnist.restricted(None, device)
    before = _global_states(device)
    embed = random_embedder("convnet3_w32", real.spec, 0, "encoder", 0, device=device)
    with torch.no_grad():
        embed(real.images[:2])
    _assert_unchanged(before, device)

    cfg = resolve(registry.create("methods", "dm"), "mnist", 1, {"iterations": 3, "batch_real": 8},
                  parse_sets(["sampler.model=convnet3_w32"]))
    condenser = Condenser(cfg, real, torch.device(device))
    condenser.initialize()
    start = condenser.param.stored().clone()
    for _ in range(3):
        condenser.run_iteration()
    assert not torch.equal(condenser.param.stored(), start)  # the iterations really ran
    _assert_unchanged(before, device)
