"""Teacher training from memory: whole splits as tensors on the device, batched device-side augmentation.

The data-loader path decodes, augments and collates every image in Python on
the CPU for every epoch; for 32-pixel images that costs more than the network
on a GPU. Here (the default wherever a dataset fits in memory, on CPU as on
CUDA) both splits are loaded once as tensors (:mod:`dfkd_bench.teachers.tensor_cache`,
uint8 decoded JPEGs cached beside the teacher cache), moved to the device,
and each batch is augmented there, on the whole batch at once:

* CIFAR / Tiny-ImageNet: random crop with ``size // 8`` pixels of zero
  padding (4 at 32 px) and a horizontal flip with probability 1/2 -- the same
  distribution as torchvision's ``RandomCrop(size, padding)`` +
  ``RandomHorizontalFlip()`` of the loader path;
* digits: a random affine jitter (rotation +-10 degrees, translation +-10 %,
  scale 0.9-1.1, nearest-neighbour, zero fill), like the loader path's
  ``RandomAffine``; MNIST: none (as the loader path).

All randomness (shuffling and augmentation) comes from one
:class:`torch.Generator` on the device, seeded by ``--seed``. On CUDA the
model runs channels-last under bf16 autocast with a fused SGD; there are no
data-loader processes and no host synchronisation inside an epoch.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Datasets whose splits are small enough to hold as tensors (uint8 N x C x H x W): CIFAR-10's
# train split is 150 MB, Tiny-ImageNet's 1.2 GB. The ImageNet-like ones are read at full
# resolution and cropped at random: they stay on the data-loader path.
IN_MEMORY_DATASETS = ("digits", "mnist", "cifar10", "cifar100", "tinyimagenet")


def augmentation_for(dataset: str) -> str:
    """``crop_flip``, ``affine`` or ``none``: what the loader path's train transform does, batched."""
    if dataset in ("cifar10", "cifar100", "tinyimagenet"):
        return "crop_flip"
    if dataset == "digits":
        return "affine"
    return "none"


def random_crop_flip(images: Tensor, padding: int, generator: torch.Generator | None, flip: bool = True,
                     draw: Callable[..., Tensor] | None = None) -> Tensor:
    """Per image: zero-pad by ``padding``, crop the original size at a uniform offset in
    ``[0, 2 * padding]`` on each axis (rows, then columns), then mirror left-right with probability 1/2.
    ``draw(kind, shape, high)`` (a method's :meth:`~dfkd_bench.method_api.MethodContext.draw`), when given,
    replaces the draws from ``generator`` (the same calls in the same order).

    Works on any dtype (uint8 included) and returns a channels-last tensor of the input's shape.
    """
    n, _, h, w = images.shape
    device = images.device
    if draw is None:
        def draw(kind: str, shape: tuple[int, ...], high: int | None = None) -> Tensor:
            if kind == "rand":
                return torch.rand(shape, generator=generator, device=device)
            return torch.randint(0, high, shape, generator=generator, device=device)
    padded = F.pad(images, (padding, padding, padding, padding)) if padding else images
    oy = draw("randint", (n,), 2 * padding + 1)
    ox = draw("randint", (n,), 2 * padding + 1)
    rows = oy[:, None] + torch.arange(h, device=device)  # n x h
    cols = ox[:, None] + torch.arange(w, device=device)  # n x w
    if flip:
        mirrored = draw("rand", (n,)) < 0.5
        cols = torch.where(mirrored[:, None], cols.flip(1), cols)
    batch = torch.arange(n, device=device)[:, None, None]
    # advanced indices around a slice: the result is n x h x w x c, i.e. channels-last memory
    out = padded[batch, :, rows[:, :, None], cols[:, None, :]]
    return out.permute(0, 3, 1, 2)


