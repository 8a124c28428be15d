"""Evaluating a run: resolve the protocol and models, add the random baseline, summarise, report.

The training itself is the engine's (:mod:`distillkit.engine`); this module decides *what* is
trained (the run's synthetic set and a random real subset of the same size, on each model), deals
the (model, set, run) jobs over torchrun ranks, and writes ``eval.json`` and ``eval.csv`` into the
run directory. Under torchrun rank 0 gathers the accuracies and writes one ``eval.json``, equal to a
single process's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from distillkit import registry
from distillkit.artifact import atomic_write_bytes, atomic_write_json, versions
from distillkit.data import load_split
from distillkit.devices import device_for_rank
from distillkit.distributed import merge_dicts, world as join_world
from distillkit.errors import UsageError
from distillkit.interfaces import EvalProtocol, TrainingSet
from distillkit.models import builder, check_model
from distillkit.rundir import RunDir, load_run_synthetic
from distillkit.seeding import generator


def summarize(accuracies: Sequence[float]) -> tuple[float, float]:
    """Mean and (population) standard deviation, as the reference code reports them."""
    values = np.asarray(accuracies, dtype=float)
    return float(values.mean()), float(values.std())


def random_subset(real, ipc: int, seed: int) -> TrainingSet:
    """The baseline: ``ipc`` random real images per class, drawn from ``(seed, "baseline", class)``."""
    images, labels = [], []
    for c in range(real.spec.num_classes):
        images.append(real.sample(c, ipc, generator(seed, "baseline", c)))
        labels.append(torch.full((ipc,), c, dtype=torch.long, device=real.images.device))
    return TrainingSet(torch.cat(images), torch.cat(labels))


def resolve_protocol(name: str, **overrides: Any) -> EvalProtocol:
    """The protocol ``name`` with ``overrides`` applied (``None`` values are ignored)."""
    protocol = registry.create("protocols", name)
    if not isinstance(protocol, EvalProtocol):
        missing = [m for m in ("name", "settings", "speed_settings", "with_overrides", "evaluate")
                   if not hasattr(protocol, m)]
        raise UsageError(f"protocol {name!r} does not implement {', '.join(map(repr, missing))} "
                         f"(see distillkit.interfaces.EvalProtocol)")
    given = {k: v for k, v in overrides.items() if v is not None}
    return protocol.with_overrides(**given) if given else protocol


def evaluate_run(run_dir: Path, *, protocol: EvalProtocol, models: Sequence[str], runs: int, seed: int | None,
                 baseline: bool, device: torch.device, data_root: Path,
                 on_job: Callable[[int, int, str], None] = lambda done, total, label: None) -> dict[str, Any]:
    """Evaluate a run directory's synthetic set (and the random baseline) on ``models``; update eval.json/csv.

    Under torchrun the (model, set, run) jobs are dealt round-robin over the ranks and rank 0 writes
    the merged report. ``on_job(done, total, label)`` reports this rank's progress in (model, set) calls.
    """
    if runs < 1:
        raise UsageError(f"--runs must be positive, got {runs}")
    synthetic = load_run_synthetic(run_dir)
    seed = synthetic.seed if seed is None else seed
    config = synthetic.config
    dataset = registry.create("datasets", config["dataset"], **config.get("dataset_options", {}))
    if dataset.image_spec != synthetic.spec:
        raise UsageError(f"{run_dir}: the artifact's image spec {synthetic.spec} does not match dataset "
                         f"{config['dataset']!r} ({dataset.image_spec})")
    for model in models:  # fail on a bad name or an input the model cannot take before hours of training
        check_model(model, synthetic.spec)
    device = device_for_rank(device)
    world = join_world(device)
    test = load_split(dataset, data_root, train=False, device=device).as_training_set()
    sets = {"synthetic": synthetic.training_set(device)}
    if baseline:
        real = load_split(dataset, data_root, train=True, device=device)
        sets["random-baseline"] = random_subset(real, synthetic.ipc, seed)
    jobs = [(model, kind, r) for model in models for kind in sets for r in range(runs)]
    calls: dict[tuple[str, str], list[int]] = {}  # this rank's runs, one protocol call per (model, set)
    for model, kind, r in world.share(jobs):
        calls.setdefault((model, kind), []).append(r)
    accuracy: dict[tuple[str, str, int], float] = {}
    for done, ((model, kind), run_ids) in enumerate(calls.items()):
        on_job(done, len(calls), f"{model} / {kind}")
        got = list(protocol.evaluate(builder(model, synthetic.spec), sets[kind], test, synthetic.spec, run_ids, seed,
                                     device))
        if len(got) != len(run_ids):
            raise UsageError(f"protocol {protocol.name!r} returned {len(got)} accuracies for {len(run_ids)} runs")
        accuracy.update({(model, kind, r): float(a) for r, a in zip(run_ids, got)})
    on_job(len(calls), len(calls), "")
    if world.active:
        accuracy = merge_dicts(accuracy)
    rows = []
    for model in models:
        for kind, train in sets.items():
            accuracies = [accuracy[model, kind, r] for r in range(runs)]
            mean, std = summarize(accuracies)
            rows.append({"model": model, "kind": kind, "protocol": protocol.name, "accuracies": accuracies,
                         "mean": mean, "std": std, "runs": runs, "seed": seed, "train_images": len(train.labels)})
    settings, speed = protocol.settings(), protocol.speed_settings(device)
    for row in rows:
        row["protocol_settings"] = settings
        row["speed_settings"] = speed

    report = {"run": str(run_dir), "dataset": config["dataset"], "method": config["method"], "ipc": synthetic.ipc,
              "distill_seed": synthetic.seed, "device": str(device), "ranks": world.size, "versions": versions(),
              "results": rows}
    if world.is_main:
        report["results"] = _write_report(RunDir(run_dir), report)
    if world.active:
        torch.distributed.barrier()  # the files exist when any rank returns
    return {**report, "new": rows}


def _write_report(run: RunDir, report: dict[str, Any]) -> list[dict[str, Any]]:
    """Merge ``report``'s rows into eval.json (replacing rows of the same model, set and settings), rewrite
    eval.csv; returns every row now in eval.json."""
    rows = report["results"]
    path = run.eval_json
    previous = json.loads(path.read_text()) if path.exists() else {"results": []}
    fresh = {(r["model"], r["kind"], r["protocol"], json.dumps(r["protocol_settings"], sort_keys=True)) for r in rows}
    kept = [r for r in previous.get("results", [])
            if (r["model"], r["kind"], r["protocol"], json.dumps(r["protocol_settings"], sort_keys=True)) not in fresh]
    atomic_write_json({**report, "results": kept + rows}, path)
    header = "model,kind,protocol,runs,seed,mean,std,accuracies\n"
    lines = [f"{r['model']},{r['kind']},{r['protocol']},{r['runs']},{r['seed']},{r['mean']:.4f},{r['std']:.4f},"
             f"{' '.join(f'{a:.2f}' for a in r['accuracies'])}\n" for r in kept + rows]
    atomic_write_bytes(run.eval_csv, (header + "".join(lines)).encode())
    return kept + rows
