"""ImageNet subsets on a generated ImageNet-layout tree: class lists, the decoded cache, memory-mapped
sampling, ResNetAP-10, factor 3 at 128 px, and ``distill``/``evaluate`` end to end."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from distillkit import decoded_cache, imagenet, registry
from distillkit.rundir import load_run_synthetic as load_synthetic
from distillkit.data import RealData, load_split, resolve_root
from distillkit.errors import UsageError
from tests.conftest import run_cli

#: (width, height) of the generated files: landscape, portrait, square, and smaller than 128 (up-sampled)
SHAPES = ((160, 120), (120, 170), (140, 140), (200, 96), (90, 110))


def make_tree(root: Path, wnids, train: int, val: int, seed: int = 0) -> Path:
    """An ImageNet-layout folder: ``train/<wnid>/<wnid>_<i>.JPEG``, ``val/<wnid>/...``, class-coloured noise."""
    rng = np.random.default_rng(seed)
    for label, wnid in enumerate(wnids):
        tint = np.array([label * 23 % 256, label * 71 % 256, label * 131 % 256])
        for split, n in (("train", train), ("val", val)):
            folder = root / split / wnid
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                w, h = SHAPES[(i + label) % len(SHAPES)]
                pixels = (0.6 * tint + 0.4 * rng.integers(0, 256, (h, w, 3))).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{wnid}_{i}.JPEG", quality=90)
    return root


def reference_pixels(path: Path, size: int) -> np.ndarray:
    """What torchvision's Resize(size) + CenterCrop(size) (IDC's transform) gives for one file, (3, size, size)."""
    import torchvision.transforms as T

    with Image.open(path) as image:
        return np.asarray(T.CenterCrop(size)(T.Resize(size)(image.convert("RGB")))).transpose(2, 0, 1)


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("DISTILLKIT_IMAGE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def imagenette_tree(tmp_path_factory) -> Path:
    """All 10 Imagenette classes, 12 train and 4 val JPEGs each (read-only for the tests)."""
    return make_tree(tmp_path_factory.mktemp("data") / "imagenet", imagenet.IMAGENETTE, train=12, val=4)


def cached_files(cache: Path) -> dict[str, tuple[int, int]]:
    """name -> (inode, mtime_ns) of the cache's data and manifest files."""
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in cache.glob("*") if p.suffix in (".u8", ".json")}


def test_class_lists_and_specs():
    assert imagenet.IMAGENETTE == tuple(sorted(imagenet.IMAGENETTE)) and "n03888257" in imagenet.IMAGENETTE
    assert imagenet.IMAGEWOOF == tuple(sorted(imagenet.IMAGEWOOF)) and "n02086240" in imagenet.IMAGEWOOF
    assert len(set(imagenet.IDC_CLASS100)) == 100
    assert imagenet.IDC_CLASS100[:2] == ("n02869837", "n01749939") and imagenet.IDC_CLASS100[-1] == "n02090622"
    expected = {"imagenette": (imagenet.IMAGENETTE, 128), "imagewoof": (imagenet.IMAGEWOOF, 128),
                "imagenet10": (imagenet.IDC_CLASS100[:10], 224), "imagenet100": (imagenet.IDC_CLASS100, 224)}
    for name, (wnids, size) in expected.items():
        spec = registry.create("datasets", name)
        image = spec.image_spec
        assert spec.class_names == wnids and (image.channels, image.height, image.width) == (3, size, size)
        assert image.mean == imagenet.IMAGENET_MEAN and image.std == imagenet.IMAGENET_STD
    assert registry.create("datasets", "imagenette", size=64).image_spec.height == 64
    for bad in (0, 4, 10_000, "big", 64.0):
        with pytest.raises(UsageError, match="dataset.size must be a whole number of pixels from 8 to 512"):
            registry.create("datasets", "imagenette", size=bad)


def test_resize_crop_is_torchvisions_resize_and_center_crop(tmp_path):
    rng = np.random.default_rng(1)
    for i, (w, h) in enumerate(SHAPES + ((128, 300), (301, 129))):
        path = tmp_path / f"{i}.JPEG"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
        with Image.open(path) as image:
            ours = np.asarray(decoded_cache.resize_crop(image.convert("RGB"), 128)).transpose(2, 0, 1)
        assert ours.shape == (3, 128, 128)
        assert np.array_equal(ours, reference_pixels(path, 128)), (w, h)


