"""A ready teacher: the teacher cache, external checkpoints and torchvision weights, evaluation.

Models in dfkd-bench take images in [0, 1]; :class:`NormalizedModel` applies
the normalisation a network was trained with. For the teachers we train that
is the dataset's; an external checkpoint may have been trained with another
one, so it is configurable (``--teacher-mean/--teacher-std``).

The teacher cache is a folder (``$DFKD_BENCH_TEACHERS``, default
``~/.cache/dfkd-bench/teachers``) of ``<dataset>-<arch>.pt`` files, each a
dict with ``state_dict`` and ``meta`` (accuracy, normalisation, recipe,
versions), readable with ``torch.load(weights_only=True)``; training them is
:mod:`dfkd_bench.teachers.training`, reading checkpoint files :mod:`dfkd_bench.teachers.checkpoints`.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from dfkd_bench.config import TeacherSpec
from dfkd_bench.data.catalog import get_dataset_info
from dfkd_bench.errors import CheckpointError, ConfigError
from dfkd_bench.models import build_model
from dfkd_bench.presets import get_preset
from dfkd_bench.store import atomic_write_bytes
from dfkd_bench.teachers.checkpoints import (
    extract_state_dict,
    fit_state_dict,
    load_state_into,
    not_a_file,
    parse_key_map,
    read_checkpoint,
    state_sha256,
    teacher_sha256,
)


class NormalizedModel(nn.Module):
    """``model((x - mean) / std)`` for images ``x`` in [0, 1]."""

    def __init__(self, model: nn.Module, mean: list[float], std: list[float]):
        super().__init__()
        self.model = model
        # in the default dtype: float32 in every run; float64 in the step-equivalence replay (dfkd_bench.traces),
        # where a float32 0.4914 would differ from the official code's float64 normalisation by 1e-8
        dtype = torch.get_default_dtype()
        self.register_buffer("mean", torch.tensor(mean, dtype=dtype).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=dtype).view(1, -1, 1, 1), persistent=False)

    def forward(self, images: Tensor) -> Tensor:
        return self.model((images - self.mean.to(images.dtype)) / self.std.to(images.dtype))


def teacher_cache_dir() -> Path:
    return Path(os.environ.get("DFKD_BENCH_TEACHERS", Path.home() / ".cache" / "dfkd-bench" / "teachers"))


def cached_teacher_path(dataset: str, arch: str, cache_dir: str | os.PathLike | None = None) -> Path:
    safe_arch = arch.replace(":", "_").replace("/", "_")
    return Path(cache_dir or teacher_cache_dir()) / f"{dataset}-{safe_arch}.pt"


def parse_floats(text: str | None, what: str) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{what} expects comma-separated numbers like 0.485,0.456,0.406, got {text!r}") from None


def _build_for_shapes(arch: str, num_classes: int, channels: int, image_size: int) -> nn.Module:
    """The architecture without its initialisation cost (on the meta device) when it allows it."""
    try:
        with torch.device("meta"):
            return build_model(arch, num_classes=num_classes, in_channels=channels, image_size=image_size)
    except (ConfigError, CheckpointError):
        raise
    except Exception:  # a builder that needs real tensors
        return build_model(arch, num_classes=num_classes, in_channels=channels, image_size=image_size)


def build_teacher(spec: TeacherSpec, num_classes: int, channels: int, image_size: int,
                  device: torch.device | str = "cpu") -> NormalizedModel:
    """The frozen teacher of ``spec``: eval mode, no parameter gradients, normalising inputs.

    Known key maps and missing BatchNorm counters are handled here too, so a spec that points at a
    file as published loads; a user ``--teacher-key-map`` was applied by :func:`resolve_teacher`,
    which then points the spec at the renamed copy.
    """
    model = build_model(spec.arch, num_classes=num_classes, in_channels=channels, image_size=image_size)
    load_state_into(model, extract_state_dict(read_checkpoint(spec.path), spec.path), spec.path, spec.arch)
    teacher = NormalizedModel(model, spec.mean, spec.std).to(device)
    teacher.eval()
    for parameter in teacher.parameters():
        parameter.requires_grad_(False)
    return teacher


# ----------------------------------------------------- pretrained by name ---

TEACHER_WEIGHTS_HELP = "cache | torchvision | torchvision:<WEIGHTS> (e.g. torchvision:IMAGENET1K_V1)"
# CHOSEN: where no trained teacher is needed because the paper used a published one. MAD's ImageNet
# teacher is torchvision's pretrained AlexNet (the preset's teacher arch); other datasets (and other
# arches on ImageNet) use the teacher cache unless --teacher-weights says otherwise.
PRESET_TEACHER_WEIGHTS = {"imagenet": "torchvision"}


def _torchvision_name(arch: str) -> str | None:
    from dfkd_bench.models.registry import TORCHVISION_PREFIXES

    key = arch.strip()
    for prefix in TORCHVISION_PREFIXES:
        if key.lower().startswith(prefix):
            return key[len(prefix):].strip()
    return "alexnet" if key.lower() == "alexnet" else None  # the registered alexnet is torchvision's


def torchvision_weights(arch: str, choice: str = "torchvision"):
    """The torchvision weights enum member ``choice`` names for ``arch`` (DEFAULT for plain ``torchvision``)."""
    import torchvision.models as tvm

    name = _torchvision_name(arch)
    if name is None:
        raise ConfigError(f"--teacher-weights {choice} needs a torchvision architecture (alexnet or "
                          f"torchvision:<name>), --teacher-arch is {arch}; pass --teacher-checkpoint for other weights")
    try:
        enum = tvm.get_model_weights(name)
    except (ValueError, KeyError):
        raise ConfigError(f"torchvision has no pretrained weights for {name!r}; see "
                          "torchvision.models.list_models() for the models that have") from None
    wanted = choice.partition(":")[2].strip()
    if not wanted:
        return enum.DEFAULT
    try:
        return enum[wanted]
    except KeyError:
        raise ConfigError(f"--teacher-weights {choice}: torchvision's {name} has the weights "
                          f"{', '.join(w.name for w in enum)}") from None


def torchvision_weights_file(weights, download: bool = False, progress: bool = True) -> Path:
    """The file of torchvision ``weights`` in the torch hub cache (``$TORCH_HOME/hub/checkpoints``).

    Downloaded there only with ``download``; otherwise a missing file is one error line saying
    which file to put where.
    """
    from urllib.parse import urlparse

    folder = Path(torch.hub.get_dir()) / "checkpoints"
    filename = os.path.basename(urlparse(weights.url).path)
    path = folder / filename
    if path.is_file():
        return path
    if not download:
        raise CheckpointError(f"torchvision's pretrained weights {weights} are not in the torch hub cache: put "
                              f"{filename} (from {weights.url}) into {folder} (the folder follows $TORCH_HOME), "
                              "or pass --download to fetch it there")
    try:
        torch.hub.load_state_dict_from_url(weights.url, model_dir=str(folder), map_location="cpu", progress=progress,
                                           check_hash=True, weights_only=True)
    except Exception as error:
        reason = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"could not download {weights.url} into {folder} ({reason}); fetch it by hand and "
                              f"put it there as {filename}") from None
    return path


def _teacher_weights_choice(dataset: str, arch: str, checkpoint: str | None, weights: str | None) -> str:
    if weights is not None:
        choice = weights.strip()
        if choice != "cache" and choice != "torchvision" and not choice.startswith("torchvision:"):
            raise ConfigError(f"--teacher-weights {weights!r} is not one of {TEACHER_WEIGHTS_HELP}")
        if checkpoint is not None:
            raise ConfigError(f"--teacher-weights {weights} and --teacher-checkpoint name two teachers; keep one")
        return choice
    if checkpoint is not None:
        return "checkpoint"
    default = PRESET_TEACHER_WEIGHTS.get(dataset)
    if default and arch.strip().lower() == get_preset(dataset).teacher_arch:
        return default
    return "cache"


def resolve_teacher(dataset: str, arch: str, *, checkpoint: str | None = None, mean: list[float] | None = None,
                    std: list[float] | None = None, cache_dir: str | None = None,
                    data_root: str | None = None, key_map: Sequence[str] | None = None,
                    weights: str | None = None, download: bool = False,
                    image_size: int | None = None) -> TeacherSpec:
    """The teacher a run uses: an external checkpoint, published weights by name, or the cached one.

    An external file is checked against ``arch`` here, before any run starts, and its identity
    (``sha256``) is the hash of its weights as loaded (after renaming), so the same weights give
    the same run ids whatever file form they came in. With a ``key_map`` the renamed weights are
    written once to ``<teacher cache>/converted/`` and the runs load that copy.
    """
    info = get_dataset_info(dataset)
    rules = parse_key_map(key_map)
    choice = _teacher_weights_choice(dataset, arch, checkpoint, weights)
    if rules and choice != "checkpoint":
        raise ConfigError("--teacher-key-map renames the keys of a --teacher-checkpoint file; pass the file too")
    size = image_size or get_preset(dataset).image_size
    if choice == "checkpoint":
        path = Path(checkpoint).resolve()
        if not path.is_file():
            raise CheckpointError(f"--teacher-checkpoint {checkpoint} {not_a_file(path)}")
        path, sha = _prepare_external(path, arch, info.num_classes, info.channels, size, rules, cache_dir)
        return TeacherSpec(arch=arch, path=str(path), sha256=sha,
                           mean=list(mean or info.mean), std=list(std or info.std))
    if choice.startswith("torchvision"):
        chosen = torchvision_weights(arch, choice)
        classes = len(chosen.meta.get("categories") or ()) or None
        if classes is not None and classes != info.num_classes:
            raise ConfigError(f"torchvision's {chosen} classify {classes} classes, {dataset} has "
                              f"{info.num_classes}; pass --teacher-checkpoint or train one with "
                              f"dfkd-bench teacher train --dataset {dataset} --arch {arch}")
        path = torchvision_weights_file(chosen, download=download).resolve()
        path, sha = _prepare_external(path, arch, info.num_classes, info.channels, size, [], cache_dir)
        preprocess = chosen.transforms()
        return TeacherSpec(arch=arch, path=str(path), sha256=sha,
                           mean=list(mean or getattr(preprocess, "mean", info.mean)),
                           std=list(std or getattr(preprocess, "std", info.std)))
    path = cached_teacher_path(dataset, arch, cache_dir)
    if not path.is_file():
        root = f" --data-root {data_root}" if data_root else (" --data-root DIR" if dataset != "digits" else "")
        cache = f" --teacher-cache {cache_dir}" if cache_dir else ""
        raise CheckpointError(
            f"no cached {arch} teacher for {dataset} in {path.parent}; make one with: "
            f"dfkd-bench teacher train --dataset {dataset} --arch {arch}{root}{cache}"
        )
    # Checked against the architecture at this image size before any run starts (e.g. a 16-pixel
    # LeNet asked for at --image-size 13 would otherwise fail inside the run, leaving a failed folder).
    _prepare_external(path, arch, info.num_classes, info.channels, size, [], cache_dir)
    meta = _cached_meta(str(path), *_stat_key(path))
    return TeacherSpec(arch=arch, path=str(path), sha256=teacher_sha256(path),
                       mean=list(meta.get("mean", info.mean)), std=list(meta.get("std", info.std)),
                       test_accuracy=meta.get("test_accuracy"))


def _prepare_external(path: Path, arch: str, num_classes: int, channels: int, image_size: int,
                      rules: Sequence[tuple[str, str]], cache_dir: str | None) -> tuple[Path, str]:
    """(the file runs load, the weights' hash); see :func:`resolve_teacher`."""
    size, mtime_ns = _stat_key(path)
    key = (str(path), size, mtime_ns, arch, num_classes, channels, image_size, tuple(rules),
           str(cache_dir or teacher_cache_dir()))
    target, sha = _prepare_external_cached(*key)
    if not target.is_file():  # the converted copy was deleted since: write it again
        _prepare_external_cached.cache_clear()
        target, sha = _prepare_external_cached(*key)
    return target, sha


@functools.lru_cache(maxsize=64)
def _prepare_external_cached(path: str, size: int, mtime_ns: int, arch: str, num_classes: int, channels: int,
                             image_size: int, rules: tuple[tuple[str, str], ...], cache_dir: str) -> tuple[Path, str]:
    model = _build_for_shapes(arch, num_classes, channels, image_size)
    fitted = fit_state_dict(model, extract_state_dict(read_checkpoint(path), path), source=path, arch=arch,
                            key_map=rules)
    sha = state_sha256(fitted.state)
    if not rules:  # build_teacher redoes the known renames and the BatchNorm counters on its own
        return Path(path), sha
    safe_arch = arch.replace(":", "_").replace("/", "_")
    target = Path(cache_dir) / "converted" / f"{sha[:16]}-{safe_arch}.pt"
    if not target.is_file() or teacher_sha256(target) != sha:
        import io

        buffer = io.BytesIO()
        torch.save({"state_dict": fitted.state,
                    "meta": {"source": path, "arch": arch, "key_map": [f"{o}={n}" for o, n in rules]}}, buffer)
        try:
            atomic_write_bytes(target, buffer.getvalue())
        except OSError as error:
            raise CheckpointError(f"cannot write the renamed copy of {path} into {target.parent} "
                                  f"({error.strerror or error}); pass --teacher-cache DIR (or set "
                                  "$DFKD_BENCH_TEACHERS) to a folder you can write") from None
    return target, sha


def _stat_key(path: Path) -> tuple[int, int]:
    stat = os.stat(path)
    return stat.st_size, stat.st_mtime_ns


@functools.lru_cache(maxsize=64)
def _cached_meta(path: str, size: int, mtime_ns: int) -> dict[str, Any]:
    return read_checkpoint(path).get("meta", {})


# ------------------------------------------------------------------ evaluate ---

@torch.no_grad()
def evaluate_classifier(model: nn.Module, loader, device: torch.device, progress: bool = False,
                        desc: str = "eval") -> dict[str, float]:
    """Top-1 accuracy (%) and mean cross-entropy of ``model`` on a loader of ([0,1] images, labels)."""
    was_training = model.training
    model.eval()
    correct, total, loss = 0, 0, 0.0
    for images, labels in tqdm(loader, desc=desc, disable=not progress, leave=False):
        images, labels = images.to(device), labels.to(device)
        logits = model(images)
        loss += F.cross_entropy(logits.float(), labels, reduction="sum").item()
        correct += (logits.argmax(1) == labels).sum().item()
        total += labels.numel()
    model.train(was_training)
    return {"accuracy": 100.0 * correct / max(total, 1), "cross_entropy": loss / max(total, 1), "samples": total}
