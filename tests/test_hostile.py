"""What a careless or hostile user can do to a results folder, and the faults a run must survive
(issue 23): nothing lost, nothing run from a file, nothing touched outside the folders named."""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dfkd_bench.train.engine import NONDETERMINISTIC_RECORD_KEYS
from dfkd_bench.errors import DfkdError
from dfkd_bench.store import RunStore, atomic_write_bytes, run_progress

# Small digits runs with several checkpoints; the checkpoint at iteration 3 follows a samples record
# (sample_every=3, no evaluation at 3), the case that once could never resume.
SETTINGS = ["epochs=3", "steps_per_epoch=4", "eval_every=2", "checkpoint_every=3", "sample_every=3", "drift_every=4",
            "drift_tau=1", "drift_samples=16", "batch_size=16", "student_steps=2", "generator_steps=2"]


def cli(args: list[str], teacher_cache: Path, env_extra: dict | None = None, check: bool = True):
    env = {k: v for k, v in os.environ.items() if k != "DFKD_BENCH_FAULT"}
    env.update({"DFKD_BENCH_TEACHERS": str(teacher_cache), "OMP_NUM_THREADS": "1", **(env_extra or {})})
    return subprocess.run([sys.executable, "-m", "dfkd_bench.cli", *args], env=env, capture_output=True, text=True,
                          timeout=600, check=check)


def run_args(results: Path, method: str = "mad", settings: list[str] = SETTINGS) -> list[str]:
    sets = [arg for item in settings for arg in ("--set", item)]
    return ["run", "--methods", method, "--dataset", "digits", "--results-dir", str(results), "--no-progress",
            "--threads", "1", *sets]


def run_folder(results: Path) -> Path:
    (run,) = [p for p in results.iterdir() if (p / "config.json").exists()]
    return run


def outcome(results: Path) -> tuple[list[dict], dict]:
    run = run_folder(results)
    store = RunStore(results, run.name)
    assert store.is_done(), f"{run} is not done"
    records = [{k: v for k, v in r.items() if k not in NONDETERMINISTIC_RECORD_KEYS} for r in store.read_records()]
    return records, torch.load(store.student_path, weights_only=True)


def assert_same(a, b) -> None:
    assert a[0] == b[0]  # same records, nothing duplicated or missing
    assert a[1].keys() == b[1].keys()
    for key in a[1]:
        assert torch.equal(a[1][key], b[1][key]), key


def error_lines(result) -> list[str]:
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


def killed_at(results: Path, teacher_cache: Path, fault: str) -> Path:
    killed = cli(run_args(results), teacher_cache, {"DFKD_BENCH_FAULT": fault}, check=False)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    return run_folder(results)


@pytest.fixture(scope="module")
def reference_folder(teacher_cache, tmp_path_factory) -> Path:
    """The results folder of an uninterrupted run (copy it before changing anything in it)."""
    folder = tmp_path_factory.mktemp("reference")
    cli(run_args(folder), teacher_cache)
    return folder


@pytest.fixture(scope="module")
def reference(reference_folder):
    return outcome(reference_folder)


def copy_of(reference_folder: Path, tmp_path: Path, unfinished: bool = False) -> Path:
    """A copy of the reference results folder; ``unfinished``: as if it had never started training."""
    results = tmp_path / "runs"
    shutil.copytree(reference_folder, results, symlinks=True)
    if unfinished:
        run = run_folder(results)
        for name in ("done", "student.pt", "records.jsonl", "checkpoint.json"):
            (run / name).unlink(missing_ok=True)
        shutil.rmtree(run / "samples", ignore_errors=True)
        shutil.rmtree(run / "checkpoints", ignore_errors=True)
    return results


# ------------------------------------------------- 1. a run that can always resume ---

def test_resume_after_a_checkpoint_that_follows_a_samples_record(reference, teacher_cache, tmp_path):
    """The last record before the checkpoint of iteration 3 is a samples record: the resume used to
    read its test accuracy and fail with KeyError: 'test_accuracy' at every attempt."""
    run = killed_at(tmp_path, teacher_cache, "mid_stage@4")
    records = [json.loads(line) for line in (run / "records.jsonl").read_text().splitlines()]
    assert json.loads((run / "checkpoint.json").read_text())["iteration"] == 3
    assert [r["kind"] for r in records if r["step"] <= 3][-1] == "samples"
    resumed = cli(run_args(tmp_path), teacher_cache)
    assert "resumed from iteration 3" in resumed.stdout + resumed.stderr
    assert_same(outcome(tmp_path), reference)


