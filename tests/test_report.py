"""``dfkd_bench.report`` on a results folder written by the test itself (no training).

The fake folder mimics what the engine writes (see dfkd_bench/store.py):
two datasets, ABM / DFKD-Mem / MAD with two seeds each and known final and
best accuracies, plus a one-seed extra method, an ``ema_momentum`` sweep, a
joint (lambda0, lambda1) sweep and a memory-size sweep, one incomplete run,
one torn records line, one duplicated run folder and a ``_submitit`` folder.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from dfkd_bench.config import resolve_method_params
from dfkd_bench.errors import DfkdError
from dfkd_bench.presets import get_preset
from dfkd_bench.report import add_report_command, load_records, load_runs, sweep_points, write_report

TEACHER_ACCURACY = {"digits": 98.5, "mnist": 99.25}
PAIR = "lenet5→lenet5_half"


def _planned_iterations(dataset: str) -> int:
    train = get_preset(dataset).train_config("lenet5", "lenet5_half")
    return train.epochs * train.steps_per_epoch


PLANNED = {dataset: _planned_iterations(dataset) for dataset in TEACHER_ACCURACY}


def make_config(method: str, dataset: str, seed: int, params: dict | None = None, budget: str = "default",
                teacher: str = "") -> dict:
    """A resolved config as the engine writes it: the preset's settings plus ``params`` overrides."""
    preset = get_preset(dataset)
    train = dataclasses.asdict(preset.train_config(preset.teacher_arch, preset.student_arch))
    if method in ("abm", "mem", "mad"):
        resolved = resolve_method_params(method, preset.params, {})
    else:  # a method this install does not know: its preset defaults cannot be known either
        resolved = {"kd_weight": 1.0}
    resolved.update(params or {})
    identity = json.dumps([method, dataset, seed, resolved, budget, teacher], sort_keys=True)
    run_id = hashlib.sha256(identity.encode()).hexdigest()[:12]
    return {
        "method": method, "dataset": dataset, "seed": seed, "student_arch": preset.student_arch,
        "image_size": preset.image_size, "num_classes": 10, "channels": 1, "preset": dataset, "budget": budget,
        "teacher": {"arch": preset.teacher_arch, "path": "/x/t.pt", "sha256": teacher or f"sha-{dataset}", "mean": [0.3],
                    "std": [0.3], "test_accuracy": TEACHER_ACCURACY[dataset] - 0.01},
        "teacher_test_accuracy_here": TEACHER_ACCURACY[dataset], "train": train, "params": resolved,
        "run_id": run_id, "run_name": f"{method}-{dataset}-{preset.student_arch}-s{seed}-{run_id}",
        "environment": {"device": "cpu"},
    }


def write_run(root: Path, method: str, dataset: str, seed: int, final: float, best: float, *,
              params: dict | None = None, done: bool = True, samples: bool = False, torn: bool = False,
              **identity) -> Path:
    """Records at steps 0, 10, 20: accuracy 10, then ``best``, then ``final`` (the last evaluation)."""
    config = make_config(method, dataset, seed, params, **identity)
    folder = root / config["run_name"]
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    base = {"run": config["run_name"], "method": method, "seed": seed}
    steps = [(0, 10.0), (10, best), (20, final)] if done else [(0, 10.0), (10, final)]
    lines = []
    for index, (step, accuracy) in enumerate(steps):
        record = {**base, "kind": "eval", "step": step, "epoch": step / 20, "wall_time": 5.0 * step, "lr": 0.05,
                  "test_accuracy": accuracy, "test_cross_entropy": 2.3 - accuracy / 50,
                  "teacher_agreement": accuracy + 1}
        if step:
            record.update({"loss/student_loss": 1.0 / index + seed * 0.05, "loss/kd_gen": 0.8 / index + seed * 0.02,
                           "loss/gen_loss": -0.7 / index, "loss/gen_kd": 0.7 / index, "loss/student_bound": 0.0})
            if method == "mad":
                record["loss/kd_gen_ema"] = 0.5 / index + seed * 0.03
            if method == "mem":
                record["loss/kd_memory"] = 0.3 / index + (params or {}).get("memory_size", 8192) / 1e5
        lines.append(record)
        if step:
            drift = {**base, "kind": "drift", "step": step, "tau": 5, "js_gen": 0.1 + 0.01 * index + 0.005 * seed}
            if method == "mad":
                drift["js_gen_ema"] = 0.08 + 0.01 * index
            lines.append(drift)
    if samples:
        (folder / "samples").mkdir()
        files = {}
        sources = ["gen", "gen_ema"] if method == "mad" else ["gen"]
        rng = np.random.default_rng(seed)
        from matplotlib.image import imsave

        for source in sources:
            relative = f"samples/step0000020_{source}.png"
            imsave(folder / relative, rng.random((40, 40)), cmap="gray")
            files[source] = relative
        lines.append({**base, "kind": "samples", "step": 20, "files": files})
    text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in lines)
    if torn:  # a kill in the middle of an append
        text += '{"kind": "eval", "step": 30, "test_acc'
    (folder / "records.jsonl").write_text(text)
    if done:
        (folder / "done").write_text(json.dumps({"final_accuracy": final, "best_accuracy": best, "wall_time": 100.0,
                                                 "iterations": 20, "run": config["run_name"]}))
    return folder


