"""Files a run writes: the synthetic-set artifact, checkpoints, JSON; atomic and safe to load.

Every file is written to a temporary sibling, flushed, fsynced and renamed, so a
crash leaves either the old file or the new one, never half of one. Tensor
files hold only tensors and plain Python values and load with
``torch.load(..., weights_only=True)``: a file that would need to run code is
refused. They also carry a digest of their content, because a flipped byte inside
a tensor's storage still unpickles cleanly (torch does not check the zip CRCs).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor

from distillkit.errors import UsageError
from distillkit.interfaces import ImageSpec, TrainingSet

ARTIFACT_FORMAT = "distillkit.synthetic-set"
CHECKPOINT_FORMAT = "distillkit.checkpoint"
FORMAT_VERSION = 1

_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's archive format, the only one distillkit writes


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()  # what open() would give; mkstemp's 0600 would hide results from a shared group


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    try:
        _write_replace(path, data)
    except OSError as exc:  # name the file being written, not its temporary sibling
        raise OSError(exc.errno, exc.strerror, str(path)) from exc


def _write_replace(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, _FILE_MODE)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def content_digest(obj: Any) -> str:
    """A digest of a nested structure of tensors and plain values (keys, dtypes, shapes and bytes)."""
    h = hashlib.blake2b(digest_size=16)

    def walk(value: Any) -> None:
        if isinstance(value, Tensor):
            t = value.detach().cpu().contiguous()
            h.update(f"tensor {t.dtype} {tuple(t.shape)};".encode())
            h.update(t.flatten().view(torch.uint8).numpy())  # the buffer itself, no copy
        elif isinstance(value, Mapping):
            h.update(f"dict {len(value)};".encode())
            for key in sorted(value, key=repr):
                h.update(f"{key!r}:".encode())
                walk(value[key])
        elif isinstance(value, (list, tuple)):
            h.update(f"{type(value).__name__} {len(value)};".encode())
            for item in value:
                walk(item)
        else:
            h.update(f"{value!r};".encode())

    walk(obj)
    return h.hexdigest()


def atomic_save(obj: Mapping[str, Any], path: Path) -> None:
    """``torch.save`` a dict of tensors and plain values atomically, with a content ``digest`` entry."""
    obj = dict(obj)
    obj["digest"] = content_digest(obj)
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def atomic_write_json(obj: Any, path: Path) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def safe_load(path: Path, expected_format: str) -> dict[str, Any]:
    """Load a distillkit tensor file with ``weights_only=True``; refuse foreign, corrupt or code-carrying files."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path} does not exist")
    with open(path, "rb") as fh:
        magic = fh.read(len(_ZIP_MAGIC))
    if magic != _ZIP_MAGIC:
        what = "it is empty" if not magic else "it is not a PyTorch archive"
        raise UsageError(f"{path} is not a {expected_format} file ({what})")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        blocked = re.search(r"GLOBAL (\S+)", str(exc))
        if blocked:
            raise UsageError(f"refusing to load {path}: unpickling it would call {blocked.group(1)}, i.e. run code; "
                             f"distillkit files hold only tensors and plain values") from None
        raise UsageError(f"{path} is corrupt ({_last_line(exc)})") from None
    except Exception as exc:  # noqa: BLE001 - any failure to parse untrusted bytes means a damaged file
        raise UsageError(f"{path} is corrupt or truncated ({type(exc).__name__}: {_last_line(exc)})") from None
    if not isinstance(obj, dict) or obj.get("format") != expected_format:
        found = obj.get("format") if isinstance(obj, dict) else type(obj).__name__
        raise UsageError(f"{path} is not a {expected_format} file (found {found!r})")
    if obj.get("format_version", 0) > FORMAT_VERSION:
        raise UsageError(f"{path} has format version {obj['format_version']}; this distillkit reads up to "
                         f"{FORMAT_VERSION}: upgrade distillkit")
    digest = obj.pop("digest", None)  # absent only in files written before digests existed
    if digest is not None and digest != content_digest(obj):
        raise UsageError(f"{path} is corrupt: its content does not match the digest written with it")
    return obj


def _last_line(exc: BaseException) -> str:
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return lines[-1].split(". ")[0][:200] if lines else "no detail"


@dataclass(frozen=True)
class SyntheticSet:
    """A loaded artifact: the decoded training set plus everything needed to interpret or rebuild it."""

    images: Tensor  # decoded, normalised (N, c, H, W)
    labels: Tensor  # (N,)
    stored: Tensor  # stored images as pictures, normalised
    stored_labels: Tensor
    spec: ImageSpec
    class_names: tuple[str, ...]
    meta: dict[str, Any]

    @property
    def ipc(self) -> int:
        return int(self.meta["ipc"])

    @property
    def seed(self) -> int:
        return int(self.meta["seed"])

    @property
    def config(self) -> dict[str, Any]:
        return self.meta["config"]

    def training_set(self, device: torch.device | str) -> TrainingSet:
        return TrainingSet(self.images.to(device), self.labels.to(device))


def versions() -> dict[str, str]:
    import importlib.metadata as md
    import platform

    out = {"python": platform.python_version()}
    for dist in ("distillkit", "torch", "torchvision", "timm"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            out[dist] = "?"
    return out


def save_synthetic(path: Path, *, images: Tensor, labels: Tensor, stored: Tensor, stored_labels: Tensor,
                   spec: ImageSpec, class_names: tuple[str, ...], parameterization: str,
                   parameterization_state: Mapping[str, Tensor], config: Mapping[str, Any],
                   dataset: str, method: str, iterations_done: int) -> None:
    atomic_save({
        "format": ARTIFACT_FORMAT, "format_version": FORMAT_VERSION,
        "images": images.detach().cpu().contiguous(), "labels": labels.cpu(),
        "stored": stored.detach().cpu().contiguous(), "stored_labels": stored_labels.cpu(),
        "parameterization": parameterization,
        "parameterization_state": {k: v.detach().cpu() for k, v in parameterization_state.items()},
        "class_names": list(class_names),
        **spec.as_dict(),
        "ipc": config["ipc"], "seed": config["seed"], "dataset": dataset, "method": method,
        "iterations_done": iterations_done, "config": dict(config), "versions": versions(),
    }, path)


def load_synthetic(path: Path) -> SyntheticSet:
    """Load an artifact file (a run directory's: :func:`distillkit.rundir.load_run_synthetic`)."""
    path = Path(path)
    obj = safe_load(path, ARTIFACT_FORMAT)
    try:
        spec = ImageSpec.from_dict(obj)
        images, labels = obj["images"], obj["labels"]
        if images.ndim != 4 or images.shape[0] != labels.shape[0] or tuple(images.shape[1:]) != (
                spec.channels, spec.height, spec.width):
            raise ValueError(f"images {tuple(images.shape)} do not match labels {tuple(labels.shape)} and spec")
        meta = {k: v for k, v in obj.items() if k not in ("images", "labels", "stored", "stored_labels")}
        return SyntheticSet(images.float(), labels.long(), obj["stored"].float(), obj["stored_labels"].long(), spec,
                            tuple(obj["class_names"]), meta)
    except (KeyError, ValueError, AttributeError, TypeError) as exc:
        raise UsageError(f"{path} is a damaged {ARTIFACT_FORMAT} file: {exc}") from None
