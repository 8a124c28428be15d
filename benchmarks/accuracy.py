"""Accuracy of distilled sets beside the published figures and the random-subset baseline.

Runs a grid (method x dataset x IPC) through the real CLI code path (``distillkit distill`` then
``distillkit evaluate``) and writes ``benchmarks/results/accuracy-<scale>-<device>.json`` and a markdown
table beside it. Every row names its protocol and records its settings: each method is evaluated under
the protocol of its paper and under ``dc-classic``, the one every method and the random baseline share
(:data:`PROTOCOLS`).

Scales:

* ``smoke``: minutes per cell on a CPU: 100 iterations, 64 real images per class, 300 evaluation
  epochs, 3 runs. Not comparable with the papers; it checks the ordering M3D >= DM > random.
* ``paper``: the methods' own defaults (DM 20 000 iterations at 256 real images; M3D 5 000 at 128),
  1000 evaluation epochs, 5 runs. Meant for a GPU.

The random baseline is ``evaluate``'s baseline row (IPC random real images per class, same protocol,
same evaluation seeds); ``random`` in ``--methods`` reports it as its own row. ``--protocols`` runs only
some of each method's protocols (an M3D cell at IPC 50 is hours per protocol on a CPU). The results file is
rewritten after every evaluation, so a stopped grid keeps every evaluation it finished.

    python -m benchmarks.accuracy --scale smoke --datasets mnist fashionmnist --ipc 1 10 --methods random dm m3d
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from benchmarks.common import RESULTS, device_label, print_table, provenance, with_earlier_rows, write_report
from distillkit.cli import cli
from distillkit.devices import resolve_device

SCALES = {
    "smoke": {"distill": ["--iterations", "100", "--batch-real", "64"], "epochs": 300, "runs": 3},
    "paper": {"distill": [], "epochs": 1000, "runs": 5},
}

#: Published ConvNet-3 test accuracy (%) from method-notes.md section 8: (mean, std or None, verified?)
PUBLISHED: dict[tuple[str, int], dict[str, tuple[float, float | None, bool]]] = {
    ("mnist", 1): {"m3d": (94.4, None, False)},
    ("mnist", 10): {"m3d": (97.6, None, False)},
    ("mnist", 50): {"m3d": (98.2, None, False)},
    ("fashionmnist", 1): {"dm": (70.7, None, True), "m3d": (80.7, None, False)},
    ("fashionmnist", 10): {"dm": (83.5, None, True), "m3d": (86.4, None, False)},
    ("fashionmnist", 50): {"dm": (88.1, None, True), "m3d": (87.3, None, False)},
    ("cifar10", 1): {"dm": (26.0, 0.8, True), "m3d": (45.3, 0.3, True)},
    ("cifar10", 10): {"dm": (48.9, 0.6, True), "m3d": (63.5, 0.2, True)},
    ("cifar10", 50): {"dm": (63.0, 0.4, True), "m3d": (69.9, 0.5, True)},
    ("cifar100", 1): {"dm": (11.4, 0.3, True), "m3d": (26.2, 0.3, True)},
    ("cifar100", 10): {"dm": (29.7, 0.3, True), "m3d": (42.4, 0.2, True)},
    ("cifar100", 50): {"dm": (43.6, 0.4, True), "m3d": (50.9, 0.7, True)},
}


#: the protocols each method's rows are evaluated under: dc-classic for all (DM's own, DC's evaluate_synset),
#: idc too for M3D (its paper reports under IDC's protocol)
PROTOCOLS = {"dm": ("dc-classic",), "m3d": ("dc-classic", "idc")}


def _cli(*args: str) -> None:
    cli.main([str(a) for a in args], prog_name="distillkit", standalone_mode=False)


def add_distill_set_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--distill-set", action="append", default=[], metavar="METHOD:COMPONENT.OPTION=VALUE",
                        help="an extra --set for one method's distill (recorded in its rows), e.g. a CPU-sized "
                             "pretraining: ncfm:sampler.networks=4")


def distill_sets(texts: list[str], methods: list[str]) -> dict[str, list[str]]:
    """``--distill-set`` values per method (a :class:`ValueError` naming a bad one and the methods)."""
    sets: dict[str, list[str]] = {}
    for text in texts:
        method, _, option = text.partition(":")
        if method not in methods or "=" not in option:
            raise ValueError(f"--distill-set {text!r}: expected METHOD:COMPONENT.OPTION=VALUE with METHOD one of "
                             f"{', '.join(methods)}")
        sets.setdefault(method, []).append(option)
    return sets


def set_args(options: list[str]) -> list[str]:
    """``--set OPTION`` for each of a method's ``--distill-set`` options."""
    return [arg for option in options for arg in ("--set", option)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scale", choices=list(SCALES), default="smoke")
    parser.add_argument("--datasets", nargs="+", default=["mnist", "fashionmnist"])
    parser.add_argument("--ipc", type=int, nargs="+", default=[1, 10])
    parser.add_argument("--methods", nargs="+", default=["random", "dm", "m3d"])
    parser.add_argument("--protocols", nargs="+", choices=sorted({p for ps in PROTOCOLS.values() for p in ps}),
                        help="evaluate only under these of each method's protocols (default: all of them)")
    parser.add_argument("--epochs", type=int, help="override the scale's evaluation epochs")
    parser.add_argument("--runs", type=int, help="override the scale's evaluation runs")
    parser.add_argument("--iterations", type=int, help="override the scale's condense iterations")
    add_distill_set_option(parser)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--work", type=Path, default=Path("runs/benchmarks"), help="where run directories go")
    args = parser.parse_args()

    scale = SCALES[args.scale]
    epochs, runs = args.epochs or scale["epochs"], args.runs or scale["runs"]
    device = resolve_device(args.device)
    distilled = [m for m in args.methods if m != "random"]
    try:
        extra_sets = distill_sets(args.distill_set, distilled)
    except ValueError as error:
        parser.error(str(error))
    rows = []
    for ipc in args.ipc:  # small IPCs first: the quick cells land early
        for dataset in args.datasets:
            baseline_done = False
            for method in distilled:
                run_dir = args.work / args.scale / f"{method}-{dataset}-ipc{ipc}"
                _cli("distill", "--method", method, "--dataset", dataset, "--ipc", ipc, "--seed", args.seed,
                     "--device", args.device, "--out", run_dir, "--overwrite", *scale["distill"],
                     *(["--iterations", args.iterations] if args.iterations else []),
                     *set_args(extra_sets.get(method, [])))
                config = json.loads((run_dir / "config.json").read_text())
                for protocol in PROTOCOLS.get(method, ("dc-classic",)):
                    if args.protocols and protocol not in args.protocols:
                        continue
                    with_baseline = "random" in args.methods and not baseline_done and protocol == "dc-classic"
                    _cli("evaluate", run_dir, "--protocol", protocol, "--epochs", epochs, "--runs", runs,
                         "--device", args.device, "--baseline" if with_baseline else "--no-baseline")
                    baseline_done |= with_baseline
                    report = json.loads((run_dir / "eval.json").read_text())
                    for row in report["results"]:
                        if (row["protocol"] != protocol or row["protocol_settings"]["epochs"] != epochs
                                or row["runs"] != runs):
                            continue
                        name = method if row["kind"] == "synthetic" else "random"
                        published = PUBLISHED.get((dataset, ipc), {}).get(name)
                        rows.append({
                            **provenance(), "dataset": dataset, "ipc": ipc, "method": name, "mean": row["mean"],
                            "std": row["std"],
                            "accuracies": row["accuracies"], "model": row["model"], "protocol": row["protocol"],
                            "protocol_settings": row["protocol_settings"],
                            "epochs": epochs, "runs": runs, "seed": args.seed,
                            **({"iterations": config["iterations"], "batch_real": config["batch_real"],
                                "lr_img": config["lr_img"]} if name != "random" else {}),
                            **({"distill_sets": extra_sets[method]} if name != "random" and method in extra_sets
                               else {}),
                            "published": published[0] if published else None,
                            "published_std": published[1] if published else None,
                            "published_verified": published[2] if published else None,
                        })
                    save(rows, args.scale, scale, device)  # after every evaluation: a long grid keeps what it has
    print_table(rows, ["dataset", "ipc", "method", "protocol", "mean", "std", "published", "iterations", "batch_real"],
                title=f"accuracy ({args.scale} scale, {epochs} epochs x {runs} runs, {device})")
    print(f"wrote {save(rows, args.scale, scale, device)}")


def save(rows: list[dict], scale_name: str, scale: dict, device) -> Path:
    """Write this grid's rows, keeping the cells of an earlier grid at the same scale settings that this one
    did not run (so a grid can be completed piece by piece, each row keeping its own date)."""
    name = f"accuracy-{scale_name}"
    rows = with_earlier_rows(name, device, rows, lambda r: (r["dataset"], r["ipc"], r["method"], protocol_label(r)),
                             same_settings={"scale_settings": scale})
    path = write_report(name, device, rows, {"scale": scale_name, "scale_settings": scale})
    (RESULTS / f"{name}-{device_label(device)}.md").write_text(render_markdown(rows, scale_name, device_label(device)))
    return path


def protocol_label(row: dict) -> str:
    """The protocol a row was measured under; ``†`` marks rows measured before the protocols followed their
    references (stop 12: augmentation op per sample, ``E`` epochs with the decay at ``E/2``)."""
    return row["protocol"] if "protocol_settings" in row else f"{row['protocol']}†"


OLD_PROTOCOL_NOTE = ("† measured before `dc-classic` followed DC's `evaluate_synset` (then: one augmentation op per "
                     "sample, E epochs with the decay at E/2; now one op per batch, E+1 epochs, decay after E//2+1).")


METHOD_ORDER = {"random": 0, "dm": 1, "m3d": 2, "idm": 3, "datadam": 4, "ncfm": 5}


def grid_order(row: dict) -> tuple:
    """Where a row goes in a printed grid: by IPC and dataset, today's protocols before the † ones, then
    random, DM and the methods built on it in the order they appeared."""
    label = protocol_label(row)
    return row["ipc"], row["dataset"], label != "dc-classic", label, METHOD_ORDER.get(row["method"], 9)


def published_label(row: dict) -> str:
    """A row's published figure (``–`` when none), ``*`` when not yet verified against the paper."""
    if row["published"] is None:
        return "–"
    return (f"{row['published']:.1f}" + (f" ± {row['published_std']:.1f}" if row["published_std"] else "")
            + ("" if row["published_verified"] else " *"))


def render_markdown(rows: list[dict], scale: str, device: str) -> str:
    lines = [f"Accuracy (%), ConvNet-3, {scale} scale, {device}; mean ± std over evaluation runs, under the "
             f"protocol named on each row. Published: method-notes.md (* = not yet verified against the paper). "
             + OLD_PROTOCOL_NOTE, "",
             "| dataset | IPC | method | protocol | distillkit | published | iterations | real/class |",
             "|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=grid_order):
        iterations, real = r.get("iterations", "–"), r.get("batch_real", "–")
        lines.append(f"| {r['dataset']} | {r['ipc']} | {r['method']} | {protocol_label(r)} | {r['mean']:.2f} ± {r['std']:.2f} | "
                     f"{published_label(r)} | {iterations} | {real} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
