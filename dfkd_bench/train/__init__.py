"""Training a student: the engine and what each step uses.

Owns: :mod:`~dfkd_bench.train.engine` (``Trainer``: iterations, budgets, evaluation,
checkpoints and exact resume, stop signals), :mod:`~dfkd_bench.train.graphs` (CUDA-graph
replay of a step), :mod:`~dfkd_bench.train.batchnorm` (BatchNorm grouping and statistics),
:mod:`~dfkd_bench.train.losses` (the MAD paper's losses) and :mod:`~dfkd_bench.train.zoo_losses`
(the other methods' loss terms), :mod:`~dfkd_bench.train.profiling` (host-sync guard,
operation counts).

May import: teachers, presets, store, config, runtime, method_api, models, data, errors.
Never a method: the engine gets one by name from :func:`dfkd_bench.method_api.get_method`.
"""
