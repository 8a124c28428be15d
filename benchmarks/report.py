"""Render README's "Results" section from the JSON files in ``benchmarks/results/``.

Every table is read from a result file, and each says where it came from (file, command, date,
machine), so the README never holds a number typed by hand. Sections whose file is missing are left
out. The text between the ``results:begin`` and ``results:end`` markers is replaced; the rest of
README.md is untouched.

    python -m benchmarks.report            # rewrite README.md
    python -m benchmarks.report --check    # exit 1 if README.md is not what the files render
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable

from benchmarks.accuracy import OLD_PROTOCOL_NOTE, grid_order, protocol_label, published_label
from benchmarks.common import RESULTS
from distillkit.scores import scores

README = Path(__file__).resolve().parent.parent / "README.md"
BEGIN, END = "<!-- results:begin (python -m benchmarks.report) -->", "<!-- results:end -->"


def _command(recorded: str) -> str:
    """A recorded command as a reader would type it: ``python -m benchmarks.X ...``."""
    python, script, *args = recorded.split()
    if script == "-m":
        return recorded.replace(python, "python", 1)
    path = Path(script)
    script = f"-m benchmarks.{path.stem}" if path.parent.name == "benchmarks" else f"{path.name} (outside this repository)"
    return " ".join(["python", script, *args])


def _source(name: str, report: dict[str, Any]) -> str:
    machine = report["machine"]
    where = machine.get("gpu") or f"{machine['cpu_count']}-core CPU ({machine['processor']})"
    command = _command(report["command"])
    return (f"Source: `benchmarks/results/{name}` ({report['date']}, {where}, torch "
            f"{report['versions'].get('torch', '?')}; `{command}`).")


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _pm(mean: float, std: float | None) -> str:
    return f"{mean:.2f} ± {std:.2f}" if std is not None else f"{mean:.2f}"


def _full_data(name: str) -> dict[tuple[str, str], dict[str, Any]]:
    """The full-data references measured beside the grid ``name``, by (dataset, protocol)."""
    path = RESULTS / name.replace("accuracy-", "full_data-")
    rows = json.loads(path.read_text())["rows"] if path.exists() else []
    return {(r["dataset"], r["protocol"]): r for r in rows}


def _grid_scores(row: dict[str, Any], rows: list[dict[str, Any]], full: dict[tuple[str, str], dict]) -> list[str]:
    """IOR, hard-label recovery and LRS of a grid row against the random row of its cell and the full-data
    reference of its dataset and protocol (the same recipe but the epochs; '–' where one is missing)."""
    random = [r for r in rows if r["method"] == "random" and (r["dataset"], r["ipc"], protocol_label(r)) ==
              (row["dataset"], row["ipc"], protocol_label(row))]
    if row["method"] == "random" or not random:
        return ["–"] * 3
    reference = full.get((row["dataset"], protocol_label(row)))
    less = lambda s: {k: v for k, v in (s or {}).items() if k not in ("epochs", "name")}  # noqa: E731
    if reference and less(reference["protocol_settings"]) != less(row.get("protocol_settings")):
        reference = None  # another recipe: no score
    got = scores(row["mean"], random[0]["mean"], row["mean"], random[0]["mean"],
                 reference["mean"] if reference else None)
    form = lambda key, spec: "–" if got[key] is None else format(got[key], spec)  # noqa: E731
    return [form("improvement_over_random", "+.2f"), form("hard_label_recovery", ".3f"),
            form("label_robust_score", ".3f")]


def _method(row: dict[str, Any]) -> str:
    """A row's method, marked ``‡`` when it was distilled with extra settings (:func:`_distill_sets_note`)."""
    return row["method"] + (" ‡" if row.get("distill_sets") else "")


def _distill_sets_note(rows: list[dict[str, Any]]) -> str | None:
    marked = sorted({f"{r['method']}: `{' '.join(r['distill_sets'])}`" for r in rows if r.get("distill_sets")})
    return f"‡ distilled with extra settings beside the scale's: {'; '.join(marked)}." if marked else None


