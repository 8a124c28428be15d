"""Differentiable augmentation (DSA ops) in two composition modes, batched on the device.

Ops act on normalised images. Parameters are drawn per *group* from an explicit
generator, then every sample of a group gets its group's parameters:

* condensation (Siamese): a group is one class's real + synthetic batch, so
  both see the same op with the same parameters;
* evaluation: every sample is its own group.

Modes (see ``method-notes.md`` section 5):

* ``dsa``: one op per group, chosen uniformly from the strategy's tokens;
* ``idc``: ``flip`` and ``color`` always (if listed), then one of the listed
  geometric ops (crop/scale/rotate), then ``cutout`` (if listed);
* ``none``: identity.

All geometric ops share one batched ``affine_grid``/``grid_sample`` (at most one
is active per group in both modes); integer crop shifts land on pixel centres,
so bilinear sampling copies pixels exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from distillkit.errors import UsageError

TOKENS = ("color", "crop", "cutout", "flip", "scale", "rotate")
GEOMETRIC = ("crop", "scale", "rotate")
MODES = ("dsa", "idc", "none")

SCALE_RATIO = 1.2
ROTATE_DEGREES = 15.0
CROP_FRACTION = 0.125
CUTOUT_FRACTION = 0.5


@dataclass(frozen=True)
class AugmentParams:
    """Per-group parameters; every field has leading dimension G (groups)."""

    flip: Tensor  # bool
    color: Tensor  # bool
    brightness: Tensor
    saturation: Tensor
    contrast: Tensor
    geometric: Tensor  # bool
    theta: Tensor  # (G, 2, 3)
    cutout: Tensor  # bool
    cutout_center: Tensor  # (G, 2) integer pixel centre (y, x)

    def to(self, device: torch.device) -> "AugmentParams":
        return AugmentParams(**{k: v.to(device, non_blocking=True) for k, v in self.__dict__.items()})


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

    def draw(self, groups: int, generator: torch.Generator, height: int, width: int) -> AugmentParams:
        """Draw parameters for ``groups`` groups on the CPU (a fixed number of draws, whatever is active)."""
        g, n = generator, groups
        u = torch.rand(n, 9, generator=g)
        shift_max = round(CROP_FRACTION * height), round(CROP_FRACTION * width)
        shifts = torch.stack([torch.randint(-s, s + 1, (n,), generator=g) for s in shift_max], 1)
        side = round(CUTOUT_FRACTION * height), round(CUTOUT_FRACTION * width)
        centres = torch.stack([torch.randint(0, dim + (1 - s % 2), (n,), generator=g)
                               for dim, s in zip((height, width), side)], 1)
        tokens = self.tokens
        if self.mode == "dsa" and tokens:
            chosen = torch.randint(len(tokens), (n,), generator=g)
            active = {t: chosen == i for i, t in enumerate(tokens)}
        else:
            geometric = [t for t in tokens if t in GEOMETRIC]
            pick = torch.randint(max(len(geometric), 1), (n,), generator=g)
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

        return AugmentParams(
            flip=is_("flip") & (u[:, 0] < 0.5),
            color=is_("color"),
            brightness=u[:, 1] - 0.5,
            saturation=u[:, 2] * 2,
            contrast=u[:, 6] + 0.5,
            geometric=is_("scale") | is_("rotate") | is_("crop"),
            theta=theta,
            cutout=is_("cutout"),
            cutout_center=centres,
        )

    def apply(self, x: Tensor, params: AugmentParams, group: Tensor) -> Tensor:
        """Augment ``x`` (N, c, H, W); sample ``i`` uses the parameters of group ``group[i]``."""
        if self.mode == "none":
            return x
        p = params.to(x.device)
        group = group.to(x.device)
        n = x.shape[0]
        per = lambda t: t[group].view(n, 1, 1, 1)  # noqa: E731

        x = torch.where(per(p.flip), x.flip(-1), x)

        colour = x + per(p.brightness).to(x.dtype)
        mean = colour.mean(dim=1, keepdim=True)
        colour = (colour - mean) * per(p.saturation).to(x.dtype) + mean
        mean = colour.mean(dim=(1, 2, 3), keepdim=True)
        colour = (colour - mean) * per(p.contrast).to(x.dtype) + mean
        x = torch.where(per(p.color), colour, x)

        if self._has(GEOMETRIC):
            grid = F.affine_grid(p.theta[group].to(x.dtype), list(x.shape), align_corners=False)
            warped = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
            x = torch.where(per(p.geometric), warped, x)

        if "cutout" in self.tokens:
            h, w = x.shape[-2:]
            side_h, side_w = round(CUTOUT_FRACTION * h), round(CUTOUT_FRACTION * w)
            centre = p.cutout_center[group]
            ys = torch.arange(h, device=x.device).view(1, h, 1)
            xs = torch.arange(w, device=x.device).view(1, 1, w)
            top = (centre[:, 0] - side_h // 2).view(n, 1, 1)
            left = (centre[:, 1] - side_w // 2).view(n, 1, 1)
            inside = (ys >= top) & (ys < top + side_h) & (xs >= left) & (xs < left + side_w)
            hole = inside.unsqueeze(1) & per(p.cutout)
            x = x.masked_fill(hole, 0.0)
        return x

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
