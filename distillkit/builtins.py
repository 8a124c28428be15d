"""The host's own default plugin: datasets, evaluation protocols and the ConvNet family.

Loaded like any other plugin (through the same hooks), so ``distillkit
plugins`` lists what the host itself provides.
"""

from distillkit import hookimpl
from distillkit.datasets import builtin_datasets
from distillkit.engine import TrainingProtocol
from distillkit.imagenet import imagenet_datasets
from distillkit.soft_labels import SoftLabelProtocol
from distillkit.zoo import ARCHITECTURES

PROTOCOLS = (
    TrainingProtocol(
        "dc-classic",
        description="DC/DSA/DM's evaluate_synset: SGD lr 0.01 mom 0.9 wd 5e-4, batch 256, 1000 (+1) epochs, lr x0.1 "
                    "after epoch E//2+1 (optimizer re-created), DSA with one op per batch",
    ),
    TrainingProtocol(
        "idc", batch_size=64, milestones=(2 / 3, 5 / 6), gamma=0.2, restart_optimizer=False, augment="idc",
        augment_strategy="color_crop_flip_scale_rotate", cutmix_prob=0.5, cutmix_beta=1.0, schedule="floor",
        no_flip=("mnist", "svhn"), imagenet=tuple(imagenet_datasets()),
        description="IDC/M3D protocol: batch 64, 1000 epochs, lr x0.2 at 2E//3 and 5E//6, IDC-mode augmentation "
                    "(no flip on MNIST/SVHN), CutMix p=0.5; on ImageNet subsets IDC's epochs by images per class "
                    "and CutMix p=1.0",
    ),
    TrainingProtocol(
        "smoke", epochs=50, test_limit=2000,
        description="quick check: dc-classic settings with 50 (+1) epochs, first 2000 test images",
    ),
    SoftLabelProtocol(
        "soft-label",
        description="dc-classic's recipe on a teacher's soft labels of every augmented batch (KL at temperature "
                    "1.2); the teacher: ConvNet-3 trained 50 (+1) epochs on the full training split, cached",
    ),
    SoftLabelProtocol(
        "soft-label-smoke", epochs=50, test_limit=2000, teacher_epochs=2,
        description="quick check: soft-label with 50 (+1) epochs, a teacher of 2 (+1) epochs, first 2000 test images",
    ),
)


@hookimpl
def register_datasets(register):
    for name, factory in builtin_datasets().items():
        register(name, factory)


@hookimpl
def register_protocols(register):
    for protocol in PROTOCOLS:
        register(protocol.name, protocol)


@hookimpl
def register_models(register):
    for name, factory in ARCHITECTURES.items():
        register(name, factory)
