"""Teachers: training (Table 4), the teacher cache, external checkpoints, evaluation.

Models in dfkd-bench take images in [0, 1]; :class:`NormalizedModel` applies
the normalisation a network was trained with. For the teachers we train that
is the dataset's; an external checkpoint may have been trained with another
one, so it is configurable (``--teacher-mean/--teacher-std``).

The teacher cache is a folder (``$DFKD_BENCH_TEACHERS``, default
``~/.cache/dfkd-bench/teachers``) of ``<dataset>-<arch>.pt`` files, each a
dict with ``state_dict`` and ``meta`` (accuracy, normalisation, recipe,
versions), readable with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
import time
from collections import OrderedDict
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from dfkd_bench.config import TeacherSpec
from dfkd_bench.data import build_dataset, get_dataset_info
from dfkd_bench.errors import CheckpointError, ConfigError
from dfkd_bench.models import build_model
from dfkd_bench.presets import TeacherRecipe, get_preset
from dfkd_bench.store import atomic_write_bytes


class NormalizedModel(nn.Module):
    """``model((x - mean) / std)`` for images ``x`` in [0, 1]."""

    def __init__(self, model: nn.Module, mean: list[float], std: list[float]):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def forward(self, images: Tensor) -> Tensor:
        return self.model((images - self.mean.to(images.dtype)) / self.std.to(images.dtype))


def teacher_cache_dir() -> Path:
    return Path(os.environ.get("DFKD_BENCH_TEACHERS", Path.home() / ".cache" / "dfkd-bench" / "teachers"))


def cached_teacher_path(dataset: str, arch: str, cache_dir: str | os.PathLike | None = None) -> Path:
    safe_arch = arch.replace(":", "_").replace("/", "_")
    return Path(cache_dir or teacher_cache_dir()) / f"{dataset}-{safe_arch}.pt"


def _file_bytes_sha256(path: str) -> str:
    """Hash of a file's bytes (the identity of a teacher file that holds no state_dict)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def teacher_sha256(path: str | os.PathLike) -> str:
    """The teacher's identity in run ids: a hash of its weights, not of the file.

    Training a teacher is deterministic (same weights on every retraining on
    the same machine and thread count), but its file also stores the training
    time; hashing the file would give every retrained or re-saved teacher a
    new identity, so finished runs would no longer be recognised as done and
    the report would split identical teachers into separate columns. The hash
    covers the state_dict as the loader sees it (``module.`` stripped), key by
    key in sorted order: name, dtype, shape and raw bytes. A file that holds
    no state_dict falls back to the file's hash (building the teacher then
    reports what is wrong with it).
    """
    stat = os.stat(path)
    return _teacher_sha256_cached(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _teacher_sha256_cached(path: str, size: int, mtime_ns: int) -> str:
    try:
        state = extract_state_dict(read_checkpoint(path), path)
    except CheckpointError:
        return _file_bytes_sha256(path)
    digest = hashlib.sha256(b"dfkd-bench teacher weights v1")
    for key in sorted(state):
        tensor = state[key].detach().cpu().contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def parse_floats(text: str | None, what: str) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{what} expects comma-separated numbers like 0.485,0.456,0.406, got {text!r}") from None


# ------------------------------------------------------- external checkpoints ---

def extract_state_dict(obj: Any, path: str | os.PathLike) -> "OrderedDict[str, Tensor]":
    """A raw state_dict, or a dict holding one under ``state_dict`` / ``model``; ``module.`` stripped."""
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    elif isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, Tensor) for v in obj.values()):
        raise CheckpointError(
            f"{path}: expected a state_dict (name -> tensor) or a dict with 'state_dict' or 'model'; "
            "save one with torch.save(model.state_dict(), PATH)"
        )
    return OrderedDict((k[len("module."):] if k.startswith("module.") else k, v) for k, v in obj.items())


