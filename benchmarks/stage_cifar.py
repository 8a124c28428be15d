"""Carry the full CIFAR-10 to a lent GPU machine in parts, and put it back together there, verified.

One device call carries at most 64 MiB, and CIFAR-10's two ``.npz`` files are 135 + 27 MiB. So the
files are cut here into byte ranges of at most :data:`PART_BYTES` (``split``), each part is carried by
its own call into the git-ignored ``.data/cifar-parts/`` (which stays on the machine while it is warm),
and ``join`` there rebuilds the files byte for byte into ``.data/CIFAR10/``. Nothing is subsampled:
``join`` refuses unless every part has the size and sha256 the manifest lists, every rebuilt file
has the sha256 of the original, and the decoded arrays have the sha256 that
``shared/data/README.md`` ("CIFAR-10", read 2026-12) gives for them. The sequence of calls is in
``benchmarks/device.sh``'s header.

    python3 -m benchmarks.stage_cifar split [--source ../shared/data/CIFAR10] [--parts .data/cifar-parts]
    python3 -m benchmarks.stage_cifar check [--parts .data/cifar-parts]      # which parts are here, intact
    python3 -m benchmarks.stage_cifar join [--parts .data/cifar-parts] [--out .data/CIFAR10]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from distillkit.artifact import atomic_write_bytes, atomic_write_json
from distillkit.errors import UsageError

#: the largest part: with the checkout (< 1 MiB) and the manifest it leaves room under a call's 64 MiB
PART_BYTES = 48 * 2**20
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class Expected:
    """What the staged files must be: sha256 of each file, and of each array's raw bytes (``"file:key"``)."""

    files: dict[str, str]
    arrays: dict[str, str]


#: shared/data/README.md, "CIFAR-10": the files' sha256 and the decoded arrays' (``arr.tobytes()``)
CIFAR10 = Expected(
    files={
        "train.npz": "b5584b9bf0d8b93f0466283f209ba329d8ecc667ab9e3b19ce2f7664d3109cd8",
        "test.npz": "15d35da55daeccfd6b7942ce9c937fd43785792d60aab146efabf5f41c6ac41c",
        "classes.txt": "2ce042b1e0b48db4bb214408e6414ba18b2731c24af244f2d6c112fddf31af00",
    },
    arrays={
        "train.npz:images": "47af8b02cfcfb6cdf3dbbd1969ad7f1b70f4413f6f80f437b020ee4e5bc8304a",
        "train.npz:labels": "2b7cd2f24487317614016b72ffd53071c3062f592f0eb300c18a770d41ae1253",
        "test.npz:images": "d1246028f2cd1339d882924011f41ff5058e70f2c72cfc4b7ae5f00ba1f8a6ec",
        "test.npz:labels": "bcb0228c70fcd46ed2fcaa2447a1b21141f48d8054ea92b602596e678bf60b99",
    },
)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def part_names(name: str, count: int) -> list[str]:
    return [f"{name}.part{k}" for k in range(count)]


