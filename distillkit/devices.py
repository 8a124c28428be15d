"""Device policy: which device a process uses and what differs between CPUs and accelerators.

Everything that depends on the kind of device is decided here, so the condense loop, the
evaluation engine, the CLI and the benchmarks follow one policy:

==========================  ==========================================  =========================
decision                    CPU                                         accelerator (CUDA)
==========================  ==========================================  =========================
device (``auto``)           when no CUDA device is available            ``cuda`` (the rank's GPU
                                                                        under torchrun)
extractor forward batch     :func:`cache_sized_batch` images per call   all images in one call
                            (when the extractor embeds images
                            independently)
evaluation runs             one by one (stacking measured slower)       stacked (vmap)
test-time batch             :func:`cache_sized_batch`                   1000
host -> device copies       plain                                       pinned, non-blocking
allocator                   glibc keeps freed blocks                    torch's caching allocator
                            (:func:`keep_freed_memory`)
==========================  ==========================================  =========================
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys

import torch
from torch import Tensor

from distillkit.errors import UsageError

#: test-time batch on accelerators: large enough to saturate one launch, small enough for any evaluator
ACCELERATOR_TEST_BATCH = 1000


def rank() -> int:
    """This process's rank under torchrun (0 otherwise): only rank 0 talks and writes."""
    return int(os.environ.get("RANK", "0"))


def resolve_device(name: str) -> torch.device:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N`` -> a device this machine has (a :class:`UsageError` otherwise)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda") or (device.type == "cpu" and device.index):
        raise UsageError(f"unknown --device {name!r}; choose auto, cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name}: CUDA is not available on this machine; use --device cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                             f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return device


def device_for_rank(device: torch.device) -> torch.device:
    """Under torchrun each process takes the GPU of its LOCAL_RANK."""
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return device


def is_cpu(device: torch.device | str) -> bool:
    return torch.device(device).type == "cpu"


def cache_sized_batch(height: int, width: int) -> int:
    """Images per no-grad forward that keep a small network's activations in a CPU's cache.

    One forward over thousands of images streams each ~1 GB activation through memory once per
    layer op (norm, ReLU, pool); at 16k input pixels per call (20 images of 28x28, 16 of 32x32) they
    stay in cache: ConvNet-3 features of MNIST came 2x faster on a 2-core CPU, with the same values.
    """
    return max(1, 16384 // (height * width))


def default_forward_batch(device: torch.device, height: int, width: int, independent: bool) -> int | None:
    """Images per extractor call in the condense loop (None: all at once).

    On a CPU, :func:`cache_sized_batch` when the extractor embeds every image on its own (measured on a
    2-core CPU, bit-identical: DM's iteration 1.7-2.5x faster, M3D's at IPC 50 another 1.4x). A
    batch-dependent extractor (batch-norm statistics, dropout) keeps one call, and so do accelerators,
    where one large launch is the fast shape.
    """
    return cache_sized_batch(height, width) if is_cpu(device) and independent else None


def default_stacked(device: torch.device | str) -> bool:
    """Whether evaluation runs train stacked by default: on accelerators only.

    On a GPU a step on a small synthetic batch is bound by kernel launches, which stacking divides by
    the number of runs; on a CPU it is bound by arithmetic and vmap adds memory passes (5 stacked
    ConvNet-3 runs took 1.17x-1.55x the CPU time of 5 runs one by one, ``eval_speed-cpu.json``).
    """
    return not is_cpu(device)


def default_test_batch(device: torch.device | str, height: int, width: int) -> int:
    return cache_sized_batch(height, width) if is_cpu(device) else ACCELERATOR_TEST_BATCH


def to_device(t: Tensor, device: torch.device | str) -> Tensor:
    """``t`` on ``device``: from pinned memory and asynchronously on CUDA (a pageable ``.to`` waits for the
    stream), unchanged if it is there already. Safe to drop ``t`` right after: the pinned staging block is
    held by torch's host allocator until the copy is done."""
    device = torch.device(device)
    if t.device == device:
        return t
    if device.type == "cuda" and t.device.type == "cpu":
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


@functools.lru_cache(maxsize=256)
def constant(values: tuple[float, ...] | tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """``values`` as a 1-D tensor on ``device``, made once per ``(values, dtype, device)``: hot loops that
    built small constants (normalisation statistics, class indices) from Python values at every call
    made a host -> device copy each time on an accelerator. Callers must only read it."""
    with torch.inference_mode(False):  # a normal tensor even if first asked for inside inference mode
        return torch.tensor(values, dtype=dtype, device=device)


def set_deterministic(enabled: bool) -> None:
    """torch's deterministic algorithms and cuDNN's deterministic, non-benchmarking kernels for this process
    (``--deterministic``). On CUDA, ops without a deterministic kernel then raise instead of using atomic
    adds (``grid_sample``'s and bilinear up-sampling's backward among them, so DSA's geometric ops and the
    factor parameterization refuse to run there). On CPUs the kernels distillkit uses are deterministic
    already: the flag changes nothing there."""
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS reads it at its first use
    torch.use_deterministic_algorithms(enabled)
    torch.backends.cudnn.deterministic = enabled
    torch.backends.cudnn.benchmark = False


def prepare(device: torch.device | str) -> None:
    """Process-wide tuning for long training on ``device`` (idempotent)."""
    if is_cpu(device):
        keep_freed_memory()


@functools.cache
def keep_freed_memory() -> None:
    """On glibc, keep freed blocks in the process heap instead of giving them back to the kernel.

    CPU training allocates the same large activations every step; glibc serves
    blocks above 32 MB with a fresh ``mmap`` each time, and the kernel's page
    faults and zero-fill then cost as much as a third of the step (seen as
    system time), more for stacked runs whose activations are ``runs`` times
    larger. Process-wide and idempotent; the heap stays at its peak size.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc
        return
    m_trim_threshold, m_mmap_max = -1, -4
    libc.mallopt(m_mmap_max, 0)
    libc.mallopt(m_trim_threshold, 2**31 - 1)
