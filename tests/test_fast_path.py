"""The speed switches compute the same losses and gradients as the reference path."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from dfkd_bench.train.batchnorm import batchnorm_groups, make_groupable
from dfkd_bench.train.engine import Trainer
from dfkd_bench.cluster.experiment import RunRequest, TeacherOptions, build_run_configs
from dfkd_bench.methods.common import Source


def assert_same_gradients(a: nn.Module, b: nn.Module, tolerance: float = 1e-5) -> None:
    """Relative to the size of the whole gradient: entries that should be exactly 0
    (e.g. a conv bias in front of BatchNorm) only carry rounding noise."""
    grad_a = torch.cat([p.grad.flatten() for p in a.parameters() if p.grad is not None])
    grad_b = torch.cat([p.grad.flatten() for p in b.parameters() if p.grad is not None])
    assert grad_a.shape == grad_b.shape
    assert (grad_a - grad_b).norm() <= tolerance * grad_b.norm()


def trainer_for(teacher_cache, tmp_path, method="mad", student="resnet20", **overrides) -> Trainer:
    request = RunRequest(methods=[method], dataset="digits", seeds=[0], budget="smoke", student_arch=student,
                         overrides=overrides, teacher=TeacherOptions(cache_dir=str(teacher_cache)))
    trainer = Trainer(build_run_configs(request)[0], tmp_path, device="cpu", progress=False)
    trainer.setup()
    return trainer


def test_grouped_batchnorm_equals_separate_forwards():
    torch.manual_seed(0)
    reference = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1), nn.BatchNorm2d(2))
    grouped = copy.deepcopy(reference)
    assert make_groupable(grouped)
    a, b = torch.randn(5, 3, 6, 6), torch.randn(7, 3, 6, 6) * 3 + 1
    out_a, out_b = reference(a), reference(b)
    (out_a.square().sum() + out_b.sin().sum()).backward()
    with batchnorm_groups(grouped, [5, 7]):
        out = grouped(torch.cat([a, b]))
    (out[:5].square().sum() + out[5:].sin().sum()).backward()
    torch.testing.assert_close(out, torch.cat([out_a, out_b]), rtol=1e-5, atol=1e-5)
    assert_same_gradients(grouped, reference)
    for p, q in zip(reference.buffers(), grouped.buffers()):  # running stats updated as by two forwards
        torch.testing.assert_close(p.float(), q.float(), rtol=1e-5, atol=1e-6)
    # outside the context it is a plain BatchNorm
    torch.testing.assert_close(grouped(a), reference(a), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["mad", "mem"])
def test_fused_forward_equals_one_forward_per_source(method, teacher_cache, tmp_path):
    # Compared in float64: PyTorch's native fp32 BatchNorm on CPU is itself only
    # accurate to ~5e-3 (relative, on these gradients) against a float64 reference,
    # while the grouped path is accurate to ~1e-6; in float64 the two paths agree
    # to ~1e-7, which is what "the same function" means.
    extra = {"memory_dtype": "float32"} if method == "mem" else {}
    fused = trainer_for(teacher_cache, tmp_path / "f", method, fused_forward=True, channels_last=False, **extra)
    reference = trainer_for(teacher_cache, tmp_path / "r", method, fused_forward=False, channels_last=False, **extra)
    reference.student_module.load_state_dict(fused.student_module.state_dict())
    for trainer in (fused, reference):
        trainer.student_module.double()
        trainer.teacher.double()
    torch.manual_seed(1)
    sources = [Source("gen", torch.rand(16, 1, 16, 16, dtype=torch.float64), 1.0),
               Source("gen_ema", torch.rand(16, 1, 16, 16, dtype=torch.float64), 0.7),
               Source("memory", torch.rand(8, 1, 16, 16, dtype=torch.float64), 1.3)]
    losses = []
    for trainer in (fused, reference):
        loss, terms = trainer.method.distill(sources)
        loss.backward()
        losses.append((loss, terms))
    torch.testing.assert_close(losses[0][0], losses[1][0], rtol=1e-6, atol=1e-7)
    for key in losses[0][1]:
        torch.testing.assert_close(losses[0][1][key], losses[1][1][key], rtol=1e-6, atol=1e-7)
    assert_same_gradients(fused.student_module, reference.student_module, tolerance=1e-6)
    for p, q in zip(fused.student_module.buffers(), reference.student_module.buffers()):
        torch.testing.assert_close(p.double(), q.double(), rtol=1e-6, atol=1e-7)


def test_fused_forward_in_float32_is_within_native_batchnorm_accuracy(teacher_cache, tmp_path):
    fused = trainer_for(teacher_cache, tmp_path / "f", "mad", fused_forward=True)
    reference = trainer_for(teacher_cache, tmp_path / "r", "mad", fused_forward=False)
    reference.student_module.load_state_dict(fused.student_module.state_dict())
    sources = [Source("gen", torch.rand(16, 1, 16, 16), 1.0), Source("gen_ema", torch.rand(16, 1, 16, 16), 1.0)]
    results = []
    for trainer in (fused, reference):
        loss, _ = trainer.method.distill(sources)
        loss.backward()
        results.append(loss)
    torch.testing.assert_close(results[0], results[1], rtol=1e-5, atol=1e-6)
    assert_same_gradients(fused.student_module, reference.student_module, tolerance=2e-2)


def test_stage_buffer_gives_the_same_images_as_per_step_sampling(teacher_cache, tmp_path):
    buffered = trainer_for(teacher_cache, tmp_path / "b", "mad", stage_buffer=True, student_steps=3)
    stepwise = trainer_for(teacher_cache, tmp_path / "s", "mad", stage_buffer=False, student_steps=3)
    for trainer in (buffered, stepwise):
        trainer.method.generator_step()
        trainer.method.end_generator_stage()
    for _ in range(3):
        for name in ("gen", "gen_ema"):
            torch.testing.assert_close(buffered.method.stage_samples(name), stepwise.method.stage_samples(name),
                                       rtol=1e-5, atol=1e-6)
        buffered.method._step_in_stage += 1
        stepwise.method._step_in_stage += 1


def test_channels_last_matches_within_tolerance(teacher_cache, tmp_path):
    channels_last = trainer_for(teacher_cache, tmp_path / "c", "mad", channels_last=True)
    plain = trainer_for(teacher_cache, tmp_path / "p", "mad", channels_last=False)
    plain.student_module.load_state_dict(channels_last.student_module.state_dict())
    sources = [Source("gen", torch.rand(8, 1, 16, 16), 1.0), Source("gen_ema", torch.rand(8, 1, 16, 16), 1.0)]
    a, _ = channels_last.method.distill(sources)
    b, _ = plain.method.distill(sources)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_uint8_memory_matches_float32_memory_within_quantisation(teacher_cache, tmp_path):
    compact = trainer_for(teacher_cache, tmp_path / "u", "mem", memory_dtype="uint8")
    exact = trainer_for(teacher_cache, tmp_path / "x", "mem", memory_dtype="float32")
    images = torch.rand(16, 1, 16, 16)
    compact.method.memory.push(images)
    exact.method.memory.push(images)
    difference = (compact.method.memory.ordered() - exact.method.memory.ordered()).abs().max()
    assert difference <= 0.5 / 255 + 1e-6


@pytest.mark.parametrize("method", ["abm", "mem", "mad"])
def test_static_student_step_computes_exactly_the_eager_step(method, teacher_cache, tmp_path):
    """cuda_graphs=true on a CPU runs the step a CUDA graph would capture (static inputs, the
    pure step function, learning-rate changes recaptured) without a graph: same numbers."""
    extra = dict(student_steps=3, epochs=2, steps_per_epoch=2, lr_milestones=[1])
    static = trainer_for(teacher_cache, tmp_path / "s", method, cuda_graphs=True, fused_optimizer=True, **extra)
    eager = trainer_for(teacher_cache, tmp_path / "e", method, cuda_graphs=False, fused_optimizer=True, **extra)
    assert static.static_step is not None and eager.static_step is None
    for trainer in (static, eager):
        for iteration in range(4):  # crosses the learning-rate milestone (epoch 1 = iteration 2)
            for group in trainer.optimizer.param_groups:
                group["lr"] = trainer.learning_rate(iteration)
            trainer.run_iteration()
            trainer.iteration += 1
    assert static.static_step.calls == 12 and static.static_step.captures == 2  # before and after the milestone
    for a, b in zip(static.student_module.state_dict().values(), eager.student_module.state_dict().values()):
        assert torch.equal(a, b)
    for name in static.sums:
        assert torch.equal(static.sums[name], eager.sums[name]), name
    if method == "mem":
        assert torch.equal(static.method.memory.ordered(), eager.method.memory.ordered())


def test_a_method_must_opt_in_to_the_static_step_in_its_own_class(teacher_cache, tmp_path):
    from dfkd_bench.methods.abm import ABM

    class Derived(ABM):  # inherits ABM's student_loss_from but may change student_loss: no graphs
        name = "derived-abm-test"

    trainer = trainer_for(teacher_cache, tmp_path, "abm", cuda_graphs=True)
    trainer.method.__class__ = Derived
    assert trainer._static_student_step(trainer.train_cfg.perf) is None
    assert any("no static student step" in note for note in trainer.notes)
