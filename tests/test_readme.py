"""The README is short and every command it shows works; the documentation's example of a new
method really is one file that works (a generator method and a pool method)."""

from __future__ import annotations

import re
import shlex
import sys
import types

import pytest

from dfkd_bench.train.engine import train_run
from dfkd_bench.cluster.experiment import build_run_configs
from dfkd_bench.method_api import get_method
from conftest import REPO_ROOT

README = REPO_ROOT / "README.md"


def method_examples() -> dict[str, str]:
    """The Python examples of docs/adding-a-method.md, by the method name they register."""
    text = (REPO_ROOT / "docs" / "adding-a-method.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    return {re.search(r'^    name = "(\w+)"', code, re.M).group(1): code
            for code in blocks if re.search(r'^    name = "(\w+)"', code, re.M)}


def bash_commands(text: str) -> list[str]:
    """Every command of the ```bash blocks of a Markdown text: continuation lines joined, comments cut."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" # ", 1)[0].strip()
            if line and not line.startswith("#"):
                commands.append(" ".join(line.split()))
    return commands


# ------------------------------------------------------------------ the README ---

def test_the_readme_fits_on_a_few_screens():
    lines = README.read_text().splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines; the rest belongs in docs/"


def test_every_readme_command_is_one_this_file_runs():
    """The README shows the two set-up commands and the headline results' commands, no others: each
    is run (or dry-run against the committed records) by a test below."""
    commands = bash_commands(README.read_text())
    assert commands == [MAIN_JOB, TEST_COMMAND, *ZOO_COMMANDS], commands


MAIN_JOB = ("python3 -m venv .venv && .venv/bin/pip install -e . && .venv/bin/dfkd-bench teacher train "
            "--dataset digits --arch lenet5 && .venv/bin/dfkd-bench run --dataset digits --methods abm,mem,mad")
TEST_COMMAND = 'python3 -m venv .venv && .venv/bin/pip install -q -e ".[dev]" && .venv/bin/python -m pytest'
ZOO_COMMANDS = [
    "dfkd-bench sweep experiments/digits_zoo.toml --teacher-cache results/zoo/teachers --threads 1",
    "dfkd-bench sweep experiments/digits_equal_images.toml --teacher-cache results/zoo/teachers --threads 1",
    "dfkd-bench report --results-dir results/zoo --out results/zoo/report --baseline abm",
]


def test_the_readme_test_command_is_what_ci_runs():
    ci = (REPO_ROOT / ".ci" / "run").read_text()
    assert TEST_COMMAND in ci.splitlines(), "the README's test command is no longer .ci/run's"


def _main_job_steps() -> list[list[str]]:
    """The dfkd-bench steps of the README's main job, as argv lists."""
    steps = [shlex.split(step.strip()) for step in MAIN_JOB.split("&&")]
    return [argv[1:] for argv in steps if argv[0].endswith("dfkd-bench")]


def _run_main_job(tmp_path, monkeypatch, capsys, extra_teacher_args: list[str], extra_run_args: list[str]) -> str:
    from dfkd_bench.cli import main

    monkeypatch.chdir(tmp_path)  # results/runs of the main job go here
    monkeypatch.setenv("DFKD_BENCH_TEACHERS", str(tmp_path / "teachers"))
    teacher, run = _main_job_steps()
    assert teacher[:2] == ["teacher", "train"] and run[0] == "run"
    assert main([*teacher, *extra_teacher_args, "--no-progress"]) == 0
    assert main([*run, *extra_run_args, "--no-progress"]) == 0
    return capsys.readouterr().out


def test_the_readme_main_job_runs(tmp_path, monkeypatch, capsys):
    """The README's main job, as written but short: a teacher of 2 epochs and the smoke budget (as
    written it takes minutes; the slow test below runs it so). The teacher is trained into the cache
    the run then finds, and the three methods train and are printed."""
    out = _run_main_job(tmp_path, monkeypatch, capsys, ["--epochs", "2"], ["--budget", "smoke"])
    for name in ("abm", "mem", "mad"):
        assert re.search(rf"^{name}\s+digits\s+1\s", out, re.M), out
    assert len(list((tmp_path / "results" / "runs").glob("*/done"))) == 3


