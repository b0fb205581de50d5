"""Datasets by name.

Owns: :mod:`~dfkd_bench.data.catalog` (what each dataset is: classes, channels, image size,
the teachers' normalisation; reads no file) and :mod:`~dfkd_bench.data.loaders` (a name and
a folder -> a ``Dataset`` of un-normalised ``[0, 1]`` images; one-line errors for a wrong
folder; ``load_as_tensors`` for in-memory splits).

May import: errors.
"""