def accuracy(name: str, report: dict[str, Any]) -> str:
    rows = sorted(report["rows"], key=grid_order)
    full = _full_data(name)
    table = []
    for r in rows:
        table.append([r["dataset"], str(r["ipc"]), _method(r), protocol_label(r), _pm(r["mean"], r["std"]),
                      *_grid_scores(r, rows, full), published_label(r), str(r.get("iterations", "–")),
                      str(r.get("batch_real", "–"))])
    cells: dict[tuple[str, int, str], dict[str, float]] = {}
    for r in rows:
        cells.setdefault((r["dataset"], r["ipc"], protocol_label(r)), {})[r["method"]] = r["mean"]
    verdicts, against_dm = [], []
    for (dataset, ipc, protocol), means in cells.items():
        if {"random", "dm", "m3d"} <= set(means):
            holds = means["m3d"] >= means["dm"] > means["random"]
            verdicts.append(f"{dataset} IPC {ipc} ({protocol}): {'yes' if holds else '**no**'}")
        for method in ("idm", "datadam", "ncfm"):  # the later DM-family methods, each against DM in the same cell
            if {method, "dm"} <= set(means):
                holds = means[method] >= means["dm"]
                against_dm.append(f"{method} on {dataset} IPC {ipc} ({protocol}): {'yes' if holds else '**no**'}")
    settings = report["scale_settings"]
    cells_by_command: dict[str, list[str]] = {}
    for r in rows:
        cell = f"{r['dataset']} IPC {r['ipc']}"
        cells = cells_by_command.setdefault(r.get("command", report["command"]), [])
        if cell not in cells:
            cells.append(cell)
    return "\n\n".join(filter(None, [
        f"**Accuracy, {report['scale']} scale**: ConvNet-3, {settings['epochs']} epochs x {settings['runs']} "
        f"evaluation runs, mean ± std, under the protocol named on each row (`dc-classic`: DC's evaluate_synset, "
        f"shared by every method and the random baseline; `idc`: IDC's protocol, under which M3D's paper reports); "
        f"condense settings in the last two columns. Published figures are full-scale (method-notes.md; * = not "
        f"yet verified against the paper) and are there for orientation only. "
        + (OLD_PROTOCOL_NOTE if any("protocol_settings" not in r for r in rows) else ""),
        "Scores (`distillkit.scores`): `vs random`, the improvement over the random row of the cell in points; "
        "`recovery`, the share of the random-to-full-data gap the set closes; `LRS`, DD-Ranking's label-robust "
        "score on fractions. The full-data references are the next table's (hard labels, far fewer epochs than "
        "the rows: a CPU budget, so `recovery` overstates what the sets recover at full scale); `–` where the cell "
        "has no random row under the same protocol (`idc`) or no reference of the same recipe exists (the † rows' "
        "recipe is gone)." if full else None,
        _table(["dataset", "IPC", "method", "protocol", "distillkit", "vs random", "recovery", "LRS", "published",
                "iterations", "real/class"], table),
        _distill_sets_note(rows),
        ("M3D ≥ DM > random: " + "; ".join(verdicts) + ".") if verdicts else None,
        ("At least DM's accuracy: " + "; ".join(against_dm) + ".") if against_dm else None,
        _source(name, report),
        ("The grid was completed in parts (each row records its command and date): "
         + "; ".join(f"{', '.join(cells)} by `{_command(command)}`" for command, cells in cells_by_command.items())
         + ".") if len(cells_by_command) > 1 else None]))


def full_data(name: str, report: dict[str, Any]) -> str:
    table = [[r["dataset"], r["protocol"], r["model"], str(r["epochs"]), str(r["runs"]), _pm(r["mean"], r["std"])]
             for r in report["rows"]]
    return "\n\n".join([
        "**Full-data references** of the scores above: ConvNet-3 trained on the whole training split under the "
        "row's protocol with hard labels, for the epochs shown (`distillkit.references`, cached).",
        _table(["dataset", "protocol", "model", "epochs", "runs", "accuracy (%)"], table), _source(name, report),
        *(["Rows measured in parts: " + "; ".join(f"{r['dataset']} by `{_command(r['command'])}` ({r['date']}, "
                                                  f"cache {r['cache']})" for r in report["rows"]) + "."]
          if len({r.get("command") for r in report["rows"]}) > 1 else [])])


