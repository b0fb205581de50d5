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
from dfkd_bench.data.catalog import get_dataset_info
from dfkd_bench.errors import CheckpointError, ConfigError
from dfkd_bench.method_api import get_method
from dfkd_bench.presets import budget_param_overrides, budget_train_overrides, get_preset, preset_method_params
from dfkd_bench.teachers.loading import PRESET_TEACHER_WEIGHTS, resolve_teacher


@dataclass
class TeacherOptions:
    """Which teacher: ``checkpoint`` (a file, with ``key_map`` prefix renames ``OLD=NEW``), ``weights``
    (``cache``, ``torchvision``[``:<WEIGHTS>``]; default: the preset's, see teachers.loading.PRESET_TEACHER_WEIGHTS),
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
    protocol: str = "common"


PROTOCOLS = ("common", "paper")

# Engine settings a paper protocol starts from instead of the preset's: no drift measurement
# (not part of any paper); the preset's speed switches (channels_last ...) stay.
_PAPER_TRAIN_BASE = dict(drift_every=0)


def paper_protocol(method: str, dataset: str):
    """The method's :class:`PaperProtocol` for ``dataset``, or a one-line error naming those it has."""
    protocols = get_method(method).paper_protocols
    if dataset not in protocols:
        have = ", ".join(sorted(protocols)) or "none"
        raise ConfigError(f"{method} has no paper protocol for {dataset} (it has: {have}); "
                          f"use protocol common, or another dataset")
    return protocols[dataset]


def resolve_settings(method: str, dataset: str, protocol: str = "common", budget: str = "default",
                     overrides: dict[str, Any] | None = None, teacher_arch: str | None = None,
                     student_arch: str | None = None, image_size: int | None = None):
    """``(teacher_arch, student_arch, image_size, TrainConfig, params)`` of one method under a protocol,
    without a teacher: what :func:`build_run_configs` runs, and what the protocol card shows.

    common: paper defaults < preset (and its pair overrides, the method's preset values) < budget < --set.
    paper:  engine and method defaults < the method's PaperProtocol for the dataset < budget < --set;
    the protocol fixes the pair and the input size (asking for others is an error).
    """
    teacher_arch, student_arch, image_size, train = resolve_pair_and_train(
        method, dataset, protocol, budget, overrides, teacher_arch, student_arch, image_size)
    return teacher_arch, student_arch, image_size, train, resolve_params(method, dataset, protocol, budget, overrides)


def resolve_pair_and_train(method: str, dataset: str, protocol: str = "common", budget: str = "default",
                           overrides: dict[str, Any] | None = None, teacher_arch: str | None = None,
                           student_arch: str | None = None, image_size: int | None = None):
    """The pair, input size and engine settings of :func:`resolve_settings`."""
    if protocol not in PROTOCOLS:
        raise ConfigError(f"protocol={protocol!r} is not one of {', '.join(PROTOCOLS)}")
    preset = get_preset(dataset)
    if protocol == "paper":
        proto = paper_protocol(method, dataset)
        for what, given, fixed in (("teacher_arch", teacher_arch, proto.teacher_arch),
                                   ("student_arch", student_arch, proto.student_arch),
                                   ("image_size", image_size, proto.image_size)):
            if given is not None and given != fixed:
                raise ConfigError(f"the {method} paper protocol on {dataset} fixes {what} = {fixed}, got {given}; "
                                  f"leave it out or use protocol common")
        teacher_arch, student_arch, image_size = proto.teacher_arch, proto.student_arch, proto.image_size
        train = preset.train_config(teacher_arch, student_arch)
        train = apply_train_overrides(train, {**_PAPER_TRAIN_BASE, **proto.train})
    else:
        teacher_arch = teacher_arch or preset.teacher_arch
        student_arch = student_arch or preset.student_arch
        image_size = image_size or preset.image_size
        train = preset.train_config(teacher_arch, student_arch)
    train = apply_train_overrides(train, budget_train_overrides(preset, budget, train))
    train = apply_train_overrides(train, dict(overrides or {}))
    return teacher_arch, student_arch, image_size, train


def resolve_params(method: str, dataset: str, protocol: str = "common", budget: str = "default",
                   overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The method's settings of :func:`resolve_settings`."""
    if protocol == "paper":
        shared = dict(paper_protocol(method, dataset).params)
    else:
        shared = preset_method_params(get_preset(dataset), method)
    params = resolve_method_params(method, shared, {})
    params = resolve_method_params(method, params, budget_param_overrides(budget, params))
    return resolve_method_params(method, params, dict(overrides or {}))


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
    default = PRESET_TEACHER_WEIGHTS.get(dataset)
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

    from dfkd_bench.teachers.checkpoints import extract_state_dict, read_checkpoint

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
    if request.protocol not in PROTOCOLS:
        raise ConfigError(f"protocol={request.protocol!r} is not one of {', '.join(PROTOCOLS)}")
    if request.protocol == "paper" and request.budget == "paper":
        raise ConfigError("budget paper is the MAD paper's schedule for the common protocol; a paper protocol "
                          "already has its paper's schedule: use budget default (or smoke)")
    # Input errors are refused here, before any run folder exists (not as `failed` runs).
    check_model_name(request.student_arch or preset.student_arch, "student architecture")
    check_model_name(request.teacher_arch or preset.teacher_arch, "teacher architecture")
    check_override_keys(request.methods, request.overrides)
    # Each method's engine settings (a paper protocol differs per method); one pair per request.
    resolved = {method: resolve_pair_and_train(method, request.dataset, request.protocol, request.budget,
                                               request.overrides, request.teacher_arch, request.student_arch,
                                               request.image_size) for method in request.methods}
    pairs = {(t, s, size) for t, s, size, _ in resolved.values()}
    if len(pairs) > 1:
        raise ConfigError(f"the paper protocols of {', '.join(request.methods)} on {request.dataset} use different "
                          f"teacher/student/image sizes {sorted(pairs)}; put them in separate cells")
    teacher_arch, student_arch, image_size = pairs.pop()
    check_teacher_normalisation(request.teacher.mean, request.teacher.std, info.channels,
                                request.teacher.checkpoint, request.dataset,
                                weights=getattr(request.teacher, "weights", None), arch=teacher_arch)
    for _, _, _, train in resolved.values():
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
        train = resolved[method][3]
        params = resolve_params(method, request.dataset, request.protocol, request.budget, request.overrides)
        published = paper_protocol(method, request.dataset).published if request.protocol == "paper" else None
        for seed in request.seeds:
            configs.append(RunConfig(
                method=method, dataset=request.dataset, seed=seed, teacher=teacher, student_arch=student_arch,
                image_size=image_size, num_classes=info.num_classes, channels=info.channels,
                student_mean=list(info.mean), student_std=list(info.std), train=train, params=params,
                preset=preset.name, budget=request.budget, data_root=request.data_root,
                protocol=request.protocol, published=published,
            ))
    return configs
