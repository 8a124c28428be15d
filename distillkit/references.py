"""What is trained on the full real training split, once, and kept in the user cache: a soft-label protocol's
**teacher** (:func:`teacher`), the **full-data reference** accuracy (:func:`full_data_accuracy`) that
scores (:mod:`distillkit.scores`) measure a synthetic set against, and a dataset's ZCA transform
(:func:`fitted_whitening`).

Both are the same for every synthetic set of a dataset and cost far more than evaluating one, so each is
trained on first use and then read back: from ``$DISTILLKIT_REFERENCE_CACHE``, else
``$XDG_CACHE_HOME/distillkit/references`` (``~/.cache/distillkit/references``). An entry is keyed by
everything that changes it: the dataset, its options, the training split's size and labels digest, the
architecture, the seed and the training recipe's settings (:func:`cache_key`); the key is stored in the entry
and compared on reading. Writes are atomic (a teacher is a ``weights_only`` tensor file, a reference a JSON
file), so concurrent evaluations at worst train the same thing twice and no reader sees half a file. Every
result says where it came from: ``"cache": "hit"`` (read back) or ``"trained"`` (trained by this call).
"""

from __future__ import annotations

import json
import os
import time
from hashlib import sha256
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import nn

from distillkit.artifact import atomic_save, atomic_write_json, content_digest, safe_load, versions
from distillkit.interfaces import DataContext, Evaluation, EvalProtocol, ImageSpec, ModelBuilder, TrainingSet
from distillkit.seeding import seeded
from distillkit.whitening import ZCAWhitening

if TYPE_CHECKING:
    from distillkit.engine import TrainingProtocol

TEACHER_FORMAT = "distillkit-teacher"
WHITENING_FORMAT = "distillkit-zca"


def _now() -> str:
    """When an entry was written (UTC), as the entries record it."""
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())


