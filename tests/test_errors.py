"""Bad input: one clear line on stderr, exit code 2, no traceback (``--debug`` shows it), nothing existing
changed. Every refused command below targets a finished run directory and must leave its files as they were."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from distillkit import registry
from distillkit.errors import UsageError
from tests.conftest import DATA, ROOT, refused, run_cli, snapshot

TINY = ("--dataset", "mnist", "--ipc", "1", "--batch-real", "8", "--iterations", "2", "--device", "cpu",
        "--set", "sampler.model=convnet3_w32")


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    registry.load_plugins()
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    run_cli("distill", *TINY, "--checkpoint-every", "1", "--out", run_dir)
    return run_dir


@pytest.fixture
def existing(finished: Path, tmp_path: Path):
    """A copy of a finished run; the test's refused commands must leave it byte-for-byte unchanged."""
    run_dir = tmp_path / "existing"
    shutil.copytree(finished, run_dir)
    before = snapshot(run_dir)
    yield run_dir
    assert snapshot(run_dir) == before


def test_the_real_command_prints_one_line_and_exits_2(tmp_path: Path):
    env = {**os.environ, "DISTILLKIT_DATA": str(DATA)}
    cmd = [sys.executable, "-m", "distillkit", "distill", "--method", "nope", "--out", str(tmp_path / "new")]
    plain = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    assert plain.returncode == 2
    (line,) = plain.stderr.splitlines()
    assert line.startswith("Error: unknown method 'nope'; choose one of: ") and "dm" in line
    assert not (tmp_path / "new").exists()


# -- unknown names -----------------------------------------------------------------------------


@pytest.mark.parametrize("flags, says", [
    (("--method", "nope"), ("unknown method 'nope'; choose one of:", "dm")),
    (("--objective", "nope"), ("unknown objective 'nope'; choose one of:", "mean")),
    (("--parameterization", "nope"), ("unknown parameterization 'nope'; choose one of:", "pixel")),
    (("--sampler", "nope"), ("unknown sampler 'nope'; choose one of:", "random-convnet")),
    (("--dataset", "nope"), ("unknown dataset 'nope'; choose one of:", "fake", "mnist")),
    (("--set", "sampler.model=nope"), ("unknown model 'nope'; choose one of:", "convnet3")),
    (("--set", "objective.nope=1"), "objective 'mean'"),
])
def test_unknown_names_are_refused_with_the_valid_ones(existing: Path, flags, says):
    refused("distill", *TINY, "--out", existing, "--overwrite", *flags, says=says)


def test_unknown_protocol_and_model_for_evaluate(existing: Path):
    refused("evaluate", existing, "--protocol", "nope", says=("unknown protocol 'nope'", "dc-classic"))
    refused("evaluate", existing, "--models", "nope", says=("unknown model 'nope'; choose one of:", "convnet3"))
    refused("evaluate", existing, "--models", "nope*", says=("no models match 'nope*'", "convnet3"))


# -- sizes -------------------------------------------------------------------------------------


@pytest.mark.parametrize("flags, says", [
    (("--ipc", "0"), "--ipc must be a positive number of images per class, got 0"),
    (("--ipc", "-3"), "got -3"),
    (("--dataset", "fake", "--set", "dataset.per_class=5", "--ipc", "6"),
     "--ipc 6 is larger than the smallest class (5 images)"),
])
def test_impossible_ipc_is_refused(existing: Path, flags, says):
    refused("distill", *TINY, "--out", existing, "--overwrite", *flags, says=says)


def _fake8(*extra: str) -> tuple[str, ...]:
    return ("--dataset", "fake", "--set", "dataset.size=8", "--set", "dataset.per_class=4",
            "--set", "dataset.test_per_class=2", "--ipc", "1", "--iterations", "1", "--batch-real", "2",
            "--device", "cpu", *extra)


def test_a_model_that_cannot_take_the_images_is_refused_before_anything_is_written(existing: Path, tmp_path: Path):
    # ConvNet-4 pools 8-pixel images down to nothing: the failure only shows in a forward pass
    too_deep = ("cannot", "3x8x8 images", "Output size is too small")
    refused("distill", *_fake8("--set", "sampler.model=convnet4", "--out", existing, "--overwrite"), says=too_deep)
    refused("distill", *_fake8("--set", "sampler.model=convnet4", "--out", tmp_path / "new"), says=too_deep)
    assert not (tmp_path / "new").exists()

    small = tmp_path / "small"
    run_cli("distill", *_fake8("--out", small))
    before = snapshot(small)
    refused("evaluate", small, "--models", "convnet4", "--epochs", "1", "--runs", "1", "--device", "cpu",
            says=("model 'convnet4' cannot take 3x8x8 images", "Output size is too small"))
    assert snapshot(small) == before  # no eval.json


