"""The process a run lives in: which device it computes on, and its global random seeds. The lowest
layer of the package (the engine, teacher training, bench and the launchers use it), so that none of
them has to import another for these."""

from __future__ import annotations

import random

import numpy as np
import torch

from dfkd_bench.errors import DfkdError


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DfkdError(f"--device {name} was asked for but CUDA is not available on this machine; use --device cpu")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
