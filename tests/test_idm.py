"""IDM as a plugin: its loss on hand-made tensors, its queue of trained networks, and a run through the CLI
that resumes after kill -9 and shards over torchrun to the single-process result, bit for bit."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

from distillkit import registry
from distillkit.artifact import CHECKPOINT_FORMAT, safe_load
from distillkit.data import data_context
from distillkit.errors import UsageError
from tests.conftest import DATA, refused, run_cli
from tests.test_distributed import single_and_sharded
from tests.test_reliability import assert_resumes_as, synthetic_images as _images

SMALL = ("--set", "sampler.model=convnet3_w32", "--set", "sampler.train_steps=2", "--set", "sampler.train_batch=32",
         "--set", "sampler.push_every=2", "--set", "sampler.initial_nets=2")
RUN = ("--method", "idm", "--dataset", "mnist", "--ipc", "1", "--batch-real", "8", "--device", "cpu", "--seed", "5",
       "--log-every", "1", *SMALL)



# -- the loss ----------------------------------------------------------------------------------

def test_the_idm_loss_is_the_mean_gap_plus_the_accuracy_weighted_cross_entropy():
    idm = registry.create("objectives", "idm", ce_weight=0.5)
    real = {"embedding": torch.tensor([[[1.0, 0.0], [3.0, 2.0]], [[0.0, 0.0], [0.0, 0.0]]])}
    syn_embedding = torch.tensor([[[1.0, 1.0]], [[2.0, 0.0]]], requires_grad=True)
    logits = torch.zeros(2, 1, 4, requires_grad=True)  # uniform over 4 classes: cross-entropy log 4
    accuracy = torch.tensor([[[40.0]], [[0.0]]])  # percent; an untrained network contributes no CE
    syn = {"embedding": syn_embedding, "logits": logits, "accuracy": accuracy}
    loss = idm(real, syn, torch.tensor([2, 3]))
    # class 0: means (2, 1) and (1, 1): gap 1, plus 0.5 * 40 * log 4; class 1: gap 4, no CE
    assert torch.allclose(loss, torch.tensor([1 + 20 * math.log(4), 4.0]))
    loss.sum().backward()
    assert syn_embedding.grad.abs().sum() > 0 and logits.grad[0].abs().sum() > 0
    assert logits.grad[1].abs().sum() == 0  # weight 0: the regulariser does not touch class 1
    # ce_weight 0 is DM's objective exactly
    dm = registry.create("objectives", "mean")
    plain = registry.create("objectives", "idm", ce_weight=0)(real, syn, torch.tensor([2, 3]))
    assert torch.equal(plain, dm(real["embedding"], syn_embedding))
    with pytest.raises(UsageError, match="needs the named features embedding, logits and accuracy"):
        idm(real["embedding"], syn_embedding, torch.tensor([2, 3]))
    with pytest.raises(UsageError, match="ce_weight must be a number >= 0"):
        registry.create("objectives", "idm", ce_weight=-1)


# -- the queue ---------------------------------------------------------------------------------

def _queue(**options):
    spec = registry.create("datasets", "mnist")
    data = data_context(spec, {}, DATA, "cpu")
    options = {"model": "convnet3_w32", "train_steps": 2, "train_batch": 16, "push_every": 2, "initial_nets": 2,
               "net_num": 3, "with_logits": True, **options}
    return registry.create("samplers", "idm-queue", {"spec": spec.image_spec, "seed": 1, "device": "cpu",
                                                     "data": data}, **options), data


def _weights(module: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def test_the_queue_is_first_in_first_out_and_matches_a_network_before_its_training():
    sampler, data = _queue()
    sampler.extractor(0)  # pushes at 0: 2 initial networks + 1
    assert [n.index for n in sampler.queue] == [0, 1, 2]
    before = {n.index: _weights(n.module) for n in sampler.queue}
    extract = sampler.extractor(1)  # no push at 1
    matched = _weights(sampler._matching)
    assert any(all(torch.equal(a, b) for a, b in zip(matched, w)) for w in before.values())  # untrained copy
    trained = [i for i, n in enumerate(sampler.queue) if not all(torch.equal(a, b) for a, b in
                                                                   zip(_weights(n.module), before[n.index]))]
    assert len(trained) == 2  # train_nets networks took their steps
    again = {n.index: _weights(n.module) for n in sampler.queue}
    sampler.extractor(1)  # asked again for the same iteration: nothing moves
    assert all(torch.equal(a, b) for n in sampler.queue for a, b in zip(_weights(n.module), again[n.index]))
    sampler.extractor(2)
    assert [n.index for n in sampler.queue] == [1, 2, 3]  # the oldest left, a new one came
    images = data.train().gather(torch.arange(6))
    out = extract(images)
    assert set(out) == {"embedding", "logits", "accuracy"} and out["logits"].shape == (6, 10)
    assert out["embedding"].shape == (6, 512) and 0 <= float(out["accuracy"][0]) <= 100
    assert sampler.with_logits and not isinstance(_queue(with_logits=False)[0].extractor(0)(images), dict)


def test_the_queue_state_round_trips_to_the_same_future():
    a, data = _queue()
    a.extractor(0)
    a.extractor(1)
    b, _ = _queue()
    b.load_state_dict(a.state_dict())
    images = data.train().gather(torch.arange(4))
    for it in (2, 3):
        out_a, out_b = a.extractor(it)(images), b.extractor(it)(images)
        assert all(torch.equal(out_a[k], out_b[k]) for k in out_a)
    assert all(torch.equal(x, y) for n, m in zip(a.queue, b.queue) for x, y in zip(_weights(n.module),
                                                                                  _weights(m.module)))


# -- through the CLI ---------------------------------------------------------------------------

def test_idm_runs_through_the_cli_and_its_options_are_checked(tmp_path: Path):
    run_cli("distill", *RUN, "--iterations", "0", "--out", tmp_path / "start")
    run_cli("distill", *RUN, "--iterations", "2", "--out", tmp_path / "run")
    assert not torch.equal(_images(tmp_path / "run"), _images(tmp_path / "start"))  # the gradient moved the set
    assert _images(tmp_path / "run").shape == (40, 1, 28, 28)  # 2 x 2 partitioning and expansion: 4 per image
    refused("distill", *RUN, "--iterations", "1", "--set", "sampler.net_num=0", "--out", tmp_path / "bad",
            says="idm-queue net_num must be a positive integer, got 0")
    refused("distill", *RUN, "--iterations", "1", "--set", "sampler.with_logits=false", "--out", tmp_path / "bad",
            says="objective 'idm' needs the named features embedding, logits and accuracy")


def test_from_ipc_50_idm_takes_the_reference_ipc_50_commands_options(tmp_path: Path):
    from benchmarks.sweep import default_of, parse_cell
    from benchmarks.accuracy import SCALES
    from distillkit.config import resolve

    idm = registry.plugins()["methods"].get("idm").factory
    for ipc, ce_weight, reset in ((1, 0.5, None), (10, 0.5, None), (50, 0.1, 500), (100, 0.1, 500)):
        cfg = resolve(idm, "mnist", ipc, {})
        assert cfg.objective_options["ce_weight"] == ce_weight
        assert cfg.sampler_options.get("meter_reset_every") == reset  # None: the sampler's own 100
        assert default_of(parse_cell(f"idm:mnist:{ipc}:objective.ce_weight=0"), SCALES["smoke"]) == ce_weight
    assert resolve(idm, "mnist", 50, {}, {"objective": {"ce_weight": 0.3}}).objective_options["ce_weight"] == 0.3
    assert "ce_weight" not in resolve(idm, "mnist", 50, {"objective": "dm"}).objective_options  # idm's only
    run_cli("distill", *RUN, "--ipc", "50", "--iterations", "0", "--out", tmp_path / "ipc50")
    config = json.loads((tmp_path / "ipc50" / "config.json").read_text())
    assert (config["objective_options"]["ce_weight"], config["sampler_options"]["meter_reset_every"]) == (0.1, 500)


def test_ipc_options_naming_no_component_of_a_method_is_refused():
    from dataclasses import replace

    from distillkit.config import resolve

    idm = registry.plugins()["methods"].get("idm").factory
    broken = replace(idm, ipc_options={10: {"objectiv": {"ce_weight": 1.0}}})
    assert resolve(broken, "mnist", 1, {}).objective_options["ce_weight"] == 0.5  # below the smallest key: none
    with pytest.raises(UsageError, match="ipc_options names component 'objectiv'; choose one of: objective, "
                                         "parameterization, sampler"):
        resolve(broken, "mnist", 10, {})


def test_idm_resumes_bit_identically_after_sigkill_and_shards_to_the_single_process_set(tmp_path: Path):
    args = (*RUN, "--iterations", "6", "--checkpoint-every", "2")
    reference = tmp_path / "reference"
    run_cli("distill", *args, "--out", reference)
    queue = safe_load(reference / "checkpoint.pt", CHECKPOINT_FORMAT)["components"]["sampler"]["queue"]
    assert [n["index"] for n in queue] == [0, 1, 2, 3, 4]  # 2 initial, pushes at 0, 2, 4

    assert_resumes_as(reference, tmp_path, *args)

    # two torchrun processes, each optimising 5 classes, each training the same queue from the full split
    single, sharded = single_and_sharded(tmp_path, "distill", *args)
    assert torch.equal(_images(sharded), _images(single))
    assert os.path.exists(sharded / "losses.jsonl")
