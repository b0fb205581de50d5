"""DFAD: Data-Free Adversarial Distillation (Fang, Song, Wang, Shen, Wang & Song, 2019, arXiv:1912.11006).

A generator G and the student S play a min-max game on the discrepancy between
teacher and student outputs (Sec. 3, Eq. 3). DFAD's discrepancy is the mean
absolute error between the logits (Sec. 3.2, Eq. 4: ``1/n ||y_T - y_S||_1``,
:func:`dfkd_bench.train.zoo_losses.l1_discrepancy`): the student minimises it on
fresh samples of G, G maximises it (the "imitation" and "generation" stages,
Alg. 1). Nothing else enters either loss: no BatchNorm matching, no logit bounds.

Paper settings (Sec. 4.1): G Adam lr 1e-3; S SGD lr 0.1, momentum 0.9, wd 5e-4;
batch 256; k = 5 student steps per generator step (the engine's n_S = 5, n_G = 1);
z of dimension 256 (CIFAR; 100 for MNIST). The engine owns the student optimiser
and n_S/n_G, one protocol for every method of a comparison
(docs/protocols.md). The official MNIST script (VainF/Data-Free-Adversarial-Distillation,
DFAD_mnist.py with run_mnist.sh) is the paper protocol ``experiments/reproduce/
dfad_mnist.toml``: 40 "epochs" of 50 iterations (2,000), batch 512, S SGD lr 0.01,
momentum 0.9, wd 1e-4, no schedule, G Adam 1e-3 (default betas), nz 100, GeneratorA
(``dfad_gen``), 32 x 32 inputs normalised (0.1307, 0.3081), best test accuracy kept.

CHOSEN: the official loop runs the 5 student steps before the generator step of an
iteration; the engine runs the generator stage first. Over N iterations the two are the
same alternation, S G S G ... S G against G S G S ... G S: both hold the N - 1
interior pairs, and they differ only in where one student stage of N falls, before the
first generator step (official: on the untrained G) or after the last (here; the official
last generator step is never seen by the student). One stage of N (N = 2,000 in the MNIST
protocol): too small to measure, and not measured. CHOSEN for the common protocol: the preset's generator
(pre-sigmoid logits, images in [0, 1]); the paper protocol uses DFAD's own GeneratorA,
which ends in tanh + BatchNorm in the teacher's normalised space.

Proven step for step against the official DFAD_mnist.py loop, the stage order aligned, on the
reference and the fast engine path: ``results/traces/dfad_mnist.pt`` (``dfkd_bench.traces``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from torch import Tensor

from dfkd_bench.train import zoo_losses
from dfkd_bench.method_api import PaperProtocol, register_method
from dfkd_bench.methods.zoo_common import ZooGeneratorMethod, ZooGeneratorParams


@dataclass
class DFADParams(ZooGeneratorParams):
    """DFAD's own settings are the generator's (Sec. 4.1: Adam, lr 1e-3, d_z 256)."""


# CIFAR-10 and CIFAR-100 share the protocol (the official DFAD_cifar.py); only the numbers differ.
_DFAD_CIFAR10 = PaperProtocol(
    source="DFAD (Fang et al., arXiv:1912.11006), Table 2: CIFAR-10, ResNet-34 -> ResNet-18 "
           "(also the official repository's images/classification-results.png)",
    accuracy=93.3, std=0.0, teacher_accuracy=95.5, selection="best",
    teacher_arch="resnet34", student_arch="resnet18", image_size=32,
    train=dict(epochs=500, steps_per_epoch=50, generator_steps=1, student_steps=5, batch_size=256,
               student_optimizer="sgd", student_lr=0.1, student_weight_decay=5e-4, student_momentum=0.9,
               lr_decay=0.1, lr_milestones=[100, 200], eval_every=50, amp="none"),
    params=dict(generator="dfad_gen", noise_dim=256, generator_lr=1e-3),
    official={"generator lr schedule": "x0.1 at epochs 100, 200 (MultiStepLR on G too, --scheduler)",
               "normalisation": "mean (0.4914, 0.4822, 0.4465), std (0.2023, 0.1994, 0.2010)"},
    deviations={"generator lr schedule": "the engine decays the student's lr only; G keeps 1e-3",
                 "normalisation": "the dataset's statistics of this suite (the teacher's own)"},
    code="DFAD_cifar.py --dataset cifar10 --scheduler (README)",
)


@register_method
class DFAD(ZooGeneratorMethod):
    name = "dfad"
    label = "DFAD"
    summary = "DFAD (Fang et al. 2019): adversarial generator, L1 (MAE) teacher-student logit discrepancy"
    Params = DFADParams
    static_student_step = True
    # float32 as in the official code (amp="none"; see methods/dafl.py).
    paper_protocols = {
        "mnist": PaperProtocol(
            source="DFAD (Fang et al., arXiv:1912.11006), Table 2: MNIST, LeNet-5 -> LeNet-5-half "
                   "(also the official repository's images/classification-results.png)",
            accuracy=98.3, std=0.2, teacher_accuracy=98.9, selection="best",
            teacher_arch="lenet5", student_arch="lenet5_half",
            image_size=28,  # CHOSEN: as DAFL's MNIST protocol (the official code resizes to 32 x 32)
            train=dict(epochs=40, steps_per_epoch=50, generator_steps=1, student_steps=5, batch_size=512,
                       student_optimizer="sgd", student_lr=0.01, student_weight_decay=1e-4, student_momentum=0.9,
                       lr_decay=1.0, lr_milestones=[], eval_every=50, amp="none"),
            params=dict(generator="dfad_gen", noise_dim=100, generator_lr=1e-3),
            official={"image_size": "32 (MNIST resized, normalised 0.1307/0.3081)",
                      "teacher": "LeNet-5 of train_teacher.py (10 epochs, lr 0.01), 98.9 %",
                      "order": "5 student steps, then 1 generator step"},
            deviations={"image_size": "28 px with conv1 padding 2: the committed 28-px teacher (99.21 %) serves",
                        "teacher": "the committed MNIST teacher (99.21 %), not the paper's (98.9 %)",
                        "order": "generator stage first: the same alternation, one student stage of 2,000 moved from "
                                 "before the first generator step to after the last"},
            code="VainF/Data-Free-Adversarial-Distillation, DFAD_mnist.py (defaults; run_mnist.sh)",
        ),
        "cifar10": _DFAD_CIFAR10,
        "cifar100": replace(
            _DFAD_CIFAR10,
            source="DFAD (Fang et al., arXiv:1912.11006), Table 2: CIFAR-100, ResNet-34 -> ResNet-18 "
                   "(also the official repository's images/classification-results.png)",
            accuracy=67.7, std=0.3, teacher_accuracy=77.5, code="DFAD_cifar.py --dataset cifar100 --scheduler (README)",
        ),
    }

    def generator_objective(self, images: Tensor, teacher_logits: Tensor,
                            student_logits: Tensor | None) -> tuple[Tensor, dict[str, Tensor]]:
        l1 = zoo_losses.l1_discrepancy(teacher_logits, student_logits)
        return -l1, {"gen_l1": l1}

    def student_discrepancy(self, teacher_logits: Tensor, student_logits: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        l1 = zoo_losses.l1_discrepancy(teacher_logits, student_logits)
        return l1, {"l1_gen": l1.detach()}
