"""Speedup of torchrun processes over one process, for ``distill`` and ``evaluate``, end to end.

Each configuration runs the real command in a fresh subprocess and is timed by wall clock from launch
to exit (start-up, data loading and the file writes included: what a user waits for):

* ``1 process``: ``python -m distillkit ...`` with ``--threads`` torch threads (default: every core);
* ``N processes``: ``torchrun --standalone --nproc-per-node N -m distillkit ...``, each process with
  ``cpu_count // N`` threads on a CPU, one GPU each on CUDA.

The tasks: ``distill`` (DM, MNIST, IPC 10, ``--iterations`` at ``--batch-real``) and ``evaluate`` of
that run (``smoke`` protocol, ``--epochs``, ``--runs`` runs of convnet3 plus the random baseline).
Configurations are timed round-robin for ``--rounds`` rounds, so load changes on a shared machine hit
them alike; the median is reported with the speedup over the 1-process, all-threads time. Each sharded
result is checked against one process with the same threads per process (the synthetic set bit for bit,
the accuracies exactly): kernels' float reductions depend on the thread count, not on the sharding.

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
from distillkit.devices import resolve_device


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
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--batch-real", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--runs", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = resolve_device(args.device)
    if device.type == "cuda" and max(args.nproc) > torch.cuda.device_count():
        raise SystemExit(f"--nproc {max(args.nproc)} needs that many GPUs; this machine has "
                         f"{torch.cuda.device_count()}")

    # the 1-thread single process is the exact reference of sharded processes with 1 thread each: float
    # reductions in the kernels depend on the thread count, so results are compared at equal threads
    configs = list(dict.fromkeys([(1, args.threads)] + [(1, max(1, args.threads // n)) for n in args.nproc]
                                 + [(n, max(1, args.threads // n)) for n in args.nproc]))
    work = Path(tempfile.mkdtemp(prefix="dk-distributed-"))
    distill = ["distill", "--method", "dm", "--dataset", "mnist", "--ipc", "10", "--iterations", str(args.iterations),
               "--batch-real", str(args.batch_real), "--seed", "0", "--device", str(device),
               "--checkpoint-every", str(args.iterations), "--log-every", "10", "--overwrite"]
    times: dict[tuple[str, int, int], list[float]] = {}
    try:
        for _ in range(args.rounds):
            for processes, threads in configs:
                run_dir = work / f"p{processes}t{threads}"
                times.setdefault(("distill", processes, threads), []).append(
                    _run([*_launcher(processes), *distill, "--out", str(run_dir)], threads))
                times.setdefault(("evaluate", processes, threads), []).append(_run(
                    [*_launcher(processes), "evaluate", str(run_dir), "--protocol", "smoke", "--epochs",
                     str(args.epochs), "--runs", str(args.runs), "--models", "convnet3", "--device", str(device)],
                    threads))
                print(f"{processes} process(es) x {threads} thread(s): distill "
                      f"{times['distill', processes, threads][-1]:.1f} s, evaluate "
                      f"{times['evaluate', processes, threads][-1]:.1f} s", flush=True)
        images = {c: torch.load(work / f"p{c[0]}t{c[1]}" / "synthetic.pt", weights_only=True)["images"]
                  for c in configs}
        accuracies = {c: [r["accuracies"] for r in
                          json.loads((work / f"p{c[0]}t{c[1]}" / "eval.json").read_text())["results"]]
                      for c in configs}
    finally:
        shutil.rmtree(work, ignore_errors=True)

    rows = []
    for task in ("distill", "evaluate"):
        base = statistics.median(times[(task, *configs[0])])
        for processes, threads in configs:
            reference = (1, threads)  # same threads per process, one process
            median = statistics.median(times[task, processes, threads])
            same = (torch.equal(images[processes, threads], images[reference]) if task == "distill"
                    else accuracies[processes, threads] == accuracies[reference])
            rows.append({"task": task, "processes": processes, "threads_per_process": threads, "wall_s": median,
                         "speedup": base / median, "times": times[task, processes, threads],
                         "same_result": same if processes > 1 else None,
                         **({"accuracies": accuracies[processes, threads]} if task == "evaluate" else {})})
    print_table(rows, ["task", "processes", "threads_per_process", "wall_s", "speedup", "same_result"],
                title=f"torchrun processes vs one process, end to end ({device}, {os.cpu_count()} cores)")
    settings = {k: getattr(args, k) for k in ("iterations", "batch_real", "epochs", "runs", "rounds", "threads")}
    path = write_report("distributed", device, rows, {"settings": settings})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
