"""Files a run writes: the synthetic-set artifact, checkpoints, JSON; atomic and safe to load.

Every file is written to a temporary sibling, flushed, fsynced and renamed, so a
crash leaves either the old file or the new one, never half of one. Tensor
files hold only tensors and plain Python values and load with
``torch.load(..., weights_only=True)``: a file that would need to run code is
refused.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import tempfile
import zipfile
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

SYNTHETIC_FILE = "synthetic.pt"
CHECKPOINT_FILE = "checkpoint.pt"
CONFIG_FILE = "config.json"
LOSS_LOG = "losses.jsonl"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
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


def atomic_save(obj: Mapping[str, Any], path: Path) -> None:
    buffer = io.BytesIO()
    torch.save(dict(obj), buffer)
    atomic_write_bytes(path, buffer.getvalue())


def atomic_write_json(obj: Any, path: Path) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def safe_load(path: Path, expected_format: str) -> dict[str, Any]:
    """Load a distillkit tensor file with ``weights_only=True``; refuse foreign, corrupt or code-carrying files."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UsageError(
            f"refusing to load {path}: it holds Python objects that could run code when unpickled "
            f"({str(exc).splitlines()[0][:200]})"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as exc:
        raise UsageError(f"{path} is corrupt or truncated ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") \
            from None
    if not isinstance(obj, dict) or obj.get("format") != expected_format:
        found = obj.get("format") if isinstance(obj, dict) else type(obj).__name__
        raise UsageError(f"{path} is not a {expected_format} file (found {found!r})")
    if obj.get("format_version", 0) > FORMAT_VERSION:
        raise UsageError(f"{path} has format version {obj['format_version']}; this distillkit reads up to "
                         f"{FORMAT_VERSION}: upgrade distillkit")
    return obj


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
        "mean": list(spec.mean), "std": list(spec.std),
        "channels": spec.channels, "height": spec.height, "width": spec.width, "num_classes": spec.num_classes,
        "ipc": config["ipc"], "seed": config["seed"], "dataset": dataset, "method": method,
        "iterations_done": iterations_done, "config": dict(config), "versions": versions(),
    }, path)


def load_synthetic(path: Path) -> SyntheticSet:
    """Load ``synthetic.pt`` (or the one inside a run directory)."""
    path = Path(path)
    if path.is_dir():
        path = path / SYNTHETIC_FILE
        if not path.exists():
            raise UsageError(f"{path.parent} holds no {SYNTHETIC_FILE}: is it a finished distillkit run directory?")
    obj = safe_load(path, ARTIFACT_FORMAT)
    try:
        spec = ImageSpec(int(obj["channels"]), int(obj["height"]), int(obj["width"]), int(obj["num_classes"]),
                         tuple(obj["mean"]), tuple(obj["std"]))
        images, labels = obj["images"], obj["labels"]
        if images.ndim != 4 or images.shape[0] != labels.shape[0] or tuple(images.shape[1:]) != (
                spec.channels, spec.height, spec.width):
            raise ValueError(f"images {tuple(images.shape)} do not match labels {tuple(labels.shape)} and spec")
        meta = {k: v for k, v in obj.items() if k not in ("images", "labels", "stored", "stored_labels")}
        return SyntheticSet(images.float(), labels.long(), obj["stored"].float(), obj["stored_labels"].long(), spec,
                            tuple(obj["class_names"]), meta)
    except (KeyError, ValueError, AttributeError, TypeError) as exc:
        raise UsageError(f"{path} is a damaged {ARTIFACT_FORMAT} file: {exc}") from None