def soft_labels(name: str, report: dict[str, Any]) -> str:
    rows = [r for r in report["rows"] if r["kind"] == "synthetic"]
    randoms = {(r["dataset"], r["ipc"], r["labels"]): r for r in report["rows"] if r["kind"] == "random-baseline"}
    table = []
    for r in sorted(rows, key=lambda r: (r["dataset"], r["ipc"], r["method"], r["labels"] != "hard")):
        got, references = r.get("scores") or {}, r.get("references") or {}
        teacher = (r.get("details") or {}).get("teacher")
        form = lambda key, spec: "–" if got.get(key) is None else format(got[key], spec)  # noqa: E731
        random = randoms.get((r["dataset"], r["ipc"], r["labels"]))
        table.append([r["dataset"], str(r["ipc"]), r["method"], r["protocol"], _pm(r["mean"], r["std"]),
                      _pm(random["mean"], random["std"]) if random else "–",
                      f"{references['full_data']['mean']:.2f}" if references.get("full_data") else "–",
                      f"{teacher['test_accuracy']:.2f}" if teacher else "–",
                      form("improvement_over_random", "+.2f"), form("hard_label_recovery", ".3f"),
                      form("label_robust_score", ".3f")])
    example = next((r for r in rows if r["labels"] != "hard"), rows[0])
    settings = example["protocol_settings"]
    return "\n\n".join([
        f"**Hard and soft labels**, the same sets and random subsets under `dc-classic` and `soft-label` "
        f"(its recipe on a ConvNet-3 teacher's soft labels, KL at temperature {settings.get('temperature', '–')}, "
        f"teacher trained {settings.get('teacher_epochs', '–')} (+1) epochs on the full training split): "
        f"{settings['epochs']} epochs x {len(example['accuracies'])} runs, condensed at the grid's smoke budget. "
        f"The soft rows' LRS takes HLR from the hard rows (DD-Ranking's definition), and `recovery` is a hard-label "
        f"score, the same on both rows of a set; `teacher` is its own test accuracy. The full-data reference "
        f"trained {example['references']['full_data']['epochs'] if (example.get('references') or {}).get('full_data') else '–'} "
        f"epoch(s) here.",
        _table(["dataset", "IPC", "method", "protocol", "synthetic", "random", "full data", "teacher", "vs random",
                "recovery", "LRS"], table),
        _source(name, report)])


def sweep(name: str, report: dict[str, Any]) -> str:
    """Each swept setting's rows beside the grid's row at the setting's default (same seed and budget)."""
    grid_path = RESULTS / name.replace("sweep-", "accuracy-")
    grid = json.loads(grid_path.read_text())["rows"] if grid_path.exists() else []
    cells = list(dict.fromkeys((r["method"], r["dataset"], r["ipc"], r["setting"]) for r in report["rows"]))
    table = []
    for method, dataset, ipc, setting in cells:
        rows = [(r["value"], r, "sweep") for r in report["rows"]
                if (r["method"], r["dataset"], r["ipc"], r["setting"]) == (method, dataset, ipc, setting)]
        first = rows[0][1]
        # the grid row's own value where it records the setting (a default changed since the sweep ran)
        rows += [(r.get(setting, first["default"]), r, "grid (default)") for r in grid
                 if (r["method"], r["dataset"], r["ipc"], protocol_label(r)) == (method, dataset, ipc, "dc-classic")
                 and r.get("distill_sets") == first.get("distill_sets")]
        for value, r, source in sorted(rows, key=lambda x: x[0]):
            table.append([_method(r), dataset, str(ipc), f"`{setting}`", f"{value:g}" if isinstance(value, float) else
                          str(value), _pm(r["mean"], r["std"]), source, r["date"][:10]])
    return "\n\n".join([
        "**Settings swept** at the accuracy grid's smoke budget (100 iterations, 64 real images per class; "
        "ConvNet-3 evaluators under `dc-classic`, 300 epochs, 3 runs, final iterates): image learning rates where "
        "a default was a guess, and ablations that say where a method's accuracy comes from. `grid (default)` is "
        "the grid's own row at the setting's default, same seed. These are test-split accuracies (the protocols "
        "have no validation split), so a default changed after them would be chosen on test data: they are "
        "reported, not used to pick.",
        _table(["method", "dataset", "IPC", "setting", "value", "accuracy (%)", "row from", "measured"], table),
        *filter(None, [_distill_sets_note(report["rows"])]), _source(name, report)])


