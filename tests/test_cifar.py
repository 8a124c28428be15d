"""CIFAR-10/100: the real CIFAR-10 from the shared data, both on-disk layouts, their errors, and a CLI run."""

from __future__ import annotations

import json
import pickle
import shutil
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from distillkit.rundir import load_run_synthetic as load_synthetic
from distillkit.datasets import CIFAR10, CIFAR100, builtin_datasets
from distillkit.errors import UsageError
from tests.conftest import DATA, run_cli

CIFAR10_NPZ = DATA / "CIFAR10"


def spec(name: str):
    return builtin_datasets()[name]()


@pytest.fixture(scope="module")
def cifar10_train() -> tuple[torch.Tensor, torch.Tensor]:
    """The real CIFAR-10 train split, read once for the module."""
    return spec("cifar10").load(DATA, True)


@pytest.fixture
def offline(monkeypatch):
    """No network, whether or not this machine has one: torchvision's download fails at once."""

    def urlopen(*args, **kwargs):
        raise urllib.error.URLError("no network (test)")

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)


# -- the real CIFAR-10 -------------------------------------------------------------------------

def test_real_cifar10_train_has_the_canonical_shape_order_and_balance(cifar10_train):
    images, labels = cifar10_train
    assert images.shape == (50000, 3, 32, 32) and images.dtype == torch.uint8 and images.is_contiguous()
    assert labels.shape == (50000,) and labels.dtype == torch.int64
    assert labels[:10].tolist() == [6, 9, 9, 4, 1, 1, 2, 7, 8, 3]  # data_batch_1's order
    assert torch.bincount(labels).tolist() == [5000] * 10
    with np.load(CIFAR10_NPZ / "train.npz") as npz:  # channels moved first, pixels untouched
        assert torch.equal(images[:64], torch.from_numpy(npz["images"][:64]).permute(0, 3, 1, 2))


def test_real_cifar10_test_split_and_class_names():
    images, labels = spec("cifar10").load(DATA, False)
    assert images.shape == (10000, 3, 32, 32) and images.dtype == torch.uint8
    assert labels[:5].tolist() == [3, 8, 8, 0, 6] and torch.bincount(labels).tolist() == [1000] * 10
    assert spec("cifar10").class_names == CIFAR10 == tuple((CIFAR10_NPZ / "classes.txt").read_text().split())
    assert CIFAR10[6] == "frog" and CIFAR10[9] == "truck"


def test_cifar100_has_its_real_fine_class_names_in_label_order():
    names = spec("cifar100").class_names
    assert names == CIFAR100 and len(set(names)) == 100
    assert names[:4] == ("apple", "aquarium_fish", "baby", "bear") and names[-3:] == ("wolf", "woman", "worm")
    assert list(names) == sorted(names)  # the fine labels are numbered alphabetically


# -- errors ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, npz_folder, batches_folder", [
    ("cifar10", "CIFAR10", "cifar-10-batches-py"), ("cifar100", "CIFAR100", "cifar-100-python"),
])
def test_missing_files_name_both_layouts_and_the_folder(name, npz_folder, batches_folder, tmp_path, offline):
    root = tmp_path / "data"
    root.mkdir()
    with pytest.raises(UsageError) as caught:
        spec(name).load(root, True)
    message = str(caught.value)
    assert f"missing under {root}" in message and "could not be downloaded" in message and "no network" in message
    assert f"{npz_folder}/train.npz" in message and f"{npz_folder}/classes.txt" in message  # the npz layout
    assert f"{batches_folder}/" in message and "--data-root" in message  # torchvision's layout
    assert list(root.iterdir()) == []  # the failed download left nothing behind


def test_a_truncated_npz_is_named_corrupt_not_missing(tmp_path):
    folder = tmp_path / "CIFAR10"
    folder.mkdir()
    shutil.copy(CIFAR10_NPZ / "classes.txt", folder)
    (folder / "test.npz").write_bytes((CIFAR10_NPZ / "test.npz").read_bytes()[:200_000])
    with pytest.raises(UsageError, match=f"{folder / 'test.npz'} is corrupt or truncated") as caught:
        spec("cifar10").load(tmp_path, False)
    assert "missing" not in str(caught.value)
    # the other split of an npz layout is missing: that file is named, not a download attempted
    with pytest.raises(UsageError, match=f"{folder / 'train.npz'} is missing"):
        spec("cifar10").load(tmp_path, True)


