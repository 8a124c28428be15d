"""The built-in datasets: their files, layouts, class names and loaders.

Files use torchvision's on-disk layout; torchvision's download runs only when files are
missing, and if that fails too the error names the files and the folder. CIFAR-10/100 are
also read from numpy ``.npz`` files (see :class:`CifarFiles`). Each dataset is a
:class:`~distillkit.interfaces.DatasetSpec`; :func:`builtin_datasets` is what the host's own
plugin registers.
"""

from __future__ import annotations

import pickle
import shutil
import zipfile
import zlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from distillkit.errors import UsageError
from distillkit.imagenet import imagenet_datasets
from distillkit.interfaces import DatasetSpec, ImageSpec
from distillkit.whitening import DEFAULT_EPS

DIGITS = tuple(str(i) for i in range(10))
FASHION = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
CIFAR10 = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
#: CIFAR-100's fine labels in label order: the ``fine_label_names`` of the dataset's own ``meta`` file
CIFAR100 = (
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle", "bottle",
    "bowl", "boy", "bridge", "bus", "butterfly", "camel", "can", "castle", "caterpillar", "cattle",
    "chair", "chimpanzee", "clock", "cloud", "cockroach", "couch", "crab", "crocodile", "cup", "dinosaur",
    "dolphin", "elephant", "flatfish", "forest", "fox", "girl", "hamster", "house", "kangaroo", "keyboard",
    "lamp", "lawn_mower", "leopard", "lion", "lizard", "lobster", "man", "maple_tree", "motorcycle", "mountain",
    "mouse", "mushroom", "oak_tree", "orange", "orchid", "otter", "palm_tree", "pear", "pickup_truck", "pine_tree",
    "plain", "plate", "poppy", "porcupine", "possum", "rabbit", "raccoon", "ray", "road", "rocket",
    "rose", "sea", "seal", "shark", "shrew", "skunk", "skyscraper", "snail", "snake", "spider",
    "squirrel", "streetcar", "sunflower", "sweet_pepper", "table", "tank", "telephone", "television", "tiger",
    "tractor", "train", "trout", "tulip", "turtle", "wardrobe", "whale", "willow_tree", "wolf", "woman", "worm",
)


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
            try:
                ds = _download(cls, root, folder, kwargs)
            except _DownloadFailed as failed:
                raise UsageError(
                    f"{cls_name} files are missing under {root / folder} and could not be downloaded ({failed}); "
                    f"put {', '.join(files)} there, or point --data-root / $DISTILLKIT_DATA at a folder that has "
                    f"{folder}/"
                ) from None
        images = torch.as_tensor(ds.data)
        labels = torch.as_tensor(ds.targets if hasattr(ds, "targets") else ds.labels)
        if images.ndim == 3:  # (N, H, W) grey
            images = images.unsqueeze(1)
        elif images.shape[-1] in (1, 3):  # (N, H, W, C)
            images = images.permute(0, 3, 1, 2)
        return images.contiguous(), labels.long()

    return load


class _DownloadFailed(Exception):
    """torchvision's download did not bring the files; the message is the cause, one line."""


def _download(cls, root: Path, folder: str, kwargs: dict):
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
        raise _DownloadFailed(f"{type(exc).__name__}: {reason}") from None
    finally:
        socket.setdefaulttimeout(timeout)


#: what a file that does not parse raises, from numpy's npz reader, zipfile, zlib or pickle
_UNREADABLE = (OSError, EOFError, ValueError, KeyError, TypeError, zipfile.BadZipFile, zlib.error,
               pickle.UnpicklingError)


