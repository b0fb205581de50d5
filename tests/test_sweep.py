"""Experiment files, their expansion, and the `sweep` / `status` commands (no SLURM needed)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import tomllib
from pathlib import Path

import pytest

from dfkd_bench.cluster import sweep
from dfkd_bench.config import TrainConfig
from dfkd_bench.errors import ConfigError, DfkdError
from dfkd_bench.method_api import get_method, param_fields

REPO = Path(__file__).resolve().parent.parent
EXPERIMENTS = sorted((REPO / "experiments").glob("*.toml"))

# What the paper's files promise, written out by hand (the generic count below recomputes them from each file).
PROMISED = {
    "table2.toml": (54, 54),                 # 6 datasets x 3 methods x 3 seeds
    "fig6_alpha.toml": (24, 24),             # 8 alphas x 3 seeds, MAD only
    "fig6_student_steps.toml": (12, 12),     # 4 n_S x 3 seeds
    "fig6_lambdas.toml": (15, 15),           # 5 (lambda0, lambda1) pairs x 3 seeds
    "fig7_memory.toml": (42, 90),            # 2 datasets x (5 sizes x 3 seeds of mem + 3 abm + 3 mad); 90 before collapsing
    "fig9_generator.toml": (7, 7),           # uncond + 5 cat + sum, one seed
    "digits_methods.toml": (9, 9),           # 3 methods x 3 seeds
    "digits_alpha.toml": (12, 20),           # 5 alphas x 2 seeds of mad + 2 abm; 20 before collapsing
    "mnist_methods.toml": (9, 9),
    "digits_zoo.toml": (36, 36),             # 12 methods x 3 seeds
    "mnist_zoo.toml": (36, 36),
    "digits_bn_zoo.toml": (36, 36),          # 12 methods x 3 seeds (NAYER, SpaceshipNet: issue 29), BatchNorm LeNet-5 pair
    # (2 pool methods x 2 CHOSEN values + DFQ x 2 modes + CMI and DeepInversion at 200 steps + DeepInversion's
    # DataFree synthesiser + SpaceshipNet's 200 steps and official KL) x 3 seeds
    "digits_bn_deviations.toml": (36, 36),
    "digits_equal_images.toml": (3, 3),      # ABM at 2 x batch images per step, 3 seeds
    "mnist_equal_images.toml": (3, 3),
    "cifar10_window.toml": (9, 9),           # 3 methods x 3 seeds at 1 % of the paper's iterations
    "dfad_mnist_32px.toml": (3, 3),          # DFAD x 3 seeds, 32 px with the official code's teacher
}


def run_cli(argv: list[str]) -> int:
    """The two commands as the CLI runs them (cli.main prints DfkdError as one line and exits 2)."""
    parser = argparse.ArgumentParser(prog="dfkd-bench")
    sub = parser.add_subparsers(dest="command")
    sweep.add_sweep_command(sub)
    sweep.add_status_command(sub)
    args = parser.parse_args(argv)
    return args.func(args)


def write(tmp_path: Path, text: str, name: str = "exp.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def one_line_error(excinfo, *fragments: str) -> str:
    message = str(excinfo.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, message
    return message


# ------------------------------------------------------- the shipped files ---

def _declares(method: str, setting: str) -> bool:
    engine = {f.name for f in dataclasses.fields(TrainConfig)}
    return setting in engine or setting in param_fields(get_method(method))


def expected_counts(path: Path) -> tuple[int, int]:
    """(distinct runs, combinations) computed from the file's own lists, independently of sweep.py."""
    from dfkd_bench.config import _paper_aliases

    aliases = _paper_aliases()
    data = tomllib.loads(path.read_text())
    distinct = combinations = 0
    for cell in data.get("cells", [{}]):
        methods = cell.get("methods", data.get("methods"))
        seeds = cell.get("seeds", data.get("seeds"))
        grid = {**data.get("grid", {}), **cell.get("grid", {})}
        axes = []  # (number of points, settings of the axis)
        for key, values in grid.items():
            if isinstance(values[0], dict):
                axes.append((len(values), {aliases.get(k, k) for point in values for k in point}))
            else:
                axes.append((len(values), {aliases.get(key, key)}))
        combinations += len(methods) * len(seeds) * math.prod(n for n, _ in axes)
        for method in methods:
            # a method sees only the axes holding a setting it declares; the others collapse
            distinct += len(seeds) * math.prod(n for n, names in axes if any(_declares(method, s) for s in names))
    return distinct, combinations


