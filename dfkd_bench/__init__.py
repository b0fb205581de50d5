"""dfkd-bench: a benchmark suite for data-free knowledge distillation.

The harness (engine, data, models, records, reports, launchers) lives here;
the pluggable methods live in the repository's top-level ``methods/`` folder,
installed as ``dfkd_bench.methods``.
"""

__version__ = "0.1.0"
