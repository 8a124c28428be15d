"""Differentiable augmentation (DSA ops) in two composition modes, batched on the device.

Ops act on normalised images. Parameters are drawn per *group* from an explicit
generator, then every sample of a group gets its group's parameters:

* condensation (Siamese): a group is one class's real + synthetic batch, so
  both see the same op with the same parameters;
* evaluation: every sample is its own group.

Modes (see ``method-notes.md`` section 5):

* ``dsa``: one op per group, chosen uniformly from the strategy's tokens; with
  ``op_groups``, groups of one op group share the choice (the DC reference picks one
  op per call, i.e. per training batch, and draws its parameters per sample:
  ``DiffAugment`` with ``aug_mode='S'`` in VICO-UoE/DatasetCondensation utils.py);
* ``idc``: ``flip`` and ``color`` always (if listed), then one of the listed
  geometric ops (crop/scale/rotate), then ``cutout`` (if listed);
* ``none``: identity.

Parameters are drawn on the CPU and packed in one float32 buffer, so they reach
a device in one copy. All geometric ops share one batched ``affine_grid``/
``grid_sample`` (at most one is active per group in both modes), run only on
the samples whose group drew one; integer crop shifts land on pixel centres, so
bilinear sampling copies pixels exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from distillkit.errors import UsageError
from distillkit.devices import to_device

TOKENS = ("color", "crop", "cutout", "flip", "scale", "rotate")
GEOMETRIC = ("crop", "scale", "rotate")
MODES = ("dsa", "idc", "none")

SCALE_RATIO = 1.2
ROTATE_DEGREES = 15.0
CROP_FRACTION = 0.125
CUTOUT_FRACTION = 0.5

# Columns of AugmentParams.values: flags as 0/1, pixel centres as integers (exact in float32).
FLIP, COLOR, BRIGHTNESS, SATURATION, CONTRAST, IS_GEOMETRIC = range(6)
THETA = slice(6, 12)  # the (2, 3) affine matrix, row-major
CUTOUT = 12
CUTOUT_CENTER = slice(13, 15)  # (y, x)
COLUMNS = 15


@dataclass(frozen=True)
class AugmentParams:
    """Per-group parameters: row ``g`` of ``values`` (G, COLUMNS) holds every parameter of group ``g``.

    One buffer, so a host-to-device move is a single copy; the named fields are views of it.
    """

    values: Tensor

    @property
    def flip(self) -> Tensor:
        return self.values[:, FLIP] != 0

    @property
    def color(self) -> Tensor:
        return self.values[:, COLOR] != 0

    @property
    def brightness(self) -> Tensor:
        return self.values[:, BRIGHTNESS]

    @property
    def saturation(self) -> Tensor:
        return self.values[:, SATURATION]

    @property
    def contrast(self) -> Tensor:
        return self.values[:, CONTRAST]

    @property
    def geometric(self) -> Tensor:
        return self.values[:, IS_GEOMETRIC] != 0

    @property
    def theta(self) -> Tensor:
        return self.values[:, THETA].unflatten(1, (2, 3))

    @property
    def cutout(self) -> Tensor:
        return self.values[:, CUTOUT] != 0

    @property
    def cutout_center(self) -> Tensor:
        return self.values[:, CUTOUT_CENTER].long()

    def geometric_count(self, group: Tensor) -> int:
        """How many samples of a batch with groups ``group`` draw a geometric op (on the host: call it on
        the CPU parameters, before they move, to tell :meth:`Augment.apply` without waiting for a device)."""
        return int(self.geometric[group].sum())

    def to(self, device: torch.device | str) -> "AugmentParams":
        """These parameters on ``device``, in one copy (asynchronous from pinned memory on CUDA)."""
        values = to_device(self.values, device)
        return self if values is self.values else AugmentParams(values)


@dataclass(frozen=True)
class Augment:
    """An augmentation policy: a composition ``mode`` over the ops named in ``strategy`` (``"color_crop_cutout"``)."""

    mode: str = "dsa"
    strategy: str = "color_crop_cutout_flip_scale_rotate"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise UsageError(f"unknown augmentation mode {self.mode!r}; choose one of: {', '.join(MODES)}")
        bad = [t for t in self.tokens if t not in TOKENS]
        if bad:
            raise UsageError(f"unknown augmentation op {bad[0]!r} in {self.strategy!r}; ops: {', '.join(TOKENS)}")

    @property
    def tokens(self) -> tuple[str, ...]:
        return tuple(t for t in self.strategy.split("_") if t) if self.mode != "none" else ()

    def draw(self, groups: int, generator: torch.Generator, height: int, width: int,
             op_groups: Tensor | None = None) -> AugmentParams:
        """Draw parameters for ``groups`` groups on the CPU (a fixed number of draws, whatever is active).

        ``op_groups`` (``groups`` integers in ``[0, M)``, CPU): groups with the same index share the op
        choice (``dsa``'s op; ``idc``'s geometric op); their parameters stay their own. Without it, every
        group chooses alone (the same numbers as ``op_groups=torch.arange(groups)``).
        """
        g, n = generator, groups
        choices = n
        if op_groups is not None:
            if tuple(op_groups.shape) != (n,) or (n and int(op_groups.min()) < 0):
                raise ValueError(f"op_groups must be {n} indices >= 0, got shape {tuple(op_groups.shape)}")
            choices = int(op_groups.max()) + 1 if n else 0
        share = lambda c: c if op_groups is None else c[op_groups]  # noqa: E731  one choice per op group
        u = torch.rand(n, 9, generator=g)
        shift_max = round(CROP_FRACTION * height), round(CROP_FRACTION * width)
        shifts = torch.stack([torch.randint(-s, s + 1, (n,), generator=g) for s in shift_max], 1)
        side = round(CUTOUT_FRACTION * height), round(CUTOUT_FRACTION * width)
        centres = torch.stack([torch.randint(0, dim + (1 - s % 2), (n,), generator=g)
                               for dim, s in zip((height, width), side)], 1)
        tokens = self.tokens
        if self.mode == "dsa" and tokens:
            chosen = share(torch.randint(len(tokens), (choices,), generator=g))
            active = {t: chosen == i for i, t in enumerate(tokens)}
        else:
            geometric = [t for t in tokens if t in GEOMETRIC]
            pick = share(torch.randint(max(len(geometric), 1), (choices,), generator=g))
            active = {t: torch.full((n,), t in tokens) for t in ("flip", "color", "cutout")}
            active.update({t: pick == i for i, t in enumerate(geometric)})
        off = torch.zeros(n, dtype=torch.bool)
        is_ = lambda t: active.get(t, off)  # noqa: E731

        # One affine matrix per group: scale, rotation or integer translation (identity if none).
        sx = u[:, 3] * (SCALE_RATIO - 1 / SCALE_RATIO) + 1 / SCALE_RATIO
        sy = u[:, 4] * (SCALE_RATIO - 1 / SCALE_RATIO) + 1 / SCALE_RATIO
        angle = (u[:, 5] - 0.5) * 2 * math.radians(ROTATE_DEGREES)
        eye = torch.eye(2, 3).expand(n, 2, 3)
        scale = torch.zeros(n, 2, 3)
        scale[:, 0, 0], scale[:, 1, 1] = sx, sy
        rotate = torch.zeros(n, 2, 3)
        rotate[:, 0, 0], rotate[:, 0, 1] = angle.cos(), angle.sin()
        rotate[:, 1, 0], rotate[:, 1, 1] = -angle.sin(), angle.cos()
        crop = eye.clone()
        crop[:, 0, 2] = shifts[:, 1] * 2.0 / width
        crop[:, 1, 2] = shifts[:, 0] * 2.0 / height
        sel = lambda t: is_(t).view(n, 1, 1)  # noqa: E731
        theta = torch.where(sel("scale"), scale, torch.where(sel("rotate"), rotate, torch.where(sel("crop"), crop, eye)))

        column = lambda t: t.float().view(n, -1)  # noqa: E731
        return AugmentParams(torch.cat([
            column(is_("flip") & (u[:, 0] < 0.5)),  # FLIP
            column(is_("color")),  # COLOR
            column(u[:, 1] - 0.5),  # BRIGHTNESS
            column(u[:, 2] * 2),  # SATURATION
            column(u[:, 6] + 0.5),  # CONTRAST
            column(is_("scale") | is_("rotate") | is_("crop")),  # IS_GEOMETRIC
            column(theta),  # THETA
            column(is_("cutout")),  # CUTOUT
            column(centres),  # CUTOUT_CENTER
        ], 1))

    def draw_groups(self, generators: Sequence[torch.Generator], height: int, width: int, groups: int = 1,
                    op_groups: Tensor | None = None) -> AugmentParams:
        """``groups`` groups from each generator in turn, in one buffer: exactly the numbers of
        ``draw(groups, g, height, width, op_groups)`` for each ``g``, concatenated (one stream per class
        in condensation, one per run in evaluation)."""
        return AugmentParams(torch.cat([self.draw(groups, g, height, width, op_groups).values for g in generators]))

    def apply(self, x: Tensor, params: AugmentParams, group: Tensor, geometric_count: int | None = None) -> Tensor:
        """Augment ``x`` (N, c, H, W); sample ``i`` uses the parameters of group ``group[i]``.

        ``params`` and ``group`` may be on the CPU (they move in one copy each) or on ``x``'s device.
        The geometric ops run only on the samples that drew one. Picking them out takes their number
        on the host: pass ``geometric_count`` (:meth:`AugmentParams.geometric_count` on the CPU copies)
        when ``x`` is on an accelerator; without it, every sample is warped there and the warp kept
        where drawn, since counting on the device would make the host wait for it. On the CPU the
        count is free (and a given one is checked).
        """
        n = x.shape[0]
        if self.mode == "none" or n == 0:
            return x
        v = params.to(x.device).values[to_device(group, x.device)]  # (N, COLUMNS): each sample's parameters
        per = lambda j: v[:, j].view(n, 1, 1, 1)  # noqa: E731

        x = torch.where(per(FLIP) != 0, x.flip(-1), x)

        colour = x + per(BRIGHTNESS).to(x.dtype)
        mean = colour.mean(dim=1, keepdim=True)
        colour = (colour - mean) * per(SATURATION).to(x.dtype) + mean
        mean = colour.mean(dim=(1, 2, 3), keepdim=True)
        colour = (colour - mean) * per(CONTRAST).to(x.dtype) + mean
        x = torch.where(per(COLOR) != 0, colour, x)

        if self._has(GEOMETRIC):
            x = self._warp_drawn(x, v, geometric_count)

        if "cutout" in self.tokens:
            h, w = x.shape[-2:]
            side_h, side_w = round(CUTOUT_FRACTION * h), round(CUTOUT_FRACTION * w)
            centre = v[:, CUTOUT_CENTER].long()
            ys = torch.arange(h, device=x.device).view(1, h, 1)
            xs = torch.arange(w, device=x.device).view(1, 1, w)
            top = (centre[:, 0] - side_h // 2).view(n, 1, 1)
            left = (centre[:, 1] - side_w // 2).view(n, 1, 1)
            inside = (ys >= top) & (ys < top + side_h) & (xs >= left) & (xs < left + side_w)
            hole = inside.unsqueeze(1) & (per(CUTOUT) != 0)
            x = x.masked_fill(hole, 0.0)
        return x

    @staticmethod
    def _warp_drawn(x: Tensor, v: Tensor, count: int | None) -> Tensor:
        """Warp the samples whose parameters ``v`` (N, COLUMNS) drew a geometric op; the others stay.

        grid_sample treats each sample alone, so warping a subset gives the same numbers as warping all.
        """
        n = x.shape[0]
        drawn = v[:, IS_GEOMETRIC] != 0
        if x.device.type == "cpu":
            found = int(drawn.sum())
            if count is not None and count != found:
                raise ValueError(f"geometric_count {count} given, but {found} samples drew a geometric op")
            count = found
        if count is None:  # on an accelerator, unknown: warp everyone rather than wait for the device
            return torch.where(drawn.view(n, 1, 1, 1), _warp(x, v[:, THETA]), x)
        if count == 0:
            return x
        if count == n:
            return _warp(x, v[:, THETA])
        rows = torch.nonzero_static(drawn, size=count).squeeze(1)  # size known, so no device sync
        return x.index_copy(0, rows, _warp(x.index_select(0, rows), v.index_select(0, rows)[:, THETA]))

    def _has(self, names: tuple[str, ...]) -> bool:
        return any(t in names for t in self.tokens)

    def __call__(self, x: Tensor, generator: torch.Generator, group: Tensor | None = None) -> Tensor:
        """Draw and apply in one go; without ``group`` every sample is its own group (evaluation mode)."""
        if self.mode == "none":
            return x
        if group is None:
            group = torch.arange(x.shape[0])
        params = self.draw(int(group.max()) + 1, generator, x.shape[-2], x.shape[-1])
        return self.apply(x, params, group)


def _warp(x: Tensor, theta: Tensor) -> Tensor:
    """Bilinear, zero-padded affine warp of each sample by its row of ``theta`` (N, 6)."""
    grid = F.affine_grid(theta.unflatten(1, (2, 3)).to(x.dtype).contiguous(), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
