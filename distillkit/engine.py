"""The evaluation engine: trains fresh evaluator networks under a :class:`TrainingProtocol`, tests them.

:class:`TrainingProtocol` is the built-in :class:`~distillkit.interfaces.EvalProtocol`
(``dc-classic``, ``idc`` and ``smoke`` are instances of it; a plugin adds more through
``register_protocols``). A protocol is data: its :meth:`~TrainingProtocol.settings`
(every number that changes the result) are stored with each result, and results are
only compared under equal settings. How the numbers are computed (stacked or run by
run, compiled, test batch size) are its *speed settings*, recorded apart, because they
change the speed, not the result. The engine never looks a model up by name: it is
handed a :class:`~distillkit.interfaces.ModelBuilder`.

**Stacked runs.** The ``runs`` networks of one architecture can train
together as one vmapped model (:mod:`distillkit.stacking`) with one SGD step
for all (SGD is elementwise, so this is exactly ``runs`` independent
trainings). Each run draws its own init, shuffling,
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

Whether runs stack by default, the test batch and how draws reach the device
follow :mod:`distillkit.devices` (stacked on accelerators, run by run on CPUs).

**No host syncs in the loop.** The random numbers of a block of epochs
(permutations, augmentation and CutMix parameters) are drawn on the CPU from
the run streams in a few large draws and copied to the device once (pinned,
non-blocking on CUDA); the synthetic set, its augmentation and the test set stay
on the device. Nothing is read back until the end: test accuracy counts
accumulate on the device, and the test set goes through each trained run in
batches of ``test_batch``.
"""

from __future__ import annotations

import warnings
from fractions import Fraction
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distillkit import devices
from distillkit.augment import Augment, AugmentParams
from distillkit.errors import UsageError
from distillkit.interfaces import DataContext, ImageSpec, ModelBuilder, TrainingSet
from distillkit.seeding import derive_seed, generator, seeded
from distillkit.stacking import SingleRun, StackedRuns

#: TrainingProtocol fields that choose how results are computed, not what they are
SPEED_SETTINGS = ("stacked", "compile", "test_batch")
#: how a protocol counts epochs and milestones (see TrainingProtocol.epoch_plan)
SCHEDULES = ("dc", "floor")
#: how a protocol picks its epochs: "fixed" trains ``epochs``; "idc-imagenet" follows the training set's size
#: (:func:`idc_imagenet_epochs`)
EPOCH_RULES = ("fixed", "idc-imagenet")
#: IDC's ImageNet epochs by images per class: the first bound at or above the count picks (else 300)
IDC_IMAGENET_EPOCHS = ((1, 3000), (10, 2000), (50, 1500), (200, 1000), (500, 500))
#: what IDC's ``argument.py`` sets apart for ImageNet evaluations (TrainingProtocol.for_dataset): the epoch
#: rule, and CutMix on every batch (``mix_p`` keeps its default 1.0 there; IDC lowers it to 0.5 on CIFAR,
#: SVHN, MNIST and FashionMNIST)
IDC_IMAGENET_SETTINGS: dict[str, Any] = {"epoch_rule": "idc-imagenet", "cutmix_prob": 1.0}


def idc_imagenet_epochs(images_per_class: int, num_classes: int) -> int:
    """The epochs IDC trains an evaluator on an ImageNet subset, from the training set's size.

    IDC's ``argument.py: ipc_epoch`` (snu-mllab/Efficient-Dataset-Condensation, read 2026-12),
    applied in its evaluation-setting block whenever ``dataset == 'imagenet'``: the count is
    ``ipc * factor ** 2``, the decoded images per class the evaluator trains on (with its
    ``decode_type='bound'`` it is first capped at ``batch_syn_max``; distillkit has no such decoding).
    1 -> 3000, up to 10 -> 2000, 50 -> 1500, 200 -> 1000, 500 -> 500, more -> 300; with exactly 100
    classes two thirds of that, floored to whole hundreds (3000 -> 2000, 2000 -> 1300, 1000 -> 600).
    On every other dataset IDC trains 1000 epochs.
    """
    if images_per_class < 1:
        raise UsageError(f"the epoch rule idc-imagenet needs at least one training image per class, got "
                         f"{images_per_class}")
    epochs = next((e for bound, e in IDC_IMAGENET_EPOCHS if images_per_class <= bound), 300)
    if num_classes == 100:
        epochs = int(2 / 3 * epochs) // 100 * 100
    return epochs


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
    geometric: list[list[int]] | None  # per epoch and batch: samples of all runs that drew a geometric op
    mix: Tensor | None  # (R, K, n) CutMix partner position (inside the same batch)
    box: Tensor | None  # (R, K, batches, 4) CutMix box y0, y1, x0, x1 (empty where CutMix is off)
    kept: Tensor | None  # (R, K, batches) weight of the own label (1 where CutMix is off)


