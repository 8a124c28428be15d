"""DataDAM's components, built only on distillkit's interfaces.

* :class:`AttentionConvNetSampler` (``attention-convnet``): DM's random network per iteration, returning
  the post-ReLU maps of every block but the last beside the final embedding (named features).
* :class:`AttentionMatchingObjective` (``attention-matching``): per class, the squared gap between the mean
  real and mean synthetic spatial attention of each tapped layer, plus the squared gap of the mean
  embeddings (the linear-kernel MMD, DM's loss), weighted as the reference weights them.
"""

from __future__ import annotations

from typing import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distillkit.errors import UsageError
from distillkit.interfaces import ImageSpec
from distillkit.models import RandomEmbedder, layer_names


def spatial_attention(maps: Tensor, power: float) -> Tensor:
    """DataDAM's attention of activation maps ``(..., C, H, W)``: ``sum_c |a_c|^power`` per position,
    flattened and L2-normalised per sample, ``(..., H * W)`` (reference ``utils.py`` ``get_attention`` with
    ``param=1`` and ``norm='l2'``)."""
    # one fused reduction (no |a| or |a|^p copy of the maps): sum_c |a_c|^p = ||a||_p^p over channels
    attention = torch.linalg.vector_norm(maps, ord=power, dim=-3).pow(power).flatten(-2)
    return F.normalize(attention, dim=-1)


def mean_gap(real: Tensor, syn: Tensor) -> Tensor:
    """``|mean(real) - mean(syn)|^2`` per class over the flattened trailing dimensions: ``(K, n, ...) -> (K,)``
    (the reference's ``MSE_B``)."""
    return (real.mean(1) - syn.mean(1)).flatten(1).pow(2).sum(1)


class AttentionMatchingObjective:
    """``attention_weight * sum_layers |mean attention(real) - mean attention(syn)|^2 + embedding_weight *
    |mean embedding(real) - mean embedding(syn)|^2`` per class.

    Reference (DataDistillation/DataDAM ``main_DataDAM.py`` l.299-313): 100 per attention layer, and
    ``100 * task_balance`` = 1 on the embedding (``task_balance`` 0.01); ``power`` 1 is the code's
    ``exp`` (the paper's table gives p = 4). Needs the named features of ``attention-convnet``:
    every entry but ``embedding`` is an activation map ``(K, n, C, H, W)``.
    """

    def __init__(self, power: float = 1.0, attention_weight: float = 100.0, embedding_weight: float = 1.0) -> None:
        for name, value in (("power", power), ("attention_weight", attention_weight),
                            ("embedding_weight", embedding_weight)):
            if not isinstance(value, (int, float)) or value < 0 or (name == "power" and value == 0):
                raise UsageError(f"attention-matching {name} must be a number > 0 (weights: >= 0), got {value!r}")
        self.power, self.attention_weight, self.embedding_weight = float(power), attention_weight, embedding_weight

    def __call__(self, real: Mapping[str, Tensor], syn: Mapping[str, Tensor]) -> Tensor:
        if not isinstance(syn, Mapping) or "embedding" not in syn or len(syn) < 2:
            raise UsageError("objective 'attention-matching' needs named features (activation maps and "
                             "'embedding'): use --sampler attention-convnet (the datadam method's default)")
        loss = self.embedding_weight * mean_gap(real["embedding"], syn["embedding"])
        for name, maps in syn.items():
            if name != "embedding":
                loss = loss + self.attention_weight * mean_gap(spatial_attention(real[name], self.power),
                                                               spatial_attention(maps, self.power))
        return loss


class AttentionConvNetSampler:
    """A new randomly initialised ``model`` every iteration (the network keyed ``("encoder", iteration)``,
    exactly DM's ``random-convnet``), returning named features: the output of every ReLU but the last
    (post-activation, before pooling: ConvNet-3's blocks 1 and 2), keyed by module name, and
    ``embedding``, the flattened final feature map (reference ``main_DataDAM.py`` l.151-177, 290-301:
    forward hooks on each ``nn.ReLU`` of ``net.features``; the last block enters through the embedding).
    """

    def __init__(self, spec: ImageSpec, seed: int, device: torch.device, model: str = "convnet3") -> None:
        self.seed = seed
        self.taps = layer_names(model, spec, nn.ReLU)[:-1]
        if not self.taps:
            raise UsageError(f"attention-convnet: model {model!r} has fewer than two ReLU layers to take attention "
                             f"from")
        self._embedder = RandomEmbedder(model, spec, device)

    def extractor(self, iteration: int) -> Callable[[Tensor], dict[str, Tensor]]:
        return self._embedder.draw(self.seed, "encoder", iteration, taps=self.taps)

    def redraws_at(self, iteration: int) -> bool:
        return True
