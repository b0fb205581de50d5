"""Constants, labels, orderings and value helpers shared by the report modules."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

# ------------------------------------------------------------------ constants ---

# Without --out, the report goes to <results-dir>/report (see writer.default_out_dir).
DEFAULT_REPORT_SUBDIR = "report"
DEFAULT_REPORT_DIR = "results/runs/report"  # the default for the default --results-dir
DEFAULT_FORMATS = ("png", "pdf")

METHOD_ORDER = ("abm", "mem", "mad")
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

# The engine's own per-record quantities (it measures them for every method): (panel title, y-axis label).
METRICS: dict[str, tuple[str, str]] = {
    "test_accuracy": ("test accuracy of S", "accuracy on the real test split (%)"),
    "test_cross_entropy": ("test cross-entropy of S", "cross-entropy on the test split (nats)"),
    "teacher_agreement": ("agreement of S with T", "same prediction as T on test images (%)"),
}
STUDENT_DIAGNOSTICS = ("teacher_agreement", "test_cross_entropy")
# What a method records is drawn under the method's own names, found by pattern in the records, so a
# new method's terms are drawn without an edit here: every ``loss/<term>`` of an evaluation record
# (the running mean of a term its generator_step or student_loss returned) and every ``js_<source>``
# of a drift record (one per source of its measurement_sources).
LOSS_PREFIX = "loss/"
DRIFT_PREFIX = "js_"
# CHOSEN: a term whose name starts with ``gen_`` (what every method's synthesis step returns:
# gen_loss, gen_kd, gen_oh, gen_adv, gen_ce ...) goes to the synthesis figure, every other term
# (kd_<source>, l1_gen, at_gen, kd_pool, student_loss ...) to the student figure; no term is dropped.
SYNTHESIS_TERM_PREFIX = "gen_"
LOSS_YLABEL = "running mean between evaluations"
# Which configuration variants get their own line in the curve figures besides
# the table configuration: Fig. 3 draws DFKD-Mem per memory size, Fig. 9 draws
# MAD per generator type / NLL weight.
LOSS_CURVE_VARIANTS = frozenset({"params.memory_size"})
GENERATOR_VARIANTS = frozenset({"params.conditioning", "params.nll_weight", "params.normreg_weight",
                                "params.generator"})


# ------------------------------------------------------------------ helpers ---

def recorded_terms(records: pd.DataFrame, prefix: str, groups: Sequence[Sequence[str]]) -> list[str]:
    """The record columns starting with ``prefix`` that the runs of some group (a list of run names,
    e.g. a method's seeds) have a value for, in the order of the groups and by name within a group."""
    columns = sorted(c for c in records.columns if str(c).startswith(prefix))
    ordered: list[str] = []
    for names in groups:
        mine = records[records["run_name"].isin(list(names))]
        ordered += [c for c in columns if c not in ordered and mine[c].notna().any()]
    return ordered


def term_title(column: str) -> tuple[str, str]:
    """(panel title, y label) of a record column: the engine's own metrics by name, a method's terms
    by the name the method gave them."""
    if column in METRICS:
        return METRICS[column]
    return column.removeprefix(LOSS_PREFIX), LOSS_YLABEL


def method_label(method: str) -> str:
    """The method's ``label`` (e.g. DFKD-Mem) when it is registered here, else its name."""
    from dfkd_bench.errors import ConfigError
    from dfkd_bench.method_api import get_method

    try:
        return get_method(method).label or method
    except ConfigError:  # records of a method this installation does not have
        return method


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


