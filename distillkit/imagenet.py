"""ImageNet subsets read from a folder in ImageNet's layout, decoded once into a memory-mapped cache.

**Datasets** (``--dataset NAME --set dataset.size=PIXELS``):

* ``imagenette``, ``imagewoof``: fastai's 10-class subsets, classes in wnid order (their folder
  order); 128 px by default, the resolution of the ImageNet-subset benchmarks of the distillation
  literature (GeorgeCazenavette/mtt-distillation ``utils.py``).
* ``imagenet10``, ``imagenet100``: IDC's subsets, the first 10 and all 100 wnids of
  ``misc/class100.txt`` in that file's order (snu-mllab/Efficient-Dataset-Condensation,
  ``data.py`` ``ImageFolder.find_subclasses``); 224 px by default, as IDC's ``argument.py`` sets it.

**Where the files are.** The ImageNet root is ``--data-root`` itself when it has a ``train/``
folder, else ``<data-root>/imagenet``. Training images are ``train/<wnid>/*.JPEG``; test images
``val/<wnid>/*.JPEG`` (torchvision's and fastai's layout), or a flat ``val/*.JPEG`` with Kaggle's
``LOC_val_solution.csv`` beside ``train/`` and ``val/`` (its first wnid per image is the label).

**Resize.** torchvision's ``Resize(size)`` (shorter side to ``size``, bilinear, antialiased, the
longer side truncated) then ``CenterCrop(size)``: IDC's ``transform_imagenet`` for ``size > 0``,
train and test alike. It keeps the aspect ratio (MTT's ``Resize((s, s))`` squashes instead). The
decoding workers run it on PIL directly, so they need not import torch; the tests check that the
pixels equal torchvision's.

**Normalisation**: ImageNet's mean and std (IDC ``data.py`` ``MEANS``/``STDS``, MTT likewise),
fixed, so no statistics pass over the data is needed and a spec exists before any file is read.

The decoded cache is :mod:`distillkit.decoded_cache`.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

from distillkit.decoded_cache import IMAGE_SUFFIXES, Listing, ensure_cache
from distillkit.errors import UsageError

if TYPE_CHECKING:
    from torch import Tensor

    from distillkit.interfaces import DatasetSpec

IMAGENETTE = ("n01440764", "n02102040", "n02979186", "n03000684", "n03028079",
              "n03394916", "n03417042", "n03425413", "n03445777", "n03888257")
IMAGEWOOF = ("n02086240", "n02087394", "n02088364", "n02089973", "n02093754",
             "n02096294", "n02099601", "n02105641", "n02111889", "n02115641")
#: IDC's misc/class100.txt, in its order: ImageNet-10 is the first 10, ImageNet-100 all of them
IDC_CLASS100 = tuple("""
    n02869837 n01749939 n02488291 n02107142 n13037406 n02091831 n04517823 n04589890 n03062245 n01773797
    n01735189 n07831146 n07753275 n03085013 n04485082 n02105505 n01983481 n02788148 n03530642 n04435653
    n02086910 n02859443 n13040303 n03594734 n02085620 n02099849 n01558993 n04493381 n02109047 n04111531
    n02877765 n04429376 n02009229 n01978455 n02106550 n01820546 n01692333 n07714571 n02974003 n02114855
    n03785016 n03764736 n03775546 n02087046 n07836838 n04099969 n04592741 n03891251 n02701002 n03379051
    n02259212 n07715103 n03947888 n04026417 n02326432 n03637318 n01980166 n02113799 n02086240 n03903868
    n02483362 n04127249 n02089973 n03017168 n02093428 n02804414 n02396427 n04418357 n02172182 n01729322
    n02113978 n03787032 n02089867 n02119022 n03777754 n04238763 n02231487 n03032252 n02138441 n02104029
    n03837869 n03494278 n04136333 n03794056 n03492542 n02018207 n04067472 n03930630 n03584829 n02123045
    n04229816 n02100583 n03642806 n04336792 n03259280 n02116738 n02108089 n03424325 n01855672 n02090622
