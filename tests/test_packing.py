"""Packing runs on one device (--runs-per-gpu K): K runs trained at once in one process tree give
the same records as the same runs trained one by one; a stop reaches every worker and the same
command resumes; the packed benchmark prints its ratio."""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dfkd_bench.train.engine import NONDETERMINISTIC_RECORD_KEYS
from dfkd_bench.errors import ConfigError, DfkdError
from dfkd_bench.cluster.experiment import RunRequest, TeacherOptions, build_run_configs
from dfkd_bench.cluster.launch import PackJob, launch, launch_options
from dfkd_bench.store import RunStore

REPO = Path(__file__).resolve().parent.parent
PACK = ["--methods", "abm,mad", "--seeds", "0", "--dataset", "digits", "--budget", "smoke", "--no-progress",
        "--threads", "1"]


def _args(**options) -> argparse.Namespace:
    return argparse.Namespace(**{"no_progress": True, "threads": 1, **options})


def _records(results: Path, name: str) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in NONDETERMINISTIC_RECORD_KEYS}
            for r in RunStore(results, name).read_records()]


@pytest.fixture(autouse=True)
def _restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def separate(teacher_cache, tmp_path_factory):
    """ABM and MAD, seed 0, trained one after the other in this process (one thread): the reference."""
    configs = build_run_configs(RunRequest(methods=["abm", "mad"], dataset="digits", seeds=[0], budget="smoke",
                                           teacher=TeacherOptions(cache_dir=str(teacher_cache))))
    results = tmp_path_factory.mktemp("separate")
    threads = torch.get_num_threads()
    try:
        for config in configs:  # one launch per run: K separate runs
            launch([config], results, _args())
    finally:
        torch.set_num_threads(threads)
    return configs, results


def test_packed_runs_give_the_records_of_separate_runs(separate, tmp_path, capsys):
    """The pack a local or SLURM job trains (PackJob): both runs at once, in two worker processes."""
    configs, reference = separate
    packed = tmp_path / "packed"
    assert sorted(PackJob(str(packed), 2, threads=1)([config.to_dict() for config in configs])) == \
        sorted(config.run_name for config in configs)
    out = capsys.readouterr().out
    events = [line for line in out.splitlines() if re.search(r": (started|done)", line)]
    assert [("started" in line) for line in events] == [True, True, False, False], events  # both ran at once
    owners = set()
    for config in configs:
        assert RunStore(packed, config.run_name).is_done()
        assert _records(packed, config.run_name) == _records(reference, config.run_name), config.run_name
        owners.add(RunStore(packed, config.run_name).lock_path.read_text().strip().rsplit(":", 1)[1])
    assert len(owners) == 2 and str(os.getpid()) not in owners  # two worker processes, not this one
    # each run says how it was packed (the compute table shows it)
    environments = [RunStore(packed, c.run_name).read_config()["environment"] for c in configs]
    assert [e["runs_per_gpu"] for e in environments] == [2, 2]
    assert sorted(e["pack_slot"] for e in environments) == [0, 1]
    assert RunStore(reference, configs[0].run_name).read_config()["environment"]["runs_per_gpu"] == 1
    for config in configs:
        expected = RunStore(reference, config.run_name).summary()
        assert RunStore(packed, config.run_name).summary()["final_accuracy"] == expected["final_accuracy"]