@pytest.mark.slow
def test_sigterm_then_resume_with_samples_records(reference, teacher_cache, tmp_path):
    """SIGTERM (checkpoint saved, "run the same command again"), then the same command finishes exactly."""
    env = {**os.environ, "DFKD_BENCH_TEACHERS": str(teacher_cache), "OMP_NUM_THREADS": "1"}
    env.pop("DFKD_BENCH_FAULT", None)
    process = subprocess.Popen([sys.executable, "-m", "dfkd_bench.cli", *run_args(tmp_path)], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline:  # stop it once it has started training (its first record exists)
        if list(tmp_path.glob("*/records.jsonl")) and list(tmp_path.glob("*/records.jsonl"))[0].stat().st_size:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    if process.returncode == 0:  # finished before the signal arrived: nothing to resume, still exact
        assert_same(outcome(tmp_path), reference)
        return
    assert process.returncode == 2 and "run the same command again" in stderr.lower(), stderr[-2000:]
    cli(run_args(tmp_path), teacher_cache)
    assert_same(outcome(tmp_path), reference)


# ------------------------------------------------------ 2. nothing runs from a file ---

class _Planted:
    """Unpickling it creates a file: proof that code from the checkpoint ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_planted_pickle_in_a_run_checkpoint_is_refused_and_runs_nothing(reference_folder, teacher_cache, tmp_path):
    results = copy_of(reference_folder, tmp_path, unfinished=True)
    run = run_folder(results)
    (run / "checkpoint.json").write_text(json.dumps({"iteration": 3, "world_size": 1}))
    (run / "checkpoints").mkdir()
    shard = run / "checkpoints" / "it00000003.rank0.pt"
    marker = tmp_path / "code-ran"
    torch.save({"iteration": 3, "payload": _Planted(marker)}, shard)
    result = cli(run_args(results), teacher_cache, check=False)
    assert not marker.exists(), "code from the checkpoint ran"
    assert result.returncode == 2, result.stderr[-2000:]
    (line,) = error_lines(result)
    assert str(shard) in line and "not loaded" in line and "checkpoint.json" in line, line
    assert "weights_only=False" not in result.stderr  # torch's advice to load it anyway is not passed on
    assert not (run / "done").exists()


@pytest.mark.slow
def test_run_checkpoints_hold_only_tensors_and_plain_data(teacher_cache, tmp_path):
    """Every method's checkpoint (RNG states, optimisers, pools, memory banks) loads weights-only."""
    from dfkd_bench.method_api import list_methods

    for method in list_methods():
        results = tmp_path / method
        killed = cli(run_args(results, method, [*SETTINGS[:2], "checkpoint_every=2", "batch_size=16",
                                                "student_steps=1", "generator_steps=1", "eval_every=0"]),
                     teacher_cache, {"DFKD_BENCH_FAULT": "mid_stage@3"}, check=False)
        assert killed.returncode == -signal.SIGKILL, (method, killed.stderr[-2000:])
        (shard,) = list((run_folder(results) / "checkpoints").glob("it*.pt"))
        state = torch.load(shard, map_location="cpu", weights_only=True)
        assert state["iteration"] == 2, method


# ------------------------------------------------ 3. nothing outside the run folder ---

def test_a_symlinked_checkpoints_folder_is_refused_and_nothing_outside_is_deleted(reference_folder, teacher_cache,
                                                                                tmp_path):
    """A run whose checkpoints folder links outside --results-dir: it once deleted every it*.pt there."""
    results = copy_of(reference_folder, tmp_path, unfinished=True)
    run = run_folder(results)
    outside = tmp_path / "precious"
    outside.mkdir()
    (outside / "it00000999.rank0.pt").write_bytes(b"someone else's file")
    (outside / "it_important.pt").write_bytes(b"another")
    (run / "checkpoints").symlink_to(outside, target_is_directory=True)
    result = cli(run_args(results), teacher_cache, check=False)
    assert result.returncode == 2, result.stderr[-2000:]
    (line,) = error_lines(result)
    assert "symbolic link" in line and str(run / "checkpoints") in line, line
    assert sorted(p.name for p in outside.iterdir()) == ["it00000999.rank0.pt", "it_important.pt"]
    assert not (run / "error.txt").exists()  # refused before training: not a failed run


def test_a_symlinked_samples_folder_is_refused_and_nothing_is_written_through_it(reference_folder, teacher_cache,
                                                                                 tmp_path):
    results = copy_of(reference_folder, tmp_path, unfinished=True)
    run = run_folder(results)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (run / "samples").symlink_to(outside, target_is_directory=True)
    result = cli(run_args(results), teacher_cache, check=False)
    assert result.returncode == 2, result.stderr[-2000:]
    (line,) = error_lines(result)
    assert "symbolic link" in line and "samples" in line, line
    assert list(outside.iterdir()) == []


def test_a_symlinked_lock_file_is_not_truncated(digits_request, tmp_path):
    from dfkd_bench.cluster.experiment import build_run_configs

    config = build_run_configs(digits_request(["abm"]))[0]
    store = RunStore(tmp_path / "runs", config.run_name)
    store.path.mkdir(parents=True)
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    store.lock_path.symlink_to(victim)
    with pytest.raises(DfkdError, match="symbolic link"):
        with store.lock():
            pass
    assert victim.read_text() == "keep me"


# --------------------------------------------------------- 7. no silent wrong result ---

def test_a_torn_final_evaluation_line_marks_the_run_damaged(reference_folder, tmp_path, capsys):
    from dfkd_bench.cli import main
    from dfkd_bench.report.load import load_runs

    results = copy_of(reference_folder, tmp_path)
    run = run_folder(results)
    lines = (run / "records.jsonl").read_text().splitlines(keepends=True)
    final = max(i for i, line in enumerate(lines) if json.loads(line)["kind"] == "eval")
    (run / "records.jsonl").write_text("".join(lines[:final]) + lines[final][:len(lines[final]) // 2])
    progress = run_progress(run)
    assert progress.status == "damaged" and "torn" in progress.damage, progress
    frame = load_runs(results)
    assert frame.loc[0, "status"] == "damaged" and "torn" in frame.loc[0, "state"]
    assert main(["status", "--results-dir", str(results)]) == 0
    shown = capsys.readouterr().out
    assert "damaged" in shown and "torn" in shown


@pytest.mark.parametrize("key,value", [("seed", 7), ("method", "abm")])
def test_a_config_that_does_not_match_its_run_id_is_flagged(key, value, reference_folder, tmp_path):
    from dfkd_bench.report.load import load_runs

    results = copy_of(reference_folder, tmp_path)
    run = run_folder(results)
    config = json.loads((run / "config.json").read_text())
    assert run_progress(run).status == "done"
    config[key] = value
    (run / "config.json").write_text(json.dumps(config))
    progress = run_progress(run)
    assert progress.status == "damaged" and "does not match the run id" in progress.damage, progress
    frame = load_runs(results)
    assert frame.loc[0, "status"] == "damaged"


def test_the_committed_runs_still_match_their_run_ids():
    """Every committed run folder's config.json hashes to its run id, and its records end at the final
    evaluation (so the checks above flag no committed run)."""
    root = Path(__file__).resolve().parent.parent / "results"
    folders = [p.parent for p in root.rglob("done")]
    assert folders
    damaged = [(str(p), run_progress(p).damage) for p in folders if run_progress(p).status != "done"]
    assert damaged == []


def test_a_teacher_with_integer_weights_is_refused(teacher_cache, tmp_path):
    state = torch.load(teacher_cache / "digits-lenet5.pt", weights_only=True)
    weights = state.get("state_dict", state)
    for key, tensor in list(weights.items()):
        if tensor.is_floating_point():
            weights[key] = tensor.round().to(torch.int64)
    path = tmp_path / "int-teacher.pt"
    torch.save(weights, path)
    results = tmp_path / "runs"
    result = cli(["run", "--methods", "abm", "--dataset", "digits", "--budget", "smoke", "--no-progress",
                  "--teacher-checkpoint", str(path), "--teacher-arch", "lenet5", "--results-dir", str(results)],
                 teacher_cache, check=False)
    assert result.returncode == 2
    (line,) = error_lines(result)
    assert "int64" in line and "floating-point" in line, line
    assert not results.exists() or not any(results.iterdir())


# ------------------------------------------------------------- 8. nothing leaks ---

def test_a_kill_during_a_checkpoint_write_leaves_no_temp_file_after_the_resume(reference, teacher_cache, tmp_path):
    run = killed_at(tmp_path, teacher_cache, "checkpoint_write@6")
    temps = list(run.glob("**/.*.tmp"))
    assert temps, "the fault should leave a partial temporary checkpoint"
    cli(run_args(tmp_path), teacher_cache)
    assert list(run.glob("**/.*.tmp")) == []
    assert_same(outcome(tmp_path), reference)


def test_a_full_disk_names_the_file_and_the_free_space_and_leaves_no_partial_file(tmp_path, monkeypatch):
    target = tmp_path / "checkpoints" / "it00000004.rank0.pt"

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(DfkdError) as excinfo:
        atomic_write_bytes(target, b"x" * 100_000)
    message = str(excinfo.value)
    assert str(target) in message and "MB free" in message and "no space left" in message, message
    assert list(target.parent.iterdir()) == []


# ------------------------------------------------------------- the fault harness ---

def _kill_at_random_until_done(results: Path, teacher_cache: Path, rng: random.Random, kills: int) -> int:
    """Start the run, SIGKILL it after a random delay (any moment: a step, an evaluation, a checkpoint
    write), ``kills`` times; then let it finish. Returns how many kills hit a running process."""
    env = {**os.environ, "DFKD_BENCH_TEACHERS": str(teacher_cache), "OMP_NUM_THREADS": "1"}
    env.pop("DFKD_BENCH_FAULT", None)
    command = [sys.executable, "-m", "dfkd_bench.cli", *run_args(results)]
    hits = 0
    for _ in range(kills):
        process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(3.0, 7.0))
        if process.poll() is None:
            hits += 1
            process.kill()
        process.wait()
    cli(run_args(results), teacher_cache)
    return hits


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["checkpoint_write@9", "before_commit@9", "after_record@4", "mid_stage@7"])
def test_a_kill_at_a_nasty_moment_then_resume_is_exact(fault, reference, teacher_cache, tmp_path):
    killed_at(tmp_path, teacher_cache, fault)
    resumed = cli(run_args(tmp_path), teacher_cache)
    assert "resumed from iteration" in resumed.stdout + resumed.stderr
    assert_same(outcome(tmp_path), reference)
    assert list(tmp_path.glob("**/.*.tmp")) == []


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(4))
def test_random_sigkills_then_resume_is_exact(seed, reference, teacher_cache, tmp_path):
    _kill_at_random_until_done(tmp_path, teacher_cache, random.Random(seed), kills=3)
    assert_same(outcome(tmp_path), reference)
    assert list(tmp_path.glob("**/.*.tmp")) == []


