"""Hard-label and soft-label accuracy of distilled sets side by side, with the full-data reference and scores.

Each cell ``DATASET:IPC`` distills each method at the accuracy grid's smoke budget (same iterations, real
images per class and seed as :data:`benchmarks.accuracy.SCALES`), then evaluates the set and the random
subset of the same size twice with the same evaluators, epochs and runs: under ``dc-classic`` (hard labels)
and under ``soft-label`` (the same recipe on a cached teacher's soft labels, :mod:`distillkit.soft_labels`),
each with the full-data reference trained ``--full-data-epochs`` epochs (cached; scores in
:mod:`distillkit.scores`). Writes ``benchmarks/results/soft_labels-smoke-<device>.json``; rows of earlier runs
that this one did not measure are kept.

    python -m benchmarks.soft_labels --cells mnist:1 --methods dm m3d --teacher-epochs 2 --full-data-epochs 1
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from benchmarks.accuracy import SCALES, _cli
from benchmarks.common import print_table, provenance, with_earlier_rows, write_report
from distillkit.devices import resolve_device

NAME = "soft_labels-smoke"


def parse_cell(text: str) -> tuple[str, int]:
    try:
        dataset, ipc = text.split(":")
        return dataset, int(ipc)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad cell {text!r}: expected DATASET:IPC") from None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cells", type=parse_cell, nargs="+", required=True)
    parser.add_argument("--methods", nargs="+", default=["dm", "m3d"])
    parser.add_argument("--teacher-epochs", type=int, default=2)
    parser.add_argument("--full-data-epochs", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--work", type=Path, default=Path("runs/benchmarks-soft"), help="where run directories go")
    args = parser.parse_args()
    scale, device = SCALES["smoke"], resolve_device(args.device)
    common = ["--epochs", scale["epochs"], "--runs", scale["runs"], "--device", args.device,
              "--full-data-epochs", args.full_data_epochs]
    rows: list[dict] = []
    for dataset, ipc in args.cells:
        for method in args.methods:
            run_dir = args.work / f"{method}-{dataset}-ipc{ipc}"
            _cli("distill", "--method", method, "--dataset", dataset, "--ipc", ipc, "--seed", args.seed,
                 "--device", args.device, "--out", run_dir, "--overwrite", *scale["distill"])
            _cli("evaluate", run_dir, "--protocol", "dc-classic", *common)
            _cli("evaluate", run_dir, "--protocol", "soft-label", "--set",
                 f"protocol.teacher_epochs={args.teacher_epochs}", *common)
            for row in json.loads((run_dir / "eval.json").read_text())["results"]:
                rows.append({**provenance(), "dataset": dataset, "ipc": ipc, "method": method, "kind": row["kind"],
                             "labels": row["protocol_settings"].get("labels", "hard"), **{
                                 k: row.get(k) for k in ("mean", "std", "accuracies", "model", "protocol",
                                                         "protocol_settings", "details", "scores", "references")},
                             "seed": args.seed, "distill": scale["distill"]})
            save(rows, device)  # after every method: a long run keeps what it has
    print_table([{**r, **(r.get("scores") or {})} for r in rows if r["kind"] == "synthetic"],
                ["dataset", "ipc", "method", "labels", "mean", "std", "improvement_over_random",
                 "hard_label_recovery", "label_robust_score"], title=f"hard vs soft labels ({device})")
    print(f"wrote {save(rows, device)}")


def save(rows: list[dict], device) -> Path:
    rows = with_earlier_rows(NAME, device, rows, lambda r: (r["dataset"], r["ipc"], r["method"], r["kind"], r["labels"]))
    return write_report(NAME, device, rows, {"scale_settings": SCALES["smoke"]})


if __name__ == "__main__":
    main()