def load_state_into(model: nn.Module, state: dict[str, Tensor], path: str | os.PathLike, arch: str) -> None:
    """Load strictly; on mismatch name the first offending key in one line."""
    expected = model.state_dict()
    for key, value in expected.items():
        if key not in state:
            raise CheckpointError(f"{path} does not fit --teacher-arch {arch}: missing key {key!r}")
        if tuple(state[key].shape) != tuple(value.shape):
            raise CheckpointError(
                f"{path} does not fit --teacher-arch {arch}: key {key!r} has shape {tuple(state[key].shape)}, "
                f"the architecture expects {tuple(value.shape)}"
            )
    for key in state:
        if key not in expected:
            raise CheckpointError(f"{path} does not fit --teacher-arch {arch}: unexpected key {key!r}")
    model.load_state_dict(state, strict=True)


def read_checkpoint(path: str | os.PathLike) -> Any:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"teacher checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(
            f"{path} is not a readable PyTorch checkpoint ({first[:200]}); "
            "pass a file saved with torch.save(model.state_dict(), PATH)"
        ) from None


def build_teacher(spec: TeacherSpec, num_classes: int, channels: int, image_size: int,
                  device: torch.device | str = "cpu") -> NormalizedModel:
    """The frozen teacher of ``spec``: eval mode, no parameter gradients, normalising inputs."""
    model = build_model(spec.arch, num_classes=num_classes, in_channels=channels, image_size=image_size)
    load_state_into(model, extract_state_dict(read_checkpoint(spec.path), spec.path), spec.path, spec.arch)
    teacher = NormalizedModel(model, spec.mean, spec.std).to(device)
    teacher.eval()
    for parameter in teacher.parameters():
        parameter.requires_grad_(False)
    return teacher


def resolve_teacher(dataset: str, arch: str, *, checkpoint: str | None = None, mean: list[float] | None = None,
                    std: list[float] | None = None, cache_dir: str | None = None,
                    data_root: str | None = None) -> TeacherSpec:
    """The teacher a run uses: an external checkpoint, or the cached one (with the command to make it)."""
    info = get_dataset_info(dataset)
    if checkpoint is not None:
        path = Path(checkpoint).resolve()
        if not path.is_file():
            raise CheckpointError(f"--teacher-checkpoint {checkpoint} does not exist")
        return TeacherSpec(arch=arch, path=str(path), sha256=teacher_sha256(path),
                           mean=list(mean or info.mean), std=list(std or info.std))
    path = cached_teacher_path(dataset, arch, cache_dir)
    if not path.is_file():
        root = f" --data-root {data_root}" if data_root else (" --data-root DIR" if dataset != "digits" else "")
        cache = f" --teacher-cache {cache_dir}" if cache_dir else ""
        raise CheckpointError(
            f"no cached {arch} teacher for {dataset} in {path.parent}; make one with: "
            f"dfkd-bench teacher train --dataset {dataset} --arch {arch}{root}{cache}"
        )
    meta = _cached_meta(str(path), *_stat_key(path))
    return TeacherSpec(arch=arch, path=str(path), sha256=teacher_sha256(path),
                       mean=list(meta.get("mean", info.mean)), std=list(meta.get("std", info.std)),
                       test_accuracy=meta.get("test_accuracy"))


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


def default_workers() -> int:
    return min(8, max(0, (os.cpu_count() or 1) - 1))


# --------------------------------------------------------------------- train ---

TEACHER_RECIPE_NAMES = ("paper", "fast")
PIPELINES = ("auto", "tensors", "loader")


def recipe_for(dataset: str, name: str = "paper") -> TeacherRecipe:
    """A teacher recipe of ``dataset``: ``paper`` (the preset's; Table 4 where the paper has one)
    or ``fast`` (the short CIFAR recipe, see presets.py for its origin)."""
    from dfkd_bench.presets import teacher_recipes

    recipes = teacher_recipes(dataset)
    if not recipes:
        raise ConfigError(f"no teacher recipe for {dataset}")
    if name not in recipes:
        raise ConfigError(f"--recipe {name}: {dataset} has the teacher recipe(s) {', '.join(recipes)}; "
                          f"use one of them")
    return recipes[name]


