"""The host toolkit: plugin discovery, registries, interfaces, augmentation, the condense loop, artifacts, CLI."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from distillkit import registry
from distillkit.augment import Augment
from distillkit.config import parse_sets, resolve
from distillkit.condense import Condenser
from distillkit.data import load_split, resolve_root
from distillkit.errors import ComponentError, UsageError
from distillkit.interfaces import Objective, Parameterization, Sampler
from tests.conftest import run_cli


@pytest.fixture(scope="module")
def mnist():
    from distillkit.registry import create

    registry.load_plugins()
    return load_split(create("datasets", "mnist"), resolve_root(), train=True)


# -- plugins and registries ---------------------------------------------------

def test_builtin_methods_arrive_through_entry_points():
    import importlib.metadata as md

    names = {ep.name for ep in md.entry_points(group="distillkit")}
    assert {"dm", "m3d"} <= names
    plugins = registry.plugins()
    assert plugins["methods"].get("dm").plugin == "dm"
    assert plugins["objectives"].get("mean").plugin == "dm"
    assert plugins["datasets"].get("mnist").plugin == "distillkit"  # the host's own default plugin


def test_plugin_defined_in_the_test_suite_registers_components(tmp_path):
    (tmp_path / "halfmean.py").write_text(
        "from distillkit import hookimpl\n"
        "class Half:\n"
        "    def __call__(self, real, syn):\n"
        "        return 0.5 * (real.mean(1) - syn.mean(1)).pow(2).sum(-1)\n"
        "@hookimpl\n"
        "def register_objectives(register):\n"
        "    register('half-mean', Half)\n")
    plugins = registry.load_plugins(tmp_path)
    objective = plugins["objectives"].create("half-mean")
    assert isinstance(objective, Objective)
    real, syn = torch.ones(2, 3, 4), torch.zeros(2, 5, 4)
    assert torch.allclose(objective(real, syn), torch.full((2,), 2.0))
    result = run_cli("--plugins-dir", tmp_path, "list", "objectives")
    assert "half-mean" in result.output and "halfmean" in result.output


def test_unknown_names_fail_with_the_valid_choices():
    with pytest.raises(UsageError, match=r"unknown objective 'nope'; choose one of: .*mean"):
        registry.create("objectives", "nope")
    result = run_cli("distill", "--method", "nope", expect=2)
    assert result.output.strip().count("\n") == 0
    assert "unknown method 'nope'" in result.output and "dm" in result.output
    assert "Traceback" not in result.output


def test_duplicate_registration_names_both_plugins(tmp_path):
    (tmp_path / "dup.py").write_text(
        "from distillkit import hookimpl\n"
        "@hookimpl\n"
        "def register_objectives(register):\n"
        "    register('mean', object)\n")
    with pytest.raises(UsageError, match="registered twice: by 'dm' and by 'dup'"):
        registry.load_plugins(tmp_path)


# -- config ---------------------------------------------------------------------

def test_component_options_follow_their_component():
    dm = registry.create("methods", "dm")
    custom = replace(dm, objective_options={"scale": 2})
    cfg = resolve(custom, "mnist", 1, {}, parse_sets(["sampler.model=convnet3_w32"]))
    assert cfg.objective_options == {"scale": 2} and cfg.sampler_options == {"model": "convnet3_w32"}
    swapped = resolve(custom, "mnist", 1, {"objective": "other"})
    assert swapped.objective == "other" and swapped.objective_options == {}
    with pytest.raises(UsageError, match="--ipc must be a positive"):
        resolve(dm, "mnist", 0, {})
    with pytest.raises(UsageError, match="expected COMPONENT.OPTION=VALUE"):
        parse_sets(["kernel=linear"])


# -- interfaces: the DM components --------------------------------------------

def test_dm_components_implement_the_interfaces(mnist):
    spec = mnist.spec
    param = registry.create("parameterizations", "pixel", spec=spec, ipc=2, device=torch.device("cpu"))
    sampler = registry.create("samplers", "random-convnet", spec=spec, seed=0, device=torch.device("cpu"))
    assert isinstance(param, Parameterization) and isinstance(sampler, Sampler)
    param.init(mnist, torch.Generator().manual_seed(0))
    decoded = param.decode([3, 7])
    assert decoded.shape == (2, 2, 1, 28, 28)
    # pixel init copies real images of the right class
    real7 = mnist.class_images(7)
    assert any(torch.equal(decoded[1, 0], img) for img in real7)
    state = {k: v.clone() for k, v in param.state_dict().items()}
    other = registry.create("parameterizations", "pixel", spec=spec, ipc=2, device=torch.device("cpu"))
    other.load_state_dict(state)
    assert torch.equal(other.stored(), param.stored())
    # the sampler's networks are a pure function of (seed, iteration)
    x = decoded[0]
    assert torch.equal(sampler.extractor(5)(x), sampler.extractor(5)(x))
    assert not torch.equal(sampler.extractor(5)(x), sampler.extractor(6)(x))
    assert sampler.extractor(0)(x).shape == (2, 2048)


def test_mean_objective_is_the_squared_mean_gap():
    objective = registry.create("objectives", "mean")
    real = torch.tensor([[[1.0, 0.0], [3.0, 0.0]]])
    syn = torch.tensor([[[0.0, 1.0]]], requires_grad=True)
    loss = objective(real, syn)
    assert torch.allclose(loss, torch.tensor([4.0 + 1.0]))
    loss.sum().backward()
    assert syn.grad is not None and syn.grad.abs().sum() > 0


# -- augmentation -----------------------------------------------------------------

def test_siamese_augmentation_shares_parameters_within_a_group():
    aug = Augment("dsa", "color_crop_cutout_flip_scale_rotate")
    x = torch.randn(4, 3, 32, 32)
    batch = torch.cat([x, x])  # "real" copy and "synthetic" copy of the same images
    params = aug.draw(2, torch.Generator().manual_seed(1), 32, 32)
    group = torch.tensor([0, 0, 1, 1, 0, 0, 1, 1])
    out = aug.apply(batch, params, group)
    assert torch.equal(out[:4], out[4:])  # same group -> same op and parameters
    # applying to the two halves separately (as the loop does for real and synthetic) gives the same result
    assert torch.equal(aug.apply(x, params, group[:4]), out[:4])


def test_dsa_ops_do_what_they_say():
    x = torch.rand(1, 1, 28, 28)
    gen = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(60):
        params = Augment("dsa", "crop_cutout_flip").draw(1, gen, 28, 28)
        out = Augment("dsa", "crop_cutout_flip").apply(x, params, torch.zeros(1, dtype=torch.long))
        if params.flip.any():
            assert torch.equal(out, x.flip(-1)); seen.add("flip")
        elif params.cutout.any():
            zeroed = (out == 0) & (x != 0)
            assert 0 < zeroed.sum() <= 14 * 14; seen.add("cutout")
        elif params.geometric.any():
            dy, dx = (params.theta[0, 1, 2] * 14).round().long(), (params.theta[0, 0, 2] * 14).round().long()
            shifted = torch.roll(x, shifts=(-int(dy), -int(dx)), dims=(-2, -1))
            inner = out[..., 4:-4, 4:-4]
            assert torch.allclose(inner, shifted[..., 4:-4, 4:-4], atol=1e-5); seen.add("crop")
        else:
            assert torch.equal(out, x)  # a crop that drew no shift
    assert seen == {"flip", "cutout", "crop"}


def test_idc_mode_always_applies_flip_colour_and_cutout_and_one_geometric_op():
    params = Augment("idc", "color_crop_cutout_flip_scale_rotate").draw(200, torch.Generator().manual_seed(0), 32, 32)
    assert params.color.all() and params.cutout.all() and params.geometric.all()
    assert 0.3 < params.flip.float().mean() < 0.7
    assert not Augment("idc", "color_crop").draw(50, torch.Generator().manual_seed(0), 32, 32).cutout.any()
    with pytest.raises(UsageError, match="unknown augmentation op 'blur'"):
        Augment("dsa", "color_blur")


# -- the condense loop ------------------------------------------------------------

def _tiny_cfg(step: str = "iteration", **kw):
    dm = registry.create("methods", "dm")
    return resolve(dm, "mnist", 2, {"iterations": 3, "batch_real": 8, "step": step, **kw},
                   parse_sets(["sampler.model=convnet3_w32"]))


@pytest.mark.parametrize("step", ["iteration", "class"])
def test_condense_loop_moves_only_through_gradients_and_is_class_separable(mnist, step):
    cfg = _tiny_cfg(step)
    full = Condenser(cfg, mnist, torch.device("cpu"))
    full.initialize()
    start = full.param.stored().clone()
    losses = [full.run_iteration() for _ in range(3)]
    assert all(math.isfinite(float(l)) and float(l) > 0 for l in losses)
    assert not torch.equal(full.param.stored(), start)
    # a process owning only some classes produces exactly those classes' images (class sharding)
    half = Condenser(cfg, mnist, torch.device("cpu"), owned=[1, 4, 8])
    half.initialize()
    for _ in range(3):
        half.run_iteration()
    per_class = lambda p: p.param.stored().view(10, 2, 1, 28, 28)  # noqa: E731
    assert torch.equal(per_class(half)[[1, 4, 8]], per_class(full)[[1, 4, 8]])


def test_condense_state_round_trip_continues_identically(mnist):
    cfg = _tiny_cfg()
    a = Condenser(cfg, mnist, torch.device("cpu"))
    a.initialize()
    a.run_iteration()
    state = a.state_dict()
    b = Condenser(cfg, mnist, torch.device("cpu"))
    b.load_state_dict(state)
    a.run_iteration(); b.run_iteration()
    assert b.iteration == a.iteration == 2
    assert torch.equal(a.param.stored(), b.param.stored())


def test_features_in_small_forward_batches_are_the_same_features(mnist):
    """The CPU default embeds real and synthetic images a few dozen at a time (cache-sized activations): the
    same set as one call per forward.
    A batch-norm extractor, whose features depend on the batch, keeps one call."""
    def run(**kw):
        condenser = Condenser(_tiny_cfg(**kw), mnist, torch.device("cpu"))
        condenser.initialize()
        for _ in range(2):
            condenser.run_iteration()
        return condenser

    auto, one_call, odd = run(), run(forward_batch=10_000), run(forward_batch=7)
    assert auto.forward_batch == 16384 // (28 * 28) and odd.forward_batch == 7
    for other in (one_call, odd):
        torch.testing.assert_close(auto.param.stored(), other.param.stored(), rtol=1e-6, atol=1e-6)
    batch_norm = Condenser(resolve(registry.create("methods", "dm"), "mnist", 2, {"batch_real": 8},
                                   parse_sets(["sampler.model=convnet3_bn"])), mnist, torch.device("cpu"))
    assert batch_norm.forward_batch is None


def test_amp_runs_bf16_features_on_a_cpu_that_has_bf16_and_refuses_otherwise(mnist):
    cfg = _tiny_cfg(amp=True)
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        with pytest.raises(UsageError, match="no bf16 instructions"):
            Condenser(cfg, mnist, torch.device("cpu"))
        return
    runs = {}
    for amp in (False, True):
        condenser = Condenser(replace(cfg, amp=amp), mnist, torch.device("cpu"))
        condenser.initialize()
        start = condenser.param.stored().clone()
        condenser.run_iteration()
        runs[amp] = condenser.param.stored() - start
    assert not torch.equal(runs[True], runs[False])  # bf16 really ran
    cosine = torch.nn.functional.cosine_similarity(runs[True].flatten(), runs[False].flatten(), dim=0)
    assert cosine > 0.99  # ... and moved the images the way float32 does


# -- artifact and CLI ---------------------------------------------------------------

def test_artifact_is_self_describing_and_loads_weights_only(tiny_dm_run: Path):
    raw = torch.load(tiny_dm_run / "synthetic.pt", weights_only=True)
    assert raw["format"] == "distillkit.synthetic-set"
    assert raw["images"].shape == (10, 1, 28, 28) and raw["labels"].tolist() == list(range(10))
    assert raw["class_names"] == [str(i) for i in range(10)]
    assert raw["dataset"] == "mnist" and raw["method"] == "dm" and raw["ipc"] == 1 and raw["seed"] == 0
    assert raw["parameterization"] == "pixel" and torch.equal(raw["parameterization_state"]["images"], raw["images"])
    assert raw["config"]["iterations"] == 4 and raw["versions"]["torch"]
    assert raw["mean"] == [0.1307] and raw["channels"] == 1
    config = json.loads((tiny_dm_run / "config.json").read_text())
    assert config == raw["config"]
    log = [json.loads(line) for line in (tiny_dm_run / "losses.jsonl").read_text().splitlines()]
    assert [row["iteration"] for row in log] == [0, 1, 2, 3] and all(row["loss"] > 0 for row in log)


def test_cli_plugins_list_show_and_evaluate(tiny_dm_run: Path, tmp_path: Path):
    assert "random-convnet" in run_cli("plugins").output
    for kind in registry.KINDS:
        assert run_cli("list", kind).exit_code == 0
    assert "convnet3_bn" in run_cli("list", "models", "--filter", "convnet3*").output
    grid = tmp_path / "grid.png"
    run_cli("show", tiny_dm_run, "-o", grid)
    assert grid.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    run_dir = tmp_path / "run"
    import shutil

    shutil.copytree(tiny_dm_run, run_dir)
    result = run_cli("evaluate", run_dir, "--protocol", "smoke", "--epochs", "2", "--runs", "2", "--test-limit",
                     "200", "--device", "cpu")
    assert "convnet3" in result.output
    report = json.loads((run_dir / "eval.json").read_text())
    kinds = {(r["model"], r["kind"]) for r in report["results"]}
    assert kinds == {("convnet3", "synthetic"), ("convnet3", "random-baseline")}
    row = report["results"][0]
    assert len(row["accuracies"]) == 2 and row["protocol"] == "smoke" and row["protocol_settings"]["epochs"] == 2
    assert row["seed"] == 0 and all(0 <= a <= 100 for a in row["accuracies"])
    assert (run_dir / "eval.csv").read_text().startswith("model,kind,protocol")


def test_class_schedule_equals_one_sgd_step_per_class(mnist):
    """The batched closed form of M3D's schedule matches C sequential momentum-SGD steps, one per class."""
    cfg = _tiny_cfg("class", lr_img=0.3)
    condenser = Condenser(cfg, mnist, torch.device("cpu"))
    condenser.initialize()
    images = condenser.param.parameters()[0]
    target = torch.randn_like(images)
    num_classes, rows = 10, images.shape[0] // 10

    def class_loss(x: torch.Tensor, c: int) -> torch.Tensor:  # a loss whose gradient depends on where x is
        block = slice(c * rows, (c + 1) * rows)
        return ((x[block] - target[block]) ** 3).abs().sum()

    start = images.detach().clone()
    sequential = start.clone().requires_grad_(True)
    oracle = torch.optim.SGD([sequential], lr=cfg.lr_img, momentum=cfg.momentum)
    for _ in range(3):  # three iterations, so momentum carries over between them
        for c in range(num_classes):
            oracle.zero_grad()
            class_loss(sequential, c).backward()
            oracle.step()
        # the closed form: move, one backward over all classes, finish
        condenser._move_to_class_steps()
        condenser.optimizer.zero_grad()
        sum(class_loss(images, c) for c in range(num_classes)).backward()
        condenser._finish_class_steps()
    assert torch.allclose(images, sequential, atol=1e-5, rtol=1e-5)
    assert torch.allclose(condenser.optimizer.state[images]["momentum_buffer"], oracle.state[sequential]["momentum_buffer"],
                          atol=1e-5, rtol=1e-5)
    assert not torch.allclose(images, start)


