"""Export of a real DM run (png-folder / npz / pt round trips) and the pictures `show` and `plot` draw."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from distillkit import export
from distillkit.artifact import atomic_save
from distillkit.rundir import SYNTHETIC as SYNTHETIC_FILE, load_run_synthetic as load_synthetic
from distillkit.export import class_folder_names
from tests.conftest import run_cli

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def expected_pixels(run_dir: Path) -> tuple[torch.Tensor, torch.Tensor, tuple[str, ...]]:
    """The run's decoded images denormalised to [0, 1], as the exports must hold them."""
    synthetic = load_synthetic(run_dir)
    return synthetic.spec.denormalize(synthetic.images).clamp(0, 1), synthetic.labels, synthetic.class_names


def assert_png(path: Path, min_size: tuple[int, int]) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    with Image.open(io.BytesIO(data)) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width >= min_size[0] and image.height >= min_size[1]
        assert image.width <= 4000 and image.height <= 4000
        return image.size


# -- export ----------------------------------------------------------------------

def test_png_folder_loads_with_imagefolder_with_the_same_labels_and_pixels(tiny_dm_run, tmp_path):
    from torchvision.datasets import ImageFolder

    images01, labels, class_names = expected_pixels(tiny_dm_run)
    out = tmp_path / "png"
    result = run_cli("export", tiny_dm_run, "--format", "png-folder", "-o", out)
    assert f"wrote {len(labels)} images of {len(class_names)} classes" in result.output

    dataset = ImageFolder(str(out))
    assert dataset.classes == class_folder_names(class_names)  # one folder per class, in label order
    assert dataset.targets == labels.tolist()  # same labels, same order, same counts
    assert np.bincount(dataset.targets).tolist() == torch.bincount(labels).tolist()
    expected = (images01 * 255).round().to(torch.uint8)
    for (path, label), target in zip(dataset.samples, expected):
        with Image.open(path) as image:
            assert image.mode == "L" and image.size == (28, 28)  # full size, grayscale as stored
            assert torch.equal(torch.from_numpy(np.array(image)), target[0])  # PNG is lossless
    marker = json.loads((out / export.PNG_MARKER).read_text())
    assert marker["class_names"] == list(class_names) and marker["images"] == len(labels)


def test_class_names_become_safe_folders_in_label_order(tiny_dm_run, tmp_path):
    from torchvision.datasets import ImageFolder

    names = ["T-shirt/top", "a\\b", "..", "", "ok name", "x:y*?", "c", "d", "e", "f", "g", "h"]
    folders = class_folder_names(names)
    assert folders[:6] == ["00-T-shirt_top", "01-a_b", "02-class", "03-class", "04-ok name", "05-x_y__"]
    assert sorted(folders) == folders  # ImageFolder sorts folder names: that order is the label order

    # a FashionMNIST-like name with '/' in a real artifact: one flat folder, original name kept in the marker
    run = tmp_path / "run"
    shutil.copytree(tiny_dm_run, run)
    artifact = torch.load(run / SYNTHETIC_FILE, weights_only=True)
    artifact["class_names"] = ["T-shirt/top", *artifact["class_names"][1:]]
    artifact.pop("digest", None)  # atomic_save writes a fresh one for the edited content
    atomic_save(artifact, run / SYNTHETIC_FILE)
    run_cli("export", run, "--format", "png-folder", "-o", tmp_path / "png")
    dataset = ImageFolder(str(tmp_path / "png"))
    assert dataset.classes[0] == "0-T-shirt_top" and len(dataset.classes) == 10
    assert dataset.targets == load_synthetic(run).labels.tolist()
    marker = json.loads((tmp_path / "png" / export.PNG_MARKER).read_text())
    assert marker["class_names"][0] == "T-shirt/top"


def test_npz_and_pt_hold_the_same_values(tiny_dm_run, tmp_path):
    images01, labels, class_names = expected_pixels(tiny_dm_run)
    run_cli("export", tiny_dm_run, "--format", "npz", "-o", tmp_path / "set.npz")
    run_cli("export", tiny_dm_run, "--format", "pt", "-o", tmp_path / "set.pt")

    with np.load(tmp_path / "set.npz", allow_pickle=False) as npz:
        assert npz["images"].dtype == np.uint8 and npz["images"].shape == (len(labels), 28, 28, 1)
        from_npz = torch.from_numpy(npz["images"]).permute(0, 3, 1, 2).float() / 255
        assert (from_npz - images01).abs().max() <= 0.5 / 255 + 1e-6  # within uint8 rounding
        assert npz["labels"].tolist() == labels.tolist() and npz["class_names"].tolist() == list(class_names)

    pt = torch.load(tmp_path / "set.pt", weights_only=True)
    assert pt["images"].dtype == torch.float32 and pt["images"].shape == images01.shape
    assert torch.allclose(pt["images"], images01, atol=1e-6)
    assert torch.equal(pt["labels"], labels) and pt["class_names"] == list(class_names)
    assert (from_npz - pt["images"]).abs().max() <= 0.5 / 255 + 1e-6


