"""CMI: Contrastive Model Inversion for Data-Free Knowledge Distillation (Fang, Song, Wang, Shen, Wang & Song, IJCAI 2021).

Each batch is synthesised by a generator G (re-initialised per batch) and its
noise z, optimised together (Sec. 3.2) to minimise the inversion loss (Eq. 3-4)
plus the contrastive loss (Eq. 6-7)::

    bn * L_bn + oh * L_oh + adv * L_adv + cr * L_cr

L_bn is DeepInversion's BatchNorm-statistics matching
(:func:`zoo_losses.feature_distribution_loss`), L_oh the cross-entropy to the
batch's sampled labels, L_adv the "decision adversarial" term
(:func:`zoo_losses.decision_adversarial_loss`: KL pushed up only where the
student agrees with the teacher), and L_cr the instance-discrimination loss
(:func:`zoo_losses.cmi_contrastive_loss`): the teacher's features of a "local"
view (random resized crop) of each image, through a learnt MLP head, must pick
out the "global" view (random crop) of the same image among those of the batch
and of past instances held in a feature memory. Finished batches join the
image pool the student is distilled on (KD at temperature T = 20).

Features: the spatial means of the inputs of the teacher's BatchNorm layers,
concatenated (as in the authors' code). CHOSEN: a teacher without BatchNorm
(LeNet-5) uses the spatial means of its matched blocks instead
(:func:`methods.zoo_common.stage_modules`); L_bn is then skipped, with a note.

Settings (the authors' CIFAR-10 script): 200 iterations per batch, Adam lr 1e-3
with betas (0.5, 0.999) on G and z, adv 0.5, bn 1, oh 1, cr 0.8, contrastive
temperature 0.2, a head of 256 dimensions (``head_dim=256`` in the code's
``datafree_kd.py``; the synthesiser's own default is 128), a memory of 40,960
feature rows and 4,096 negatives per step, 400 student steps per batch, batch
256. As in the code: the images added to the pool AND the features added to the
memory are those of the lowest-loss iterate (the local and global views that
iterate's loss was computed on), the student is in eval mode during synthesis,
and the pool is read through the data set's train transform (``pool_augment``).

CHOSEN: augmentations are :func:`methods.zoo_common.random_views` (square
crops, bilinear).

Step-equivalent to the authors' code (``results/traces/cmi_datafree_cifar10.json``,
``scripts/trace/datafree.py``: its views replaced by these, its labels sorted for both), with
its paper protocols' ``pool_rounding = floor`` (the PNG pool truncates). Not reproduced: in the
authors' code, the batch after the feature memory first fills (``n_updates == bank_size``: batch
161 of the 200 of cmi_cifar10.sh) samples no negatives, averages L_cr over an empty set (NaN),
so its ``best_cost`` comparisons fail and the pool receives that batch's first, unoptimised
iterate (checked by running it); here the memory's negatives are drawn as on every other batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dfkd_bench.train import zoo_losses
from dfkd_bench.train.batchnorm import has_batchnorm
from dfkd_bench.method_api import MethodContext, PaperProtocol, hparam, make_optimizer, register_method
from dfkd_bench.methods.zoo_common import (
    FeatureBank,
    FeatureTap,
    GeneratorPoolMethod,
    GeneratorPoolParams,
    cpu_preset_params,
    random_views,
    stage_modules,
    student_eval,
    tapping,
)


@dataclass
class CMIParams(GeneratorPoolParams):
    synthesis_steps: int = hparam(200, "Adam steps on G and z per batch (g_steps)")
    synthesis_lr: float = hparam(1e-3, "Adam learning rate on G, z and the contrastive head (lr_g)")
    bn_weight: float = hparam(1.0, "weight of BatchNorm matching L_bn")
    oh_weight: float = hparam(1.0, "weight of the cross-entropy to the sampled labels L_oh")
    adv_weight: float = hparam(0.5, "weight of the decision-adversarial term L_adv")
    cr_weight: float = hparam(0.8, "weight beta of the contrastive loss L_cr (Eq. 7)")
    cr_temperature: float = hparam(0.2, "temperature of the contrastive loss", "tau")
    head_dim: int = hparam(256, "output dimension of the contrastive MLP head")
    feature_memory: int = hparam(40960, "rows of the memory of past instance features")
    negatives: int = hparam(4096, "past instances drawn from the memory per step as negatives")


def reset_generator(generator: nn.Module, rng: torch.Generator) -> None:
    """CMI's per-batch re-initialisation: weights N(0, 0.02), BatchNorm scales N(1, 0.02), biases 0."""
    with torch.no_grad():
        for module in generator.modules():
            if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
                module.weight.copy_(0.02 * torch.randn(module.weight.shape, generator=rng, device=module.weight.device))
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, nn.modules.batchnorm._BatchNorm) and module.weight is not None:
                module.weight.copy_(1 + 0.02 * torch.randn(module.weight.shape, generator=rng, device=module.weight.device))
                module.bias.zero_()


