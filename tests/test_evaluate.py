"""Evaluation engine: stacked runs equal run-by-run runs, no device read-back while training, protocols are data
(settings in every result, third-party protocols through a plugin), the CLI globs models and adds baselines."""

from __future__ import annotations

import copy
import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch

from distillkit import registry
from distillkit.errors import UsageError
from distillkit.stacking import SingleRun, StackedRuns
from distillkit.evaluate import random_subset, resolve_protocol
from distillkit.interfaces import TrainingSet
from distillkit.seeding import seeded
from distillkit.models import builder, create_model

from distillkit.data import load_split
from tests.conftest import DATA, TEST_PLUGINS, refused, run_cli

FALLBACK = "runs train one by one"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def mnist():
    from distillkit.data import load_split

    dataset = registry.create("datasets", "mnist")
    real = load_split(dataset, DATA, train=True)
    test = load_split(dataset, DATA, train=False).as_training_set()
    return dataset.image_spec, random_subset(real, 2, seed=5), TrainingSet(test.images[:300], test.labels[:300])


def _nets(model: str, spec, runs: int) -> list[torch.nn.Module]:
    """``runs`` seeded networks; ``convnet_bn_w32`` is a narrow batch-norm ConvNet-3 (cheap BN coverage)."""
    from distillkit.zoo.convnet import ConvNet

    nets = []
    for r in range(runs):
        with seeded(1, "init", r):
            nets.append(ConvNet(spec.num_classes, spec.channels, spec.height, width=32, norm="batch")
                        if model == "convnet_bn_w32" else create_model(model, spec))
    return nets


@pytest.mark.parametrize("protocol,model", [("dc-classic", "convnet3_w32"), ("idc", "convnet3_w32"),
                                            ("dc-classic", "convnet_bn_w32")])
def test_stacked_and_sequential_runs_agree(mnist, protocol, model):
    """Same seeds -> same trained weights and batch-norm statistics (to float rounding), CutMix included; 20 images
    in batches of 8 exercise the partial last batch. Then the public path: the same test accuracies."""
    spec, train, test = mnist
    proto = resolve_protocol(protocol, epochs=3, batch_size=8)
    models = _nets(model, spec, 3)
    stacked = StackedRuns(copy.deepcopy(models), compile=False)
    proto._train(stacked, [0, 1, 2], train, 1, model)
    for r, m in enumerate(models):
        proto._train(SingleRun(m, compile=False), [r], train, 1, model)
        for name, p in m.named_parameters():
            torch.testing.assert_close(stacked.params[name][r], p.detach(), atol=2e-4, rtol=1e-3)
        for name, b in m.named_buffers():
            torch.testing.assert_close(stacked.buffers[name][r], b, atol=2e-4, rtol=1e-3)
    if model not in registry.plugins()["models"]:
        return

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        together = proto.with_overrides(stacked=True).evaluate(builder(model, spec), train, test, spec, range(3), 1, "cpu")
    assert not [w for w in caught if FALLBACK in str(w.message)]  # the stacked path really ran
    one_by_one = proto.with_overrides(stacked=False).evaluate(builder(model, spec), train, test, spec, range(3), 1, "cpu")
    assert max(abs(a - b) for a, b in zip(together, one_by_one)) <= 100 / len(test.labels) + 1e-9
    assert all(a > 10 for a in together)  # 3 epochs on 20 real digits already beat chance


@pytest.mark.parametrize("protocol", ["dc-classic", "idc"])
def test_training_loop_never_reads_the_device_back(protocol):
    """On the meta device any read-back (.item(), .tolist(), bool(), data-dependent shapes) raises: training there
    proves the loop only queues work for the device."""
    spec = registry.create("datasets", "mnist").image_spec
    train = TrainingSet(torch.randn(20, 1, 28, 28, device="meta"), torch.zeros(20, dtype=torch.long, device="meta"))
    proto = resolve_protocol(protocol, epochs=2, batch_size=8)
    models = [create_model("convnet3_w32", spec).to("meta") for _ in range(2)]
    proto._train(StackedRuns(models, compile=False), [0, 1], train, 0, "convnet3_w32")
    proto._train(SingleRun(models[0], compile=False), [0], train, 0, "convnet3_w32")
    with pytest.raises(Exception):  # the probe works: a read-back on meta fails
        torch.zeros(1, device="meta").item()


