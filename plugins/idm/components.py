"""IDM's components, built only on distillkit's interfaces.

* :class:`ModelQueueSampler` (``idm-queue``): a first-in-first-out queue of ConvNets trained a little on
  real images at every iteration; each iteration matches with one of them, as it was before that
  iteration's training.
* :class:`RegularizedMeanObjective` (``idm``): DM's per-class squared gap between mean embeddings plus the
  class-aware regularisation, a cross-entropy of the matched network's logits on the synthetic images
  weighted by that network's running training accuracy.

Partitioning and expansion is M3D's ``factor`` parameterization (the same operation: each stored image
holds 2 x 2 tiles, each bilinearly up-sampled to full size), with ``space="normalized"`` and
``resize="bilinear"`` as IDM stores and initialises its images.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distillkit.errors import UsageError
from distillkit.interfaces import DataContext, ImageSpec
from distillkit.models import create_model
from distillkit.seeding import generator, seeded


@dataclass
class _QueuedNet:
    index: int  # creation number: keys the network's initialisation
    module: nn.Module
    optimizer: torch.optim.SGD
    correct: Tensor  # training-batch predictions that were right since the last meter reset (on the device)
    seen: int  # training images since the last meter reset (a host count: batches have a fixed size)


class ModelQueueSampler:
    """IDM's queue of progressively trained ConvNets (reference: uitrbn/IDM ``IDM_cifar10.py``).

    Iteration ``it``, in the reference's order:

    1. every ``meter_reset_every`` iterations (from ``it`` > 0) every network's accuracy meter restarts
       (the reference resets them at each of its evaluations, every ``eval_interval``: 100, and 500 in its
       IPC 50 commands, which the ``idm`` method follows from IPC 50);
    2. every ``push_every`` iterations (from 0) a freshly initialised ``model`` joins the queue, the oldest
       leaves once ``net_num`` are queued; the queue starts with ``initial_nets`` (hard-coded 3 there);
    3. one random network is matched with, as it is *before* this iteration's training;
    4. ``train_nets`` random networks (drawn independently of 3) each take ``train_steps`` SGD steps
       (``net_lr``, ``net_momentum``, ``net_weight_decay``) of cross-entropy on ``train_batch`` random real
       images of all classes, without augmentation, from the data context's full training split.

    Defaults are the reference's CIFAR-10 commands (``command.txt``: ``--net_decay``, ``--train_net_num 1``,
    ``--embed_last 1000``, ``net_num`` 100, ``fetch_net_num`` 2, ``model_train_steps`` 10, ``trained_bs`` 256,
    ``lr_net`` 0.01; ``net_generate_interval`` 30, which its IPC-1 commands lower to 5). Features are the
    network's whole flattened feature output (the reference's ``embed_last 1000``). With ``with_logits``
    the extractor returns named features ``{"embedding", "logits", "accuracy"}``: the classifier's logits
    and, per image, the matched network's running training accuracy in percent (the weight of IDM's
    regularisation, see :class:`RegularizedMeanObjective`); otherwise the embedding alone, so the queue
    serves any objective (``--method dm --sampler idm-queue``).

    Every random draw derives from the run seed (networks ``("idm-net", index)``, picks ``("idm-match",
    it)`` and ``("idm-train", it)``, batches ``("idm-batch", it, slot, step)``); the queue, optimizer
    moments and meters are the sampler's state, saved in checkpoints, so a resumed run is bit-identical.
    Under torchrun every rank trains the same queue from the full split (bit-equal across ranks on CPUs;
    on CUDA with ``--deterministic``). The reference seeds nothing (every seed comes from the clock).
    """

    def __init__(self, spec: ImageSpec, seed: int, device: torch.device, data: DataContext, model: str = "convnet3",
                 net_num: int = 100, initial_nets: int = 3, push_every: int = 30, train_nets: int = 2,
                 train_steps: int = 10, train_batch: int = 256, net_lr: float = 0.01, net_momentum: float = 0.9,
                 net_weight_decay: float = 5e-4, meter_reset_every: int = 100, with_logits: bool = False) -> None:
        for name, value in (("net_num", net_num), ("initial_nets", initial_nets), ("push_every", push_every),
                            ("train_batch", train_batch), ("meter_reset_every", meter_reset_every)):
            if not isinstance(value, int) or value < 1:
                raise UsageError(f"idm-queue {name} must be a positive integer, got {value!r}")
        for name, value in (("train_nets", train_nets), ("train_steps", train_steps)):
            if not isinstance(value, int) or value < 0:
                raise UsageError(f"idm-queue {name} must be an integer >= 0, got {value!r}")
        if initial_nets > net_num:
            raise UsageError(f"idm-queue initial_nets {initial_nets} exceeds net_num {net_num}")
        self.spec, self.seed, self.device, self.data, self.model = spec, seed, torch.device(device), data, model
        self.net_num, self.push_every, self.train_nets, self.train_steps = net_num, push_every, train_nets, train_steps
        self.train_batch, self.meter_reset_every, self.with_logits = train_batch, meter_reset_every, with_logits
        self.net_lr, self.net_momentum, self.net_weight_decay = net_lr, net_momentum, net_weight_decay
        self.queue: list[_QueuedNet] = []
        self.created = 0
        self.advanced_to = -1  # the last iteration whose queue steps were taken
        self._matching = self._build(0).eval().requires_grad_(False)  # the matched network's copy
        self._accuracy = torch.zeros((), device=self.device)
        for _ in range(initial_nets):
            self._push()

    # -- the queue ---------------------------------------------------------
    def _build(self, index: int) -> nn.Module:
        with seeded(self.seed, "idm-net", index):  # on the CPU: the same weights on every device
            return create_model(self.model, self.spec).to(self.device)

    def _queued(self, index: int, module: nn.Module) -> _QueuedNet:
        optimizer = torch.optim.SGD(module.parameters(), lr=self.net_lr, momentum=self.net_momentum,
                                    weight_decay=self.net_weight_decay)
        return _QueuedNet(index, module.train(), optimizer, torch.zeros((), device=self.device), 0)

    def _push(self) -> None:
        if len(self.queue) == self.net_num:
            self.queue.pop(0)
        self.queue.append(self._queued(self.created, self._build(self.created)))
        self.created += 1

    def _advance(self, it: int) -> None:
        if it > 0 and it % self.meter_reset_every == 0:
            for net in self.queue:
                net.correct.zero_()
                net.seen = 0
        if it % self.push_every == 0:
            self._push()
        matched = self.queue[int(torch.randint(len(self.queue), (), generator=generator(self.seed, "idm-match", it)))]
        self._matching.load_state_dict(matched.module.state_dict())
        self._accuracy = matched.correct * (100.0 / matched.seen) if matched.seen else matched.correct * 0.0
        real = self.data.train()
        order = torch.randperm(len(self.queue), generator=generator(self.seed, "idm-train", it))
        for slot, position in enumerate(order[:self.train_nets].tolist()):
            net = self.queue[position]
            for step in range(self.train_steps):
                rows = torch.randperm(len(real.labels), generator=generator(self.seed, "idm-batch", it, slot, step))
                rows = rows[:self.train_batch]
                images, labels = real.gather(rows), real.labels[rows].to(self.device, non_blocking=True)
                logits = net.module(images)
                net.optimizer.zero_grad(set_to_none=True)
                F.cross_entropy(logits, labels).backward()
                net.optimizer.step()
                net.correct += (logits.detach().argmax(1) == labels).sum()
                net.seen += len(rows)
        self.advanced_to = it

    # -- the sampler interface ----------------------------------------------
    def extractor(self, iteration: int) -> Callable[[Tensor], Tensor | dict[str, Tensor]]:
        if iteration != self.advanced_to:  # once per iteration, however often the host asks
            self._advance(iteration)
        module, accuracy, with_logits = self._matching, self._accuracy, self.with_logits

        def extract(x: Tensor) -> Tensor | dict[str, Tensor]:
            maps = module.forward_features(x)
            embedding = module.forward_head(maps, pre_logits=True).flatten(1)
            if not with_logits:
                return embedding
            return {"embedding": embedding, "logits": module.forward_head(maps),
                    "accuracy": accuracy.expand(len(x), 1)}

        return extract

    def redraws_at(self, iteration: int) -> bool:
        return True

    def state_dict(self) -> dict[str, Any]:
        return {"created": self.created, "advanced_to": self.advanced_to,
                "matching": self._matching.state_dict(), "accuracy": self._accuracy,
                "queue": [{"index": n.index, "weights": n.module.state_dict(), "optimizer": n.optimizer.state_dict(),
                           "correct": n.correct, "seen": n.seen} for n in self.queue]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        state = copy.deepcopy(state)  # the optimizers would otherwise keep the given momentum tensors, shared
        self.created, self.advanced_to = int(state["created"]), int(state["advanced_to"])
        self._matching.load_state_dict(state["matching"])
        self._accuracy = state["accuracy"].to(self.device)
        self.queue = []
        for saved in state["queue"]:
            net = self._queued(int(saved["index"]), self._build(int(saved["index"])))
            net.module.load_state_dict(saved["weights"])
            net.optimizer.load_state_dict(saved["optimizer"])
            net.correct, net.seen = saved["correct"].to(self.device), int(saved["seen"])
            self.queue.append(net)


class RegularizedMeanObjective:
    """IDM's loss per class: ``|mean(real embedding) - mean(synthetic embedding)|^2 + ce_weight *
    accuracy * CE(logits of the synthetic images, their class)``.

    The first term is DM's (the reference's l.312). The second is IDM's class-aware distribution
    regularisation (l.314-327): ``accuracy`` is the matched network's running training accuracy in percent
    (the reference's ``ClassErrorMeter`` value, 0 for an untrained network), so the term grows as the
    queue's networks learn; the cross-entropy averages over the class's synthetic images. ``ce_weight``
    0.5 is the reference's CIFAR-10 IPC 1 and 10 commands (0.1 in its IPC 50 command, the ``idm`` method's
    default from IPC 50; 0 turns the term off). Needs the named features of ``idm-queue`` with
    ``with_logits``.
    """

    NEEDS = ("embedding", "logits", "accuracy")

    def __init__(self, ce_weight: float = 0.5) -> None:
        if not isinstance(ce_weight, (int, float)) or ce_weight < 0:
            raise UsageError(f"idm ce_weight must be a number >= 0, got {ce_weight!r}")
        self.ce_weight = float(ce_weight)

    def __call__(self, real: Mapping[str, Tensor], syn: Mapping[str, Tensor], classes: Tensor) -> Tensor:
        if not isinstance(syn, Mapping) or any(name not in syn for name in self.NEEDS):
            raise UsageError("objective 'idm' needs the named features embedding, logits and accuracy: use "
                             "--sampler idm-queue --set sampler.with_logits=true (the idm method's default)")
        gap = (real["embedding"].mean(1) - syn["embedding"].mean(1)).pow(2).sum(-1)
        if self.ce_weight == 0:
            return gap
        logits = syn["logits"]
        k, n = logits.shape[:2]
        ce = F.cross_entropy(logits.flatten(0, 1), classes.repeat_interleave(n), reduction="none").view(k, n).mean(1)
        return gap + self.ce_weight * syn["accuracy"][:, 0, 0].detach() * ce
