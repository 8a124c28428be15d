"""Reliability: a killed or interrupted distillation resumes to the bit-identical result, tensor files
load safely (weights only, checksummed), and one seed drives every random stream of distill and evaluate."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

from tests.conftest import DATA, ROOT, run_cli
from distillkit import registry
from distillkit.artifact import ARTIFACT_FORMAT, CHECKPOINT_FORMAT, safe_load

ITERATIONS = 10
TINY = ("--dataset", "mnist", "--ipc", "1", "--batch-real", "8", "--iterations", str(ITERATIONS), "--device", "cpu",
        "--set", "sampler.model=convnet3_w32", "--checkpoint-every", "2", "--log-every", "1")


def _distill(run_dir: Path, *extra: str) -> None:
    run_cli("distill", *TINY, "--seed", "0", "--out", run_dir, *extra)


def _images(run_dir: Path) -> torch.Tensor:
    return safe_load(run_dir / "synthetic.pt", ARTIFACT_FORMAT)["images"]


def _losses(run_dir: Path) -> str:
    return (run_dir / "losses.jsonl").read_text()


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The uninterrupted run every resumed run must reproduce bit for bit."""
    registry.load_plugins()
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    _distill(run_dir)
    return run_dir


def _spawn(stderr: Path, *args: object) -> subprocess.Popen:
    env = {**os.environ, "DISTILLKIT_DATA": str(DATA)}
    with open(stderr, "wb") as err:
        return subprocess.Popen([sys.executable, "-m", "distillkit", "distill", *map(str, args)], cwd=ROOT, env=env,
                                stdout=subprocess.DEVNULL, stderr=err)


def _wait_for_log(proc: subprocess.Popen, run_dir: Path, lines: int, stderr: Path) -> None:
    """Block until the running distill has logged ``lines`` iterations (checkpoints at every 2nd)."""
    log = run_dir / "losses.jsonl"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if log.exists() and log.read_text().count("\n") >= lines:
            return
        if proc.poll() is not None:
            pytest.fail(f"distill exited ({proc.returncode}) before logging {lines} lines:\n{stderr.read_text()}")
        time.sleep(0.005)
    proc.kill()
    pytest.fail("distill made no progress in 180 s")


def kill_mid_run(run_dir: Path, stderr: Path, *args: object, lines: int = 3) -> None:
    """Run ``distill *args --out run_dir`` in a real process and SIGKILL it once it has logged ``lines``
    iterations (with checkpoints every 2, the one at 2 is then written); fails if it finished first."""
    proc = _spawn(stderr, *args, "--out", run_dir)
    _wait_for_log(proc, run_dir, lines, stderr)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert not (run_dir / "synthetic.pt").exists(), "the run finished before the kill: the test proved nothing"


def synthetic_images(run_dir: Path) -> torch.Tensor:
    return safe_load(run_dir / "synthetic.pt", ARTIFACT_FORMAT)["images"]


def assert_resumes_as(reference: Path, tmp_path: Path, *args: object) -> None:
    """``distill *args``, SIGKILLed mid-run and resumed, ends with ``reference``'s set and loss log exactly."""
    killed = tmp_path / "killed"
    kill_mid_run(killed, tmp_path / "stderr", *args)
    run_cli("distill", "--resume", killed)
    assert torch.equal(synthetic_images(killed), synthetic_images(reference))
    assert (killed / "losses.jsonl").read_text() == (reference / "losses.jsonl").read_text()


# -- resume --------------------------------------------------------------------------------


