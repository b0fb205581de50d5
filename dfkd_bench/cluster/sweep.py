"""Declarative experiments (``dfkd-bench sweep FILE``) and the run table (``dfkd-bench status``).

An experiment file (TOML, see ``experiments/README.md``) names methods x
datasets/architecture pairs x seeds x hyper-parameter values x budget x
resources. :func:`load_experiment` reads and checks it (every unknown key is a
one-line :class:`~dfkd_bench.errors.ConfigError` naming the file and the key);
:func:`plan_experiment` expands it into one :class:`~dfkd_bench.config.RunConfig`
per distinct run, through :func:`dfkd_bench.cluster.experiment.build_run_configs`, so a
run of a sweep is the very same run (same id, same folder) as the equivalent
``dfkd-bench run --set ...``.

A method keeps only the settings it declares (ABM has no ``ema_momentum``), so
different grid points can give the same run; the expansion keeps each run
once, by ``run_name``, and says how many combinations collapsed.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import itertools
import json
import math
import os
import re
import statistics
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dfkd_bench.errors import ConfigError, DfkdError, quote, shorten

BUDGETS = ("smoke", "default", "paper")

# Keys a cell may have; at the top level they are defaults for every cell.
CELL_KEYS = {
    "dataset": "dataset name (a preset: `dfkd-bench list`)",
    "teacher_arch": "teacher architecture (default: the preset's)",
    "student_arch": "student architecture (default: the preset's)",
    "image_size": "image size (default: the preset's)",
    "teacher_checkpoint": "external teacher weights (default: the teacher cache)",
    "teacher_mean": "input mean of the external teacher (list of numbers)",
    "teacher_std": "input std of the external teacher (list of numbers)",
    "methods": "list of method names",
    "seeds": "list of integer seeds",
    "budget": "smoke, default or paper",
    "protocol": "common (the preset's, one for every method) or paper (each method's own paper protocol)",
    "set": "table of fixed settings",
    "grid": "table of swept settings (cartesian product)",
    "description": "free text",
}
# Keys only the top level may have.
EXPERIMENT_KEYS = {
    "name": "experiment name (default: the file name)",
    "results_dir": "where run folders go (default: results/<name>; --results-dir overrides)",
    "data_root": "dataset folder (--data-root overrides; default $DFKD_BENCH_DATA)",
    "resources": "launcher options (launcher, time, gpus_per_node, cpus_per_task, mem_gb, ...)",
    "cells": "array of tables [[cells]], one per dataset / architecture pair",
}

RUN_NAME = re.compile(r"^(?P<method>[^-]+)-(?P<dataset>[^-]+)-(?P<student>.+)-s(?P<seed>\d+)-(?P<id>[0-9a-f]{12})$")
RUN_MARKERS = ("config.json", "done", "error.txt", "records.jsonl", "checkpoint.json", "lock", "heartbeat")


# ================================================================ the model ===

@dataclass
class Axis:
    """One dimension of a grid: a setting and its values, or a joint axis of several settings per point."""

    label: str
    points: list[dict[str, Any]]
    joint: bool = False

    @property
    def settings(self) -> set[str]:
        return {key for point in self.points for key in point}


@dataclass
class Cell:
    """A dataset and architecture pair with its methods, seeds, budget, fixed settings and grid."""

    index: int
    dataset: str
    methods: list[str]
    seeds: list[int]
    budget: str = "default"
    teacher_arch: str | None = None
    student_arch: str | None = None
    image_size: int | None = None
    protocol: str = "common"
    teacher_checkpoint: str | None = None
    teacher_mean: list[float] | None = None
    teacher_std: list[float] | None = None
    fixed: dict[str, Any] = field(default_factory=dict)
    axes: list[Axis] = field(default_factory=list)
    description: str = ""

    @property
    def where(self) -> str:
        return f"cell {self.index + 1} ({self.dataset})"

    def grid_points(self) -> list[dict[str, Any]]:
        points = []
        for combination in itertools.product(*(axis.points for axis in self.axes)):
            merged: dict[str, Any] = {}
            for part in combination:
                merged.update(part)
            points.append(merged)
        return points

    @property
    def combinations(self) -> int:
        return len(self.methods) * len(self.seeds) * math.prod(len(axis.points) for axis in self.axes)


@dataclass
class Experiment:
    path: Path
    name: str
    description: str
    results_dir: str
    cells: list[Cell]
    resources: dict[str, Any] = field(default_factory=dict)
    data_root: str | None = None

    @property
    def combinations(self) -> int:
        return sum(cell.combinations for cell in self.cells)


@dataclass
class PlannedRun:
    config: Any  # RunConfig
    cell: Cell
    swept: dict[str, Any]
    missing_teacher: str | None = None  # the command that makes it


@dataclass
class Plan:
    experiment: Experiment
    runs: list[PlannedRun]
    combinations: int

    @property
    def configs(self) -> list:
        return [run.config for run in self.runs]

    @property
    def collapsed(self) -> int:
        return self.combinations - len(self.runs)

    def missing_teachers(self) -> list[str]:
        return list(dict.fromkeys(run.missing_teacher for run in self.runs if run.missing_teacher))

    def count_line(self) -> str:
        line = f"{len(self.runs)} runs"
        if self.collapsed:
            line += (f" ({self.combinations} combinations, {self.collapsed} identical collapsed: "
                     "a method keeps only the settings it declares)")
        return line


# ================================================================= loading ===

def _known_settings() -> tuple[set[str], dict[str, str]]:
    from dfkd_bench.config import TrainConfig, _paper_aliases
    from dfkd_bench.method_api import list_methods, param_fields

    names = {f.name for f in dataclasses.fields(TrainConfig)}
    for method in list_methods().values():
        names |= set(param_fields(method))
    return names, _paper_aliases()


class _Reader:
    """Checks one file, raising one-line errors that name the file and the offending key."""

    def __init__(self, path: Path):
        self.path = path
        self.settings, self.aliases = _known_settings()

    def error(self, message: str) -> ConfigError:
        return ConfigError(f"{self.path}: {message}")

    def check_keys(self, table: dict[str, Any], allowed: dict[str, str], where: str) -> None:
        for key in table:
            if key not in allowed:
                close = difflib.get_close_matches(key, list(allowed), n=1)
                hint = f"; did you mean {close[0]}?" if close else f"; known: {', '.join(sorted(allowed))}"
                raise self.error(f"unknown key {key!r} {where}{hint}")

    # --------------------------------------------------------- values ---
    def string(self, value: Any, key: str, where: str) -> str:
        if not isinstance(value, str):
            raise self.error(f"{key} {where} must be a string, got {value!r}")
        return value

    def string_list(self, value: Any, key: str, where: str) -> list[str]:
        if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
            raise self.error(f"{key} {where} must be a non-empty list of names, e.g. {key} = [\"mad\"]; got {value!r}")
        return list(value)

    def int_list(self, value: Any, key: str, where: str) -> list[int]:
        if (not isinstance(value, list) or not value
                or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
            raise self.error(f"{key} {where} must be a non-empty list of integers, e.g. {key} = [0, 1, 2]; got {value!r}")
        if len(set(value)) != len(value):
            raise self.error(f"{key} {where} lists a value twice: {value!r}")
        return list(value)

    def float_list(self, value: Any, key: str, where: str) -> list[float]:
        if not isinstance(value, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                  for v in value):
            raise self.error(f"{key} {where} must be a list of numbers, got {value!r}")
        return [float(v) for v in value]

    def setting_value(self, value: Any, key: str, where: str) -> Any:
        if isinstance(value, dict):
            raise self.error(f"setting {key!r} {where} has a table as value; settings take numbers, strings, "
                             "booleans or lists")
        if isinstance(value, list) and any(isinstance(v, (dict, list)) for v in value):
            raise self.error(f"setting {key!r} {where} has a nested list/table value {value!r}")
        if not isinstance(value, (int, float, str, bool, list)):
            raise self.error(f"setting {key!r} {where} has a value of unsupported type: {value!r}")
        from dfkd_bench.config import _check_integers

        try:
            _check_integers(value, key)
        except ConfigError as error:
            raise self.error(f"{error} ({where})") from None
        return value

    def setting_name(self, key: str, where: str) -> str:
        name = self.aliases.get(key, key)
        if name not in self.settings:
            close = difflib.get_close_matches(key, sorted(self.settings | set(self.aliases)), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise self.error(f"unknown setting {key!r} {where}{hint} (`dfkd-bench list --settings` lists them)")
        return name

    def settings_table(self, table: Any, where: str) -> dict[str, Any]:
        """``{written key: value}`` -> ``{setting name: value}``, paper symbols resolved, duplicates refused.

        ``where`` is a phrase like "in [set]" used in error messages."""
        if not isinstance(table, dict):
            raise self.error(f"expected a table of settings {where}, e.g. {{student_steps = 30, alpha = 0.99}}; "
                             f"got {table!r}")
        resolved: dict[str, Any] = {}
        written: dict[str, str] = {}
        for key, value in table.items():
            name = self.setting_name(key, where)
            if name in resolved:
                raise self.error(f"{name} is given twice {where} (as {written[name]!r} and {key!r})")
            resolved[name] = self.setting_value(value, key, where)
            written[name] = key
        return resolved

    def grid(self, table: Any, where: str) -> list[Axis]:
        if not isinstance(table, dict):
            raise self.error(f"expected a table {where}, like [grid] alpha = [0.9, 0.95]; got {table!r}")
        axes: list[Axis] = []
        for key, values in table.items():
            entry = f"grid entry {key!r} {where}"
            if not isinstance(values, list) or not values:
                raise self.error(f"{entry} must be a non-empty list of values (fixed values go in [set]); "
                                 f"got {values!r}")
            tables = [isinstance(v, dict) for v in values]
            if all(tables):  # a joint axis: each point sets several settings together
                if self.aliases.get(key, key) in self.settings:
                    raise self.error(f"{entry} is a joint axis (a list of tables) named like a setting; "
                                     "label it with a word that is not a setting name, e.g. points = [...]")
                points = [self.settings_table(v, f"in point {i + 1} of {entry}") for i, v in enumerate(values)]
                if any(not point for point in points):
                    raise self.error(f"{entry} has an empty point {{}}")
                axes.append(Axis(label=key, points=points, joint=True))
            elif any(tables):
                raise self.error(f"{entry} mixes tables and plain values")
            else:
                name = self.setting_name(key, where)
                values = [self.setting_value(v, key, where) for v in values]
                if len({json.dumps(v) for v in values}) != len(values):
                    raise self.error(f"{entry} lists a value twice: {values!r}")
                axes.append(Axis(label=name, points=[{name: v} for v in values]))
        seen: dict[str, str] = {}
        for axis in axes:
            for name in axis.settings:
                if name in seen:
                    raise self.error(f"{name} is swept by two grid entries ({seen[name]!r} and {axis.label!r}) "
                                     f"{where}")
                seen[name] = axis.label
        return axes

    def resources(self, table: Any) -> dict[str, Any]:
        from dfkd_bench.cluster.launch import LAUNCH_DEFAULTS

        if not isinstance(table, dict):
            raise self.error("[resources] must be a table of launcher options")
        options: dict[str, Any] = {}
        for key, value in table.items():
            name = key.replace("-", "_")
            if name not in LAUNCH_DEFAULTS:
                close = difflib.get_close_matches(name, list(LAUNCH_DEFAULTS), n=1)
                hint = f"; did you mean {close[0]}?" if close else f"; known: {', '.join(sorted(LAUNCH_DEFAULTS))}"
                raise self.error(f"unknown key {key!r} in [resources]{hint}")
            if name == "slurm_extra":
                if isinstance(value, dict):
                    value = [f"{k}={'' if v is True else v}" for k, v in value.items()]
                elif isinstance(value, str):
                    value = [value]
                if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                    raise self.error("[resources] slurm_extra must be a table {exclude = \"node3\"} "
                                     "or a list of \"KEY=VALUE\" strings")
            if name == "submitit_dir":
                value = self.string(value, "submitit_dir", "in [resources]")
            if name == "slurm_setup":
                value = [value] if isinstance(value, str) else value
                if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                    raise self.error("[resources] slurm_setup must be a list of shell lines")
            from dfkd_bench.cluster.launch import check_launch_option

            try:  # the same checks as the command line's --threads, --time, --device ...
                check_launch_option(name, value, f"[resources] {key}")
            except ConfigError as error:
                raise self.error(str(error)) from None
            options[name] = value
        return options

    # ----------------------------------------------------------- cells ---
    def cell_fields(self, table: dict[str, Any], where: str) -> dict[str, Any]:
        """The cell keys of ``table`` checked and converted (set/grid resolved)."""
        out: dict[str, Any] = {}
        for key, value in table.items():
            if key not in CELL_KEYS:
                continue
            if key in ("dataset", "teacher_arch", "student_arch", "teacher_checkpoint", "description"):
                out[key] = self.string(value, key, where)
            elif key == "methods":
                out[key] = self.string_list(value, key, where)
            elif key == "seeds":
                out[key] = self.int_list(value, key, where)
            elif key == "budget":
                if value not in BUDGETS:
                    raise self.error(f"budget {where} must be one of {', '.join(BUDGETS)}, got {value!r}")
                out[key] = value
            elif key == "protocol":
                if value not in ("common", "paper"):
                    raise self.error(f"protocol {where} must be common or paper, got {value!r}")
                out[key] = value
            elif key == "image_size":
                if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                    raise self.error(f"image_size {where} must be a positive integer, got {value!r}")
                out[key] = value
            elif key in ("teacher_mean", "teacher_std"):
                out[key] = self.float_list(value, key, where)
            elif key == "set":
                out[key] = self.settings_table(value, "in [set]" if where == "at the top level" else f"in the set {where}")
            elif key == "grid":
                out[key] = self.grid(value, "in [grid]" if where == "at the top level" else f"in the grid {where}")
        fixed = out.get("set", {})
        for axis in out.get("grid", []):
            both = axis.settings & set(fixed)
            if both:
                raise self.error(f"{', '.join(sorted(both))} is both fixed ([set]) and swept ([grid]) {where}; "
                                 "keep one")
        return out

    def build_cell(self, index: int, defaults: dict[str, Any], own: dict[str, Any], where: str) -> Cell:
        from dfkd_bench.method_api import get_method
        from dfkd_bench.presets import get_preset

        merged = {k: v for k, v in defaults.items() if k not in ("set", "grid")}
        merged.update({k: v for k, v in own.items() if k not in ("set", "grid")})
        if "dataset" not in merged:
            raise self.error(f"{where} has no dataset; add dataset = \"cifar100\" (to the cell or the top level)")
        for key in ("methods", "seeds"):
            if key not in merged:
                raise self.error(f"{where} has no {key}; add {key} = [...] (to the cell or the top level)")
        try:
            get_preset(merged["dataset"])
            for name in merged["methods"]:
                get_method(name)
        except ConfigError as error:
            raise self.error(f"{where}: {error}") from None
        if len(set(merged["methods"])) != len(merged["methods"]):
            raise self.error(f"methods {where} lists a method twice: {merged['methods']!r}")
        # Settings: the cell's own entries (fixed or swept) replace the top level's for the same setting.
        own_fixed, own_axes = own.get("set", {}), own.get("grid", [])
        own_settings = set(own_fixed) | {name for axis in own_axes for name in axis.settings}
        fixed = {k: v for k, v in defaults.get("set", {}).items() if k not in own_settings}
        fixed.update(own_fixed)
        axes = []
        for axis in defaults.get("grid", []):
            overlap = axis.settings & own_settings
            if not overlap:
                axes.append(axis)
            elif axis.joint and overlap != axis.settings:
                raise self.error(f"{where} overrides {', '.join(sorted(overlap))} of the top-level joint axis "
                                 f"{axis.label!r} but not the rest of it; override the whole axis")
        axes.extend(own_axes)
        cell = Cell(index=index, dataset=merged["dataset"], methods=merged["methods"], seeds=merged["seeds"],
                    budget=merged.get("budget", "default"), teacher_arch=merged.get("teacher_arch"),
                    student_arch=merged.get("student_arch"), image_size=merged.get("image_size"),
                    protocol=merged.get("protocol", "common"), teacher_checkpoint=merged.get("teacher_checkpoint"), teacher_mean=merged.get("teacher_mean"),
                    teacher_std=merged.get("teacher_std"), fixed=fixed, axes=axes,
                    description=merged.get("description", ""))
        self.check_methods_know(cell)
        return cell

    def check_methods_know(self, cell: Cell) -> None:
        """Every fixed or swept setting must mean something to the engine or one of the cell's methods."""
        from dfkd_bench.config import check_override_keys

        names = dict.fromkeys(cell.fixed)
        for axis in cell.axes:
            names.update(dict.fromkeys(axis.settings))
        try:
            check_override_keys(cell.methods, names)
        except ConfigError as error:
            raise self.error(f"{cell.where}: {error}") from None


