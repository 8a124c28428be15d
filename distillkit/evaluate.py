"""Evaluation: train fresh evaluator networks on a synthetic set, test them on real data.

:class:`TrainingProtocol` is the built-in protocol engine (``dc-classic``,
``idc`` and ``smoke`` are instances of it). The ``runs`` networks of one
architecture train *stacked*: their parameters are stacked with
``torch.func.stack_module_state`` and one ``vmap``-ed ``functional_call``
trains them together with one optimizer step (SGD is elementwise, so this is
exactly ``runs`` independent trainings). Each run draws its own init, shuffling,
augmentation and CutMix from ``(seed, model, run, epoch, batch)`` streams, so the
stacked path and the run-by-run path see the same numbers. Models whose
forward mutates buffers in training (BatchNorm's running statistics) cannot
be vmapped and train run by run.

Nothing in the training loop reads a value back to the host: accuracy counts
accumulate on the device and are read once at the end.
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, stack_module_state

from distillkit.augment import Augment, AugmentParams
from distillkit.errors import UsageError
from distillkit.interfaces import ImageSpec, TrainingSet
from distillkit.seeding import derive_seed, generator, seeded
from distillkit.zoo import check_model, create_model


class _Ensemble:
    """``runs`` networks of one architecture behind one forward ``(R, B, ...) -> (R, B, classes)``."""

    def __init__(self, models: list[nn.Module], stacked: bool) -> None:
        self.stacked = stacked
        if stacked:
            params, buffers = stack_module_state(models)
            self.params = {k: v.detach().requires_grad_(True) for k, v in params.items()}
            self.buffers = buffers
            self.base = copy.deepcopy(models[0]).to("meta")

            def one(p: dict, b: dict, x: Tensor) -> Tensor:
                return functional_call(self.base, (p, b), (x,))

            self._train_fn = torch.vmap(one)
            self._test_fn = torch.vmap(one, in_dims=(0, 0, None))
        else:
            self.models = models

    def parameters(self) -> list[Tensor]:
        return list(self.params.values()) if self.stacked else [p for m in self.models for p in m.parameters()]

    def train(self, mode: bool) -> None:
        for m in [self.base] if self.stacked else self.models:
            m.train(mode)

    def forward(self, xs: Tensor) -> Tensor:
        if self.stacked:
            return self._train_fn(self.params, self.buffers, xs)
        return torch.stack([m(x) for m, x in zip(self.models, xs)])

    def forward_shared(self, x: Tensor) -> Tensor:
        """The same input through every run: ``(B, ...) -> (R, B, classes)``."""
        if self.stacked:
            return self._test_fn(self.params, self.buffers, x)
        return torch.stack([m(x) for m in self.models])


def stackable(model: nn.Module) -> bool:
    """vmap cannot train modules that update buffers in place (BatchNorm running stats)."""
    return not any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats for m in model.modules())


@dataclass(frozen=True)
class TrainingProtocol:
    """Train ``runs`` fresh networks with SGD on the synthetic set; report final test accuracy.

    ``milestones`` are fractions of ``epochs`` at which the lr is multiplied by
    ``gamma``; with ``restart_optimizer`` the optimizer is re-created there (the
    DM reference does this, dropping the momentum buffer).
    """

    name: str
    epochs: int = 1000
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 256
    milestones: tuple[float, ...] = (0.5,)
    gamma: float = 0.1
    restart_optimizer: bool = True
    augment: str = "dsa"
    augment_strategy: str = "color_crop_cutout_flip_scale_rotate"
    cutmix_prob: float = 0.0
    cutmix_beta: float = 1.0
    test_limit: int | None = None
    test_batch: int = 1000
    stacked: bool = True
    description: str = field(default="", compare=False)

    def settings(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("description")
        out["milestones"] = list(self.milestones)
        return out

    def with_overrides(self, **overrides: Any) -> "TrainingProtocol":
        given = {k: v for k, v in overrides.items() if v is not None}
        unknown = sorted(set(given) - set(self.settings()))
        if unknown:
            raise UsageError(f"protocol {self.name!r} has no setting {unknown[0]!r}; settings: "
                             f"{', '.join(self.settings())}")
        if given.get("epochs", self.epochs) < 1:
            raise UsageError(f"--epochs must be positive, got {given['epochs']}")
        return replace(self, **given)

    # -- the engine ------------------------------------------------------
    def evaluate(self, model: str, train: TrainingSet, test: TrainingSet, spec: ImageSpec, runs: int, seed: int,
                 device: torch.device | str) -> list[float]:
        if runs < 1:
            raise UsageError(f"--runs must be positive, got {runs}")
        device = torch.device(device)
        models = []
        for r in range(runs):
            with seeded(seed, "eval-init", model, r):
                models.append(create_model(model, spec).to(device))
        if self.stacked and stackable(models[0]):
            return self._train_and_test(_Ensemble(models, True), list(range(runs)), train, test, seed, model)
        return [acc for r, m in enumerate(models)
                for acc in self._train_and_test(_Ensemble([m], False), [r], train, test, seed, model)]

    def _train_and_test(self, ens: _Ensemble, run_ids: list[int], train: TrainingSet, test: TrainingSet,
                        seed: int, model: str) -> list[float]:
        aug = Augment(self.augment, self.augment_strategy)
        n = train.images.shape[0]
        h, w = train.images.shape[-2:]
        milestones = sorted({int(round(m * self.epochs)) for m in self.milestones})
        make_opt = lambda lr: torch.optim.SGD(ens.parameters(), lr=lr, momentum=self.momentum,  # noqa: E731
                                              weight_decay=self.weight_decay)
        lr = self.lr
        optimizer = make_opt(lr)
        ens.train(True)
        for epoch in range(self.epochs):
            if epoch in milestones:
                lr *= self.gamma
                if self.restart_optimizer:
                    optimizer = make_opt(lr)
                else:
                    for group in optimizer.param_groups:
                        group["lr"] = lr
            perms = torch.stack([torch.randperm(n, generator=generator(seed, "eval-shuffle", model, r, epoch))
                                 for r in run_ids]).to(train.images.device)
            for b, idx in enumerate(perms.split(self.batch_size, dim=1)):
                xs, ys = train.images[idx], train.labels[idx]  # (R, B, ...)
                keys = [(seed, "eval-augment", model, r, epoch, b) for r in run_ids]
                xs = self._augment(aug, xs, keys, h, w)
                xs, ys_other, lam = self._cutmix(xs, ys, keys)
                logits = ens.forward(xs).flatten(0, 1)
                ce = lambda t: F.cross_entropy(logits, t.flatten(), reduction="none").view(t.shape)  # noqa: E731
                # sum over runs of each run's mean loss, so each run's gradient is its own
                loss = (lam * ce(ys) + (1 - lam) * ce(ys_other)).mean(1).sum() if lam is not None \
                    else ce(ys).mean(1).sum()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
        return self._test(ens, test)

    def _augment(self, aug: Augment, xs: Tensor, keys: list[tuple], h: int, w: int) -> Tensor:
        r, b = xs.shape[:2]
        if aug.mode == "none":
            return xs
        drawn = [aug.draw(b, generator(*k), h, w) for k in keys]
        params = AugmentParams(**{f: torch.cat([getattr(p, f) for p in drawn]) for f in drawn[0].__dict__})
        return aug.apply(xs.flatten(0, 1), params, torch.arange(r * b)).view_as(xs)

    def _cutmix(self, xs: Tensor, ys: Tensor, keys: list[tuple]) -> tuple[Tensor, Tensor, Tensor | None]:
        """Per run, with probability ``cutmix_prob``, paste a box of a shuffled batch; label weight = kept area."""
        if self.cutmix_prob <= 0:
            return xs, ys, None
        r, b, _, h, w = xs.shape
        rngs = [np.random.default_rng(derive_seed(*k, "cutmix")) for k in keys]
        apply = torch.tensor([g.random() < self.cutmix_prob for g in rngs])
        lam = torch.tensor([g.beta(self.cutmix_beta, self.cutmix_beta) for g in rngs], dtype=torch.float32)
        perm = torch.stack([torch.from_numpy(g.permutation(b)) for g in rngs]).to(xs.device)
        centre = torch.tensor([[g.integers(h), g.integers(w)] for g in rngs])
        cut = (1 - lam).sqrt()
        half_h, half_w = (cut * h).long() // 2, (cut * w).long() // 2
        y0, y1 = (centre[:, 0] - half_h).clamp(0, h), (centre[:, 0] + half_h).clamp(0, h)
        x0, x1 = (centre[:, 1] - half_w).clamp(0, w), (centre[:, 1] + half_w).clamp(0, w)
        kept = torch.where(apply, 1 - ((y1 - y0) * (x1 - x0)).float() / (h * w), torch.ones(r))
        rows, cols = torch.arange(h).view(1, h, 1), torch.arange(w).view(1, 1, w)
        box = ((rows >= y0.view(r, 1, 1)) & (rows < y1.view(r, 1, 1)) & (cols >= x0.view(r, 1, 1))
               & (cols < x1.view(r, 1, 1)) & apply.view(r, 1, 1)).to(xs.device)
        shuffled = torch.gather(xs, 1, perm.view(r, b, 1, 1, 1).expand_as(xs))
        mixed = torch.where(box.view(r, 1, 1, h, w), shuffled, xs)
        return mixed, torch.gather(ys, 1, perm), kept.to(xs.device).view(r, 1)

    @torch.no_grad()
    def _test(self, ens: _Ensemble, test: TrainingSet) -> list[float]:
        ens.train(False)
        images, labels = test.images, test.labels
        if self.test_limit is not None:
            images, labels = images[: self.test_limit], labels[: self.test_limit]
        correct = None
        for x, y in zip(images.split(self.test_batch), labels.split(self.test_batch)):
            hits = (ens.forward_shared(x).argmax(-1) == y).sum(1)
            correct = hits if correct is None else correct + hits
        assert correct is not None
        return (correct.double() * 100.0 / len(labels)).tolist()


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


def check_protocol(obj: Any, name: str) -> Any:
    for attr in ("name", "settings", "evaluate"):
        if not hasattr(obj, attr):
            raise UsageError(f"protocol {name!r} does not implement {attr!r}")
    return obj



def resolve_protocol(name: str, **overrides: Any) -> Any:
    from distillkit import registry

    protocol = check_protocol(registry.create("protocols", name), name)
    given = {k: v for k, v in overrides.items() if v is not None}
    if given:
        if not hasattr(protocol, "with_overrides"):
            raise UsageError(f"protocol {name!r} takes no overrides (given {sorted(given)})")
        protocol = protocol.with_overrides(**given)
    return protocol


def evaluate_run(run_dir: Path, *, protocol: Any, models: Sequence[str], runs: int, seed: int | None,
                 baseline: bool, device: torch.device, data_root: Path,
                 on_job: Callable[[str, str], None] = lambda model, kind: None) -> dict[str, Any]:
    """Evaluate a run directory's synthetic set (and the random baseline) on ``models``; update eval.json/csv."""
    from distillkit import registry
    from distillkit.artifact import atomic_write_bytes, atomic_write_json, load_synthetic, versions
    from distillkit.data import load_split

    synthetic = load_synthetic(run_dir)
    seed = synthetic.seed if seed is None else seed
    config = synthetic.config
    dataset = registry.create("datasets", config["dataset"], **config.get("dataset_options", {}))
    if dataset.image_spec != synthetic.spec:
        raise UsageError(f"{run_dir}: the artifact's image spec {synthetic.spec} does not match dataset "
                         f"{config['dataset']!r} ({dataset.image_spec})")
    for model in models:  # fail on a bad name or an input the model cannot take before hours of training
        check_model(model, synthetic.spec)
    test = load_split(dataset, data_root, train=False, device=device).as_training_set()
    jobs = [("synthetic", synthetic.training_set(device))]
    if baseline:
        real = load_split(dataset, data_root, train=True, device=device)
        jobs.append(("random-baseline", random_subset(real, synthetic.ipc, seed)))
    rows = []
    for model in models:
        for kind, train in jobs:
            on_job(model, kind)
            accuracies = protocol.evaluate(model, train, test, synthetic.spec, runs, seed, device)
            mean, std = summarize(accuracies)
            rows.append({"model": model, "kind": kind, "protocol": protocol.name, "accuracies": accuracies,
                         "mean": mean, "std": std, "runs": runs, "seed": seed, "train_images": len(train.labels)})
    settings = protocol.settings()
    for row in rows:
        row["protocol_settings"] = settings

    path = Path(run_dir) / "eval.json"
    previous = json.loads(path.read_text()) if path.exists() else {"results": []}
    fresh = {(r["model"], r["kind"], r["protocol"], json.dumps(r["protocol_settings"], sort_keys=True)) for r in rows}
    kept = [r for r in previous.get("results", [])
            if (r["model"], r["kind"], r["protocol"], json.dumps(r["protocol_settings"], sort_keys=True)) not in fresh]
    report = {"run": str(run_dir), "dataset": config["dataset"], "method": config["method"], "ipc": synthetic.ipc,
              "distill_seed": synthetic.seed, "device": str(device), "versions": versions(),
              "results": kept + rows}
    atomic_write_json(report, path)
    header = "model,kind,protocol,runs,seed,mean,std,accuracies\n"
    lines = [f"{r['model']},{r['kind']},{r['protocol']},{r['runs']},{r['seed']},{r['mean']:.4f},{r['std']:.4f},"
             f"{' '.join(f'{a:.2f}' for a in r['accuracies'])}\n" for r in report["results"]]
    atomic_write_bytes(Path(run_dir) / "eval.csv", (header + "".join(lines)).encode())
    return {**report, "new": rows}
