"""M3D's components, built only on distillkit's interfaces.

* :class:`MMDObjective` (``mmd``): squared maximum mean discrepancy per class.
* :class:`FactorParameterization` (``factor``): f x f tiles per stored image, bilinear up-sampling.
* :class:`RandomEncoderSampler` (``random-encoder``): a random network kept for ``period`` iterations.
"""

from __future__ import annotations

import math
from typing import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from distillkit.errors import UsageError
from distillkit import devices
from distillkit.interfaces import ImageSpec, RealImages
from distillkit.models import RandomEmbedder

KERNELS = ("gaussian", "linear")
ESTIMATORS = ("biased", "unbiased")
BANDWIDTH_RULES = ("mean", "median")
#: the released M3D code's five Gaussians: multiples of the base bandwidth
M3D_MULTIPLIERS = (0.25, 0.5, 1.0, 2.0, 4.0)


def squared_distances(a: Tensor, b: Tensor, same: bool = False) -> Tensor:
    """Pairwise squared distances ``(K, n, d), (K, m, d) -> (K, n, m)``, never negative.

    The ``|a|^2 + |b|^2 - 2ab`` form is one batched matmul; its rounding can go
    slightly negative (clamped) and, for ``same`` sets (``b`` is ``a``), leave a
    nonzero diagonal (zeroed).
    """
    d = (a.pow(2).sum(-1).unsqueeze(-1) + b.pow(2).sum(-1).unsqueeze(-2) - a @ b.transpose(-1, -2) * 2).clamp_min(0)
    if same:
        d = d.masked_fill(torch.eye(a.shape[1], dtype=torch.bool, device=a.device), 0.0)
    return d


def _upper_triangle(d: Tensor) -> Tensor:
    """The entries above the diagonal of each ``(n, n)`` matrix in ``d`` (K, n, n), flattened: (K, n(n-1)/2)."""
    rows, cols = torch.triu_indices(d.shape[1], d.shape[2], 1, device=d.device)
    return d[:, rows, cols]


