"""A test protocol plugin (loaded with ``--plugins-dir tests/plugins``): nearest class mean, no training.

Options (``distillkit evaluate --set protocol.OPTION=VALUE``): ``metric`` (euclidean or cosine) and
``means_from`` (``synthetic``: the set being evaluated; ``train``: the full real training split, taken from
the host's data context). Appends the model of every call to ``$DISTILLKIT_TEST_CALLS`` when that is set,
and stands in for Ctrl-C (KeyboardInterrupt) when called for the model named by
``$DISTILLKIT_TEST_INTERRUPT_AT``.
"""

import dataclasses
import os

import torch

from distillkit import hookimpl
from distillkit.errors import UsageError

METRICS = ("euclidean", "cosine")
SOURCES = ("synthetic", "train")


@dataclasses.dataclass(frozen=True)
class NearestMean:
    metric: str = "euclidean"
    means_from: str = "synthetic"
    name: str = "nearest-mean"

    def settings(self):
        return {"space": "pixels", "metric": self.metric, "means_from": self.means_from}

    def speed_settings(self, device):
        return {}

    def for_dataset(self, dataset):
        return self

    def with_overrides(self, **overrides):
        given = {k: v for k, v in overrides.items() if v is not None}
        unknown = sorted(set(given) - {"metric", "means_from"})
        if unknown:
            raise UsageError(f"nearest-mean has no option {unknown[0]!r}; choose from: metric, means_from")
        if given.get("metric", self.metric) not in METRICS:
            raise UsageError(f"nearest-mean: unknown metric {given['metric']!r}; choose one of: {', '.join(METRICS)}")
        if given.get("means_from", self.means_from) not in SOURCES:
            raise UsageError(f"nearest-mean: unknown means_from {given['means_from']!r}; choose one of: "
                             f"{', '.join(SOURCES)}")
        return dataclasses.replace(self, **given)

    def evaluate(self, model, train, test, spec, run_ids, seed, device, data):
        if model.name == os.environ.get("DISTILLKIT_TEST_INTERRUPT_AT"):
            raise KeyboardInterrupt
        if os.environ.get("DISTILLKIT_TEST_CALLS"):
            with open(os.environ["DISTILLKIT_TEST_CALLS"], "a") as log:
                log.write(model.name + "\n")
        if self.means_from == "train":
            real = data.train()
            means = torch.stack([real.class_images(c).mean(0) for c in range(spec.num_classes)])
        else:
            means = torch.stack([train.images[train.labels == c].mean(0) for c in range(spec.num_classes)])
        means, queries = means.flatten(1), test.images.flatten(1)
        if self.metric == "cosine":
            guess = (torch.nn.functional.normalize(queries, dim=1) @ torch.nn.functional.normalize(means, dim=1).T
                     ).argmax(1)
        else:
            guess = torch.cdist(queries, means).argmin(1)
        return [float((guess == test.labels).double().mean() * 100)] * len(run_ids)


@hookimpl
def register_protocols(register):
    register("nearest-mean", NearestMean())