ITEM_NET = '''
import torch
from torch import nn
from distillkit import hookimpl


class ItemNet(nn.Module):
    """Its forward reads a value back (.item()), which vmap cannot batch."""

    def __init__(self, num_classes=10, in_chans=1, img_size=28):
        super().__init__()
        h, w = (img_size, img_size) if isinstance(img_size, int) else img_size
        self.fc = nn.Linear(in_chans * h * w, num_classes)

    def forward(self, x):
        return self.fc(x.flatten(1)) / max(1.0, x.abs().max().item())


@hookimpl
def register_models(register):
    register("itemnet", ItemNet)
'''


DROP_NET = '''
from torch import nn
from distillkit import hookimpl


class DropNet(nn.Module):
    """A linear classifier behind dropout: its training forward draws random numbers."""

    def __init__(self, num_classes=10, in_chans=1, img_size=28):
        super().__init__()
        h, w = (img_size, img_size) if isinstance(img_size, int) else img_size
        self.body = nn.Sequential(nn.Flatten(), nn.Dropout(0.5), nn.Linear(in_chans * h * w, num_classes))

    def forward(self, x):
        return self.body(x)


@hookimpl
def register_models(register):
    register("dropnet", DropNet)
'''


@pytest.mark.parametrize(("name", "source", "runs", "why"), [
    ("itemnet", ITEM_NET, 2, ""),  # vmap cannot batch its forward
    # stacked dropout would draw every run's masks from one stream
    ("dropnet", DROP_NET, 3, ": its training forward draws random"),
])
def test_a_model_that_cannot_stack_trains_run_by_run(mnist, tmp_path, name, source, runs, why):
    spec, train, test = mnist
    (tmp_path / f"{name}.py").write_text(source)
    registry.load_plugins(tmp_path)
    proto = resolve_protocol("smoke", epochs=2)
    with pytest.warns(UserWarning, match=f"{name}: {FALLBACK}{why}"):
        forced = proto.with_overrides(stacked=True).evaluate(builder(name, spec), train, test, spec, range(runs), 0, "cpu")
    assert forced == proto.with_overrides(stacked=False).evaluate(builder(name, spec), train, test, spec, range(runs), 0, "cpu")


@pytest.mark.parametrize("stacked", [False, True])
def test_a_run_depends_only_on_its_own_id(mnist, stacked):
    """The contract torchrun sharding relies on: run 2 alone scores what it scores beside runs 0 and 1."""
    spec, train, test = mnist
    proto = resolve_protocol("smoke", epochs=2, stacked=stacked)
    together = proto.evaluate(builder("convnet3_w32", spec), train, test, spec, range(3), 4, "cpu")
    alone = proto.evaluate(builder("convnet3_w32", spec), train, test, spec, [2], 4, "cpu")
    pair = proto.evaluate(builder("convnet3_w32", spec), train, test, spec, [2, 0], 4, "cpu")
    if stacked:  # float rounding of the batched kernels: at most one test image
        tolerance = 100 / len(test.labels) + 1e-9
        assert abs(alone[0] - together[2]) <= tolerance and abs(pair[1] - together[0]) <= tolerance
    else:
        assert alone == together[2:] and pair == [together[2], together[0]]
    assert len(set(together)) > 1  # the runs differ: each has its own seed


def test_the_test_batch_changes_speed_not_accuracy(mnist):
    """The CPU tests in cache-sized batches by default; any batch gives the same accuracies."""
    spec, train, test = mnist
    proto = resolve_protocol("smoke", epochs=2, stacked=False)
    default = proto.evaluate(builder("convnet3_w32", spec), train, test, spec, range(2), 0, "cpu")
    for batch in (7, 100_000):
        assert proto.with_overrides(test_batch=batch).evaluate(builder("convnet3_w32", spec), train, test, spec, range(2), 0,
                                                               "cpu") == default


def test_protocol_settings_and_engine_are_kept_apart():
    proto = resolve_protocol("dc-classic", epochs=7, stacked=True)
    settings = proto.settings()
    assert settings["epochs"] == 7 and settings["lr"] == 0.01 and settings["milestones"] == [0.5]
    assert not {"stacked", "compile", "test_batch"} & set(settings)
    assert proto.speed_settings("cpu")["stacked"] is True
    assert resolve_protocol("dc-classic").speed_settings("cpu")["stacked"] is False  # default: run by run on the CPU
    assert resolve_protocol("dc-classic").speed_settings("cuda")["stacked"] is True
    with pytest.raises(UsageError, match="has no setting 'epoch'"):
        resolve_protocol("dc-classic", epoch=3)
    with pytest.raises(UsageError, match="--epochs must be positive"):
        resolve_protocol("smoke", epochs=0)


