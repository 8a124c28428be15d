"""Tests of the plugin. Run them with the package installed: ``pip install -e '.[test]' && pytest``."""

import torch
from click.testing import CliRunner

from distillkit import registry
from distillkit.cli import cli
from distillkit.interfaces import Objective

from distillkit_cosine import CosineObjective


def test_cosine_objective_compares_directions_per_class():
    objective = CosineObjective()
    assert isinstance(objective, Objective)
    real = torch.randn(3, 5, 8)  # (K classes, n real, d features)
    same_direction = 4 * real.mean(1, keepdim=True).expand(3, 2, 8)  # n_s = 2, any positive scale
    assert objective(real, same_direction).shape == (3,)
    assert torch.allclose(objective(real, same_direction), torch.zeros(3), atol=1e-6)
    assert torch.allclose(objective(real, -real), torch.full((3,), 2.0), atol=1e-6)


def test_gradient_reaches_the_synthetic_features():
    real, syn = torch.randn(2, 6, 4), torch.randn(2, 3, 4, requires_grad=True)
    CosineObjective()(real, syn).sum().backward()
    assert syn.grad is not None and syn.grad.abs().sum() > 0


def test_registered_through_the_entry_point():
    plugins = registry.load_plugins()
    assert plugins["objectives"].get("cosine").plugin == "cosine"  # the entry-point name in pyproject.toml
    method = plugins["methods"].create("dm-cosine")
    assert (method.objective, method.parameterization, method.sampler) == ("cosine", "pixel", "random-convnet")
    # the components taken from DM by name must exist where the method runs
    assert "pixel" in plugins["parameterizations"] and "random-convnet" in plugins["samplers"]


def test_method_runs_through_the_cli(tmp_path):
    # the generated "fake" dataset needs no files, so this runs anywhere
    result = CliRunner().invoke(cli, ["distill", "--method", "dm-cosine", "--dataset", "fake", "--ipc", "1",
                                      "--iterations", "2", "--batch-real", "8", "--device", "cpu",
                                      "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "run" / "synthetic.pt").is_file()
