"""MAD: Momentum Adversarial Distillation (Do et al., NeurIPS 2022), Sec. 3.

ABM plus an exponential-moving-average copy G~ of the generator (Eq. 5),
updated once per stage after the n_G generator steps. The student trains on
fresh samples of both G and G~ (Eq. 4 / Eq. 10, weights lambda0 and lambda1).

What happens to G~'s BatchNorm buffers (the paper does not say): its floating
buffers (running mean and variance) follow the same EMA as its parameters and
``num_batches_tracked`` is copied from G. Like G, G~ normalises with batch
statistics when sampling, so the buffers never change a sample; sampling from
G~ never modifies them (momentum 0), so G~ stays exactly the EMA of Eq. 5.
G~ never receives gradients (its parameters have ``requires_grad=False``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dfkd_bench.errors import ConfigError
from dfkd_bench.method_api import MethodContext, hparam, register_method
from dfkd_bench.methods.common import AdversarialMethod, AdversarialParams, Source, mad_table2_protocols


@dataclass
class MADParams(AdversarialParams):
    ema_momentum: float = hparam(0.95, "momentum alpha of the EMA generator (Eq. 5)", "alpha")
    ema_kd_weight: float = hparam(1.0, "weight of the student's KD on samples of the EMA generator (Eq. 4/10)", "lambda1")

    def validate(self) -> None:
        super().validate()
        if not 0.0 <= self.ema_momentum <= 1.0:
            raise ConfigError(f"ema_momentum (alpha) must be in [0, 1], got {self.ema_momentum}")
        if self.ema_kd_weight < 0:
            raise ConfigError(f"ema_kd_weight (lambda1) must be >= 0, got {self.ema_kd_weight}")


def make_ema_copy(generator: nn.Module) -> nn.Module:
    """A frozen copy of ``generator`` whose sampling leaves its buffers unchanged."""
    ema = copy.deepcopy(generator)
    for parameter in ema.parameters():
        parameter.requires_grad_(False)
    for module in ema.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.momentum = 0.0  # batch-statistics forwards must not move the EMA'd buffers
    return ema


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, momentum: float) -> None:
    """Eq. 5: ``theta_ema <- alpha * theta_ema + (1 - alpha) * theta`` for parameters and float buffers."""
    ema_params = list(ema.parameters())
    model_params = list(model.parameters())
    torch._foreach_mul_(ema_params, momentum)
    torch._foreach_add_(ema_params, model_params, alpha=1.0 - momentum)
    pairs = list(zip(ema.buffers(), model.buffers(), strict=True))
    floats = [(e, m) for e, m in pairs if e.dtype.is_floating_point]
    if floats:
        torch._foreach_mul_([e for e, _ in floats], momentum)
        torch._foreach_add_([e for e, _ in floats], [m for _, m in floats], alpha=1.0 - momentum)
    for ema_buffer, model_buffer in pairs:
        if not ema_buffer.dtype.is_floating_point:  # num_batches_tracked
            ema_buffer.copy_(model_buffer)


@register_method
class MAD(AdversarialMethod):
    name = "mad"
    label = "MAD"
    summary = "MAD (Do et al. 2022): the student also trains on samples of an EMA (momentum) copy of G"
    Params = MADParams
    paper_protocols = mad_table2_protocols(MADParams, {"cifar10": 92.64, "cifar100": 64.05})
    static_student_step = True
    no_trace_reason = ("MAD has no public code (the paper links none; a search of GitHub code and issue threads "
                       "for its title and first author found none), so nothing to run step for step; its equations "
                       "(Eqs. 3-11) are proven by tests against values computed by hand (tests/test_losses.py, tests/test_methods.py)")

    def __init__(self, params: MADParams, ctx: MethodContext):
        super().__init__(params, ctx)
        self.ema_generator = make_ema_copy(self.net.generator)

    def pretrain(self) -> None:
        super().pretrain()
        # G~ starts from the (pre-trained) G, so the EMA averages only distillation-time generators.
        self.ema_generator.load_state_dict(self.net.generator.state_dict())

    def generator_modules(self) -> dict[str, nn.Module]:
        return {"gen": self.net.generator, "gen_ema": self.ema_generator}

    def end_generator_stage(self) -> None:
        ema_update(self.ema_generator, self.net.generator, self.params.ema_momentum)
        super().end_generator_stage()

    def student_sources(self) -> list[Source]:
        return [
            Source("gen", self.stage_samples("gen"), self.params.kd_weight),
            Source("gen_ema", self.stage_samples("gen_ema"), self.params.ema_kd_weight),
        ]

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "ema_generator": self.ema_generator.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.ema_generator.load_state_dict(state["ema_generator"])