def load_experiment(path: str | os.PathLike) -> Experiment:
    """Read and check an experiment file; see ``experiments/README.md`` for the format."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p.name for p in path.glob("*.toml"))
        shown = ", ".join(files[:4]) + (", ..." if len(files) > 4 else "")
        inside = f"its experiment files: {shown}" if files else "it holds no .toml files"
        raise DfkdError(f"{path} is a folder, not an experiment file; pass one file ({inside})")
    if not path.is_file():
        raise DfkdError(f"experiment file {path} does not exist (the files that come with dfkd-bench are in "
                        "experiments/*.toml)")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path}: not valid TOML: {error}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text (UTF-8) file") from None
    except (ValueError, RecursionError):  # tomllib: an integer of thousands of digits, absurd nesting
        raise ConfigError(f"{path}: not a value any setting takes (a number of thousands of digits, or arrays "
                          "nested too deep); settings are numbers, words and lists") from None
    reader = _Reader(path)
    allowed_top = {**CELL_KEYS, **EXPERIMENT_KEYS}
    reader.check_keys(data, allowed_top, "at the top level")

    name = reader.string(data.get("name", path.stem.replace("_", "-")), "name", "at the top level")
    if not name or not re.fullmatch(r"[A-Za-z0-9_.+-]+", name):
        raise reader.error(f"name {name!r} must be a non-empty word of letters, digits, '-', '_', '.'")
    description = reader.string(data.get("description", ""), "description", "at the top level")
    results_dir = reader.string(data.get("results_dir", f"results/{name}"), "results_dir", "at the top level")
    data_root = data.get("data_root")
    if data_root is not None:
        data_root = reader.string(data_root, "data_root", "at the top level")
    resources = reader.resources(data.get("resources", {}))
    defaults = reader.cell_fields(data, "at the top level")

    raw_cells = data.get("cells", [{}])
    if not isinstance(raw_cells, list) or not raw_cells or not all(isinstance(c, dict) for c in raw_cells):
        raise reader.error("cells must be an array of tables: one [[cells]] section per dataset / pair")
    cells = []
    for index, raw in enumerate(raw_cells):
        where = f"in [[cells]] number {index + 1}" if "cells" in data else "at the top level"
        reader.check_keys(raw, CELL_KEYS, where)
        own = reader.cell_fields(raw, where) if "cells" in data else {}
        label = f"cell {index + 1}" if "cells" in data else "the experiment"
        cells.append(reader.build_cell(index, defaults, own, label))
    return Experiment(path=path, name=name, description=description, results_dir=results_dir, cells=cells,
                      resources=resources, data_root=data_root)


def check_file_folders(experiment: Experiment, args: argparse.Namespace) -> None:
    """The folders the experiment file makes the sweep write to (``results_dir``, ``[resources]
    submitit_dir``) must be inside the current folder: a file received from someone else must not write
    anywhere the user can (no absolute path, no ``~``, no ``..`` and no symbolic link that leads out). The
    command line's ``--results-dir`` / ``--submitit-dir`` stay the user's choice: with them the file's
    value is not used, nor checked."""
    if getattr(args, "results_dir", None) is None:
        _inside_current_folder(experiment, experiment.results_dir, "results_dir", "--results-dir")
    submitit = experiment.resources.get("submitit_dir")
    if submitit is not None and getattr(args, "submitit_dir", None) is None:
        _inside_current_folder(experiment, submitit, "[resources] submitit_dir", "--submitit-dir")


def _inside_current_folder(experiment: Experiment, value: str, key: str, flag: str) -> None:
    why = ""
    if not value.strip():
        why = "it is empty"
    elif value.startswith("~"):
        why = "a path in a home folder"
    elif Path(value).is_absolute():
        why = "an absolute path"
    else:
        here = Path.cwd().resolve()
        target = (here / value).resolve()  # follows the symbolic links that exist
        if target != here and here not in target.parents:
            lexical = os.path.normpath(value)
            why = ("'..' leads out of it" if lexical == ".." or lexical.startswith(".." + os.sep)
                   else f"a symbolic link on the way leads to {shorten(str(target))}")
    if why:
        raise ConfigError(f"{experiment.path}: {key} = {quote(value)} is not a folder inside the current folder "
                          f"({why}); an experiment file may only name one inside it, e.g. \"results/"
                          f"{experiment.name}\": pass {flag} on the command line to choose any other folder yourself")


def override_experiment(experiment: Experiment, budget: str | None = None,
                        overrides: dict[str, Any] | None = None) -> Experiment:
    """The command line's ``--budget`` and ``--set`` applied to every cell (``--set`` may not touch a swept setting)."""
    experiment = dataclasses.replace(experiment, cells=[dataclasses.replace(c) for c in experiment.cells])
    reader = _Reader(experiment.path)
    for cell in experiment.cells:
        if budget:
            cell.budget = budget
        if overrides:
            for key in overrides:
                for axis in cell.axes:
                    if key in axis.settings:
                        raise ConfigError(f"--set {key}: {key} is swept by the grid of {experiment.path} "
                                          f"({cell.where}); edit the file instead")
            cell.fixed = {**cell.fixed, **overrides}
            reader.check_methods_know(cell)
    return experiment


