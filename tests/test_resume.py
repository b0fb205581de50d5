"""Exact resume after SIGKILL, and concurrent writers into one results folder."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dfkd_bench.train.engine import NONDETERMINISTIC_RECORD_KEYS, train_run
from dfkd_bench.cluster.experiment import build_run_configs
from dfkd_bench.store import RunStore

# A run with several checkpoints, evaluations and drift measurements, small enough for CPU tests.
SETTINGS = ["epochs=3", "steps_per_epoch=4", "eval_every=2", "checkpoint_every=2", "drift_every=4", "drift_tau=1",
            "drift_samples=16", "batch_size=16", "student_steps=2", "generator_steps=2"]


def cli(args: list[str], teacher_cache: Path, env_extra: dict | None = None, check: bool = True):
    env = {**os.environ, "DFKD_BENCH_TEACHERS": str(teacher_cache), "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "dfkd_bench.cli", *args], env=env, capture_output=True, text=True,
                          timeout=600, check=check)


def run_args(method: str, results: Path) -> list[str]:
    sets = [arg for item in SETTINGS for arg in ("--set", item)]
    return ["run", "--methods", method, "--dataset", "digits", "--results-dir", str(results), "--no-progress", *sets]


def outcome(results: Path) -> tuple[list[dict], dict]:
    (run,) = [p for p in results.iterdir() if (p / "config.json").exists()]
    store = RunStore(results, run.name)
    assert store.is_done(), f"{run} is not done"
    records = [{k: v for k, v in r.items() if k not in NONDETERMINISTIC_RECORD_KEYS} for r in store.read_records()]
    return records, torch.load(store.student_path, weights_only=True)


def assert_same(a: tuple[list[dict], dict], b: tuple[list[dict], dict]) -> None:
    records_a, weights_a = a
    records_b, weights_b = b
    assert records_a == records_b  # same metrics at every step, nothing duplicated or missing
    assert weights_a.keys() == weights_b.keys()
    for key in weights_a:
        assert torch.equal(weights_a[key], weights_b[key]), key


@pytest.fixture(scope="module")
def reference(teacher_cache, tmp_path_factory):
    """Uninterrupted runs of MAD and DFKD-Mem (the methods with the most state)."""
    results = {}
    for method in ("mad", "mem"):
        folder = tmp_path_factory.mktemp(f"reference-{method}")
        cli(run_args(method, folder), teacher_cache)
        results[method] = outcome(folder)
    return results


@pytest.mark.parametrize("method,fault", [
    ("mad", "before_commit@4"),   # checkpoint shard written, pointer not yet updated
    ("mad", "mid_stage@5"),       # in the middle of a student stage
    ("mem", "after_record@6"),    # right after an evaluation record, before its checkpoint
    ("mem", "mid_stage@9"),       # late, after several checkpoints
])
def test_sigkill_at_a_precise_point_then_resume_is_exact(method, fault, reference, teacher_cache, tmp_path):
    killed = cli(run_args(method, tmp_path), teacher_cache, {"DFKD_BENCH_FAULT": fault}, check=False)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    (run,) = [p for p in tmp_path.iterdir() if (p / "config.json").exists()]
    assert not (run / "done").exists()
    resumed = cli(run_args(method, tmp_path), teacher_cache)
    assert "resumed from iteration" in resumed.stdout + resumed.stderr
    assert_same(outcome(tmp_path), reference[method])


def test_killed_before_the_first_checkpoint_restarts_cleanly(reference, teacher_cache, tmp_path):
    """Killed right after the step-0 evaluation record, with no checkpoint yet: the next
    start begins afresh and must not keep the orphaned record (it did, once, in CI)."""
    killed = cli(run_args("mad", tmp_path), teacher_cache, {"DFKD_BENCH_FAULT": "after_record@0"}, check=False)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    (records,) = list(tmp_path.glob("*/records.jsonl"))
    assert len(records.read_text().splitlines()) == 1
    cli(run_args("mad", tmp_path), teacher_cache)
    assert_same(outcome(tmp_path), reference["mad"])


def test_sigkill_at_random_moments_then_resume_is_exact(reference, teacher_cache, tmp_path):
    """Kill the process from outside, at whatever moment it is in, twice."""
    env = {**os.environ, "DFKD_BENCH_TEACHERS": str(teacher_cache), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "dfkd_bench.cli", *run_args("mad", tmp_path)]
    for delay in (4.0, 6.5):
        process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        process.kill()
        process.wait()
    cli(run_args("mad", tmp_path), teacher_cache)
    assert_same(outcome(tmp_path), reference["mad"])


def test_corrupt_checkpoint_gives_one_line_error(teacher_cache, tmp_path):
    killed = cli(run_args("abm", tmp_path), teacher_cache, {"DFKD_BENCH_FAULT": "mid_stage@5"}, check=False)
    assert killed.returncode == -signal.SIGKILL
    (run,) = [p for p in tmp_path.iterdir() if (p / "config.json").exists()]
    (shard,) = list((run / "checkpoints").glob("*.pt"))
    shard.write_bytes(b"this is not a checkpoint")
    result = cli(run_args("abm", tmp_path), teacher_cache, check=False)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "cannot be read" in lines[0] and "checkpoint.json" in lines[0]
    assert "Traceback" not in result.stderr


# ------------------------------------------------------- concurrent writers ---

def _train_one(args) -> str:
    config_dict, results = args
    from dfkd_bench.config import RunConfig

    torch.set_num_threads(1)
    summary = train_run(RunConfig.from_dict(config_dict), results, device="cpu", progress=False)
    return summary["run"]


def test_concurrent_runs_into_one_results_folder(digits_request, tmp_path):
    configs = build_run_configs(digits_request(["abm", "mem", "mad"], seeds=[0, 1]))
    payloads = [(c.to_dict(), str(tmp_path)) for c in configs]
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        finished = pool.map(_train_one, payloads)
    assert sorted(finished) == sorted(c.run_name for c in configs)
    for config in configs:
        store = RunStore(tmp_path, config.run_name)
        assert store.status() == "done"
        records = store.read_records()
        assert all(r["run"] == config.run_name for r in records)  # nobody wrote into another run's file
        steps = [r["step"] for r in records if r["kind"] == "eval"]
        assert steps == sorted(set(steps))
        json.loads(store.config_path.read_text())


def test_the_same_run_is_never_trained_twice_at_once(digits_request, tmp_path):
    config = build_run_configs(digits_request(["abm"]))[0]
    store = RunStore(tmp_path, config.run_name)
    with store.lock():
        assert store.status() == "running"
        from dfkd_bench.errors import DfkdError

        with pytest.raises(DfkdError, match="already being trained"):
            train_run(config, tmp_path, device="cpu", progress=False)
