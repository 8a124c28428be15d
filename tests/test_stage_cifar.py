"""Staging CIFAR-10 for a lent GPU in parts: split and join round-trip byte for byte, and join refuses a
missing or damaged part, a wrong source and a wrong decoded array (a small generated npz stands in for
the 141 MB file)."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from benchmarks import stage_cifar
from distillkit.errors import UsageError
from tests.conftest import DATA


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture()
def source(tmp_path):
    """A CIFAR-shaped train/test npz pair and classes.txt, and what they must hash to."""
    rng = np.random.default_rng(7)
    folder = tmp_path / "source"
    folder.mkdir()
    arrays = {}
    for name, n in (("train.npz", 300), ("test.npz", 40)):
        images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        np.savez_compressed(folder / name, images=images, labels=labels)
        arrays[f"{name}:images"], arrays[f"{name}:labels"] = _digest(images.tobytes()), _digest(labels.tobytes())
    (folder / "classes.txt").write_text("airplane\nautomobile\nbird\ncat\ndeer\ndog\nfrog\nhorse\nship\ntruck\n")
    files = {name: _digest((folder / name).read_bytes()) for name in ("train.npz", "test.npz", "classes.txt")}
    return folder, stage_cifar.Expected(files, arrays)


def test_split_then_join_rebuilds_every_file_byte_for_byte(source, tmp_path):
    folder, expected = source
    parts, out = tmp_path / "parts", tmp_path / "CIFAR10"
    manifest = stage_cifar.split(folder, parts, expected, part_bytes=200_000)
    train_parts = manifest["files"]["train.npz"]["parts"]
    assert len(train_parts) == -(-(folder / "train.npz").stat().st_size // 200_000) > 1
    assert all(p["bytes"] <= 200_000 for f in manifest["files"].values() for p in f["parts"])
    assert set(stage_cifar.check(parts, expected).values()) == {"ok"}
    done = stage_cifar.join(parts, out, expected)
    for name in expected.files:
        assert (out / name).read_bytes() == (folder / name).read_bytes()
    assert sum("decoded sha256 ok" in line for line in done) == 4
    assert all("already there" in line for line in stage_cifar.join(parts, out, expected)[:3])  # a rerun keeps them


def test_join_names_missing_and_damaged_parts_and_writes_nothing(source, tmp_path):
    folder, expected = source
    parts, out = tmp_path / "parts", tmp_path / "CIFAR10"
    stage_cifar.split(folder, parts, expected, part_bytes=200_000)
    (parts / "train.npz.part1").unlink()
    damaged = bytearray((parts / "train.npz.part0").read_bytes())
    damaged[100] ^= 1
    (parts / "train.npz.part0").write_bytes(bytes(damaged))
    status = stage_cifar.check(parts, expected)
    assert (status["train.npz.part0"], status["train.npz.part1"], status["test.npz.part0"]) == \
        ("corrupt", "missing", "ok")
    with pytest.raises(UsageError, match="train.npz.part0 corrupt, train.npz.part1 missing"):
        stage_cifar.join(parts, out, expected)
    assert not (out / "train.npz").exists()


def test_split_refuses_a_source_that_is_not_the_expected_one_and_join_checks_the_arrays(source, tmp_path):
    folder, expected = source
    other = stage_cifar.Expected({**expected.files, "test.npz": "0" * 64}, expected.arrays)
    with pytest.raises(UsageError, match="test.npz has sha256 .* not 0000"):
        stage_cifar.split(folder, tmp_path / "parts", other)
    stage_cifar.split(folder, tmp_path / "parts", expected, part_bytes=200_000)
    with pytest.raises(UsageError, match="lists other files"):  # a manifest made for other files is refused
        stage_cifar.join(tmp_path / "parts", tmp_path / "out", other)
    wrong_array = stage_cifar.Expected(expected.files, {**expected.arrays, "train.npz:images": "1" * 64})
    stage_cifar.split(folder, tmp_path / "parts2", wrong_array, part_bytes=200_000)
    with pytest.raises(UsageError, match="array 'images' has sha256 .* not 1111"):
        stage_cifar.join(tmp_path / "parts2", tmp_path / "out2", wrong_array)


def test_the_expected_hashes_are_the_shared_data_readmes():
    text = (DATA / "README.md").read_text()
    for digest in (*stage_cifar.CIFAR10.files.values(), *stage_cifar.CIFAR10.arrays.values()):
        assert digest in text