# -- data files --------------------------------------------------------------------------------


class _DroppedConnection:
    """A download response that sends a few bytes, then loses the connection (so a partial file is written)."""

    url, length = None, 10_000

    def __init__(self) -> None:
        self.sent = False

    def read(self, size: int) -> bytes:
        if self.sent:
            raise ConnectionResetError("connection dropped (test)")
        self.sent = True
        return b"\x1f\x8b" + b"partial" * 10

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> bool:
        return False


def test_missing_dataset_files_name_the_files_and_the_folder_and_leave_nothing_behind(existing: Path,
                                                                                       tmp_path: Path, monkeypatch):
    import socket
    import urllib.request

    timeouts = []

    def urlopen(request, *args, **kwargs):  # stands in for the network, whether or not this machine has one
        timeouts.append(socket.getdefaulttimeout())
        return _DroppedConnection()

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    root = tmp_path / "data"
    root.mkdir()
    refused("distill", *TINY, "--data-root", root, "--out", existing, "--overwrite",
            says=(f"MNIST files are missing under {root / 'MNIST' / 'raw'}", "could not be downloaded",
                  "connection dropped", "train-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz", "--data-root"))
    assert timeouts and all(t is not None and t <= 60 for t in timeouts)  # a dead network fails fast
    assert list(root.iterdir()) == []  # the partial download was removed, so no later run mistakes it for data


def test_a_corrupt_dataset_file_is_named_as_corrupt(existing: Path, tmp_path: Path):
    raw = tmp_path / "data" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for f in (DATA / "MNIST" / "raw").iterdir():
        (raw / f.name).symlink_to(f)
    images = raw / "train-images-idx3-ubyte"
    images.unlink()
    images.write_bytes((DATA / "MNIST" / "raw" / images.name).read_bytes()[:100_000])  # truncated
    before = snapshot(raw)
    refused("distill", *TINY, "--data-root", tmp_path / "data", "--out", existing, "--overwrite",
            says=(f"MNIST files under {raw} are corrupt or truncated", "delete them"))
    assert snapshot(raw) == before


# -- the run directory -------------------------------------------------------------------------


def test_an_existing_run_directory_is_refused_unless_resume_or_overwrite(existing: Path, tmp_path: Path):
    refused("distill", *TINY, "--out", existing,
            says=(f"run directory {existing} already exists", f"--resume {existing}", "--overwrite"))
    refused("distill", "--resume", existing, "--overwrite", says="pass only one")
    refused("distill", "--resume", existing, "--seed", "5", says=("contradict", "--seed 5 (recorded 0)"))
    other = tmp_path / "notarun"
    other.mkdir()
    (other / "thesis.tex").write_text("precious")
    refused("distill", *TINY, "--out", other, "--overwrite", says="not a distillkit run directory")
    assert (other / "thesis.tex").read_text() == "precious"


def test_overwrite_replaces_a_run_only_after_every_check_passed(existing: Path, tmp_path: Path):
    target = tmp_path / "target"
    shutil.copytree(existing, target)
    (target / "eval.json").write_text("{}")
    run_cli("distill", *TINY, "--seed", "3", "--out", target, "--overwrite")
    assert not (target / "eval.json").exists()
    assert torch.load(target / "synthetic.pt", weights_only=True)["seed"] == 3


# -- damaged files -----------------------------------------------------------------------------


