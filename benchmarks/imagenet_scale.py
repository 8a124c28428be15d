"""ImageNet subsets at scale, on generated data: cache build, start-up with the cache, condense cost and memory.

A generated Imagenette tree (10 classes x ``--per-class`` JPEGs of ImageNet's typical sizes,
500x375 and the like) stands in for ImageNet, which no session here has. Measured:

* **cache build**: seconds to decode the training split into the cache at each ``--sizes``
  resolution, with 1 and with ``--workers`` decoding processes (a fresh cache each time), and the
  CPU time per image (this process and its workers), which a loaded machine does not inflate;
* **start-up with the cache**: seconds of ``load_split`` once the cache exists (list the folder,
  check the key, memory-map the file), and the process's resident memory after it;
* **condense**: for DM and M3D at each ``--ipc`` and size, seconds per iteration (median of
  ``--iterations`` after one warm-up) and peak memory, each configuration in its own process so
  every peak is its own: peak RSS (``getrusage``; it counts the cache pages the run touched, which
  are the kernel's page cache, not the process's), peak anonymous memory (the process's own,
  sampled from ``/proc/self/status``) and, on CUDA, ``max_memory_allocated``. Real batches are
  ``--batch-real`` per class, ``--real-chunk`` classes per forward and backward (real and synthetic).

The split itself is never resident: compare the peaks with the split's size as float32, what
holding it in memory would cost.

    python -m benchmarks.imagenet_scale [--per-class 100] [--sizes 64 128] [--ipc 1 10] [--batch-real 8]
                                        [--iterations 1] [--workers 2] [--skip 128:m3d:10] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from distillkit import decoded_cache, imagenet

#: ImageNet's common (width, height) shapes: most photos are 500 px on the long side
SHAPES = ((500, 375), (375, 500), (500, 333), (400, 400), (500, 400))


def generate(root: Path, per_class: int, val: int, seed: int = 0) -> Path:
    """An Imagenette-layout tree of JPEGs (quality 90, ImageNet-like sizes): per class a tint over a shifted
    field of blotches and noise, so each file costs JPEG what a photo does, not what flat colour does."""
    rng = np.random.default_rng(seed)
    fields = {}
    for w, h in set(SHAPES):  # one field per shape, drawn once: drawing noise per file would dominate the run
        blotches = np.kron(rng.integers(0, 128, (h // 25 + 1, w // 25 + 1, 3), dtype=np.uint8),
                           np.ones((25, 25, 1), np.uint8))[:h, :w]
        fields[w, h] = blotches + rng.integers(0, 64, (h, w, 3), dtype=np.uint8)
    for label, wnid in enumerate(imagenet.IMAGENETTE):
        tint = rng.integers(0, 64, 3, dtype=np.uint8)
        for split, n in (("train", per_class), ("val", val)):
            folder = root / split / wnid
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                w, h = SHAPES[(i + label) % len(SHAPES)]
                shift = rng.integers(0, min(w, h), 2)
                pixels = np.roll(fields[w, h], tuple(shift), axis=(0, 1)) + tint
                Image.fromarray(pixels).save(folder / f"{wnid}_{i}.JPEG", quality=90)
    return root


class PeakAnonymous:
    """The peak of this process's anonymous resident memory (RssAnon), sampled every 5 ms by a thread."""

    def __init__(self) -> None:
        self.peak_kib = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    @staticmethod
    def now_kib() -> int:
        with open("/proc/self/status") as fh:
            return next(int(line.split()[1]) for line in fh if line.startswith("RssAnon:"))

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak_kib = max(self.peak_kib, self.now_kib())

    def __enter__(self) -> "PeakAnonymous":
        self.peak_kib = self.now_kib()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_kib = max(self.peak_kib, self.now_kib())


def measure_condense(job: dict[str, Any]) -> dict[str, Any]:
    """One configuration, in this (fresh) process: start-up from the cache, then timed condense iterations."""
    import torch

    from benchmarks.common import timed
    from distillkit import registry
    from distillkit.condense import Condenser
    from distillkit.devices import resolve_device
    from distillkit.config import parse_sets, resolve
    from distillkit.data import load_split

    torch.set_num_threads(job["threads"])
    device = resolve_device(job["device"])
    registry.load_plugins()
    options = parse_sets([f"dataset.size={job['size']}"])
    overrides = {"batch_real": job["batch_real"], "real_chunk": job["real_chunk"]}
    cfg = resolve(registry.create("methods", job["method"]), "imagenette", job["ipc"], overrides, options)
    with PeakAnonymous() as anon:
        start = time.perf_counter()
        spec = registry.create("datasets", "imagenette", **options["dataset"])
        real = load_split(spec, Path(job["root"]), train=True, device=device)
        startup_s = time.perf_counter() - start
        after_startup = PeakAnonymous.now_kib()
        condenser = Condenser(cfg, real, device)
        condenser.initialize()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        seconds, times = timed(condenser.run_iteration, device, repeats=job["iterations"], warmup=1)
    return {"startup_s": startup_s, "anon_after_startup_mib": after_startup / 1024, "s_per_iter": seconds,
            "times": times, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "peak_anon_mib": anon.peak_kib / 1024, "decoded_per_class": condenser.param.images_per_class,
            "cuda_peak_mib": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None}