def speed(name: str, report: dict[str, Any]) -> str:
    ratio = lambda v: f"{v:.2f}" if v is not None else ""  # noqa: E731
    inputs = list(dict.fromkeys(r["input"] for r in report["rows"]))
    rows = sorted(report["rows"], key=lambda r: (inputs.index(r["input"]), r["ipc"]))  # stable: run order within
    table = [[r["input"], str(r["ipc"]), r["variant"], f"{r['s_per_iter']:.3f}", ratio(r["ratio_to_dm"]),
              ratio(r.get("ratio_to_default")), r.get("date", report["date"])[:10]] for r in rows]
    return "\n\n".join([
        f"**Condense speed**: seconds per iteration at 256 real images per class, median of "
        f"{report['timed_iterations']} round-robin iterations. `vs dm`: against `dm` at the same input and IPC, "
        "timed in the same run (`measured`: the run's date); "
        "`vs default`: a variant against its method's defaults (`per-class-real`: one real forward per class, the "
        "reference codes' shape; `one-call-real`: all real images in one extractor call; `amp`: bf16 autocast).",
        _table(["input", "IPC", "variant", "s/iteration", "vs dm", "vs default", "measured"], table),
        _source(name, report)])


def reference(name: str, report: dict[str, Any]) -> str:
    table = [[str(r["ipc"]), r["implementation"], str(r["batch_real"]), f"{r['s_per_iter']:.3f}",
              f"{r['speedup_vs_reference']:.2f}x"] for r in report["rows"]]
    return "\n\n".join([
        " ".join(["**DM against the public reference implementation** (MNIST, one iteration).", report["how"],
                  report.get("note", "").rstrip(".") + "." if report.get("note") else ""]).strip(),
        _table(["IPC", "implementation", "real/class", "s/iteration", "speedup"], table), _source(name, report)])


def reference_eval(name: str, report: dict[str, Any]) -> str:
    table = [[str(r["ipc"]), r["implementation"], f"{r['s_per_evaluation']:.1f}", f"{r['cpu_s_per_evaluation']:.1f}",
              f"{r['cpu_speedup_vs_reference']:.2f}x", " ".join(f"{a:.1f}" for a in r["accuracies"])]
             for r in report["rows"]]
    return "\n\n".join([
        f"**Evaluation against the public reference** (MNIST, {report['epochs_trained']} epochs trained, "
        f"{report['test_limit']} test images, best of {report['repeats']}). {report['how'].rstrip('.')}.",
        _table(["IPC", "implementation", "wall s", "CPU s", "CPU speedup", "accuracies"], table),
        _source(name, report)])


def m3d_vs_dm(name: str, report: dict[str, Any]) -> str:
    table = [[str(r["ipc"]), r["variant"], r["step"], str(r["syn_per_class"]), f"{r['s_per_iter']:.3f}",
              f"{r['ratio_to_dm']:.2f}"] for r in report["rows"]]
    return "\n\n".join([
        f"**M3D against DM** ({report['dataset']}, 256 real images per class, mean of {report['timed_iterations']} "
        "round-robin iterations, one full encoder period). Target: M3D at most 1.2x DM.",
        _table(["IPC", "variant", "step", "decoded/class", "s/iteration", "vs dm"], table), _source(name, report)])


