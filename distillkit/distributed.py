"""Class sharding with torch.distributed (launched by ``torchrun``).

DM and M3D are separable by class: a class's synthetic images depend only on
that class's real images and on random streams keyed by ``(seed, iteration,
class)``. So each rank optimises a subset of the classes (``c % world == rank``)
and the pieces are merged exactly: parameterization and optimizer tensors are
class-major along dim 0 (see :class:`~distillkit.interfaces.Parameterization`),
each rank zeroes the rows it does not own, and a SUM all-reduce reassembles the
whole tensor bit for bit (``x + 0 = x``). Backend: nccl on CUDA, gloo on CPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.size > 1

    def owned(self, num_classes: int) -> list[int] | None:
        """The classes this rank optimises (None: all, single process)."""
        return [c for c in range(num_classes) if c % self.size == self.rank] if self.active else None

    def share(self, jobs: Sequence[Any]) -> list[Any]:
        """This rank's slice of a job list (round-robin)."""
        return list(jobs[self.rank::self.size])


def world(device: torch.device) -> World:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1); a no-op otherwise."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend)
    return World(dist.get_rank(), dist.get_world_size())


def merge_class_rows(tensor: torch.Tensor, owned: Sequence[int], num_classes: int) -> torch.Tensor:
    """Reassemble a class-major tensor from every rank's owned rows (exact)."""
    rows = tensor.shape[0] // num_classes
    mask = torch.zeros(num_classes, dtype=torch.bool, device=tensor.device)
    mask[list(owned)] = True
    mine = torch.where(mask.repeat_interleave(rows).view(-1, *([1] * (tensor.dim() - 1))), tensor,
                       torch.zeros_like(tensor))
    dist.all_reduce(mine, op=dist.ReduceOp.SUM)
    return mine


def merge_state(state: Any, owned: Sequence[int], num_classes: int) -> Any:
    """Merge every class-major tensor inside a (nested) state dict; other values pass through."""
    if isinstance(state, torch.Tensor) and state.dim() > 0 and state.shape[0] % num_classes == 0:
        return merge_class_rows(state, owned, num_classes)
    if isinstance(state, dict):
        return {k: merge_state(v, owned, num_classes) for k, v in state.items()}
    if isinstance(state, list):
        return [merge_state(v, owned, num_classes) for v in state]
    return state


def sum_across(tensor: torch.Tensor) -> torch.Tensor:
    out = tensor.clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def sum_gradients(parameters: Sequence[torch.Tensor]) -> None:
    """Replace each parameter's gradient by its sum over the ranks (a missing one counts as zeros), in one
    all-reduce of the flattened gradients."""
    if not parameters:  # an objective that learns nothing this run (e.g. NCFM without its sampling network)
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in parameters]
    flat = torch.cat([g.flatten() for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    for p, total in zip(parameters, flat.split([g.numel() for g in grads])):
        p.grad = total.view_as(p)


def merge_dicts(mine: dict) -> dict:
    """Every rank's dict merged into one, on every rank (small Python objects: results, not tensors)."""
    parts: list[dict | None] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, mine)
    return {key: value for part in parts for key, value in part.items()}


def any_across(flag: bool, device: torch.device) -> bool:
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())
