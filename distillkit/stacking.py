"""Several networks of one architecture trained as one: the engine's stacked and run-by-run paths.

:class:`StackedRuns` stacks the parameters and buffers of ``R`` networks with
``torch.func.stack_module_state`` and runs one ``vmap``-ed ``functional_call`` over them, so one
optimizer step trains all ``R``; :class:`SingleRun` is one plain network behind the same interface.
Batch-norm running statistics are stacked buffers that each run updates in place under vmap.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn
from torch.func import functional_call, stack_module_state

from distillkit.seeding import seeded


class StackedRuns:
    """``R`` networks of one architecture as one vmapped functional model: ``(R, B, ...) -> (R, B, classes)``."""

    def __init__(self, models: list[nn.Module], compile: bool) -> None:
        params, buffers = stack_module_state(models)
        self.runs = len(models)
        self.params = {k: v.detach().requires_grad_(True) for k, v in params.items()}
        self.buffers = buffers  # batch-norm statistics: one slice per run, updated in place under vmap
        self.base = copy.deepcopy(models[0]).to("meta")  # structure only; every tensor comes from the stacks
        step = torch.vmap(self._call, randomness="different")
        self._step = torch.compile(step) if compile else step

    def _call(self, params: dict[str, Tensor], buffers: dict[str, Tensor], x: Tensor) -> Tensor:
        return functional_call(self.base, (params, buffers), (x,))

    def check(self, shape: tuple[int, ...]) -> str | None:
        """Why these runs cannot train stacked (None if they can), from no-grad forwards of ``shape`` inputs.

        vmap must run the forward, and the training forward must draw no random numbers: under vmap,
        dropout-like layers draw every run's masks from one global stream, so a run's result would
        depend on which runs share its stack.
        """
        xs = torch.randn(self.runs, *shape, generator=torch.Generator().manual_seed(0))
        xs = xs.to(next(iter(self.params.values())).device)
        outputs = []
        for draw in range(2):
            scratch = {k: v.clone() for k, v in self.buffers.items()}  # leave the real statistics untouched
            try:
                with torch.no_grad(), seeded(draw, "stack-check", device=xs.device):
                    outputs.append(torch.vmap(self._call, randomness="different")(self.params, scratch, xs))
            except Exception as exc:  # vmap raises several types for unsupported forwards
                return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        if not torch.equal(*outputs):
            return "its training forward draws random numbers (dropout?), which stacked runs would share"
        return None

    def parameters(self) -> list[Tensor]:
        return list(self.params.values())

    def train(self, mode: bool) -> None:
        self.base.train(mode)

    def forward(self, xs: Tensor) -> Tensor:
        return self._step(self.params, self.buffers, xs)

    def forward_run(self, r: int, x: Tensor) -> Tensor:
        """Run ``r`` alone on ``x`` (test time: large batches, no vmap needed)."""
        return self._call({k: v[r] for k, v in self.params.items()}, {k: v[r] for k, v in self.buffers.items()}, x)


class SingleRun:
    """One plain network behind the same interface (``R = 1``): the run-by-run path."""

    def __init__(self, model: nn.Module, compile: bool) -> None:
        self.model = model
        self._step = torch.compile(model) if compile else model

    def parameters(self) -> list[Tensor]:
        return list(self.model.parameters())

    def train(self, mode: bool) -> None:
        self.model.train(mode)

    def forward(self, xs: Tensor) -> Tensor:
        return self._step(xs[0]).unsqueeze(0)

    def forward_run(self, r: int, x: Tensor) -> Tensor:
        return self.model(x)
