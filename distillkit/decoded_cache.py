"""The decoded cache: image files decoded once, in worker processes, into one memory-mapped uint8 file.

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

Used by :mod:`distillkit.imagenet`; keyed by a :class:`Listing` of the source files.
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
from typing import Iterator, Sequence

import numpy as np
from PIL import Image

from distillkit.errors import UsageError

IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")
CACHE_FORMAT = 1
TRANSFORM = "torchvision Resize(size) bilinear antialiased + CenterCrop(size), RGB, uint8 NCHW"
CHUNK = 32  # images per worker task: small enough for a smooth progress bar, large enough to amortise the IPC
MIN_IMAGES_PER_WORKER = 200  # below this a worker's start-up (~0.5 s) costs more than it decodes


@dataclass(frozen=True)
class Listing:
    """The image files of one split of a subset, in label order (class by class, by file name)."""

    root: Path
    files: tuple[str, ...]  # relative to root
    labels: tuple[int, ...]
    #: sha256 over every file's (relative path, size, mtime_ns, label) and the labels file, if any
    digest: str


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
    # spawn: safe whatever threads or CUDA context this process has; a worker imports this module once (and,
    # through the distillkit package, torch: a second or two per worker, paid once per cache build)
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
