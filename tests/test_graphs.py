"""The bookkeeping of CUDA-graph replay (dfkd_bench/train/graphs.py), with a stand-in for the graph."""

from __future__ import annotations

import torch

from dfkd_bench.train.graphs import StaticStep, _Captured


class FakeGraph:
    """Replays by running the captured function on the static inputs, like a real graph would."""

    def __init__(self, fn, captured_inputs, outputs):
        self.fn, self.inputs, self.outputs = fn, captured_inputs, outputs

    def replay(self):
        with torch.no_grad():
            self.outputs.copy_(self.inputs["x"] * 2)


def make_step(monkeypatch, counters, fail=False):
    runs = []

    def fn(batch):
        counters["images"] += batch["x"].shape[0]  # a Python-side count, as the engine's hooks make
        runs.append(batch["x"].shape[0])
        return batch["x"] * 2

    notes = []
    step = StaticStep(fn, lambda: None, torch.device("cpu"), warmup=1, note=notes.append, counters=counters)
    step.cuda = True  # take the GPU branch with the stand-in graph

    def capture(batch):
        if fail:
            raise RuntimeError("operation not permitted when stream is capturing\nmore")
        inputs = {k: v.clone() for k, v in batch.items()}
        outputs = fn(inputs)  # capture runs the Python once
        return _Captured(inputs, outputs, FakeGraph(fn, inputs, outputs))

    monkeypatch.setattr(step, "_capture", capture)
    return step, runs, notes


def test_replays_add_what_the_captured_call_counted_and_use_fresh_inputs(monkeypatch):
    counters = {"images": 0, "time/student": 0.0}
    step, runs, _ = make_step(monkeypatch, counters)
    outputs = [step({"x": torch.full((4,), float(i))}).clone() for i in range(5)]
    assert runs == [4, 4]  # one eager warm-up call, one capture; three replays ran no Python
    assert counters["images"] == 20  # but every step is counted
    assert [o[0].item() for o in outputs] == [0.0, 2.0, 4.0, 6.0, 8.0]
    step({"x": torch.ones(3)})  # a new shape is a new capture
    assert step.captures == 2 and runs[-1] == 3
    step.invalidate_if_changed((0.1,))  # e.g. a learning-rate milestone drops the captures
    step({"x": torch.ones(3)})
    assert step.captures == 3


def test_a_failed_capture_falls_back_to_eager_steps_with_one_note(monkeypatch):
    counters = {"images": 0}
    step, runs, notes = make_step(monkeypatch, counters, fail=True)
    for _ in range(4):
        out = step({"x": torch.ones(2)})
    assert torch.equal(out, torch.full((2,), 2.0))
    assert runs == [2, 2, 2, 2] and counters["images"] == 8
    assert len(notes) == 1 and "training on without graphs" in notes[0] and "\n" not in notes[0]


# ------------------------------------------ the real capture branch, with stand-in CUDA calls ---

class FakeStream:
    def __init__(self, name):
        self.name = name

    def wait_stream(self, other):
        pass


class FakeCudaGraph:
    """capture_begin/capture_end/replay like torch.cuda.CUDAGraph; capture_end fails after an error
    inside the capture with a generic message, as CUDA's invalidated capture does."""

    def __init__(self, api):
        self.api, self.capturing, self.poisoned, self.ran = api, False, False, None

    def capture_begin(self):
        assert self.api.stream.name == "side", "a capture must not run on the caller's stream"
        self.capturing = True
        self.api.pool_routed = True

    def capture_end(self):
        self.capturing = False
        if self.poisoned:
            raise RuntimeError("CUDA error: operation failed due to a previous error during capture")
        self.api.pool_routed = False

    def pool(self):
        return (0, 1)

    def replay(self):
        self.ran = True


class FakeApi:
    def __init__(self):
        self.stream = FakeStream("main")
        self.pool_routed = False
        self.graphs = []

    def new_graph(self):
        graph = FakeCudaGraph(self)
        self.graphs.append(graph)
        return graph

    def synchronize(self, device):
        pass

    def current_stream(self, device):
        return self.stream

    def set_stream(self, stream):
        self.stream = stream

    def end_allocate_to_pool(self, device, pool):
        self.pool_routed = False


def _real_branch_step(fail_inside: bool):
    counters = {"images": 0, "time/student": 0.0}
    calls = []
    api = FakeApi()

    def fn(batch):
        counters["images"] += batch["x"].shape[0]
        calls.append(api.stream.name)
        graph = api.graphs[-1] if api.graphs else None
        if fail_inside and graph is not None and graph.capturing:
            graph.poisoned = True
            raise RuntimeError("CUDA error: operation not permitted when stream is capturing (a .item() in the step)")
        return batch["x"] * 2

    notes = []
    step = StaticStep(fn, lambda: None, torch.device("cpu"), warmup=1, note=notes.append, counters=counters)
    step.cuda = True
    step._side_stream = FakeStream("side")
    step._api = api
    step._eager = lambda batch: fn(batch)  # the eager path's stream juggling is not under test here
    return step, api, counters, notes, calls


def test_a_capture_that_fails_inside_restores_the_stream_and_the_allocator_and_counts_images_once():
    step, api, counters, notes, calls = _real_branch_step(fail_inside=True)
    step({"x": torch.ones(2)})  # warm-up, eager
    out = step({"x": torch.ones(2)})  # capture fails -> this step runs eagerly
    assert torch.equal(out, torch.full((2,), 2.0))
    assert api.stream.name == "main"  # the capture stream is not left current
    assert not api.pool_routed  # the allocator no longer routes this stream into the graph's pool
    assert counters["images"] == 4  # two steps of 2 images: the failed capture's count is not kept
    assert len(notes) == 1 and "operation not permitted when stream is capturing" in notes[0]
    assert "previous error during capture" not in notes[0]  # the cause, not capture_end's message
    step({"x": torch.ones(2)})
    assert counters["images"] == 6 and step.failed and step.captures == 0


def test_a_successful_real_branch_capture_replays_on_the_callers_stream_and_counts_each_step():
    step, api, counters, notes, calls = _real_branch_step(fail_inside=False)
    for i in range(4):
        step({"x": torch.full((3,), float(i))})
    assert calls == ["main", "side"]  # warm-up eagerly, then the capture runs the Python once on the side stream
    assert api.stream.name == "main" and not api.pool_routed
    assert api.graphs[-1].ran and step.captures == 1 and not notes
    assert counters["images"] == 12
