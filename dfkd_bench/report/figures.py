"""The figures: curves over training (Figs. 2-4, 9), sample grids (Fig. 5) and sweeps (Figs. 6, 7, 9).

Drawn with matplotlib's Agg canvas (no display, no global pyplot state) and
saved in every requested format.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from dfkd_bench.report.common import (BAND_TEXT, DRIFT_PREFIX, GENERATOR_VARIANTS, LOSS_CURVE_VARIANTS, LOSS_PREFIX,
                                      METHOD_ORDER, STUDENT_DIAGNOSTICS, SYNTHESIS_TERM_PREFIX, _paper_symbols,
                                      _setting_label, cell_sort_key, method_label, method_sort_key, recorded_terms,
                                      setting_name, term_title)
from dfkd_bench.report.configs import CellConfigs, _stats, _value_sort_key, sweep_points

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


PNG_MAX_PIXELS = 8e6  # a many-panel figure (every series of ten methods) stays a ~1 MB file


def _png_dpi(fig) -> float:
    """150 dpi, lowered for a figure so large that it would pass PNG_MAX_PIXELS (its PDF is exact)."""
    width, height = fig.get_size_inches()
    return min(150.0, (PNG_MAX_PIXELS / (width * height)) ** 0.5)


def _save(fig, out_dir: Path, stem: str, formats: Sequence[str]) -> list[Path]:
    paths = []
    for fmt in formats:
        path = out_dir / f"{stem}.{fmt}"
        # No creation date (PDF) or software stamp: the same records give byte-identical figures,
        # so a regenerated report shows in git only where its numbers changed.
        metadata = {"CreationDate": None} if fmt == "pdf" else {"Software": None} if fmt == "png" else None
        fig.savefig(path, dpi=_png_dpi(fig) if fmt == "png" else None, metadata=metadata)
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
        # A long label (an unfinished run says where it stands) takes the width of several.
        entry = max(2.7, 0.075 * max(len(label) for label in labels) + 0.6)
        columns = max(1, min(len(labels), int(fig.get_figwidth() / entry)))
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
    linestyle: str = "-"


UNFINISHED_STYLE = ":"
UNFINISHED_TEXT = "dotted: an unfinished or failed run, one seed, not in the tables"


def unfinished_lines(runs: pd.DataFrame) -> list[_Line]:
    """One dotted line per unfinished (running, stopped) or failed run, labelled with where it stands:
    ``MAD seed 2: running, iteration 3,200 of 15,000``. Never averaged with finished seeds."""
    import textwrap

    pending = runs[runs["status"].isin(["incomplete", "failed"])]
    colors = _method_colors(runs["method"])
    lines = []
    for row in pending.itertuples():
        label = textwrap.shorten(f"{method_label(row.method)} seed {row.seed}: {row.progress}", 90, placeholder=" …")
        lines.append(_Line(row.dataset, row.pair, row.method, label, colors[row.method], [row.run_name],
                           UNFINISHED_STYLE))
    return lines


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


def _plot_band(ax, records: pd.DataFrame, line: _Line, column: str, linestyle: str | None = None,
               label: str | None = None) -> bool:
    frame = band(records[records["run_name"].isin(line.run_names)], column)
    if frame.empty:
        return False
    linestyle = line.linestyle if linestyle is None else linestyle
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

    def draw(ax, cell, metric):
        for line in lines:
            if (line.dataset, line.pair) == cell:
                _plot_band(ax, records, line, metric)
        name, ylabel = term_title(metric)
        ax.set_title(f"{cell[0]} ({cell[1]})\n{name}", fontsize=10)
        ax.set_xlabel("step (training iterations)")
        ax.set_ylabel(ylabel)

    return _panel_figure(panels, draw, lines, title, out_dir, stem, formats)


def _panel_figure(panels, draw, lines: Sequence[_Line], title: str, out_dir: Path, stem: str,
                  formats: Sequence[str]) -> list[Path]:
    """One panel per ``(cell, key)`` of ``panels``, drawn by ``draw(ax, cell, key)`` on a grid; unused
    panels hidden, the legend and the title (with the band and dotted-line keys) added, saved."""
    nrows, ncols, places = _panel_grid(panels)
    fig, axes = _figure(nrows, ncols)
    used = set()
    for r, c, cell, key in places:
        used.add((r, c))
        draw(axes[r][c], cell, key)
        axes[r][c].grid(alpha=0.3)
    for r in range(nrows):
        for c in range(ncols):
            if (r, c) not in used:
                axes[r][c].set_visible(False)
    _figure_legend(fig, axes)
    dotted = any(line.linestyle == UNFINISHED_STYLE for line in lines)
    _suptitle(fig, f"{title}\n{BAND_TEXT}" + (f"; {UNFINISHED_TEXT}" if dotted else ""))
    return _save(fig, out_dir, stem, formats)


def plot_accuracy_curves(records, cells, out_dir, formats, unfinished: Sequence[_Line] = ()) -> list[Path]:
    """Fig. 2: test accuracy of the student vs step, one panel per (dataset, pair); ``unfinished``
    (see :func:`unfinished_lines`) adds dotted lines for runs not finished."""
    lines = _curve_lines(cells) + list(unfinished)
    return _metric_figure(records, lines, ["test_accuracy"], "Test accuracy of the student during training (Fig. 2)",
                          out_dir, "accuracy_curves", formats)


BUDGET_AXES = {"student_images": "student training images (cumulative)", "wall_time": "wall time (s)"}


def plot_budget_curves(records, cells, out_dir, formats, unfinished: Sequence[_Line] = ()) -> list[Path]:
    """Test accuracy against the budget spent, not the iteration: against the images the student
    trained on (MAD and DFKD-Mem train on two batches per step, ABM on one) and against wall time.
    Drawn from the cumulative counters of the records (runs made before they existed are left out)."""
    lines = _curve_lines(cells) + list(unfinished)
    cell_keys = sorted({(line.dataset, line.pair) for line in lines}, key=cell_sort_key)
    panels = [(cell, axis) for cell in cell_keys for axis in BUDGET_AXES
              if any(_has(records, axis, line.run_names) and _has(records, "test_accuracy", line.run_names)
                     for line in lines if (line.dataset, line.pair) == cell)]
    if not panels or "student_images" not in records.columns:
        return []

    def draw(ax, cell, axis):
        for line in lines:
            if (line.dataset, line.pair) != cell:
                continue
            mine = records[records["run_name"].isin(line.run_names)]
            frame = band(mine, "test_accuracy")
            x = mine.dropna(subset=[axis]).groupby("step")[axis].mean().reindex(frame["step"]).to_numpy()
            keep = pd.notna(x)
            if not keep.any():
                continue
            frame = frame[keep]
            ax.plot(x[keep], frame["mean"], color=line.color, linestyle=line.linestyle, linewidth=1.6,
                    label=line.label)
            if (frame["n"] > 1).any():
                ax.fill_between(x[keep], frame["min"], frame["max"], color=line.color, alpha=0.18, linewidth=0)
        ax.set_title(f"{cell[0]} ({cell[1]})\ntest accuracy", fontsize=10)
        ax.set_xlabel(BUDGET_AXES[axis])
        ax.set_ylabel("test accuracy (%)")

    return _panel_figure(panels, draw, lines, "Test accuracy against the images the student trained on and "
                         "against wall time (x: mean over seeds)", out_dir, "accuracy_budget", formats)


def _loss_terms(records: pd.DataFrame, lines: Sequence[_Line]) -> tuple[list[str], list[str]]:
    """Every ``loss/<term>`` the drawn runs recorded, split into the student's terms and the synthesis
    terms (``gen_*``, see common.SYNTHESIS_TERM_PREFIX), each in method order, by the methods' own names."""
    terms = recorded_terms(records, LOSS_PREFIX, [line.run_names for line in lines])
    synthesis = [t for t in terms if t.removeprefix(LOSS_PREFIX).startswith(SYNTHESIS_TERM_PREFIX)]
    return [t for t in terms if t not in synthesis], synthesis


