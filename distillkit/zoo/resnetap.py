"""ResNetAP: IDC's ResNet for ImageNet subsets, with average pooling where a ResNet strides.

Traced to snu-mllab/Efficient-Dataset-Condensation ``models/resnet_ap.py`` (``ResNetAP``, the
ImageNet branch), which IDC and M3D evaluate ImageNet-10/100 with:

* stem by input size: up to 64 px a 3x3 conv; up to 128 px a 3x3 conv then 2x2 average pooling;
  above, a 7x7 conv (stride 1) then 4x4 average pooling. Each conv is followed by the norm and ReLU;
* four stages of BasicBlocks (``depth`` 10: one block each, 18: two) of 64, 128, 256, 512
  channels. A block that downsamples keeps its convs at stride 1 and average-pools 2x2 after the
  first conv's ReLU; its shortcut is conv1x1 -> 2x2 average pooling -> norm;
* global average pooling, then a linear classifier on the 512 channels;
* instance norm is ``GroupNorm(C, C)`` (affine); convs have no bias when a norm follows;
  convs are initialised N(0, 2 / (k * k * out_channels)), norms to weight 1, bias 0.

IDC's CIFAR branch (widths 32-256, ``(depth - 2) / 6`` blocks per stage) is a different network
and is not this one.
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor, nn

from distillkit.zoo.classic import StagedNet
from distillkit.zoo.convnet import norm_layer
from distillkit.zoo.registration import variant

BLOCKS = {10: (1, 1, 1, 1), 18: (2, 2, 2, 2)}


def _conv(cin: int, cout: int, kernel: int, norm: str) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=norm == "none")


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "layer":  # LayerNorm needs each map's size; IDC has no such variant
        raise ValueError("ResNetAP takes norm 'instance', 'batch' or 'none', not 'layer'")
    return norm_layer(kind, channels, 0)


class BasicBlockAP(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, norm: str) -> None:
        super().__init__()
        self.conv1, self.norm1 = _conv(cin, cout, 3, norm), _norm(norm, cout)
        self.conv2, self.norm2 = _conv(cout, cout, 3, norm), _norm(norm, cout)
        self.stride = stride
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(_conv(cin, cout, 1, norm), nn.AvgPool2d(stride), _norm(norm, cout))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.norm1(self.conv1(x)))
        if self.stride != 1:
            out = F.avg_pool2d(out, self.stride)
        return F.relu(self.norm2(self.conv2(out)) + self.shortcut(x))


class ResNetAP(StagedNet):
    """IDC's ResNetAP (ImageNet branch) for ``img_size`` inputs; ``width`` is the first stage's channels."""

    def __init__(self, num_classes: int = 10, in_chans: int = 3, img_size: int | tuple[int, int] = 224,
                 depth: int = 10, width: int = 64, norm: str = "instance") -> None:
        super().__init__()
        if depth not in BLOCKS:
            raise ValueError(f"ResNetAP depth must be one of {sorted(BLOCKS)}, got {depth}")
        size = img_size if isinstance(img_size, int) else max(img_size)
        kernel, pool = (3, 1) if size <= 64 else (3, 2) if size <= 128 else (7, 4)
        self.stem = nn.Sequential(_conv(in_chans, width, kernel, norm), _norm(norm, width), nn.ReLU(inplace=True),
                                  nn.AvgPool2d(pool) if pool > 1 else nn.Identity())
        blocks: list[nn.Module] = []
        cin = width
        for stage, n in enumerate(BLOCKS[depth]):
            cout = width * 2 ** stage
            blocks += [BasicBlockAP(cin if j == 0 else cout, cout, 2 if stage > 0 and j == 0 else 1, norm)
                       for j in range(n)]
            cin = cout
        self.stages = nn.Sequential(*blocks)
        self.num_features = cin
        self.num_classes = num_classes
        self.classifier = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / (m.kernel_size[0] * m.kernel_size[1] * m.out_channels)))


VARIANTS = {
    "resnetap10": variant("resnetap10", ResNetAP, "ResNetAP-10 (IDC's ImageNet evaluator): instance norm, "
                          "average pooling instead of strides", __name__),
    "resnetap18": variant("resnetap18", ResNetAP, "ResNetAP-18: two blocks per stage, instance norm", __name__,
                          depth=18),
}
