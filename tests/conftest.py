"""Shared fixtures: a small real digits teacher in a temporary teacher cache."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def teacher_cache(tmp_path_factory) -> Path:
    """A teacher cache holding a LeNet-5 digits teacher trained for a few epochs (~5 s)."""
    from dfkd_bench.teachers.training import train_teacher

    cache = tmp_path_factory.mktemp("teachers")
    train_teacher("digits", "lenet5", cache_dir=str(cache), epochs=4, workers=0, progress=False)
    return cache


@pytest.fixture()
def digits_request(teacher_cache):
    """A factory of smoke-budget RunRequests on digits using the session teacher."""
    from dfkd_bench.cluster.experiment import RunRequest, TeacherOptions

    def make(methods=("abm", "mem", "mad"), seeds=(0,), overrides=None, budget="smoke"):
        return RunRequest(methods=list(methods), dataset="digits", seeds=list(seeds), budget=budget,
                          overrides=dict(overrides or {}), teacher=TeacherOptions(cache_dir=str(teacher_cache)))

    return make


def needs_shared_data(*parts: str):
    """Skip (with the reason) when ../shared/data/<parts> is absent, as on a user's machine."""
    path = SHARED_DATA.joinpath(*parts)
    return pytest.mark.skipif(not path.exists(), reason=f"{path} is absent (only present on the project's machines)")
