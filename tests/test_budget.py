"""Budgets that can be compared both ways: per iteration and per image (cumulative counters)."""

from __future__ import annotations

import pytest

from dfkd_bench.train.engine import train_run
from dfkd_bench.cluster.experiment import build_run_configs
from dfkd_bench.store import RunStore


def final_eval(tmp_path, config) -> dict:
    train_run(config, tmp_path, device="cpu", progress=False)
    return [r for r in RunStore(tmp_path, config.run_name).read_records() if r["kind"] == "eval"][-1]


def test_eval_records_carry_cumulative_counters(digits_request, tmp_path):
    abm, mad = build_run_configs(digits_request(["abm", "mad"]))
    a, m = final_eval(tmp_path, abm), final_eval(tmp_path, mad)
    train = abm.train
    iterations, bs = train.total_iterations, train.batch_size
    pretrain = abm.params["pretrain_steps"]
    assert a["student_images"] == iterations * train.student_steps * bs
    assert m["student_images"] == 2 * a["student_images"]  # G and the EMA G: the paper's budget is per iteration
    # the teacher sees every generator-step batch and every student image
    assert a["teacher_images"] == (pretrain + iterations * train.generator_steps) * bs + a["student_images"]
    assert a["synthetic_images"] == (pretrain + iterations * train.generator_steps) * bs + a["student_images"]
    for record in (a, m):
        assert record["time/synthesis"] > 0 and record["time/student"] > 0
        assert record["device"] == "cpu" and record["peak_memory_mb"] > 0


@pytest.mark.parametrize("method", ["abm", "mem", "mad"])
def test_the_equal_images_control_gives_every_student_the_same_images_per_step(method, digits_request, tmp_path):
    bs = build_run_configs(digits_request([method]))[0].train.batch_size
    default = build_run_configs(digits_request([method]))[0]
    equal = build_run_configs(digits_request([method], overrides={"student_images_per_step": 2 * bs}))[0]
    assert equal.run_id != default.run_id
    record = final_eval(tmp_path, equal)
    steps = equal.train.total_iterations * equal.train.student_steps
    if method == "mem":  # the memory is empty at the very first step, which trains on fresh samples only
        assert record["student_images"] == 2 * bs * steps - bs
    else:
        assert record["student_images"] == 2 * bs * steps


def test_report_draws_accuracy_against_student_images_and_wall_time(digits_request, tmp_path):
    from dfkd_bench.report import write_report

    for config in build_run_configs(digits_request(["abm", "mad"])):
        train_run(config, tmp_path / "runs", device="cpu", progress=False)
    write_report(tmp_path / "runs", tmp_path / "report", formats=("png",))
    assert (tmp_path / "report" / "accuracy_budget.png").stat().st_size > 0
    report = (tmp_path / "report" / "report.md").read_text()
    assert "accuracy_budget.png" in report
    # the compute table names the per-image budget: MAD's student saw twice ABM's images
    import pandas as pd

    costs = pd.read_csv(tmp_path / "report" / "table_cost.csv").set_index("row")
    assert costs.loc["mad", "student_images"] == 2 * costs.loc["abm", "student_images"] > 0
    abm_images = int(costs.loc["abm", "student_images"])
    assert f"| {abm_images} / {int(costs.loc['abm', 'synthetic_images'])} | 1 | cpu |" in report
