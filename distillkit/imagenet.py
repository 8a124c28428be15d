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

**The decoded cache.** The first use of a split decodes every file once, in worker processes,
into one uint8 file ``(N, 3, size, size)`` under ``$DISTILLKIT_IMAGE_CACHE``, else
``$XDG_CACHE_HOME/distillkit/decoded`` (``~/.cache/distillkit/decoded``). It is keyed by the
split's listing (relative path, size and mtime of every file, and of the labels file) and the
resize settings; later runs list the folder, find the key and memory-map the file (start-up in
seconds, no pixel is read until it is used). The data file is written under a temporary name,
fsynced and renamed, and the manifest beside it is written last: a cache without a manifest, with
another key, or of the wrong size is rebuilt. One process builds while others wait on a file lock
(torchrun ranks, concurrent runs); a rebuilt cache replaces the stale one of the same dataset,
split, size and source folder.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import math
import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

import numpy as np
from PIL import Image

from distillkit.errors import UsageError

if TYPE_CHECKING:  # torch stays out of this module's imports: decoding workers import it and never need torch
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
IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")
VAL_LABELS = "LOC_val_solution.csv"
SIZES = range(8, 513)
#: what the cached pixels are; part of the key, so changing the transform or the file format rebuilds
CACHE_FORMAT = 1
TRANSFORM = "torchvision Resize(size) bilinear antialiased + CenterCrop(size), RGB, uint8 NCHW"
CHUNK = 32  # images per worker task: small enough for a smooth progress bar, large enough to amortise the IPC
MIN_IMAGES_PER_WORKER = 200  # below this a worker's start-up (~0.5 s) costs more than it decodes


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
        from distillkit.interfaces import DatasetSpec

        if isinstance(size, bool) or not isinstance(size, int) or size not in SIZES:
            raise UsageError(f"{name}: dataset.size must be a whole number of pixels from {SIZES.start} to "
                             f"{SIZES.stop - 1}, got {size!r}")

        def load(data_root: Path, train: bool) -> tuple["Tensor", "Tensor"]:
            return decoded_split(name, wnids, find_root(name, data_root), "train" if train else "val", size)

        return DatasetSpec(name, 3, size, size, wnids, IMAGENET_MEAN, IMAGENET_STD, load,
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


@dataclass(frozen=True)
class Listing:
    """The image files of one split of a subset, in label order (class by class, by file name)."""

    root: Path
    files: tuple[str, ...]  # relative to root
    labels: tuple[int, ...]
    #: sha256 over every file's (relative path, size, mtime_ns, label) and the labels file, if any
    digest: str


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


# -- the cache ----------------------------------------------------------------


def cache_dir() -> Path:
    """``$DISTILLKIT_IMAGE_CACHE``, else ``$XDG_CACHE_HOME/distillkit/decoded`` (``~/.cache/...``)."""
    if os.environ.get("DISTILLKIT_IMAGE_CACHE"):
        return Path(os.environ["DISTILLKIT_IMAGE_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "distillkit" / "decoded"


@dataclass(frozen=True)
class CacheEntry:
    """Where the decoded pixels of one listing at one size live, and what their manifest must say."""

    data: Path  # raw uint8, (N, 3, size, size), C order
    manifest: Path
    key: str
    shape: tuple[int, int, int, int]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape)

    def valid(self) -> bool:
        """The manifest exists, has this key and shape, and the data file has exactly that many bytes."""
        try:
            manifest = json.loads(self.manifest.read_text())
            size = self.data.stat().st_size
        except (OSError, ValueError):
            return False
        return (manifest.get("format") == CACHE_FORMAT and manifest.get("key") == self.key
                and tuple(manifest.get("shape", ())) == self.shape and size == self.nbytes)


def cache_entry(dataset: str, split: str, listing: Listing, size: int) -> CacheEntry:
    key = hashlib.sha256(json.dumps({"format": CACHE_FORMAT, "transform": TRANSFORM, "size": size,
                                     "listing": listing.digest}, sort_keys=True).encode()).hexdigest()
    stem = f"{dataset}-{split}-{size}px-{key[:16]}"
    folder = cache_dir()
    return CacheEntry(folder / f"{stem}.u8", folder / f"{stem}.json", key, (len(listing.files), 3, size, size))


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


def ensure_cache(dataset: str, split: str, listing: Listing, size: int, workers: int | None = None) -> CacheEntry:
    """The valid cache entry of ``listing`` at ``size``, decoding it now if needed (one process at a time)."""
    entry = cache_entry(dataset, split, listing, size)
    if entry.valid():
        return entry
    entry.data.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive(entry.data.with_suffix(".lock"), f"another process is decoding {entry.data.name}; waiting"):
        if not entry.valid():  # the process that held the lock may have built it
            _build(dataset, split, listing, size, entry, workers)
    return entry


@contextlib.contextmanager
def _exclusive(lock_path: Path, waiting: str) -> Iterator[None]:
    """An exclusive ``flock`` on ``lock_path``: released by the kernel even if the holder is killed."""
    with open(lock_path, "a+b") as fh:
        locked = True
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _console().print(waiting)
            fcntl.flock(fh, fcntl.LOCK_EX)
        except OSError:  # a file system without locks (some network mounts): builds are atomic, work may double
            locked = False
        try:
            yield
        finally:
            if locked:
                fcntl.flock(fh, fcntl.LOCK_UN)


def _build(dataset: str, split: str, listing: Listing, size: int, entry: CacheEntry, workers: int | None) -> None:
    from distillkit.artifact import atomic_write_json

    folder = entry.data.parent
    for stale in folder.glob(f".{entry.data.name}.*.tmp"):  # left by a killed build (we hold the lock)
        stale.unlink(missing_ok=True)
    tmp = folder / f".{entry.data.name}.{os.getpid()}.tmp"
    try:
        with open(tmp, "wb") as fh:
            _reserve(fh.fileno(), entry.nbytes, f"{dataset}: the decoded {split} split needs "
                     f"{entry.nbytes / 2**30:.2f} GiB in {folder}")
        _decode_into(tmp, listing, size, entry.shape, workers, f"decoding {dataset} {split} ({size} px)")
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, entry.data)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(folder)
    atomic_write_json({"format": CACHE_FORMAT, "key": entry.key, "shape": list(entry.shape), "dtype": "uint8",
                       "transform": TRANSFORM, "dataset": dataset, "split": split, "source": str(listing.root)},
                      entry.manifest)
    _drop_replaced(entry, dataset, split, size, listing.root)


def _reserve(fd: int, nbytes: int, need: str) -> None:
    """Make the file ``nbytes`` long with its blocks allocated now: a disk that fills up under a memory map
    would kill a decoding worker with SIGBUS instead of failing here with a message."""
    try:
        os.posix_fallocate(fd, 0, nbytes)
        return
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise UsageError(f"{need} ({exc.strerror}); free space there or set $DISTILLKIT_IMAGE_CACHE to "
                             f"another folder") from None
    except AttributeError:  # no posix_fallocate on this platform (macOS)
        pass
    os.ftruncate(fd, nbytes)  # the file system cannot reserve blocks: a sparse file, filled by the workers


def _drop_replaced(entry: CacheEntry, dataset: str, split: str, size: int, root: Path) -> None:
    """Remove caches of the same dataset, split, size and source folder that ``entry`` replaces."""
    for manifest in entry.manifest.parent.glob(f"{dataset}-{split}-{size}px-*.json"):
        if manifest == entry.manifest:
            continue
        try:
            source = json.loads(manifest.read_text()).get("source")
        except (OSError, ValueError):
            continue
        if source == str(root):
            for path in (manifest, manifest.with_suffix(".u8"), manifest.with_suffix(".lock")):
                path.unlink(missing_ok=True)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _console():
    from rich.console import Console

    return Console(stderr=True)


# -- decoding -----------------------------------------------------------------


def resize_crop(image: Image.Image, size: int) -> Image.Image:
    """torchvision's ``Resize(size)`` then ``CenterCrop(size)`` on a PIL image (same sizes, same pixels)."""
    w, h = image.size
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(size * long / short)  # torchvision truncates
    new_w, new_h = (size, new_long) if w <= h else (new_long, size)
    if (new_w, new_h) != (w, h):
        image = image.resize((new_w, new_h), Image.BILINEAR)
    top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
    return image.crop((left, top, left + size, top + size))


class _Decoder:
    """Decodes files into rows of the memory-mapped target (one per process; workers write disjoint rows)."""

    def __init__(self, target: str, shape: tuple[int, ...], root: str, size: int) -> None:
        self.rows = np.memmap(target, dtype=np.uint8, mode="r+", shape=shape)
        self.root, self.size = Path(root), size

    def __call__(self, start: int, files: Sequence[str]) -> int:
        for i, rel in enumerate(files):
            path = self.root / rel
            try:
                with Image.open(path) as image:
                    pixels = np.asarray(resize_crop(image.convert("RGB"), self.size))
            except (OSError, ValueError, Image.DecompressionBombError) as exc:
                raise UsageError(f"cannot decode {path}: {exc}; delete or replace that file") from None
            self.rows[start + i] = pixels.transpose(2, 0, 1)
        return len(files)


_worker: _Decoder | None = None


def _start_worker(target: str, shape: tuple[int, ...], root: str, size: int) -> None:
    global _worker
    _worker = _Decoder(target, shape, root, size)


def _decode_chunk(start: int, files: Sequence[str]) -> int:
    assert _worker is not None, "_start_worker did not run in this process"
    return _worker(start, files)


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the platform has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def default_workers(images: int) -> int:
    """One decoding process per available CPU, but none that would decode fewer than a few hundred images."""
    return max(1, min(available_cpus(), images // MIN_IMAGES_PER_WORKER))


def _decode_into(target: Path, listing: Listing, size: int, shape: tuple[int, ...], workers: int | None,
                 title: str) -> None:
    """Decode every file of ``listing`` into ``target`` (already ``shape`` bytes long), with a progress bar."""
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    n = len(listing.files)
    workers = default_workers(n) if workers is None else max(1, workers)
    chunks = [(start, listing.files[start:start + CHUNK]) for start in range(0, n, CHUNK)]
    args = (str(target), shape, str(listing.root), size)
    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), TimeRemainingColumn(), console=_console())
    if workers == 1:
        decoder = _Decoder(*args)
        with progress:
            task = progress.add_task(title, total=n)
            for start, files in chunks:
                progress.advance(task, decoder(start, files))
        del decoder  # unmaps the target
        return
    # spawn: safe whatever threads or CUDA context this process has; a worker imports this module (no torch)
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_start_worker,
                             initargs=args) as pool:
        futures = [pool.submit(_decode_chunk, start, files) for start, files in chunks]
        try:
            with progress:
                task = progress.add_task(f"{title}, {workers} processes", total=n)
                for future in as_completed(futures):
                    progress.advance(task, future.result())
        except BaseException:
            for future in futures:
                future.cancel()
            raise
