"""Host-to-device moves that never make the host wait."""

from __future__ import annotations

import torch
from torch import Tensor


def to_device(t: Tensor, device: torch.device | str) -> Tensor:
    """``t`` on ``device``: from pinned memory and asynchronously on CUDA (a pageable ``.to`` waits for the
    stream), unchanged if it is there already. Safe to drop ``t`` right after: the pinned staging block is
    held by torch's host allocator until the copy is done."""
    device = torch.device(device)
    if t.device == device:
        return t
    if device.type == "cuda" and t.device.type == "cpu":
        t = t.pin_memory()
    return t.to(device, non_blocking=True)
