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
balance term uses the natural log (``class_balance_loss``). CHOSEN (kept) under the common
protocol: the student trains on G in training mode (batch statistics), as the official DFAD,
DAFL and ZSKT code and the other zoo generators do; the re-implementation samples student
batches with G in eval mode (running statistics), ``student_generator_mode = eval``, and runs its
generator step with the student in eval mode, ``generator_step_student_mode = eval`` (both settings of
every zoo generator method, zoo_common.ZooGeneratorParams), which its paper protocols use. Measured on the BN digits teacher: docs/results.md, "The zoo with a BatchNorm teacher". The scripts' ``--T`` (20 for WRN, 1 for ResNet) does not
reach DFQ: datafree_kd.py re-binds ``criterion = KLDiv()`` (T = 1, batch-mean) for the
generator methods, and that criterion is also the student's, as here. The paper protocols
(``dfkd-bench list --card dfq --dataset cifar10``) are those two scripts: 200 epochs x 40
iterations of 1 generator step and 10 student steps, S SGD (momentum 0.9, wd 1e-4) with the
per-epoch cosine schedule, best test accuracy kept; the published numbers are the DataFree
README's table (the CMI paper's Table 1), DFQ's own tables could not be read here. CHOSEN: L_BN is the sum over teacher
BatchNorm layers of the L2 norms of the mean and variance gaps (DeepInversion's
R_feature; the paper matches the same statistics). A teacher without BatchNorm
(the digits/MNIST LeNet-5) skips L_BN with a note in the run's config.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from dfkd_bench.train import losses, zoo_losses
from dfkd_bench.method_api import MethodContext, PaperProtocol, hparam, register_method
from dfkd_bench.methods.zoo_common import (DATAFREE_GENERATIVE_DEVIATIONS, DATAFREE_GENERATIVE_OFFICIAL,
                                           DATAFREE_GENERATIVE_PARAMS, ZooGeneratorMethod, ZooGeneratorParams,
                                           datafree_generative_train, teacher_batchnorm)


@dataclass
class DFQParams(ZooGeneratorParams):
    adv_weight: float = hparam(1.0, "weight of -KL(T||S) in the generator loss (Eq. 5)")  # CHOSEN
    bn_weight: float = hparam(1.0, "weight of teacher BatchNorm-statistics matching (Eq. 6)")  # CHOSEN
    oh_weight: float = hparam(1.0, "weight of the instance categorical entropy / one-hot loss (Eq. 7)")  # CHOSEN
    balance_weight: float = hparam(20.0, "weight of the batch categorical entropy / balance loss (Eq. 7; "
                                         "20 in both DataFree DFQ scripts)")
    generator_beta1: float = hparam(0.5, "Adam beta1 of the generator (the DataFree re-implementation's "
                                         "GenerativeSynthesizer: betas (0.5, 0.999))")

    # Left out of the run id while at these defaults (config._hashed_params): DFQ runs were stored before them.
    HASH_OMIT_DEFAULT = {**ZooGeneratorParams.HASH_OMIT_DEFAULT, "generator_beta1": 0.5}


# DFQ has no official code: both protocols are the DataFree collection's DFQ scripts (zju-vipa/CMI; the
# shared settings of its generator re-implementations: zoo_common.datafree_generative_train/_PARAMS). One
# epoch is ep_steps / kd_steps = 400 / 10 = 40 iterations of g_steps = 1 generator step and kd_steps = 10
# student steps.
_DFQ_CIFAR10 = PaperProtocol(
    source="DataFree README table (zju-vipa/CMI; = the CMI paper's Table 1, a re-implementation): "
           "CIFAR-10, WRN-40-2 -> WRN-16-1; DFQ's own paper not read here",
    accuracy=86.14, std=None, teacher_accuracy=94.87, selection="best",
    teacher_arch="wrn40_2", student_arch="wrn16_1", image_size=32,
    train=datafree_generative_train(kd_steps=10, student_lr=0.1),
    params=dict(DATAFREE_GENERATIVE_PARAMS, adv_weight=1.0, bn_weight=1.0, oh_weight=1.0, balance_weight=20.0),
    official={**DATAFREE_GENERATIVE_OFFICIAL, "T": "20 on the command line, unused (criterion re-bound to KLDiv(T=1))"},
    deviations=dict(DATAFREE_GENERATIVE_DEVIATIONS),
    code="no official DFQ code; zju-vipa/CMI scripts/dfq/dfq_cifar10_wrn402_wrn161.sh (datafree_kd.py --method dfq "
         "--batch_size 256 --lr 0.1 --epochs 200 --kd_steps 10 --ep_steps 400 --g_steps 1 --lr_g 1e-3 --adv 1 --bn 1 "
         "--oh 1 --balance 20)",
)
_DFQ_CIFAR100 = PaperProtocol(
    source="DataFree README table (zju-vipa/CMI; = the CMI paper's Table 1, a re-implementation): "
           "CIFAR-100, ResNet-34 -> ResNet-18; DFQ's own paper not read here",
    accuracy=77.01, std=None, teacher_accuracy=78.05, selection="best",
    teacher_arch="resnet34", student_arch="resnet18", image_size=32,
    train=dict(_DFQ_CIFAR10.train, student_lr=0.05),
    params=dict(_DFQ_CIFAR10.params),
    official={**DATAFREE_GENERATIVE_OFFICIAL,
              "script": "named dfq_cifar10_res34_res18.sh, but it passes --dataset cifar100"},
    deviations=dict(DATAFREE_GENERATIVE_DEVIATIONS),
    code="no official DFQ code; zju-vipa/CMI scripts/dfq/dfq_cifar10_res34_res18.sh (datafree_kd.py --method dfq "
         "--dataset cifar100 --teacher resnet34 --student resnet18 --batch_size 256 --lr 0.05 --epochs 200 "
         "--kd_steps 10 --ep_steps 400 --g_steps 1 --lr_g 1e-3 --adv 1 --T 1 --bn 1 --oh 1 --balance 20)",
)


@register_method
class DFQ(ZooGeneratorMethod):
    name = "dfq"
    label = "DFQ"
    summary = "DFQ (Choi et al. 2020): adversarial KD with teacher BatchNorm-statistics matching for G"
    Params = DFQParams
    static_student_step = True
    # float32 as the DataFree code (amp="none"; see methods/dafl.py).
    paper_protocols = {"cifar10": _DFQ_CIFAR10, "cifar100": _DFQ_CIFAR100}

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
