"""Models by name: the one way the host turns a model name into a network.

A name resolves, in this order:

1. names registered by plugins (``register_models``): the host's ConvNet family
   (:mod:`distillkit.zoo.convnet`) and the classic evaluators
   (:mod:`distillkit.zoo.classic`: ``mlp``, ``lenet``, ``alexnet``, ``vgg11``,
   ``resnet18``, ...) among them. These names win over timm's: ``resnet18``
   is the small-image ResNet-18 of the literature;
2. the ``dk_`` names those models have in timm's registry where timm has a
   model of the same name (``dk_resnet18`` is distillkit's ``resnet18``);
3. any other timm model name, with or without a pretrained tag
   (``resnet18.a1_in1k``, ``vit_tiny_patch16_224``): the architecture only,
   never weights, built with the dataset's ``num_classes`` and ``in_chans``.

**Small-image adapter for timm models: resize.** A timm-native model gets the
images bilinearly resized to its default input size (``pretrained_cfg
["input_size"]``, 224 for most) inside :class:`Resized`. This works for every
timm architecture unchanged (fixed-size ViTs and MLP-Mixers included) and keeps
strides, receptive fields and positional embeddings as designed; the price is
the compute of a full-size input (a 224-pixel ViT-Tiny costs ~50x a ConvNet-3
on 32 pixels), so prefer the zoo's small-image models for long protocols.

The architectures themselves live in :mod:`distillkit.zoo`, which never imports
the registry; this module is where names meet the registry.
"""

from __future__ import annotations

import copy
import difflib
from typing import Callable, Sequence

import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distillkit import devices, registry
from distillkit.errors import UsageError
from distillkit.interfaces import ImageSpec, ModelBuilder
from distillkit.seeding import seeded
from distillkit.zoo.registration import distillkit_name

#: (name, spec) pairs whose model already passed a dry run (see :func:`create_model`)
_checked: set[tuple[str, ImageSpec]] = set()


class Resized(nn.Module):
    """A timm model fed inputs resized to ``size``; keeps timm's ``forward_features`` / ``forward_head`` split."""

    def __init__(self, model: nn.Module, size: tuple[int, int]) -> None:
        super().__init__()
        self.model = model
        self.size = size
        self.num_classes = getattr(model, "num_classes", None)
        self.num_features = getattr(model, "num_features", None)

    def forward_features(self, x: Tensor) -> Tensor:
        if tuple(x.shape[-2:]) != self.size:
            x = F.interpolate(x, size=self.size, mode="bilinear", align_corners=False)
        return self.model.forward_features(x)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        return self.model.forward_head(x, pre_logits=pre_logits)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


def _timm_native(name: str, spec: ImageSpec) -> nn.Module:
    model = timm.create_model(name, pretrained=False, num_classes=spec.num_classes, in_chans=spec.channels)
    size = tuple(model.pretrained_cfg.get("input_size", (spec.channels, spec.height, spec.width))[-2:])
    return Resized(model, size)


def _builder(name: str) -> Callable[[ImageSpec], nn.Module]:
    """How to build ``name`` for a spec, or a :class:`UsageError` naming the valid choices."""
    models = registry.plugins()["models"]
    if isinstance(name, str):  # --set sampler.model=3 parses as a number: no model name, and timm would crash on it
        ours = name if name in models else distillkit_name(name)
        if ours is not None and ours in models:
            factory = models.get(ours).factory
            return lambda spec: factory(num_classes=spec.num_classes, in_chans=spec.channels,
                                        img_size=(spec.height, spec.width))
        if timm.is_model(name):
            return lambda spec: _timm_native(name, spec)
    near = difflib.get_close_matches(str(name), models.names() + timm.list_models(), n=3)
    hint = f"; did you mean {', '.join(near)}?" if near else ""
    raise UsageError(f"unknown model {name!r}; choose one of: {', '.join(models.names())}, "
                     f"or any timm model name (see timm.list_models()){hint}")


def known_model(name: str) -> str:
    """``name`` itself if it names a model (zoo, ``dk_`` or timm), else a :class:`UsageError` with the choices."""
    _builder(name)
    return name


