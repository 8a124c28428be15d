"""Third-party plugins: the example package pip-installed and run through the CLI, plugins defined here
found through entry points and --plugins-dir, broken plugins reported while the rest keep working."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import pytest

from distillkit import registry
from distillkit.rundir import load_run_synthetic as load_synthetic
from distillkit.errors import UsageError

from tests.conftest import ROOT, run_cli

EXAMPLE = ROOT / "examples" / "distillkit-cosine"


class Installed(NamedTuple):
    site: Path  # the pip --target folder: put it on sys.path / PYTHONPATH to "have the package installed"
    source: Path  # the copy pip built from (holds the example's own tests)


@pytest.fixture(scope="session")
def example(tmp_path_factory) -> Installed:
    """The example package, pip-installed (a real wheel build, entry points and all) into a fresh folder.

    A --target folder instead of the shared virtualenv: tests running beside these ones never see a
    half-installed package, and nothing needs uninstalling. Built from a copy so build/ and egg-info
    never land in the checkout.
    """
    base = tmp_path_factory.mktemp("example")
    source, site = base / "src", base / "site"
    shutil.copytree(EXAMPLE, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                           "--no-index", "--disable-pip-version-check", "--target", str(site), str(source)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return Installed(site, source)


def _env(site: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "DISTILLKIT_PLUGINS_DIR"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(site), env.get("PYTHONPATH")) if p)
    return env


def _rows(*args) -> dict[str, dict]:
    return {row["name"]: row for row in json.loads(run_cli(*args, "plugins", "--json").output)}


# -- the example package --------------------------------------------------------

def test_example_package_is_found_through_its_entry_point(example, monkeypatch):
    assert "dm-cosine" not in registry.load_plugins()["methods"]  # not installed: not there
    assert (example.site / "distillkit_cosine-0.1.0.dist-info" / "entry_points.txt").is_file()
    monkeypatch.syspath_prepend(str(example.site))
    monkeypatch.delitem(sys.modules, "distillkit_cosine", raising=False)

    row = _rows()["cosine"]
    assert (row["package"], row["version"], row["error"]) == ("distillkit-cosine", "0.1.0", None)
    assert row["hooks"] == ["register_objectives", "register_methods"]
    assert row["registers"] == {"objectives": ["cosine"], "methods": ["dm-cosine"]}
    assert Path(sys.modules["distillkit_cosine"].__file__).is_relative_to(example.site)
    method = registry.create("methods", "dm-cosine")
    assert (method.objective, method.parameterization, method.sampler) == ("cosine", "pixel", "random-convnet")
    table = run_cli("plugins").output
    assert "distillkit-cosine" in table and "dm-cosine" in table


def test_example_method_runs_through_the_cli(example, tmp_path):
    run = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "distillkit", "distill", "--method", "dm-cosine", "--dataset", "mnist",
                           "--ipc", "1", "--iterations", "2", "--batch-real", "8", "--device", "cpu", "--seed", "0",
                           "--out", str(run)], env=_env(example.site), capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    config = json.loads((run / "config.json").read_text())
    assert (config["method"], config["objective"], config["lr_img"]) == ("dm-cosine", "cosine", 1000.0)
    synthetic = load_synthetic(run)
    assert synthetic.images.shape == (10, 1, 28, 28) and synthetic.images.isfinite().all()
    losses = [json.loads(line)["loss"] for line in (run / "losses.jsonl").read_text().splitlines()]
    # 1 - cosine lies in [0, 2]; DM's squared mean gap is ~60-80 per class here: the cosine objective ran
    assert len(losses) == 2 and all(0 <= loss <= 2 for loss in losses)


def test_example_package_own_tests_pass(example):
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           str(example.source / "tests")], env=_env(example.site), capture_output=True, text=True,
                          cwd=example.source)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "4 passed" in done.stdout


# -- entry-point plugins defined in the test suite ------------------------------

def _distribution(site: Path, dist: str, version: str, entry: str, module: str, code: str) -> None:
    """What pip leaves behind for a package: a dist-info with an entry point, and the module."""
    info = site / f"{dist.replace('-', '_')}-{version}.dist-info"  # the escaped name, as wheels write it
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text(f"[distillkit]\n{entry} = {module}\n")
    (site / f"{module}.py").write_text(code)


def test_entry_point_plugins_load_and_a_broken_one_is_reported(tmp_path, monkeypatch, request):
    site = tmp_path / "site"
    _distribution(site, "suite-objective", "1.2", "suite", "dk_suite_objective",
                  "from distillkit import hookimpl\n"
                  "class Double:\n"
                  "    def __call__(self, real, syn):\n"
                  "        return 2 * (real.mean(1) - syn.mean(1)).pow(2).sum(-1)\n"
                  "@hookimpl\n"
                  "def register_objectives(register):\n"
                  "    register('double-mean', Double)\n")
    _distribution(site, "suite-broken", "0.3", "broken", "dk_suite_broken",
                  "import dk_suite_missing_dependency\n")
    for module in ("dk_suite_objective", "dk_suite_broken"):
        request.addfinalizer(lambda m=module: sys.modules.pop(m, None))
    monkeypatch.syspath_prepend(str(site))

    rows = _rows()
    assert rows["suite"]["package"] == "suite-objective" and rows["suite"]["version"] == "1.2"
    assert rows["suite"]["registers"] == {"objectives": ["double-mean"]} and rows["suite"]["error"] is None
    broken = rows["broken"]
    assert (broken["package"], broken["version"]) == ("suite-broken", "0.3")
    assert "ModuleNotFoundError" in broken["error"] and "dk_suite_missing_dependency" in broken["error"]
    assert "dk_suite_broken.py:1" in broken["error"]  # points at the plugin's line, not at the loader
    assert rows["dm"]["error"] is None
    assert registry.plugins()["objectives"].get("double-mean").plugin == "suite"
    result = run_cli("list", "methods")
    assert "dm" in result.output


# -- --plugins-dir: quick research code, broken files beside good ones ----------

GOOD = """
from distillkit import hookimpl
from distillkit.interfaces import Method

