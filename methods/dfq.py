"""DFQ: Data-Free Network Quantization with Adversarial Knowledge Distillation
(Choi, Choi, El-Khamy & Lee, CVPR Workshops 2020, arXiv:2005.04136).

Adversarial KD (Sec. 3, Eq. 4-5): the student minimises KL(T || S) on samples of
a generator G, G maximises it, and G additionally matches the teacher's
BatchNorm statistics (Sec. 3.2, Eq. 6) and keeps the teacher confident on each
sample and balanced over the batch (the instance / batch categorical-entropy
terms of Eq. 7, written here as DAFL's one-hot and information-entropy losses,
which are the same quantities). The generator loss is::

    - adv * KL(T(x) || S(x)) + bn * L_BN(x) + oh * L_oh(x) + balance * L_ie(x)

Paper / reference settings: G Adam lr 1e-3 (Sec. 4); the student trains on
fresh samples of G with KL at temperature 1.

DFQ has no official code. The weights follow the DataFree re-implementation
(zju-vipa/CMI, scripts/dfq/dfq_cifar10_wrn402_wrn161.sh and dfq_cifar10_res34_res18.sh,
both: adv = bn = oh = 1, balance = 20, g_steps 1, kd_steps 10, lr_g 1e-3, batch 256),
whose generator Adam uses betas (0.5, 0.999) (datafree/synthesis/generative.py); its
balance term uses the natural log (``class_balance_loss``). CHOSEN (kept): the student
trains on G in training mode (batch statistics), as the official DFAD, DAFL and ZSKT code
and the other zoo generators do; the re-implementation samples student batches with G in
eval mode (running statistics). Its student KD temperature (T = 20 for WRN, 1 for ResNet)
and 10 student steps would be settings of a DFQ paper protocol, not method defaults; there
is none yet (DFQ's published numbers could not be checked against its paper here). CHOSEN: L_BN is the sum over teacher
BatchNorm layers of the L2 norms of the mean and variance gaps (DeepInversion's
R_feature; the paper matches the same statistics). A teacher without BatchNorm
(the digits/MNIST LeNet-5) skips L_BN with a note in the run's config.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from dfkd_bench.train import losses, zoo_losses
from dfkd_bench.method_api import MethodContext, hparam, register_method
from dfkd_bench.methods.zoo_common import ZooGeneratorMethod, ZooGeneratorParams, teacher_batchnorm


@dataclass
class DFQParams(ZooGeneratorParams):
    adv_weight: float = hparam(1.0, "weight of -KL(T||S) in the generator loss (Eq. 5)")  # CHOSEN
    bn_weight: float = hparam(1.0, "weight of teacher BatchNorm-statistics matching (Eq. 6)")  # CHOSEN
    oh_weight: float = hparam(1.0, "weight of the instance categorical entropy / one-hot loss (Eq. 7)")  # CHOSEN
    balance_weight: float = hparam(20.0, "weight of the batch categorical entropy / balance loss (Eq. 7; "
                                         "20 in both DataFree DFQ scripts)")
    generator_beta1 = 0.5  # the DataFree re-implementation's generator Adam betas (0.5, 0.999); not a setting


@register_method
class DFQ(ZooGeneratorMethod):
    name = "dfq"
    label = "DFQ"
    summary = "DFQ (Choi et al. 2020): adversarial KD with teacher BatchNorm-statistics matching for G"
    Params = DFQParams
    static_student_step = True

    def __init__(self, params: DFQParams, ctx: MethodContext):
        super().__init__(params, ctx)
        self.bn_stats = teacher_batchnorm(ctx, params.bn_weight, "BatchNorm-statistics (DFQ Eq. 6)")

    def teacher_context(self):
        return self.bn_stats.recording() if self.bn_stats is not None else super().teacher_context()

    def generator_objective(self, images: Tensor, teacher_logits: Tensor,
                            student_logits: Tensor | None) -> tuple[Tensor, dict[str, Tensor]]:
        p = self.params
        kd = losses.kl_divergence(teacher_logits, student_logits)
        terms = {"gen_kd": kd, "gen_oh": zoo_losses.one_hot_loss(teacher_logits),
                 "gen_balance": zoo_losses.information_entropy_loss(teacher_logits)}
        loss = -p.adv_weight * kd + p.oh_weight * terms["gen_oh"] + p.balance_weight * terms["gen_balance"]
        if self.bn_stats is not None:
            terms["gen_bn"] = zoo_losses.feature_distribution_loss(
                self.bn_stats.means, self.bn_stats.vars, self.bn_stats.running_means, self.bn_stats.running_vars)
            loss = loss + p.bn_weight * terms["gen_bn"]
        return loss, terms
