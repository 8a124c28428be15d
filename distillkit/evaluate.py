"""Evaluation: train fresh evaluator networks on a synthetic set, test them on real data.

:class:`TrainingProtocol` is the built-in protocol engine (``dc-classic``,
``idc`` and ``smoke`` are instances of it; a plugin adds more through
``register_protocols``). A protocol is data: its :meth:`~TrainingProtocol.settings`
(every number that changes the result) are stored with each result, and
results are only compared under equal settings. How the numbers are computed
(stacked or run by run, compiled, test batch size) is the *engine*, recorded
apart, because it changes the speed, not the result.

**Stacked runs.** The ``runs`` networks of one architecture can train
together: their parameters and buffers are stacked with
``torch.func.stack_module_state`` and one ``vmap``-ed ``functional_call``
trains them with one SGD step for all (SGD is elementwise, so this is exactly
``runs`` independent trainings). Each run draws its own init, shuffling,
augmentation and CutMix from ``(seed, kind, model, run, block of epochs)``
streams, so the stacked path and the run-by-run path see the same numbers and
agree to float rounding. Batch norm stacks too: its running statistics are
stacked buffers that each run updates in place under vmap. A model whose
forward vmap cannot run (``.item()`` or data-dependent Python control flow in
``forward``) trains run by run, with a warning naming the reason. So does a
model whose training forward draws random numbers (dropout, stochastic depth):
under vmap every run's masks come from one global stream, so a run's result
would depend on which runs share its stack, and a run must depend only on
``(seed, model, run)`` (that is what lets torchrun ranks share the runs out).

**Under torchrun** ``evaluate`` deals the (model, set, run) jobs round-robin
over the ranks; each rank trains its runs of a model in one call, and rank 0
gathers the accuracies and writes the one eval.json, equal to a single
process's.

**Default: stacked on accelerators, run by run on the CPU.** On a GPU a step
on a small synthetic batch is bound by kernel launches, which stacking divides
by ``runs``. On a CPU the step is bound by arithmetic (a ConvNet-3 step runs
near the core's peak FLOP rate already), stacking cannot reduce the arithmetic,
and vmap's batching rules add memory passes (GroupNorm's per-run affine becomes
separate multiply/add kernels over ``runs``-times larger activations): 5
stacked ConvNet-3 runs took 1.17x / 1.19x / 1.55x the CPU time of 5 runs one
by one at IPC 1 / 10 / 50 on a 2-core CPU (``benchmarks/results/eval_speed-cpu.json``).
``--stacked``/``--sequential`` force either path.

**No host syncs in the loop.** The random numbers of a block of epochs
(permutations, augmentation and CutMix parameters) are drawn on the CPU from
the run streams in a few large draws and copied to the device once (pinned,
non-blocking on CUDA); the synthetic set, its augmentation and the test set stay
on the device. Nothing is read back until the end: test accuracy counts
accumulate on the device, and the test set goes through each trained run in
batches of ``test_batch``.
"""

from __future__ import annotations

import copy
import ctypes
import functools
import json
import sys
import warnings
from dataclasses import asdict, dataclass, field, fields, replace
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
from distillkit.zoo import cache_sized_batch, check_model, create_model

#: TrainingProtocol fields that choose how results are computed, not what they are
ENGINE = ("stacked", "compile", "test_batch")


def _to_device(t: Tensor, device: torch.device) -> Tensor:
    """Host -> device without stalling the host: from pinned memory, asynchronously, on CUDA."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


@functools.cache
def keep_freed_memory() -> None:
    """On glibc, keep freed blocks in the process heap instead of giving them back to the kernel.

    CPU training allocates the same large activations every step; glibc serves
    blocks above 32 MB with a fresh ``mmap`` each time, and the kernel's page
    faults and zero-fill then cost as much as a third of the step (seen as
    system time), more for stacked runs whose activations are ``runs`` times
    larger. Process-wide and idempotent; the heap stays at its peak size.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc
        return
    m_trim_threshold, m_mmap_max = -1, -4
    libc.mallopt(m_mmap_max, 0)
    libc.mallopt(m_trim_threshold, 2**31 - 1)


