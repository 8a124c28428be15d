"""Seconds per condense iteration of M3D vs DM at the same dataset, IPC and real batch.

Variants, each timed through :class:`distillkit.condense.Condenser` (the real loop):

* ``dm``: the ``dm`` method.
* ``dm+mmd``: ``dm`` with the ``mmd`` objective: the cost of the objective alone.
* ``m3d``: the ``m3d`` method (factor 2, one optimizer step per class, encoder redrawn every 5 iterations).
* ``m3d/step=iteration``: ``m3d`` with one batched step per iteration: the cost of the per-class schedule.

A second table times the objectives alone (forward + backward) on random
features of the shapes one iteration hands them: ``mean`` over all classes at
once (DM) and ``mmd`` once per class on ``4 * IPC`` decoded images (M3D).

Iterations are timed round-robin over the variants, so a load change on a shared
machine hits all of them alike; the mean over ``--iterations`` (default 5, one
full encoder period) is reported, with the ratio to ``dm`` at the same IPC.

    python -m benchmarks.m3d_vs_dm [--ipc 1 10] [--batch-real 256] [--iterations 5] [--device auto]
"""

from __future__ import annotations

import argparse
import statistics

import torch

from benchmarks.common import print_table, timed, write_report
from distillkit import registry
from distillkit.condense import Condenser
from distillkit.devices import resolve_device
from distillkit.config import resolve
from distillkit.data import load_split, resolve_root

VARIANTS = {
    "dm": ("dm", {}),
    "dm+mmd": ("dm", {"objective": "mmd"}),
    "m3d": ("m3d", {}),
    "m3d/step=iteration": ("m3d", {"step": "iteration"}),
}


def objective_cost(name: str, ipc: int, dim: int, batch_real: int, classes: int, device: torch.device,
                   repeats: int = 5) -> dict:
    """Seconds per iteration of ``name`` alone: DM's one call over all classes, M3D's one call per class."""
    per_class = name == "mmd"
    k, calls, n_s = (1, classes, 4 * ipc) if per_class else (classes, 1, ipc)
    g = torch.Generator().manual_seed(0)
    real = torch.randn(k, batch_real, dim, generator=g).to(device)
    syn = torch.randn(k, n_s, dim, generator=g).to(device).requires_grad_()
    objective = registry.create("objectives", name)

    def iteration() -> None:
        for _ in range(calls):
            objective(real, syn).sum().backward()

    seconds = timed(iteration, device, repeats)[0]
    return {"objective": name, "ipc": ipc, "calls": calls, "shape_real": list(real.shape),
            "shape_syn": list(syn.shape), "s_per_iter": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", default="mnist")
    parser.add_argument("--ipc", type=int, nargs="+", default=[1, 10])
    parser.add_argument("--batch-real", type=int, default=256)
    parser.add_argument("--iterations", type=int, default=5, help="timed iterations per variant (after 1 warm-up)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    device = resolve_device(args.device)
    registry.load_plugins()
    real = load_split(registry.create("datasets", args.dataset), resolve_root(), train=True, device=device)
    rows, objective_rows = [], []
    for ipc in args.ipc:
        condensers = {}
        for name in args.variants:
            method, overrides = VARIANTS[name]
            cfg = resolve(registry.create("methods", method), args.dataset, ipc,
                          {"batch_real": args.batch_real, "seed": args.seed, **overrides})
            condensers[name] = Condenser(cfg, real, device)
            condensers[name].initialize()
        times: dict[str, list[float]] = {name: [] for name in condensers}
        for name, condenser in condensers.items():  # warm-up
            timed(condenser.run_iteration, device, repeats=1, warmup=0)
        for _ in range(args.iterations):
            for name, condenser in condensers.items():
                times[name].append(timed(condenser.run_iteration, device, repeats=1, warmup=0)[0])
        base = statistics.mean(times["dm"]) if "dm" in times else None
        for name, condenser in condensers.items():
            cfg = condenser.cfg
            mean = statistics.mean(times[name])
            rows.append({
                "variant": name, "ipc": ipc, "batch_real": cfg.batch_real,
                "syn_per_class": condenser.param.images_per_class if cfg.batch_syn is None
                else min(cfg.batch_syn, condenser.param.images_per_class),
                "step": cfg.step, "s_per_iter": mean, "median_s": statistics.median(times[name]),
                "ratio_to_dm": mean / base if base else None, "times": times[name],
                "config": {k: cfg.as_dict()[k] for k in ("method", "objective", "parameterization", "sampler",
                                                        "augment", "augment_strategy", "batch_syn")},
            })
            print(f"ipc {ipc} {name}: {mean:.3f} s/iter", flush=True)
        dim = condensers[args.variants[0]].sampler.extractor(0)(real.images[:1]).shape[1]
        objective_rows += [objective_cost(name, ipc, dim, args.batch_real, real.spec.num_classes, device)
                           for name in ("mean", "mmd")]
    print_table(rows, ["variant", "ipc", "batch_real", "syn_per_class", "step", "s_per_iter", "median_s",
                       "ratio_to_dm"], title=f"M3D vs DM, {args.dataset}, seconds per condense iteration ({device})")
    print_table(objective_rows, ["objective", "ipc", "calls", "shape_real", "shape_syn", "s_per_iter"],
                title="objective alone per iteration, forward + backward")
    path = write_report("m3d_vs_dm", device, rows, {"dataset": args.dataset, "timed_iterations": args.iterations,
                                                     "objective_rows": objective_rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
