"""DFAD: Data-Free Adversarial Distillation (Fang, Song, Wang, Shen, Wang & Song, 2019, arXiv:1912.11006).

A generator G and the student S play a min-max game on the discrepancy between
teacher and student outputs (Sec. 3, Eq. 3). DFAD's discrepancy is the mean
absolute error between the logits (Sec. 3.2, Eq. 4: ``1/n ||y_T - y_S||_1``,
:func:`dfkd_bench.zoo_losses.l1_discrepancy`): the student minimises it on
fresh samples of G, G maximises it (the "imitation" and "generation" stages,
Alg. 1). Nothing else enters either loss: no BatchNorm matching, no logit bounds.

Paper settings (Sec. 4.1): G Adam lr 1e-3; S SGD lr 0.1, momentum 0.9, wd 5e-4;
batch 256; k = 5 student steps per generator step (the engine's n_S = 5, n_G = 1);
z of dimension 256 (CIFAR; 100 for MNIST). The engine owns the student optimiser
and n_S/n_G, one protocol for every method of a comparison (README, "The DFKD
zoo"). The official MNIST script (VainF/Data-Free-Adversarial-Distillation,
DFAD_mnist.py with run_mnist.sh) is the paper protocol ``experiments/reproduce/
dfad_mnist.toml``: 40 "epochs" of 50 iterations (2,000), batch 512, S SGD lr 0.01,
momentum 0.9, wd 1e-4, no schedule, G Adam 1e-3 (default betas), nz 100, GeneratorA
(``dfad_gen``), 32 x 32 inputs normalised (0.1307, 0.3081), best test accuracy kept.

CHOSEN: the official loop runs the 5 student steps before the generator step of an
iteration; the engine runs the generator stage first (the same alternation, shifted by
one generator step at the start). CHOSEN for the common protocol: the preset's generator
(pre-sigmoid logits, images in [0, 1]); the paper protocol uses DFAD's own GeneratorA,
which ends in tanh + BatchNorm in the teacher's normalised space.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from dfkd_bench import zoo_losses
from dfkd_bench.method_api import register_method
from dfkd_bench.methods.zoo_common import ZooGeneratorMethod, ZooGeneratorParams


@dataclass
class DFADParams(ZooGeneratorParams):
    """DFAD's own settings are the generator's (Sec. 4.1: Adam, lr 1e-3, d_z 256)."""


@register_method
class DFAD(ZooGeneratorMethod):
    name = "dfad"
    label = "DFAD"
    summary = "DFAD (Fang et al. 2019): adversarial generator, L1 (MAE) teacher-student logit discrepancy"
    Params = DFADParams
    static_student_step = True

    def generator_objective(self, images: Tensor, teacher_logits: Tensor,
                            student_logits: Tensor | None) -> tuple[Tensor, dict[str, Tensor]]:
        l1 = zoo_losses.l1_discrepancy(teacher_logits, student_logits)
        return -l1, {"gen_l1": l1}

    def student_discrepancy(self, teacher_logits: Tensor, student_logits: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        l1 = zoo_losses.l1_discrepancy(teacher_logits, student_logits)
        return l1, {"l1_gen": l1.detach()}
