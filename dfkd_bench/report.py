"""Tables and figures from the run records: ``dfkd-bench report``.

Everything here reads only what the engine wrote (``config.json``,
``records.jsonl``, ``done`` and the sample PNGs of each run folder, see
:mod:`dfkd_bench.store`) and never trains, so a report can be rebuilt at any
time, also while runs are still going.

Rules that keep the numbers honest:

* Only finished runs (with a ``done`` file) enter tables and figures.
  Unfinished or unreadable runs are listed (``incomplete.md``), never mixed in.
* The main number is the FINAL test accuracy (last evaluation). The best
  accuracy over training is reported separately and labelled as selected on
  the test set, because picking the maximum over evaluations on the test split
  is an optimistic, test-set-selected number.
* Runs that differ only in their seed are aggregated: mean and sample standard
  deviation (``ddof=1``) over seeds. Runs that differ in a setting (a sweep)
  are never averaged together: per (method, dataset, pair) the table uses the
  configuration equal to the preset defaults if there is one, otherwise the
  most common one, and the other configurations go to the sweep plots.
* A run found twice (same run id, e.g. a copied results folder) or the same
  seed of the same configuration twice counts once.

Figures are drawn with matplotlib's Agg canvas (no display, no global pyplot
state) and saved in every requested format.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import json
import math
import os
import shlex
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from dfkd_bench.errors import DfkdError
from dfkd_bench.store import DEFAULT_RESULTS_DIR, RunStore, heartbeat_age, read_jsonl

# ------------------------------------------------------------------ constants ---

DEFAULT_REPORT_DIR = "results/report"
DEFAULT_FORMATS = ("png", "pdf")

METHOD_ORDER = ("abm", "mem", "mad")
METHOD_LABELS = {"abm": "ABM", "mem": "DFKD-Mem", "mad": "MAD"}
# Table 2's column order, then our offline data sets; unknown ones follow alphabetically.
DATASET_ORDER = ("cifar10", "cifar100", "tinyimagenet", "imagenet", "places365", "food101", "digits", "mnist")
SKIP_DIRS = {"_submitit", "checkpoints", "samples"}

# Engine settings that do not change what is learned: logging, checkpoint and
# measurement cadence, and the speed switches that tests/test_fast_path.py
# shows to be mathematically identical. Runs differing only in these are the
# same experiment. (``amp`` is not here: bf16 changes the numerics.)
MEASUREMENT_SETTINGS = {"eval_every", "eval_batch_size", "drift_every", "drift_tau", "drift_samples", "sample_every",
                        "sample_count", "checkpoint_every", "checkpoint_minutes", "log_every", "deterministic"}
SPEED_SETTINGS = {"fused_forward", "channels_last", "compile", "stage_buffer"}

BAND_TEXT = "line: mean over seeds; shaded band: min–max over seeds"
BEST_TITLE = "best test accuracy over training (selected on the test set — optimistic)"
FINAL_TITLE = "final test accuracy (last evaluation, end of training)"
SINGLE_RUN_MARK = "†"

# Per-record quantities: (panel title, y-axis label).
METRICS: dict[str, tuple[str, str]] = {
    "test_accuracy": ("test accuracy of S", "accuracy on the real test split (%)"),
    "test_cross_entropy": ("test cross-entropy of S", "cross-entropy on the test split (nats)"),
    "teacher_agreement": ("agreement of S with T", "same prediction as T on test images (%)"),
    "loss/kd_gen": ("KD on samples of G", "KL(T ‖ S) (nats)"),
    "loss/kd_gen_ema": ("KD on samples of EMA G", "KL(T ‖ S) (nats)"),
    "loss/kd_memory": ("KD on memory samples", "KL(T ‖ S) (nats)"),
    "loss/student_loss": ("student loss (total)", "loss (nats)"),
    "loss/student_bound": ("student logit bound (Eq. 10)", "mean excess |S(x)| − δ"),
    "loss/gen_loss": ("generator loss (total)", "loss (nats)"),
    "loss/gen_kd": ("generator KD (Eq. 6, maximised)", "KL(T ‖ S) (nats)"),
    "loss/gen_nll": ("generator NLL (Eq. 7)", "−log p_T(y | x) (nats)"),
    "loss/gen_normreg": ("class-embedding NormReg (Eq. 8)", "mean excess ‖e_y‖ − γ√d"),
    "loss/gen_bnmm": ("BatchNorm moment matching (Eq. 9)", "squared L2 distance"),
    "loss/gen_bound_teacher": ("teacher logit bound (Eq. 11)", "mean excess |T(x)| − δ"),
    "loss/gen_bound_pixels": ("generator output bound (Eq. 11)", "mean excess |u| − ν"),
}
LOSS_CURVE_METRICS = ("loss/kd_gen", "loss/kd_gen_ema", "loss/kd_memory")
GENERATOR_METRICS = ("loss/gen_loss", "loss/gen_kd", "loss/gen_nll", "loss/gen_normreg", "loss/gen_bnmm",
                     "loss/gen_bound_teacher", "loss/gen_bound_pixels", "loss/student_bound",
                     "teacher_agreement", "test_cross_entropy")
# Which configuration variants get their own line in the curve figures besides
# the table configuration: Fig. 3 draws DFKD-Mem per memory size, Fig. 9 draws
# MAD per generator type / NLL weight.
LOSS_CURVE_VARIANTS = frozenset({"params.memory_size"})
GENERATOR_VARIANTS = frozenset({"params.conditioning", "params.nll_weight", "params.normreg_weight",
                                "params.generator"})


# ------------------------------------------------------------------ helpers ---

def method_label(method: str) -> str:
    return METHOD_LABELS.get(method, method)


def method_sort_key(method: str) -> tuple[int, str]:
    """abm, mem, mad first (the paper's order), then the others alphabetically."""
    return (METHOD_ORDER.index(method), "") if method in METHOD_ORDER else (len(METHOD_ORDER), method)


def dataset_sort_key(dataset: str) -> tuple[int, str]:
    return (DATASET_ORDER.index(dataset), "") if dataset in DATASET_ORDER else (len(DATASET_ORDER), dataset)


def cell_sort_key(cell: tuple[str, str]) -> tuple:
    return (*dataset_sort_key(cell[0]), cell[1])


def _norm(value: Any) -> Any:
    """JSON values made hashable and comparable: lists become tuples, NaN becomes None."""
    if isinstance(value, (list, tuple)):
        return tuple(_norm(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _norm(v)) for k, v in value.items()))
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, np.generic):
        return value.item()
    return value


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _equal(a: Any, b: Any) -> bool:
    """Setting equality that forgives float round-off (values went through JSON and coercion)."""
    if _missing(a) or _missing(b):
        return _missing(a) and _missing(b)
    if isinstance(a, tuple) and isinstance(b, tuple):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    numeric = (int, float)
    if isinstance(a, numeric) and isinstance(b, numeric) and not isinstance(a, bool) and not isinstance(b, bool):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-12)
    return a == b


def _format_value(value: Any) -> str:
    if isinstance(value, tuple):
        return "[" + ", ".join(_format_value(v) for v in value) + "]"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def setting_name(column: str) -> str:
    """``params.ema_momentum`` -> ``ema_momentum`` (the name users pass to ``--set``)."""
    return column.split(".", 1)[1] if column.startswith(("params.", "train.")) else column.replace(".", "_")


def _bookkeeping_train_settings() -> set[str]:
    """Train settings that are not part of the experiment (see MEASUREMENT_SETTINGS)."""
    from dfkd_bench.config import TrainConfig

    not_hashed = {f.name for f in dataclasses.fields(TrainConfig) if not f.metadata.get("in_hash", True)}
    return not_hashed | MEASUREMENT_SETTINGS | SPEED_SETTINGS


def setting_columns(frame: pd.DataFrame) -> list[str]:
    """Columns of ``load_runs`` that define an experiment besides its method, data, pair and seed."""
    bookkeeping = {f"train.{name}" for name in _bookkeeping_train_settings()}
    columns = [c for c in frame.columns
               if (c.startswith("params.") or c.startswith("train.")) and c not in bookkeeping]
    return sorted(columns) + [c for c in ("image_size",) if c in frame.columns]


def _paper_symbols() -> dict[str, str]:
    """Setting name -> the paper's symbol (alpha, n_S, lambda3 ...), for axis labels."""
    symbols: dict[str, str] = {}
    try:
        from dfkd_bench.config import TrainConfig
        from dfkd_bench.method_api import list_methods, param_fields

        for f in dataclasses.fields(TrainConfig):
            if f.metadata.get("paper"):
                symbols[f.name] = f.metadata["paper"]
        for method in list_methods().values():
            for name, f in param_fields(method).items():
                if f.metadata.get("paper"):
                    symbols[name] = f.metadata["paper"]
    except Exception:  # labels only; a broken plugin must not break the report
        pass
    return symbols


