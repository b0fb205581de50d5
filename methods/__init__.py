"""The DFKD methods, one file each, behind :mod:`dfkd_bench.method_api` (installed as
``dfkd_bench.methods``; ``DFKD_BENCH_METHOD_PATH`` adds folders of more).

Owns: ``common.py`` (the adversarial base: generator, EMA, memory, student batches; ABM,
DFKD-Mem and MAD build on it), ``zoo_common.py`` (the generator-based and pool-based bases of
the other methods, feature taps) and one file per method.

May import: train, teachers, presets, store, config, runtime, method_api, models, data, errors.
"""
