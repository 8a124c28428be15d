"""Speedup of torchrun processes over one process, for ``distill`` and ``evaluate``, end to end.

Each configuration runs the real command in a fresh subprocess and is timed by wall clock from launch
to exit (start-up, data loading and the file writes included: what a user waits for):

* ``1 process``: ``python -m distillkit ...`` with ``--threads`` torch threads (default: every core);
* ``N processes``: ``torchrun --standalone --nproc-per-node N -m distillkit ...``, each process with
  ``cpu_count // N`` threads on a CPU, one GPU each on CUDA.

The tasks: ``distill`` (DM, MNIST, IPC 10, ``--iterations`` at ``--batch-real``) and ``evaluate`` of
that run (``smoke`` protocol, ``--epochs``, ``--runs`` runs of convnet3 plus the random baseline).
Configurations are timed round-robin for ``--rounds`` rounds, so load changes on a shared machine hit
them alike; the median is reported with the speedup over the 1-process time. Each sharded result is
also checked against the single-process one (the synthetic set bit for bit, the accuracies exactly).

    python -m benchmarks.distributed [--nproc 2] [--iterations 30] [--epochs 30] [--rounds 2] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import print_table, write_report
from distillkit.condense import resolve_device


def _launcher(processes: int) -> list[str]:
    if processes == 1:
        return [sys.executable, "-m", "distillkit"]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes),
            "-m", "distillkit"]


def _run(command: list[str], threads: int) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    start = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"failed ({done.returncode}): {' '.join(command)}\n{done.stderr[-3000:]}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nproc", type=int, nargs="+", default=[2], help="process counts to compare with 1")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads of the 1-process run")
    parser.add_argument("--iterations", type=int, default=30)
    parser.add_argument("--batch-real", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--runs", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = resolve_device(args.device)
    if device.type == "cuda" and max(args.nproc) > torch.cuda.device_count():
        raise SystemExit(f"--nproc {max(args.nproc)} needs that many GPUs; this machine has "
                         f"{torch.cuda.device_count()}")

    configs = [(1, args.threads)] + [(n, max(1, args.threads // n)) for n in args.nproc]
    work = Path(tempfile.mkdtemp(prefix="dk-distributed-"))
    distill = ["distill", "--method", "dm", "--dataset", "mnist", "--ipc", "10", "--iterations", str(args.iterations),
               "--batch-real", str(args.batch_real), "--seed", "0", "--device", str(device),
               "--checkpoint-every", str(args.iterations), "--log-every", "10", "--overwrite"]
    times: dict[tuple[str, int], list[float]] = {}
    try:
        for _ in range(args.rounds):
            for processes, threads in configs:
                run_dir = work / f"p{processes}"
                times.setdefault(("distill", processes), []).append(
                    _run([*_launcher(processes), *distill, "--out", str(run_dir)], threads))
                print(f"distill, {processes} process(es): {times['distill', processes][-1]:.1f} s", flush=True)
                times.setdefault(("evaluate", processes), []).append(_run(
                    [*_launcher(processes), "evaluate", str(run_dir), "--protocol", "smoke", "--epochs",
                     str(args.epochs), "--runs", str(args.runs), "--models", "convnet3", "--device", str(device)],
                    threads))
                print(f"evaluate, {processes} process(es): {times['evaluate', processes][-1]:.1f} s", flush=True)
        single = work / "p1"
        same_set = {n: torch.equal(torch.load(work / f"p{n}" / "synthetic.pt", weights_only=True)["images"],
                                   torch.load(single / "synthetic.pt", weights_only=True)["images"])
                    for n, _ in configs}
        accuracies = {n: [r["accuracies"] for r in json.loads((work / f"p{n}" / "eval.json").read_text())["results"]]
                      for n, _ in configs}
    finally:
        shutil.rmtree(work, ignore_errors=True)

    rows = []
    for task in ("distill", "evaluate"):
        base = statistics.median(times[task, 1])
        for processes, threads in configs:
            median = statistics.median(times[task, processes])
            rows.append({"task": task, "processes": processes, "threads_per_process": threads,
                         "wall_s": median, "speedup": base / median, "times": times[task, processes],
                         "same_result": same_set[processes] if task == "distill"
                         else accuracies[processes] == accuracies[1]})
    print_table(rows, ["task", "processes", "threads_per_process", "wall_s", "speedup", "same_result"],
                title=f"torchrun processes vs one process, end to end ({device}, {os.cpu_count()} cores)")
    settings = {k: getattr(args, k) for k in ("iterations", "batch_real", "epochs", "runs", "rounds", "threads")}
    path = write_report("distributed", device, rows, {"settings": settings})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
