"""Watching runs (issue 13): `status` and `report` on a folder with one finished and one killed run,
made by real smoke-sized training in subprocesses (the killed one by fault injection), with
TensorBoard scalars written along and read back."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from dfkd_bench import cli
from dfkd_bench.errors import DfkdError
from dfkd_bench.report import figures as report_figures
from dfkd_bench.report import load_runs, write_report
from dfkd_bench.store import TENSORBOARD_ENV, RunStore

# 12 iterations, evaluations every 2, checkpoints every 2: a few seconds per run on one thread.
SETTINGS = ["epochs=3", "steps_per_epoch=4", "eval_every=2", "checkpoint_every=2", "drift_every=4", "drift_tau=1",
            "drift_samples=16", "batch_size=16", "student_steps=2", "generator_steps=2"]
TOTAL = 12
KILLED_AT = 7  # SIGKILL in the middle of the student stage of iteration 7: last checkpoint at 6


def dfkd(args: list[str], teacher_cache: Path, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key != "DFKD_BENCH_FAULT"}
    env.update({"DFKD_BENCH_TEACHERS": str(teacher_cache), "OMP_NUM_THREADS": "1", **(env_extra or {})})
    return subprocess.run([sys.executable, "-m", "dfkd_bench.cli", *args], env=env, capture_output=True, text=True,
                          timeout=300)


def run_args(method: str, results: Path) -> list[str]:
    sets = [arg for item in SETTINGS for arg in ("--set", item)]
    return ["run", "--methods", method, "--dataset", "digits", "--results-dir", str(results), "--no-progress",
            "--tensorboard", *sets]


def config_of(method: str, teacher_cache: Path):
    """The RunConfig the command line of ``run_args`` builds."""
    from dfkd_bench.config import parse_overrides
    from dfkd_bench.cluster.experiment import RunRequest, TeacherOptions, build_run_configs

    request = RunRequest(methods=[method], dataset="digits", seeds=[0], overrides=parse_overrides(SETTINGS),
                         teacher=TeacherOptions(cache_dir=str(teacher_cache)))
    return build_run_configs(request)[0]


def train_inline(method: str, results: Path, teacher_cache: Path) -> None:
    """Train (or resume) in this process, with TensorBoard on, as ``run --tensorboard`` would."""
    from dfkd_bench.train.engine import train_run

    before = os.environ.get(TENSORBOARD_ENV)
    os.environ[TENSORBOARD_ENV] = "1"
    try:
        train_run(config_of(method, teacher_cache), results, device="cpu", progress=False)
    finally:
        if before is None:
            del os.environ[TENSORBOARD_ENV]
        else:
            os.environ[TENSORBOARD_ENV] = before


@pytest.fixture(scope="module")
def watched(teacher_cache, tmp_path_factory) -> Path:
    """ABM finished; MAD SIGKILLed at iteration 7 (records up to 6, a checkpoint at 6, no done file)."""
    results = tmp_path_factory.mktemp("watched")
    train_inline("abm", results, teacher_cache)
    killed = dfkd(run_args("mad", results), teacher_cache, {"DFKD_BENCH_FAULT": f"mid_stage@{KILLED_AT}"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    return results


def folder(results: Path, method: str) -> Path:
    (path,) = [p for p in results.iterdir() if p.name.startswith(f"{method}-digits-")]
    return path


def status_rows(results: Path, capsys) -> tuple[dict[str, list[str]], list[str]]:
    assert cli.main(["status", "--results-dir", str(results)]) == 0
    lines = capsys.readouterr().out.splitlines()
    return {line.split()[0]: line.split() for line in lines[1:-1]}, lines


def test_status_columns_for_a_finished_and_a_killed_run(watched, capsys):
    rows, lines = status_rows(watched, capsys)
    assert lines[0].split() == ["RUN", "METHOD", "DATASET", "SEED", "STATUS", "ITERATION", "ACC", "IT/S", "ETA"]
    done = rows[folder(watched, "abm").name]
    summary = RunStore(watched, folder(watched, "abm").name).summary()
    assert done[1:6] == ["abm", "digits", "0", "done", f"{TOTAL}/{TOTAL}"]
    assert done[6] == f"{summary['final_accuracy']:.2f}" and float(done[7]) > 0 and done[8] == "-"
    killed_store = RunStore(watched, folder(watched, "mad").name)
    last = [r for r in killed_store.read_records() if r["kind"] == "eval"][-1]
    killed = rows[folder(watched, "mad").name]
    # the iteration reached is the last checkpoint (6), the accuracy that of the last evaluation
    assert killed[1:6] == ["mad", "digits", "0", "incomplete", f"{KILLED_AT - 1}/{TOTAL}"]
    assert killed[6] == f"{last['test_accuracy']:.2f}" and float(killed[7]) > 0 and killed[8] == "-"
    assert lines[-1] == f"2 runs under {watched}: 1 done, 1 incomplete"

    # While a trainer holds the run, it is running, with an estimated time left.
    with killed_store.lock():
        rows, _ = status_rows(watched, capsys)
    running = rows[killed_store.name]
    assert running[4] == "running"
    assert re.fullmatch(r"\d+(s|m|h\d\dm|d\d\dh)", running[8]), running


def test_report_draws_the_killed_run_marked(watched, tmp_path, monkeypatch):
    legends: dict[str, list[str]] = {}
    save = report_figures._save

    def spy(fig, out_dir, stem, formats):
        legends[stem] = [text.get_text() for legend in fig.legends for text in legend.get_texts()]
        return save(fig, out_dir, stem, formats)

    monkeypatch.setattr(report_figures, "_save", spy)
    result = write_report(watched, tmp_path / "r", formats=("png",))
    stopped = f"MAD seed 0: stopped at iteration {KILLED_AT - 1} of {TOTAL}"
    assert "ABM (n=1)" in legends["accuracy_curves"] and stopped in legends["accuracy_curves"]
    assert stopped in legends["loss_curves"]
    markdown = (tmp_path / "r" / "table_final.md").read_text()
    assert "| MAD | —‡ |" in markdown and f"| stopped at iteration {KILLED_AT - 1} of {TOTAL} |" in markdown
    assert "‡" not in markdown.split("| ABM |")[1].split("\n")[0]
    assert len(result["incomplete_runs"]) == 1 and "last test accuracy" in result["incomplete_runs"][0]

    # --finished-only: the killed run is neither drawn nor marked (still listed)
    legends.clear()
    result = write_report(watched, tmp_path / "f", formats=("png",), finished_only=True)
    assert [label for label in legends["accuracy_curves"] if not label.startswith("shaded")] == ["ABM (n=1)"]
    assert "‡" not in (tmp_path / "f" / "table_final.md").read_text()
    assert len(result["incomplete_runs"]) == 1

    # while it trains again: "running, iteration 6 of 12"
    store = RunStore(watched, folder(watched, "mad").name)
    with store.lock():
        runs = load_runs(watched)
    assert f"running, iteration {KILLED_AT - 1} of {TOTAL}" in set(runs["progress"])


def test_a_diverged_run_is_failed_with_its_reason_in_status_and_report(watched, tmp_path, capsys):
    results = tmp_path / "runs"
    shutil.copytree(watched, results, ignore=shutil.ignore_patterns("report"))
    store = RunStore(results, folder(results, "mad").name)
    reason = "diverged: student_loss is NaN at iteration 5; lower lr_S (--set student_lr=...)"
    store.mark_failed(reason)  # what the engine does when a loss is not finite
    rows, lines = status_rows(results, capsys)
    assert rows[store.name][4] == "failed" and " ".join(rows[store.name]).endswith(f"error: {reason}")
    result = write_report(results, tmp_path / "r", formats=("png",))
    runs = load_runs(results)
    failed = runs[runs["status"] == "failed"]
    assert list(failed["run_name"]) == [store.name] and reason in failed["state"].item()
    assert any(note.startswith(f"{store.name} failed, left out of every mean: failed: {reason}")
               for note in result["notes"])
    markdown = (tmp_path / "r" / "table_final.md").read_text()
    assert "| MAD | —‡ |" in markdown and f"failed at iteration {KILLED_AT - 1} of {TOTAL}: {reason}" in markdown


def test_tensorboard_scalars_follow_the_records_across_a_kill_and_resume(watched, teacher_cache, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def scalars(path: Path) -> dict[str, list[tuple[int, float]]]:
        accumulator = EventAccumulator(str(path), size_guidance={"scalars": 0})
        accumulator.Reload()
        return {tag: [(e.step, e.value) for e in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}

    done = scalars(folder(watched, "abm"))
    evals = [r for r in RunStore(watched, folder(watched, "abm").name).read_records() if r["kind"] == "eval"]
    assert done["eval/test_accuracy"] == [(r["step"], pytest.approx(r["test_accuracy"])) for r in evals]
    assert "loss/student_loss" in done and "drift/js_gen" in done

    # Resume the killed run in a copy: its records after the checkpoint are written again; TensorBoard
    # must show each step once, with the values of the records file.
    results = tmp_path / "runs"
    shutil.copytree(watched, results, ignore=shutil.ignore_patterns("report"))
    path = folder(results, "mad")
    assert path.name == config_of("mad", teacher_cache).run_name  # the command line's run is the one resumed
    train_inline("mad", results, teacher_cache)
    assert len(list(path.glob("events.out.tfevents.*"))) >= 2  # one per process start (and per records rewrite)
    shown = scalars(path)
    records = RunStore(results, path.name).read_records()
    for tag, kind, key in (("eval/test_accuracy", "eval", "test_accuracy"), ("drift/js_gen", "drift", "js_gen"),
                           ("loss/kd_gen_ema", "eval", "loss/kd_gen_ema")):
        expected = [(r["step"], pytest.approx(r[key], rel=1e-6)) for r in records
                    if r["kind"] == kind and r.get(key) is not None]
        assert shown[tag] == expected, tag
    assert [step for step, _ in shown["eval/test_accuracy"]] == list(range(0, TOTAL + 1, 2))


def test_tensorboard_flag_sets_the_environment_or_says_what_to_install(monkeypatch, capsys):
    monkeypatch.delenv(TENSORBOARD_ENV, raising=False)
    parser = cli.build_parser()
    args = parser.parse_args(["run", "--tensorboard"])
    assert args.tensorboard is True and os.environ[TENSORBOARD_ENV] == "1"
    monkeypatch.delenv(TENSORBOARD_ENV)
    assert parser.parse_args(["run"]).tensorboard is False and TENSORBOARD_ENV not in os.environ

    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    with pytest.raises(SystemExit) as exit_info:
        cli.build_parser().parse_args(["run", "--tensorboard"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "pip install 'dfkd-bench[tensorboard]'" in err and "Traceback" not in err
    assert TENSORBOARD_ENV not in os.environ


def test_status_on_a_file_and_on_a_truncated_config(watched, tmp_path, capsys):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("x")
    with pytest.raises(DfkdError) as error:
        cli.main(["--debug", "status", "--results-dir", str(a_file)])
    assert "is a file, not a results folder" in str(error.value) and "does not exist" not in str(error.value)

    results = tmp_path / "runs"
    shutil.copytree(watched, results, ignore=shutil.ignore_patterns("report"))
    config = folder(results, "abm") / "config.json"
    config.write_text(config.read_text()[:40])
    rows, lines = status_rows(results, capsys)
    row = " ".join(rows[folder(results, "abm").name])
    assert rows[folder(results, "abm").name][4] == "damaged" and "is damaged (not valid JSON" in row
    assert "does not exist" not in row and lines[-1].endswith("1 incomplete, 1 damaged")
    result = write_report(results, tmp_path / "r", formats=("png",))
    assert any(f"skipped {folder(results, 'abm')}: its config.json is damaged" in note for note in result["notes"])