# CMI's protocols: the official script scripts/cmi/cmi_cifar10.sh of zju-vipa/CMI (datafree_kd.py defaults:
# 200 epochs, SGD momentum 0.9, weight decay 1e-4, CosineAnnealingLR(T_max=epochs) stepped per epoch,
# evaluation after every epoch, best top-1 kept). One epoch is ep_steps / kd_steps = 400 / 400 = 1 iteration:
# one batch synthesised in g_steps = 200 steps, then kd_steps = 400 student steps on the pool.
_CMI_CIFAR10 = PaperProtocol(
    source="CMI (Fang et al., IJCAI 2021), Table 1 as printed in the official README (zju-vipa/CMI): "
           "CIFAR-10, WRN-40-2 -> WRN-16-1",
    accuracy=90.01, std=None, teacher_accuracy=94.87, selection="best",
    teacher_arch="wrn40_2", student_arch="wrn16_1", image_size=32,
    train=dict(epochs=200, steps_per_epoch=1, generator_steps=200, student_steps=400, batch_size=256,
               student_optimizer="sgd", student_lr=0.1, student_weight_decay=1e-4, student_momentum=0.9,
               lr_schedule="cosine_epoch", lr_decay=1.0, lr_milestones=[], eval_every=1, amp="none"),
    params=dict(generator="datafree_gen", noise_dim=256, synthesis_steps=200, synthesis_lr=1e-3, adv_weight=0.5,
                bn_weight=1.0, oh_weight=1.0, cr_weight=0.8, cr_temperature=0.2, head_dim=256, feature_memory=40960,
                # memory_size: the official pool is unbounded (every batch is kept as PNG files); 200 epochs x 256
                # images = 51,200 hold every batch of the run, so nothing leaves the pool, as there. PNG files of
                # astype('uint8'): the level below (found by its step-equivalence trace).
                negatives=4096, kd_temperature=20.0, memory_size=51200, pool_augment="crop_flip",
                pool_rounding="floor"),
    official={"procedure": "Table 1's 90.01 is adversarial CMI started from ~50k pre-inverted images "
                           "(adv_cmi_cifar10_wrn402_wrn161.sh, --cmi_init); from scratch the README expects ~88.82 "
                           "with scratch_cmi_cifar10_wrn402_wrn161.sh (KD batch 128, synthesis batch 256, cr_T 0.1)",
              "generator architecture": "Generator(nz=256, ngf=64) of datafree/models/generator.py: Linear -> "
                                        "128x8x8, BN, up, conv 128, BN, LReLU, up, conv 64, BN, LReLU, conv 3, "
                                        "sigmoid (= datafree_gen; the sigmoid is the method's)",
              "normalisation": "CIFAR mean (0.4914, 0.4822, 0.4465), std (0.2023, 0.1994, 0.2010)",
              "pool": "PNG files of (clamp(x, 0, 1) * 255).astype('uint8') (truncated), read in shuffled epochs"},
    deviations={"procedure": "from scratch (cmi_cifar10.sh): the suite has no pre-inverted initial pool",
                "normalisation": "the dataset's statistics of this suite (the teacher's own)",
                "pool": "uniform draws with replacement per step (zoo_common.PoolMethod.student_images)"},
    code="zju-vipa/CMI scripts/cmi/cmi_cifar10.sh (datafree_kd.py --method cmi --batch_size 256 --teacher wrn40_2 "
         "--student wrn16_1 --lr 0.1 --kd_steps 400 --ep_steps 400 --g_steps 200 --lr_g 1e-3 --adv 0.5 --bn 1.0 "
         "--oh 1.0 --cr 0.8 --cr_T 0.2 --T 20)",
)
_CMI_CIFAR100 = PaperProtocol(
    source="CMI (Fang et al., IJCAI 2021), Table 1 as printed in the official README (zju-vipa/CMI): "
           "CIFAR-100, WRN-40-2 -> WRN-16-1",
    accuracy=57.91, std=None, teacher_accuracy=75.83, selection="best",
    teacher_arch="wrn40_2", student_arch="wrn16_1", image_size=32,
    train=dict(_CMI_CIFAR10.train), params=dict(_CMI_CIFAR10.params),
    official={**_CMI_CIFAR10.official,
              "procedure": "Table 1's numbers are adversarial CMI from pre-inverted images (README); no CIFAR-100 "
                           "procedure published",
              "settings": "no CIFAR-100 script (README: only the CIFAR-10 WRN-40-2 -> WRN-16-1 hyper-parameters)"},
    deviations={**_CMI_CIFAR10.deviations,
                "procedure": "from scratch with the CIFAR-10 script's settings",
                "settings": "the CIFAR-10 script's (the only CMI settings the authors published)"},
    code="zju-vipa/CMI scripts/cmi/cmi_cifar10.sh with --dataset cifar100 (no CIFAR-100 script published)",
)


