"""The classic cross-architecture evaluators of the dataset-distillation literature, registered in timm.

Small-image versions as in the DC/DSA/DM reference code (``networks.py`` of
VICO-UoE/DatasetCondensation), for 28 and 32 pixels, any channel count:

==============  =====================================================  ==========================
name            architecture                                           reference name
==============  =====================================================  ==========================
``mlp``         flatten -> 128 -> 128 -> classes, ReLU                  MLP
``lenet``       conv5(6) -> pool -> conv5(16) -> pool -> 120 -> 84      LeNet
``alexnet``     conv5(128) conv5(192) conv3(256, 192, 192), max pools   AlexNet
``alexnet_bn``  the same with batch norm after every conv               AlexNetBN
``vgg11``       VGG-11 (64 .. 512), instance norm, max pools            VGG11
``vgg11_bn``    VGG-11 with batch norm                                  VGG11BN
``resnet18``    ResNet-18, 3x3 stem, no stem pooling, batch norm        ResNet18BN
``resnet18_in`` the same with instance norm                             ResNet18
==============  =====================================================  ==========================

Note the naming: in the reference code ``ResNet18`` is the instance-norm
network; here ``resnet18`` is the batch-norm one (the network most
cross-architecture tables call "ResNet-18") and ``resnet18_in`` the
instance-norm one. Instance norm is ``GroupNorm(C, C)`` as in the reference.

28-pixel inputs get the reference's wider first padding (LeNet 2, AlexNet 4,
VGG 3), so their maps match the 32-pixel ones; other sizes work when the maps
stay at least 1 pixel (else the factory raises ``ValueError``).

timm already has ``resnet18``, ``vgg11`` and ``vgg11_bn``: those three go into
timm's registry as ``dk_resnet18``, ``dk_vgg11``, ``dk_vgg11_bn`` (see
:mod:`distillkit.zoo.registration`); in distillkit (``--models resnet18``) the
names above mean these networks.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor, nn

from distillkit.zoo.convnet import norm_layer
from distillkit.zoo.registration import variant

VGG11_CFG = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "layer":  # LayerNorm needs each map's size; the reference has no such variant of these nets
        raise ValueError("these networks take norm 'instance', 'batch' or 'none', not 'layer'")
    return norm_layer(kind, channels, 0)


def _hw(img_size: int | tuple[int, int]) -> tuple[int, int]:
    return (img_size, img_size) if isinstance(img_size, int) else (int(img_size[0]), int(img_size[1]))


def _flat_size(features: nn.Module, in_chans: int, img_size: tuple[int, int]) -> int:
    """Length of the flattened feature map for one image (a dry run in eval mode, so no statistics move)."""
    features.eval()
    with torch.no_grad():
        n = features(torch.zeros(2, in_chans, *img_size)).flatten(1).shape[1]
    features.train()
    return n


class _Classic(nn.Module):
    """``features`` -> flatten -> ``hidden`` MLP (pre-logits) -> ``classifier``: the timm feature/head split."""

    def __init__(self, features: nn.Module, hidden: list[int], num_classes: int, in_chans: int,
                 img_size: tuple[int, int]) -> None:
        super().__init__()
        self.features = features
        width = _flat_size(features, in_chans, img_size)
        layers: list[nn.Module] = []
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU(inplace=True)]
            width = h
        self.hidden = nn.Sequential(*layers)
        self.num_features = width
        self.num_classes = num_classes
        self.classifier = nn.Linear(width, num_classes)

    def forward_features(self, x: Tensor) -> Tensor:
        return self.features(x)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = self.hidden(x.flatten(1))
        return x if pre_logits else self.classifier(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


def mlp(num_classes: int = 10, in_chans: int = 3, img_size: int | tuple[int, int] = 32, width: int = 128
        ) -> _Classic:
    return _Classic(nn.Identity(), [width, width], num_classes, in_chans, _hw(img_size))


def lenet(num_classes: int = 10, in_chans: int = 3, img_size: int | tuple[int, int] = 32) -> _Classic:
    hw = _hw(img_size)
    features = nn.Sequential(
        nn.Conv2d(in_chans, 6, 5, padding=2 if hw[0] == 28 else 0), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5), nn.ReLU(inplace=True), nn.MaxPool2d(2),
    )
    return _Classic(features, [120, 84], num_classes, in_chans, hw)


def alexnet(num_classes: int = 10, in_chans: int = 3, img_size: int | tuple[int, int] = 32, norm: str = "none"
            ) -> _Classic:
    hw = _hw(img_size)
    layers: list[nn.Module] = []
    channels = in_chans
    # (out channels, kernel, padding, pool after)
    for i, (out, k, pad, pool) in enumerate([(128, 5, 2, True), (192, 5, 2, True), (256, 3, 1, False),
                                             (192, 3, 1, False), (192, 3, 1, True)]):
        layers += [nn.Conv2d(channels, out, k, padding=4 if i == 0 and hw[0] == 28 else pad),
                   _norm(norm, out), nn.ReLU(inplace=True)]
        if pool:
            layers.append(nn.MaxPool2d(2))
        channels = out
    return _Classic(nn.Sequential(*layers), [], num_classes, in_chans, hw)


def vgg11(num_classes: int = 10, in_chans: int = 3, img_size: int | tuple[int, int] = 32, norm: str = "instance"
          ) -> _Classic:
    hw = _hw(img_size)
    layers: list[nn.Module] = []
    channels = in_chans
    for i, v in enumerate(VGG11_CFG):
        if v == "M":
            layers.append(nn.MaxPool2d(2))
            continue
        layers += [nn.Conv2d(channels, v, 3, padding=3 if i == 0 and hw[0] == 28 else 1), _norm(norm, v),
                   nn.ReLU(inplace=True)]
        channels = v
    return _Classic(nn.Sequential(*layers), [], num_classes, in_chans, hw)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, norm: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.norm1 = _norm(norm, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.norm2 = _norm(norm, cout)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), _norm(norm, cout))

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.norm1(self.conv1(x)))
        return self.relu(self.norm2(self.conv2(out)) + self.shortcut(x))


class StagedNet(nn.Module):
    """A stem, residual stages and a linear classifier on the globally average-pooled map, with timm's
    ``forward_features``/``forward_head`` split (the ResNets here and :mod:`distillkit.zoo.resnetap`)."""

    stem: nn.Module
    stages: nn.Module
    classifier: nn.Linear

    def forward_features(self, x: Tensor) -> Tensor:
        return self.stages(self.stem(x))

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = x.mean(dim=(2, 3))
        return x if pre_logits else self.classifier(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


class ResNet(StagedNet):
    """The CIFAR-style ResNet of the literature: 3x3 stride-1 stem, no stem pooling, global average pool."""

    def __init__(self, num_classes: int = 10, in_chans: int = 3, img_size: int | tuple[int, int] = 32,
                 blocks: tuple[int, ...] = (2, 2, 2, 2), norm: str = "batch") -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_chans, 64, 3, padding=1, bias=False), _norm(norm, 64),
                                  nn.ReLU(inplace=True))
        stages: list[nn.Module] = []
        cin = 64
        for i, n in enumerate(blocks):
            cout = 64 * 2 ** i
            stages += [BasicBlock(cin if j == 0 else cout, cout, 2 if i > 0 and j == 0 else 1, norm) for j in range(n)]
            cin = cout
        self.stages = nn.Sequential(*stages)
        self.num_features = cin
        self.num_classes = num_classes
        self.classifier = nn.Linear(cin, num_classes)


_TABLE: list[tuple[str, Callable[..., nn.Module], str, dict[str, Any]]] = [
    ("mlp", mlp, "MLP: 2 hidden layers of 128, ReLU", {}),
    ("lenet", lenet, "LeNet-5: two 5x5 convs with max pooling, 120-84 head", {}),
    ("alexnet", alexnet, "AlexNet (small-image, 5 convs, no norm)", {}),
    ("alexnet_bn", alexnet, "AlexNet (small-image) with batch norm", {"norm": "batch"}),
    ("vgg11", vgg11, "VGG-11 (small-image) with instance norm (timm: dk_vgg11)", {}),
    ("vgg11_bn", vgg11, "VGG-11 (small-image) with batch norm (timm: dk_vgg11_bn)", {"norm": "batch"}),
    ("resnet18", ResNet, "ResNet-18 (small-image, 3x3 stem) with batch norm (timm: dk_resnet18)", {}),
    ("resnet18_in", ResNet, "ResNet-18 (small-image, 3x3 stem) with instance norm", {"norm": "instance"}),
]

VARIANTS: dict[str, Callable[..., nn.Module]] = {
    name: variant(name, build, doc, __name__, **defaults) for name, build, doc, defaults in _TABLE
}