def create_model(name: str, spec: ImageSpec) -> nn.Module:
    """A freshly initialised ``name`` for ``spec``'s channels, size and classes (global RNG; see :func:`seeded`).

    The first model of each ``(name, spec)`` gets a dry run on two blank images, so a
    network that cannot take the dataset's channels or size fails here, as a
    :class:`UsageError`, and not hours into an evaluation.
    """
    build = _builder(name)
    where = f"model {name!r} cannot take {spec.channels}x{spec.height}x{spec.width} images"
    try:
        model = build(spec)
        if (name, spec) not in _checked:
            _dry_run(model, spec)
            _checked.add((name, spec))
    except UsageError:
        raise
    except Exception as exc:  # any failure to build or run is a mismatch between the model and the data
        raise UsageError(f"{where}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None
    return model


def builder(name: str, spec: ImageSpec) -> ModelBuilder:
    """What the evaluation engine is handed: ``name`` built for ``spec`` on every call."""
    return ModelBuilder(name, lambda: create_model(name, spec))


def check_model(name: str, spec: ImageSpec) -> None:
    """Fail now, with a :class:`UsageError`, if ``name`` is unknown or cannot take ``spec``'s images."""
    with seeded(0, "check-model", name):  # leaves torch's global generator as it was
        create_model(name, spec)


def _dry_run(model: nn.Module, spec: ImageSpec) -> None:
    model.eval()  # no batch-norm statistics move, no dropout draws
    with torch.no_grad():
        out = model(torch.zeros(2, spec.channels, spec.height, spec.width))
    model.train()
    if tuple(out.shape) != (2, spec.num_classes):
        raise ValueError(f"it returns shape {tuple(out.shape)} for 2 images, expected (2, {spec.num_classes})")


def embed(model: nn.Module, x: Tensor) -> Tensor:
    """The penultimate embedding (features before the classifier), flattened to (N, d)."""
    if not (hasattr(model, "forward_features") and hasattr(model, "forward_head")):
        raise UsageError(f"{type(model).__name__} has no forward_features/forward_head (timm's feature/head split); "
                         f"it cannot serve as a feature extractor")
    return model.forward_head(model.forward_features(x), pre_logits=True).flatten(1)


class RandomEmbedder:
    """Frozen, randomly initialised ``name`` networks for ``spec`` on ``device``, drawn into ONE module.

    :meth:`draw` gives the network of ``(seed, keys)``. **Guarantee:** its weights and buffers are
    exactly those of ``create_model(name, spec)`` built on the CPU under ``seeded(seed, "model",
    *keys)``: a pure function of ``(seed, keys)``, bit-identical on every device, because every draw
    happens on the CPU. The network is kept in train mode, as in the reference code, and never
    receives weight gradients.

    Cost per draw: no network is built on the device and nothing is allocated there; the CPU
    template's tensors are packed into one host buffer and written into the device module with ONE
    host -> device copy (pinned and asynchronous on CUDA; on the CPU they are copied over directly).
    The template gets its weights by replaying its initialisation in place, every submodule's
    ``reset_parameters()`` in module order under the same ``seeded``: what building does for
    networks of torch layers with their default init (the ConvNet family). The first draw checks
    that replay against the built network, bit for bit; for an architecture that initialises
    otherwise (ResNetAP's and many timm models' own init after building) every draw builds the CPU
    template afresh instead, still moved in one copy.

    The extractor a draw returns computes with the shared module: it is valid until the next draw.
    """

    #: each tensor's bytes start at a multiple of this in the packed buffer (so any dtype can view them)
    ALIGN = 16

    def __init__(self, name: str, spec: ImageSpec, device: torch.device | str = "cpu") -> None:
        self.name, self.spec, self.device = name, spec, torch.device(device)
        self._template: nn.Module | None = None  # on the CPU; never runs a forward, so its buffers stay fresh
        self._module: nn.Module | None = None  # on the device; what the extractors compute with
        self._replays = False  # whether replaying the template's init reproduces a fresh build
        self._taps: tuple[tuple[str, ...], dict[str, Tensor], list] | None = None  # hooked names, outputs, handles

    def draw(self, seed: int, *keys: object, taps: Sequence[str] = ()) -> Callable[[Tensor], Tensor | dict]:
        """The network of ``(seed, keys)``: its embedding ``(N, d)``, or with ``taps`` (submodule names, see
        :func:`layer_names`) named features ``{tap: that submodule's output, ..., "embedding": (N, d)}``
        from the same forward."""
        with seeded(seed, "model", *keys):
            if self._template is None or not self._replays:
                self._template = create_model(self.name, self.spec).requires_grad_(False)
            else:
                _replay_init(self._template)
        if self._module is None:
            self._module = copy.deepcopy(self._template).to(self.device).train()
            self._replays = self._replay_reproduces(seed, keys)
        else:
            self._load_template()
        module = self._module
        if taps:
            return self._tapped(tuple(taps))
        return lambda x: embed(module, x)

    def _tapped(self, taps: tuple[str, ...]) -> Callable[[Tensor], dict[str, Tensor]]:
        """Forward hooks on the device module (registered once per set of taps; the module is kept)."""
        if self._taps is None or self._taps[0] != taps:
            if self._taps is not None:
                for handle in self._taps[2]:
                    handle.remove()
            seen: dict[str, Tensor] = {}
            handles = [self._module.get_submodule(name).register_forward_hook(
                lambda mod, args, output, name=name: seen.__setitem__(name, output)) for name in taps]
            self._taps = (taps, seen, handles)
        module, seen = self._module, self._taps[1]

        def extract(x: Tensor) -> dict[str, Tensor]:
            seen.clear()
            embedding = embed(module, x)
            return {**{name: seen[name] for name in taps}, "embedding": embedding}

        return extract

    def _replay_reproduces(self, seed: int, keys: tuple) -> bool:
        """Whether replaying the init of ``keys`` gives the network just built for them, bit for bit."""
        built = [t.clone() for t in _tensors(self._template)]
        with seeded(seed, "model", *keys):
            _replay_init(self._template)
        return all(torch.equal(a, b) for a, b in zip(built, _tensors(self._template), strict=True))

    def _load_template(self) -> None:
        """The template's tensors into the device module: one packed copy to an accelerator, plain copies
        on the CPU (nothing to transfer, so packing would only add a pass over the weights)."""
        targets = _tensors(self._module)
        if self.device.type == "cpu":
            with torch.no_grad():
                for target, source in zip(targets, _tensors(self._template), strict=True):
                    target.copy_(source)
        else:
            packed = _pack(_tensors(self._template), self.ALIGN)
            _unpack(devices.to_device(packed, self.device), targets, self.ALIGN)


def layer_names(name: str, spec: ImageSpec, kind: type[nn.Module]) -> list[str]:
    """The submodule names of every ``kind`` layer of model ``name`` in forward order, e.g. the ReLUs of
    ConvNet-3: ``["features.2", "features.6", "features.10"]`` (what :meth:`RandomEmbedder.draw` taps)."""
    with seeded(0, "layer-names"):  # building draws an initialisation: keep the global generators as they were
        model = create_model(name, spec)
    return [n for n, m in model.named_modules() if isinstance(m, kind)]


def random_embedder(name: str, spec: ImageSpec, seed: int, *keys: object,
                    device: torch.device | str = "cpu") -> Callable[[Tensor], Tensor]:
    """A frozen, randomly initialised ``name`` whose weights are a pure function of ``(seed, keys)``,
    identical on every device (built on the CPU; see :class:`RandomEmbedder`, which samplers use to
    draw many networks into one module)."""
    return RandomEmbedder(name, spec, device).draw(seed, *keys)


def _tensors(module: nn.Module) -> list[Tensor]:
    """Every parameter and buffer of ``module``, in an order that is the same for any copy of it."""
    return [*module.parameters(), *module.buffers()]


def _replay_init(module: nn.Module) -> None:
    """Re-initialise ``module`` in place as building it does, for networks of torch's layers: each
    submodule's ``reset_parameters()`` in module (construction) order, drawing from the global generator."""
    for sub in module.modules():
        if callable(getattr(sub, "reset_parameters", None)):
            sub.reset_parameters()


def _pack(tensors: list[Tensor], align: int) -> Tensor:
    """The bytes of ``tensors`` in one uint8 host buffer, each tensor's from a multiple of ``align``."""
    pieces = []
    for t in tensors:
        raw = t.detach().contiguous().view(-1).view(torch.uint8)
        pieces += [raw, raw.new_zeros(-len(raw) % align)]
    return torch.cat(pieces)


def _unpack(packed: Tensor, tensors: list[Tensor], align: int) -> None:
    """Copy :func:`_pack`'s buffer (on the tensors' device) back into ``tensors``, in place."""
    offset = 0
    with torch.no_grad():
        for t in tensors:
            size = t.numel() * t.element_size()
            t.copy_(packed[offset:offset + size].view(t.dtype).view(t.shape))
            offset += size + -size % align
