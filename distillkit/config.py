"""Run configuration: a method's defaults, overridden by the CLI, recorded whole in the run directory."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Mapping

from distillkit.errors import UsageError
from distillkit.interfaces import Method

#: the components a method names (and options it sets through ``*_options`` and ``ipc_options``)
METHOD_COMPONENTS = ("objective", "parameterization", "sampler")
COMPONENTS = (*METHOD_COMPONENTS, "dataset")
#: the image optimizers (:attr:`Method.optimizer`)
OPTIMIZERS = ("sgd", "adamw")


#: RunConfig fields that change how fast a run computes, not what (speed settings): ``--resume`` may change them
SPEED_FIELDS = ("checkpoint_every", "log_every", "real_chunk", "forward_batch", "channels_last", "deterministic")


@dataclass(frozen=True)
class RunConfig:
    """Everything that determines a distillation run (with the seed, the whole result)."""

    method: str
    dataset: str
    ipc: int
    objective: str
    parameterization: str
    sampler: str
    augment: str
    augment_strategy: str
    lr_img: float
    momentum: float
    iterations: int
    batch_real: int
    batch_syn: int | None
    step: str
    seed: int = 0
    # defaults: what every run wrote before the optimizer could be chosen, so their configs still load
    optimizer: str = "sgd"
    weight_decay: float = 0.0
    dataset_options: Mapping[str, Any] = field(default_factory=dict)
    objective_options: Mapping[str, Any] = field(default_factory=dict)
    parameterization_options: Mapping[str, Any] = field(default_factory=dict)
    sampler_options: Mapping[str, Any] = field(default_factory=dict)
    # A checkpoint holds the parameters and their momentum (2x the stored set): every 100 iterations
    # is seconds of work on a GPU (0.5% of DM's 20k iterations) and cheap I/O even at IPC 50.
    checkpoint_every: int = 100
    log_every: int = 10
    #: classes per batched forward, real and synthetic (None: all at once; lower it to bound memory)
    real_chunk: int | None = None
    #: images per extractor call (None: automatic, see Condenser.forward_batch); same features
    forward_batch: int | None = None
    #: bf16 autocast for the extractor, on CUDA or a CPU with bf16 instructions (changes numerics slightly)
    amp: bool = False
    #: channels-last memory format for extractor inputs (faster convolutions on CUDA)
    channels_last: bool = False
    #: torch's deterministic algorithms (bit-identical reruns on CUDA; see distillkit.devices.set_deterministic)
    deterministic: bool = False

    def as_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self)))

    def recipe(self) -> dict[str, Any]:
        """:meth:`as_dict` without the :data:`SPEED_FIELDS`: what decides the result."""
        return {k: v for k, v in self.as_dict().items() if k not in SPEED_FIELDS}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "RunConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise UsageError(f"config has unknown keys {unknown}")
        return cls(**data)

    def check_names(self) -> None:
        """Fail on an unknown component or dataset name before any data is loaded or file written."""
        from distillkit import registry

        for kind, name in (("objectives", self.objective), ("parameterizations", self.parameterization),
                           ("samplers", self.sampler), ("datasets", self.dataset)):
            registry.plugins()[kind].get(name)


def lr_for_ipc(lr: float | Mapping[int, float], ipc: int) -> float:
    """A method's image learning rate at ``ipc``: a number, or the entry with the largest key <= ipc."""
    if not isinstance(lr, Mapping):
        return float(lr)
    keys = sorted(int(k) for k in lr)
    chosen = max((k for k in keys if k <= ipc), default=keys[0])
    return float(lr[chosen])


def options_for_ipc(ipc_options: Mapping[int, Mapping[str, Mapping[str, Any]]], ipc: int
                    ) -> Mapping[str, Mapping[str, Any]]:
    """A method's IPC-dependent component options at ``ipc``: the entry with the largest key <= ipc, or none."""
    keys = [k for k in ipc_options if k <= ipc]
    return ipc_options[max(keys)] if keys else {}


