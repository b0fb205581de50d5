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
import os
import subprocess
import sys
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
