"""The accuracy tables (CSV, Markdown, LaTeX, plain text) and the compute table."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from dfkd_bench.report.common import SINGLE_RUN_MARK, _missing, cell_sort_key, method_label, method_sort_key
from dfkd_bench.report.configs import _stats, analyse_configs, select_table_runs
from dfkd_bench.report.stats import (ALPHA, CONFIDENCE, POWER, RankTest, average_ranks, compare, format_seeds,
                                     friedman, holm, probability_of_improvement, seeds_needed, t_interval)

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

    Statistics (:mod:`dfkd_bench.report.stats`): ``ci_low, ci_high`` the 95 %
    t-interval of the mean; against the column's best mean: ``vs_best`` (the
    best's row), ``test`` (paired t over seeds when both cells share teacher and
    seeds, else Welch), ``diff`` and its interval ``diff_low, diff_high``, ``p``,
    ``p_holm`` (Holm within the column), ``seeds_needed`` (per method, for 80 %
    power at 5 %) and ``tied_with_best`` (the best, or not significantly worse:
    bold). ``per_seed`` holds the values behind the cell ({seed: value}).
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
                     "runs": ";".join(teachers["run_name"]), "per_seed": {}, "teachers": ""})
    for cell in cells:
        chosen = cell.runs[cell.runs["config_id"] == cell.reference]
        mean, std, n = _stats(chosen[metric])
        rows.append({"row": cell.method, "label": method_label(cell.method), "dataset": cell.dataset,
                     "pair": cell.pair, "mean": mean, "std": std, "n": n,
                     "seeds": ",".join(str(int(s)) for s in sorted(chosen["seed"])),
                     "selection": cell.reason if len(cell.settings) == 1
                     else f"{cell.reason}: {cell.describe(cell.reference)}",
                     "runs": ";".join(chosen["run_name"]),
                     "per_seed": {int(s): float(v) for s, v in zip(chosen["seed"], chosen[metric]) if not _missing(v)},
                     "teachers": ";".join(sorted(set(str(t) for t in chosen["teacher_sha256"])))})
    # Runs not finished (running, stopped, failed) are never in a mean; with ``unfinished`` their
    # count is a column and marks the cell (a method with no finished run yet gets a row of its own).
    pending = runs[runs["status"].isin(UNFINISHED_STATUSES)] if unfinished else runs.iloc[0:0]
    counts = pending.groupby(["dataset", "pair", "method"]).size().to_dict() if not pending.empty else {}
    shown = {(r["row"], r["dataset"], r["pair"]) for r in rows}
    for (dataset, pair, method), _count in counts.items():
        if (method, dataset, pair) not in shown:
            rows.append({"row": method, "label": method_label(method), "dataset": dataset, "pair": pair,
                         "mean": math.nan, "std": math.nan, "n": 0, "seeds": "", "selection": "no finished run",
                         "runs": "", "per_seed": {}, "teachers": ""})
    frame = pd.DataFrame(rows, columns=["row", "label", "dataset", "pair", "mean", "std", "n", "seeds",
                                        "selection", "runs", "per_seed", "teachers"])
    frame["unfinished"] = [counts.get((d, p, r), 0) for d, p, r in zip(frame["dataset"], frame["pair"], frame["row"])]
    frame["cell"] = [_row_cell(r, m, s, n) + (UNFINISHED_MARK if k else "")
                     for r, m, s, n, k in zip(frame["row"], frame["mean"], frame["std"], frame["n"],
                                              frame["unfinished"])]
    order = {name: i for i, name in enumerate(["teacher", *sorted(set(frame["row"]) - {"teacher"},
                                                                     key=method_sort_key)])}
    frame["_row"] = frame["row"].map(order)
    frame["_col"] = [cell_sort_key(c) for c in zip(frame["dataset"], frame["pair"])]
    frame = frame.sort_values(["_row", "_col"]).drop(columns=["_row", "_col"]).reset_index(drop=True)
    frame = _add_statistics(frame)
    return frame[["row", "label", "dataset", "pair", "mean", "std", "n", "cell", "ci_low", "ci_high",
                  "tied_with_best", "vs_best", "test", "diff", "diff_low", "diff_high", "p", "p_holm",
                  "seeds_needed", "seeds", "selection", "runs", "unfinished", "per_seed", "teachers"]]


def _pairable(a: str, b: str) -> bool:
    """Runs can be paired by seed only when both cells used one and the same teacher."""
    return bool(a) and a == b and ";" not in a


def _seeds_for_family(c, family: int) -> float:
    """Seeds per method to resolve ``c``'s difference at the Bonferroni level ALPHA / family: the level
    Holm's correction applies to the smallest p of the column, so an upper bound for every step.

    # CHOSEN: at ALPHA / m, not ALPHA: a difference "resolved" at 0.05 alone could still fail the
    # Holm-corrected test the bold marks come from; at ALPHA / m enough seeds are enough for both.
    """
    if not c.test:
        return math.nan
    return seeds_needed(c.diff, c.spread, paired=c.paired, alpha=ALPHA / max(family, 1))


def _add_statistics(frame: pd.DataFrame) -> pd.DataFrame:
    """The t-interval of every method cell, and each method against its column's best (Holm within
    the column): the columns described in :func:`accuracy_table`."""
    frame = frame.copy()
    intervals = [t_interval(values.values()) if row != "teacher" else None
                 for row, values in zip(frame["row"], frame["per_seed"])]
    frame["ci_low"] = [i.low if i else math.nan for i in intervals]
    frame["ci_high"] = [i.high if i else math.nan for i in intervals]
    for column, default in (("tied_with_best", False), ("vs_best", ""), ("test", ""), ("diff", math.nan),
                            ("diff_low", math.nan), ("diff_high", math.nan), ("p", math.nan),
                            ("p_holm", math.nan), ("seeds_needed", math.nan)):
        frame[column] = default
    frame["tied_with_best"] = frame["tied_with_best"].astype(bool)
    methods = frame[(frame["row"] != "teacher") & (frame["n"] > 0)]
    for _, column in methods.groupby(["dataset", "pair"], sort=False):
        best = column.loc[column["mean"].idxmax()]
        frame.loc[best.name, ["tied_with_best", "vs_best"]] = [True, best["row"]]
        others = column.drop(index=best.name)
        comparisons = {index: compare(row["per_seed"], best["per_seed"],
                                      pairable=_pairable(row["teachers"], best["teachers"]))
                       for index, row in others.iterrows()}
        adjusted = dict(zip(comparisons, holm([c.p for c in comparisons.values()])))
        family = sum(not math.isnan(c.p) for c in comparisons.values())
        for index, c in comparisons.items():
            frame.loc[index, ["vs_best", "test", "diff", "diff_low", "diff_high", "p", "p_holm", "seeds_needed"]] = [
                best["row"], c.test, c.diff, c.low, c.high, c.p, adjusted[index], _seeds_for_family(c, family)]
            # CHOSEN: a cell with one seed cannot be tested, so it is never bold (p is NaN).
            frame.loc[index, "tied_with_best"] = bool(not math.isnan(adjusted[index]) and adjusted[index] >= ALPHA)
    return frame


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


def _interval_text(low: float, high: float, n: int, *, latex: bool = False) -> str:
    """`` [88.29, 93.71] n=2`` after a method's mean ± std (the 95 % t-interval and the seeds)."""
    if n <= 1 or _missing(low):
        return ""
    return f" [{low:.2f}, {high:.2f}] $n{{=}}{n}$" if latex else f" [{low:.2f}, {high:.2f}] n={n}"


