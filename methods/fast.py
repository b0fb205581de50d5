"""FastDFKD: Up to 100x Faster Data-free Knowledge Distillation (Fang, Mo, Wang, Song, Wang & Song, AAAI 2022).

A meta generator G_meta learns an initialisation from which a few steps
synthesise a batch (Sec. 3, "meta synthesizer"). For each batch a fast copy
G = G_meta and noise z are optimised for ``synthesis_steps`` steps (Adam, lr
lr_g for G and lr_z for z) on the inversion loss (Eq. 3)::

    bn * L_bn + oh * L_oh + adv * L_adv

(DeepInversion's BatchNorm matching, cross-entropy to the sampled labels, and
the decision-adversarial term of CMI, off for the first ``warmup`` batches);
the finished batch joins the pool the student is distilled on (KD, T = 20).
G_meta is then updated by the first-order meta gradient (Sec. 3.3, Eq. 8-9, the
Reptile / first-order MAML approximation): the sum of the fast generator's
gradients along the inner trajectory, applied by Adam with learning rate
lr_g x synthesis_steps and betas (0.5, 0.999), as in the authors' code.

Settings (the authors' CIFAR script, WRN-40-2 teacher, "Fast-5"): 5 steps per
batch, lr_g 3e-3, lr_z 0.01, adv 1.1, bn 10, oh 0.4, warmup 20 batches,
400 student steps per batch, batch 256, T 20.

CHOSEN: no momentum-averaged BN statistics (the script's bn_mmt 0.9) and no
re-initialisation of G_meta's first layer after 120 batches (reset_l0); the
pool receives the lowest-loss iterate as in the code; the teacher sees a
random crop (padding 4) and flip of each image
(:func:`methods.zoo_common.random_views`), as in the code.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from dfkd_bench.method_api import MethodContext, hparam, make_optimizer, register_method
from dfkd_bench.methods.zoo_common import (
    GeneratorPoolMethod,
    GeneratorPoolParams,
    cpu_preset_params,
    random_views,
)


@dataclass
class FastParams(GeneratorPoolParams):
    synthesis_steps: int = hparam(5, "inner steps per batch (Fast-5)")
    synthesis_lr: float = hparam(3e-3, "Adam learning rate of the fast generator (lr_g)")
    z_lr: float = hparam(0.01, "Adam learning rate of the noise z (lr_z)")
    bn_weight: float = hparam(10.0, "weight of BatchNorm matching L_bn")
    oh_weight: float = hparam(0.4, "weight of the cross-entropy to the sampled labels L_oh")
    adv_weight: float = hparam(1.1, "weight of the decision-adversarial term L_adv")
    warmup: int = hparam(20, "batches synthesised before L_adv is switched on")


@register_method
class FastDFKD(GeneratorPoolMethod):
    name = "fast"
    label = "FastDFKD"
    summary = "FastDFKD (Fang et al. 2022): meta-learned generator initialisation, a few steps per batch; KD on the pool"
    Params = FastParams

    # On the CPU presets (zoo_common.cpu_preset_params): the paper's 5 steps per batch (240 batches
    # in 1,200 iterations).
    preset_params: ClassVar[dict[str, dict[str, Any]]] = cpu_preset_params()

    bn_term = "L_bn (FastDFKD Eq. 3)"

    def __init__(self, params: FastParams, ctx: MethodContext):
        super().__init__(params, ctx)
        self.meta_generator = copy.deepcopy(self.generator)  # G_meta; the fast copy starts each batch from it
        self.meta_optimizer = make_optimizer("adam", self.meta_generator.parameters(), ctx.perf,
                                             lr=params.synthesis_lr * params.synthesis_steps, betas=(0.5, 0.999))
        self.meta_grads = [torch.zeros_like(p) for p in self.meta_generator.parameters()]

    def new_optimizer(self) -> torch.optim.Optimizer:
        return make_optimizer("adam", [{"params": self.generator.parameters()},
                                       {"params": [self.z], "lr": self.params.z_lr}],
                              self.ctx.perf, lr=self.params.synthesis_lr, betas=(0.5, 0.999))

    def prepare_generator(self) -> None:
        self.generator.load_state_dict(self.meta_generator.state_dict())
        for grad in self.meta_grads:
            grad.zero_()

    def synthesis_step(self) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        ctx, p = self.ctx, self.params
        adversarial = p.adv_weight > 0 and self.batches_done >= p.warmup
        with ctx.perf.autocast(ctx.device):
            images = torch.sigmoid(self.generator(self.z).float())
            view = random_views(images, ctx.rng, min_area=1.0, max_shift=4.0)
            if self.bn_stats is not None:
                with self.bn_stats.recording():
                    teacher_logits = ctx.teacher(view)
            else:
                teacher_logits = ctx.teacher(view)
            student_logits = ctx.student_module(view) if adversarial else None
        loss, terms = self.inversion_loss(teacher_logits, student_logits)
        params = list(self.generator.parameters())
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward(inputs=[*params, self.z])
        # First-order meta gradient: the sum of the inner gradients along the trajectory.
        torch._foreach_add_(self.meta_grads, [q.grad if q.grad is not None else torch.zeros_like(q) for q in params])
        self.optimizer.step()
        return loss, images, terms

    def finish_batch(self) -> None:
        self.meta_optimizer.zero_grad(set_to_none=False)
        for parameter, grad in zip(self.meta_generator.parameters(), self.meta_grads, strict=True):
            parameter.grad = grad.clone()
        self.meta_optimizer.step()
        self.meta_optimizer.zero_grad(set_to_none=True)

    def batch_state(self) -> dict[str, Any]:
        return {**super().batch_state(), "meta_grads": [g.clone() for g in self.meta_grads]}

    def load_batch_state(self, state: dict[str, Any]) -> None:
        super().load_batch_state(state)
        for grad, saved in zip(self.meta_grads, state["meta_grads"], strict=True):
            grad.copy_(saved)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "meta_generator": self.meta_generator.state_dict(),
                "meta_optimizer": self.meta_optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # The meta generator first: the batch state then restores the fast copy over it.
        self.meta_generator.load_state_dict(state["meta_generator"])
        self.meta_optimizer.load_state_dict(state["meta_optimizer"])
        super().load_state_dict(state)