# ------------------------------------- 4. every input error before any folder exists ---

def _one_error_line(capsys) -> str:
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    assert "Traceback" not in captured.err
    return lines[0]


@pytest.mark.parametrize("extra,expected", [
    (["--image-size", "17"], "divisible by 4"),
    (["--set", "generator=gen256"], "gen256"),
    (["--set", "batch_size=100000000"], "lower batch_size"),
    (["--methods", "dfq", "--set", "generator=gen256"], "gen256"),
])
def test_input_errors_found_before_any_run_folder_exists(extra, expected, teacher_cache, tmp_path, capsys):
    from dfkd_bench.cli import main

    results = tmp_path / "runs"
    code = main(["run", "--methods", "abm", "--dataset", "digits", "--budget", "smoke", "--no-progress",
                 "--threads", "1", "--teacher-cache", str(teacher_cache), "--results-dir", str(results), *extra])
    assert code == 2
    assert expected in _one_error_line(capsys)
    assert not results.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_without_cuda_is_refused_before_any_folder(teacher_cache, tmp_path, capsys):
    from dfkd_bench.cli import main

    results = tmp_path / "runs"
    assert main(["run", "--methods", "abm", "--budget", "smoke", "--no-progress", "--device", "cuda",
                 "--teacher-cache", str(teacher_cache), "--results-dir", str(results)]) == 2
    assert "CUDA is not available" in _one_error_line(capsys)
    assert not results.exists()


