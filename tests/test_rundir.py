"""Run directories cannot be lost or mixed (issue 14): one writer at a time, ``--overwrite`` only of a
provable run, ``show``/``plot`` never clobber, ``evaluate`` checks its output before training and keeps
every finished model, and every bad value or file-system failure is one line (exit 2, 1 or 130).

Concurrency uses real processes; a full disk and a read-only run directory use a real tmpfs where this
process may mount one (root), else the file system's refusal is simulated where distillkit meets it (an
atomic write, the writability probe); the rest of such a test is the same real run either way."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Iterator

import pytest
import torch

from distillkit import artifact
from distillkit.artifact import ARTIFACT_FORMAT, CHECKPOINT_FORMAT, safe_load
from distillkit.config import RunConfig
from distillkit.errors import UsageError
from distillkit.rundir import LOCK, RunDir
from tests.conftest import DATA, ROOT, TEST_PLUGINS, refused, run_cli, snapshot

TINY = ("--dataset", "mnist", "--ipc", "1", "--batch-real", "8", "--iterations", "2", "--device", "cpu",
        "--set", "sampler.model=convnet3_w32")


@pytest.fixture(autouse=True)
def _single_thread(one_thread):
    """Tiny batches on a shared machine: one intra-op thread (conftest's ``one_thread``)."""


def _copy(run: Path, tmp_path: Path, name: str = "run") -> Path:
    shutil.copytree(run, tmp_path / name)
    return tmp_path / name


@pytest.fixture
def existing(tiny_dm_run: Path, tmp_path: Path) -> Iterator[Path]:
    """A copy of a finished run; the test's refused commands must leave it byte-for-byte unchanged."""
    run_dir = _copy(tiny_dm_run, tmp_path, "existing")
    before = snapshot(run_dir)
    yield run_dir
    assert snapshot(run_dir) == before


@pytest.fixture(scope="module")
def progressed(tiny_dm_run: Path, tmp_path_factory) -> Path:
    """``tiny_dm_run``'s recipe (4 iterations) interrupted at iteration 2: a checkpoint, a log, no artifact."""
    from distillkit.runner import Interrupted, distill

    cfg = RunConfig.from_dict(json.loads(RunDir(tiny_dm_run).config.read_text()))
    run_dir = tmp_path_factory.mktemp("progressed") / "run"

    def interrupt_at_two(iteration: int, loss: float | None) -> None:
        if iteration == 2:
            signal.raise_signal(signal.SIGINT)  # the loop finishes the iteration and checkpoints

    with pytest.raises(Interrupted):
        distill(cfg, run_dir, device=torch.device("cpu"), data_root=DATA, resume=False, on_progress=interrupt_at_two)
    assert safe_load(RunDir(run_dir).checkpoint, CHECKPOINT_FORMAT)["iteration"] == 2
    logged = [json.loads(line)["iteration"] for line in RunDir(run_dir).losses.read_text().splitlines()]
    assert logged == [0, 1]  # off a log interval: the interrupt flushed the lines its checkpoint follows
    assert not RunDir(run_dir).synthetic.exists()
    return run_dir


def _error_line(stderr: str) -> str:
    """The one ``Error:`` line a failed command ends with (and no traceback)."""
    errors = [line for line in stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and stderr.rstrip().endswith(errors[0]) and "Traceback" not in stderr, stderr
    return errors[0]


# -- overwrite: only a provable run, never the current directory ------------------------------


def test_overwrite_refuses_a_run_directory_holding_files_no_run_writes(tiny_dm_run: Path, tmp_path: Path):
    run_dir = _copy(tiny_dm_run, tmp_path)
    (run_dir / "notes.txt").write_text("mine")
    (run_dir / "figures").mkdir()
    before = snapshot(run_dir)
    refused("distill", *TINY, "--out", run_dir, "--overwrite",
            says=("--overwrite refused", "holds files no run writes (figures/, notes.txt)"))
    assert snapshot(run_dir) == before and (run_dir / "figures").is_dir()


@pytest.mark.parametrize("config", ['{"name": "my app", "debug": true}', "[1, 2", ""])
def test_overwrite_refuses_a_folder_whose_config_json_is_not_a_run_config(tmp_path: Path, config: str):
    folder = tmp_path / "app"
    folder.mkdir()
    (folder / "config.json").write_text(config)
    (folder / "data.csv").write_text("a,b\n")
    refused("distill", *TINY, "--out", folder, "--overwrite",
            says=(f"--overwrite refused: {folder} is not a distillkit run directory", "is not a run config"))
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "data.csv"]  # no lock file left in it
    assert (folder / "config.json").read_text() == config


def test_overwrite_refuses_a_folder_without_a_config_and_leaves_no_lock_file_in_it(tmp_path: Path):
    folder = tmp_path / "thesis"
    folder.mkdir()
    (folder / "thesis.tex").write_text("precious")
    refused("distill", *TINY, "--out", folder, "--overwrite", says="not a distillkit run directory (no config.json)")
    refused("distill", *TINY, "--out", folder, says=(f"run directory {folder} already exists", "--overwrite"))
    assert [p.name for p in folder.iterdir()] == ["thesis.tex"]


def test_overwrite_refuses_the_current_directory(existing: Path, monkeypatch):
    monkeypatch.chdir(existing)  # a real run, so only its being the current directory stops the overwrite
    refused("distill", *TINY, "--out", ".", "--overwrite",
            says="--overwrite refused: . is the current directory or one of its parents")


def test_a_folder_left_by_a_run_killed_in_its_first_write_runs_again_without_overwrite(tmp_path: Path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    stale = run_dir / ".config.json.k1ll3d_x.tmp"  # what atomic_write_json leaves when killed mid-write
    stale.write_text('{"method": "dm", "data')
    before = snapshot(run_dir)
    refused("distill", "--resume", run_dir,
            says=(f"--resume {run_dir}: nothing was recorded there yet", "without --resume"))
    assert snapshot(run_dir) == before
    run_cli("distill", *TINY, "--out", run_dir)
    assert not stale.exists()
    assert safe_load(RunDir(run_dir).synthetic, ARTIFACT_FORMAT)["iterations_done"] == 2


# -- resume: a lost log is a marked gap, a lost checkpoint is an error ------------------------


def test_a_missing_loss_log_does_not_block_a_resume_and_the_gap_is_marked(progressed: Path, tmp_path: Path):
    run_dir = _copy(progressed, tmp_path)
    RunDir(run_dir).losses.unlink()
    run_cli("distill", "--resume", run_dir)
    lines = [json.loads(line) for line in RunDir(run_dir).losses.read_text().splitlines()]
    assert lines[0] == {"lost_before_iteration": 2}
    assert [line["iteration"] for line in lines[1:]] == [2, 3]
    assert safe_load(RunDir(run_dir).synthetic, ARTIFACT_FORMAT)["iterations_done"] == 4
    assert "(loss)" in run_cli("plot", run_dir).output
    assert RunDir(run_dir).plot.stat().st_size > 0


def test_a_missing_checkpoint_of_a_run_that_progressed_is_reported_on_resume(progressed: Path, tmp_path: Path):
    run_dir = _copy(progressed, tmp_path)
    RunDir(run_dir).checkpoint.unlink()
    before = snapshot(run_dir)
    refused("distill", "--resume", run_dir,
            says=(f"--resume {run_dir}: checkpoint.pt is missing although the run had progressed", "--overwrite"))
    assert snapshot(run_dir) == before


# -- one writer: real processes ----------------------------------------------------------------


def _cli_process(*args: object) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "distillkit", *map(str, args)], cwd=ROOT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen) -> tuple[int, str]:
    try:
        _, stderr = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    return proc.returncode, stderr