class _Stacked:
    """``R`` networks of one architecture as one vmapped functional model: ``(R, B, ...) -> (R, B, classes)``."""

    def __init__(self, models: list[nn.Module], compile: bool) -> None:
        params, buffers = stack_module_state(models)
        self.runs = len(models)
        self.params = {k: v.detach().requires_grad_(True) for k, v in params.items()}
        self.buffers = buffers  # batch-norm statistics: one slice per run, updated in place under vmap
        self.base = copy.deepcopy(models[0]).to("meta")  # structure only; every tensor comes from the stacks
        step = torch.vmap(self._call, randomness="different")
        self._step = torch.compile(step) if compile else step

    def _call(self, params: dict[str, Tensor], buffers: dict[str, Tensor], x: Tensor) -> Tensor:
        return functional_call(self.base, (params, buffers), (x,))

    def check(self, shape: tuple[int, ...]) -> str | None:
        """Why these runs cannot train stacked (None if they can), from no-grad forwards of ``shape`` inputs.

        vmap must run the forward, and the training forward must draw no random numbers: under vmap,
        dropout-like layers draw every run's masks from one global stream, so a run's result would
        depend on which runs share its stack.
        """
        xs = torch.randn(self.runs, *shape, generator=torch.Generator().manual_seed(0))
        xs = xs.to(next(iter(self.params.values())).device)
        outputs = []
        for draw in range(2):
            scratch = {k: v.clone() for k, v in self.buffers.items()}  # leave the real statistics untouched
            try:
                with torch.no_grad(), torch.random.fork_rng(devices=[xs.device] if xs.is_cuda else []):
                    torch.manual_seed(draw)
                    outputs.append(torch.vmap(self._call, randomness="different")(self.params, scratch, xs))
            except Exception as exc:  # vmap raises several types for unsupported forwards
                return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        if not torch.equal(*outputs):
            return "its training forward draws random numbers (dropout?), which stacked runs would share"
        return None

    def parameters(self) -> list[Tensor]:
        return list(self.params.values())

    def train(self, mode: bool) -> None:
        self.base.train(mode)

    def forward(self, xs: Tensor) -> Tensor:
        return self._step(self.params, self.buffers, xs)

    def forward_run(self, r: int, x: Tensor) -> Tensor:
        """Run ``r`` alone on ``x`` (test time: large batches, no vmap needed)."""
        return self._call({k: v[r] for k, v in self.params.items()}, {k: v[r] for k, v in self.buffers.items()}, x)


class _Single:
    """One plain network behind the same interface (``R = 1``): the run-by-run path."""

    def __init__(self, model: nn.Module, compile: bool) -> None:
        self.model = model
        self._step = torch.compile(model) if compile else model

    def parameters(self) -> list[Tensor]:
        return list(self.model.parameters())

    def train(self, mode: bool) -> None:
        self.model.train(mode)

    def forward(self, xs: Tensor) -> Tensor:
        return self._step(xs[0]).unsqueeze(0)

    def forward_run(self, r: int, x: Tensor) -> Tensor:
        return self.model(x)


#: random numbers are drawn for this many sample-epochs at once (fewer, larger host draws; a pure
#: function of the set size, so results never depend on the device)
DRAW_SAMPLES = 16384
MAX_DRAW_EPOCHS = 32


