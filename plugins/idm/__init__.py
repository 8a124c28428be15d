"""IDM (Zhao et al., CVPR 2023, "Improved Distribution Matching for Dataset Condensation").

Components: sampler ``idm-queue``, objective ``idm``; method ``idm``, which also uses M3D's ``factor``
parameterization for IDM's partitioning and expansion (see :mod:`distillkit_idm.components`).

Where the defaults of ``idm`` come from (the reference code uitrbn/IDM at fe23bbc, ``IDM_cifar10.py`` and
``command.txt``'s CIFAR-10 commands):

* the queue: 100 ConvNet-3, one new every 30 iterations (first in, first out), 3 at the start; each
  iteration matches with 1 random network and trains 2 random ones for 10 SGD steps (lr 0.01, momentum 0.9,
  weight decay 5e-4) on 256 random real images, unaugmented; features = the whole feature output;
* the loss: DM's per-class mean-embedding gap plus 0.5 x accuracy(%) x cross-entropy of the synthetic
  images (``--syn_ce --ce_weight 0.5``);
* from IPC 50 (``ipc_options``), the IPC 50 command's ``--ce_weight 0.1`` and its ``--eval_interval 500``,
  at which the reference also resets the networks' accuracy meters (``sampler.meter_reset_every=500``);
* the images: 2 x 2 partitioning and expansion (``--aug``) in normalised space, unclamped, initialised from
  random real images shrunk bilinearly; SGD lr 0.2 (every command's ``--lr_img``), momentum 0.5, one step
  per class (``step="class"``); DSA's single-op Siamese augmentation ``color_crop_cutout_flip_scale_rotate``;
  256 real images per class; 20 000 iterations.

Not reproduced: the reference's IPC-1 commands use every real image of a class per batch (``--batch_real
5000``) and a new network every 5 iterations (here: ``--batch-real 5000 --set sampler.push_every=5``); its
``factor`` initialisation draws each of the four tiles independently (here the 4 x IPC images of a class are
distinct); the order of the decoded images within a class differs (immaterial to the mean and to training).
The reference evaluates with DC's ``evaluate_synset`` (distillkit's ``dc-classic``).
"""

from distillkit import hookimpl
from distillkit.interfaces import Method

from distillkit_idm.components import ModelQueueSampler, RegularizedMeanObjective

IDM = Method(
    name="idm",
    description="IDM (Zhao et al., CVPR 2023): DM's mean-embedding match against a queue of ConvNet-3 trained a "
                "little on real data every iteration, plus a cross-entropy regulariser weighted by the matched "
                "network's accuracy; 2x2 partitioning and expansion. Defaults are the reference's CIFAR-10 "
                "commands.",
    objective="idm",
    parameterization="factor",
    sampler="idm-queue",
    objective_options={"ce_weight": 0.5},
    parameterization_options={"factor": 2, "init": "real", "space": "normalized", "resize": "bilinear"},
    sampler_options={"model": "convnet3", "with_logits": True},
    ipc_options={50: {"objective": {"ce_weight": 0.1}, "sampler": {"meter_reset_every": 500}}},
    augment="dsa",
    augment_strategy="color_crop_cutout_flip_scale_rotate",
    lr_img=0.2,
    momentum=0.5,
    iterations=20000,
    batch_real=256,
    step="class",
)


@hookimpl
def register_objectives(register):
    register("idm", RegularizedMeanObjective)


@hookimpl
def register_samplers(register):
    register("idm-queue", ModelQueueSampler)


@hookimpl
def register_methods(register):
    register("idm", IDM)
