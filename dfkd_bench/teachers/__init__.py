"""Teachers: where the network being distilled comes from.

Owns: :mod:`~dfkd_bench.teachers.loading` (the teacher cache, ``NormalizedModel``,
external checkpoints and torchvision weights -> a ready teacher, evaluation),
:mod:`~dfkd_bench.teachers.checkpoints` (reading files without running code, state_dict
extraction, key maps, shape checks, hashes), :mod:`~dfkd_bench.teachers.training` (a
dataset's recipe, per-epoch checkpoints, exact resume), :mod:`~dfkd_bench.teachers.fast_train`
(the in-memory training path) and :mod:`~dfkd_bench.teachers.tensor_cache` (decoded splits
cached as tensors).

May import: presets, store, config, runtime, method_api, models, data, errors.
"""
