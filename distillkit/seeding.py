"""Every random stream derives from one run seed.

A stream is named by a tuple of keys, e.g. ``("real", iteration, label)``; its
generator is a pure function of ``(seed, keys)``. Nothing carries hidden RNG
state, so a resumed, re-ordered or class-sharded run draws exactly the numbers
an uninterrupted single-process run draws.
"""

from __future__ import annotations

import contextlib
import hashlib
from typing import Iterator

import torch


def derive_seed(seed: int, *keys: object) -> int:
    """A 63-bit seed from the run seed and stream keys (stable across processes and platforms)."""
    text = "/".join([str(int(seed)), *map(str, keys)])
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 1


def generator(seed: int, *keys: object) -> torch.Generator:
    """A CPU generator for the stream ``keys`` (CPU, so draws are identical on every device)."""
    return torch.Generator().manual_seed(derive_seed(seed, *keys))


@contextlib.contextmanager
def seeded(seed: int, *keys: object, device: torch.device | str | None = None) -> Iterator[None]:
    """Run code that draws from torch's global generators from the derived seed of ``(seed, keys)``,
    leaving every global generator as it was.

    The CPU generator is always seeded: it serves ``nn.Module`` init on the CPU (how
    :func:`distillkit.models.RandomEmbedder` builds, so weights do not depend on the device).
    Pass ``device`` when the block also draws on an accelerator (a module initialised
    there, dropout in a training loop there): that device's generator is seeded and
    restored too. No other generator is touched: ``torch.manual_seed`` would reseed every
    accelerator, which ``fork_rng`` does not undo, so each network built during a run
    moved the global CUDA state. Undeclared devices are not restored either, so a stray
    draw on one stays visible (the condense loop warns about it) instead of quietly
    drawing unseeded numbers.
    """
    value = derive_seed(seed, *keys)
    accelerators = _accelerators(device)
    kind = accelerators[0].type if accelerators else None
    with torch.random.fork_rng(devices=accelerators, device_type=kind):
        torch.default_generator.manual_seed(value)
        for d in accelerators:
            # a fresh generator's state, so only the state of this one device changes
            torch.get_device_module(d.type).set_rng_state(torch.Generator(d).manual_seed(value).get_state(), d)
        yield


def _accelerators(device: torch.device | str | None) -> list[torch.device]:
    """``device`` with its index made explicit (the current one if none), or nothing for the CPU."""
    if device is None or torch.device(device).type == "cpu":
        return []
    device = torch.device(device)
    if device.index is None:  # resolve now: the block may switch the current device before the restore
        device = torch.device(device.type, torch.accelerator.current_device_index())
    return [device]
