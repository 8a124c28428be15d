"""Evaluation speed: 5 runs of ConvNet-3 trained stacked (vmap) vs one by one, and one dc-classic evaluation.

For each IPC (MNIST, a random real subset per class, seeded) the dc-classic protocol
trains ``--runs`` ConvNet-3 networks for ``--epochs`` epochs, once per path
(``--variants``: stacked, run by run, each optionally ``torch.compile``-d), and
tests them on the first ``--test-limit`` test images. Reported per path: the
first training step (compilation and warm-up) apart from the steady steps, in
wall and process-CPU seconds per epoch (CPU seconds are the robust figure on a
shared machine when ``--threads 1``), the test time, the accuracies (both paths
draw the same random numbers, so they agree to float rounding) and the
stacked/sequential ratios of the steady training time.

The protocol itself runs 1000 epochs on the full 10 000-image test set; the
``est. 1000 ep`` column is ``first steps + train/epoch x 1000 + test x
10000/test-limit``, an extrapolation, not a measurement. ``1 run`` is a single
dc-classic evaluation at IPC 10 on the device's default path (the "seconds per
dc-classic evaluation" figure of the zoo issue).

    python -m benchmarks.eval_speed [--ipc 1 10 50] [--epochs 20] [--runs 5] [--test-limit 2000]
                                    [--threads N] [--devices cpu cuda] [--variants sequential stacked]
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import fields

import torch

from benchmarks.common import write_report
from distillkit import registry
from distillkit.data import load_split, resolve_root
from distillkit.engine import TrainingProtocol
from distillkit.evaluate import random_subset
from distillkit.models import builder
from distillkit.interfaces import TrainingSet

VARIANTS = {"sequential": {"stacked": False}, "stacked": {"stacked": True},
            "sequential+compile": {"stacked": False, "compile": True},
            "stacked+compile": {"stacked": True, "compile": True}}
FULL_TEST = 10_000
PROTOCOL_EPOCHS = 1000


def _clock(device: torch.device) -> tuple[float, float]:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter(), time.process_time()


class _Timed(TrainingProtocol):
    """dc-classic with clocks: the first training step (compilation, warm-up) apart from the steady steps, and the
    test phase apart from training. Wall and CPU seconds; CUDA is synchronised only at those boundaries."""

    log: dict[str, float] = {}

    def _train(self, net, run_ids, train, seed, model):
        device = train.images.device
        starts: list[tuple[float, float]] = []
        inner = net.forward

        def forward(xs):
            starts.append(_clock(device) if len(starts) < 2 else (0.0, 0.0))
            return inner(xs)

        net.forward = forward
        begin = _clock(device)
        super()._train(net, run_ids, train, seed, model)
        end = _clock(device)
        steps = len(starts)
        log = _Timed.log
        log["first_step_s"] += starts[1][0] - begin[0]
        for i, key in enumerate(("steady_step_s", "steady_step_cpu_s")):
            log[key + "_per_epoch"] += (end[i] - starts[1][i]) / (steps - 1) * steps / self.epochs

    def _test(self, net, runs, test):
        start = _clock(test.images.device)
        out = super()._test(net, runs, test)  # ends with the one read-back, so the device is done
        _Timed.log["test_s"] += time.perf_counter() - start[0]
        return out


def measure(protocol: TrainingProtocol, train: TrainingSet, test: TrainingSet, spec, runs: int, device) -> dict:
    if protocol.epochs < 2:
        raise SystemExit("--epochs must be at least 2 (the first step is timed apart)")
    timed = _Timed(**{f.name: getattr(protocol, f.name) for f in fields(protocol)})
    _Timed.log = dict.fromkeys(("first_step_s", "steady_step_s_per_epoch", "steady_step_cpu_s_per_epoch", "test_s"),
                               0.0)
    cpu, wall = time.process_time(), time.perf_counter()
    accuracies = timed.evaluate(builder("convnet3", spec), train, test, spec, range(runs), 0, device)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    log = _Timed.log
    return {"wall_s": wall, "cpu_s": cpu, "first_steps_s": log["first_step_s"],
            "train_s_per_epoch": log["steady_step_s_per_epoch"],
            "train_cpu_s_per_epoch": log["steady_step_cpu_s_per_epoch"], "test_s": log["test_s"],
            "extrapolated_1000_epochs_full_test_s": log["first_step_s"] + log["steady_step_s_per_epoch"]
            * PROTOCOL_EPOCHS + log["test_s"] * FULL_TEST / len(test.labels),
            "accuracies": [round(a, 2) for a in accuracies], "mean_acc": sum(accuracies) / len(accuracies)}


def show(rows: list[dict], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, caption="train = steady steps (after the first); est. 1000 ep = extrapolated: first "
                                       "steps + train s/epoch x 1000 + test s x 10000/test images")
    columns = {"ipc": "ipc", "path": "path", "runs": "runs", "first_steps_s": "first step s",
               "train_s_per_epoch": "train s/ep", "train_cpu_s_per_epoch": "train cpu s/ep", "test_s": "test s",
               "wall_s": "wall s", "extrapolated_1000_epochs_full_test_s": "est. 1000 ep s", "mean_acc": "acc %",
               "stacked/sequential train_s_per_epoch": "stk/seq wall",
               "stacked/sequential train_cpu_s_per_epoch": "stk/seq cpu"}
    for key, header in columns.items():
        table.add_column(header, justify="left" if key == "path" else "right")
    for row in rows:
        table.add_row(*[f"{row[k]:.3g}" if isinstance(row.get(k), float) else str(row.get(k, "")) for k in columns])
    Console(width=160).print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ipc", type=int, nargs="+", default=[1, 10, 50])
    parser.add_argument("--epochs", type=int, default=20, help="epochs actually trained (the protocol has 1000)")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--test-limit", type=int, default=2000)
    parser.add_argument("--variants", nargs="+", default=["sequential", "stacked"], choices=list(VARIANTS))
    parser.add_argument("--devices", nargs="+", default=["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--name", default="eval_speed", help="results/NAME-DEVICE.json")
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    registry.load_plugins()
    dataset = registry.create("datasets", "mnist")
    spec = dataset.image_spec
    base = registry.create("protocols", "dc-classic").with_overrides(epochs=args.epochs, test_limit=args.test_limit)
    for name in args.devices:
        device = torch.device(name)
        real = load_split(dataset, resolve_root(), train=True, device=device)
        full_test = load_split(dataset, resolve_root(), train=False, device=device).as_training_set()
        test = TrainingSet(full_test.images[: args.test_limit], full_test.labels[: args.test_limit])
        load_before = os.getloadavg()
        rows = []
        for ipc in args.ipc:
            train = random_subset(real, ipc, seed=0)
            results = {}
            for variant in args.variants:
                results[variant] = measure(base.with_overrides(**VARIANTS[variant]), train, test, spec, args.runs,
                                           device)
                rows.append({"device": name, "ipc": ipc, "path": variant, "runs": args.runs, **results[variant]})
            if "stacked" in results and "sequential" in results:
                for row in rows[-len(args.variants):]:
                    for key in ("train_s_per_epoch", "train_cpu_s_per_epoch"):
                        row[f"stacked/sequential {key}"] = results["stacked"][key] / results["sequential"][key]
        one = measure(base, random_subset(real, 10, seed=0), test, spec, 1, device)
        engine = "stacked" if base.stacks_on(device) else "sequential"
        rows.append({"device": name, "ipc": 10, "path": f"1 run ({engine})", "runs": 1, **one})
        show(rows, f"dc-classic ConvNet-3 on MNIST random-real sets: {args.epochs} epochs trained, test on "
                   f"{args.test_limit} images ({name}, {torch.get_num_threads()} torch threads)")
        path = write_report(args.name, device, rows, {
            "epochs_trained": args.epochs, "test_limit": args.test_limit,
            "extrapolation": "extrapolated_1000_epochs_full_test_s = first_steps_s + train_s_per_epoch*1000 "
                             "+ test_s*10000/test_limit (an estimate, not a measurement)",
            "timing": "train_s_per_epoch / train_cpu_s_per_epoch: wall / process CPU seconds of the steps after the "
                      "first (summed over runs for the sequential path); first_steps_s: from the start of training "
                      "to the second step (compilation and warm-up; summed over runs)",
            "load_average_before": load_before, "load_average_after": os.getloadavg()})
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
