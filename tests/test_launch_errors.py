"""Launch errors a new user meets (issue 15): one line each, saying what is wrong and what to do,
and no launch that claims runs are done when they are not."""

from __future__ import annotations

import argparse
import os
import shutil
import socket

import pytest
import torch

from dfkd_bench.cli import main
from dfkd_bench.errors import DfkdError
from dfkd_bench.cluster.experiment import RunRequest, TeacherOptions, build_run_configs
from dfkd_bench.cluster.launch import launch
from dfkd_bench.store import RunStore

SMOKE = ["--dataset", "digits", "--budget", "smoke", "--no-progress", "--threads", "1"]


@pytest.fixture(autouse=True)
def _restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _error_line(capsys) -> str:
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    assert "Traceback" not in captured.err and "Error:" not in lines[0], lines[0]  # no exception class names
    return lines[0]


def test_an_unknown_architecture_leaves_no_run_folder(teacher_cache, tmp_path, capsys):
    results = tmp_path / "runs"
    assert main(["run", "--methods", "abm", *SMOKE, "--student-arch", "nosuch", "--teacher-cache", str(teacher_cache),
                 "--results-dir", str(results)]) == 2
    line = _error_line(capsys)
    assert "unknown model 'nosuch'" in line and "dfkd-bench list" in line, line
    assert not results.exists() or not any(results.iterdir())
    # the library entry point checks too, before anything is written (a sweep goes through it)
    config = build_run_configs(RunRequest(methods=["abm"], dataset="digits", seeds=[0], budget="smoke",
                                          teacher=TeacherOptions(cache_dir=str(teacher_cache))))[0]
    config.student_arch = "nosuch"
    with pytest.raises(DfkdError, match=r"^student architecture: unknown model 'nosuch'"):
        launch([config], results, argparse.Namespace(no_progress=True))
    assert not results.exists() or not any(results.iterdir())


def test_a_results_folder_that_cannot_be_created_says_why(digits_request, tmp_path, capsys):
    config = build_run_configs(digits_request(["abm"]))[0]
    a_file = tmp_path / "notes.txt"
    a_file.write_text("not a folder")
    with pytest.raises(DfkdError) as excinfo:
        launch([config], a_file / "x", argparse.Namespace(no_progress=True))
    assert str(excinfo.value).startswith(f"cannot create results folder {a_file / 'x'}: Not a directory; ")
    with pytest.raises(DfkdError, match=f"^cannot create results folder {a_file}: it is a file"):
        launch([config], a_file, argparse.Namespace(no_progress=True))
    # the command line: one line with the reason, whoever checks it first
    assert main(["run", "--methods", "abm", *SMOKE, "--teacher-cache", str(digits_request().teacher.cache_dir),
                 "--results-dir", str(a_file / "x")]) == 2
    line = _error_line(capsys)
    assert "Not a directory" in line and str(a_file / "x") in line, line


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_results_folder_says_why(digits_request, tmp_path):
    config = build_run_configs(digits_request(["abm"]))[0]
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        with pytest.raises(DfkdError, match="Permission denied"):
            launch([config], folder, argparse.Namespace(no_progress=True))
    finally:
        folder.chmod(0o755)


def test_a_failed_write_keeps_the_cause_of_the_failure(teacher_cache, tmp_path):
    """The run fails (its teacher vanished) and its error.txt cannot be written: both reasons are told."""
    teacher = tmp_path / "teacher.pt"
    shutil.copy(teacher_cache / "digits-lenet5.pt", teacher)
    config = build_run_configs(RunRequest(methods=["abm"], dataset="digits", seeds=[0], budget="smoke",
                                          teacher=TeacherOptions(checkpoint=str(teacher))))[0]
    teacher.unlink()
    results = tmp_path / "runs"
    store = RunStore(results, config.run_name)
    store.error_path.mkdir(parents=True)  # error.txt cannot be written (as on a disk that became read-only)
    with pytest.raises(DfkdError) as excinfo:
        launch([config], results, argparse.Namespace(no_progress=True))
    message = str(excinfo.value)
    assert "\n" not in message and "stopped without recording an error" not in message, message
    assert f"teacher checkpoint {teacher} does not exist" in message, message
    assert f"could not be recorded: cannot access {store.error_path}: Is a directory" in message, message
    # a run folder that cannot be made at all
    shutil.rmtree(store.path)
    store.path.write_text("")
    with pytest.raises(DfkdError, match=f"cannot access {store.path}: File exists"):
        launch([config], results, argparse.Namespace(no_progress=True))


