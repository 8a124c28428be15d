"""Running a distillation into a run directory: the loop with its logs, checkpoints and signals.

:func:`distill` checks everything that can fail on bad input before the first write, then drives
:class:`~distillkit.condense.Condenser` iteration by iteration (:func:`run_loop`): the loss is read
back only at log intervals, a checkpoint is written at checkpoint intervals, SIGINT/SIGTERM finish
the iteration and write a checkpoint, and the artifact is written at the end. Which file is which
is :class:`~distillkit.rundir.RunDir`'s business.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import threading
import warnings
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import Tensor

from distillkit import registry
from distillkit.artifact import CHECKPOINT_FORMAT, FORMAT_VERSION, atomic_save, atomic_write_json, save_synthetic
from distillkit.condense import STREAMS, Condenser
from distillkit.config import RunConfig
from distillkit.data import data_context, load_split
from distillkit.devices import device_for_rank, set_deterministic
from distillkit.distributed import World, any_across, sum_across, world as join_world
from distillkit.errors import NonFiniteLossError
from distillkit.rundir import RunDir


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
            pending.append((it, condenser.run_iteration()))
            done = condenser.iteration
            at_checkpoint = checkpoint is not None and (done % cfg.checkpoint_every == 0 or done == cfg.iterations)
            at_log = done % cfg.log_every == 0 or at_checkpoint or done == cfg.iterations
            last = None
            if at_log:
                last = _flush(pending, log, condenser.real.spec.num_classes, condenser.world)
                pending.clear()
            on_progress(done, last)  # before the stop is decided: a signal taken while reporting stops this iteration
            # decided once, here; under torchrun the ranks agree at log intervals (collectives stay in step) and a
            # request waits for the next one instead of being dropped
            if condenser.world.active:
                stopping = at_log and any_across(stop["requested"], condenser.device)
            else:
                stopping = stop["requested"]
            if stopping and pending:  # alone, off a log interval: the log must hold these lines before the checkpoint
                _flush(pending, log, condenser.real.spec.num_classes, condenser.world)
                pending.clear()
            if checkpoint is not None and (at_checkpoint or stopping):
                if log:
                    with _naming(log):
                        os.fsync(log.fileno())
                save_checkpoint(condenser, checkpoint, log.tell() if log else 0)
                global_rng = _check_global_rng(global_rng, condenser.device)
            if stopping:
                raise Interrupted(done, stop["signum"])
    finally:
        if log:
            with _naming(log):  # closing flushes what a full disk refused before
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
    with _naming(log) if log else contextlib.nullcontext():
        for (it, _), value in zip(pending, values):
            if not math.isfinite(value):
                raise NonFiniteLossError(f"loss became {value} at iteration {it}; the run stopped and the last good "
                                         f"checkpoint was kept. The learning rate is part of the recipe, so start a "
                                         f"new run with a lower --lr-img (--overwrite replaces this one) or check "
                                         f"the data")
            if log:
                log.write(json.dumps({"iteration": it, "loss": value / num_classes}) + "\n")
        if log:
            log.flush()
    return values[-1] / num_classes


@contextlib.contextmanager
def _naming(log) -> Iterator[None]:
    """Give a failed write to the open loss log the log's name (the OSError of a write names no file), so a
    full disk is reported as one line saying which file could not be written."""
    try:
        yield
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror, log.name) from exc


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


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
    cfg.check_names()
    set_deterministic(cfg.deterministic)
    run = RunDir(run_dir)
    device = device_for_rank(device)
    world = join_world(device)
    if world.is_main and not resume:
        run.check_new(overwrite)  # before locking too: a refused folder (not a run) gets no lock file in it
    with run.writer("distill") if world.is_main else contextlib.nullcontext():  # rank 0 writes, so rank 0 locks
        if world.is_main and not resume:
            run.check_new(overwrite)  # again under the lock: another writer may have filled it meanwhile
        return _distill_locked(cfg, run, world, device, data_root, resume, overwrite, on_progress)


def _distill_locked(cfg: RunConfig, run: RunDir, world: World, device: torch.device, data_root: Path, resume: bool,
                    overwrite: bool, on_progress: Callable[[int, float | None], None]) -> Path:
    dataset = registry.create("datasets", cfg.dataset, **cfg.dataset_options)
    real = load_split(dataset, data_root, train=True, device="cpu")
    owned = world.owned(real.spec.num_classes)
    data = data_context(dataset, cfg.dataset_options, data_root, device, train=real)  # every class, every rank
    condenser = Condenser(cfg, real.restricted(owned, device), device, owned, world, data)
    state = run.resume_state(cfg) if resume else None
    if state is not None:
        condenser.load_state_dict(state)
    condenser.preflight()
    if world.is_main:
        if overwrite:
            run.clear()
        run.create()
    else:
        run.path.mkdir(parents=True, exist_ok=True)
    if state is not None:
        if world.is_main:
            run.truncate_losses(int(state["log_position"]), condenser.iteration)
    else:
        condenser.initialize(real)  # every rank initialises every class identically from the full split
        if world.is_main:
            atomic_write_json(cfg.as_dict(), run.config)
            run.losses.unlink(missing_ok=True)
        save_checkpoint(condenser, run.checkpoint, 0)
    del real
    on_progress(condenser.iteration, None)
    run_loop(condenser, checkpoint=run.checkpoint, loss_log=run.losses, on_progress=on_progress)

    param, spec = condenser.param, condenser.real.spec
    if world.active:
        param.load_state_dict(condenser.merged_state_dict()["parameterization"])
    if world.is_main:
        with torch.no_grad():
            decoded = param.decode(range(spec.num_classes))
        labels = torch.arange(spec.num_classes).repeat_interleave(decoded.shape[1])
        stored = param.stored()
        save_synthetic(run.synthetic, images=decoded.flatten(0, 1), labels=labels, stored=stored,
                       stored_labels=torch.arange(spec.num_classes).repeat_interleave(
                           stored.shape[0] // spec.num_classes),
                       spec=spec, class_names=condenser.real.class_names, parameterization=cfg.parameterization,
                       parameterization_state=param.state_dict(), config=cfg.as_dict(), dataset=dataset.name,
                       method=cfg.method, iterations_done=condenser.iteration)
    if world.active:
        torch.distributed.barrier()
    return run.synthetic