# =============================================================== expanding ===

def _missing_command(teacher_path: str) -> str:
    marker = "make one with: "
    return teacher_path.split(marker, 1)[1] if marker in teacher_path else teacher_path


def _swept_values(config, point: dict[str, Any]) -> dict[str, Any]:
    """The grid values this run actually uses (a method drops the settings it does not declare)."""
    values = {}
    for name in point:
        if hasattr(config.train, name):
            values[name] = getattr(config.train, name)
        elif name in config.params:
            values[name] = config.params[name]
    return values


def plan_experiment(experiment: Experiment, *, teacher_cache: str | None = None, data_root: str | None = None,
                    allow_missing_teacher: bool = False) -> Plan:
    """Every distinct run of the experiment, in file order (cell, method, grid point, seed)."""
    from dfkd_bench.cluster.experiment import MISSING_TEACHER, RunRequest, TeacherOptions, build_run_configs

    data_root = data_root or experiment.data_root
    runs: list[PlannedRun] = []
    seen: set[str] = set()
    for cell in experiment.cells:
        teacher = TeacherOptions(checkpoint=cell.teacher_checkpoint, mean=cell.teacher_mean, std=cell.teacher_std,
                                 cache_dir=teacher_cache)
        planned: list[tuple[int, int, PlannedRun]] = []
        for point_index, point in enumerate(cell.grid_points()):
            request = RunRequest(methods=list(cell.methods), dataset=cell.dataset, seeds=list(cell.seeds),
                                 teacher_arch=cell.teacher_arch, student_arch=cell.student_arch, budget=cell.budget,
                                 overrides={**cell.fixed, **point}, teacher=teacher, data_root=data_root,
                                 image_size=cell.image_size, protocol=cell.protocol)
            try:
                configs = build_run_configs(request, allow_missing_teacher=allow_missing_teacher)
            except DfkdError as error:
                shown = " ".join(f"{k}={v}" for k, v in point.items())
                at = f" at {shown}" if shown else ""
                raise type(error)(f"{experiment.path}: {cell.where}{at}: {error}") from None
            for config in configs:
                missing = None
                if config.teacher.sha256 == MISSING_TEACHER:
                    missing = _missing_command(config.teacher.path)
                run = PlannedRun(config=config, cell=cell, swept=_swept_values(config, point), missing_teacher=missing)
                planned.append((cell.methods.index(config.method), point_index, run))
        planned.sort(key=lambda item: (item[0], item[1]))  # stable: seeds stay in order
        for _, _, run in planned:
            if run.config.run_name not in seen:
                seen.add(run.config.run_name)
                runs.append(run)
    return Plan(experiment=experiment, runs=runs, combinations=experiment.combinations)