class MMDObjective:
    """Squared MMD between the real and synthetic features of each class.

    With ``K_ss``, ``K_sr``, ``K_rr`` the kernel blocks of the synthetic and real
    sets, the biased V-statistic (the M3D reference; diagonals included) is
    ``mean(K_ss) - 2 mean(K_sr) + mean(K_rr)``; the unbiased U-statistic leaves the
    diagonals of ``K_ss`` and ``K_rr`` out of their means. ``K_rr`` carries no
    gradient, so it is computed without autograd: it is the largest block, and
    only the loss value (not the gradient) needs it.

    Options:

    * ``kernel``: ``"gaussian"`` (a sum of ``exp(-D / h)`` over bandwidths ``h``,
      ``D`` the squared distance) or ``"linear"`` (``a.b``; the biased estimate
      is then DM's squared mean gap).
    * ``bandwidth`` (Gaussian only; values are in units of squared distance):
      ``"mean"``: the mean off-diagonal squared distance of the pooled real and
      synthetic set times each of ``multipliers`` (the M3D reference);
      ``"median"``: the median off-diagonal squared distance times
      ``multipliers``; a number, or a list of numbers (one Gaussian each, summed).
      Data-driven bandwidths are constants for the gradient, as in the reference.
    * ``estimator``: ``"biased"`` or ``"unbiased"`` (needs 2+ samples per set).
    """

    def __init__(self, kernel: str = "gaussian", bandwidth: str | float | Sequence[float] = "mean",
                 estimator: str = "biased", multipliers: Sequence[float] = M3D_MULTIPLIERS) -> None:
        if kernel not in KERNELS:
            raise UsageError(f"unknown MMD kernel {kernel!r}; choose one of: {', '.join(KERNELS)}")
        if estimator not in ESTIMATORS:
            raise UsageError(f"unknown MMD estimator {estimator!r}; choose one of: {', '.join(ESTIMATORS)}")
        self.kernel, self.estimator = kernel, estimator
        self.rule: str | None = None
        if isinstance(bandwidth, str):
            if bandwidth not in BANDWIDTH_RULES:
                raise UsageError(f"unknown MMD bandwidth {bandwidth!r}; choose one of: mean, median, a positive "
                                 f"number or a list of them")
            self.rule, scales = bandwidth, multipliers
        else:
            scales = [bandwidth] if isinstance(bandwidth, (int, float)) else bandwidth
        try:
            self.scales = tuple(float(s) for s in scales)
        except (TypeError, ValueError):
            raise UsageError(f"MMD bandwidth/multipliers must be positive numbers, got {list(scales)!r}") from None
        if not self.scales or min(self.scales) <= 0 or not all(map(math.isfinite, self.scales)):
            raise UsageError(f"MMD bandwidths must be positive numbers, got {list(self.scales)!r}")
        self._scales_on: dict[tuple[torch.dtype, torch.device], Tensor] = {}

    def __call__(self, real: Tensor, syn: Tensor) -> Tensor:
        n_s, n_r = syn.shape[1], real.shape[1]
        if self.estimator == "unbiased" and min(n_s, n_r) < 2:
            raise UsageError(f"the unbiased MMD estimator needs 2+ real and synthetic samples per class, got "
                             f"{n_r} real and {n_s} synthetic; use objective.estimator=biased or more images")
        real = real.detach().to(syn.dtype)
        if self.kernel == "linear":
            with torch.no_grad():
                k_rr = real @ real.transpose(-1, -2)
            k_ss, k_sr = syn @ syn.transpose(-1, -2), syn @ real.transpose(-1, -2)
        else:
            with torch.no_grad():
                d_rr = squared_distances(real, real, same=True)
            d_ss, d_sr = squared_distances(syn, syn, same=True), squared_distances(syn, real)
            h = self._bandwidths(d_ss.detach(), d_sr.detach(), d_rr)[:, :, None, None]  # (K, B, 1, 1)
            with torch.no_grad():
                k_rr = torch.exp(-d_rr.unsqueeze(1) / h).sum(1)
            k_ss, k_sr = (torch.exp(-d.unsqueeze(1) / h).sum(1) for d in (d_ss, d_sr))
        return self._within(k_ss) - 2 * k_sr.mean((1, 2)) + self._within(k_rr)

    def _within(self, k: Tensor) -> Tensor:
        """The mean of a set's kernel block over pairs: all pairs (biased) or distinct pairs (unbiased)."""
        n = k.shape[1]
        if self.estimator == "biased":
            return k.mean((1, 2))
        return (k.sum((1, 2)) - k.diagonal(dim1=1, dim2=2).sum(1)) / (n * (n - 1))

    def _bandwidths(self, d_ss: Tensor, d_sr: Tensor, d_rr: Tensor) -> Tensor:
        """``(K, B)`` bandwidths from the pooled squared distances (given as blocks, zero diagonals)."""
        key = (d_ss.dtype, d_ss.device)
        if key not in self._scales_on:  # one host-to-device copy per device, not per call
            self._scales_on[key] = torch.tensor(self.scales, dtype=d_ss.dtype, device=d_ss.device)
        scales, k = self._scales_on[key], d_ss.shape[0]
        if self.rule is None:
            return scales.expand(k, -1)
        n = d_ss.shape[1] + d_rr.shape[1]
        if self.rule == "mean":
            base = (d_ss.sum((1, 2)) + 2 * d_sr.sum((1, 2)) + d_rr.sum((1, 2))) / (n * n - n)
        else:  # each off-diagonal pair once: the median of the symmetric pooled matrix
            pairs = torch.cat([_upper_triangle(d_ss), d_sr.flatten(1), _upper_triangle(d_rr)], 1)
            base = pairs.median(dim=1).values
        # identical features give base 0; any positive bandwidth then yields the same kernel (all ones)
        return base.clamp_min(torch.finfo(d_ss.dtype).tiny).unsqueeze(1) * scales


