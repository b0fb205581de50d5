"""BatchNorm helpers: batch statistics per group, across ranks, and for Eq. 9.

Why this exists. A student in training mode normalises with *batch*
statistics, so "one forward per source" (G, EMA G, memory) and "one forward
over the concatenation" are different functions: the concatenated batch mixes
the statistics of the sources. The straightforward implementation -- and the
semantics dfkd-bench defines for every method -- is one forward per source.
:class:`GroupedBatchNorm` lets the fast path run ONE forward over the
concatenated batch while normalising each source's rows with that source's
own statistics and updating the running buffers exactly as the sequence of
per-source forwards would: one native batch-norm call (cuDNN on a GPU) per
source, on a view of its rows, so convolutions and everything else run once
over the whole batch. Performance switches therefore never change the
mathematics, and ``tests/test_fast_path.py`` checks it.

The same layer synchronises statistics across data-parallel ranks (with a
differentiable all-reduce that also works on CPU with the gloo backend), so a
run on 2 processes normalises over the same global batch as one process.
PyTorch's own ``SyncBatchNorm`` refuses CPU tensors, which would make the
distributed path untestable without GPUs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _all_reduce_sum(tensor: Tensor, group) -> Tensor:
    import torch.distributed.nn.functional as dist_fn

    return dist_fn.all_reduce(tensor, group=group)


_SYNC_SUSPENDED = False


@contextlib.contextmanager
def no_batchnorm_sync() -> Iterator[None]:
    """Inside the block, synchronised BatchNorm layers use local statistics.

    For measurements that only rank 0 makes (drift, sample grids): a
    collective call there would wait forever for the other ranks.
    """
    global _SYNC_SUSPENDED
    previous, _SYNC_SUSPENDED = _SYNC_SUSPENDED, True
    try:
        yield
    finally:
        _SYNC_SUSPENDED = previous


class _GroupedBatchNormMixin:
    """Forward that normalises groups of rows separately and/or across ranks."""

    # Set by :func:`batchnorm_groups` / :func:`synchronise_batchnorm`.
    _group_sizes: tuple[int, ...] | None = None
    _process_group = None
    _sync = False

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        sync = self._sync and not _SYNC_SUSPENDED
        if not self.training or (self._group_sizes is None and not sync):
            return super().forward(x)  # type: ignore[misc]
        self._check_input_dim(x)  # type: ignore[attr-defined]
        sizes = self._group_sizes or (x.shape[0],)
        if sum(sizes) != x.shape[0]:
            raise ValueError(f"BatchNorm groups {sizes} do not add up to the batch of {x.shape[0]}")
        if not sync:
            return self._native_groups(x, sizes)
        dims = [0] + list(range(2, x.dim()))
        shape = [1, -1] + [1] * (x.dim() - 2)
        outputs = []
        for part in torch.split(x, list(sizes), dim=0):
            outputs.append(self._normalise_group(part, dims, shape))
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=0)

    def _native_groups(self, x: Tensor, sizes: Sequence[int]) -> Tensor:
        """One native (cuDNN / ATen) batch-norm call per group: exactly the calls that one
        forward per source would make, on the same rows, in the same order, so running
        buffers move as they would. No host synchronisation (unless momentum is None,
        where PyTorch's own BatchNorm also reads the batch counter on the host)."""
        track = self.training and self.track_running_stats  # type: ignore[attr-defined]
        outputs = []
        for part in torch.split(x, list(sizes), dim=0):
            momentum = self.momentum  # type: ignore[attr-defined]
            if track:
                self.num_batches_tracked.add_(1)  # type: ignore[attr-defined]
                if momentum is None:
                    momentum = 1.0 / float(self.num_batches_tracked)  # type: ignore[attr-defined]
            outputs.append(F.batch_norm(
                part, self.running_mean, self.running_var, self.weight, self.bias,  # type: ignore[attr-defined]
                True, momentum if momentum is not None else 0.0, self.eps))  # type: ignore[attr-defined]
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=0)

    def _normalise_group(self, part: Tensor, dims: list[int], shape: list[int]) -> Tensor:
        out_dtype = part.dtype
        part = part.float()  # statistics in float32, as native BatchNorm does under autocast
        # A fill on the device, not a host tensor copied over (no host-device synchronisation).
        count = torch.full((), float(part.numel() // part.shape[1]), device=part.device)
        sync = self._sync and not _SYNC_SUSPENDED
        total = part.sum(dim=dims)
        if sync:
            total = _all_reduce_sum(total, self._process_group)
            count = _all_reduce_sum(count, self._process_group)
        mean = total / count
        centred = part - mean.reshape(shape)
        squares = centred.pow(2).sum(dim=dims)
        if sync:
            squares = _all_reduce_sum(squares, self._process_group)
        var = squares / count  # biased: what BatchNorm normalises with
        if self.track_running_stats:  # type: ignore[attr-defined]
            self._update_running_stats(mean.detach(), (squares / (count - 1).clamp(min=1)).detach())
        out = centred * torch.rsqrt(var + self.eps).reshape(shape)  # type: ignore[attr-defined]
        if self.affine:  # type: ignore[attr-defined]
            out = out * self.weight.reshape(shape) + self.bias.reshape(shape)  # type: ignore[attr-defined]
        return out.to(out_dtype)

    @torch.no_grad()
    def _update_running_stats(self, mean: Tensor, unbiased_var: Tensor) -> None:
        # Mirrors torch.nn.modules.batchnorm._BatchNorm.forward for one batch.
        self.num_batches_tracked.add_(1)  # type: ignore[attr-defined]
        if self.momentum is None:  # type: ignore[attr-defined]
            factor = 1.0 / float(self.num_batches_tracked)  # type: ignore[attr-defined]
        else:
            factor = self.momentum  # type: ignore[attr-defined]
        self.running_mean.mul_(1 - factor).add_(mean.to(self.running_mean.dtype), alpha=factor)  # type: ignore[attr-defined]
        self.running_var.mul_(1 - factor).add_(unbiased_var.to(self.running_var.dtype), alpha=factor)  # type: ignore[attr-defined]


class GroupedBatchNorm1d(_GroupedBatchNormMixin, nn.BatchNorm1d):
    pass


class GroupedBatchNorm2d(_GroupedBatchNormMixin, nn.BatchNorm2d):
    pass


class GroupedBatchNorm3d(_GroupedBatchNormMixin, nn.BatchNorm3d):
    pass


_GROUPED = {
    nn.BatchNorm1d: GroupedBatchNorm1d,
    nn.BatchNorm2d: GroupedBatchNorm2d,
    nn.BatchNorm3d: GroupedBatchNorm3d,
}


def make_groupable(model: nn.Module) -> bool:
    """Switch the plain BatchNorm layers of ``model`` to the grouped variant, in place.

    Only the class of each instance changes (parameters, buffers and
    ``state_dict`` keys stay the same), and outside :func:`batchnorm_groups`
    the layers behave exactly like ``nn.BatchNorm*``. Returns False when the
    model holds another BatchNorm subclass (e.g. a timm fused BN+act layer)
    that cannot be grouped; the caller then falls back to one forward per
    source.
    """
    groupable = True
    for module in model.modules():
        if type(module) in _GROUPED:
            module.__class__ = _GROUPED[type(module)]
        elif isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, _GroupedBatchNormMixin):
            groupable = False
    return groupable


def _grouped_layers(model: nn.Module) -> list[_GroupedBatchNormMixin]:
    return [m for m in model.modules() if isinstance(m, _GroupedBatchNormMixin)]


@contextlib.contextmanager
def batchnorm_groups(model: nn.Module, sizes: Sequence[int]) -> Iterator[None]:
    """Within the block, BatchNorm layers of ``model`` normalise each group separately."""
    layers = _grouped_layers(model)
    for layer in layers:
        layer._group_sizes = tuple(int(s) for s in sizes)
    try:
        yield
    finally:
        for layer in layers:
            layer._group_sizes = None


def synchronise_batchnorm(model: nn.Module, process_group=None) -> None:
    """Make every (grouped) BatchNorm layer of ``model`` use cross-rank statistics."""
    make_groupable(model)
    for layer in _grouped_layers(model):
        layer._sync = True
        layer._process_group = process_group


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


@contextlib.contextmanager
def frozen_batchnorm_buffers(model: nn.Module) -> Iterator[None]:
    """Forward passes inside the block leave every BatchNorm buffer untouched.

    Used when sampling for measurements (drift, sample grids), so that what we
    measure never changes what we train.
    """
    saved = [(m, m.running_mean.clone() if m.running_mean is not None else None,
              m.running_var.clone() if m.running_var is not None else None,
              m.num_batches_tracked.clone() if m.num_batches_tracked is not None else None)
             for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    try:
        yield
    finally:
        with torch.no_grad():
            for module, mean, var, count in saved:
                if mean is not None:
                    module.running_mean.copy_(mean)
                    module.running_var.copy_(var)
                if count is not None:
                    module.num_batches_tracked.copy_(count)


class BatchNormStatistics:
    """Records the batch mean and (biased) variance at the input of every BatchNorm layer.

    Registered on the frozen teacher for the BNmm loss of Eq. 9. Recording is
    off unless inside :meth:`recording`, so the hooks cost nothing during the
    student stage.
    """

    def __init__(self, model: nn.Module, synchronise: bool = False, process_group=None):
        self.synchronise = synchronise  # data parallel: statistics of the global batch
        self.process_group = process_group
        self.layers = [
            m for m in model.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None
        ]
        self.means: list[Tensor] = []
        self.vars: list[Tensor] = []
        self._active = False
        self._handles = [layer.register_forward_pre_hook(self._hook) for layer in self.layers]

    def _hook(self, module: nn.Module, inputs: tuple[Tensor, ...]) -> None:
        if not self._active:
            return
        x = inputs[0].float()
        dims = [0] + list(range(2, x.dim()))
        if not self.synchronise:
            # One reduction, not two; keepdim + flatten: its backward is one view, not three unsqueezes.
            var, mean = torch.var_mean(x, dim=dims, unbiased=False, keepdim=True)
            self.means.append(mean.flatten())
            self.vars.append(var.flatten())
            return
        count = _all_reduce_sum(torch.full((), float(x.numel() // x.shape[1]), device=x.device), self.process_group)
        mean = _all_reduce_sum(x.sum(dim=dims), self.process_group) / count
        shape = [1, -1] + [1] * (x.dim() - 2)
        squares = _all_reduce_sum((x - mean.reshape(shape)).pow(2).sum(dim=dims), self.process_group)
        self.means.append(mean)
        self.vars.append(squares / count)

    @contextlib.contextmanager
    def recording(self) -> Iterator["BatchNormStatistics"]:
        self.means, self.vars = [], []
        self._active = True
        try:
            yield self
        finally:
            self._active = False

    @property
    def running_means(self) -> list[Tensor]:
        return [layer.running_mean for layer in self.layers]

    @property
    def running_vars(self) -> list[Tensor]:
        return [layer.running_var for layer in self.layers]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()

