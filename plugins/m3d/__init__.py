"""M3D (Zhang et al., AAAI 2024): dataset condensation by minimising the maximum mean discrepancy.

Components: objective ``mmd``, parameterization ``factor``, sampler
``random-encoder``; method ``m3d``. Each combines freely with DM's
(e.g. ``--method dm --objective mmd``).

Where the defaults of ``m3d`` come from:

* the paper / released reference code: Gaussian kernel summed over bandwidths
  (1/4, 1/2, 1, 2, 4) x the detached mean off-diagonal squared distance of the
  pooled features; biased estimator; factor 2 with "mix" init in [0, 1] pixel
  space, clamped every iteration; ConvNet-3 redrawn every 5 iterations;
  IDC-mode augmentation ``color_crop_cutout`` shared by a class's real and
  synthetic batch; SGD momentum 0.5 with one step per class; 128 real and at
  most 200 decoded synthetic images per class; 5000 iterations (the code's
  default; its configs go up to 10000).
* our choice: the image learning rate, measured on MNIST (200 iterations at
  IPC 1, 100 at IPC 10, 64 real images per class, ConvNet-3 evaluators trained
  300 epochs with the dc-classic protocol). The reference's lr = IPC is
  unstable at small budgets (method-notes section 10); here IPC 1: lr 0.5 gave
  90.6 and 89.8 (condensation seeds 0 and 1), lr 1 gave 90.4 (seed 0); IPC 10:
  lr 5 gave 95.6 and lr 10 94.4, below the factor-2 initialisation alone (95.1,
  same evaluator seed). Each image's gradient shrinks as 1 / (decoded images per
  class), hence lr proportional to IPC; IPC 2-9 use the IPC 1 value and IPC
  above 10 the IPC 10 value (neither measured). On CIFAR-10 at the accuracy
  grid's smoke budget (``benchmarks/results/sweep-smoke-cpu.json``,
  dc-classic 300 epochs x 3 runs) IPC 1 gave 31.31 / 33.26 / 35.79 at lr 0.25 /
  0.5 / 1: the default is not the best rate there. These are test-split numbers,
  so the default stays as measured on MNIST rather than be picked on test data.
"""

from distillkit import hookimpl
from distillkit.interfaces import Method

from distillkit_m3d.components import FactorParameterization, MMDObjective, RandomEncoderSampler

M3D = Method(
    name="m3d",
    description="M3D (Zhang et al., AAAI 2024): per-class squared MMD with five Gaussian kernels between real and "
                "synthetic embeddings of a random ConvNet-3 (new every 5 iterations), factor-2 images, one step per "
                "class. Defaults are the reference code's except lr_img (measured: 0.5 at IPC 1, 5 from IPC 10).",
    objective="mmd",
    parameterization="factor",
    sampler="random-encoder",
    objective_options={"kernel": "gaussian", "bandwidth": "mean", "estimator": "biased"},
    parameterization_options={"factor": 2, "init": "mix"},
    sampler_options={"model": "convnet3", "period": 5},
    augment="idc",
    augment_strategy="color_crop_cutout",
    lr_img={1: 0.5, 10: 5.0},
    momentum=0.5,
    iterations=5000,
    batch_real=128,
    batch_syn=200,
    step="class",
)


@hookimpl
def register_objectives(register):
    register("mmd", MMDObjective)


@hookimpl
def register_parameterizations(register):
    register("factor", FactorParameterization)


@hookimpl
def register_samplers(register):
    register("random-encoder", RandomEncoderSampler)


@hookimpl
def register_methods(register):
    register("m3d", M3D)
