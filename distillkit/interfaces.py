"""The interfaces every component implements, in one place.

A plugin registers factories (see :mod:`distillkit.hookspecs`); the core calls
them with the arguments documented here and uses only these methods.

Shapes: ``K`` classes in a block, ``n_r`` real and ``n_s`` synthetic samples
per class, ``d`` feature dimension, images ``(c, H, W)``. Images handed between
components are always *normalised* (dataset mean/std); a parameterization that
stores another space converts in :meth:`Parameterization.decode`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol as _Protocol, Sequence, runtime_checkable

import torch
from torch import Tensor, nn

from distillkit import devices
from distillkit.whitening import ZCAWhitening


@dataclass(frozen=True)
class ImageSpec:
    """What a synthetic set looks like: channels, size, classes and normalisation."""

    channels: int
    height: int
    width: int
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    #: ZCA whitening after the mean/std normalisation (``--set dataset.zca=true``), fitted on the training split
    whitening: ZCAWhitening | None = None

    def normalize(self, x01: Tensor) -> Tensor:
        """[0, 1] pixels -> normalised (then whitened, with :attr:`whitening`)."""
        x = (x01 - self._stat(self.mean, x01)) / self._stat(self.std, x01)
        return self.whitening.apply(x) if self.whitening is not None else x

    def denormalize(self, x: Tensor) -> Tensor:
        """Normalised (whitened) -> [0, 1] pixels (not clamped)."""
        if self.whitening is not None:
            x = self.whitening.invert(x)
        return x * self._stat(self.std, x) + self._stat(self.mean, x)

    @staticmethod
    def _stat(values: tuple[float, ...], like: Tensor) -> Tensor:
        return devices.constant(values, like.dtype, like.device).view(-1, 1, 1)

    def as_dict(self) -> dict[str, Any]:
        """Plain values, as files store them (:meth:`from_dict` reads them back)."""
        return {"channels": self.channels, "height": self.height, "width": self.width,
                "num_classes": self.num_classes, "mean": list(self.mean), "std": list(self.std),
                **({"whitening": self.whitening.as_dict()} if self.whitening is not None else {})}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ImageSpec":
        whitening = ZCAWhitening.from_dict(data["whitening"]) if data.get("whitening") else None
        return cls(int(data["channels"]), int(data["height"]), int(data["width"]), int(data["num_classes"]),
                   tuple(float(v) for v in data["mean"]), tuple(float(v) for v in data["std"]), whitening)


@dataclass(frozen=True)
class DatasetSpec:
    """A real dataset: its images' :class:`ImageSpec`, class names and loader.

    ``load(root, train)`` returns ``(uint8 images (N, c, H, W), int64 labels (N,))`` and raises
    :class:`~distillkit.errors.UsageError` naming the missing or corrupt files.
    """

    name: str
    image_spec: ImageSpec
    class_names: tuple[str, ...]
    load: Callable[[Path, bool], tuple[Tensor, Tensor]]
    description: str = ""
    #: ZCA-whiten the images with this ``eps``, fitted on the training split when a split is loaded
    #: (:func:`distillkit.data.load_split`); None: no whitening
    zca_eps: float | None = None

    def __post_init__(self) -> None:
        if len(self.class_names) != self.image_spec.num_classes:
            raise ValueError(f"dataset {self.name!r}: {len(self.class_names)} class names for "
                             f"{self.image_spec.num_classes} classes")


class RealImages(_Protocol):
    """Real training images, normalised, on the run's device (see :class:`distillkit.data.RealData`).

    Rows are the split's rows: ``labels[i]`` is the class of row ``i`` and ``gather(rows)`` its images, so a
    component that trains a network draws random rows over all classes and gathers one batch.
    """

    spec: ImageSpec
    #: the class of every row of the split, int64 on the host
    labels: Tensor

    def class_images(self, label: int) -> Tensor:
        """All images of class ``label`` in dataset order, ``(n_c, c, H, W)``."""

    def sample(self, label: int, n: int, generator: torch.Generator) -> Tensor:
        """``n`` distinct random images of class ``label`` drawn with ``generator``."""

    def gather(self, rows: Tensor) -> Tensor:
        """Images of split rows ``rows`` (int64), normalised, on the device: ``(len(rows), c, H, W)``."""


class DataContext:
    """The run's real data, for components that need more than the image spec: a sampler that trains its
    extractors on real images (IDM), a protocol's teacher, a parameterization initialised from statistics.

    The host builds one per command and hands it to every factory that declares a ``data`` parameter
    (samplers, parameterizations) and to :meth:`EvalProtocol.evaluate`, so a component never reloads a
    dataset itself: ``--data-root`` and ``--set dataset.OPTION=VALUE`` reach it as they reach the host.

    * ``dataset``: the :class:`DatasetSpec` as built from ``--dataset`` and its options;
    * ``options``: those options (``--set dataset.*``), as recorded in the run's config;
    * ``root``: the resolved data root, absolute;
    * ``device``: where :meth:`train` gathers images;
    * :meth:`model`: an evaluator architecture by name, for these images (a soft-label teacher).

    :meth:`train` is the **full** training split, every class, even on a torchrun rank that optimises only
    some (a trained extractor needs them all); it is loaded on first use and then shared (the host's own
    random baseline uses the same copy). Whatever a component trains from it must be a pure function of
    ``(seed, keys)`` drawn through :mod:`distillkit.seeding`, or be saved in checkpoints (see
    :class:`Stateful`), so runs resume and shard exactly.
    """

    def __init__(self, dataset: DatasetSpec, options: Mapping[str, Any], root: Path, device: torch.device,
                 load_train: Callable[[], RealImages], build_model: Callable[[str], "ModelBuilder"]) -> None:
        self.dataset, self.options, self.root, self.device = dataset, dict(options), Path(root), device
        self._load_train, self._build_model = load_train, build_model
        self._train: RealImages | None = None

    def model(self, name: str) -> "ModelBuilder":
        """The evaluator zoo's ``name`` (any ``--models`` name) built for this dataset's images, e.g. a teacher;
        an unknown name or one that cannot take these images is a :class:`~distillkit.errors.UsageError`."""
        return self._build_model(name)

    @property
    def spec(self) -> ImageSpec:
        return self.dataset.image_spec

    def train(self) -> RealImages:
        """The full training split (loaded once, on the first call)."""
        if self._train is None:
            self._train = self._load_train()
        return self._train


@runtime_checkable
class Stateful(_Protocol):
    """A sampler or objective whose state changes as the run goes (an extractor trained a little every
    iteration, a learnt sampling network): the host saves :meth:`state_dict` in every checkpoint and calls
    :meth:`load_state_dict` on resume. A component without these methods must be a pure function of
    ``(seed, iteration)``. The state must hold everything, optimizer moments included, for a resumed run
    to be bit-identical."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...


