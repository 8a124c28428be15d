"""The data context: a component that trains on real data gets the host's dataset (``--data-root`` and
``--set dataset.*`` honoured, the full split on every rank), and a stateful component resumes exactly."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from distillkit.artifact import ARTIFACT_FORMAT, CHECKPOINT_FORMAT, safe_load
from tests.conftest import DATA, TEST_PLUGINS, run_cli
from tests.test_reliability import kill_mid_run

TRAINED = ("--plugins-dir", TEST_PLUGINS, "distill", "--sampler", "trained-convnet", "--ipc", "1", "--batch-real", "8",
           "--device", "cpu", "--log-every", "1")


def test_a_sampler_trains_on_the_data_the_host_was_given(tmp_path: Path, monkeypatch):
    record = tmp_path / "record.json"
    # --data-root wins over a wrong $DISTILLKIT_DATA: the sampler must not reload from the environment
    monkeypatch.setenv("DISTILLKIT_DATA", str(tmp_path / "nowhere"))
    run_cli(*TRAINED, "--dataset", "mnist", "--iterations", "2", "--data-root", DATA,
            "--set", f"sampler.record={record}", "--out", tmp_path / "mnist")
    seen = json.loads(record.read_text())
    assert seen == {"root": str(DATA), "dataset": "mnist", "options": {}, "images": 60000,
                    "classes": list(range(10))}
    # dataset options reach the context as they reach the host: 7 classes of 40 generated images
    run_cli(*TRAINED, "--dataset", "fake", "--iterations", "1", "--set", "dataset.classes=7",
            "--set", "dataset.per_class=40", "--set", f"sampler.record={record}", "--out", tmp_path / "fake")
    seen = json.loads(record.read_text())
    assert seen["dataset"] == "fake" and seen["options"] == {"classes": 7, "per_class": 40}
    assert seen["images"] == 280 and seen["classes"] == list(range(7))


def test_a_stateful_sampler_resumes_bit_identically_after_sigkill(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("DISTILLKIT_PLUGINS_DIR", str(TEST_PLUGINS))  # for the spawned process too
    args = (*TRAINED[3:], "--dataset", "mnist", "--iterations", "8", "--checkpoint-every", "2", "--seed", "3")
    reference = tmp_path / "reference"
    run_cli("distill", *args, "--out", reference)
    checkpoint = safe_load(reference / "checkpoint.pt", CHECKPOINT_FORMAT)
    assert checkpoint["components"]["sampler"]["trained_to"] == 7  # the checkpoint holds the sampler's state

    run_dir = tmp_path / "run"
    kill_mid_run(run_dir, tmp_path / "stderr", *args)
    assert safe_load(run_dir / "checkpoint.pt", CHECKPOINT_FORMAT)["iteration"] >= 2
    run_cli("distill", "--resume", run_dir)
    images = lambda d: safe_load(d / "synthetic.pt", ARTIFACT_FORMAT)["images"]  # noqa: E731
    assert torch.equal(images(run_dir), images(reference))
    assert (run_dir / "losses.jsonl").read_text() == (reference / "losses.jsonl").read_text()