def _wide(table: pd.DataFrame, *, latex: bool = False, bold: bool = True) -> pd.DataFrame:
    """Rows: Teacher then methods; columns: (dataset, pair). Method cells: mean ± std, the 95 %
    t-interval and n; in bold the column's best and every method not significantly worse
    (``tied_with_best``)."""
    columns = _cells_in_order(table)
    labels = list(dict.fromkeys(table["label"]))
    wide = pd.DataFrame("--" if latex else "—", index=labels,
                        columns=pd.MultiIndex.from_tuples(columns, names=["dataset", "pair"]))
    for row in table.itertuples():
        text = _row_cell(row.row, row.mean, row.std, row.n, latex=latex)
        if bold and row.row != "teacher" and not _missing(row.mean) and bool(getattr(row, "tied_with_best", False)):
            text = f"\\textbf{{{text}}}" if latex else f"**{text}**"
        if getattr(row, "unfinished", 0):
            text += "$^\\ddagger$" if latex else UNFINISHED_MARK
        if row.row != "teacher" and hasattr(row, "ci_low"):
            text += _interval_text(row.ci_low, row.ci_high, row.n, latex=latex)
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
    notes = [f"Cells: mean ± sample standard deviation (ddof=1) over seeds, in %, then the {CONFIDENCE:.0%} "
             "t-interval of the mean (Student's t, n-1 degrees of freedom) and n, the number of seeds.",
             f"Bold: the column's best mean and every method not significantly worse than it: a paired t-test "
             f"over seeds when both cells ran with the same teacher and the same seeds, else Welch's t-test, "
             f"Holm-corrected within the column, significant at adjusted p < {ALPHA:g}. A one-seed cell is "
             "not tested and never bold. The tests and the seeds each difference would need are listed below "
             "the table."]
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
    differences = differences_markdown(table)
    markdown = f"**{title[0].upper() + title[1:]} (%)**\n\n{_markdown(_wide(table))}\n\n" + \
        "\n".join(f"- {note}" for note in notes) + "\n" + (f"\n{differences}" if differences else "") + \
        (f"\n{appendix}" if appendix else "")
    md_path = out_dir / f"{stem}.md"
    md_path.write_text(markdown)
    paths.append(md_path)
    tex_path = out_dir / f"{stem}.tex"
    caption = f"{title[0].upper() + title[1:]} (%). " + " ".join(_table_notes(table, best))
    tex_path.write_text(_latex(_wide(table, latex=True), caption, f"tab:{stem}"))
    paths.append(tex_path)
    return paths, markdown