def test_every_paper_file_is_covered():
    names = {path.name for path in EXPERIMENTS}
    assert set(PROMISED) <= names, set(PROMISED) - names


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.name)
def test_experiment_file_expands_to_its_runs(path, tmp_path):
    experiment = sweep.load_experiment(path)
    plan = sweep.plan_experiment(experiment, teacher_cache=str(tmp_path / "no-teachers"), allow_missing_teacher=True)
    distinct, combinations = expected_counts(path)
    assert (len(plan.runs), plan.combinations) == (distinct, combinations)
    if path.name in PROMISED:
        assert (len(plan.runs), plan.combinations) == PROMISED[path.name]
    names = [run.config.run_name for run in plan.runs]
    assert len(set(names)) == len(names)
    # a missing teacher says how to make it: train it, or (ImageNet: torchvision's pretrained
    # AlexNet by default) which weights file to put into the torch hub cache; a file naming a committed
    # teacher checkpoint (dfad_mnist_32px.toml) needs no cache
    external = "teacher_checkpoint" in tomllib.loads(path.read_text())
    assert all((run.missing_teacher is None) if external else
               (run.missing_teacher and ("dfkd-bench teacher train" in run.missing_teacher
                                         or "torch hub cache" in run.missing_teacher)) for run in plan.runs)
    assert sweep.expand(experiment, teacher_cache=str(tmp_path / "no-teachers"),
                        allow_missing_teacher=True) == plan.configs


def test_table2_cells(tmp_path):
    plan = sweep.plan_experiment(sweep.load_experiment(REPO / "experiments" / "table2.toml"),
                                 teacher_cache=str(tmp_path), allow_missing_teacher=True)
    pairs = {(r.config.dataset, r.config.teacher.arch, r.config.student_arch) for r in plan.runs}
    assert pairs == {("cifar10", "wrn40_2", "wrn16_2"), ("cifar100", "wrn40_2", "wrn16_2"),
                     ("tinyimagenet", "resnet34", "resnet18"), ("imagenet", "alexnet", "alexnet"),
                     ("places365", "alexnet", "alexnet"), ("food101", "alexnet", "alexnet")}
    assert {r.config.budget for r in plan.runs} == {"paper"}
    assert {r.config.params.get("memory_size") for r in plan.runs if r.config.method == "mem"} == {8192}
    resources = plan.experiment.resources
    assert resources["launcher"] == "slurm" and resources["gpus_per_node"] == 1


def test_paper_figures_set_what_they_say(tmp_path):
    def plan(name):
        return sweep.plan_experiment(sweep.load_experiment(REPO / "experiments" / name),
                                     teacher_cache=str(tmp_path), allow_missing_teacher=True)

    alphas = sorted({r.config.params["ema_momentum"] for r in plan("fig6_alpha.toml").runs})
    assert alphas == [0.2, 0.4, 0.6, 0.8, 0.95, 0.99, 0.999, 1.0]
    lambdas = {(r.config.params["kd_weight"], r.config.params["ema_kd_weight"]) for r in plan("fig6_lambdas.toml").runs}
    assert lambdas == {(1.0, 1.0), (1.0, 0.5), (0.5, 1.0), (1.0, 0.0), (0.0, 1.0)}
    steps = sorted({r.config.train.student_steps for r in plan("fig6_student_steps.toml").runs})
    assert steps == [10, 30, 60, 90]
    generators = {(r.config.params["conditioning"], r.config.params["nll_weight"], r.config.params["normreg_weight"])
                  for r in plan("fig9_generator.toml").runs}
    assert generators == {("uncond", 0.0, 0.0), ("sum", 0.1, 0.1)} | {("cat", l3, 0.1) for l3 in (0.1, 0.3, 1.0, 3.0, 10.0)}
    memory = plan("fig7_memory.toml")
    sizes = {(r.config.dataset, r.config.params["memory_size"]) for r in memory.runs if r.config.method == "mem"}
    assert sizes == {(d, m) for d in ("cifar100", "imagenet") for m in (1024, 2048, 4096, 8192, 16384)}
    assert memory.collapsed == 48


