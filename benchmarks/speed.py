"""Seconds per condense iteration and peak memory of the methods (DM, M3D, IDM, DataDAM, NCFM), with the
ratios between variants.

Every variant runs through :class:`distillkit.condense.Condenser` (the real loop). For each input
(MNIST-size 1x28x28 real MNIST; CIFAR-size 3x32x32 generated ``fake`` data) and IPC, the variants'
iterations are timed round-robin, so load changes on a shared machine hit all of them alike; the
median over ``--iterations`` (after one warm-up) is reported with ratios:

* ``ratio_to_dm``: each variant against ``dm`` at the same input and IPC (target: ``m3d`` <= 1.2);
* ``ratio_to_default``: a variant against its method's defaults, i.e. what one speed measure buys:
  ``per-class-real`` (``real_chunk=1``: one real forward per class, the reference codes' shape),
  ``one-call-real`` (``forward_batch`` unlimited: all real images in one extractor call, the default on
  GPUs), ``amp`` (bf16 autocast), ``channels-last``, ``sampling-net`` (NCFM's learnt frequencies).

Peak memory: CUDA's ``max_memory_allocated`` per variant (one untimed pass each); on the CPU only the
process's peak RSS is meaningful, reported once.

    python -m benchmarks.speed [--inputs mnist cifar-size] [--ipc 1 10 50] [--batch-real 256]
                               [--iterations 3] [--device auto]
"""

from __future__ import annotations

import argparse
import resource
import statistics

import torch

from benchmarks.common import print_table, provenance, timed, with_earlier_rows, write_report
from distillkit import registry
from distillkit.condense import Condenser
from distillkit.devices import resolve_device
from distillkit.config import parse_sets, resolve
from distillkit.data import load_split, resolve_root

INPUTS = {"mnist": ("mnist", []), "cifar-size": ("fake", ["dataset.per_class=300", "dataset.test_per_class=10"])}

#: name -> (method, overrides); a name "METHOD/..." is compared with METHOD's defaults
VARIANTS = {
    "dm": ("dm", {}),
    "dm/per-class-real": ("dm", {"real_chunk": 1}),
    "dm/one-call-real": ("dm", {"forward_batch": 10**9}),
    "dm/amp": ("dm", {"amp": True}),
    "dm/channels-last": ("dm", {"channels_last": True}),
    "m3d": ("m3d", {}),
    "m3d/per-class-real": ("m3d", {"real_chunk": 1}),
    "m3d/one-call-real": ("m3d", {"forward_batch": 10**9}),
    "dm+mmd": ("dm", {"objective": "mmd"}),
    "m3d/step=iteration": ("m3d", {"step": "iteration"}),
    "idm": ("idm", {}),
    "datadam": ("datadam", {}),
    "ncfm": ("ncfm", {}),
    "ncfm/sampling-net": ("ncfm", {}),
}
#: name -> component options (``--set``) of a variant. NCFM pretrains its extractors before the first
#: iteration (20 x 60 epochs by default); one short epoch of each changes no iteration's cost.
VARIANT_SETS = {
    "ncfm": ["sampler.epochs=1", "sampler.train_images=1024"],
    "ncfm/sampling-net": ["sampler.epochs=1", "sampler.train_images=1024", "objective.sampling_net=true"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--inputs", nargs="+", default=list(INPUTS), choices=list(INPUTS))
    parser.add_argument("--ipc", type=int, nargs="+", default=[1, 10, 50])
    parser.add_argument("--batch-real", type=int, default=256)
    parser.add_argument("--iterations", type=int, default=3, help="timed iterations per variant (after 1 warm-up)")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS),
                        default=["dm", "dm/per-class-real", "dm/one-call-real", "dm/amp", "m3d"])
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

    device = resolve_device(args.device)
    registry.load_plugins()
    rows = []
    for input_name in args.inputs:
        dataset, sets = INPUTS[input_name]
        spec = registry.create("datasets", dataset, **parse_sets(sets)["dataset"])
        real = load_split(spec, resolve_root(), train=True, device=device)
        for ipc in args.ipc:
            condensers = {}
            variants = [v for v in args.variants  # bf16 on a CPU without bf16 instructions is refused
                        if not (VARIANTS[v][1].get("amp") and device.type == "cpu"
                                and not torch.ops.mkldnn._is_mkldnn_bf16_supported())]
            for name in variants:
                method, overrides = VARIANTS[name]
                # every variant matches real batches: M3D's own default is 128, DM's 256
                cfg = resolve(registry.create("methods", method), dataset, ipc,
                              {"batch_real": args.batch_real, **overrides},
                              parse_sets([*sets, *VARIANT_SETS.get(name, [])]))
                condensers[name] = Condenser(cfg, real, device)
                condensers[name].initialize()
            peaks = {}
            for name, condenser in condensers.items():  # warm-up, and the peak memory of one iteration
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                timed(condenser.run_iteration, device, repeats=1, warmup=0)
                peaks[name] = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
            times: dict[str, list[float]] = {name: [] for name in condensers}
            for _ in range(args.iterations):
                for name, condenser in condensers.items():
                    times[name].append(timed(condenser.run_iteration, device, repeats=1, warmup=0)[0])
            median = {name: statistics.median(t) for name, t in times.items()}
            for name, condenser in condensers.items():
                method = VARIANTS[name][0]
                default = median.get(method) if "/" in name else None
                rows.append({
                    "input": input_name, "ipc": ipc, "variant": name, "batch_real": condenser.batch_real,
                    "syn_per_class": min(condenser.param.images_per_class, condenser.cfg.batch_syn or 10**9),
                    "s_per_iter": median[name], "ratio_to_dm": median[name] / median["dm"] if "dm" in median else None,
                    "ratio_to_default": median[name] / default if default else None,
                    "peak_mib": peaks[name], "times": times[name], "timed_with": list(condensers), **provenance(),
                })
                print(f"{input_name} ipc {ipc} {name}: {median[name]:.3f} s/iter", flush=True)
    peak_rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print_table(rows, ["input", "ipc", "variant", "batch_real", "syn_per_class", "s_per_iter", "ratio_to_dm",
                       "ratio_to_default", "peak_mib"],
                title=f"seconds per condense iteration ({device}); process peak RSS {peak_rss_mib:.0f} MiB")
    # rows of earlier runs of other variant sets are kept, each set with its own dm row (ratios are within a run)
    rows = with_earlier_rows("speed", device, rows, lambda r: (r["input"], r["ipc"], r["variant"], r["batch_real"],
                                                               tuple(r.get("timed_with", ()))))
    path = write_report("speed", device, rows, {"timed_iterations": args.iterations,
                                                "process_peak_rss_mib": peak_rss_mib})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