def _p_text(p: float) -> str:
    if _missing(p):
        return "—"
    return "< 0.001" if p < 0.001 else f"{p:.3f}"


def _diff_text(diff: float, low: float, high: float) -> str:
    if _missing(diff):
        return "—"
    return f"{diff:+.2f}" + ("" if _missing(low) else f" [{low:+.2f}, {high:+.2f}]")


POWER_TEXT = (f"seeds needed: seeds per method at which the same two-sided t-test would detect the observed difference "
              f"with probability {POWER:.0%} (power), given the observed spread (noncentral t), at the level "
              f"{ALPHA:g}/m, m the number of tests in the column (Holm's strictest step, so enough for the "
              "corrected test too); a number above n says the seeds run cannot resolve it")


def differences_markdown(table: pd.DataFrame) -> str:
    """Each method against its column's best: the difference with its interval, the test, raw and
    Holm-adjusted p-values, whether it is bold, and the seeds the difference would need."""
    rows = table[(table["row"] != "teacher") & (table["n"] > 0) & (table["vs_best"] != "")
                 & (table["row"] != table["vs_best"])]
    rows = rows.assign(_col=[cell_sort_key(c) for c in zip(rows["dataset"], rows["pair"])])
    rows = rows.sort_values("_col", kind="stable")
    if rows.empty:
        return ""
    labels = dict(zip(table["row"], table["label"]))
    lines = ["**Which differences from the column's best are real**", "",
             "| dataset (pair) | method | vs | Δ (points) [95 % CI] | test | p | p (Holm) | bold | n | seeds needed |",
             "|:--|:--|:--|--:|:--|--:|--:|:--|--:|--:|"]
    for row in rows.itertuples():
        lines.append(f"| {row.dataset} ({row.pair}) | {row.label} | {labels[row.vs_best]} | "
                     f"{_diff_text(row.diff, row.diff_low, row.diff_high)} | {row.test or 'not tested (one seed)'} | "
                     f"{_p_text(row.p)} | {_p_text(row.p_holm)} | {'yes' if row.tied_with_best else 'no'} | "
                     f"{row.n} | {format_seeds(row.seeds_needed)} |")
    return "\n".join(lines) + (f"\n\n- Δ = method − the column's best, with the {CONFIDENCE:.0%} t-interval of "
                               "the difference (paired: of the per-seed differences; Welch: Welch-Satterthwaite "
                               "degrees of freedom); p (Holm): adjusted within the column; bold: adjusted p ≥ "
                               f"{ALPHA:g}; {POWER_TEXT}.\n")