# ------------------------------------------------------------ the format ---

BASE = """
name = "t"
methods = ["abm", "mad"]
seeds = [0, 1]
budget = "smoke"
dataset = "digits"
"""


def test_paper_symbols_and_precedence(tmp_path):
    path = write(tmp_path, BASE + """
[set]
n_S = 3
lambda1 = 0.5
[grid]
alpha = [0.9, 0.99]
""")
    plan = sweep.plan_experiment(sweep.load_experiment(path), teacher_cache=str(tmp_path), allow_missing_teacher=True)
    mad = [r for r in plan.runs if r.config.method == "mad"]
    assert {r.config.params["ema_momentum"] for r in mad} == {0.9, 0.99}
    assert {r.config.params["ema_kd_weight"] for r in mad} == {0.5}
    assert {r.config.train.student_steps for r in plan.runs} == {3}  # --set-like values beat the budget's caps
    assert mad[0].swept == {"ema_momentum": 0.9}
    assert [r.swept for r in plan.runs if r.config.method == "abm"] == [{}, {}]
    # the same run as `dfkd-bench run --set n_S=3` (same id)
    from dfkd_bench.config import parse_overrides
    from dfkd_bench.cluster.experiment import RunRequest, TeacherOptions, build_run_configs

    request = RunRequest(methods=["abm", "mad"], dataset="digits", seeds=[0, 1], budget="smoke",
                         overrides=parse_overrides(["n_S=3", "lambda1=0.5", "alpha=0.99"]),
                         teacher=TeacherOptions(cache_dir=str(tmp_path)))
    assert {c.run_name for c in build_run_configs(request, allow_missing_teacher=True)} == {
        r.config.run_name for r in plan.runs if r.config.params.get("ema_momentum", 0.99) == 0.99}