def eval_speed(name: str, report: dict[str, Any]) -> str:
    table = [[str(r["ipc"]), r["path"], str(r["runs"]), f"{r['train_cpu_s_per_epoch']:.3f}",
              f"{r['train_s_per_epoch']:.3f}", f"{r['test_s']:.1f}", f"{r['mean_acc']:.2f}"] for r in report["rows"]]
    key = "stacked/sequential train_cpu_s_per_epoch"
    ratios = {r["ipc"]: r[key] for r in report["rows"] if key in r}
    return "\n\n".join([
        f"**Evaluation speed**: ConvNet-3 runs trained stacked (vmap) or one by one, {report['epochs_trained']} "
        "epochs timed. Stacked / sequential CPU time per epoch: "
        + ", ".join(f"IPC {ipc}: {v:.2f}" for ipc, v in ratios.items() if v is not None) + ".",
        _table(["IPC", "path", "runs", "train CPU s/epoch", "train wall s/epoch",
                f"test s ({report['test_limit']} images x runs)", "mean accuracy"], table),
        _source(name, report)])


def distributed(name: str, report: dict[str, Any]) -> str:
    table = [[r["task"], str(r["processes"]), str(r["threads_per_process"]), f"{r['wall_s']:.1f}",
              f"{r['speedup']:.2f}x", {None: "–", True: "yes", False: "**no**"}[r["same_result"]]]
             for r in report["rows"]]
    s = report["settings"]
    return "\n\n".join([
        f"**torchrun processes against one process**, end to end (launch to exit): `distill` DM MNIST IPC 10, "
        f"{s['iterations']} iterations at {s['batch_real']} real images per class; `evaluate` of that run, smoke "
        f"protocol, {s['epochs']} epochs x {s['runs']} runs plus the baseline. Median of {s['rounds']} round-robin "
        "rounds, speedup against the first row. `same result`: the sharded set equals the set of one process with "
        "the same threads per process bit for bit, and the accuracies are equal exactly (the kernels' float "
        "reductions depend on the thread count, not on the sharding).",
        _table(["task", "processes", "threads each", "wall s", "speedup", "same result"], table),
        _source(name, report)])


def imagenet_scale(name: str, report: dict[str, Any]) -> str:
    s = report["settings"]
    builds = [[str(r["size"]), str(r["workers"]), str(r["images"]), f"{r['seconds']:.1f}", f"{r['images_per_s']:.0f}",
               f"{r['cpu_ms_per_image']:.1f}"] for r in report["rows"] if r["kind"] == "cache build"]
    condense = [r for r in report["rows"] if r["kind"] == "condense"]
    cuda = any(r.get("cuda_peak_mib") is not None for r in condense)
    table = [[str(r["size"]), r["method"], str(r["ipc"]), str(r["decoded_per_class"]), f"{r['startup_s']:.2f}",
              f"{r['s_per_iter']:.2f}", f"{r['anon_after_startup_mib']:.0f}", f"{r['peak_anon_mib']:.0f}",
              f"{r['peak_rss_mib']:.0f}", f"{r['split_float32_mib']:.0f}"]
             + ([f"{r['cuda_peak_mib']:.0f}"] if cuda else []) for r in condense]
    return "\n\n".join(filter(None, [
        f"**ImageNet subsets at scale** (a generated Imagenette tree: 10 classes x {s['per_class']} training JPEGs of "
        "ImageNet's sizes, 500x375 and the like). The first use of a split decodes it into the cache, with 1 and with "
        "several decoding processes; CPU ms per image counts the workers too (on a loaded machine the wall time of "
        "several processes says little):",
        _table(["px", "processes", "images", "build s", "images/s", "CPU ms/image"], builds),
        f"Every later start-up lists the folder and memory-maps the cache (`start-up s`: `load_split` in a fresh "
        f"process). Condense from the cache, one process per row, {s['batch_real']} real images per class, "
        f"{s['real_chunk']} classes per forward and backward (`--real-chunk`, real and synthetic side), median of "
        f"{s['iterations']} iteration(s) after a warm-up. `anon` is the process's own memory, after start-up and at "
        "its peak: the split is never in it (compare the last column); peak RSS also counts file pages (torch's "
        "libraries, the cache pages touched). What still grows is one chunk's decoded images and their activations "
        "(decoded/class x chunk): lower `--real-chunk` to bound it.",
        _table(["px", "method", "IPC", "decoded/class", "start-up s", "s/iteration", "anon after start-up MiB",
                "peak anon MiB", "peak RSS MiB", "split as float32 MiB"] + (["CUDA peak MiB"] if cuda else []),
               table),
        _skipped(s["skipped"], condense, s["classes"]),
        _source(name, report)]))