def _cpu_seconds() -> float:
    """CPU time of this process and of its finished children (the decoding workers, once joined)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def in_child(job: dict[str, Any], cache: Path) -> dict[str, Any]:
    env = {**os.environ, "DISTILLKIT_IMAGE_CACHE": str(cache)}
    done = subprocess.run([sys.executable, "-m", "benchmarks.imagenet_scale", "--child", json.dumps(job)],
                          env=env, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--per-class", type=int, default=100, help="training JPEGs per class (10 classes)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--ipc", type=int, nargs="+", default=[1, 10])
    parser.add_argument("--methods", nargs="+", default=["dm", "m3d"])
    parser.add_argument("--batch-real", type=int, default=8)
    parser.add_argument("--real-chunk", type=int, default=2, help="classes per real-feature forward")
    parser.add_argument("--iterations", type=int, default=1, help="timed condense iterations (after 1 warm-up)")
    parser.add_argument("--skip", nargs="*", default=["128:m3d:10"], metavar="SIZE:METHOD:IPC",
                        help="configurations not run (default: M3D IPC 10 at 128 px: its one backward over the "
                             "decoded images of all classes needs more memory than a shared machine can spare; "
                             "the report extrapolates its peak from the rows measured at that size)")
    parser.add_argument("--workers", type=int, default=decoded_cache.available_cpus(), help="decoding processes")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each condense process")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure_condense(json.loads(args.child))))
        return

    import torch

    from benchmarks.common import print_table, write_report
    from distillkit.devices import resolve_device

    device = resolve_device(args.device)
    work = Path(tempfile.mkdtemp(prefix="imagenet_scale-"))
    try:
        start = time.perf_counter()
        root = generate(work / "imagenet", args.per_class, val=10)
        print(f"generated {10 * args.per_class} training JPEGs in {time.perf_counter() - start:.1f} s", flush=True)
        listing = imagenet.list_split("imagenette", imagenet.IMAGENETTE, root, "train")
        rows: list[dict[str, Any]] = []
        for size in args.sizes:
            for workers in sorted({1, args.workers}):
                cache = work / f"cache-{size}-{workers}"
                os.environ["DISTILLKIT_IMAGE_CACHE"] = str(cache)
                start, cpu = time.perf_counter(), _cpu_seconds()
                decoded_cache.ensure_cache("imagenette", "train", listing, size, workers=workers)
                seconds, cpu = time.perf_counter() - start, _cpu_seconds() - cpu
                rows.append({"kind": "cache build", "size": size, "workers": workers, "images": len(listing.files),
                             "seconds": seconds, "images_per_s": len(listing.files) / seconds,
                             "cpu_ms_per_image": 1000 * cpu / len(listing.files)})
                print(f"{size} px, {workers} workers: built in {seconds:.1f} s ({cpu:.1f} CPU s)", flush=True)
            split_mib = len(listing.files) * 3 * size * size / 2**20
            for method in args.methods:
                for ipc in args.ipc:
                    if f"{size}:{method}:{ipc}" in args.skip:
                        continue
                    job = {"root": str(root), "size": size, "method": method, "ipc": ipc, "threads": args.threads,
                           "batch_real": args.batch_real, "real_chunk": args.real_chunk,
                           "iterations": args.iterations, "device": args.device}
                    got = in_child(job, cache)
                    rows.append({"kind": "condense", "size": size, "method": method, "ipc": ipc,
                                 "batch_real": args.batch_real, "real_chunk": args.real_chunk,
                                 "split_uint8_mib": split_mib, "split_float32_mib": 4 * split_mib, **got})
                    print(f"{size} px {method} ipc {ipc}: {got['s_per_iter']:.2f} s/iter, start-up "
                          f"{got['startup_s']:.2f} s, peak anon {got['peak_anon_mib']:.0f} MiB", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    builds = [r for r in rows if r["kind"] == "cache build"]
    condense = [r for r in rows if r["kind"] == "condense"]
    print_table(builds, ["size", "workers", "images", "seconds", "images_per_s", "cpu_ms_per_image"],
                title="cache build")
    print_table(condense, ["size", "method", "ipc", "decoded_per_class", "startup_s", "s_per_iter",
                           "anon_after_startup_mib", "peak_anon_mib", "peak_rss_mib", "split_float32_mib"],
                title=f"condense from the cache ({device}, {args.batch_real} real/class, real chunk {args.real_chunk})")
    path = write_report("imagenet_scale", device, rows, {
        "settings": {"per_class": args.per_class, "classes": 10, "shapes": [list(s) for s in SHAPES],
                     "iterations": args.iterations, "threads": args.threads, "batch_real": args.batch_real,
                     "real_chunk": args.real_chunk, "skipped": args.skip, "torch_threads_parent":
                     torch.get_num_threads()}})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
