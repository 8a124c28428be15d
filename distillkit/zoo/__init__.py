"""The evaluator and extractor architectures (no name resolution: see :mod:`distillkit.models`).

Importing this package (``import distillkit`` does) puts every built-in architecture into
timm's registry, so ``timm.create_model("convnet3", num_classes=10, in_chans=1, img_size=28)``
works as timm users expect; a name timm already has goes in as ``dk_<name>``
(:mod:`distillkit.zoo.registration`). Models of third-party plugins enter timm's registry
once plugins are loaded (:class:`distillkit.registry.Plugins` mirrors them).
"""

from distillkit.zoo import classic, convnet, resnetap

#: every built-in architecture: name -> factory(num_classes=, in_chans=, img_size=)
ARCHITECTURES = {**convnet.VARIANTS, **classic.VARIANTS, **resnetap.VARIANTS}

__all__ = ["ARCHITECTURES", "classic", "convnet", "resnetap"]