def _damage(kind: str, path: Path, finished: Path) -> str:
    data = path.read_bytes()
    if kind == "truncated":
        path.write_bytes(data[: len(data) // 2])
        return "is corrupt or truncated"
    if kind == "flipped":  # inside the image tensor's storage: unpickles fine, only the digest can tell
        at = data.index(torch.load(path, weights_only=True)["images"].numpy().tobytes()[:64]) + 100
        path.write_bytes(data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1:])
        return "does not match the digest"
    if kind == "empty":
        path.write_bytes(b"")
        return "(it is empty)"
    if kind == "text":
        path.write_text("hello\n")
        return "(it is not a PyTorch archive)"
    if kind == "foreign":
        torch.save({"weights": torch.zeros(3)}, path)
        return "is not a distillkit.synthetic-set file (found None)"
    if kind == "checkpoint":
        shutil.copy(finished / "checkpoint.pt", path)
        return "is not a distillkit.synthetic-set file (found 'distillkit.checkpoint')"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["truncated", "flipped", "empty", "text", "foreign", "checkpoint"])
def test_a_damaged_or_foreign_artifact_is_refused(finished: Path, tmp_path: Path, kind: str):
    run_dir = tmp_path / "run"
    shutil.copytree(finished, run_dir)
    says = _damage(kind, run_dir / "synthetic.pt", finished)
    before = snapshot(run_dir)
    refused("show", run_dir, says=(str(run_dir / "synthetic.pt"), says))
    refused("evaluate", run_dir, "--epochs", "1", "--runs", "1", says=says)
    assert snapshot(run_dir) == before  # no grid.png, no eval.json


@pytest.mark.parametrize("kind", ["truncated", "flipped"])
def test_a_damaged_checkpoint_is_refused_on_resume(finished: Path, tmp_path: Path, kind: str):
    run_dir = tmp_path / "run"
    shutil.copytree(finished, run_dir)
    (run_dir / "synthetic.pt").unlink()
    path = run_dir / "checkpoint.pt"
    data = path.read_bytes()
    if kind == "truncated":
        path.write_bytes(data[: len(data) // 2])
        says = "is corrupt or truncated"
    else:
        state = torch.load(path, weights_only=True)
        at = data.index(state["parameterization"]["images"].numpy().tobytes()[:64]) + 100
        path.write_bytes(data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1:])
        says = "does not match the digest"
    before = snapshot(run_dir)
    refused("distill", "--resume", run_dir, says=(str(path), says))
    assert snapshot(run_dir) == before


def test_a_shortened_loss_log_is_refused_on_resume(finished: Path, tmp_path: Path):
    run_dir = tmp_path / "run"
    shutil.copytree(finished, run_dir)
    (run_dir / "losses.jsonl").write_text("")
    before = snapshot(run_dir)
    refused("distill", "--resume", run_dir, says="the loss log was truncated or replaced")
    assert snapshot(run_dir) == before


# -- non-finite loss ---------------------------------------------------------------------------


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path: Path):
    run_dir = tmp_path / "run"
    line = refused("distill", *TINY, "--iterations", "6", "--lr-img", "1e30", "--checkpoint-every", "1",
                   "--out", run_dir, says=("loss became", "the last good checkpoint was kept"))
    bad = int(line.split("at iteration ")[1].split(";")[0])
    state = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert state["iteration"] == bad  # the state before the bad iteration: the last one with finite losses
    assert torch.isfinite(state["parameterization"]["images"]).all()
    assert not (run_dir / "synthetic.pt").exists()
    logged = (run_dir / "losses.jsonl").read_text().splitlines()
    assert len(logged) == bad  # iterations 0 .. bad-1, all finite


def test_debug_flag_reraises_so_the_traceback_shows(tmp_path: Path):
    with pytest.raises(UsageError, match="unknown objective"):
        run_cli("--debug", "distill", *TINY, "--objective", "nope", "--out", tmp_path / "x", expect=None)


def test_resume_may_change_speed_settings_but_not_the_recipe(finished, tmp_path):
    """--forward-batch, --checkpoint-every and friends change how fast a run computes, not what: resume takes them."""
    run_dir = tmp_path / "run"
    shutil.copytree(finished, run_dir)
    before = torch.load(run_dir / "synthetic.pt", weights_only=True)["images"]
    run_cli("distill", "--resume", run_dir, "--forward-batch", "5", "--checkpoint-every", "1", "--real-chunk", "3",
            "--device", "cpu")
    assert torch.equal(torch.load(run_dir / "synthetic.pt", weights_only=True)["images"], before)
    assert json.loads((run_dir / "config.json").read_text())["forward_batch"] is None  # the recorded run is kept
    refused("distill", "--resume", run_dir, "--lr-img", "3", says=("contradict", "--lr-img 3.0"))
