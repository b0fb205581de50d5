"""What ABM, DFKD-Mem and MAD share: the adversarial generator and the student's KD.

The paper trains the three methods "using exactly the same settings", so the
generator objective (Eq. 6 / Eq. 11: -KD, NLL, NormReg, BNmm and the logit
bounds), the class-conditional generator of Sec. 3.2 with its conditioning
modes, generator pre-training, and the student loss of Eq. 10 are written once
here. Each method file only adds what makes it different: ``abm.py`` nothing,
``mem.py`` a memory bank, ``mad.py`` an EMA generator.

Choices where the paper is silent (also in docs/choices.md):

* Generators always normalise with batch statistics (train-mode BatchNorm),
  as in the DFKD reference implementations; their running buffers never
  affect a sample.
* During a generator step the student runs in training mode, exactly as in
  its own steps, but only the generator (and class embeddings) receive
  gradients (``backward(inputs=...)``), so no work is spent on student weight
  gradients that would be discarded.
* Class embeddings ``E`` live outside the generator and are shared by G and
  the EMA generator (the paper's Fig. 1 feeds the same E to both); they are
  initialised from N(0, I), i.e. inside the NormReg radius ``gamma*sqrt(d_e)``.
* For ``uncond`` generators there are no labels, so the NLL (lambda3) and
  NormReg (lambda4) terms must be 0 (the paper's Fig. 9 note); asking for
  them is a configuration error, not silently ignored.
* The noise of a whole student stage is drawn at the start of the stage, so
  sampling per step and sampling the stage into one buffer see the same
  numbers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from dfkd_bench.train import losses
from dfkd_bench.train.batchnorm import (BatchNormStatistics, batchnorm_groups, frozen_batchnorm_buffers,
                                        has_batchnorm, make_groupable)
from dfkd_bench.errors import ConfigError
from dfkd_bench.method_api import Method, MethodContext, hparam, make_optimizer
from dfkd_bench.models import build_generator, generator_for_image_size


@dataclass
class AdversarialParams:
    """Hyper-parameters shared by ABM, DFKD-Mem and MAD (paper defaults: CIFAR, Tables 5-7)."""

    generator: str = hparam("auto", "generator architecture: gen_small, gen32, gen64, gen256 (Table 8), or auto by image size")
    noise_dim: int = hparam(256, "dimension of the noise z and of the class embeddings", "d_z")
    conditioning: str = hparam("uncond", "first-layer conditioning of G (App. B.3): uncond, cat or sum (G(z + e_y))", "cg")
    generator_lr: float = hparam(1e-3, "Adam learning rate of the generator and class embeddings", "lr_G")
    generator_weight_decay: float = hparam(5e-4, "Adam weight decay of the generator", "wd_G")
    generator_beta1: float = hparam(0.9, "Adam beta1 of the generator (the paper uses Adam's defaults)")
    generator_beta2: float = hparam(0.999, "Adam beta2 of the generator")
    kd_weight: float = hparam(1.0, "weight of the student's KD on fresh samples of G (Eq. 4/10)", "lambda0")
    generator_kd_weight: float = hparam(1.0, "weight of -KD in the generator loss (Eq. 6/11)", "lambda2")
    nll_weight: float = hparam(0.0, "weight of the teacher NLL of the sampled class (Eq. 7) in the generator loss", "lambda3")
    normreg_weight: float = hparam(0.0, "weight of the class-embedding norm regulariser (Eq. 8)", "lambda4")
    bnmm_weight: float = hparam(1.0, "weight of teacher BatchNorm moment matching (Eq. 9); skipped if the teacher has no BN", "lambda5")
    student_bound_weight: float = hparam(0.01, "weight of the student logit bound max(|S(x)|-delta, 0) (Eq. 10)", "zeta0")
    teacher_bound_weight: float = hparam(0.1, "weight of the teacher logit bound max(|T(x)|-delta, 0) (Eq. 11)", "zeta1")
    pixel_bound_weight: float = hparam(0.1, "weight of the generator-logit bound max(|u|-nu, 0) (Eq. 11)", "zeta2")
    logit_bound: float = hparam(20.0, "bound delta on teacher and student logits (Eqs. 10-11)", "delta")
    pixel_logit_bound: float = hparam(20.0, "bound nu on the generator's pre-sigmoid outputs (Eq. 11)", "nu")
    normreg_gamma: float = hparam(1.1, "scale gamma of the NormReg radius gamma*sqrt(d_e) (Eq. 8)", "gamma")
    pretrain_steps: int = hparam(0, "generator steps with the KD weight at 0 before distillation (Sec. 5.1)", "pgs")

    def validate(self) -> None:
        if self.conditioning not in ("uncond", "cat", "sum"):
            raise ConfigError(f"conditioning={self.conditioning!r} is not one of uncond, cat, sum")
        if self.conditioning == "uncond" and (self.nll_weight or self.normreg_weight):
            raise ConfigError(
                "nll_weight (lambda3) and normreg_weight (lambda4) need class labels; with conditioning=uncond "
                "set them to 0, or use --set conditioning=sum"
            )
        for name in ("kd_weight", "generator_kd_weight", "nll_weight", "normreg_weight", "bnmm_weight",
                     "student_bound_weight", "teacher_bound_weight", "pixel_bound_weight"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.normreg_gamma < 1:
            raise ConfigError(f"normreg_gamma (gamma) must be >= 1 (Eq. 8), got {self.normreg_gamma}")
        for name, symbol in (("logit_bound", "delta"), ("pixel_logit_bound", "nu")):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} ({symbol}) must be > 0, got {getattr(self, name)}")
        if self.generator_lr < 0:
            raise ConfigError(f"generator_lr (lr_G) must be >= 0 (0 freezes G), got {self.generator_lr}")
        if self.generator_weight_decay < 0:
            raise ConfigError(f"generator_weight_decay (wd_G) must be >= 0, got {self.generator_weight_decay}")
        for name in ("generator_beta1", "generator_beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if not 1 <= self.noise_dim <= 2**20:
            raise ConfigError(f"noise_dim (d_z) must be in [1, {2**20}], got {self.noise_dim}")
        if self.pretrain_steps < 0:
            raise ConfigError(f"pretrain_steps (pgs) must be >= 0, got {self.pretrain_steps}")
        if self.generator != "auto":
            from dfkd_bench.models import list_generators

            names = [info.name for info in list_generators()]
            if self.generator.strip().lower() not in names:
                raise ConfigError(f"generator={self.generator!r} is not one of auto, {', '.join(names)}")


def teacher_student_logits(ctx: MethodContext, images: Tensor,
                           teacher_logits: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """One batch through the frozen teacher (inference mode; its logits cloned so that a loss
    can use them) and through the training student, with the run's channels-last and autocast.
    ``teacher_logits`` already computed for these very images (detached) skip the teacher."""
    if ctx.perf.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    with ctx.perf.autocast(ctx.device):
        if teacher_logits is None:
            with torch.inference_mode():
                inferred = ctx.teacher(images)
            teacher_logits = inferred.clone()  # outside inference mode: a tensor a loss may use
        student_logits = ctx.student(images)
    return teacher_logits, student_logits


class Source(NamedTuple):
    """One synthetic source of a student step: its images and the weight of its KD term."""

    name: str
    images: Tensor
    weight: float
    teacher_logits: Tensor | None = None
    """The teacher's logits of ``images`` when the method has them already (DAFL's student trains on the
    generator step's very batch, which the teacher saw there); None: the student step runs the teacher."""


