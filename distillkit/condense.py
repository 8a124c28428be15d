"""The condense loop: the one training loop for synthetic data, serving every method.

Per iteration::

    parameterization.project()                       # e.g. clamp to [0, 1]
    extract = sampler.extractor(it)                  # new or reused network
    real features of every class in ONE batched forward (no autograd)
    syn = parameterization.decode(all classes)       # "class" schedule: each class where its own step finds it
    same augmentation parameters as each class's real batch
    loss = objective(real features, synthetic features).sum()
    one backward; one SGD step ("iteration", DM) or the closed form of one step per class ("class", M3D)

Every random draw comes from a generator derived from ``(seed, stream,
iteration, class)``, so a run is reproducible, resumes bit-exactly from a
checkpoint, and gives the same per-class result whatever subset of classes a
process owns (class sharding under torchrun).

Checkpoints therefore hold no RNG state: the parameterization tensors, the
optimizer state (momentum), the iteration and the loss-log position are the
whole state, because every stream of iteration ``it`` is recomputed from
``(seed, keys)`` (see :mod:`distillkit.seeding`): the real batches, the
augmentation parameters and the synthetic subsets here; the initialisation;
the sampler's networks, built inside :func:`~distillkit.seeding.seeded`, which
restores torch's global generator afterwards. A checkpoint records the seed and
this scheme (``STREAMS``) so it describes itself. Nothing may draw from torch's
global generators, whose state a checkpoint does not hold: the loop checks this
at every checkpoint and warns if a component did.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import os
import shutil
import signal
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import Tensor

from distillkit import registry
from distillkit.artifact import CHECKPOINT_FORMAT, FORMAT_VERSION, atomic_save, safe_load
from distillkit.augment import Augment, AugmentParams
from distillkit.config import RunConfig
from distillkit.data import RealData
from distillkit.distributed import World, any_across, merge_state, sum_across
from distillkit.errors import NonFiniteLossError, UsageError
from distillkit.interfaces import Objective, Parameterization, Sampler
from distillkit.seeding import generator
from distillkit.zoo import cache_sized_batch

#: What a checkpoint records instead of RNG states: how every random stream is derived.
STREAMS = {
    "derivation": "distillkit.seeding.derive_seed(seed, *keys): blake2b-64 of 'seed/key/...' seeds a CPU "
                  "torch.Generator; nothing draws from torch's global generators",
    "loop": ["init", "real/ITERATION/CLASS", "augment/ITERATION/CLASS", "syn/ITERATION/CLASS"],
    "components": "samplers and parameterizations derive theirs from the same seed with their own keys "
                  "(random-convnet: model/encoder/ITERATION)",
}


def build_components(cfg: RunConfig, real: RealData, device: torch.device
                     ) -> tuple[Objective, Parameterization, Sampler, Augment]:
    spec = real.spec
    objective = registry.create("objectives", cfg.objective, **cfg.objective_options)
    param = registry.create("parameterizations", cfg.parameterization, spec=spec, ipc=cfg.ipc, device=device,
                            **cfg.parameterization_options)
    sampler = registry.create("samplers", cfg.sampler, spec=spec, seed=cfg.seed, device=device, **cfg.sampler_options)
    return objective, param, sampler, Augment(cfg.augment, cfg.augment_strategy)


@dataclass
class Condenser:
    """State of one distillation: components, optimizer, iteration counter."""

    cfg: RunConfig
    real: RealData
    device: torch.device
    owned: Sequence[int] | None = None  # classes this process optimises (None: all)
    world: World = field(default_factory=World)
    iteration: int = 0
    objective: Objective = field(init=False)
    param: Parameterization = field(init=False)
    sampler: Sampler = field(init=False)
    augment: Augment = field(init=False)

    def __post_init__(self) -> None:
        self.objective, self.param, self.sampler, self.augment = build_components(self.cfg, self.real, self.device)
        num_classes = self.real.spec.num_classes
        self.classes = list(range(num_classes)) if self.owned is None else sorted(self.owned)
        smallest = min(self.real.split_counts)
        if self.cfg.ipc > smallest:
            raise UsageError(f"--ipc {self.cfg.ipc} is larger than the smallest class ({smallest} images)")
        self.batch_real = min(self.cfg.batch_real, smallest)
        if self.cfg.amp and self.device.type == "cpu" and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
            raise UsageError("--amp on this CPU: it has no bf16 instructions (AVX512-BF16 or AMX), so bf16 would be "
                             "emulated and slower than float32; leave --amp off here")
        self.optimizer = torch.optim.SGD(self.param.parameters(), lr=self.cfg.lr_img, momentum=self.cfg.momentum)

    # -- state -----------------------------------------------------------
    def initialize(self, real: RealData | None = None) -> None:
        """Initialise from ``real`` (default: this process's data; a class shard passes the full split)."""
        self.param.init(real if real is not None else self.real, generator(self.cfg.seed, "init"))

    def state_dict(self) -> dict:
        # a snapshot: the optimizer's own state_dict shares its live momentum buffers
        return {"parameterization": {k: v.detach().clone() for k, v in self.param.state_dict().items()},
                "optimizer": copy.deepcopy(self.optimizer.state_dict()), "iteration": self.iteration}

    def merged_state_dict(self) -> dict:
        """:meth:`state_dict` with every rank's classes filled in (the same as ``state_dict`` in one process)."""
        state = self.state_dict()
        if self.world.active:
            state = merge_state(state, self.classes, self.real.spec.num_classes)
        return state

    def preflight(self) -> None:
        """Embed two real images with this iteration's extractor, so a model that cannot take the
        dataset's channels or size fails with a clear message before any file is written."""
        try:
            with torch.no_grad():
                self.sampler.extractor(self.iteration)(self.real.images[:2])
        except (RuntimeError, ValueError) as exc:
            spec, options = self.real.spec, dict(self.cfg.sampler_options)
            raise UsageError(f"sampler {self.cfg.sampler!r} {options} cannot embed {self.cfg.dataset}'s "
                             f"{spec.channels}x{spec.height}x{spec.width} images: "
                             f"{str(exc).strip().splitlines()[0][:200]}") from exc

    def load_state_dict(self, state: dict) -> None:
        self.param.load_state_dict(state["parameterization"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.iteration = int(state["iteration"])

    # -- one iteration ---------------------------------------------------
    def _augment_params(self, it: int, classes: Sequence[int]) -> AugmentParams:
        h, w = self.real.spec.height, self.real.spec.width
        drawn = [self.augment.draw(1, generator(self.cfg.seed, "augment", it, c), h, w) for c in classes]
        return AugmentParams(**{k: torch.cat([getattr(p, k) for p in drawn]) for k in drawn[0].__dict__})

    def _syn_subset(self, syn: Tensor, it: int, classes: Sequence[int]) -> Tensor:
        cap = self.cfg.batch_syn
        if cap is None or syn.shape[1] <= cap:
            return syn
        picks = torch.stack([torch.randperm(syn.shape[1], generator=generator(self.cfg.seed, "syn", it, c))[:cap]
                             for c in classes]).to(syn.device)
        return torch.stack([s[p] for s, p in zip(syn, picks)])

    def step(self) -> Tensor:
        """Run iteration ``self.iteration``; returns the summed loss over owned classes (a device scalar)."""
        it, seed, classes = self.iteration, self.cfg.seed, self.classes
        self.param.project()
        extract = self.sampler.extractor(it)
        n_r = self.batch_real
        params = self._augment_params(it, classes)
        chunk = self.cfg.real_chunk or len(classes)
        with torch.no_grad():  # real features: one batched forward per chunk of classes (all by default)
            pieces = []
            for start in range(0, len(classes), chunk):
                part = classes[start:start + chunk]
                real = torch.cat([self.real.sample(c, n_r, generator(seed, "real", it, c)) for c in part])
                group = torch.arange(start, start + len(part)).repeat_interleave(n_r)
                pieces.append(self._features(extract, self.augment.apply(real, params, group),
                                             self.forward_batch))
            real_features = torch.cat(pieces).view(len(classes), n_r, -1)

        if self.cfg.step == "class":
            self._move_to_class_steps()
        syn = self._syn_subset(self.param.decode(classes), it, classes)
        k, n_s = syn.shape[:2]
        syn = self.augment.apply(syn.flatten(0, 1), params, torch.arange(k).repeat_interleave(n_s))
        loss = self.objective(real_features, self._features(extract, syn, self.forward_batch).view(k, n_s, -1)).sum()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.step == "class":
            self._finish_class_steps()
        else:
            self.optimizer.step()
        self.iteration += 1
        return loss.detach()

    # The "class" schedule (M3D's reference) takes one SGD step per class, in class order, on one optimizer
    # over all images: class c's rows first drift c times on momentum alone, then take their gradient step,
    # then drift C-1-c more times. Class losses are independent and momentum SGD is linear, so the whole
    # sequence has a closed form: move every class to where its own step finds it, take all class gradients
    # in ONE batched forward/backward, then apply the rest of the sequence. Same mathematics as C separate
    # steps (tested against them), one pass instead of C; a class's result never depends on which other
    # classes a process owns.
    def _class_coefficients(self, rows: int, like: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
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
        """Images per extractor call, real and synthetic (None: all at once).

        ``--forward-batch`` if given. Otherwise, on a CPU, :func:`~distillkit.zoo.cache_sized_batch`
        when the extractor embeds every image on its own. Measured on a 2-core CPU, bit-identical
        results: DM's iteration 1.7-2.5x faster (real features), M3D's at IPC 50 another 1.4x (its
        4 x IPC decoded images, forward and backward). A batch-dependent extractor (batch-norm
        statistics, dropout) keeps one call, and so do accelerators, where one large launch is the
        fast shape.
        """
        if self.cfg.forward_batch is not None:
            return self.cfg.forward_batch
        if self.device.type != "cpu":
            return None
        probe = self.real.images[:4]
        extract = self.sampler.extractor(self.iteration)
        with torch.no_grad():
            together, apart = extract(probe), torch.cat([extract(x) for x in probe.split(2)])
        if not torch.allclose(together, apart, rtol=1e-4, atol=1e-5):
            return None
        return cache_sized_batch(self.real.spec.height, self.real.spec.width)

    def _features(self, extract: Callable[[Tensor], Tensor], images: Tensor, batch: int | None = None) -> Tensor:
        if self.cfg.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.amp):
            if batch is None or len(images) <= batch:
                return extract(images).float()
            return torch.cat([extract(x) for x in images.split(batch)]).float()


# -- the run directory ----------------------------------------------------


class Interrupted(Exception):
    """SIGINT or SIGTERM (``signum``) arrived; a checkpoint was written at ``iteration``."""

    def __init__(self, iteration: int, signum: int = signal.SIGINT) -> None:
        super().__init__(iteration, signum)
        self.iteration, self.signum = iteration, int(signum)


def save_checkpoint(condenser: Condenser, path: Path, log_position: int) -> None:
    """Write the whole state (merged across ranks when class-sharded; rank 0 writes)."""
    state = condenser.merged_state_dict()
    if condenser.world.is_main:
        atomic_save({"format": CHECKPOINT_FORMAT, "format_version": FORMAT_VERSION, "config": condenser.cfg.as_dict(),
                     "seed": condenser.cfg.seed, "streams": STREAMS, "log_position": log_position, **state}, path)


def load_checkpoint(path: Path) -> dict:
    return safe_load(path, CHECKPOINT_FORMAT)


def run_loop(condenser: Condenser, *, checkpoint: Path | None, loss_log: Path | None,
             on_progress: Callable[[int, float | None], None] = lambda it, loss: None) -> None:
    """Iterate to ``cfg.iterations``, logging losses and checkpointing at intervals.

    The host reads the loss back only at log and checkpoint intervals (no
    per-iteration device sync). A non-finite loss stops the run before the next
    checkpoint is written, so the last good checkpoint survives. SIGINT or SIGTERM
    finishes the current iteration, writes a checkpoint and raises
    :class:`Interrupted`. The log is fsynced before each checkpoint, so a
    checkpoint never points past the end of the log.
    """
    cfg = condenser.cfg
    pending: list[tuple[int, Tensor]] = []
    stop = {"requested": False, "signum": signal.SIGINT}
    global_rng = _global_rng_state(condenser.device)

    def request_stop(signum, frame):  # noqa: ARG001
        stop["requested"], stop["signum"] = True, signum

    signals = (signal.SIGINT, signal.SIGTERM)
    previous = {s: signal.signal(s, request_stop) for s in signals} if _main_thread() else {}
    log = open(loss_log, "a", encoding="utf-8") if loss_log and condenser.world.is_main else None
    try:
        while condenser.iteration < cfg.iterations:
            it = condenser.iteration
            pending.append((it, condenser.step()))
            done = condenser.iteration
            at_checkpoint = checkpoint is not None and (done % cfg.checkpoint_every == 0 or done == cfg.iterations)
            at_log = done % cfg.log_every == 0 or at_checkpoint or done == cfg.iterations
            if condenser.world.active:  # ranks agree on stopping at log intervals, so collectives stay in step
                stop["requested"] = at_log and any_across(stop["requested"], condenser.device)
            if at_log or stop["requested"]:
                last = _flush(pending, log, condenser.real.spec.num_classes, condenser.world)
                pending.clear()
                on_progress(done, last)
            else:
                on_progress(done, None)
            if checkpoint is not None and (at_checkpoint or stop["requested"]):
                if log:
                    os.fsync(log.fileno())
                save_checkpoint(condenser, checkpoint, log.tell() if log else 0)
                global_rng = _check_global_rng(global_rng, condenser.device)
            if stop["requested"]:
                raise Interrupted(done, stop["signum"])
    finally:
        if log:
            log.close()
        for s, handler in previous.items():
            signal.signal(s, handler)


def _global_rng_state(device: torch.device) -> list[Tensor]:
    states = [torch.random.get_rng_state()]
    if device.type == "cuda":
        states.append(torch.cuda.get_rng_state(device))
    return states


def _check_global_rng(before: list[Tensor], device: torch.device) -> list[Tensor]:
    """Warn when a component drew from torch's global generators, which checkpoints do not hold."""
    now = _global_rng_state(device)
    if any(not torch.equal(a, b) for a, b in zip(before, now)):
        warnings.warn("a component drew from torch's global random generator: this run is not reproducible and "
                      "will not resume exactly; derive its randomness with distillkit.seeding", RuntimeWarning,
                      stacklevel=2)
    return now


def _flush(pending: list[tuple[int, Tensor]], log, num_classes: int, world: World) -> float | None:
    if not pending:
        return None
    losses = torch.stack([loss for _, loss in pending])
    values = (sum_across(losses) if world.active else losses).tolist()  # one host sync per interval
    for (it, _), value in zip(pending, values):
        if not math.isfinite(value):
            raise NonFiniteLossError(f"loss became {value} at iteration {it}; the run stopped and the last good "
                                     f"checkpoint was kept (lower --lr-img or check the data)")
        if log:
            log.write(json.dumps({"iteration": it, "loss": value / num_classes}) + "\n")
    if log:
        log.flush()
    return values[-1] / num_classes


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _resume_state(cfg: RunConfig, checkpoint: Path, loss_log: Path) -> dict:
    """The checkpoint to resume from, after checking it belongs to ``cfg`` and to the loss log beside it."""
    state = load_checkpoint(checkpoint)
    try:  # through RunConfig, so fields added since the run started take their defaults on both sides
        same = RunConfig.from_dict(state["config"]).recipe() == cfg.recipe()
    except (KeyError, TypeError):
        same = False
    if not same:
        raise UsageError(f"{checkpoint} was written by a different config than the run's config.json; "
                         f"the run directory was altered, start a new run")
    position = int(state["log_position"])
    size = loss_log.stat().st_size if loss_log.exists() else 0
    if size < position:
        raise UsageError(f"{loss_log} has {size} bytes but the checkpoint follows it to byte {position}: "
                         f"the loss log was truncated or replaced; restore it or start a new run")
    return state


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available on this machine; use --device cpu or auto")
    try:
        return torch.device(name)
    except RuntimeError:
        raise UsageError(f"unknown --device {name!r}; choose auto, cpu, cuda or cuda:N") from None


def distill(cfg: RunConfig, run_dir: Path, *, device: torch.device, data_root: Path, resume: bool,
            overwrite: bool = False,
            on_progress: Callable[[int, float | None], None] = lambda it, loss: None) -> Path:
    """Run (or resume) a distillation into ``run_dir``; returns the artifact path.

    Every check that can fail on bad input (names, data files, IPC, the
    extractor on the dataset's images, the checkpoint) runs before the first
    write, so a refused run leaves an existing ``run_dir`` untouched; with
    ``overwrite`` the old directory is removed only then. Resuming a run that
    was killed before its first checkpoint starts it afresh (same result).

    Under torchrun the classes are sharded over the ranks (see
    :mod:`distillkit.distributed`); rank 0 writes every file.
    """
    from distillkit.artifact import (CHECKPOINT_FILE, CONFIG_FILE, LOSS_LOG, SYNTHETIC_FILE, atomic_write_json,
                                     save_synthetic)
    from distillkit.data import load_split
    from distillkit.distributed import device_for_rank, world as join_world

    cfg.check_names()
    device = device_for_rank(device)
    world = join_world(device)
    dataset = registry.create("datasets", cfg.dataset, **cfg.dataset_options)
    real = load_split(dataset, data_root, train=True, device="cpu")
    owned = world.owned(real.spec.num_classes)
    condenser = Condenser(cfg, real.restricted(owned, device), device, owned, world)
    checkpoint, loss_log = run_dir / CHECKPOINT_FILE, run_dir / LOSS_LOG
    state = _resume_state(cfg, checkpoint, loss_log) if resume and checkpoint.exists() else None
    if state is not None:
        condenser.load_state_dict(state)
    condenser.preflight()
    if overwrite and world.is_main and run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if world.is_main:  # temporary files of atomic writes a killed run left behind
        for stale in run_dir.glob(".*.tmp"):
            stale.unlink(missing_ok=True)
    if state is not None:
        if world.is_main:
            with open(loss_log, "a+b") as fh:  # drop log lines written after the checkpoint
                fh.truncate(int(state["log_position"]))
    else:
        condenser.initialize(real)  # every rank initialises every class identically from the full split
        if world.is_main:
            atomic_write_json(cfg.as_dict(), run_dir / CONFIG_FILE)
            loss_log.unlink(missing_ok=True)
        save_checkpoint(condenser, checkpoint, 0)
    del real
    on_progress(condenser.iteration, None)
    run_loop(condenser, checkpoint=checkpoint, loss_log=loss_log, on_progress=on_progress)

    param, spec = condenser.param, condenser.real.spec
    if world.active:
        param.load_state_dict(condenser.merged_state_dict()["parameterization"])
    path = run_dir / SYNTHETIC_FILE
    if world.is_main:
        with torch.no_grad():
            decoded = param.decode(range(spec.num_classes))
        labels = torch.arange(spec.num_classes).repeat_interleave(decoded.shape[1])
        stored = param.stored()
        save_synthetic(path, images=decoded.flatten(0, 1), labels=labels, stored=stored,
                       stored_labels=torch.arange(spec.num_classes).repeat_interleave(
                           stored.shape[0] // spec.num_classes),
                       spec=spec, class_names=condenser.real.class_names, parameterization=cfg.parameterization,
                       parameterization_state=param.state_dict(), config=cfg.as_dict(), dataset=dataset.name,
                       method=cfg.method, iterations_done=condenser.iteration)
    if world.active:
        torch.distributed.barrier()
    return path
