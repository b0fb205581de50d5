"""The inline launcher: failures are recorded, the other runs go on, and the launch fails at the end."""

from __future__ import annotations

import shutil

import pytest

from dfkd_bench.errors import DfkdError
from dfkd_bench.cluster.experiment import RunRequest, TeacherOptions, build_run_configs
from dfkd_bench.cluster.launch import launch, pending_configs
from dfkd_bench.store import RunStore


def test_a_failing_run_does_not_stop_the_others(teacher_cache, tmp_path):
    copy = tmp_path / "teacher.pt"
    shutil.copy(teacher_cache / "digits-lenet5.pt", copy)
    failing = build_run_configs(RunRequest(methods=["abm"], dataset="digits", seeds=[0], budget="smoke",
                                           teacher=TeacherOptions(checkpoint=str(copy))))
    working = build_run_configs(RunRequest(methods=["abm"], dataset="digits", seeds=[1], budget="smoke",
                                           teacher=TeacherOptions(cache_dir=str(teacher_cache))))
    copy.unlink()  # the first run's teacher disappears before it starts
    results = tmp_path / "runs"
    with pytest.raises(DfkdError, match="1 of 2 runs did not finish"):
        launch(failing + working, results)
    failed, done = RunStore(results, failing[0].run_name), RunStore(results, working[0].run_name)
    assert failed.status() == "failed" and "does not exist" in failed.last_error_line()
    assert done.status() == "done"
    assert failed.read_config()["run_name"] == failing[0].run_name  # config is written even for early failures
    assert [c.run_name for c in pending_configs(failing + working, results)] == [failing[0].run_name]


def test_a_run_being_trained_elsewhere_is_not_launched_again(digits_request, tmp_path):
    config = build_run_configs(digits_request(["abm"]))[0]
    store = RunStore(tmp_path, config.run_name)
    with store.lock():
        assert pending_configs([config], tmp_path) == []
    assert pending_configs([config], tmp_path) == [config]


def test_a_killed_run_is_relaunched_but_a_live_one_on_another_host_is_not(digits_request, tmp_path):
    config = build_run_configs(digits_request(["abm"]))[0]
    store = RunStore(tmp_path, config.run_name)
    with store.lock():  # a trainer on this host writes the heartbeat, then is SIGKILLed (the lock goes with it)
        (store.path / "records.jsonl").write_text("")
    assert store.heartbeat_path.exists() and store.status() == "incomplete"
    assert pending_configs([config], tmp_path) == [config]
    # A trainer on another node of a shared file system: flock cannot see it, its fresh heartbeat can.
    store.heartbeat_path.write_text("some-other-node:4242\n")
    assert store.status() == "running" and pending_configs([config], tmp_path) == []
    store.error_path.write_text("RuntimeError: out of memory\n")  # it died with an error: not alive any more
    assert store.status() == "failed"


def test_run_summary_shows_spread_only_over_several_seeds(capsys):
    from dfkd_bench.cli import print_summary

    def summary(method, seed, final):
        return {"run": f"{method}-digits-s{seed}", "method": method, "dataset": "digits", "final_accuracy": final,
                "best_accuracy": final + 1, "wall_time": 60.0, "teacher_accuracy": 99.0}

    print_summary([summary("abm", 0, 95.0), summary("mad", 0, 96.0), summary("mad", 1, 98.0)])
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line.split()[:1] in (["abm"], ["mad"])}
    assert lines["abm"].split()[2:] == ["1", "95.00", "96.00"]
    assert lines["mad"].split()[2:] == ["2", "97.00", "±", "1.41", "98.00", "±", "1.41"]
