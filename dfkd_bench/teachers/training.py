"""Training a teacher with a dataset's recipe (Table 4): the in-memory fast path
(:mod:`dfkd_bench.teachers.fast_train`) or the DataLoader pipeline, an atomic ``weights_only``
checkpoint per epoch, exact resume, and a clean stop on SIGTERM.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from dfkd_bench.data.catalog import get_dataset_info
from dfkd_bench.data.loaders import build_dataset
from dfkd_bench.errors import ConfigError
from dfkd_bench.models import build_model
from dfkd_bench.presets import TeacherRecipe, get_preset
from dfkd_bench.store import atomic_write_bytes
from dfkd_bench.teachers.loading import NormalizedModel, cached_teacher_path, evaluate_classifier, teacher_cache_dir


def default_workers() -> int:
    return min(8, max(0, (os.cpu_count() or 1) - 1))


# --------------------------------------------------------------------- train ---

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


class TeacherStop:
    """A stop request for teacher training (set by SIGINT/SIGTERM in ``teacher train``).

    While the data are read (``training`` False) nothing is lost by stopping at once, so the
    signal handler may raise :class:`TeacherInterrupted` there; once epochs run, a stop is
    honoured at the end of the epoch, after its checkpoint is written.
    """

    def __init__(self) -> None:
        self.requested = False
        self.reason = ""
        self.training = False

    def request(self, reason: str) -> None:
        self.requested = True
        self.reason = reason


class TeacherInterrupted(Exception):
    """Teacher training stopped on request; its last epoch's checkpoint (if any) is saved."""


