"""The ``distillkit`` command line (also ``python -m distillkit``)."""

from __future__ import annotations

import errno
import signal
import sys
from pathlib import Path

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from distillkit import __version__, registry
from distillkit.devices import rank as _rank
from distillkit.errors import UsageError

console = Console(stderr=True, quiet=_rank() > 0)
# piped or redirected: tables as wide as their rows instead of wrapped at 80 columns
out = Console(quiet=_rank() > 0, width=None if sys.stdout.isatty() else 100_000)


def device_options(command):
    """``--device``, ``--data-root`` and ``--deterministic``, shared by every command that trains (one policy,
    one help text)."""
    command = click.option("--deterministic/--no-deterministic", default=None,
                           help="torch's deterministic algorithms: bit-identical reruns on CUDA, where ops without "
                                "a deterministic kernel then fail; CPUs are deterministic anyway.  [default: "
                                "off]")(command)
    command = click.option("--data-root", type=click.Path(path_type=Path),
                           help="Dataset folder (else $DISTILLKIT_DATA, else cache).")(command)
    return click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")(command)


class _Main(click.Group):
    """One line on stderr instead of a traceback (``--debug`` shows it): a :class:`UsageError` exits with
    status 2, a file-system failure (disk full, read-only, permission denied) with 1, Ctrl-C with 130."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (UsageError, OSError, KeyboardInterrupt) as exc:
            if ctx.meta.get("distillkit.debug"):
                raise
            click.echo(f"Error: {_one_line(exc)}", err=True)
            ctx.exit(2 if isinstance(exc, UsageError) else 130 if isinstance(exc, KeyboardInterrupt) else 1)


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted"
    if isinstance(exc, OSError) and exc.strerror:
        where = f" {exc.filename}" if exc.filename else ""
        return f"cannot write{where}: {exc.strerror}" if exc.errno in _WRITE_ERRORS else f"{exc.strerror}:{where}"
    return " ".join(line.strip() for line in str(exc).splitlines() if line.strip())


_WRITE_ERRORS = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT, errno.EFBIG}


@click.group(cls=_Main, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="distillkit")
@click.option("--plugins-dir", type=click.Path(file_okay=False, path_type=Path), envvar="DISTILLKIT_PLUGINS_DIR",
              help="Also load every *.py file in this directory as a plugin (env DISTILLKIT_PLUGINS_DIR).")
@click.option("--debug", is_flag=True, help="Show full tracebacks for errors.")
@click.pass_context
def cli(ctx: click.Context, plugins_dir: Path | None, debug: bool) -> None:
    """distillkit: learn tiny synthetic training sets (dataset distillation)."""
    ctx.meta["distillkit.debug"] = debug
    try:
        registry.load_plugins(plugins_dir)
    except UsageError as exc:
        if debug:
            raise
        click.echo(f"Error: {exc}", err=True)
        ctx.exit(2)


# -- distill ---------------------------------------------------------------

_RUN_OVERRIDES = ("objective", "parameterization", "sampler", "augment", "augment_strategy", "lr_img", "momentum",
                  "optimizer", "weight_decay", "iterations", "batch_real", "batch_syn", "step", "checkpoint_every", "log_every", "real_chunk",
                  "forward_batch", "amp", "channels_last", "deterministic")


@cli.command()
@click.option("--method", default=None, help="Method name (see `distillkit list methods`).  [default: dm]")
@click.option("--dataset", default=None, help="Dataset name (see `distillkit list datasets`).  [default: mnist]")
@click.option("--ipc", type=int, default=None, help="Stored synthetic images per class.  [default: 10]")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Run directory to create.  [default: runs/METHOD-DATASET-ipcIPC]")
@click.option("--iterations", type=int, help="Condense iterations (method default otherwise).")
@click.option("--batch-real", type=int, help="Real images per class per iteration.")
@click.option("--batch-syn", type=int, help="Cap on decoded synthetic images per class per step.")
@click.option("--lr-img", type=float, help="Learning rate of the synthetic images.")
@click.option("--momentum", type=float, help="SGD momentum of the synthetic images.")
@click.option("--optimizer", type=click.Choice(["sgd", "adamw"]), help="Optimizer of the synthetic images.")
@click.option("--weight-decay", type=float,
              help="Weight decay of the synthetic images (SGD: L2 penalty; AdamW: decoupled).")
@click.option("--step", type=click.Choice(["iteration", "class"]), help="One optimizer step per iteration or per class.")
@click.option("--objective", help="Override the method's objective (see `distillkit list objectives`).")
@click.option("--parameterization", help="Override the parameterization (see `distillkit list parameterizations`).")
@click.option("--sampler", help="Override the feature-extractor sampler (see `distillkit list samplers`).")
@click.option("--augment", type=click.Choice(["dsa", "idc", "none"]), help="Augmentation composition mode.")
@click.option("--augment-strategy", help="Augmentation ops joined by '_', e.g. color_crop_cutout.")
@click.option("--set", "sets", multiple=True, metavar="COMPONENT.OPTION=VALUE",
              help="Component option, repeatable: objective.kernel=linear, parameterization.factor=3, "
                   "sampler.period=10, dataset.path=/data/imgs.")
@click.option("--seed", type=int, default=None, help="The one seed every random stream derives from.  [default: 0]")
@device_options
@click.option("--checkpoint-every", type=int, help="Write a checkpoint every N iterations.  [default: 100]")
@click.option("--log-every", type=int, help="Read the loss back and log it every N iterations.  [default: 10]")
@click.option("--real-chunk", type=int,
              help="Classes per batched forward, real and synthetic (bounds memory; same gradients).  [default: all]")
@click.option("--forward-batch", type=int,
              help="Images per extractor call, real and synthetic (same features, changes speed).  [default: "
                   "16k pixels per call on CPUs when the extractor embeds images independently; all at once on GPUs]")
@click.option("--amp/--no-amp", default=None,
              help="bf16 autocast for the feature extractor (CUDA, or CPUs with bf16 instructions; numbers change "
                   "slightly).  [default: off]")
@click.option("--channels-last/--no-channels-last", default=None,
              help="Channels-last inputs for the extractor (faster convolutions on CUDA).  [default: off]")
@click.option("--resume", "resume_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Continue the run in this directory from its last checkpoint. Only speed settings "
                   "(--forward-batch, --real-chunk, --channels-last, --checkpoint-every, --log-every) may change.")
@click.option("--overwrite", is_flag=True, help="Replace an existing run directory.")
def distill(method, dataset, ipc, out_dir, sets, seed, device, data_root, resume_dir, overwrite, **overrides) -> None:
    """Learn a synthetic set and write it to a run directory."""
    from distillkit.config import parse_sets, resolve
    from distillkit.data import resolve_root
    from distillkit.devices import resolve_device
    from distillkit.rundir import RunDir
    from distillkit.runner import Interrupted, distill as run_distill

    if resume_dir is not None:
        if overwrite:
            raise UsageError(f"--resume {resume_dir} continues a run and --overwrite replaces one: pass only one")
        given = {"method": method, "dataset": dataset, "ipc": ipc, "seed": seed,
                 **{k: v for k, v in overrides.items() if k in _RUN_OVERRIDES}}
        cfg = RunDir(resume_dir).resumed_config(given, sets, out_dir)
        run_dir = resume_dir
    else:
        method_obj = registry.create("methods", method or "dm")
        cfg = resolve(method_obj, dataset or "mnist", 10 if ipc is None else ipc,
                      {**overrides, "seed": seed}, parse_sets(sets))
        registry.create("datasets", cfg.dataset, **cfg.dataset_options)  # unknown dataset: fail before any I/O
        run_dir = out_dir or Path("runs") / f"{cfg.method}-{cfg.dataset}-ipc{cfg.ipc}"
    cfg.check_names()  # before the first line of output: a typo gets one line, not a progress bar
    dev = resolve_device(device)
    console.print(f"[bold]distill[/] {cfg.method} on {cfg.dataset}, IPC {cfg.ipc}, {cfg.iterations} iterations, "
                  f"seed {cfg.seed}, device {dev} -> {run_dir}")
    with _progress() as progress:
        task = progress.add_task("condense", total=max(cfg.iterations, 1), loss="")

        def on_progress(iteration: int, loss: float | None) -> None:
            progress.update(task, completed=iteration, **({"loss": f"loss {loss:.4g}"} if loss is not None else {}))

        try:
            path = run_distill(cfg, run_dir, device=dev, data_root=resolve_root(data_root), resume=resume_dir is not None,
                               overwrite=overwrite, on_progress=on_progress)  # deletes the old run after all checks
        except Interrupted as stop:
            progress.stop()
            click.echo(f"interrupted ({signal.Signals(stop.signum).name}) at iteration {stop.iteration}; checkpoint "
                       f"written. Continue with: distillkit distill --resume {run_dir}", err=True)
            sys.exit(128 + stop.signum)
        except KeyboardInterrupt:  # outside the loop's own handler: while starting up or writing the artifact
            progress.stop()
            if RunDir(run_dir).checkpoint.exists():
                click.echo(f"interrupted; the last checkpoint is kept. Continue with: distillkit distill --resume "
                           f"{run_dir}", err=True)
            else:
                click.echo("interrupted before the first checkpoint; nothing to keep, run the command again", err=True)
            sys.exit(130)
    out.print(f"wrote {path}")


def _progress() -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[loss]}"), console=console,
                    transient=False, disable=_rank() > 0)


# -- evaluate --------------------------------------------------------------


@cli.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--protocol", default="dc-classic", show_default=True, help="See `distillkit list protocols`.")
@click.option("--models", default="convnet3", show_default=True,
              help="Comma-separated model names or globs ('convnet*'); see `distillkit list models`.")
@click.option("--runs", type=int, default=5, show_default=True, help="Fresh networks trained per model.")
@click.option("--epochs", type=int, help="Override the protocol's training epochs.")
@click.option("--test-limit", type=int, help="Test on only the first N test images (quick checks).")
@click.option("--stacked/--sequential", default=None,
              help="Train the runs of a model together (vmap) or one by one (same numbers).  "
                   "[default: stacked on GPUs, one by one on the CPU, where stacking is slower]")
@click.option("--compile/--no-compile", "compile_", default=None,
              help="torch.compile the training forward (pays off on long protocols on CUDA).  [default: off]")
@click.option("--baseline/--no-baseline", default=True, show_default=True,
              help="Also evaluate a random real subset at the same IPC.")
@click.option("--seed", type=int, help="Evaluation seed.  [default: the run's seed]")
@click.option("--full-data-epochs", type=int, metavar="N",
              help="Also train each model on the full training split for N epochs (hard labels, cached in the "
                   "user cache) and score the set against it (docs: distillkit.scores).  [default: off]")
@click.option("--set", "sets", multiple=True, metavar="protocol.OPTION=VALUE",
              help="Set a protocol option (repeatable); see `distillkit describe protocols NAME`. --epochs and "
                   "--test-limit are shortcuts of protocol.epochs and protocol.test_limit.")
@device_options
def evaluate(run_dir, protocol, models, runs, epochs, test_limit, stacked, compile_, baseline, seed, full_data_epochs,
             sets, device, data_root, deterministic) -> None:
    """Train evaluator networks on a run's synthetic set; write eval.json and eval.csv.

    Under torchrun the runs are shared out over the processes; rank 0 writes the merged files.
    """
    from distillkit.config import parse_sets
    from distillkit.data import resolve_root
    from distillkit.devices import resolve_device, set_deterministic
    from distillkit.evaluate import evaluate_run, resolve_protocol
    from distillkit.models import known_model

    options = parse_sets(sets, components=("protocol",))["protocol"]
    for option, shortcut in (("epochs", epochs), ("test_limit", test_limit)):
        if shortcut is not None and option in options and options[option] != shortcut:
            raise UsageError(f"--{option.replace('_', '-')} {shortcut} and --set protocol.{option}="
                             f"{options[option]} disagree; give one")
    shortcuts = {"epochs": epochs, "test_limit": test_limit, "stacked": stacked, "compile": compile_}
    proto = resolve_protocol(protocol, **{**shortcuts, **options})  # None: not given (resolve_protocol drops it)
    patterns = [m.strip() for m in models.split(",") if m.strip()]
    names = [known_model(m) for m in registry.plugins()["models"].match(patterns)]  # bad names fail here, at once
    set_deterministic(bool(deterministic))
    dev = resolve_device(device)
    with _progress() as progress:
        task = progress.add_task("evaluate", total=None, loss="")

        def on_job(done: int, total: int, label: str) -> None:
            progress.update(task, total=total, completed=done, loss=label)

        try:
            report = evaluate_run(run_dir, protocol=proto, models=names, runs=runs, seed=seed, baseline=baseline,
                                  device=dev, data_root=resolve_root(data_root), full_data_epochs=full_data_epochs,
                                  on_job=on_job)
        except KeyboardInterrupt:
            progress.stop()
            click.echo(f"interrupted; the models that finished are kept in {run_dir}. Run the same command again "
                       f"to continue (finished ones are not trained again)", err=True)
            sys.exit(130)
    _print_eval(report)
    if report["write_error"] is not None:  # the table above holds the numbers; say why the files do not
        raise report["write_error"]


def _print_eval(report: dict) -> None:
    rows = report["new"]
    table = Table(title=f"{report['method']} on {report['dataset']}, IPC {report['ipc']} "
                        f"({rows[0]['protocol']}, {rows[0]['runs']} runs)")
    table.add_column("model")
    table.add_column("synthetic (%)", justify="right")
    table.add_column("random baseline (%)", justify="right")
    for title in ("vs random (pts)", "full data (%)", "recovery", "LRS"):
        table.add_column(title, justify="right")
    by_model: dict[str, dict[str, dict]] = {}
    for row in rows:
        by_model.setdefault(row["model"], {})[row["kind"]] = row
    for model, kinds in by_model.items():
        cell = lambda r: f"{r['mean']:.2f} ± {r['std']:.2f}" if r else "-"  # noqa: E731
        syn = kinds.get("synthetic") or {}
        got = {**syn.get("scores", {}), "full": ((syn.get("references") or {}).get("full_data") or {}).get("mean")}
        number = lambda key, form: "-" if got.get(key) is None else format(got[key], form)  # noqa: E731
        table.add_row(model, cell(syn), cell(kinds.get("random-baseline")), number("improvement_over_random", "+.2f"),
                      number("full", ".2f"), number("hard_label_recovery", ".3f"), number("label_robust_score", ".3f"))
    out.print(table)
    from distillkit.rundir import RunDir

    run = RunDir(report["run"])
    if report["reused"]:
        out.print(f"reused from {run.eval_json.name} (same set, protocol, settings and runs): "
                  f"{', '.join(f'{m} / {k}' for m, k in report['reused'])}")
    if report["write_error"] is None:
        out.print(f"wrote {run.eval_json} and {run.eval_csv.name}")


# -- plugins, list, describe, show ---------------------------------------------------


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print the rows as JSON (for scripts).")
@click.option("--strict", is_flag=True, help="Exit with status 1 when any plugin failed to load (for CI).")
@click.pass_context
def plugins(ctx: click.Context, as_json: bool, strict: bool) -> None:
    """Show every plugin: package, version, the hooks it implements with what each registered, and errors.

    A plugin that failed is listed with its error and the others still work; the global --debug adds the
    full tracebacks.
    """
    import dataclasses
    import json

    from distillkit.catalog import plugins_table

    rows = registry.plugins().info()
    if as_json:
        click.echo(json.dumps([dataclasses.asdict(info) for info in rows], indent=2))
    else:
        out.print(plugins_table(rows))
    if ctx.meta.get("distillkit.debug"):
        for info in rows:
            if info.traceback:
                click.echo(f"\n--- {info.name} ---\n{info.traceback}", err=True)
    failed = [info.name for info in rows if info.error]
    if strict and failed:
        click.echo(f"Error: {len(failed)} plugin(s) failed to load: {', '.join(failed)}", err=True)
        ctx.exit(1)


@cli.command(name="list")
@click.argument("kind", type=click.Choice(list(registry.KINDS)))
@click.option("--filter", "pattern", default="*", show_default=True, help="Glob on names, e.g. 'convnet*'.")
def list_(kind: str, pattern: str) -> None:
    """List the registered names of one KIND, with the plugin that provides each."""
    from distillkit.catalog import names_table

    out.print(names_table(kind, pattern))


@cli.command()
@click.argument("kind", type=click.Choice(list(registry.KINDS)))
@click.argument("name")
def describe(kind: str, name: str) -> None:
    """Print one component's documentation and its options (type and default), e.g.
    `distillkit describe samplers random-encoder`."""
    from distillkit.catalog import describe as describe_component, render_description

    out.print(render_description(describe_component(kind, name)))


@cli.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="PNG file to write.  [default: RUN_DIR/grid.png]")
@click.option("--decoded/--stored", default=True, show_default=True,
              help="Show the decoded training images or the stored ones (differ for factor sets).")
@click.option("--max-per-class", type=int, default=20, show_default=True, help="Images per row at most.")
@click.option("--overwrite", is_flag=True, help="Replace an existing picture (never one of the run's own files).")
def show(run_dir: Path, output: Path | None, decoded: bool, max_per_class: int, overwrite: bool) -> None:
    """Draw the synthetic images as a grid, one row per class, labelled with class names."""
    from distillkit.pictures import image_grid
    from distillkit.rundir import RunDir, load_run_synthetic

    if max_per_class < 1:
        raise UsageError(f"--max-per-class must be positive, got {max_per_class}")
    target = RunDir(run_dir).picture_target(output, "grid", overwrite)
    synthetic = load_run_synthetic(run_dir)
    images, labels = (synthetic.images, synthetic.labels) if decoded else (synthetic.stored, synthetic.stored_labels)
    image_grid(synthetic.spec.denormalize(images), labels, synthetic.class_names, target, max_per_class)
    out.print(f"wrote {target}")


@cli.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="PNG file to write.  [default: RUN_DIR/plot.png]")
@click.option("--overwrite", is_flag=True, help="Replace an existing picture (never one of the run's own files).")
def plot(run_dir: Path, output: Path | None, overwrite: bool) -> None:
    """Draw the loss curve and, if the run was evaluated, accuracy per model beside the random baseline."""
    from distillkit.pictures import plot_run
    from distillkit.rundir import RunDir

    target = RunDir(run_dir).picture_target(output, "plot", overwrite)
    panels = plot_run(run_dir, target)
    out.print(f"wrote {target} ({' and '.join(panels)})")


@cli.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--format", "fmt", type=click.Choice(["png-folder", "npz", "pt"]), required=True,
              help="png-folder: one folder per class (torchvision ImageFolder); npz: uint8 (N,H,W,C) arrays; "
                   "pt: float [0,1] tensors for torch.load(weights_only=True).")
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="Folder or file to write.")
@click.option("--overwrite", is_flag=True, help="Replace an existing non-empty output.")
def export(run_dir: Path, fmt: str, output: Path, overwrite: bool) -> None:
    """Write a run's decoded synthetic images (full size, [0, 1]) with labels and class names."""
    from distillkit.export import export_run

    synthetic = export_run(run_dir, fmt, output, overwrite=overwrite)
    out.print(f"wrote {len(synthetic.labels)} images of {len(synthetic.class_names)} classes to {output} ({fmt})")


def main() -> None:
    cli(prog_name="distillkit")


if __name__ == "__main__":
    main()
