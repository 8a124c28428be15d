"""Image learning rates measured where a method's default is a guess, at the accuracy grid's smoke budget.

Each cell ``METHOD:DATASET:IPC:LR[,LR...]`` distills with ``--lr-img LR`` and evaluates the set under
``dc-classic`` with the grid's settings (:data:`benchmarks.accuracy.SCALES`: same iterations, real images
per class, seeds, epochs and runs). The method's default learning rate is not rerun here: with the same seed
and budget it is the accuracy grid's own row, which the README table shows beside these rows (marked
``grid``). Writes ``benchmarks/results/learning_rate-smoke-<device>.json``; rows of earlier runs that this
one did not measure are kept, so the sweep can be completed in parts.

    python -m benchmarks.learning_rate --cells m3d:cifar10:1:0.25,1 dm:cifar10:10:0.5,2
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from benchmarks.accuracy import SCALES, _cli
from benchmarks.common import print_table, provenance, with_earlier_rows, write_report
from distillkit.devices import resolve_device

SCALE = "smoke"
NAME = f"learning_rate-{SCALE}"


def parse_cell(text: str) -> tuple[str, str, int, list[float]]:
    try:
        method, dataset, ipc, rates = text.split(":")
        return method, dataset, int(ipc), [float(r) for r in rates.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad cell {text!r}: expected METHOD:DATASET:IPC:LR[,LR...]") from None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cells", type=parse_cell, nargs="+", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--work", type=Path, default=Path("runs/benchmarks-lr"), help="where run directories go")
    args = parser.parse_args()
    scale, device = SCALES[SCALE], resolve_device(args.device)
    rows: list[dict] = []
    for method, dataset, ipc, rates in args.cells:
        for lr in rates:
            run_dir = args.work / f"{method}-{dataset}-ipc{ipc}-lr{lr:g}"
            _cli("distill", "--method", method, "--dataset", dataset, "--ipc", ipc, "--seed", args.seed,
                 "--device", args.device, "--lr-img", lr, "--out", run_dir, "--overwrite", *scale["distill"])
            _cli("evaluate", run_dir, "--protocol", "dc-classic", "--epochs", scale["epochs"], "--runs",
                 scale["runs"], "--device", args.device, "--no-baseline")
            row = json.loads((run_dir / "eval.json").read_text())["results"][0]
            config = json.loads((run_dir / "config.json").read_text())
            rows.append({**provenance(), "method": method, "dataset": dataset, "ipc": ipc, "lr_img": lr,
                         "mean": row["mean"], "std": row["std"], "accuracies": row["accuracies"],
                         "model": row["model"], "protocol": row["protocol"],
                         "protocol_settings": row["protocol_settings"], "iterations": config["iterations"],
                         "batch_real": config["batch_real"], "seed": args.seed})
            save(rows, scale, device)  # after every rate: a long sweep keeps what it has
    print_table(rows, ["method", "dataset", "ipc", "lr_img", "mean", "std"], title=f"learning rates ({device})")
    print(f"wrote {save(rows, scale, device)}")


def save(rows: list[dict], scale: dict, device) -> Path:
    rows = with_earlier_rows(NAME, device, rows, lambda r: (r["method"], r["dataset"], r["ipc"], r["lr_img"]),
                             same_settings={"scale_settings": scale})
    return write_report(NAME, device, rows, {"scale": SCALE, "scale_settings": scale})


if __name__ == "__main__":
    main()