def test_sigkill_then_sigint_then_resume_is_bit_identical(reference: Path, tmp_path: Path):
    """A real process is SIGKILLed mid-run; its resumption is interrupted with SIGINT (clean exit 130 with a
    checkpoint); the second resumption must end with exactly the uninterrupted run's set and loss log."""
    run_dir, stderr = tmp_path / "run", tmp_path / "stderr"
    kill_mid_run(run_dir, stderr, *TINY, "--seed", "0")  # checkpoint at 2 written, one more line logged past it
    killed_at = safe_load(run_dir / "checkpoint.pt", CHECKPOINT_FORMAT)["iteration"]
    assert 2 <= killed_at < ITERATIONS

    proc = _spawn(stderr, "--resume", run_dir)
    _wait_for_log(proc, run_dir, killed_at + 2, stderr)  # resumed (the log was cut back to the checkpoint)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=120) == 130
    message = stderr.read_text()
    stopped = safe_load(run_dir / "checkpoint.pt", CHECKPOINT_FORMAT)["iteration"]
    assert f"interrupted (SIGINT) at iteration {stopped}; checkpoint written" in message, message
    assert f"distillkit distill --resume {run_dir}" in message and "Traceback" not in message
    assert killed_at < stopped < ITERATIONS and not (run_dir / "synthetic.pt").exists()

    run_cli("distill", "--resume", run_dir)
    assert torch.equal(_images(run_dir), _images(reference))
    assert _losses(run_dir) == _losses(reference)  # lines logged after a checkpoint were dropped, then redone


def test_class_step_schedule_resumes_bit_identically_after_an_interrupt_or_an_early_kill(tmp_path: Path):
    """M3D's schedule (one optimizer step per class) keeps momentum across classes: the checkpoint must too.
    A run killed before its first checkpoint resumes by starting afresh, to the same result."""
    from distillkit.runner import Interrupted, distill
    from distillkit.config import RunConfig

    args = ("--iterations", "4", "--step", "class", "--checkpoint-every", "3")
    reference = tmp_path / "reference"
    _distill(reference, *args)

    run_dir = tmp_path / "run"
    cfg = RunConfig.from_dict(json.loads((reference / "config.json").read_text()))

    def interrupt_after_two(iteration: int, loss: float | None) -> None:
        if iteration == 2:  # off the checkpoint interval: the interrupt itself must checkpoint
            signal.raise_signal(signal.SIGINT)

    with pytest.raises(Interrupted) as stop:
        distill(cfg, run_dir, device=torch.device("cpu"), data_root=DATA, resume=False,
                on_progress=interrupt_after_two)
    assert stop.value.iteration == 2
    assert safe_load(run_dir / "checkpoint.pt", CHECKPOINT_FORMAT)["iteration"] == 2

    run_cli("distill", "--resume", run_dir)
    assert torch.equal(_images(run_dir), _images(reference))
    assert _losses(run_dir) == _losses(reference)

    # killed before its first checkpoint: config.json is all the run has, plus an atomic write cut short
    early = tmp_path / "early"
    early.mkdir()
    shutil.copy(reference / "config.json", early / "config.json")
    stale = early / ".checkpoint.pt.k1ll3d.tmp"
    stale.write_bytes(b"PK\x03\x04half")
    run_cli("distill", "--resume", early)
    assert torch.equal(_images(early), _images(reference)) and not stale.exists()


def test_checkpoint_is_self_describing_and_files_follow_the_umask(reference: Path):
    state = safe_load(reference / "checkpoint.pt", CHECKPOINT_FORMAT)
    assert state["iteration"] == ITERATIONS and state["seed"] == 0
    assert state["config"] == json.loads((reference / "config.json").read_text())
    assert state["log_position"] == (reference / "losses.jsonl").stat().st_size
    assert {"real/ITERATION/CLASS", "augment/ITERATION/CLASS"} <= set(state["streams"]["loop"])
    assert state["parameterization"]["images"].shape == (10, 1, 28, 28)
    momentum = state["optimizer"]["state"][0]["momentum_buffer"]
    assert momentum.shape == (10, 1, 28, 28) and momentum.abs().sum() > 0
    umask = os.umask(0)
    os.umask(umask)
    for name in ("checkpoint.pt", "synthetic.pt", "config.json"):
        assert (reference / name).stat().st_mode & 0o777 == 0o666 & ~umask, name


@pytest.mark.parametrize("method", ["dm", "m3d"])
def test_builtin_methods_never_draw_from_torchs_global_generator(method: str, tmp_path: Path):
    """The premise of RNG-free checkpoints: every draw comes from a derived stream."""
    before = torch.random.get_rng_state()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # the loop's own check warns
        run_cli("distill", *TINY, "--method", method, "--iterations", "1", "--out", tmp_path / "run")
    assert torch.equal(torch.random.get_rng_state(), before)