@pytest.mark.parametrize("step", ["iteration", "class"])
def test_class_chunks_bound_memory_without_changing_the_step(mnist, step):
    """--real-chunk runs real and synthetic forwards (and backwards) a few classes at a time; the
    gradients of independent class losses add up to the same step."""
    results = []
    for chunk in (None, 3):
        condenser = Condenser(_tiny_cfg(step, real_chunk=chunk), mnist, torch.device("cpu"))
        condenser.initialize()
        start = condenser.param.stored().clone()
        losses = [float(condenser.run_iteration()) for _ in range(2)]
        results.append((losses, condenser.param.stored().clone()))
    (whole_losses, whole), (chunked_losses, chunked) = results
    assert not torch.equal(whole, start)  # the images moved, so the comparison below means something
    assert chunked_losses == pytest.approx(whole_losses, rel=1e-5)
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-6)


class _LearntShift:
    """A toy LearnableObjective: DM's mean gap after a learnt shift of the synthetic mean, which ascends it."""

    def __init__(self, seed: int, device: torch.device) -> None:
        self.host, self.shift, self.seen = (seed, device), None, []

    def __call__(self, real, syn, iteration):
        if self.shift is None:  # built at the first call, as the interface allows
            self.shift = torch.zeros(syn.shape[-1], requires_grad=True)
        self.seen.append(("call", iteration))
        return (real.mean(1) - syn.mean(1) - self.shift).pow(2).sum(-1)

    def parameters(self):
        return [] if self.shift is None else [self.shift]

    def step(self):
        self.seen.append(("step", self.shift.grad.clone()))
        with torch.no_grad():
            self.shift += 0.1 * self.shift.grad
        self.shift.grad = torch.full_like(self.shift, 1e6)  # the host must clear it before the next backward

    def state_dict(self):
        return {"shift": self.shift.detach().clone()}

    def load_state_dict(self, state):
        self.shift = state["shift"].clone().requires_grad_()


