"""The accuracy grid (benchmarks/accuracy.py) on real MNIST at a tiny budget: ``--protocols`` limits a
method's evaluations, and every finished evaluation's rows are in the results file before the next one
starts (an IPC 50 M3D cell is hours per protocol on a CPU)."""

from __future__ import annotations

import json
import sys

import pytest

from benchmarks import accuracy, common

TINY = ["--datasets", "mnist", "--ipc", "1", "--iterations", "1", "--epochs", "1", "--runs", "1"]


@pytest.fixture()
def results(tmp_path, monkeypatch):
    folder = tmp_path / "results"
    monkeypatch.setattr(common, "RESULTS", folder)
    monkeypatch.setattr(accuracy, "RESULTS", folder)
    return folder / "accuracy-smoke-cpu.json"


def grid(monkeypatch, *args: str) -> None:
    monkeypatch.setattr(sys, "argv", ["benchmarks.accuracy", *TINY, "--device", "cpu", *args])
    accuracy.main()


def rows(path) -> set[tuple[str, str]]:
    return {(r["method"], r["protocol"]) for r in json.loads(path.read_text())["rows"]}


def test_protocols_limits_which_of_a_methods_protocols_run(results, tmp_path, monkeypatch, one_thread):
    grid(monkeypatch, "--methods", "m3d", "--protocols", "idc", "--work", str(tmp_path / "w"))
    assert rows(results) == {("m3d", "idc")}
    report = json.loads((tmp_path / "w" / "smoke" / "m3d-mnist-ipc1" / "eval.json").read_text())
    assert {r["protocol"] for r in report["results"]} == {"idc"}  # dc-classic, M3D's other protocol, never ran


def test_each_evaluation_is_saved_before_the_next_starts(results, tmp_path, monkeypatch, one_thread):
    real_cli = accuracy._cli

    def idc_breaks(*args):
        if args[0] == "evaluate" and "idc" in args:
            raise KeyboardInterrupt  # the user stops a long grid during M3D's second protocol
        real_cli(*args)

    monkeypatch.setattr(accuracy, "_cli", idc_breaks)
    with pytest.raises(KeyboardInterrupt):
        grid(monkeypatch, "--methods", "m3d", "--work", str(tmp_path / "w"))
    assert rows(results) == {("m3d", "dc-classic")}


def test_protocols_refuses_an_unknown_name(monkeypatch, capsys):
    with pytest.raises(SystemExit) as stop:
        grid(monkeypatch, "--methods", "m3d", "--protocols", "idc-classic")
    assert stop.value.code == 2 and "idc-classic" in capsys.readouterr().err
