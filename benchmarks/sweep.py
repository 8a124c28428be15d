"""One distill setting swept at the accuracy grid's smoke budget: image learning rates where a method's default
is a guess, and ablations that say where a method's accuracy comes from.

Each cell ``METHOD:DATASET:IPC:SETTING=VALUE[,VALUE...]`` distills once per value and evaluates the set under
``dc-classic`` with the grid's settings (:data:`benchmarks.accuracy.SCALES`: same iterations, real images per
class, seeds, epochs and runs). ``SETTING`` is a method field with a distill flag (``lr_img`` is
``--lr-img``, ``momentum``, ``iterations``) or a component option (``objective.attention_weight`` is ``--set
objective.attention_weight=VALUE``). The setting's default is not rerun here: with the same seed and budget it
is the accuracy grid's own row, which the README table shows beside these rows (marked ``grid``); each row
records that default. ``--distill-set`` adds the same extra settings as the grid's (a CPU-sized NCFM
pretraining), and a row is set beside the grid row distilled with the same ones. Writes
``benchmarks/results/sweep-smoke-<device>.json``; rows of earlier runs that this one did not measure are kept,
so a sweep can be completed in parts.

    python -m benchmarks.sweep --cells m3d:cifar10:1:lr_img=0.25,1 datadam:fashionmnist:1:objective.attention_weight=10
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import json
from pathlib import Path
from typing import Any

from benchmarks.accuracy import SCALES, _cli, add_distill_set_option, distill_sets, set_args
from benchmarks.common import print_table, provenance, with_earlier_rows, write_report
from distillkit import registry
from distillkit.catalog import HOST_ARGUMENTS, factory_options
from distillkit.config import parse_value, resolve
from distillkit.devices import resolve_device

SCALE = "smoke"
NAME = f"sweep-{SCALE}"
COMPONENTS = ("objective", "parameterization", "sampler", "dataset")


@dataclasses.dataclass(frozen=True)
class Cell:
    method: str
    dataset: str
    ipc: int
    setting: str
    values: tuple[str, ...]


def parse_cell(text: str) -> Cell:
    try:
        method, dataset, ipc, assignment = text.split(":")
        setting, values = assignment.split("=")
        cell = Cell(method, dataset, int(ipc), setting, tuple(values.split(",")))
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad cell {text!r}: expected METHOD:DATASET:IPC:SETTING=VALUE[,VALUE...]"
                                         ) from None
    if not all(cell.values) or not cell.setting:
        raise argparse.ArgumentTypeError(f"bad cell {text!r}: an empty setting or value")
    return cell


def flag(setting: str) -> str:
    """The distill flag of a method field: ``lr_img`` is ``--lr-img``."""
    return f"--{setting.replace('_', '-')}"


def distill_args(setting: str, value: str) -> list[str]:
    """The distill arguments that give ``setting`` the value ``value``."""
    return ["--set", f"{setting}={value}"] if "." in setting else [flag(setting), value]


def default_of(cell: Cell, scale: dict[str, Any]) -> Any:
    """What the grid's row used for the cell's setting: the scale's flag, else the method's field or component
    option, else the component factory's own default (a :class:`ValueError` for a setting that is none)."""
    method = registry.plugins()["methods"].get(cell.method).factory
    resolved = resolve(method, cell.dataset, cell.ipc, {})  # as the host runs it at the cell's IPC
    if "." not in cell.setting:
        if flag(cell.setting) in scale["distill"]:
            return parse_value(scale["distill"][scale["distill"].index(flag(cell.setting)) + 1])
        if cell.setting not in {f.name for f in dataclasses.fields(method)}:
            raise ValueError(f"{cell.setting!r} is not a field of method {cell.method!r}")
        return getattr(resolved, cell.setting, getattr(method, cell.setting))  # lr_img: the rate at the IPC
    component, option = cell.setting.split(".", 1)
    if component not in COMPONENTS:
        raise ValueError(f"component {component!r} of {cell.setting!r}: expected one of {', '.join(COMPONENTS)}")
    kind, name = (("datasets", cell.dataset) if component == "dataset"
                  else (f"{component}s", getattr(method, component)))
    if component != "dataset" and option in getattr(resolved, f"{component}_options"):  # ipc_options included
        return getattr(resolved, f"{component}_options")[option]
    options, _ = factory_options(registry.plugins()[kind].get(name).factory, HOST_ARGUMENTS.get(kind, ()))
    for candidate in options:
        if candidate.name == option:  # the signature's default, as its repr
            try:
                return ast.literal_eval(candidate.default)
            except (ValueError, SyntaxError):  # "required", or a default that is no literal
                return candidate.default
    raise ValueError(f"{kind[:-1]} {name!r} has no option {option!r}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cells", type=parse_cell, nargs="+", required=True)
    add_distill_set_option(parser)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--work", type=Path, default=Path("runs/benchmarks-sweep"), help="where run directories go")
    args = parser.parse_args()
    scale, device = SCALES[SCALE], resolve_device(args.device)
    try:  # every cell's setting checked before the first hour of distilling
        defaults = [default_of(cell, scale) for cell in args.cells]
        extra_sets = distill_sets(args.distill_set, list(dict.fromkeys(cell.method for cell in args.cells)))
    except ValueError as error:
        parser.error(str(error))
    rows: list[dict] = []
    for cell, default in zip(args.cells, defaults):
        for value in cell.values:
            run_dir = args.work / f"{cell.method}-{cell.dataset}-ipc{cell.ipc}-{cell.setting}{value}"
            _cli("distill", "--method", cell.method, "--dataset", cell.dataset, "--ipc", cell.ipc, "--seed",
                 args.seed, "--device", args.device, "--out", run_dir, "--overwrite", *scale["distill"],
                 *set_args(extra_sets.get(cell.method, [])),
                 *distill_args(cell.setting, value))
            _cli("evaluate", run_dir, "--protocol", "dc-classic", "--epochs", scale["epochs"], "--runs",
                 scale["runs"], "--device", args.device, "--no-baseline")
            row = json.loads((run_dir / "eval.json").read_text())["results"][0]
            config = json.loads((run_dir / "config.json").read_text())
            rows.append({**provenance(), "method": cell.method, "dataset": cell.dataset, "ipc": cell.ipc,
                         "setting": cell.setting, "value": parse_value(value), "default": default,
                         "mean": row["mean"], "std": row["std"], "accuracies": row["accuracies"],
                         "model": row["model"], "protocol": row["protocol"],
                         "protocol_settings": row["protocol_settings"], "iterations": config["iterations"],
                         "batch_real": config["batch_real"], "lr_img": config["lr_img"], "seed": args.seed,
                         **({"distill_sets": extra_sets[cell.method]} if cell.method in extra_sets else {})})
            save(rows, scale, device)  # after every value: a long sweep keeps what it has
    print_table(rows, ["method", "dataset", "ipc", "setting", "value", "mean", "std"], title=f"sweep ({device})")
    print(f"wrote {save(rows, scale, device)}")


def save(rows: list[dict], scale: dict, device) -> Path:
    rows = with_earlier_rows(NAME, device, rows,
                             lambda r: (r["method"], r["dataset"], r["ipc"], r["setting"], r["value"]),
                             same_settings={"scale_settings": scale})
    return write_report(NAME, device, rows, {"scale": SCALE, "scale_settings": scale})


if __name__ == "__main__":
    main()
