"""Components checked at their boundary: a wrong shape or an exception inside a plugin's component is one
line naming the component, its plugin and what was expected (exit 2, nothing written; --debug: traceback)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import TEST_PLUGINS, refused, run_cli

TINY = ("--dataset", "mnist", "--ipc", "2", "--batch-real", "4", "--iterations", "1", "--device", "cpu",
        "--set", "sampler.model=convnet3_w32")


def _distill(tmp_path: Path, *flags: str) -> tuple[str, ...]:
    return ("--plugins-dir", TEST_PLUGINS, "distill", *TINY, "--out", tmp_path / "run", *flags)


@pytest.mark.parametrize("flags, says", [
    (("--objective", "faulty"),
     "objective 'faulty' (plugin 'faulty') returned (1, 512) from __call__; expected (1,): one loss per class"),
    (("--objective", "faulty", "--set", "objective.fault=scalar"),
     "objective 'faulty' (plugin 'faulty') returned () from __call__; expected (1,)"),
    (("--objective", "faulty", "--set", "objective.fault=raise"),
     "objective 'faulty' (plugin 'faulty') raised in __call__: ZeroDivisionError: the objective divided by zero"),
    (("--parameterization", "faulty"),
     "parameterization 'faulty' (plugin 'faulty') returned (1, 1, 1, 28, 28) from decode; expected (1, 2, 1, 28, "
     "28) (K classes, images_per_class, c, H, W)"),
    (("--parameterization", "faulty", "--set", "parameterization.fault=raise"),
     "parameterization 'faulty' (plugin 'faulty') raised in decode: KeyError: 'no such class'"),
    (("--sampler", "faulty"),
     "sampler 'faulty' (plugin 'faulty') returned (2, 2, 512) from the extractor's forward; expected (2, d) "
     "features for 2 images"),
    (("--sampler", "faulty", "--set", "sampler.fault=raise"),
     "sampler 'faulty' (plugin 'faulty') raised in the extractor's forward: IndexError: feature index out of range"),
    (("--sampler", "faulty", "--set", "sampler.fault=factory"),
     "sampler 'faulty' (plugin 'faulty') could not be built with options {'model': 'convnet3_w32', 'fault': "
     "'factory'}: RuntimeError: cannot build the network"),
])
def test_a_broken_component_is_one_line_naming_it_before_anything_is_written(tmp_path, flags, says):
    refused(*_distill(tmp_path, *flags), says=says)
    assert not (tmp_path / "run").exists()


def test_non_finite_losses_at_the_first_iteration_name_the_objective(tmp_path):
    refused(*_distill(tmp_path, "--objective", "faulty", "--set", "objective.fault=nan"),
            says="objective 'faulty' (plugin 'faulty') returned non-finite losses [nan, nan")
    assert (tmp_path / "run" / "checkpoint.pt").exists()  # the initial checkpoint is kept, as for any stop


def test_debug_shows_the_component_traceback(tmp_path):
    with pytest.raises(Exception) as raised:
        run_cli("--debug", *_distill(tmp_path, "--objective", "faulty", "--set", "objective.fault=raise"))
    assert isinstance(raised.value.__cause__, ZeroDivisionError)


def test_a_protocol_that_raises_is_one_line_naming_it_and_its_plugin(tiny_dm_run, tmp_path):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(tiny_dm_run, run_dir)
    refused("--plugins-dir", TEST_PLUGINS, "evaluate", run_dir, "--protocol", "faulty", "--runs", "1", "--device",
            "cpu", says="protocol 'faulty' (plugin 'faulty') raised in evaluate: AttributeError: 'NoneType' object "
                        "has no attribute 'weight'")