""".split())

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

VAL_LABELS = "LOC_val_solution.csv"
SIZES = range(8, 513)
#: what the cached pixels are; part of the key, so changing the transform or the file format rebuilds


def imagenet_datasets() -> dict[str, Callable[..., "DatasetSpec"]]:
    """The ImageNet subsets, by name (registered by :func:`distillkit.data.builtin_datasets`)."""
    return {
        "imagenette": _subset("imagenette", IMAGENETTE, 128, "Imagenette: 10 easy ImageNet classes (fastai)"),
        "imagewoof": _subset("imagewoof", IMAGEWOOF, 128, "Imagewoof: 10 ImageNet dog breeds (fastai)"),
        "imagenet10": _subset("imagenet10", IDC_CLASS100[:10], 224, "ImageNet-10: IDC's first 10 classes"),
        "imagenet100": _subset("imagenet100", IDC_CLASS100, 224, "ImageNet-100: IDC's 100 classes"),
    }


def _subset(name: str, wnids: tuple[str, ...], default_size: int, about: str) -> Callable[..., "DatasetSpec"]:
    def factory(size: int = default_size) -> "DatasetSpec":
        from distillkit.interfaces import DatasetSpec, ImageSpec

        if isinstance(size, bool) or not isinstance(size, int) or size not in SIZES:
            raise UsageError(f"{name}: dataset.size must be a whole number of pixels from {SIZES.start} to "
                             f"{SIZES.stop - 1}, got {size!r}")

        def load(data_root: Path, train: bool) -> tuple["Tensor", "Tensor"]:
            return decoded_split(name, wnids, find_root(name, data_root), "train" if train else "val", size)

        return DatasetSpec(name, ImageSpec(3, size, size, len(wnids), IMAGENET_MEAN, IMAGENET_STD), wnids, load,
                           f"{about}, 3x{size}x{size} from an ImageNet folder (decoded once into a cache)")

    factory.__doc__ = (f"{about}, from train/<wnid> and val/<wnid> of an ImageNet folder; option size "
                       f"(default {default_size}).")
    return factory


def find_root(dataset: str, data_root: Path) -> Path:
    """The ImageNet folder: ``data_root`` if it has ``train/``, else ``data_root/imagenet``."""
    for candidate in (Path(data_root), Path(data_root) / "imagenet"):
        if (candidate / "train").is_dir():
            return candidate
    raise UsageError(f"{dataset}: no ImageNet folder: neither {data_root}/train nor {data_root}/imagenet/train "
                     f"exists; point --data-root at a folder with train/<wnid>/*.JPEG and val/<wnid>/*.JPEG")


# -- listing: what the cache is keyed by -------------------------------------


def list_split(dataset: str, wnids: Sequence[str], root: Path, split: str) -> Listing:
    """The files of ``split`` (``train`` or ``val``) for ``wnids``; a :class:`UsageError` names what is missing."""
    digest = hashlib.sha256()
    flat = split == "val" and (root / VAL_LABELS).is_file() and not all((root / split / w).is_dir() for w in wnids)
    by_class = _flat_val(dataset, wnids, root, digest) if flat else _class_folders(dataset, wnids, root, split)
    files, labels = [], []
    for label, (wnid, names) in enumerate(zip(wnids, by_class)):
        if not names:
            raise UsageError(f"{dataset}: no {split} images of class {wnid} under {root} "
                             f"(looked for {', '.join(IMAGE_SUFFIXES)} files)")
        for rel in names:
            st = os.stat(root / rel)
            digest.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\0{label}\n".encode())
        files += names
        labels += [label] * len(names)
    return Listing(root, tuple(files), tuple(labels), digest.hexdigest())


def _class_folders(dataset: str, wnids: Sequence[str], root: Path, split: str) -> list[list[str]]:
    """``<split>/<wnid>/<image>`` per class, by file name."""
    folder = root / split
    missing = [w for w in wnids if not (folder / w).is_dir()]
    if missing:
        flat = f", and no flat val/ with {root / VAL_LABELS}" if split == "val" else ""
        raise UsageError(f"{dataset}: {folder} lacks {len(missing)} of its {len(wnids)} class folders "
                         f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}){flat}")
    return [[f"{split}/{w}/{name}" for name in sorted(e.name for e in os.scandir(folder / w)
                                                      if e.name.lower().endswith(IMAGE_SUFFIXES) and e.is_file())]
            for w in wnids]


def _flat_val(dataset: str, wnids: Sequence[str], root: Path, digest) -> list[list[str]]:
    """``val/<ImageId>.JPEG`` per class, from Kaggle's ``LOC_val_solution.csv`` (ImageId,PredictionString)."""
    path = root / VAL_LABELS
    st = path.stat()
    digest.update(f"{VAL_LABELS}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    wanted = {w: i for i, w in enumerate(wnids)}
    by_class: list[list[str]] = [[] for _ in wnids]
    with open(path, encoding="utf-8") as fh:
        next(fh, None)  # header
        for line in fh:
            image_id, _, boxes = line.strip().partition(",")
            label = wanted.get(boxes.split(" ", 1)[0])
            if label is not None:
                by_class[label].append(f"val/{image_id}.JPEG")
    for names in by_class:
        names.sort()
        absent = [n for n in names if not (root / n).is_file()]
        if absent:
            raise UsageError(f"{dataset}: {path} lists {len(absent)} images that are not in {root / 'val'} "
                             f"(e.g. {absent[0]})")
    return by_class


def decoded_split(dataset: str, wnids: Sequence[str], root: Path, split: str, size: int,
                  workers: int | None = None) -> tuple["Tensor", "Tensor"]:
    """``(uint8 images (N, 3, size, size) memory-mapped from the cache, int64 labels (N,))``, building the
    cache first when it is missing or stale (``workers`` decoding processes; default: one per CPU, fewer
    for small splits)."""
    import torch

    listing = list_split(dataset, wnids, root, split)
    entry = ensure_cache(dataset, split, listing, size, workers)
    # MAP_PRIVATE: pages are read from the file when touched and never written back, so nothing a run
    # does to the tensor can change the cache; Tensor.is_shared() is True, which keeps it on the host
    # (see distillkit.data.RealData)
    pixels = torch.from_file(str(entry.data), shared=False, size=entry.nbytes, dtype=torch.uint8)
    return pixels.view(entry.shape), torch.tensor(listing.labels, dtype=torch.long)
