"""Checks against the REAL local SLURM cluster of ``scripts/slurm/start.sh``.

No mocks: jobs go through sbatch/slurmctld/slurmd, states come from sacct
(slurmdbd + MariaDB).  The whole module is skipped when no cluster answers.
Run with::

    sudo scripts/slurm/start.sh
    .venv/bin/python -m pytest tests/test_slurm_cluster.py -q -m slurm
"""

from __future__ import annotations

import operator
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

SKIP_REASON = "local SLURM not running; start it with scripts/slurm/start.sh"


def _slurm_up() -> bool:
    if shutil.which("sbatch") is None or shutil.which("scontrol") is None:
        return False
    try:
        out = subprocess.run(
            ["scontrol", "ping"], capture_output=True, text=True, timeout=15
        )
    except (OSError, subprocess.SubprocessError):
        return False
    return out.returncode == 0 and "UP" in out.stdout


if not _slurm_up():
    pytest.skip(SKIP_REASON, allow_module_level=True)

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(120)]


# ------------------------------------------------------------------ helpers
def _run(*cmd: str, timeout: float = 30) -> str:
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{' '.join(cmd)} failed ({out.returncode}): {out.stderr}"
    return out.stdout


def _sbatch(tmp: Path, *args: str) -> str:
    """Submit a job; returns its id.  Output goes to tmp (readable by slurmd)."""
    out = _run("sbatch", "--parsable", "-o", str(tmp / "%j.out"), "-e", str(tmp / "%j.err"), *args)
    return out.strip().split(";")[0]


def _sacct_state(job_id: str) -> str:
    out = subprocess.run(
        ["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "State"],
        capture_output=True, text=True, timeout=15,
    )
    assert out.returncode == 0, f"sacct failed: {out.stderr}"
    lines = [ln.strip() for ln in out.stdout.splitlines() if ln.strip()]
    return lines[0] if lines else ""


def _squeue_states(job_ids: list[str]) -> dict[str, str]:
    out = _run("squeue", "-h", "-j", ",".join(job_ids), "-o", "%i %T")
    return dict(ln.split() for ln in out.splitlines() if ln.strip())


def _wait(pred, timeout: float, what: str, step: float = 0.5):
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(step)


def _scancel(*job_ids: str) -> None:
    subprocess.run(["scancel", *job_ids], capture_output=True, timeout=15)


def _executor(folder: Path):
    submitit = pytest.importorskip("submitit")
    ex = submitit.AutoExecutor(folder=folder, cluster="slurm")
    ex.update_parameters(timeout_min=5, slurm_partition="debug", cpus_per_task=1, mem_gb=0.5)
    return ex


# -------------------------------------------------------------------- tests
def test_cluster_config():
    """The settings the other tests (and the preemption tests) depend on."""
    cfg = _run("scontrol", "show", "config")
    settings = {}
    for line in cfg.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            settings[key.strip()] = value.strip()
    assert settings["JobRequeue"] == "1"
    assert settings["AccountingStorageType"] == "accounting_storage/slurmdbd"
    assert settings["DefMemPerCPU"] not in ("", "0", "UNLIMITED")
    state = _run("sinfo", "-h", "-o", "%T").split()
    assert state and state[0] in ("idle", "mixed", "allocated", "completing"), state


def test_sbatch_wrap_completes(tmp_path):
    job_id = _sbatch(tmp_path, "-J", "dfkd-wrap", "--wrap", "echo hello-from-slurm")
    state = _wait(
        lambda: (s := _sacct_state(job_id)) in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT")
        and s,
        30, f"sacct to report job {job_id} finished",
    )
    assert state == "COMPLETED"
    assert (tmp_path / f"{job_id}.out").read_text().strip() == "hello-from-slurm"


def test_submitit_returns_result(tmp_path):
    ex = _executor(tmp_path)
    assert ex.cluster == "slurm"
    job = ex.submit(operator.mul, 6, 7)
    # a closure is pickled by value: it shows the function ran inside the job
    job_env = ex.submit(lambda: (os.environ.get("SLURM_JOB_ID"), os.getpid()))
    try:
        assert job.result() == 42
        slurm_job_id, pid = job_env.result()
    finally:
        _scancel(job.job_id, job_env.job_id)
    assert slurm_job_id == job_env.job_id
    assert pid != os.getpid()
    # the result pickle is written before the job ends: sacct may lag a moment
    _wait(lambda: job.get_info(mode="force").get("State") == "COMPLETED", 30,
          f"sacct to report {job.job_id} COMPLETED (last: {job.state})")


def test_submitit_sees_scancel(tmp_path):
    """Needs accounting: without sacct, submitit's state stays UNKNOWN forever."""
    ex = _executor(tmp_path)
    job = ex.submit(time.sleep, 300)
    try:
        _wait(lambda: _squeue_states([job.job_id]).get(job.job_id) == "RUNNING",
              30, "the sleep job to start")
        _run("scancel", job.job_id)
        _wait(lambda: job.done(force_check=True), 30, "submitit to see the job finished")
    finally:
        _scancel(job.job_id)
    assert job.get_info(mode="force")["State"].startswith("CANCELLED"), job.get_info()
    assert job.state.startswith("CANCELLED")
    job._results_timeout_s = 1  # else submitit waits 15 s for a result file that never comes
    exc = job.exception()
    assert exc is not None  # UncompletedJobError: no result pickle was written
    assert "CANCELLED" in str(exc)


@pytest.mark.parametrize("mem", ["--mem=100M", None], ids=["mem100M", "DefMemPerCPU"])
def test_two_small_jobs_run_concurrently(tmp_path, mem):
    """Two 1-CPU jobs share the 2-CPU node (DefMemPerCPU keeps a job from taking
    the whole node's memory)."""
    args = ["-c", "1", "--wrap", "sleep 20"] + ([mem] if mem else [])
    ids = [_sbatch(tmp_path, "-J", f"dfkd-conc{i}", *args) for i in range(2)]
    try:
        _wait(
            lambda: all(s == "RUNNING" for s in _squeue_states(ids).values())
            and len(_squeue_states(ids)) == 2,
            20, f"jobs {ids} to run at the same time ({_squeue_states(ids)})",
        )
    finally:
        _scancel(*ids)


def test_scontrol_requeue_restarts_job(tmp_path):
    """Preemption tests requeue jobs: JobRequeue=1 and a short cred_expire make a
    requeued job run again within seconds (the default waits 120 s)."""
    job_id = _sbatch(tmp_path, "-J", "dfkd-requeue", "--requeue", "--wrap", "sleep 60")
    try:
        _wait(lambda: _squeue_states([job_id]).get(job_id) == "RUNNING", 20, "the job to start")
        _run("scontrol", "requeue", job_id)

        def restarted() -> bool:
            info = _run("scontrol", "show", "job", job_id)
            return "Restarts=1" in info and "JobState=RUNNING" in info

        _wait(restarted, 30, f"requeued job {job_id} to run again", step=1)
    finally:
        _scancel(job_id)
    _wait(lambda: _sacct_state(job_id).startswith("CANCELLED"), 30, "sacct to see the cancel")