def expand(experiment: Experiment, *, teacher_cache: str | None = None, data_root: str | None = None,
           allow_missing_teacher: bool = False) -> list:
    """The distinct RunConfigs of an experiment (duplicates collapsed by ``run_name``)."""
    return plan_experiment(experiment, teacher_cache=teacher_cache, data_root=data_root,
                           allow_missing_teacher=allow_missing_teacher).configs


# ================================================================ printing ===

def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list):
        return "[" + ",".join(_fmt(v) for v in value) + "]"
    return str(value)


def _settings_text(swept: dict[str, Any]) -> str:
    return " ".join(f"{k}={_fmt(v)}" for k, v in swept.items()) or "-"


def _table(rows: list[list[str]], header: list[str]) -> list[str]:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = []
    for row in [header, *rows]:
        cells = [str(c).ljust(w) for c, w in zip(row[:-1], widths[:-1])] + [str(row[-1])]
        lines.append("  ".join(cells).rstrip())
    return lines


def print_plan(plan: Plan, results_dir: str | os.PathLike) -> None:
    from dfkd_bench.store import RunStore

    experiment = plan.experiment
    print(f"{experiment.name}: {experiment.description}" if experiment.description else experiment.name)
    print(f"file: {experiment.path}   results: {results_dir}")
    counts: dict[str, int] = {}
    rows = []
    for run in plan.runs:
        config = run.config
        if run.missing_teacher:
            status = f"teacher missing: {run.missing_teacher}"
            counts["teacher missing"] = counts.get("teacher missing", 0) + 1
        else:
            status = RunStore(results_dir, config.run_name).status()
            counts[status] = counts.get(status, 0) + 1
        rows.append([config.run_name, config.method, config.dataset, f"{config.teacher.arch}->{config.student_arch}",
                     str(config.seed), config.budget, _settings_text(run.swept), status])
    for line in _table(rows, ["RUN", "METHOD", "DATASET", "PAIR", "SEED", "BUDGET", "SETTINGS", "STATUS"]):
        print(line)
    order = ["done", "running", "incomplete", "failed", "pending", "teacher missing"]
    parts = [f"{counts[k]} {k}" for k in order if counts.get(k)]
    print(f"{experiment.name}: {plan.count_line()}; {', '.join(parts)} (dry run: nothing launched)")
    missing = plan.missing_teachers()
    if missing:
        print(f"{len(missing)} teacher(s) missing; make them with:")
        for command in missing:
            print(f"  {command}")