@pytest.mark.slow
def test_the_readme_main_job_runs_as_written(tmp_path, monkeypatch, capsys):
    out = _run_main_job(tmp_path, monkeypatch, capsys, [], [])
    assert len(list((tmp_path / "results" / "runs").glob("*/done"))) == 3, out


def test_the_readme_headline_commands_are_the_committed_runs(monkeypatch, capsys):
    """The headline table's sweeps, run from the repository's root as the README says, promise exactly
    the committed runs of results/zoo, all done (a dry run)."""
    from dfkd_bench.cli import main

    monkeypatch.chdir(REPO_ROOT)
    for command in ZOO_COMMANDS[:2]:
        assert main([*shlex.split(command)[1:], "--dry-run"]) == 0
        out = capsys.readouterr().out
        summary = re.search(r": (\d+) runs; (\d+) done \(dry run", out)
        assert summary and summary.group(1) == summary.group(2), out  # every run done, none pending


def test_the_readme_report_command_gives_the_committed_tables(tmp_path, monkeypatch, capsys):
    """The headline report command, into a temporary folder instead of the committed one and without
    drawing figures (minutes of matplotlib), writes the committed tables of results/zoo/report, byte
    for byte: the README's table is what the committed records give."""
    import dfkd_bench.report.writer as writer
    from dfkd_bench.cli import main

    for name in dir(writer):
        if name.startswith("plot_"):
            monkeypatch.setattr(writer, name, (lambda *a, **k: ([], [])) if name == "plot_samples" else
                                (lambda *a, **k: []))
    monkeypatch.chdir(REPO_ROOT)
    argv = shlex.split(ZOO_COMMANDS[2])[1:]
    argv[argv.index("--out") + 1] = str(tmp_path / "report")
    assert main(argv) == 0, capsys.readouterr().err
    committed = REPO_ROOT / "results" / "zoo" / "report"
    tables = sorted(path.name for path in committed.glob("table_*") if path.suffix in (".md", ".csv", ".tex"))
    assert "table_final.md" in tables
    for name in tables:
        assert (tmp_path / "report" / name).read_text() == (committed / name).read_text(), name


# ------------------------------------------------------- the method examples ---

def test_the_docs_show_a_generator_method_and_a_pool_method():
    assert set(method_examples()) == {"abm_noise", "pixel_ce"}


def test_docs_method_example_registers_and_runs(digits_request, tmp_path):
    module = types.ModuleType("dfkd_bench.methods.abm_noise")
    sys.modules[module.__name__] = module
    try:
        exec(compile(method_examples()["abm_noise"], "docs/adding-a-method.md", "exec"), module.__dict__)
        method = get_method("abm_noise")
        assert method.Params().noise_kd_weight == 0.5
        config = build_run_configs(digits_request(["abm_noise"]))[0]
        summary = train_run(config, tmp_path, device="cpu", progress=False)
        assert summary["iterations"] == config.train.total_iterations
        from dfkd_bench.store import RunStore

        evals = [r for r in RunStore(tmp_path, config.run_name).read_records() if r["kind"] == "eval"]
        assert "loss/kd_noise" in evals[-1]  # the new source is trained on and recorded
    finally:
        sys.modules.pop(module.__name__, None)
        from dfkd_bench import method_api

        method_api._METHODS.pop("abm_noise", None)


def test_docs_pool_method_example_fills_its_pool_and_trains_on_it(digits_request, tmp_path):
    module = types.ModuleType("dfkd_bench.methods.pixel_ce")
    sys.modules[module.__name__] = module
    try:
        exec(compile(method_examples()["pixel_ce"], "docs/adding-a-method.md", "exec"), module.__dict__)
        assert get_method("pixel_ce").pool_based
        config = build_run_configs(digits_request(["pixel_ce"], overrides={"synthesis_steps": 2}))[0]
        summary = train_run(config, tmp_path, device="cpu", progress=False)
        assert summary["iterations"] == config.train.total_iterations
        from dfkd_bench.store import RunStore

        evals = [r for r in RunStore(tmp_path, config.run_name).read_records() if r["kind"] == "eval"]
        assert evals[-1]["pool_images"] > 0 and "loss/kd_pool" in evals[-1]  # batches joined the pool
    finally:
        sys.modules.pop(module.__name__, None)
        from dfkd_bench import method_api

        method_api._METHODS.pop("pixel_ce", None)

