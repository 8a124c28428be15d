"""DM's components, built only on distillkit's interfaces."""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import torch
from torch import Tensor

from distillkit import devices
from distillkit.interfaces import ImageSpec, RealImages
from distillkit.models import RandomEmbedder


class MeanObjective:
    """Squared L2 distance between the mean real and mean synthetic embedding of each class.

    Equals squared MMD with the linear kernel ``k(a, b) = a.b``.
    """

    def __call__(self, real: Tensor, syn: Tensor) -> Tensor:
        return (real.mean(1) - syn.mean(1)).pow(2).sum(-1)


class PixelParameterization:
    """One learnable tensor of images in normalised space, initialised from random real images of each class."""

    def __init__(self, spec: ImageSpec, ipc: int, device: torch.device, init: str = "real") -> None:
        if init not in ("real", "noise"):
            raise ValueError(f"unknown init {init!r}; choose one of: real, noise")
        self.spec, self.ipc, self.init_mode = spec, ipc, init
        self.images_per_class = ipc
        self.images = torch.zeros(spec.num_classes * ipc, spec.channels, spec.height, spec.width, device=device,
                                  requires_grad=True)

    def init(self, real: RealImages, generator: torch.Generator) -> None:
        with torch.no_grad():
            for c in range(self.spec.num_classes):
                if self.init_mode == "real":
                    chosen = real.sample(c, self.ipc, generator)
                else:
                    chosen = torch.randn(self.ipc, *self.images.shape[1:], generator=generator)
                self.images[c * self.ipc:(c + 1) * self.ipc] = chosen.to(self.images.device)

    def parameters(self) -> list[Tensor]:
        return [self.images]

    def decode(self, classes: Sequence[int]) -> Tensor:
        index = devices.constant(tuple(classes), torch.long, self.images.device)  # built once per class list
        return self.images.view(self.spec.num_classes, self.ipc, *self.images.shape[1:])[index]

    def stored(self) -> Tensor:
        return self.images.detach()

    def project(self) -> None:
        """Pixel images live unconstrained in normalised space (as in the DM reference)."""

    def state_dict(self) -> dict[str, Tensor]:
        return {"images": self.images.detach()}

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        with torch.no_grad():
            self.images.copy_(state["images"])


class RandomConvNetSampler:
    """A new randomly initialised ConvNet-3 (or ``model``) at every iteration, the network keyed
    ``("encoder", iteration)``, re-initialised in place in one module (see :class:`RandomEmbedder`)."""

    def __init__(self, spec: ImageSpec, seed: int, device: torch.device, model: str = "convnet3") -> None:
        self.spec, self.seed, self.device, self.model = spec, seed, device, model
        self._embedder = RandomEmbedder(model, spec, device)

    def extractor(self, iteration: int) -> Callable[[Tensor], Tensor]:
        return self._embedder.draw(self.seed, "encoder", iteration)

    def redraws_at(self, iteration: int) -> bool:
        return True