@dataclass(frozen=True)
class TrainingProtocol:
    """Train ``runs`` fresh networks with SGD on the synthetic set; report final test accuracy.

    ``milestones`` are fractions of ``epochs`` at which the lr is multiplied by
    ``gamma``; with ``restart_optimizer`` the optimizer is re-created there (the
    DM reference does this, dropping the momentum buffer). ``schedule`` says how
    the references count (:meth:`epoch_plan`): ``"dc"`` as DC/DSA/DM's
    ``utils.py: evaluate_synset`` (``range(E + 1)`` epochs, the lr decays after
    epoch ``E // 2 + 1``), ``"floor"`` as IDC's ``MultiStepLR([2 * E // 3,
    5 * E // 6])`` (``E`` epochs, floored milestones). ``no_flip`` names datasets
    on which the protocol drops the ``flip`` op (IDC's ``remove_aug`` for MNIST
    and SVHN; :meth:`for_dataset`). ``epoch_rule`` says how many epochs :meth:`evaluate` trains
    (:data:`EPOCH_RULES`): ``"fixed"`` trains ``epochs``, ``"idc-imagenet"`` takes
    :func:`idc_imagenet_epochs` of the training set's images per class (``len(train) //
    classes``) and classes; the settings then record ``epochs`` as None, and each result's
    ``train_images`` with its dataset's classes gives the epochs trained
    (:meth:`epochs_for`). ``imagenet`` names datasets on which :meth:`for_dataset` takes IDC's
    ImageNet evaluation settings (:data:`IDC_IMAGENET_SETTINGS`). ``overridden`` lists the settings
    given explicitly (:meth:`with_overrides`), which :meth:`for_dataset` leaves as given: an
    explicit ``--epochs`` keeps the epochs fixed on an ImageNet subset too, whichever of the two
    calls comes first. ``op_per="batch"`` draws the augmentation op
    (``dsa``) or the geometric op (``idc``) once per training batch, its
    parameters per sample, as both references do (DC's ``DiffAugment`` with
    ``aug_mode='S'``, IDC's ``DiffAug(batch=False)``); ``"sample"`` draws the op
    per sample too. The last three
    fields are the speed settings (see :data:`SPEED_SETTINGS`): ``stacked``
    trains the runs together (None: :func:`~distillkit.devices.default_stacked`),
    ``compile`` wraps the training forward in ``torch.compile``, ``test_batch``
    is the test-time batch (None: :func:`~distillkit.devices.default_test_batch`).
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
    schedule: str = "dc"
    op_per: str = "batch"
    no_flip: tuple[str, ...] = ()
    epoch_rule: str = "fixed"
    imagenet: tuple[str, ...] = ()
    overridden: tuple[str, ...] = ()
    test_limit: int | None = None
    stacked: bool | None = None
    compile: bool = False
    test_batch: int | None = None
    description: str = field(default="", compare=False)

    def settings(self) -> dict[str, Any]:
        """Every setting that changes the result (stored with each result; the speed settings are not among them)."""
        out = {k: v for k, v in asdict(self).items() if k not in (*SPEED_SETTINGS, "description", "overridden")}
        for key in ("milestones", "no_flip", "imagenet"):
            out[key] = list(getattr(self, key))
        if self.epoch_rule != "fixed":  # the rule picks them per training set: no one number would be true
            out["epochs"] = None
        return out

    def __post_init__(self) -> None:
        if self.op_per not in ("batch", "sample"):
            raise UsageError(f"unknown op_per {self.op_per!r} for protocol {self.name!r}; choose one of: batch, sample")
        if self.schedule not in SCHEDULES:
            raise UsageError(f"unknown schedule {self.schedule!r} for protocol {self.name!r}; choose one of: "
                             f"{', '.join(SCHEDULES)}")
        if self.epoch_rule not in EPOCH_RULES:
            raise UsageError(f"unknown epoch_rule {self.epoch_rule!r} for protocol {self.name!r}; choose one of: "
                             f"{', '.join(EPOCH_RULES)}")
        Augment(self.augment, self.augment_strategy)  # an unknown mode or op fails here, not after the first epoch

    def epoch_plan(self) -> tuple[int, list[int]]:
        """``(epochs trained, 0-based epochs at whose start the lr is multiplied by gamma)``.

        Milestones floor exactly (2/3 of 300 is 200, not 199.99...). DC: 1000 -> 1001 epochs, decay
        from epoch 502 (502 epochs at lr, 499 at lr x gamma). IDC: 1000 -> 1000 epochs, decays from
        epochs 666 and 833 (``misc/utils.py`` of both reference repositories, read 2026-12).
        """
        points = [int(Fraction(m).limit_denominator(1000) * self.epochs) for m in self.milestones]
        if self.schedule == "dc":
            return self.epochs + 1, sorted({p + 2 for p in points})
        return self.epochs, sorted(set(points))

    def for_dataset(self, dataset: str) -> "TrainingProtocol":
        """This protocol as its reference sets it for ``dataset``: IDC drops flips on MNIST and SVHN, and on
        ImageNet subsets (``imagenet``) takes :data:`IDC_IMAGENET_SETTINGS`, except settings given explicitly."""
        changes: dict[str, Any] = {}
        if dataset in self.no_flip:
            changes["augment_strategy"] = "_".join(t for t in self.augment_strategy.split("_") if t != "flip")
        if dataset in self.imagenet:
            # an explicit --epochs overrode epoch_rule too (with_overrides), so it stays fixed here
            changes.update({k: v for k, v in IDC_IMAGENET_SETTINGS.items() if k not in self.overridden})
        return replace(self, **changes) if changes else self

    def epochs_for(self, train_images: int, num_classes: int) -> int:
        """The epochs (as counted by ``epochs``, before :meth:`epoch_plan`) trained on ``train_images`` images of
        ``num_classes`` classes."""
        if self.epoch_rule == "idc-imagenet":
            return idc_imagenet_epochs(train_images // num_classes, num_classes)
        return self.epochs

    def stacks_on(self, device: torch.device | str) -> bool:
        """Whether runs train stacked on ``device``: ``stacked``, or the device policy's default."""
        return self.stacked if self.stacked is not None else devices.default_stacked(device)

    def speed_settings(self, device: torch.device | str) -> dict[str, Any]:
        """How results are computed on ``device`` (recorded beside the settings)."""
        return {**{k: getattr(self, k) for k in SPEED_SETTINGS}, "stacked": self.stacks_on(device)}

    def with_overrides(self, **overrides: Any) -> "TrainingProtocol":
        given = {k: v for k, v in overrides.items() if v is not None}
        valid = [f.name for f in fields(self) if f.name not in ("name", "description", "overridden")]
        unknown = sorted(set(given) - set(valid))
        if unknown:
            raise UsageError(f"protocol {self.name!r} has no setting {unknown[0]!r}; settings: {', '.join(valid)}")
        for key in ("epochs", "batch_size", "test_batch", "test_limit"):
            if key in given and given[key] < 1:
                raise UsageError(f"--{key.replace('_', '-')} must be positive, got {given[key]}")
        if "epochs" in given and "epoch_rule" not in given:
            given["epoch_rule"] = "fixed"  # a number of epochs asked for is trained, whatever the rule was
        return replace(self, **given, overridden=tuple(sorted(set(self.overridden) | set(given))))

    # -- training and testing --------------------------------------------
    def evaluate(self, model: ModelBuilder, train: TrainingSet, test: TrainingSet, spec: ImageSpec,
                 run_ids: Sequence[int], seed: int, device: torch.device | str,
                 data: DataContext | None = None) -> list[float]:
        """See :meth:`EvalProtocol.evaluate`; hard-label training needs no more than ``train`` (``data`` unused)."""
        run_ids = list(run_ids)
        if not run_ids:
            raise UsageError("no evaluation runs given (--runs must be positive)")
        device = torch.device(device)
        devices.prepare(device)
        if self.epoch_rule != "fixed":
            epochs = self.epochs_for(len(train.labels), spec.num_classes)
            return replace(self, epochs=epochs, epoch_rule="fixed").evaluate(model, train, test, spec, run_ids,
                                                                              seed, device)
        models = []
        for r in run_ids:
            with seeded(seed, "eval-init", model.name, r):
                models.append(model().to(device))
        if self.stacks_on(device) and len(models) > 1:
            stacked = StackedRuns(models, self.compile)
            why = stacked.check((2, spec.channels, spec.height, spec.width))
            if why is None:
                return self._train_and_test(stacked, run_ids, train, test, seed, model.name)
            warnings.warn(f"{model.name}: runs train one by one: {why}", stacklevel=2)
        return [acc for r, m in zip(run_ids, models)
                for acc in self._train_and_test(SingleRun(m, self.compile), [r], train, test, seed, model.name)]

    def train_network(self, module: nn.Module, train: TrainingSet, seed: int, model: str, run: int) -> None:
        """Train ``module`` in place as :meth:`evaluate` trains run ``run`` of ``model`` one by one (the same
        streams), untested: for a component that needs networks trained on real data (NCFM's extractors)."""
        with seeded(seed, "eval-train", model, run, device=train.images.device):
            self._train(SingleRun(module, self.compile), [run], train, seed, model)

    def _train_and_test(self, net: StackedRuns | SingleRun, run_ids: list[int], train: TrainingSet, test: TrainingSet,
                        seed: int, model: str) -> list[float]:
        # Dropout-like layers draw from torch's global generator: seed it from the runs, never from leftover state.
        with seeded(seed, "eval-train", model, *run_ids, device=train.images.device):
            self._train(net, run_ids, train, seed, model)
        return self._test(net, len(run_ids), test)

    def _train(self, net: StackedRuns | SingleRun, run_ids: list[int], train: TrainingSet, seed: int, model: str) -> None:
        aug = Augment(self.augment, self.augment_strategy)
        device = train.images.device
        n = train.images.shape[0]
        bounds = [(s, min(s + self.batch_size, n)) for s in range(0, n, self.batch_size)]
        per_draw = epochs_per_draw(n)
        epochs, milestones = self.epoch_plan()
        make_opt = lambda lr: torch.optim.SGD(net.parameters(), lr=lr, momentum=self.momentum,  # noqa: E731
                                              weight_decay=self.weight_decay)
        lr = self.lr
        optimizer = make_opt(lr)
        net.train(True)
        for epoch in range(epochs):
            if epoch in milestones:
                lr *= self.gamma
                if self.restart_optimizer:
                    optimizer = make_opt(lr)
                else:
                    for g in optimizer.param_groups:
                        g["lr"] = lr
            k = epoch % per_draw
            if k == 0:
                draws = self._draw(aug, run_ids, seed, model, epoch // per_draw, min(per_draw, epochs - epoch),
                                   train.images.shape[-2:], bounds, device)
            for b, (s, e) in enumerate(bounds):
                idx = draws.order[:, k, s:e]
                xs, ys = train.images[idx], train.labels[idx]  # (R, B, ...)
                if draws.augment is not None:
                    xs = aug.apply(xs.flatten(0, 1), draws.augment, draws.group[:, k, s:e].flatten(),
                                   draws.geometric[k][b]).view_as(xs)
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
        params, geometric = None, None
        if aug.mode != "none":
            # op_per "batch": the op (dsa) or geometric op (idc) of a batch is one draw, as in the references
            batch_of = torch.bucketize(torch.arange(n), torch.tensor([e for _, e in bounds]), right=True)
            op_groups = ((torch.arange(epochs) * len(bounds)).view(-1, 1) + batch_of).flatten() \
                if self.op_per == "batch" else None
            cpu = aug.draw_groups([generator(seed, "eval-augment", model, r, block) for r in run_ids], h, w,
                                  groups=epochs * n, op_groups=op_groups)
            drew = cpu.geometric.view(len(run_ids), epochs, n)
            geometric = [[int(drew[:, k, s:e].sum()) for s, e in bounds] for k in range(epochs)]  # host, no sync
            params = cpu.to(device)
        if self.cutmix_prob <= 0:
            return _Draws(devices.to_device(order, device), group, params, geometric, None, None, None)
        mix, box, kept = zip(*(self._draw_cutmix(np.random.default_rng(derive_seed(seed, "eval-cutmix", model, r,
                                                                                    block)), epochs, h, w, bounds)
                               for r in run_ids))
        as_device = lambda arrays: devices.to_device(torch.from_numpy(np.stack(arrays)), device)  # noqa: E731
        return _Draws(devices.to_device(order, device), group, params, geometric, as_device(mix), as_device(box),
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
    def _test(self, net: StackedRuns | SingleRun, runs: int, test: TrainingSet) -> list[float]:
        net.train(False)
        images, labels = test.images, test.labels
        if self.test_limit is not None:
            images, labels = images[: self.test_limit], labels[: self.test_limit]
        batch = self.test_batch or devices.default_test_batch(images.device, *images.shape[-2:])
        correct = torch.zeros(runs, dtype=torch.long, device=labels.device)
        for r in range(runs):
            for x, y in zip(images.split(batch), labels.split(batch)):
                correct[r] += (net.forward_run(r, x).argmax(-1) == y).sum()
        return (correct.double() * 100.0 / len(labels)).tolist()  # the one read-back