def print_sweep_summary(plan: Plan, summaries: list[dict[str, Any]]) -> None:
    """Mean +- std over seeds of every (dataset, pair, method, swept settings) group."""
    if not summaries:
        return
    by_name = {s["run"]: s for s in summaries}
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for run in plan.runs:
        summary = by_name.get(run.config.run_name)
        if summary is None:
            continue
        key = (run.config.dataset, f"{run.config.teacher.arch}->{run.config.student_arch}", run.config.method,
               _settings_text(run.swept))
        groups.setdefault(key, []).append(summary)
    rows = []
    for (dataset, pair, method, settings), group in groups.items():
        finals = [s["final_accuracy"] for s in group]
        bests = [s["best_accuracy"] for s in group]
        std = statistics.stdev(finals) if len(finals) > 1 else 0.0
        best_std = statistics.stdev(bests) if len(bests) > 1 else 0.0
        rows.append([dataset, pair, method, settings, str(len(group)), f"{statistics.mean(finals):.2f} ± {std:.2f}",
                     f"{statistics.mean(bests):.2f} ± {best_std:.2f}"])
    print()
    for line in _table(rows, ["DATASET", "PAIR", "METHOD", "SETTINGS", "SEEDS", "FINAL ACC", "BEST ACC*"]):
        print(line)
    print("* best accuracy is selected on the test set (an optimistic number); final accuracy is the honest one")