def test_a_missing_dataset_is_refused_before_any_folder(tmp_path, capsys):
    from dfkd_bench.cli import main

    teachers = Path(__file__).resolve().parent.parent / "results" / "zoo" / "teachers"
    if not (teachers / "mnist-lenet5.pt").exists():
        pytest.skip("no committed MNIST teacher")
    results = tmp_path / "runs"
    assert main(["run", "--methods", "abm", "--dataset", "mnist", "--budget", "smoke", "--no-progress",
                 "--data-root", str(tmp_path / "nowhere"), "--teacher-cache", str(teachers),
                 "--results-dir", str(results)]) == 2
    assert "mnist" in _one_error_line(capsys)
    assert not results.exists()


def test_a_teacher_std_that_makes_inputs_infinite_is_refused(teacher_cache, tmp_path, capsys):
    from dfkd_bench.cli import main

    results = tmp_path / "runs"
    assert main(["run", "--methods", "abm", "--budget", "smoke", "--no-progress", "--teacher-arch", "lenet5",
                 "--teacher-checkpoint", str(teacher_cache / "digits-lenet5.pt"), "--teacher-std", "1e-300",
                 "--results-dir", str(results)]) == 2
    assert "--teacher-std" in _one_error_line(capsys)
    assert not results.exists()


BASE_TOML = 'methods = ["abm"]\nseeds = [0]\ndataset = "digits"\nbudget = "smoke"\n[resources]\n'


@pytest.mark.parametrize("line,flag_error", [
    ('threads = "abc"', ("--threads", "abc")),
    ("threads = -5", ("--threads", "-5")),
    ("threads = 0", ("--threads", "0")),
    ("time = 0", ("--time", "0")),
    ("mem_gb = nan", ("--mem-gb", "nan")),
    ('device = "tpu"', ("--device", "tpu")),
])
def test_experiment_resources_are_checked_as_the_command_line_is(line, flag_error, tmp_path, capsys):
    """One validator: what the command line refuses, [resources] refuses too, in one line."""
    from dfkd_bench.cli import main

    path = tmp_path / "exp.toml"
    path.write_text(BASE_TOML + line + "\n")
    results = tmp_path / "runs"
    assert main(["sweep", str(path), "--results-dir", str(results), "--dry-run"]) == 2
    from_file = _one_error_line(capsys)
    key = line.split(" =")[0]
    assert f"[resources] {key} must be" in from_file or f"[resources] {key} " in from_file, from_file
    assert not results.exists()
    flag, value = flag_error
    if flag == "--threads" and value == "abc":
        return  # argparse refuses it as a type error
    assert main(["run", "--methods", "abm", "--budget", "smoke", flag, value, "--results-dir", str(results)]) == 2
    from_cli = _one_error_line(capsys)
    assert from_cli.split(flag, 1)[1].split(",")[0].split(";")[0].strip().startswith(
        from_file.split(key, 1)[1].split(",")[0].split(";")[0].strip()[:8]), (from_cli, from_file)


# --------------------------------- 5. one damaged folder does not stop status or report ---

@pytest.mark.parametrize("entry", ["records.jsonl", "lock", "error.txt", "checkpoint.json"])
def test_status_and_report_survive_a_marker_that_is_a_folder(entry, reference_folder, tmp_path, capsys):
    from dfkd_bench.cli import main

    results = copy_of(reference_folder, tmp_path)
    good = run_folder(results)
    bad = results / good.name.replace(good.name.rsplit("-", 1)[1], "0" * 12)
    shutil.copytree(good, bad)
    (bad / "done").unlink()
    (bad / entry).unlink(missing_ok=True)
    (bad / entry).mkdir()
    assert main(["status", "--results-dir", str(results)]) == 0
    out = capsys.readouterr().out
    assert good.name in out and bad.name in out
    assert main(["report", "--results-dir", str(results), "--formats", "png"]) == 0, capsys.readouterr().err


# ---------------------------------------------------------- 6. no huge work unasked ---

def test_a_huge_grid_is_counted_and_refused_before_it_is_expanded(tmp_path, capsys):
    from dfkd_bench.cli import main

    path = tmp_path / "huge.toml"
    values = ", ".join(str(0.001 * (i + 1)) for i in range(1000))
    path.write_text('methods = ["abm", "mad"]\nseeds = [0, 1]\ndataset = "digits"\n[grid]\nalpha = [' + values
                    + "]\nlr_S = [" + values + "]\n")
    started = time.time()
    assert main(["sweep", str(path), "--dry-run"]) == 2
    line = _one_error_line(capsys)
    assert "4,000,000 runs" in line and "--yes" in line, line
    assert time.time() - started < 10


def test_twenty_thousand_seeds_need_yes(tmp_path, capsys):
    from dfkd_bench.cli import main

    results = tmp_path / "runs"
    seeds = ",".join(str(i) for i in range(20_000))
    assert main(["run", "--methods", "abm", "--seeds", seeds, "--results-dir", str(results)]) == 2
    assert "20,000 runs" in _one_error_line(capsys)
    assert not results.exists()


# ------------------------------------------------------------------- 9. messages ---

def test_an_empty_results_dir_is_refused(tmp_path, capsys, monkeypatch):
    from dfkd_bench.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["run", "--methods", "abm", "--results-dir", ""]) == 2
    assert "--results-dir is empty" in _one_error_line(capsys)
    assert main(["report", "--results-dir", ""]) == 2
    assert "--results-dir is empty" in _one_error_line(capsys)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kind", ["folder", "fifo", "device"])
def test_a_teacher_path_that_is_not_a_file_says_what_it_is(kind, tmp_path, capsys):
    from dfkd_bench.cli import main

    if kind == "folder":
        path = tmp_path / "weights"
        path.mkdir()
        expected = "is a folder"
    elif kind == "fifo":
        path = tmp_path / "pipe"
        os.mkfifo(path)
        expected = "not a regular file"
    else:
        path = Path("/dev/zero")
        expected = "not a regular file"
    assert main(["run", "--methods", "abm", "--budget", "smoke", "--teacher-arch", "lenet5",
                 "--teacher-checkpoint", str(path), "--results-dir", str(tmp_path / "runs")]) == 2
    line = _one_error_line(capsys)
    assert expected in line and "does not exist" not in line, line


