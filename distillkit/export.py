"""Export a run's synthetic set for use outside distillkit.

Every format holds the *decoded* training images at full size, denormalised to
[0, 1] (clamped), with their labels and class names:

``png-folder``
    ``PATH/<label>-<class name>/<index>.png`` (uint8, grayscale or RGB), loadable with
    ``torchvision.datasets.ImageFolder``. The zero-padded label prefix makes ImageFolder's
    sorted class order equal to the label order; class names are made safe as folder
    names. ``PATH/distillkit-export.json`` keeps the original names.
``npz``
    ``images`` ``(N, H, W, C)`` uint8, ``labels`` ``(N,)`` int64, ``class_names`` (str array),
    ``mean``/``std`` of the dataset; ``numpy.load`` needs no pickle.
``pt``
    ``{"images": (N, C, H, W) float32 in [0, 1], "labels": int64, "class_names": [str],
    "mean", "std"}``, loadable with ``torch.load(path, weights_only=True)``.

Outputs are written next to their destination and renamed into place, so a failed
export leaves nothing half-written; an existing non-empty output is replaced only
when asked.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from distillkit.artifact import SyntheticSet, atomic_write_bytes
from distillkit.rundir import RunDir, load_run_synthetic
from distillkit.errors import UsageError

FORMATS = ("png-folder", "npz", "pt")
PNG_MARKER = "distillkit-export.json"
PNG_FORMAT = "distillkit.png-folder"

# characters that are path separators or invalid in file names on common file systems
_UNSAFE = re.compile(r'[\x00-\x1f\x7f/\\:*?"<>|]')


def to_uint8(images01: Tensor) -> Tensor:
    """[0, 1] floats -> uint8 (clamped, rounded to nearest)."""
    return images01.clamp(0, 1).mul(255).round().to(torch.uint8)


def class_folder_names(class_names: Sequence[str]) -> list[str]:
    """Folder name per label: ``<zero-padded label>-<safe name>``, so sorting them keeps the label order."""
    width = len(str(len(class_names) - 1))
    return [f"{label:0{width}d}-{_UNSAFE.sub('_', name).strip(' .') or 'class'}"
            for label, name in enumerate(class_names)]


def export_run(run_dir: Path, fmt: str, output: Path, *, overwrite: bool = False) -> SyntheticSet:
    """Write the decoded synthetic set of ``run_dir`` to ``output`` in ``fmt``; returns the loaded set."""
    if fmt not in FORMATS:
        raise UsageError(f"unknown export format {fmt!r}; choose one of: {', '.join(FORMATS)}")
    synthetic = load_run_synthetic(run_dir)
    output = Path(output)
    _check_output(Path(run_dir), output, fmt, overwrite)
    images01 = synthetic.spec.denormalize(synthetic.images).clamp(0, 1)
    if fmt == "png-folder":
        _write_png_folder(synthetic, images01, output, Path(run_dir))
        return synthetic
    buffer = io.BytesIO()
    if fmt == "npz":
        np.savez_compressed(buffer, images=to_uint8(images01).permute(0, 2, 3, 1).numpy(),
                            labels=synthetic.labels.numpy().astype(np.int64),
                            class_names=np.array(synthetic.class_names, dtype=str),
                            mean=np.array(synthetic.spec.mean, dtype=np.float32),
                            std=np.array(synthetic.spec.std, dtype=np.float32))
    else:
        torch.save({"images": images01.float().contiguous(), "labels": synthetic.labels.long(),
                    "class_names": list(synthetic.class_names),
                    "mean": torch.tensor(synthetic.spec.mean), "std": torch.tensor(synthetic.spec.std)}, buffer)
    atomic_write_bytes(output, buffer.getvalue())
    return synthetic


def _check_output(run_dir: Path, output: Path, fmt: str, overwrite: bool) -> None:
    if RunDir(run_dir).holds_record(output):
        raise UsageError(f"-o {output} would replace the run's own {output.name}; choose another path")
    if not output.exists():
        return
    if fmt == "png-folder":
        if not output.is_dir():
            raise UsageError(f"-o {output} is a file; png-folder writes a directory: choose another path")
        if not any(output.iterdir()):
            return
        if not overwrite:
            raise UsageError(f"-o {output} exists and is not empty; pass --overwrite to replace it")
        if not (output / PNG_MARKER).is_file():
            # never delete a folder distillkit did not write
            raise UsageError(f"--overwrite refused: {output} is not a distillkit png-folder export (no {PNG_MARKER})")
        return
    if output.is_dir():
        raise UsageError(f"-o {output} is a directory; {fmt} writes one file: give a file path")
    if output.stat().st_size and not overwrite:
        raise UsageError(f"-o {output} exists; pass --overwrite to replace it")


def _write_png_folder(synthetic: SyntheticSet, images01: Tensor, output: Path, run_dir: Path) -> None:
    from PIL import Image

    channels = synthetic.spec.channels
    if channels not in (1, 3):
        raise UsageError(f"png-folder holds 1- or 3-channel images; this set has {channels}: use --format npz or pt")
    pixels = to_uint8(images01).permute(0, 2, 3, 1).numpy()
    if channels == 1:
        pixels = pixels[..., 0]
    labels = synthetic.labels.tolist()
    folders = class_folder_names(synthetic.class_names)
    counts = np.bincount(labels, minlength=len(folders))
    width = len(str(max(int(counts.max()) - 1, 0)))

    output.parent.mkdir(parents=True, exist_ok=True)
    staging = output.with_name(f".{output.name}.{uuid.uuid4().hex[:8]}.tmp")
    staging.mkdir()  # (not mkdtemp: its 0700 mode would end up on the export)
    try:
        for folder in folders:
            (staging / folder).mkdir()
        seen = [0] * len(folders)
        for image, label in zip(pixels, labels):
            save_png(Image.fromarray(image), staging / folders[label] / f"{seen[label]:0{width}d}.png")
            seen[label] += 1
        marker = {"format": PNG_FORMAT, "format_version": 1, "source": str(run_dir),
                  "method": synthetic.meta.get("method"), "dataset": synthetic.meta.get("dataset"),
                  "ipc": synthetic.ipc, "images": len(labels), "class_names": list(synthetic.class_names),
                  "folders": folders}
        (staging / PNG_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        _replace_dir(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def save_png(image, path: Path) -> None:
    """One PNG file (a function of its own so tests can make an export fail half-way)."""
    image.save(path, format="PNG")


def _replace_dir(staging: Path, output: Path) -> None:
    """Move ``staging`` to ``output``; an existing ``output`` (empty, or an old export) is set aside first."""
    if not output.exists():
        os.replace(staging, output)
        return
    old = output.with_name(f".{output.name}.old-{uuid.uuid4().hex[:8]}")
    os.replace(output, old)
    try:
        os.replace(staging, output)
    except BaseException:
        os.replace(old, output)  # put the previous export back
        raise
    shutil.rmtree(old)