def parse_value(text: str) -> Any:
    """``--set`` values: JSON where it parses (numbers, lists, true/null), else the plain string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_sets(items: tuple[str, ...] | list[str], components: tuple[str, ...] = COMPONENTS
               ) -> dict[str, dict[str, Any]]:
    """``["objective.kernel=linear", "sampler.period=10"]`` -> ``{"objective": {"kernel": "linear"}, ...}``."""
    out: dict[str, dict[str, Any]] = {c: {} for c in components}
    for item in items:
        key, eq, value = item.partition("=")
        component, dot, option = key.partition(".")
        if not eq or not dot or not option:
            raise UsageError(f"--set {item!r}: expected COMPONENT.OPTION=VALUE, e.g. objective.kernel=linear")
        if component not in out:
            raise UsageError(f"--set {item!r}: unknown component {component!r}; choose one of: {', '.join(components)}")
        out[component][option] = parse_value(value)
    return out


def resolve(method: Method, dataset: str, ipc: int, overrides: Mapping[str, Any],
            options: Mapping[str, Mapping[str, Any]] | None = None) -> RunConfig:
    """Method defaults <- CLI overrides (``None`` means "not given") <- ``--set`` component options."""
    if ipc <= 0:
        raise UsageError(f"--ipc must be a positive number of images per class, got {ipc}")
    given = {k: v for k, v in overrides.items() if v is not None}
    options = options or {}
    values: dict[str, Any] = {
        "method": method.name, "dataset": dataset, "ipc": ipc,
        "augment": method.augment, "augment_strategy": method.augment_strategy,
        "lr_img": lr_for_ipc(method.lr_img, ipc), "momentum": method.momentum, "iterations": method.iterations,
        "batch_real": method.batch_real, "batch_syn": method.batch_syn, "step": method.step,
        "optimizer": method.optimizer, "weight_decay": method.weight_decay,
    }
    at_ipc = options_for_ipc(method.ipc_options, ipc)
    for component in at_ipc:
        if component not in METHOD_COMPONENTS:
            raise UsageError(f"method {method.name!r}: ipc_options names component {component!r}; choose one of: "
                             f"{', '.join(METHOD_COMPONENTS)}")
    for component in METHOD_COMPONENTS:
        name = given.pop(component, None) or getattr(method, component)
        defaults = ({**getattr(method, f"{component}_options"), **at_ipc.get(component, {})}
                    if name == getattr(method, component) else {})
        values[component] = name
        values[f"{component}_options"] = {**defaults, **options.get(component, {})}
    values["dataset_options"] = dict(options.get("dataset", {}))
    values.update(given)
    cfg = RunConfig(**values)
    for name in ("iterations", "batch_real", "checkpoint_every", "log_every"):
        if getattr(cfg, name) < (0 if name == "iterations" else 1):
            raise UsageError(f"--{name.replace('_', '-')} must be positive, got {getattr(cfg, name)}")
    for key in ("real_chunk", "forward_batch", "batch_syn"):
        value = getattr(cfg, key)
        if value is not None and value < 1:
            raise UsageError(f"--{key.replace('_', '-')} must be positive, got {value}")
    if not (math.isfinite(cfg.lr_img) and cfg.lr_img >= 0):
        raise UsageError(f"--lr-img must be a finite number >= 0, got {cfg.lr_img}")
    if not (math.isfinite(cfg.momentum) and 0 <= cfg.momentum < 1):
        raise UsageError(f"--momentum must be in [0, 1), got {cfg.momentum}")
    if cfg.step not in ("iteration", "class"):
        raise UsageError(f"unknown step schedule {cfg.step!r}; choose one of: iteration, class")
    if cfg.optimizer not in OPTIMIZERS:
        raise UsageError(f"unknown optimizer {cfg.optimizer!r}; choose one of: {', '.join(OPTIMIZERS)}")
    if not (math.isfinite(cfg.weight_decay) and cfg.weight_decay >= 0):
        raise UsageError(f"--weight-decay must be a finite number >= 0, got {cfg.weight_decay}")
    if cfg.step == "class" and (cfg.optimizer != "sgd" or cfg.weight_decay):
        # the schedule's closed form (Condenser) is that of momentum SGD, linear in the gradients
        raise UsageError(f"--step class needs --optimizer sgd without weight decay, got --optimizer "
                         f"{cfg.optimizer} --weight-decay {cfg.weight_decay}; use --step iteration")
    return cfg
