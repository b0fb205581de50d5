"""``write_report`` and the ``dfkd-bench report`` command: every table and figure, and report.md."""

from __future__ import annotations

import argparse
import datetime
import os
import shlex
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from dfkd_bench.errors import DfkdError
from dfkd_bench.report.common import (BAND_TEXT, BEST_TITLE, DEFAULT_FORMATS, DEFAULT_REPORT_SUBDIR, FINAL_TITLE,
                                      SINGLE_RUN_MARK, _missing)
from dfkd_bench.report.configs import analyse_configs
from dfkd_bench.report.figures import (plot_accuracy_curves, plot_budget_curves, plot_critical_difference,
                                       plot_drift_curves, plot_generator_losses,
                                       plot_loss_curves, plot_samples, plot_sweeps, unfinished_lines)
from dfkd_bench.report.load import _records_frame, _scan, results_roots
from dfkd_bench.report.tables import (UNFINISHED_MARK, _cost_markdown, _plain_table, _write_tables, accuracy_table,
                                     baseline_markdown, baseline_table, cost_table, rank_table, ranks_markdown,
                                     protocol_cards_markdown, protocol_cards_table, reproductions_markdown,
                                     reproductions_table, sweep_markdown, sweep_table,
                                     unfinished_markdown)
from dfkd_bench.store import DEFAULT_RESULTS_DIR

# --------------------------------------------------------------------- report ---

def _incomplete_markdown(runs: pd.DataFrame) -> str:
    pending = runs[runs["status"] != "done"]
    if pending.empty:
        return "# Incomplete runs\n\nNone: every run found is finished.\n"
    lines = ["# Incomplete runs", "",
             f"{len(pending)} run(s) have no `done` file (or unreadable records); they are NOT in any mean. "
             "Running, stopped and failed runs are drawn as dotted lines in the curves (unless --finished-only); "
             "damaged runs are not drawn.", "",
             "| run | method | dataset | pair | seed | last step / planned | last test accuracy | status | path |",
             "|:--|:--|:--|:--|--:|--:|--:|:--|:--|"]
    for row in pending.itertuples():
        planned = "?" if _missing(row.planned_iterations) else int(row.planned_iterations)
        state = str(row.state).replace("|", "\\|")
        accuracy = "—" if _missing(row.last_accuracy) else f"{row.last_accuracy:.2f}"
        lines.append(f"| {row.run_name} | {row.method} | {row.dataset} | {row.pair} | {row.seed} | "
                     f"{int(row.last_step)} / {planned} | {accuracy} | {row.status}: {state} | {row.path} |")
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


def default_out_dir(results_dir: str | os.PathLike | Sequence[str | os.PathLike]) -> Path:
    """Where ``dfkd-bench report`` writes without ``--out``: ``<results-dir>/report``.

    # CHOSEN: beside the user's own runs (``results/runs/report`` by default, which git ignores),
    # never the repository's committed ``results/report/``, which is regenerated with an explicit --out.
    """
    return results_roots(results_dir)[0] / DEFAULT_REPORT_SUBDIR


