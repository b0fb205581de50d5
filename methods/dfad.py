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
zoo"); the paper's own is ``--set n_S=5 --set n_G=1 --set student_lr=0.1 --set bs=256``.

CHOSEN (not in the paper): G outputs pixels through a sigmoid (images in
[0, 1], the suite's convention) instead of tanh + BatchNorm in normalised space.
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
