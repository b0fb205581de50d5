"""GPU code paths held on a CPU (issue 21): what falls back is recorded, bf16 logits reach the
losses in float32."""

from __future__ import annotations

import json

import pytest
import torch

from dfkd_bench.experiment import RunRequest, TeacherOptions, build_run_configs

TINY = {"epochs": 1, "steps_per_epoch": 2, "student_steps": 1, "batch_size": 16, "eval_every": 0, "drift_every": 0}


def test_a_fused_optimiser_the_torch_lacks_runs_unfused_and_config_json_says_so(teacher_cache, tmp_path,
                                                                                 monkeypatch):
    from dfkd_bench.engine import train_run

    real_adam = torch.optim.Adam

    class NoFusedAdam(real_adam):
        def __init__(self, params, *args, fused=None, **kwargs):
            if fused:
                raise RuntimeError("`fused=True` requires all the params to be floating point Tensors of "
                                   "supported devices")
            super().__init__(params, *args, **kwargs)

    monkeypatch.setattr(torch.optim, "Adam", NoFusedAdam)
    request = RunRequest(methods=["abm"], dataset="digits", seeds=[0], budget="smoke",
                         overrides={**TINY, "fused_optimizer": True},
                         teacher=TeacherOptions(cache_dir=str(teacher_cache)))
    config = build_run_configs(request)[0]
    train_run(config, tmp_path, device="cpu", progress=False)
    written = json.loads((tmp_path / config.run_name / "config.json").read_text())
    perf = written["resolved_perf"]
    assert perf["fused_optimizer"] is True  # asked for ...
    assert perf["fused_optimizer_fallback"] == [  # ... and what the run got instead, with the reason
        "adam: unfused (`fused=True` requires all the params to be floating point Tensors of supported devices)"]
    assert any("running unfused" in note for note in written["notes"])


def test_a_run_whose_optimisers_fuse_records_no_fallback(teacher_cache, tmp_path):
    from dfkd_bench.engine import train_run

    request = RunRequest(methods=["abm"], dataset="digits", seeds=[0], budget="smoke", overrides=TINY,
                         teacher=TeacherOptions(cache_dir=str(teacher_cache)))
    config = build_run_configs(request)[0]
    train_run(config, tmp_path, device="cpu", progress=False)
    written = json.loads((tmp_path / config.run_name / "config.json").read_text())
    assert "fused_optimizer_fallback" not in written["resolved_perf"]
