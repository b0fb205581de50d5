"""The accuracy tables (CSV, Markdown, LaTeX, plain text) and the compute table."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd

from dfkd_bench.report.common import SINGLE_RUN_MARK, _missing, cell_sort_key, method_label, method_sort_key
from dfkd_bench.report.configs import _stats, analyse_configs, select_table_runs

# --------------------------------------------------------------------- tables ---

def _cells_in_order(frame: pd.DataFrame) -> list[tuple[str, str]]:
    return sorted({(d, p) for d, p in zip(frame["dataset"], frame["pair"])}, key=cell_sort_key)


UNFINISHED_MARK = "‡"
UNFINISHED_STATUSES = ("incomplete", "failed")


def accuracy_table(runs: pd.DataFrame, metric: str = "final_accuracy", *, unfinished: bool = True) -> pd.DataFrame:
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
    # Runs not finished (running, stopped, failed) are never in a mean; with ``unfinished`` their
    # count is a column and marks the cell (a method with no finished run yet gets a row of its own).
    pending = runs[runs["status"].isin(UNFINISHED_STATUSES)] if unfinished else runs.iloc[0:0]
    counts = pending.groupby(["dataset", "pair", "method"]).size().to_dict() if not pending.empty else {}
    shown = {(r["row"], r["dataset"], r["pair"]) for r in rows}
    for (dataset, pair, method), _count in counts.items():
        if (method, dataset, pair) not in shown:
            rows.append({"row": method, "label": method_label(method), "dataset": dataset, "pair": pair,
                         "mean": math.nan, "std": math.nan, "n": 0, "seeds": "", "selection": "no finished run",
                         "runs": ""})
    frame = pd.DataFrame(rows, columns=["row", "label", "dataset", "pair", "mean", "std", "n", "seeds",
                                        "selection", "runs"])
    frame["unfinished"] = [counts.get((d, p, r), 0) for d, p, r in zip(frame["dataset"], frame["pair"], frame["row"])]
    frame["cell"] = [_row_cell(r, m, s, n) + (UNFINISHED_MARK if k else "")
                     for r, m, s, n, k in zip(frame["row"], frame["mean"], frame["std"], frame["n"],
                                              frame["unfinished"])]
    order = {name: i for i, name in enumerate(["teacher", *sorted(set(frame["row"]) - {"teacher"},
                                                                     key=method_sort_key)])}
    frame["_row"] = frame["row"].map(order)
    frame["_col"] = [cell_sort_key(c) for c in zip(frame["dataset"], frame["pair"])]
    frame = frame.sort_values(["_row", "_col"]).drop(columns=["_row", "_col"]).reset_index(drop=True)
    return frame[["row", "label", "dataset", "pair", "mean", "std", "n", "cell", "seeds", "selection", "runs",
                  "unfinished"]]


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
        if getattr(row, "unfinished", 0):
            text += "$^\\ddagger$" if latex else UNFINISHED_MARK
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
                    "→": r"$\rightarrow$", "±": r"$\pm$", "†": r"$^\dagger$", "‡": r"$^\ddagger$", "—": "---", "–": "--"}
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
    if "unfinished" in table and (table["unfinished"] > 0).any():
        notes.append(f"{UNFINISHED_MARK} this method has runs in this column that are not finished (running, stopped "
                     "or failed); they are NOT in the mean (see the unfinished runs).")
    notes.append("Teacher: the teacher's test accuracy measured at the start of the runs.")
    if best:
        notes.append("Best = the maximum test accuracy over all evaluations during training, i.e. the checkpoint is "
                     "selected on the test set: an optimistic number. The final accuracy is the honest one.")
    else:
        notes.append("Final = test accuracy of the student at the end of training (its last evaluation).")
    return notes


def _write_tables(table: pd.DataFrame, out_dir: Path, stem: str, title: str, best: bool,
                  extra_notes: list[str], appendix: str = "") -> tuple[list[Path], str]:
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
        "\n".join(f"- {note}" for note in notes) + "\n" + (f"\n{appendix}" if appendix else "")
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

        def mean_count(column: str) -> float:
            values = pd.to_numeric(chosen[column], errors="coerce").dropna() if column in chosen else []
            return values.mean() if len(values) else float("nan")

        def mean_minutes(column: str) -> float:
            return mean_count(column) / 60.0

        rows.append({"row": row.row, "label": row.label, "dataset": row.dataset, "pair": row.pair,
                     "minutes_mean": minutes.mean() if len(minutes) else float("nan"),
                     "minutes_std": minutes.std(ddof=1) if len(minutes) > 1 else float("nan"), "n": len(minutes),
                     "synthesis_minutes": mean_minutes("time_synthesis"),
                     "student_minutes": mean_minutes("time_student"),
                     "student_images": mean_count("student_images"),
                     "synthetic_images": mean_count("synthetic_images"),
                     "device": kinds("device"), "torch_threads": kinds("torch_threads"),
                     "world_size": kinds("world_size"), "runs_per_gpu": kinds("runs_per_gpu")})
    return pd.DataFrame(rows, columns=["row", "label", "dataset", "pair", "minutes_mean", "minutes_std", "n",
                                       "synthesis_minutes", "student_minutes", "student_images",
                                       "synthetic_images", "device", "torch_threads",
                                       "world_size", "runs_per_gpu"])


def _count(value: float) -> str:
    """1,536,000 -> 1.54M; 15,360 -> 15.4k."""
    if value >= 1e6:
        return f"{value / 1e6:.2f}M"
    return f"{value / 1e3:.1f}k" if value >= 1e3 else f"{value:.0f}"


def _cost_markdown(costs: pd.DataFrame) -> str:
    if costs.empty:
        return "(no finished run yet)\n"
    lines = ["| method | dataset (pair) | wall time per run (min) | synthesis / student (min) | "
             "student / synthetic images per run | runs | device | CPU threads | processes | runs per device |",
             "|:--|:--|--:|--:|--:|--:|:--|:--|:--|:--|"]
    for row in costs.itertuples():
        time_text = "—" if _missing(row.minutes_mean) else (
            f"{row.minutes_mean:.1f}" + ("" if _missing(row.minutes_std) else f" ± {row.minutes_std:.1f}"))
        split = "—" if _missing(row.synthesis_minutes) else f"{row.synthesis_minutes:.1f} / {row.student_minutes:.1f}"
        images = " / ".join("—" if _missing(count) else _count(count)
                            for count in (row.student_images, row.synthetic_images))
        lines.append(f"| {row.label} | {row.dataset} ({row.pair}) | {time_text} | {split} | {images} | {row.n} | "
                     f"{row.device} | {row.torch_threads} | {row.world_size} | {row.runs_per_gpu} |")
    return "\n".join(lines) + "\n\n- Wall time from start to `done`, evaluations included (mean ± sample std " \
        "over the runs of the final-accuracy table); synthesis / student: time in the generator stages and in " \
        "the student stages (runs that record it); images: how many images the student trained on and the " \
        "method synthesised (M = million, k = thousand), the budget per image. Wall time depends on the " \
        "machine and on what else ran on it (runs per device: runs packed on one device with " \
        "--runs-per-gpu); compare methods with `dfkd-bench bench`, which interleaves them in one process.\n"


def _plain_table(table: pd.DataFrame) -> str:
    if table.empty:
        return "(no finished run yet)"
    wide = _wide(table, bold=False)
    wide.columns = [f"{d} ({p})" for d, p in wide.columns]
    return wide.to_string()




def unfinished_markdown(runs: pd.DataFrame) -> str:
    """The runs not finished (running, stopped, failed), with where they stand and their last test accuracy."""
    pending = runs[runs["status"].isin(UNFINISHED_STATUSES)]
    if pending.empty:
        return ""
    lines = [f"**Runs not finished ({UNFINISHED_MARK}, not in the means)**", "",
             "| run | method | dataset (pair) | seed | where it stands | last test accuracy |",
             "|:--|:--|:--|--:|:--|--:|"]
    for row in pending.itertuples():
        accuracy = "—" if _missing(row.last_accuracy) else f"{row.last_accuracy:.2f}"
        where = str(row.progress).replace("|", "\\|")
        lines.append(f"| {row.run_name} | {method_label(row.method)} | {row.dataset} ({row.pair}) | {row.seed} | "
                     f"{where} | {accuracy} |")
    return "\n".join(lines) + "\n"