def test_cli_evaluate_globs_models_records_settings_and_baselines(tiny_dm_run, tmp_path):
    run_dir = tmp_path / "run"

    shutil.copytree(tiny_dm_run, run_dir)
    args = ["evaluate", run_dir, "--protocol", "smoke", "--models", "convnet3_w3*,lenet", "--runs", "2",
            "--test-limit", "200", "--device", "cpu"]
    out = run_cli(*args, "--epochs", "2").output
    assert "convnet3_w32" in out and "lenet" in out and "random baseline" in out

    report = json.loads((run_dir / "eval.json").read_text())
    rows = report["results"]
    assert {(r["model"], r["kind"]) for r in rows} == {(m, k) for m in ("convnet3_w32", "lenet")
                                                         for k in ("synthetic", "random-baseline")}
    smoke = registry.create("protocols", "smoke").settings()
    for row in rows:
        assert row["protocol"] == "smoke" and row["protocol_settings"] == {**smoke, "epochs": 2, "test_limit": 200}
        assert row["speed_settings"]["stacked"] is False and len(row["accuracies"]) == 2 and row["train_images"] == 10
    csv = (run_dir / "eval.csv").read_text().splitlines()
    assert csv[0].startswith("model,kind,protocol") and len(csv) == 5

    # the same protocol computed stacked gives the same numbers; in a fresh copy, since in run_dir the rows are
    # reused: how a result is computed (speed settings) is not part of what it is
    assert "reused from eval.json" in run_cli(*args, "--epochs", "2", "--stacked").output
    stacked = tmp_path / "stacked"
    shutil.copytree(tiny_dm_run, stacked)
    run_cli(*[stacked if a == run_dir else a for a in args], "--epochs", "2", "--stacked")
    again = json.loads((stacked / "eval.json").read_text())["results"]
    assert len(again) == 4 and all(r["speed_settings"]["stacked"] for r in again)
    before = {(r["model"], r["kind"]): r["accuracies"] for r in rows}
    for r in again:
        assert max(abs(a - b) for a, b in zip(r["accuracies"], before[(r["model"], r["kind"])])) <= 0.5 + 1e-9
    # other settings are another protocol: kept side by side
    run_cli(*args, "--epochs", "3")
    assert len(json.loads((run_dir / "eval.json").read_text())["results"]) == 8


def test_a_third_party_protocol_plugs_in(tiny_dm_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_dm_run, run_dir)
    listed = run_cli("--plugins-dir", TEST_PLUGINS, "list", "protocols").output
    assert "nearest-mean" in listed
    run_cli("--plugins-dir", TEST_PLUGINS, "evaluate", run_dir, "--protocol", "nearest-mean", "--runs", "2",
            "--device", "cpu")
    rows = json.loads((Path(run_dir) / "eval.json").read_text())["results"]
    assert {r["kind"] for r in rows} == {"synthetic", "random-baseline"}
    for row in rows:
        assert row["protocol"] == "nearest-mean" and row["protocol_settings"] == {
            "space": "pixels", "metric": "euclidean", "means_from": "synthetic"}
        assert row["speed_settings"] == {} and len(row["accuracies"]) == 2 and row["mean"] > 10  # above chance