def _skipped(skipped: list[str], rows: list[dict[str, Any]], classes: int) -> str | None:
    """The configurations not run, each with its peak extrapolated linearly in decoded images from the rows
    measured at its size (decoded images per stored one taken from a measured row of the same method)."""
    notes = []
    for key in skipped:
        size, method, ipc = key.split(":")
        same = [r for r in rows if r["size"] == int(size)]
        ratio = next((r["decoded_per_class"] / r["ipc"] for r in same if r["method"] == method), None)
        if len({r["decoded_per_class"] for r in same}) < 2 or ratio is None:
            notes.append(f"{method.upper()} IPC {ipc} at {size} px")
            continue
        low, high = min(same, key=lambda r: r["decoded_per_class"]), max(same, key=lambda r: r["decoded_per_class"])
        slope = (high["peak_anon_mib"] - low["peak_anon_mib"]) / (high["decoded_per_class"] - low["decoded_per_class"])
        decoded = ratio * int(ipc)
        estimate = high["peak_anon_mib"] + slope * (decoded - high["decoded_per_class"])
        notes.append(f"{method.upper()} IPC {ipc} at {size} px: {decoded:.0f} decoded images per class, peak anon "
                     f"≈ {estimate / 1024:.1f} GiB (extrapolated from the rows above at {size} px: "
                     f"{slope / classes:.0f} MiB per decoded image)")
    return f"Not run on this shared machine: {'; '.join(notes)}." if notes else None


#: (section renderer, result file); a section whose file is missing is left out
SECTIONS: list[tuple[Callable[[str, dict[str, Any]], str], str]] = [
    (accuracy, "accuracy-smoke-cpu.json"), (full_data, "full_data-smoke-cpu.json"),
    (accuracy, "accuracy-paper-cuda.json"), (soft_labels, "soft_labels-smoke-cpu.json"),
    (soft_labels, "soft_labels-smoke-cuda.json"), (sweep, "sweep-smoke-cpu.json"),
    (speed, "speed-cpu.json"), (speed, "speed-cuda.json"), (reference, "reference_dm-cpu.json"),
    (reference_eval, "reference_eval-cpu.json"), (reference_eval, "reference_eval-cuda.json"),
    (m3d_vs_dm, "m3d_vs_dm-cpu.json"), (eval_speed, "eval_speed-cpu.json"), (eval_speed, "eval_speed-cuda.json"),
    (distributed, "distributed-cpu.json"), (imagenet_scale, "imagenet_scale-cpu.json"),
    (imagenet_scale, "imagenet_scale-cuda.json"),
]


def render() -> str:
    parts = [section(name, json.loads((RESULTS / name).read_text()))
             for section, name in SECTIONS if (RESULTS / name).exists()]
    intro = ("Every number below is rendered by `python -m benchmarks.report` from a JSON file in "
             "`benchmarks/results/` that records the machine, device, package versions and the exact command. "
             "The CPU figures come from a shared 2-core development machine: absolute seconds are noisy, so speed "
             "is compared as ratios measured side by side in one run.")
    if not any(RESULTS.glob("*-cuda.json")):
        intro += (" No GPU has been lent to this project's sessions yet, so there are no GPU figures; "
                  "`benchmarks/device.sh` produces all of them in one call of a lent GPU machine.")
    return "\n\n".join([intro, *parts])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="only check that README.md is up to date")
    args = parser.parse_args()
    text = README.read_text()
    if BEGIN not in text or END not in text:
        sys.exit(f"{README} has no {BEGIN} ... {END} markers")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    new = f"{head}{BEGIN}\n\n{render()}\n\n{END}{tail}"
    if args.check:
        sys.exit(0 if new == text else f"{README} is out of date: run python -m benchmarks.report")
    README.write_text(new)
    print(f"rendered {README}")


if __name__ == "__main__":
    main()
