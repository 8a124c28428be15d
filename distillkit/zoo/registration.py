"""Putting distillkit's models into timm's registry without shadowing timm's own models.

Every zoo model is one factory ``factory(num_classes=, in_chans=, img_size=)``
registered twice: in distillkit's registry (through the ``register_models``
hook, under its distillkit name) and in timm's (so ``timm.create_model`` finds
it). Where timm already has a model of that name (``resnet18``, ``vgg11``,
``vgg11_bn``), timm's entry is left alone, so ``resnet18.a1_in1k`` keeps
meaning timm's ResNet, and distillkit's model goes into timm as
``dk_<name>`` (``timm.create_model("dk_resnet18", ...)``).
:func:`distillkit.models.create_model` resolves distillkit names first, so
``--models resnet18`` is the small-image ResNet-18 of the literature.
"""

from __future__ import annotations

import sys
from typing import Any, Callable

import timm
from timm.models import register_model
from torch import nn

TIMM_PREFIX = "dk_"
_TIMM_ONLY = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")

#: distillkit name -> the name it has in timm's registry
_in_timm: dict[str, str] = {}


def distillkit_name(name: str) -> str | None:
    """The distillkit name behind a ``dk_`` timm name (None for timm's own models)."""
    return next((ours for ours, theirs in _in_timm.items() if theirs == name and ours != name), None)


def mirror(name: str, factory: Callable[..., nn.Module], module: str | None = None) -> str:
    """Register ``factory`` in timm as ``name`` (or ``dk_<name>`` if timm has its own ``name``); return that name."""
    if name in _in_timm:
        return _in_timm[name]
    target = TIMM_PREFIX + name if timm.is_model(name) else name

    def entry(pretrained: bool = False, **kwargs: Any) -> nn.Module:
        if pretrained:
            raise ValueError(f"{name} has no pretrained weights")
        for key in _TIMM_ONLY:
            kwargs.pop(key, None)
        return factory(**kwargs)

    entry.__name__ = entry.__qualname__ = target
    entry.__doc__ = factory.__doc__
    entry.__module__ = module or getattr(factory, "__module__", None) or __name__
    register_model(entry)
    # timm lists the name in the module's __all__; make it importable where the module has no such attribute
    home = sys.modules[entry.__module__]
    if not hasattr(home, target):
        setattr(home, target, entry)
    _in_timm[name] = target
    return target


def variant(name: str, build: Callable[..., nn.Module], doc: str, module: str, **defaults: Any
            ) -> Callable[..., nn.Module]:
    """A named factory: ``build`` with ``defaults`` (caller's keywords win), mirrored into timm."""

    def factory(**kwargs: Any) -> nn.Module:
        return build(**{**defaults, **kwargs})

    factory.__name__ = factory.__qualname__ = name
    factory.__doc__ = doc
    factory.__module__ = module
    mirror(name, factory, module)
    return factory