FINALS = {  # (dataset, method) -> [(final, best) per seed]
    ("digits", "abm"): [(90.0, 93.0), (92.0, 95.0)],
    ("digits", "mem"): [(85.0, 88.0), (86.0, 89.0)],
    ("digits", "mad"): [(92.0, 96.0), (94.0, 94.0)],
    ("mnist", "abm"): [(97.0, 97.5), (98.0, 98.0)],
    ("mnist", "mem"): [(96.0, 97.0), (96.5, 97.5)],
    ("mnist", "mad"): [(98.0, 99.0), (98.5, 99.0)],
}


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("results") / "runs"
    for (dataset, method), values in FINALS.items():
        group = root / "grid" / dataset  # runs may sit at any depth
        for seed, (final, best) in enumerate(values):
            write_run(group, method, dataset, seed, final, best, samples=seed == 0 and dataset == "digits",
                      torn=(dataset, method, seed) == ("digits", "abm", 0))
    write_run(root / "extra", "dafl", "digits", 0, 70.0, 75.0)
    # Fig. 6 middle: MAD's momentum alpha, 3 values x 2 seeds (0.95 is the preset default).
    for alpha, finals in ((0.9, (80.0, 82.0)), (0.99, (88.0, 90.0))):
        for seed, final in enumerate(finals):
            write_run(root / "sweeps" / "alpha", "mad", "digits", seed, final, final + 1, params={"ema_momentum": alpha})
    # Fig. 6 right: (lambda0, lambda1) pairs vary jointly.
    for kd, ema in ((0.0, 1.0), (1.0, 0.0), (0.5, 0.5)):
        write_run(root / "sweeps" / "lambda", "mad", "mnist", 0, 90.0 + kd, 91.0,
                  params={"kd_weight": kd, "ema_kd_weight": ema})
    # Fig. 7: DFKD-Mem memory size.
    write_run(root / "sweeps" / "memory", "mem", "mnist", 0, 95.0, 96.0, params={"memory_size": 1024})
    # A smoke test with another teacher is not part of the comparison (nor a sweep).
    write_run(root / "smoke", "abm", "digits", 0, 11.0, 12.0, budget="smoke", teacher="sha-other")
    # An unfinished run: it must be listed and never averaged in (its 10 % would drag MAD down).
    write_run(root / "grid" / "digits", "mad", "digits", 2, 10.0, 10.0, done=False)
    # A copy of a finished run (same run id) counts once; _submitit logs are skipped.
    original = next((root / "grid" / "mnist").glob("abm-*-s0-*"))
    shutil.copytree(original, root / "copied" / original.name)
    (root / "_submitit" / "x").mkdir(parents=True)
    (root / "_submitit" / "x" / "config.json").write_text(json.dumps({"method": "abm", "dataset": "digits", "seed": 9}))
    return root


