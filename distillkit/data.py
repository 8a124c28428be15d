"""Real data: where dataset files live, and a split as per-class tensors on the device.

The data root is ``--data-root``, else ``$DISTILLKIT_DATA``, else
``$XDG_CACHE_HOME/distillkit/data`` (``~/.cache/distillkit/data``). The datasets themselves
are defined in :mod:`distillkit.datasets`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from distillkit import devices
from distillkit.errors import UsageError
from distillkit.interfaces import DataContext, DatasetSpec, ImageSpec, ModelBuilder, TrainingSet
from distillkit.models import builder, check_model
from distillkit.references import fitted_whitening


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
    """A split indexed by class, normalised as it is gathered.

    ``pixels`` holds the split as uint8 ``(N, c, H, W)``; every gather (:meth:`sample`,
    :meth:`class_images`, ``images[...]``) indexes it, moves the rows to ``device`` and normalises
    them there, so no float copy of the split ever exists. Where the pixels live:

    * in private memory (MNIST, CIFAR: the loader read the files), they move to ``device`` once,
      as uint8 (a quarter of a float copy), and gathers index them there;
    * shared or memory-mapped (``Tensor.is_shared()``: the decoded ImageNet cache of
      :mod:`distillkit.imagenet`), they stay on the host and only the gathered rows are copied
      (from pinned memory, asynchronously, on CUDA); the operating system reads pages as they are
      touched, so neither RAM nor device memory holds the split.

    Normalising after the gather applies the same elementwise operations to the same values as
    normalising the whole split first, so results are bit-identical either way.
    """

    spec: ImageSpec
    pixels: Tensor
    labels: Tensor
    class_names: tuple[str, ...]
    #: where gathered images go (None: where the pixels are)
    device: torch.device | str | None = None
    #: the classes served (None: all); labels keep their global values and sizes stay the split's
    classes: tuple[int, ...] | None = None
    #: images per class in the whole split (so sizes never depend on which classes a shard serves)
    split_counts: tuple[int, ...] = field(init=False)

    def __post_init__(self) -> None:
        self.device = torch.device(self.device) if self.device is not None else self.pixels.device
        labels = self.labels.cpu()
        order = torch.argsort(labels, stable=True)
        counts = torch.bincount(labels, minlength=self.spec.num_classes)
        self.split_counts = tuple(counts.tolist())
        self._by_class = list(torch.split(order, self.split_counts))
        if self.classes is not None:
            served = set(self.classes)
            self._by_class = [m if c in served else m[:0] for c, m in enumerate(self._by_class)]
        self._rows = torch.cat(self._by_class).sort().values  # served rows, in dataset order

    @property
    def images(self) -> "GatheredImages":
        """The served images, normalised, gathered where indexed (``images[:4]``); see :class:`GatheredImages`."""
        return GatheredImages(self)

    def gather(self, rows: Tensor) -> Tensor:
        """Normalised images of split rows ``rows`` (int64, on the host or already where the pixels are:
        see :meth:`sample_rows`), on ``device``. Host -> device copies are pinned and asynchronous."""
        picked = self.pixels[devices.to_device(rows, self.pixels.device)]
        if picked.device != self.device:  # host-resident pixels: only the gathered rows move
            picked = devices.to_device(picked, self.device)
        return self.spec.normalize(picked.float().div_(255))

    def count(self, label: int) -> int:
        return len(self._by_class[label])

    def class_images(self, label: int) -> Tensor:
        return self.gather(self._by_class[label])

    def sample_indices(self, label: int, n: int, generator: torch.Generator) -> Tensor:
        members = self._by_class[label]
        if n > len(members):
            raise UsageError(f"class {label} ({self.class_names[label]!r}) has {len(members)} images, {n} requested")
        return members[torch.randperm(len(members), generator=generator)[:n]]

    def sample(self, label: int, n: int, generator: torch.Generator) -> Tensor:
        return self.gather(self.sample_indices(label, n, generator))

    def sample_rows(self, labels: Sequence[int], n: int, generators: Sequence[torch.Generator]) -> Tensor:
        """Split rows of ``n`` random images of each of ``labels``, class after class, for :meth:`gather`.

        Each class draws on the host from its own generator exactly as :meth:`sample_indices` does (so
        ``gather`` of the rows equals ``torch.cat`` of :meth:`sample` per class, bit for bit); the rows of
        all classes then move where the pixels are in ONE copy, instead of one blocking copy per class.
        """
        rows = torch.cat([self.sample_indices(c, n, g) for c, g in zip(labels, generators, strict=True)])
        return devices.to_device(rows, self.pixels.device)

    def restricted(self, classes: Sequence[int] | None, device: torch.device | str) -> "RealData":
        """Only ``classes`` (all if None), gathered to ``device``; the pixels are shared, not copied."""
        return RealData(self.spec, _placed(self.pixels, device), self.labels, self.class_names, device,
                        None if classes is None else tuple(classes))

    def as_training_set(self) -> TrainingSet:
        """Every served image as one normalised tensor on the device (a full copy: for test splits)."""
        return TrainingSet(self.gather(self._rows), self.labels.cpu()[self._rows].to(self.device))


class GatheredImages:
    """``RealData.images``: the served images, normalised, materialised only where indexed.

    ``images[i]``, ``images[a:b]`` and ``images[rows]`` return float tensors on the device. There is no
    whole-split tensor behind it, so an operation over every image (``.float()``, ``.mean()``) fails
    instead of silently copying the split; :meth:`RealData.as_training_set` is the explicit full copy.
    """

    def __init__(self, data: RealData) -> None:
        self._data = data

    def __len__(self) -> int:
        return len(self._data._rows)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self), *self._data.pixels.shape[1:]))

    @property
    def device(self) -> torch.device:
        return self._data.device

    def __getitem__(self, key: int | slice | Tensor) -> Tensor:
        rows = self._data._rows[key]
        return self._data.gather(rows.view(-1))[0] if rows.dim() == 0 else self._data.gather(rows)


def _placed(pixels: Tensor, device: torch.device | str) -> Tensor:
    """Private-memory pixels move to ``device``; shared or memory-mapped ones stay on the host."""
    return pixels if pixels.device.type == "cpu" and pixels.is_shared() else pixels.to(device)


def load_split(spec: DatasetSpec, root: Path, train: bool, device: torch.device | str = "cpu",
               image_spec: ImageSpec | None = None) -> RealData:
    """A split of ``spec`` under ``root``, normalised per gathered batch with ``image_spec``: by default the
    dataset's, ZCA-whitened (:attr:`DatasetSpec.zca_eps`) with a transform fitted now on the training split; a
    synthetic set's own spec (which stores the transform it was distilled with) when evaluating one."""
    raw, labels = spec.load(root, train)
    image = spec.image_spec
    expected = (image.channels, image.height, image.width)
    if raw.shape[1:] != expected:
        raise UsageError(f"dataset {spec.name}: images have shape {tuple(raw.shape[1:])}, expected {expected}")
    if image_spec is None:
        image_spec = fitted_image_spec(spec, root, raw if train else None)
    return RealData(image_spec, _placed(raw, device), labels.long(), spec.class_names, device)