def plot_loss_curves(records, cells, out_dir, formats, unfinished: Sequence[_Line] = ()) -> list[Path]:
    """Fig. 3: every term of the student's loss each method records (KD per source of samples: G, EMA G,
    memory, pool ...; its total and bounds), under the method's own names."""
    lines = _curve_lines(cells, LOSS_CURVE_VARIANTS) + list(unfinished)
    student, _ = _loss_terms(records, lines)
    return _metric_figure(records, lines, student,
                          "The student's loss terms as each method records them (Fig. 3: KD per source of samples)",
                          out_dir, "loss_curves", formats)


def plot_generator_losses(records, cells, out_dir, formats, unfinished: Sequence[_Line] = ()) -> list[Path]:
    """Fig. 9 style: every synthesis term each method records, teacher agreement and test cross-entropy."""
    lines = _curve_lines(cells, GENERATOR_VARIANTS) + list(unfinished)
    _, synthesis = _loss_terms(records, lines)
    return _metric_figure(records, lines, [*synthesis, *STUDENT_DIAGNOSTICS],
                          "Synthesis loss terms as each method records them, and student diagnostics "
                          "(Fig. 9; losses averaged between evaluations)", out_dir, "generator_losses", formats)


DRIFT_STYLES = ("-", "--", "-.", (0, (5, 1, 1, 1, 1, 1)), (0, (8, 2)))


