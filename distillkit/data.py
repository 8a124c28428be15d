"""Real data: where dataset files live, and a split as per-class tensors on the device.

The data root is ``--data-root``, else ``$DISTILLKIT_DATA``, else
``$XDG_CACHE_HOME/distillkit/data`` (``~/.cache/distillkit/data``). The datasets themselves
are defined in :mod:`distillkit.datasets`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor

from distillkit.errors import UsageError
from distillkit.interfaces import DatasetSpec, ImageSpec, TrainingSet


def resolve_root(data_root: str | os.PathLike | None = None) -> Path:
    """The data root as an absolute path, resolved once against the current directory (a relative
    ``--data-root`` or ``$DISTILLKIT_DATA`` means the same folder wherever the path is used later)."""
    if data_root:
        root = Path(data_root)
    elif os.environ.get("DISTILLKIT_DATA"):
        root = Path(os.environ["DISTILLKIT_DATA"])
    else:
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "distillkit" / "data"
    return root.expanduser().absolute()


@dataclass
class RealData:
    """A split as one normalised tensor on the device, indexed by class."""

    spec: ImageSpec
    images: Tensor
    labels: Tensor
    class_names: tuple[str, ...]
    #: images per class in the whole split (kept by :meth:`restricted`, so sizes never depend on a shard)
    split_counts: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        order = torch.argsort(self.labels.cpu(), stable=True)
        counts = torch.bincount(self.labels.cpu(), minlength=self.spec.num_classes)
        self._by_class = list(torch.split(order, counts.tolist()))
        if not self.split_counts:
            self.split_counts = tuple(counts.tolist())

    def count(self, label: int) -> int:
        return len(self._by_class[label])

    def class_images(self, label: int) -> Tensor:
        return self.images[self._by_class[label].to(self.images.device)]

    def sample_indices(self, label: int, n: int, generator: torch.Generator) -> Tensor:
        members = self._by_class[label]
        if n > len(members):
            raise UsageError(f"class {label} ({self.class_names[label]!r}) has {len(members)} images, {n} requested")
        return members[torch.randperm(len(members), generator=generator)[:n]]

    def sample(self, label: int, n: int, generator: torch.Generator) -> Tensor:
        return self.images[self.sample_indices(label, n, generator).to(self.images.device)]

    def restricted(self, classes: Sequence[int] | None, device: torch.device | str) -> "RealData":
        """Only ``classes`` (all if None) on ``device``; labels keep their global values."""
        if classes is None:
            return RealData(self.spec, self.images.to(device), self.labels.to(device), self.class_names,
                            self.split_counts)
        keep = torch.isin(self.labels.cpu(), torch.as_tensor(list(classes)))
        return RealData(self.spec, self.images[keep.to(self.images.device)].to(device),
                        self.labels[keep.to(self.labels.device)].to(device), self.class_names, self.split_counts)

    def as_training_set(self) -> TrainingSet:
        return TrainingSet(self.images, self.labels.to(self.images.device))


def load_split(spec: DatasetSpec, root: Path, train: bool, device: torch.device | str = "cpu") -> RealData:
    raw, labels = spec.load(root, train)
    image_spec = spec.image_spec
    expected = (image_spec.channels, image_spec.height, image_spec.width)
    if raw.shape[1:] != expected:
        raise UsageError(f"dataset {spec.name}: images have shape {tuple(raw.shape[1:])}, expected {expected}")
    images = image_spec.normalize(raw.to(device=device).float().div_(255))
    return RealData(image_spec, images, labels.to(device), spec.class_names)