# ================================================================= status ===

@dataclass
class RunInfo:
    name: str
    path: Path
    method: str
    dataset: str
    seed: str
    status: str
    step: int | None
    total: int | None
    final_accuracy: float | None  # the last test accuracy (the final one for a done run)
    error: str
    rate: float | None = None  # iterations per second
    eta: float | None = None  # estimated seconds left (running runs)
    note: str = ""  # what is damaged, for status "damaged"


def _is_run_folder(path: Path) -> bool:
    if not any((path / marker).exists() for marker in RUN_MARKERS):
        return False
    if RUN_NAME.match(path.name):
        return True
    try:
        return "run_name" in json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False


def find_run_folders(results_dir: str | os.PathLike) -> list[Path]:
    """Run folders anywhere under ``results_dir`` (submitit's and hidden folders are skipped)."""
    found = []
    for root, dirs, _files in os.walk(results_dir):
        path = Path(root)
        if path != Path(results_dir) and _is_run_folder(path):
            found.append(path)
            dirs[:] = []  # checkpoints/, samples/ belong to the run
            continue
        dirs[:] = sorted(d for d in dirs if not d.startswith(("_", ".")))
    return sorted(found)


def run_info(path: Path) -> RunInfo:
    from dfkd_bench.store import RunStore, run_progress

    store = RunStore(path.parent, path.name)
    match = RUN_NAME.match(path.name)
    method = dataset = seed = "?"
    if match:
        method, dataset, seed = match["method"], match["dataset"], match["seed"]
    try:
        config = store.read_config()
        method, dataset, seed = config.get("method", method), config.get("dataset", dataset), str(config.get("seed", seed))
    except (DfkdError, AttributeError):
        pass
    progress = run_progress(path)
    return RunInfo(name=path.name, path=path, method=method, dataset=dataset, seed=seed, status=progress.status,
                   step=progress.step, total=progress.total, final_accuracy=progress.last_accuracy,
                   error=progress.error, rate=progress.rate, eta=progress.eta, note=progress.damage)


