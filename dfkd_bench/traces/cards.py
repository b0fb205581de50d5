"""The step-equivalence line of each method's protocol card, from the committed trace summaries.

A tracer writes, next to its trace ``results/traces/NAME.pt``, the summary ``NAME.json``: the
official code (``repo``, ``commit``, ``entry``), the command that regenerates both, the number of
steps, the alignments, and the largest relative difference of the suite's replay on each engine
path (:data:`dfkd_bench.traces.replay.VARIANTS`). ``tests/test_traces.py`` replays every committed
trace and checks that its summary says what the replay finds.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dfkd_bench.errors import DfkdError
from dfkd_bench.method_api import get_method

TRACES_DIR = Path(__file__).resolve().parents[2] / "results" / "traces"
"""Where the committed traces live (the repository's ``results/traces``)."""


def summaries(folder: str | Path | None = None) -> list[dict[str, Any]]:
    """Every trace summary in ``folder`` (default :data:`TRACES_DIR`), by file name."""
    folder = Path(folder) if folder is not None else TRACES_DIR
    found = []
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            summary = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise DfkdError(f"trace summary {path} is unreadable ({error}); regenerate it with its tracer") from None
        if isinstance(summary, dict) and "method" in summary and "official" in summary:
            found.append({**summary, "file": path.name})
    return found


def summary_line(summary: dict[str, Any]) -> str:
    official = summary["official"]
    return (f"step-equivalent to {official['repo']}@{official['commit'][:7]}: max relative difference "
            f"{summary['max_relative_difference']:.1e} over {summary['steps']} steps "
            f"({summary.get('dtype', 'float64')}; "
            f"{official['entry']}; results/traces/{summary['trace']})")


def equivalence_lines(method: str, folder: str | Path | None = None) -> list[str]:
    """One line per committed trace of ``method``, or one line saying why it has none: the method's
    ``no_trace_reason`` (e.g. no public code) or "no trace yet"."""
    lines = [summary_line(s) for s in summaries(folder) if s["method"] == method]
    if lines:
        return lines
    reason = getattr(get_method(method), "no_trace_reason", "")
    return [f"no trace: {reason}" if reason else "no trace yet (its losses are proven by hand-computed tests only)"]
