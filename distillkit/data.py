"""Real datasets: where their files live, how they load, per-class access.

The data root is ``--data-root``, else ``$DISTILLKIT_DATA``, else
``$XDG_CACHE_HOME/distillkit/data`` (``~/.cache/distillkit/data``). Files use
torchvision's on-disk layout; torchvision's download runs only when files are
missing, and if that fails too the error names the files and the folder.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import Tensor

from distillkit.errors import UsageError
from distillkit.imagenet import imagenet_datasets
from distillkit.interfaces import DatasetSpec, ImageSpec, TrainingSet

DIGITS = tuple(str(i) for i in range(10))
FASHION = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
CIFAR10 = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def resolve_root(data_root: str | os.PathLike | None = None) -> Path:
    if data_root:
        return Path(data_root).expanduser()
    if os.environ.get("DISTILLKIT_DATA"):
        return Path(os.environ["DISTILLKIT_DATA"]).expanduser()
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "distillkit" / "data"


DOWNLOAD_TIMEOUT_S = 30.0  # per network operation: offline, a download fails in seconds instead of hanging


def _torchvision_split(cls_name: str, folder: str, files: tuple[str, ...], **split_kwargs: object):
    """A loader for a torchvision dataset class: local files first, then download, then a clear error."""

    def load(root: Path, train: bool) -> tuple[Tensor, Tensor]:
        import torchvision.datasets as tvd

        cls = getattr(tvd, cls_name)
        kwargs = dict(split_kwargs.get("train" if train else "test", {"train": train}))  # type: ignore[arg-type]
        try:
            ds = cls(str(root), download=False, **kwargs)
        except Exception as exc:  # noqa: BLE001 - torchvision signals both cases with assorted exceptions
            if "not found" not in str(exc).lower():  # the files are there but do not parse
                raise UsageError(
                    f"{cls_name} files under {root / folder} are corrupt or truncated ({type(exc).__name__}: "
                    f"{str(exc).strip().splitlines()[0][:160]}); delete them and put {', '.join(files)} there again"
                ) from None
            ds = _download(cls, root, folder, files, kwargs)
        images = torch.as_tensor(ds.data)
        labels = torch.as_tensor(ds.targets if hasattr(ds, "targets") else ds.labels)
        if images.ndim == 3:  # (N, H, W) grey
            images = images.unsqueeze(1)
        elif images.shape[-1] in (1, 3):  # (N, H, W, C)
            images = images.permute(0, 3, 1, 2)
        return images.contiguous(), labels.long()

    return load


def _download(cls, root: Path, folder: str, files: tuple[str, ...], kwargs: dict):
    """torchvision's download under a network timeout. Whatever a failed attempt wrote is removed, so a
    partial file is never taken for data later."""
    import socket

    def entries() -> set[Path]:
        top = set(root.iterdir()) if root.is_dir() else set()
        inner = (root / folder).rglob("*") if folder != "." and (root / folder).is_dir() else ()
        return top | set(inner)

    existed, before = root.exists(), entries()
    timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        return cls(str(root), download=True, **kwargs)
    except Exception as exc:  # noqa: BLE001 - offline, a moved mirror, a bad checksum: all end here
        for path in sorted(entries() - before, key=lambda p: len(p.parts), reverse=True):
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
        if not existed:
            shutil.rmtree(root, ignore_errors=True)
        reason = (str(exc).strip().splitlines() or [""])[-1][:120]  # torchvision puts the cause last
        raise UsageError(
            f"{cls.__name__} files are missing under {root / folder} and could not be downloaded "
            f"({type(exc).__name__}: {reason}); put {', '.join(files)} there, or point --data-root / "
            f"$DISTILLKIT_DATA at a folder that has {folder}/"
        ) from None
    finally:
        socket.setdefaulttimeout(timeout)


_MNIST_FILES = (
    "train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz",
)


def builtin_datasets() -> dict[str, Callable[..., DatasetSpec]]:
    """The datasets the host registers (see :mod:`distillkit.builtins`)."""
    svhn_splits = {"train": {"split": "train"}, "test": {"split": "test"}}
    fixed = {
        "mnist": DatasetSpec(
            "mnist", 1, 28, 28, DIGITS, (0.1307,), (0.3081,),
            _torchvision_split("MNIST", "MNIST/raw", _MNIST_FILES), "MNIST digits, 60k/10k, 1x28x28",
        ),
        "fashionmnist": DatasetSpec(
            "fashionmnist", 1, 28, 28, FASHION, (0.2861,), (0.3530,),
            _torchvision_split("FashionMNIST", "FashionMNIST/raw", _MNIST_FILES), "Fashion-MNIST, 60k/10k, 1x28x28",
        ),
        "cifar10": DatasetSpec(
            "cifar10", 3, 32, 32, CIFAR10, (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010),
            _torchvision_split("CIFAR10", "cifar-10-batches-py", ("cifar-10-python.tar.gz",)), "CIFAR-10, 50k/10k, 3x32x32",
        ),
        "cifar100": DatasetSpec(
            "cifar100", 3, 32, 32, tuple(f"class{i}" for i in range(100)), (0.5071, 0.4866, 0.4409),
            (0.2673, 0.2564, 0.2762),
            _torchvision_split("CIFAR100", "cifar-100-python", ("cifar-100-python.tar.gz",)), "CIFAR-100, 50k/10k, 3x32x32",
        ),
        "svhn": DatasetSpec(
            "svhn", 3, 32, 32, DIGITS, (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970),
            _torchvision_split("SVHN", ".", ("train_32x32.mat", "test_32x32.mat"), **svhn_splits),
            "SVHN digits, 73k/26k, 3x32x32 (needs scipy)",
        ),
    }
    factories: dict[str, Callable[..., DatasetSpec]] = {name: _fixed(spec) for name, spec in fixed.items()}
    factories["imagefolder"] = image_folder
    factories["fake"] = fake
    factories.update(imagenet_datasets())
    return factories


def _fixed(spec: DatasetSpec) -> Callable[[], DatasetSpec]:
    def factory() -> DatasetSpec:
        return spec

    factory.__doc__ = spec.description
    return factory


def image_folder(path: str, size: int = 32, channels: int = 3) -> DatasetSpec:
    """Images in ``PATH/train/<class>/*`` and ``PATH/test/<class>/*`` (torchvision ImageFolder), resized to ``size``."""
    root = Path(path).expanduser()
    for split in ("train", "test"):
        if not (root / split).is_dir():
            raise UsageError(f"imagefolder: {root / split} is missing; expected {root}/{{train,test}}/<class>/<images>")
    classes = tuple(sorted(p.name for p in (root / "train").iterdir() if p.is_dir()))

    def load(_root: Path, train: bool) -> tuple[Tensor, Tensor]:
        import torchvision.datasets as tvd
        import torchvision.transforms.v2 as T

        mode = "L" if channels == 1 else "RGB"
        tf = T.Compose([T.Resize((size, size)), T.PILToTensor()])
        ds = tvd.ImageFolder(str(root / ("train" if train else "test")), transform=tf,
                             loader=lambda p: tvd.folder.default_loader(p).convert(mode))
        if tuple(ds.classes) != classes:
            raise UsageError(f"imagefolder: train and test class folders differ under {root}")
        images = torch.stack([ds[i][0] for i in range(len(ds))])
        return images, torch.as_tensor(ds.targets)

    # Normalisation from the training split, computed once here.
    probe, _ = load(root, True)
    x = probe.float() / 255
    mean = tuple(x.mean(dim=(0, 2, 3)).tolist())
    std = tuple(x.std(dim=(0, 2, 3)).clamp_min(1e-3).tolist())
    return DatasetSpec(f"imagefolder:{root}", channels, size, size, classes, mean, std, load, f"ImageFolder at {root}")


def fake(classes: int = 10, channels: int = 3, size: int = 32, per_class: int = 300, test_per_class: int = 100,
         seed: int = 0) -> DatasetSpec:
    """Generated images (class-specific smooth pattern + noise): a stand-in for 3-channel data with no files."""

    def load(_root: Path, train: bool) -> tuple[Tensor, Tensor]:
        g = torch.Generator().manual_seed(seed)
        protos = torch.nn.functional.interpolate(torch.rand(classes, channels, 4, 4, generator=g), size=(size, size),
                                                 mode="bilinear", align_corners=False)
        g.manual_seed(seed + (1 if train else 2))
        n = per_class if train else test_per_class
        labels = torch.arange(classes).repeat_interleave(n)
        noise = torch.rand(len(labels), channels, size, size, generator=g)
        images = (0.6 * protos[labels] + 0.4 * noise).mul(255).round().to(torch.uint8)
        return images, labels

    return DatasetSpec("fake", channels, size, size, tuple(f"class{i}" for i in range(classes)),
                       (0.5,) * channels, (0.25,) * channels, load, "generated patterns, no files needed")


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
        """Normalised images of split rows ``rows`` (CPU int64), on ``device``."""
        picked = self.pixels[rows.to(self.pixels.device)]
        if picked.device != self.device:
            picked = picked.pin_memory().to(self.device, non_blocking=True) if self.device.type == "cuda" \
                else picked.to(self.device)
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


def load_split(spec: DatasetSpec, root: Path, train: bool, device: torch.device | str = "cpu") -> RealData:
    raw, labels = spec.load(root, train)
    if raw.shape[1:] != (spec.channels, spec.height, spec.width):
        raise UsageError(f"dataset {spec.name}: images have shape {tuple(raw.shape[1:])}, "
                         f"expected {(spec.channels, spec.height, spec.width)}")
    return RealData(spec.image_spec, _placed(raw, device), labels.long(), spec.class_names, device)