def _setting_label(columns: Sequence[str], symbols: dict[str, str]) -> str:
    parts = []
    for column in columns:
        name = setting_name(column)
        parts.append(f"{name} ({symbols[name]})" if name in symbols else name)
    return parts[0] if len(parts) == 1 else "(" + ", ".join(parts) + ")"


# ------------------------------------------------------------------ loading ---

@dataclass
class _Scan:
    """What one pass over a results folder found."""

    runs: pd.DataFrame
    records: dict[str, list[dict[str, Any]]]  # run_name -> records
    notes: list[str] = field(default_factory=list)


def find_run_dirs(results_dir: str | os.PathLike) -> list[Path]:
    """Run folders (holding a run's ``config.json``) at any depth, skipping ``_submitit`` logs."""
    root = Path(results_dir)
    if not root.is_dir():
        raise DfkdError(f"results directory {root} does not exist; run `dfkd-bench run` first or pass --results-dir")
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith("."))
        if "config.json" in filenames:
            try:
                config = json.loads((Path(dirpath) / "config.json").read_text())
            except (OSError, json.JSONDecodeError):
                config = None
            if isinstance(config, dict) and {"method", "dataset", "seed"} <= set(config):
                found.append(Path(dirpath))
                dirnames[:] = []  # a run folder holds no other runs
    return found


def _flatten(prefix: str, values: dict[str, Any]) -> dict[str, Any]:
    return {f"{prefix}.{key}": _norm(value) for key, value in sorted(values.items())}


def _config_id(settings: dict[str, Any]) -> str:
    canonical = json.dumps({k: v for k, v in settings.items() if not _missing(v)}, sort_keys=True, default=str)
    return hashlib.sha1(canonical.encode()).hexdigest()[:10]


def _run_state(path: Path) -> str:
    """Why an unfinished run is unfinished, as far as the files tell."""
    error = path / "error.txt"
    if error.exists():
        lines = [line for line in error.read_text(errors="replace").splitlines() if line.strip()]
        return f"failed: {lines[-1][:160]}" if lines else "failed"
    if RunStore(path.parent, path.name).is_locked():
        return "running on this host"
    age = heartbeat_age(path)
    if age is not None:
        return f"probably running on another host (heartbeat {age / 60:.0f} min ago)"
    heartbeat = path / "heartbeat"
    if heartbeat.exists():
        age = time.time() - heartbeat.stat().st_mtime
        return f"stopped (last heartbeat {_age_text(age)} ago); rerun the same command to resume"
    return "stopped; rerun the same command to resume"