def fitted_image_spec(spec: DatasetSpec, root: Path, train_pixels: Tensor | None = None) -> ImageSpec:
    """``spec``'s image spec, with its ZCA whitening fitted on the training split (read now unless given; the fit is
    cached, :func:`distillkit.references.fitted_whitening`)."""
    if spec.zca_eps is None:
        return spec.image_spec
    pixels = train_pixels if train_pixels is not None else spec.load(root, True)[0]
    return replace(spec.image_spec, whitening=fitted_whitening(spec.name, pixels, spec.image_spec.normalize,
                                                               spec.zca_eps))


def data_context(spec: DatasetSpec, options: Mapping[str, Any], root: Path, device: torch.device | str,
                 train: RealData | None = None, image_spec: ImageSpec | None = None) -> DataContext:
    """The :class:`~distillkit.interfaces.DataContext` of ``spec`` under ``root``: its training split is
    ``train`` when the caller already holds the full split, else loaded on first use, gathered to ``device``
    and normalised with ``image_spec`` (see :func:`load_split`). Its ``dataset`` carries that image spec."""
    image_spec = train.spec if train is not None else image_spec
    if image_spec is not None:
        spec = replace(spec, image_spec=image_spec)

    def build_model(name: str) -> ModelBuilder:
        check_model(name, spec.image_spec)
        return builder(name, spec.image_spec)

    device = torch.device(device)
    load = (lambda: train.restricted(None, device)) if train is not None else \
        (lambda: load_split(spec, root, train=True, device=device, image_spec=image_spec))
    return DataContext(spec, options, root, device, load, build_model)
