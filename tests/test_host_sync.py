"""No host-device synchronisation inside a generator or a student step.

On a GPU every ``.item()``, every tensor built from a Python number and every
copy to or from the CPU makes the host wait for the device and stalls the
launch queue. These tests run the engine's iteration on the CPU under
:class:`~dfkd_bench.train.profiling.HostSyncGuard`, which refuses each of them (and
on a machine with CUDA also enables ``torch.cuda.set_sync_debug_mode``).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dfkd_bench.train.engine import Trainer
from dfkd_bench.cluster.experiment import RunRequest, TeacherOptions, build_run_configs
from dfkd_bench.models import build_model
from dfkd_bench.train.profiling import HostSyncError, HostSyncGuard, OpCounter, no_host_sync

# The switches a CUDA device gets from "auto" (config.TrainConfig.resolved), on the CPU.
GPU_SWITCHES = dict(amp="bf16", channels_last=True, fused_optimizer=True, fused_forward=True, cuda_graphs=True)


@pytest.fixture(scope="module")
def bn_teacher(tmp_path_factory) -> str:
    """A randomly initialised ResNet-20 (with BatchNorm, so BNmm's hooks run) for digits."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("teacher") / "resnet20.pt"
    torch.save(build_model("resnet20", 10, 1, 16).state_dict(), path)
    return str(path)


def make_trainer(tmp_path, teacher: str, method: str, **overrides) -> Trainer:
    request = RunRequest(methods=[method], dataset="digits", seeds=[0], budget="smoke", teacher_arch="resnet20",
                         student_arch="resnet20", overrides=overrides, teacher=TeacherOptions(checkpoint=teacher))
    trainer = Trainer(build_run_configs(request)[0], tmp_path, device="cpu", progress=False)
    trainer.build()
    return trainer


@pytest.mark.parametrize("what, action", [
    ("item", lambda t: t.sum().item()),
    ("float", lambda t: float(t[0])),
    ("bool", lambda t: bool(t[0] > 0)),
    ("python if", lambda t: 1 if t.max() > 0 else 0),
    ("torch.tensor", lambda t: t + torch.tensor(2.0)),
    ("cpu", lambda t: t.cpu()),
    ("tolist", lambda t: t.tolist()),
    ("numpy", lambda t: t.numpy()),
    ("nonzero", lambda t: t.nonzero()),
    ("boolean mask", lambda t: t[t > 0]),
])
def test_the_guard_refuses_each_kind_of_synchronisation(what, action):
    tensor = torch.randn(8)
    with pytest.raises(HostSyncError):
        with no_host_sync():
            action(tensor)
    # and leaves torch as it found it
    assert isinstance(tensor.tolist(), list) and isinstance(tensor.numpy(), np.ndarray)


def test_the_guard_lets_device_side_work_through():
    tensor = torch.randn(8)
    with no_host_sync():
        out = (tensor * 2.0).clamp(min=0).sum() + torch.full((), 3.0) + torch.zeros(2).sum()
        torch.where(tensor > 0, tensor, 0.0)
    assert out.shape == ()


@pytest.mark.parametrize("method, extra", [
    ("abm", {}),
    ("mem", {}),
    ("mad", {}),
    ("mad", dict(conditioning="sum", nll_weight=0.1, normreg_weight=0.1, stage_buffer=True)),
])
def test_an_iteration_of_the_fast_path_never_synchronises(method, extra, bn_teacher, tmp_path):
    trainer = make_trainer(tmp_path, bn_teacher, method, **GPU_SWITCHES, **extra)
    assert trainer.method.teacher_bn is not None  # the BNmm hooks are part of what is checked
    for _ in range(2):  # first steps create optimiser state, then the static step is captured
        trainer.run_iteration()
        trainer.iteration += 1
    assert trainer.static_step is not None and trainer.static_step.captures == 1
    with HostSyncGuard(raise_on_sync=False) as guard:
        for _ in range(2):
            trainer.run_iteration()
            trainer.iteration += 1
            trainer.track_finiteness()
    assert guard.syncs == []


def test_the_check_finds_a_synchronisation_smuggled_into_a_step(bn_teacher, tmp_path, monkeypatch):
    """The property above can fail: a loss term read on the host inside a step is caught."""
    trainer = make_trainer(tmp_path, bn_teacher, "abm", **GPU_SWITCHES)
    original = trainer.method.student_loss_from

    def leaky(batch):
        loss, terms, keep = original(batch)
        terms["leak"] = torch.tensor(loss.item())
        return loss, terms, keep

    monkeypatch.setattr(trainer.method, "student_loss_from", leaky)
    with HostSyncGuard(raise_on_sync=False) as guard:
        trainer.run_iteration()
    assert any("_local_scalar_dense" in s for s in guard.syncs)
    assert any("lift_fresh" in s for s in guard.syncs)


def test_fast_path_dispatches_no_more_ops_per_student_image_than_the_reference(bn_teacher, tmp_path):
    counts = {}
    for mode, switches in (("fast", dict(GPU_SWITCHES, amp="none")),
                           ("reference", dict(fused_forward=False, channels_last=False, fused_optimizer=False,
                                              amp="none"))):
        trainer = make_trainer(tmp_path / mode, bn_teacher, "mad", **switches)
        trainer.run_iteration()
        trainer.generator_stage()
        with OpCounter() as counter:
            trainer.student_stage()
        counts[mode] = counter.total
    assert counts["fast"] <= counts["reference"], counts