def test_non_ascii_seeds_are_refused_as_set_values_are(capsys):
    from dfkd_bench.cli import main

    with pytest.raises(SystemExit) as excinfo:  # an argparse usage error
        main(["run", "--methods", "abm", "--seeds", "\u0663"])
    assert excinfo.value.code == 2
    assert "comma-separated integers" in _one_error_line(capsys)


@pytest.mark.parametrize("content", ["[]", "null", '{"iteration": "x"}', "{}"])
def test_a_damaged_checkpoint_pointer_is_one_line(content, tmp_path):
    from dfkd_bench.errors import CheckpointError

    store = RunStore(tmp_path, "abm-digits-lenet5_half-s0-000000000000")
    store.path.mkdir()
    store.pointer_path.write_text(content)
    with pytest.raises(CheckpointError, match="is damaged") as excinfo:
        store.load_checkpoint()
    assert "\n" not in str(excinfo.value) and "TypeError" not in str(excinfo.value)


# ---------------------------------------- 10. absurd values, files from someone else (issue 31) ---

def _longest_run(text: str) -> int:
    """The longest run of one repeated character in ``text`` (a quoted bad value shows as one)."""
    best = run = 0
    for previous, current in zip(" " + text, text):
        run = run + 1 if current == previous else 1
        best = max(best, run)
    return best


def _short_error_line(capsys, call) -> str:
    """The one ``error:`` line of ``call()`` (a command returning 2, or an argparse exit), at most a few
    hundred characters, quoting at most ~80 characters of any bad value."""
    try:
        code = call()
    except SystemExit as exit_:
        code = exit_.code
    assert code == 2
    line = _one_error_line(capsys)
    assert len(line) < 500 and _longest_run(line) <= 80, (len(line), line[:300])
    return line


@pytest.mark.parametrize("values,expected", [
    (["--set", "n_S=1000000000"], "student_steps=1,000,000,000 (student steps per iteration, n_S"),
    (["--set", "alpha=" + "9" * 5000], "alpha: '999"),
    (["--set", "n_S=" + "9" * 30], "n_S: 999999999999999999999999999999 is out of range"),
    (["--set", "generator=" + "x" * 100_000], "generator='xxx"),
    (["--set", "x" * 100_000 + "=1"], "unknown setting 'xxx"),
    (["--set", "lr_milestones=" + "1," * 50_000 + "x"], "lr_milestones expects comma-separated integers"),
    (["--set", "alpha=" + "[" * 100_000], "alpha: '[[["),
    (["--seeds", "9" * 5000], "--seeds: expected comma-separated integers"),
], ids=["n_S", "alpha-5000-digits", "n_S-30-digits", "generator-100k", "key-100k", "milestones-50k", "nested",
        "seeds-5000-digits"])
def test_absurd_values_are_one_short_line_before_any_folder(values, expected, teacher_cache, tmp_path, capsys):
    from dfkd_bench.cli import main

    results = tmp_path / "runs"
    line = _short_error_line(capsys, lambda: main(["run", "--methods", "mad", "--dataset", "digits", "--budget",
                                                   "smoke", "--no-progress", "--teacher-cache", str(teacher_cache),
                                                   "--results-dir", str(results), *values]))
    assert expected in line, line
    assert not results.exists()


def test_work_beyond_the_papers_needs_yes_and_passes_with_it(teacher_cache, tmp_path, capsys):
    from dfkd_bench.cli import main

    path = tmp_path / "long.toml"
    path.write_text('methods = ["deepinv"]\nseeds = [0]\ndataset = "digits"\n[set]\nsynthesis_steps = 30000\n'
                    'n_G = 4000\n')
    sweep = ["sweep", str(path), "--dry-run", "--teacher-cache", str(teacher_cache), "--results-dir",
             str(tmp_path / "runs")]
    line = _short_error_line(capsys, lambda: main(sweep))
    assert line.startswith("error: synthesis_steps=30,000 (synthesis steps per batch, deepinv) is far beyond what "
                           "any paper uses (at most 2,000: DeepInversion's 2,000 Adam steps per batch); runs with "
                           "more than 20,000 are refused"), line
    assert "pass --yes if you mean it" in line
    assert main([*sweep, "--yes"]) == 0
    assert "1 runs" in capsys.readouterr().out


def test_the_work_limits_are_ten_times_the_largest_values_the_papers_use():
    """WORK_LIMITS name the largest value among the presets, the methods' defaults and their paper protocols;
    a protocol with a larger one fails here, so that its limit is raised with it."""
    import dataclasses

    from dfkd_bench.cluster.launch import WORK_LIMIT_FACTOR, WORK_LIMITS
    from dfkd_bench.config import TrainConfig
    from dfkd_bench.method_api import list_methods
    from dfkd_bench.presets import PRESETS

    seen: dict[str, list[int]] = {name: [] for name in WORK_LIMITS}

    def add(values: dict) -> None:
        for name in WORK_LIMITS:
            if isinstance(values.get(name), int) and not isinstance(values.get(name), bool):
                seen[name].append(values[name])

    add(dataclasses.asdict(TrainConfig()))
    for preset in PRESETS.values():
        add(dataclasses.asdict(preset.train_config(preset.teacher_arch, preset.student_arch)))
        for pair in preset.pair_overrides:
            add(dataclasses.asdict(preset.train_config(*pair)))
        add(preset.params)
    for method in list_methods().values():
        add(dataclasses.asdict(method.Params()))
        for values in method.preset_params.values():
            add(values)
        for protocol in method.paper_protocols.values():
            add(protocol.train)
            add(protocol.params)
            # the equal-images control's 2 x bs at the protocol's batch
            seen["student_images_per_step"].append(2 * protocol.train.get("batch_size", 0))
    assert {name: max(values) for name, values in seen.items()} == {name: paper for name, (paper, _, _) in
                                                                   WORK_LIMITS.items()}
    assert WORK_LIMIT_FACTOR == 10