def training_checkpoint_path(dataset: str, arch: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where an unfinished teacher training keeps its per-epoch checkpoint: ``training/`` in the cache."""
    final = cached_teacher_path(dataset, arch, cache_dir)
    return final.parent / "training" / final.name


def _load_training_checkpoint(path: Path, key: str, progress: bool) -> dict[str, Any] | None:
    """The checkpoint of the same training (same ``key``), else None (with a line saying why)."""
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - a torn or foreign file: train from the start
        print(f"teacher training: ignoring the unreadable checkpoint {path} ({str(error).splitlines()[0][:200]}); "
              "training from the start")
        return None
    if not isinstance(state, dict) or state.get("key") != key:
        print(f"teacher training: {path} belongs to another training (recipe, seed, pipeline or device differ); "
              "training from the start")
        return None
    return state


def _save_training_checkpoint(path: Path, state: dict[str, Any]) -> None:
    import io

    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def train_teacher(dataset: str, arch: str, *, data_root: str | None = None, cache_dir: str | None = None,
                  epochs: int | None = None, batch_size: int | None = None, lr: float | None = None,
                  seed: int = 0, device: str = "auto", workers: int | None = None,
                  image_size: int | None = None, progress: bool = True, download: bool = False,
                  recipe: str = "paper", pipeline: str = "auto", stop: TeacherStop | None = None) -> dict[str, Any]:
    """Train ``arch`` on ``dataset`` with one of its recipes; store it in the teacher cache.

    After every epoch the whole training state (weights, optimiser, random streams, history) is
    written atomically to :func:`training_checkpoint_path`; the same call after a kill or a stop
    continues from the last epoch (on a CPU, to bit-identical weights) and removes it when done.
    ``stop.requested`` ends the training after the current epoch with :class:`TeacherInterrupted`.

    ``pipeline``: ``tensors`` trains from whole splits held on the device with batched device-side
    augmentation (:mod:`dfkd_bench.teachers.fast_train`; decoded image files cached in
    :func:`tensor_cache_dir`); ``loader`` is the classic DataLoader path; ``auto`` (default) picks
    ``tensors`` for the datasets that fit in memory (digits, MNIST, CIFAR, Tiny-ImageNet).
    """
    from dfkd_bench.runtime import resolve_device, seed_everything
    from dfkd_bench.teachers.fast_train import IN_MEMORY_DATASETS, augmentation_for, train_in_memory

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
    # The checkpoint continues only the same training: same recipe, seed, pipeline, size and device kind.
    import json as _json

    key = _json.dumps({"dataset": dataset, "arch": arch, "recipe": asdict(recipe_used), "seed": seed,
                       "pipeline": pipeline, "image_size": size, "device": dev.type,
                       "workers": workers if pipeline == "loader" else None}, sort_keys=True, default=str)
    checkpoint_path = training_checkpoint_path(dataset, arch, cache_dir)
    resume = _load_training_checkpoint(checkpoint_path, key, progress)
    elapsed_before = float(resume.get("elapsed", 0.0)) if resume else 0.0
    if resume is not None:
        within = f", step {int(resume['step'])} of the next" if resume.get("step") else ""
        print(f"teacher training: resuming from epoch {int(resume['epoch'])}{within} of {recipe_used.epochs} "
              f"({checkpoint_path})")

    def on_epoch_end(state: dict[str, Any]) -> None:
        state = {**state, "key": key, "elapsed": elapsed_before + time.time() - start}
        if state["epoch"] < recipe_used.epochs:  # the last epoch's state is the teacher file itself
            _save_training_checkpoint(checkpoint_path, state)
        if stop is not None and stop.requested and state["epoch"] < recipe_used.epochs:
            raise TeacherInterrupted(
                f"teacher training stopped by {stop.reason or 'a stop request'} after epoch {state['epoch']} of "
                f"{recipe_used.epochs}; checkpoint {checkpoint_path}; run the same command again to resume")

    def should_stop() -> bool:
        return stop is not None and stop.requested

    def on_stop(state: dict[str, Any]) -> None:
        """A stop in the middle of an epoch: its state (the step it reached, the epoch's order ...) is the
        checkpoint, and the same command continues from that step."""
        _save_training_checkpoint(checkpoint_path, {**state, "key": key,
                                                    "elapsed": elapsed_before + time.time() - start})
        raise TeacherInterrupted(
            f"teacher training stopped by {stop.reason or 'a stop request'} after step {state['step']} of epoch "
            f"{state['epoch'] + 1} of {recipe_used.epochs}; checkpoint {checkpoint_path}; run the same command "
            "again to resume")

    def check_stop_before_training() -> None:
        if stop is not None:
            if stop.requested:
                raise TeacherInterrupted(f"teacher training stopped by {stop.reason or 'a stop request'} before its "
                                         "first epoch (nothing to save); run the same command again to start it")
            stop.training = True
    if pipeline == "tensors":
        from dfkd_bench.teachers.tensor_cache import split_tensors

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

        if resume is not None:
            bar.n = int(resume["epoch"]) * max(1, len(splits["train"].labels) // recipe_used.batch_size)
        check_stop_before_training()
        resolved: dict[str, Any] = {}
        try:
            history = train_in_memory(model, (splits["train"].images, splits["train"].labels),
                                      (splits["test"].images, splits["test"].labels), recipe=recipe_used,
                                      lr_at=learning_rate, augmentation=augmentation_for(dataset), device=dev,
                                      seed=seed, progress=report, eval_epochs=_eval_epochs(recipe_used.epochs),
                                      start_state=resume, on_epoch_end=on_epoch_end, info=resolved,
                                      should_stop=should_stop, on_stop=on_stop)
        finally:
            bar.close()
        extra["resolved_perf"] = resolved
    else:
        history = _train_with_loader(model, dataset, data_root, size, download, recipe_used, dev, workers, seed,
                                     progress, arch, start_state=resume, on_epoch_end=on_epoch_end,
                                     before_training=check_stop_before_training, should_stop=should_stop,
                                     on_stop=on_stop)
    final = history[-1]
    meta = {
        "dataset": dataset, "arch": arch, "num_classes": info.num_classes, "channels": info.channels,
        "image_size": size, "mean": list(info.mean), "std": list(info.std),
        "test_accuracy": final["accuracy"], "test_cross_entropy": final["cross_entropy"],
        "train_seconds": elapsed_before + time.time() - start, "recipe": asdict(recipe_used), "seed": seed,
        "history": history, "resumed_from_epoch": int(resume["epoch"]) if resume else None,
        "torch": str(torch.__version__), "device": str(dev), "pipeline": pipeline, **extra,
    }
    path = cached_teacher_path(dataset, arch, cache_dir)
    import io

    buffer = io.BytesIO()
    state = {k: v.detach().cpu().contiguous() for k, v in model.model.state_dict().items()}
    torch.save({"state_dict": state, "meta": meta}, buffer)
    atomic_write_bytes(path, buffer.getvalue())
    checkpoint_path.unlink(missing_ok=True)
    return {"path": str(path), **meta}


class _EpochOrder(torch.utils.data.Sampler):
    """The order ``RandomSampler`` draws from ``generator`` (the same draws, so the same batches as
    ``shuffle=True``), kept for the epoch, so that a training stopped in the middle of an epoch continues
    with that epoch's remaining batches (:meth:`resume_at`)."""

    def __init__(self, data_source, generator: torch.Generator):
        self.inner = torch.utils.data.RandomSampler(data_source, generator=generator)
        self.order: torch.Tensor | None = None
        self._resume_from: int | None = None

    def resume_at(self, order: torch.Tensor, first: int) -> None:
        """The next epoch is the rest of ``order``, from index ``first`` on (no new draw)."""
        self.order, self._resume_from = order, first

    def __iter__(self):
        if self._resume_from is None:
            self.order = torch.tensor(list(self.inner), dtype=torch.int64)
            first = 0
        else:
            first, self._resume_from = self._resume_from, None
        return iter(self.order[first:].tolist())

    def __len__(self) -> int:
        return len(self.inner)


def _train_with_loader(model: nn.Module, dataset: str, data_root: str | None, size: int, download: bool,
                       recipe: TeacherRecipe, dev: torch.device, workers: int, seed: int, progress: bool,
                       arch: str, start_state: dict[str, Any] | None = None, on_epoch_end=None,
                       before_training=None, should_stop=None, on_stop=None) -> list[dict[str, Any]]:
    """The classic path: a DataLoader decodes and augments on the CPU (datasets too big for memory).

    Checkpointed per epoch like the in-memory path (plus the global random state, which the
    augmentation uses with ``workers=0``), and where a stop comes in the middle of an epoch (the
    epoch's order and the batch reached). # CHOSEN: with ``workers > 0`` the persistent worker
    processes keep their own random streams across epochs, which a resume starts afresh (seeded
    from the saved generator): the weights are then not bit-identical to an uninterrupted
    training, only trained by the same recipe on the same data order; with ``workers=0`` they are.
    """
    train_set = build_dataset(dataset, data_root, "train", train_augment=True, image_size=size, download=download)
    test_set = build_dataset(dataset, data_root, "test", image_size=size, download=download)
    generator = torch.Generator().manual_seed(seed)
    sampler = _EpochOrder(train_set, generator)
    train_loader = DataLoader(train_set, batch_size=recipe.batch_size, sampler=sampler, num_workers=workers,
                              drop_last=len(train_set) > recipe.batch_size, generator=generator,
                              persistent_workers=workers > 0, pin_memory=dev.type == "cuda")
    test_loader = DataLoader(test_set, batch_size=max(256, recipe.batch_size), num_workers=workers)
    optimizer = torch.optim.SGD(model.parameters(), lr=recipe.effective_lr, momentum=recipe.momentum,
                                weight_decay=recipe.weight_decay, nesterov=bool(recipe.nesterov and recipe.momentum))
    steps_per_epoch = len(train_loader)
    bar = tqdm(total=recipe.epochs * steps_per_epoch, desc=f"teacher {dataset}/{arch}", disable=not progress)
    history = []
    eval_epochs = _eval_epochs(recipe.epochs)
    first_epoch = first_step = 0
    if start_state is not None:
        model.load_state_dict(start_state["model"])
        optimizer.load_state_dict(start_state["optimizer"])
        generator.set_state(start_state["generator"])
        torch.set_rng_state(start_state["torch_rng"])
        history = [dict(entry) for entry in start_state["history"]]
        first_epoch = int(start_state["epoch"])
        first_step = int(start_state.get("step", 0))  # a stop in the middle of the next epoch
        if first_step:
            sampler.resume_at(start_state["order"], first_step * recipe.batch_size)
        bar.n = first_epoch * steps_per_epoch + first_step
    if before_training is not None:
        before_training()
    for epoch in range(first_epoch, recipe.epochs):
        model.train()
        batches = iter(train_loader)  # draws the workers' base seed from the generator
        if first_step:  # ... which the stopped run drew at the start of this epoch: its state as saved
            generator.set_state(start_state["generator"])
        for step, (images, labels) in enumerate(batches, start=first_step):
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
            if should_stop is not None and step + 1 < steps_per_epoch and should_stop() and on_stop is not None:
                on_stop({"epoch": epoch, "step": step + 1, "order": sampler.order, "model": model.state_dict(),
                         "optimizer": optimizer.state_dict(), "generator": generator.get_state(),
                         "torch_rng": torch.get_rng_state(), "history": [dict(entry) for entry in history]})
        first_step = 0
        if not math.isfinite(loss.item()):
            raise ConfigError(f"teacher training diverged at epoch {epoch + 1} (loss {loss.item()}); lower --lr")
        if epoch + 1 in eval_epochs:
            metrics = evaluate_classifier(model, test_loader, dev)
            history.append({"epoch": epoch + 1, **metrics})
            bar.set_postfix(epoch=epoch + 1, test_acc=f"{metrics['accuracy']:.2f}")
        if on_epoch_end is not None:
            on_epoch_end({"epoch": epoch + 1, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                          "generator": generator.get_state(), "torch_rng": torch.get_rng_state(),
                          "history": [dict(entry) for entry in history]})
    bar.close()
    return history
