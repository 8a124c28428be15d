"""Class-sharded distillation under torchrun (2 gloo processes on CPU) equals the single-process run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

ARGS = ["distill", "--method", "dm", "--dataset", "mnist", "--ipc", "2", "--iterations", "6", "--batch-real", "8",
        "--set", "sampler.model=convnet3_w32", "--seed", "3", "--device", "cpu", "--checkpoint-every", "2",
        "--log-every", "1"]


def _torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
            "distillkit", *args]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _images(run_dir: Path) -> torch.Tensor:
    return torch.load(run_dir / "synthetic.pt", weights_only=True)["images"]


def _checkpoint_iteration(path: Path) -> int:
    try:
        return int(torch.load(path, weights_only=True)["iteration"])
    except Exception:  # not written yet
        return -1


def single_and_sharded(tmp_path: Path, *args: str) -> tuple[Path, Path]:
    """``distillkit *args`` in one process and in 2 torchrun processes (1 thread each), into
    ``tmp_path/single`` and ``tmp_path/sharded``."""
    single, sharded = tmp_path / "single", tmp_path / "sharded"
    subprocess.run([sys.executable, "-m", "distillkit", *args, "--out", str(single)], check=True, env=_env(),
                   capture_output=True)
    done = subprocess.run(_torchrun(*args, "--out", str(sharded)), env=_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    return single, sharded


def test_two_processes_give_the_single_process_set_and_resume(tmp_path: Path):
    single, sharded = single_and_sharded(tmp_path, *ARGS)
    assert torch.equal(_images(sharded), _images(single))  # bit for bit
    lines = (sharded / "losses.jsonl").read_text().splitlines()
    assert len(lines) == 6  # one writer: rank 0

    # kill the sharded run after its first checkpoint, resume it (still 2 processes), same result
    killed = tmp_path / "killed"
    proc = subprocess.Popen(_torchrun(*ARGS, "--out", str(killed)), env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    while _checkpoint_iteration(killed / "checkpoint.pt") < 2 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "synthetic.pt").exists(), "the run finished before it could be killed"
    assert 2 <= _checkpoint_iteration(killed / "checkpoint.pt") < 6
    resumed = subprocess.run(_torchrun("distill", "--resume", str(killed)), env=_env(), capture_output=True,
                             text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert torch.equal(_images(killed), _images(single))
    assert len((killed / "losses.jsonl").read_text().splitlines()) == 6


def test_two_processes_share_the_evaluation_runs_and_write_the_single_process_report(tiny_dm_run, tmp_path: Path):
    """(model, set, run) jobs dealt over 2 gloo ranks: one eval.json with a single process's numbers."""
    import json
    import shutil

    args = ["--protocol", "smoke", "--epochs", "2", "--runs", "3", "--test-limit", "300", "--models",
            "convnet3_w32,mlp", "--device", "cpu"]
    reports = {}
    for name, launcher in (("single", [sys.executable, "-m", "distillkit"]), ("sharded", _torchrun())):
        run_dir = tmp_path / name
        shutil.copytree(tiny_dm_run, run_dir)
        done = subprocess.run([*launcher, "evaluate", str(run_dir), *args], env=_env(), capture_output=True,
                              text=True)
        assert done.returncode == 0, done.stderr[-2000:]
        reports[name] = json.loads((run_dir / "eval.json").read_text())
    assert reports["sharded"]["ranks"] == 2 and reports["single"]["ranks"] == 1
    rows = {name: [(r["model"], r["kind"], r["accuracies"]) for r in report["results"]]
            for name, report in reports.items()}
    assert len(rows["single"]) == 4 and all(len(acc) == 3 for _, _, acc in rows["single"])
    assert rows["sharded"] == rows["single"]  # bit for bit: a run depends only on (seed, model, run)
