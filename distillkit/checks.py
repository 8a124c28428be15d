"""Components checked at their boundary: what a plugin returns, and whose fault an exception is.

On the first iteration of a process the condense loop checks every component's output against
:mod:`distillkit.interfaces` (a decode of ``(K, images_per_class, c, H, W)``, an extractor's
``(N, d)``, an objective's finite ``(K,)``) and afterwards checks nothing, so the hot loop pays no
host syncs for it. An exception raised inside a component, or a wrong output, becomes one
:class:`~distillkit.errors.ComponentError` line naming the component, its plugin, the call and,
for a shape, what was expected against what came back (``--debug`` shows the traceback).
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
from torch import Tensor

from distillkit import registry
from distillkit.config import RunConfig
from distillkit.errors import ComponentError, UsageError
from distillkit.features import describe_shape, shape_problem
from distillkit.interfaces import ImageSpec

def label(kind: str, name: str) -> str:
    """``sampler 'random-convnet' (plugin 'dm')``: how every message names a component (``kind`` is the
    registry kind's singular, as :attr:`~distillkit.registry.Registry.singular` derives it)."""
    plugins = registry.plugins()[kind + "s"]
    plugin = plugins.entries[name].plugin if name in plugins else "?"
    return f"{kind} {name!r} (plugin {plugin!r})"


@contextlib.contextmanager
def blame(component: str, call: str) -> Iterator[None]:
    """Turn an exception escaping ``call`` of ``component`` (see :func:`label`) into one
    :class:`ComponentError` line. Usage errors pass unchanged (they already say what is wrong); so do
    running out of memory (not the component's fault) and interrupts."""
    try:
        yield
    except (UsageError, torch.OutOfMemoryError):
        raise
    except Exception as exc:
        message = " ".join(str(exc).split())[:300]
        raise ComponentError(f"{component} raised in {call}: {type(exc).__name__}: {message}") from exc


class OutputChecks:
    """The checks of one condense process: active until :meth:`done` is first called."""

    def __init__(self, cfg: RunConfig, spec: ImageSpec) -> None:
        self.labels = {kind: label(kind, getattr(cfg, kind)) for kind in ("objective", "parameterization", "sampler")}
        self.spec = spec
        self.active = True

    def blame(self, kind: str, call: str) -> contextlib.AbstractContextManager[None]:
        return blame(self.labels[kind], call)

    def done(self) -> None:
        self.active = False

    def _refuse(self, kind: str, call: str, expected: str, got: object) -> None:
        shown = tuple(got.shape) if isinstance(got, Tensor) else type(got).__name__
        raise ComponentError(f"{self.labels[kind]} returned {shown} from {call}; expected {expected}")

    def decoded(self, images: object, classes: int, per_class: int) -> Tensor:
        if self.active:
            s = self.spec
            expected = (classes, per_class, s.channels, s.height, s.width)
            if not isinstance(images, Tensor) or tuple(images.shape) != expected:
                self._refuse("parameterization", "decode", f"{expected} (K classes, images_per_class, c, H, W)",
                             images)
        return images  # type: ignore[return-value]

    def extractor(self, extract: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
        """``extract`` itself once the checks are done; before, a wrapper checking each output is ``(N, d)``."""
        if not self.active:
            return extract

        def checked(images: Tensor) -> Tensor:
            with self.blame("sampler", "the extractor's forward"):
                features = extract(images)
            if shape_problem(features, len(images)) is not None:
                raise ComponentError(f"{self.labels['sampler']} returned {describe_shape(features)} from the "
                                     f"extractor's forward; expected ({len(images)}, d) features for {len(images)} "
                                     f"images, or named tensors of {len(images)} rows each")
            return features

        return checked

    def losses(self, losses: object, classes: int, finite: bool) -> Tensor:
        """``losses`` once checked to be ``(classes,)`` and, with ``finite``, finite (one host sync)."""
        if self.active:
            if not isinstance(losses, Tensor) or tuple(losses.shape) != (classes,):
                self._refuse("objective", "__call__", f"({classes},): one loss per class of the block", losses)
            if finite and not bool(torch.isfinite(losses.detach()).all()):  # first iteration only
                raise ComponentError(f"{self.labels['objective']} returned non-finite losses "
                                     f"{losses.detach().cpu().tolist()} at the first iteration")
        return losses  # type: ignore[return-value]
