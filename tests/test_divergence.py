"""A run whose loss or weights stop being finite is stopped and marked failed (issue: failing loudly)."""

from __future__ import annotations

import json

import pytest

from dfkd_bench.train.engine import RunDiverged, train_run
from dfkd_bench.cluster.experiment import build_run_configs
from dfkd_bench.store import RunStore


def test_an_absurd_learning_rate_fails_the_run_with_the_term_and_the_iteration(digits_request, tmp_path):
    config = build_run_configs(digits_request(["abm"], overrides={"student_lr": 1e8, "epochs": 4,
                                                                  "checkpoint_every": 100}))[0]
    with pytest.raises(RunDiverged) as caught:
        train_run(config, tmp_path, device="cpu", progress=False)
    message = str(caught.value)
    assert message.startswith("diverged: ") and " at iteration " in message and "lower lr_S" in message
    assert "student_loss is NaN" in message or "student_loss is infinite" in message
    iteration = int(message.split(" at iteration ")[1].split(";")[0])
    assert 1 <= iteration <= 2  # found at the first evaluation (iteration 2) and dated back
    store = RunStore(tmp_path, config.run_name)
    assert store.status() == "failed"
    assert store.last_error_line() == message
    assert not store.is_done()
    # no record written after the divergence carries a non-finite number
    for line in store.records_path.read_text().splitlines():
        assert "NaN" not in line and "Infinity" not in line, line


def test_no_checkpoint_is_written_after_the_loss_diverged(digits_request, tmp_path):
    config = build_run_configs(digits_request(["abm"], overrides={"student_lr": 1e8, "epochs": 4,
                                                                  "eval_every": 100, "checkpoint_every": 2}))[0]
    with pytest.raises(RunDiverged):
        train_run(config, tmp_path, device="cpu", progress=False)
    store = RunStore(tmp_path, config.run_name)
    state = store.load_checkpoint()
    assert state is None or all(
        value == value for record in state["records"] for key, value in record.items()
        if isinstance(value, float))


def test_on_nonfinite_continue_keeps_training_for_study(digits_request, tmp_path):
    config = build_run_configs(digits_request(["abm"], overrides={"student_lr": 1e8, "on_nonfinite": "continue"}))[0]
    summary = train_run(config, tmp_path, device="cpu", progress=False)
    assert summary["iterations"] == config.train.total_iterations
    records = [json.loads(line) for line in RunStore(tmp_path, config.run_name).records_path.read_text().splitlines()]
    assert records  # strict JSON: the non-finite losses are stored in a form every JSON reader takes
