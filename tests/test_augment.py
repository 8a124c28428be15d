"""Augmentation: packed parameters, geometric ops only where drawn, one op choice per batch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from distillkit import registry
from distillkit.augment import COLUMNS, Augment, AugmentParams
from distillkit.data import load_split, resolve_root
from distillkit.seeding import generator
from tests.conftest import DATA

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")  # a case not run, not a pass
POLICIES = [("dsa", "color_crop_cutout_flip_scale_rotate"), ("idc", "color_crop_cutout"),
            ("idc", "color_crop_cutout_flip_scale_rotate")]


@pytest.fixture(scope="module")
def images() -> dict[str, torch.Tensor]:
    """Real images of both sizes: 120 MNIST (1x28x28) and 120 CIFAR-10 (3x32x32), normalised."""
    registry.load_plugins()
    mnist = load_split(registry.create("datasets", "mnist"), resolve_root(), train=True).images[:120]
    cifar = torch.from_numpy(np.load(DATA / "CIFAR10" / "train.npz")["images"][:120]).permute(0, 3, 1, 2) / 255.0
    cifar = (cifar - cifar.mean((0, 2, 3), keepdim=True)) / cifar.std((0, 2, 3), keepdim=True)
    return {"mnist": mnist, "cifar10": cifar}


def _classes(n_groups: int, per: int) -> torch.Tensor:
    return torch.arange(n_groups).repeat_interleave(per)


@pytest.mark.parametrize("mode,strategy", POLICIES)
@pytest.mark.parametrize("name", ["mnist", "cifar10"])
def test_warping_only_the_drawn_samples_gives_the_numbers_and_gradients_of_warping_them_all(
        images, name, mode, strategy):
    x = images[name].clone().requires_grad_(True)
    aug = Augment(mode, strategy)
    for it in range(4):  # condensation-shaped: 12 class groups of 10 images, one stream per class
        params = aug.draw_groups([generator(0, "augment", it, c) for c in range(12)], *x.shape[-2:])
        group = _classes(12, 10)
        warped = params.geometric[group]
        out = aug.apply(x, params, group)
        # a batch of only warped samples is warped whole; one of only unwarped samples is never warped
        parts = {k: aug.apply(x[rows], params, group[rows]) for k, rows in (("in", warped), ("out", ~warped))}
        assert torch.equal(out[warped], parts["in"]) and torch.equal(out[~warped], parts["out"])
        upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(it))
        grad, = torch.autograd.grad(out, x, upstream)
        for key, rows in (("in", warped), ("out", ~warped)):
            part, = torch.autograd.grad(parts[key], x, upstream[rows])
            assert torch.equal(grad[rows], part[rows])
        # the host-side count the loop can pass on an accelerator selects the same samples (and is checked)
        assert torch.equal(aug.apply(x, params, group, params.geometric_count(group)), out)
        if mode == "dsa":
            with pytest.raises(ValueError, match="geometric_count"):
                aug.apply(x, params, group, params.geometric_count(group) + 1)


def test_parameters_of_many_streams_are_one_buffer_with_the_numbers_of_each_stream():
    aug = Augment("dsa", "color_crop_cutout_flip_scale_rotate")
    streams = lambda: [generator(7, "augment", 3, c) for c in range(10)]  # noqa: E731
    packed = aug.draw_groups(streams(), 28, 28, groups=5)
    alone = [aug.draw(5, g, 28, 28) for g in streams()]
    assert packed.values.shape == (50, COLUMNS) and packed.values.dtype == torch.float32
    for field in ("flip", "color", "brightness", "saturation", "contrast", "geometric", "theta", "cutout",
                  "cutout_center"):
        assert torch.equal(getattr(packed, field), torch.cat([getattr(p, field) for p in alone]))
    assert packed.flip.dtype == torch.bool and packed.cutout_center.dtype == torch.long
    assert packed.theta.shape == (50, 2, 3)
    assert packed.to("cpu") is packed


def _op(params: AugmentParams) -> list[str]:
    """The op each group of a ``dsa`` draw applies, read back from its parameters
    ("flip?": the flip op, or a flip whose coin said no)."""
    t = params.theta
    return ["color" if c else "cutout" if k else
            ("rotate" if r[0, 1] != 0 else "scale" if r[0, 0] != 1 or r[1, 1] != 1 else "crop") if g else "flip?"
            for c, k, g, r in zip(params.color.tolist(), params.cutout.tolist(), params.geometric.tolist(), t)]


def test_op_groups_share_the_op_choice_and_keep_their_own_parameters():
    """The DC reference (``aug_mode='S'``) picks one op per training batch and draws its parameters per sample."""
    aug = Augment("dsa", "color_crop_cutout_flip_scale_rotate")
    epochs, n, batch = 6, 100, 32
    bounds = [(s, min(s + batch, n)) for s in range(0, n, batch)]
    of_batch = torch.cat([torch.full((e - s,), b) for b, (s, e) in enumerate(bounds)])
    op_groups = (torch.arange(epochs).view(-1, 1) * len(bounds) + of_batch).flatten()

    shared = aug.draw(epochs * n, generator(0, "eval-augment", 0), 28, 28, op_groups=op_groups)
    ops = _op(shared)
    seen = set()
    for b in range(epochs * len(bounds)):
        members = (op_groups == b).nonzero().squeeze(1)
        batch_ops = {ops[i] for i in members}
        assert len(batch_ops) == 1, batch_ops  # one op for the whole batch
        seen |= batch_ops
        assert shared.brightness[members].unique().numel() == members.numel()  # parameters per sample
        if batch_ops != {"flip?"}:
            assert not shared.flip[members].any()
        else:
            assert 0 < shared.flip[members].sum() < members.numel()  # the flip op: a coin per sample
    assert seen == {"color", "cutout", "flip?", "rotate", "scale", "crop"}

    # without op groups every group chooses alone: the same numbers as one op group per group
    alone = aug.draw(epochs * n, generator(0, "eval-augment", 0), 28, 28)
    assert torch.equal(alone.values, aug.draw(epochs * n, generator(0, "eval-augment", 0), 28, 28,
                                              op_groups=torch.arange(epochs * n)).values)
    assert len({_op(alone)[i] for i in range(batch)}) > 1


@CUDA
@pytest.mark.parametrize("mode,strategy", POLICIES)
def test_on_cuda_the_loop_never_waits_and_gets_the_cpu_numbers(images, mode, strategy):
    x_cpu, device = images["cifar10"], torch.device("cuda")
    aug = Augment(mode, strategy)
    host = aug.draw_groups([generator(0, "augment", 0, c) for c in range(12)], 32, 32)
    group = _classes(12, 10)
    expected = aug.apply(x_cpu, host, group)
    x, params, group_on = x_cpu.to(device), host.to(device), group.to(device)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any host sync below raises
    try:
        counted = aug.apply(x, params, group_on, host.geometric_count(group))
        everyone = aug.apply(x, params, group_on)  # no count: warps all, still without waiting
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for out in (counted, everyone):
        torch.testing.assert_close(out.cpu(), expected, rtol=0, atol=1e-5)
