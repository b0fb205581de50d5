"""Stopping on time, anywhere (issue 31): a stop request in the middle of a long stage is honoured right
after the optimiser step during which it came, with a checkpoint from which the same run continues
exactly (bit-identical records and weights on a CPU).

The signal is a real SIGTERM through the run's own handler (``stop_on_signals``), sent by the run to
itself while it executes a chosen step (``DFKD_BENCH_SIGNAL=stage:iteration:step``), so the tests
count steps instead of timing anything: the checkpoint must sit exactly after that step.

Methods: MAD for a long student stage (its noise of G and of the EMA generator, drawn at the stage's
start, must be in the checkpoint), ZSKT for a long generator stage (its student trains on the last
generator step's z, which a stop after the stage's last step must keep), DeepInversion and CMI for a
long pool synthesis (the pixels or the generator in progress, their Adam states, the best iterate so
far, CMI's contrastive head and feature memory). "Long" is a dozen steps here: what a stop must save
does not grow with the stage; scripts/stop_latency.py measures stages of realistic length.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from dfkd_bench.cluster.experiment import build_run_configs
from dfkd_bench.store import RunStore
from dfkd_bench.train.engine import (NONDETERMINISTIC_RECORD_KEYS, RunInterrupted, StopRequest, stop_on_signals,
                                     train_run)

# Two iterations with an evaluation after each and a drift snapshot pending across the first; checkpoints
# between iterations never come by themselves.
BASE = dict(epochs=1, steps_per_epoch=2, eval_every=1, checkpoint_every=100, drift_every=2, drift_tau=1,
            drift_samples=16, batch_size=16, student_steps=2, generator_steps=1)

def configure(digits_request, method: str, **overrides):
    (config,) = build_run_configs(digits_request([method], overrides={**BASE, **overrides}, budget="default"))
    return config


def train(config, folder: Path) -> None:
    """One start of the run, with the signal handlers of ``dfkd-bench run``."""
    stop = StopRequest()
    with stop_on_signals(stop):
        train_run(config, folder, device="cpu", progress=False, stop=stop)


def outcome(folder: Path, config) -> tuple[list[dict], dict]:
    store = RunStore(folder, config.run_name)
    assert store.is_done()
    records = [{k: v for k, v in r.items() if k not in NONDETERMINISTIC_RECORD_KEYS} for r in store.read_records()]
    return records, torch.load(store.student_path, weights_only=True)


def assert_same(a, b) -> None:
    assert a[0] == b[0]  # every record, every metric, nothing duplicated or missing
    assert a[1].keys() == b[1].keys()
    for key in a[1]:
        assert torch.equal(a[1][key], b[1][key]), key


def pointer(folder: Path, config) -> dict:
    return json.loads(RunStore(folder, config.run_name).pointer_path.read_text())


def stop_then_resume(config, folder: Path, signals: list[str], monkeypatch) -> list[str]:
    """Start the run once per signal point (each start is stopped there), then once more to the end.
    Returns the stop messages."""
    messages = []
    for point in signals:
        monkeypatch.setenv("DFKD_BENCH_SIGNAL", point)
        with pytest.raises(RunInterrupted) as stopped:
            train(config, folder)
        messages.append(str(stopped.value))
        stage, iteration, step = point.split(":")[:3]
        assert pointer(folder, config) == {"iteration": int(iteration), "world_size": 1,
                                           "position": [stage, int(step)]}, point
    monkeypatch.delenv("DFKD_BENCH_SIGNAL")
    train(config, folder)
    return messages


CASES = {
    # a long student stage; then one stopped after the first of its steps
    "student": ("mad", dict(student_steps=12), ["student:0:5", "student:1:1"]),
    # the same with the stage sampled into one buffer and the static (CUDA-graph) student step
    "student-buffer": ("mad", dict(student_steps=12, stage_buffer=True, cuda_graphs=True), ["student:1:7"]),
    # a long generator stage: in its middle, and after its last step (before the stage ends)
    "generator": ("zskt", dict(generator_steps=10), ["generator:0:4", "generator:1:10"]),
    # a long pool synthesis: the batch in progress at 6 of its 10 steps
    "pool": ("deepinv", dict(generator_steps=10, synthesis_steps=10), ["generator:1:6"]),
    "pool-cmi": ("cmi", dict(generator_steps=10, synthesis_steps=10, negatives=64, feature_memory=256),
                 ["generator:1:6"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_sigterm_in_a_long_stage_stops_after_that_step_and_resumes_exactly(case, digits_request, tmp_path,
                                                                              monkeypatch):
    method, overrides, signals = CASES[case]
    config = configure(digits_request, method, **overrides)
    monkeypatch.delenv("DFKD_BENCH_SIGNAL", raising=False)
    train(config, tmp_path / "reference")
    messages = stop_then_resume(config, tmp_path / "stopped", signals, monkeypatch)
    stage, iteration, step = signals[0].split(":")
    total = overrides.get(f"{stage}_steps", BASE.get(f"{stage}_steps"))
    assert messages[0] == (f"stopped by SIGTERM after {stage} step {step} of {total} in iteration "
                           f"{int(iteration) + 1}; checkpoint saved there; run the same command again to resume")
    assert_same(outcome(tmp_path / "stopped", config), outcome(tmp_path / "reference", config))


def test_a_sigterm_during_generator_pretraining_stops_after_that_step_and_resumes_exactly(digits_request, tmp_path,
                                                                                          monkeypatch):
    """MAD's generator pre-training (pgs, Sec. 5.1) is a loop of the method's own: it passes the engine's
    preemption point after each step, and continues from the step it reached (then copies G to the EMA G)."""
    config = configure(digits_request, "mad", pretrain_steps=5)
    monkeypatch.delenv("DFKD_BENCH_SIGNAL", raising=False)
    train(config, tmp_path / "reference")
    (message,) = stop_then_resume(config, tmp_path / "stopped", ["pretrain:0:3"], monkeypatch)
    assert message.startswith("stopped by SIGTERM after step 3 of generator pre-training; checkpoint saved there")
    assert_same(outcome(tmp_path / "stopped", config), outcome(tmp_path / "reference", config))


# ------------------------------------------------- a method that does not declare its stage state ---

def _toy_method():
    """A method written against the bare Method interface that keeps the noise of its student stage in an
    attribute it does not declare (``stage_state_attributes`` stays None)."""
    from dataclasses import dataclass

    from torch import nn

    from dfkd_bench.method_api import Method, hparam
    from dfkd_bench.train import losses

    @dataclass
    class ToyParams:
        generator_lr: float = hparam(1e-3, "Adam learning rate of the toy generator")

        def validate(self) -> None:
            pass

    class Toy(Method):
        name = "toy_undeclared_stage"
        label = "Toy"
        summary = "a toy generator method (Test et al. 2026)"
        Params = ToyParams

        def __init__(self, params, ctx):
            super().__init__(params, ctx)
            self.generator = nn.Linear(8, math.prod(ctx.image_shape)).to(ctx.device)
            self.optimizer = torch.optim.Adam(self.generator.parameters(), lr=params.generator_lr)
            self.noise: list[torch.Tensor] = []  # the student stage's noise, drawn at its start (undeclared)

        def images(self, z):
            return torch.sigmoid(self.generator(z)).view(-1, *self.ctx.image_shape)

        def generator_step(self):
            images = self.images(self.ctx.randn(self.ctx.batch_size, 8))
            loss = -losses.kl_divergence(self.ctx.teacher(images), self.ctx.student_module(images))
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward(inputs=list(self.generator.parameters()))
            self.optimizer.step()
            return {"gen_loss": loss.detach()}

        def end_generator_stage(self):
            self.noise = [self.ctx.randn(self.ctx.batch_size, 8) for _ in range(self.ctx.student_steps)]

        def student_loss(self):
            with torch.no_grad():
                images = self.images(self.noise.pop(0))
                teacher = self.ctx.teacher(images)
            loss = losses.kl_divergence(teacher, self.ctx.student(images))
            return loss, {"student_loss": loss.detach()}

        @torch.no_grad()
        def measurement_sources(self, num_samples, rng):
            return {"gen": self.images(self.ctx.randn(num_samples, 8, rng))}

        def state_dict(self):
            return {"generator": self.generator.state_dict(), "optimizer": self.optimizer.state_dict()}

        def load_state_dict(self, state):
            self.generator.load_state_dict(state["generator"])
            self.optimizer.load_state_dict(state["optimizer"])

    return Toy


@pytest.fixture()
def toy_method():
    from dfkd_bench.method_api import _METHODS, register_method

    method = register_method(_toy_method())
    yield method
    _METHODS.pop(method.name, None)


def test_a_method_without_declared_stage_state_falls_back_to_the_iteration_start_and_says_what_is_lost(
        toy_method, digits_request, tmp_path, monkeypatch):
    config = configure(digits_request, toy_method.name, student_steps=6)
    monkeypatch.delenv("DFKD_BENCH_SIGNAL", raising=False)
    train(config, tmp_path / "reference")
    monkeypatch.setenv("DFKD_BENCH_SIGNAL", "student:1:3")
    with pytest.raises(RunInterrupted) as stopped:
        train(config, tmp_path / "stopped")
    assert str(stopped.value) == (
        "stopped by SIGTERM after student step 3 of 6 in iteration 2, but method toy_undeclared_stage does not "
        "declare the state it keeps inside a stage (Method.stage_state_attributes): checkpoint saved at the start "
        "of iteration 2, so the steps of that iteration done so far (up to student step 3 of 6 in iteration 2) are "
        "lost and run again; run the same command again to resume")
    assert pointer(tmp_path / "stopped", config) == {"iteration": 1, "world_size": 1}
    monkeypatch.delenv("DFKD_BENCH_SIGNAL")
    train(config, tmp_path / "stopped")
    assert_same(outcome(tmp_path / "stopped", config), outcome(tmp_path / "reference", config))


# --------------------------------------------------------------------------- the command line ---

def test_the_command_line_stops_on_slurms_signal_with_the_documented_line_and_the_same_command_resumes(
        teacher_cache, tmp_path):
    """SIGUSR2 (what submitit asks SLURM for before a time limit; ``#SBATCH --signal=USR2@120`` for a
    ``dfkd-bench run`` in a batch script) during student step 5 of 12: exit status 2 and the two lines, then
    the same command continues from that step and finishes."""
    from test_hostile import cli

    sets = [arg for key, value in {**BASE, "student_steps": 12}.items() for arg in ("--set", f"{key}={value}")]
    args = ["run", "--methods", "abm", "--dataset", "digits", "--results-dir", str(tmp_path), "--no-progress",
            "--threads", "1", *sets]
    stopped = cli(args, teacher_cache, {"DFKD_BENCH_SIGNAL": "student:0:5:SIGUSR2"}, check=False)
    assert stopped.returncode == 2, stopped.stderr[-2000:]
    lines = stopped.stderr.strip().splitlines()
    assert lines[-2].endswith(": stopped by SIGUSR2 after student step 5 of 12 in iteration 1; checkpoint saved "
                              "there; run the same command again to resume"), lines
    assert lines[-1] == "error: interrupted; checkpoint saved. Run the same command again to resume"
    resumed = cli(args, teacher_cache)
    assert "resumed from iteration 0 (after student step 5 of 12 in iteration 1)" in resumed.stdout + resumed.stderr
    (run,) = [p for p in tmp_path.iterdir() if (p / "done").exists()]
    assert (run / "done").exists()


# -------------------------------------------------------------------------- teacher training ---

class _StopAfterSteps:
    """A teacher stop request that arrives just before it is asked for the ``asks``-th time."""

    def __init__(self, asks: int):
        from dfkd_bench.teachers.training import TeacherStop

        self.inner, self.steps, self.asked = TeacherStop(), asks, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    @property
    def requested(self) -> bool:
        self.asked += 1
        if self.asked == self.steps:
            self.inner.request("SIGTERM")
        return self.inner.requested


@pytest.mark.parametrize("pipeline", ["tensors", pytest.param("loader", marks=pytest.mark.slow)])
def test_a_teacher_stopped_in_the_middle_of_an_epoch_resumes_from_that_step_to_the_same_weights(pipeline, tmp_path):
    from dfkd_bench.teachers.training import TeacherInterrupted, train_teacher, training_checkpoint_path
    from test_teacher_resume import _assert_same, _weights

    common = dict(epochs=2, workers=0, progress=False, pipeline=pipeline)
    train_teacher("digits", "lenet5", cache_dir=str(tmp_path / "whole"), **common)
    # 22 steps per epoch (1,437 digits, batch 64); asked once before training, after each step but an epoch's
    # last, and at each epoch's end: the 31st question comes after the 8th step of epoch 2
    stop = _StopAfterSteps(31)
    cache = tmp_path / "stopped"
    with pytest.raises(TeacherInterrupted, match=r"stopped by SIGTERM after step 8 of epoch 2 of 2; checkpoint"):
        train_teacher("digits", "lenet5", cache_dir=str(cache), stop=stop, **common)
    state = torch.load(training_checkpoint_path("digits", "lenet5", cache), map_location="cpu", weights_only=True)
    assert (state["epoch"], state["step"]) == (1, 8)
    result = train_teacher("digits", "lenet5", cache_dir=str(cache), **common)
    assert result["resumed_from_epoch"] == 1
    _assert_same(_weights(cache), _weights(tmp_path / "whole"))