def _age_text(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds < 3600 else f"{seconds / 3600:.1f} h"


def _read_run(path: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    config = json.loads((path / "config.json").read_text())
    problem = ""
    try:
        records = read_jsonl(path / "records.jsonl")
    except DfkdError as error:
        records, problem = [], str(error)
    summary = None
    if (path / "done").exists():
        try:
            summary = json.loads((path / "done").read_text())
        except json.JSONDecodeError:
            problem = problem or f"{path / 'done'} is not valid JSON"
    evals = [r for r in records if r.get("kind") == "eval" and r.get("test_accuracy") is not None]
    teacher = config.get("teacher") or {}
    train = config.get("train") or {}
    environment = config.get("environment") or {}
    teacher_accuracy = config.get("teacher_test_accuracy_here")
    if teacher_accuracy is None:
        teacher_accuracy = teacher.get("test_accuracy")
    if teacher_accuracy is None and summary:
        teacher_accuracy = summary.get("teacher_accuracy")
    if problem:
        status, state = "damaged", problem
    elif summary is not None:
        status, state = "done", "done"
    else:
        status, state = "incomplete", _run_state(path)
    steps = [r["step"] for r in records if isinstance(r.get("step"), (int, float))]
    final = evals[-1]["test_accuracy"] if evals else (summary or {}).get("final_accuracy")
    best = max(r["test_accuracy"] for r in evals) if evals else (summary or {}).get("best_accuracy")
    wall = (summary or {}).get("wall_time")
    if wall is None and evals:
        wall = evals[-1].get("wall_time")
    epochs, per_epoch = train.get("epochs"), train.get("steps_per_epoch")
    teacher_arch = teacher.get("arch", "?")
    student_arch = config.get("student_arch", "?")
    row = {
        "run_name": config.get("run_name", path.name), "path": str(path), "status": status, "state": state,
        "method": config["method"], "dataset": config["dataset"], "seed": config["seed"],
        "preset": config.get("preset", ""), "budget": config.get("budget", ""),
        "teacher_arch": teacher_arch, "student_arch": student_arch, "pair": f"{teacher_arch}→{student_arch}",
        "teacher_sha256": str(teacher.get("sha256") or ""), "teacher_accuracy": teacher_accuracy,
        "image_size": config.get("image_size"),
        **{key: environment.get(key) for key in ("device", "torch_threads", "world_size")},
        "final_accuracy": final, "best_accuracy": best, "wall_time": wall,
        "iterations": (summary or {}).get("iterations", max(steps) if steps else 0),
        "last_step": max(steps) if steps else 0,
        "planned_iterations": epochs * per_epoch if epochs and per_epoch else None,
        "evaluations": len(evals), "run_id": config.get("run_id", path.name),
        # When the run finished (epoch seconds of the done file), to prefer the newest among equals.
        "finished_at": (path / "done").stat().st_mtime if summary is not None else None,
        **_flatten("train", train), **_flatten("params", config.get("params") or {}),
    }
    return row, records


def _scan(results_dir: str | os.PathLike) -> _Scan:
    root = Path(results_dir)
    paths = find_run_dirs(root)
    if not paths:
        raise DfkdError(f"no runs found under {root} (looked for */config.json); run `dfkd-bench run` first")
    rows, records, notes = [], {}, []
    for path in paths:
        try:
            row, run_records = _read_run(path)
        except (OSError, json.JSONDecodeError, KeyError) as error:
            notes.append(f"skipped {path}: cannot read its config ({type(error).__name__}: {error})")
            continue
        rows.append((row, run_records))
    # The same run found twice (a copied folder) must count once: keep the finished
    # copy with the most records.
    by_id: dict[str, tuple[dict, list]] = {}
    rank = {"done": 0, "incomplete": 1, "damaged": 2}
    for row, run_records in rows:
        key = row["run_id"]
        if key in by_id:
            kept = by_id[key]
            candidates = sorted([kept, (row, run_records)], key=lambda x: (rank[x[0]["status"]], -len(x[1])))
            notes.append(f"run {row['run_name']} was found twice; used {candidates[0][0]['path']}, "
                         f"ignored {candidates[1][0]['path']}")
            by_id[key] = candidates[0]
        else:
            by_id[key] = (row, run_records)
    frame = pd.DataFrame([row for row, _ in by_id.values()])
    settings = setting_columns(frame)
    # The teacher is part of the experiment too (same architecture, other weights).
    frame["config_id"] = [_config_id({**{c: _norm(row[c]) for c in settings}, "teacher": row["teacher_sha256"]})
                          for _, row in frame.iterrows()]
    frame["method_label"] = frame["method"].map(method_label)
    frame = frame.sort_values(
        by=["dataset", "pair", "method", "config_id", "seed", "run_name"],
        key=lambda col: col.map(lambda v: dataset_sort_key(v) if col.name == "dataset" else
                                (method_sort_key(v) if col.name == "method" else v)),
    ).reset_index(drop=True)
    records = {row["run_name"]: run_records for row, run_records in by_id.values()}
    return _Scan(frame, records, notes)


def load_runs(results_dir: str | os.PathLike) -> pd.DataFrame:
    """One row per run found below ``results_dir`` (any depth).

    Columns: ``run_name, path, status`` (done / incomplete / damaged), ``state``
    (why it is not done), ``method, dataset, seed, teacher_arch, student_arch,
    pair`` (``teacher→student``), ``teacher_accuracy`` (measured at run start),
    ``final_accuracy`` (last evaluation), ``best_accuracy`` (max over
    evaluations), ``wall_time`` (s), ``iterations``, ``last_step``,
    ``planned_iterations``, every ``train.*`` and ``params.*`` setting, and
    ``config_id``: a hash of the settings that define the experiment (all but
    the seed and bookkeeping, plus the teacher's weights), equal for runs that
    differ only by seed.
    Raises :class:`DfkdError` when the folder is missing or holds no run.
    """
    scan = _scan(results_dir)
    scan.runs.attrs["notes"] = list(scan.notes)
    return scan.runs


def _records_frame(scan: _Scan, join: bool = True) -> pd.DataFrame:
    """All records in one frame keyed by ``run_name``; ``join`` adds the run-level columns."""
    frames = []
    for name, run_records in scan.records.items():
        if not run_records:
            continue
        frame = pd.DataFrame(run_records).drop(columns=["run", "method", "seed"], errors="ignore")
        frame.insert(0, "run_name", name)
        frames.append(frame)
    if not frames:
        return pd.DataFrame(columns=["run_name", "kind", "step"])
    records = pd.concat(frames, ignore_index=True, sort=False)
    if not join:
        return records
    # Run-level columns join on; a name the records use too (wall_time) gets a run_ prefix.
    run_columns = scan.runs.rename(columns={c: f"run_{c}" for c in scan.runs.columns
                                            if c in records.columns and c != "run_name"})
    return records.merge(run_columns, on="run_name", how="left", validate="many_to_one")


def load_records(results_dir: str | os.PathLike) -> pd.DataFrame:
    """Every record of every run in one long DataFrame, with the run-level columns of
    :func:`load_runs` joined on (``run_name`` is the key; run columns whose name a record
    also uses, like ``wall_time``, are prefixed ``run_``). A torn last line is ignored."""
    return _records_frame(_scan(results_dir))


# ---------------------------------------------------------- configurations ---

def preset_default_settings(method: str, dataset: str, teacher_arch: str, student_arch: str,
                            budget: str = "default") -> dict[str, Any] | None:
    """The settings a plain ``dfkd-bench run`` of this cell would use, as ``load_runs`` columns.

    ``None`` when they cannot be known (no preset for the data set, an
    unregistered method ...): the caller then falls back to the most common
    configuration.
    """
    try:
        from dfkd_bench.config import apply_train_overrides, resolve_method_params
        from dfkd_bench.presets import budget_param_overrides, budget_train_overrides, get_preset

        preset = get_preset(dataset)
        train = preset.train_config(teacher_arch, student_arch)
        train = apply_train_overrides(train, budget_train_overrides(preset, budget, train))
        params = resolve_method_params(method, preset.params, {})
        params = resolve_method_params(method, params, budget_param_overrides(budget, params))
    except (DfkdError, TypeError, ValueError, KeyError):
        return None
    settings = {**_flatten("train", dataclasses.asdict(train)), **_flatten("params", params)}
    settings["image_size"] = preset.image_size
    return settings


def _matches(settings: dict[str, Any], defaults: dict[str, Any]) -> bool:
    """Equal on every setting both know (an older run may lack a newer parameter)."""
    common = [k for k in settings if k in defaults and not _missing(settings[k])]
    return bool(common) and all(_equal(settings[k], defaults[k]) for k in common)


@dataclass
class CellConfigs:
    """The finished runs of one (dataset, pair, method) and its configurations."""

    dataset: str
    pair: str
    method: str
    runs: pd.DataFrame  # done runs, one per (config, seed)
    settings: dict[str, dict[str, Any]]  # config_id -> {setting column: value}, only the columns of this method
    reference: str  # config_id used by the table
    reason: str  # why that configuration
    varying: list[str]  # setting columns that differ between configurations

    def diff(self, config_id: str) -> set[str]:
        ref = self.settings[self.reference]
        return {c for c in self.varying if not _equal(self.settings[config_id][c], ref[c])}

    def describe(self, config_id: str, columns: Iterable[str] | None = None) -> str:
        columns = self.varying if columns is None else columns
        return ", ".join(f"{setting_name(c)}={_format_value(self.settings[config_id][c])}" for c in columns)


# Which budget a table column prefers when its methods were run under several:
# the paper's, then the preset's default; smoke runs are for tests.
BUDGET_RANK = {"paper": 0, "default": 1, "smoke": 3}


def _family_key(frame: pd.DataFrame) -> Callable[[tuple[str, str]], tuple]:
    """Rank (budget, teacher) families: more methods covered, better budget, more runs, newest, then hash."""
    stats = frame.groupby(["budget", "teacher_sha256"], dropna=False).agg(
        methods=("method", "nunique"), runs=("run_name", "size"), newest=("finished_at", "max"))

    def key(family: tuple[str, str]) -> tuple:
        row = stats.loc[family]
        newest = row["newest"] if not _missing(row["newest"]) else 0.0
        return (-row["methods"], BUDGET_RANK.get(family[0], 2), -row["runs"], -newest, str(family[1]))

    return key


def _describe_run(row: pd.Series) -> str:
    return f"{row['run_name']} (budget {row['budget']}, teacher {str(row['teacher_sha256'])[:8]})"


def analyse_configs(runs: pd.DataFrame) -> tuple[list[CellConfigs], list[str]]:
    """Group the done runs per (dataset, pair, method) and pick each cell's table configuration.

    Budget and teacher are chosen per table column, so that all methods of a
    column are compared with the same teacher and budget: the (budget,
    teacher) family covering the most methods, then the paper's budget before
    the default one before smoke runs, then the one with more runs. Runs of
    another family are not a hyper-parameter sweep; they are left out with a
    note. Within the family the table uses the configuration equal to the
    preset defaults, else the most common one; the other configurations are
    the sweeps. Returns the cells and notes saying what was chosen where there
    was a choice, and which duplicate seeds were dropped.
    """
    done = runs[runs["status"] == "done"]
    columns = setting_columns(runs)
    cells, notes = [], []
    column_family = {}
    for (dataset, pair), column in done.groupby(["dataset", "pair"], sort=False):
        families = list(column.groupby(["budget", "teacher_sha256"], dropna=False).groups)
        column_family[(dataset, pair)] = sorted(families, key=_family_key(column))[0]
    for (dataset, pair, method), group in done.groupby(["dataset", "pair", "method"], sort=False):
        where = f"{method_label(method)} on {dataset} ({pair})"
        family = column_family[(dataset, pair)]
        in_family = (group["budget"] == family[0]) & (group["teacher_sha256"] == family[1])
        if not in_family.any():
            own = sorted(group.groupby(["budget", "teacher_sha256"], dropna=False).groups, key=_family_key(group))[0]
            notes.append(f"{where}: no run with the column's budget {family[0]} and teacher {str(family[1])[:8]}; "
                         f"this cell uses budget {own[0]}, teacher {str(own[1])[:8]}: not directly comparable")
            family = own
            in_family = (group["budget"] == family[0]) & (group["teacher_sha256"] == family[1])
        if not in_family.all():
            notes.append(f"{where}: left out of the tables and sweeps, as they use another budget or teacher than "
                         f"the column (budget {family[0]}, teacher {str(family[1])[:8]}): "
                         + "; ".join(_describe_run(row) for _, row in group[~in_family].iterrows()))
        group = group[in_family]
        # One run per (configuration, seed): the same seed twice (e.g. rerun with another
        # evaluation cadence) is one measurement, not two.
        group = group.sort_values("evaluations", ascending=False, kind="stable")
        duplicated = group.duplicated(subset=["config_id", "seed"], keep="first")
        for name in group.loc[duplicated, "run_name"]:
            notes.append(f"{name}: same configuration and seed as another finished run; counted once")
        group = group[~duplicated].sort_values(["config_id", "seed"])
        counts = group["config_id"].value_counts()
        first = {cid: g.iloc[0] for cid, g in group.groupby("config_id")}
        used = [c for c in columns if group[c].map(lambda v: not _missing(_norm(v))).any()]
        settings = {cid: {c: _norm(row[c]) for c in used} for cid, row in first.items()}
        if len(first) == 1:
            reference, reason = next(iter(first)), "only configuration"
        else:
            matching = []
            for cid, row in first.items():
                defaults = preset_default_settings(method, dataset, row["teacher_arch"], row["student_arch"],
                                                   row["budget"])
                if defaults is not None and _matches(settings[cid], defaults):
                    matching.append(cid)
            pool, reason = (matching, "preset defaults") if matching else (list(first), "most common configuration")
            # Most runs first; ties broken by config hash so that the choice is stable.
            reference = sorted(pool, key=lambda cid: (-counts[cid], cid))[0]
            if sum(counts[cid] == counts[reference] for cid in pool) > 1:
                reason += " (a tie, broken by configuration hash)"
        varying = [c for c in used if len({json.dumps(v[c], default=str) for v in settings.values()}) > 1]
        cell = CellConfigs(dataset, pair, method, group, settings, reference, reason, varying)
        cells.append(cell)
        if len(settings) > 1:
            notes.append(
                f"{where}: {len(settings)} configurations differing in "
                f"{', '.join(setting_name(c) for c in varying)}; the tables use the {reason} "
                f"({cell.describe(reference)}, n={counts[reference]}); the others are in the sweep plots"
            )
    cells.sort(key=lambda c: (cell_sort_key((c.dataset, c.pair)), method_sort_key(c.method)))
    return cells, notes


def select_table_runs(runs: pd.DataFrame, cells: list[CellConfigs] | None = None) -> pd.DataFrame:
    """The done runs the tables aggregate: each cell's chosen configuration, one run per seed."""
    if cells is None:
        cells, _ = analyse_configs(runs)
    frames = [cell.runs[cell.runs["config_id"] == cell.reference] for cell in cells]
    if not frames:
        return runs.iloc[0:0]
    return pd.concat(frames).reset_index(drop=True)


def _stats(values: pd.Series) -> tuple[float, float, int]:
    values = values.dropna().astype(float)
    n = len(values)
    mean = float(values.mean()) if n else math.nan
    std = float(values.std(ddof=1)) if n > 1 else math.nan
    return mean, std, n


# --------------------------------------------------------------------- sweeps ---

def _components(cell: CellConfigs) -> list[list[str]]:
    """Settings that vary together form one sweep dimension.

    Two settings are linked when some configuration changes both relative to
    the table configuration ((lambda0, lambda1) pairs; conditioning with its NLL
    weight; a grid). One-at-a-time sweeps around the default (Fig. 6: n_S, then
    alpha) stay separate plots.
    """
    parent = {c: c for c in cell.varying}

    def find(c: str) -> str:
        while parent[c] != c:
            parent[c] = parent[parent[c]]
            c = parent[c]
        return c

    for cid in cell.settings:
        changed = sorted(cell.diff(cid))
        for other in changed[1:]:
            parent[find(other)] = find(changed[0])
    groups: dict[str, list[str]] = {}
    for c in cell.varying:
        groups.setdefault(find(c), []).append(c)
    return sorted((sorted(g) for g in groups.values()), key=lambda g: g[0])


def sweep_points(runs: pd.DataFrame) -> pd.DataFrame:
    """Final accuracy per swept configuration: the data of the sweep plots (Figs. 6, 7, 9).

    One row per (sweep, dataset, pair, method, configuration): ``sweep`` (the
    swept setting names joined by ``+``), ``settings`` (tuple of columns),
    ``value`` (the setting's value, or a tuple of values for joint sweeps),
    ``label`` (x tick text), ``mean, std, n`` of the final accuracy over seeds
    (std with ddof=1, NaN for one seed), ``best_mean``, ``seeds``,
    ``is_table_config`` (the configuration the tables use) and ``config_id``.
    The table configuration belongs to every sweep of its cell, as the point
    all one-at-a-time sweeps share.
    """
    cells, _ = analyse_configs(runs)
    rows = []
    for cell in cells:
        if len(cell.settings) < 2:
            continue
        for component in _components(cell):
            members = [cid for cid in cell.settings if cell.diff(cid) <= set(component)]
            for cid in members:
                group = cell.runs[cell.runs["config_id"] == cid]
                values = tuple(cell.settings[cid][c] for c in component)
                mean, std, n = _stats(group["final_accuracy"])
                rows.append({
                    "sweep": _sweep_name(component), "settings": tuple(component),
                    "dataset": cell.dataset, "pair": cell.pair, "method": cell.method,
                    "value": values[0] if len(values) == 1 else values,
                    "label": _format_value(values[0]) if len(values) == 1
                    else "(" + ", ".join(_format_value(v) for v in values) + ")",
                    "mean": mean, "std": std, "n": n, "best_mean": _stats(group["best_accuracy"])[0],
                    "seeds": tuple(sorted(int(s) for s in group["seed"])),
                    "is_table_config": cid == cell.reference, "config_id": cid,
                })
    columns = ["sweep", "settings", "dataset", "pair", "method", "value", "label", "mean", "std", "n", "best_mean",
               "seeds", "is_table_config", "config_id"]
    frame = pd.DataFrame(rows, columns=columns)
    if frame.empty:
        return frame
    frame["_order"] = frame["value"].map(_value_sort_key)
    frame = frame.sort_values(["sweep", "dataset", "pair", "method", "_order"],
                              key=lambda col: col.map(_column_sort_key(col.name))).drop(columns="_order")
    return frame.reset_index(drop=True)


def _sweep_name(component: Sequence[str]) -> str:
    """``ema_momentum``; ``ema_kd_weight+kd_weight`` for joint sweeps (long ones shortened for file names)."""
    names = [setting_name(c) for c in component]
    return "+".join(names) if len(names) <= 3 else "+".join(names[:3]) + f"+{len(names) - 3}more"


def _value_sort_key(value: Any) -> tuple:
    values = value if isinstance(value, tuple) else (value,)
    return tuple((0, float(v), "") if isinstance(v, (int, float)) and not isinstance(v, bool) else (1, 0.0, str(v))
                 for v in values)


def _column_sort_key(name: str) -> Callable[[Any], Any]:
    if name == "dataset":
        return dataset_sort_key
    if name == "method":
        return method_sort_key
    return lambda v: v


# --------------------------------------------------------------------- tables ---

def _cells_in_order(frame: pd.DataFrame) -> list[tuple[str, str]]:
    return sorted({(d, p) for d, p in zip(frame["dataset"], frame["pair"])}, key=cell_sort_key)


def accuracy_table(runs: pd.DataFrame, metric: str = "final_accuracy") -> pd.DataFrame:
    """Table 2 in long form: one row per (row, dataset, pair) with numeric ``mean, std, n``.

    ``row`` is ``teacher`` or a method name. Methods aggregate the table
    configuration of each cell over seeds (std: ddof=1, NaN for n=1). The
    teacher row is the teacher's test accuracy measured at run start, one
    value per distinct teacher (by weight hash) in the column.
    """
    done = runs[runs["status"] == "done"]
    cells, _ = analyse_configs(runs)
    chosen_runs = select_table_runs(runs, cells)
    rows = []
    for dataset, pair in _cells_in_order(done):
        # The teacher(s) of the runs in this column of the table, not of left-out runs.
        column = chosen_runs[(chosen_runs["dataset"] == dataset) & (chosen_runs["pair"] == pair)]
        teachers = column.dropna(subset=["teacher_accuracy"]).drop_duplicates(subset=["teacher_sha256"])
        mean, std, n = _stats(teachers["teacher_accuracy"])
        rows.append({"row": "teacher", "label": "Teacher", "dataset": dataset, "pair": pair, "mean": mean,
                     "std": std, "n": n, "seeds": "", "selection": "teacher test accuracy",
                     "runs": ";".join(teachers["run_name"])})
    for cell in cells:
        chosen = cell.runs[cell.runs["config_id"] == cell.reference]
        mean, std, n = _stats(chosen[metric])
        rows.append({"row": cell.method, "label": method_label(cell.method), "dataset": cell.dataset,
                     "pair": cell.pair, "mean": mean, "std": std, "n": n,
                     "seeds": ",".join(str(int(s)) for s in sorted(chosen["seed"])),
                     "selection": cell.reason if len(cell.settings) == 1
                     else f"{cell.reason}: {cell.describe(cell.reference)}",
                     "runs": ";".join(chosen["run_name"])})
    frame = pd.DataFrame(rows, columns=["row", "label", "dataset", "pair", "mean", "std", "n", "seeds",
                                        "selection", "runs"])
    frame["cell"] = [_row_cell(r, m, s, n) for r, m, s, n in zip(frame["row"], frame["mean"], frame["std"], frame["n"])]
    order = {name: i for i, name in enumerate(["teacher", *sorted(set(frame["row"]) - {"teacher"},
                                                                     key=method_sort_key)])}
    frame["_row"] = frame["row"].map(order)
    frame["_col"] = [cell_sort_key(c) for c in zip(frame["dataset"], frame["pair"])]
    frame = frame.sort_values(["_row", "_col"]).drop(columns=["_row", "_col"]).reset_index(drop=True)
    return frame[["row", "label", "dataset", "pair", "mean", "std", "n", "cell", "seeds", "selection", "runs"]]


def format_cell(mean: float, std: float, n: int, *, latex: bool = False) -> str:
    """``91.00 ± 1.41``; one run shows just its value with a dagger (n=1 footnote)."""
    if n == 0 or _missing(mean):
        return "--" if latex else "—"
    if n == 1 or _missing(std):
        return f"{mean:.2f}$^\\dagger$" if latex else f"{mean:.2f}{SINGLE_RUN_MARK}"
    return f"{mean:.2f} $\\pm$ {std:.2f}" if latex else f"{mean:.2f} ± {std:.2f}"


def _row_cell(row: str, mean: float, std: float, n: int, *, latex: bool = False) -> str:
    """A table cell; one teacher is a measured value, not an average over seeds, so it gets no dagger."""
    if row == "teacher" and n == 1:
        return f"{mean:.2f}"
    return format_cell(mean, std, n, latex=latex)


def _wide(table: pd.DataFrame, *, latex: bool = False, bold: bool = True) -> pd.DataFrame:
    """Rows: Teacher then methods; columns: (dataset, pair). The best method mean per column in bold."""
    columns = _cells_in_order(table)
    labels = list(dict.fromkeys(table["label"]))
    wide = pd.DataFrame("--" if latex else "—", index=labels,
                        columns=pd.MultiIndex.from_tuples(columns, names=["dataset", "pair"]))
    methods = table[table["row"] != "teacher"]
    best = methods.groupby(["dataset", "pair"])["mean"].max()
    for row in table.itertuples():
        text = _row_cell(row.row, row.mean, row.std, row.n, latex=latex)
        if bold and row.row != "teacher" and not _missing(row.mean) and math.isclose(row.mean, best[(row.dataset, row.pair)]):
            text = f"\\textbf{{{text}}}" if latex else f"**{text}**"
        wide.loc[row.label, (row.dataset, row.pair)] = text
    return wide


def _markdown(wide: pd.DataFrame) -> str:
    def clean(text: Any) -> str:
        return str(text).replace("|", "\\|")

    header = [""] + [f"{d} ({p})" for d, p in wide.columns]
    lines = ["| " + " | ".join(clean(h) for h in header) + " |",
             "|:--" + "|--:" * len(wide.columns) + "|"]
    for label, row in wide.iterrows():
        lines.append("| " + " | ".join([clean(label), *(clean(v) for v in row)]) + " |")
    return "\n".join(lines)


def latex_escape(text: str) -> str:
    """Escape LaTeX's special characters (and write the pair arrow in math mode)."""
    replacements = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                    "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
                    "→": r"$\rightarrow$", "±": r"$\pm$", "†": r"$^\dagger$", "—": "---", "–": "--"}
    return "".join(replacements.get(ch, ch) for ch in str(text))


def _latex(wide: pd.DataFrame, caption: str, label: str) -> str:
    frame = wide.copy()
    frame.index = [latex_escape(i) for i in frame.index]
    frame.columns = pd.MultiIndex.from_tuples([(latex_escape(d), latex_escape(p)) for d, p in frame.columns],
                                              names=[None, None])
    return frame.to_latex(escape=False, multicolumn=True, multicolumn_format="c",
                          column_format="l" + "c" * len(frame.columns), caption=latex_escape(caption), label=label,
                          position="t")


def _table_notes(table: pd.DataFrame, best: bool) -> list[str]:
    methods = table[table["row"] != "teacher"]
    notes = ["Cells: mean ± sample standard deviation (ddof=1) over seeds, in %; the best method per column in bold."]
    ns = sorted(set(int(n) for n in methods["n"] if n > 0))
    if ns:
        notes.append(f"Seeds per cell: n = {ns[0]}" + (f" to {ns[-1]} (see the n column of the CSV)" if len(ns) > 1 else "")
                     + ".")
    if (methods["n"] == 1).any():
        notes.append(f"{SINGLE_RUN_MARK} n=1: a single seed, so no standard deviation.")
    notes.append("Teacher: the teacher's test accuracy measured at the start of the runs.")
    if best:
        notes.append("Best = the maximum test accuracy over all evaluations during training, i.e. the checkpoint is "
                     "selected on the test set: an optimistic number. The final accuracy is the honest one.")
    else:
        notes.append("Final = test accuracy of the student at the end of training (its last evaluation).")
    return notes


def _write_tables(table: pd.DataFrame, out_dir: Path, stem: str, title: str, best: bool,
                  extra_notes: list[str]) -> tuple[list[Path], str]:
    """CSV (long, numeric), Markdown and LaTeX of one table; returns the paths and the Markdown.

    ``extra_notes`` (which configuration a cell uses, what was left out) go
    under the Markdown table, so that the file says what was done on its own.
    """
    paths = []
    csv_path = out_dir / f"{stem}.csv"
    table.to_csv(csv_path, index=False)
    paths.append(csv_path)
    notes = _table_notes(table, best) + extra_notes
    markdown = f"**{title[0].upper() + title[1:]} (%)**\n\n{_markdown(_wide(table))}\n\n" + \
        "\n".join(f"- {note}" for note in notes) + "\n"
    md_path = out_dir / f"{stem}.md"
    md_path.write_text(markdown)
    paths.append(md_path)
    tex_path = out_dir / f"{stem}.tex"
    caption = f"{title[0].upper() + title[1:]} (%). " + " ".join(_table_notes(table, best))
    tex_path.write_text(_latex(_wide(table, latex=True), caption, f"tab:{stem}"))
    paths.append(tex_path)
    return paths, markdown


def cost_table(table: pd.DataFrame, runs: pd.DataFrame) -> pd.DataFrame:
    """Wall time of the runs behind each cell of an accuracy table, with where they ran.

    One row per (method, dataset, pair): mean and sample std of the wall time
    in minutes over the cell's runs, their number, and the distinct devices,
    torch CPU thread counts and world sizes they ran with (wall times are only
    comparable between rows with the same hardware and load).
    """
    by_name = runs.drop_duplicates("run_name").set_index("run_name")
    rows = []
    for row in table[table["row"] != "teacher"].itertuples():
        names = [n for n in str(row.runs).split(";") if n in by_name.index]
        chosen = by_name.loc[names]
        minutes = pd.to_numeric(chosen["wall_time"], errors="coerce").dropna() / 60.0

        def kinds(column: str) -> str:
            values = chosen[column].dropna() if column in chosen else []
            return ",".join(sorted({str(v) for v in values})) or "?"

        rows.append({"row": row.row, "label": row.label, "dataset": row.dataset, "pair": row.pair,
                     "minutes_mean": minutes.mean() if len(minutes) else float("nan"),
                     "minutes_std": minutes.std(ddof=1) if len(minutes) > 1 else float("nan"), "n": len(minutes),
                     "device": kinds("device"), "torch_threads": kinds("torch_threads"),
                     "world_size": kinds("world_size")})
    return pd.DataFrame(rows, columns=["row", "label", "dataset", "pair", "minutes_mean", "minutes_std", "n",
                                       "device", "torch_threads", "world_size"])


def _cost_markdown(costs: pd.DataFrame) -> str:
    if costs.empty:
        return "(no finished run yet)\n"
    lines = ["| method | dataset (pair) | wall time per run (min) | runs | device | CPU threads | processes |",
             "|:--|:--|--:|--:|:--|:--|:--|"]
    for row in costs.itertuples():
        time_text = "—" if _missing(row.minutes_mean) else (
            f"{row.minutes_mean:.1f}" + ("" if _missing(row.minutes_std) else f" ± {row.minutes_std:.1f}"))
        lines.append(f"| {row.label} | {row.dataset} ({row.pair}) | {time_text} | {row.n} | {row.device} | "
                     f"{row.torch_threads} | {row.world_size} |")
    return "\n".join(lines) + "\n\n- Wall time from start to `done`, evaluations included (mean ± sample std " \
        "over the runs of the final-accuracy table). It depends on the machine and on what else ran on it; " \
        "compare methods with `dfkd-bench bench`, which interleaves them in one process.\n"


def _plain_table(table: pd.DataFrame) -> str:
    if table.empty:
        return "(no finished run yet)"
    wide = _wide(table, bold=False)
    wide.columns = [f"{d} ({p})" for d, p in wide.columns]
    return wide.to_string()


# -------------------------------------------------------------------- figures ---

def _figure(nrows: int, ncols: int, panel: tuple[float, float] = (5.2, 3.6), legend: bool = True):
    """A figure on the Agg canvas (no display, no pyplot state); room below for a figure legend."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    height = panel[1] * nrows + (1.6 if legend else 0.8)
    fig = Figure(figsize=(panel[0] * ncols + 0.4, height), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes


def _save(fig, out_dir: Path, stem: str, formats: Sequence[str]) -> list[Path]:
    paths = []
    for fmt in formats:
        path = out_dir / f"{stem}.{fmt}"
        fig.savefig(path, dpi=150 if fmt == "png" else None)
        paths.append(path)
    fig.clear()
    return paths


def _method_colors(methods: Iterable[str]) -> dict[str, Any]:
    from matplotlib import colormaps

    palette = colormaps["tab10"].colors
    ordered = sorted(set(methods) | set(METHOD_ORDER), key=method_sort_key)
    return {m: palette[i % len(palette)] for i, m in enumerate(ordered)}


def _shade(color: Any, index: int, count: int) -> tuple[float, float, float]:
    """Variants of one method: shades of its colour, from dark to light."""
    from matplotlib.colors import to_rgb

    if count <= 1:
        return to_rgb(color)
    t = -0.45 + 0.9 * index / (count - 1)  # <0 darker, >0 lighter
    rgb = np.array(to_rgb(color))
    mixed = rgb + (1 - rgb) * t if t > 0 else rgb * (1 + t)
    return tuple(float(v) for v in np.clip(mixed, 0, 1))


def _figure_legend(fig, axes, band_entry: bool = True) -> None:
    """One legend for the whole figure (methods repeat across panels), saying what the bands are."""
    handles, labels = {}, []
    for ax in np.ravel(axes):
        for handle, label in zip(*ax.get_legend_handles_labels()):
            if label not in handles:
                handles[label] = handle
                labels.append(label)
    if handles and band_entry:
        from matplotlib.patches import Patch

        label = "shaded band: min–max over seeds"
        handles[label] = Patch(facecolor="0.5", alpha=0.25, linewidth=0)
        labels.append(label)
    if handles:
        # As many legend columns as fit the figure's width (about 2.7 inches per entry).
        columns = max(1, min(len(labels), int(fig.get_figwidth() / 2.7)))
        fig.legend([handles[label] for label in labels], labels, loc="outside lower center", fontsize=9,
                   frameon=False, ncols=columns)


def _suptitle(fig, text: str) -> None:
    """A figure title wrapped to the figure's width, so that one-panel figures do not clip it."""
    import textwrap

    width = max(30, int(fig.get_figwidth() * 10))
    fig.suptitle("\n".join(textwrap.fill(line, width) for line in text.splitlines()), fontsize=11)


def band(records: pd.DataFrame, column: str) -> pd.DataFrame:
    """Per step: mean, min, max and count over the runs (seeds) in ``records``."""
    values = records.dropna(subset=[column]).groupby("step")[column]
    return pd.DataFrame({"mean": values.mean(), "min": values.min(), "max": values.max(),
                         "n": values.count()}).reset_index()


@dataclass
class _Line:
    """The runs (seeds) drawn as one mean line with a band."""

    dataset: str
    pair: str
    method: str
    label: str
    color: Any
    run_names: list[str]


def _curve_lines(cells: list[CellConfigs], variants: frozenset[str] = frozenset()) -> list[_Line]:
    """One line per cell's table configuration, plus one per configuration that differs
    from it only in ``variants`` (e.g. DFKD-Mem memory sizes for Fig. 3)."""
    colors = _method_colors(c.method for c in cells)
    lines = []
    for cell in cells:
        chosen = [cell.reference]
        if variants:
            chosen += [cid for cid in cell.settings
                       if cid != cell.reference and cell.diff(cid) and cell.diff(cid) <= variants]
        shown = sorted({c for cid in chosen for c in cell.diff(cid)})
        if len(chosen) > 1:  # the table configuration too needs its values then
            chosen.sort(key=lambda cid: _value_sort_key(tuple(cell.settings[cid][c] for c in shown)))
        for index, cid in enumerate(chosen):
            names = list(cell.runs.loc[cell.runs["config_id"] == cid, "run_name"])
            label = method_label(cell.method)
            if len(chosen) > 1:
                label += " " + cell.describe(cid, shown)
            lines.append(_Line(cell.dataset, cell.pair, cell.method, f"{label} (n={len(names)})",
                               _shade(colors[cell.method], index, len(chosen)), names))
    return lines


def _plot_band(ax, records: pd.DataFrame, line: _Line, column: str, linestyle: str = "-",
               label: str | None = None) -> bool:
    frame = band(records[records["run_name"].isin(line.run_names)], column)
    if frame.empty:
        return False
    ax.plot(frame["step"], frame["mean"], color=line.color, linestyle=linestyle, linewidth=1.6,
            label=line.label if label is None else label)
    if (frame["n"] > 1).any():
        ax.fill_between(frame["step"], frame["min"], frame["max"], color=line.color, alpha=0.18, linewidth=0)
    return True


def _has(records: pd.DataFrame, column: str, names: Iterable[str]) -> bool:
    if column not in records.columns:
        return False
    return records.loc[records["run_name"].isin(list(names)), column].notna().any()


def _panel_grid(panels: list[tuple[tuple[str, str], str]], max_cols: int = 5) -> tuple[int, int, list]:
    """Place panels (cell, metric) so that each (dataset, pair) starts a new row, rows balanced."""
    by_cell: dict[tuple[str, str], list[str]] = {}
    for cell, metric in panels:
        by_cell.setdefault(cell, []).append(metric)
    most = max(len(m) for m in by_cell.values())
    ncols = math.ceil(most / math.ceil(most / max_cols))
    places, row = [], 0
    for cell, metrics in by_cell.items():
        for i, metric in enumerate(metrics):
            places.append((row + i // ncols, i % ncols, cell, metric))
        row += math.ceil(len(metrics) / ncols)
    return row, ncols, places


def _metric_figure(records: pd.DataFrame, lines: list[_Line], metrics: Sequence[str], title: str,
                   out_dir: Path, stem: str, formats: Sequence[str]) -> list[Path]:
    cells = sorted({(line.dataset, line.pair) for line in lines}, key=cell_sort_key)
    panels = []
    for cell in cells:
        cell_lines = [line for line in lines if (line.dataset, line.pair) == cell]
        for metric in metrics:
            if any(_has(records, metric, line.run_names) for line in cell_lines):
                panels.append((cell, metric))
    if not panels:
        return []
    nrows, ncols, places = _panel_grid(panels)
    fig, axes = _figure(nrows, ncols)
    used = set()
    for r, c, cell, metric in places:
        ax = axes[r][c]
        used.add((r, c))
        for line in lines:
            if (line.dataset, line.pair) == cell:
                _plot_band(ax, records, line, metric)
        name, ylabel = METRICS.get(metric, (metric, metric))
        ax.set_title(f"{cell[0]} ({cell[1]})\n{name}", fontsize=10)
        ax.set_xlabel("step (training iterations)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    for r in range(nrows):
        for c in range(ncols):
            if (r, c) not in used:
                axes[r][c].set_visible(False)
    _figure_legend(fig, axes)
    _suptitle(fig, f"{title}\n{BAND_TEXT}")
    return _save(fig, out_dir, stem, formats)


def plot_accuracy_curves(records, cells, out_dir, formats) -> list[Path]:
    """Fig. 2: test accuracy of the student vs step, one panel per (dataset, pair)."""
    lines = _curve_lines(cells)
    return _metric_figure(records, lines, ["test_accuracy"], "Test accuracy of the student during training (Fig. 2)",
                          out_dir, "accuracy_curves", formats)


def plot_loss_curves(records, cells, out_dir, formats) -> list[Path]:
    """Fig. 3: the student's KD loss on samples of G, of the EMA G and on memory samples."""
    lines = _curve_lines(cells, LOSS_CURVE_VARIANTS)
    return _metric_figure(records, lines, LOSS_CURVE_METRICS,
                          "Distillation loss of the student per source of samples (Fig. 3)",
                          out_dir, "loss_curves", formats)


def plot_generator_losses(records, cells, out_dir, formats) -> list[Path]:
    """Fig. 9 style: generator loss terms, bounds, teacher agreement and test cross-entropy."""
    lines = _curve_lines(cells, GENERATOR_VARIANTS)
    return _metric_figure(records, lines, GENERATOR_METRICS,
                          "Generator losses and student diagnostics (Fig. 9; losses averaged between evaluations)",
                          out_dir, "generator_losses", formats)


def plot_drift_curves(records, cells, out_dir, formats) -> list[Path]:
    """Fig. 4: mean JS(S_{t-tau}, T) on fresh samples of G_t (solid) and of the EMA G_t (dashed)."""
    drift = records[records["kind"] == "drift"] if "kind" in records.columns else records.iloc[0:0]
    lines = [line for line in _curve_lines(cells) if _has(drift, "js_gen", line.run_names)]
    if not lines:
        return []
    cell_keys = sorted({(line.dataset, line.pair) for line in lines}, key=cell_sort_key)
    ncols = min(3, len(cell_keys))
    nrows = math.ceil(len(cell_keys) / ncols)
    fig, axes = _figure(nrows, ncols)
    for index, cell in enumerate(cell_keys):
        ax = axes[index // ncols][index % ncols]
        taus = set()
        for line in (line for line in lines if (line.dataset, line.pair) == cell):
            _plot_band(ax, drift, line, "js_gen", "-")
            if _has(drift, "js_gen_ema", line.run_names):
                _plot_band(ax, drift, line, "js_gen_ema", "--", label=f"_{line.label} gen_ema")
            taus |= set(drift.loc[drift["run_name"].isin(line.run_names), "tau"].dropna().astype(int))
        tau = ", ".join(str(t) for t in sorted(taus))
        ax.set_title(f"{cell[0]} ({cell[1]}), τ = {tau}", fontsize=10)
        ax.set_xlabel("step t (training iterations)")
        ax.set_ylabel(r"mean JS($S_{t-\tau}$, $T$) on fresh samples (nats)")
        ax.grid(alpha=0.3)
    for index in range(len(cell_keys), nrows * ncols):
        axes[index // ncols][index % ncols].set_visible(False)
    axes[0][0].plot([], [], color="0.3", linestyle="-", label="gen: samples of G_t (solid)")
    axes[0][0].plot([], [], color="0.3", linestyle="--", label="gen_ema: samples of EMA G_t (dashed)")
    _figure_legend(fig, axes)
    _suptitle(fig, f"Drift of the student from the teacher on current synthetic samples (Fig. 4)\n{BAND_TEXT}")
    return _save(fig, out_dir, "drift_curves", formats)


def _slug(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_.+" else "_" for ch in text.replace("→", "-to-"))


SOURCE_TITLES = {"gen": "G", "gen_ema": "EMA G (G̃)", "memory": "memory bank"}


def plot_samples(records, cells, out_dir, formats) -> tuple[list[Path], list[str]]:
    """Fig. 5: the latest sample grids of G and of the EMA G side by side, seed 0 of the table configuration."""
    from matplotlib.image import imread

    paths, notes = [], []
    samples = records[records["kind"] == "samples"] if "kind" in records.columns else records.iloc[0:0]
    pairs_per_dataset: dict[str, set[str]] = {}
    for cell in cells:
        pairs_per_dataset.setdefault(cell.dataset, set()).add(cell.pair)
    for cell in cells:
        chosen = cell.runs[cell.runs["config_id"] == cell.reference].sort_values("seed")
        if chosen.empty:
            continue
        run = chosen[chosen["seed"] == 0].iloc[0] if (chosen["seed"] == 0).any() else chosen.iloc[0]
        mine = samples[samples["run_name"] == run["run_name"]]
        if mine.empty:
            continue
        latest = mine.sort_values("step").iloc[-1]
        files = latest["files"] if isinstance(latest["files"], dict) else {}
        images = []
        for source, relative in files.items():
            path = Path(run["path"]) / relative
            if path.exists():
                images.append((source, imread(path)))
            else:
                notes.append(f"sample grid {path} is missing")
        if not images:
            continue
        images.sort(key=lambda item: list(SOURCE_TITLES).index(item[0]) if item[0] in SOURCE_TITLES else 99)
        fig, axes = _figure(1, len(images), panel=(4.4, 4.4), legend=False)
        for ax, (source, image) in zip(axes[0], images):
            ax.imshow(image, cmap="gray" if image.ndim == 2 else None, interpolation="nearest")
            ax.set_title(f"samples of {SOURCE_TITLES.get(source, source)}", fontsize=10)
            ax.set_axis_off()
        seed_note = "" if int(run["seed"]) == 0 else " (no seed-0 run)"
        _suptitle(fig, f"{method_label(cell.method)} on {cell.dataset} ({cell.pair})\nseed {int(run['seed'])}"
                       f"{seed_note}, step {int(latest['step'])} (Fig. 5)")
        stem = f"samples_{_slug(cell.dataset)}_{_slug(cell.method)}"
        if len(pairs_per_dataset[cell.dataset]) > 1:
            stem = f"samples_{_slug(cell.dataset)}_{_slug(cell.pair)}_{_slug(cell.method)}"
        paths += _save(fig, out_dir, stem, formats)
    return paths, notes


def plot_sweeps(runs: pd.DataFrame, cells: list[CellConfigs], out_dir: Path,
                formats: Sequence[str]) -> list[Path]:
    """Figs. 6/7/9: final accuracy vs the swept setting(s), mean ± std over seeds.

    The x axis is categorical (the values in order, equally spaced) so that
    values like 0.95, 0.99, 0.999 stay readable. ABM, DFKD-Mem and MAD, when
    not swept in the plot, are drawn as horizontal reference lines at their
    table configuration, mean ± std band (Fig. 7: DFKD-Mem memory sizes against
    MAD and ABM).
    """
    points = sweep_points(runs)
    if points.empty:
        return []
    symbols = _paper_symbols()
    colors = _method_colors(points["method"])
    paths = []
    for sweep, frame in points.groupby("sweep", sort=True):
        cell_keys = sorted({(d, p) for d, p in zip(frame["dataset"], frame["pair"])}, key=cell_sort_key)
        ncols = min(3, len(cell_keys))
        nrows = math.ceil(len(cell_keys) / ncols)
        fig, axes = _figure(nrows, ncols, panel=(5.6, 3.9), legend=False)
        for index, cell in enumerate(cell_keys):
            ax = axes[index // ncols][index % ncols]
            here = frame[(frame["dataset"] == cell[0]) & (frame["pair"] == cell[1])]
            labels = list(dict.fromkeys(here.sort_values("value", key=lambda c: c.map(_value_sort_key))["label"]))
            position = {label: i for i, label in enumerate(labels)}
            methods = sorted(set(here["method"]), key=method_sort_key)
            for k, method in enumerate(methods):
                mine = here[here["method"] == method]
                offset = (k - (len(methods) - 1) / 2) * 0.06
                x = np.array([position[label] for label in mine["label"]]) + offset
                ax.errorbar(x, mine["mean"], yerr=mine["std"].fillna(0), color=colors[method], marker="o",
                            capsize=3, linewidth=1.6, label=f"{method_label(method)} (mean ± std over seeds)")
                chosen = mine[mine["is_table_config"]]
                ax.scatter(np.array([position[label] for label in chosen["label"]]) + offset, chosen["mean"],
                           s=130, facecolors="none", edgecolors=colors[method], linewidths=1.5,
                           label="configuration used in the tables")
            for cfg in cells:
                # Reference lines for the paper's methods only, to keep the y range about them; a
                # method with a sweep of its own is drawn at its table configuration.
                if (cfg.dataset, cfg.pair) != cell or cfg.method in methods or cfg.method not in METHOD_ORDER:
                    continue
                mean, std, n = _stats(cfg.runs.loc[cfg.runs["config_id"] == cfg.reference, "final_accuracy"])
                color = colors.get(cfg.method, "0.4")
                which = "single config" if len(cfg.settings) == 1 else "table config"
                text = f"{method_label(cfg.method)} ({which}): {mean:.2f}" + (f" ± {std:.2f}" if n > 1 else "")
                ax.axhline(mean, color=color, linestyle="--", linewidth=1.3, label=text)
                if n > 1:
                    ax.axhspan(mean - std, mean + std, color=color, alpha=0.1, linewidth=0)
            ax.set_xticks(range(len(labels)))
            ax.set_xticklabels(labels, rotation=30 if max(len(t) for t in labels) > 6 else 0,
                               ha="right" if max(len(t) for t in labels) > 6 else "center")
            ax.set_xlim(-0.5, len(labels) - 0.5)
            ax.set_title(f"{cell[0]} ({cell[1]})", fontsize=10)
            import textwrap

            ax.set_xlabel(textwrap.fill(_setting_label(list(here["settings"].iloc[0]), symbols), 60))
            ax.set_ylabel("final test accuracy (%)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8, loc="best")
        for index in range(len(cell_keys), nrows * ncols):
            axes[index // ncols][index % ncols].set_visible(False)
        names = ", ".join(setting_name(c) for c in frame["settings"].iloc[0])
        _suptitle(fig, f"Sensitivity to {names}\nfinal test accuracy; error bars: ± sample std over seeds")
        paths += _save(fig, out_dir, f"sweep_{_slug(sweep)}", formats)
    return paths


# --------------------------------------------------------------------- report ---

def _incomplete_markdown(runs: pd.DataFrame) -> str:
    pending = runs[runs["status"] != "done"]
    if pending.empty:
        return "# Incomplete runs\n\nNone: every run found is finished.\n"
    lines = ["# Incomplete runs", "",
             f"{len(pending)} run(s) have no `done` file (or unreadable records); they are NOT in the tables "
             "or figures.", "",
             "| run | method | dataset | pair | seed | last step / planned | status | path |",
             "|:--|:--|:--|:--|--:|--:|:--|:--|"]
    for row in pending.itertuples():
        planned = "?" if _missing(row.planned_iterations) else int(row.planned_iterations)
        state = str(row.state).replace("|", "\\|")
        lines.append(f"| {row.run_name} | {row.method} | {row.dataset} | {row.pair} | {row.seed} | "
                     f"{int(row.last_step)} / {planned} | {row.status}: {state} | {row.path} |")
    return "\n".join(lines) + "\n"


def _check_formats(formats: Sequence[str]) -> tuple[str, ...]:
    from matplotlib.backend_bases import FigureCanvasBase

    supported = FigureCanvasBase.get_supported_filetypes()
    formats = tuple(f.strip().lower().lstrip(".") for f in formats if f.strip())
    unknown = [f for f in formats if f not in supported]
    if not formats or unknown:
        raise DfkdError(f"unknown figure format(s) {', '.join(unknown) or '(none given)'}; "
                        f"use some of {', '.join(sorted(supported))}")
    return formats


def write_report(results_dir: str | os.PathLike, out_dir: str | os.PathLike, *,
                 formats: Sequence[str] = DEFAULT_FORMATS, command: str | None = None) -> dict[str, Any]:
    """Write the tables, figures and ``report.md`` of every run below ``results_dir`` into ``out_dir``.

    ``command`` is the command line recorded in ``report.md``. Returns
    ``{"report": path, "incomplete": path, "tables": [paths], "figures": [paths],
    "incomplete_runs": ["name (status, step N of M: why)"], "notes": [text],
    "text": the final table and notes as plain text for a terminal}``.
    """
    formats = _check_formats(formats)
    scan = _scan(results_dir)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    runs = scan.runs
    records = _records_frame(scan, join=False)  # the figures select runs by name; no need for 100 columns
    cells, config_notes = analyse_configs(runs)
    notes = scan.notes + config_notes
    done = runs[runs["status"] == "done"]
    pending = runs[runs["status"] != "done"]
    if done.empty:
        notes.append("no run is finished yet: the tables and figures are empty")

    tables, sections = [], {}
    for metric, stem, title, best in (("final_accuracy", "table_final", FINAL_TITLE, False),
                                      ("best_accuracy", "table_best", BEST_TITLE, True)):
        table = accuracy_table(runs, metric)
        paths, markdown = _write_tables(table, out, stem, title, best, config_notes)
        tables += paths
        sections[stem] = (markdown, table)
    costs = cost_table(sections["table_final"][1], runs)
    costs.to_csv(out / "table_cost.csv", index=False)
    tables.append(out / "table_cost.csv")

    figures: list[Path] = []
    if not done.empty:
        done_records = records[records["run_name"].isin(set(done["run_name"]))]
        figures += plot_accuracy_curves(done_records, cells, out, formats)
        figures += plot_loss_curves(done_records, cells, out, formats)
        figures += plot_generator_losses(done_records, cells, out, formats)
        figures += plot_drift_curves(done_records, cells, out, formats)
        sample_paths, sample_notes = plot_samples(done_records, cells, out, formats)
        figures += sample_paths
        notes += sample_notes
        figures += plot_sweeps(runs, cells, out, formats)

    incomplete_path = out / "incomplete.md"
    incomplete_text = _incomplete_markdown(runs)
    incomplete_path.write_text(incomplete_text)

    command = command or f"write_report({str(results_dir)!r}, {str(out_dir)!r}, formats={formats!r})"
    report_path = out / "report.md"
    # The configuration notes are printed under the tables already.
    other_notes = [note for note in notes if note not in config_notes]
    report_path.write_text(_report_markdown(results_dir, runs, sections, figures, other_notes, incomplete_text,
                                            command, formats, _cost_markdown(costs)))
    text = (f"{FINAL_TITLE} (%):\n{_plain_table(sections['table_final'][1])}\n"
            f"(mean ± sample std over seeds; {SINGLE_RUN_MARK} = one seed)")
    if notes:
        text += "\n" + "\n".join(f"note: {note}" for note in notes)
    return {
        "report": str(report_path), "incomplete": str(incomplete_path),
        "tables": [str(p) for p in tables], "figures": [str(p) for p in figures],
        "incomplete_runs": [f"{row.run_name} ({row.status}, step {int(row.last_step)} of "
                            f"{'?' if _missing(row.planned_iterations) else int(row.planned_iterations)}: {row.state})"
                            for row in pending.itertuples()],
        "notes": notes, "text": text,
    }


FIGURE_CAPTIONS = {
    "accuracy_curves": "Test accuracy of the student vs step (Fig. 2)",
    "loss_curves": "Student KD loss on samples of G, of the EMA G and on memory samples (Fig. 3)",
    "generator_losses": "Generator loss terms, bounds, teacher agreement and test cross-entropy (Fig. 9 style)",
    "drift_curves": "JS drift of S_{t−τ} vs T on samples of G_t (solid) and EMA G_t (dashed) (Fig. 4)",
}


def _report_markdown(results_dir, runs: pd.DataFrame, sections: dict, figures: list[Path], notes: list[str],
                     incomplete_text: str, command: str, formats: Sequence[str], cost_text: str) -> str:
    """report.md: what was run, both tables, every figure with its caption, the notes and unfinished runs."""
    counts = runs["status"].value_counts()
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    parts = [
        "# DFKD benchmark report", "",
        f"Produced by `{command}` on {now}.", "",
        f"Results: `{results_dir}`: {len(runs)} run(s) found, {counts.get('done', 0)} finished, "
        f"{counts.get('incomplete', 0)} incomplete, {counts.get('damaged', 0)} unreadable.", "",
        "## Final test accuracy", "", sections["table_final"][0],
        "Files: [CSV](table_final.csv), [LaTeX](table_final.tex).", "",
        "## Best test accuracy over training — selected on the test set (optimistic)", "",
        sections["table_best"][0],
        "Files: [CSV](table_best.csv), [LaTeX](table_best.tex).", "",
        "## Compute", "", cost_text, "Files: [CSV](table_cost.csv).", "",
        "## Figures", "",
        f"Curves: {BAND_TEXT} (legend: n = number of seeds). Losses are running means over the iterations "
        "between two evaluations.", "",
    ]
    stems = list(dict.fromkeys(p.stem for p in figures))
    main_format = "png" if "png" in formats else formats[0]
    for stem in stems:
        if stem in FIGURE_CAPTIONS:
            caption = FIGURE_CAPTIONS[stem]
        elif stem.startswith("samples_"):
            caption = "Latest sample grids of G and of the EMA G, seed 0 (Fig. 5): " + stem[len("samples_"):]
        else:
            caption = (f"Final accuracy vs {stem[len('sweep_'):]} (Figs. 6/7/9 style), error bars ± std over seeds; "
                       "the other methods at their table configuration as dashed reference lines")
        others = ", ".join(f"[{fmt}]({stem}.{fmt})" for fmt in formats if fmt != main_format)
        parts += [f"### {caption}", "", f"![{caption}]({stem}.{main_format})" + (f"  ({others})" if others else ""), ""]
    if not stems:
        parts += ["No figures: no finished run.", ""]
    parts += ["## Notes", "",
              "- Only finished runs (with a `done` file) are in the tables and figures; unfinished ones are listed "
              "below and in [incomplete.md](incomplete.md).",
              "- Final accuracy: the last evaluation on the real test split. Best accuracy: the maximum over all "
              "evaluations, selected on the test set, hence optimistic.",
              "- Runs that differ only in the seed are aggregated (mean ± sample std, ddof=1). Each table column "
              "uses one budget and one teacher (the one most methods were run with; paper, then default budget "
              "before smoke runs). Where a cell has runs with different settings (a sweep), the tables use the "
              "preset-default configuration when one matches, otherwise the most common one; all configurations "
              "are in the sweep plots.",
              *(f"- {note}" for note in notes), "",
              incomplete_text.replace("# Incomplete runs", "## Incomplete runs"), ""]
    return "\n".join(parts)


# ------------------------------------------------------------------------ CLI ---

def _formats_arg(text: str) -> tuple[str, ...]:
    try:
        return _check_formats(text.split(","))
    except DfkdError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def cmd_report(args: argparse.Namespace) -> int:
    """``dfkd-bench report``: write everything, print the final table, the unfinished runs and where files went."""
    command = "dfkd-bench report " + " ".join([
        f"--results-dir {shlex.quote(str(args.results_dir))}", f"--out {shlex.quote(str(args.out))}",
        f"--formats {','.join(args.formats)}"])
    result = write_report(args.results_dir, args.out, formats=args.formats, command=command)
    print(result["text"])
    if result["incomplete_runs"]:
        print(f"\n{len(result['incomplete_runs'])} incomplete run(s), not in the tables:")
        for line in result["incomplete_runs"]:
            print(f"  {line}")
    print(f"\nwrote {len(result['tables'])} table files and {len(result['figures'])} figure files to {args.out}; "
          f"start with {result['report']}")
    return 0


def add_report_command(subparsers) -> argparse.ArgumentParser:
    """Register ``dfkd-bench report`` on an argparse ``add_subparsers()`` object."""
    parser = subparsers.add_parser(
        "report", help="tables (Table 2 style) and figures (Figs. 2-9 style) from finished runs",
        description="Aggregate finished runs over seeds into tables (CSV, Markdown, LaTeX) and figures "
                    "(PNG/PDF) plus report.md. Unfinished runs are listed, never mixed in.")
    parser.add_argument("--results-dir", default=DEFAULT_RESULTS_DIR,
                        help=f"folder searched (recursively) for run folders (default: {DEFAULT_RESULTS_DIR})")
    parser.add_argument("--out", default=DEFAULT_REPORT_DIR, help=f"where the report goes (default: {DEFAULT_REPORT_DIR})")
    parser.add_argument("--formats", type=_formats_arg, default=DEFAULT_FORMATS,
                        help="comma-separated figure formats (default: png,pdf)")
    parser.set_defaults(func=cmd_report)
    return parser