def test_evaluate_set_reaches_the_protocol_and_the_protocol_sees_the_training_split(tiny_dm_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_dm_run, run_dir)
    evaluate = ("--plugins-dir", TEST_PLUGINS, "evaluate", run_dir, "--protocol", "nearest-mean", "--runs", "1",
                "--device", "cpu", "--no-baseline")
    run_cli(*evaluate, "--set", "protocol.metric=cosine", "--set", "protocol.means_from=train")
    row, = json.loads((run_dir / "eval.json").read_text())["results"]
    assert row["protocol_settings"] == {"space": "pixels", "metric": "cosine", "means_from": "train"}
    # the class means of the whole real split (the data context's, not the synthetic set's) classify the
    # test images as the same means computed here do
    spec = registry.create("datasets", "mnist")
    real, test = (load_split(spec, DATA, train=t) for t in (True, False))
    test = test.as_training_set()
    means = torch.nn.functional.normalize(
        torch.stack([real.class_images(c).mean(0) for c in range(10)]).flatten(1), dim=1)
    guess = (torch.nn.functional.normalize(test.images.flatten(1), dim=1) @ means.T).argmax(1)
    assert row["mean"] == pytest.approx(float((guess == test.labels).double().mean() * 100))
    refused(*evaluate, "--set", "protocol.colour=red", says="nearest-mean has no option 'colour'; choose from")
    refused(*evaluate, "--set", "protocol.metric=manhattan", says="unknown metric 'manhattan'; choose one of")
    refused(*evaluate, "--set", "objective.kernel=linear", says="unknown component 'objective'; choose one of: "
                                                               "protocol")
    refused(*evaluate, "--epochs", "3", "--set", "protocol.epochs=4",
            says="--epochs 3 and --set protocol.epochs=4 disagree; give one")
    # a built-in protocol's option through --set alone, and beside its equal shortcut: one setting
    dc = ("--plugins-dir", TEST_PLUGINS, "evaluate", run_dir, "--runs", "1", "--device", "cpu", "--no-baseline",
          "--test-limit", "50")
    run_cli(*dc, "--set", "protocol.epochs=1")
    run_cli(*dc, "--set", "protocol.epochs=1", "--epochs", "1", "--set", "protocol.lr=0.02")
    rows = json.loads((run_dir / "eval.json").read_text())["results"]
    assert sorted((r["protocol"], r["protocol_settings"]["epochs"], r["protocol_settings"]["lr"]) for r in rows
                  if r["protocol"] == "dc-classic") == [("dc-classic", 1, 0.01), ("dc-classic", 1, 0.02)]
    # the shortcut and the option are one setting of the built-in protocols
    assert resolve_protocol("dc-classic", epochs=7).settings() == registry.create(
        "protocols", "dc-classic").with_overrides(epochs=7).settings()


def test_protocols_count_epochs_and_milestones_as_their_references():
    dc, idc = registry.create("protocols", "dc-classic"), registry.create("protocols", "idc")
    # DC's evaluate_synset: range(E + 1) epochs, lr x0.1 after epoch E//2 + 1 (so from epoch E//2 + 2)
    assert dc.epoch_plan() == (1001, [502])
    assert dc.with_overrides(epochs=2).epoch_plan() == (3, [3])  # the decay falls after the last epoch
    assert dc.with_overrides(epochs=301).epoch_plan() == (302, [152])
    # IDC's MultiStepLR([2 * E // 3, 5 * E // 6]): floored, exactly (2/3 of 300 is 200)
    assert idc.epoch_plan() == (1000, [666, 833])
    assert idc.with_overrides(epochs=300).epoch_plan() == (300, [200, 250])
    assert idc.with_overrides(epochs=400).epoch_plan() == (400, [266, 333])
    with pytest.raises(UsageError, match="unknown schedule"):
        dc.with_overrides(schedule="cosine")


def test_idc_drops_flips_on_digit_datasets_and_records_the_strategy_it_used(tiny_dm_run, tmp_path):
    idc = registry.create("protocols", "idc")
    assert idc.for_dataset("mnist").augment_strategy == "color_crop_scale_rotate"
    assert idc.for_dataset("svhn").settings()["augment_strategy"] == "color_crop_scale_rotate"
    assert idc.for_dataset("fashionmnist") == idc and idc.for_dataset("cifar10") == idc  # IDC keeps flip there
    dc = registry.create("protocols", "dc-classic")
    assert dc.for_dataset("mnist") == dc
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_dm_run, run_dir)
    run_cli("evaluate", run_dir, "--protocol", "idc", "--epochs", "1", "--runs", "1", "--test-limit", "50",
            "--no-baseline", "--device", "cpu")
    (row,) = json.loads((run_dir / "eval.json").read_text())["results"]
    assert row["protocol_settings"]["augment_strategy"] == "color_crop_scale_rotate"
    assert row["protocol_settings"]["schedule"] == "floor"


def test_idc_imagenet_epoch_rule_follows_idc_ipc_epoch():
    from distillkit.engine import idc_imagenet_epochs

    table = {1: 3000, 2: 2000, 10: 2000, 11: 1500, 50: 1500, 90: 1000, 200: 1000, 500: 500, 501: 300, 4000: 300}
    assert {ipc: idc_imagenet_epochs(ipc, 10) for ipc in table} == table
    # 100 classes: two thirds, floored to whole hundreds
    assert [idc_imagenet_epochs(ipc, 100) for ipc in (1, 10, 50, 200, 500, 501)] == [2000, 1300, 1000, 600, 300, 200]
    assert idc_imagenet_epochs(10, 1000) == 2000  # IDC scales exactly 100 classes, no other count
    idc = registry.create("protocols", "idc").with_overrides(epoch_rule="idc-imagenet")
    assert idc.epochs_for(10 * 90, 10) == 1000 and idc.epochs_for(100 * 10 + 99, 100) == 1300  # len(train) // classes
    assert registry.create("protocols", "idc").epochs_for(10, 10) == 1000  # fixed: the protocol's epochs
    with pytest.raises(UsageError, match="unknown epoch_rule 'idc'.*fixed, idc-imagenet"):
        idc.with_overrides(epoch_rule="idc")