def random_affine(images: Tensor, generator: torch.Generator, degrees: float = 10.0, translate: float = 0.1,
                  scale: tuple[float, float] = (0.9, 1.1)) -> Tensor:
    """Per image a random rotation, translation (fraction of the size) and scale, nearest-neighbour
    sampling, zero outside: the batched counterpart of ``T.RandomAffine(degrees, (t, t), scale)``."""
    n = images.shape[0]
    device = images.device

    def uniform(low: float, high: float) -> Tensor:
        return low + (high - low) * torch.rand(n, generator=generator, device=device)

    angle = uniform(-degrees, degrees) * math.pi / 180
    factor = uniform(*scale)
    tx, ty = uniform(-translate, translate) * 2, uniform(-translate, translate) * 2  # grid units: [-1, 1]
    cos, sin = torch.cos(angle) / factor, torch.sin(angle) / factor
    # output pixel p samples the input at A^-1 (p - t): inverse rotation and scale
    theta = torch.stack([torch.stack([cos, sin, -(cos * tx + sin * ty)], 1),
                         torch.stack([-sin, cos, sin * tx - cos * ty], 1)], 1)
    grid = F.affine_grid(theta.to(images.dtype), list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="nearest", padding_mode="zeros", align_corners=False)


def augment_batch(images: Tensor, kind: str, generator: torch.Generator) -> Tensor:
    """uint8 or float images -> augmented float images in [0, 1]."""
    if kind == "crop_flip":
        images = random_crop_flip(images, images.shape[-1] // 8, generator)
    x = images.float().div_(255) if images.dtype == torch.uint8 else images.float()
    if kind == "affine":
        x = random_affine(x, generator)
    return x


def as_float(images: Tensor) -> Tensor:
    return images.float().div_(255) if images.dtype == torch.uint8 else images.float()


@torch.no_grad()
def evaluate_tensors(model: nn.Module, images: Tensor, labels: Tensor, batch_size: int = 1024,
                     memory_format: torch.memory_format = torch.contiguous_format) -> dict[str, float]:
    """Top-1 accuracy (%) and mean cross-entropy over a split held as tensors, in float32."""
    was_training = model.training
    model.eval()
    correct = torch.zeros((), dtype=torch.int64, device=images.device)
    loss = torch.zeros((), dtype=torch.float64, device=images.device)
    for start in range(0, images.shape[0], batch_size):
        x = as_float(images[start:start + batch_size]).contiguous(memory_format=memory_format)
        y = labels[start:start + batch_size]
        logits = model(x).float()
        loss += F.cross_entropy(logits, y, reduction="sum").double()
        correct += (logits.argmax(1) == y).sum()
    model.train(was_training)
    total = int(images.shape[0])
    return {"accuracy": 100.0 * correct.item() / max(total, 1), "cross_entropy": loss.item() / max(total, 1),
            "samples": total}


def train_in_memory(model: nn.Module, train: tuple[Tensor, Tensor], test: tuple[Tensor, Tensor], *,
                    recipe: Any, lr_at: Callable[[Any, float], float], augmentation: str, device: torch.device,
                    seed: int, progress: Callable[[int, int, dict[str, Any]], None] | None = None,
                    eval_epochs: set[int] | None = None, start_state: dict[str, Any] | None = None,
                    on_epoch_end: Callable[[dict[str, Any]], None] | None = None,
                    info: dict[str, Any] | None = None, should_stop: Callable[[], bool] | None = None,
                    on_stop: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
    """Train ``model`` (already on ``device``) for ``recipe.epochs``; return the evaluation history.

    ``lr_at(recipe, epoch_float)`` is the learning rate; evaluations happen after the epochs in
    ``eval_epochs`` (1-based; the last epoch always). ``progress(step, total_steps, info)`` is
    called once per epoch. Raises ``FloatingPointError`` when the loss is not finite.

    ``on_epoch_end(state)`` gets, after each epoch, everything needed to continue exactly
    (``epoch`` done, ``model``, ``optimizer`` and ``generator`` states, ``history``); the
    same dict as ``start_state`` continues from there: on a CPU the weights are then
    bit-identical to an uninterrupted training. ``should_stop()`` is asked after every optimiser step;
    when it says so in the middle of an epoch, ``on_stop(state)`` gets the state there (``step`` of the
    epoch done, the epoch's ``order`` and running loss besides the above; it is expected to save it and
    raise), and that state as ``start_state`` continues from that step. ``info`` receives what was resolved
    (``fused_optimizer``, and ``fused_optimizer_fallback`` with the reason where it fell back).
    """
    from dfkd_bench.errors import ConfigError

    cuda = device.type == "cuda"
    memory_format = torch.channels_last if cuda else torch.contiguous_format
    model.to(memory_format=memory_format)
    train_x, train_y = train[0].to(device), train[1].to(device)
    test_x, test_y = test[0].to(device), test[1].to(device)
    n = train_x.shape[0]
    batch_size = min(recipe.batch_size, n)
    steps_per_epoch = n // batch_size if n > recipe.batch_size else 1  # drop_last, as the loader path
    generator = torch.Generator(device=device).manual_seed(seed)
    optimizer_kwargs = dict(lr=lr_at(recipe, 0.0), momentum=recipe.momentum, weight_decay=recipe.weight_decay,
                            nesterov=bool(recipe.nesterov and recipe.momentum > 0))
    optimizer = None
    info = info if info is not None else {}
    info["fused_optimizer"] = False
    if cuda:
        torch.backends.cudnn.benchmark = True  # fixed shapes (drop_last): autotune the convolutions once
        try:
            optimizer = torch.optim.SGD(model.parameters(), **optimizer_kwargs, fused=True)
            info["fused_optimizer"] = True
        except (RuntimeError, TypeError, ValueError) as error:  # a torch without the fused SGD
            optimizer = None
            info["fused_optimizer_fallback"] = (str(error).strip().splitlines() or [type(error).__name__])[0]
        # the loss sees float32 logits: the classifier computes outside bf16 autocast
        from dfkd_bench.method_api import float32_logits

        num_classes = int(train_y.max().item()) + 1 if train_y.numel() else 0
        info["float32_logits"] = bool(num_classes) and float32_logits(model, num_classes)
    if optimizer is None:
        optimizer = torch.optim.SGD(model.parameters(), **optimizer_kwargs)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)
    eval_epochs = set(eval_epochs or ()) | {recipe.epochs}
    history: list[dict[str, Any]] = []
    smoothing = float(getattr(recipe, "label_smoothing", 0.0) or 0.0)
    first_epoch = first_step = 0
    if start_state is not None:
        model.load_state_dict(start_state["model"])
        optimizer.load_state_dict(start_state["optimizer"])
        generator.set_state(start_state["generator"])
        history = [dict(entry) for entry in start_state["history"]]
        first_epoch = int(start_state["epoch"])
        first_step = int(start_state.get("step", 0))  # a stop in the middle of the next epoch
    for epoch in range(first_epoch, recipe.epochs):
        model.train()
        if first_step:  # that epoch's order and running loss, as the stop left them
            order, epoch_loss = start_state["order"].to(device), start_state["epoch_loss"].to(device)
        else:
            order = torch.randperm(n, generator=generator, device=device)
            epoch_loss = torch.zeros((), device=device)
        for step in range(first_step, steps_per_epoch):
            lr = lr_at(recipe, epoch + step / steps_per_epoch)
            for group in optimizer.param_groups:
                group["lr"] = lr
            index = order[step * batch_size:(step + 1) * batch_size]
            x = augment_batch(train_x[index], augmentation, generator).contiguous(memory_format=memory_format)
            y = train_y[index]
            with autocast:
                logits = model(x)
            loss = F.cross_entropy(logits.float(), y, label_smoothing=smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            epoch_loss += loss.detach()
            if should_stop is not None and step + 1 < steps_per_epoch and should_stop() and on_stop is not None:
                on_stop({"epoch": epoch, "step": step + 1, "order": order, "epoch_loss": epoch_loss,
                         "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                         "generator": generator.get_state(), "history": [dict(entry) for entry in history]})
        first_step = 0
        mean_loss = epoch_loss.item() / steps_per_epoch  # one host sync per epoch
        if not math.isfinite(mean_loss):
            raise ConfigError(f"teacher training diverged at epoch {epoch + 1} (loss {mean_loss}); lower --lr")
        status: dict[str, Any] = {"epoch": epoch + 1, "loss": mean_loss}
        if epoch + 1 in eval_epochs:
            metrics = evaluate_tensors(model, test_x, test_y, memory_format=memory_format)
            history.append({"epoch": epoch + 1, **metrics})
            status["test_acc"] = metrics["accuracy"]
        if progress is not None:
            progress((epoch + 1) * steps_per_epoch, recipe.epochs * steps_per_epoch, status)
        if on_epoch_end is not None:
            on_epoch_end({"epoch": epoch + 1, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                          "generator": generator.get_state(), "history": [dict(entry) for entry in history]})
    model.to(memory_format=torch.contiguous_format)
    return history

