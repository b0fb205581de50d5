"""The bookkeeping of CUDA-graph replay (dfkd_bench/graphs.py), with a stand-in for the graph."""

from __future__ import annotations

import torch

from dfkd_bench.graphs import StaticStep, _Captured


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
