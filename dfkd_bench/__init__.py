"""dfkd-bench: a benchmark suite for data-free knowledge distillation.

The harness lives here; the pluggable methods live in the repository's top-level
``methods/`` folder, installed as ``dfkd_bench.methods``. One room per concern, in
layers: a module may import the ``dfkd_bench`` modules of the rows BELOW its own and
the modules of its own package, nothing above and nothing beside it
(``tests/test_architecture.py`` reads this table and fails on any other import):

Layers:
    cli                     the command line: parses, validates, calls one package per command
    report                  tables and figures from stored records (never trains)
    bench                   ``dfkd-bench bench`` and the GPU window checks: timing, FLOPs, memory
    cluster                 runs from requests and experiment files; launch, packing, SLURM, status
    traces                  step-equivalence to the authors' code: trace files, their replay, card lines
    methods                 one file per DFKD method behind method_api (the plug-ins)
    train                   the engine and what each step uses: graphs, BatchNorm grouping, losses
    teachers                loading, checkpoint files and key maps, training, the tensor cache
    presets store           the papers' settings per dataset; run folders and records on disk
    config                  run configurations, their hash (the run id) and overrides
    runtime method_api models data   devices and seeds; the method contract; networks; datasets
    errors                  the one-line user errors every layer raises

The methods sit above the engine: the engine finds them by name through
:func:`dfkd_bench.method_api.get_method` and never imports one.
"""

__version__ = "0.1.0"
