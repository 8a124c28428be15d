"""PNG pictures of synthetic sets and runs (matplotlib, headless)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Sequence

from torch import Tensor

from distillkit.artifact import atomic_write_bytes


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> None:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=fig.dpi, bbox_inches="tight")
    _pyplot().close(fig)
    atomic_write_bytes(Path(path), buffer.getvalue())


def image_grid(images01: Tensor, labels: Tensor, class_names: Sequence[str], path: Path, max_per_class: int = 20) -> None:
    """One row per class (labelled with its name), up to ``max_per_class`` images each."""
    plt = _pyplot()
    images01 = images01.detach().cpu().clamp(0, 1)
    classes = sorted(set(labels.tolist()))
    rows = [images01[labels == c][:max_per_class] for c in classes]
    cols = max(len(r) for r in rows)
    fig, axes = plt.subplots(len(rows), cols, figsize=(cols * 0.8 + 1.2, len(rows) * 0.8), squeeze=False, dpi=100)
    for r, (c, row) in enumerate(zip(classes, rows)):
        for k in range(cols):
            ax = axes[r][k]
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            if k < len(row):
                img = row[k]
                ax.imshow(img[0] if img.shape[0] == 1 else img.permute(1, 2, 0), cmap="gray" if img.shape[0] == 1 else None,
                          vmin=0, vmax=1)
        axes[r][0].set_ylabel(class_names[c], rotation=0, ha="right", va="center", fontsize=8)
    fig.subplots_adjust(wspace=0.05, hspace=0.05)
    save_figure(fig, path)


