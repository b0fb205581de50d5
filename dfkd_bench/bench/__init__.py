"""``dfkd-bench bench`` and the GPU window checks.

Owns: :mod:`~dfkd_bench.bench.configs` (the timed configurations and their random teacher),
:mod:`~dfkd_bench.bench.benchmark` (one process: fast path against the reference path, as
ratios in one run; FLOPs, memory, host syncs), :mod:`~dfkd_bench.bench.pack` (several runs per
GPU in separate processes) and :mod:`~dfkd_bench.bench.gpu_check` (what
``scripts/gpu_check.sh`` runs on a borrowed GPU, with its verdicts).

May import: cluster, methods, train, teachers, presets, store, config, runtime, method_api, models, data, errors.
"""