class _EmbeddingRows(torch.autograd.Function):
    """``weight[labels]`` whose backward is a one-hot matmul.

    The forward is an exact row gather. PyTorch's own embedding backward is an
    index_put / index_add, which under deterministic algorithms on a GPU is a
    sort-based kernel that cost ~58 ms per iteration on an H200; the matmul
    ``one_hot(labels)^T @ grad`` computes the same sums deterministically.
    """

    @staticmethod
    def forward(ctx, weight: Tensor, labels: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(labels)
        ctx.rows = weight.shape[0]
        return weight.index_select(0, labels)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        (labels,) = ctx.saved_tensors
        one_hot = (labels.unsqueeze(1) == torch.arange(ctx.rows, device=labels.device)).to(grad.dtype)
        return one_hot.t() @ grad, None


class ConditionalGenerator(nn.Module):
    """G plus the class embeddings E: ``u = G(z, e_y)`` (pre-sigmoid logits)."""

    def __init__(self, generator: nn.Module, class_embedding: nn.Embedding | None):
        super().__init__()
        self.generator = generator
        self.class_embedding = class_embedding

    def embed(self, labels: Tensor) -> Tensor:
        """The class embeddings ``e_y`` of ``labels`` (rows of E, exactly)."""
        return _EmbeddingRows.apply(self.class_embedding.weight, labels)

    def forward(self, z: Tensor, labels: Tensor | None = None) -> Tensor:
        embedding = self.embed(labels) if self.class_embedding is not None else None
        return self.generator(z, embedding)


class AdversarialMethod(Method):
    """ABM's adversarial game (Eqs. 1-3) with the full generator objective of Eq. 11.

    Subclasses change what the student trains on by overriding
    :meth:`student_sources`, and may hook :meth:`end_generator_stage`.
    """

    Params = AdversarialParams
    accepts_normalized_generator = False  # ZooGeneratorMethod maps normalised-space outputs to images

    def __init__(self, params: AdversarialParams, ctx: MethodContext):
        super().__init__(params, ctx)
        params.validate()
        channels, height, _ = ctx.image_shape
        arch = params.generator if params.generator != "auto" else generator_for_image_size(height)
        generator = build_generator(
            arch, params.noise_dim, channels, height, conditioning=params.conditioning,
            num_classes=ctx.num_classes, output_logits=True,
        )
        if getattr(generator, "output_space", "logits") != "logits" and not self.accepts_normalized_generator:
            raise ConfigError(f"generator {arch!r} outputs images in the teacher's normalised space (a DFKD paper's "
                              f"own generator); {self.name} needs one with pre-sigmoid outputs, e.g. gen_small")
        embedding = None
        if params.conditioning != "uncond":
            embedding = nn.Embedding(ctx.num_classes, params.noise_dim)
            nn.init.normal_(embedding.weight, 0.0, 1.0)
        self.net = ConditionalGenerator(generator, embedding).to(ctx.device)
        make_groupable(self.net)
        if ctx.perf.channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
        self.net_parallel = ctx.wrap_distributed(self.net)
        self.optimizer = make_optimizer(
            "adam", self.net.parameters(), ctx.perf, lr=params.generator_lr,
            weight_decay=params.generator_weight_decay, betas=(params.generator_beta1, params.generator_beta2),
        )
        self.teacher_bn: BatchNormStatistics | None = None
        if params.bnmm_weight > 0:
            if has_batchnorm(ctx.teacher):
                self.teacher_bn = BatchNormStatistics(ctx.teacher, synchronise=ctx.distributed.world_size > 1,
                                                      process_group=ctx.distributed.process_group)
            else:
                ctx.note("the teacher has no BatchNorm layers: the BNmm term (Eq. 9) is skipped", show=False)
        self.student_groupable = make_groupable(ctx.student_module)
        if ctx.perf.fused_forward and not self.student_groupable:
            ctx.note("the student has BatchNorm layers that cannot be grouped per source: one forward per source")
        self._stage_noise: dict[str, list[tuple[Tensor, Tensor | None]]] = {}
        self._stage_images: dict[str, list[Tensor]] = {}
        self._step_in_stage = 0
        self._pretrain_done = 0  # generator pre-training steps done (a stop may come in the middle)
        self._batch: dict[str, Tensor] | None = None  # the inputs of the student step being computed
        self.counters = {"synthetic_images": 0}  # images G and its copies produced for training

    # ------------------------------------------------------------- sampling ---
    @property
    def conditional(self) -> bool:
        return self.net.class_embedding is not None

    def draw_noise(self, rows: int, rng: torch.Generator | None = None) -> tuple[Tensor, Tensor | None]:
        z = self.ctx.randn(rows, self.params.noise_dim, rng)
        labels = self.ctx.randint(self.ctx.num_classes, rows, rng) if self.conditional else None
        return z, labels

    def generator_modules(self) -> dict[str, nn.Module]:
        """The generators this method samples student batches from (name -> module taking (z, e))."""
        return {"gen": self.net.generator}

    @torch.no_grad()
    def synthesize(self, generator: nn.Module, noise: tuple[Tensor, Tensor | None],
                   groups: int = 1) -> Tensor:
        """Images in [0, 1] from ``generator`` (G or a copy of it) with the shared embeddings."""
        z, labels = noise
        embedding = self.net.embed(labels) if labels is not None else None
        with self.ctx.perf.autocast(self.ctx.device):
            if groups > 1:
                with batchnorm_groups(generator, [z.shape[0] // groups] * groups):
                    out = generator(z, embedding)
            else:
                out = generator(z, embedding)
        return self.generator_images(out)

    def generator_images(self, out: Tensor) -> Tensor:
        """A generator's output -> images in [0, 1]: the sigmoid of its logits (Sec. 4.2)."""
        return torch.sigmoid(out.float())

    def measurement_sources(self, num_samples: int, rng: torch.Generator) -> dict[str, Tensor]:
        images = {}
        for name, generator in self.generator_modules().items():
            with frozen_batchnorm_buffers(generator):
                images[name] = self.synthesize(generator, self.draw_noise(num_samples, rng))
        return images

    def num_student_sources(self) -> int:
        """How many sources a student step draws from (for the equal-images control)."""
        return len(self.generator_modules())

    def source_batch(self) -> int:
        """Images per source and student step: one batch, or under the equal-images control
        (``student_images_per_step`` N) N split evenly over the sources -- e.g. N = 2 x bs
        doubles ABM's batch and leaves MAD's and DFKD-Mem's two batches as they are."""
        total = self.ctx.student_images_per_step
        if not total:
            return self.ctx.batch_size
        if total < self.num_student_sources():
            raise ConfigError(f"student_images_per_step={total} is fewer than the {self.num_student_sources()} "
                              f"sources of {self.name}")
        return total // self.num_student_sources()

    def _begin_student_stage(self) -> None:
        """Draw the noise of the whole stage: independent z for each generator (z and z' of Eq. 4)."""
        steps, batch = self.ctx.student_steps, self.source_batch()
        self._stage_noise = {name: [self.draw_noise(batch) for _ in range(steps)] for name in self.generator_modules()}
        self._stage_images = {}
        if self.ctx.perf.stage_buffer:
            for name, generator in self.generator_modules().items():
                noise = self._stage_noise[name]
                z = torch.cat([n[0] for n in noise])
                labels = torch.cat([n[1] for n in noise]) if self.conditional else None
                images = self.synthesize(generator, (z, labels), groups=steps)
                self._stage_images[name] = list(images.split(batch))
        self._step_in_stage = 0

    def stage_samples(self, name: str) -> Tensor:
        """This student step's fresh batch from the generator called ``name``."""
        if self._batch is not None:
            if name in self._batch:  # sampled for the whole stage beforehand
                return self._batch[name]
            return self.synthesize(self.generator_modules()[name], (self._batch[f"{name}.z"],
                                                                    self._batch.get(f"{name}.y")))
        if self._stage_images:
            return self._stage_images[name][self._step_in_stage]
        return self.synthesize(self.generator_modules()[name], self._stage_noise[name][self._step_in_stage])

    # ------------------------------------------------------- generator side ---
    def pretrain(self) -> None:
        # Continues where a stop left it (``_pretrain_done`` is stage state): the engine calls it again.
        while self._pretrain_done < self.params.pretrain_steps:
            self.generator_step(kd_weight=0.0)
            self._pretrain_done += 1
            self.ctx.preemption_point("pretrain", self._pretrain_done)

    def generator_step(self, kd_weight: float | None = None) -> dict[str, Tensor]:
        """One Adam step on G and E minimising Eq. 11 (``kd_weight`` 0: pre-training)."""
        p, ctx = self.params, self.ctx
        kd_weight = p.generator_kd_weight if kd_weight is None else kd_weight
        z, labels = self.draw_noise(ctx.batch_size)
        self.counters["synthetic_images"] += z.shape[0]
        terms: dict[str, Tensor] = {}
        with ctx.perf.autocast(ctx.device):
            logits = self.net_parallel(z, labels)
            images = torch.sigmoid(logits.float())
            if ctx.perf.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            if self.teacher_bn is not None:
                with self.teacher_bn.recording():
                    teacher_logits = ctx.teacher(images)
            else:
                teacher_logits = ctx.teacher(images)
            student_logits = ctx.student_module(images) if kd_weight > 0 else None

        loss = logits.new_zeros((), dtype=torch.float32)
        if student_logits is not None:
            terms["gen_kd"] = losses.kl_divergence(teacher_logits, student_logits)
            loss = loss - kd_weight * terms["gen_kd"]
        if p.nll_weight > 0:
            terms["gen_nll"] = losses.nll_loss(teacher_logits, labels)
            loss = loss + p.nll_weight * terms["gen_nll"]
        if p.normreg_weight > 0:
            terms["gen_normreg"] = losses.norm_regulariser(self.net.embed(labels), p.normreg_gamma)
            loss = loss + p.normreg_weight * terms["gen_normreg"]
        if self.teacher_bn is not None:
            terms["gen_bnmm"] = losses.batchnorm_moment_loss(
                self.teacher_bn.means, self.teacher_bn.vars,
                self.teacher_bn.running_means, self.teacher_bn.running_vars,
            )
            loss = loss + p.bnmm_weight * terms["gen_bnmm"]
        if p.teacher_bound_weight > 0:
            terms["gen_bound_teacher"] = losses.bound_penalty(teacher_logits, p.logit_bound)
            loss = loss + p.teacher_bound_weight * terms["gen_bound_teacher"]
        if p.pixel_bound_weight > 0:
            terms["gen_bound_pixels"] = losses.bound_penalty(logits, p.pixel_logit_bound)
            loss = loss + p.pixel_bound_weight * terms["gen_bound_pixels"]
        terms["gen_loss"] = loss

        self.optimizer.zero_grad(set_to_none=True)
        # Only G and E need gradients: pruning the student's weight gradients
        # saves about a third of the student's backward.
        loss.backward(inputs=list(self.net.parameters()))
        self.optimizer.step()
        return {name: value.detach() for name, value in terms.items()}

    def end_generator_stage(self) -> None:
        self._begin_student_stage()

    # --------------------------------------------------------- student side ---
    def student_sources(self) -> list[Source]:
        """What the student trains on at this step. ABM: fresh samples of G."""
        return [Source("gen", self.stage_samples("gen"), self.params.kd_weight)]

    def step_input(self, name: str) -> Tensor:
        """An input of the student step being computed (see :meth:`extra_student_inputs`)."""
        assert self._batch is not None, "step_input() is for use inside student_sources()"
        return self._batch[name]

    def extra_student_inputs(self) -> dict[str, Tensor]:
        """Further inputs of a student step chosen on the host side (e.g. memory samples)."""
        return {}

    def student_batch(self) -> dict[str, Tensor]:
        """This step's noise of every generator (or its stage-buffer images) and extra inputs."""
        batch: dict[str, Tensor] = {}
        for name in self.generator_modules():
            if self._stage_images:
                batch[name] = self._stage_images[name][self._step_in_stage]
            else:
                z, labels = self._stage_noise[name][self._step_in_stage]
                batch[f"{name}.z"] = z
                if labels is not None:
                    batch[f"{name}.y"] = labels
        batch.update(self.extra_student_inputs())
        return batch

    def student_loss_from(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor], Any]:
        self._batch = batch
        try:
            sources = [s for s in self.student_sources() if s.images.shape[0] > 0]
        finally:
            self._batch = None
        loss, terms = self.distill(sources)
        return loss, terms, sources

    def finish_student_step(self, keep: Any) -> None:
        generated = self.generator_modules()
        self.counters["synthetic_images"] += sum(s.images.shape[0] for s in keep if s.name in generated)
        self.after_student_step(keep)
        self._step_in_stage += 1

    def student_loss(self) -> tuple[Tensor, dict[str, Tensor]]:
        loss, terms, sources = self.student_loss_from(self.student_batch())
        self.finish_student_step(sources)
        return loss, terms

    def after_student_step(self, sources: list[Source]) -> None:
        """Hook for methods that keep what the student saw (DFKD-Mem's memory)."""

    def source_logits(self, sources: list[Source]) -> list[tuple[Tensor, Tensor]]:
        """Teacher and student logits of each source: with the fused forward (several sources,
        a groupable student) one pass over all of them, BatchNorm statistics per source."""
        ctx = self.ctx
        if not (ctx.perf.fused_forward and self.student_groupable and len(sources) > 1) or any(
                source.teacher_logits is not None for source in sources):
            return [teacher_student_logits(ctx, source.images, source.teacher_logits) for source in sources]
        images = torch.cat([s.images for s in sources])
        if ctx.perf.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        sizes = [s.images.shape[0] for s in sources]
        with ctx.perf.autocast(ctx.device):
            with torch.inference_mode():
                teacher_all = ctx.teacher(images)
            with batchnorm_groups(ctx.student_module, sizes):
                student_all = ctx.student(images)
        return [(t.clone(), s) for t, s in zip(teacher_all.split(sizes), student_all.split(sizes))]

    def source_loss(self, source: Source, teacher_logits: Tensor,
                    student_logits: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """One source's term of Eq. 10, KD + zeta0 * student logit bound, and its logged parts
        (``kd_<source>``; ``student_bound``, summed over the sources by :meth:`distill`)."""
        p = self.params
        kd = losses.kl_divergence(teacher_logits, student_logits)
        if p.student_bound_weight <= 0:
            return kd, {f"kd_{source.name}": kd.detach(), "student_bound": kd.new_zeros((), dtype=torch.float32)}
        bound = losses.bound_penalty(student_logits, p.logit_bound)
        return kd + p.student_bound_weight * bound, {f"kd_{source.name}": kd.detach(), "student_bound": bound.detach()}

    def distill(self, sources: list[Source]) -> tuple[Tensor, dict[str, Tensor]]:
        """Eq. 10: the sum over sources of weight * :meth:`source_loss`; a part logged by several
        sources is summed."""
        loss = sources[0].images.new_zeros((), dtype=torch.float32)
        terms: dict[str, Tensor] = {}
        for source, (teacher_logits, student_logits) in zip(sources, self.source_logits(sources)):
            term, parts = self.source_loss(source, teacher_logits, student_logits)
            loss = loss + source.weight * term
            for name, value in parts.items():
                terms[name] = terms[name] + value if name in terms else value
        terms["student_loss"] = loss.detach()
        return loss, terms

    # ---------------------------------------------------------------- state ---
    # Inside a stage (a stop request in its middle): the noise (or the images) the student stage drew at
    # its start and the step it has reached; how far generator pre-training got.
    stage_state_attributes = ("_stage_noise", "_stage_images", "_step_in_stage", "_pretrain_done")

    def stage_state_dict(self) -> dict[str, Any]:
        # Only the stage's batches not trained on yet: the others are never read again (copies, so that a
        # stage buffer's views do not drag the whole buffer into the checkpoint).
        state = super().stage_state_dict()
        done = self._step_in_stage
        state["_stage_noise"] = {name: noise[done:] for name, noise in self._stage_noise.items()}
        state["_stage_images"] = {name: [batch.clone() for batch in images[done:]]
                                  for name, images in self._stage_images.items()}
        return state

    def load_stage_state_dict(self, state: dict[str, Any]) -> None:
        super().load_stage_state_dict(state)
        done = [None] * self._step_in_stage  # the batches trained on before the stop (never read again)
        self._stage_noise = {name: done + list(noise) for name, noise in self._stage_noise.items()}
        self._stage_images = {name: done + list(images) for name, images in self._stage_images.items()}

    def state_dict(self) -> dict[str, Any]:
        # Between iterations no stage is half-way: the next stage draws its noise afresh from the
        # (checkpointed) RNG. A checkpoint in the middle of a stage adds ``stage_state_attributes``.
        return {"generator": self.net.state_dict(), "generator_optimizer": self.optimizer.state_dict(),
                "counters": dict(self.counters)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.net.load_state_dict(state["generator"])
        self.optimizer.load_state_dict(state["generator_optimizer"])
        self.counters.update(state.get("counters", {}))


# ------------------------------------------------- the MAD paper's own protocol (Table 2) ---

_MAD_TABLE2 = {"cifar10": 94.65, "cifar100": 75.65}  # Table 2's teachers (WRN-40-2, also Table 10)
_PROTOCOL_TRAIN_KEYS = ("epochs", "steps_per_epoch", "generator_steps", "student_steps", "batch_size",
                        "student_optimizer", "student_lr", "student_weight_decay", "student_momentum", "lr_decay",
                        "lr_milestones", "eval_every")


def mad_table2_protocols(params_class: type, accuracies: dict[str, float]) -> dict:
    """ABM's, DFKD-Mem's and MAD's paper protocols on CIFAR-10/100: the MAD paper's Table 2 settings, which
    ARE the cifar presets (Tables 5-7, WRN-40-2 -> WRN-16-2; ``experiments/table2.toml`` runs the same
    settings under the common protocol). CHOSEN: selection "final" -- the paper does not say whether
    Table 2 reports the final or the best accuracy."""
    import dataclasses

    from dfkd_bench.method_api import PaperProtocol
    from dfkd_bench.presets import PRESETS

    fields = {f.name for f in dataclasses.fields(params_class)}
    protocols = {}
    for dataset, accuracy in accuracies.items():
        preset = PRESETS[dataset]
        train = preset.train_config("wrn40_2", "wrn16_2")
        protocols[dataset] = PaperProtocol(
            source=f"Do et al., Momentum Adversarial Distillation (NeurIPS 2022), Table 2: "
                   f"{'CIFAR10' if dataset == 'cifar10' else 'CIFAR100'}, WRN-40-2 -> WRN-16-2",
            accuracy=accuracy, std=None, teacher_accuracy=_MAD_TABLE2[dataset], selection="final",
            teacher_arch="wrn40_2", student_arch="wrn16_2", image_size=32,
            train={key: getattr(train, key) for key in _PROTOCOL_TRAIN_KEYS},
            params={k: v for k, v in preset.params.items() if k in fields},
            official={"selection": "not stated (Table 2)"},
            deviations={"selection": "final accuracy (CHOSEN: the paper does not say)"},
            code="the MAD paper's Tables 5-7 (this suite's cifar presets); official code not consulted here",
        )
    return protocols
