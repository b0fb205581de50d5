"""A packed run's worker stopped while it still sets up (e.g. decoding the test split) ends at once
and cleanly, losing nothing; one whose launcher dies is told to stop, not killed (issue 21)."""

from __future__ import annotations

import time
from pathlib import Path

from dfkd_bench.cluster.experiment import RunRequest, TeacherOptions, build_run_configs
from dfkd_bench.cluster.launch import PackRunner, _SetupAwareStop, _stop_in_worker
from dfkd_bench.store import RunStore

SLOW_SETUP = '''
import os, time
marker = os.environ.get("I21_SETUP_MARKER")
if marker:
    import dfkd_bench.train.engine as engine

    real = engine.TestSet.__init__

    def slow_test_set(self, *args, **kwargs):  # a test split that takes a minute to decode
        open(marker, "w").write("decoding")
        for _ in range(600):
            time.sleep(0.1)
        real(self, *args, **kwargs)

    engine.TestSet.__init__ = slow_test_set
'''


class _StopWhenDecoding:
    """The launcher's stop request, set once the worker is decoding (as a deadline's SIGTERM would)."""

    def __init__(self, marker: Path):
        self.marker, self.at = marker, None

    @property
    def requested(self) -> bool:
        if self.at is None and self.marker.exists():
            self.at = time.monotonic()
        return self.at is not None


def test_a_worker_stopped_while_decoding_ends_at_once_without_a_failure(teacher_cache, tmp_path, monkeypatch):
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SLOW_SETUP)
    marker = tmp_path / "decoding"
    monkeypatch.setenv("PYTHONPATH", str(site))
    monkeypatch.setenv("I21_SETUP_MARKER", str(marker))
    (config,) = build_run_configs(RunRequest(methods=["abm"], dataset="digits", seeds=[0], budget="smoke",
                                             teacher=TeacherOptions(cache_dir=str(teacher_cache))))
    stop = _StopWhenDecoding(marker)
    outcomes = PackRunner(tmp_path / "runs", 1, device="cpu", threads=1, log=False).run([config], stop)
    waited = time.monotonic() - stop.at
    outcome = outcomes[config.run_name]
    assert outcome["status"] == "interrupted" and "while setting up" in outcome["message"], outcome
    assert waited < 30, waited  # not the minute of decoding left, nor what an iteration would add
    store = RunStore(tmp_path / "runs", config.run_name)
    assert not store.error_path.exists() and not store.is_locked() and store.status() != "failed"


def test_a_stop_after_the_first_iteration_waits_for_the_checkpoint():
    stop = _SetupAwareStop()
    assert stop.requested is False  # the engine's first question: from now on a stop waits for the iteration
    _stop_in_worker(stop, 15)  # SIGTERM: no exception, the engine checkpoints and stops
    assert stop.requested is True and stop.reason == "SIGTERM"


def test_a_stop_during_setup_raises_at_once():
    import pytest

    from dfkd_bench.train.engine import RunInterrupted

    stop = _SetupAwareStop()
    with pytest.raises(RunInterrupted, match="while setting up"):
        _stop_in_worker(stop, 15)


def test_a_worker_whose_launcher_is_killed_gets_sigterm_not_sigkill(tmp_path):
    """The launcher (here a small Python process) starts a child with the workers' pre-exec hook and
    is SIGKILLed, as `timeout --kill-after` does: the child is told SIGTERM (it may checkpoint)."""
    import os
    import signal
    import subprocess
    import sys

    told = tmp_path / "told"
    child = (f"import signal, time\n"
             f"def on(signum, frame):\n    open({str(told)!r}, 'w').write(signal.Signals(signum).name)\n"
             f"    raise SystemExit(0)\n"
             f"signal.signal(signal.SIGTERM, on)\n"
             f"signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGTERM])\n"
             f"open({str(tmp_path / 'up')!r}, 'w').write('up')\n"
             f"time.sleep(60)\n")
    launcher = ("import subprocess, sys, time\n"
                "from dfkd_bench.cluster.launch import _worker_preexec\n"
                f"subprocess.Popen([sys.executable, '-c', {child!r}], start_new_session=True, "
                "preexec_fn=_worker_preexec())\n"
                "time.sleep(60)\n")
    root = str(Path(__file__).resolve().parent.parent)
    process = subprocess.Popen([sys.executable, "-c", launcher], env={**os.environ, "PYTHONPATH": root})
    try:
        deadline = time.time() + 60
        while not (tmp_path / "up").exists() and time.time() < deadline:
            time.sleep(0.05)
        assert (tmp_path / "up").exists()
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
        deadline = time.time() + 30
        while not told.exists() and time.time() < deadline:
            time.sleep(0.05)
        assert told.read_text() == "SIGTERM"
    finally:
        if process.poll() is None:
            process.kill()
