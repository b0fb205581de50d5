"""DFKD-Mem (Binici et al., WACV 2022): ABM plus a FIFO memory bank of past samples.

Choices (the MAD paper gives only the memory size, 8,192):

* ``memory_push_per_stage`` (default: one batch) of the fresh G images the
  student trains on in a stage are pushed into the bank after the student
  step that used them -- the first images of the stage. Pushing images the
  student has already used costs no extra generator forward.
* Each student step adds ``memory_batch_size`` (default: one batch) images
  drawn uniformly with replacement from the filled part of the bank; the
  student loss is ``lambda0 * KD(fresh) + memory_kd_weight * KD(memory)``
  (plus the logit bounds of Eq. 10 on both). At the very first step the bank
  is empty and the student trains on fresh samples only.
* The bank stores images in ``memory_dtype`` on the training device: uint8
  (quantised to 1/255, like a real image; 8,192 CIFAR images take 25 MB),
  float16 or float32 (the unquantised reference).
* Under data parallelism each rank keeps a bank of its own samples.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from dfkd_bench.errors import ConfigError
from dfkd_bench.method_api import MethodContext, hparam, register_method
from dfkd_bench.methods.common import AdversarialMethod, AdversarialParams, Source, mad_table2_protocols

_DTYPES = {"uint8": torch.uint8, "float16": torch.float16, "float32": torch.float32}
ROUNDINGS = ("nearest", "floor")
"""How an image in [0, 1] becomes uint8: ``x * 255`` rounded to the nearest integer, or truncated (the DataFree
collection's PNG pool: ``(x.clamp(0, 1) * 255).astype('uint8')``)."""


class MemoryBank:
    """A fixed-capacity FIFO of images in [0, 1]: pushing past capacity overwrites the oldest."""

    def __init__(self, capacity: int, image_shape: tuple[int, ...], dtype: str | torch.dtype, device: torch.device,
                 rounding: str = "nearest"):
        """``dtype``: one of :data:`_DTYPES` by name, or a floating ``torch.dtype`` (SpaceshipNet's feature pools in
        the run's own dtype)."""
        if capacity <= 0:
            raise ConfigError(f"memory_size must be positive, got {capacity}")
        if not isinstance(dtype, torch.dtype) and dtype not in _DTYPES:
            raise ConfigError(f"memory_dtype={dtype!r} is not one of {', '.join(_DTYPES)}")
        if rounding not in ROUNDINGS:
            raise ConfigError(f"the pool's rounding {rounding!r} is not one of {', '.join(ROUNDINGS)}")
        self.capacity = capacity
        self.dtype = dtype if isinstance(dtype, torch.dtype) else _DTYPES[dtype]
        if rounding not in ROUNDINGS:
            raise ConfigError(f"rounding={rounding!r} is not one of {', '.join(ROUNDINGS)}")
        self.rounding = rounding
        self.images = torch.zeros((capacity, *image_shape), dtype=self.dtype, device=device)
        self.next_slot = 0  # where the next image goes
        self.size = 0  # how many slots hold an image

    def _encode(self, images: Tensor) -> Tensor:
        if self.dtype == torch.uint8:
            scaled = images.clamp(0, 1) * 255
            return (scaled.floor() if self.rounding == "floor" else scaled.round()).to(torch.uint8)
        return images.to(self.dtype)

    def _decode(self, stored: Tensor) -> Tensor:
        # the default dtype: float32 in a run, float64 in a step-equivalence replay (k / 255 exactly as the
        # official loader's ToTensor makes it)
        if self.dtype == torch.uint8:
            return stored.to(torch.get_default_dtype()) / 255
        return stored.to(torch.get_default_dtype())

    @torch.no_grad()
    def push(self, images: Tensor) -> None:
        images = images[-self.capacity:]  # only the newest fit
        count = images.shape[0]
        first = min(count, self.capacity - self.next_slot)
        self.images[self.next_slot:self.next_slot + first] = self._encode(images[:first])
        if count > first:  # wrap around
            self.images[:count - first] = self._encode(images[first:])
        self.next_slot = (self.next_slot + count) % self.capacity
        self.size = min(self.capacity, self.size + count)

    def sample(self, count: int, rng: torch.Generator) -> Tensor:
        if self.size == 0:
            return self.images.new_zeros((0, *self.images.shape[1:]), dtype=torch.float32)
        index = torch.randint(self.size, (count,), generator=rng, device=self.images.device)
        return self.take(index)

    def take(self, index: Tensor) -> Tensor:
        """The stored images at ``index`` (positions in storage order, below :attr:`size`), decoded."""
        return self._decode(self.images[index])

    def ordered(self) -> Tensor:
        """The stored images from oldest to newest (for inspection and tests)."""
        if self.size < self.capacity:
            return self._decode(self.images[:self.size])
        return self._decode(torch.cat([self.images[self.next_slot:], self.images[:self.next_slot]]))

    def state_dict(self) -> dict[str, Any]:
        return {"images": self.images[:self.size].clone() if self.size < self.capacity else self.images,
                "next_slot": self.next_slot, "size": self.size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.images[:state["images"].shape[0]] = state["images"].to(self.images.device)
        self.next_slot, self.size = state["next_slot"], state["size"]

    @property
    def nbytes(self) -> int:
        return self.images.numel() * self.images.element_size()


@dataclass
class MemParams(AdversarialParams):
    memory_size: int = hparam(8192, "capacity of the FIFO memory bank, in images")
    memory_push_per_stage: int = hparam(0, "fresh images pushed into the bank per stage (0: one batch)")
    memory_batch_size: int = hparam(0, "memory images added to each student step (0: one batch)")
    memory_kd_weight: float = hparam(1.0, "weight of the student's KD on memory samples")
    memory_dtype: str = hparam("uint8", "storage dtype of the bank: uint8, float16 or float32")

    def validate(self) -> None:
        super().validate()
        for name in ("memory_push_per_stage", "memory_batch_size"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0 (0 means one batch), got {getattr(self, name)}")
        if self.memory_size < 1:
            raise ConfigError(f"memory_size must be >= 1 image, got {self.memory_size}")
        if self.memory_kd_weight < 0:
            raise ConfigError(f"memory_kd_weight must be >= 0, got {self.memory_kd_weight}")
        if self.memory_dtype not in _DTYPES:
            raise ConfigError(f"memory_dtype={self.memory_dtype!r} is not one of {', '.join(_DTYPES)}")


@register_method
class DFKDMem(AdversarialMethod):
    name = "mem"
    label = "DFKD-Mem"
    summary = "DFKD-Mem (Binici et al. 2022): the student also trains on a FIFO memory bank of past samples of G"
    Params = MemParams
    paper_protocols = mad_table2_protocols(MemParams, {"cifar10": 92.09, "cifar100": 61.25})
    static_student_step = True
    no_trace_reason = (
        "DFKD-Mem (Binici et al., WACV 2022) has no public code: the first author's publication list "
        "(kuluhan/kuluhan.github.io, HTML/publications.json) gives its code as \"NA\", none of the author's "
        "GitHub repositories holds it (kuluhan/PRE-DFKD is the later VAE-replay method, without a memory bank), "
        "the MAD paper that cites it links none, and a search of GitHub code and issue threads for its title "
        "found none; so nothing to run step for step: its memory bank and loss are proven by hand-computed tests "
        "(tests/test_methods.py)")
    stage_state_attributes = ("_pushed_this_stage",)  # how much of this stage's fresh batch is in the bank

    def __init__(self, params: MemParams, ctx: MethodContext):
        super().__init__(params, ctx)
        self.memory = MemoryBank(params.memory_size, ctx.image_shape, params.memory_dtype, ctx.device)
        self.push_per_stage = params.memory_push_per_stage or self.source_batch()
        self.memory_batch = params.memory_batch_size or self.source_batch()
        self._pushed_this_stage = 0

    def num_student_sources(self) -> int:
        return 2  # fresh samples of G and the memory

    def end_generator_stage(self) -> None:
        super().end_generator_stage()
        self._pushed_this_stage = 0

    def student_sources(self) -> list[Source]:
        return [
            Source("gen", self.stage_samples("gen"), self.params.kd_weight),
            Source("memory", self.step_input("memory"), self.params.memory_kd_weight),
        ]

    def extra_student_inputs(self) -> dict[str, torch.Tensor]:
        # Drawn on the host side of the step (a random draw cannot be replayed from a graph).
        return {"memory": self.memory.sample(self.memory_batch, self.ctx.rng)}

    def after_student_step(self, sources: list[Source]) -> None:
        wanted = self.push_per_stage - self._pushed_this_stage
        if wanted > 0:
            fresh = sources[0].images[:wanted]
            self.memory.push(fresh)
            self._pushed_this_stage += fresh.shape[0]

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "memory": self.memory.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.memory.load_state_dict(state["memory"])
