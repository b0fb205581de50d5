"""From "methods x seeds on a dataset, with these settings" to a list of RunConfigs.

Precedence, lowest first: the method's paper defaults, the dataset preset
(and its architecture-pair overrides), the budget, the user's ``--set``.
The CLI's ``run`` and the experiment files of ``sweep`` both go through
:func:`build_run_configs`, so a run means the same thing however it is
launched.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
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
from dfkd_bench.presets import budget_param_overrides, budget_train_overrides, get_preset, preset_method_params
from dfkd_bench.teachers import resolve_teacher


@dataclass
class TeacherOptions:
    """Which teacher: ``checkpoint`` (a file, with ``key_map`` prefix renames ``OLD=NEW``), ``weights``
    (``cache``, ``torchvision``[``:<WEIGHTS>``]; default: the preset's, see teachers.PRESET_TEACHER_WEIGHTS),
    or the teacher cache; ``download`` lets published weights be fetched into the torch hub cache."""

    checkpoint: str | None = None
    mean: list[float] | None = None
    std: list[float] | None = None
    cache_dir: str | None = None
    key_map: list[str] = field(default_factory=list)
    weights: str | None = None
    download: bool = False


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

SEED_LIMIT = 2**32  # numpy's seed range; torch takes more, but a seed beyond it is a typo
MAX_IMAGE_SIZE = 4096


def check_seeds(seeds: list[Any], what: str = "--seeds") -> None:
    for seed in seeds:
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < SEED_LIMIT:
            raise ConfigError(f"{what}: seed {seed!r} is out of range; seeds are integers from 0 to {SEED_LIMIT - 1}")


def check_image_size(image_size: Any, what: str = "--image-size") -> None:
    if image_size is None:
        return
    if isinstance(image_size, bool) or not isinstance(image_size, int) or not 1 <= image_size <= MAX_IMAGE_SIZE:
        raise ConfigError(f"{what} must be an integer from 1 to {MAX_IMAGE_SIZE} (pixels per side), "
                          f"got {image_size!r}")


def _external_teacher(dataset: str, arch: str | None, checkpoint: str | None, weights: str | None) -> bool:
    """Whether the teacher is an external one (a file or published weights), not the cache's."""
    if checkpoint is not None:
        return True
    if weights is not None:
        return weights.strip() != "cache"
    from dfkd_bench import teachers

    default = getattr(teachers, "PRESET_TEACHER_WEIGHTS", {}).get(dataset)
    preset_arch = get_preset(dataset).teacher_arch
    return bool(default) and default != "cache" and (arch or preset_arch).strip().lower() == preset_arch


def check_teacher_normalisation(mean: list[float] | None, std: list[float] | None, channels: int,
                                checkpoint: str | None, dataset: str, *, weights: str | None = None,
                                arch: str | None = None) -> None:
    """``--teacher-mean/--teacher-std``: only with an external teacher, one finite value per channel,
    std > 0 (a cached teacher was trained with the dataset's own statistics, stored with it)."""
    for name, values in (("--teacher-mean", mean), ("--teacher-std", std)):
        if values is None:
            continue
        if not _external_teacher(dataset, arch, checkpoint, weights):
            raise ConfigError(f"{name} describes an external teacher and applies only with --teacher-checkpoint "
                              "(or --teacher-weights); a cached teacher uses the statistics it was trained with: "
                              "drop it")
        if len(values) != channels:
            plural = "" if channels == 1 else "s"
            raise ConfigError(f"{name}: {len(values)} value{'' if len(values) == 1 else 's'} given, the dataset "
                              f"{dataset} has {channels} channel{plural}; give {channels} comma-separated number{plural}")
        for value in values:
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                raise ConfigError(f"{name}: {value!r} is not a finite number")
            if name == "--teacher-std" and value <= 0:
                raise ConfigError(f"{name}: std must be > 0, got {value}")
            # CHOSEN: a floor of 1e-3, not just > 0: images are in [0, 1] (pixel stds of 0.1-0.5), and a
            # std of 1e-300 turns every input into inf, a run that "diverges" for no fault of lr_S.
            if name == "--teacher-std" and value < 1e-3:
                raise ConfigError(f"{name}: {value:g} is too small: inputs would be scaled by more than 1,000 (images "
                                  "are in [0, 1]; their channel stds are about 0.1-0.5); give the std the teacher "
                                  "was trained with, on that scale")


def check_model_name(name: str, what: str) -> None:
    """A registered model name (or timm:/torchvision: ...), before any run folder is made."""
    from dfkd_bench.models import list_models
    from dfkd_bench.models.registry import TIMM_PREFIX, TORCHVISION_PREFIXES

    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"{what} must be a model name; run `dfkd-bench list` to see the registered models")
    key = name.strip().lower()
    if key.startswith(TIMM_PREFIX) or key.startswith(TORCHVISION_PREFIXES):
        return
    names = {info.name.lower() for info in list_models()}
    if key not in names:
        import difflib

        close = difflib.get_close_matches(key, sorted(names), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ConfigError(f"{what}: unknown model {name!r}{hint}; run `dfkd-bench list` to see the registered "
                          "models, or use timm:<name> / torchvision:<name>")


def check_teacher_weights(path: str | os.PathLike) -> None:
    """Refuse a teacher checkpoint whose weights are not all finite (NaN or inf): such a teacher
    answers one class for every image and every run distilled from it is meaningless."""
    stat = os.stat(path)
    _check_teacher_weights_cached(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _check_teacher_weights_cached(path: str, size: int, mtime_ns: int) -> None:
    import torch

    from dfkd_bench.teachers import extract_state_dict, read_checkpoint

    try:
        state = extract_state_dict(read_checkpoint(path), path)
    except CheckpointError:  # not a state_dict: building the teacher reports what is wrong with it
        return
    for key, tensor in state.items():
        if tensor.is_floating_point() or tensor.is_complex():
            if not bool(torch.isfinite(tensor).all()):
                bad = int((~torch.isfinite(tensor)).sum())
                raise CheckpointError(f"teacher checkpoint {path} has non-finite weights ({bad} NaN/inf values in "
                                      f"{key!r}); it comes from a diverged training: retrain or export it again")


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
    check_seeds(request.seeds, "seeds")  # the CLI checked --seeds already; a sweep's cells come here
    check_image_size(request.image_size, "image_size")
    info = get_dataset_info(request.dataset)
    preset = get_preset(request.dataset)
    teacher_arch = request.teacher_arch or preset.teacher_arch
    student_arch = request.student_arch or preset.student_arch
    image_size = request.image_size or preset.image_size
    # Input errors are refused here, before any run folder exists (not as `failed` runs).
    check_model_name(student_arch, "student architecture")
    check_model_name(teacher_arch, "teacher architecture")
    check_teacher_normalisation(request.teacher.mean, request.teacher.std, info.channels,
                                request.teacher.checkpoint, request.dataset,
                                weights=getattr(request.teacher, "weights", None), arch=teacher_arch)
    check_override_keys(request.methods, request.overrides)

    train = preset.train_config(teacher_arch, student_arch)
    train = apply_train_overrides(train, budget_train_overrides(preset, request.budget, train))
    train = apply_train_overrides(train, request.overrides)
    train.validate()

    options = request.teacher
    try:
        teacher = resolve_teacher(request.dataset, teacher_arch, checkpoint=options.checkpoint, mean=options.mean,
                                  std=options.std, cache_dir=options.cache_dir, data_root=request.data_root,
                                  key_map=options.key_map, weights=options.weights, download=options.download,
                                  image_size=image_size)
    except CheckpointError as error:
        if not allow_missing_teacher:
            raise
        teacher = TeacherSpec(arch=teacher_arch, path=str(error), sha256=MISSING_TEACHER,
                              mean=list(options.mean or info.mean), std=list(options.std or info.std))
    if teacher.sha256 != MISSING_TEACHER:
        check_teacher_weights(teacher.path)
    configs = []
    for method in request.methods:
        params = resolve_method_params(method, preset_method_params(preset, method), {})
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
