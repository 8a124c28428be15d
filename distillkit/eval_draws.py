"""The random numbers of evaluation training, drawn on the host in blocks of epochs (:class:`Draws`).

Each run draws its shuffling, augmentation and CutMix from its own streams ``(seed, kind, model, run,
block)``, in a few large draws per block copied to the device once, so a run's numbers never depend on
which runs share its stack, and the training loop (:mod:`distillkit.engine`) never syncs with the host.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from torch import Tensor

from distillkit import devices
from distillkit.augment import Augment, AugmentParams
from distillkit.seeding import derive_seed, generator


class DrawSettings(Protocol):
    """What the draws read of a protocol (:class:`distillkit.engine.TrainingProtocol`)."""

    op_per: str
    cutmix_prob: float
    cutmix_beta: float

#: random numbers are drawn for this many sample-epochs at once (fewer, larger host draws; a pure
#: function of the set size, so results never depend on the device)
DRAW_SAMPLES = 16384
MAX_DRAW_EPOCHS = 32


def epochs_per_draw(n: int) -> int:
    return max(1, min(MAX_DRAW_EPOCHS, DRAW_SAMPLES // n))


@dataclass(frozen=True)
class Draws:
    """The random numbers of ``K`` consecutive epochs for ``R`` runs, on the device.

    Drawn on the CPU from each run's streams ``(seed, kind, model, run, block)``.
    """

    order: Tensor  # (R, K, n) sample index at each position of each epoch
    group: Tensor  # (R, K, n) augmentation group of each position: r * K * n + k * n + j
    augment: AugmentParams | None  # one group per (run, epoch, position)
    geometric: list[list[int]] | None  # per epoch and batch: samples of all runs that drew a geometric op
    mix: Tensor | None  # (R, K, n) CutMix partner position (inside the same batch)
    box: Tensor | None  # (R, K, batches, 4) CutMix box y0, y1, x0, x1 (empty where CutMix is off)
    kept: Tensor | None  # (R, K, batches) weight of the own label (1 where CutMix is off)


def draw(protocol: DrawSettings, aug: Augment, run_ids: list[int], seed: int, model: str, block: int,
         epochs: int, hw: tuple[int, int], bounds: list[tuple[int, int]], device: torch.device) -> Draws:
    """The random numbers of ``epochs`` epochs starting at ``block * epochs_per_draw(n)``, one stream per run."""
    h, w = hw
    n = bounds[-1][1]
    order = torch.stack([torch.rand(epochs, n, generator=generator(seed, "eval-shuffle", model, r, block))
                         .argsort(dim=1) for r in run_ids])
    group = torch.arange(order.numel(), device=device).view(order.shape)
    params, geometric = None, None
    if aug.mode != "none":
        # op_per "batch": the op (dsa) or geometric op (idc) of a batch is one draw, as in the references
        batch_of = torch.bucketize(torch.arange(n), torch.tensor([e for _, e in bounds]), right=True)
        op_groups = ((torch.arange(epochs) * len(bounds)).view(-1, 1) + batch_of).flatten() \
            if protocol.op_per == "batch" else None
        cpu = aug.draw_groups([generator(seed, "eval-augment", model, r, block) for r in run_ids], h, w,
                              groups=epochs * n, op_groups=op_groups)
        drew = cpu.geometric.view(len(run_ids), epochs, n)
        geometric = [[int(drew[:, k, s:e].sum()) for s, e in bounds] for k in range(epochs)]  # host, no sync
        params = cpu.to(device)
    if protocol.cutmix_prob <= 0:
        return Draws(devices.to_device(order, device), group, params, geometric, None, None, None)
    mix, box, kept = zip(*(_draw_cutmix(protocol, np.random.default_rng(derive_seed(seed, "eval-cutmix", model, r,
                                                                                block)), epochs, h, w, bounds)
                           for r in run_ids))
    as_device = lambda arrays: devices.to_device(torch.from_numpy(np.stack(arrays)), device)  # noqa: E731
    return Draws(devices.to_device(order, device), group, params, geometric, as_device(mix), as_device(box),
                  as_device(kept).float())

def _draw_cutmix(protocol: DrawSettings, rng: np.random.Generator, epochs: int, h: int, w: int, bounds: list[tuple[int, int]]
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per epoch and batch, with probability ``cutmix_prob``: a box of area ``1 - lam`` (lam ~ Beta(beta, beta))
    at a uniform centre, and a partner order inside the batch."""
    shape = (epochs, len(bounds))
    apply = rng.random(shape) < protocol.cutmix_prob
    lam = rng.beta(protocol.cutmix_beta, protocol.cutmix_beta, shape)
    cy, cx = rng.integers(h, size=shape), rng.integers(w, size=shape)
    partner = np.stack([np.concatenate([s + rng.permutation(e - s) for s, e in bounds]) for _ in range(epochs)])
    cut = np.sqrt(1 - lam)
    half_h, half_w = (cut * h).astype(np.int64) // 2, (cut * w).astype(np.int64) // 2
    box = np.stack([np.clip(cy - half_h, 0, h), np.clip(cy + half_h, 0, h),
                    np.clip(cx - half_w, 0, w), np.clip(cx + half_w, 0, w)], -1) * apply[..., None]
    kept = 1 - (box[..., 1] - box[..., 0]) * (box[..., 3] - box[..., 2]) / (h * w)
    return partner, box, kept

def cutmix(xs: Tensor, ys: Tensor, draws: Draws, k: int, b: int, s: int, e: int
            ) -> tuple[Tensor, Tensor, Tensor]:
    """Paste each run's box from its partner images; returns images, partner labels, own-label weights."""
    r, size, _, h, w = xs.shape
    partner = draws.mix[:, k, s:e] - s  # (R, B) positions inside this batch
    y0, y1, x0, x1 = (v.view(r, 1, 1) for v in draws.box[:, k, b].unbind(-1))
    rows = torch.arange(h, device=xs.device).view(1, h, 1)
    cols = torch.arange(w, device=xs.device).view(1, 1, w)
    box = (rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1)
    shuffled = torch.gather(xs, 1, partner.view(r, size, 1, 1, 1).expand_as(xs))
    mixed = torch.where(box.view(r, 1, 1, h, w), shuffled, xs)
    return mixed, torch.gather(ys, 1, partner), draws.kept[:, k, b].view(r, 1)