def baseline_table(table: pd.DataFrame, baseline: str) -> pd.DataFrame:
    """Every method against ``baseline`` in each column where both have finished runs: Δ = method −
    baseline with its 95 % interval, the test (paired over seeds when both share teacher and seeds, else
    Welch), p and Holm-adjusted p (within the column), the probability that a run of the method beats
    a run of the baseline, and the seeds needed (80 % power at 5 %)."""
    rows = []
    methods = table[(table["row"] != "teacher") & (table["n"] > 0)]
    for (dataset, pair), column in methods.groupby(["dataset", "pair"], sort=False):
        base = column[column["row"] == baseline]
        if base.empty:
            continue
        base = base.iloc[0]
        column_rows = []
        for _, row in column[column["row"] != baseline].iterrows():
            c = compare(row["per_seed"], base["per_seed"], pairable=_pairable(row["teachers"], base["teachers"]))
            column_rows.append({
                "row": row["row"], "label": row["label"], "dataset": dataset, "pair": pair, "baseline": baseline,
                "mean": row["mean"], "baseline_mean": base["mean"], "n": c.n_a, "n_baseline": c.n_b,
                "test": c.test, "diff": c.diff, "diff_low": c.low, "diff_high": c.high, "p": c.p,
                "prob_improvement": probability_of_improvement(row["per_seed"].values(), base["per_seed"].values()),
                "seeds_needed": c})
        family = sum(not _missing(r["p"]) for r in column_rows)
        for row, adjusted in zip(column_rows, holm([r["p"] for r in column_rows])):
            row["p_holm"] = adjusted
            row["seeds_needed"] = _seeds_for_family(row["seeds_needed"], family)
        rows += column_rows
    columns = ["row", "label", "dataset", "pair", "baseline", "mean", "baseline_mean", "n", "n_baseline", "test",
               "diff", "diff_low", "diff_high", "p", "p_holm", "prob_improvement", "seeds_needed"]
    return pd.DataFrame(rows, columns=columns)


def baseline_markdown(frame: pd.DataFrame, baseline_label: str, title: str) -> str:
    if frame.empty:
        return f"(no column has finished runs of {baseline_label} and of another method)\n"
    lines = [f"**Against {baseline_label}: {title} (%)**", "",
             "| dataset (pair) | method | Δ vs " + baseline_label + " (points) [95 % CI] | test | p | p (Holm) | "
             "P(improvement) | n | seeds needed |",
             "|:--|:--|--:|:--|--:|--:|--:|--:|--:|"]
    for row in frame.itertuples():
        poi = "—" if _missing(row.prob_improvement) else f"{row.prob_improvement:.2f}"
        lines.append(f"| {row.dataset} ({row.pair}) | {row.label} | {_diff_text(row.diff, row.diff_low, row.diff_high)}"
                     f" | {row.test or 'not tested (one seed)'} | {_p_text(row.p)} | {_p_text(row.p_holm)} | {poi} | "
                     f"{row.n} vs {row.n_baseline} | {format_seeds(row.seeds_needed)} |")
    return "\n".join(lines) + (
        f"\n\n- Δ = method − {baseline_label}, with the {CONFIDENCE:.0%} t-interval of the difference; test: paired t "
        "over seeds when both ran with the same teacher and seeds, else Welch's t; p (Holm): adjusted within the "
        "column; P(improvement): the probability that a run of the method beats a run of "
        f"{baseline_label} (ties count one half; Agarwal et al. 2021); {POWER_TEXT}.\n")


