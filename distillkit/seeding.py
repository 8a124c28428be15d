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
def seeded(seed: int, *keys: object) -> Iterator[None]:
    """Run code that draws from torch's global RNG (e.g. ``nn.Module`` init) from a derived seed,
    leaving the global state as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, *keys))
        yield
