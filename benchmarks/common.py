"""What every benchmark records: machine, device, versions, command; a table on stdout; JSON under results/."""

from __future__ import annotations

import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from distillkit.artifact import atomic_write_json, versions

#: where results go: benchmarks/results, or $DISTILLKIT_BENCH_RESULTS (device.sh writes straight into $OUT)
RESULTS = Path(os.environ.get("DISTILLKIT_BENCH_RESULTS") or Path(__file__).resolve().parent / "results")


def machine(device: torch.device) -> dict[str, Any]:
    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "device": str(device)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def device_label(device: torch.device) -> str:
    return "cuda" if device.type == "cuda" else "cpu"


def timed(fn: Callable[[], Any], device: torch.device, repeats: int, warmup: int = 1) -> tuple[float, list[float]]:
    """Median seconds of ``fn`` over ``repeats`` calls after ``warmup`` calls (synchronising CUDA around each)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2], times


def provenance() -> dict[str, str]:
    """The command that is running and the time now: stamped on every result file (and on rows of a grid)."""
    return {"command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def write_report(name: str, device: torch.device, rows: Sequence[dict[str, Any]], extra: dict[str, Any] | None = None
                 ) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}-{device_label(device)}.json"
    stamp = provenance()
    atomic_write_json({"benchmark": name, "command": stamp["command"],
                       "machine": machine(device), "versions": versions(),
                       "date": stamp["date"], "rows": list(rows), **(extra or {})}, path)
    return path


def with_earlier_rows(name: str, device: torch.device, rows: Sequence[dict[str, Any]],
                      key: Callable[[dict[str, Any]], Any], same_settings: dict[str, Any] | None = None
                      ) -> list[dict[str, Any]]:
    """``rows`` after the rows of the earlier ``<name>-<device>.json`` that this run did not measure (by
    ``key``), so a benchmark can be completed in parts. A kept row keeps the date and command of the run that
    measured it; with ``same_settings``, earlier rows are kept only if their file recorded those settings."""
    earlier = RESULTS / f"{name}-{device_label(device)}.json"
    if not earlier.exists():
        return list(rows)
    previous = json.loads(earlier.read_text())
    if same_settings is not None and any(previous.get(k) != json.loads(json.dumps(v))
                                         for k, v in same_settings.items()):
        return list(rows)
    ours = {key(r) for r in rows}
    kept = [{"date": previous["date"], "command": previous["command"], **r}
            for r in previous["rows"] if key(r) not in ours]
    return kept + list(rows)


def print_table(rows: Sequence[dict[str, Any]], columns: Sequence[str], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for col in columns:
        table.add_column(col, justify="right" if isinstance(rows[0].get(col), (int, float)) else "left")
    for row in rows:
        table.add_row(*[f"{row[c]:.4g}" if isinstance(row.get(c), float) else str(row.get(c, "")) for c in columns])
    Console().print(table)
