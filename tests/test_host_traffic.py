"""The condense loop's steady state does a fixed, small amount of host work per iteration (issue 20).

What used to creep in: a random network built on the CPU and moved every iteration, a blocking copy of
each class's real-batch indices, class indices turned from a Python list into a device tensor per
decode, normalisation constants built per batch. Counted here per iteration, on the CPU, for DM and
M3D: ``torch.Generator`` constructions (exactly one per class and random stream the loop draws),
``nn.Module`` constructions (none) and tensors made from Python lists or tuples (none). On a CUDA
machine the same iterations also count host -> device copies (a small constant, whatever the number
of classes) under ``torch.cuda.set_sync_debug_mode("error")``, which raises on any synchronising call.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from typing import Iterator

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from distillkit import registry
from distillkit.condense import Condenser
from distillkit.config import parse_sets, resolve
from distillkit.data import load_split, resolve_root

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]
#: host -> device copies one iteration may make on CUDA, whatever the number of classes and chunks: the
#: augmentation parameters, the real batches' rows, the synthetic picks, the extractor's packed weights
COPIES_PER_ITERATION = 4


@pytest.fixture(scope="module")
def mnist():
    registry.load_plugins()
    return load_split(registry.create("datasets", "mnist"), resolve_root(), train=True)


class _HostToDeviceCopies(TorchDispatchMode):
    """Counts copies from the CPU to another device (``.to``, ``copy_``) dispatched while active."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is torch.ops.aten._to_copy.default:
            source, target = args[0].device, out.device
        elif func is torch.ops.aten.copy_.default:
            source, target = args[1].device, args[0].device
        else:
            return out
        self.count += source.type == "cpu" and target.type != "cpu"
        return out


@contextlib.contextmanager
def _counting(monkeypatch: pytest.MonkeyPatch) -> Iterator[Counter]:
    """Counts generator and module constructions and tensors made from Python lists or tuples."""
    counts: Counter = Counter()
    real_generator, real_module_init = torch.Generator, nn.Module.__init__
    real_tensor, real_as_tensor = torch.tensor, torch.as_tensor

    class CountedGenerator(real_generator):
        def __init__(self, *args, **kwargs) -> None:
            counts["generators"] += 1
            super().__init__(*args, **kwargs)

    def module_init(self, *args, **kwargs) -> None:
        counts["modules"] += 1
        real_module_init(self, *args, **kwargs)

    def from_python(make):
        def made(data, *args, **kwargs):
            counts["from_lists"] += isinstance(data, (list, tuple))
            return make(data, *args, **kwargs)
        return made

    with monkeypatch.context() as patch:
        patch.setattr(torch, "Generator", CountedGenerator)
        patch.setattr(nn.Module, "__init__", module_init)
        patch.setattr(torch, "tensor", from_python(real_tensor))
        patch.setattr(torch, "as_tensor", from_python(real_as_tensor))
        yield counts


def _condenser(mnist, device: str, method: str, **options) -> Condenser:
    cfg = resolve(registry.create("methods", method), "mnist", 2, {"iterations": 8, "batch_real": 8, **options},
                  parse_sets(["sampler.model=convnet3_w32"]))
    condenser = Condenser(cfg, mnist.restricted(None, device), torch.device(device))
    condenser.initialize()
    condenser.run_iteration()  # the first iteration builds what the run keeps (network, constants)
    return condenser


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method, options, streams", [
    ("dm", {}, ("real", "augment")),
    ("dm", {"batch_syn": 1, "real_chunk": 4}, ("real", "augment", "syn")),
    ("m3d", {}, ("real", "augment")),  # factor 2 at IPC 2: 8 decoded images per class, all trained
])
def test_steady_state_iterations_make_no_networks_no_list_tensors_and_one_generator_per_stream(
        mnist, monkeypatch, one_thread, device, method, options, streams):
    condenser = _condenser(mnist, device, method, **options)
    iterations = 6  # M3D redraws its network at iteration 5: a redraw builds nothing either
    with _counting(monkeypatch) as counts, _on_cuda_no_syncs_and_copies_counted(device) as copies:
        for _ in range(iterations):
            condenser.run_iteration()
    assert condenser.iteration == 1 + iterations
    per_iteration = len(condenser.classes) * len(streams)
    assert (counts["generators"], counts["modules"], counts["from_lists"]) == (iterations * per_iteration, 0, 0)
    if device == "cuda":
        assert copies.count <= iterations * COPIES_PER_ITERATION, copies.count


@contextlib.contextmanager
def _on_cuda_no_syncs_and_copies_counted(device: str) -> Iterator[_HostToDeviceCopies | None]:
    if device != "cuda":
        yield None
        return
    torch.cuda.set_sync_debug_mode("error")
    try:
        with _HostToDeviceCopies() as copies:
            yield copies
    finally:
        torch.cuda.set_sync_debug_mode("default")