@dataclass
class Ranks:
    """Average ranks of the methods over the table's columns, with Friedman's test and Nemenyi's CD."""

    scores: pd.DataFrame  # method label x column "dataset (pair)": the mean the ranks are taken of
    ranks: pd.DataFrame  # same shape: rank within the column, 1 = best, ties averaged
    average: pd.Series  # method label -> average rank, ascending
    test: RankTest | None  # None with fewer than 3 methods
    left_out: list[str]  # methods without a finished run in every column


def rank_table(table: pd.DataFrame) -> Ranks | None:
    """Average ranks (Demšar 2006) over the columns (data sets, teacher/student pairs) of an accuracy
    table, for the methods with finished runs in every column; None with fewer than 2 columns."""
    methods = table[(table["row"] != "teacher") & (table["n"] > 0)]
    columns = [c for c in _cells_in_order(methods)]
    if len(columns) < 2:
        return None
    scores = methods.pivot_table(index="label", columns=["dataset", "pair"], values="mean", aggfunc="first")
    scores = scores.reindex(columns=pd.MultiIndex.from_tuples(columns, names=["dataset", "pair"]))
    complete = scores.dropna()
    left_out = sorted(set(scores.index) - set(complete.index))
    if len(complete) < 2:
        return None
    complete = complete.copy()
    complete.columns = [f"{d} ({p})" for d, p in complete.columns]
    ranks, average = average_ranks(complete)
    order = average.sort_values(kind="stable").index
    test = friedman(complete) if len(complete) >= 3 else None
    return Ranks(complete.loc[order], ranks.loc[order], average.loc[order], test, left_out)


def ranks_markdown(ranks: Ranks) -> str:
    lines = ["| method | " + " | ".join(f"rank, {c}" for c in ranks.ranks.columns) + " | average rank |",
             "|:--" + "|--:" * (len(ranks.ranks.columns) + 1) + "|"]
    for label, row in ranks.ranks.iterrows():
        cells = " | ".join(f"{v:g}" for v in row)
        lines.append(f"| {label} | {cells} | {ranks.average[label]:.2f} |")
    notes = [f"Ranks of the mean final accuracy within each column (1 = best, ties share the average rank), "
             f"over {len(ranks.ranks.columns)} columns (Demšar, JMLR 2006)."]
    if ranks.test is not None:
        t = ranks.test
        notes.append(f"Friedman test of equal average ranks: χ²_F = {t.statistic:.2f} with {t.k - 1} degrees of "
                     f"freedom, p = {_p_text(t.p)} (scipy's tie-corrected statistic); Nemenyi critical difference at "
                     f"{ALPHA:g}: CD = {t.critical_difference:.2f} ranks (q from the studentized range / √2): two "
                     "methods whose average ranks differ by less than CD are not significantly different "
                     "(critical_difference.png joins them with a bar).")
        if t.n < 10:
            notes.append(f"With N = {t.n} columns the chi-square approximation of Friedman's statistic is rough "
                         "(Demšar recommends N > 10) and no pair can reach the CD unless the ranks are far apart; "
                         "more data sets or teacher/student pairs, not more seeds, sharpen this test.")
    else:
        notes.append("Fewer than 3 methods ran in every column: no Friedman test.")
    if ranks.left_out:
        notes.append("Not ranked (no finished run in every column): " + ", ".join(ranks.left_out) + ".")
    return "\n".join(lines) + "\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"


SELECTIONS = {"best": "best_accuracy", "final": "final_accuracy"}