@pytest.fixture(scope="module")
def report(results, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    # PNG only here to keep the test fast; the CLI test below checks PDFs too.
    return out, write_report(results, out, formats=("png",), command="dfkd-bench report --test")


def test_load_runs(results):
    runs = load_runs(results)
    assert len(runs) == 6 * 2 + 1 + 4 + 3 + 1 + 1 + 1  # the copy and the _submitit config are not runs
    assert any("found twice" in note for note in runs.attrs["notes"])
    assert (runs["pair"] == PAIR).all()
    assert runs["status"].value_counts().to_dict() == {"done": 22, "incomplete": 1}
    abm = runs[(runs["method"] == "abm") & (runs["dataset"] == "digits") & (runs["budget"] == "default")]
    abm = abm.set_index("seed")
    assert abm.loc[0, "final_accuracy"] == 90.0 and abm.loc[0, "best_accuracy"] == 93.0
    assert abm.loc[1, "teacher_accuracy"] == 98.5 and abm.loc[1, "teacher_arch"] == "lenet5"
    assert {"train.student_steps", "params.kd_weight", "params.ema_momentum"} <= set(runs.columns)
    pending = runs[runs["status"] == "incomplete"].iloc[0]
    assert pending["seed"] == 2 and pending["last_step"] == 10 and pending["planned_iterations"] == PLANNED["digits"]
    # Runs differing only by seed share a configuration id; the sweep points do not.
    mad = runs[(runs["method"] == "mad") & (runs["dataset"] == "digits") & (runs["status"] == "done")]
    assert mad.groupby("params.ema_momentum")["config_id"].nunique().tolist() == [1, 1, 1]
    assert mad["config_id"].nunique() == 3


def test_load_records_ignores_torn_line_and_joins_run_columns(results):
    records = load_records(results)
    torn = records[(records["method"] == "abm") & (records["dataset"] == "digits") & (records["seed"] == 0)
                   & (records["budget"] == "default")]
    assert len(torn) == 3 + 2 + 1  # 3 evals, 2 drifts, 1 samples; the torn step-30 line is dropped
    assert sorted(torn.loc[torn["kind"] == "eval", "step"]) == [0, 10, 20]
    assert {"pair", "status", "run_wall_time", "wall_time", "params.kd_weight"} <= set(records.columns)
    assert set(records["kind"]) == {"eval", "drift", "samples"}


def test_final_table_values(report):
    out, result = report
    table = pd.read_csv(out / "table_final.csv")
    assert list(dict.fromkeys(table["row"])) == ["teacher", "abm", "mem", "mad", "dafl"]
    cell = table.set_index(["row", "dataset"])
    assert cell.loc[("abm", "digits"), "mean"] == 91.0
    assert cell.loc[("abm", "digits"), "std"] == pytest.approx(math.sqrt(2), abs=1e-12)
    assert cell.loc[("abm", "digits"), "n"] == 2
    assert cell.loc[("abm", "digits"), "cell"] == "91.00 ± 1.41"
    assert cell.loc[("mem", "mnist"), "cell"] == "96.25 ± 0.35"
    # MAD's table cell uses the preset-default momentum (0.95), not the sweep, and not the incomplete seed 2.
    # The unfinished seed is not in the mean, but the cell says there is one (‡) and the CSV counts it.
    assert cell.loc[("mad", "digits"), "cell"] == "93.00 ± 1.41‡" and cell.loc[("mad", "digits"), "mean"] == 93.0
    assert cell.loc[("mad", "digits"), "unfinished"] == 1 and cell.loc[("mad", "mnist"), "unfinished"] == 0
    assert "preset defaults" in cell.loc[("mad", "digits"), "selection"]
    assert cell.loc[("mad", "mnist"), "cell"] == "98.25 ± 0.35"
    assert cell.loc[("mem", "mnist"), "n"] == 2  # memory_size 1024 is a sweep point, not a third seed
    assert cell.loc[("abm", "mnist"), "n"] == 2  # the copied folder counts once
    assert cell.loc[("dafl", "digits"), "cell"] == "70.00†" and cell.loc[("dafl", "digits"), "n"] == 1
    assert ("dafl", "mnist") not in cell.index
    assert cell.loc[("teacher", "digits"), "mean"] == 98.5 and cell.loc[("teacher", "mnist"), "cell"] == "99.25"

    markdown = (out / "table_final.md").read_text()
    # 95 % t-intervals with t_{0.975, 1} = 12.706 (t table): 91 ± 12.706 * sqrt(2) / sqrt(2) = [78.29, 103.71].
    assert "| ABM | 91.00 ± 1.41 [78.29, 103.71] n=2 | **97.50 ± 0.71** [91.15, 103.85] n=2 |" in markdown
    assert "| MAD | **93.00 ± 1.41**‡ [80.29, 105.71] n=2 | **98.25 ± 0.35** [95.07, 101.43] n=2 |" in markdown
    assert "‡ this method has runs in this column that are not finished" in markdown
    assert "| MAD | digits (lenet5→lenet5_half) | 2 | stopped at iteration 10 of " in markdown  # the listing
    assert "| DAFL | 70.00† | — |" in markdown
    assert markdown.index("| Teacher |") < markdown.index("| ABM |") < markdown.index("| DFKD-Mem |") \
        < markdown.index("| MAD |") < markdown.index("| DAFL |")
    assert "n=1" in markdown
    latex = (out / "table_final.tex").read_text()
    assert r"91.00 $\pm$ 1.41 [78.29, 103.71] $n{=}2$" in latex and r"\textbf{93.00 $\pm$ 1.41}" in latex
    assert r"lenet5$\rightarrow$lenet5\_half" in latex and "70.00$^\\dagger$" in latex
    assert r"\textbf{93.00 $\pm$ 1.41}$^\ddagger$" in latex
    assert "±" not in latex and "†" not in latex and "‡" not in latex


def test_best_table_is_separate_and_labelled(report):
    out, _ = report
    best = pd.read_csv(out / "table_best.csv").set_index(["row", "dataset"])
    assert best.loc[("abm", "digits"), "cell"] == "94.00 ± 1.41"
    assert best.loc[("mad", "digits"), "mean"] == 95.0
    markdown = (out / "table_best.md").read_text()
    assert "selected on the test set" in markdown and "optimistic" in markdown


def test_incomplete_runs_listed_not_mixed_in(report, results):
    out, result = report
    pending = [name for name in load_runs(results)["run_name"] if name.startswith("mad-digits") and "-s2-" in name]
    assert len(result["incomplete_runs"]) == 1
    planned = PLANNED["digits"]
    assert result["incomplete_runs"][0].startswith(f"{pending[0]} (incomplete, step 10 of {planned}")
    listing = (out / "incomplete.md").read_text()
    assert pending[0] in listing and f"10 / {planned}" in listing
    report_md = (out / "report.md").read_text()
    assert pending[0] in report_md and "dfkd-bench report --test" in report_md
    assert "91.00 ± 1.41" in report_md and "optimistic" in report_md
    assert "(accuracy_curves.png)" in report_md and "min–max over seeds" in report_md
    assert "preset defaults" in report_md
    # The smoke run with another teacher is named as left out, not averaged in (ABM stays 91.00).
    runs = load_runs(results)
    smoke = runs.loc[runs["budget"] == "smoke", "run_name"].item()
    assert smoke in report_md
    assert any("left out of the tables" in note and smoke in note for note in result["notes"])


def test_sweep_points(results):
    points = sweep_points(load_runs(results))
    alpha = points[points["sweep"] == "ema_momentum"]
    assert list(alpha["value"]) == [0.9, 0.95, 0.99]
    assert list(alpha["mean"]) == [81.0, 93.0, 89.0]
    assert alpha["std"].tolist() == pytest.approx([math.sqrt(2)] * 3)
    assert list(alpha["n"]) == [2, 2, 2] and list(alpha["is_table_config"]) == [False, True, False]
    assert set(alpha["method"]) == {"mad"} and set(alpha["dataset"]) == {"digits"}
    # kd_weight and ema_kd_weight change together in one configuration: one joint, categorical sweep.
    joint = points[points["sweep"] == "ema_kd_weight+kd_weight"]
    assert list(joint["label"]) == ["(0, 1)", "(0.5, 0.5)", "(1, 0)", "(1, 1)"]
    assert list(joint["mean"]) == [91.0, 90.5, 90.0, 98.25]
    assert joint["std"].isna().tolist() == [True, True, True, False]
    memory = points[points["sweep"] == "memory_size"]
    assert list(memory["value"]) == [1024, 8192] and list(memory["mean"]) == [95.0, 96.25]
    assert set(points["sweep"]) == {"ema_momentum", "ema_kd_weight+kd_weight", "memory_size"}


def _assert_image(path: Path) -> None:
    from matplotlib.image import imread

    assert path.exists(), path
    assert path.stat().st_size > 10_000, path
    image = imread(path)
    assert image.std() > 0.02, f"{path} looks blank"


def test_figures_written(report):
    out, result = report
    stems = ["accuracy_curves", "loss_curves", "generator_losses", "drift_curves", "samples_digits_abm",
             "samples_digits_mem", "samples_digits_mad", "sweep_ema_momentum", "sweep_ema_kd_weight+kd_weight",
             "sweep_memory_size", "critical_difference"]
    for stem in stems:
        _assert_image(out / f"{stem}.png")
    assert sorted(Path(p).name for p in result["figures"]) == sorted(f"{s}.png" for s in stems)
    assert {Path(p).name for p in result["tables"]} == {f"table_{k}.{e}" for k in ("final", "best")
                                                         for e in ("csv", "md", "tex")} | {"table_cost.csv"} \
        | {"table_ranks.csv", "table_ranks.md", "table_sweeps.csv"}


def test_cli_end_to_end(results, tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="dfkd-bench")
    sub = parser.add_subparsers(dest="command")
    add_report_command(sub)
    defaults = parser.parse_args(["report"])
    assert (defaults.results_dir, defaults.out, defaults.formats) == (None, None, ("png", "pdf"))  # None: results/runs
    with pytest.raises(SystemExit):
        parser.parse_args(["report", "--formats", "png,nope"])
    assert not defaults.finished_only and parser.parse_args(["report", "--finished-only"]).finished_only

    small = tmp_path / "runs"
    for seed, final in enumerate((90.0, 92.0)):
        write_run(small, "abm", "digits", seed, final, final + 1)
    write_run(small, "mad", "digits", 0, 50.0, 50.0, done=False)
    damaged = write_run(small, "mem", "digits", 0, 88.0, 89.0)
    lines = (damaged / "records.jsonl").read_text().splitlines()
    lines[1] = lines[1][:20]  # a damaged line in the middle is not a torn last line: the run is unreadable
    (damaged / "records.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "report"
    args = parser.parse_args(["report", "--results-dir", str(small), "--out", str(out), "--formats", "png,pdf"])
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert "91.00 ± 1.41" in printed and "Teacher" in printed
    assert "2 incomplete run(s)" in printed and "mad-digits-lenet5_half-s2" not in printed
    assert "mad-digits-lenet5_half-s0" in printed and str(out) in printed
    assert f"{damaged.name} (damaged" in printed and "not valid JSON" in printed
    assert "DFKD-Mem" not in (out / "table_final.md").read_text()
    _assert_image(out / "accuracy_curves.png")
    assert (out / "accuracy_curves.pdf").read_bytes().startswith(b"%PDF") and not (out / "loss_curves.svg").exists()
    assert "--results-dir" in (out / "report.md").read_text() and "--formats png,pdf" in (out / "report.md").read_text()

    for missing in (tmp_path / "nowhere", tmp_path / "empty"):
        if missing.name == "empty":
            missing.mkdir()
        args = parser.parse_args(["report", "--results-dir", str(missing), "--out", str(tmp_path / "r2")])
        with pytest.raises(DfkdError) as error:
            args.func(args)
        assert "\n" not in str(error.value) and str(missing) in str(error.value)
    assert "no runs found under" in str(error.value)


def test_cost_table_gives_wall_time_and_where_it_ran(report):
    out, _ = report
    costs = pd.read_csv(out / "table_cost.csv").set_index(["row", "dataset"])
    # every finished grid run's done file says 100 s; the incomplete MAD seed 2 is not counted
    assert costs.loc[("mad", "digits"), "minutes_mean"] == pytest.approx(100 / 60)
    assert costs.loc[("mad", "digits"), "n"] == 2 and costs.loc[("mad", "digits"), "device"] == "cpu"
    assert "teacher" not in costs.index.get_level_values("row")
    # the fake runs record no stage times and no image counters ("—"); one run per device
    assert "| MAD | digits (lenet5→lenet5_half) | 1.7 ± 0.0 | — | — / — | 2 | cpu |" in (out / "report.md").read_text()
    assert str(costs.loc[("mad", "digits"), "runs_per_gpu"]) == "1"


# ------------------------------------------------------- failing loudly (issue 15) ---

def _strict_loads(line: str):
    def refuse(token):
        raise ValueError(f"non-standard JSON token {token}")

    return json.loads(line, parse_constant=refuse)


def test_records_are_strict_json_and_old_nan_records_still_read(tmp_path):
    import torch

    from dfkd_bench.store import RunStore, atomic_write_json, read_jsonl

    store = RunStore(tmp_path, "run")
    store.path.mkdir()
    store.append_record({"kind": "eval", "step": 1, "loss/gen_kd": float("nan"), "loss/kd_gen": float("inf"),
                         "a": np.float32("nan"), "b": torch.tensor(float("-inf")), "c": np.float64(2.5),
                         "nested": [1.0, float("nan")], "test_accuracy": 50.0})
    store.rewrite_records(store.read_records() + [{"kind": "eval", "step": 2, "x": float("nan")}])
    lines = store.records_path.read_text().splitlines()
    parsed = [_strict_loads(line) for line in lines]  # a strict reader takes every line
    assert parsed[0] == {"kind": "eval", "step": 1, "loss/gen_kd": None, "loss/kd_gen": None, "a": None, "b": None,
                         "c": 2.5, "nested": [1.0, None], "test_accuracy": 50.0}
    assert parsed[1]["x"] is None and store.read_records() == parsed
    atomic_write_json(tmp_path / "done.json", {"final_accuracy": float("nan")})
    assert _strict_loads((tmp_path / "done.json").read_text()) == {"final_accuracy": None}

    # records written before this change hold bare NaN / Infinity tokens: still read
    old = tmp_path / "old.jsonl"
    old.write_text('{"kind": "eval", "step": 0, "loss/gen_kd": NaN, "x": Infinity}\n')
    (record,) = read_jsonl(old)
    assert math.isnan(record["loss/gen_kd"]) and record["x"] == math.inf


def test_damaged_records_name_file_and_line(tmp_path):
    from dfkd_bench.store import RecordsError, read_jsonl

    path = tmp_path / "records.jsonl"
    good = json.dumps({"kind": "eval", "step": 0}).encode()
    path.write_bytes(good + b"\n" + b'{"kind": "eval", "step": 2, "x": "\xff\xfe"}\n' + good + b"\n")
    with pytest.raises(RecordsError) as error:
        read_jsonl(path)
    message = str(error.value)
    assert f"{path}: line 2 is not valid UTF-8" in message and "\n" not in message and error.value.line == 2
    assert "Error" not in message
    # a kill can cut a multi-byte character in the last line: that line is torn, not damage
    path.write_bytes(good + b"\n" + b'{"kind": "eval", "x": "\xc3')
    assert read_jsonl(path) == [{"kind": "eval", "step": 0}]


def _run_status(results: Path, capsys) -> tuple[dict[str, str], str]:
    from dfkd_bench.cluster.sweep import print_status, scan_results

    print_status(scan_results(results), results)
    lines = capsys.readouterr().out.splitlines()
    return {line.split()[0]: line for line in lines[1:-1]}, lines[-1]


def test_damaged_and_missing_records_of_done_runs_are_named_in_status_and_report(tmp_path, capsys):
    results = tmp_path / "runs"
    fine = write_run(results, "abm", "digits", 0, 90.0, 91.0)
    damaged = write_run(results, "abm", "digits", 1, 92.0, 93.0)
    lines = (damaged / "records.jsonl").read_bytes().split(b"\n")
    lines[2] = b"\xff" + lines[2]
    (damaged / "records.jsonl").write_bytes(b"\n".join(lines))
    deleted = write_run(results, "abm", "digits", 2, 50.0, 51.0)
    (deleted / "records.jsonl").unlink()

    rows, counts = _run_status(results, capsys)
    assert rows[fine.name].split()[4] == "done"
    assert rows[damaged.name].split()[4] == "damaged" and "done, records damaged at line 3" in rows[damaged.name]
    assert rows[deleted.name].split()[4] == "damaged" and "done, records.jsonl is missing" in rows[deleted.name]
    assert counts == f"3 runs under {results}: 1 done, 2 damaged"

    result = write_report(results, tmp_path / "report", formats=("png",))
    table = pd.read_csv(tmp_path / "report" / "table_final.csv").set_index("row")
    assert table.loc["abm", "n"] == 1 and table.loc["abm", "mean"] == 90.0  # neither damaged run is in the mean
    listed = "\n".join(result["incomplete_runs"])
    assert f"{damaged.name} (damaged" in listed and "line 3 is not valid UTF-8" in listed
    assert f"{deleted.name} (damaged" in listed and "records.jsonl is missing" in listed and "50.0" in listed


def test_report_out_that_cannot_be_written_is_one_error_line(results, tmp_path, monkeypatch):
    import errno
    import os
    import tempfile

    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(DfkdError) as error:
        write_report(results, a_file / "report", formats=("png",))
    message = str(error.value)
    assert message.startswith(f"cannot write the report into {a_file / 'report'}: Not a directory")
    assert "\n" not in message and "Error" not in message

    if os.geteuid() != 0:  # root writes into read-only folders anyway
        read_only = tmp_path / "ro"
        read_only.mkdir()
        read_only.chmod(0o500)
        try:
            with pytest.raises(DfkdError, match="Permission denied"):
                write_report(results, read_only, formats=("png",))
        finally:
            read_only.chmod(0o700)

    def read_only_disk(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(tempfile, "NamedTemporaryFile", read_only_disk)
    with pytest.raises(DfkdError) as error:
        write_report(results, tmp_path / "elsewhere", formats=("png",))
    assert str(error.value) == (f"cannot write the report into {tmp_path / 'elsewhere'}: Read-only file system; "
                                "pass a writable folder with --out")


def test_report_without_out_writes_beside_the_runs(tmp_path, capsys):
    from dfkd_bench import cli

    results = tmp_path / "mine"
    write_run(results, "abm", "digits", 0, 90.0, 91.0)
    assert cli.main(["report", "--results-dir", str(results), "--formats", "png"]) == 0
    assert (results / "report" / "report.md").exists() and (results / "report" / "accuracy_curves.png").exists()
    printed = capsys.readouterr().out
    assert f"start with {results / 'report' / 'report.md'}" in printed
    assert f"--out {results / 'report'}" in (results / "report" / "report.md").read_text()
    # the report folder beside the runs does not count as a run on the next report
    assert len(load_runs(results)) == 1


def test_report_over_several_results_folders(tmp_path):
    from dfkd_bench import cli

    first, second = tmp_path / "a", tmp_path / "b"
    write_run(first, "abm", "digits", 0, 90.0, 91.0)
    write_run(second, "abm", "digits", 1, 92.0, 93.0)
    write_run(second, "mad", "digits", 0, 80.0, 81.0)
    assert cli.main(["report", "--results-dir", str(first), "--results-dir", str(second), "--formats", "png"]) == 0
    report = (first / "report" / "report.md").read_text()  # beside the first folder's runs
    assert f"--results-dir {first} --results-dir {second} --out {first / 'report'}" in report
    assert f"`{first}`, `{second}`: 3 run(s) found" in report
    table = pd.read_csv(first / "report" / "table_final.csv").set_index(["row", "dataset"])
    assert table.loc[("abm", "digits"), "n"] == 2 and table.loc[("abm", "digits"), "mean"] == 91.0
    assert table.loc[("mad", "digits"), "mean"] == 80.0 and not (second / "report").exists()


def test_report_on_a_file_or_only_damaged_configs_says_so(tmp_path):
    a_file = tmp_path / "runs.txt"
    a_file.write_text("x")
    with pytest.raises(DfkdError, match="is a file, not a results folder"):
        load_runs(a_file)
    run = write_run(tmp_path / "runs", "abm", "digits", 0, 90.0, 91.0)
    (run / "config.json").write_text((run / "config.json").read_text()[:25])
    with pytest.raises(DfkdError) as error:
        load_runs(tmp_path / "runs")
    assert "damaged config.json" in str(error.value) and str(run) in str(error.value)


def test_auto_settings_match_the_value_a_run_resolved():
    """Runs store amp=none (auto resolved on a CPU); the preset's default is auto: still the preset defaults."""
    from dfkd_bench.report.configs import _matches

    assert _matches({"train.amp": "none", "params.ema_momentum": 0.95},
                    {"train.amp": "auto", "params.ema_momentum": 0.95})
    assert not _matches({"train.amp": "none", "params.ema_momentum": 0.9},
                        {"train.amp": "auto", "params.ema_momentum": 0.95})
    assert not _matches({"train.amp": "bf16"}, {"train.amp": "none"})


# ------------------------------------------- which differences are real (issue 20) ---

def test_bold_follows_holm_corrected_paired_tests_against_the_columns_best(report):
    """Bold = the best and every method not significantly worse (paired t over seeds, Holm in the column).

    By hand (t with 1 df is Cauchy: two-sided p = 1 - (2/pi) atan|t|): digits, best MAD (92, 94):
    ABM (90, 92) differs by exactly -2 on both seeds (no spread: p = 0); DFKD-Mem (85, 86): differences
    -7, -8, t = -7.5 / (sqrt(0.5) / sqrt 2) = -15, p = 0.0424; Holm (m = 2; DAFL, one seed, untested):
    0 -> 0, 0.0424 -> max(0, 1 x 0.0424): significant. MNIST, best MAD (98, 98.5): ABM (97, 98): t = -3,
    p = 0.2048, Holm 0.2048: ABM is bold although its mean is lower; DFKD-Mem (96, 96.5): p = 0.
    """
    out, _ = report
    table = pd.read_csv(out / "table_final.csv").set_index(["row", "dataset"])
    cauchy = lambda t: 1 - 2 / math.pi * math.atan(abs(t))  # noqa: E731
    assert table.loc[("mem", "digits"), "p"] == pytest.approx(cauchy(15))
    assert table.loc[("mem", "digits"), "p_holm"] == pytest.approx(cauchy(15))
    assert table.loc[("abm", "digits"), "p"] == 0.0
    assert table.loc[("abm", "mnist"), "p"] == pytest.approx(cauchy(3))
    assert table.loc[("abm", "mnist"), "p_holm"] == pytest.approx(cauchy(3))
    assert table.loc[("abm", "mnist"), "diff"] == pytest.approx(-0.75)
    assert set(table.loc[table["test"].notna(), "test"]) == {"paired t"}
    bold = table[table["tied_with_best"] == True].index  # noqa: E712
    assert sorted(bold) == [("abm", "mnist"), ("mad", "digits"), ("mad", "mnist")]
    assert math.isnan(table.loc[("dafl", "digits"), "p"]) and not table.loc[("dafl", "digits"), "tied_with_best"]
    assert table.loc[("abm", "mnist"), "seeds_needed"] > 2  # two seeds cannot resolve -0.75 here
    markdown = (out / "table_final.md").read_text()
    assert "Which differences from the column's best are real" in markdown
    assert "| mnist (lenet5→lenet5_half) | ABM | MAD | -0.75 [-3.93, +2.43] | paired t | 0.205 | 0.205 | yes | 2 |" \
        in markdown
    assert "| digits (lenet5→lenet5_half) | DAFL | MAD | -23.00 | not tested (one seed) |" in markdown
    assert "Holm-corrected within the column" in markdown


def test_welch_when_the_runs_cannot_be_paired(tmp_path):
    results = tmp_path / "runs"
    for seed, final in enumerate((95.0, 96.0, 97.0)):
        write_run(results, "abm", "digits", seed, final, final)
    for seed, final in zip((1, 2, 3), (94.0, 94.0, 96.0)):  # other seeds: nothing to pair
        write_run(results, "mad", "digits", seed, final, final)
    write_report(results, tmp_path / "report", formats=("png",))
    row = pd.read_csv(tmp_path / "report" / "table_final.csv").set_index("row").loc["mad"]
    # var 1 and 4/3: se = sqrt(7/9), t = (4/3) / se = 1.512 with 3.92 Welch df: p between the t table's
    # two-sided 0.30 (t = 1.19) and 0.20 (t = 1.533, 4 df).
    assert row["test"] == "Welch t" and row["diff"] == pytest.approx(-4 / 3)
    assert 0.19 < row["p"] < 0.22 and row["tied_with_best"]


def test_report_against_a_baseline(results, tmp_path, capsys):
    from dfkd_bench import cli

    out = tmp_path / "r"
    assert cli.main(["report", "--results-dir", str(results), "--out", str(out), "--formats", "png",
                     "--baseline", "abm"]) == 0
    table = pd.read_csv(out / "table_baseline.csv").set_index(["row", "dataset"])
    assert set(table.index) == {("mem", "digits"), ("mad", "digits"), ("dafl", "digits"), ("mem", "mnist"),
                                ("mad", "mnist")}
    # MAD (92, 94) vs ABM (90, 92): +2 on each seed; P(X > Y): 92>90, 92=92 (1/2), 94>90, 94>92 -> 3.5 / 4.
    assert table.loc[("mad", "digits"), "diff"] == 2.0 and table.loc[("mad", "digits"), "p"] == 0.0
    assert table.loc[("mad", "digits"), "prob_improvement"] == 0.875
    assert table.loc[("mem", "mnist"), "prob_improvement"] == 0.0
    assert table.loc[("dafl", "digits"), "n"] == 1 and math.isnan(table.loc[("dafl", "digits"), "p"])
    report_md = (out / "report.md").read_text()
    assert "## Against a baseline" in report_md and "--baseline abm" in report_md
    assert "| digits (lenet5→lenet5_half) | MAD | +2.00 [+2.00, +2.00] | paired t |" in report_md
    capsys.readouterr()
    for wrong, says in (("nope", "no run of it was found"), ("ABM", "no run of it was found")):
        elsewhere = tmp_path / f"not-{wrong}"
        assert cli.main(["report", "--results-dir", str(results), "--out", str(elsewhere), "--baseline", wrong]) != 0
        message = capsys.readouterr().err
        assert message.startswith(f"error: --baseline {wrong}: {says}") and "abm, dafl, mad, mem" in message
        assert message.count("\n") == 1 and not elsewhere.exists()  # one line, checked before anything is written


def test_average_ranks_friedman_and_critical_difference(report):
    out, _ = report
    ranks = pd.read_csv(out / "table_ranks.csv").set_index("method")
    # Both columns rank MAD 1, ABM 2, DFKD-Mem 3 (DAFL ran on digits only: not ranked).
    assert ranks["average_rank"].to_dict() == {"MAD": 1.0, "ABM": 2.0, "DFKD-Mem": 3.0}
    # chi2_F = 12 N / (k (k+1)) (sum R^2 - k (k+1)^2 / 4) = 12*2/12 * (14 - 12) = 4; df 2: p = exp(-2).
    assert ranks["friedman_chi2"].iloc[0] == pytest.approx(4.0)
    assert ranks["friedman_p"].iloc[0] == pytest.approx(math.exp(-2))
    assert ranks["nemenyi_cd"].iloc[0] == pytest.approx(2.343 * math.sqrt(3 * 4 / (6 * 2)), abs=1e-3)
    text = (out / "table_ranks.md").read_text()
    assert "Not ranked (no finished run in every column): DAFL" in text and "N = 2 columns" in text
    _assert_image(out / "critical_difference.png")
    assert "## Across data sets: average ranks" in (out / "report.md").read_text()


def test_figures_draw_every_series_a_method_records_under_its_own_names(tmp_path, monkeypatch):
    """A method the report has never heard of: its loss terms and drift source are drawn by their names."""
    from dfkd_bench.report import figures as report_figures

    results = tmp_path / "runs"
    renames = {"loss/kd_gen": "loss/kd_pool", "loss/gen_kd": "loss/gen_contrast", "js_gen": "js_pool"}
    for seed in (0, 1):
        folder = write_run(results, "poolish", "digits", seed, 80.0 + seed, 82.0)
        records = [json.loads(line) for line in (folder / "records.jsonl").read_text().splitlines()]
        records = [{renames.get(k, k): v for k, v in r.items()} for r in records]
        (folder / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    write_run(results, "mad", "digits", 0, 90.0, 91.0)
    drawn: dict[str, list[str]] = {}
    save = report_figures._save

    def spy(fig, out_dir, stem, formats):
        drawn[stem] = [ax.get_title() for ax in fig.axes] + \
            [text.get_text() for legend in fig.legends for text in legend.get_texts()]
        return save(fig, out_dir, stem, formats)

    monkeypatch.setattr(report_figures, "_save", spy)
    write_report(results, tmp_path / "report", formats=("png",))
    loss_panels = " ".join(drawn["loss_curves"])
    assert "kd_pool" in loss_panels and "kd_gen_ema" in loss_panels and "student_loss" in loss_panels
    assert "gen_contrast" not in loss_panels
    synthesis = " ".join(drawn["generator_losses"])
    assert "gen_contrast" in synthesis and "gen_kd" in synthesis and "kd_pool" not in synthesis
    drift = " ".join(drawn["drift_curves"])
    assert all(f"source '{s}'" in drift for s in ("gen", "gen_ema", "pool")) and "poolish (n=2)" in drift


def _with_published(folder: Path, published: dict) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update({"protocol": "paper", "published": published})
    (folder / "config.json").write_text(json.dumps(config))


def test_reproductions_table_under_the_papers_own_selection(tmp_path):
    results = tmp_path / "runs"
    best = {"accuracy": 93.0, "std": 0.5, "source": "Paper X, Table 2", "teacher_accuracy": 99.0, "selection": "best"}
    for seed, (final, top) in enumerate(((90.0, 93.0), (91.0, 95.0), (92.0, 94.0))):
        _with_published(write_run(results, "abm", "digits", seed, final, top), best)
    final = {"accuracy": 99.9, "std": None, "source": "Paper Y, Sec. 4", "teacher_accuracy": None, "selection": "final"}
    for seed, value in enumerate((92.0, 93.0, 94.0)):
        _with_published(write_run(results, "mad", "digits", seed, value, value + 1), final)
    write_run(results, "mem", "digits", 0, 88.0, 89.0)  # the common protocol: not a reproduction
    result = write_report(results, tmp_path / "report", formats=("png",))
    table = pd.read_csv(tmp_path / "report" / "table_reproductions.csv").set_index("row")
    assert list(table.index) == ["abm", "mad"]
    # "best": the best over each run's evaluations (93, 95, 94): mean 94, std 1, t_{0.975, 2} = 4.303.
    half = 4.303 * 1.0 / math.sqrt(3)
    abm = table.loc["abm"]
    assert (abm["selection"], abm["mean"], abm["std"], abm["n"]) == ("best", 94.0, 1.0, 3)
    assert (abm["ci_low"], abm["ci_high"]) == pytest.approx((94 - half, 94 + half), abs=1e-3)
    assert abm["diff"] == 1.0 and bool(abm["inside"]) and abm["protocol"] == "paper"
    assert abm["teacher_accuracy"] == 98.5 and abm["published_teacher_accuracy"] == 99.0
    mad = table.loc["mad"]  # "final": 92, 93, 94 -> 93 ± 1; 99.9 is far outside
    assert (mad["selection"], mad["mean"]) == ("final", 93.0) and mad["diff"] == pytest.approx(-6.9)
    assert not bool(mad["inside"]) and math.isnan(mad["published_std"])
    text = (tmp_path / "report" / "table_reproductions.md").read_text()
    assert "| ABM | digits (lenet5→lenet5_half) | best over training (test set) | 94.00 ± 1.00 (n=3) |" in text
    assert "| 93.00 ± 0.50 | +1.00 | yes | 98.50 / 99.00 | Paper X, Table 2 |" in text
    assert "| 99.90 | -6.90 | no | 98.50 / — | Paper Y, Sec. 4 |" in text
    assert "selected on the test set" in text
    report = Path(result["report"]).read_text()
    assert "## Reproductions" in report
    # no protocol card for a protocol the code does not declare (ABM and MAD have none on digits): said once each
    assert "- ABM on digits (lenet5→lenet5_half): no protocol card (abm has no paper protocol for digits" in report
    assert "- MAD on digits (lenet5→lenet5_half): no protocol card" in report
    assert not (tmp_path / "report" / "table_protocol_cards.csv").exists() or \
        pd.read_csv(tmp_path / "report" / "table_protocol_cards.csv").empty


def test_sweep_points_are_tested_against_the_table_configuration(report):
    out, _ = report
    sweeps = pd.read_csv(out / "table_sweeps.csv").set_index(["row", "dataset", "configuration"])
    # MAD alpha 0.9 (80, 82) and 0.99 (88, 90) against 0.95 (92, 94): -12 and -4 on both seeds (p = 0).
    low = sweeps.loc[("mad", "digits", "ema_momentum=0.9")]
    assert (low["diff"], low["p"], low["test"], low["n"]) == (-12.0, 0.0, "paired t", 2)
    assert low["table_configuration"] == "ema_momentum=0.95" and low["prob_improvement"] == 0.0
    assert sweeps.loc[("mad", "digits", "ema_momentum=0.99"), "diff"] == -4.0
    one = sweeps.loc[("mem", "mnist", "memory_size=1024")]  # one seed: shown, not tested
    assert one["n"] == 1 and math.isnan(one["p"]) and one["diff"] == pytest.approx(95.0 - 96.25)
    assert len(sweeps.reset_index().query("row == 'mad' and dataset == 'mnist'")) == 3  # the (lambda0, lambda1) points
    text = (out / "report.md").read_text()
    assert "## Sweeps: each configuration against the table's" in text
    assert "| MAD | digits (lenet5→lenet5_half) | ema_momentum=0.9 (ema_momentum=0.95) | 81.00 ± 1.41 " in text


def test_settings_added_after_a_run_was_stored_read_as_their_default():
    """results/zoo_bn holds DFQ runs made before lr_schedule, student_grad_clip, ... and
    student_generator_mode existed and six made after (one of two DataFree modes at eval): the report
    sees those two settings varying, not every setting the older config.json lacks."""
    from dfkd_bench.config import with_later_defaults
    from dfkd_bench.report.configs import analyse_configs
    from dfkd_bench.report.load import load_runs

    train, params = with_later_defaults("zskt", {"epochs": 3}, {"at_weight": 250.0})
    assert train["lr_schedule"] == "step" and train["student_grad_clip"] == 0.0 and train["epochs"] == 3
    assert params == {"generator_cosine_iterations": 0, "generator_beta1": 0.9, "student_generator_mode": "train",
                      "generator_step_student_mode": "train", "at_weight": 250.0}
    assert with_later_defaults("dfq", {}, {})[1]["generator_beta1"] == 0.5  # DFQ ran with the DataFree betas
    assert with_later_defaults("zskt", {"lr_schedule": "cosine"}, {})[0]["lr_schedule"] == "cosine"
    runs = load_runs(Path(__file__).resolve().parents[1] / "results" / "zoo_bn")
    cells, _ = analyse_configs(runs)
    (dfq,) = [cell for cell in cells if cell.method == "dfq"]
    # the two modes the deviations sweep sets, and nothing an older config.json merely lacks
    assert sorted(dfq.varying) == ["params.generator_step_student_mode", "params.student_generator_mode"]
