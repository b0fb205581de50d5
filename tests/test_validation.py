"""Every numeric and path argument is validated at the CLI/config boundary (issue 15).

A bad value is one ``error: ...`` line on stderr with exit status 2, before anything runs
or is written: no traceback, no silently meaningless run, no teacher trained for nothing.
The explicit tests hold each input of the issue; the property-based tests at the end throw
random junk at every option and setting of ``run``, ``teacher train``, ``teacher eval``,
``status``, ``report`` and ``sweep``.
"""

from __future__ import annotations

import dataclasses
import io
import os
import string
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis.configuration import set_hypothesis_home_dir
from hypothesis import strategies as st
from PIL import Image

from dfkd_bench.cli import main
from dfkd_bench.config import TrainConfig, coerce, parse_overrides
from dfkd_bench.errors import CheckpointError, ConfigError, DataError, DfkdError, user_message
from dfkd_bench.method_api import get_method

# Hypothesis keeps caches in ./.hypothesis by default: not in the checkout.
set_hypothesis_home_dir(tempfile.mkdtemp(prefix="dfkd-bench-hypothesis-"))

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


# --------------------------------------------------------------------------- #
# helpers
# --------------------------------------------------------------------------- #

@pytest.fixture()
def sandbox(tmp_path, monkeypatch, teacher_cache):
    """cwd, HOME, caches and data roots inside tmp_path; the session's digits teacher as the cache."""
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    home.mkdir()
    cwd.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("DFKD_BENCH_TEACHERS", str(teacher_cache))
    monkeypatch.delenv("DFKD_BENCH_DATA", raising=False)
    # matplotlib's font cache, written on its first import, is the library's, not the CLI's.
    monkeypatch.setenv("MPLCONFIGDIR", str(tmp_path / LIBRARY_CACHE))
    monkeypatch.chdir(cwd)
    return tmp_path


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    """``dfkd-bench ARGV`` in this process: (exit status, stdout, stderr)."""
    capsys.readouterr()
    try:
        code = main(list(argv))
    except SystemExit as exit_:  # argparse
        code = exit_.code if isinstance(exit_.code, int) else 1
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_error_line(code: int, out: str, err: str, *fragments: str) -> str:
    assert code == 2, f"exit status {code}; stderr: {err!r}"
    assert "Traceback" not in err and "Traceback" not in out
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one error line, got {lines!r}"
    assert lines[0].startswith("error: "), lines
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"
    # No exception class name in a user message (e.g. "ConfigError: unknown model").
    assert not any(word.endswith(("Error:", "Exception:")) for word in lines[0].split()), lines[0]
    return lines[0]


LIBRARY_CACHE = "library-cache"


def files_under(*folders: Path) -> set[str]:
    found = set()
    for folder in folders:
        for root, dirs, files in os.walk(folder):
            dirs[:] = [d for d in dirs if d != LIBRARY_CACHE]
            found.update(os.path.join(root, name) for name in dirs + files)
    return found


def cached_teacher(teacher_cache: Path) -> Path:
    return teacher_cache / "digits-lenet5.pt"


