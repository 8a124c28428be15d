"""The model zoo: every registered evaluator and a timm-native model build for 1/3 channels at 28/32 pixels,
train one step, embed; names resolve distillkit-first without shadowing timm; bad names and sizes fail clearly."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F

from distillkit import registry
from distillkit.errors import UsageError
from distillkit.interfaces import ImageSpec
from distillkit.models import Resized, check_model, create_model, embed
from distillkit.zoo.classic import ResNet

from tests.conftest import run_cli

SPECS = [ImageSpec(c, s, s, 7, (0.5,) * c, (0.25,) * c) for c in (1, 3) for s in (28, 32)]
ZOO = registry.plugins()["models"].names()


pytestmark = pytest.mark.usefixtures("one_thread")


def _one_step(model: torch.nn.Module, spec: ImageSpec) -> None:
    """Forward two images, check logits and embedding shapes, backward, and see every parameter get a gradient."""
    x = torch.randn(2, spec.channels, spec.height, spec.width)
    logits = model(x)
    assert logits.shape == (2, spec.num_classes)
    F.cross_entropy(logits, torch.tensor([0, spec.num_classes - 1])).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, f"no finite gradient for {missing[:3]}"
    features = embed(model, x)
    assert features.ndim == 2 and features.shape[0] == 2 and features.shape[1] > 0


def test_the_zoo_has_the_classic_evaluators():
    assert {"convnet3", "convnet3_bn", "mlp", "lenet", "alexnet", "alexnet_bn", "vgg11", "vgg11_bn", "resnet18",
            "resnet18_in"} <= set(ZOO)


@pytest.mark.parametrize("name", ZOO)
def test_every_zoo_model_trains_on_1_and_3_channels_at_28_and_32_pixels(name):
    torch.manual_seed(0)
    for spec in SPECS:
        model = create_model(name, spec)
        _one_step(model, spec)


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "resnet18.a1_in1k"])
def test_a_timm_native_model_is_resized_and_trains(name):
    for spec in SPECS[:1] + SPECS[-1:]:  # 1x28 and 3x32
        model = create_model(name, spec)
        assert isinstance(model, Resized) and model.size == (224, 224)
        seen = []
        inner = model.model.forward_features
        model.model.forward_features = lambda x: seen.append(tuple(x.shape)) or inner(x)
        _one_step(model, spec)
        assert seen[0] == (2, spec.channels, 224, 224)  # the adapter resized, the channels came through


def test_distillkit_names_win_and_timm_keeps_its_own():
    spec = SPECS[0]
    ours = create_model("resnet18", spec)
    assert isinstance(ours, ResNet) and isinstance(ours.stem[1], torch.nn.BatchNorm2d)
    assert isinstance(create_model("resnet18_in", spec).stem[1], torch.nn.GroupNorm)
    # timm's resnet18 (and its tagged weights' architecture) are untouched; ours lives there as dk_resnet18
    assert type(timm.create_model("resnet18", pretrained=False)).__module__ == "timm.models.resnet"
    assert isinstance(create_model("resnet18.a1_in1k", spec).model, timm.models.ResNet)
    assert isinstance(timm.create_model("dk_resnet18", num_classes=7, in_chans=1, img_size=28), ResNet)
    assert isinstance(create_model("dk_resnet18", spec), ResNet)
    # names timm did not have go in under their own name
    assert timm.create_model("lenet", num_classes=7, in_chans=1, img_size=28)(torch.zeros(1, 1, 28, 28)).shape == (1, 7)
    assert timm.create_model("convnet3", num_classes=7, in_chans=1, img_size=28)(torch.zeros(1, 1, 28, 28)).shape \
        == (1, 7)


def test_same_seed_same_weights():
    from distillkit.seeding import seeded

    weights = []
    for _ in range(2):
        with seeded(3, "init"):
            weights.append(create_model("lenet", SPECS[0]).state_dict())
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


@pytest.mark.parametrize("name, replays", [("convnet3_bn", True), ("resnetap10", False)])
def test_a_random_embedder_redrawn_in_place_equals_fresh_networks(name, replays):
    """One module re-initialised for every draw gives each draw's freshly built network bit for bit: its
    weights and buffers (batch-norm statistics moved by the previous draw's forward included) and its
    features. ConvNet's init replays in place; ResNetAP re-initialises after building, so it is rebuilt."""
    from distillkit.models import RandomEmbedder
    from distillkit.seeding import seeded

    spec = SPECS[0]
    x = torch.randn(6, spec.channels, spec.height, spec.width, generator=torch.Generator().manual_seed(0))
    embedder = RandomEmbedder(name, spec)
    drawn = []
    for key in (0, 1, 5):
        extract = embedder.draw(7, "encoder", key)
        with seeded(7, "model", "encoder", key):
            fresh = create_model(name, spec).train()
        assert all(torch.equal(a, b) for a, b in zip(embedder._module.state_dict().values(),
                                                     fresh.state_dict().values(), strict=True))
        with torch.no_grad():
            features = extract(x)  # moves the shared module's batch-norm statistics
            assert torch.equal(features, embed(fresh, x))
        drawn.append(features)
    assert embedder._replays is replays
    assert not torch.equal(drawn[0], drawn[1])  # the draws really differ


def test_the_packed_transfer_of_a_network_restores_every_tensor_exactly():
    """What an accelerator's draw sends in one copy: float weights and int64 batch-norm counters (odd sizes,
    each aligned in the buffer) come back bit for bit (on the CPU here: same code, no transfer)."""
    from distillkit.models import RandomEmbedder, _pack, _tensors, _unpack

    source, target = create_model("convnet3_bn", SPECS[0]), create_model("convnet3_bn", SPECS[0])
    torch.nn.init.normal_(source.classifier.bias)
    for module in source.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.num_batches_tracked += 3
    packed = _pack(_tensors(source), RandomEmbedder.ALIGN)
    assert packed.dtype == torch.uint8
    _unpack(packed, _tensors(target), RandomEmbedder.ALIGN)
    assert all(torch.equal(a, b) for a, b in zip(_tensors(source), _tensors(target), strict=True))


def test_unknown_model_names_fail_with_the_choices():
    with pytest.raises(UsageError) as err:
        create_model("resnet19", SPECS[0])
    message = str(err.value)
    assert "unknown model 'resnet19'" in message and "resnet18" in message and "convnet3" in message
    assert "timm" in message and "\n" not in message


def test_a_model_that_cannot_take_the_images_fails_clearly():
    tiny = ImageSpec(1, 8, 8, 10, (0.5,), (0.25,))
    with pytest.raises(UsageError, match=r"model 'lenet' cannot take 1x8x8 images"):
        check_model("lenet", tiny)


def test_cli_unknown_model_exits_2_with_one_line(tiny_dm_run):
    result = run_cli("evaluate", tiny_dm_run, "--models", "convnet3,nosuchnet", "--device", "cpu", expect=2)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "unknown model 'nosuchnet'" in lines[0]


def test_cli_lists_the_zoo_with_a_filter():
    out = run_cli("list", "models", "--filter", "resnet*").output
    assert "resnet18" in out and "resnet18_in" in out and "lenet" not in out and "convnet3" not in out


@pytest.mark.parametrize("shape", [(3, 5, 32, 32), (2, 4, 7, 7), (2, 3, 9, 6)])
def test_convnet_pooling_fast_path_gives_the_kernel_bits(shape):
    """ConvNet's no-grad CPU pooling (strided slices) equals torch's avg_pool2d bit for bit, odd sizes included;
    with autograd on it is the kernel itself."""
    from distillkit.zoo.convnet import AvgPool2x2

    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(AvgPool2x2()(x), F.avg_pool2d(x, 2))
    leaf = x.clone().requires_grad_()
    out = AvgPool2x2()(leaf)
    assert out.grad_fn is not None and "AvgPool2D" in type(out.grad_fn).__name__
    with torch.no_grad(), pytest.raises(RuntimeError, match="Output size is too small"):
        AvgPool2x2()(x[..., :1, :1])  # a map too small to pool fails as torch's pooling does