@runtime_checkable
class Objective(_Protocol):
    """Loss between real and synthetic features, batched over a block of classes.

    Factory: ``factory(**options) -> Objective``, plus ``seed`` (the run seed, int) and ``device`` (the
    run's ``torch.device``) for a factory that declares those parameters. ``real`` has shape
    ``(K, n_r, d)`` and carries no gradient; ``syn`` has shape ``(K, n_s, d)``. Where the extractor
    returns named features (see :class:`Sampler`), both are mappings ``{name: (K, n, ...)}``. An
    objective whose ``__call__`` declares a ``classes`` parameter also receives the block's class ids,
    ``(K,)`` int64 on the device (for a classification term); one that declares ``iteration`` receives
    the iteration number (an int: key its random draws by ``(seed, iteration)``, never by class, so a
    class's loss does not depend on which classes share its block). Returns the per-class losses,
    shape ``(K,)``; the loop sums them. An objective may be :class:`Stateful`; one that learns
    parameters of its own is a :class:`LearnableObjective`.
    """

    def __call__(self, real: Tensor | Mapping[str, Tensor], syn: Tensor | Mapping[str, Tensor]) -> Tensor: ...


@runtime_checkable
class LearnableObjective(_Protocol):
    """An :class:`Objective` with learnable parameters of its own, e.g. NCFM's sampling network, which is
    trained to *maximise* the discrepancy the images minimise (a min-max game).

    Per iteration the host clears the gradients of :meth:`parameters`, runs the one backward of the loss
    (its chunks' backwards add up), updates the images, then, under torchrun class sharding, sums these
    gradients over the ranks (each rank saw only its own classes' losses), and calls :meth:`step` once.
    The gradients are those of the summed loss over all classes, so ``step`` ascends them to maximise.
    Every rank then holds the same parameters. Must also be :class:`Stateful` (parameters and optimizer
    moments), seeded from the factory's ``seed``, so a resumed run is bit-identical.
    """

    def parameters(self) -> list[Tensor]:
        """The objective's learnable tensors (leaves with ``requires_grad``). Asked for again each iteration, so
        an objective may build them at its first call, when it sees the feature dimension (and in
        :meth:`~Stateful.load_state_dict`, from the saved shapes)."""

    def step(self) -> None:
        """Update :meth:`parameters` from their gradients (populated, summed over all classes)."""