@register_method
class CMI(GeneratorPoolMethod):
    name = "cmi"
    label = "CMI"
    summary = "CMI (Fang et al. 2021): generator inversion with BN matching and a contrastive loss; KD on the pool"
    Params = CMIParams
    paper_protocols = {"cifar10": _CMI_CIFAR10, "cifar100": _CMI_CIFAR100}

    # CHOSEN, on the CPU presets (zoo_common.cpu_preset_params): 20 steps per batch, so that 60
    # batches join the pool (the paper's 200 would finish 6 in 1,200 iterations).
    preset_params: ClassVar[dict[str, dict[str, Any]]] = cpu_preset_params(synthesis_steps=20)

    bn_term = "L_bn (CMI Eq. 3)"

    def __init__(self, params: CMIParams, ctx: MethodContext):
        super().__init__(params, ctx)
        if has_batchnorm(ctx.teacher):
            layers = [m for m in ctx.teacher.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
            self.features = FeatureTap(layers, inputs=True)
        else:
            self.features = FeatureTap(list(stage_modules(ctx.teacher, ctx.image_shape).values()))
            ctx.note("cmi: the teacher has no BatchNorm: contrastive features are the spatial means of its blocks",
                     show=False)
        with torch.no_grad(), tapping(self.features):
            ctx.teacher(torch.zeros((2, *ctx.image_shape), device=ctx.device))
        dim = sum(f.shape[1] for f in self.features.take())
        self.head = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, params.head_dim)).to(ctx.device)
        self.head_optimizer = make_optimizer("adam", self.head.parameters(), ctx.perf, lr=params.synthesis_lr)
        self.memory = FeatureBank(params.feature_memory, 2 * dim, ctx.device)
        self.step_features: Tensor | None = None  # [local, global] features of the last step's iterate
        self.best_features: Tensor | None = None  # ... of the lowest-loss iterate of the batch in progress

    def new_optimizer(self) -> torch.optim.Optimizer:
        return make_optimizer("adam", [{"params": self.generator.parameters()}, {"params": [self.z]}], self.ctx.perf,
                              lr=self.params.synthesis_lr, betas=(0.5, 0.999))

    def prepare_generator(self) -> None:
        reset_generator(self.generator, self.ctx.rng)

    def instance_features(self, images: Tensor) -> tuple[Tensor, Tensor]:
        with tapping(self.features):
            logits = self.ctx.teacher(images)
        features = torch.cat([f.float().mean(dim=(2, 3)) for f in self.features.take()], dim=1)
        return features, logits

    def embed(self, features: Tensor) -> Tensor:
        return F.normalize(self.head(features), p=2, dim=1)

    def synthesis_step(self) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        ctx, p = self.ctx, self.params
        with ctx.perf.autocast(ctx.device):
            images = torch.sigmoid(self.generator(self.z).float())
            global_view = random_views(images, ctx.rng, min_area=1.0, max_shift=4.0)
            local_view = random_views(images, ctx.rng, min_area=0.25)
            if self.bn_stats is not None:
                with self.bn_stats.recording():
                    global_features, teacher_logits = self.instance_features(global_view)
            else:
                global_features, teacher_logits = self.instance_features(global_view)
            local_features, _ = self.instance_features(local_view)
            student_logits = None
            if p.adv_weight > 0:
                with student_eval(ctx.student_module):
                    student_logits = ctx.student_module(global_view)
        self.step_features = torch.cat([local_features, global_features], dim=1).detach()
        loss, terms = self.inversion_loss(teacher_logits, student_logits)
        if p.cr_weight > 0:
            cached = self.memory.sample(p.negatives, ctx.rng)
            cached_local, cached_global = cached.chunk(2, dim=1)
            anchors = self.embed(torch.cat([local_features, cached_local]))
            positives = self.embed(torch.cat([global_features, cached_global]))
            terms["gen_cr"] = zoo_losses.cmi_contrastive_loss(anchors, positives, p.cr_temperature,
                                                             new_rows=images.shape[0])
            loss = loss + p.cr_weight * terms["gen_cr"]
        self.optimizer.zero_grad(set_to_none=True)
        self.head_optimizer.zero_grad(set_to_none=True)
        loss.backward(inputs=[*self.generator.parameters(), self.z, *self.head.parameters()])
        self.optimizer.step()
        self.head_optimizer.step()
        return loss, images, terms

    def track_best(self, better: Tensor | None) -> None:
        if better is None:
            self.best_features = self.step_features.clone()
        else:
            self.best_features = torch.where(better, self.step_features, self.best_features)

    @torch.no_grad()
    def finish_batch(self) -> None:
        self.memory.push(self.best_features)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "head": self.head.state_dict(),
                "head_optimizer": self.head_optimizer.state_dict(), "memory": self.memory.state_dict(),
                "best_features": self.best_features}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        best = state.get("best_features")
        self.best_features = None if best is None else best.to(self.ctx.device)
        self.head.load_state_dict(state["head"])
        self.head_optimizer.load_state_dict(state["head_optimizer"])
        self.memory.load_state_dict(state["memory"])