@dataclass(frozen=True)
class CifarFiles:
    """Where one CIFAR dataset lies under the data root, in either of two layouts, npz first:

    - npz: ``<root>/<npz_folder>/{train,test}.npz``, each with ``images`` uint8 (N, 32, 32, 3) and ``labels`` (N,),
      plus ``classes.txt``, one class name per line in label order (the layout of the shared data folder);
    - torchvision's: ``<root>/<batches_folder>/``, the pickled batches of the original archive. Read here
      directly (torchvision's class insists on the original files' md5s); downloaded by torchvision when
      neither layout is there.

    Both are read as whole arrays, never image by image (the 50000 CIFAR-10 train images: 1.8 s, one core).
    """

    torchvision_class: str
    npz_folder: str
    batches_folder: str
    train_batches: tuple[str, ...]
    test_batch: str
    meta_file: str
    names_key: str  # the class names' key in ``meta_file``
    labels_key: str  # the labels' key in a batch
    archive: str
    class_names: tuple[str, ...]

    def load(self, root: Path, train: bool) -> tuple[Tensor, Tensor]:
        npz = root / self.npz_folder
        if (npz / "train.npz").exists() or (npz / "test.npz").exists():
            return self._load_npz(npz, train)
        batches = root / self.batches_folder
        if not batches.is_dir():
            self._download(root)
        return self._load_batches(batches, train)

    def _load_npz(self, folder: Path, train: bool) -> tuple[Tensor, Tensor]:
        path = folder / ("train.npz" if train else "test.npz")
        if not path.is_file():
            raise UsageError(f"{path} is missing; the npz layout needs {folder}/{{train,test}}.npz and classes.txt")
        names = folder / "classes.txt"
        try:
            listed = tuple(line.strip() for line in names.read_text().splitlines() if line.strip())
        except FileNotFoundError:
            listed = None
        except _UNREADABLE as exc:
            raise _corrupt(names, exc) from None
        self._check_names(names, listed)
        try:
            with np.load(path) as arrays:
                images, labels = arrays["images"], arrays["labels"]
        except _UNREADABLE as exc:
            raise _corrupt(path, exc) from None
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3 or labels.shape != images.shape[:1]:
            raise UsageError(f"{path} holds images {images.dtype} {images.shape} and labels {labels.shape}; "
                             f"expected images uint8 (N, 32, 32, 3) and labels (N,)")
        return self._tensors(path, torch.from_numpy(images).permute(0, 3, 1, 2), labels)

    def _load_batches(self, folder: Path, train: bool) -> tuple[Tensor, Tensor]:
        (names,) = self._unpickle(folder / self.meta_file, self.names_key)
        self._check_names(folder / self.meta_file, tuple(names))
        files = self.train_batches if train else (self.test_batch,)
        parts = [self._unpickle(folder / name, "data", self.labels_key) for name in files]
        try:
            images = np.concatenate([data for data, _ in parts]).reshape(-1, 3, 32, 32)
        except _UNREADABLE as exc:
            raise _corrupt(folder, exc) from None
        labels = np.concatenate([np.asarray(labels) for _, labels in parts])
        return self._tensors(folder, torch.from_numpy(images), labels)

    def _unpickle(self, path: Path, *keys: str) -> list:
        if not path.is_file():
            raise UsageError(f"{path} is missing; torchvision's layout needs {', '.join(self.train_batches)}, "
                             f"{self.test_batch} and {self.meta_file} in {path.parent}")
        try:
            with path.open("rb") as f:
                entry = pickle.load(f, encoding="latin1")  # the original batches are Python 2 pickles
            return [entry[key] for key in keys]
        except _UNREADABLE as exc:
            raise _corrupt(path, exc) from None

    def _check_names(self, path: Path, names: tuple[str, ...] | None) -> None:
        if names is None:
            raise UsageError(f"{path} is missing; it lists the {len(self.class_names)} class names, one per line")
        if names != self.class_names:
            wrong = next((i for i, (a, b) in enumerate(zip(names, self.class_names)) if a != b),
                         min(len(names), len(self.class_names)))
            raise UsageError(f"{path} lists {len(names)} classes that are not {self.torchvision_class}'s "
                             f"{len(self.class_names)} in label order (first difference at label {wrong})")

    def _tensors(self, path: Path, images: Tensor, labels: np.ndarray) -> tuple[Tensor, Tensor]:
        labels = torch.from_numpy(labels.astype(np.int64))
        if len(labels) != len(images):
            raise UsageError(f"{path}: {len(images)} images but {len(labels)} labels")
        if len(labels) and not 0 <= int(labels.min()) <= int(labels.max()) < len(self.class_names):
            raise UsageError(f"{path}: labels span {int(labels.min())}..{int(labels.max())}, "
                             f"expected 0..{len(self.class_names) - 1}")
        return images.contiguous(), labels

    def _download(self, root: Path) -> None:
        import torchvision.datasets as tvd

        try:
            _download(getattr(tvd, self.torchvision_class), root, self.batches_folder, {"train": True})
        except _DownloadFailed as failed:
            raise UsageError(
                f"{self.torchvision_class} files are missing under {root} and could not be downloaded ({failed}); "
                f"put there either the npz layout ({self.npz_folder}/train.npz, {self.npz_folder}/test.npz, "
                f"{self.npz_folder}/classes.txt) or torchvision's layout ({self.batches_folder}/, or {self.archive}), "
                f"or point --data-root / $DISTILLKIT_DATA at a folder that has one of them"
            ) from None


def _corrupt(path: Path, exc: Exception) -> UsageError:
    cause = (str(exc).strip().splitlines() or [""])[0][:160]
    return UsageError(f"{path} is corrupt or truncated ({type(exc).__name__}: {cause}); "
                      f"delete it and put it there again")