class FactorParameterization:
    """Factor up-sampling (IDC's multi-formation): each stored image holds ``factor x factor`` tiles.

    Stored images live in [0, 1] pixel space (clamped by :meth:`project`), as in
    the M3D reference. Decoding pads the bottom/right with 0.5 when the size is
    not a multiple of ``factor``, cuts the tiles, stacks them tile-major (tile
    (0, 0) of every stored image of a class, then tile (0, 1), ...), up-samples
    each bilinearly to the full size and normalises: ``factor**2 * ipc`` training
    images per class.

    ``init``: ``"mix"`` (default) fills tile ``t`` of stored image ``i`` with the
    ``t * ipc + i``-th image of the class in dataset order, nearest-down-sampled
    to the tile size (the reference's init), so decoding the fresh set yields the
    first ``factor**2 * ipc`` real images, blurred, in order; ``"real"``: the same
    with ``factor**2 * ipc`` random real images drawn as ``pixel`` draws them
    (with factor 1 both parameterizations then start from the same images);
    ``"noise"``: ``clamp(N(0, 1) / 4 + 0.5, 0, 1)`` (the reference's starting
    point, which "mix" overwrites entirely, so "mix" does not draw it). Unlike
    the reference, tiles are written where :meth:`decode` reads them when the
    size is not a multiple of ``factor`` (the reference writes uneven tiles there).
    ``resize``: how real images shrink to a tile, ``"nearest"`` (M3D) or
    ``"bilinear"`` (IDM's ``downscale``).

    ``space``: ``"pixels"`` (default, M3D) stores [0, 1] pixels, clamped; ``"normalized"``
    (IDM's partitioning and expansion) stores normalised values, never clamped, and pads
    uneven tiles with 0 (the mean). The same image is then the same set of values up to the
    normalisation, but SGD steps differ: a learning rate ``lr`` in pixel space moves the
    normalised values as ``lr / std**2`` would in normalised space.
    """

    INITS = ("mix", "real", "noise")
    SPACES = ("pixels", "normalized")
    RESIZES = ("nearest", "bilinear")

    def __init__(self, spec: ImageSpec, ipc: int, device: torch.device, factor: int = 2, init: str = "mix",
                 space: str = "pixels", resize: str = "nearest") -> None:
        if not isinstance(factor, int) or not 1 <= factor <= min(spec.height, spec.width):
            raise UsageError(f"parameterization factor must be an integer from 1 to {min(spec.height, spec.width)}, "
                             f"got {factor!r}")
        if init not in self.INITS:
            raise UsageError(f"unknown factor init {init!r}; choose one of: {', '.join(self.INITS)}")
        if space not in self.SPACES:
            raise UsageError(f"unknown factor space {space!r}; choose one of: {', '.join(self.SPACES)}")
        if resize not in self.RESIZES:
            raise UsageError(f"unknown factor resize {resize!r}; choose one of: {', '.join(self.RESIZES)}")
        self.space, self.resize = space, resize
        self.spec, self.ipc, self.factor, self.init_mode = spec, ipc, factor, init
        self.images_per_class = factor * factor * ipc
        self.tile = (math.ceil(spec.height / factor), math.ceil(spec.width / factor))
        self.images = torch.zeros(spec.num_classes * ipc, spec.channels, spec.height, spec.width, device=device,
                                  requires_grad=True)

    def init(self, real: RealImages, generator: torch.Generator) -> None:
        f, ipc, (c, h, w) = self.factor, self.ipc, self.images.shape[1:]
        with torch.no_grad():
            if self.init_mode == "noise":
                noise = (torch.randn(self.images.shape, generator=generator) / 4 + 0.5).clamp(0, 1)
                self.images.copy_(self._stored_space(noise.to(self.images.device)))
                return
            n = self.images_per_class
            for k in range(self.spec.num_classes):
                chosen = real.class_images(k)[:n] if self.init_mode == "mix" else real.sample(k, n, generator)
                if len(chosen) < n:
                    raise UsageError(f"factor init needs {n} real images of class {k}, the dataset has {len(chosen)}")
                pixels = self.spec.denormalize(chosen.to(self.images.device)).clamp(0, 1)
                smooth = {"align_corners": False} if self.resize == "bilinear" else {}
                tiles = F.interpolate(pixels, size=self.tile, mode=self.resize, **smooth)  # (f*f*ipc, c, ...)
                grid = tiles.view(f, f, ipc, c, *self.tile).permute(2, 3, 0, 4, 1, 5)  # (ipc, c, f, s_h, f, s_w)
                full = grid.reshape(ipc, c, f * self.tile[0], f * self.tile[1])
                self.images[k * ipc:(k + 1) * ipc] = self._stored_space(full[..., :h, :w])

    def _stored_space(self, pixels: Tensor) -> Tensor:
        return pixels if self.space == "pixels" else self.spec.normalize(pixels)

    def parameters(self) -> list[Tensor]:
        return [self.images]

    def decode(self, classes: Sequence[int]) -> Tensor:
        f, ipc, (c, h, w), (s_h, s_w) = self.factor, self.ipc, self.images.shape[1:], self.tile
        index = devices.constant(tuple(classes), torch.long, self.images.device)  # built once per class list
        x = self.images.view(self.spec.num_classes, ipc, c, h, w)[index]
        k = x.shape[0]
        pixels = self.space == "pixels"
        x = F.pad(x.flatten(0, 1), (0, f * s_w - w, 0, f * s_h - h), value=0.5 if pixels else 0.0)
        tiles = x.view(k, ipc, c, f, s_h, f, s_w).permute(0, 3, 5, 1, 2, 4, 6)  # (k, f, f, ipc, c, s_h, s_w)
        up = F.interpolate(tiles.reshape(-1, c, s_h, s_w), size=(h, w), mode="bilinear", align_corners=False)
        return (self.spec.normalize(up) if pixels else up).view(k, self.images_per_class, c, h, w)

    def stored(self) -> Tensor:
        images = self.images.detach()
        return self.spec.normalize(images) if self.space == "pixels" else images

    def project(self) -> None:
        if self.space == "pixels":
            with torch.no_grad():
                self.images.clamp_(0, 1)

    def state_dict(self) -> dict[str, Tensor]:
        return {"images": self.images.detach()}

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        with torch.no_grad():
            self.images.copy_(state["images"])


