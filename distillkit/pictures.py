"""PNG pictures of synthetic sets and runs (matplotlib, headless)."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Sequence

import numpy as np
from torch import Tensor

from distillkit.artifact import atomic_write_bytes
from distillkit.rundir import LOSSES, RunDir
from distillkit.errors import UsageError


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


def image_grid(images01: Tensor, labels: Tensor, class_names: Sequence[str], path: Path,
               max_per_class: int = 20) -> None:
    """One row per class (labelled with its name), up to ``max_per_class`` images each."""
    plt = _pyplot()
    images01, labels = images01.detach().cpu().clamp(0, 1), labels.cpu()
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
                img = row[k].permute(1, 2, 0).numpy()  # numpy: matplotlib's array protocol, without warnings
                ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray" if img.shape[-1] == 1 else None,
                          vmin=0, vmax=1)
        axes[r][0].set_ylabel(class_names[c], rotation=0, ha="right", va="center", fontsize=8)
    fig.subplots_adjust(wspace=0.05, hspace=0.05)
    save_figure(fig, path)


def read_losses(path: Path) -> tuple[list[int], list[float]]:
    """``(iterations, losses)`` from a ``losses.jsonl``; a last line still being written is skipped."""
    path = Path(path)
    if not path.exists():
        return [], []
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    if not text.endswith("\n"):
        lines = lines[:-1]  # a live run may be mid-write: its incomplete last line is not data yet
    iterations, losses = [], []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if "lost_before_iteration" in row:  # the log was lost and restarted on resume: a gap, not data
                continue
            iterations.append(int(row["iteration"]))
            losses.append(float(row["loss"]))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise UsageError(f"{path}:{number} is not a loss record ({type(exc).__name__}: {exc}); "
                             f'expected {{"iteration": int, "loss": float}}') from None
    return iterations, losses


def read_eval(path: Path) -> list[dict]:
    """The result rows of an ``eval.json`` (empty when there is none), the latest per (model, protocol, kind)."""
    path = Path(path)
    if not path.exists():
        return []
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))["results"]
        latest = {(r["model"], r["protocol"], r["kind"]): r for r in rows if {"mean", "std"} <= r.keys()}
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise UsageError(f"{path} is not a distillkit eval.json ({type(exc).__name__}: {exc})") from None
    return list(latest.values())


def plot_run(run_dir: Path, path: Path) -> list[str]:
    """The loss curve of ``run_dir`` and, where it was evaluated, accuracy per model beside the random
    baseline; returns the panels drawn (``"loss"``, ``"accuracy"``)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UsageError(f"{run_dir} is not a directory; give a distillkit run directory")
    run = RunDir(run_dir)
    iterations, losses = read_losses(run.losses)
    results = read_eval(run.eval_json)
    panels = (["loss"] if losses else []) + (["accuracy"] if results else [])
    if not panels:
        raise UsageError(f"nothing to plot in {run_dir}: no lines in {LOSSES} and no {run.eval_json.name}")
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False, dpi=100)
    for ax, panel in zip(axes[0], panels):
        if panel == "loss":
            _loss_panel(ax, iterations, losses)
        else:
            _accuracy_panel(ax, results)
    fig.suptitle(_run_title(run_dir))
    fig.tight_layout()
    save_figure(fig, path)
    return panels


def _run_title(run_dir: Path) -> str:
    try:
        cfg = json.loads(RunDir(run_dir).config.read_text(encoding="utf-8"))
        return f"{cfg['method']} on {cfg['dataset']}, IPC {cfg['ipc']}"
    except (OSError, json.JSONDecodeError, KeyError, TypeError):
        return run_dir.name


def _loss_panel(ax, iterations: list[int], losses: list[float]) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.plot(iterations, losses, lw=0.8, alpha=0.5 if len(losses) > 100 else 1.0, label="loss")
    if len(losses) > 100:  # long runs are noisy: show the trend on top
        window = len(losses) // 50
        kernel = np.ones(window) / window
        ax.plot(iterations[window - 1:], np.convolve(losses, kernel, mode="valid"), lw=1.5,
                label=f"mean of {window}")
        ax.legend()
    if min(losses) > 0 and max(losses) / min(losses) > 20:
        ax.set_yscale("log")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss per class")
    ax.set_title("condense loss")
    ax.grid(alpha=0.3)


def _accuracy_panel(ax, results: list[dict]) -> None:
    protocols = {r["protocol"] for r in results}
    groups: dict[tuple[str, str], dict[str, dict]] = {}
    for r in results:
        groups.setdefault((r["model"], r["protocol"]), {})[r["kind"]] = r
    x = np.arange(len(groups))
    width = 0.38
    for offset, kind, label in ((-width / 2, "synthetic", "synthetic set"),
                                (width / 2, "random-baseline", "random real subset")):
        rows = [kinds.get(kind) for kinds in groups.values()]
        if not any(rows):
            continue
        means = [r["mean"] if r else np.nan for r in rows]
        bars = ax.bar(x + offset, means, width, yerr=[r["std"] if r else 0 for r in rows], capsize=3, label=label)
        ax.bar_label(bars, labels=[f"{m:.1f}" if r else "" for m, r in zip(means, rows)], fontsize=7, padding=2)
    names = [model if len(protocols) == 1 else f"{model}\n{protocol}" for model, protocol in groups]
    ax.set_xticks(x, names, fontsize=8, rotation=30 if len(groups) > 6 else 0)
    ax.set_ylim(0, 105)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"accuracy per model ({', '.join(sorted(protocols))})")
    ax.legend(loc="best", fontsize=8)
    ax.grid(axis="y", alpha=0.3)