def test_export_refuses_to_overwrite_and_replaces_only_its_own_output(tiny_dm_run, tmp_path):
    user_dir = tmp_path / "mine"
    user_dir.mkdir()
    (user_dir / "notes.txt").write_text("keep me")
    refused = run_cli("export", tiny_dm_run, "--format", "png-folder", "-o", user_dir, expect=2)
    assert "not empty; pass --overwrite" in refused.output
    refused = run_cli("export", tiny_dm_run, "--format", "png-folder", "-o", user_dir, "--overwrite", expect=2)
    assert "not a distillkit png-folder export" in refused.output
    assert (user_dir / "notes.txt").read_text() == "keep me"

    out = tmp_path / "png"
    run_cli("export", tiny_dm_run, "--format", "png-folder", "-o", out)
    (out / "stale.txt").write_text("from an older export")
    run_cli("export", tiny_dm_run, "--format", "png-folder", "-o", out, expect=2)
    run_cli("export", tiny_dm_run, "--format", "png-folder", "-o", out, "--overwrite")
    assert not (out / "stale.txt").exists() and (out / export.PNG_MARKER).is_file()

    (tmp_path / "set.npz").write_bytes(b"precious")
    run_cli("export", tiny_dm_run, "--format", "npz", "-o", tmp_path / "set.npz", expect=2)
    assert (tmp_path / "set.npz").read_bytes() == b"precious"
    run_cli("export", tiny_dm_run, "--format", "npz", "-o", tmp_path / "set.npz", "--overwrite")
    assert np.load(tmp_path / "set.npz")["labels"].shape == (10,)
    clobber = run_cli("export", tiny_dm_run, "--format", "pt", "-o", tiny_dm_run / SYNTHETIC_FILE, "--overwrite",
                      expect=2)
    assert "would replace the run's own synthetic.pt" in clobber.output
    bad = run_cli("export", tiny_dm_run, "--format", "tiff", "-o", tmp_path / "x", expect=2)
    assert "png-folder" in bad.output and "npz" in bad.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "png", "set.npz"]  # no temporary leftovers


def test_a_failed_export_leaves_the_previous_one_intact(tiny_dm_run, tmp_path, monkeypatch):
    out = tmp_path / "png"
    run_cli("export", tiny_dm_run, "--format", "png-folder", "-o", out)
    before = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    saved = []

    def failing_save(image, path):
        if len(saved) == 3:
            raise OSError("disk full")
        saved.append(path)
        image.save(path, format="PNG")

    monkeypatch.setattr(export, "save_png", failing_save)
    with pytest.raises(OSError, match="disk full"):
        export.export_run(tiny_dm_run, "png-folder", out, overwrite=True)
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == before
    assert [p.name for p in tmp_path.iterdir()] == ["png"]  # the half-written staging folder is gone
    with pytest.raises(OSError):
        export.export_run(tiny_dm_run, "png-folder", tmp_path / "fresh", overwrite=False)
    assert not (tmp_path / "fresh").exists()


# -- pictures ---------------------------------------------------------------------

def test_show_draws_a_grid_with_one_row_per_class(tiny_dm_run, tmp_path):
    run_cli("show", tiny_dm_run, "-o", tmp_path / "grid.png")
    width, height = assert_png(tmp_path / "grid.png", (60, 300))
    assert height > 2 * width  # IPC 1, ten classes: a tall column of labelled rows


def test_plot_draws_the_loss_curve_then_accuracy_beside_the_baseline(tiny_dm_run, tmp_path):
    run = tmp_path / "run"  # a copy: evaluation writes into the run directory
    shutil.copytree(tiny_dm_run, run)
    result = run_cli("plot", run)
    assert "(loss)" in result.output
    loss_only = assert_png(run / "plot.png", (300, 200))

    run_cli("evaluate", run, "--protocol", "smoke", "--epochs", "1", "--runs", "1", "--test-limit", "100",
            "--device", "cpu")
    kinds = {row["kind"] for row in json.loads((run / "eval.json").read_text())["results"]}
    assert kinds == {"synthetic", "random-baseline"}
    with open(run / "losses.jsonl", "a") as log:
        log.write('{"iteration": 4, "lo')  # a live run mid-write: the partial line is skipped, not an error
    result = run_cli("plot", run, "-o", tmp_path / "both.png")
    assert "(loss and accuracy)" in result.output
    both = assert_png(tmp_path / "both.png", (600, 200))
    assert both[0] > 1.6 * loss_only[0]  # a second panel beside the first

    empty = tmp_path / "empty"
    empty.mkdir()
    assert "nothing to plot" in run_cli("plot", empty, expect=2).output
    (empty / "losses.jsonl").write_text("not json\n")
    assert "losses.jsonl:1 is not a loss record" in run_cli("plot", empty, expect=2).output
    # a long run: raw curve plus its running mean
    (empty / "losses.jsonl").write_text("".join(f'{{"iteration": {i}, "loss": {100 / (i + 1) + i % 7}}}\n'
                                                for i in range(500)))
    assert "(loss)" in run_cli("plot", empty).output
    assert_png(empty / "plot.png", (300, 200))
