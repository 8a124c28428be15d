"""README's CLI reference is the CLI's own --help output, and its Results section is what the result files
render, so every flag is documented and no number is stale or typed by hand.

Regenerate the CLI reference after changing a command: ``python -m tests.test_docs``; the results after
adding a result file: ``python -m benchmarks.report``.
"""

from __future__ import annotations

import json

from click.testing import CliRunner

from distillkit.cli import cli
from tests.conftest import ROOT

README = ROOT / "README.md"
BEGIN, END = "<!-- cli:begin (python -m tests.test_docs) -->", "<!-- cli:end -->"


def _help(command: str | None) -> str:
    args = [command, "--help"] if command else ["--help"]
    result = CliRunner().invoke(cli, args, prog_name="distillkit", terminal_width=100)
    assert result.exit_code == 0, result.output
    return result.output


def render() -> str:
    blocks = [f"```text\n{_help(None)}```"]
    blocks += [f"### `distillkit {name}`\n\n```text\n{_help(name)}```" for name in cli.commands]
    return "\n\n".join(blocks)


def test_readme_cli_reference_is_the_help_output():
    text = README.read_text()
    assert BEGIN in text and END in text
    documented = text.split(BEGIN, 1)[1].split(END, 1)[0].strip()
    assert documented == render(), "README's CLI reference is stale: run python -m tests.test_docs"


def test_ci_runs_the_readmes_test_command_verbatim():
    """`.ci/run` proves the README: its last line is the README's test command, as a user copies it."""
    block = README.read_text().split("Run the tests", 1)[1].split("```bash\n", 1)[1].split("\n```", 1)[0]
    assert (ROOT / ".ci" / "run").read_text().rstrip().splitlines()[-1] == block.strip()


def test_readme_results_are_rendered_from_the_result_files():
    from benchmarks import report

    text = README.read_text()
    rendered = text.split(report.BEGIN, 1)[1].split(report.END, 1)[0].strip()
    assert rendered == report.render(), "README's Results are stale: run python -m benchmarks.report"


def test_every_option_has_help_text():
    for name, command in cli.commands.items():
        bare = [p.name for p in command.params if getattr(p, "help", "x") in (None, "") and p.name != "help"
                and p.param_type_name == "option"]
        assert not bare, f"distillkit {name}: options without help: {bare}"


if __name__ == "__main__":
    text = README.read_text()
    head, rest = text.split(BEGIN, 1)
    README.write_text(f"{head}{BEGIN}\n\n{render()}\n\n{END}{rest.split(END, 1)[1]}")
    print(f"rendered the CLI reference in {README}")


def test_a_benchmark_completed_in_parts_keeps_each_rows_provenance(tmp_path, monkeypatch):
    """Rows an earlier run measured survive a later run of other cells, with the earlier run's date and
    command; rows measured again are replaced; other settings start afresh."""
    import torch

    from benchmarks import common

    monkeypatch.setattr(common, "RESULTS", tmp_path)
    cpu = torch.device("cpu")
    key = lambda r: (r["cell"],)  # noqa: E731
    common.write_report("demo", cpu, [{"cell": "a", "value": 1}, {"cell": "b", "value": 2}], {"scale": "s"})
    first = json.loads((tmp_path / "demo-cpu.json").read_text())
    rows = common.with_earlier_rows("demo", cpu, [{"cell": "b", "value": 3}], key, same_settings={"scale": "s"})
    assert rows == [{"date": first["date"], "command": first["command"], "cell": "a", "value": 1},
                    {"cell": "b", "value": 3}]
    assert common.with_earlier_rows("demo", cpu, [{"cell": "b", "value": 3}], key,
                                    same_settings={"scale": "other"}) == [{"cell": "b", "value": 3}]


def test_a_sweep_cell_becomes_the_distill_flag_or_set_and_records_the_default_the_grid_used():
    """A swept setting reaches distill as its flag or as --set, and its default is what the grid's row used
    (the scale's budget, the method's IPC-dependent rate, a method's or a factory's option); a setting that is
    none of these is refused before any distilling."""
    import argparse

    import pytest

    from benchmarks.accuracy import SCALES, distill_sets
    from benchmarks.sweep import default_of, distill_args, parse_cell

    smoke = SCALES["smoke"]
    cell = parse_cell("datadam:fashionmnist:1:objective.attention_weight=0,10")
    assert (cell.method, cell.dataset, cell.ipc, cell.values) == ("datadam", "fashionmnist", 1, ("0", "10"))
    assert distill_args(cell.setting, "10") == ["--set", "objective.attention_weight=10"]
    assert distill_args("lr_img", "2") == ["--lr-img", "2"]
    assert default_of(cell, smoke) == 100.0  # the method's objective option
    assert default_of(parse_cell("m3d:cifar10:10:lr_img=2.5"), smoke) == 5.0  # M3D's rate at IPC 10
    assert default_of(parse_cell("dm:mnist:1:iterations=1000"), smoke) == 100  # the scale's, not the method's
    assert default_of(parse_cell("ncfm:mnist:1:sampler.epochs=2"), smoke) == 60  # the sampler factory's
    for bad in ("dm:mnist:1:bogus=1", "dm:mnist:1:objective.bogus=1", "dm:mnist:1:model.width=1"):
        with pytest.raises(ValueError):
            default_of(parse_cell(bad), smoke)
    with pytest.raises(argparse.ArgumentTypeError, match="expected METHOD:DATASET:IPC:SETTING=VALUE"):
        parse_cell("dm:mnist:1:0.5")
    # the grid's extra settings (a CPU-sized pretraining) go to their method's distills only
    assert distill_sets(["ncfm:sampler.epochs=2", "ncfm:sampler.networks=4"], ["dm", "ncfm"]) == {
        "ncfm": ["sampler.epochs=2", "sampler.networks=4"]}
    with pytest.raises(ValueError, match="with METHOD one of dm"):
        distill_sets(["ncfm:sampler.epochs=2"], ["dm"])
