"""The evaluator and extractor model zoo.

Every architecture is reached by one name through :func:`create_model`:
names registered by plugins (``register_models``; the host's ConvNet family
among them) first, then any timm model name. Registered names are also put in
timm's registry, so ``timm.create_model("convnet3", num_classes=10,
in_chans=1, img_size=28)`` works too.
"""

from __future__ import annotations

from typing import Callable

import timm
import torch
from timm.models import register_model
from torch import Tensor, nn

from distillkit import registry
from distillkit.errors import UsageError
from distillkit.interfaces import ImageSpec
from distillkit.seeding import seeded


def _ensure_in_timm(name: str, factory: Callable[..., nn.Module]) -> None:
    """Mirror a plugin-registered model into timm's registry (a no-op for the ones timm already has)."""
    if timm.is_model(name):
        return

    def entry(pretrained: bool = False, **kwargs) -> nn.Module:
        for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
            kwargs.pop(key, None)
        return factory(**kwargs)

    entry.__name__ = name
    entry.__module__ = getattr(factory, "__module__", __name__) or __name__
    register_model(entry)


def create_model(name: str, spec: ImageSpec) -> nn.Module:
    """A freshly initialised ``name`` for ``spec``'s channels, size and classes (global RNG; see :func:`seeded`)."""
    models = registry.plugins()["models"]
    size = spec.height
    if name in models:
        factory = models.get(name).factory
        _ensure_in_timm(name, factory)
        try:
            return factory(num_classes=spec.num_classes, in_chans=spec.channels, img_size=size)
        except (ValueError, RuntimeError) as exc:
            raise UsageError(f"model {name!r} cannot take {spec.channels}x{spec.height}x{spec.width} images: {exc}") \
                from None
    raise UsageError(f"unknown model {name!r}; choose one of: {', '.join(models.names())}")


def check_model(name: str, spec: ImageSpec) -> None:
    """Build ``name`` and run two blank images through it: some models cannot take ``spec``'s channels or
    size only at forward time, and that should fail with a clear message before any training."""
    with seeded(0, "check-model", name):  # leaves torch's global generator as it was
        model = create_model(name, spec)
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(2, spec.channels, spec.height, spec.width))
    except (RuntimeError, ValueError) as exc:
        raise UsageError(f"model {name!r} cannot take {spec.channels}x{spec.height}x{spec.width} images: "
                         f"{str(exc).strip().splitlines()[0][:200]}") from None


def embed(model: nn.Module, x: Tensor) -> Tensor:
    """The penultimate embedding (features before the classifier), flattened to (N, d)."""
    return model.forward_head(model.forward_features(x), pre_logits=True).flatten(1)


def random_embedder(name: str, spec: ImageSpec, seed: int, *keys: object,
                    device: torch.device | str = "cpu") -> Callable[[Tensor], Tensor]:
    """A frozen, randomly initialised ``name`` whose weights are a pure function of ``(seed, keys)``.

    The network is built on the CPU (so its weights do not depend on the device),
    kept in train mode as in the reference code, and never receives weight gradients.
    """
    with seeded(seed, "model", *keys):
        model = create_model(name, spec)
    model = model.to(device).train().requires_grad_(False)
    return lambda x: embed(model, x)