def test_idc_takes_its_imagenet_settings_on_imagenet_subsets_unless_epochs_are_given(mnist):
    idc = registry.create("protocols", "idc")
    for name in ("imagenette", "imagewoof", "imagenet10", "imagenet100"):
        on = idc.for_dataset(name)
        assert (on.epoch_rule, on.cutmix_prob) == ("idc-imagenet", 1.0)
        assert on.settings()["epoch_rule"] == "idc-imagenet" and on.settings()["epochs"] is None
    assert idc.for_dataset("cifar10") == idc and idc.settings()["epochs"] == 1000
    assert idc.settings()["epoch_rule"] == "fixed" and idc.settings()["cutmix_prob"] == 0.5
    assert registry.create("protocols", "dc-classic").for_dataset("imagenette").epoch_rule == "fixed"
    # an explicit --epochs wins, before for_dataset (the CLI's order) or after it
    given = resolve_protocol("idc", epochs=5).for_dataset("imagenette")
    assert (given.epoch_rule, given.epochs, given.cutmix_prob) == ("fixed", 5, 1.0)
    assert given.settings()["epochs"] == 5 and given.epochs_for(10_000, 10) == 5
    after = idc.for_dataset("imagenette").with_overrides(epochs=7)
    assert (after.epoch_rule, after.settings()["epochs"]) == ("fixed", 7)
    assert resolve_protocol("idc", cutmix_prob=0.25).for_dataset("imagenet10").cutmix_prob == 0.25
    # evaluate consults the rule on the set it is given: fewer images than classes is no set to train on
    spec, train, test = mnist
    rule = idc.with_overrides(epoch_rule="idc-imagenet")
    few = TrainingSet(train.images[:3], train.labels[:3])
    with pytest.raises(UsageError, match="at least one training image per class, got 0"):
        rule.evaluate(builder("convnet3_w32", spec), few, test, spec, [0], 0, "cpu")


def _ops(draws, runs: int, epochs: int, n: int) -> torch.Tensor:
    """Which op each (run, epoch, position) drew: colour, geometric, cutout flags and the geometric kind."""
    p = draws.augment
    theta = p.theta
    kind = (theta[:, 0, 1] != 0).long() * 2 + (theta[:, 0, 0] != 1).long()  # rotate 2+, scale 1, crop/none 0
    flags = torch.stack([p.color.long(), p.geometric.long(), p.cutout.long(), kind * p.geometric.long()], 1)
    return flags.view(runs, epochs, n, -1)


@pytest.mark.parametrize("name", ["dc-classic", "idc"])
def test_protocols_draw_one_augmentation_op_per_training_batch_as_the_references(name):
    from distillkit.augment import Augment
    from distillkit.eval_draws import draw

    proto = registry.create("protocols", name).with_overrides(batch_size=8)
    bounds = [(0, 8), (8, 16), (16, 20)]
    aug = Augment(proto.augment, proto.augment_strategy)
    ops = _ops(draw(proto, aug, [0, 1], 0, "convnet3", 0, 6, (28, 28), bounds, torch.device("cpu")), 2, 6, 20)
    for s, e in bounds:  # every sample of a batch drew the batch's op ...
        assert (ops[:, :, s:e] == ops[:, :, s:s + 1]).all()
    assert len({tuple(ops[r, k, s].tolist()) for r in range(2) for k in range(6) for s, _ in bounds}) > 1  # ... not one op
    per_sample = proto.with_overrides(op_per="sample")
    mixed = _ops(draw(per_sample, aug, [0, 1], 0, "convnet3", 0, 6, (28, 28), bounds, torch.device("cpu")), 2, 6, 20)
    assert any((mixed[:, :, s:e] != mixed[:, :, s:s + 1]).any() for s, e in bounds)
    assert proto.settings()["op_per"] == "batch" and per_sample.settings()["op_per"] == "sample"
