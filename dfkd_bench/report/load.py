"""Reading results folders: run folders, their configuration, status and records.

Nothing here draws or aggregates; :func:`load_runs` gives one row per run and
:func:`load_records` every record, for the tables, the figures and for users'
own analyses.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from dfkd_bench.config import with_later_defaults
from dfkd_bench.errors import DfkdError, user_message
from dfkd_bench.report.common import (SKIP_DIRS, _missing, _norm, dataset_sort_key, method_label, method_sort_key,
                                      setting_columns)
from dfkd_bench.store import RunStore, heartbeat_age, read_jsonl, run_progress

# ------------------------------------------------------------------ loading ---

@dataclass
class _Scan:
    """What one pass over a results folder found."""

    runs: pd.DataFrame
    records: dict[str, list[dict[str, Any]]]  # run_name -> records
    notes: list[str] = field(default_factory=list)


def find_run_dirs(results_dir: str | os.PathLike) -> list[Path]:
    """Run folders (holding a run's ``config.json``) at any depth, skipping ``_submitit`` logs."""
    return _find_run_dirs(results_dir)[0]


def _find_run_dirs(results_dir: str | os.PathLike) -> tuple[list[Path], list[str]]:
    """Run folders, and one note per folder whose ``config.json`` cannot be read (truncated ...)."""
    root = Path(results_dir)
    if root.exists() and not root.is_dir():
        raise DfkdError(f"{root} is a file, not a results folder; pass the folder that holds the run folders "
                        "(e.g. --results-dir results/runs)")
    if not root.is_dir():
        raise DfkdError(f"results directory {root} does not exist; run `dfkd-bench run` first or pass --results-dir")
    found, damaged = [], []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith("."))
        if "config.json" in filenames:
            path = Path(dirpath) / "config.json"
            try:
                config = json.loads(path.read_bytes().decode("utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
                config = None
                reason = getattr(error, "strerror", None) or "not valid JSON; truncated?"
                damaged.append(f"skipped {dirpath}: its config.json is damaged ({reason}); restore it or delete "
                               "the run folder to run it again")
                dirnames[:] = []
            if isinstance(config, dict) and {"method", "dataset", "seed"} <= set(config):
                found.append(Path(dirpath))
                dirnames[:] = []  # a run folder holds no other runs
    return found, damaged


def _flatten(prefix: str, values: dict[str, Any]) -> dict[str, Any]:
    return {f"{prefix}.{key}": _norm(value) for key, value in sorted(values.items())}


def _config_id(settings: dict[str, Any]) -> str:
    canonical = json.dumps({k: v for k, v in settings.items() if not _missing(v)}, sort_keys=True, default=str)
    return hashlib.sha1(canonical.encode()).hexdigest()[:10]


def _run_state(path: Path) -> str:
    """Why an unfinished run is unfinished, as far as the files tell."""
    if RunStore(path.parent, path.name).is_locked():
        return "running on this host"
    age = heartbeat_age(path)
    if age is not None:
        return f"probably running on another host (heartbeat {age / 60:.0f} min ago)"
    error = path / "error.txt"
    if error.exists():
        lines = [line for line in error.read_text(errors="replace").splitlines() if line.strip()]
        return f"failed: {lines[-1][:300]}" if lines else "failed"
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
    except (DfkdError, OSError) as error:  # damaged, or records.jsonl is a folder
        records, problem = [], f"records cannot be read ({user_message(error)})" if isinstance(error, OSError) \
            else str(error)
    summary = None
    if (path / "done").exists():
        try:
            summary = json.loads((path / "done").read_text())
        except json.JSONDecodeError:
            problem = problem or f"{path / 'done'} is not valid JSON"
        if not problem and not (path / "records.jsonl").exists():
            # CHOSEN: a finished run without records is left out of tables and figures (listed as damaged):
            # the report is made from records, and its summary alone cannot be checked or drawn.
            problem = (f"{path / 'records.jsonl'} is missing (the done file says final accuracy "
                       f"{summary.get('final_accuracy')}); restore it, or delete the run folder to run it again")
    progress = run_progress(path, records=None if problem else records)
    if not problem and progress.status == "damaged":  # a torn final evaluation, a config not of its run id
        problem = progress.damage.removeprefix("done, ")
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
    elif progress.status == "failed":
        # A failed run (an error, a diverged loss) is never averaged in; it is shown as failed.
        status, state = "failed", _run_state(path)
    else:
        status, state = "incomplete", _run_state(path)
    steps = [r["step"] for r in records if isinstance(r.get("step"), (int, float))]
    final = evals[-1]["test_accuracy"] if evals else (summary or {}).get("final_accuracy")
    best = max(r["test_accuracy"] for r in evals) if evals else (summary or {}).get("best_accuracy")
    wall = (summary or {}).get("wall_time")
    if wall is None and evals:
        wall = evals[-1].get("wall_time")
    epochs, per_epoch = train.get("epochs"), train.get("steps_per_epoch")
    later = with_later_defaults(config["method"], train, config.get("params") or {})
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
        "runs_per_gpu": environment.get("runs_per_gpu", 1),
        # Where the time went (records since the budget counters exist): synthesis vs student training.
        "time_synthesis": evals[-1].get("time/synthesis") if evals else None,
        "time_student": evals[-1].get("time/student") if evals else None,
        # The budget spent, in images (cumulative counters of the last evaluation).
        **{f"{kind}_images": evals[-1].get(f"{kind}_images") if evals else None
           for kind in ("student", "teacher", "synthetic")},
        "final_accuracy": final, "best_accuracy": best, "wall_time": wall,
        "iterations": (summary or {}).get("iterations", max(steps) if steps else 0),
        "last_step": max(steps) if steps else 0,
        "planned_iterations": epochs * per_epoch if epochs and per_epoch else None,
        "evaluations": len(evals), "run_id": config.get("run_id", path.name),
        # What the legends and the listing of unfinished runs say: "running, iteration 3,200 of 15,000" ...
        "progress": progress.describe() if status not in ("done", "damaged") else status,
        "last_accuracy": evals[-1]["test_accuracy"] if evals else None,
        "iterations_per_second": progress.rate, "eta_seconds": progress.eta,
        # When the run finished (epoch seconds of the done file), to prefer the newest among equals.
        "finished_at": (path / "done").stat().st_mtime if summary is not None else None,
        # A paper protocol's run carries its paper's number (the report's "Reproductions" table).
        "protocol": config.get("protocol") or "common", "published": _published(config.get("published")),
        # Settings added after a run was stored count at the default it ran with, so that an old and a
        # new run of the same configuration are one configuration (as their run ids say).
        **_flatten("train", later[0]), **_flatten("params", later[1]),
    }
    return row, records


def _published(value: Any) -> tuple | None:
    """``config["published"]`` as a hashable tuple of (key, value) pairs, or None when absent or not a dict."""
    return _norm(value) if isinstance(value, dict) else None


def results_roots(results_dir: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    """One results folder, or several (``report --results-dir A --results-dir B``), as paths."""
    if isinstance(results_dir, (str, os.PathLike)):
        return [Path(results_dir)]
    return [Path(r) for r in results_dir]


def _scan(results_dir: str | os.PathLike | Sequence[str | os.PathLike]) -> _Scan:
    roots = results_roots(results_dir)
    paths, damaged = [], []
    for root in roots:
        found, broken = _find_run_dirs(root)
        paths += found
        damaged += broken
    if not paths:
        where = " or ".join(str(root) for root in roots)
        if damaged:
            raise DfkdError(f"no readable runs under {where}: {len(damaged)} run folder(s) have a damaged "
                            f"config.json, e.g. {damaged[0].split(':')[0].removeprefix('skipped ')}")
        raise DfkdError(f"no runs found under {where} (looked for */config.json); run `dfkd-bench run` first")
    rows, records, notes = [], {}, list(damaged)
    for path in paths:
        try:
            row, run_records = _read_run(path)
        except (OSError, json.JSONDecodeError, KeyError) as error:
            reason = f"no entry {error}" if isinstance(error, KeyError) else user_message(error)
            notes.append(f"skipped {path}: cannot read its config ({reason})")
            continue
        rows.append((row, run_records))
    # The same run found twice (a copied folder) must count once: keep the finished
    # copy with the most records.
    by_id: dict[str, tuple[dict, list]] = {}
    rank = {"done": 0, "incomplete": 1, "failed": 2, "damaged": 3}
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

    Columns: ``run_name, path, status`` (done / incomplete / failed / damaged),
    ``state`` (why it is not done), ``progress`` (where an unfinished run stands:
    ``running, iteration 3,200 of 15,000``, ``stopped at iteration ...``,
    ``failed at iteration ...: reason``), ``last_accuracy``, ``iterations_per_second``,
    ``eta_seconds`` (running runs), ``method, dataset, seed, teacher_arch, student_arch,
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


