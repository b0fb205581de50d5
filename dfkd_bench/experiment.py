"""From "methods x seeds on a dataset, with these settings" to a list of RunConfigs.

Precedence, lowest first: the method's paper defaults, the dataset preset
(and its architecture-pair overrides), the budget, the user's ``--set``.
The CLI's ``run`` and the experiment files of ``sweep`` both go through
:func:`build_run_configs`, so a run means the same thing however it is
launched.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from dfkd_bench.config import (
    RunConfig,
    TeacherSpec,
    apply_train_overrides,
    check_override_keys,
    resolve_method_params,
)
from dfkd_bench.data import get_dataset_info
from dfkd_bench.errors import CheckpointError, ConfigError
from dfkd_bench.method_api import get_method
from dfkd_bench.presets import budget_param_overrides, budget_train_overrides, get_preset
from dfkd_bench.teachers import resolve_teacher


@dataclass
class TeacherOptions:
    checkpoint: str | None = None
    mean: list[float] | None = None
    std: list[float] | None = None
    cache_dir: str | None = None


@dataclass
class RunRequest:
    """One cell of an experiment: a dataset and pair, several methods and seeds, one set of overrides."""

    methods: list[str]
    dataset: str
    seeds: list[int]
    teacher_arch: str | None = None
    student_arch: str | None = None
    budget: str = "default"
    overrides: dict[str, Any] = field(default_factory=dict)
    teacher: TeacherOptions = field(default_factory=TeacherOptions)
    data_root: str | None = None
    image_size: int | None = None


MISSING_TEACHER = "missing"


def build_run_configs(request: RunRequest, allow_missing_teacher: bool = False) -> list[RunConfig]:
    """One RunConfig per (method, seed).

    ``allow_missing_teacher`` (for ``--dry-run`` listings only): when the
    teacher does not exist yet, use a placeholder whose ``sha256`` is
    ``"missing"`` instead of failing; such configs cannot be trained.
    """
    if not request.methods:
        raise ConfigError("no methods given; pass e.g. --methods abm,mem,mad")
    if not request.seeds:
        raise ConfigError("no seeds given; pass e.g. --seeds 0,1,2")
    for name in request.methods:
        get_method(name)  # fails early with the list of registered methods
    info = get_dataset_info(request.dataset)
    preset = get_preset(request.dataset)
    teacher_arch = request.teacher_arch or preset.teacher_arch
    student_arch = request.student_arch or preset.student_arch
    image_size = request.image_size or preset.image_size
    check_override_keys(request.methods, request.overrides)

    train = preset.train_config(teacher_arch, student_arch)
    train = apply_train_overrides(train, budget_train_overrides(preset, request.budget, train))
    train = apply_train_overrides(train, request.overrides)
    train.validate()

    options = request.teacher
    try:
        teacher = resolve_teacher(request.dataset, teacher_arch, checkpoint=options.checkpoint, mean=options.mean,
                                  std=options.std, cache_dir=options.cache_dir, data_root=request.data_root)
    except CheckpointError as error:
        if not allow_missing_teacher:
            raise
        teacher = TeacherSpec(arch=teacher_arch, path=str(error), sha256=MISSING_TEACHER,
                              mean=list(options.mean or info.mean), std=list(options.std or info.std))
    configs = []
    for method in request.methods:
        params = resolve_method_params(method, preset.params, {})
        params = resolve_method_params(method, params, budget_param_overrides(request.budget, params))
        params = resolve_method_params(method, params, request.overrides)
        for seed in request.seeds:
            configs.append(RunConfig(
                method=method, dataset=request.dataset, seed=seed, teacher=teacher, student_arch=student_arch,
                image_size=image_size, num_classes=info.num_classes, channels=info.channels,
                student_mean=list(info.mean), student_std=list(info.std), train=train, params=params,
                preset=preset.name, budget=request.budget, data_root=request.data_root,
            ))
    return configs