def _writable_out(out: Path) -> None:
    """Create ``out`` and check a file can be written in it, or raise one clear line."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-"):
            pass
    except OSError as error:
        raise DfkdError(f"cannot write the report into {out}: {error.strerror or error}; "
                        "pass a writable folder with --out") from None


def write_report(results_dir: str | os.PathLike | Sequence[str | os.PathLike], out_dir: str | os.PathLike, *,
                 formats: Sequence[str] = DEFAULT_FORMATS, command: str | None = None,
                 finished_only: bool = False, baseline: str | None = None) -> dict[str, Any]:
    """Write the tables, figures and ``report.md`` of every run below ``results_dir`` (one folder or
    several) into ``out_dir``.

    Unfinished runs (running, stopped) and failed runs are drawn as dotted lines labelled with where
    they stand, and marked in the tables (never averaged in); ``finished_only`` leaves them out of
    figures and tables (they are still listed in ``incomplete.md``). ``baseline`` (a method name) adds
    ``table_baseline``: every method against it, per column.

    ``command`` is the command line recorded in ``report.md``. Returns
    ``{"report": path, "incomplete": path, "tables": [paths], "figures": [paths],
    "incomplete_runs": ["name (status, step N of M: why)"], "notes": [text],
    "text": the final table and notes as plain text for a terminal}``.
    """
    formats = _check_formats(formats)
    scan = _scan(results_dir)
    if baseline is not None:
        _check_baseline(baseline, scan.runs)
    out = Path(out_dir)
    _writable_out(out)
    try:
        return _write_report(scan, results_dir, out, formats, command, finished_only, baseline)
    except OSError as error:  # a full disk, a folder made read-only meanwhile ...
        where = f" ({error.filename})" if error.filename else ""
        raise DfkdError(f"cannot write the report into {out}: {error.strerror or error}{where}") from None


def _check_baseline(baseline: str, runs: pd.DataFrame) -> None:
    """--baseline must name a method with a finished run here (checked before anything is written)."""
    done = sorted(set(runs.loc[runs["status"] == "done", "method"]))
    if baseline not in done:
        found = "it has no finished run" if baseline in set(runs["method"]) else "no run of it was found"
        raise DfkdError(f"--baseline {baseline}: {found} in these results; use one of "
                        f"{', '.join(done) or '(no finished runs yet)'}")


def _write_report(scan, results_dir, out: Path, formats: tuple[str, ...], command: str | None,
                  finished_only: bool, baseline: str | None = None) -> dict[str, Any]:
    runs = scan.runs
    records = _records_frame(scan, join=False)  # the figures select runs by name; no need for 100 columns
    cells, config_notes = analyse_configs(runs)
    notes = scan.notes + config_notes
    done = runs[runs["status"] == "done"]
    pending = runs[runs["status"] != "done"]
    unfinished = [] if finished_only else unfinished_lines(runs)
    if done.empty:
        notes.append("no run is finished yet: the tables have no means"
                     + ("" if finished_only or not unfinished else "; unfinished runs are drawn dotted"))
    failed = runs[runs["status"] == "failed"]
    for row in failed.itertuples():
        notes.append(f"{row.run_name} failed, left out of every mean: {row.state}")

    appendix = "" if finished_only else unfinished_markdown(runs)
    tables, sections = [], {}
    for metric, stem, title, best in (("final_accuracy", "table_final", FINAL_TITLE, False),
                                      ("best_accuracy", "table_best", BEST_TITLE, True)):
        table = accuracy_table(runs, metric, unfinished=not finished_only)
        paths, markdown = _write_tables(table, out, stem, title, best, config_notes, appendix)
        tables += paths
        sections[stem] = (markdown, table)
    costs = cost_table(sections["table_final"][1], runs)
    costs.to_csv(out / "table_cost.csv", index=False)
    tables.append(out / "table_cost.csv")
    extra_sections = {}
    ranks = rank_table(sections["table_final"][1])
    if ranks is not None:
        frame = ranks.ranks.copy()
        frame.insert(0, "method", frame.index)
        frame["average_rank"] = ranks.average
        if ranks.test is not None:
            frame["friedman_chi2"], frame["friedman_p"] = ranks.test.statistic, ranks.test.p
            frame["nemenyi_cd"] = ranks.test.critical_difference
        frame.to_csv(out / "table_ranks.csv", index=False)
        text = ranks_markdown(ranks)
        (out / "table_ranks.md").write_text(f"**Average ranks of the final test accuracy**\n\n{text}")
        tables += [out / "table_ranks.csv", out / "table_ranks.md"]
        extra_sections["ranks"] = text
    if baseline is not None:
        from dfkd_bench.report.common import method_label

        against = baseline_table(sections["table_final"][1], baseline)
        against.to_csv(out / "table_baseline.csv", index=False)
        text = baseline_markdown(against, method_label(baseline), "final test accuracy")
        (out / "table_baseline.md").write_text(text)
        tables += [out / "table_baseline.csv", out / "table_baseline.md"]
        extra_sections["baseline"] = text
    sweeps = sweep_table(cells)
    if not sweeps.empty:
        sweeps.to_csv(out / "table_sweeps.csv", index=False)
        tables.append(out / "table_sweeps.csv")
        extra_sections["sweeps"] = sweep_markdown(sweeps)
    reproductions = reproductions_table(runs)
    if not reproductions.empty:
        reproductions.to_csv(out / "table_reproductions.csv", index=False)
        text = reproductions_markdown(reproductions)
        (out / "table_reproductions.md").write_text(text)
        tables += [out / "table_reproductions.csv", out / "table_reproductions.md"]
        extra_sections["reproductions"] = text
        cards, card_notes = protocol_cards_table(runs)
        text = protocol_cards_markdown(cards, card_notes)
        if text:
            cards.to_csv(out / "table_protocol_cards.csv", index=False)
            (out / "table_protocol_cards.md").write_text(text)
            tables += [out / "table_protocol_cards.csv", out / "table_protocol_cards.md"]
            extra_sections["protocol_cards"] = text

    figures: list[Path] = []
    drawn = set(done["run_name"]) | {name for line in unfinished for name in line.run_names}
    if drawn:
        drawn_records = records[records["run_name"].isin(drawn)]
        figures += plot_accuracy_curves(drawn_records, cells, out, formats, unfinished)
        figures += plot_budget_curves(drawn_records, cells, out, formats, unfinished)
        figures += plot_loss_curves(drawn_records, cells, out, formats, unfinished)
        figures += plot_generator_losses(drawn_records, cells, out, formats, unfinished)
    if not done.empty:
        done_records = records[records["run_name"].isin(set(done["run_name"]))]
        figures += plot_drift_curves(done_records, cells, out, formats)
        sample_paths, sample_notes = plot_samples(done_records, cells, out, formats)
        figures += sample_paths
        notes += sample_notes
        figures += plot_sweeps(runs, cells, out, formats)
        figures += plot_critical_difference(ranks, out, formats)

    incomplete_path = out / "incomplete.md"
    incomplete_text = _incomplete_markdown(runs)
    incomplete_path.write_text(incomplete_text)

    command = command or f"write_report({str(results_dir)!r}, {str(out)!r}, formats={formats!r})"
    report_path = out / "report.md"
    # The configuration notes are printed under the tables already.
    other_notes = [note for note in notes if note not in config_notes]
    report_path.write_text(_report_markdown(results_dir, runs, sections, figures, other_notes, incomplete_text,
                                            command, formats, _cost_markdown(costs), extra_sections))
    text = (f"{FINAL_TITLE} (%):\n{_plain_table(sections['table_final'][1])}\n"
            f"(mean ± sample std over seeds [95 % t-interval of the mean] n = seeds; {SINGLE_RUN_MARK} = one seed"
            + ("" if finished_only or pending.empty else
               f"; {UNFINISHED_MARK} = this method has runs not finished, not in the mean") + ")")
    if notes:
        text += "\n" + "\n".join(f"note: {note}" for note in notes)
    return {
        "report": str(report_path), "incomplete": str(incomplete_path),
        "tables": [str(p) for p in tables], "figures": [str(p) for p in figures],
        "incomplete_runs": [f"{row.run_name} ({row.status}, step {int(row.last_step)} of "
                            f"{'?' if _missing(row.planned_iterations) else int(row.planned_iterations)}: {row.state})"
                            + ("" if _missing(row.last_accuracy) else f", last test accuracy {row.last_accuracy:.2f}")
                            for row in pending.itertuples()],
        "notes": notes, "text": text,
    }


FIGURE_CAPTIONS = {
    "accuracy_curves": "Test accuracy of the student vs step (Fig. 2)",
    "accuracy_budget": "Test accuracy vs the images the student trained on and vs wall time (budgets per image)",
    "loss_curves": "Every student loss term each method records, under its own names: KD per source of "
                   "samples, totals, bounds (Fig. 3)",
    "generator_losses": "Every synthesis loss term each method records (gen_*), teacher agreement and test "
                        "cross-entropy (Fig. 9 style)",
    "drift_curves": "JS drift of S_{t−τ} vs T on fresh samples of each source a method records (Fig. 4)",
    "critical_difference": "Average ranks over the columns with the Nemenyi critical difference (Demšar 2006)",
}


def _report_markdown(results_dir, runs: pd.DataFrame, sections: dict, figures: list[Path], notes: list[str],
                     incomplete_text: str, command: str, formats: Sequence[str], cost_text: str,
                     extra: dict[str, str] | None = None) -> str:
    """report.md: what was run, both tables, every figure with its caption, the notes and unfinished runs."""
    counts = runs["status"].value_counts()
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    parts = [
        "# DFKD benchmark report", "",
        f"Produced by `{command}` on {now}.", "",
        f"Results: {', '.join(f'`{root}`' for root in results_roots(results_dir))}: {len(runs)} run(s) found, "
        f"{counts.get('done', 0)} finished, "
        f"{counts.get('incomplete', 0)} incomplete, {counts.get('failed', 0)} failed, "
        f"{counts.get('damaged', 0)} unreadable.", "",
        "## Final test accuracy", "", sections["table_final"][0],
        "Files: [CSV](table_final.csv), [LaTeX](table_final.tex).", "",
        "## Best test accuracy over training — selected on the test set (optimistic)", "",
        sections["table_best"][0],
        "Files: [CSV](table_best.csv), [LaTeX](table_best.tex).", "",
        *(["## Against a baseline", "", extra["baseline"], "Files: [CSV](table_baseline.csv).", ""]
          if extra and "baseline" in extra else []),
        *(["## Across data sets: average ranks", "", extra["ranks"], "Files: [CSV](table_ranks.csv).", ""]
          if extra and "ranks" in extra else []),
        *(["## Sweeps: each configuration against the table's", "", extra["sweeps"],
           "Files: [CSV](table_sweeps.csv).", ""] if extra and "sweeps" in extra else []),
        *(["## Reproductions", "", extra["reproductions"], "Files: [CSV](table_reproductions.csv).", ""]
          if extra and "reproductions" in extra else []),
        *(["## Protocol cards of the reproductions", "", extra["protocol_cards"],
           "Files: [CSV](table_protocol_cards.csv).", ""] if extra and "protocol_cards" in extra else []),
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
            caption = ("Latest sample grids of each synthetic source (G, EMA G, memory, pool ...), seed 0 (Fig. 5): "
                       + stem[len("samples_"):])
        else:
            caption = (f"Final accuracy vs {stem[len('sweep_'):]} (Figs. 6/7/9 style), error bars ± std over seeds; "
                       "the other methods at their table configuration as dashed reference lines")
        others = ", ".join(f"[{fmt}]({stem}.{fmt})" for fmt in formats if fmt != main_format)
        parts += [f"### {caption}", "", f"![{caption}]({stem}.{main_format})" + (f"  ({others})" if others else ""), ""]
    if not stems:
        parts += ["No figures: no run with records to draw.", ""]
    parts += ["## Notes", "",
              "- Only finished runs (with a `done` file) are in the tables' means and the solid curves; running, "
              "stopped and failed runs are dotted curves labelled with where they stand, marked ‡ in the tables "
              "(unless the report was made with --finished-only), and listed below and in "
              "[incomplete.md](incomplete.md).",
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
    roots = args.results_dir or [DEFAULT_RESULTS_DIR]
    out = args.out if args.out is not None else default_out_dir(roots)
    command = "dfkd-bench report " + " ".join([
        *(f"--results-dir {shlex.quote(str(root))}" for root in roots), f"--out {shlex.quote(str(out))}",
        f"--formats {','.join(args.formats)}", *(["--finished-only"] if args.finished_only else []),
        *([f"--baseline {shlex.quote(args.baseline)}"] if args.baseline else [])])
    result = write_report(roots, out, formats=args.formats, command=command,
                          finished_only=args.finished_only, baseline=args.baseline)
    print(result["text"])
    if result["incomplete_runs"]:
        drawn = "not drawn" if args.finished_only else "drawn dotted"
        print(f"\n{len(result['incomplete_runs'])} incomplete run(s), not in the tables' means ({drawn}):")
        for line in result["incomplete_runs"]:
            print(f"  {line}")
    print(f"\nwrote {len(result['tables'])} table files and {len(result['figures'])} figure files to {out}; "
          f"start with {result['report']}")
    return 0


def add_report_command(subparsers) -> argparse.ArgumentParser:
    """Register ``dfkd-bench report`` on an argparse ``add_subparsers()`` object."""
    parser = subparsers.add_parser(
        "report", help="tables (Table 2 style) and figures (Figs. 2-9 style) from the runs' records",
        description="Aggregate finished runs over seeds into tables (CSV, Markdown, LaTeX) and figures "
                    "(PNG/PDF) plus report.md. Unfinished (running, stopped) and failed runs are drawn as dotted "
                    "lines labelled with where they stand and marked in the tables, never averaged in.")
    parser.add_argument("--results-dir", action="append", default=None,
                        help=f"folder searched (recursively) for run folders; repeat it to report several "
                             f"folders together (default: {DEFAULT_RESULTS_DIR})")
    parser.add_argument("--out", default=None,
                        help=f"where the report goes (default: RESULTS_DIR/{DEFAULT_REPORT_SUBDIR} of the first "
                             f"--results-dir, beside your runs)")
    parser.add_argument("--finished-only", action="store_true",
                        help="leave unfinished and failed runs out of the figures and tables (they are still listed)")
    parser.add_argument("--formats", type=_formats_arg, default=DEFAULT_FORMATS,
                        help="comma-separated figure formats (default: png,pdf)")
    parser.add_argument("--baseline", default=None, metavar="METHOD",
                        help="also tabulate every method against METHOD per column: the difference with its 95%% "
                             "interval, p-value, probability of improvement and the seeds needed (table_baseline)")
    parser.set_defaults(func=cmd_report)
    return parser
