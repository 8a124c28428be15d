"""Soft-label evaluation, the cached teacher and full-data reference, and the scores beside every result."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from distillkit import registry
from distillkit.artifact import safe_load
from distillkit.references import TEACHER_FORMAT
from distillkit.scores import label_robust_score, scores
from distillkit.soft_labels import LABEL_SETTINGS, teacher_loss
from tests.conftest import refused, run_cli

SMALL = ("--set", "dataset.train_per_class=30")  # 300 real MNIST images: a teacher trains in seconds
# 500 test images: every network here is tested (runs, baseline, teacher, full data), and 10 000 cost half the time
SOFT = ("--protocol", "soft-label-smoke", "--epochs", "2", "--runs", "2", "--set", "protocol.teacher_epochs=1",
        "--test-limit", "500")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "references"
    monkeypatch.setenv("DISTILLKIT_REFERENCE_CACHE", str(folder))
    return folder


@pytest.fixture
def small_run(tmp_path, one_thread):
    run_dir = tmp_path / "dm"
    run_cli("distill", "--method", "dm", "--dataset", "mnist", "--ipc", "1", "--iterations", "2", "--batch-real", "8",
            *SMALL, "--device", "cpu", "--out", run_dir)
    return run_dir


def rows(run_dir):
    return json.loads((run_dir / "eval.json").read_text())["results"]


def test_label_robust_score_is_ddrankings_formula_on_fractions():
    lrs = lambda a: (math.exp(a) - math.exp(-1)) / (math.e - math.exp(-1))  # noqa: E731
    assert label_robust_score(0.0, 0.0) == pytest.approx(lrs(0.0))
    assert label_robust_score(100.0, 0.0) == pytest.approx(lrs(0.5))  # all improvement, no gap: a = 0.5
    assert label_robust_score(-100.0, 100.0) == pytest.approx(0.0)  # the worst case, a = -1
    assert label_robust_score(20.0, 10.0) == pytest.approx(lrs(0.5 * 0.2 - 0.5 * 0.1))


def test_scores_measure_the_set_between_random_and_full_data():
    got = scores(synthetic=80.0, random=60.0, synthetic_hard=70.0, random_hard=50.0, full=90.0)
    assert got["improvement_over_random"] == 20.0
    assert got["hard_label_gap"] == 20.0
    assert got["hard_label_recovery"] == pytest.approx(0.5)  # half of the 50 -> 90 gap
    assert scores(60.0, 60.0, 60.0, 60.0, 90.0)["hard_label_recovery"] == 0.0
    assert scores(90.0, 60.0, 90.0, 60.0, 90.0)["hard_label_recovery"] == 1.0
    assert scores(80.0, 60.0, None, None, None)["label_robust_score"] is None  # no full data: only IOR


def test_teacher_loss_is_the_kl_of_softened_predictions():
    torch.manual_seed(0)
    teacher = torch.nn.Linear(4, 3)
    images = torch.randn(2, 5, 4)  # (runs, batch, features)
    labels = torch.zeros(2, 5, dtype=torch.long)
    logits = torch.randn(10, 3, requires_grad=True)
    loss = teacher_loss(teacher, 2.0)(logits, images, labels, None)
    p = F.softmax(teacher(images.flatten(0, 1)) / 2.0, 1)
    expected = (p * (p.log() - F.log_softmax(logits / 2.0, 1))).sum(1).view(2, 5).mean(1).sum()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    loss.backward()
    assert logits.grad.abs().sum() > 0 and teacher.weight.grad is None  # the teacher is never trained here
    same = teacher(images.flatten(0, 1)).detach()
    assert teacher_loss(teacher, 2.0)(same, images, labels, None).abs().item() < 1e-6


def test_soft_label_is_dc_classic_on_a_teachers_labels():
    soft, hard = registry.create("protocols", "soft-label"), registry.create("protocols", "dc-classic")
    less = lambda s: {k: v for k, v in s.items() if k not in (*LABEL_SETTINGS, "name")}  # noqa: E731
    assert less(soft.settings()) == less(hard.settings())
    assert set(soft.settings()) - set(hard.settings()) == set(LABEL_SETTINGS)
    assert "labels" not in hard.settings()  # hard-label results keep the settings they were stored with


def test_training_subset_option_keeps_the_first_images_of_each_class():
    from distillkit.data import load_split, resolve_root

    full = registry.create("datasets", "mnist")
    small = registry.create("datasets", "mnist", train_per_class=3)
    images, labels = full.load(resolve_root(), True)
    got_images, got_labels = small.load(resolve_root(), True)
    first = torch.cat([torch.nonzero(labels == c).flatten()[:3] for c in range(10)]).sort().values
    assert torch.equal(got_labels, labels[first]) and torch.equal(got_images, images[first])
    assert len(load_split(small, resolve_root(), train=False).labels) == 10000  # the test split stays whole
    refused("distill", "--method", "dm", "--dataset", "mnist", "--set", "dataset.train_per_class=0",
            says="train_per_class must be positive, got 0")


def test_soft_label_evaluation_caches_its_teacher(small_run, cache):
    run_cli("evaluate", small_run, *SOFT, "--no-baseline")
    first = rows(small_run)[0]
    assert first["protocol"] == "soft-label-smoke" and first["protocol_settings"]["labels"] == "teacher"
    teacher = first["details"]["teacher"]
    assert teacher["cache"] == "trained" and 10 < teacher["test_accuracy"] <= 100
    stored = safe_load(teacher["path"], TEACHER_FORMAT)  # a weights-only tensor file with its key
    assert json.loads(stored["key"])["train_images"] == 300 and stored["test_accuracy"] == teacher["test_accuracy"]
    (small_run / "eval.json").unlink()
    run_cli("evaluate", small_run, *SOFT, "--no-baseline")
    again = rows(small_run)[0]
    assert again["details"]["teacher"]["cache"] == "hit"
    assert again["accuracies"] == first["accuracies"]  # the teacher read back teaches exactly the same
    assert len(list(cache.iterdir())) == 1


def test_full_data_reference_and_scores(small_run, cache):
    run_cli("evaluate", small_run, "--protocol", "smoke", "--epochs", "2", "--runs", "2", "--full-data-epochs", "1",
            "--test-limit", "500")
    hard = {r["kind"]: r for r in rows(small_run)}
    full = hard["synthetic"]["references"]["full_data"]
    assert full["cache"] == "trained" and full["epochs"] == 1 and len(full["accuracies"]) == 2
    got = hard["synthetic"]["scores"]
    assert got["improvement_over_random"] == pytest.approx(hard["synthetic"]["mean"] - hard["random-baseline"]["mean"])
    assert got["hard_label_gap"] == pytest.approx(full["mean"] - hard["synthetic"]["mean"])
    # soft labels: IOR from the soft rows, HLR from the hard rows above, the same cached full-data reference
    run_cli("evaluate", small_run, *SOFT, "--full-data-epochs", "1")
    soft = {r["kind"]: r for r in rows(small_run) if r["protocol"] == "soft-label-smoke"}
    assert soft["synthetic"]["references"]["full_data"]["cache"] == "hit"
    assert soft["synthetic"]["references"]["synthetic_hard"] == hard["synthetic"]["mean"]
    assert soft["synthetic"]["scores"]["hard_label_gap"] == pytest.approx(got["hard_label_gap"])
    assert soft["synthetic"]["scores"]["improvement_over_random"] == pytest.approx(
        soft["synthetic"]["mean"] - soft["random-baseline"]["mean"])
    # the teacher is run 0 of the full-data recipe at the teacher's epochs: same streams, same network
    assert soft["synthetic"]["details"]["teacher"]["test_accuracy"] == full["accuracies"][0]
    header, *lines = (small_run / "eval.csv").read_text().splitlines()
    assert header.endswith("improvement_over_random,hard_label_recovery,hard_label_gap,label_robust_score")
    assert all(line.count(",") == header.count(",") for line in lines)
    refused("evaluate", small_run, "--full-data-epochs", "0", says="--full-data-epochs must be positive, got 0")


def test_two_processes_give_the_single_process_soft_labels_and_scores(small_run, tmp_path):
    """Under torchrun every rank trains the missing teacher and reference (the same networks, one cache entry);
    the evaluation runs are shared out and the report equals one process's."""
    import shutil
    import subprocess
    import sys

    from tests.test_distributed import _env, _torchrun

    reports = {}
    for name, launcher in (("single", [sys.executable, "-m", "distillkit"]), ("sharded", _torchrun())):
        run_dir = tmp_path / name
        shutil.copytree(small_run, run_dir)
        env = {**_env(), "DISTILLKIT_REFERENCE_CACHE": str(tmp_path / f"cache-{name}")}
        done = subprocess.run([*launcher, "evaluate", str(run_dir), *SOFT, "--full-data-epochs", "1",
                               "--device", "cpu"], env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-2000:]
        reports[name] = rows(run_dir)
    key = lambda r: (r["kind"], r["accuracies"], r.get("scores"), r["details"]["teacher"]["test_accuracy"])  # noqa: E731
    assert [key(r) for r in reports["sharded"]] == [key(r) for r in reports["single"]]
    assert len(list((tmp_path / "cache-sharded").iterdir())) == 2  # one teacher, one full-data reference