def test_the_cache_is_built_once_reused_and_equals_a_direct_decode(imagenette_tree, _cache):
    spec = registry.create("datasets", "imagenette", size=128)
    first = load_split(spec, imagenette_tree, train=True)
    built = cached_files(_cache)
    assert len(built) == 2  # one data file, one manifest
    second = load_split(spec, imagenette_tree.parent, train=True)  # <data-root>/imagenet is found too
    assert cached_files(_cache) == built, "the second load rebuilt the cache"
    assert second.pixels.is_shared() and second.pixels.device.type == "cpu"
    assert torch.equal(first.pixels, second.pixels)
    assert second.split_counts == (12,) * 10
    files = imagenet.list_split("imagenette", imagenet.IMAGENETTE, imagenette_tree, "train").files
    for row in (0, 13, 119):  # first file, a middle class, last file: rows follow the listing
        assert np.array_equal(second.pixels[row].numpy(), reference_pixels(imagenette_tree / files[row], 128))
    assert second.labels.tolist() == [c for c in range(10) for _ in range(12)]
    manifest = json.loads(next(_cache.glob("*.json")).read_text())
    assert manifest["shape"] == [120, 3, 128, 128] and manifest["source"] == str(imagenette_tree)


def test_a_changed_added_or_removed_file_rebuilds_and_the_stale_cache_goes(tmp_path, _cache):
    wnids = imagenet.IMAGENETTE[:3]
    root = make_tree(tmp_path / "tree", wnids, train=6, val=2)
    load = lambda: imagenet.decoded_split("imagenette", wnids, root, "train", 32)  # noqa: E731
    pixels, _ = load()
    before = cached_files(_cache)

    changed = root / "train" / wnids[1] / f"{wnids[1]}_2.JPEG"
    Image.fromarray(np.full((50, 70, 3), 200, np.uint8)).save(changed)
    pixels_after, _ = load()
    after = cached_files(_cache)
    assert after.keys().isdisjoint(before.keys()) and len(after) == 2, "a new key, and the stale cache removed"
    row = 6 + 2
    assert np.array_equal(pixels_after[row].numpy(), reference_pixels(changed, 32))
    assert not torch.equal(pixels_after[row], pixels[row])
    assert torch.equal(pixels_after[:row], pixels[:row]) and torch.equal(pixels_after[row + 1:], pixels[row + 1:])

    shutil.copy(changed, root / "train" / wnids[0] / "zz_extra.JPEG")
    pixels_added, labels_added = load()
    assert len(pixels_added) == 19 and labels_added.tolist().count(0) == 7
    (root / "train" / wnids[2] / f"{wnids[2]}_0.JPEG").unlink()
    assert len(load()[0]) == 18
    assert len(cached_files(_cache)) == 2