def test_a_component_drawing_from_the_global_generator_is_reported(tmp_path: Path):
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "noisy.py").write_text(
        "import torch\n"
        "from distillkit import hookimpl\n"
        "from distillkit_dm.components import RandomConvNetSampler\n\n"
        "class Noisy(RandomConvNetSampler):\n"
        "    def extractor(self, iteration):\n"
        "        torch.rand(1)\n"
        "        return super().extractor(iteration)\n\n"
        "@hookimpl\n"
        "def register_samplers(register):\n"
        "    register('noisy', Noisy)\n")
    with pytest.warns(RuntimeWarning, match="global random generator"):
        run_cli("--plugins-dir", plugins, "distill", *TINY, "--sampler", "noisy", "--set", "sampler.model=convnet3_w32",
                "--iterations", "1", "--out", tmp_path / "run")


# -- safe loading ----------------------------------------------------------------------------


class _Payload:
    """Unpickling this runs code: it creates the file ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').close()",)


def test_a_pickle_that_would_run_code_is_refused_and_never_runs(reference: Path, tmp_path: Path):
    marker = tmp_path / "marker"
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    for name, fmt in (("synthetic.pt", ARTIFACT_FORMAT), ("checkpoint.pt", CHECKPOINT_FORMAT)):
        torch.save({"format": fmt, "format_version": 1, "images": _Payload(marker)}, run_dir / name)
    torch.load(run_dir / "synthetic.pt", weights_only=False)  # the file is real: an unsafe load runs it
    assert marker.exists()
    marker.unlink()

    for args in (("show", run_dir), ("evaluate", run_dir, "--epochs", "1", "--runs", "1"),
                 ("distill", "--resume", run_dir)):
        result = run_cli(*args, expect=2)
        assert "refusing to load" in result.stderr and "would call exec, i.e. run code" in result.stderr
        assert not marker.exists()


# -- determinism -----------------------------------------------------------------------------


def test_same_seed_same_synthetic_set_other_seed_differs(reference: Path, tmp_path: Path):
    _distill(tmp_path / "again")
    assert torch.equal(_images(tmp_path / "again"), _images(reference))
    assert _losses(tmp_path / "again") == _losses(reference)
    run_cli("distill", *TINY, "--seed", "1", "--out", tmp_path / "seed1")
    assert not torch.equal(_images(tmp_path / "seed1"), _images(reference))
    artifact = safe_load(tmp_path / "seed1" / "synthetic.pt", ARTIFACT_FORMAT)
    assert artifact["seed"] == 1 and artifact["config"]["seed"] == 1


def test_same_seed_same_evaluation_other_seed_differs(reference: Path, tmp_path: Path):
    quick = ("--epochs", "2", "--test-limit", "200", "--runs", "2", "--models", "convnet3_w32", "--no-baseline",
             "--device", "cpu")
    rows = {}
    for name, seed in (("a", None), ("b", None), ("c", "7")):
        run_dir = tmp_path / name
        shutil.copytree(reference, run_dir)
        run_cli("evaluate", run_dir, *quick, *(("--seed", seed) if seed else ()))
        report = json.loads((run_dir / "eval.json").read_text())
        assert report["distill_seed"] == 0
        rows[name] = {row["kind"]: row for row in report["results"]}
    a, b, c = (rows[name]["synthetic"] for name in "abc")
    assert a["seed"] == b["seed"] == 0 and c["seed"] == 7
    assert a["accuracies"] == b["accuracies"]
    assert a["accuracies"] != c["accuracies"]


def test_the_deterministic_flag_is_recorded_and_changes_nothing_on_the_cpu(reference: Path, tmp_path: Path):
    from distillkit.devices import set_deterministic

    try:
        _distill(tmp_path / "det", "--deterministic")
        assert torch.are_deterministic_algorithms_enabled()
    finally:
        set_deterministic(False)
    assert torch.equal(_images(tmp_path / "det"), _images(reference))  # CPU kernels are deterministic anyway
    assert json.loads((tmp_path / "det" / "config.json").read_text())["deterministic"] is True
