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


def test_two_processes_give_the_single_process_set_and_resume(tmp_path: Path):
    single = tmp_path / "single"
    subprocess.run([sys.executable, "-m", "distillkit", *ARGS, "--out", str(single)], check=True, env=_env(),
                   capture_output=True)

    sharded = tmp_path / "sharded"
    done = subprocess.run(_torchrun(*ARGS, "--out", str(sharded)), env=_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
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
