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

``--reference DIR`` instead times the public reference's ``evaluate_synset``
(VICO-UoE/DatasetCondensation ``utils.py``, imported from a checkout at DIR outside
this repository; its code is never committed) side by side with one dc-classic
evaluation, round-robin in one process, at the same synthetic set, epochs, test
images and threads, and writes ``results/reference_eval-DEVICE.json`` with the ratio::

    git -C /tmp/dc-ref-src archive HEAD utils.py networks.py | tar -x -C /tmp/dc-ref
    sed -i '46s/out.view(/out.reshape(/' /tmp/dc-ref/networks.py  # ConvNet.forward: current torch refuses the view
    python -m benchmarks.eval_speed --reference /tmp/dc-ref --ipc 10 50 --epochs 20 --threads 1 --devices cpu
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
import types
from dataclasses import fields
from pathlib import Path

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


def _reference_utils(checkout: Path) -> types.ModuleType:
    """The reference's ``utils`` module from ``checkout``. It imports scipy's ``rotate`` for DC's non-DSA
    augmentation, which ``evaluate_synset`` with DSA never calls; without scipy (not a distillkit
    dependency) a stand-in that refuses to run takes its place."""
    if importlib.util.find_spec("scipy") is None:
        def rotate(*args, **kwargs):
            raise NotImplementedError("scipy is not installed: DC's non-DSA augmentation cannot run")
        for name in ("scipy", "scipy.ndimage", "scipy.ndimage.interpolation"):
            sys.modules.setdefault(name, types.ModuleType(name))
        sys.modules["scipy.ndimage.interpolation"].rotate = rotate
    sys.path.insert(0, str(checkout))
    import utils  # noqa: PLC0415  the reference's module, found through the path just added

    return utils


def time_reference(ref, train: TrainingSet, test: TrainingSet, spec, epochs: int, device) -> dict:
    """One ``evaluate_synset`` of the reference with its DC/DSA/DM defaults (ConvNet, lr 0.01, batch 256,
    DSA strategy color_crop_cutout_flip_scale_rotate, test batch 256 as its main.py), wall and CPU seconds."""
    settings = types.SimpleNamespace(device=str(device), lr_net=0.01, epoch_eval_train=epochs, batch_train=256,
                                     dsa=True, dsa_strategy="color_crop_cutout_flip_scale_rotate",
                                     dsa_param=ref.ParamDiffAug(), dc_aug_param=None)
    testloader = torch.utils.data.DataLoader(ref.TensorDataset(test.images, test.labels), batch_size=256,
                                             shuffle=False, num_workers=0)
    net = ref.get_network("ConvNet", spec.channels, spec.num_classes, (spec.height, spec.width))
    cpu, wall = time.process_time(), time.perf_counter()
    _, _, accuracy = ref.evaluate_synset(0, net, train.images, train.labels, testloader, settings)
    return {"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu, "acc": 100 * accuracy}


def time_distillkit(protocol: TrainingProtocol, train: TrainingSet, test: TrainingSet, spec, device) -> dict:
    cpu, wall = time.process_time(), time.perf_counter()
    accuracy, = protocol.evaluate(builder("convnet3", spec), train, test, spec, [0], 0, device)
    return {"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu, "acc": accuracy}


def compare_with_reference(args, dataset, device: torch.device, real, test: TrainingSet) -> None:
    ref = _reference_utils(Path(args.reference))
    spec = dataset.image_spec
    protocol = registry.create("protocols", "dc-classic").with_overrides(epochs=args.epochs,
                                                                         test_limit=args.test_limit)
    load_before, rows = os.getloadavg(), []
    for ipc in args.ipc:
        train = random_subset(real, ipc, seed=0)
        times = {"reference": [], "distillkit": []}
        for _ in range(args.repeats):  # round-robin, so load changes on a shared machine hit both alike
            times["reference"].append(time_reference(ref, train, test, spec, args.epochs, device))
            times["distillkit"].append(time_distillkit(protocol, train, test, spec, device))
        best = {k: min(v, key=lambda t: t["wall_s"]) for k, v in times.items()}
        for name, runs in times.items():
            rows.append({"implementation": name, "ipc": ipc, "s_per_evaluation": best[name]["wall_s"],
                         "cpu_s_per_evaluation": best[name]["cpu_s"],
                         "speedup_vs_reference": best["reference"]["wall_s"] / best[name]["wall_s"],
                         "cpu_speedup_vs_reference": best["reference"]["cpu_s"] / best[name]["cpu_s"],
                         "times": [t["wall_s"] for t in runs], "accuracies": [round(t["acc"], 2) for t in runs]})
    from benchmarks.common import print_table

    print_table(rows, ["implementation", "ipc", "s_per_evaluation", "cpu_s_per_evaluation", "speedup_vs_reference",
                       "cpu_speedup_vs_reference"],
                f"evaluate_synset vs dc-classic: ConvNet-3 on MNIST random-real sets, {args.epochs} (+1) epochs, "
                f"{args.test_limit} test images, {torch.get_num_threads()} threads")
    path = write_report("reference_eval", device, rows, {
        "how": "The public reference's evaluate_synset (VICO-UoE/DatasetCondensation utils.py: get_network('ConvNet'), "
               "DSA through DiffAugment on its global generator, its DataLoader over the set and the test images) "
               "imported from a checkout outside this repository, unchanged apart from one .view -> .reshape in "
               "networks.py's ConvNet.forward, which current torch refuses (its code is not committed; scipy, "
               "needed only by DC's non-DSA augmentation, stood in for when absent), timed round-robin with one "
               "distillkit dc-classic evaluation (same epochs, DSA strategy, learning-rate schedule) on the same "
               "random-real MNIST set and the same test images, in one process; the best of --repeats wall times "
               "is reported, all are listed",
        "reference_commit": args.reference_commit, "epochs_trained": args.epochs + 1, "test_limit": args.test_limit,
        "repeats": args.repeats, "load_average_before": load_before, "load_average_after": os.getloadavg()})
    print(f"wrote {path}")


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
    parser.add_argument("--reference", default=None, help="a checkout of VICO-UoE/DatasetCondensation (outside this "
                        "repository): time its evaluate_synset against dc-classic instead")
    parser.add_argument("--reference-commit", default=None, help="the checkout's commit, recorded with the results")
    parser.add_argument("--repeats", type=int, default=3, help="with --reference: timings per implementation")
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
        if args.reference:
            compare_with_reference(args, dataset, device, real, test)
            continue
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