_HOLDER = """
import sys, time
from distillkit.rundir import RunDir

with RunDir(sys.argv[1]).writer("holder"), RunDir(sys.argv[2]).writer("holder"):
    print("locked", flush=True)
    time.sleep(600)
"""


def test_a_second_writer_is_refused_naming_the_holder_until_the_holder_is_killed(tiny_dm_run: Path,
                                                                                 tmp_path: Path):
    """Another process writes a finished run and a new one: a fresh run, --overwrite, --resume and evaluate
    are refused naming it (exit 2, nothing written); once it is SIGKILLed, its lock no longer blocks."""
    run_dir, fresh = _copy(tiny_dm_run, tmp_path), tmp_path / "fresh"
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(run_dir), str(fresh)], cwd=ROOT,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        in_use = f"is in use by process {holder.pid} (holder); wait for it to finish (one writer per run directory)"
        before = snapshot(run_dir)
        refused("distill", *TINY, "--out", fresh, says=f"run directory {fresh} {in_use}")
        refused("distill", *TINY, "--out", run_dir, "--overwrite", says=f"run directory {run_dir} {in_use}")
        refused("distill", "--resume", run_dir, says=f"run directory {run_dir} {in_use}")
        refused("evaluate", run_dir, "--protocol", "smoke", "--epochs", "1", "--runs", "1", "--test-limit", "100",
                "--device", "cpu", says=f"run directory {run_dir} {in_use}")
        assert snapshot(run_dir) == before and [p.name for p in fresh.iterdir()] == [LOCK]
    finally:
        holder.kill()  # SIGKILL: no cleanup runs, the lock file keeps naming the dead holder
        holder.wait()
    assert f"process {holder.pid} (holder)" in (run_dir / LOCK).read_text()
    run_cli("distill", "--resume", run_dir)  # the kernel dropped the lock with the process
    assert safe_load(RunDir(run_dir).synthetic, ARTIFACT_FORMAT)["iterations_done"] == 4