_CIFAR10_FILES = CifarFiles(
    "CIFAR10", "CIFAR10", "cifar-10-batches-py", tuple(f"data_batch_{i}" for i in range(1, 6)), "test_batch",
    "batches.meta", "label_names", "labels", "cifar-10-python.tar.gz", CIFAR10,
)
_CIFAR100_FILES = CifarFiles(
    "CIFAR100", "CIFAR100", "cifar-100-python", ("train",), "test", "meta", "fine_label_names", "fine_labels",
    "cifar-100-python.tar.gz", CIFAR100,
)


_MNIST_FILES = (
    "train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz",
)


def builtin_datasets() -> dict[str, Callable[..., DatasetSpec]]:
    """The datasets the host registers (see :mod:`distillkit.builtins`)."""
    svhn_splits = {"train": {"split": "train"}, "test": {"split": "test"}}
    fixed = {
        "mnist": DatasetSpec(
            "mnist", ImageSpec(1, 28, 28, 10, (0.1307,), (0.3081,)), DIGITS,
            _torchvision_split("MNIST", "MNIST/raw", _MNIST_FILES), "MNIST digits, 60k/10k, 1x28x28",
        ),
        "fashionmnist": DatasetSpec(
            "fashionmnist", ImageSpec(1, 28, 28, 10, (0.2861,), (0.3530,)), FASHION,
            _torchvision_split("FashionMNIST", "FashionMNIST/raw", _MNIST_FILES), "Fashion-MNIST, 60k/10k, 1x28x28",
        ),
        # CIFAR mean/std: the values of DC's get_dataset (VICO-UoE/DatasetCondensation, utils.py), which the
        # DM/M3D/IDC results are measured with. The CIFAR-10 std there is not the train set's pixel std
        # (0.2470, 0.2435, 0.2616, shared/data/README.md; the mean agrees); kept so results compare.
        "cifar10": DatasetSpec(
            "cifar10", ImageSpec(3, 32, 32, 10, (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)), CIFAR10,
            _CIFAR10_FILES.load, "CIFAR-10, 50k/10k, 3x32x32",
        ),
        "cifar100": DatasetSpec(
            "cifar100", ImageSpec(3, 32, 32, 100, (0.5071, 0.4866, 0.4409), (0.2673, 0.2564, 0.2762)), CIFAR100,
            _CIFAR100_FILES.load, "CIFAR-100, 50k/10k, 3x32x32",
        ),
        "svhn": DatasetSpec(
            "svhn", ImageSpec(3, 32, 32, 10, (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)), DIGITS,
            _torchvision_split("SVHN", ".", ("train_32x32.mat", "test_32x32.mat"), **svhn_splits),
            "SVHN digits, 73k/26k, 3x32x32 (needs scipy)",
        ),
    }
    factories: dict[str, Callable[..., DatasetSpec]] = {name: _fixed(spec) for name, spec in fixed.items()}
    factories["imagefolder"] = image_folder
    factories["fake"] = fake
    factories.update(imagenet_datasets())
    return factories


def _fixed(spec: DatasetSpec) -> Callable[..., DatasetSpec]:
    def factory(train_per_class: int | None = None, zca: bool = False, zca_eps: float = DEFAULT_EPS) -> DatasetSpec:
        if train_per_class is not None and train_per_class < 1:
            raise UsageError(f"train_per_class must be positive, got {train_per_class}")
        if zca and zca_eps <= 0:
            raise UsageError(f"zca_eps must be positive, got {zca_eps}")
        load = spec.load if train_per_class is None else _first_per_class(spec.load, train_per_class)
        return replace(spec, load=load, zca_eps=zca_eps if zca else None)

    factory.__doc__ = (f"{spec.description}.\n\n``train_per_class=N`` keeps the first N training images of each "
                       f"class, in file order (quick checks; the test split stays whole). ``zca=true`` ZCA-whitens "
                       f"the normalised images (MTT's preprocessing, ``zca_eps`` {DEFAULT_EPS}), fitted on the "
                       f"training split; the synthetic set stores the transform (distillkit.whitening).")
    return factory


def _first_per_class(load: Callable[[Path, bool], tuple[Tensor, Tensor]], n: int
                     ) -> Callable[[Path, bool], tuple[Tensor, Tensor]]:
    def limited(root: Path, train: bool) -> tuple[Tensor, Tensor]:
        images, labels = load(root, train)
        if not train:
            return images, labels
        order = torch.argsort(labels, stable=True)  # class by class, file order inside each
        starts = torch.searchsorted(labels[order], labels[order])  # first position of each row's class
        keep = order[torch.arange(len(order)) - starts < n].sort().values
        return images[keep], labels[keep]
    return limited


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
    return DatasetSpec(f"imagefolder:{root}", ImageSpec(channels, size, size, len(classes), mean, std), classes, load,
                       f"ImageFolder at {root}")


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

    return DatasetSpec("fake", ImageSpec(channels, size, size, classes, (0.5,) * channels, (0.25,) * channels),
                       tuple(f"class{i}" for i in range(classes)), load, "generated patterns, no files needed")
