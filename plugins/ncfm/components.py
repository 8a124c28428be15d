"""NCFM's components, built only on distillkit's interfaces.

* :func:`cf_discrepancy`: the characteristic-function discrepancy of two sets of features per class,
  from the amplitude and phase gaps of their empirical characteristic functions at sampled frequencies.
* :class:`CharacteristicFunctionObjective` (``ncfm``): ``scale`` x that discrepancy between L2-normalised
  real and synthetic embeddings, plus a calibration cross-entropy of a trained network's logits on the
  synthetic images. Frequencies are Gaussian draws (default), or come from a learnt
  :class:`SamplingNetwork` that ascends the loss the images descend (``sampling_net=True``): a
  :class:`~distillkit.interfaces.LearnableObjective`.
* :class:`PretrainedInterpolationSampler` (``ncfm-pretrained``): networks trained on the real training
  split, each iteration one of them with its parameters interpolated at random between its initial and
  trained values; with ``with_logits`` also the trained network's logits, for the calibration term.
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distillkit import devices
from distillkit.engine import TrainingProtocol
from distillkit.errors import UsageError
from distillkit.interfaces import DataContext, ImageSpec, TrainingSet
from distillkit.models import create_model, embed
from distillkit.seeding import derive_seed, generator, seeded

#: the reference's lower bound on the phase term before the square root (``NCFM/NCFM.py``)
PHASE_FLOOR = 1e-12


def empirical_cf(features: Tensor, frequencies: Tensor) -> tuple[Tensor, Tensor]:
    """Real and imaginary parts of each class's empirical characteristic function ``mean_j exp(i t.x_j)`` at
    every frequency ``t``: features ``(K, n, d)``, frequencies ``(F, d)`` -> two ``(K, F)``."""
    phase = features @ frequencies.transpose(0, 1)  # (K, n, F)
    return phase.cos().mean(1), phase.sin().mean(1)


def cf_discrepancy(real: Tensor, syn: Tensor, frequencies: Tensor, alpha: float, beta: float) -> Tensor:
    """``mean_t sqrt(alpha * (|phi_r| - |phi_s|)^2 + beta * 2 (|phi_r||phi_s| - Re(phi_r conj(phi_s))))`` per
    class, ``(K,)``: the amplitude gap and the phase gap of the empirical characteristic functions ``phi`` of
    ``real`` and ``syn`` at each frequency (the phase term floored at :data:`PHASE_FLOOR`, as the
    reference). With ``alpha = beta = 1/2`` the root is ``|phi_r - phi_s| / sqrt(2)``."""
    real_re, real_im = empirical_cf(real, frequencies)
    syn_re, syn_im = empirical_cf(syn, frequencies)
    real_amp, syn_amp = torch.sqrt(real_re ** 2 + real_im ** 2), torch.sqrt(syn_re ** 2 + syn_im ** 2)
    amplitude = (real_amp - syn_amp) ** 2
    phase = (2 * (real_amp * syn_amp - real_re * syn_re - real_im * syn_im)).clamp_min(PHASE_FLOOR)
    return torch.sqrt(alpha * amplitude + beta * phase).mean(-1)


class SamplingNetwork(nn.Module):
    """Noise ``(m, d)`` -> frequencies ``(m, d)``: three ``Linear(d, d)``, each followed by batch norm, then
    LeakyReLU(0.2) after the first two and tanh after the last (the reference's ``NCFM/SampleNet.py``).

    Batch norm keeps no running statistics: the network only ever runs in training mode, where they are
    never read, and without them a forward changes no state (the host's preflight forward included)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for last in (False, False, True):
            layers += [nn.Linear(dim, dim), nn.BatchNorm1d(dim, track_running_stats=False),
                       nn.Tanh() if last else nn.LeakyReLU(0.2)]
        self.layers = nn.Sequential(*layers)

    def forward(self, noise: Tensor) -> Tensor:
        return self.layers(noise)


class CharacteristicFunctionObjective:
    """NCFM's loss per class: ``scale * cf_discrepancy(normalize(real), normalize(syn), t) + calibration_weight
    * CE(trained logits of the synthetic images, their class)``.

    Embeddings are L2-normalised per image before the discrepancy (reference ``match_loss``). The
    frequencies ``t``, one set for all classes of an iteration:

    * ``sampling_net=False`` (the reference's shipped configs): ``frequencies`` draws from ``N(0, I_d)``, new
      every iteration, drawn on the run's device from the stream ``("ncfm-frequencies", iteration)`` (drawn
      there because an iteration needs ``frequencies x d`` numbers: 8M for ConvNet-3 on CIFAR-10; the
      numbers then depend on the device type, as a GPU's differ from a CPU's);
    * ``sampling_net=True``: ``sampling_frequencies`` rows of a :class:`SamplingNetwork` fed fresh
      ``N(0, 1)`` noise (stream ``("ncfm-sampling-noise", iteration)``), built at the first call (it needs
      the feature dimension) under ``seeded(seed, "ncfm-sampling-net")``. After each image step it takes
      one SGD step (``sampling_lr``, ``sampling_momentum``) that *increases* the summed loss: the min-max
      game; its weights and momentum are this objective's checkpointed state.

    The calibration term needs named features ``{"embedding", "logits"}`` (``ncfm-pretrained`` with
    ``with_logits``); with ``calibration_weight=0`` any sampler's plain embeddings do.
    """

    def __init__(self, seed: int, device: torch.device, frequencies: int = 4096, alpha: float = 0.5,
                 beta: float = 0.5, scale: float = 300.0, calibration_weight: float = 1.0, sampling_net: bool = False,
                 sampling_frequencies: int = 4, sampling_lr: float = 1e-3, sampling_momentum: float = 0.5) -> None:
        for name, value in (("frequencies", frequencies), ("sampling_frequencies", sampling_frequencies)):
            if not isinstance(value, int) or value < 1:
                raise UsageError(f"ncfm {name} must be a positive integer, got {value!r}")
        for name, value in (("alpha", alpha), ("beta", beta), ("scale", scale),
                            ("calibration_weight", calibration_weight), ("sampling_lr", sampling_lr)):
            if not isinstance(value, (int, float)) or value < 0:
                raise UsageError(f"ncfm {name} must be a number >= 0, got {value!r}")
        if not isinstance(sampling_momentum, (int, float)) or not 0 <= sampling_momentum < 1:
            raise UsageError(f"ncfm sampling_momentum must be in [0, 1), got {sampling_momentum!r}")
        if not isinstance(sampling_net, bool):
            raise UsageError(f"ncfm sampling_net must be true or false, got {sampling_net!r}")
        self.seed, self.device = seed, torch.device(device)
        self.frequencies, self.alpha, self.beta, self.scale = frequencies, float(alpha), float(beta), float(scale)
        self.calibration_weight, self.sampling_net = float(calibration_weight), sampling_net
        self.sampling_frequencies, self.sampling_lr, self.sampling_momentum = (sampling_frequencies, sampling_lr,
                                                                                sampling_momentum)
        self.network: SamplingNetwork | None = None
        self.optimizer: torch.optim.SGD | None = None
        self._gaussian = torch.Generator(self.device)  # reseeded per iteration: no state carried
        self._drawn: tuple[int, int, Tensor] | None = None  # (iteration, dim, frequencies or noise)

    # -- the loss ------------------------------------------------------------------------------
    def __call__(self, real: Tensor | Mapping[str, Tensor], syn: Tensor | Mapping[str, Tensor], classes: Tensor,
                 iteration: int) -> Tensor:
        named = isinstance(syn, Mapping)
        if self.calibration_weight and not (named and "embedding" in syn and "logits" in syn):
            raise UsageError("objective 'ncfm' needs the named features embedding and logits for its calibration "
                             "term: use --sampler ncfm-pretrained (the ncfm method's default), or --set "
                             "objective.calibration_weight=0")
        real_embedding = F.normalize((real["embedding"] if named else real).detach(), dim=-1)
        syn_embedding = F.normalize(syn["embedding"] if named else syn, dim=-1)
        t = self._frequencies(iteration, syn_embedding.shape[-1])
        loss = self.scale * cf_discrepancy(real_embedding, syn_embedding, t, self.alpha, self.beta)
        if not self.calibration_weight:
            return loss
        logits = syn["logits"]
        k, n = logits.shape[:2]
        ce = F.cross_entropy(logits.flatten(0, 1), classes.repeat_interleave(n), reduction="none").view(k, n)
        return loss + self.calibration_weight * ce.mean(1)

    def _frequencies(self, iteration: int, dim: int) -> Tensor:
        """The frequencies ``(F, d)`` of ``iteration``: the same for every block of classes of one iteration
        (drawn once; a learnt network's forward reruns per block, so each block's backward has its graph)."""
        if self._drawn is None or self._drawn[:2] != (iteration, dim):
            if self.sampling_net:
                noise = torch.randn(self.sampling_frequencies, dim,
                                    generator=generator(self.seed, "ncfm-sampling-noise", iteration))
                drawn = devices.to_device(noise, self.device)
            else:
                self._gaussian.manual_seed(derive_seed(self.seed, "ncfm-frequencies", iteration))
                drawn = torch.randn(self.frequencies, dim, generator=self._gaussian, device=self.device)
            self._drawn = (iteration, dim, drawn)
        if not self.sampling_net:
            return self._drawn[2]
        self._build(dim)
        return self.network(self._drawn[2])

    # -- the sampling network: a LearnableObjective -----------------------------------------------
    def _build(self, dim: int) -> None:
        if self.network is not None:
            return
        with seeded(self.seed, "ncfm-sampling-net"):  # on the CPU: the same weights on every device
            network = SamplingNetwork(dim)
        self.network = network.to(self.device).train()
        self.optimizer = torch.optim.SGD(self.network.parameters(), lr=self.sampling_lr,
                                         momentum=self.sampling_momentum, maximize=True)

    def parameters(self) -> list[Tensor]:
        return list(self.network.parameters()) if self.network is not None else []

    def step(self) -> None:
        if self.optimizer is not None:
            self.optimizer.step()

    def state_dict(self) -> dict[str, Any]:
        if self.network is None:
            return {}
        return {"dim": self.network.layers[0].in_features, "network": self.network.state_dict(),
                "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if not state:
            return
        state = copy.deepcopy(state)  # the optimizer would otherwise keep the given momentum tensors, shared
        self._build(int(state["dim"]))
        self.network.load_state_dict(state["network"])
        self.optimizer.load_state_dict(state["optimizer"])


class PretrainedInterpolationSampler:
    """NCFM's feature extractors: ``networks`` copies of ``model`` trained on the real training split, and at
    each iteration one of them, picked at random, with every parameter set to ``l * initial + (1 - l) *
    trained`` for ``l ~ U(0, 1)`` (reference ``utils/utils.py: update_feature_extractor``).

    Pretraining (reference ``pretrain/pretrain_script.py`` with the configs' ``train`` block): network
    ``i`` starts from ``seeded(seed, "ncfm-net", i)`` and trains ``epochs`` epochs with SGD (``lr``,
    ``momentum``, ``weight_decay``, batch ``batch``), the lr x0.2 at 2E//3 and 5E//6, IDC-mode
    augmentation ``color_crop`` drawn per sample and CutMix (p 0.5, beta 1): distillkit's
    :class:`~distillkit.engine.TrainingProtocol` with those settings, through its streams keyed
    ``("ncfm-pretrain", i)``. ``train_images`` trains each network on that many random rows (stream
    ``("ncfm-pretrain-rows", i)``) instead of the whole split (quick runs and tests). It runs at the first
    :meth:`extractor` call, on every torchrun rank alike (bit-equal on CPUs; on CUDA with
    ``--deterministic``); the initial and trained weights are the sampler's checkpointed state, so a
    resumed run does not pretrain again. The pick and ``l`` of iteration ``it`` come from
    ``("ncfm-pick", it)``.

    The extractor is the interpolated network's embedding (the flattened last block); with ``with_logits``
    named features ``{"embedding", "logits"}``, the logits being the trained network's (the reference's
    ``model_final``, whose cross-entropy on the synthetic images is its calibration loss).
    """

    def __init__(self, spec: ImageSpec, seed: int, device: torch.device, data: DataContext, model: str = "convnet3",
                 networks: int = 20, epochs: int = 60, batch: int = 128, lr: float = 0.01, momentum: float = 0.9,
                 weight_decay: float = 5e-4, train_images: int | None = None, with_logits: bool = True) -> None:
        for name, value in (("networks", networks), ("epochs", epochs), ("batch", batch)):
            if not isinstance(value, int) or value < 1:
                raise UsageError(f"ncfm-pretrained {name} must be a positive integer, got {value!r}")
        if train_images is not None and (not isinstance(train_images, int) or train_images < 1):
            raise UsageError(f"ncfm-pretrained train_images must be a positive integer or null, got {train_images!r}")
        self.spec, self.seed, self.device, self.data, self.model = spec, seed, torch.device(device), data, model
        self.networks, self.train_images, self.with_logits = networks, train_images, with_logits
        self.protocol = TrainingProtocol(
            "ncfm-pretrain", epochs=epochs, lr=lr, momentum=momentum, weight_decay=weight_decay, batch_size=batch,
            milestones=(2 / 3, 5 / 6), gamma=0.2, restart_optimizer=False, augment="idc", augment_strategy="color_crop",
            cutmix_prob=0.5, cutmix_beta=1.0, schedule="floor")
        self._interpolated = self._build(0).requires_grad_(False)  # the devices' modules the extractors use
        self._trained = copy.deepcopy(self._interpolated)
        self._parameters = {name for name, _ in self._interpolated.named_parameters()}
        self.weights: list[dict[str, dict[str, Tensor]]] | None = None  # per network: {"init", "trained"}
        self._prepared = -1  # the iteration the two modules hold

    def _build(self, index: int) -> nn.Module:
        with seeded(self.seed, "ncfm-net", index):  # on the CPU: the same weights on every device
            return create_model(self.model, self.spec).to(self.device).train()

    def _pretrain(self) -> list[dict[str, dict[str, Tensor]]]:
        real = self.data.train()
        whole = None if self.train_images is not None else self._training_set(torch.arange(len(real.labels)))
        weights = []
        for index in range(self.networks):
            train = whole if whole is not None else self._training_set(torch.randperm(
                len(real.labels), generator=generator(self.seed, "ncfm-pretrain-rows", index))[:self.train_images])
            module = self._build(index)
            init = {k: v.detach().clone() for k, v in module.state_dict().items()}
            with torch.enable_grad():  # whatever the caller's mode: the first extractor call may come under no_grad
                self.protocol.train_network(module, train, self.seed, "ncfm-pretrain", index)
            weights.append({"init": init, "trained": {k: v.detach().clone() for k, v in module.state_dict().items()}})
        return weights

    def _training_set(self, rows: Tensor) -> TrainingSet:
        real = self.data.train()
        return TrainingSet(real.gather(rows), devices.to_device(real.labels[rows], self.device))

    def _prepare(self, iteration: int) -> None:
        if self.weights is None:
            self.weights = self._pretrain()
        pick = generator(self.seed, "ncfm-pick", iteration)
        index = int(torch.randint(self.networks, (), generator=pick))
        weight = float(torch.rand((), generator=pick))  # both on the CPU: no device sync
        init, trained = self.weights[index]["init"], self.weights[index]["trained"]
        with torch.no_grad():
            for name, target in self._interpolated.state_dict().items():
                # lerp(trained, init, l) = l * init + (1 - l) * trained; buffers come from the trained network
                target.copy_(torch.lerp(trained[name], init[name], weight) if name in self._parameters
                             else trained[name])
            if self.with_logits:
                for name, target in self._trained.state_dict().items():
                    target.copy_(trained[name])
        self._prepared = iteration

    def extractor(self, iteration: int) -> Callable[[Tensor], Tensor | dict[str, Tensor]]:
        if iteration != self._prepared:  # once per iteration, however often the host asks
            self._prepare(iteration)
        interpolated, trained, with_logits = self._interpolated, self._trained, self.with_logits

        def extract(x: Tensor) -> Tensor | dict[str, Tensor]:
            embedding = embed(interpolated, x)
            return {"embedding": embedding, "logits": trained(x)} if with_logits else embedding

        return extract

    def redraws_at(self, iteration: int) -> bool:
        return True

    def state_dict(self) -> dict[str, Any]:
        if self.weights is None:
            self.weights = self._pretrain()
        return {"weights": self.weights}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.weights = [{part: {k: v.to(self.device) for k, v in saved[part].items()} for part in ("init", "trained")}
                        for saved in state["weights"]]
        self._prepared = -1