def plot_drift_curves(records, cells, out_dir, formats) -> list[Path]:
    """Fig. 4: mean JS(S_{t-tau}, T) on fresh samples of every source a method records (``js_<source>``:
    G, EMA G, a pool ...), one line style per source name, the method's colour."""
    drift = records[records["kind"] == "drift"] if "kind" in records.columns else records.iloc[0:0]
    candidates = _curve_lines(cells)
    sources = recorded_terms(drift, DRIFT_PREFIX, [line.run_names for line in candidates])
    lines = [line for line in candidates if any(_has(drift, s, line.run_names) for s in sources)]
    if not lines:
        return []
    style = {source: DRIFT_STYLES[i % len(DRIFT_STYLES)] for i, source in enumerate(sources)}
    cell_keys = sorted({(line.dataset, line.pair) for line in lines}, key=cell_sort_key)
    ncols = min(3, len(cell_keys))
    nrows = math.ceil(len(cell_keys) / ncols)
    fig, axes = _figure(nrows, ncols)
    for index, cell in enumerate(cell_keys):
        ax = axes[index // ncols][index % ncols]
        taus = set()
        for line in (line for line in lines if (line.dataset, line.pair) == cell):
            drawn = [s for s in sources if _has(drift, s, line.run_names)]
            for index, source in enumerate(drawn):
                # The method's first source carries its legend entry; the others are keyed by style below.
                _plot_band(ax, drift, line, source, style[source], label=None if index == 0 else f"_{line.label} {source}")
            taus |= set(drift.loc[drift["run_name"].isin(line.run_names), "tau"].dropna().astype(int))
        tau = ", ".join(str(t) for t in sorted(taus))
        ax.set_title(f"{cell[0]} ({cell[1]}), τ = {tau}", fontsize=10)
        ax.set_xlabel("step t (training iterations)")
        ax.set_ylabel(r"mean JS($S_{t-\tau}$, $T$) on fresh samples (nats)")
        ax.grid(alpha=0.3)
    for index in range(len(cell_keys), nrows * ncols):
        axes[index // ncols][index % ncols].set_visible(False)
    for source in sources:
        axes[0][0].plot([], [], color="0.3", linestyle=style[source],
                        label=f"line style: samples of source '{source.removeprefix(DRIFT_PREFIX)}' at t")
    _figure_legend(fig, axes)
    _suptitle(fig, f"Drift of the student from the teacher on current synthetic samples (Fig. 4)\n{BAND_TEXT}")
    return _save(fig, out_dir, "drift_curves", formats)


def _slug(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_.+" else "_" for ch in text.replace("→", "-to-"))


def plot_samples(records, cells, out_dir, formats) -> tuple[list[Path], list[str]]:
    """Fig. 5: the latest sample grids of every source the method records (G, EMA G, a pool ...) side by
    side, in the method's order and under its names, seed 0 of the table configuration."""
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
        fig, axes = _figure(1, len(images), panel=(4.4, 4.4), legend=False)
        for ax, (source, image) in zip(axes[0], images):
            ax.imshow(image, cmap="gray" if image.ndim == 2 else None, interpolation="nearest")
            ax.set_title(f"samples of source '{source}'", fontsize=10)
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




def _cliques(average: pd.Series, critical_difference: float) -> list[tuple[int, int]]:
    """Maximal runs i..j of methods (sorted by average rank) whose ranks differ by less than the CD."""
    values = average.to_numpy(dtype=float)
    spans = []
    for i in range(len(values)):
        j = max(k for k in range(i, len(values)) if values[k] - values[i] < critical_difference)
        if j > i and not any(a <= i and j <= b for a, b in spans):
            spans.append((i, j))
    return spans


def plot_critical_difference(ranks, out_dir: Path, formats: Sequence[str]) -> list[Path]:
    """Demšar's critical-difference diagram: methods placed at their average rank (1 = best, left), the
    Nemenyi CD drawn above the axis, and a thick bar joining methods not significantly different."""
    if ranks is None or ranks.test is None:
        return []
    average, cd, k = ranks.average, ranks.test.critical_difference, ranks.test.k
    half = math.ceil(k / 2)
    fig, axes = _figure(1, 1, panel=(8.0, 0.9 + 0.32 * half), legend=False)
    ax = axes[0][0]
    margin = max(2.0, 0.3 * k)  # room for the method names on both sides
    ax.set_xlim(1 - margin, k + margin)
    bottom = -(half + 1.6)
    ax.set_ylim(bottom, 1.6)
    ax.set_axis_off()
    ax.plot([1, k], [0, 0], color="black", linewidth=1)
    for tick in range(1, k + 1):
        ax.plot([tick, tick], [0, 0.12], color="black", linewidth=1)
        ax.text(tick, 0.22, str(tick), ha="center", va="bottom", fontsize=9)
    ax.plot([1, 1 + cd], [1.1, 1.1], color="black", linewidth=1.6)
    for x in (1, 1 + cd):
        ax.plot([x, x], [1.0, 1.2], color="black", linewidth=1.2)
    ax.text(1 + cd / 2, 1.3, f"CD = {cd:.2f}", ha="center", va="bottom", fontsize=9)
    for index, (label, rank) in enumerate(average.items()):
        left = index < half
        depth = -(index + 1 if left else k - index) * 1.0 - 0.3
        end = 0.5 if left else k + 0.5
        ax.plot([rank, rank, end], [0, depth, depth], color="0.25", linewidth=0.9)
        ax.text(end - 0.05 if left else end + 0.05, depth, f"{label} ({rank:.2f})", ha="right" if left else "left",
                va="center", fontsize=9)
    for row, (i, j) in enumerate(_cliques(average, cd)):
        y = -0.25 - 0.18 * row
        ax.plot([average.iloc[i] - 0.03, average.iloc[j] + 0.03], [y, y], color="black", linewidth=3.2,
                solid_capstyle="round")
    t = ranks.test
    _suptitle(fig, f"Average rank over {t.n} columns ({', '.join(ranks.ranks.columns)}); 1 = best\n"
                   f"Friedman χ² = {t.statistic:.2f}, p = {t.p:.3g}; Nemenyi CD at 0.05 = {cd:.2f}: "
                   "methods joined by a bar are not significantly different")
    return _save(fig, out_dir, "critical_difference", formats)