@pytest.mark.parametrize("damage", ["truncated data", "no manifest", "wrong shape", "other key"])
def test_a_partial_or_mismatching_cache_is_rebuilt(tmp_path, _cache, damage):
    wnids = imagenet.IMAGENETTE[:2]
    root = make_tree(tmp_path / "tree", wnids, train=3, val=1)
    good, _ = imagenet.decoded_split("imagenette", wnids, root, "train", 16)
    good = good.clone()
    data, manifest = next(_cache.glob("*.u8")), next(_cache.glob("*.json"))
    (_cache / f".{data.name}.4242.tmp").write_bytes(b"left by a killed build")
    if damage == "truncated data":
        with open(data, "r+b") as fh:
            fh.truncate(data.stat().st_size // 2)
    elif damage == "no manifest":
        manifest.unlink()
    else:
        fields = json.loads(manifest.read_text())
        fields.update({"shape": [5, 3, 16, 16]} if damage == "wrong shape" else {"key": "0" * 64})
        manifest.write_text(json.dumps(fields))
    entry = decoded_cache.cache_entry("imagenette", "train", imagenet.list_split("imagenette", wnids, root, "train"), 16)
    assert not entry.valid()
    rebuilt, _ = imagenet.decoded_split("imagenette", wnids, root, "train", 16)
    assert entry.valid() and torch.equal(rebuilt, good)
    assert not list(_cache.glob(".*.tmp")), "the killed build's temporary file was removed"


def test_decoding_processes_write_the_same_bytes_as_one_process(tmp_path, monkeypatch):
    wnids = imagenet.IMAGENETTE[:2]
    root = make_tree(tmp_path / "tree", wnids, train=40, val=1)  # 80 images: 3 chunks of 32
    listing = imagenet.list_split("imagenette", wnids, root, "train")
    entries = {}
    for workers in (1, 2):
        monkeypatch.setenv("DISTILLKIT_IMAGE_CACHE", str(tmp_path / f"cache{workers}"))
        entries[workers] = decoded_cache.ensure_cache("imagenette", "train", listing, 24, workers=workers)
    assert entries[1].data.read_bytes() == entries[2].data.read_bytes()


def test_flat_val_with_kaggle_labels_equals_class_folders(imagenette_tree, tmp_path):
    flat = tmp_path / "flat"
    shutil.copytree(imagenette_tree / "train", flat / "train")
    (flat / "val").mkdir()
    lines = ["ImageId,PredictionString"]
    for wnid in imagenet.IMAGENETTE:
        for path in sorted((imagenette_tree / "val" / wnid).iterdir()):
            shutil.copy2(path, flat / "val" / path.name)
            lines.append(f"{path.stem},{wnid} 1 2 30 40 {wnid} 5 6 70 80")
    lines.append("ILSVRC2012_val_00000001,n09999999 1 2 3 4")  # another class: ignored
    (flat / imagenet.VAL_LABELS).write_text("\n".join(lines) + "\n")
    spec = registry.create("datasets", "imagenette", size=32)
    folders, flat_split = load_split(spec, imagenette_tree, train=False), load_split(spec, flat, train=False)
    assert torch.equal(folders.labels, flat_split.labels) and torch.equal(folders.pixels, flat_split.pixels)


def test_missing_folders_are_named(tmp_path, imagenette_tree):
    spec = registry.create("datasets", "imagenette", size=32)
    with pytest.raises(UsageError, match=r"neither .*/train nor .*/imagenet/train exists"):
        load_split(spec, tmp_path, train=True)
    partial = make_tree(tmp_path / "partial", imagenet.IMAGENETTE[:7], train=1, val=0)
    with pytest.raises(UsageError, match=r"lacks 3 of its 10 class folders \(n03425413, n03445777, n03888257\)"):
        load_split(spec, partial, train=True)
    with pytest.raises(UsageError, match=r"val lacks 3 of .*, and no flat val/ with .*LOC_val_solution\.csv"):
        load_split(spec, partial, train=False)
    empty_val = make_tree(tmp_path / "empty", imagenet.IMAGENETTE, train=1, val=0)
    with pytest.raises(UsageError, match="no val images of class n01440764"):
        load_split(spec, empty_val, train=False)
    bad = tmp_path / "bad"
    shutil.copytree(imagenette_tree, bad)
    (bad / "train" / imagenet.IMAGENETTE[4] / "broken.JPEG").write_bytes(b"not a jpeg")
    with pytest.raises(UsageError, match=r"cannot decode .*broken\.JPEG"):
        load_split(spec, bad, train=True)


def test_memory_mapped_sampling_equals_in_memory_sampling(tmp_path):
    """MNIST in memory (as before) and the same pixels memory-mapped give the same bits, equal to
    normalising the whole split first (the former path)."""
    spec = registry.create("datasets", "mnist")
    in_memory = load_split(spec, resolve_root(), train=True)
    pixels, labels = in_memory.pixels[:3000], in_memory.labels[:3000]
    path = tmp_path / "mnist.u8"
    path.write_bytes(pixels.contiguous().numpy().tobytes())
    mapped_pixels = torch.from_file(str(path), shared=False, size=pixels.numel(), dtype=torch.uint8).view(pixels.shape)
    plain = RealData(in_memory.spec, pixels.clone(), labels, spec.class_names)
    mapped = RealData(in_memory.spec, mapped_pixels, labels, spec.class_names)
    assert mapped.pixels.is_shared() and not plain.pixels.is_shared()
    whole = in_memory.spec.normalize(pixels.float().div_(255))  # the former RealData.images
    for label in (0, 7):
        g1, g2 = torch.Generator().manual_seed(label), torch.Generator().manual_seed(label)
        rows = plain.sample_indices(label, 64, torch.Generator().manual_seed(label))
        assert torch.equal(plain.sample(label, 64, g1), mapped.sample(label, 64, g2))
        assert torch.equal(mapped.sample(label, 64, torch.Generator().manual_seed(label)), whole[rows])
        assert torch.equal(plain.class_images(label), mapped.class_images(label))
        assert torch.equal(mapped.class_images(label), whole[labels == label])
    assert torch.equal(mapped.images[:5], whole[:5]) and torch.equal(mapped.images[3], whole[3])
    assert mapped.images.shape == whole.shape and len(mapped.images) == len(whole)
    full = mapped.as_training_set()
    assert torch.equal(full.images, whole) and torch.equal(full.labels, labels)

    shard = mapped.restricted([1, 4], "cpu")
    assert shard.pixels.data_ptr() == mapped.pixels.data_ptr(), "a class shard shares the mapped pixels"
    assert shard.split_counts == mapped.split_counts and shard.count(1) == mapped.count(1) and shard.count(2) == 0
    assert torch.equal(shard.images[:], whole[(labels == 1) | (labels == 4)])
    with pytest.raises(AttributeError):
        mapped.images.float()  # no whole-split operation exists


def test_resnetap10_follows_idc():
    from distillkit.models import create_model
    from distillkit.zoo.resnetap import ResNetAP

    def expected_parameters(stem_kernel: int, classes: int = 10) -> int:
        """IDC's ResNetAP-10: stem conv + norm, one BasicBlock per stage (64-512), shortcut conv + norm when
        the width changes, linear head; no conv biases under a norm."""
        stem = 3 * 64 * stem_kernel ** 2 + 2 * 64
        blocks = 0
        for cin, cout in ((64, 64), (64, 128), (128, 256), (256, 512)):
            blocks += 9 * cin * cout + 9 * cout * cout + 4 * cout + (cin * cout + 2 * cout if cin != cout else 0)
        return stem + blocks + 512 * classes + classes

    for size, stem_kernel, pool, maps in ((32, 3, None, 4), (128, 3, 2, 8), (224, 7, 4, 7)):
        model = ResNetAP(10, 3, size)
        assert model.stem[0].kernel_size == (stem_kernel, stem_kernel)
        assert (model.stem[3].kernel_size if pool else None) == pool
        assert sum(p.numel() for p in model.parameters()) == expected_parameters(stem_kernel)
        assert model.forward_features(torch.zeros(1, 3, size, size)).shape == (1, 512, maps, maps)
    norms = [m for m in ResNetAP(10, 3, 64).modules() if isinstance(m, torch.nn.GroupNorm)]
    assert norms and all(m.num_groups == m.num_channels and m.affine for m in norms)  # instance norm
    spec = registry.create("datasets", "imagenette", size=64).image_spec
    assert create_model("resnetap10", spec)(torch.zeros(2, 3, 64, 64)).shape == (2, 10)


def test_factor_3_decodes_nine_tiles_per_image_at_128_px(imagenette_tree):
    spec = registry.create("datasets", "imagenette", size=128)
    real = load_split(spec, imagenette_tree, train=True)
    param = registry.create("parameterizations", "factor", spec=real.spec, ipc=1, device="cpu", factor=3)
    param.init(real, torch.Generator().manual_seed(0))
    assert param.tile == (43, 43)  # ceil(128 / 3), the bottom/right padded with grey
    decoded = param.decode([0, 5])
    assert decoded.shape == (2, 9, 3, 128, 128) and torch.isfinite(decoded).all()
    firsts = real.spec.denormalize(real.class_images(5)[:9])  # "mix": the class's first 9 images, in order
    own = (real.spec.denormalize(decoded[1]) - firsts).abs().mean(dim=(1, 2, 3))  # ~0.05: blur only
    other = (real.spec.denormalize(decoded[0]) - firsts).abs().mean(dim=(1, 2, 3))  # ~0.28: another class
    assert own.max() < 0.1 < other.min()


def test_distill_m3d_and_evaluate_resnetap10_end_to_end(imagenette_tree, tmp_path, _cache):
    distill = ["distill", "--method", "m3d", "--dataset", "imagenette", "--data-root", imagenette_tree.parent,
               "--set", "dataset.size=32", "--set", "parameterization.factor=3", "--ipc", "1", "--iterations", "1",
               "--batch-real", "6", "--device", "cpu"]
    run_cli(*distill, "--out", tmp_path / "run")
    built = cached_files(_cache)
    run_cli(*distill, "--out", tmp_path / "again")  # a second run maps the cache, decodes nothing
    assert cached_files(_cache) == built
    assert torch.equal(load_synthetic(tmp_path / "run").images, load_synthetic(tmp_path / "again").images)
    run_cli("evaluate", tmp_path / "run", "--models", "resnetap10", "--protocol", "smoke", "--epochs", "1",
            "--runs", "1", "--device", "cpu", "--data-root", imagenette_tree.parent)
    report = json.loads((tmp_path / "run" / "eval.json").read_text())
    rows = {row["kind"]: row for row in report["results"]}
    assert set(rows) == {"synthetic", "random-baseline"} and rows["synthetic"]["model"] == "resnetap10"
    assert rows["synthetic"]["train_images"] == 10 * 9  # IPC 1, factor 3: nine decoded images per class
    assert all(0 <= a <= 100 for row in rows.values() for a in row["accuracies"])
    assert len(cached_files(_cache)) == 4  # train and val, each a data file and a manifest