def scan_results(results_dir: str | os.PathLike) -> list[RunInfo]:
    results_dir = Path(results_dir)
    if results_dir.exists() and not results_dir.is_dir():
        raise DfkdError(f"{results_dir} is a file, not a results folder; pass the folder that holds the run "
                        "folders (e.g. --results-dir results/runs)")
    if not results_dir.is_dir():
        raise DfkdError(f"results folder {results_dir} does not exist; pass the --results-dir of your runs")
    runs = [run_info(path) for path in find_run_folders(results_dir)]
    if not runs:
        raise DfkdError(f"no runs under {results_dir} (no run folders with config.json); start some with "
                        "`dfkd-bench run` or `dfkd-bench sweep FILE`, or pass the right --results-dir")
    return runs


STATUS_ORDER = ("done", "running", "incomplete", "failed", "damaged", "pending")


def _duration(seconds: float | None) -> str:
    """``45s``, ``12m``, ``3h05m``, ``2d04h``; ``-`` when unknown."""
    if seconds is None or not math.isfinite(seconds):
        return "-"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m"
    if seconds < 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"


def _rate(rate: float | None) -> str:
    if rate is None or not math.isfinite(rate) or rate <= 0:
        return "-"
    return f"{rate:.2f}" if rate < 10 else f"{rate:.0f}"