@pytest.mark.parametrize("body,expected", [
    ("[set]\nalpha = " + "9" * 5000 + "\n", "a number of thousands of digits"),
    ("[set]\nalpha = " + "9" * 30 + "\n", "out of range"),
    ('[set]\ngenerator = "' + "x" * 100_000 + '"\n', "generator='xxx"),
    ("[set]\nlr_milestones = " + "[" * 5000 + "]" * 5000 + "\n", "nested"),
], ids=["5000-digits", "30-digits", "100k-characters", "nested"])
def test_absurd_experiment_file_values_are_one_short_line(body, expected, teacher_cache, tmp_path, capsys):
    from dfkd_bench.cli import main

    path = tmp_path / "absurd.toml"
    path.write_text('methods = ["mad"]\nseeds = [0]\ndataset = "digits"\nbudget = "smoke"\n' + body)
    results = tmp_path / "runs"
    line = _short_error_line(capsys, lambda: main(["sweep", str(path), "--dry-run", "--teacher-cache",
                                                   str(teacher_cache), "--results-dir", str(results)]))
    assert expected in line, line
    assert not results.exists()


@pytest.mark.parametrize("results_dir,why", [
    ("/etc/dfkd-x", "an absolute path"),
    ("../../../../elsewhere", "'..' leads out of it"),
    ("inside/../../out", "'..' leads out of it"),
    ("~/dfkd-x", "a path in a home folder"),
    ("link/runs", "a symbolic link on the way leads to"),
])
def test_an_experiment_file_may_only_name_a_results_folder_inside_the_current_folder(results_dir, why, tmp_path,
                                                                                      capsys, monkeypatch):
    from dfkd_bench.cli import main

    here = tmp_path / "here"
    here.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (here / "link").symlink_to(outside, target_is_directory=True)
    monkeypatch.chdir(here)
    (here / "exp.toml").write_text(f'methods = ["abm"]\nseeds = [0]\ndataset = "digits"\nbudget = "smoke"\n'
                                   f'results_dir = "{results_dir}"\n')
    line = _short_error_line(capsys, lambda: main(["sweep", "exp.toml", "--dry-run"]))
    assert line.startswith(f"error: exp.toml: results_dir = '{results_dir}' is not a folder inside the current "
                           f"folder ({why}") and "--results-dir" in line, line
    assert main(["sweep", "exp.toml", "--launcher", "inline", "--no-progress"]) == 2  # not only in a dry run
    capsys.readouterr()
    assert sorted(p.name for p in here.iterdir()) == ["exp.toml", "link"] and list(outside.iterdir()) == []
    # the command line's --results-dir is the user's own choice: the file's value is then not used
    assert main(["sweep", "exp.toml", "--dry-run", "--results-dir", str(outside / "mine")]) == 0
    assert f"results: {outside / 'mine'}" in capsys.readouterr().out


# --------------------------------------------- 11. more of the fault harness (issue 31) ---

