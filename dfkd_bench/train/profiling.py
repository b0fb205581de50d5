"""Counting what a training step asks of PyTorch: ATen operations and host synchronisations.

Both work on the CPU, so the properties that matter on a GPU -- how many
kernels a step launches, whether the host ever waits for the device inside a
step -- are checked by the default test run and printed by ``dfkd-bench
bench`` on any machine.

* :class:`OpCounter` counts the ATen operations dispatched inside its block
  (each is at least one kernel launch on a GPU).
* :class:`HostSyncGuard` records (or refuses) every operation that makes the
  host wait for the device on a GPU: reading a value (``.item()``,
  ``float(t)``, ``bool(t)``, Python ``if t:`` -> ``aten._local_scalar_dense``),
  building a tensor from host data (``torch.tensor(1.0)`` -> ``aten.lift_fresh``,
  a pageable host-to-device copy), copies between the CPU and another device,
  operations whose output size depends on the data (``nonzero``,
  ``masked_select``, ``unique``, boolean-mask indexing), and the Python
  methods that leave the device (``.cpu()``, ``.tolist()``, ``.numpy()``),
  which on a CPU tensor dispatch nothing and are therefore caught by name.
  On a CUDA device it also turns on ``torch.cuda.set_sync_debug_mode("error")``.
"""

from __future__ import annotations

import collections
import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten


class HostSyncError(AssertionError):
    """A host-device synchronisation inside a region that must have none."""


def _packet(op: Any) -> Any:
    return getattr(op, "overloadpacket", op)


_READ_OPS = {aten._local_scalar_dense}
_HOST_DATA_OPS = {aten.lift_fresh, aten.lift_fresh_copy}
_DATA_DEPENDENT_OPS = {aten.nonzero, aten.masked_select, aten._unique2, aten.unique_dim, aten.unique_consecutive,
                       aten.nonzero_static if hasattr(aten, "nonzero_static") else aten.nonzero}
_COPY_OPS = {aten._to_copy, aten.copy_, aten.to}


def _devices(value: Any) -> set[str]:
    found: set[str] = set()
    if isinstance(value, torch.Tensor):
        found.add(value.device.type)
    elif isinstance(value, (list, tuple)):
        for item in value:
            found |= _devices(item)
    return found


class HostSyncGuard(TorchDispatchMode):
    """Inside the block, every host synchronisation is recorded in :attr:`syncs`
    (``raise_on_sync=True``: raises :class:`HostSyncError` at the first one)."""

    _PY_METHODS = ("cpu", "tolist", "numpy", "item")

    def __init__(self, raise_on_sync: bool = True):
        super().__init__()
        self.raise_on_sync = raise_on_sync
        self.syncs: list[str] = []
        self._patched: dict[str, Any] = {}
        self._cuda_mode: Any = None

    def _found(self, what: str) -> None:
        self.syncs.append(what)
        if self.raise_on_sync:
            raise HostSyncError(f"host-device synchronisation inside a step: {what}")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        packet = _packet(func)
        if packet in _READ_OPS:
            self._found(f"{func} (a tensor value read on the host: .item(), float(t), bool(t), if t: ...)")
        elif packet in _HOST_DATA_OPS:
            self._found(f"{func} (a tensor built from host data, e.g. torch.tensor(x): a host-to-device copy)")
        elif packet in _DATA_DEPENDENT_OPS:
            self._found(f"{func} (output size depends on the data: the host waits for it)")
        elif packet is aten.index and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool
                                          for i in (args[1] if len(args) > 1 else [])):
            self._found(f"{func} with a boolean mask (output size depends on the data)")
        elif packet in _COPY_OPS:
            devices = _devices(args) | {str(kwargs["device"]).split(":")[0]} if "device" in kwargs else _devices(args)
            if "cpu" in devices and len(devices) > 1:
                self._found(f"{func} between the CPU and {sorted(devices - {'cpu'})[0]}")
        return func(*args, **kwargs)

    def __enter__(self):
        guard = self
        for name in self._PY_METHODS:
            original = getattr(torch.Tensor, name)
            self._patched[name] = original

            def wrapper(tensor, *args, __name=name, __original=original, **kwargs):
                guard._found(f"Tensor.{__name}() (leaves the device)")
                return __original(tensor, *args, **kwargs)

            setattr(torch.Tensor, name, wrapper)
        if torch.cuda.is_available() and self.raise_on_sync:  # counting mode: count, do not fail
            self._cuda_mode = torch.cuda.get_sync_debug_mode()
            torch.cuda.set_sync_debug_mode("error")
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            for name, original in self._patched.items():
                setattr(torch.Tensor, name, original)
            self._patched = {}
            if self._cuda_mode is not None:
                torch.cuda.set_sync_debug_mode(self._cuda_mode)


class OpCounter(TorchDispatchMode):
    """Counts the ATen operations dispatched inside the block (profiler markers excluded)."""

    def __init__(self):
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(_packet(func))
        if not name.startswith("profiler."):
            self.counts[name] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.counts.values())


@contextlib.contextmanager
def no_host_sync() -> Iterator[HostSyncGuard]:
    """``with no_host_sync(): ...`` raises :class:`HostSyncError` at the first synchronisation."""
    with HostSyncGuard(raise_on_sync=True) as guard:
        yield guard