def epochs_per_draw(n: int) -> int:
    return max(1, min(MAX_DRAW_EPOCHS, DRAW_SAMPLES // n))


@dataclass(frozen=True)
class _Draws:
    """The random numbers of ``K`` consecutive epochs for ``R`` runs, on the device.

    Drawn on the CPU from each run's streams ``(seed, kind, model, run, block)``.
    """

    order: Tensor  # (R, K, n) sample index at each position of each epoch
    group: Tensor  # (R, K, n) augmentation group of each position: r * K * n + k * n + j
    augment: AugmentParams | None  # one group per (run, epoch, position)
    mix: Tensor | None  # (R, K, n) CutMix partner position (inside the same batch)
    box: Tensor | None  # (R, K, batches, 4) CutMix box y0, y1, x0, x1 (empty where CutMix is off)
    kept: Tensor | None  # (R, K, batches) weight of the own label (1 where CutMix is off)


@dataclass(frozen=True)
class TrainingProtocol:
    """Train ``runs`` fresh networks with SGD on the synthetic set; report final test accuracy.

    ``milestones`` are fractions of ``epochs`` at which the lr is multiplied by
    ``gamma``; with ``restart_optimizer`` the optimizer is re-created there (the
    DM reference does this, dropping the momentum buffer). The last three
    fields are the engine (see :data:`ENGINE`): ``stacked`` trains the runs
    together, ``compile`` wraps the training forward in ``torch.compile``,
    ``test_batch`` is the test-time batch (None: 1000 on accelerators,
    :func:`~distillkit.zoo.cache_sized_batch` on a CPU).
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
    stacked: bool | None = None
    compile: bool = False
    test_batch: int | None = None
    description: str = field(default="", compare=False)

    def settings(self) -> dict[str, Any]:
        """Every setting that changes the result (stored with each result; the engine is not among them)."""
        out = {k: v for k, v in asdict(self).items() if k not in ENGINE and k != "description"}
        out["milestones"] = list(self.milestones)
        return out

    def stacks_on(self, device: torch.device | str) -> bool:
        """Whether runs train stacked on ``device``: ``stacked``, or by default on accelerators only."""
        return self.stacked if self.stacked is not None else torch.device(device).type != "cpu"

    def engine(self, device: torch.device | str) -> dict[str, Any]:
        """How results are computed on ``device`` (recorded beside the settings)."""
        return {**{k: getattr(self, k) for k in ENGINE}, "stacked": self.stacks_on(device)}

    def with_overrides(self, **overrides: Any) -> "TrainingProtocol":
        given = {k: v for k, v in overrides.items() if v is not None}
        valid = [f.name for f in fields(self) if f.name not in ("name", "description")]
        unknown = sorted(set(given) - set(valid))
        if unknown:
            raise UsageError(f"protocol {self.name!r} has no setting {unknown[0]!r}; settings: {', '.join(valid)}")
        for key in ("epochs", "batch_size", "test_batch", "test_limit"):
            if key in given and given[key] < 1:
                raise UsageError(f"--{key.replace('_', '-')} must be positive, got {given[key]}")
        return replace(self, **given)

    # -- the engine ------------------------------------------------------
    def evaluate(self, model: str, train: TrainingSet, test: TrainingSet, spec: ImageSpec, run_ids: Sequence[int],
                 seed: int, device: torch.device | str) -> list[float]:
        run_ids = list(run_ids)
        if not run_ids:
            raise UsageError("no evaluation runs given (--runs must be positive)")
        device = torch.device(device)
        if device.type == "cpu":
            keep_freed_memory()
        models = []
        for r in run_ids:
            with seeded(seed, "eval-init", model, r):
                models.append(create_model(model, spec).to(device))
        if self.stacks_on(device) and len(models) > 1:
            stacked = _Stacked(models, self.compile)
            why = stacked.check((2, spec.channels, spec.height, spec.width))
            if why is None:
                return self._train_and_test(stacked, run_ids, train, test, seed, model)
            warnings.warn(f"{model}: runs train one by one: {why}", stacklevel=2)
        return [acc for r, m in zip(run_ids, models)
                for acc in self._train_and_test(_Single(m, self.compile), [r], train, test, seed, model)]

    def _train_and_test(self, net: _Stacked | _Single, run_ids: list[int], train: TrainingSet, test: TrainingSet,
                        seed: int, model: str) -> list[float]:
        # Dropout-like layers draw from torch's global generator: seed it from the runs, never from leftover state.
        with seeded(seed, "eval-train", model, *run_ids):
            self._train(net, run_ids, train, seed, model)
        return self._test(net, len(run_ids), test)

    def _train(self, net: _Stacked | _Single, run_ids: list[int], train: TrainingSet, seed: int, model: str) -> None:
        aug = Augment(self.augment, self.augment_strategy)
        device = train.images.device
        n = train.images.shape[0]
        bounds = [(s, min(s + self.batch_size, n)) for s in range(0, n, self.batch_size)]
        per_draw = epochs_per_draw(n)
        milestones = sorted({int(round(m * self.epochs)) for m in self.milestones})
        make_opt = lambda lr: torch.optim.SGD(net.parameters(), lr=lr, momentum=self.momentum,  # noqa: E731
                                              weight_decay=self.weight_decay)
        lr = self.lr
        optimizer = make_opt(lr)
        net.train(True)
        for epoch in range(self.epochs):
            if epoch in milestones:
                lr *= self.gamma
                if self.restart_optimizer:
                    optimizer = make_opt(lr)
                else:
                    for g in optimizer.param_groups:
                        g["lr"] = lr
            k = epoch % per_draw
            if k == 0:
                draws = self._draw(aug, run_ids, seed, model, epoch // per_draw, min(per_draw, self.epochs - epoch),
                                   train.images.shape[-2:], bounds, device)
            for b, (s, e) in enumerate(bounds):
                idx = draws.order[:, k, s:e]
                xs, ys = train.images[idx], train.labels[idx]  # (R, B, ...)
                if draws.augment is not None:
                    xs = aug.apply(xs.flatten(0, 1), draws.augment, draws.group[:, k, s:e].flatten()).view_as(xs)
                if draws.mix is not None:
                    xs, ys_other, kept = self._cutmix(xs, ys, draws, k, b, s, e)
                logits = net.forward(xs).flatten(0, 1)
                ce = lambda t: F.cross_entropy(logits, t.flatten(), reduction="none").view(t.shape)  # noqa: E731
                # the sum over runs of each run's mean loss: each run's gradient is its own
                loss = ((kept * ce(ys) + (1 - kept) * ce(ys_other)) if draws.mix is not None else ce(ys)).mean(1).sum()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()

    def _draw(self, aug: Augment, run_ids: list[int], seed: int, model: str, block: int, epochs: int,
              hw: tuple[int, int], bounds: list[tuple[int, int]], device: torch.device) -> _Draws:
        """The random numbers of ``epochs`` epochs starting at ``block * epochs_per_draw(n)``, one stream per run."""
        h, w = hw
        n = bounds[-1][1]
        order = torch.stack([torch.rand(epochs, n, generator=generator(seed, "eval-shuffle", model, r, block))
                             .argsort(dim=1) for r in run_ids])
        group = torch.arange(order.numel(), device=device).view(order.shape)
        params = None
        if aug.mode != "none":
            drawn = [aug.draw(epochs * n, generator(seed, "eval-augment", model, r, block), h, w) for r in run_ids]
            params = AugmentParams(**{f: _to_device(torch.cat([getattr(p, f) for p in drawn]), device)
                                      for f in drawn[0].__dict__})
        if self.cutmix_prob <= 0:
            return _Draws(_to_device(order, device), group, params, None, None, None)
        mix, box, kept = zip(*(self._draw_cutmix(np.random.default_rng(derive_seed(seed, "eval-cutmix", model, r,
                                                                                    block)), epochs, h, w, bounds)
                               for r in run_ids))
        as_device = lambda arrays: _to_device(torch.from_numpy(np.stack(arrays)), device)  # noqa: E731
        return _Draws(_to_device(order, device), group, params, as_device(mix), as_device(box),
                      as_device(kept).float())

    def _draw_cutmix(self, rng: np.random.Generator, epochs: int, h: int, w: int, bounds: list[tuple[int, int]]
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per epoch and batch, with probability ``cutmix_prob``: a box of area ``1 - lam`` (lam ~ Beta(beta, beta))
        at a uniform centre, and a partner order inside the batch."""
        shape = (epochs, len(bounds))
        apply = rng.random(shape) < self.cutmix_prob
        lam = rng.beta(self.cutmix_beta, self.cutmix_beta, shape)
        cy, cx = rng.integers(h, size=shape), rng.integers(w, size=shape)
        partner = np.stack([np.concatenate([s + rng.permutation(e - s) for s, e in bounds]) for _ in range(epochs)])
        cut = np.sqrt(1 - lam)
        half_h, half_w = (cut * h).astype(np.int64) // 2, (cut * w).astype(np.int64) // 2
        box = np.stack([np.clip(cy - half_h, 0, h), np.clip(cy + half_h, 0, h),
                        np.clip(cx - half_w, 0, w), np.clip(cx + half_w, 0, w)], -1) * apply[..., None]
        kept = 1 - (box[..., 1] - box[..., 0]) * (box[..., 3] - box[..., 2]) / (h * w)
        return partner, box, kept

    @staticmethod
    def _cutmix(xs: Tensor, ys: Tensor, draws: _Draws, k: int, b: int, s: int, e: int
                ) -> tuple[Tensor, Tensor, Tensor]:
        """Paste each run's box from its partner images; returns images, partner labels, own-label weights."""
        r, size, _, h, w = xs.shape
        partner = draws.mix[:, k, s:e] - s  # (R, B) positions inside this batch
        y0, y1, x0, x1 = (v.view(r, 1, 1) for v in draws.box[:, k, b].unbind(-1))
        rows = torch.arange(h, device=xs.device).view(1, h, 1)
        cols = torch.arange(w, device=xs.device).view(1, 1, w)
        box = (rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1)
        shuffled = torch.gather(xs, 1, partner.view(r, size, 1, 1, 1).expand_as(xs))
        mixed = torch.where(box.view(r, 1, 1, h, w), shuffled, xs)
        return mixed, torch.gather(ys, 1, partner), draws.kept[:, k, b].view(r, 1)

    @torch.no_grad()
    def _test(self, net: _Stacked | _Single, runs: int, test: TrainingSet) -> list[float]:
        net.train(False)
        images, labels = test.images, test.labels
        if self.test_limit is not None:
            images, labels = images[: self.test_limit], labels[: self.test_limit]
        batch = self.test_batch or (cache_sized_batch(*images.shape[-2:]) if images.device.type == "cpu" else 1000)
        correct = torch.zeros(runs, dtype=torch.long, device=labels.device)
        for r in range(runs):
            for x, y in zip(images.split(batch), labels.split(batch)):
                correct[r] += (net.forward_run(r, x).argmax(-1) == y).sum()
        return (correct.double() * 100.0 / len(labels)).tolist()  # the one read-back


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
                 on_job: Callable[[int, int, str], None] = lambda done, total, label: None) -> dict[str, Any]:
    """Evaluate a run directory's synthetic set (and the random baseline) on ``models``; update eval.json/csv.

    Under torchrun the (model, set, run) jobs are dealt round-robin over the ranks and rank 0 writes
    the merged report. ``on_job(done, total, label)`` reports this rank's progress in (model, set) calls.
    """
    from distillkit import registry
    from distillkit.artifact import load_synthetic, versions
    from distillkit.data import load_split
    from distillkit.distributed import device_for_rank, merge_dicts, world as join_world

    if runs < 1:
        raise UsageError(f"--runs must be positive, got {runs}")
    synthetic = load_synthetic(run_dir)
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
        got = list(protocol.evaluate(model, sets[kind], test, synthetic.spec, run_ids, seed, device))
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
    settings = protocol.settings()
    engine = protocol.engine(device) if hasattr(protocol, "engine") else {}
    for row in rows:
        row["protocol_settings"] = settings
        row["engine"] = engine

    report = {"run": str(run_dir), "dataset": config["dataset"], "method": config["method"], "ipc": synthetic.ipc,
              "distill_seed": synthetic.seed, "device": str(device), "ranks": world.size, "versions": versions(),
              "results": rows}
    if world.is_main:
        report["results"] = _write_report(run_dir, report)
    if world.active:
        torch.distributed.barrier()  # the files exist when any rank returns
    return {**report, "new": rows}


def _write_report(run_dir: Path, report: dict[str, Any]) -> list[dict[str, Any]]:
    """Merge ``report``'s rows into eval.json (replacing rows of the same model, set and settings), rewrite
    eval.csv; returns every row now in eval.json."""
    from distillkit.artifact import atomic_write_bytes, atomic_write_json

    rows = report["results"]
    path = Path(run_dir) / "eval.json"
    previous = json.loads(path.read_text()) if path.exists() else {"results": []}
    fresh = {(r["model"], r["kind"], r["protocol"], json.dumps(r["protocol_settings"], sort_keys=True)) for r in rows}
    kept = [r for r in previous.get("results", [])
            if (r["model"], r["kind"], r["protocol"], json.dumps(r["protocol_settings"], sort_keys=True)) not in fresh]
    atomic_write_json({**report, "results": kept + rows}, path)
    header = "model,kind,protocol,runs,seed,mean,std,accuracies\n"
    lines = [f"{r['model']},{r['kind']},{r['protocol']},{r['runs']},{r['seed']},{r['mean']:.4f},{r['std']:.4f},"
             f"{' '.join(f'{a:.2f}' for a in r['accuracies'])}\n" for r in kept + rows]
    atomic_write_bytes(Path(run_dir) / "eval.csv", (header + "".join(lines)).encode())
    return kept + rows