def test_sweep_given_a_folder_says_so(tmp_path):
    from dfkd_bench.cluster.sweep import load_experiment

    (tmp_path / "a.toml").write_text("")
    with pytest.raises(DfkdError, match=f"^{tmp_path} is a folder, not an experiment file; pass one file "
                                        r"\(its experiment files: a.toml\)$"):
        load_experiment(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DfkdError, match="is a folder, not an experiment file; pass one file .it holds no .toml files"):
        load_experiment(tmp_path / "empty")
    with pytest.raises(DfkdError, match="does not exist"):
        load_experiment(tmp_path / "missing.toml")


def test_a_run_still_training_elsewhere_is_not_reported_done(teacher_cache, tmp_path, capsys):
    results = tmp_path / "runs"
    common = ["run", *SMOKE, "--seeds", "0", "--teacher-cache", str(teacher_cache), "--results-dir", str(results)]
    abm, mad = build_run_configs(RunRequest(methods=["abm", "mad"], dataset="digits", seeds=[0], budget="smoke",
                                            teacher=TeacherOptions(cache_dir=str(teacher_cache))))
    with RunStore(results, mad.run_name).lock():  # a first launch is training MAD
        assert main([*common, "--methods", "abm,mad"]) == 2
        captured = capsys.readouterr()
    assert "2 runs: 0 already done (skipped), 1 to run" in captured.out
    assert "1 being trained by another process (not launched again)" in captured.out
    assert f"{mad.run_name}: being trained by process {os.getpid()} on {socket.gethostname()}" in captured.out
    errors = [line for line in captured.err.splitlines() if line.strip()]
    assert errors == [f"error: 1 of 2 runs are still being trained by another process ({mad.run_name} by process "
                      f"{os.getpid()} on {socket.gethostname()}), so their results are not there yet; follow them "
                      f"with `dfkd-bench status --results-dir {results}` and run the same command again once they "
                      "are done"], captured.err
    assert RunStore(results, abm.run_name).is_done()  # the other run was trained meanwhile
    # a trainer on another node of a shared file system (seen by its fresh heartbeat): same answer
    RunStore(results, mad.run_name).heartbeat_path.write_text("other-node:77\n")
    assert main([*common, "--methods", "mad"]) == 2
    assert "process 77 on other-node" in _error_line(capsys)


def test_the_end_of_run_says_where_the_records_are(digits_request, tmp_path, capsys):
    results = tmp_path / "runs"
    config = build_run_configs(digits_request(["abm"]))[0]
    launch([config], results, argparse.Namespace(no_progress=True, threads=1))
    capsys.readouterr()
    assert main(["run", "--methods", "abm", *SMOKE, "--teacher-cache", str(digits_request().teacher.cache_dir),
                 "--results-dir", str(results)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "1 already done (skipped), 0 to run" in out[0]
    assert out[-1] == (f"records of the run in {results}/ (one folder per run: config.json, records.jsonl, "
                       f"student.pt); `dfkd-bench report --results-dir {results}` draws tables and figures, "
                       f"`dfkd-bench status --results-dir {results}` lists them")


def test_a_cached_teacher_that_does_not_fit_the_image_size_is_refused_before_any_folder(teacher_cache, tmp_path):
    """The 16-pixel digits LeNet at --image-size 13: one line, and no failed run folder left behind."""
    import contextlib
    import io

    from dfkd_bench.cli import main

    results = tmp_path / "runs"
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(["run", "--methods", "abm", "--dataset", "digits", "--image-size", "13", "--budget", "smoke",
                     "--teacher-cache", str(teacher_cache), "--results-dir", str(results), "--no-progress"])
    lines = [line for line in err.getvalue().splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "image size" in lines[0]
    assert not results.exists() or not any(results.iterdir())
