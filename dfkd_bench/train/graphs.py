"""A training step replayed from a CUDA graph.

On a GPU, a student step of these small networks is bound by launching
kernels from Python, not by the GPU: hundreds of ATen operations of a few
microseconds each. A CUDA graph records the kernels of one whole step --
generator sampling, teacher and student forwards, backward and the fused
optimiser step -- once, and replays them with one launch per step.

A step can be captured because it is written as a pure device function of
its input tensors (``Method.student_loss_from(batch)``): everything that
changes from step to step on the host (which noise, which memory rows, the
step counter) is chosen before the step by ``Method.student_batch()`` and
copied into the graph's static input tensors. Parameters, BatchNorm buffers
and optimiser state are updated in place, so the graph always sees their
current values. What a capture bakes in and therefore starts a new capture
when it changes: the input shapes (a key per shape) and the learning rates.

On a CPU (``cuda_graphs=true``) the same bookkeeping runs -- static inputs,
the same function on them -- without a graph, so the tests check on any
machine that the static form of a step computes exactly what the eager step
computes. A capture that fails on a GPU is reported once and the run goes on
eagerly.

A failed capture is cleaned up in ``finally`` blocks, not by
``torch.cuda.graph``'s context manager, whose exit skips restoring the stream
when ``capture_end`` raises (as it does after any error inside the capture):
the caller's stream is made current again, the allocator stops routing this
stream's allocations to the graph's private pool and the pool is released, so
later captures in the same process (``bench`` builds nine trainers) start
clean. The note quotes the error raised inside the step (the cause), not
``capture_end``'s generic one, and host-side counters moved by the failed
capture are put back, so the eager step that replaces it counts its images
once. ``_CudaApi`` is the seam the CPU tests use to run this branch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor


@dataclass
class _Captured:
    inputs: dict[str, Tensor]
    outputs: Any
    graph: Any = None  # torch.cuda.CUDAGraph on a GPU, None for the CPU form
    counted: dict[str, float] | None = None  # what the captured call added to the counters


class _CudaApi:
    """The few CUDA calls a capture makes (a stand-in replaces them in the CPU tests)."""

    @staticmethod
    def new_graph():
        return torch.cuda.CUDAGraph()

    @staticmethod
    def synchronize(device: torch.device) -> None:
        torch.cuda.synchronize(device)

    @staticmethod
    def current_stream(device: torch.device):
        return torch.cuda.current_stream(device)

    @staticmethod
    def set_stream(stream) -> None:
        torch.cuda.set_stream(stream)

    @staticmethod
    def end_allocate_to_pool(device: torch.device, pool) -> None:
        """Stop routing allocations to ``pool`` (what capture_end does when it succeeds) and free it."""
        index = device.index if device.index is not None else torch.cuda.current_device()
        for name in ("_cuda_endAllocateToPool", "_cuda_releasePool"):
            fn = getattr(torch._C, name, None)
            if fn is not None:
                try:
                    fn(index, pool)
                except RuntimeError:  # already ended by capture_end, or unknown to this torch
                    pass


def _key(batch: dict[str, Tensor]) -> tuple:
    return tuple((name, tuple(t.shape), t.dtype) for name, t in sorted(batch.items()))


class StaticStep:
    """``step(batch)`` runs ``fn(batch)`` (which does forward, backward and the optimiser
    step and returns what the caller needs afterwards) from a captured graph.

    The first ``warmup`` calls run eagerly (they create optimiser state and let cuDNN
    choose its kernels); then each new input shape is captured once and replayed.
    """

    def __init__(self, fn: Callable[[dict[str, Tensor]], Any], zero_grad: Callable[[], None],
                 device: torch.device, warmup: int = 3, note: Callable[[str], None] = print,
                 counters: dict[str, float] | None = None):
        self.fn = fn
        self.zero_grad = zero_grad
        self.device = device
        self.cuda = device.type == "cuda"
        self.warmup = warmup
        self.note = note
        self.calls = 0
        self.captures = 0
        self.failed = False
        self._graphs: dict[tuple, _Captured] = {}
        self._baked: Any = None
        self._side_stream = torch.cuda.Stream(device) if self.cuda else None
        self._api = _CudaApi
        # Host-side counters that Python hooks inside ``fn`` move (e.g. images per step): a replay
        # runs no Python, so it adds what the captured call added.
        self.counters = counters if counters is not None else {}

    def invalidate_if_changed(self, baked: Any) -> None:
        """Drop the captures when a value they baked in (e.g. the learning rates) changed."""
        if baked != self._baked:
            self._graphs.clear()
            self._baked = baked

    def _eager(self, batch: dict[str, Tensor]) -> Any:
        self.zero_grad()
        if self._side_stream is not None:  # PyTorch's recipe: warm up on a side stream
            self._side_stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self._side_stream):
                out = self.fn(batch)
            torch.cuda.current_stream(self.device).wait_stream(self._side_stream)
            return out
        return self.fn(batch)

    def _capture(self, batch: dict[str, Tensor]) -> _Captured:
        inputs = {name: tensor.clone() for name, tensor in batch.items()}
        self.zero_grad()  # gradients are then allocated in the graph's pool, and overwritten by each replay
        if not self.cuda:
            return _Captured(inputs, self.fn(inputs))
        api = self._api
        graph = api.new_graph()
        api.synchronize(self.device)
        previous = api.current_stream(self.device)
        stream = self._side_stream
        stream.wait_stream(previous)
        api.set_stream(stream)  # captures must not run on the default stream
        try:
            graph.capture_begin()
            try:
                outputs = self.fn(inputs)
            except BaseException:
                # The cause is this error; capture_end's (an invalidated capture) would hide it.
                try:
                    graph.capture_end()
                except RuntimeError:
                    pass
                api.end_allocate_to_pool(self.device, graph.pool())
                raise
            try:
                graph.capture_end()
            except BaseException:
                api.end_allocate_to_pool(self.device, graph.pool())
                raise
        finally:
            api.set_stream(previous)
        previous.wait_stream(stream)
        graph.replay()  # capturing records kernels without running them: this runs the step
        return _Captured(inputs, outputs, graph)

    def __call__(self, batch: dict[str, Tensor]) -> Any:
        self.calls += 1
        if self.failed or self.calls <= self.warmup:
            return self._eager(batch)
        key = _key(batch)
        captured = self._graphs.get(key)
        if captured is None:
            before = dict(self.counters)
            try:
                captured = self._capture(batch)
                captured.counted = {k: v - before.get(k, 0) for k, v in self.counters.items()
                                    if v != before.get(k, 0) and not k.startswith("time/")}
            except RuntimeError as error:
                if not self.cuda:
                    raise
                # what the failed capture's Python hooks counted is not a step: the eager one counts it
                for name in list(self.counters):
                    if name.startswith("time/"):
                        continue
                    if name in before:
                        self.counters[name] = before[name]
                    else:
                        del self.counters[name]
                self.failed = True
                self.note(f"CUDA graph capture of the student step failed ({str(error).splitlines()[0]}); "
                          "training on without graphs (--set cuda_graphs=false silences this)")
                return self._eager(batch)
            self._graphs[key] = captured
            self.captures += 1
            return captured.outputs
        for name, tensor in batch.items():
            captured.inputs[name].copy_(tensor)
        if captured.graph is not None:
            captured.graph.replay()
            for name, added in (captured.counted or {}).items():
                self.counters[name] += added
        else:
            self.zero_grad()
            captured.outputs = self.fn(captured.inputs)
        return captured.outputs