def cache_dir() -> Path:
    """``$DISTILLKIT_REFERENCE_CACHE``, else ``$XDG_CACHE_HOME/distillkit/references`` (``~/.cache/...``)."""
    if os.environ.get("DISTILLKIT_REFERENCE_CACHE"):
        return Path(os.environ["DISTILLKIT_REFERENCE_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "distillkit" / "references"


def full_training_set(data: DataContext) -> TrainingSet:
    """The whole training split of ``data``, normalised, on its device (one tensor: CIFAR-10 is 0.6 GB in float32;
    an ImageNet subset's memory-mapped split would not fit, and teachers for those are not supported yet)."""
    train = data.train()
    return TrainingSet(train.gather(torch.arange(len(train.labels))), train.labels.to(data.device))


def recipe_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """A protocol's settings less its name: what decides how a network trains (``soft-label``'s teacher recipe
    is ``dc-classic``'s)."""
    return {k: v for k, v in settings.items() if k != "name"}


def cache_key(kind: str, data: DataContext, model: str, seed: int, settings: dict[str, Any], **extra: Any
              ) -> tuple[str, str]:
    """``(canonical JSON key, file stem)`` of a cache entry: what was trained, on which data, how."""
    labels = data.train().labels
    key = {"kind": kind, "dataset": data.dataset.name, "dataset_options": data.options,
           "train_images": len(labels), "labels_digest": content_digest({"labels": labels.cpu()}),
           "model": model, "seed": seed, "settings": recipe_settings(settings), **extra}
    text = json.dumps(key, sort_keys=True, default=str)
    return text, f"{kind}-{data.dataset.name}-{model}-{sha256(text.encode()).hexdigest()[:16]}"


def teacher(recipe: "TrainingProtocol", model: ModelBuilder, data: DataContext, test: TrainingSet, seed: int
            ) -> tuple[nn.Module, dict[str, Any]]:
    """The teacher ``model`` trained under ``recipe`` on the full training split as run 0 of ``seed``, in eval mode
    on ``data.device``, and what to record about it (its test accuracy, its cache entry, hit or trained)."""
    key, stem = cache_key("teacher", data, model.name, seed, recipe.settings())
    path = cache_dir() / f"{stem}.pt"
    info = {"model": model.name, "epochs": recipe.epochs, "seed": seed, "path": str(path)}
    if path.is_file():
        stored = safe_load(path, TEACHER_FORMAT)
        if stored["key"] == key:
            with seeded(seed, "teacher-load", model.name):  # the init is overwritten; keep the global stream
                net = model()
            net.load_state_dict(stored["weights"])
            return net.to(data.device).eval(), {**info, "test_accuracy": stored["test_accuracy"], "cache": "hit"}
    with seeded(seed, "eval-init", model.name, 0):  # run 0's network: the teacher is that run of the recipe
        net = model().to(data.device)
    recipe.train_network(net, full_training_set(data), seed, model.name, run=0)
    net.eval()
    accuracy = recipe.test_network(net, test)
    atomic_save({"format": TEACHER_FORMAT, "format_version": 1, "key": key, "test_accuracy": accuracy,
                 "weights": {k: v.detach().cpu() for k, v in net.state_dict().items()},
                 "created": _now(), "device": str(data.device),
                 "versions": versions()}, path)
    return net, {**info, "test_accuracy": accuracy, "cache": "trained"}


def full_data_accuracy(protocol: EvalProtocol, model: ModelBuilder, data: DataContext, test: TrainingSet,
                       spec: ImageSpec, runs: int, seed: int) -> dict[str, Any]:
    """Test accuracy of ``runs`` fresh ``model`` networks trained on the full training split under ``protocol``
    (the evaluation runs' own streams), as ``{accuracies, mean, std, epochs, runs, cache, ...}``."""
    settings = protocol.settings()
    key, stem = cache_key("full-data", data, model.name, seed, settings, runs=runs)
    path = cache_dir() / f"{stem}.json"
    if path.is_file():
        try:
            stored = json.loads(path.read_text())
        except (OSError, ValueError):
            stored = {}  # unreadable: train it again and replace the file
        if stored.get("key") == key:
            return {**stored["result"], "cache": "hit"}
    got = protocol.evaluate(model, full_training_set(data), test, spec, list(range(runs)), seed, data.device,
                            data=data)
    accuracies = [float(a) for a in (got.accuracies if isinstance(got, Evaluation) else got)]
    values = torch.tensor(accuracies, dtype=torch.float64)
    result = {"accuracies": accuracies, "mean": float(values.mean()), "std": float(values.std(unbiased=False)),
              "runs": runs, "epochs": settings.get("epochs"), "protocol": protocol.name, "path": str(path)}
    atomic_write_json({"key": key, "result": result, "versions": versions(),
                       "created": _now()}, path)
    return {**result, "cache": "trained"}


def fitted_whitening(dataset: str, pixels: torch.Tensor, normalize: Callable[[torch.Tensor], torch.Tensor],
                     eps: float) -> ZCAWhitening:
    """The ZCA transform of the uint8 training ``pixels`` (normalised by ``normalize`` first), fitted on first use
    and read back after: the fit's float reductions depend on the thread count, so without the cache a resumed
    run, or another command on another machine, could whiten with other last bits. Keyed by the pixels' digest,
    ``eps`` and the normalisation of a constant image. (Torchrun ranks that find no entry fit it each: run one
    single-process command first for a sharded job.)"""
    h = sha256(repr((dataset, float(eps))).encode())
    h.update(pixels.contiguous().numpy().tobytes())
    h.update(normalize(torch.ones(1, *pixels.shape[1:])).numpy().tobytes())
    key = h.hexdigest()
    path = cache_dir() / f"zca-{dataset}-{key[:16]}.pt"
    if path.is_file():
        stored = safe_load(path, WHITENING_FORMAT)
        if stored["key"] == key:
            return ZCAWhitening.from_dict(stored["whitening"])
    fitted = ZCAWhitening.fit(normalize(pixels.float().div_(255)), eps)
    atomic_save({"format": WHITENING_FORMAT, "format_version": 1, "key": key, "whitening": fitted.as_dict(),
                 "created": _now(), "versions": versions()}, path)
    return fitted
