"""Features as extractors return them: one tensor ``(N, d)``, or named tensors ``{name: (N, ...)}``.

Several named outputs let a method match more than one thing per image (each block's activations and
the final embedding, an embedding and the classifier's logits); the condense loop treats both forms
alike through these helpers: batches concatenated per name, reshaped per name to ``(K, n, ...)``, sliced
per name for a block of classes. An objective receives the form its extractor returns.
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence, Union

import torch
from torch import Tensor

#: what an extractor returns and an objective receives (with the class and sample dimensions in front)
Features = Union[Tensor, Mapping[str, Tensor]]


def map_features(fn: Callable[[Tensor], Tensor], features: Features) -> Features:
    """``fn`` applied to the tensor, or to each named tensor (names kept)."""
    if isinstance(features, Mapping):
        return {name: fn(value) for name, value in features.items()}
    return fn(features)


def cat_features(pieces: Sequence[Features]) -> Features:
    """Batches of features concatenated along the first dimension (per name)."""
    if isinstance(pieces[0], Mapping):
        return {name: torch.cat([p[name] for p in pieces]) for name in pieces[0]}
    return torch.cat(list(pieces))


def per_class(features: Features, classes: int, samples: int) -> Features:
    """``(classes * samples, ...)`` -> ``(classes, samples, ...)`` per name; a plain tensor becomes
    ``(classes, samples, d)`` (its trailing dimensions flattened, as the interface promises ``(N, d)``)."""
    if isinstance(features, Mapping):
        return {name: v.view(classes, samples, *v.shape[1:]) for name, v in features.items()}
    return features.view(classes, samples, -1)


def any_tensor(features: Features) -> Tensor:
    return next(iter(features.values())) if isinstance(features, Mapping) else features


def shape_problem(features: object, rows: int) -> str | None:
    """Why ``features`` is not what an extractor may return for ``rows`` images (None: it is)."""
    if isinstance(features, Tensor):
        return None if features.dim() == 2 and len(features) == rows else "a tensor"
    if isinstance(features, Mapping) and features:
        for name, value in features.items():
            if not isinstance(name, str) or not isinstance(value, Tensor) or value.dim() < 2 or len(value) != rows:
                return f"entry {name!r}"
        return None
    return "not a tensor"


def describe_shape(features: object) -> str:
    if isinstance(features, Tensor):
        return str(tuple(features.shape))
    if isinstance(features, Mapping):
        return "{" + ", ".join(f"{k!r}: {tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__}"
                               for k, v in features.items()) + "}"
    return type(features).__name__
