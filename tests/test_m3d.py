"""The M3D plugin: MMD objective, factor parameterization, random-encoder sampler, the m3d method."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from distillkit import registry
from distillkit.rundir import load_run_synthetic as load_synthetic
from distillkit.config import resolve
from distillkit.data import load_split, resolve_root
from distillkit.errors import UsageError
from distillkit.interfaces import ImageSpec, Objective, Parameterization, Sampler
from distillkit.seeding import generator
from tests.conftest import run_cli


@pytest.fixture(scope="module")
def mnist():
    registry.load_plugins()
    return load_split(registry.create("datasets", "mnist"), resolve_root(), train=True)


def mmd(**options) -> Objective:
    objective = registry.create("objectives", "mmd", **options)
    assert isinstance(objective, Objective)
    return objective


# -- the MMD objective ----------------------------------------------------------

@pytest.mark.parametrize("options", [{}, {"bandwidth": "median"}, {"bandwidth": 3.0}, {"bandwidth": [1.0, 10.0]},
                                     {"kernel": "linear"}])
def test_mmd_is_zero_for_a_set_with_itself_and_positive_for_shifted_sets(options):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 20, 16, generator=g)
    objective = mmd(**options)
    same = objective(x, x.clone())
    assert same.shape == (3,)
    assert same.abs().max() < 1e-5
    shifted = objective(x, x[:, :10] + 1.5)
    assert (shifted > 1e-2).all()


def test_unbiased_estimator_is_unbiased_on_gaussians_with_a_known_mmd():
    """X ~ N(0, I_2), Y ~ N(m, I_2), one Gaussian exp(-D / 2): E k(x, y) = exp(-|m|^2 / 6) / 3, E k(x, x') = 1/3,
    so MMD^2 = 2/3 (1 - exp(-|m|^2 / 6)). The biased V-statistic adds 2 (1 - 1/3) / n on top."""
    g = torch.Generator().manual_seed(0)
    draws, n = 4000, 4
    unbiased, biased = mmd(bandwidth=2.0, estimator="unbiased"), mmd(bandwidth=2.0)
    for shift_sq in (0.0, 6.0):
        x = torch.randn(draws, n, 2, generator=g, dtype=torch.float64)
        y = torch.randn(draws, n, 2, generator=g, dtype=torch.float64) + math.sqrt(shift_sq / 2)
        true = 2 / 3 * (1 - math.exp(-shift_sq / 6))
        assert abs(unbiased(x, y).mean().item() - true) < 0.02
        assert abs(biased(x, y).mean().item() - (true + 4 / 3 / n)) < 0.02


def test_gradients_reach_the_synthetic_side_and_the_bandwidth_is_a_constant():
    g = torch.Generator().manual_seed(1)
    real = torch.randn(1, 12, 8, generator=g, dtype=torch.float64)
    syn = torch.randn(1, 5, 8, generator=g, dtype=torch.float64, requires_grad=True)
    mmd()(real, syn).sum().backward()
    grad = syn.grad.clone()
    assert torch.isfinite(grad).all() and grad.abs().min() > 0

    # the same loss with the bandwidths fixed at the values "mean" computes gives the same gradient
    z = torch.cat([syn.detach(), real], 1)[0]
    h = torch.cdist(z, z).pow(2).sum() / (len(z) ** 2 - len(z))
    syn.grad = None
    fixed = mmd(bandwidth=[m * h.item() for m in (0.25, 0.5, 1, 2, 4)])
    fixed(real, syn).sum().backward()
    assert torch.allclose(syn.grad, grad)


def test_linear_kernel_mmd_is_dm_mean_matching():
    g = torch.Generator().manual_seed(2)
    real = torch.randn(4, 30, 64, generator=g) * 3 + 1
    syn = (torch.randn(4, 7, 64, generator=g) * 3 + 1.2).requires_grad_()
    mean = registry.create("objectives", "mean")
    ours, dm = mmd(kernel="linear")(real, syn), mean(real, syn)
    assert torch.allclose(ours, dm, rtol=1e-4)
    g_ours, = torch.autograd.grad(ours.sum(), syn)
    g_dm, = torch.autograd.grad(dm.sum(), syn)
    assert torch.allclose(g_ours, g_dm, rtol=1e-3, atol=1e-5)


def test_mmd_options_are_checked():
    with pytest.raises(UsageError, match="unknown MMD kernel 'poly'; choose one of: gaussian, linear"):
        mmd(kernel="poly")
    with pytest.raises(UsageError, match="unknown MMD bandwidth 'max'"):
        mmd(bandwidth="max")
    with pytest.raises(UsageError, match="positive"):
        mmd(bandwidth=[1.0, -2.0])
    with pytest.raises(UsageError, match="2\\+ real and synthetic"):
        mmd(estimator="unbiased")(torch.randn(1, 5, 3), torch.randn(1, 1, 3))


# -- the factor parameterization ------------------------------------------------

def factor(spec: ImageSpec, ipc: int, **options) -> Parameterization:
    param = registry.create("parameterizations", "factor", spec=spec, ipc=ipc, device=torch.device("cpu"), **options)
    assert isinstance(param, Parameterization)
    return param


def test_factor_decode_shapes_order_and_gradients(mnist):
    spec, ipc, f = mnist.spec, 2, 2
    param = factor(spec, ipc)
    assert param.images_per_class == 8
    param.init(mnist, generator(0, "init"))
    decoded = param.decode(range(10))
    assert decoded.shape == (10, 8, 1, 28, 28)

    # "mix": decoded image j of a class is the class's j-th real image, nearest-down and bilinear-up sampled
    firsts = spec.denormalize(mnist.class_images(3)[:8])
    expected = F.interpolate(F.interpolate(firsts, size=(14, 14), mode="nearest"), size=(28, 28), mode="bilinear",
                             align_corners=False)
    assert torch.allclose(decoded[3], spec.normalize(expected), atol=1e-5)
    assert torch.equal(param.decode([7, 3]), decoded[[7, 3]])
    assert torch.allclose(param.stored(), spec.normalize(param.images.detach()))

    # tile-major order: decoded image t * ipc + i comes from tile t = (row, col) of stored image i, and only there
    for t, i in [(0, 0), (1, 1), (2, 0), (3, 1)]:
        grad, = torch.autograd.grad(param.decode([5])[0, t * ipc + i].sum(), param.images)
        touched = (grad != 0).nonzero()
        assert len(touched) == 14 * 14
        assert set(touched[:, 0].tolist()) == {5 * ipc + i}
        row, col = divmod(t, f)
        assert touched[:, 2].min() >= 14 * row and touched[:, 2].max() < 14 * (row + 1)
        assert touched[:, 3].min() >= 14 * col and touched[:, 3].max() < 14 * (col + 1)


def test_factor_pads_with_grey_when_the_size_is_not_a_multiple():
    spec = ImageSpec(1, 28, 28, 2, (0.5,), (0.5,))
    param = factor(spec, 1, factor=3)
    assert param.images_per_class == 9
    with torch.no_grad():
        param.images.zero_()
    pixels = spec.denormalize(param.decode([0, 1]))
    assert pixels.shape == (2, 9, 1, 28, 28)
    # tiles are 10 px: the last tile row/column reads stored pixels 20-27 and two padded rows/columns of 0.5
    for t in range(9):
        row, col = divmod(t, 3)
        tile = pixels[:, t, 0]
        assert tile[:, 0, 0].abs().max() < 1e-6
        assert torch.allclose(tile[:, -1, :5], torch.tensor(0.5 if row == 2 else 0.0), atol=1e-6)
        assert torch.allclose(tile[:, :5, -1], torch.tensor(0.5 if col == 2 else 0.0), atol=1e-6)


def test_factor_one_equals_pixel(mnist):
    spec = mnist.spec
    pixel = registry.create("parameterizations", "pixel", spec=spec, ipc=3, device=torch.device("cpu"))
    one = factor(spec, 3, factor=1, init="real")
    pixel.init(mnist, generator(4, "init"))
    one.init(mnist, generator(4, "init"))
    assert torch.allclose(one.decode(range(10)), pixel.decode(range(10)), atol=1e-5)
    assert torch.allclose(one.stored(), pixel.stored(), atol=1e-5)
    other = factor(spec, 3, factor=1, init="real")
    other.init(mnist, generator(5, "init"))
    assert not torch.allclose(other.decode(range(10)), pixel.decode(range(10)), atol=1e-2)
    # and the decode is the identity on the stored pixels, gradients included
    grad, = torch.autograd.grad(one.decode([2]).sum(), one.images)
    assert torch.allclose(grad[6:9], torch.full_like(grad[6:9], 1 / spec.std[0])) and grad[:6].abs().sum() == 0


def test_factor_projects_into_pixel_space_and_round_trips_its_state(mnist):
    param = factor(mnist.spec, 1)
    param.init(mnist, generator(0, "init"))
    with torch.no_grad():
        param.images.mul_(3).sub_(1)
    param.project()
    assert param.images.min() == 0 and param.images.max() == 1
    again = factor(mnist.spec, 1)
    again.load_state_dict(param.state_dict())
    assert torch.equal(again.decode(range(10)), param.decode(range(10)))
    with pytest.raises(UsageError, match="unknown factor init 'first'; choose one of: mix, real, noise"):
        factor(mnist.spec, 1, init="first")
    with pytest.raises(UsageError, match="factor must be an integer from 1 to 28"):
        factor(mnist.spec, 1, factor=0)


def test_factor_in_normalized_space_decodes_the_same_images_and_is_never_clamped(mnist):
    """IDM's partitioning and expansion: the same tiles stored as normalised values, no clamp."""
    pixels, normalized = factor(mnist.spec, 2, init="real"), factor(mnist.spec, 2, init="real", space="normalized")
    pixels.init(mnist, generator(3, "init"))
    normalized.init(mnist, generator(3, "init"))
    assert torch.allclose(normalized.decode(range(10)), pixels.decode(range(10)), atol=1e-5)
    assert torch.allclose(normalized.stored(), pixels.stored(), atol=1e-5)
    with torch.no_grad():
        normalized.images.mul_(10)
    before = normalized.images.detach().clone()
    normalized.project()
    assert torch.equal(normalized.images, before) and before.max() > mnist.spec.normalize(torch.ones(1, 1, 1)).max()
    bilinear = factor(mnist.spec, 2, init="real", resize="bilinear")
    bilinear.init(mnist, generator(3, "init"))  # same real images, shrunk bilinearly instead of nearest
    assert not torch.equal(bilinear.images, pixels.images)
    with pytest.raises(UsageError, match="unknown factor space 'rgb'; choose one of: pixels, normalized"):
        factor(mnist.spec, 2, space="rgb")


# -- the random-encoder sampler -------------------------------------------------

def sampler(spec: ImageSpec, seed: int, **options) -> Sampler:
    made = registry.create("samplers", "random-encoder", spec=spec, seed=seed, device=torch.device("cpu"), **options)
    assert isinstance(made, Sampler)
    return made


def test_sampler_redraws_exactly_every_period_and_is_deterministic():
    spec = ImageSpec(1, 28, 28, 10, (0.5,), (0.5,))
    x = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    s = sampler(spec, 7, period=3, model="convnet3_w32")
    embeddings = [s.extractor(it)(x) for it in range(8)]
    for it in range(1, 8):
        same = torch.equal(embeddings[it], embeddings[it - 1])
        assert same == (it % 3 != 0) == (not s.redraws_at(it))
    assert s.extractor(7) is s.extractor(6)  # cached within a period, not rebuilt

    assert torch.equal(sampler(spec, 7, period=3, model="convnet3_w32").extractor(4)(x), embeddings[4])
    assert not torch.equal(sampler(spec, 8, period=3, model="convnet3_w32").extractor(4)(x), embeddings[4])
    # period 1 draws DM's network of each iteration
    dm = registry.create("samplers", "random-convnet", spec=spec, seed=7, device=torch.device("cpu"),
                         model="convnet3_w32")
    assert torch.equal(sampler(spec, 7, period=1, model="convnet3_w32").extractor(5)(x), dm.extractor(5)(x))
    with pytest.raises(UsageError, match="period must be a positive integer"):
        sampler(spec, 7, period=0)


# -- the method, from the CLI ----------------------------------------------------

def test_m3d_method_defaults():
    m3d = registry.create("methods", "m3d")
    assert (m3d.objective, m3d.parameterization, m3d.sampler, m3d.step) == ("mmd", "factor", "random-encoder", "class")
    assert (m3d.augment, m3d.augment_strategy) == ("idc", "color_crop_cutout")
    assert dict(m3d.parameterization_options)["factor"] == 2 and dict(m3d.sampler_options)["period"] == 5
    assert [resolve(m3d, "mnist", ipc, {}).lr_img for ipc in (1, 10, 50)] == [0.5, 5.0, 5.0]


def test_cli_m3d_run_writes_decoded_factor_images_and_shows_both(tmp_path: Path):
    run = tmp_path / "m3d"
    run_cli("distill", "--method", "m3d", "--dataset", "mnist", "--ipc", "2", "--iterations", "2", "--batch-real", "8",
            "--set", "sampler.model=convnet3_w32", "--device", "cpu", "--out", run)
    synthetic = load_synthetic(run)
    assert synthetic.images.shape == (2 * 2 * 2 * 10, 1, 28, 28)
    assert torch.equal(synthetic.labels, torch.arange(10).repeat_interleave(8))
    assert synthetic.stored.shape == (20, 1, 28, 28)
    assert torch.equal(synthetic.stored_labels, torch.arange(10).repeat_interleave(2))
    assert synthetic.meta["parameterization"] == "factor"
    for flag, name in (("--decoded", "decoded.png"), ("--stored", "stored.png")):
        run_cli("show", run, flag, "-o", tmp_path / name)
        assert (tmp_path / name).stat().st_size > 1000


@pytest.mark.parametrize("args", [("--method", "dm", "--objective", "mmd"),
                                  ("--method", "m3d", "--parameterization", "pixel"),
                                  ("--method", "m3d", "--sampler", "random-convnet")])
def test_components_combine_with_dm_from_the_cli(tmp_path: Path, args):
    run = tmp_path / "run"
    run_cli("distill", *args, "--dataset", "mnist", "--ipc", "1", "--iterations", "1", "--batch-real", "4",
            "--set", "sampler.model=convnet3_w32", "--device", "cpu", "--out", run)
    synthetic = load_synthetic(run)
    decoded_per_class = 4 if synthetic.meta["parameterization"] == "factor" else 1
    assert synthetic.images.shape[0] == 10 * decoded_per_class and torch.isfinite(synthetic.images).all()
    chosen = dict(zip(args[::2], args[1::2]))
    for flag in ("--objective", "--parameterization", "--sampler"):
        if flag in chosen:
            assert synthetic.config[flag[2:]] == chosen[flag]
    losses = [json.loads(line)["loss"] for line in (run / "losses.jsonl").read_text().splitlines()]
    assert len(losses) == 1 and math.isfinite(losses[0]) and losses[0] > 0