class SquaredSum:
    '''Sum over features of the squared mean gap (DM's loss), written here in the test suite.'''
    def __call__(self, real, syn):
        return (real.mean(1) - syn.mean(1)).pow(2).sum(-1)

@hookimpl
def register_objectives(register):
    register("suite-sq", SquaredSum)

@hookimpl
def register_methods(register):
    register("suite-dm", Method(name="suite-dm", objective="suite-sq", parameterization="pixel",
                                sampler="random-convnet"))
"""

BROKEN = {
    "import_error.py": "raise RuntimeError('cannot find [weights]\\non this machine')\n",
    "hook_error.py": ("from distillkit import hookimpl\n"
                      "@hookimpl\n"
                      "def register_methods(register):\n"
                      "    register('half-registered', object())\n"
                      "    {}['missing']\n"),
    "typo.py": ("from distillkit import hookimpl\n"
                "@hookimpl\n"
                "def register_objective(register):\n"
                "    register('never', object)\n"
                "def register_samplers(register):\n"
                "    register('unmarked', object)\n"),
    "dm.py": ("from distillkit import hookimpl\n"
              "@hookimpl\n"
              "def register_objectives(register):\n"
              "    register('shadow', object)\n"),
}


@pytest.fixture
def plugins_dir(tmp_path) -> Path:
    folder = tmp_path / "plugins"
    folder.mkdir()
    (folder / "good.py").write_text(GOOD)
    for name, code in BROKEN.items():
        (folder / name).write_text(code)
    return folder


def test_broken_plugins_are_reported_with_their_errors(plugins_dir):
    rows = _rows("--plugins-dir", plugins_dir)
    assert rows["good"]["error"] is None and rows["good"]["package"] == str(plugins_dir / "good.py")
    assert rows["good"]["registers"] == {"objectives": ["suite-sq"], "methods": ["suite-dm"]}
    assert rows["import_error"]["error"] == "RuntimeError: cannot find [weights] on this machine (import_error.py:1)"
    assert rows["hook_error"]["error"] == "KeyError: 'missing' (hook_error.py:5)"
    assert rows["hook_error"]["registers"] == {}  # a hook that raised contributes nothing, not half its names
    assert "unknown hook 'register_objective'; did you mean 'register_objectives'?" in rows["typo"]["error"]
    assert "register_samplers is not marked with @hookimpl" in rows["typo"]["error"]
    clash = rows[f"dm ({plugins_dir / 'dm.py'})"]
    assert "plugin name 'dm' is already taken by distillkit" in clash["error"]
    assert rows["dm"]["error"] is None and rows["dm"]["registers"]["methods"] == ["dm", "random"]
    objectives = registry.plugins()["objectives"]
    assert "shadow" not in objectives and "never" not in objectives

    table = run_cli("--plugins-dir", plugins_dir, "plugins").output
    for name in ("import_error", "hook_error", "typo", "good"):
        assert name in table
    assert table.count("error:") == 4 and "RuntimeError" in table
    debug = run_cli("--debug", "--plugins-dir", plugins_dir, "plugins").output
    assert "Traceback (most recent call last)" in debug and "{}['missing']" in debug
    # not on a terminal (CliRunner, a pipe): rows are never wrapped, each error stays on one line
    assert any("RuntimeError: cannot find [weights] on this machine (import_error.py:1)" in line
               for line in table.splitlines())
    # --strict is for CI: the same table, then exit 1 naming the failed plugins
    strict = run_cli("--plugins-dir", plugins_dir, "plugins", "--strict", expect=1)
    assert strict.stderr.strip().startswith("Error: 4 plugin(s) failed to load: dm (")
    assert "hook_error" in strict.stderr and "import_error" in strict.stderr
    run_cli("plugins", "--strict")  # the built-ins alone load cleanly


def test_describe_prints_the_docs_and_options_of_every_builtin_component():
    from distillkit.catalog import describe

    plugins = registry.plugins()
    for kind in registry.KINDS:
        for name in plugins[kind].names():
            text = run_cli("describe", kind, name).output
            assert f"{kind[:-1]} {name} (plugin " in text and "(no docstring)" not in text, (kind, name, text)
            for option in describe(kind, name).options:
                assert option.name in text and option.default in text
    sampler = run_cli("describe", "samplers", "random-encoder").output
    assert "redrawn every ``period`` iterations" in sampler and "--set sampler.OPTION=VALUE" in sampler
    assert [(o.name, o.type, o.default) for o in describe("samplers", "random-encoder").options] == [
        ("model", "str", "'convnet3'"), ("period", "int", "5")]  # spec, seed, device, data: the host's
    folder = {o.name: o.default for o in describe("datasets", "imagefolder").options}
    assert folder == {"path": "required", "size": "32", "channels": "3"}
    protocol = {o.name: o.default for o in describe("protocols", "dc-classic").options}
    assert protocol["epochs"] == "1000" and protocol["op_per"] == "'batch'"
    assert "distillkit evaluate --set protocol.OPTION=VALUE" in run_cli("describe", "protocols", "idc").output
    assert {o.name for o in describe("methods", "m3d").options} >= {"lr_img", "iterations", "sampler_options"}
    result = run_cli("describe", "samplers", "random-encodr", expect=2)
    assert "unknown sampler 'random-encodr'; choose one of: " in result.stderr


def test_the_rest_still_work_beside_broken_plugins(plugins_dir, tmp_path):
    listed = run_cli("--plugins-dir", plugins_dir, "list", "methods").output
    assert "dm" in listed and "suite-dm" in listed and "half-registered" not in listed
    result = run_cli("--plugins-dir", plugins_dir, "distill", "--method", "half-registered", expect=2)
    assert "unknown method 'half-registered'" in result.output
    assert "plugins that failed to load: dm (" in result.output and "hook_error, import_error, typo" in result.output
    # the method defined in the test suite runs end to end with broken neighbours loaded
    run_cli("--plugins-dir", plugins_dir, "distill", "--method", "suite-dm", "--dataset", "mnist", "--ipc", "1",
            "--iterations", "1", "--batch-real", "8", "--device", "cpu", "--out", tmp_path / "run")
    assert load_synthetic(tmp_path / "run").config["objective"] == "suite-sq"


def test_a_plugin_file_that_fails_leaves_no_module_behind(plugins_dir):
    registry.load_plugins(plugins_dir)
    assert "distillkit_plugins_dir.import_error" not in sys.modules
    assert "distillkit_plugins_dir.good" in sys.modules


def test_missing_plugins_dir_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="is not a directory"):
        registry.load_plugins(tmp_path / "nope")
    result = run_cli("--plugins-dir", tmp_path / "nope", "list", "methods", expect=2)
    assert "is not a directory" in result.output
