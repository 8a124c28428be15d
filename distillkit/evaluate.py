"""Evaluating a run: resolve the protocol and models, add the random baseline, summarise, report.

The training itself is the engine's (:mod:`distillkit.engine`); this module decides *what* is
trained (the run's synthetic set and a random real subset of the same size, on each model), deals
the (model, set, run) jobs over torchrun ranks, and writes ``eval.json`` and ``eval.csv`` into the
run directory. Under torchrun rank 0 gathers the accuracies and writes one ``eval.json``, equal to a
single process's.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from distillkit import registry
from distillkit.artifact import atomic_write_bytes, atomic_write_json, content_digest, versions
from distillkit.checks import blame, label
from distillkit.data import data_context, load_split
from distillkit.devices import device_for_rank
from distillkit.distributed import World, merge_dicts, world as join_world
from distillkit.errors import UsageError
from distillkit.interfaces import Evaluation, EvalProtocol, TrainingSet
from distillkit.references import full_data_accuracy, recipe_settings
from distillkit.scores import SCORES, scores
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
        missing = [m for m in ("name", "settings", "speed_settings", "for_dataset", "with_overrides", "evaluate")
                   if not hasattr(protocol, m)]
        raise UsageError(f"protocol {name!r} does not implement {', '.join(map(repr, missing))} "
                         f"(see distillkit.interfaces.EvalProtocol)")
    given = {k: v for k, v in overrides.items() if v is not None}
    return protocol.with_overrides(**given) if given else protocol


def evaluate_run(run_dir: Path, *, protocol: EvalProtocol, models: Sequence[str], runs: int, seed: int | None,
                 baseline: bool, device: torch.device, data_root: Path, full_data_epochs: int | None = None,
                 on_job: Callable[[int, int, str], None] = lambda done, total, label: None) -> dict[str, Any]:
    """Evaluate a run directory's synthetic set (and the random baseline) on ``models``; update eval.json/csv.

    Nothing is trained before the output is known to be writable and an existing ``eval.json`` to be
    readable. Each finished (model, set) is written at once (atomically), so an interrupted or failed
    evaluation keeps what it computed, and a rerun with the same settings reuses the rows of the same
    training set instead of training them again. A failed write does not lose the numbers: the returned
    report holds every row and ``write_error`` says what went wrong.

    Under torchrun the (model, set, run) jobs are dealt round-robin over the ranks and rank 0 writes
    the merged report once, at the end. ``on_job(done, total, label)`` reports this rank's progress in
    (model, set) calls.

    Each synthetic row gets ``scores`` (:mod:`distillkit.scores`) and the ``references`` they were computed
    from: the random baseline, the hard-label rows, and with ``full_data_epochs`` the full-data reference
    (:func:`~distillkit.references.full_data_accuracy`, that many epochs, cached) under the protocol's
    hard-label counterpart.
    """
    if full_data_epochs is not None and full_data_epochs < 1:
        raise UsageError(f"--full-data-epochs must be positive, got {full_data_epochs}")
    if runs < 1:
        raise UsageError(f"--runs must be positive, got {runs}")
    if not models:
        raise UsageError("--models names no model; give one or more names or globs, e.g. --models convnet3")
    run = RunDir(run_dir)
    run.check_report_target()
    device = device_for_rank(device)
    world = join_world(device)
    with run.writer("evaluate") if world.is_main else contextlib.nullcontext():
        return _evaluate_locked(run, protocol, models, runs, seed, baseline, device, world, data_root,
                                full_data_epochs, on_job)


def _evaluate_locked(run: RunDir, protocol: EvalProtocol, models: Sequence[str], runs: int, seed: int | None,
                     baseline: bool, device: torch.device, world: World, data_root: Path,
                     full_data_epochs: int | None, on_job: Callable[[int, int, str], None]) -> dict[str, Any]:
    synthetic = load_run_synthetic(run.path)
    seed = synthetic.seed if seed is None else seed
    config = synthetic.config
    protocol = protocol.for_dataset(config["dataset"])
    dataset = registry.create("datasets", config["dataset"], **config.get("dataset_options", {}))
    if replace(synthetic.spec, whitening=None) != dataset.image_spec or \
            (synthetic.spec.whitening is None) != (dataset.zca_eps is None):
        raise UsageError(f"{run.path}: the artifact's image spec {synthetic.spec} does not match dataset "
                         f"{config['dataset']!r} ({dataset.image_spec})")
    for model in models:  # fail on a bad name or an input the model cannot take before hours of training
        check_model(model, synthetic.spec)
    # real images are normalised as the set was distilled: with its stored spec (and ZCA transform, if any)
    test = load_split(dataset, data_root, train=False, device=device, image_spec=synthetic.spec).as_training_set()
    data = data_context(dataset, config.get("dataset_options", {}), data_root, device, image_spec=synthetic.spec)
    sets = {"synthetic": synthetic.training_set(device)}
    if baseline:
        sets["random-baseline"] = random_subset(data.train(), synthetic.ipc, seed)  # the protocol's copy too
    settings, speed = protocol.settings(), protocol.speed_settings(device)
    digests = {kind: content_digest({"images": t.images.cpu(), "labels": t.labels.cpu()}) for kind, t in sets.items()}
    report = _Report(run, {"run": str(run.path), "dataset": config["dataset"], "method": config["method"],
                           "ipc": synthetic.ipc, "distill_seed": synthetic.seed, "device": str(device),
                           "ranks": world.size, "deterministic": torch.are_deterministic_algorithms_enabled(),
                           "versions": versions()}, write=world.is_main)

    def row(model: str, kind: str, accuracies: list[float]) -> dict[str, Any]:
        mean, std = summarize(accuracies)
        return {"model": model, "kind": kind, "protocol": protocol.name, "accuracies": accuracies, "mean": mean,
                "std": std, "runs": runs, "seed": seed, "train_images": len(sets[kind].labels),
                "train_digest": digests[kind], "protocol_settings": settings, "speed_settings": speed,
                **({"details": details[model, kind]} if details.get((model, kind)) else {})}

    same = lambda r: (r.get("kind") in sets and r.get("train_digest") == digests[r["kind"]]  # noqa: E731
                      and (r.get("protocol"), _canonical(r.get("protocol_settings")), r.get("runs"), r.get("seed"))
                      == (protocol.name, _canonical(settings), runs, seed))
    finished = {(r["model"], r["kind"]): r for r in report.previous if same(r) and r.get("model") in models}
    jobs = [(model, kind, r) for model in models for kind in sets for r in range(runs)
            if (model, kind) not in finished]
    calls: dict[tuple[str, str], list[int]] = {}  # this rank's runs, one protocol call per (model, set)
    for model, kind, r in world.share(jobs):
        calls.setdefault((model, kind), []).append(r)
    accuracy: dict[tuple[str, str, int], float] = {}
    details: dict[tuple[str, str], dict[str, Any]] = {}
    hard = getattr(protocol, "hard_labels", lambda: protocol)()  # the recipe the hard-label scores use
    for done, ((model, kind), run_ids) in enumerate(calls.items()):
        on_job(done, len(calls), f"{model} / {kind}")
        with blame(label("protocol", protocol.name), "evaluate"):
            got = protocol.evaluate(builder(model, synthetic.spec), sets[kind], test, synthetic.spec, run_ids, seed,
                                    device, data=data)
        if isinstance(got, Evaluation):
            details[model, kind] = got.details
            got = got.accuracies
        got = list(got)
        if len(got) != len(run_ids):
            raise UsageError(f"protocol {protocol.name!r} returned {len(got)} accuracies for {len(run_ids)} runs")
        accuracy.update({(model, kind, r): float(a) for r, a in zip(run_ids, got)})
        if not world.active:  # one process holds every run of this (model, set): keep it now, scored if it can be
            fresh = row(model, kind, [accuracy[model, kind, r] for r in range(runs)])
            mine = fresh if kind == "synthetic" else next(
                (r for r in report.rows[::-1] if r["model"] == model and r["kind"] == "synthetic" and same(r)), None)
            scored = [] if mine is None else [_scored(mine, [*report.rows, fresh], hard.settings(), None)]
            report.add(scored if kind == "synthetic" else [fresh, *scored])  # one write per (model, set)
    on_job(len(calls), len(calls), "")
    if world.active:
        accuracy, details = merge_dicts(accuracy), merge_dicts(details)
    rows = [finished.get((model, kind)) or row(model, kind, [accuracy[model, kind, r] for r in range(runs)])
            for model in models for kind in sets]
    # every rank trains (or reads) the references: the same networks, written atomically to one cache entry,
    # and no rank waits at a collective while another trains for longer than its timeout
    full = {model: full_data_accuracy(hard.with_overrides(epochs=full_data_epochs), builder(model, synthetic.spec),
                                      data, test, synthetic.spec, runs, seed)
            for model in models} if full_data_epochs is not None else {}
    rows = [_scored(r, report.rows + rows, hard.settings(), full.get(r["model"])) for r in rows]
    report.add(rows)
    if world.active:
        torch.distributed.barrier()  # the files exist when any rank returns
    return {**report.header, "results": report.rows, "new": rows, "reused": sorted(finished),
            "write_error": report.error}


def _scored(row: dict[str, Any], rows: list[dict[str, Any]], hard_settings: dict[str, Any],
            full: dict[str, Any] | None) -> dict[str, Any]:
    """A synthetic row with its scores and their inputs (a baseline row, or a row without a random one, as is)."""
    def mean(kind: str, settings: dict[str, Any]) -> float | None:  # the recipe decides, not the protocol's name
        wanted = _canonical(recipe_settings(settings))
        found = [r["mean"] for r in rows if r["model"] == row["model"] and r["kind"] == kind
                 and r["seed"] == row["seed"] and (kind != "synthetic" or r["train_digest"] == row["train_digest"])
                 and _canonical(recipe_settings(r["protocol_settings"])) == wanted]
        return found[-1] if found else None

    random = mean("random-baseline", row["protocol_settings"])
    if row["kind"] != "synthetic" or random is None:
        return row
    full = full or (row.get("references") or {}).get("full_data")  # a reused row keeps the reference it had
    references = {"random": random, "synthetic_hard": mean("synthetic", hard_settings),
                  "random_hard": mean("random-baseline", hard_settings), "full_data": full}
    return {**row, "references": references,
            "scores": scores(row["mean"], random, references["synthetic_hard"], references["random_hard"],
                             full["mean"] if full else None)}


def _canonical(settings: Any) -> str:
    return json.dumps(settings, sort_keys=True)


class _Report:
    """eval.json and eval.csv of one run, rewritten (atomically) whenever rows are added.

    A row replaces an earlier one of the same model, set, protocol and settings. A failed write is
    remembered, not raised, so the caller still gets every number it computed; a later write that
    succeeds forgets it.
    """

    def __init__(self, run: RunDir, header: dict[str, Any], write: bool) -> None:
        self.run, self.header, self.write = run, header, write
        # every rank reads it, so all deal out the same unfinished jobs; only rank 0 writes
        self.previous: list[dict[str, Any]] = run.read_report()["results"]
        self.rows = list(self.previous)
        self.error: OSError | None = None

    def add(self, rows: list[dict[str, Any]]) -> None:
        key = lambda r: (r["model"], r["kind"], r["protocol"], _canonical(r["protocol_settings"]))  # noqa: E731
        fresh = {key(r) for r in rows}
        self.rows = [r for r in self.rows if key(r) not in fresh] + rows
        if not self.write:
            return
        try:
            atomic_write_json({**self.header, "results": self.rows}, self.run.eval_json)
            header = f"model,kind,protocol,runs,seed,mean,std,accuracies,{','.join(SCORES)}\n"
            score = lambda r, k: "" if r.get("scores", {}).get(k) is None else f"{r['scores'][k]:.4f}"  # noqa: E731
            lines = [f"{r['model']},{r['kind']},{r['protocol']},{r['runs']},{r['seed']},{r['mean']:.4f},"
                     f"{r['std']:.4f},{' '.join(f'{a:.2f}' for a in r['accuracies'])},"
                     f"{','.join(score(r, k) for k in SCORES)}\n" for r in self.rows]
            atomic_write_bytes(self.run.eval_csv, (header + "".join(lines)).encode())
        except OSError as exc:
            self.error = exc
        else:
            self.error = None  # the files now hold every row: an earlier failed write lost nothing
