"""The run directory: every file a run holds, and the rules for creating, replacing and resuming one.

================  ============================================================
file              written by
================  ============================================================
``config.json``   ``distill``: the resolved :class:`~distillkit.config.RunConfig`
``losses.jsonl``  ``distill``: one line per iteration, flushed at log intervals
``checkpoint.pt`` ``distill``: the whole state at checkpoint intervals
``synthetic.pt``  ``distill``: the artifact (:mod:`distillkit.artifact`)
``eval.json``     ``evaluate``: every result row with its protocol settings
``eval.csv``      ``evaluate``: the same rows as a table
``grid.png``      ``show`` (default output)
``plot.png``      ``plot`` (default output)
================  ============================================================

Every other module asks :class:`RunDir` for these paths; none spells a file name.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Mapping

from distillkit.artifact import CHECKPOINT_FORMAT, SyntheticSet, load_synthetic, safe_load
from distillkit.config import SPEED_FIELDS, RunConfig, parse_sets
from distillkit.errors import UsageError

CONFIG = "config.json"
LOSSES = "losses.jsonl"
CHECKPOINT = "checkpoint.pt"
SYNTHETIC = "synthetic.pt"
EVAL_JSON = "eval.json"
EVAL_CSV = "eval.csv"
GRID = "grid.png"
PLOT = "plot.png"

#: the files a run writes, in the order above
RUN_FILES = (CONFIG, LOSSES, CHECKPOINT, SYNTHETIC, EVAL_JSON, EVAL_CSV, GRID, PLOT)
#: the files that make up the run itself (exports and pictures must never replace them)
RECORD_FILES = (CONFIG, LOSSES, CHECKPOINT, SYNTHETIC, EVAL_JSON, EVAL_CSV)


@dataclass(frozen=True)
class RunDir:
    """One run directory (it need not exist yet)."""

    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    @property
    def config(self) -> Path:
        return self.path / CONFIG

    @property
    def losses(self) -> Path:
        return self.path / LOSSES

    @property
    def checkpoint(self) -> Path:
        return self.path / CHECKPOINT

    @property
    def synthetic(self) -> Path:
        return self.path / SYNTHETIC

    @property
    def eval_json(self) -> Path:
        return self.path / EVAL_JSON

    @property
    def eval_csv(self) -> Path:
        return self.path / EVAL_CSV

    @property
    def grid(self) -> Path:
        return self.path / GRID

    @property
    def plot(self) -> Path:
        return self.path / PLOT

    def holds_record(self, file: Path) -> bool:
        """Whether ``file`` is one of this run's own record files (see :data:`RECORD_FILES`)."""
        file = Path(file)
        return file.name in RECORD_FILES and file.resolve().parent == self.path.resolve()

    # -- creating and replacing ------------------------------------------
    def check_new(self, overwrite: bool) -> None:
        """Refuse to start a fresh run here unless the directory is new or empty, or ``overwrite`` replaces a run."""
        if not (self.path.exists() and any(self.path.iterdir())):
            return
        if not overwrite:
            raise UsageError(f"run directory {self.path} already exists; pass --resume {self.path} to continue it "
                             f"or --overwrite to replace it")
        if not self.config.exists():
            raise UsageError(f"--overwrite refused: {self.path} is not a distillkit run directory (no {CONFIG})")

    def clear(self) -> None:
        """Remove the old run (after :meth:`check_new` with ``overwrite`` and every check of the new run)."""
        if self.path.exists():
            shutil.rmtree(self.path)

    def create(self) -> None:
        """Make the directory and drop the temporary files of atomic writes a killed run left behind."""
        self.path.mkdir(parents=True, exist_ok=True)
        for stale in self.path.glob(".*.tmp"):
            stale.unlink(missing_ok=True)

    # -- resuming --------------------------------------------------------
    def recorded_config(self, flag: str = "--resume") -> RunConfig:
        if not self.config.exists():
            raise UsageError(f"{flag} {self.path}: no {CONFIG} there; is it a distillkit run directory?")
        try:
            return RunConfig.from_dict(json.loads(self.config.read_text()))
        except (json.JSONDecodeError, TypeError) as exc:
            raise UsageError(f"{flag} {self.path}: {self.config} is damaged ({exc})") from None

    def resumed_config(self, given: Mapping[str, Any], sets: tuple[str, ...], out_dir: Path | None) -> RunConfig:
        """The recorded config with the speed settings of ``given`` (CLI values, None = not given) applied.

        Any other given value that differs from the record is a contradiction: one error lists them all.
        """
        cfg = self.recorded_config()
        speed = {k: v for k, v in given.items() if k in SPEED_FIELDS and v is not None}
        recorded = cfg.as_dict()
        clashes = [f"--{k.replace('_', '-')} {v!r} (recorded {recorded[k]!r})"
                   for k, v in given.items() if v is not None and v != recorded[k] and k not in speed]
        for component, options in parse_sets(sets).items():
            for key, value in options.items():
                if recorded[f"{component}_options"].get(key) != value:
                    clashes.append(f"--set {component}.{key}={value!r}")
        if out_dir is not None and Path(out_dir) != self.path:
            clashes.append(f"--out {out_dir}")
        if clashes:
            raise UsageError(f"--resume {self.path} keeps the recorded config; these flags contradict it: "
                             f"{'; '.join(clashes)}")
        return replace(cfg, **speed)  # speed settings may change on resume; config.json keeps the first ones

    def resume_state(self, cfg: RunConfig) -> dict | None:
        """The checkpoint to resume from (None: the run never wrote one), after checking it belongs to
        ``cfg`` and to the loss log beside it."""
        if not self.checkpoint.exists():
            return None
        state = safe_load(self.checkpoint, CHECKPOINT_FORMAT)
        try:  # through RunConfig, so fields added since the run started take their defaults on both sides
            same = RunConfig.from_dict(state["config"]).recipe() == cfg.recipe()
        except (KeyError, TypeError):
            same = False
        if not same:
            raise UsageError(f"{self.checkpoint} was written by a different config than the run's {CONFIG}; "
                             f"the run directory was altered, start a new run")
        position = int(state["log_position"])
        size = self.losses.stat().st_size if self.losses.exists() else 0
        if size < position:
            raise UsageError(f"{self.losses} has {size} bytes but the checkpoint follows it to byte {position}: "
                             f"the loss log was truncated or replaced; restore it or start a new run")
        return state

    def truncate_losses(self, position: int) -> None:
        """Drop log lines written after the checkpoint being resumed."""
        with open(self.losses, "a+b") as fh:
            fh.truncate(position)


def load_run_synthetic(path: Path) -> SyntheticSet:
    """The artifact of a run directory, or the artifact file itself."""
    path = Path(path)
    if path.is_dir():
        run = RunDir(path)
        if not run.synthetic.exists():
            raise UsageError(f"{path} holds no {SYNTHETIC}: is it a finished distillkit run directory?")
        path = run.synthetic
    return load_synthetic(path)