def test_a_stopped_pack_checkpoints_every_run_and_resumes_exactly(separate, teacher_cache, tmp_path):
    """SIGTERM to `dfkd-bench run --runs-per-gpu 2` (the inline launcher) reaches both workers; each
    checkpoints and stops; the same runs resumed end with the records of the runs never stopped."""
    configs, reference = separate
    results = tmp_path / "packed"
    command = [sys.executable, "-m", "dfkd_bench.cli", "run", *PACK, "--teacher-cache", str(teacher_cache),
               "--results-dir", str(results), "--runs-per-gpu", "2"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
    try:
        pids, lines = [], []
        assert process.stdout is not None
        while len(pids) < 2:
            line = process.stdout.readline()
            assert line, f"the launch ended early: {lines} {process.stderr.read() if process.stderr else ''}"
            lines.append(line)
            if match := re.search(r"started \[slot \d/2, pid (\d+)", line):
                pids.append(int(match.group(1)))
        # each worker is told how it is packed (the engine records it in config.json)
        environments = [dict(item.split("=", 1) for item in Path(f"/proc/{pid}/environ").read_text().split("\0")
                             if "=" in item) for pid in pids]
        assert {e["DFKD_BENCH_RUNS_PER_GPU"] for e in environments} == {"2"}
        assert sorted(e["DFKD_BENCH_PACK_SLOT"] for e in environments) == ["0", "1"]
        process.send_signal(signal.SIGTERM)  # while the workers still start: the stop must not be lost
        out, err = process.communicate(timeout=240)
    finally:
        if process.poll() is None:
            process.kill()
    assert "2 runs: 0 already done (skipped), 2 to run [inline launcher, 2 runs per GPU]" in "".join(lines)
    assert process.returncode == 2, (out, err)
    assert err.strip().splitlines() == ["error: interrupted; checkpoints saved. Run the same command again to resume"]
    for config in configs:
        # a worker stopped while it still sets up ends at once (nothing trained yet: nothing lost), one
        # stopped later after its iteration with a checkpoint; neither is failed
        store = RunStore(results, config.run_name)
        assert store.status() in ("pending", "incomplete") and not store.error_path.exists(), config.run_name
    launch(configs, results, _args())  # resumed one by one in this process, one thread as before
    for config in configs:
        assert RunStore(results, config.run_name).is_done()
        assert _records(results, config.run_name) == _records(reference, config.run_name), config.run_name


def test_runs_per_gpu_is_checked(tmp_path):
    for value in (0, -2, 1000):
        with pytest.raises(ConfigError, match="--runs-per-gpu") as excinfo:
            launch_options(_args(runs_per_gpu=value))
        assert "\n" not in str(excinfo.value)
    with pytest.raises(ConfigError, match="--gpus-per-node 2"):
        launch_options(_args(runs_per_gpu=3, gpus_per_node=2))
    assert launch_options(None, {"runs_per_gpu": 3})["runs_per_gpu"] == 3
    from dfkd_bench.cluster.sweep import load_experiment

    path = tmp_path / "exp.toml"
    path.write_text('methods = ["abm"]\nseeds = [0]\ndataset = "digits"\n[resources]\nruns_per_gpu = 0\n')
    with pytest.raises(DfkdError, match=r"\[resources\] runs_per_gpu must be an integer from 1 to 256"):
        load_experiment(path)


def test_packed_benchmark_prints_its_ratio(capsys):
    from dfkd_bench.cli import main

    assert main(["bench", "--packed", "2", "--config", "cpu", "--device", "cpu", "--iterations", "2",
                 "--warmup", "1", "--methods", "abm"]) == 0
    out = capsys.readouterr().out
    match = re.search(r"^packed/alone throughput ratio: (\d+\.\d\d) \(K=2\)$", out, re.M)
    assert match, out
    assert float(match.group(1)) > 0
    assert len(re.findall(r"^  packed  abm +seed \d: +\d+\.\d\d ms/iteration", out, re.M)) == 2, out
    assert len(re.findall(r"^  alone   abm +\d+\.\d\d ms/iteration", out, re.M)) == 1, out


def test_a_stop_with_runs_still_queued_ends_the_pack(separate, tmp_path):
    """A stop requested while runs wait in the queue must not keep the launcher looping."""
    import threading

    from dfkd_bench.train.engine import StopRequest
    from dfkd_bench.cluster.launch import PackRunner

    configs, _ = separate
    stop = StopRequest()
    stop.request("SIGTERM")  # before anything started: nothing runs, everything stays queued
    runner = PackRunner(str(tmp_path / "packed"), 1, threads=1)
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(runner.run(configs, stop)), daemon=True)
    thread.start()
    thread.join(timeout=30)
    assert not thread.is_alive(), "the pack kept waiting for queued runs after a stop"
    assert {outcome["status"] for outcome in result.values()} == {"not started"}
