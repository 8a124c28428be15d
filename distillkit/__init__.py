"""distillkit: dataset distillation for PyTorch.

The host defines interfaces (:mod:`distillkit.interfaces`), hooks
(:mod:`distillkit.hookspecs`) and runs everything; methods arrive as plugins
registered under the ``distillkit`` entry-point group. Importing the package
puts the built-in model zoo into timm's registry (:mod:`distillkit.zoo`).
"""

import pluggy

__version__ = "0.1.0"

hookimpl = pluggy.HookimplMarker("distillkit")
"""Marker for plugin hook implementations: ``@hookimpl def register_objectives(register): ...``."""

# timm users expect importing a package to register its models: every built-in architecture is in
# timm's registry from here on (``timm.create_model("convnet3", ...)``).
import distillkit.zoo  # noqa: E402,F401

__all__ = ["hookimpl", "__version__"]
