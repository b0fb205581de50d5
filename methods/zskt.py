"""ZSKT: Zero-shot Knowledge Transfer via Adversarial Belief Matching (Micaelli & Storkey, NeurIPS 2019).

ABM with attention transfer. The generator maximises KL(T || S) on its samples
(Sec. 3.1, Eq. 1); the student minimises (Eq. 2)::

    KL(T(x) || S(x)) + beta * sum_l || f(A_l^T)/||f(A_l^T)|| - f(A_l^S)/||f(A_l^S)|| ||^2

over matched blocks l, ``f(A) = mean_c A_c^2`` the spatial attention map of a
block's activations (:func:`dfkd_bench.zoo_losses.attention_transfer`).

Matching rule (:func:`dfkd_bench.methods.zoo_common.stage_modules`): for each
spatial resolution the last direct child of the network whose output has that
resolution; teacher and student are paired at the resolutions both have. For
WRN teachers/students these are the three groups of the paper; for LeNet-5 the
two conv stages. A pair with no common resolution is a configuration error.

Paper settings (Sec. 4, and the authors' CIFAR-10 script scripts/ZeroShot/main0.sh:
80k batches, checked): beta = 250; n_S = 10 student steps per generator step
(the engine's n_S, n_G = 1); Adam, student lr 2e-3 and generator lr 1e-3, cosine
annealing; batch 128; z of dimension 100; KL at temperature 1. The student optimiser, schedule and n_S/n_G are
the engine's, one protocol for every method of a comparison (README, "The DFKD
zoo"); the paper's own student set-up is ``--set n_S=10 --set n_G=1 --set
student_optimizer=adam --set student_lr=2e-3 --set student_weight_decay=0``
(without its cosine schedule, which the engine does not offer).

CHOSEN: the generator's loss is the KL alone (as in the paper; the AT term
trains only the student). Unlike this suite's ABM, no logit bounds or BNmm.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from dfkd_bench import losses, zoo_losses
from dfkd_bench.errors import ConfigError
from dfkd_bench.method_api import MethodContext, hparam, register_method
from dfkd_bench.methods.common import Source
from dfkd_bench.methods.zoo_common import FeatureTap, ZooGeneratorMethod, ZooGeneratorParams, stage_modules, tapping


@dataclass
class ZSKTParams(ZooGeneratorParams):
    at_weight: float = hparam(250.0, "weight beta of the attention-transfer term (Eq. 2)")


@register_method
class ZSKT(ZooGeneratorMethod):
    name = "zskt"
    label = "ZSKT"
    summary = "ZSKT (Micaelli & Storkey 2019): adversarial belief matching plus attention transfer"
    Params = ZSKTParams

    def __init__(self, params: ZSKTParams, ctx: MethodContext):
        super().__init__(params, ctx)
        teacher_stages = stage_modules(ctx.teacher, ctx.image_shape)
        student_stages = stage_modules(ctx.student_module, ctx.image_shape)
        common = [r for r in teacher_stages if r in student_stages]
        if params.at_weight > 0 and not common:
            raise ConfigError("ZSKT's attention transfer needs teacher and student blocks of a common spatial "
                              f"resolution; teacher has {list(teacher_stages)}, student {list(student_stages)}")
        self.resolutions = common
        self.teacher_tap = FeatureTap([teacher_stages[r] for r in common])
        self.student_tap = FeatureTap([student_stages[r] for r in common])
        ctx.note(f"zskt: attention transfer at resolutions {common}", show=False)

    def generator_objective(self, images: Tensor, teacher_logits: Tensor,
                            student_logits: Tensor | None) -> tuple[Tensor, dict[str, Tensor]]:
        kd = losses.kl_divergence(teacher_logits, student_logits)
        return -kd, {"gen_kd": kd}

    def distill(self, sources: list[Source]) -> tuple[Tensor, dict[str, Tensor]]:
        ctx, p = self.ctx, self.params
        (source,) = sources
        images = source.images
        if ctx.perf.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with ctx.perf.autocast(ctx.device):
            with torch.no_grad(), tapping(self.teacher_tap):
                teacher_logits = ctx.teacher(images)
            with tapping(self.student_tap):
                student_logits = ctx.student(images)
        teacher_features, student_features = self.teacher_tap.take(), self.student_tap.take()
        kd = losses.kl_divergence(teacher_logits, student_logits)
        at = sum((zoo_losses.attention_transfer(t, s) for t, s in zip(teacher_features, student_features, strict=True)),
                 kd.new_zeros(()))
        loss = kd + p.at_weight * at
        return loss, {"kd_gen": kd.detach(), "at_gen": at.detach(), "student_loss": loss.detach()}
