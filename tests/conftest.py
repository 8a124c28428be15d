"""Shared fixtures: the real MNIST files from ../shared/data, a CLI runner, one tiny distilled run."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from click.testing import CliRunner

ROOT = Path(__file__).resolve().parents[1]
# Resolved once, here: the README's command gives a relative path, and tests that start subprocesses in
# other folders or link data files must see the same absolute one.
DATA = Path(os.environ.get("DISTILLKIT_DATA") or ROOT.parent / "shared" / "data").expanduser().resolve()
os.environ["DISTILLKIT_DATA"] = str(DATA)
#: third-party-style plugins the tests load with ``--plugins-dir`` (a protocol and a trained sampler)
TEST_PLUGINS = ROOT / "tests" / "plugins"


def pytest_sessionstart(session):
    if not (DATA / "MNIST" / "raw").is_dir():
        raise pytest.UsageError(f"tests need the real MNIST files under {DATA}/MNIST/raw; set DISTILLKIT_DATA")


@pytest.fixture(autouse=True, scope="session")
def _reference_cache(tmp_path_factory):
    """Teachers, full-data references and ZCA fits go to a session folder, never the user's cache."""
    os.environ["DISTILLKIT_REFERENCE_CACHE"] = str(tmp_path_factory.mktemp("references"))


@pytest.fixture(autouse=True)
def _fresh_plugins(monkeypatch):
    """Every test starts from the entry-point plugin set (a test may load extra plugins)."""
    from distillkit import registry

    monkeypatch.delenv("DISTILLKIT_PLUGINS_DIR", raising=False)
    registry.load_plugins()
    yield
    registry.load_plugins()


def run_cli(*args: str, expect: int | None = 0):
    """Invoke the real click CLI in-process; asserts the exit code unless ``expect`` is None."""
    from distillkit.cli import cli

    result = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    if expect is not None:
        assert result.exit_code == expect, f"exit {result.exit_code}, expected {expect}:\n{result.output}"
    return result


def refused(*args: object, says: str | tuple[str, ...]) -> str:
    """Run the CLI, expect exit 2 and a single ``Error:`` line on stderr containing every ``says``."""
    result = run_cli(*args, expect=2)
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and result.stderr.rstrip().endswith(errors[0]), result.stderr
    assert "Traceback" not in result.output
    for text in (says,) if isinstance(says, str) else says:
        assert text in errors[0], errors[0]
    return errors[0]


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file's bytes and mtime, but the writer lock's (it names the last process that held it)."""
    from distillkit.rundir import LOCK

    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != LOCK}


@pytest.fixture(scope="module")
def one_thread():
    """Tiny batches: a second intra-op thread only adds synchronisation (and stalls on a busy machine)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_dm_run(tmp_path_factory) -> Path:
    """A real 4-iteration DM distillation of MNIST at IPC 1 (shared, read-only for tests)."""
    from distillkit import registry

    registry.load_plugins()
    run_dir = tmp_path_factory.mktemp("runs") / "dm"
    run_cli("distill", "--method", "dm", "--dataset", "mnist", "--ipc", "1", "--iterations", "4",
            "--batch-real", "16", "--seed", "0", "--device", "cpu", "--out", run_dir)
    return run_dir