@runtime_checkable
class Parameterization(_Protocol):
    """Owns the learnable tensors of a synthetic set (the shape of IDC's Synthesizer).

    Factory: ``factory(spec: ImageSpec, ipc: int, device: torch.device, **options)``, plus
    ``data`` (a :class:`DataContext`) if the factory declares that parameter.
    ``ipc`` counts *stored* images per class; :attr:`images_per_class` counts decoded ones.
    """

    images_per_class: int

    def init(self, real: RealImages, generator: torch.Generator) -> None:
        """Initialise from real images of each class."""

    def parameters(self) -> list[Tensor]:
        """The tensors the optimizer updates (leaf tensors with ``requires_grad``)."""

    def decode(self, classes: Sequence[int]) -> Tensor:
        """Differentiable decoded training images of ``classes``: ``(K, images_per_class, c, H, W)``, normalised."""

    def stored(self) -> Tensor:
        """The stored images as pictures, ``(num_classes * ipc, c, H, W)``, normalised (for display)."""

    def project(self) -> None:
        """Bring the parameters back into their valid space (e.g. clamp); called before every iteration."""

    def state_dict(self) -> dict[str, Tensor]:
        """Raw state (tensors only), enough to rebuild with :meth:`load_state_dict`.

        Every tensor here and in :meth:`parameters` is class-major along dim 0
        (``num_classes * k`` rows, class ``c`` in rows ``c*k:(c+1)*k``): that is how
        class-sharded runs merge their pieces exactly.
        """

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None: ...


@runtime_checkable
class Sampler(_Protocol):
    """Provides the feature extractor of each iteration.

    Factory: ``factory(spec: ImageSpec, seed: int, device: torch.device, **options)``, plus
    ``data`` (a :class:`DataContext`: the real training split, e.g. to train extractors) if the factory
    declares that parameter. The extractor maps normalised images ``(N, c, H, W)`` to features
    ``(N, d)``, or to named features ``{name: (N, ...)}`` (several layers, an embedding and logits)
    for an objective that consumes them (:mod:`distillkit.features`). It must be a pure function of
    ``(seed, iteration)``, or :class:`Stateful`, so runs resume and shard exactly;
    :func:`distillkit.models.random_embedder` builds such networks.
    """

    def extractor(self, iteration: int) -> Callable[[Tensor], Tensor]:
        """The network of ``iteration``. The host may ask more than once for one iteration (its preflight
        embeds two images before the loop starts) and must get the same network each time, so a
        :class:`Stateful` sampler advances its state once per iteration, not once per call."""

    def redraws_at(self, iteration: int) -> bool:
        """True when ``iteration`` gets a new extractor (for logs and tests)."""


@dataclass(frozen=True)
class TrainingSet:
    """Labelled images on a device, normalised."""

    images: Tensor
    labels: Tensor


@dataclass(frozen=True)
class ModelBuilder:
    """One evaluator architecture for one image spec: ``builder()`` returns a freshly initialised network.

    Initialisation draws from torch's global generator, so callers build inside
    :func:`~distillkit.seeding.seeded`; ``name`` keys those streams.
    """

    name: str
    build: Callable[[], nn.Module]

    def __call__(self) -> nn.Module:
        return self.build()