def test_a_cli_process_is_refused_while_another_process_writes(existing: Path):
    with RunDir(existing).writer("test"):
        proc = subprocess.run([sys.executable, "-m", "distillkit", "distill", "--resume", str(existing)], cwd=ROOT,
                              capture_output=True, text=True, timeout=240)
    assert proc.returncode == 2
    assert _error_line(proc.stderr) == (f"Error: run directory {existing} is in use by process {os.getpid()} "
                                        f"(test); wait for it to finish (one writer per run directory)")


def test_a_writer_refused_in_the_moment_before_the_holder_writes_its_name_still_names_it(tmp_path: Path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    fd = os.open(run_dir / LOCK, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # locked, the file still empty: the winner's state right after flock
    late_name = threading.Timer(0.2, os.pwrite, (fd, b"process 4242 (distill)\n", 0))
    late_name.start()
    try:
        with pytest.raises(UsageError, match=r"is in use by process 4242 \(distill\);"):
            with RunDir(run_dir).writer("second"):
                pass
    finally:
        late_name.join()
        os.close(fd)


def test_two_fresh_runs_started_together_on_one_folder_exactly_one_proceeds(tmp_path: Path):
    run_dir = tmp_path / "run"
    procs = [_cli_process("distill", *TINY, "--out", run_dir) for _ in range(2)]
    results = [_finish(proc) for proc in procs]
    assert sorted(code for code, _ in results) == [0, 2], results
    (winner,) = [proc for proc, (code, _) in zip(procs, results) if code == 0]
    (loser,) = [stderr for code, stderr in results if code == 2]
    line = _error_line(loser)  # refused while the winner ran, or after it had finished
    assert f"is in use by process {winner.pid} (distill)" in line or f"run directory {run_dir} already exists" in line
    assert safe_load(RunDir(run_dir).synthetic, ARTIFACT_FORMAT)["iterations_done"] == 2


# -- show and plot never clobber ---------------------------------------------------------------


def test_show_and_plot_refuse_to_replace_a_file_unless_overwrite_and_never_a_run_file(existing: Path,
                                                                                       tmp_path: Path):
    run = RunDir(existing)
    mine = tmp_path / "mine.png"
    mine.write_bytes(b"my picture")
    for command, default in (("show", run.grid), ("plot", run.plot)):
        refused(command, existing, "-o", mine, says=(f"-o {mine} exists", "--overwrite"))
        assert mine.read_bytes() == b"my picture"
        for record in (run.synthetic, run.config, run.losses):
            refused(command, existing, "-o", record, "--overwrite",
                    says=f"would replace the run's own {record.name}")
        run_cli(command, existing, "-o", tmp_path / f"{command}.png")
        refused(command, existing, "-o", tmp_path / f"{command}.png", says="exists; pass --overwrite")
        run_cli(command, existing, "-o", tmp_path / f"{command}.png", "--overwrite")
        assert not default.exists()
    assert mine.read_bytes() == b"my picture"


def test_show_writes_its_default_picture_once_then_asks_for_overwrite(tiny_dm_run: Path, tmp_path: Path):
    run_dir = _copy(tiny_dm_run, tmp_path)
    grid = RunDir(run_dir).grid
    run_cli("show", run_dir)
    drawn = grid.read_bytes()
    grid.write_bytes(b"edited by hand")
    refused("show", run_dir, says=f"-o {grid} exists; pass --overwrite")
    assert grid.read_bytes() == b"edited by hand"
    run_cli("show", run_dir, "--overwrite")
    assert grid.read_bytes() == drawn


# -- evaluate: output checked first, every finished model kept -------------------------------

@pytest.fixture
def logged(tmp_path: Path, monkeypatch):
    """``evaluate`` with a protocol that logs its calls: ``logged(run_dir, *flags)``, then ``logged.calls()``."""
    plugins = TEST_PLUGINS
    calls = tmp_path / "calls.txt"
    monkeypatch.setenv("DISTILLKIT_TEST_CALLS", str(calls))

    def evaluate(run_dir: Path, *flags: str, expect: int | None = 0, models: str = "convnet3_w32"):
        return run_cli("--plugins-dir", plugins, "evaluate", run_dir, "--protocol", "nearest-mean",
                       "--runs", "2", "--device", "cpu", "--models", models, *flags, expect=expect)

    evaluate.plugins = plugins
    evaluate.calls = lambda: calls.read_text().splitlines() if calls.exists() else []
    return evaluate


def _rows(run_dir: Path) -> dict[tuple[str, str], dict]:
    return {(r["model"], r["kind"]): r for r in json.loads(RunDir(run_dir).eval_json.read_text())["results"]}


@pytest.mark.parametrize("damage", ['{"results": [{"model": "convnet3"', "[]", ""])
def test_evaluate_refuses_a_damaged_eval_json_before_training(tiny_dm_run: Path, tmp_path: Path, logged,
                                                               damage: str):
    run_dir = _copy(tiny_dm_run, tmp_path)
    RunDir(run_dir).eval_json.write_text(damage)
    before = snapshot(run_dir)
    refused("--plugins-dir", logged.plugins, "evaluate", run_dir, "--protocol", "nearest-mean",
            "--device", "cpu", says=(f"{RunDir(run_dir).eval_json} is damaged", "it is not replaced"))
    assert logged.calls() == [] and snapshot(run_dir) == before


def test_evaluate_given_the_artifact_file_names_the_run_directory(existing: Path, logged):
    refused("--plugins-dir", logged.plugins, "evaluate", existing / "synthetic.pt", "--protocol",
            "nearest-mean", "--device", "cpu",
            says=(f"{existing / 'synthetic.pt'} is a file", f"give the run directory {existing}, not the file"))
    assert logged.calls() == []


@contextlib.contextmanager
def _tmpfs(where: Path, size_kib: int) -> Iterator[bool]:
    """A tmpfs of ``size_kib`` mounted on ``where`` (made here) for the block; False where this process may not
    mount one (then ``where`` is a plain folder)."""
    where.mkdir()
    try:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs", str(where)],
                                 capture_output=True).returncode == 0
    except FileNotFoundError:  # no mount(8) here
        mounted = False
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run(["umount", str(where)], check=True)


def test_evaluate_refuses_a_read_only_run_directory_before_training(tiny_dm_run: Path, tmp_path: Path, logged,
                                                                     monkeypatch):
    with _tmpfs(tmp_path / "disk", 2048) as mounted:
        run_dir = _copy(tiny_dm_run, tmp_path / "disk")
        if mounted:
            subprocess.run(["mount", "-o", "remount,ro", str(tmp_path / "disk")], check=True)
        else:  # simulate the read-only file system where the probe for writability asks it
            def read_only(*args, **kwargs):
                raise OSError(errno.EROFS, os.strerror(errno.EROFS))

            monkeypatch.setattr(tempfile, "TemporaryFile", read_only)
        before = snapshot(run_dir)
        refused("--plugins-dir", logged.plugins, "evaluate", run_dir, "--protocol", "nearest-mean",
                "--device", "cpu", says=(f"cannot write results into {run_dir} (Read-only file system)",
                                         "evaluate a copy of the run in a writable place"))
        assert logged.calls() == [] and snapshot(run_dir) == before


def test_evaluate_reuses_finished_rows_and_trains_only_a_new_model(tiny_dm_run: Path, tmp_path: Path, logged):
    run_dir = _copy(tiny_dm_run, tmp_path)
    logged(run_dir)
    assert logged.calls() == ["convnet3_w32"] * 2  # synthetic and random baseline
    first = _rows(run_dir)
    assert set(first) == {("convnet3_w32", "synthetic"), ("convnet3_w32", "random-baseline")}

    result = logged(run_dir, models="convnet3_w32,convnet3")
    assert logged.calls() == ["convnet3_w32"] * 2 + ["convnet3"] * 2  # only the new model was trained
    assert ("reused from eval.json (same set, protocol, settings and runs): convnet3_w32 / random-baseline, "
            "convnet3_w32 / synthetic") in " ".join(result.stdout.split())
    rows = _rows(run_dir)
    assert {key: rows[key] for key in first} == first  # the reused rows, byte for byte
    assert set(rows) == set(first) | {("convnet3", "synthetic"), ("convnet3", "random-baseline")}

    result = logged(run_dir, "--seed", "7")  # another seed is another evaluation: trained again
    assert logged.calls()[-2:] == ["convnet3_w32"] * 2 and "reused" not in result.stdout


def test_an_interrupted_evaluate_keeps_the_finished_model_and_a_rerun_continues(tiny_dm_run: Path, tmp_path: Path,
                                                                               logged, monkeypatch):
    run_dir = _copy(tiny_dm_run, tmp_path)
    monkeypatch.setenv("DISTILLKIT_TEST_INTERRUPT_AT", "convnet3")
    result = logged(run_dir, models="convnet3_w32,convnet3", expect=130)
    assert result.stderr.rstrip().splitlines()[-1] == (
        f"interrupted; the models that finished are kept in {run_dir}. Run the same command again to continue "
        f"(finished ones are not trained again)")
    assert "Traceback" not in result.output and "Error" not in result.stderr
    assert set(_rows(run_dir)) == {("convnet3_w32", "synthetic"), ("convnet3_w32", "random-baseline")}
    kept = _rows(run_dir)

    monkeypatch.delenv("DISTILLKIT_TEST_INTERRUPT_AT")
    result = logged(run_dir, models="convnet3_w32,convnet3")
    assert logged.calls() == ["convnet3_w32"] * 2 + ["convnet3"] * 2
    assert "reused from eval.json" in result.stdout
    rows = _rows(run_dir)
    assert len(rows) == 4 and {key: rows[key] for key in kept} == kept


def _failing_report_writes(monkeypatch, failing: set[int]) -> list[Path]:
    """Make the ``failing`` (1-based) writes of eval.json fail as on a full disk; returns every attempt."""
    import distillkit.evaluate

    write, attempts = distillkit.evaluate.atomic_write_json, []

    def atomic_write_json(obj, path: Path) -> None:
        attempts.append(path)
        if len(attempts) in failing:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        write(obj, path)

    monkeypatch.setattr(distillkit.evaluate, "atomic_write_json", atomic_write_json)
    return attempts


def test_a_failed_report_write_still_prints_the_table_and_says_why_in_one_line(tiny_dm_run: Path, tmp_path: Path,
                                                                                logged, monkeypatch):
    run_dir = _copy(tiny_dm_run, tmp_path)
    attempts = _failing_report_writes(monkeypatch, {3})  # one model, two sets: a write after each, then the last
    result = logged(run_dir, expect=1)
    assert len(attempts) == 3
    assert _error_line(result.stderr) == f"Error: cannot write {RunDir(run_dir).eval_json}: No space left on device"
    assert "convnet3_w32" in result.stdout and "synthetic (%)" in result.stdout  # the numbers were still shown
    assert "wrote" not in result.stdout
    assert set(_rows(run_dir)) == {("convnet3_w32", "synthetic"), ("convnet3_w32", "random-baseline")}


def test_a_failed_report_write_is_forgotten_once_a_later_one_holds_every_row(tiny_dm_run: Path, tmp_path: Path,
                                                                              logged, monkeypatch):
    run_dir = _copy(tiny_dm_run, tmp_path)
    attempts = _failing_report_writes(monkeypatch, {1})
    result = logged(run_dir)
    assert len(attempts) == 3 and f"wrote {RunDir(run_dir).eval_json}" in " ".join(result.stdout.split())
    assert len(_rows(run_dir)) == 2


# -- a full disk -------------------------------------------------------------------------------


@contextlib.contextmanager
def _full_after_the_first_checkpoint(where: Path, room: int) -> Iterator[bool]:
    """``where`` on a small file system that fills up, all but ``room`` bytes, once a run has written its first
    checkpoint: a real tmpfs and a filler file where a tmpfs can be mounted (yields True), else distillkit's
    atomic writes refuse with ENOSPC, as a full disk would, past that point (yields False). Both end with the block."""
    import distillkit.runner

    with _tmpfs(where, 1024) as mounted, pytest.MonkeyPatch.context() as monkeypatch:
        save, budget = distillkit.runner.save_checkpoint, []

        def save_then_fill(*args, **kwargs) -> None:
            save(*args, **kwargs)
            if not budget:
                if mounted:
                    disk = os.statvfs(where)
                    (where / "filler").write_bytes(bytes(max(disk.f_bavail * disk.f_frsize - room, 0)))
                budget.append(_used(where) + room)

        monkeypatch.setattr(distillkit.runner, "save_checkpoint", save_then_fill)
        if not mounted:
            write = artifact._write_replace

            def within_budget(path: Path, data: bytes) -> None:
                if budget and _used(where) + len(data) > budget[0]:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                write(path, data)

            monkeypatch.setattr(artifact, "_write_replace", within_budget)
        yield mounted


def _used(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def test_a_full_disk_gives_one_line_and_keeps_the_last_checkpoint(tmp_path: Path):
    run = RunDir(tmp_path / "disk" / "run")
    with _full_after_the_first_checkpoint(tmp_path / "disk", 16 * 1024):  # room for log lines only
        result = run_cli("distill", *TINY, "--checkpoint-every", "1", "--out", run.path, expect=1)
        assert _error_line(result.stderr) == f"Error: cannot write {run.checkpoint}: No space left on device"
        assert safe_load(run.checkpoint, CHECKPOINT_FORMAT)["iteration"] == 0  # the last checkpoint is whole
        assert sorted(p.name for p in run.path.iterdir()) == sorted(  # no temporary left, no artifact
            [LOCK, "config.json", "checkpoint.pt", "losses.jsonl"])
        shutil.copytree(run.path, tmp_path / "saved")
    run_cli("distill", "--resume", tmp_path / "saved")  # with room again, the run continues from it
    assert safe_load(RunDir(tmp_path / "saved").synthetic, ARTIFACT_FORMAT)["iterations_done"] == 2


def test_a_disk_too_full_for_the_loss_log_names_the_log(tmp_path: Path):
    run = RunDir(tmp_path / "disk" / "run")
    with _full_after_the_first_checkpoint(tmp_path / "disk", 0) as mounted:
        if not mounted:  # the log is appended to, not written atomically: only a real full disk refuses it
            pytest.skip("needs a tmpfs (root); the checkpoint case above runs either way")
        result = run_cli("distill", *TINY, "--checkpoint-every", "1", "--out", run.path, expect=1)
        assert _error_line(result.stderr) == f"Error: cannot write {run.losses}: No space left on device"
        assert safe_load(run.checkpoint, CHECKPOINT_FORMAT)["iteration"] == 0


# -- every bad value: exit 2, one line, nothing written ----------------------------------------


BAD_VALUES = [
    (("--lr-img", "-1"), "--lr-img must be a finite number >= 0, got -1.0"),
    (("--lr-img", "nan"), "--lr-img must be a finite number >= 0, got nan"),
    (("--lr-img", "inf"), "--lr-img must be a finite number >= 0, got inf"),
    (("--momentum", "1"), "--momentum must be in [0, 1), got 1.0"),
    (("--momentum", "-0.1"), "--momentum must be in [0, 1), got -0.1"),
    (("--batch-syn", "0"), "--batch-syn must be positive, got 0"),
    (("--batch-real", "6000"), "--batch-real 6000 is larger than the smallest class (5421 images)"),
    (("--set", "parameterization.init=bogus"), ("parameterization 'pixel'", "ValueError", "unknown init 'bogus'")),
    (("--set", "sampler.period=x"), ("sampler 'random-convnet'", "TypeError", "'period'")),
    (("--sampler", "random-encoder", "--set", "sampler.period=x"),
     "sampler period must be a positive integer (iterations per random model), got 'x'"),
    (("--parameterization", "factor", "--set", "parameterization.factor=x"),
     "parameterization factor must be an integer from 1 to 28, got 'x'"),
    (("--set", "sampler.model=3"), ("unknown model 3; choose one of:", "convnet3")),
    (("--set", "sampler.model=[1]"), ("unknown model [1]; choose one of:", "convnet3")),
    (("--device", "mps"), "unknown --device 'mps'; choose auto, cpu, cuda or cuda:N"),
    (("--device", "cuda:7"), "--device cuda:7"),
]


@pytest.mark.parametrize("flags, says", BAD_VALUES, ids=[" ".join(flags) for flags, _ in BAD_VALUES])
def test_a_bad_value_exits_2_with_one_line_and_writes_nothing(existing: Path, tmp_path: Path, flags, says):
    refused("distill", *TINY, "--out", existing, "--overwrite", *flags, says=says)
    refused("distill", *TINY, "--out", tmp_path / "new" / "run", *flags, says=says)
    assert not (tmp_path / "new").exists()  # neither the run directory nor the folder made for it


def test_evaluate_with_no_model_named_exits_2(existing: Path):
    refused("evaluate", existing, "--models", ",", "--device", "cpu", says="--models names no model")
