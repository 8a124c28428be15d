"""Test components that break their interface on purpose (loaded with ``--plugins-dir tests/plugins``).

``fault`` chooses how: the objective ``faulty`` returns ``features`` ((K, d) instead of (K,)), a ``scalar``,
``nan`` losses, or ``raise``s; the parameterization ``faulty`` (DM's ``pixel`` underneath) decodes one image
too few per class (``short``) or raises in ``decode``; the sampler ``faulty`` returns (N, 2, d) features
(``3d``), raises in its forward (``raise``), or its factory raises (``factory``); the protocol ``faulty``
raises in ``evaluate``.
"""

import torch

from distillkit import hookimpl, registry
from distillkit.models import RandomEmbedder


class FaultyObjective:
    def __init__(self, fault="features"):
        self.fault = fault

    def __call__(self, real, syn):
        gap = (real.mean(1) - syn.mean(1)).pow(2)
        if self.fault == "raise":
            raise ZeroDivisionError("the objective divided by zero")
        if self.fault == "scalar":
            return gap.sum()
        if self.fault == "nan":
            return gap.sum(-1) * float("nan")
        return gap  # (K, d)


class FaultyParameterization:
    def __init__(self, spec, ipc, device, fault="short"):
        self.inner = registry.create("parameterizations", "pixel", {"spec": spec, "ipc": ipc, "device": device})
        self.fault, self.images_per_class = fault, self.inner.images_per_class

    def decode(self, classes):
        if self.fault == "raise":
            raise KeyError("no such class")
        return self.inner.decode(classes)[:, :-1]

    def __getattr__(self, name):  # everything else as pixel's
        return getattr(self.inner, name)


class FaultySampler:
    def __init__(self, spec, seed, device, fault="3d", model="convnet3_w32"):
        if fault == "factory":
            raise RuntimeError("cannot build the network")
        self.seed, self.fault, self.embedder = seed, fault, RandomEmbedder(model, spec, device)

    def extractor(self, iteration):
        extract = self.embedder.draw(self.seed, "faulty", iteration)
        if self.fault == "raise":
            def broken(x):
                raise IndexError("feature index out of range")
            return broken
        return lambda x: torch.stack([extract(x)] * 2, dim=1)

    def redraws_at(self, iteration):
        return True


class FaultyProtocol:
    name = "faulty"

    def settings(self):
        return {}

    def speed_settings(self, device):
        return {}

    def for_dataset(self, dataset):
        return self

    def with_overrides(self, **overrides):
        return self

    def evaluate(self, model, train, test, spec, run_ids, seed, device, data):
        raise AttributeError("'NoneType' object has no attribute 'weight'")


@hookimpl
def register_protocols(register):
    register("faulty", FaultyProtocol())


@hookimpl
def register_objectives(register):
    register("faulty", FaultyObjective)


@hookimpl
def register_parameterizations(register):
    register("faulty", FaultyParameterization)


@hookimpl
def register_samplers(register):
    register("faulty", FaultySampler)
