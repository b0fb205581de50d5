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
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outputs = self.fn(inputs)
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
