"""The ConvNet family of the dataset-distillation literature, registered in timm.

``depth`` blocks of conv3x3 (``width`` channels) -> norm -> ReLU -> pool 2x2,
then a linear classifier on the flattened map. 28-pixel inputs get a first-conv
padding of 3 so the maps are 32x32, as in the reference code; the embedding is
then ``width * (32 / 2**depth)**2`` for both 28 and 32 pixels.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from distillkit.zoo.registration import variant

NORMS = ("instance", "batch", "layer", "none")
POOLS = ("avg", "max", "none")


def norm_layer(kind: str, channels: int, size: int | tuple[int, int]) -> nn.Module:
    """``kind`` normalisation of ``channels`` maps of side ``size`` (layer norm needs the size)."""
    if kind == "instance":
        return nn.GroupNorm(channels, channels, affine=True)
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "layer":
        return nn.LayerNorm([channels, *((size, size) if isinstance(size, int) else size)])
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown norm {kind!r}; choose one of: {', '.join(NORMS)}")


class AvgPool2x2(nn.AvgPool2d):
    """``nn.AvgPool2d(2)`` with a faster CPU forward when no gradient is needed (real features, testing).

    torch's CPU pooling kernel walks each 2x2 window; four strided slices added in the kernel's order,
    then divided by 4, give the same bits ~3x faster on large maps. With autograd on, the slices'
    backward is slower than pooling's own, so training keeps the kernel.
    """

    def __init__(self) -> None:
        super().__init__(2)

    def forward(self, x: Tensor) -> Tensor:
        if x.device.type != "cpu" or min(x.shape[-2:]) < 2 or (torch.is_grad_enabled() and x.requires_grad):
            return super().forward(x)  # also raises torch's own error for maps too small to pool
        x = x[..., : x.shape[-2] // 2 * 2, : x.shape[-1] // 2 * 2]
        return (x[..., 0::2, 0::2] + x[..., 0::2, 1::2] + x[..., 1::2, 0::2] + x[..., 1::2, 1::2]) / 4


class ConvNet(nn.Module):
    def __init__(self, num_classes: int = 10, in_chans: int = 3, img_size: int | tuple[int, int] = 32,
                 depth: int = 3, width: int = 128, norm: str = "instance", pooling: str = "avg") -> None:
        super().__init__()
        if pooling not in POOLS:
            raise ValueError(f"unknown pooling {pooling!r}; choose one of: {', '.join(POOLS)}")
        size = img_size if isinstance(img_size, int) else img_size[0]
        pad_first = 3 if size == 28 else 1
        size = size + 2 * (pad_first - 1)
        layers: list[nn.Module] = []
        channels = in_chans
        for i in range(depth):
            layers += [nn.Conv2d(channels, width, 3, padding=pad_first if i == 0 else 1), norm_layer(norm, width, size),
                       nn.ReLU(inplace=True)]
            if pooling != "none":
                layers.append(AvgPool2x2() if pooling == "avg" else nn.MaxPool2d(2))
                size //= 2
            channels = width
        self.features = nn.Sequential(*layers)
        self.num_features = width * size * size
        self.num_classes = num_classes
        self.classifier = nn.Linear(self.num_features, num_classes)

    def forward_features(self, x: Tensor) -> Tensor:
        return self.features(x)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = x.flatten(1)
        return x if pre_logits else self.classifier(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


VARIANTS = {
    f"convnet{d}": variant(f"convnet{d}", ConvNet, f"ConvNet, depth {d}, width 128, instance norm, avg pool", __name__,
                           depth=d)
    for d in (1, 2, 3, 4, 5)
}
VARIANTS.update({
    f"convnet3_{suffix}": variant(f"convnet3_{suffix}", ConvNet, f"ConvNet-3 with {doc}", __name__, **kw)
    for suffix, doc, kw in [
        ("bn", "batch norm", {"norm": "batch"}),
        ("ln", "layer norm", {"norm": "layer"}),
        ("nonorm", "no normalisation", {"norm": "none"}),
        ("maxpool", "max pooling", {"pooling": "max"}),
        ("w32", "width 32", {"width": 32}),
        ("w64", "width 64", {"width": 64}),
        ("w256", "width 256", {"width": 256}),
    ]
})
