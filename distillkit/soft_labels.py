"""Soft-label evaluation: evaluators learn a teacher's soft labels of every augmented batch.

:class:`SoftLabelProtocol` is a :class:`~distillkit.engine.TrainingProtocol` (same training loop, same
augmentation, CutMix, schedules and streams) whose loss is the KL divergence between the evaluator's and a
teacher's temperature-softened predictions of each training batch, *after* augmentation (and CutMix): the
label a batch gets is what the teacher says about the images the evaluator sees, as SRe2L and DD-Ranking
evaluate (DD-Ranking's ``ddranking/loss/kl.py`` at b8b0966: ``kl_div(log_softmax(s / T), softmax(t / T),
'batchmean')``, T = 1.2, no T^2 scaling). The set's own labels are not used.

The teacher is a ``teacher`` network trained on the full training split under this protocol's hard-label
counterpart (:meth:`SoftLabelProtocol.hard_labels`) for ``teacher_epochs`` epochs, as run 0 of the
evaluation seed, and kept in the user cache (:func:`distillkit.references.teacher`); its test accuracy and
whether it was read back or trained are recorded with every result (``details.teacher`` in eval.json).
Under torchrun a rank that finds no cached teacher trains it (every such rank the same network, written
atomically): on many GPUs, train it once first (one process, or ``--runs 1``).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distillkit import references
from distillkit.engine import BatchLoss, TrainingProtocol
from distillkit.errors import UsageError
from distillkit.interfaces import DataContext, Evaluation, ImageSpec, ModelBuilder, TrainingSet

#: the settings a soft-label protocol adds to its hard-label counterpart's
LABEL_SETTINGS = ("labels", "teacher", "teacher_epochs", "temperature")


def teacher_loss(teacher: nn.Module, temperature: float) -> BatchLoss:
    """KL(teacher || evaluator) of the batch's images at ``temperature``, the mean over each run's batch."""
    def loss(logits: Tensor, images: Tensor, labels: Tensor, mix: tuple[Tensor, Tensor] | None) -> Tensor:
        with torch.no_grad():
            target = F.softmax(teacher(images.flatten(0, 1)) / temperature, dim=1)
        per_image = F.kl_div(F.log_softmax(logits / temperature, dim=1), target, reduction="none").sum(1)
        return per_image.view(labels.shape).mean(1).sum()
    return loss


@dataclass(frozen=True)
class SoftLabelProtocol(TrainingProtocol):
    """A :class:`TrainingProtocol` whose evaluators learn a teacher's soft labels of every training batch, after
    augmentation and CutMix: KL(teacher || evaluator) of both predictions softened by ``temperature`` (DD-Ranking's
    loss, T = 1.2); the set's own labels are not used.

    ``teacher`` names the teacher's architecture (any evaluator name); it trains ``teacher_epochs`` epochs on the
    full training split under this recipe with hard labels, as run 0 of the evaluation seed, once: it is cached
    in ``~/.cache/distillkit/references`` (``$DISTILLKIT_REFERENCE_CACHE``), and every result records its test
    accuracy and whether it was read back (``details.teacher.cache``: ``hit`` or ``trained``).
    """

    teacher: str = "convnet3"
    teacher_epochs: int = 50
    temperature: float = 1.2

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.teacher_epochs < 1:
            raise UsageError(f"teacher_epochs must be positive, got {self.teacher_epochs}")
        if self.temperature <= 0:
            raise UsageError(f"temperature must be positive, got {self.temperature}")

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "labels": "teacher", "teacher": self.teacher,
                "teacher_epochs": self.teacher_epochs, "temperature": self.temperature}

    def hard_labels(self) -> TrainingProtocol:
        """The same recipe with the set's own labels: its settings are these less :data:`LABEL_SETTINGS`."""
        base = {f.name: getattr(self, f.name) for f in fields(TrainingProtocol)}
        return TrainingProtocol(**{**base, "name": f"{self.name}:hard-labels"})

    def teacher_recipe(self) -> TrainingProtocol:
        """How the teacher is trained: the hard-label counterpart for ``teacher_epochs`` epochs."""
        return self.hard_labels().with_overrides(epochs=self.teacher_epochs)

    def evaluate(self, model: ModelBuilder, train: TrainingSet, test: TrainingSet, spec: ImageSpec,
                 run_ids: Sequence[int], seed: int, device: torch.device | str,
                 data: DataContext | None = None) -> Evaluation:
        if data is None:
            raise UsageError(f"protocol {self.name!r} needs the data context: its teacher trains on the training split")
        net, info = references.teacher(self.teacher_recipe(), data.model(self.teacher), data, test, seed)
        accuracies = self._evaluate(model, train, test, spec, run_ids, seed, device,
                                    teacher_loss(net, self.temperature))
        return Evaluation(accuracies, {"teacher": info})
