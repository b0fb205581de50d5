"""From a request to finished run folders, on a laptop, one GPU or a SLURM cluster.

Owns: :mod:`~dfkd_bench.cluster.experiment` (a ``RunRequest`` or a protocol -> the
``RunConfig`` of every run, with its checks), :mod:`~dfkd_bench.cluster.protocol_card` (each
method's settings: paper, official code, ours), :mod:`~dfkd_bench.cluster.sweep` (experiment
files, dry runs, ``dfkd-bench status``) and :mod:`~dfkd_bench.cluster.launch` (inline, local
and SLURM launchers through submitit, packing several runs per GPU, preemption and requeue).
The single-node SLURM used by CI is ``scripts/slurm/``.

May import: traces, methods, train, teachers, presets, store, config, runtime, method_api, models, data, errors.
"""