def write_cifar_tree(base: Path, broken: str | None = None) -> Path:
    """A one-image-per-class CIFAR-10 ImageFolder tree; ``broken`` ('train' or 'test') gets a truncated PNG."""
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for name in CIFAR10_CLASSES:
            folder = base / "cifar10" / split / name
            folder.mkdir(parents=True)
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / "0.png")
    if broken:
        bad = base / "cifar10" / broken / "cat" / "0.png"
        data = bad.read_bytes()
        bad.write_bytes(data[: len(data) // 2])
        return bad
    return base


def lenet_rgb_checkpoint(path: Path, scale: float = 1.0) -> Path:
    from dfkd_bench.models import build_model

    torch.manual_seed(0)
    model = build_model("lenet5", num_classes=10, in_channels=3, image_size=32)
    state = {k: v * scale if v.is_floating_point() else v for k, v in model.state_dict().items()}
    torch.save(state, path)
    return path


def nan_copy_of(teacher: Path, path: Path) -> Path:
    state = torch.load(teacher, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state)
    torch.save({k: torch.full_like(v, float("nan")) if v.is_floating_point() else v for k, v in state.items()}, path)
    return path


RUN = ("run", "--methods", "abm", "--budget", "smoke", "--no-progress")


# --------------------------------------------------------------------------- #
# the table and lists, one input each
# --------------------------------------------------------------------------- #

@pytest.mark.parametrize("args, fragments", [
    (("--seeds", "-1"), ("--seeds", "-1", "0 to 4294967295")),
    (("--seeds", str(10**23)), ("--seeds", "out of range")),
    (("--seeds", "0,x"), ("--seeds", "comma-separated integers")),
    (("--seeds", "1,"), ("--seeds", "comma-separated integers")),  # found by the property test: was seeds [1]
    (("--seeds", "0,,2"), ("--seeds", "comma-separated integers")),
    (("--set", "lr_S=1e309"), ("student_lr", "finite")),
    (("--set", "lr_S=NaN"), ("student_lr", "finite")),
    (("--set", "lr_S=-Infinity"), ("student_lr", "finite")),
    (("--set", "lr_S=-0.1"), ("student_lr", ">= 0")),
    (("--set", "lr_G=-1e-3"), ("generator_lr", ">= 0")),
    (("--set", "mo_S=5"), ("student_momentum", "mo_S", "[0, 1)")),
    (("--set", "ld=-1"), ("lr_decay", "ld")),
    (("--set", "delta=-5"), ("logit_bound", "delta", "> 0")),
    (("--set", "nu=0"), ("pixel_logit_bound", "nu")),
    (("--set", "ldep=abc"), ("lr_milestones", "integers like 100,200", "'abc'")),
    (("--set", "ldep=10,x"), ("lr_milestones",)),
    (("--set", "n_S=3", "--set", "n_S=4"), ("student_steps", "twice")),
    (("--set", "n_S=3", "--set", "student_steps=4"), ("student_steps", "twice", "n_S")),
    (("--set", "ep=1e30"), ("iterations",)),
    (("--set", "student_optimizer=[1]"), ("student_optimizer",)),
    (("--set", "memory_size=0"), ()),  # not a setting of abm: refused as unknown
    (("--image-size", "0"), ("--image-size", "got 0")),
    (("--image-size", "-4"), ("--image-size",)),
    (("--device", "banana"), ("--device", "banana", "cpu")),
    (("--device", "cuda:-3"), ("--device",)),
    (("--threads", "0"), ("--threads",)),
    (("--workers", "-1"), ("--workers",)),
    (("--teacher-mean", "0.5"), ("--teacher-mean", "--teacher-checkpoint")),
    (("--teacher-std", "nan,1,1"), ("--teacher-std",)),
    (("--student-arch", "nosuch"), ("unknown model 'nosuch'", "dfkd-bench list")),
    (("--teacher-arch", "nosuch"), ("unknown model 'nosuch'",)),
])
def test_run_refuses_bad_values_in_one_line_before_any_run_folder(sandbox, capsys, args, fragments):
    results = sandbox / "results"
    code, out, err = run_cli(capsys, *RUN, "--results-dir", str(results), *args)
    assert_one_error_line(code, out, err, *fragments)
    assert not results.exists(), "an input error must not leave run folders behind"


def test_unknown_student_arch_message_has_no_class_name(sandbox, capsys):
    code, out, err = run_cli(capsys, *RUN, "--results-dir", str(sandbox / "r"), "--student-arch", "nosuch")
    line = assert_one_error_line(code, out, err)
    assert "ConfigError" not in line and "Error:" not in line


@pytest.mark.parametrize("args, fragments", [
    (("--teacher-mean", "0.5,0.5"), ("--teacher-mean", "2 values given", "1 channel")),
    (("--teacher-std", "0"), ("--teacher-std", "std must be > 0")),
    (("--teacher-std", "-0.3"), ("--teacher-std", "std must be > 0")),
    (("--teacher-std", "nan"), ("--teacher-std", "not a finite number")),
    (("--teacher-std", "inf"), ("--teacher-std", "not a finite number")),
    (("--teacher-mean", "abc"), ("--teacher-mean", "comma-separated numbers")),
])
def test_teacher_eval_normalisation_is_checked_against_the_dataset(sandbox, capsys, teacher_cache, args, fragments):
    code, out, err = run_cli(capsys, "teacher", "eval", "--dataset", "digits", "--no-progress",
                             "--teacher-arch", "lenet5", "--teacher-checkpoint", str(cached_teacher(teacher_cache)),
                             *args)
    assert_one_error_line(code, out, err, *fragments)


def test_teacher_eval_accepts_matching_normalisation(sandbox, capsys, teacher_cache):
    code, out, err = run_cli(capsys, "teacher", "eval", "--dataset", "digits", "--no-progress", "--device", "cpu",
                             "--teacher-arch", "lenet5", "--teacher-checkpoint", str(cached_teacher(teacher_cache)),
                             "--teacher-mean", "0.3", "--teacher-std", "0.4")
    assert code == 0, err
    assert "accuracy" in out


def test_teacher_normalisation_without_a_checkpoint_is_refused(sandbox, capsys):
    code, out, err = run_cli(capsys, "teacher", "eval", "--dataset", "digits", "--teacher-std", "0.3")
    assert_one_error_line(code, out, err, "--teacher-std", "--teacher-checkpoint")


def test_rgb_normalisation_count_on_cifar(sandbox, capsys, tmp_path):
    checkpoint = lenet_rgb_checkpoint(tmp_path / "t.pt")
    code, out, err = run_cli(capsys, "teacher", "eval", "--dataset", "cifar10", "--teacher-arch", "lenet5",
                             "--teacher-checkpoint", str(checkpoint), "--teacher-std", "0.2,0.2")
    assert_one_error_line(code, out, err, "2 values given", "has 3 channels")


def test_nan_teacher_checkpoint_is_refused_at_load(sandbox, capsys, teacher_cache, tmp_path):
    bad = nan_copy_of(cached_teacher(teacher_cache), tmp_path / "nan.pt")
    code, out, err = run_cli(capsys, "teacher", "eval", "--dataset", "digits", "--teacher-arch", "lenet5",
                             "--teacher-checkpoint", str(bad))
    assert_one_error_line(code, out, err, str(bad), "non-finite weights")
    results = tmp_path / "results"
    code, out, err = run_cli(capsys, *RUN, "--results-dir", str(results), "--teacher-arch", "lenet5",
                             "--teacher-checkpoint", str(bad))
    assert_one_error_line(code, out, err, "non-finite weights")
    assert not results.exists()


def test_inf_in_one_tensor_is_enough_to_refuse(tmp_path):
    from dfkd_bench.cluster.experiment import check_teacher_weights

    path = lenet_rgb_checkpoint(tmp_path / "ok.pt")
    check_teacher_weights(path)  # finite: accepted
    state = torch.load(path, weights_only=True)
    key = sorted(state)[-1]
    state[key] = state[key].clone()
    state[key].view(-1)[0] = float("inf")
    torch.save(state, tmp_path / "inf.pt")
    with pytest.raises(CheckpointError, match="1 NaN/inf values"):
        check_teacher_weights(tmp_path / "inf.pt")


@pytest.mark.parametrize("args, fragments", [
    (("--epochs", "0"), ("--epochs", "got 0")),
    (("--epochs", "-3"), ("--epochs", "got -3")),
    (("--batch-size", "0"), ("--batch-size",)),
    (("--lr", "-1"), ("--lr", "> 0")),
    (("--lr", "nan"), ("--lr",)),
    (("--lr", "inf"), ("--lr",)),
    (("--seed", "-1"), ("--seed",)),
    (("--seed", str(10**23)), ("--seed",)),
    (("--device", "banana"), ("--device", "banana")),
    (("--workers", "-2"), ("--workers",)),
])
def test_teacher_train_refuses_bad_values_before_training(sandbox, capsys, monkeypatch, args, fragments):
    import dfkd_bench.teachers.training

    monkeypatch.setattr(dfkd_bench.teachers.training, "train_teacher", lambda *a, **k: pytest.fail("training started"))
    cache = sandbox / "cache"
    code, out, err = run_cli(capsys, "teacher", "train", "--dataset", "digits", "--arch", "lenet5",
                             "--teacher-cache", str(cache), *args)
    assert_one_error_line(code, out, err, *fragments)
    assert not cache.exists()


def test_teacher_train_with_an_unwritable_cache_fails_before_training(sandbox, capsys, monkeypatch):
    import dfkd_bench.teachers.training

    monkeypatch.setattr(dfkd_bench.teachers.training, "train_teacher", lambda *a, **k: pytest.fail("training started"))
    blocker = sandbox / "a-file"
    blocker.write_text("not a folder")
    code, out, err = run_cli(capsys, "teacher", "train", "--dataset", "digits", "--arch", "lenet5",
                             "--teacher-cache", str(blocker / "teachers"))
    assert_one_error_line(code, out, err, "teacher cache", str(blocker / "teachers"), "--teacher-cache")
    monkeypatch.setenv("DFKD_BENCH_TEACHERS", str(blocker / "cache"))  # the default cache, same check
    code, out, err = run_cli(capsys, "teacher", "train", "--dataset", "digits", "--arch", "lenet5")
    assert_one_error_line(code, out, err, "DFKD_BENCH_TEACHERS")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_teacher_train_with_a_read_only_cache_fails_before_training(sandbox, capsys, monkeypatch):
    import dfkd_bench.teachers.training

    monkeypatch.setattr(dfkd_bench.teachers.training, "train_teacher", lambda *a, **k: pytest.fail("training started"))
    cache = sandbox / "ro"
    cache.mkdir()
    cache.chmod(0o500)
    try:
        code, out, err = run_cli(capsys, "teacher", "train", "--dataset", "digits", "--arch", "lenet5",
                                 "--teacher-cache", str(cache))
    finally:
        cache.chmod(0o700)
    assert_one_error_line(code, out, err, "teacher cache", "cannot be written")


# ------------------------------------------------------------ truncated images ---

def test_truncated_image_in_teacher_eval_names_the_file(sandbox, capsys, tmp_path):
    bad = write_cifar_tree(tmp_path / "data", broken="test")
    checkpoint = lenet_rgb_checkpoint(tmp_path / "t.pt")
    code, out, err = run_cli(capsys, "teacher", "eval", "--dataset", "cifar10", "--data-root", str(tmp_path / "data"),
                             "--teacher-arch", "lenet5", "--teacher-checkpoint", str(checkpoint), "--no-progress",
                             "--device", "cpu")
    assert_one_error_line(code, out, err, f"cannot read image {bad}", "truncated", "replace or delete")


def test_truncated_image_in_teacher_train_names_the_file(sandbox, capsys, tmp_path):
    bad = write_cifar_tree(tmp_path / "data", broken="train")
    code, out, err = run_cli(capsys, "teacher", "train", "--dataset", "cifar10", "--data-root", str(tmp_path / "data"),
                             "--arch", "lenet5", "--epochs", "1", "--workers", "0", "--no-progress", "--device", "cpu",
                             "--teacher-cache", str(tmp_path / "cache"))
    assert_one_error_line(code, out, err, f"cannot read image {bad}")


def test_truncated_image_inside_run_names_the_file(sandbox, capsys, tmp_path):
    bad = write_cifar_tree(tmp_path / "data", broken="test")
    checkpoint = lenet_rgb_checkpoint(tmp_path / "t.pt")
    results = tmp_path / "results"
    code, out, err = run_cli(capsys, *RUN, "--dataset", "cifar10", "--data-root", str(tmp_path / "data"),
                             "--teacher-arch", "lenet5", "--student-arch", "lenet5_half", "--device", "cpu",
                             "--teacher-checkpoint", str(checkpoint), "--results-dir", str(results))
    assert_one_error_line(code, out, err, f"cannot read image {bad}")
    (error_file,) = results.glob("*/error.txt")
    assert str(bad) in error_file.read_text()


def test_truncated_image_read_by_a_dataloader_worker_is_still_one_line(tmp_path):
    from dfkd_bench.data.loaders import build_dataset, load_as_tensors

    bad = write_cifar_tree(tmp_path, broken="test")
    dataset = build_dataset("cifar10", str(tmp_path), "test")
    with pytest.raises(DataError) as excinfo:
        load_as_tensors(dataset, num_workers=1, progress=False)
    message = str(excinfo.value)
    assert message == f"cannot read image {bad}: image file is truncated; replace or delete the file" or (
        "\n" not in message and message.startswith(f"cannot read image {bad}:")), message


def test_a_file_that_is_not_an_image_names_the_file(tmp_path):
    from dfkd_bench.data.loaders import build_dataset

    write_cifar_tree(tmp_path)
    junk = tmp_path / "cifar10" / "test" / "dog" / "0.png"
    junk.write_bytes(b"not an image at all")
    dataset = build_dataset("cifar10", str(tmp_path), "test")
    index = [i for i, (path, _) in enumerate(dataset.samples) if path == str(junk)][0]
    with pytest.raises(DataError, match=f"cannot read image {junk}"):
        dataset[index]


# ------------------------------------------------------------------ argparse ---

@pytest.mark.parametrize("argv, command", [
    (("run", "--bogus"), "dfkd-bench run"),
    (("run", "--budget", "huge"), "dfkd-bench run"),
    (("run", "--image-size", "big"), "dfkd-bench run"),
    (("run", "--seeds"), "dfkd-bench run"),
    (("teacher", "train", "--dataset", "digits"), "dfkd-bench teacher train"),
    (("teacher", "train", "--dataset", "digits", "--arch", "lenet5", "--epochs", "x"), "dfkd-bench teacher train"),
    (("teacher", "eval", "--nope"), "dfkd-bench teacher eval"),
    (("nosuchcommand",), "dfkd-bench"),
    (("--nope",), "dfkd-bench"),
    (("report", "--formats"), "dfkd-bench report"),
    (("run", "--array-parallelism=--"), "dfkd-bench run"),
    (("run", "--teacher-mean=--"), "dfkd-bench run"),
    (("teacher", "train", "--dataset", "digits", "--arch", "lenet5", "--epochs=--"), "dfkd-bench teacher train"),
])
def test_argparse_errors_are_one_line_naming_the_help(sandbox, capsys, argv, command):
    code, out, err = run_cli(capsys, *argv)
    assert_one_error_line(code, out, err, f"(see {command} --help)")
    assert "usage:" not in err and out == ""


def test_entry_point_prints_one_line_for_a_usage_error(tmp_path):
    script = Path(sys.executable).with_name("dfkd-bench")
    env = {**os.environ, "HOME": str(tmp_path), "DFKD_BENCH_TEACHERS": str(tmp_path / "t")}
    for argv in (["run", "--seeds", "-1"],):
        result = subprocess.run([str(script), *argv], capture_output=True, text=True, cwd=tmp_path, env=env,
                                timeout=120)
        assert result.returncode == 2
        assert len(result.stderr.strip().splitlines()) == 1 and result.stderr.startswith("error: "), result.stderr
    assert list(tmp_path.iterdir()) == []


# -------------------------------------------------------------- list | head ---

class _ClosedPipe(io.StringIO):
    def write(self, text: str) -> int:
        raise BrokenPipeError(32, "Broken pipe")


def test_list_into_a_closed_pipe_stops_quietly(monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdout", _ClosedPipe())
    assert main(["list", "--settings"]) == 141
    assert "Traceback" not in capsys.readouterr().err


def test_list_into_a_pipe_closed_by_its_reader_has_no_traceback(tmp_path):
    """`dfkd-bench list | head`: the reader is gone before the first write (deterministic EPIPE)."""
    script = Path(sys.executable).with_name("dfkd-bench")
    child = subprocess.Popen([str(script), "list", "--settings"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             cwd=tmp_path, env={**os.environ, "HOME": str(tmp_path)})
    child.stdout.close()
    err = child.stderr.read().decode()
    assert child.wait(timeout=120) == 141
    assert "Traceback" not in err and "BrokenPipeError" not in err, err
    assert err == ""


def test_list_settings_shows_engine_defaults(capsys):
    assert main(["list", "--settings"]) == 0
    out = capsys.readouterr().out
    engine = out.split("engine settings", 1)[1].split("\n\n", 1)[0]
    defaults = TrainConfig()
    for name, shown in (("student_lr", "0.01"), ("epochs", "300"), ("lr_milestones", "100,200"),
                        ("fused_forward", "true"), ("on_nonfinite", "fail")):
        line = next(line for line in engine.splitlines() if line.split()[0] == name)
        assert f"= {shown} " in line, line
        assert str(getattr(defaults, name)).lower().replace("[", "").replace("]", "").replace(" ", "") == shown


# ---------------------------------------------------------- units: config ---

def test_parse_overrides_refuses_duplicates_and_empty_keys():
    assert parse_overrides(["lr_S=0.1", "alpha=0.9"]) == {"student_lr": 0.1, "ema_momentum": 0.9}
    with pytest.raises(ConfigError, match="alpha is given twice"):
        parse_overrides(["alpha=0.9", "alpha=0.8"])
    with pytest.raises(ConfigError, match=r"ema_momentum is given twice \(as 'alpha'\)"):
        parse_overrides(["alpha=0.9", "ema_momentum=0.8"])
    with pytest.raises(ConfigError, match="setting name before"):
        parse_overrides(["=3"])


@pytest.mark.parametrize("value, example", [
    (float("nan"), 0.1), (float("inf"), 0.1), (-float("inf"), 1), ([1.0, float("nan")], [1.0]),
    ("abc", [100, 200]), ([1.5], [100]), (True, 1), (True, 0.1), ("x", True), ([1], "sgd"), ({"a": 1}, "auto"),
])
def test_coerce_refuses_values_that_cannot_be_the_setting(value, example):
    with pytest.raises(ConfigError, match="key"):
        coerce(value, example, "key")


def test_coerce_converts_what_it_can():
    assert coerce("10,20", [100, 200], "k") == [10, 20]
    assert coerce(30.0, [100], "k") == [30]
    assert coerce(3.0, 1, "k") == 3 and isinstance(coerce(3.0, 1, "k"), int)
    assert coerce(True, "auto", "k") == "true"


def test_train_config_validate_catches_values_built_in_code():
    for changes in ({"student_lr": float("nan")}, {"checkpoint_minutes": 0.0}, {"lr_milestones": [-1]},
                    {"student_weight_decay": -1.0}, {"lr_decay": 1.5}, {"student_momentum": 1.0}):
        with pytest.raises(ConfigError):
            dataclasses.replace(TrainConfig(), **changes).validate()
    TrainConfig().validate()


# --------------------------------------------------------- units: messages ---

def test_user_messages_never_name_an_exception_class():
    assert user_message(ConfigError("unknown model 'x'")) == "unknown model 'x'"
    assert user_message(FileNotFoundError(2, "No such file or directory", "/x/y")) == "No such file or directory: /x/y"
    assert user_message(ValueError("ValueError: Overflow")) == "Overflow"
    assert "KeyError" not in user_message(KeyError())
    wrapped = ("Caught DataError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
               "  File \"x.py\", line 1, in f\ndfkd_bench.errors.DataError: cannot read image /a.png: truncated")
    assert str(DataError(wrapped)) == "cannot read image /a.png: truncated"
    assert str(DfkdError("two\nlines")) == "two lines"


# --------------------------------------------------------------------------- #
# property-based: random junk for every option and setting
# --------------------------------------------------------------------------- #

_WORD = st.text(alphabet=string.ascii_letters + "_-.:/ ", min_size=1, max_size=12)
_NOT_INT = st.one_of(
    st.sampled_from(["abc", "1.5", "0x10", "1e3x", "", " ", "--", "1,", "NaN", "one"]),
    _WORD.filter(lambda s: not s.strip().lstrip("+-").isdigit()),
)
_NONFINITE = st.sampled_from(["NaN", "nan", "Infinity", "-Infinity", "inf", "1e309", "-1e999"])
_HUGE = st.integers(min_value=10**22, max_value=10**40).map(str)


def _ints(low: int | None = None, high: int | None = None) -> st.SearchStrategy[str]:
    """Integers outside [low, high], as text."""
    parts = []
    if low is not None:
        parts.append(st.integers(max_value=low - 1, min_value=low - 10**25).map(str))
    if high is not None:
        parts.append(st.integers(min_value=high + 1, max_value=high + 10**25).map(str))
    return st.one_of(*parts)


# option -> junk for it (every value invalid by construction), per command.
_RUN_OPTIONS = {
    "--seeds": st.one_of(_ints(low=0, high=2**32 - 1), _NOT_INT, _ints(low=0).map(lambda s: f"0,{s}")),
    "--image-size": st.one_of(_ints(low=1, high=4096), _NOT_INT),
    "--device": st.one_of(st.from_regex(r"\A(banana|gpu|cuda:-[0-9]|cpu:x|tpu[0-9]?|[a-z]{9,12})\Z")),
    "--workers": st.one_of(_ints(low=0, high=1024), _NOT_INT),
    "--threads": st.one_of(_ints(low=1, high=4096), _NOT_INT),
    "--budget": _WORD.filter(lambda s: s not in ("smoke", "default", "paper")),
    "--launcher": _WORD.filter(lambda s: s not in ("inline", "local", "slurm")),
    "--student-arch": st.from_regex(r"\Anosuch[a-z0-9]{0,6}\Z"),
    "--teacher-arch": st.from_regex(r"\Anosuch[a-z0-9]{0,6}\Z"),
    "--teacher-mean": st.one_of(st.floats(0, 1).map(str), _NONFINITE),  # no --teacher-checkpoint: refused
    "--teacher-std": st.one_of(st.floats(0.1, 1).map(str), _NONFINITE),
    "--methods": st.from_regex(r"\Anosuch[a-z]{0,5}\Z"),
    "--dataset": st.from_regex(r"\Anosuch[a-z]{0,5}\Z"),
    "--time": st.one_of(_ints(low=1), _NOT_INT),
    "--cpus-per-task": st.one_of(_ints(low=1, high=4096), _NOT_INT),
    "--gpus-per-node": st.one_of(_ints(low=0, high=1024), _NOT_INT),
    "--array-parallelism": st.one_of(_ints(low=1), _NOT_INT),
    "--mem-gb": st.one_of(_NONFINITE, st.floats(max_value=0, allow_nan=False, allow_infinity=False).map(str)),
}

_TRAIN_OPTIONS = {
    "--epochs": st.one_of(_ints(low=1, high=10**6), _NOT_INT),
    "--batch-size": st.one_of(_ints(low=1, high=2**31 - 1), _NOT_INT),
    "--lr": st.one_of(_NONFINITE, st.floats(max_value=0, allow_nan=False, allow_infinity=False).map(str),
                      _WORD.filter(lambda s: _not_float(s))),
    "--seed": st.one_of(_ints(low=0, high=2**32 - 1), _NOT_INT),
    "--device": _RUN_OPTIONS["--device"],
    "--workers": _RUN_OPTIONS["--workers"],
    "--dataset": _RUN_OPTIONS["--dataset"],
    "--arch": st.from_regex(r"\Anosuch[a-z0-9]{0,6}\Z"),
}

_EVAL_OPTIONS = {
    "--device": _RUN_OPTIONS["--device"],
    "--workers": _RUN_OPTIONS["--workers"],
    "--image-size": _RUN_OPTIONS["--image-size"],
    "--dataset": _RUN_OPTIONS["--dataset"],
    "--teacher-arch": st.from_regex(r"\Anosuch[a-z0-9]{0,6}\Z"),
    # digits has one channel; these are checked with --teacher-checkpoint given
    "--teacher-mean": st.one_of(_NONFINITE, st.lists(st.floats(0, 1), min_size=2, max_size=4).map(
        lambda v: ",".join(map(str, v))), _WORD.filter(lambda s: _not_float(s) and s.strip(" ,"))),
    "--teacher-std": st.one_of(_NONFINITE, st.floats(max_value=0, allow_nan=False, allow_infinity=False).map(str),
                               st.lists(st.floats(0.1, 1), min_size=2, max_size=4).map(
                                   lambda v: ",".join(map(str, v)))),
}


def _not_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return True
    return False


# Settings whose range is known: a value outside it.
_OUT_OF_RANGE = {
    "epochs": _ints(low=1), "steps_per_epoch": _ints(low=1), "student_steps": _ints(low=1),
    "batch_size": _ints(low=1), "eval_batch_size": _ints(low=1), "checkpoint_every": _ints(low=1),
    "generator_steps": _ints(low=0), "eval_every": _ints(low=0), "drift_every": _ints(low=0),
    "sample_every": _ints(low=0), "log_every": _ints(low=0), "student_images_per_step": _ints(low=0),
    "student_lr": st.floats(max_value=-1e-9, allow_nan=False, allow_infinity=False).map(str),
    "student_weight_decay": st.floats(max_value=-1e-9, allow_nan=False, allow_infinity=False).map(str),
    "student_momentum": st.one_of(st.floats(min_value=1, allow_nan=False, allow_infinity=False),
                                  st.floats(max_value=-1e-9, allow_nan=False, allow_infinity=False)).map(str),
    "lr_decay": st.one_of(st.floats(max_value=0, allow_nan=False, allow_infinity=False),
                          st.floats(min_value=1.0001, allow_nan=False, allow_infinity=False)).map(str),
    "lr_milestones": _ints(low=0).map(lambda s: f"10,{s}"),
    "checkpoint_minutes": st.floats(max_value=0, allow_nan=False, allow_infinity=False).map(str),
    "logit_bound": st.floats(max_value=0, allow_nan=False, allow_infinity=False).map(str),
    "pixel_logit_bound": st.floats(max_value=0, allow_nan=False, allow_infinity=False).map(str),
    "generator_lr": st.floats(max_value=-1e-9, allow_nan=False, allow_infinity=False).map(str),
    "normreg_gamma": st.floats(max_value=0.999, allow_nan=False, allow_infinity=False).map(str),
    "ema_momentum": st.one_of(st.floats(min_value=1.0001, allow_nan=False, allow_infinity=False),
                              st.floats(max_value=-1e-9, allow_nan=False, allow_infinity=False)).map(str),
    "noise_dim": _ints(low=1, high=2**20), "pretrain_steps": _ints(low=0), "memory_size": _ints(low=1),
    "memory_push_per_stage": _ints(low=0), "memory_batch_size": _ints(low=0),
    "generator_beta1": st.floats(min_value=1, allow_nan=False, allow_infinity=False).map(str),
    "student_optimizer": _WORD.filter(lambda s: s.strip().lower() not in ("sgd", "adam")),
    "amp": _WORD.filter(lambda s: s.strip() not in ("auto", "none", "bf16")),
    "on_nonfinite": _WORD.filter(lambda s: s.strip() not in ("fail", "continue")),
    "lr_schedule": _WORD.filter(lambda s: s.strip().lower() not in ("step", "cosine", "cosine_epoch")),
    "student_grad_clip": st.floats(max_value=-1e-9, allow_nan=False, allow_infinity=False).map(str),
    "student_warmup_epochs": _ints(low=0),
    "conditioning": _WORD.filter(lambda s: s.strip() not in ("uncond", "cat", "sum")),
    "generator": st.from_regex(r"\Anosuch[a-z0-9]{0,5}\Z"),
    "memory_dtype": _WORD.filter(lambda s: s.strip() not in ("uint8", "float16", "float32")),
}
for _name in ("kd_weight", "generator_kd_weight", "nll_weight", "normreg_weight", "bnmm_weight",
              "student_bound_weight", "teacher_bound_weight", "pixel_bound_weight", "ema_kd_weight",
              "memory_kd_weight", "generator_weight_decay"):
    _OUT_OF_RANGE[_name] = st.floats(max_value=-1e-9, allow_nan=False, allow_infinity=False).map(str)


def _settings() -> dict[str, tuple[object, str | None]]:
    """Every setting of the engine and of abm, mem, mad: name -> (default, paper symbol)."""
    found = {f.name: (getattr(TrainConfig(), f.name), f.metadata.get("paper")) for f in dataclasses.fields(TrainConfig)}
    for method in ("abm", "mem", "mad"):
        params = get_method(method).Params
        for f in dataclasses.fields(params):
            found.setdefault(f.name, (getattr(params(), f.name), f.metadata.get("paper")))
    return found


SETTINGS = _settings()


def _junk_for(default: object) -> st.SearchStrategy[str]:
    """A value of the wrong type for a setting with this default (invalid whatever the setting)."""
    if isinstance(default, bool):
        return st.one_of(st.sampled_from(["yes", "no", "1", "0", "2.5", "[true]", "maybe"]), _WORD.filter(
            lambda s: s.strip().lower() not in ("true", "false")))
    if isinstance(default, int):
        return st.one_of(st.sampled_from(["1.5", "abc", "true", "[1]", "{}"]), _NONFINITE)
    if isinstance(default, float):
        return st.one_of(st.sampled_from(["abc", "true", "[0.1]", "{}", "0.1.2"]), _NONFINITE)
    if isinstance(default, list):
        return st.one_of(st.sampled_from(["abc", "1.5", "10,x", "true", "NaN", "{}"]))
    return st.sampled_from(['[1, 2]', '{"a": 1}', "[]", "{}"])  # str settings: never a list or a table


@st.composite
def bad_set_items(draw) -> tuple[list[str], tuple[str, ...]]:
    """``--set`` items with one bad one; returns (items, fragments one of which the error must name)."""
    name = draw(st.sampled_from(sorted(SETTINGS)))
    default, paper = SETTINGS[name]
    key = draw(st.sampled_from([name, paper] if paper else [name]))
    kind = draw(st.sampled_from(["type", "range", "duplicate", "unknown", "no-equals"]))
    if kind == "range" and name in _OUT_OF_RANGE:
        items = [f"{key}={draw(_OUT_OF_RANGE[name])}"]
    elif kind == "duplicate":
        other = draw(st.sampled_from([k for k in ([name, paper] if paper else [name])]))
        items = [f"{key}={default}", f"{other}={default}"]
    elif kind == "unknown":
        key = draw(st.from_regex(r"\Azz[a-z_]{1,10}\Z"))
        items = [f"{key}=1"]
        return items, (key,)
    elif kind == "no-equals":
        key = draw(st.from_regex(r"\A[a-z_]{1,10}\Z"))
        return [key], ("key=value",)
    else:
        items = [f"{key}={draw(_junk_for(default))}"]
    good = draw(st.lists(st.sampled_from(["n_G=2", "zeta0=0.02", "eval_every=1"]), max_size=2, unique=True))
    good = [g for g in good if g.split("=")[0] not in (name, paper) and
            SETTINGS.get(g.split("=")[0], (None, None))[1] != paper]
    return good + items, tuple(k for k in (name, paper) if k)


_PROPERTY = settings(max_examples=300, deadline=None, derandomize=True, database=None,
                     suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def _check_junk(sandbox: Path, capsys, argv: list[str], fragments: tuple[str, ...] = ()) -> None:
    before = files_under(sandbox)
    code, out, err = run_cli(capsys, *argv)
    assert code != 0, f"{argv} exited 0"
    line = assert_one_error_line(code, out, err)
    if fragments:
        assert any(fragment in line for fragment in fragments), f"{line!r} names none of {fragments} ({argv})"
    assert files_under(sandbox) == before, f"{argv} wrote {files_under(sandbox) - before}"


@_PROPERTY
@given(data=st.data())
def test_property_run_options(sandbox, capsys, data):
    option = data.draw(st.sampled_from(sorted(_RUN_OPTIONS)))
    value = data.draw(_RUN_OPTIONS[option])
    argv = [*RUN, "--results-dir", str(sandbox / "results"), f"{option}={value}"]
    if option in ("--cpus-per-task", "--gpus-per-node", "--array-parallelism", "--time", "--mem-gb"):
        argv += ["--launcher", "local", "--no-wait"]
    _check_junk(sandbox, capsys, argv, (option, "argument", "unknown", "nosuch", "--teacher-checkpoint"))


@_PROPERTY
@given(data=st.data())
def test_property_run_settings(sandbox, capsys, data):
    items, fragments = data.draw(bad_set_items())
    argv = ["run", "--methods", "abm,mem,mad", "--budget", "smoke", "--no-progress",
            "--results-dir", str(sandbox / "results")]
    for item in items:
        argv.append(f"--set={item}")
    _check_junk(sandbox, capsys, argv, fragments)


@_PROPERTY
@given(data=st.data())
def test_property_teacher_train_and_eval(sandbox, capsys, teacher_cache, data):
    command = data.draw(st.sampled_from(["train", "eval"]))
    options = _TRAIN_OPTIONS if command == "train" else _EVAL_OPTIONS
    option = data.draw(st.sampled_from(sorted(options)))
    value = data.draw(options[option])
    if command == "train":
        argv = ["teacher", "train", "--dataset", "digits", "--arch", "lenet5", "--no-progress",
                "--teacher-cache", str(sandbox / "new-cache")]
    else:
        argv = ["teacher", "eval", "--dataset", "digits", "--teacher-arch", "lenet5", "--no-progress",
                "--teacher-checkpoint", str(cached_teacher(teacher_cache))]
    argv.append(f"{option}={value}")
    _check_junk(sandbox, capsys, argv, (option, "argument", "unknown", "nosuch"))


@_PROPERTY
@given(data=st.data())
def test_property_status_report_sweep(sandbox, capsys, data):
    blocker = sandbox / "a-file"
    if not blocker.exists():
        blocker.write_text("not a folder\n")
    bad_toml = sandbox / "bad.toml"
    if not bad_toml.exists():
        bad_toml.write_text("this is [ not toml\n")
    command = data.draw(st.sampled_from(["status", "report", "sweep"]))
    if command == "status":
        argv = ["status", "--results-dir", data.draw(st.sampled_from([str(blocker), str(blocker / "x")]))]
    elif command == "report":
        kind = data.draw(st.sampled_from(["out", "results", "formats"]))
        argv = ["report", "--results-dir", str(sandbox / "cwd")]
        if kind == "out":
            argv += ["--out", str(blocker / data.draw(st.from_regex(r"\A[a-z]{1,6}\Z")))]
        elif kind == "results":
            argv[2] = str(blocker / "runs")
        else:
            argv += ["--formats=" + data.draw(st.from_regex(r"\Azz[a-z]{1,4}\Z"))]
    else:
        kind = data.draw(st.sampled_from(["missing", "folder", "toml", "set", "budget"]))
        target = {"missing": str(sandbox / "nothing.toml"), "folder": str(sandbox / "cwd"),
                  "toml": str(bad_toml)}.get(kind, str(bad_toml))
        argv = ["sweep", target, "--dry-run"]
        if kind == "set":
            items, _ = data.draw(bad_set_items())
            argv = ["sweep", str(sandbox / "nothing.toml"), "--dry-run", *[f"--set={i}" for i in items]]
        elif kind == "budget":
            argv.append(f"--budget={data.draw(_RUN_OPTIONS['--budget'])}")
    _check_junk(sandbox, capsys, argv)


def test_teacher_normalisation_applies_to_published_weights_too():
    from dfkd_bench.cluster.experiment import check_teacher_normalisation

    check_teacher_normalisation([0.5], [0.25], 1, None, "digits", weights="torchvision")
    check_teacher_normalisation([0.5], [0.25], 1, "t.pt", "digits")
    with pytest.raises(ConfigError, match="--teacher-checkpoint"):
        check_teacher_normalisation([0.5], None, 1, None, "digits", weights="cache")
    with pytest.raises(ConfigError, match="3 values given, the dataset digits has 1 channel"):
        check_teacher_normalisation(None, [0.5, 0.5, 0.5], 1, "t.pt", "digits")


def test_every_preset_budget_and_method_passes_the_validation():
    """The range checks refuse junk, never a configuration the suite itself ships."""
    from dfkd_bench.config import apply_train_overrides, resolve_method_params
    from dfkd_bench.presets import PRESETS, budget_param_overrides, budget_train_overrides

    for preset in PRESETS.values():
        for budget in ("smoke", "default", "paper"):
            train = preset.train_config(preset.teacher_arch, preset.student_arch)
            train = apply_train_overrides(train, budget_train_overrides(preset, budget, train))
            train.validate()
            for method in ("abm", "mem", "mad"):
                params = resolve_method_params(method, preset.params, {})
                resolve_method_params(method, params, budget_param_overrides(budget, params))


@pytest.mark.parametrize("lines, fragments", [
    ('seeds = [0, -1]', ("bad.toml", "seed -1 is out of range")),
    ('seeds = [0]\n[set]\nlr_S = nan', ("bad.toml", "student_lr must be a finite number")),
    ('seeds = [0]\n[set]\nmo_S = 1.5', ("bad.toml", "student_momentum")),
    ('seeds = [0]\n[set]\nldep = ["a"]', ("bad.toml", "lr_milestones")),
])
def test_experiment_files_go_through_the_same_checks(sandbox, capsys, lines, fragments):
    path = sandbox / "cwd" / "bad.toml"
    path.write_text(f'name = "bad"\nmethods = ["abm"]\nbudget = "smoke"\n{lines}\n\n[[cells]]\ndataset = "digits"\n')
    code, out, err = run_cli(capsys, "sweep", str(path), "--dry-run", "--results-dir", str(sandbox / "r"))
    assert_one_error_line(code, out, err, *fragments)
    assert not (sandbox / "r").exists()
