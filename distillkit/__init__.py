"""distillkit: dataset distillation for PyTorch.

The host defines interfaces (:mod:`distillkit.interfaces`), hooks
(:mod:`distillkit.hookspecs`) and runs everything; methods arrive as plugins
registered under the ``distillkit`` entry-point group.
"""

import pluggy

__version__ = "0.1.0"

hookimpl = pluggy.HookimplMarker("distillkit")
"""Marker for plugin hook implementations: ``@hookimpl def register_objectives(register): ...``."""

__all__ = ["hookimpl", "__version__"]
