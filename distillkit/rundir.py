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

**Guarantees.** One writer at a time: ``distill`` (fresh, ``--resume``, ``--overwrite``) and
``evaluate`` hold an exclusive ``flock`` on ``.distillkit.lock`` for their whole life, so a second
writer is refused with the holder's pid, and a lock left by a killed process is free again at once
(the kernel drops it with the process). ``--overwrite`` removes a directory's contents only when it is
provably a run: its ``config.json`` parses as a run config and it holds nothing but the files above
(and the temporary files of their atomic writes); never the current directory or one of its parents.
The lock file itself survives, so a replaced run never changes hands.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import itertools
import json
import os
import re
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator, Mapping

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
LOCK = ".distillkit.lock"

#: the files a run writes, in the order above
RUN_FILES = (CONFIG, LOSSES, CHECKPOINT, SYNTHETIC, EVAL_JSON, EVAL_CSV, GRID, PLOT)
#: the files that make up the run itself (exports and pictures must never replace them)
RECORD_FILES = (CONFIG, LOSSES, CHECKPOINT, SYNTHETIC, EVAL_JSON, EVAL_CSV)
#: what atomic writes leave behind when killed (see distillkit.artifact.atomic_write_bytes)
_TEMPORARY = re.compile(r"^\.(?P<name>[^/]+)\.[^/.]+\.tmp$")


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
        file, here = Path(file), self.path.resolve()
        records = {here / name for name in RECORD_FILES}
        return (file.name in RECORD_FILES and file.parent.resolve() == here) or file.resolve() in records

    # -- one writer ------------------------------------------------------
    @contextlib.contextmanager
    def writer(self, command: str) -> Iterator[None]:
        """Hold this directory's exclusive writer lock for the block (creating the directory if needed).

        A second writer gets a :class:`UsageError` naming the holder. If the block fails and the
        directory was created here and holds only the lock, it is removed again, with the parent
        folders created for it: a refused command leaves nothing behind.
        """
        created = list(itertools.takewhile(lambda folder: not folder.exists(), (self.path, *self.path.parents)))
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path / LOCK, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as exc:
            raise UsageError(f"cannot create the run directory {self.path}: {exc.strerror}") from None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise
                holder = _holder_named_in(fd)
                raise UsageError(f"run directory {self.path} is in use by {holder}; wait for it to finish "
                                 f"(one writer per run directory)") from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"process {os.getpid()} ({command})\n".encode(), 0)
            try:
                yield
            except BaseException:
                if created and [p.name for p in self.path.iterdir()] == [LOCK]:
                    (self.path / LOCK).unlink()
                    with contextlib.suppress(OSError):  # a parent another process has written into since stays
                        for folder in created:  # the run directory first, then its new parents upwards
                            folder.rmdir()
                raise
        finally:
            os.close(fd)  # releases the lock; the file stays, so the next writer locks the same inode

    # -- creating and replacing ------------------------------------------
    def _foreign_entries(self) -> list[str]:
        """Entries that no run writes (a run directory holds only :data:`RUN_FILES`, the lock and temporaries)."""
        out = []
        for entry in sorted(self.path.iterdir()):
            temporary = _TEMPORARY.match(entry.name)
            known = entry.name in RUN_FILES or entry.name == LOCK or (temporary and temporary["name"] in RUN_FILES)
            if not known or not entry.is_file() or entry.is_symlink():
                out.append(entry.name + ("/" if entry.is_dir() else ""))
        return out

    def _holds_anything(self) -> bool:
        """Whether there is more here than the lock and temporaries (a run killed in its first write has nothing)."""
        return self.path.is_dir() and any(p.name != LOCK and not _TEMPORARY.match(p.name) for p in self.path.iterdir())

    def check_new(self, overwrite: bool) -> None:
        """Refuse to start a fresh run here unless the directory is new or empty, or ``overwrite`` replaces a run."""
        if self.path.exists() and not self.path.is_dir():
            raise UsageError(f"--out {self.path} is a file; a run directory is a folder")
        if not self._holds_anything():
            return
        if not overwrite:
            raise UsageError(f"run directory {self.path} already exists; pass --resume {self.path} to continue it "
                             f"or --overwrite to replace it")
        here, target = Path.cwd().resolve(), self.path.resolve()
        if target == here or target in here.parents:
            raise UsageError(f"--overwrite refused: {self.path} is the current directory or one of its parents")
        try:
            RunConfig.from_dict(json.loads(self.config.read_text()))
        except (OSError, ValueError, TypeError, UsageError) as exc:
            why = f"no {CONFIG}" if not self.config.exists() else f"its {CONFIG} is not a run config ({exc})"
            raise UsageError(f"--overwrite refused: {self.path} is not a distillkit run directory ({why})") from None
        foreign = self._foreign_entries()
        if foreign:
            raise UsageError(f"--overwrite refused: {self.path} holds files no run writes ({', '.join(foreign[:5])}); "
                             f"move them away or choose another --out")

    def clear(self) -> None:
        """Remove the old run's files (after :meth:`check_new` passed with ``overwrite``); the lock stays."""
        for entry in self.path.iterdir():
            if entry.name != LOCK:
                entry.unlink()

    def create(self) -> None:
        """Make the directory and drop the temporary files of atomic writes a killed run left behind."""
        self.path.mkdir(parents=True, exist_ok=True)
        for stale in self.path.iterdir():
            if _TEMPORARY.match(stale.name):
                stale.unlink(missing_ok=True)

    # -- resuming --------------------------------------------------------
    def recorded_config(self, flag: str = "--resume") -> RunConfig:
        if not self.config.exists():
            if self.path.is_dir() and not self._holds_anything():
                raise UsageError(f"{flag} {self.path}: nothing was recorded there yet (the run stopped before "
                                 f"writing {CONFIG}); start it again with the same command, without --resume")
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
        """The checkpoint to resume from (None: the run stopped before its first checkpoint and starts
        afresh, with the same result), after checking it belongs to ``cfg`` and to the loss log beside it.

        A missing loss log does not block a resume (:meth:`truncate_losses` marks the gap); a log
        shorter than the checkpoint says it was altered, and a missing checkpoint of a run that had
        progressed is reported instead of silently restarting it."""
        if not self.checkpoint.exists():
            if self.synthetic.exists() or (self.losses.exists() and self.losses.stat().st_size > 0):
                raise UsageError(f"--resume {self.path}: {CHECKPOINT} is missing although the run had progressed "
                                 f"({LOSSES} or {SYNTHETIC} exist); restore it, or start again with --overwrite")
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
        if not self.losses.exists():
            return state
        size = self.losses.stat().st_size
        if size < position:
            raise UsageError(f"{self.losses} has {size} bytes but the checkpoint follows it to byte {position}: "
                             f"the loss log was truncated or replaced; restore it or start a new run")
        return state

    def truncate_losses(self, position: int, iteration: int) -> None:
        """Drop log lines written after the checkpoint being resumed; a lost log restarts with a line
        saying which iterations it no longer holds."""
        if not self.losses.exists():
            self.losses.write_text(json.dumps({"lost_before_iteration": iteration}) + "\n", encoding="utf-8")
            return
        with open(self.losses, "a+b") as fh:
            fh.truncate(position)


    def picture_target(self, output: Path | None, kind: str, overwrite: bool) -> Path:
        """Where ``show`` (``kind="grid"``) or ``plot`` draws: ``output`` or the run's default picture; an
        existing file only with ``overwrite``, and never one of the run's own record files."""
        target = Path(output) if output is not None else getattr(self, kind)
        if self.holds_record(target):
            raise UsageError(f"-o {target} would replace the run's own {target.name}; choose another path")
        if target.is_dir():
            raise UsageError(f"-o {target} is a folder; give the path of a .png file")
        if target.exists() and not overwrite:
            raise UsageError(f"-o {target} exists; pass --overwrite to replace it")
        return target

    # -- evaluation reports ----------------------------------------------
    def check_report_target(self) -> None:
        """Before any training: this is a run directory whose ``eval.json`` can be written, and an
        existing one can be read (a damaged report is never replaced silently)."""
        if self.path.is_file():
            hint = f"give the run directory {self.path.parent}, not the file" if self.path.name == SYNTHETIC else \
                "give a distillkit run directory"
            raise UsageError(f"{self.path} is a file; evaluate writes {EVAL_JSON} into a run directory: {hint}")
        if not self.path.is_dir():
            raise UsageError(f"{self.path} is not a directory; give a distillkit run directory")
        if not self.synthetic.exists():
            raise UsageError(f"{self.path} holds no {SYNTHETIC}: is it a finished distillkit run directory?")
        try:
            with tempfile.TemporaryFile(dir=self.path):
                pass
        except OSError as exc:
            raise UsageError(f"cannot write results into {self.path} ({exc.strerror}); evaluate a copy of the run "
                             f"in a writable place") from None
        self.read_report()

    def read_report(self) -> dict[str, Any]:
        """The current ``eval.json`` (an empty report when there is none)."""
        if not self.eval_json.exists():
            return {"results": []}
        try:
            report = json.loads(self.eval_json.read_text(encoding="utf-8"))
            if not isinstance(report, dict) or not isinstance(report.get("results"), list):
                raise ValueError("no list of results")
        except (OSError, ValueError) as exc:
            raise UsageError(f"{self.eval_json} is damaged ({type(exc).__name__}: {str(exc)[:120]}); it is not "
                             f"replaced: move it away and evaluate again") from None
        return report


def load_run_synthetic(path: Path) -> SyntheticSet:
    """The artifact of a run directory, or the artifact file itself."""
    path = Path(path)
    if path.is_dir():
        run = RunDir(path)
        if not run.synthetic.exists():
            raise UsageError(f"{path} holds no {SYNTHETIC}: is it a finished distillkit run directory?")
        path = run.synthetic
    return load_synthetic(path)


def _holder_named_in(fd: int) -> str:
    """The holder the lock file names; a holder that has just taken the lock gets a moment to write its name."""
    for _ in range(40):
        holder = os.pread(fd, 200, 0).decode(errors="replace").strip()
        if holder:
            return holder
        time.sleep(0.025)  # the winner writes its name right after flock; 1 s covers a loaded machine
    return "another process"