def split(source: Path, parts: Path, expected: Expected = CIFAR10, part_bytes: int = PART_BYTES) -> dict:
    """Cut each file of ``expected`` under ``source`` into equal byte ranges of at most ``part_bytes``; write
    them and ``manifest.json`` into ``parts``. The source must match ``expected`` first."""
    files = {}
    for name, digest in expected.files.items():
        path = source / name
        if not path.is_file():
            raise UsageError(f"{path} is missing; --source must hold {', '.join(expected.files)}")
        data = path.read_bytes()
        if sha256(data) != digest:
            raise UsageError(f"{path} has sha256 {sha256(data)}, not {digest}: not the expected file")
        count = max(1, -(-len(data) // part_bytes))
        size = -(-len(data) // count)  # equal parts, the last one shorter
        pieces = [data[k * size:(k + 1) * size] for k in range(count)]
        for piece_name, piece in zip(part_names(name, count), pieces):
            atomic_write_bytes(parts / piece_name, piece)
        files[name] = {"bytes": len(data), "sha256": digest,
                       "parts": [{"name": n, "bytes": len(p), "sha256": sha256(p)}
                                 for n, p in zip(part_names(name, count), pieces)]}
    manifest = {"files": files, "arrays": expected.arrays}
    atomic_write_json(manifest, parts / MANIFEST)
    return manifest


def read_manifest(parts: Path, expected: Expected = CIFAR10) -> dict:
    """The manifest in ``parts``, if it promises the ``expected`` files (a manifest of other files is refused)."""
    path = parts / MANIFEST
    if not path.is_file():
        raise UsageError(f"{path} is missing: run `python3 -m benchmarks.stage_cifar split` here and carry it")
    manifest = json.loads(path.read_text())
    promised = {name: f["sha256"] for name, f in manifest["files"].items()}
    if promised != expected.files or manifest["arrays"] != expected.arrays:
        raise UsageError(f"{path} lists other files than the expected ones; split again")
    return manifest


def part_status(parts: Path, part: dict) -> str:
    """``ok``, ``missing`` or ``corrupt`` (wrong size or sha256)."""
    path = parts / part["name"]
    if not path.is_file():
        return "missing"
    data = path.read_bytes()
    return "ok" if len(data) == part["bytes"] and sha256(data) == part["sha256"] else "corrupt"


def check(parts: Path, expected: Expected = CIFAR10) -> dict[str, str]:
    """Each part's status, by name."""
    manifest = read_manifest(parts, expected)
    return {p["name"]: part_status(parts, p) for f in manifest["files"].values() for p in f["parts"]}


def join(parts: Path, out: Path, expected: Expected = CIFAR10) -> list[str]:
    """Rebuild every file into ``out`` from verified parts, then verify the files and their arrays.

    Raises :class:`UsageError` naming each missing or corrupt part, or the first file or array that
    differs; a file already in ``out`` with the right sha256 is kept. Returns what was done, a line each.
    """
    manifest = read_manifest(parts, expected)
    done = []
    for name, entry in manifest["files"].items():
        target = out / name
        if target.is_file() and sha256(target.read_bytes()) == entry["sha256"]:
            done.append(f"{target}: already there, sha256 ok")
            continue
        bad = {p["name"]: s for p in entry["parts"] if (s := part_status(parts, p)) != "ok"}
        if bad:
            raise UsageError(f"{name}: parts not staged intact in {parts}: "
                             + ", ".join(f"{n} {s}" for n, s in bad.items()))
        data = b"".join((parts / p["name"]).read_bytes() for p in entry["parts"])
        if len(data) != entry["bytes"] or sha256(data) != entry["sha256"]:
            raise UsageError(f"{name}: the joined parts have sha256 {sha256(data)}, not {entry['sha256']}")
        atomic_write_bytes(target, data)
        done.append(f"{target}: joined from {len(entry['parts'])} part(s), sha256 ok")
    for key, digest in manifest["arrays"].items():
        name, array = key.split(":")
        with np.load(out / name) as z:
            got = sha256(np.ascontiguousarray(z[array]).tobytes())
        if got != digest:
            raise UsageError(f"{out / name}: array {array!r} has sha256 {got}, not {digest}")
        done.append(f"{out / name}[{array}]: decoded sha256 ok")
    return done


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("action", choices=("split", "check", "join"))
    parser.add_argument("--source", type=Path, default=Path("../shared/data/CIFAR10"))
    parser.add_argument("--parts", type=Path, default=Path(".data/cifar-parts"))
    parser.add_argument("--out", type=Path, default=Path(".data/CIFAR10"))
    args = parser.parse_args(argv)
    try:
        if args.action == "split":
            manifest = split(args.source, args.parts)
            for entry in manifest["files"].values():
                for p in entry["parts"]:
                    print(f"{args.parts / p['name']}  {p['bytes'] / 2**20:.1f} MiB")
        elif args.action == "check":
            status = check(args.parts)
            for name, state in status.items():
                print(f"{name}: {state}")
            print(f"{sum(s == 'ok' for s in status.values())} of {len(status)} parts staged intact")
            return 0 if "corrupt" not in status.values() else 1
        else:
            print("\n".join(join(args.parts, args.out)))
    except UsageError as exc:
        print(f"stage_cifar: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
