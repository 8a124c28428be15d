"""Full-data references: each evaluator trained on the whole training split, for the accuracy grid's scores.

For each dataset and protocol, ``--runs`` ConvNet-3 networks train on the full training split under the
protocol as the grid evaluates (hard labels, :meth:`for_dataset` applied) but for ``--epochs`` epochs, through
:func:`distillkit.references.full_data_accuracy` (so they land in, or come from, the same cache
``distillkit evaluate --full-data-epochs`` uses). ``python -m benchmarks.report`` scores the grid's rows
against them (:mod:`distillkit.scores`). Writes ``benchmarks/results/full_data-smoke-<device>.json``; rows of
earlier runs that this one did not measure are kept.

    python -m benchmarks.full_data --datasets mnist fashionmnist cifar10 --protocols dc-classic --epochs 1
"""

from __future__ import annotations

import argparse

from benchmarks.accuracy import SCALES
from benchmarks.common import print_table, provenance, with_earlier_rows, write_report
from distillkit import registry
from distillkit.data import data_context, load_split, resolve_root
from distillkit.devices import resolve_device
from distillkit.evaluate import resolve_protocol
from distillkit.models import builder
from distillkit.references import full_data_accuracy

NAME = "full_data-smoke"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--datasets", nargs="+", default=["mnist", "fashionmnist", "cifar10"])
    parser.add_argument("--protocols", nargs="+", default=["dc-classic"])
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--runs", type=int, default=SCALES["smoke"]["runs"])
    parser.add_argument("--model", default="convnet3")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    registry.load_plugins()
    device, root = resolve_device(args.device), resolve_root()
    rows: list[dict] = []
    for dataset_name in args.datasets:
        dataset = registry.create("datasets", dataset_name)
        test = load_split(dataset, root, train=False, device=device).as_training_set()
        data = data_context(dataset, {}, root, device)
        for name in args.protocols:
            protocol = resolve_protocol(name, epochs=args.epochs).for_dataset(dataset_name)
            result = full_data_accuracy(protocol, builder(args.model, dataset.image_spec), data, test,
                                        dataset.image_spec, args.runs, args.seed)
            rows.append({**provenance(), "dataset": dataset_name, "protocol": name, "model": args.model,
                         "seed": args.seed, "protocol_settings": protocol.settings(),
                         **{k: result[k] for k in ("mean", "std", "accuracies", "epochs", "runs", "cache")}})
            save(rows, device)
    print_table(rows, ["dataset", "protocol", "epochs", "runs", "mean", "std", "cache"],
                title=f"full-data references ({device})")
    print(f"wrote {save(rows, device)}")


def save(rows: list[dict], device) -> str:
    rows = with_earlier_rows(NAME, device, rows, lambda r: (r["dataset"], r["protocol"], r["model"]))
    return write_report(NAME, device, rows)


if __name__ == "__main__":
    main()
