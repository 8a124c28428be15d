"""DataDAM as a plugin: spatial attention and its loss on hand-made tensors, the tapped random network (the
same network DM draws), DataDAM without its attention term being DM bit for bit, and a CLI run that resumes
after kill -9 and shards over torchrun bit for bit."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from distillkit import registry
from distillkit.data import load_split
from distillkit.errors import UsageError
from distillkit_datadam.components import spatial_attention
from tests.conftest import DATA, run_cli
from tests.test_distributed import single_and_sharded
from tests.test_reliability import assert_resumes_as, synthetic_images as _images

RUN = ("--method", "datadam", "--dataset", "mnist", "--ipc", "2", "--batch-real", "8", "--device", "cpu",
       "--seed", "2", "--log-every", "1", "--set", "sampler.model=convnet3_w32")



def test_spatial_attention_is_the_l2_normalised_channel_sum_of_powers():
    maps = torch.tensor([[[[1.0, -2.0]], [[3.0, 0.0]]]])  # (1 image, 2 channels, 1 x 2)
    assert torch.allclose(spatial_attention(maps, 1.0), torch.tensor([[4.0, 2.0]]) / 20 ** 0.5)
    assert torch.allclose(spatial_attention(maps, 2.0), torch.tensor([[10.0, 4.0]]) / 116 ** 0.5)
    batched = torch.randn(3, 5, 4, 6, 6)  # (K, n, C, H, W): per image, whatever the leading dimensions
    assert torch.allclose(spatial_attention(batched, 4.0).norm(dim=-1), torch.ones(3, 5))


def test_the_loss_weights_each_attention_layer_and_the_embedding_as_the_reference():
    dam = registry.create("objectives", "attention-matching")
    real = {"features.2": torch.rand(2, 3, 4, 2, 2), "embedding": torch.rand(2, 3, 5)}
    syn = {name: value[:, :1].clone().requires_grad_() for name, value in real.items()}
    loss = dam(real, syn)
    att = lambda x: spatial_attention(x, 1.0)  # noqa: E731
    expected = ((real["embedding"].mean(1) - syn["embedding"].mean(1)).pow(2).sum(1)
                + 100 * (att(real["features.2"]).mean(1) - att(syn["features.2"]).mean(1)).pow(2).sum(1))
    assert loss.shape == (2,) and torch.allclose(loss, expected)
    loss.sum().backward()
    assert syn["features.2"].grad.abs().sum() > 0 and syn["embedding"].grad.abs().sum() > 0
    assert torch.allclose(dam(real, {k: v.detach() for k, v in real.items()}), torch.zeros(2), atol=1e-6)
    with pytest.raises(UsageError, match="needs named features"):
        dam(real["embedding"], syn["embedding"])
    with pytest.raises(UsageError, match="power must be a number > 0"):
        registry.create("objectives", "attention-matching", power=0)


def test_the_sampler_taps_every_block_but_the_last_of_the_network_dm_draws():
    mnist = load_split(registry.create("datasets", "mnist"), DATA, train=True)
    spec, images = mnist.spec, mnist.images[:4]
    host = {"spec": spec, "seed": 7, "device": "cpu"}
    sampler = registry.create("samplers", "attention-convnet", host)
    assert sampler.taps == ["features.2", "features.6"]  # the ReLUs of blocks 1 and 2 of ConvNet-3
    with torch.no_grad():
        out = sampler.extractor(3)(images)
        dm = registry.create("samplers", "random-convnet", host).extractor(3)(images)
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "features.2": (4, 128, 32, 32), "features.6": (4, 128, 16, 16), "embedding": (4, 2048)}
    assert torch.equal(out["embedding"], dm)  # the same random network as DM's at that iteration
    assert (out["features.2"] >= 0).all()  # post-activation


def test_without_its_attention_term_datadam_is_dm_bit_for_bit(tmp_path: Path):
    # so any accuracy gap between the two methods is the attention term's (the grid's DataDAM rows rely on it)
    common = ("--dataset", "mnist", "--ipc", "1", "--batch-real", "8", "--device", "cpu", "--seed", "3",
              "--iterations", "3", "--set", "sampler.model=convnet3_w32")
    run_cli("distill", "--method", "dm", *common, "--out", tmp_path / "dm")
    run_cli("distill", "--method", "datadam", *common, "--set", "objective.attention_weight=0",
            "--out", tmp_path / "datadam")
    run_cli("distill", "--method", "datadam", *common, "--out", tmp_path / "attention")
    assert torch.equal(_images(tmp_path / "datadam"), _images(tmp_path / "dm"))
    assert not torch.equal(_images(tmp_path / "attention"), _images(tmp_path / "dm"))


def test_datadam_runs_resumes_after_sigkill_and_shards_bit_identically(tmp_path: Path):
    args = (*RUN, "--iterations", "6", "--checkpoint-every", "2")
    run_cli("distill", *RUN, "--iterations", "0", "--out", tmp_path / "start")
    reference = tmp_path / "reference"
    run_cli("distill", *args, "--out", reference)
    assert not torch.equal(_images(reference), _images(tmp_path / "start"))

    assert_resumes_as(reference, tmp_path, *args)

    single, sharded = single_and_sharded(tmp_path, "distill", *args)
    assert torch.equal(_images(sharded), _images(single))