class _UnsavedShift:
    """Learns (parameters, step) but keeps no state: a checkpoint could not resume it."""

    def __call__(self, real, syn):
        return (real.mean(1) - syn.mean(1)).pow(2).sum(-1)

    def parameters(self):
        return []

    def step(self):
        pass


def test_a_learnable_objective_gets_its_host_arguments_and_one_step_per_iteration(mnist):
    objectives = registry.plugins()["objectives"]
    objectives.add("learnt-shift", _LearntShift, "tests")
    condenser = Condenser(_tiny_cfg(objective="learnt-shift", seed=7), mnist, torch.device("cpu"))
    condenser.initialize()
    toy = condenser.objective
    assert toy.host == (7, torch.device("cpu"))  # the factory declared seed and device
    for _ in range(2):
        condenser.run_iteration()
    calls = [entry for entry in toy.seen if entry[0] == "call"]
    steps = [entry[1] for entry in toy.seen if entry[0] == "step"]
    assert calls == [("call", 0), ("call", 1)] and len(steps) == 2  # one step per iteration, after the loss
    assert all(0 < g.abs().max() < 1e5 for g in steps)  # populated by the backward, cleared in between
    assert "objective" in condenser.state_dict()["components"]
    objectives.add("unsaved-shift", _UnsavedShift, "tests")
    with pytest.raises(ComponentError, match="learns parameters .* but has no state_dict/load_state_dict"):
        Condenser(_tiny_cfg(objective="unsaved-shift"), mnist, torch.device("cpu"))


def test_the_image_optimizer_is_chosen_by_the_config(mnist):
    adamw = Condenser(_tiny_cfg(optimizer="adamw", weight_decay=0.1), mnist, torch.device("cpu")).optimizer
    assert isinstance(adamw, torch.optim.AdamW) and adamw.defaults["weight_decay"] == 0.1
    sgd = Condenser(_tiny_cfg(), mnist, torch.device("cpu")).optimizer
    assert type(sgd) is torch.optim.SGD and (sgd.defaults["momentum"], sgd.defaults["weight_decay"]) == (0.5, 0.0)
    with pytest.raises(UsageError, match="unknown optimizer 'adam'; choose one of: sgd, adamw"):
        _tiny_cfg(optimizer="adam")
    with pytest.raises(UsageError, match="--step class needs --optimizer sgd without weight decay"):
        _tiny_cfg(step="class", weight_decay=1e-4)
