"""DAFL: Data-Free Learning of Student Networks (Chen, Wang, Xu, Yang, Liu, Shi, Xu, Xu & Tian, ICCV 2019).

Not adversarial: the teacher is a fixed discriminator and the generator G
minimises (Sec. 3.2, Eq. 5)::

    L_oh + alpha * L_a + beta * L_ie

with the one-hot loss L_oh (Eq. 2: cross-entropy of T(x) to its own argmax),
the activation loss L_a (Eq. 3: minus the L1 norm of the teacher's features
before its classifier) and the information-entropy loss L_ie (Eq. 4: minus the
entropy of the batch-mean teacher distribution), all in
:mod:`dfkd_bench.train.zoo_losses`. The student minimises KD on samples of G (Sec. 3.3,
Eq. 6: cross-entropy between the softened outputs, here KL(T || S) at
temperature 1, the same gradient).

Paper settings (Sec. 4.1, MNIST): alpha = 0.1, beta = 5; G Adam lr 0.2 (MNIST);
S Adam lr 2e-3 (MNIST) / SGD 0.1 (CIFAR); batch 512; z of dimension 100. The default
G lr here (1e-3) is the zoo's common one (the official CIFAR script uses 0.02). The
engine owns the student optimiser and n_S/n_G, one protocol for every method of a
comparison (docs/protocols.md); the paper's own MNIST protocol, every setting,
is ``protocol = "paper"`` (``dfkd-bench sweep experiments/reproduce/dafl_mnist.toml``;
``dfkd-bench list --card dafl --dataset mnist`` prints it against the common one).

From the official code (huawei-noah/Efficient-Computing, DAFL/DAFL-train.py and
lenet.py), as defaults here:
* L_ie uses ``log10`` (``entropy_log_base = 10``; natural log would make it 2.3x stronger
  at beta = 5);
* the features f_T are what the official networks return as ``feature``: LeNet-5's 120
  C5 units after their ReLU (the input of F6; :func:`methods.zoo_common.feature_tap`),
  the pooled features of a ResNet / WRN;
* G and S are updated from ONE batch: the student's KD uses the generator step's images
  (``student_batch = "generator_batch"``) and the teacher's logits of that step (the teacher
  runs once per iteration, as in the official loop), so the paper protocol's n_G = n_S = 1 is
  the official loop exactly (G's loss does not involve the student). Proven step for step:
  ``results/traces/dafl_mnist.pt`` (``dfkd_bench.traces``).
The MNIST script: 200 epochs x 120 iterations = 24,000 iterations, batch 512, G Adam lr
0.2, S Adam lr 2e-3 (no weight decay, no lr decay), z of dimension 100, MNIST resized to
32 x 32 and normalised (0.1307, 0.3081), best test accuracy kept (``experiments/reproduce/
dafl_mnist.toml``). CIFAR (its README): 2,000 epochs, batch 1024, lr_G 0.02, S SGD 0.1
(x0.1 at epochs 800 and 1600), z 1000, oh 0.05, ie 5, a 0.01 (CIFAR-100: oh 0.5, ie 20, a 0.1).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from torch import Tensor

from dfkd_bench.train import zoo_losses
from dfkd_bench.method_api import MethodContext, PaperProtocol, hparam, register_method
from dfkd_bench.errors import ConfigError
from dfkd_bench.methods.zoo_common import ZooGeneratorMethod, ZooGeneratorParams, feature_tap, tapping


@dataclass
class DAFLParams(ZooGeneratorParams):
    oh_weight: float = hparam(1.0, "weight of the one-hot loss L_oh (Eq. 5)")
    activation_weight: float = hparam(0.1, "weight alpha of the activation loss L_a (Eq. 5)")
    entropy_weight: float = hparam(5.0, "weight beta of the information-entropy loss L_ie (Eq. 5)")
    entropy_log_base: float = hparam(10.0, "base of the logarithm in L_ie (official code: log10)")
    student_batch: str = hparam("generator_batch", "student steps train on: generator_batch (the generator "
                                                   "step's images, official), generator_z or fresh")

    def validate(self) -> None:
        super().validate()
        if not self.entropy_log_base > 1:
            raise ConfigError(f"entropy_log_base must be > 1, got {self.entropy_log_base}")


# CIFAR-10 and CIFAR-100 share the protocol (DAFL README commands); weights and numbers differ.
_DAFL_CIFAR10 = PaperProtocol(
    source="DAFL (Chen et al., ICCV 2019), Table 3: CIFAR-10, ResNet-34 -> ResNet-18",
    accuracy=92.22, std=None, teacher_accuracy=95.58, selection="best",
    teacher_arch="resnet34", student_arch="resnet18", image_size=32,
    train=dict(epochs=2000, steps_per_epoch=120, generator_steps=1, student_steps=1, batch_size=1024,
               student_optimizer="sgd", student_lr=0.1, student_weight_decay=5e-4, student_momentum=0.9,
               lr_decay=0.1, lr_milestones=[800, 1600], eval_every=120, amp="none"),
    params=dict(generator="dafl_gen", noise_dim=1000, generator_lr=0.02, oh_weight=0.05,
                activation_weight=0.01, entropy_weight=5.0, entropy_log_base=10.0,
                student_batch="generator_batch"),
    official={"normalisation": "mean (0.4914, 0.4822, 0.4465), std (0.2023, 0.1994, 0.2010)"},
    deviations={"normalisation": "the dataset's statistics of this suite (the teacher's own)"},
    code="DAFL README: DAFL-train.py --dataset cifar10 --channels 3 --n_epochs 2000 --batch_size 1024 "
         "--lr_G 0.02 --lr_S 0.1 --latent_dim 1000 --oh 0.05 --ie 5 --a 0.01",
)


@register_method
class DAFL(ZooGeneratorMethod):
    name = "dafl"
    label = "DAFL"
    summary = "DAFL (Chen et al. 2019): generator trained by one-hot, activation and entropy losses; KD on it"
    Params = DAFLParams
    static_student_step = True
    uses_student_in_generator = False
    # The papers' protocols run in float32 as the official code does (amp="none": no bf16 autocast on a GPU;
    # cuDNN may still use TF32 convolutions, PyTorch's default).
    paper_protocols = {
        "mnist": PaperProtocol(
            source="DAFL (Chen et al., ICCV 2019), Table 1: MNIST, LeNet-5 -> LeNet-5-half",
            accuracy=98.20, std=None, teacher_accuracy=98.91, selection="best",
            teacher_arch="lenet5", student_arch="lenet5_half",
            # CHOSEN: 28 x 28 inputs with conv1 padding 2 (LeCun's zero-padded 32 x 32), so that the
            # committed 28-px MNIST teacher serves; the official code resizes MNIST to 32 x 32.
            image_size=28,
            train=dict(epochs=200, steps_per_epoch=120, generator_steps=1, student_steps=1, batch_size=512,
                       student_optimizer="adam", student_lr=2e-3, student_weight_decay=0.0, student_momentum=0.0,
                       lr_decay=1.0, lr_milestones=[], eval_every=120, amp="none"),
            params=dict(generator="dafl_gen", noise_dim=100, generator_lr=0.2, oh_weight=1.0,
                        activation_weight=0.1, entropy_weight=5.0, entropy_log_base=10.0,
                        student_batch="generator_batch"),
            official={"image_size": "32 (MNIST resized, normalised 0.1307/0.3081)",
                      "teacher": "LeNet-5 of teacher-train.py, 98.91 %", "evaluation": "every epoch (120 iterations)"},
            deviations={"image_size": "28 px with conv1 padding 2: the committed 28-px teacher (99.21 %) serves",
                        "teacher": "the committed MNIST teacher (99.21 %), not the paper's (98.91 %)"},
            code="huawei-noah/Efficient-Computing, Data-Efficient-Model-Compression/DAFL/DAFL-train.py "
                 "(defaults = the MNIST run)",
        ),
        "cifar10": _DAFL_CIFAR10,
        "cifar100": replace(
            _DAFL_CIFAR10,
            source="DAFL (Chen et al., ICCV 2019), Table 3: CIFAR-100, ResNet-34 -> ResNet-18",
            accuracy=74.47, teacher_accuracy=77.84,
            params=dict(_DAFL_CIFAR10.params, oh_weight=0.5, activation_weight=0.1, entropy_weight=20.0),
            code="DAFL README: DAFL-train.py --dataset cifar100 --channels 3 --n_epochs 2000 --batch_size 1024 "
                 "--lr_G 0.02 --lr_S 0.1 --latent_dim 1000 --oh 0.5 --ie 20 --a 0.1",
        ),
    }

    def __init__(self, params: DAFLParams, ctx: MethodContext):
        super().__init__(params, ctx)
        self.features = feature_tap(ctx.teacher)

    def teacher_context(self):
        return tapping(self.features)

    def generator_objective(self, images: Tensor, teacher_logits: Tensor,
                            student_logits: Tensor | None) -> tuple[Tensor, dict[str, Tensor]]:
        p = self.params
        (features,) = self.features.take()
        terms = {"gen_oh": zoo_losses.one_hot_loss(teacher_logits),
                 "gen_activation": zoo_losses.activation_loss(features),
                 "gen_entropy": zoo_losses.information_entropy_loss(teacher_logits, p.entropy_log_base)}
        loss = (p.oh_weight * terms["gen_oh"] + p.activation_weight * terms["gen_activation"]
                + p.entropy_weight * terms["gen_entropy"])
        return loss, terms
