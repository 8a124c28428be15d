"""ZCA whitening of images (the preprocessing of MTT and its successors), fitted once on a training split.

``x -> (x - mean) @ W`` with ``W = U diag((S + eps)^-1/2) U^T`` from the eigendecomposition ``U diag(S) U^T``
of the (unbiased) covariance of the flattened training images, and back with ``W^-1 = U diag((S + eps)^1/2)
U^T``: kornia's ``ZCAWhitening`` (``compute_inv=True``) and MTT's use of it (``eps=0.1``, fitted on the
mean/std-normalised training images). Written here rather than depending on kornia for one function.

A fitted transform lives in the dataset's :class:`~distillkit.interfaces.ImageSpec` (its ``whitening``), so
everything that normalises or denormalises through the spec (real batches, the test set, parameterizations
that store pixels, ``show`` and ``export``) applies or inverts it, and the synthetic-set file stores it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from hashlib import sha256
from typing import Any, Mapping

import torch
from torch import Tensor

#: MTT's ``eps`` (on images normalised with the dataset's mean and std)
DEFAULT_EPS = 0.1
#: images per chunk when accumulating the covariance (bounds the float64 copy)
FIT_CHUNK = 4096


@dataclass(frozen=True, eq=False)
class ZCAWhitening:
    """A fitted ZCA transform of images of ``d = c * h * w`` values: ``mean (d,)``, eigenvectors ``basis (d, d)``
    and eigenvalues ``variances (d,)`` of the training covariance, and ``eps``."""

    mean: Tensor
    basis: Tensor
    variances: Tensor
    eps: float
    _on: dict = field(default_factory=dict, repr=False)  # (device, dtype) -> (mean, W, W^-1); the digest

    @classmethod
    def fit(cls, images: Tensor, eps: float = DEFAULT_EPS) -> "ZCAWhitening":
        """Fit on normalised images ``(N, c, h, w)`` (float64 accumulation, in chunks)."""
        if eps <= 0:
            raise ValueError(f"ZCA eps must be positive, got {eps}")
        flat = images.reshape(len(images), -1)
        mean = flat.mean(0, dtype=torch.float64)
        cov = torch.zeros(flat.shape[1], flat.shape[1], dtype=torch.float64, device=flat.device)
        for chunk in flat.split(FIT_CHUNK):
            centred = chunk.double() - mean
            cov += centred.T @ centred
        variances, basis = torch.linalg.eigh(cov / (len(flat) - 1))
        return cls(mean.float().cpu(), basis.float().cpu(), variances.clamp_min(0).float().cpu(), float(eps))

    def _matrices(self, like: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        key = (like.device, like.dtype)
        if key not in self._on:
            basis, scale = self.basis.double(), (self.variances.double() + self.eps).sqrt()
            whiten, colour = (basis / scale) @ basis.T, (basis * scale) @ basis.T
            self._on[key] = tuple(t.to(like.device, like.dtype) for t in (self.mean, whiten, colour))
        return self._on[key]

    def apply(self, x: Tensor) -> Tensor:
        """Whiten normalised images ``(..., c, h, w)``."""
        mean, whiten, _ = self._matrices(x)
        d = mean.numel()
        return ((x.reshape(-1, d) - mean) @ whiten).view(x.shape)

    def invert(self, x: Tensor) -> Tensor:
        """Whitened images back to normalised ones."""
        mean, _, colour = self._matrices(x)
        d = mean.numel()
        return (x.reshape(-1, d) @ colour + mean).view(x.shape)

    def digest(self) -> str:
        """sha256 of the fitted values (computed once): two transforms are equal when their values are."""
        if "digest" not in self._on:
            h = sha256(repr(self.eps).encode())
            for t in (self.mean, self.basis, self.variances):
                h.update(t.detach().cpu().contiguous().numpy().tobytes())
            self._on["digest"] = h.hexdigest()
        return self._on["digest"]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ZCAWhitening) and self.digest() == other.digest()

    def __hash__(self) -> int:
        return hash(self.digest())

    def as_dict(self) -> dict[str, Any]:
        return {"mean": self.mean, "basis": self.basis, "variances": self.variances, "eps": self.eps}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ZCAWhitening":
        return cls(data["mean"], data["basis"], data["variances"], float(data["eps"]))