@dataclass(frozen=True)
class Evaluation:
    """What :meth:`EvalProtocol.evaluate` may return instead of a bare list of accuracies: the accuracies, and
    ``details`` (plain JSON values) that ``eval.json`` records beside them, e.g. a teacher's own test accuracy
    and whether it came from the cache."""

    accuracies: list[float]
    details: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class EvalProtocol(_Protocol):
    """Trains evaluator models on a synthetic set and tests them on real data.

    Registered as an instance, or as a factory the host calls with no arguments. Its options never go
    through the factory: the host applies them with :meth:`with_overrides`, from ``distillkit evaluate
    --set protocol.OPTION=VALUE`` and from the shortcuts ``--epochs`` (``epochs``), ``--test-limit``
    (``test_limit``), ``--stacked`` and ``--compile``. The host calls exactly these members, in this
    order: :meth:`with_overrides`, :meth:`for_dataset`, :meth:`settings` and :meth:`speed_settings`, then
    :meth:`evaluate` once per (model, training set). A protocol may also define ``hard_labels()``: the same
    recipe with the set's own labels (a soft-label protocol's hard counterpart), which the full-data
    reference and the hard-label scores are computed under; without it the protocol is its own.
    """

    name: str

    def settings(self) -> dict[str, Any]:
        """Every number that defines the protocol; stored with each result."""

    def speed_settings(self, device: torch.device | str) -> dict[str, Any]:
        """How results are computed on ``device`` (stacking, compilation, batch sizes): stored beside
        :meth:`settings`, never part of them, because they change the speed and not the result."""

    def for_dataset(self, dataset: str) -> "EvalProtocol":
        """The protocol as its reference sets it for the registered dataset ``dataset`` (e.g. IDC drops
        flips on MNIST); ``self`` where nothing depends on the dataset. Its :meth:`settings` are recorded."""

    def with_overrides(self, **overrides: Any) -> "EvalProtocol":
        """A copy with some options replaced; ``None`` values mean "keep". An unknown option or an invalid
        value is a :class:`~distillkit.errors.UsageError` naming it and the choices."""

    def evaluate(
        self, model: ModelBuilder, train: TrainingSet, test: TrainingSet, spec: ImageSpec, run_ids: Sequence[int],
        seed: int, device: torch.device, data: DataContext,
    ) -> list[float] | Evaluation:
        """Test accuracy (0-100) of a freshly trained ``model()`` network per run in ``run_ids``, in that order
        (or an :class:`Evaluation` holding them and details to record).

        Run ``r`` must depend only on ``(seed, model.name, r)``, never on which other runs share the
        call: that is what lets ``evaluate`` spread runs over torchrun ranks and still write the
        numbers of a single process. ``data`` is the dataset's :class:`DataContext` (its full training
        split, e.g. for a soft-label teacher).
        """


@dataclass(frozen=True)
class Method:
    """A named combination of components with default hyperparameters.

    Every field can be overridden from the CLI. Component options apply only to
    the component the method names; choosing another component starts from that
    component's own defaults.
    """

    name: str
    objective: str
    parameterization: str
    sampler: str
    description: str = ""
    objective_options: Mapping[str, Any] = field(default_factory=dict)
    parameterization_options: Mapping[str, Any] = field(default_factory=dict)
    sampler_options: Mapping[str, Any] = field(default_factory=dict)
    #: component options that change with IPC, ``{from_ipc: {component: {option: value}}}``: the entry of the
    #: largest key <= the run's IPC is laid over the ``*_options`` above (none applies below the smallest key)
    ipc_options: Mapping[int, Mapping[str, Mapping[str, Any]]] = field(default_factory=dict)
    #: differentiable augmentation: "dsa" (one op per call), "idc" (flip+color, one geometric op, cutout) or "none"
    augment: str = "dsa"
    augment_strategy: str = "color_crop_cutout_flip_scale_rotate"
    #: learning rate of the synthetic images; a mapping {ipc: lr} picks the entry of the largest key <= ipc
    lr_img: float | Mapping[int, float] = 1.0
    momentum: float = 0.5
    iterations: int = 20000
    batch_real: int = 256
    #: cap on decoded synthetic images per class fed to the extractor (None: all)
    batch_syn: int | None = None
    #: "iteration": one optimizer step over all classes per iteration (DM);
    #: "class": one step per class, in class order (M3D; SGD without weight decay only)
    step: str = "iteration"
    #: the image optimizer: "sgd" (with ``momentum``) or "adamw" (torch's default betas; NCFM)
    optimizer: str = "sgd"
    #: L2 penalty of SGD, decoupled weight decay of AdamW
    weight_decay: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)
