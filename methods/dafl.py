"""DAFL: Data-Free Learning of Student Networks (Chen, Wang, Xu, Yang, Liu, Shi, Xu, Xu & Tian, ICCV 2019).

Not adversarial: the teacher is a fixed discriminator and the generator G
minimises (Sec. 3.2, Eq. 5)::

    L_oh + alpha * L_a + beta * L_ie

with the one-hot loss L_oh (Eq. 2: cross-entropy of T(x) to its own argmax),
the activation loss L_a (Eq. 3: minus the L1 norm of the teacher's features
before its classifier) and the information-entropy loss L_ie (Eq. 4: minus the
entropy of the batch-mean teacher distribution), all in
:mod:`dfkd_bench.zoo_losses`. The student minimises KD on samples of G (Sec. 3.3,
Eq. 6: cross-entropy between the softened outputs, here KL(T || S) at
temperature 1, the same gradient).

Paper settings (Sec. 4.1, MNIST): alpha = 0.1, beta = 5; G Adam lr 0.2 (MNIST)
/ 1e-3 (CIFAR); S Adam lr 2e-3 (MNIST) / SGD 0.1 (CIFAR); batch 512; z of
dimension 100. The default G lr here is CIFAR's (1e-3). The engine owns the
student optimiser and n_S/n_G, one protocol for every method of a comparison
(README, "The DFKD zoo"); the paper's MNIST student is ``--set
student_optimizer=adam --set student_lr=2e-3 --set bs=512 --set generator_lr=0.2``.

The features f_T are the input of the teacher's last fully-connected layer
(LeNet-5: the 84 F6 units; WRN/ResNet: the pooled features).

CHOSEN: the student trains on fresh samples of G (the authors' code reuses the
generator step's batch); one G step per stage as in Alg. 1 (n_G = 1).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from dfkd_bench import zoo_losses
from dfkd_bench.method_api import MethodContext, hparam, register_method
from dfkd_bench.methods.zoo_common import ZooGeneratorMethod, ZooGeneratorParams, classifier_input_tap, tapping


@dataclass
class DAFLParams(ZooGeneratorParams):
    oh_weight: float = hparam(1.0, "weight of the one-hot loss L_oh (Eq. 5)")
    activation_weight: float = hparam(0.1, "weight alpha of the activation loss L_a (Eq. 5)")
    entropy_weight: float = hparam(5.0, "weight beta of the information-entropy loss L_ie (Eq. 5)")


@register_method
class DAFL(ZooGeneratorMethod):
    name = "dafl"
    label = "DAFL"
    summary = "DAFL (Chen et al. 2019): generator trained by one-hot, activation and entropy losses; KD on it"
    Params = DAFLParams
    static_student_step = True
    uses_student_in_generator = False

    def __init__(self, params: DAFLParams, ctx: MethodContext):
        super().__init__(params, ctx)
        self.features = classifier_input_tap(ctx.teacher)

    def teacher_context(self):
        return tapping(self.features)

    def generator_objective(self, images: Tensor, teacher_logits: Tensor,
                            student_logits: Tensor | None) -> tuple[Tensor, dict[str, Tensor]]:
        p = self.params
        (features,) = self.features.take()
        terms = {"gen_oh": zoo_losses.one_hot_loss(teacher_logits),
                 "gen_activation": zoo_losses.activation_loss(features),
                 "gen_entropy": zoo_losses.information_entropy_loss(teacher_logits)}
        loss = (p.oh_weight * terms["gen_oh"] + p.activation_weight * terms["gen_activation"]
                + p.entropy_weight * terms["gen_entropy"])
        return loss, terms
