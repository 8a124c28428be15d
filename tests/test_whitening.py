"""ZCA whitening: the transform's algebra, its round trip, and a whitened run end to end (stored, inverted)."""

from __future__ import annotations

import json

import pytest
import torch

from distillkit import registry
from distillkit.artifact import load_synthetic
from distillkit.data import fitted_image_spec, load_split, resolve_root
from distillkit.interfaces import ImageSpec
from distillkit.whitening import ZCAWhitening
from tests.conftest import refused, run_cli


@pytest.fixture(scope="module")
def mnist_zca():
    dataset = registry.create("datasets", "mnist", zca=True, train_per_class=50)
    return dataset, fitted_image_spec(dataset, resolve_root())


def test_whitening_is_the_inverse_square_root_of_the_regularised_covariance(mnist_zca):
    dataset, spec = mnist_zca
    pixels, _ = dataset.load(resolve_root(), True)
    x = dataset.image_spec.normalize(pixels.double() / 255).flatten(1)
    cov = torch.cov(x.T)  # unbiased, computed here independently of the fit
    zca = spec.whitening
    whiten = zca.apply(torch.eye(x.shape[1]).view(-1, 1, 28, 28) + zca.mean.view(1, 1, 28, 28)).flatten(1).double()
    regularised = cov + zca.eps * torch.eye(len(cov), dtype=torch.float64)
    assert torch.allclose(whiten @ whiten @ regularised, torch.eye(len(cov), dtype=torch.float64), atol=2e-3)


def test_apply_then_invert_is_the_identity(mnist_zca):
    _, spec = mnist_zca
    x = torch.rand(7, 1, 28, 28)
    assert torch.allclose(spec.denormalize(spec.normalize(x)), x, atol=1e-4)
    whitened = spec.normalize(x)
    assert not torch.allclose(whitened, registry.create("datasets", "mnist").image_spec.normalize(x), atol=0.1)
    again = ImageSpec.from_dict(spec.as_dict())  # as the synthetic-set file stores it
    assert again == spec and torch.equal(again.normalize(x), whitened)
    assert ZCAWhitening.from_dict(spec.whitening.as_dict()) == spec.whitening
    other = fitted_image_spec(registry.create("datasets", "mnist", zca=True, zca_eps=0.5, train_per_class=50),
                              resolve_root())
    assert other != spec  # another transform is another spec: a set never evaluates under the wrong one


def test_a_whitened_run_stores_its_transform_and_exports_pixels(tmp_path, mnist_zca, one_thread):
    _, spec = mnist_zca
    run = tmp_path / "zca"
    # lr 0: the set stays the real images it starts from, so its export must be those pixels exactly
    run_cli("distill", "--method", "dm", "--dataset", "mnist", "--ipc", "2", "--iterations", "1", "--batch-real", "8",
            "--lr-img", "0", "--set", "dataset.zca=true", "--set", "dataset.train_per_class=50", "--device", "cpu",
            "--out", run)
    synthetic = load_synthetic(run / "synthetic.pt")
    assert synthetic.spec == spec  # the transform fitted on the training split, stored in the file
    run_cli("export", run, "--format", "pt", "-o", tmp_path / "set.pt")
    images = torch.load(tmp_path / "set.pt", weights_only=True)["images"]
    assert images.min() > -1e-4 and images.max() < 1 + 1e-4
    assert torch.allclose(images * 255, (images * 255).round(), atol=2e-3)  # uint8 pixels, the inverse applied
    train = load_split(registry.create("datasets", "mnist", train_per_class=50), resolve_root(), train=True)
    real = (train.gather(torch.arange(len(train.labels))) * 0.3081 + 0.1307).flatten(1)
    for image in images.flatten(1):  # each exported image is one of the real training images
        assert (real - image).abs().amax(1).min() < 2e-3
    run_cli("evaluate", run, "--protocol", "smoke", "--epochs", "3", "--runs", "1")
    rows = json.loads((run / "eval.json").read_text())["results"]
    # 20 real images learnt in whitened space for 3 epochs, tested on the whitened test set: above chance (10%;
    # measured 23.3 and 21.4)
    assert all(r["mean"] > 15 for r in rows), rows
    refused("distill", "--method", "dm", "--dataset", "mnist", "--set", "dataset.zca=true",
            "--set", "dataset.zca_eps=0", "--out", tmp_path / "bad", says="zca_eps must be positive, got 0")