def _teacher_variants(teacher_cache: Path, folder: Path) -> dict[str, Path]:
    """Hostile teacher files made from the session's digits teacher."""
    import struct

    state = torch.load(teacher_cache / "digits-lenet5.pt", weights_only=True)["state_dict"]
    files = {}

    def save(name, weights):
        files[name] = folder / f"{name}.pt"
        torch.save(weights, files[name])

    save("float64", {k: v.double() for k, v in state.items()})
    save("float16", {k: v.half() for k, v in state.items()})
    save("bool", {k: v.bool() for k, v in state.items()})
    save("complex", {k: v.to(torch.complex64) for k, v in state.items()})
    nan = {k: v.clone() for k, v in state.items()}
    next(iter(nan.values())).view(-1)[0] = float("nan")
    save("nan", nan)
    save("scalars", {k: torch.tensor(1.0) for k in state})
    raw = (teacher_cache / "digits-lenet5.pt").read_bytes()
    files["truncated"] = folder / "truncated.pt"
    files["truncated"].write_bytes(raw[:len(raw) // 2])
    # a tensor header claiming 2^40 elements over a 16-byte record (torch would try to read 4 TB)
    files["absurd_header"] = folder / "absurd_header.pt"
    _absurd_pt(files["absurd_header"])
    header = json.dumps({"conv1.weight": {"dtype": "F32", "shape": [2**40, 1], "data_offsets": [0, 16]}}).encode()
    files["absurd_safetensors"] = folder / "absurd.safetensors"
    files["absurd_safetensors"].write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 16)
    files["absurd_safetensors_length"] = folder / "absurd_length.safetensors"
    files["absurd_safetensors_length"].write_bytes(struct.pack("<Q", 2**62) + b"{}")
    return files


def _absurd_pt(path: Path) -> None:
    """A torch zip file whose one tensor claims 2^40 float32 elements stored in a 16-byte record."""
    import collections
    import io
    import pickle

    storage = object()

    class Tensor_:
        def __reduce__(self):
            return (torch._utils._rebuild_tensor_v2, (storage, 0, (2**40,), (1,), False, collections.OrderedDict()))

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            return ("storage", torch.FloatStorage, "0", "cpu", 2**40) if obj is storage else None

    buffer = io.BytesIO()
    Pickler(buffer, protocol=2).dump({"conv1.weight": Tensor_()})
    writer = torch._C.PyTorchFileWriter(str(path))
    for name, data in (("data.pkl", buffer.getvalue()), ("byteorder", b"little"), ("data/0", b"\0" * 16),
                       ("version", b"3\n")):
        writer.write_record(name, data, len(data))
    writer.write_end_of_file()


@pytest.mark.parametrize("variant,expected", [
    ("bool", "holds bool values"),
    ("complex", "holds complex64 values"),
    ("nan", "non-finite weights"),
    ("scalars", "has shape ()"),
    ("truncated", "not a readable PyTorch checkpoint"),
    ("absurd_header", "not a readable PyTorch checkpoint"),
    ("absurd_safetensors", "not a readable safetensors file"),
    ("absurd_safetensors_length", "not a readable safetensors file"),
])
def test_a_hostile_teacher_file_is_one_line_before_any_folder(variant, expected, teacher_cache, tmp_path, capsys):
    from dfkd_bench.cli import main

    path = _teacher_variants(teacher_cache, tmp_path)[variant]
    results = tmp_path / "runs"
    line = _short_error_line(capsys, lambda: main(["run", "--methods", "abm", "--budget", "smoke", "--no-progress",
                                                   "--teacher-checkpoint", str(path), "--teacher-arch", "lenet5",
                                                   "--results-dir", str(results)]))
    assert expected in line and str(path) in line, line
    assert not results.exists()


@pytest.mark.parametrize("variant", ["float64", "float16"])
def test_a_teacher_in_another_floating_point_type_is_read_as_float32(variant, teacher_cache, tmp_path):
    """Other floating-point types are weights all the same: converted to float32 on loading (float16 rounds
    them), the file's own hash naming the teacher."""
    from dfkd_bench.cluster.experiment import RunRequest, TeacherOptions, build_run_configs
    from dfkd_bench.teachers.loading import build_teacher

    path = _teacher_variants(teacher_cache, tmp_path)[variant]
    (config,) = build_run_configs(RunRequest(methods=["abm"], dataset="digits", seeds=[0], budget="smoke",
                                             teacher_arch="lenet5", teacher=TeacherOptions(checkpoint=str(path))))
    teacher = build_teacher(config.teacher, 10, 1, 16, torch.device("cpu"))
    stored = torch.load(path, weights_only=True)
    for name, value in teacher.model.state_dict().items():
        assert value.dtype == torch.float32 and torch.equal(value, stored[name].float()), name


_INJECTED = {
    "huge": (b'{"kind": "eval", "step": 2, "pad": "' + b"a" * 3_000_000 + b'"}', "MB long"),
    "not-utf8": (b'{"kind": "eval", "step": 2, "note": "\xff\xfe"}', "not valid UTF-8"),
    "duplicate": (b'{"kind": "eval", "step": 2, "test_accuracy": 99.9, "run": "x"}', "second evaluation at step 2"),
    "negative": (b'{"kind": "eval", "step": -5, "test_accuracy": 99.9}', "not an iteration"),
    "backwards": (b'{"kind": "eval", "step": 1, "test_accuracy": 99.9}', "goes back from step 2 to step 1"),
    "not-a-record": (b"[1, 2, 3]", "not a record"),
}


def _inject(records: Path, line: bytes) -> int:
    """Insert ``line`` after the evaluation at step 2; returns its line number."""
    lines = records.read_bytes().splitlines(keepends=True)
    at = next(i for i, raw in enumerate(lines) if b'"kind": "eval"' in raw and b'"step": 2,' in raw) + 1
    records.write_bytes(b"".join(lines[:at]) + line + b"\n" + b"".join(lines[at:]))
    return at + 1


@pytest.mark.parametrize("kind", list(_INJECTED))
def test_an_injected_record_line_marks_a_run_damaged_in_status_and_report(kind, reference_folder, tmp_path, capsys):
    from dfkd_bench.cli import main
    from dfkd_bench.report.load import load_runs

    results = copy_of(reference_folder, tmp_path)
    run = run_folder(results)
    line, reason = _INJECTED[kind]
    number = _inject(run / "records.jsonl", line)
    progress = run_progress(run)
    assert progress.status == "damaged" and f"line {number}" in progress.damage and reason in progress.damage, \
        progress.damage
    assert main(["status", "--results-dir", str(results)]) == 0
    shown = capsys.readouterr().out
    assert "damaged" in shown and reason in shown
    frame = load_runs(results)
    assert frame.loc[0, "status"] == "damaged" and reason in frame.loc[0, "state"]
    assert main(["report", "--results-dir", str(results), "--out", str(tmp_path / "report"), "--formats",
                 "png"]) == 0, capsys.readouterr().err


def test_injected_record_lines_are_gone_after_the_resume_which_is_exact(reference, digits_request, tmp_path,
                                                                        monkeypatch):
    """An unfinished run with every kind of injected line in its records: status calls it damaged; the same
    command resumes from the checkpoint, whose records it writes back, and ends exactly as the reference."""
    from test_stop import train

    (config,) = build_configs(digits_request)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the reference ran with --threads 1
    try:
        monkeypatch.setenv("DFKD_BENCH_SIGNAL", "student:5:1")
        with pytest.raises(Exception, match="checkpoint saved there"):
            train(config, tmp_path)
        run = tmp_path / config.run_name
        for line, _ in _INJECTED.values():
            _inject(run / "records.jsonl", line)
        assert run_progress(run).status == "damaged"
        monkeypatch.delenv("DFKD_BENCH_SIGNAL")
        train(config, tmp_path)
    finally:
        torch.set_num_threads(threads)
    assert_same(outcome(tmp_path), reference)


def build_configs(digits_request) -> list:
    """The configuration of :func:`run_args`'s runs, built in this process."""
    from dfkd_bench.cluster.experiment import build_run_configs
    from dfkd_bench.config import parse_overrides

    return build_run_configs(digits_request(["mad"], overrides=parse_overrides(SETTINGS), budget="default"))


def test_two_processes_launching_the_same_run_at_once_train_it_once(reference, teacher_cache, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "DFKD_BENCH_FAULT"}
    env.update({"DFKD_BENCH_TEACHERS": str(teacher_cache), "OMP_NUM_THREADS": "1"})
    command = [sys.executable, "-m", "dfkd_bench.cli", *run_args(tmp_path)]
    processes = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for _ in range(2)]
    outputs = [process.communicate(timeout=600) for process in processes]
    codes = sorted(process.returncode for process in processes)
    assert codes in ([0, 0], [0, 2]), outputs
    if codes == [0, 2]:  # the loser says who trains it and how to follow; it trained nothing itself
        (err,) = [err for process, (_, err) in zip(processes, outputs) if process.returncode == 2]
        (line,) = [line for line in err.splitlines() if line.startswith("error:")]
        # seen when planning ("still being trained by another process"), or when taking the run's lock
        assert "being trained by" in line, err
    assert_same(outcome(tmp_path), reference)  # one training, records neither duplicated nor interleaved