def test_npz_class_names_must_be_the_datasets(tmp_path):
    tiny = generated(10, per_class=1)
    write_npz(tmp_path / "CIFAR10", tiny, tiny, [*CIFAR10[:9], "lorry"])
    with pytest.raises(UsageError, match=r"classes.txt lists 10 classes that are not CIFAR10's .*label 9"):
        spec("cifar10").load(tmp_path, True)
    (tmp_path / "CIFAR10" / "classes.txt").unlink()
    with pytest.raises(UsageError, match="classes.txt is missing"):
        spec("cifar10").load(tmp_path, True)


# -- both layouts, generated in the original formats ----------------------------------------------

def generated(classes: int, per_class: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Random uint8 images (N, 3, 32, 32) and shuffled labels with ``per_class`` of each class."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(classes).repeat(per_class)[torch.randperm(classes * per_class, generator=g)]
    images = torch.randint(0, 256, (len(labels), 3, 32, 32), generator=g, dtype=torch.uint8)
    return images.numpy(), labels.numpy()


def write_npz(folder: Path, train, test, names) -> None:
    """The shared data's layout: NHWC uint8 images, labels, classes.txt."""
    folder.mkdir(parents=True)
    for split, (images, labels) in (("train", train), ("test", test)):
        np.savez_compressed(folder / f"{split}.npz", images=images.transpose(0, 2, 3, 1),
                            labels=labels.astype(np.uint8))
    (folder / "classes.txt").write_text("".join(f"{n}\n" for n in names))


def write_pickle(path: Path, entry: dict) -> None:
    with path.open("wb") as f:
        pickle.dump(entry, f, protocol=2)  # the protocol of the original python2 batches


def batch(images: np.ndarray, labels: np.ndarray, labels_key: str, name: str) -> dict:
    """One batch as the original archives hold it: rows of 3072 bytes (R plane, G, B), labels as a list."""
    return {"batch_label": name, labels_key: labels.tolist(),
            "data": images.reshape(len(images), -1), "filenames": [f"{name}_{i}.png" for i in range(len(images))]}


def write_cifar10_batches(folder: Path, train, test) -> None:
    folder.mkdir(parents=True)
    chunks = np.array_split(np.arange(len(train[1])), 5)
    for i, rows in enumerate(chunks, start=1):
        write_pickle(folder / f"data_batch_{i}", batch(train[0][rows], train[1][rows], "labels", f"batch {i}"))
    write_pickle(folder / "test_batch", batch(*test, "labels", "testing batch"))
    write_pickle(folder / "batches.meta", {"label_names": list(CIFAR10), "num_cases_per_batch": len(chunks[0]),
                                           "num_vis": 3072})


def write_cifar100_batches(folder: Path, train, test) -> None:
    folder.mkdir(parents=True)
    for name, (images, labels) in (("train", train), ("test", test)):
        entry = batch(images, labels, "fine_labels", name)
        entry["coarse_labels"] = (labels // 5).tolist()
        write_pickle(folder / name, entry)
    write_pickle(folder / "meta", {"fine_label_names": list(CIFAR100),
                                   "coarse_label_names": [f"super{i}" for i in range(20)]})


def test_cifar10_torchvision_batches_read_as_written_and_as_torchvision_reads_them(tmp_path, monkeypatch):
    import torchvision.datasets as tvd
    import torchvision.datasets.cifar as tv_cifar

    train, test = generated(10, per_class=3, seed=1), generated(10, per_class=2, seed=2)
    write_cifar10_batches(tmp_path / "cifar-10-batches-py", train, test)
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *args: True)  # it knows only the originals' md5s
    for split, (images, labels) in ((True, train), (False, test)):
        got_images, got_labels = spec("cifar10").load(tmp_path, split)
        assert torch.equal(got_images, torch.from_numpy(images)) and got_labels.tolist() == labels.tolist()
        # torchvision's own reader sees the same: the generated files are in the original format
        theirs = tvd.CIFAR10(str(tmp_path), train=split, download=False)
        assert torch.equal(got_images, torch.from_numpy(theirs.data).permute(0, 3, 1, 2))
        assert theirs.targets == labels.tolist() and theirs.classes == list(CIFAR10)


def test_cifar100_both_layouts_give_the_arrays_written(tmp_path):
    train, test = generated(100, per_class=2, seed=3), generated(100, per_class=1, seed=4)
    batches, npz = tmp_path / "tv", tmp_path / "npz"
    write_cifar100_batches(batches / "cifar-100-python", train, test)
    write_npz(npz / "CIFAR100", train, test, CIFAR100)
    for split, (images, labels) in ((True, train), (False, test)):
        for root in (batches, npz):
            got_images, got_labels = spec("cifar100").load(root, split)
            assert torch.equal(got_images, torch.from_numpy(images)) and got_labels.tolist() == labels.tolist()


def test_the_npz_layout_is_read_first_when_both_are_there(tmp_path):
    npz_set, batches_set = generated(10, per_class=1, seed=5), generated(10, per_class=1, seed=6)
    write_npz(tmp_path / "CIFAR10", npz_set, npz_set, CIFAR10)
    write_cifar10_batches(tmp_path / "cifar-10-batches-py", batches_set, batches_set)
    images, _ = spec("cifar10").load(tmp_path, True)
    assert torch.equal(images, torch.from_numpy(npz_set[0]))


# -- end to end on the real CIFAR-10 --------------------------------------------------------------

@pytest.fixture(scope="module")
def cifar_dm_run(tmp_path_factory, one_thread) -> Path:
    run_dir = tmp_path_factory.mktemp("cifar") / "dm"
    run_cli("distill", "--method", "dm", "--dataset", "cifar10", "--ipc", "1", "--iterations", "2",
            "--batch-real", "8", "--device", "cpu", "--out", run_dir)
    return run_dir


def test_dm_on_cifar10_distills_evaluates_shows_and_exports(cifar_dm_run, tmp_path):
    synthetic = load_synthetic(cifar_dm_run)
    assert synthetic.images.shape == (10, 3, 32, 32) and synthetic.class_names == CIFAR10
    assert torch.isfinite(synthetic.images).all()

    run_cli("evaluate", cifar_dm_run, "--epochs", "2", "--runs", "1", "--test-limit", "200", "--device", "cpu")
    report = json.loads((cifar_dm_run / "eval.json").read_text())
    assert {r["kind"] for r in report["results"]} == {"synthetic", "random-baseline"}
    assert all(len(r["accuracies"]) == 1 and 0 <= r["accuracies"][0] <= 100 for r in report["results"])

    run_cli("show", cifar_dm_run, "-o", tmp_path / "grid.png")
    assert (tmp_path / "grid.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    run_cli("export", cifar_dm_run, "--format", "npz", "-o", tmp_path / "set.npz")
    with np.load(tmp_path / "set.npz") as npz:
        assert npz["images"].shape == (10, 32, 32, 3) and npz["images"].dtype == np.uint8
        assert npz["class_names"].tolist() == list(CIFAR10) and npz["labels"].tolist() == list(range(10))


def test_m3d_on_cifar10_distills(tmp_path, one_thread):
    run_cli("distill", "--method", "m3d", "--dataset", "cifar10", "--ipc", "1", "--iterations", "2",
            "--batch-real", "8", "--device", "cpu", "--out", tmp_path / "m3d")
    synthetic = load_synthetic(tmp_path / "m3d")
    assert synthetic.class_names == CIFAR10 and torch.isfinite(synthetic.images).all()
    assert synthetic.labels.bincount().tolist() == [len(synthetic.labels) // 10] * 10
    losses = [json.loads(line)["loss"] for line in (tmp_path / "m3d" / "losses.jsonl").read_text().splitlines()]
    assert len(losses) == 2 and all(loss > 0 for loss in losses)