def print_status(runs: list[RunInfo], results_dir: str | os.PathLike) -> None:
    """One line per run: status, iteration reached / planned, last test accuracy, it/s, time left, problems.

    Column positions are stable for scripts: RUN METHOD DATASET SEED STATUS ITERATION ACC IT/S ETA, then a
    free-text note (the error of a failed run, what is damaged).
    """
    rows = []
    for run in runs:
        try:
            shown = str(run.path.relative_to(results_dir))
        except ValueError:
            shown = str(run.path)
        progress = "-"
        if run.step is not None or run.total is not None:
            progress = f"{'-' if run.step is None else run.step}/{'?' if run.total is None else run.total}"
        accuracy = f"{run.final_accuracy:.2f}" if isinstance(run.final_accuracy, (int, float)) else "-"
        note = f"error: {run.error}" if run.error else run.note
        eta = _duration(run.eta) if run.status == "running" else "-"
        rows.append([shown, run.method, run.dataset, run.seed, run.status, progress, accuracy, _rate(run.rate), eta,
                     note])
    header = ["RUN", "METHOD", "DATASET", "SEED", "STATUS", "ITERATION", "ACC", "IT/S", "ETA", ""]
    for line in _table(rows, header):
        print(line)
    counts = {status: sum(1 for r in runs if r.status == status) for status in STATUS_ORDER}
    parts = [f"{counts[s]} {s}" for s in STATUS_ORDER if counts[s]]
    print(f"{len(runs)} runs under {results_dir}: {', '.join(parts)}")


# ================================================================ commands ===

def cmd_sweep(args: argparse.Namespace) -> int:
    from dfkd_bench.config import parse_overrides
    from dfkd_bench.cluster.launch import launch, results_hint

    from dfkd_bench.cluster.launch import MAX_RUNS_WITHOUT_YES, check_work_bounds, check_work_size

    experiment = load_experiment(args.file)
    check_file_folders(experiment, args)
    experiment = override_experiment(experiment, budget=args.budget, overrides=parse_overrides(args.set or []))
    # Counted before the expansion, which builds and checks every run (minutes for a huge grid).
    check_work_size(experiment.combinations, args, f"the combinations of {experiment.path}")
    if experiment.combinations > MAX_RUNS_WITHOUT_YES // 10:
        print(f"expanding {experiment.combinations:,} combinations of {experiment.path} ...", flush=True)
    results_dir = args.results_dir or experiment.results_dir
    data_root = args.data_root or experiment.data_root or os.environ.get("DFKD_BENCH_DATA")
    plan = plan_experiment(experiment, teacher_cache=args.teacher_cache, data_root=data_root,
                           allow_missing_teacher=True)
    check_work_bounds(plan.configs, args)
    if args.dry_run:
        print_plan(plan, results_dir)
        return 0
    missing = plan.missing_teachers()
    if missing:
        raise DfkdError(f"{experiment.path}: {len(missing)} teacher(s) missing; make "
                        f"{'it' if len(missing) == 1 else 'them'} first with: {' ; '.join(missing)}")
    print(f"sweep {experiment.name} ({experiment.path}): {plan.count_line()}", flush=True)
    summaries = launch(plan.configs, results_dir, args, file_options=experiment.resources)
    print_sweep_summary(plan, summaries)
    if summaries:
        print(results_hint(results_dir, len(summaries)))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    runs = scan_results(args.results_dir)
    print_status(runs, args.results_dir)
    return 0


def add_sweep_command(subparsers) -> argparse.ArgumentParser:
    from dfkd_bench.cluster.launch import add_launcher_arguments

    parser = subparsers.add_parser(
        "sweep", help="run an experiment file (methods x datasets x seeds x settings); --dry-run lists its runs",
        description="Expand an experiment file (experiments/*.toml, format in experiments/README.md) into runs "
                    "and launch those not done yet. Launcher flags override the file's [resources].")
    parser.add_argument("file", help="experiment file (TOML)")
    parser.add_argument("--dry-run", action="store_true",
                        help="list every run with its status and launch nothing (works without teachers and data)")
    parser.add_argument("--results-dir", help="where run folders go (default: the file's results_dir, "
                                              "else results/<name>)")
    parser.add_argument("--budget", choices=BUDGETS, help="replace the budget of every cell (e.g. smoke to try a sweep)")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE",
                        help="add a fixed setting to every cell (not one the file sweeps); paper symbols work")
    parser.add_argument("--data-root", help="dataset folder (default: the file's data_root, else $DFKD_BENCH_DATA)")
    parser.add_argument("--teacher-cache", metavar="DIR",
                        help="teacher cache folder (default: $DFKD_BENCH_TEACHERS or ~/.cache/dfkd-bench/teachers)")
    add_launcher_arguments(parser)
    parser.set_defaults(func=cmd_sweep)
    return parser


def add_status_command(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "status", help="table of the runs under a results folder: status, progress, accuracy, errors",
        description="Scan a results folder recursively for run folders and print, for each, its status (done, "
                    "running, failed, incomplete, damaged, pending), the iteration reached, the last test accuracy, "
                    "iterations per second, the estimated time left and, if failed or damaged, why.")
    parser.add_argument("--results-dir", default="results", help="folder to scan, recursively (default: results)")
    parser.set_defaults(func=cmd_status)
    return parser