def test_a_report_sigkilled_at_any_moment_leaves_the_runs_alone_and_the_next_one_is_whole(reference_folder,
                                                                                          tmp_path, monkeypatch):
    from dfkd_bench.cli import main

    results = copy_of(reference_folder, tmp_path)
    before = {p: p.read_bytes() for p in results.rglob("*") if p.is_file()}
    monkeypatch.setenv("MPLCONFIGDIR", str(tmp_path / "mpl"))
    report = ["report", "--results-dir", str(results), "--formats", "png", "--out"]
    assert main([*report, str(tmp_path / "whole")]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for delay in (2.0, 4.0):  # while importing, reading or writing figures and tables: whatever it is doing
        process = subprocess.Popen([sys.executable, "-m", "dfkd_bench.cli", *report, str(tmp_path / "killed")],
                                   env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        process.kill()
        process.wait()
    assert {p: p.read_bytes() for p in results.rglob("*") if p.is_file()} == before  # a report only reads
    assert main([*report, str(tmp_path / "killed")]) == 0
    tables = sorted(p.name for p in (tmp_path / "whole").glob("*.md"))
    assert tables and tables == sorted(p.name for p in (tmp_path / "killed").glob("*.md"))
    for name in tables:
        if name != "report.md":  # it names its output folder
            assert (tmp_path / "killed" / name).read_text() == (tmp_path / "whole" / name).read_text(), name


def _stopped_run(digits_request, folder: Path, monkeypatch):
    """The configuration of :func:`run_args`, stopped (SIGTERM) in the middle of iteration 6 with a checkpoint."""
    from test_stop import train

    (config,) = build_configs(digits_request)
    monkeypatch.setenv("DFKD_BENCH_SIGNAL", "student:5:1")
    with pytest.raises(Exception, match="checkpoint saved there"):
        train(config, folder)
    monkeypatch.delenv("DFKD_BENCH_SIGNAL")
    store = RunStore(folder, config.run_name)
    (shard,) = store.checkpoint_dir.glob("it*.pt")
    return config, store, shard


OLD_CODE = {"version": "0.0.1", "commit": "0123456789abcdef0123456789abcdef01234567"}


def test_a_resume_under_other_code_continues_and_says_so(digits_request, tmp_path, monkeypatch, capsys):
    """CHOSEN (engine.Trainer.check_code_version): a checkpoint written by other code is continued, with a note
    and config.json's code_history saying from which iteration on which code ran (a requeued SLURM job may
    find an updated checkout; refusing would strand a whole sweep)."""
    from dfkd_bench.train.engine import code_version
    from test_stop import train

    config, store, shard = _stopped_run(digits_request, tmp_path, monkeypatch)
    state = torch.load(shard, weights_only=True)
    assert state["code"] == code_version() and state["code_history"] == [{"from_iteration": 0, **code_version()}]
    state["code"], state["code_history"] = OLD_CODE, [{"from_iteration": 0, **OLD_CODE}]
    torch.save(state, shard)
    capsys.readouterr()
    train(config, tmp_path)
    shown = capsys.readouterr().out
    note = (f"resumed at iteration 5 under other code than the checkpoint's: it was written by dfkd-bench 0.0.1 "
            f"(commit {OLD_CODE['commit']}), this is {code_version()['version']} (commit {code_version()['commit']})")
    assert note in shown
    written = json.loads(store.config_path.read_text())
    assert written["code_history"] == [{"from_iteration": 0, **OLD_CODE}, {"from_iteration": 5, **code_version()}]
    assert any(n.startswith(note) for n in written["notes"]) and store.is_done()


def test_a_checkpoint_this_code_cannot_restore_is_one_line_naming_both_versions(digits_request, teacher_cache,
                                                                               tmp_path, monkeypatch, capsys):
    from dfkd_bench.cli import main
    from dfkd_bench.train.engine import code_version

    config, store, shard = _stopped_run(digits_request, tmp_path, monkeypatch)
    state = torch.load(shard, weights_only=True)
    state["code"] = OLD_CODE
    del state["method"]["generator_optimizer"]  # a state layout this code does not know
    torch.save(state, shard)
    monkeypatch.setenv("DFKD_BENCH_TEACHERS", str(teacher_cache))
    capsys.readouterr()
    assert main(run_args(tmp_path)) == 2
    line = _one_error_line(capsys)  # (three paths long)
    assert (f"(written by dfkd-bench 0.0.1, commit {OLD_CODE['commit']}) cannot be restored by this version "
            f"({code_version()['version']}, commit {code_version()['commit']})") in line, line
    assert str(store.pointer_path) in line and "restart it from scratch" in line
    assert not store.is_done()
