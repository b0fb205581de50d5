"""Which finished runs a table aggregates: configurations per cell, and the sweeps around them."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd

from dfkd_bench.errors import DfkdError
from dfkd_bench.report.common import (_equal, _format_value, _missing, _norm, cell_sort_key, dataset_sort_key,
                                      method_label, method_sort_key, setting_columns, setting_name)
from dfkd_bench.report.load import _flatten

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
        from dfkd_bench.presets import (budget_param_overrides, budget_train_overrides, get_preset,
                                        preset_method_params)

        preset = get_preset(dataset)
        train = preset.train_config(teacher_arch, student_arch)
        train = apply_train_overrides(train, budget_train_overrides(preset, budget, train))
        params = resolve_method_params(method, preset_method_params(preset, method), {})
        params = resolve_method_params(method, params, budget_param_overrides(budget, params))
    except (DfkdError, TypeError, ValueError, KeyError):
        return None
    settings = {**_flatten("train", dataclasses.asdict(train)), **_flatten("params", params)}
    settings["image_size"] = preset.image_size
    return settings


def _matches(settings: dict[str, Any], defaults: dict[str, Any]) -> bool:
    """Equal on every setting both know (an older run may lack a newer parameter).

    # CHOSEN: a default of ``auto`` (amp, channels_last ... resolved per device when a run starts)
    # matches whatever the run resolved it to; otherwise no CPU run would match the preset defaults.
    """
    common = [k for k in settings if k in defaults and not _missing(settings[k]) and defaults[k] != "auto"]
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