def _number(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan


def reproductions_table(runs: pd.DataFrame) -> pd.DataFrame:
    """The finished runs whose config carries its paper's ``published`` number (a paper protocol), per
    (method, dataset, pair, configuration): ours under the paper's own selection rule (``best``: the
    best test accuracy over the run's evaluations, selected on the test set as the paper did;
    ``final``: the last evaluation), mean ± std, n and the 95 % t-interval over seeds, the published
    number, Δ = ours − published and whether the published number lies in our interval."""
    columns = ["row", "label", "dataset", "pair", "protocol", "selection", "mean", "std", "n", "ci_low", "ci_high",
               "published", "published_std", "diff", "inside", "teacher_accuracy", "published_teacher_accuracy",
               "source", "seeds", "runs"]
    if "published" not in runs.columns:
        return pd.DataFrame(columns=columns)
    done = runs[(runs["status"] == "done") & runs["published"].notna()]
    rows = []
    for (method, dataset, pair, _config, published), group in done.groupby(
            ["method", "dataset", "pair", "config_id", "published"], sort=False):
        info = dict(published)
        selection = info.get("selection") if info.get("selection") in SELECTIONS else "final"
        group = group.sort_values("evaluations", ascending=False, kind="stable").drop_duplicates("seed")
        group = group.sort_values("seed")
        interval = t_interval(group[SELECTIONS[selection]])
        number = _number(info.get("accuracy"))
        teachers = group.dropna(subset=["teacher_accuracy"]).drop_duplicates(subset=["teacher_sha256"])
        inside = (interval.low <= number <= interval.high) if not (_missing(interval.low) or _missing(number)) \
            else None
        rows.append({"row": method, "label": method_label(method), "dataset": dataset, "pair": pair,
                     "protocol": ",".join(sorted(set(group["protocol"]))), "selection": selection,
                     "mean": interval.mean, "std": interval.std, "n": interval.n, "ci_low": interval.low,
                     "ci_high": interval.high, "published": number, "published_std": _number(info.get("std")),
                     "diff": interval.mean - number, "inside": inside,
                     "teacher_accuracy": _stats(teachers["teacher_accuracy"])[0],
                     "published_teacher_accuracy": _number(info.get("teacher_accuracy")),
                     "source": str(info.get("source") or ""), "seeds": ",".join(str(int(x)) for x in group["seed"]),
                     "runs": ";".join(group["run_name"])})
    frame = pd.DataFrame(rows, columns=columns)
    if frame.empty:
        return frame
    frame["_order"] = [(cell_sort_key((d, p)), method_sort_key(m)) for d, p, m in
                       zip(frame["dataset"], frame["pair"], frame["row"])]
    return frame.sort_values("_order").drop(columns="_order").reset_index(drop=True)


def reproductions_markdown(frame: pd.DataFrame) -> str:
    if frame.empty:
        return ""

    def value(v: float, digits: int = 2) -> str:
        return "—" if _missing(v) else f"{v:.{digits}f}"

    lines = ["**Reproductions: our runs of a paper's protocol against the number the paper published (%)**", "",
             "| method | dataset (pair) | selection | ours: mean ± std (n) | 95 % CI | published | Δ (ours − "
             "published) | published in our CI | teacher: ours / published | source |",
             "|:--|:--|:--|--:|--:|--:|--:|:--|--:|:--|"]
    for row in frame.itertuples():
        selection = "best over training (test set)" if row.selection == "best" else "final"
        ours = format_cell(row.mean, row.std, row.n) + f" (n={row.n})"
        ci = "—" if _missing(row.ci_low) else f"[{row.ci_low:.2f}, {row.ci_high:.2f}]"
        published = value(row.published) + ("" if _missing(row.published_std) else f" ± {row.published_std:.2f}")
        inside = "—" if row.inside is None or _missing(row.inside) else ("yes" if row.inside else "no")
        teacher = f"{value(row.teacher_accuracy)} / {value(row.published_teacher_accuracy)}"
        source = str(row.source).replace("|", "\\|")
        lines.append(f"| {row.label} | {row.dataset} ({row.pair}) | {selection} | {ours} | {ci} | {published} | "
                     f"{'—' if _missing(row.diff) else f'{row.diff:+.2f}'} | {inside} | {teacher} | {source} |")
    notes = ["Ours is measured under the paper's own selection rule: \"final\" = the last evaluation; \"best over "
             "training\" = the best test accuracy over all evaluations of a run, i.e. selected on the test set, as "
             "the paper did (optimistic, and not comparable with the final-accuracy tables).",
             "95 % CI: the t-interval of our mean over seeds (none for one seed); \"published in our CI\" says "
             "whether the paper's number lies inside it."]
    return "\n".join(lines) + "\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"


def _run_setting(group: pd.DataFrame, name: str) -> str:
    """What the runs of one configuration ran for a protocol-card setting (their config.json), as the card writes it."""
    from dfkd_bench.cluster.protocol_card import setting_text

    for column in (name, f"train.{name}", f"params.{name}"):
        if column in group.columns:
            values = {setting_text(v) for v in group[column] if not _missing(v)}
            if values:
                return " / ".join(sorted(values))
    return "-"


def protocol_cards_table(runs: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """The protocol card (``dfkd-bench list --card``) of each configuration of paper-protocol runs (the
    Reproductions table's groups): every setting the method's paper protocol fixes, with the paper's /
    official code's value, what THESE runs ran (their config.json) and what the code's protocol is today;
    ``mark``: ``CHOSEN: reason`` for a deviation the suite keeps, ``differs from the paper`` where the runs
    ran another value (e.g. a tiny ``--set`` override), ``differs from the code's protocol`` where the
    protocol changed since the runs were made. Also notes for groups whose protocol the code no longer has."""
    from dfkd_bench.cluster.protocol_card import card_rows
    from dfkd_bench.errors import DfkdError

    columns = ["method", "label", "dataset", "pair", "config_id", "setting", "paper", "runs", "code", "mark"]
    notes: list[str] = []
    if "published" not in runs.columns:
        return pd.DataFrame(columns=columns), notes
    paper = runs[(runs["status"] == "done") & runs["published"].notna() & (runs["protocol"] == "paper")]
    rows = []
    for (method, dataset, pair, config_id), group in paper.groupby(["method", "dataset", "pair", "config_id"],
                                                                   sort=False):
        try:
            card = card_rows(method, dataset)
        except DfkdError as error:  # a method or protocol this code does not have (any more)
            notes.append(f"{method_label(method)} on {dataset} ({pair}): no protocol card ({error})")
            continue
        for row in card:
            ran = _run_setting(group, row["setting"]) if row["ours_paper"] != "-" else "-"
            marks = [row["mark"].split("; * common differs")[0]] if row["mark"].startswith("CHOSEN") else []
            if ran != "-" and ran != row["paper"] and not marks:
                marks.append("differs from the paper")
            if ran != "-" and ran != row["ours_paper"]:
                marks.append(f"differs from the code's protocol ({row['ours_paper']})")
            rows.append({"method": method, "label": method_label(method), "dataset": dataset, "pair": pair,
                         "config_id": config_id, "setting": row["setting"], "paper": row["paper"], "runs": ran,
                         "code": row["ours_paper"], "mark": "; ".join(marks)})
    return pd.DataFrame(rows, columns=columns), notes


def protocol_cards_markdown(frame: pd.DataFrame, notes: list[str]) -> str:
    if frame.empty and not notes:
        return ""
    lines: list[str] = []
    from dfkd_bench.cluster.protocol_card import equivalence_lines

    for (label, dataset, pair, _config), group in frame.groupby(["label", "dataset", "pair", "config_id"],
                                                                 sort=False):
        marked = int((group["mark"] != "").sum())
        lines += [f"**{label} on {dataset} ({pair})**: {len(group)} settings, {marked} marked", "",
                  *[f"Step equivalence: {line}" for line in equivalence_lines(group["method"].iloc[0])], "",
                  "| setting | paper / official code | these runs | mark |", "|:--|:--|:--|:--|"]
        for row in group.itertuples():
            cells = [str(v).replace("|", "\\|") for v in (row.setting, row.paper, row.runs, row.mark)]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    lines += [f"- {note}" for note in notes]
    lines += ["- From the code's protocol declarations (`dfkd-bench list --card METHOD --dataset D`) and the "
              "runs' config.json: \"differs from the paper\" marks a value the runs ran instead of the paper's "
              "(e.g. a `--set` override), \"differs from the code's protocol\" a value the code's protocol "
              "sets otherwise today (an override, or a protocol changed since the runs); CHOSEN marks a "
              "deviation this suite keeps, with its reason."]
    return "\n".join(lines) + "\n"


def sweep_table(cells, metric: str = "final_accuracy") -> pd.DataFrame:
    """Every other configuration of a cell (a sweep point) against the cell's table configuration:
    Δ with its 95 % interval, the test (paired over seeds when both share teacher and seeds, else
    Welch), p, Holm-adjusted p within the cell, the probability of improvement and the seeds needed."""
    rows = []
    for cell in cells:
        if len(cell.settings) < 2:
            continue

        def per_seed(cid: str) -> tuple[dict[int, float], str]:
            chosen = cell.runs[cell.runs["config_id"] == cid]
            values = {int(s): float(v) for s, v in zip(chosen["seed"], chosen[metric]) if not _missing(v)}
            return values, ";".join(sorted(set(str(t) for t in chosen["teacher_sha256"])))

        reference, reference_teacher = per_seed(cell.reference)
        cell_rows = []
        for cid in sorted(cell.settings, key=lambda c: cell.describe(c, sorted(cell.diff(c)))):
            if cid == cell.reference:
                continue
            values, teacher = per_seed(cid)
            c = compare(values, reference, pairable=_pairable(teacher, reference_teacher))
            interval = t_interval(values.values())
            cell_rows.append({
                "row": cell.method, "label": method_label(cell.method), "dataset": cell.dataset, "pair": cell.pair,
                "configuration": cell.describe(cid, sorted(cell.diff(cid))),
                "table_configuration": cell.describe(cell.reference, sorted(cell.diff(cid))),
                "mean": interval.mean, "std": interval.std, "n": interval.n, "ci_low": interval.low,
                "ci_high": interval.high, "test": c.test, "diff": c.diff, "diff_low": c.low, "diff_high": c.high,
                "p": c.p, "prob_improvement": probability_of_improvement(values.values(), reference.values()),
                "seeds_needed": c})
        family = sum(not _missing(r["p"]) for r in cell_rows)
        for row, adjusted in zip(cell_rows, holm([r["p"] for r in cell_rows])):
            row["p_holm"] = adjusted
            row["seeds_needed"] = _seeds_for_family(row["seeds_needed"], family)
        rows += cell_rows
    columns = ["row", "label", "dataset", "pair", "configuration", "table_configuration", "mean", "std", "n",
               "ci_low", "ci_high", "test", "diff", "diff_low", "diff_high", "p", "p_holm", "prob_improvement",
               "seeds_needed"]
    return pd.DataFrame(rows, columns=columns)


def sweep_markdown(frame: pd.DataFrame) -> str:
    if frame.empty:
        return ""
    lines = ["| method | dataset (pair) | configuration (table's) | mean ± std [95 % CI] | Δ vs the table's "
             "configuration [95 % CI] | test | p | p (Holm) | P(improvement) | seeds needed |",
             "|:--|:--|:--|--:|--:|:--|--:|--:|--:|--:|"]
    for row in frame.itertuples():
        poi = "—" if _missing(row.prob_improvement) else f"{row.prob_improvement:.2f}"
        cell = format_cell(row.mean, row.std, row.n) + _interval_text(row.ci_low, row.ci_high, row.n)
        lines.append(f"| {row.label} | {row.dataset} ({row.pair}) | {row.configuration} ({row.table_configuration}) | "
                     f"{cell} | {_diff_text(row.diff, row.diff_low, row.diff_high)} | "
                     f"{row.test or 'not tested (one seed)'} | {_p_text(row.p)} | {_p_text(row.p_holm)} | {poi} | "
                     f"{format_seeds(row.seeds_needed)} |")
    return "\n".join(lines) + (
        "\n\n- Final test accuracy of each other configuration of a cell against the configuration its table "
        "uses; the same tests as the tables, Holm-corrected within the cell; P(improvement): the probability "
        f"that a run of the configuration beats a run of the table's; "
        f"{POWER_TEXT.replace('in the column', 'in the cell')}.\n")


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
