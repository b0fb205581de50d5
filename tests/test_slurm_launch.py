"""`dfkd-bench run --launcher slurm` against the REAL local SLURM of ``scripts/slurm/start.sh``.

No mocks: the CLI submits job arrays through submitit, SLURM runs them,
preempts them (``scancel --signal=USR2``, as SLURM does before a time limit or
on preemption) or kills and requeues them (``scontrol requeue``), and the runs
must end exactly where an uninterrupted inline run of the same configuration
ends: same records, same final accuracy, bit-identical student weights.

Exact equality needs the same number of CPU threads on both sides (float sums
are split differently across threads): SLURM jobs run with ``--cpus-per-task 1``
(the job sets ``torch.set_num_threads(1)``), so the inline references run with
``OMP_NUM_THREADS=1``.

Skipped when no cluster answers. Run with::

    sudo scripts/slurm/start.sh
    .venv/bin/python -m pytest tests/test_slurm_launch.py -q -m slurm
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dfkd_bench.train.engine import NONDETERMINISTIC_RECORD_KEYS
import torch

REPO = Path(__file__).resolve().parent.parent
SKIP_REASON = "local SLURM not reachable (`sbatch` missing or `scontrol ping` fails); start it with scripts/slurm/start.sh"


def _slurm_up() -> bool:
    if shutil.which("sbatch") is None or shutil.which("scontrol") is None:
        return False
    try:
        out = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=15)
    except (OSError, subprocess.SubprocessError):
        return False
    return out.returncode == 0 and "UP" in out.stdout


pytestmark = [pytest.mark.slurm, pytest.mark.skipif(not _slurm_up(), reason=SKIP_REASON), pytest.mark.timeout(480)]

# Small SLURM jobs: two of them share this 2-core machine.
SLURM_ARGS = ["--launcher", "slurm", "--cpus-per-task", "1", "--mem-gb", "2", "--time", "60"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
# Long enough to be interrupted (300 iterations of ~0.06 s: SLURM kills a requeued job only after its
# KillWait of 5 s, and at 100 the run could finish first), checkpointed every 2 iterations,
# with evaluations and a drift measurement on both sides of the interruption.
LONG_RUN = ["--methods", "mad", "--dataset", "digits", "--no-progress",
            "--set", "epochs=30", "--set", "steps_per_epoch=10", "--set", "checkpoint_every=2",
            "--set", "batch_size=32", "--set", "eval_every=10", "--set", "drift_every=50", "--set", "drift_tau=5"]
LONG_TOTAL = 300


# ------------------------------------------------------------------ helpers

def dfkd_command(*args) -> list[str]:
    return [sys.executable, "-m", "dfkd_bench.cli", *map(str, args)]


def dfkd(*args, timeout: float = 300, expect: int = 0) -> subprocess.CompletedProcess:
    proc = subprocess.run(dfkd_command(*args), capture_output=True, text=True, timeout=timeout, env=ENV, cwd=REPO)
    assert proc.returncode == expect, (
        f"dfkd-bench {' '.join(map(str, args))} exited {proc.returncode} (expected {expect})\n"
        f"--- stdout ---\n{proc.stdout[-3000:]}\n--- stderr ---\n{proc.stderr[-3000:]}")
    return proc


def status_command(results: Path) -> list[str]:
    return [sys.executable, "-m", "dfkd_bench.cli", "status", "--results-dir", str(results)]


def status_rows(results: Path) -> tuple[dict[str, str], str]:
    proc = subprocess.run(status_command(results), capture_output=True, text=True, timeout=60, env=ENV, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    return {line.split()[0]: line for line in lines[1:-1]}, lines[-1]


def submitit_logs(results: Path, lines: int = 40) -> str:
    folder = results / "_submitit"
    parts = []
    for path in sorted(folder.glob("*_log.*")) if folder.exists() else []:
        text = path.read_text(errors="replace").splitlines()
        parts.append(f"--- {path.name} (last {lines} lines) ---\n" + "\n".join(text[-lines:]))
    return "\n".join(parts) or f"(no submitit logs in {folder})"


def squeue(job: str) -> str:
    out = subprocess.run(["squeue", "-h", "-j", job, "-o", "%i %T %r"], capture_output=True, text=True,
                         timeout=30)
    return out.stdout.strip() or out.stderr.strip()


def wait_for(predicate, timeout: float, what: str, results: Path | None = None, job: str | None = None,
             step: float = 0.5):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            details = []
            if job:
                details.append(f"squeue: {squeue(job) or '(not in the queue)'}")
            if results is not None:
                details.append(submitit_logs(results))
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}\n" + "\n".join(details))
        time.sleep(step)


def submitted_job(stdout: str) -> str:
    """The SLURM job id (of the whole array when several runs went out)."""
    match = re.search(r"submitted job (?:array )?(\d+)", stdout)
    assert match, f"no job id in:\n{stdout}"
    return match.group(1)


def run_folders(results: Path) -> list[Path]:
    return sorted(p for p in results.iterdir() if p.is_dir() and not p.name.startswith("_")) if results.exists() else []


def last_step(run: Path) -> int:
    """Last iteration recorded (evaluations) or checkpointed; -1 before any."""
    step = -1
    try:
        for line in (run / "records.jsonl").read_text().splitlines():
            try:
                step = max(step, int(json.loads(line).get("step", -1)))
            except (ValueError, TypeError):
                pass  # a line being written
    except FileNotFoundError:
        pass
    try:
        step = max(step, int(json.loads((run / "checkpoint.json").read_text())["iteration"]))
    except (FileNotFoundError, ValueError, KeyError):
        pass
    return step


def records_without_times(run: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in NONDETERMINISTIC_RECORD_KEYS}
            for line in (run / "records.jsonl").read_text().splitlines() if line.strip()]


def assert_same_run(run: Path, reference: Path) -> None:
    assert run.name == reference.name, "not the same configuration (run ids differ)"
    done, expected = json.loads((run / "done").read_text()), json.loads((reference / "done").read_text())
    for key in ("final_accuracy", "best_accuracy", "final_cross_entropy", "teacher_agreement", "iterations"):
        assert done[key] == expected[key], f"{run.name}: {key} {done[key]} != {expected[key]} of the inline run"
    assert records_without_times(run) == records_without_times(reference)
    weights, expected_weights = torch.load(run / "student.pt"), torch.load(reference / "student.pt")
    assert weights.keys() == expected_weights.keys()
    for key in weights:
        assert torch.equal(weights[key], expected_weights[key]), f"{run.name}: student weights differ at {key}"


def resumed_from(run: Path) -> list[int]:
    notes = json.loads((run / "config.json").read_text())["notes"]
    return [int(m.group(1)) for note in notes if (m := re.search(r"resumed from iteration (\d+)", note))]


class InlineRun:
    """An inline `dfkd-bench run` in the background (one thread), for reference results."""

    def __init__(self, results: Path, *args):
        self.results = results
        self.log = results.parent / f"{results.name}.log"
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(dfkd_command(*args, "--launcher", "inline", "--results-dir", results),
                                         stdout=log, stderr=subprocess.STDOUT, env=ENV, cwd=REPO)

    def folders(self, timeout: float = 300) -> list[Path]:
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError(f"the inline reference run took over {timeout}s:\n{self.log.read_text()[-3000:]}")
        assert self.proc.returncode == 0, f"inline reference failed:\n{self.log.read_text()[-3000:]}"
        return run_folders(self.results)


@pytest.fixture(scope="module")
def long_reference(tmp_path_factory, teacher_cache):
    """The uninterrupted inline run of LONG_RUN; it trains while the first SLURM test runs."""
    results = tmp_path_factory.mktemp("long-reference") / "inline"
    run = InlineRun(results, "run", *LONG_RUN, "--teacher-cache", teacher_cache)
    yield run
    if run.proc.poll() is None:
        run.proc.kill()


def _cancel(job: str | None) -> None:
    if job:
        subprocess.run(["scancel", job], capture_output=True, timeout=30)


# -------------------------------------------------------------------- tests

def test_slurm_array_matches_inline(tmp_path, teacher_cache):
    common = ["--methods", "abm,mem,mad", "--dataset", "digits", "--budget", "smoke", "--teacher-cache", teacher_cache,
              "--no-progress"]
    inline = InlineRun(tmp_path / "inline", "run", *common)
    slurm = dfkd("run", *common, *SLURM_ARGS, "--results-dir", tmp_path / "slurm", timeout=360)
    submitted_job(slurm.stdout)
    assert "with 3 tasks" in slurm.stdout
    references = {p.name: p for p in inline.folders()}
    runs = run_folders(tmp_path / "slurm")
    assert sorted(p.name.split("-")[0] for p in runs) == ["abm", "mad", "mem"]
    assert set(references) == {p.name for p in runs}
    for run in runs:
        config = json.loads((run / "config.json").read_text())
        assert config["environment"]["slurm_job_id"] is not None, "not trained inside a SLURM job"
        assert config["environment"]["torch_threads"] == 1
        assert_same_run(run, references[run.name])
    rows, counts = status_rows(tmp_path / "slurm")
    assert {line.split()[4] for line in rows.values()} == {"done"} and counts.endswith(": 3 done"), (rows, counts)
    # a second launch finds everything done and submits nothing
    again = dfkd("run", *common, *SLURM_ARGS, "--results-dir", tmp_path / "slurm", timeout=120)
    assert "3 already done (skipped), 0 to run" in again.stdout and "submitted" not in again.stdout


def _submit_long_run(results: Path, teacher_cache: Path) -> tuple[str, Path]:
    out = dfkd("run", *LONG_RUN, "--teacher-cache", teacher_cache, *SLURM_ARGS, "--results-dir", results, "--no-wait",
               timeout=120)
    job = submitted_job(out.stdout)
    assert "not waiting" in out.stdout
    run = wait_for(lambda: (folders := run_folders(results)) and folders[0], 180, "the run folder", results, job)
    # past the first evaluation after training started, with a checkpoint on disk, far from the end
    wait_for(lambda: 10 <= last_step(run) and (run / "checkpoint.json").exists(), 240,
             f"{run.name} to make progress (last step {last_step(run)})", results, job, step=0.2)
    assert last_step(run) < LONG_TOTAL - 20, "the run went too fast to be interrupted mid-way"
    return job, run


def test_preemption_signal_checkpoints_requeues_and_resumes_exactly(tmp_path, teacher_cache, long_reference):
    results = tmp_path / "slurm"
    job = None
    try:
        job, run = _submit_long_run(results, teacher_cache)
        # what SLURM does before a time limit / on preemption for submitit jobs (#SBATCH --signal=USR2@90)
        subprocess.run(["scancel", "--signal=USR2", job], check=True, capture_output=True, timeout=30)
        wait_for(lambda: (run / "done").exists(), 300, f"{run.name} to finish after the requeue", results, job)
    finally:
        _cancel(job)  # only matters when the test failed half-way
    logs = submitit_logs(results, lines=1000)
    assert "Caught signal SIGUSR2" in logs and "Requeued job" in logs, logs
    resumed = resumed_from(run)
    assert len(resumed) == 1 and 10 <= resumed[0] < LONG_TOTAL, resumed
    (reference,) = long_reference.folders()
    assert_same_run(run, reference)


def test_hard_requeue_resumes_from_periodic_checkpoint(tmp_path, teacher_cache, long_reference):
    results = tmp_path / "slurm"
    job = None
    try:
        job, run = _submit_long_run(results, teacher_cache)
        # killed without warning and put back in the queue (SIGTERM is ignored by submitit, then SIGKILL)
        subprocess.run(["scontrol", "requeue", job], check=True, capture_output=True, timeout=30)
        wait_for(lambda: (run / "done").exists(), 300, f"{run.name} to finish after the requeue", results, job)
        info = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True, timeout=30).stdout
    finally:
        _cancel(job)
    restarts = re.search(r"Restarts=(\d+)", info)
    assert restarts and int(restarts.group(1)) >= 1, info
    logs = submitit_logs(results, lines=1000)
    assert "Caught signal SIGUSR2" not in logs
    resumed = resumed_from(run)
    assert len(resumed) == 1 and resumed[0] >= 10 and resumed[0] % 2 == 0, resumed  # checkpoint_every=2
    (reference,) = long_reference.folders()
    assert_same_run(run, reference)


def test_failing_job_is_reported_failed(tmp_path, teacher_cache):
    """The teacher checkpoint disappears between submission and start (the job is held meanwhile)."""
    teacher = tmp_path / "teacher.pt"
    shutil.copy(teacher_cache / "digits-lenet5.pt", teacher)
    results = tmp_path / "slurm"
    log = tmp_path / "launch.log"
    args = ["run", "--methods", "abm", "--dataset", "digits", "--budget", "smoke", "--teacher-checkpoint", teacher,
            "--no-progress", *SLURM_ARGS, "--results-dir", results, "--slurm-extra", "hold"]
    job = None
    with open(log, "w") as handle:
        launcher = subprocess.Popen(dfkd_command(*args), stdout=handle, stderr=subprocess.STDOUT, env=ENV, cwd=REPO)
    try:
        job = wait_for(lambda: (m := re.search(r"submitted job (\d+)", log.read_text())) and m.group(1), 120,
                       f"the submission (log: {log.read_text()[-2000:]})")
        assert "PENDING" in squeue(job), squeue(job)
        teacher.unlink()
        subprocess.run(["scontrol", "release", job], check=True, capture_output=True, timeout=30)
        launcher.wait(timeout=240)
    finally:
        if launcher.poll() is None:
            launcher.kill()
        _cancel(job)
    output = log.read_text()
    assert launcher.returncode == 2, output
    assert "error: teacher checkpoint" in output, output  # one run: its own error, one line
    assert "CheckpointError" not in output, output  # no exception class names in user messages
    assert f"teacher checkpoint {teacher} does not exist" in output, output
    rows, counts = status_rows(results)
    (row,) = rows.values()
    assert row.split()[1:5] == ["abm", "digits", "0", "failed"], row
    assert row.rstrip().endswith(f"error: teacher checkpoint {teacher} does not exist"), row
    assert counts.endswith(": 1 failed"), counts