def learning_rate(recipe: TeacherRecipe, epoch_float: float) -> float:
    """``step`` (Table 4): linear warm-up, then step decay at the milestones. ``onecycle``: linear
    from 0 to the peak over the warm-up epochs, then linear down to 0 at the end of training."""
    base = recipe.effective_lr
    if recipe.schedule == "onecycle":
        warmup = max(float(recipe.warmup_epochs), 1e-9)
        if epoch_float < warmup:
            return base * epoch_float / warmup
        return base * max(0.0, (recipe.epochs - epoch_float) / max(recipe.epochs - warmup, 1e-9))
    if recipe.warmup_epochs and epoch_float < recipe.warmup_epochs:
        return base * epoch_float / recipe.warmup_epochs
    decays = sum(1 for m in recipe.milestones if epoch_float >= m)
    return base * recipe.lr_decay ** decays


def tensor_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where decoded training/test images are kept: ``tensors/`` inside the teacher cache."""
    return Path(cache_dir or teacher_cache_dir()) / "tensors"


def _eval_epochs(epochs: int) -> set[int]:
    return {e for e in range(1, epochs + 1) if e == epochs or e % max(1, epochs // 10) == 0}


def train_teacher(dataset: str, arch: str, *, data_root: str | None = None, cache_dir: str | None = None,
                  epochs: int | None = None, batch_size: int | None = None, lr: float | None = None,
                  seed: int = 0, device: str = "auto", workers: int | None = None,
                  image_size: int | None = None, progress: bool = True, download: bool = False,
                  recipe: str = "paper", pipeline: str = "auto") -> dict[str, Any]:
    """Train ``arch`` on ``dataset`` with one of its recipes; store it in the teacher cache.

    ``pipeline``: ``tensors`` trains from whole splits held on the device with batched device-side
    augmentation (:mod:`dfkd_bench.fast_train`; decoded image files cached in
    :func:`tensor_cache_dir`); ``loader`` is the classic DataLoader path; ``auto`` (default) picks
    ``tensors`` for the datasets that fit in memory (digits, MNIST, CIFAR, Tiny-ImageNet).
    """
    from dfkd_bench.engine import resolve_device, seed_everything
    from dfkd_bench.fast_train import IN_MEMORY_DATASETS, augmentation_for, train_in_memory

    if pipeline not in PIPELINES:
        raise ConfigError(f"--pipeline {pipeline!r} is not one of {', '.join(PIPELINES)}")
    info = get_dataset_info(dataset)
    dataset = info.name
    base_recipe = recipe_for(dataset, recipe)
    changes = {k: v for k, v in (("epochs", epochs), ("batch_size", batch_size), ("lr", lr)) if v is not None}
    if "epochs" in changes:  # keep the decay points and the warm-up at the same fractions of training
        scale = changes["epochs"] / base_recipe.epochs
        changes["milestones"] = tuple(max(1, round(m * scale)) for m in base_recipe.milestones)
        if base_recipe.schedule == "onecycle":
            changes["warmup_epochs"] = max(1, round(base_recipe.warmup_epochs * scale))
    recipe_used = TeacherRecipe(**{**asdict(base_recipe), **changes})
    preset = get_preset(dataset)
    size = image_size or preset.image_size
    if pipeline == "auto":
        pipeline = "tensors" if dataset in IN_MEMORY_DATASETS else "loader"
    elif pipeline == "tensors" and dataset not in IN_MEMORY_DATASETS:
        raise ConfigError(f"--pipeline tensors holds whole splits in memory, which {dataset} does not fit; "
                          f"use --pipeline loader (or auto); in memory: {', '.join(IN_MEMORY_DATASETS)}")
    dev = resolve_device(device)
    seed_everything(seed)
    workers = default_workers() if workers is None else workers
    model = NormalizedModel(build_model(arch, info.num_classes, info.channels, size), info.mean, info.std).to(dev)
    start = time.time()
    extra: dict[str, Any] = {}
    if pipeline == "tensors":
        from dfkd_bench.tensor_cache import split_tensors

        loaded_at = time.time()
        splits = {}
        for split in ("train", "test"):
            data = build_dataset(dataset, data_root, split, image_size=size, download=download)
            splits[split] = split_tensors(data, name=dataset, split=split, image_size=size,
                                          cache_dir=tensor_cache_dir(cache_dir), workers=workers,
                                          progress=progress)
        extra["data_seconds"] = time.time() - loaded_at
        extra["tensor_cache"] = {k: v.source for k, v in splits.items()}
        steps = recipe_used.epochs * max(1, len(splits["train"].labels) // recipe_used.batch_size)
        bar = tqdm(total=steps, desc=f"teacher {dataset}/{arch}", disable=not progress)

        def report(step: int, total: int, status: dict[str, Any]) -> None:
            bar.n = step
            bar.set_postfix({k: (f"{v:.3f}" if isinstance(v, float) else v) for k, v in status.items()})

        history = train_in_memory(model, (splits["train"].images, splits["train"].labels),
                                  (splits["test"].images, splits["test"].labels), recipe=recipe_used,
                                  lr_at=learning_rate, augmentation=augmentation_for(dataset), device=dev,
                                  seed=seed, progress=report, eval_epochs=_eval_epochs(recipe_used.epochs))
        bar.close()
    else:
        history = _train_with_loader(model, dataset, data_root, size, download, recipe_used, dev, workers, seed,
                                     progress, arch)
    final = history[-1]
    meta = {
        "dataset": dataset, "arch": arch, "num_classes": info.num_classes, "channels": info.channels,
        "image_size": size, "mean": list(info.mean), "std": list(info.std),
        "test_accuracy": final["accuracy"], "test_cross_entropy": final["cross_entropy"],
        "train_seconds": time.time() - start, "recipe": asdict(recipe_used), "seed": seed, "history": history,
        "torch": str(torch.__version__), "device": str(dev), "pipeline": pipeline, **extra,
    }
    path = cached_teacher_path(dataset, arch, cache_dir)
    import io

    buffer = io.BytesIO()
    state = {k: v.detach().cpu().contiguous() for k, v in model.model.state_dict().items()}
    torch.save({"state_dict": state, "meta": meta}, buffer)
    atomic_write_bytes(path, buffer.getvalue())
    return {"path": str(path), **meta}


def _train_with_loader(model: nn.Module, dataset: str, data_root: str | None, size: int, download: bool,
                       recipe: TeacherRecipe, dev: torch.device, workers: int, seed: int, progress: bool,
                       arch: str) -> list[dict[str, Any]]:
    """The classic path: a DataLoader decodes and augments on the CPU (datasets too big for memory)."""
    train_set = build_dataset(dataset, data_root, "train", train_augment=True, image_size=size, download=download)
    test_set = build_dataset(dataset, data_root, "test", image_size=size, download=download)
    generator = torch.Generator().manual_seed(seed)
    train_loader = DataLoader(train_set, batch_size=recipe.batch_size, shuffle=True, num_workers=workers,
                              drop_last=len(train_set) > recipe.batch_size, generator=generator,
                              persistent_workers=workers > 0, pin_memory=dev.type == "cuda")
    test_loader = DataLoader(test_set, batch_size=max(256, recipe.batch_size), num_workers=workers)
    optimizer = torch.optim.SGD(model.parameters(), lr=recipe.effective_lr, momentum=recipe.momentum,
                                weight_decay=recipe.weight_decay, nesterov=bool(recipe.nesterov and recipe.momentum))
    steps_per_epoch = len(train_loader)
    bar = tqdm(total=recipe.epochs * steps_per_epoch, desc=f"teacher {dataset}/{arch}", disable=not progress)
    history = []
    eval_epochs = _eval_epochs(recipe.epochs)
    for epoch in range(recipe.epochs):
        model.train()
        for step, (images, labels) in enumerate(train_loader):
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(recipe, epoch + step / steps_per_epoch)
            images, labels = images.to(dev, non_blocking=True), labels.to(dev, non_blocking=True)
            loss = F.cross_entropy(model(images), labels, label_smoothing=recipe.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            bar.update(1)
            if step % 20 == 0:
                bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.3f}")
        if not math.isfinite(loss.item()):
            raise ConfigError(f"teacher training diverged at epoch {epoch + 1} (loss {loss.item()}); lower --lr")
        if epoch + 1 in eval_epochs:
            metrics = evaluate_classifier(model, test_loader, dev)
            history.append({"epoch": epoch + 1, **metrics})
            bar.set_postfix(epoch=epoch + 1, test_acc=f"{metrics['accuracy']:.2f}")
    bar.close()
    return history