class RandomEncoderSampler:
    """A randomly initialised ``model`` (ConvNet-3 by default), redrawn every ``period`` iterations.

    The network serving iteration ``it`` is the one keyed ``("encoder", it // period * period)``,
    a pure function of the run seed; with ``period=1`` it is exactly the network
    ``random-convnet`` draws at that iteration. The current network is kept, so it is drawn (in
    place, into one module: see :class:`RandomEmbedder`) once per period.
    """

    def __init__(self, spec: ImageSpec, seed: int, device: torch.device, model: str = "convnet3",
                 period: int = 5) -> None:
        if not isinstance(period, int) or period < 1:
            raise UsageError(f"sampler period must be a positive integer (iterations per random model), "
                             f"got {period!r}")
        self.spec, self.seed, self.device, self.model, self.period = spec, seed, device, model, period
        self._embedder = RandomEmbedder(model, spec, device)
        self._cached: tuple[int, Callable[[Tensor], Tensor]] | None = None

    def extractor(self, iteration: int) -> Callable[[Tensor], Tensor]:
        key = iteration // self.period * self.period
        if self._cached is None or self._cached[0] != key:
            self._cached = (key, self._embedder.draw(self.seed, "encoder", key))
        return self._cached[1]

    def redraws_at(self, iteration: int) -> bool:
        return iteration % self.period == 0
