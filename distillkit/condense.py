"""The condense loop: the one training loop for synthetic data, serving every method.

Per iteration::

    parameterization.project()                       # e.g. clamp to [0, 1]
    extract = sampler.extractor(it)                  # new or reused network
    real features of every class in ONE batched forward (no autograd)
    syn = parameterization.decode(all classes)       # "class" schedule: each class where its own step finds it
    same augmentation parameters as each class's real batch
    loss = objective(real features, synthetic features).sum()
    one backward; one optimizer step ("iteration", DM) or the closed form of one SGD step per class ("class", M3D)
    a LearnableObjective's own step (its gradients summed over torchrun ranks first)

Every random draw comes from a generator derived from ``(seed, stream,
iteration, class)``, so a run is reproducible, resumes bit-exactly from a
checkpoint, and gives the same per-class result whatever subset of classes a
process owns (class sharding under torchrun).

Checkpoints therefore hold no RNG state: the parameterization tensors, the
optimizer state (SGD's momentum or AdamW's moments), the iteration, the
loss-log position and the state of :class:`~distillkit.interfaces.Stateful`
samplers and objectives are the whole state, because every stream of iteration ``it`` is recomputed from
``(seed, keys)`` (see :mod:`distillkit.seeding`): the real batches, the
augmentation parameters and the synthetic subsets here; the initialisation;
the sampler's networks, initialised inside :func:`~distillkit.seeding.seeded`, which
restores torch's global generator afterwards. A checkpoint records the seed and
this scheme (``STREAMS``) so it describes itself. Nothing may draw from torch's
global generators, whose state a checkpoint does not hold: the run loop
(:mod:`distillkit.runner`) checks this at every checkpoint and warns if a component did.
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import torch
from torch import Tensor

from distillkit import devices, registry
from distillkit.augment import Augment, AugmentParams
from distillkit.config import RunConfig
from distillkit.checks import OutputChecks
from distillkit.data import RealData, data_context, resolve_root
from distillkit.distributed import World, merge_state, sum_gradients
from distillkit.errors import ComponentError, UsageError
from distillkit.features import Features, any_tensor, cat_features, map_features, per_class
from distillkit.interfaces import (DataContext, ImageSpec, LearnableObjective, Objective, Parameterization, Sampler,
                                   Stateful)
from distillkit.seeding import generator

#: What a checkpoint records instead of RNG states: how every random stream is derived.
STREAMS = {
    "derivation": "distillkit.seeding.derive_seed(seed, *keys): blake2b-64 of 'seed/key/...' seeds a CPU "
                  "torch.Generator; nothing draws from torch's global generators",
    "loop": ["init", "real/ITERATION/CLASS", "augment/ITERATION/CLASS", "syn/ITERATION/CLASS"],
    "components": "samplers, parameterizations and objectives derive theirs from the same seed with their own "
                  "keys (random-convnet: model/encoder/ITERATION)",
}


def build_components(cfg: RunConfig, spec: ImageSpec, device: torch.device, data: DataContext
                     ) -> tuple[Objective, Parameterization, Sampler, Augment]:
    objective = registry.create("objectives", cfg.objective,
                                _if_declared("objectives", cfg.objective, seed=cfg.seed, device=device),
                                **cfg.objective_options)
    param = registry.create("parameterizations", cfg.parameterization,
                            {"spec": spec, "ipc": cfg.ipc, "device": device,
                             **_if_declared("parameterizations", cfg.parameterization, data=data)},
                            **cfg.parameterization_options)
    sampler = registry.create("samplers", cfg.sampler, {"spec": spec, "seed": cfg.seed, "device": device,
                                                        **_if_declared("samplers", cfg.sampler, data=data)},
                              **cfg.sampler_options)
    return objective, param, sampler, Augment(cfg.augment, cfg.augment_strategy)


def _if_declared(kind: str, name: str, **optional: object) -> dict[str, object]:
    """The ``optional`` host arguments that ``name``'s factory declares (the documented contract: e.g. ``data``
    for samplers, ``seed`` and ``device`` for objectives), so a factory that does not ask gets none of them."""
    factory = registry.plugins()[kind].get(name).factory
    return {key: value for key, value in optional.items() if registry.declares(factory, key)}


def image_optimizer(cfg: RunConfig, parameters: list[Tensor]) -> torch.optim.Optimizer:
    """The optimizer of the synthetic images that ``cfg`` names (:data:`~distillkit.config.OPTIMIZERS`)."""
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(parameters, lr=cfg.lr_img, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(parameters, lr=cfg.lr_img, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


@dataclass
class Condenser:
    """State of one distillation: components, optimizer, iteration counter."""

    cfg: RunConfig
    real: RealData
    device: torch.device
    owned: Sequence[int] | None = None  # classes this process optimises (None: all)
    world: World = field(default_factory=World)
    #: the dataset and full training split for components that declare ``data`` (default: built from ``real``)
    data: DataContext | None = None
    iteration: int = 0
    objective: Objective = field(init=False)
    param: Parameterization = field(init=False)
    sampler: Sampler = field(init=False)
    augment: Augment = field(init=False)

    def __post_init__(self) -> None:
        if self.data is None:
            self.data = data_context(registry.create("datasets", self.cfg.dataset, **self.cfg.dataset_options),
                                     self.cfg.dataset_options, resolve_root(), self.device, train=self.real)
        self.objective, self.param, self.sampler, self.augment = build_components(
            self.cfg, self.real.spec, self.device, self.data)
        self.checks = OutputChecks(self.cfg, self.real.spec)
        self._objective_takes = {name for name in ("classes", "iteration") if registry.declares(self.objective, name)}
        self._objective_learns = isinstance(self.objective, LearnableObjective)
        if self._objective_learns and not isinstance(self.objective, Stateful):
            raise ComponentError(f"{self.checks.labels['objective']} learns parameters (parameters, step) but has no "
                                 f"state_dict/load_state_dict, so checkpoints could not resume it")
        num_classes = self.real.spec.num_classes
        self.classes = list(range(num_classes)) if self.owned is None else sorted(self.owned)
        smallest = min(self.real.split_counts)
        if self.cfg.ipc > smallest:
            raise UsageError(f"--ipc {self.cfg.ipc} is larger than the smallest class ({smallest} images)")
        if self.cfg.batch_real > smallest:
            raise UsageError(f"--batch-real {self.cfg.batch_real} is larger than the smallest class ({smallest} "
                             f"images); give --batch-real {smallest} or less")
        self.batch_real = self.cfg.batch_real
        if self.cfg.amp and self.device.type == "cpu" and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
            raise UsageError("--amp on this CPU: it has no bf16 instructions (AVX512-BF16 or AMX), so bf16 would be "
                             "emulated and slower than float32; leave --amp off here")
        self.optimizer = image_optimizer(self.cfg, self.param.parameters())
        self._coefficients: dict[tuple, tuple[Tensor, Tensor, Tensor, Tensor]] = {}

    # -- state -----------------------------------------------------------
    def initialize(self, real: RealData | None = None) -> None:
        """Initialise from ``real`` (default: this process's data; a class shard passes the full split)."""
        with self.checks.blame("parameterization", "init"):
            self.param.init(real if real is not None else self.real, generator(self.cfg.seed, "init"))

    def stateful(self) -> dict[str, Stateful]:
        """The components whose state checkpoints hold (see :class:`~distillkit.interfaces.Stateful`)."""
        return {kind: c for kind, c in (("sampler", self.sampler), ("objective", self.objective))
                if isinstance(c, Stateful)}

    def state_dict(self) -> dict:
        # a snapshot: the optimizer's own state_dict shares its live momentum buffers
        return {"parameterization": {k: v.detach().clone() for k, v in self.param.state_dict().items()},
                "optimizer": copy.deepcopy(self.optimizer.state_dict()), "iteration": self.iteration,
                "components": {kind: copy.deepcopy(c.state_dict()) for kind, c in self.stateful().items()}}

    def merged_state_dict(self) -> dict:
        """:meth:`state_dict` with every rank's classes filled in (the same as ``state_dict`` in one process)."""
        state = self.state_dict()
        if self.world.active:
            state = merge_state(state, self.classes, self.real.spec.num_classes)
        return state

    def preflight(self) -> None:
        """Run every component once on two real images and one class, so a model that cannot take the
        dataset's channels or size, or a component that returns the wrong shape, fails with one clear line
        before any file is written (the first iteration checks again, on every class)."""
        checks, spec = self.checks, self.real.spec
        try:
            with checks.blame("sampler", "extractor"):  # with autograd: a sampler may train its network
                extract = checks.extractor(self.sampler.extractor(self.iteration))
            with torch.no_grad():
                real = extract(self.real.images[:2])
        except ComponentError as exc:
            if not isinstance(exc.__cause__, (RuntimeError, ValueError)):
                raise
            raise UsageError(f"sampler {self.cfg.sampler!r} {dict(self.cfg.sampler_options)} cannot embed "
                             f"{self.cfg.dataset}'s {spec.channels}x{spec.height}x{spec.width} images: "
                             f"{str(exc.__cause__).strip().splitlines()[0][:200]}") from exc.__cause__
        with torch.no_grad():
            with checks.blame("parameterization", "decode"):
                syn = checks.decoded(self.param.decode(self.classes[:1]), 1, self.param.images_per_class)
            features = per_class(extract(syn.flatten(0, 1)), 1, syn.shape[1])
            with checks.blame("objective", "__call__"):
                checks.losses(self.objective(per_class(real, 1, 2), features, **self._call_extras(self.classes[:1])),
                              1, finite=False)

    def load_state_dict(self, state: dict) -> None:
        self.param.load_state_dict(state["parameterization"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.iteration = int(state["iteration"])
        saved = state.get("components", {})
        for kind, component in self.stateful().items():
            if kind not in saved:
                raise UsageError(f"the checkpoint holds no state of the {kind} {getattr(self.cfg, kind)!r}, which "
                                 f"keeps one; it was written by another version of that component: start a new run")
            with self.checks.blame(kind, "load_state_dict"):
                component.load_state_dict(saved[kind])

    # -- one iteration ---------------------------------------------------
    def _augment_params(self, it: int, classes: Sequence[int]) -> AugmentParams:
        h, w = self.real.spec.height, self.real.spec.width
        return self.augment.draw_groups([generator(self.cfg.seed, "augment", it, c) for c in classes], h, w)

    def _syn_picks(self, it: int, classes: Sequence[int]) -> Tensor | None:
        """Which ``--batch-syn`` decoded images of each class iteration ``it`` trains, ``(K, batch_syn)`` on the
        device (None: all of them): drawn on the host per class, moved in one copy for the whole iteration."""
        cap, decoded = self.cfg.batch_syn, self.param.images_per_class
        if cap is None or decoded <= cap:
            return None
        picks = torch.stack([torch.randperm(decoded, generator=generator(self.cfg.seed, "syn", it, c))[:cap]
                             for c in classes])
        return devices.to_device(picks, self.device)

    @staticmethod
    def _syn_subset(syn: Tensor, picks: Tensor | None, start: int) -> Tensor:
        """Rows ``picks[start + k]`` of each class ``syn[k]`` of a chunk, in one gather (``picks`` None: all)."""
        if picks is None:
            return syn
        part = picks[start:start + len(syn)]
        return syn.take_along_dim(part.view(*part.shape, *(1,) * (syn.dim() - 2)), dim=1)

    def _groups(self, drawn: AugmentParams, start: int, k: int, n: int) -> tuple[Tensor, int]:
        """The augmentation group of each of ``n`` samples per class of the ``k`` classes from position
        ``start``, made on the device (no copy), and how many draw a geometric op (counted on the host)."""
        group = lambda device: torch.arange(start * n, (start + k) * n, device=device) // n  # noqa: E731
        return group(self.device), drawn.geometric_count(group("cpu"))

    def run_iteration(self) -> Tensor:
        """Run iteration ``self.iteration``; returns the summed loss over owned classes (a device scalar)."""
        it, seed, classes, checks = self.iteration, self.cfg.seed, self.classes, self.checks
        with checks.blame("parameterization", "project"):
            self.param.project()
        with checks.blame("sampler", "extractor"):
            extract = checks.extractor(self.sampler.extractor(it))
        n_r = self.batch_real
        drawn = self._augment_params(it, classes)  # on the host: the geometric counts need no device sync
        params = drawn.to(self.device)  # one copy for the whole iteration
        # every class's real batch drawn on the host, its rows moved in one copy (gathered per chunk below)
        rows = self.real.sample_rows(classes, n_r, [generator(seed, "real", it, c) for c in classes])
        picks = self._syn_picks(it, classes)
        chunk = self.cfg.real_chunk or len(classes)
        with torch.no_grad():  # real features: one batched forward per chunk of classes (all by default)
            pieces = []
            for start in range(0, len(classes), chunk):
                part = classes[start:start + chunk]
                real = self.real.gather(rows[start * n_r:(start + len(part)) * n_r])
                group, geometric = self._groups(drawn, start, len(part), n_r)
                pieces.append(self._features(extract, self.augment.apply(real, params, group, geometric),
                                             self.forward_batch))
            real_features = per_class(cat_features(pieces), len(classes), n_r)

        if self.cfg.step == "class":
            self._move_to_class_steps()
        # synthetic side in the same chunks: class losses are independent and a class's gradient reaches only
        # its own rows, so the backward of each chunk adds up to the one of all classes (all: one chunk)
        self.optimizer.zero_grad(set_to_none=True)
        if self._objective_learns:
            for p in self.objective.parameters():
                p.grad = None
        loss = any_tensor(real_features).new_zeros(())
        for start in range(0, len(classes), chunk):
            part = classes[start:start + chunk]
            with checks.blame("parameterization", "decode"):
                syn = checks.decoded(self.param.decode(part), len(part), self.param.images_per_class)
            syn = self._syn_subset(syn, picks, start)
            k, n_s = syn.shape[:2]
            group, geometric = self._groups(drawn, start, k, n_s)
            syn = self.augment.apply(syn.flatten(0, 1), params, group, geometric)
            features = per_class(self._features(extract, syn, self.forward_batch), k, n_s)
            block = map_features(lambda t: t[start:start + k], real_features)
            with checks.blame("objective", "__call__"):
                part_loss = checks.losses(self.objective(block, features, **self._call_extras(part)), k,
                                          finite=True).sum()
            part_loss.backward()
            loss = loss + part_loss.detach()
        if self.cfg.step == "class":
            self._finish_class_steps()
        else:
            self.optimizer.step()
        if self._objective_learns:
            self._step_objective()
        self.iteration += 1
        checks.done()
        return loss.detach()

    # The "class" schedule (M3D's reference) takes one SGD step per class, in class order, on one optimizer
    # over all images: class c's rows first drift c times on momentum alone, then take their gradient step,
    # then drift C-1-c more times. Class losses are independent and momentum SGD is linear, so the whole
    # sequence has a closed form: move every class to where its own step finds it, take all class gradients
    # in ONE batched forward/backward, then apply the rest of the sequence. Same mathematics as C separate
    # steps (tested against them), one pass instead of C; a class's result never depends on which other
    # classes a process owns.
    def _class_coefficients(self, rows: int, like: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The four per-row coefficient columns for a parameter of ``rows`` rows per class: computed once per
        run (and shape), on the parameter's device, so the loop builds and copies nothing per iteration."""
        key = (rows, like.dim(), like.dtype, like.device)
        if key not in self._coefficients:
            self._coefficients[key] = self._compute_class_coefficients(rows, like)
        return self._coefficients[key]

    def _compute_class_coefficients(self, rows: int, like: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        m, num_classes = self.cfg.momentum, self.real.spec.num_classes
        position = torch.arange(num_classes, dtype=torch.float64)
        geometric = lambda n: m * (1 - m ** n) / (1 - m) if m != 1 else n  # noqa: E731  sum_{t=1..n} m^t
        before = geometric(position)
        after = geometric(num_classes - 1 - position)
        shape = (-1,) + (1,) * (like.dim() - 1)
        per_row = lambda v: v.to(like.dtype).repeat_interleave(rows).to(like.device).view(shape)  # noqa: E731
        return (per_row(before), per_row(m ** (position + 1)), per_row(1 + after),
                per_row(m ** (num_classes - 1 - position)))

    def _momentum(self, p: Tensor) -> Tensor:
        buffer = self.optimizer.state[p].get("momentum_buffer")
        return torch.zeros_like(p) if buffer is None else buffer

    def _move_to_class_steps(self) -> None:
        lr, num_classes = self.cfg.lr_img, self.real.spec.num_classes
        with torch.no_grad():
            for p in self.param.parameters():
                before, _, _, _ = self._class_coefficients(p.shape[0] // num_classes, p)
                p.sub_(lr * before * self._momentum(p))

    def _finish_class_steps(self) -> None:
        lr, num_classes = self.cfg.lr_img, self.real.spec.num_classes
        with torch.no_grad():
            for p in self.param.parameters():
                _, decay_to_step, drift_after, decay_after = self._class_coefficients(p.shape[0] // num_classes, p)
                grad = p.grad if p.grad is not None else torch.zeros_like(p)
                buffer = decay_to_step * self._momentum(p) + grad
                p.sub_(lr * drift_after * buffer)
                self.optimizer.state[p]["momentum_buffer"] = buffer * decay_after

    @functools.cached_property
    def forward_batch(self) -> int | None:
        """Images per extractor call, real and synthetic (None: all at once): ``--forward-batch`` if given,
        else :func:`~distillkit.devices.default_forward_batch` (which asks whether the extractor embeds
        images independently: batch-norm statistics or dropout make features depend on the batch)."""
        if self.cfg.forward_batch is not None:
            return self.cfg.forward_batch
        spec = self.real.spec
        independent = False
        if devices.is_cpu(self.device):  # the probe matters only where the policy would split
            probe = self.real.images[:4]
            extract = self.sampler.extractor(self.iteration)
            with torch.no_grad():
                together, apart = extract(probe), cat_features([extract(x) for x in probe.split(2)])
            pairs = ([(together[n], apart[n]) for n in together] if isinstance(together, Mapping)
                     else [(together, apart)])
            independent = all(torch.allclose(a, b, rtol=1e-4, atol=1e-5) for a, b in pairs)
        return devices.default_forward_batch(self.device, spec.height, spec.width, independent)

    def _features(self, extract: Callable[[Tensor], Features], images: Tensor, batch: int | None = None
                  ) -> Features:
        if self.cfg.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.amp):
            if batch is None or len(images) <= batch:
                return map_features(Tensor.float, extract(images))
            return map_features(Tensor.float, cat_features([extract(x) for x in images.split(batch)]))

    def _step_objective(self) -> None:
        """A :class:`~distillkit.interfaces.LearnableObjective`'s own step, after the images'. Under torchrun each
        rank saw only its classes' losses: the gradients are summed over the ranks first, so every rank takes
        the same step and keeps the same parameters."""
        if self.world.active:
            sum_gradients(self.objective.parameters())
        with self.checks.blame("objective", "step"):
            self.objective.step()

    def _call_extras(self, part: Sequence[int]) -> dict[str, object]:
        """What the objective's ``__call__`` declares beyond the features: ``classes``, the block's ``(K,)`` int64
        ids (a cached device constant), and ``iteration``."""
        extras: dict[str, object] = {}
        if "classes" in self._objective_takes:
            extras["classes"] = devices.constant(tuple(part), torch.long, self.device)
        if "iteration" in self._objective_takes:
            extras["iteration"] = self.iteration
        return extras
