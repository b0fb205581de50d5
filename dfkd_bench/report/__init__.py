"""Tables and figures from the run records: ``dfkd-bench report``.

Everything here reads only what the engine wrote (``config.json``,
``records.jsonl``, ``done`` and the sample PNGs of each run folder, see
:mod:`dfkd_bench.store`) and never trains, so a report can be rebuilt at any
time, also while runs are still going.

Rules that keep the numbers honest:

* Only finished runs (with a ``done`` file) enter the means of the tables.
  Unfinished (running, stopped) and failed runs are drawn as dotted lines
  labelled with where they stand ("running, iteration 3,200 of 15,000",
  "stopped at iteration ...", "failed at iteration ...: reason"), marked ‡ in
  the table cell of their method and listed with their last test accuracy;
  ``--finished-only`` leaves them out of figures and tables. Damaged runs
  (unreadable records or configuration, a done run whose records are gone) are
  listed with what is damaged (``incomplete.md``) and never used.
* The main number is the FINAL test accuracy (last evaluation). The best
  accuracy over training is reported separately and labelled as selected on
  the test set, because picking the maximum over evaluations on the test split
  is an optimistic, test-set-selected number.
* Runs that differ only in their seed are aggregated: mean and sample standard
  deviation (``ddof=1``) over seeds, with the 95 % t-interval of the mean and n.
  Bold marks the column's best and every method not significantly worse (paired
  t over seeds, or Welch, Holm-corrected within the column); which differences
  are real, how many seeds each would need, average ranks with Friedman/Nemenyi
  and ``--baseline`` comparisons come from :mod:`~dfkd_bench.report.stats`. Runs that differ in a setting (a sweep)
  are never averaged together: per (method, dataset, pair) the table uses the
  configuration equal to the preset defaults if there is one, otherwise the
  most common one, and the other configurations go to the sweep plots.
* A run found twice (same run id, e.g. a copied results folder) or the same
  seed of the same configuration twice counts once.

Figures are drawn with matplotlib's Agg canvas (no display, no global pyplot
state) and saved in every requested format.

The package is split so that each part can be read alone:

* :mod:`~dfkd_bench.report.common`: constants, labels, orderings, value helpers;
* :mod:`~dfkd_bench.report.load`: run folders and records -> ``load_runs`` / ``load_records``;
* :mod:`~dfkd_bench.report.configs`: which configuration each table cell uses, sweeps;
* :mod:`~dfkd_bench.report.stats`: intervals, tests, Holm, ranks, Friedman/Nemenyi, power;
* :mod:`~dfkd_bench.report.tables`: accuracy, baseline, rank, reproduction and compute tables;
* :mod:`~dfkd_bench.report.figures`: curves, sample grids, sweep plots;
* :mod:`~dfkd_bench.report.writer`: ``write_report`` and the ``dfkd-bench report`` command.
* :mod:`~dfkd_bench.report.method_docs`: the documentation pages generated from the code
  (``dfkd-bench docs``): one per method, the methods index, the settings reference.

May import: cluster, store, presets, config, method_api, errors (and nothing that trains).
"""

from dfkd_bench.report.common import (DEFAULT_FORMATS, DEFAULT_REPORT_DIR, METHOD_ORDER, METRICS,
                                      method_label, setting_columns, setting_name)
from dfkd_bench.report.configs import (CellConfigs, analyse_configs, preset_default_settings, select_table_runs,
                                       sweep_points)
from dfkd_bench.report.figures import (band, plot_accuracy_curves, plot_critical_difference, plot_drift_curves,
                                       plot_generator_losses, plot_loss_curves, plot_samples, plot_sweeps)
from dfkd_bench.report.load import find_run_dirs, load_records, load_runs
from dfkd_bench.report.tables import (accuracy_table, baseline_table, cost_table, format_cell, latex_escape,
                                     rank_table, reproductions_table)
from dfkd_bench.report.writer import add_report_command, cmd_report, write_report

__all__ = [
    "DEFAULT_FORMATS", "DEFAULT_REPORT_DIR", "METHOD_ORDER", "METRICS", "CellConfigs",
    "accuracy_table", "add_report_command", "analyse_configs", "band", "baseline_table", "cmd_report", "cost_table",
    "find_run_dirs", "plot_critical_difference", "rank_table", "reproductions_table",
    "format_cell", "latex_escape", "load_records", "load_runs", "method_label", "plot_accuracy_curves",
    "plot_drift_curves", "plot_generator_losses", "plot_loss_curves", "plot_samples", "plot_sweeps",
    "preset_default_settings", "select_table_runs", "setting_columns", "setting_name", "sweep_points",
    "write_report",
]