def test_duplicates_collapse_and_are_reported(tmp_path, capsys):
    path = write(tmp_path, BASE + "[grid]\nalpha = [0.9, 0.95, 0.99]\n")
    plan = sweep.plan_experiment(sweep.load_experiment(path), teacher_cache=str(tmp_path), allow_missing_teacher=True)
    # mad: 3 alphas x 2 seeds; abm: alpha means nothing to it -> 2 runs, 4 collapsed
    assert (len(plan.runs), plan.combinations, plan.collapsed) == (8, 12, 4)
    assert "8 runs (12 combinations, 4 identical collapsed" in plan.count_line()
    assert run_cli(["sweep", str(path), "--dry-run", "--teacher-cache", str(tmp_path / "none"),
                    "--results-dir", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    assert "8 runs (12 combinations, 4 identical collapsed" in out
    assert len([line for line in out.splitlines() if line.startswith(("abm-", "mad-"))]) == 8


def test_joint_axis_cells_and_overrides(tmp_path):
    path = write(tmp_path, """
methods = ["mad"]
seeds = [0]
budget = "smoke"
[set]
student_steps = 1
[grid]
lambdas = [{lambda0 = 1.0, lambda1 = 0.0}, {kd_weight = 0.0, ema_kd_weight = 1.0}]
[[cells]]
dataset = "digits"
[[cells]]
dataset = "digits"
seeds = [5]
[cells.set]
student_steps = 2
[cells.grid]
lambdas = [{lambda0 = 0.5, lambda1 = 0.5}]
alpha = [0.5, 0.6]
""")
    plan = sweep.plan_experiment(sweep.load_experiment(path), teacher_cache=str(tmp_path), allow_missing_teacher=True)
    first = {(r.config.params["kd_weight"], r.config.params["ema_kd_weight"]) for r in plan.runs if r.cell.index == 0}
    assert first == {(1.0, 0.0), (0.0, 1.0)}
    second = [r for r in plan.runs if r.cell.index == 1]
    assert {(r.config.params["kd_weight"], r.config.params["ema_momentum"], r.config.seed) for r in second} == {
        (0.5, 0.5, 5), (0.5, 0.6, 5)}
    assert {r.config.train.student_steps for r in second} == {2}


def test_cli_budget_and_set_override(tmp_path):
    experiment = sweep.load_experiment(REPO / "experiments" / "fig6_alpha.toml")
    changed = sweep.override_experiment(experiment, budget="smoke", overrides={"batch_size": 8})
    plan = sweep.plan_experiment(changed, teacher_cache=str(tmp_path), allow_missing_teacher=True)
    assert {r.config.budget for r in plan.runs} == {"smoke"} and {r.config.train.batch_size for r in plan.runs} == {8}
    with pytest.raises(ConfigError) as excinfo:
        sweep.override_experiment(experiment, overrides={"ema_momentum": 0.5})
    one_line_error(excinfo, "ema_momentum", "swept")


@pytest.mark.parametrize("text, fragments", [
    (BASE + "colour = 1\n", ["'colour'", "top level"]),
    (BASE + "[set]\nalpah = 0.9\n", ["'alpah'", "did you mean", "alpha"]),
    (BASE + "[grid]\nn_s = [1, 2]\n", ["'n_s'", "grid", "n_S"]),
    (BASE + "[resources]\ngpus = 1\n", ["'gpus'", "[resources]", "gpus_per_node"]),
    (BASE + "[resources]\nlauncher = \"cloud\"\n", ["launcher", "cloud"]),
    (BASE + "[[cells]]\ndataset = \"digits\"\nteacher = \"x\"\n", ["'teacher'", "[[cells]] number 1"]),
    (BASE + "[set]\nalpha = 0.9\nema_momentum = 0.8\n", ["ema_momentum", "twice"]),
    (BASE + "[set]\nalpha = 0.9\n[grid]\nalpha = [0.5]\n", ["ema_momentum", "both fixed", "swept"]),
    (BASE + "[grid]\nalpha = 0.9\n", ["'alpha'", "non-empty list"]),
    (BASE + "[grid]\nalpha = [0.9]\npts = [{alpha = 0.5}]\n", ["ema_momentum", "two grid entries"]),
    (BASE + "[grid]\nconditioning = [{cg = \"sum\"}]\n", ["'conditioning'", "joint axis"]),
    (BASE + "[set]\nmemory_size = 1024\n".replace('["abm", "mad"]', '["mad"]'), ["memory_size", "mad"]),
    (BASE.replace('"smoke"', '"huge"'), ["budget", "huge"]),
    (BASE.replace('["abm", "mad"]', '["abm", "madd"]'), ["madd", "registered methods"]),
    (BASE.replace('"digits"', '"digitz"'), ["digitz"]),
    (BASE.replace("seeds = [0, 1]", "seeds = 0"), ["seeds", "list of integers"]),
    (BASE.replace('dataset = "digits"', ""), ["no dataset"]),
    (BASE + "[set\n", ["not valid TOML"]),
])
def test_bad_files_are_one_line_errors(tmp_path, text, fragments):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as excinfo:
        sweep.load_experiment(path)
    one_line_error(excinfo, str(path), *fragments)


def test_bad_values_fail_at_expansion_with_the_file_and_point(tmp_path):
    path = write(tmp_path, BASE + "[grid]\nlambda3 = [0.0, 0.5]\n")  # uncond generator: NLL needs labels
    experiment = sweep.load_experiment(path)
    with pytest.raises(ConfigError) as excinfo:
        sweep.plan_experiment(experiment, teacher_cache=str(tmp_path), allow_missing_teacher=True)
    one_line_error(excinfo, str(path), "nll_weight=0.5", "conditioning=uncond")
    path = write(tmp_path, BASE + "[set]\nn_S = \"many\"\n")
    with pytest.raises(ConfigError) as excinfo:
        sweep.plan_experiment(sweep.load_experiment(path), teacher_cache=str(tmp_path), allow_missing_teacher=True)
    one_line_error(excinfo, str(path), "student_steps", "integer")


def test_missing_file_is_one_line_error(tmp_path):
    with pytest.raises(DfkdError) as excinfo:
        sweep.load_experiment(tmp_path / "nope.toml")
    one_line_error(excinfo, "nope.toml", "does not exist")


# ------------------------------------------------------- the two commands ---

def test_sweep_without_teacher_is_one_line_error(tmp_path):
    path = write(tmp_path, BASE)
    with pytest.raises(DfkdError) as excinfo:
        run_cli(["sweep", str(path), "--teacher-cache", str(tmp_path / "none"), "--results-dir", str(tmp_path / "r")])
    one_line_error(excinfo, "teacher", "dfkd-bench teacher train --dataset digits --arch lenet5")
    assert not (tmp_path / "r").exists()


def test_sweep_status_end_to_end(tmp_path, teacher_cache, digits_request, capsys):
    from dfkd_bench.cluster.experiment import build_run_configs

    results = tmp_path / "results"
    path = write(tmp_path, """
name = "e2e"
methods = ["abm", "mad"]
seeds = [0]
budget = "smoke"
dataset = "digits"
[resources]
launcher = "inline"
no_progress = true
""")
    common = ["--teacher-cache", str(teacher_cache), "--results-dir", str(results)]
    # dry run: nothing exists yet
    assert run_cli(["sweep", str(path), "--dry-run", *common]) == 0
    out = capsys.readouterr().out
    assert "2 runs; 2 pending (dry run: nothing launched)" in out
    assert not results.exists()

    # the same run as digits_request's: a sweep of just ABM trains it (inline, from the file's resources)
    abm = build_run_configs(digits_request(methods=["abm"]))[0]
    abm_only = write(tmp_path, path.read_text().replace('["abm", "mad"]', '["abm"]'), "abm.toml")
    assert run_cli(["sweep", str(abm_only), *common]) == 0
    out = capsys.readouterr().out
    assert "1 runs: 0 already done (skipped), 1 to run [inline launcher]" in out
    assert (results / abm.run_name / "done").exists()
    assert "abm" in out and "FINAL ACC" in out

    # the dry run now sees it done, the other pending
    assert run_cli(["sweep", str(path), "--dry-run", *common]) == 0
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if line.startswith(abm.run_name))
    assert line.rstrip().endswith("done")
    assert "2 runs; 1 done, 1 pending" in out

    # relaunching a finished sweep skips it
    assert run_cli(["sweep", str(abm_only), *common]) == 0
    assert "1 already done (skipped), 0 to run" in capsys.readouterr().out

    # a failed run (as a job leaves it: records, a checkpoint pointer, an error), nested one level down
    mad = build_run_configs(digits_request(methods=["mad"], seeds=[3]))[0]
    failed = results / "other" / mad.run_name  # a config that matches its run id (else: damaged)
    failed.mkdir(parents=True)
    config = mad.to_dict() | {"run_id": mad.run_id, "run_name": failed.name}
    (failed / "config.json").write_text(json.dumps(config))
    (failed / "records.jsonl").write_text(json.dumps({"kind": "eval", "step": 0}) + "\n"
                                          + json.dumps({"kind": "eval", "step": 2}) + "\n")
    (failed / "error.txt").write_text("Traceback (most recent call last):\n  ...\nRuntimeError: boom at iteration 3\n")
    # a run that failed before writing its config (e.g. its teacher vanished): found by its error file
    early = results / "abm-digits-lenet5_half-s7-aaaaaaaaaaaa"
    early.mkdir()
    (early / "error.txt").write_text("CheckpointError: teacher checkpoint /x.pt does not exist\n")
    # not runs: submitit's folder and a stray file
    (results / "_submitit").mkdir()
    (results / "notes.txt").write_text("hello")

    # a run whose job just started: only its lock, held
    from dfkd_bench.store import RunStore

    starting = RunStore(results, "mem-digits-lenet5_half-s0-bbbbbbbbbbbb")
    with starting.lock():
        assert run_cli(["status", "--results-dir", str(results)]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line for line in out.splitlines()[1:-1]}
    assert set(rows) == {abm.run_name, "other/" + failed.name, early.name, starting.name}
    assert rows[starting.name].split()[1:6] == ["mem", "digits", "0", "running", "-"]
    done_row = rows[abm.run_name].split()
    summary = json.loads((results / abm.run_name / "done").read_text())
    assert done_row[1:5] == ["abm", "digits", "0", "done"]
    assert done_row[5] == f"{abm.train.total_iterations}/{abm.train.total_iterations}"
    assert done_row[6] == f"{summary['final_accuracy']:.2f}"
    failed_row = rows["other/" + failed.name]
    assert failed_row.split()[1:6] == ["mad", "digits", "3", "failed", f"2/{abm.train.total_iterations}"]
    assert failed_row.rstrip().endswith("error: RuntimeError: boom at iteration 3")
    assert rows[early.name].split()[1:5] == ["abm", "digits", "7", "failed"]
    assert "CheckpointError: teacher checkpoint /x.pt does not exist" in rows[early.name]
    assert out.splitlines()[-1] == f"4 runs under {results}: 1 done, 1 running, 2 failed"


def test_status_without_runs_is_one_line_error(tmp_path):
    with pytest.raises(DfkdError) as excinfo:
        run_cli(["status", "--results-dir", str(tmp_path)])
    one_line_error(excinfo, "no runs under", str(tmp_path))
    with pytest.raises(DfkdError) as excinfo:
        run_cli(["status", "--results-dir", str(tmp_path / "missing")])
    one_line_error(excinfo, "does not exist")


def test_sweep_launcher_flags_override_resources(tmp_path, monkeypatch):
    """The file's [resources] reach launch(); command-line flags win over them."""
    from dfkd_bench.cluster import launch as launch_module

    seen = {}

    def fake_launch(configs, results_dir, args, file_options=None):
        seen["options"] = launch_module.launch_options(args, file_options)
        seen["configs"] = configs
        seen["results_dir"] = results_dir
        return []

    monkeypatch.setattr(launch_module, "launch", fake_launch)
    cache = tmp_path / "cache"
    cache.mkdir()
    # an untrained teacher in the cache is enough to expand (it is checked against the architecture)
    import torch

    from dfkd_bench.models import build_model

    torch.save({"state_dict": build_model("lenet5", 10, 1, 16).state_dict(), "meta": {}}, cache / "digits-lenet5.pt")
    path = write(tmp_path, BASE + """
[resources]
launcher = "slurm"
time = 600
mem_gb = 16
slurm_extra = {exclude = "node3"}
""")
    assert run_cli(["sweep", str(path), "--teacher-cache", str(cache), "--time", "30", "--partition", "gpu"]) == 0
    options = seen["options"]
    assert (options["launcher"], options["time"], options["mem_gb"], options["partition"]) == ("slurm", 30, 16, "gpu")
    assert options["slurm_extra"] == ["exclude=node3"]
    assert str(seen["results_dir"]) == "results/t"
    assert len(seen["configs"]) == 4
