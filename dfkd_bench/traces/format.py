"""The trace file: what an official training loop did, step by step, in float64.

A trace is one ``torch.save`` file of plain containers and tensors, read back with
``torch.load(weights_only=True)`` (nothing in it can run code)::

    {"format": 2,
     "meta":    {...},                     # JSON-able: the official code, the suite's run, alignments
     "teacher": {name: Tensor},            # the teacher's state dict, in the suite's names
     "initial": STATE,                     # the full state before the first step (flat keys, below)
     "draws":   [{"kind": "randn" | "randint" | "rand" | "randperm", "value": Tensor}, ...],  # in order
     "steps":   [{"kind": "generator" | "student",
                  "losses": {term: float},  # in the suite's term names
                  "state":  STATE,          # what CHANGED in this step
                  "appended": {key: Tensor},  # (only when some) rows added to a tensor that grew
                  "removed": [key, ...]}, ...],  # (only when some) keys no longer in the state
     "keys": [...], "shapes": [...]}       # every state key once, with its tensor's shape

where a STATE ``{key: Tensor | number}`` is stored packed: its float64 tensors as one vector
(``values``) with their positions in ``keys`` (``index``), anything else as it is (``other``).

States are flat dictionaries in the suite's names (:func:`flatten`): ``student/<key of the
student network's state dict>``, ``student_optimizer/state/<i>/<name>`` and
``student_optimizer/param_groups/<g>/<setting>`` (the optimiser's state dict; its
implementation flags -- fused, foreach, ... -- are left out), and ``method/<...>`` for the
method's :meth:`~dfkd_bench.method_api.Method.state_dict` (e.g. ``method/generator/...`` and
``method/generator_optimizer/...``). A step stores only the entries whose value changed (bit for
bit) in that step, so a trace stays small while every parameter, buffer and optimiser state is
known after every step (:meth:`Trace.states`). An entry a state no longer has (a pool method's batch in
progress, between two batches) is listed in the step's ``removed`` (older traces hold a value ``None``
for it, which a replay reads as no entry). A tensor that grew by rows keeping its earlier rows (a
pool: the images of a finished batch appended) is stored as its new rows (``appended``; format 2 --
format 1 files, which have none, read as they are).

``meta`` (written by the tracer) holds at least: ``method``; ``official`` (``repo``, ``commit``,
``entry``: the file and function run); ``command`` (the one command that regenerates the file);
``config`` (the suite's run: ``dataset``, ``seed``, ``image_size``, ``channels``, ``num_classes``,
``teacher_arch``/``mean``/``std``, ``student_arch``/``mean``/``std``, ``train``, ``params``);
``architectures`` (the trace-sized networks, :mod:`dfkd_bench.traces.replay`); ``schedule`` (the
engine calls that replay the official order of updates); ``load`` (key prefixes of ``initial``
that are weights to load into the suite); ``uncompared`` (key prefix -> why the suite's entry has
no official counterpart); ``ahead`` (optional, key prefix -> why the suite may hold entries there that
the official state has not yet, e.g. a pool method's next batch, which the suite starts when one is
finished and the official code at its next synthesis; compared from the official loop's next step on);
``alignments`` (each documented difference the tracer aligned, and how);
``patches`` (where the official code was patched at run time, and why).
"""

from __future__ import annotations

import hashlib
import io
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from dfkd_bench.errors import DfkdError

FORMAT = 2
READABLE_FORMATS = (1, 2)
"""Format 2 adds a step's ``appended`` rows; a format-1 file is a format-2 file without them."""
MAX_BYTES = 1_000_000
"""A committed trace must stay well under 1 MB (the tracer refuses to write a larger one)."""

RTOL = 1e-7
"""Every step of a replay must agree with the official values within this relative difference."""

DRAW_KINDS = ("randn", "randint", "rand", "randperm")
"""What a recorded draw is: standard normal, integers below a bound, uniform in [0, 1), a permutation (torch's
function of that name; its value as drawn)."""

IMPLEMENTATION_KEYS = frozenset({"params", "foreach", "fused", "capturable", "differentiable"})
"""Optimiser param-group entries that choose a kernel, not the mathematics: never compared."""


class TraceError(DfkdError):
    """A trace file that cannot be read, or does not hold what a trace holds."""


class TraceMismatch(DfkdError):
    """The suite did something the official loop did not (another draw, another kind of step, a
    state the trace does not know): the replay stops there and says so."""


# ------------------------------------------------------------------ states ---

def _leaf(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.detach().clone()
    return value


def flatten(prefix: str, value: Any, out: dict[str, Any] | None = None) -> dict[str, Any]:
    """``value`` (nested dicts, lists, tensors, numbers) as ``{"prefix/a/b": leaf}``. An optimiser
    state dict (keys ``state`` and ``param_groups``) keeps its per-parameter state and the
    mathematical settings of its groups, not its implementation flags. ``None`` (a value not there yet:
    a pool method's batch before its first step, a moving average before its first update) adds no
    entry, so that the entries it later becomes are new entries, not a changed one."""
    out = {} if out is None else out
    if value is None:
        return out
    if isinstance(value, dict) and set(value) == {"state", "param_groups"}:
        for index, state in value["state"].items():
            flatten(f"{prefix}/state/{index}", state, out)
        for number, group in enumerate(value["param_groups"]):
            for name, setting in group.items():
                if name not in IMPLEMENTATION_KEYS:
                    flatten(f"{prefix}/param_groups/{number}/{name}", setting, out)
    elif isinstance(value, dict):
        for name, item in value.items():
            flatten(f"{prefix}/{name}", item, out)
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            flatten(f"{prefix}/{index}", item, out)
    else:
        out[prefix] = _leaf(value)
    return out


def optimizer_state_in_order(optimizer: torch.optim.Optimizer, params: list[Tensor]) -> dict[str, Any]:
    """``optimizer``'s state dict with its per-parameter state keyed by position in ``params`` -- an
    official optimiser's parameters listed in the order of the suite's optimiser, so that both read
    ``state/<i>`` for the same weight. Its groups are kept as they are (both have one)."""
    full = optimizer.state_dict()
    position = {id(p): i for i, p in enumerate(params)}
    ordered = [p for group in optimizer.param_groups for p in group["params"]]
    state = {}
    for index, entry in full["state"].items():
        state[position[id(ordered[index])]] = entry
    return {"state": dict(sorted(state.items())), "param_groups": full["param_groups"]}


def relative_difference(suite: Any, official: Any, scale: float | None = None) -> float:
    """``max |suite - official| / max |official|`` over a tensor (a number: ``|a - b| / |b|``); 0 when
    equal, infinite when the shapes, the kinds or a non-numeric value differ, or when ``official``
    is all zero and ``suite`` is not. ``scale`` replaces ``max |official|`` when larger (see
    :func:`comparison_scales`)."""
    if isinstance(official, (str, type(None))) or isinstance(suite, (str, type(None))):
        return 0.0 if suite == official else math.inf
    try:
        a = torch.as_tensor(suite).detach().to(torch.float64).flatten()
        b = torch.as_tensor(official).detach().to(torch.float64).flatten()
    except (TypeError, ValueError, RuntimeError):
        return math.inf
    if a.shape != b.shape:
        return math.inf
    if a.numel() == 0:
        return 0.0
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        return 0.0 if torch.equal(a, b) else math.inf
    difference = float((a - b).abs().max())
    if difference == 0.0:
        return 0.0
    denominator = max(float(b.abs().max()), scale or 0.0)
    return difference / denominator if denominator > 0 else math.inf


_STATE_INDEX = re.compile(r"/state/\d+/")


def comparison_scales(official: dict[str, Any]) -> dict[str, float]:
    """The scale each optimiser-state entry is compared on: the largest magnitude of that entry (e.g.
    ``exp_avg``) over all parameters of its optimiser. A parameter whose gradient is zero in exact
    arithmetic -- the bias of a convolution followed by a train-mode BatchNorm, which the
    normalisation cancels -- has moment estimates made of rounding noise (~1e-17 in float64), and
    two correct orders of summation give different noise: relative to itself that differs by O(1),
    relative to the optimiser's moments it is ~1e-14. Parameters, buffers and losses are compared
    on their own magnitude."""
    groups: dict[str, float] = {}
    members: dict[str, str] = {}
    for key, value in official.items():
        if not _STATE_INDEX.search(key) or not isinstance(value, Tensor) or not value.is_floating_point():
            continue
        group = _STATE_INDEX.sub("/state/*/", key)
        members[key] = group
        magnitude = float(value.detach().abs().max()) if value.numel() else 0.0
        groups[group] = max(groups.get(group, 0.0), magnitude)
    return {key: groups[group] for key, group in members.items()}


def _grown(old: Any, new: Any) -> bool:
    """Whether ``new`` is ``old`` with rows appended (same dtype and row shape, ``old`` its first rows)."""
    return (isinstance(old, Tensor) and isinstance(new, Tensor) and old.dtype == new.dtype and old.dim() >= 1
            and new.shape[1:] == old.shape[1:] and new.shape[0] > old.shape[0]
            and bool(torch.equal(new[:old.shape[0]], old)))


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return (isinstance(a, Tensor) and isinstance(b, Tensor) and a.dtype == b.dtype and a.shape == b.shape
                and bool(torch.equal(a, b)))
    return type(a) is type(b) and a == b


# ------------------------------------------------------------------- trace ---

@dataclass
class Trace:
    meta: dict[str, Any]
    teacher: dict[str, Tensor]
    initial: dict[str, Any]
    draws: list[dict[str, Any]] = field(default_factory=list)
    steps: list[dict[str, Any]] = field(default_factory=list)

    # ---- writing (the tracers) ----
    def draw(self, kind: str, value: Tensor) -> Tensor:
        """Record a draw the official loop consumes (``kind``: one of :data:`DRAW_KINDS`); returns it."""
        if kind not in DRAW_KINDS:
            raise ValueError(f"a draw is one of {', '.join(DRAW_KINDS)}, not {kind!r}")
        self.draws.append({"kind": kind, "value": value.detach().clone()})
        return value

    def step(self, kind: str, losses: dict[str, float], state: dict[str, Any]) -> None:
        """Record one optimisation step: its losses and the FULL state after it (stored as a change: the
        entries that changed -- of a tensor that grew by rows, the new rows --, and the keys no longer there,
        e.g. a fresh optimiser's empty state)."""
        if kind not in ("generator", "student"):
            raise ValueError(f"a step is a generator or a student step, not {kind!r}")
        previous = self.final_state()
        removed = sorted(set(previous) - set(state))
        changed, appended = {}, {}
        for key, value in state.items():
            if key in previous and _same(value, previous[key]):
                continue
            if key in previous and _grown(previous[key], value):
                appended[key] = value[previous[key].shape[0]:].detach().clone()
            else:
                changed[key] = _leaf(value)
        entry = {"kind": kind, "losses": {k: float(v) for k, v in losses.items()}, "state": changed}
        if appended:
            entry["appended"] = appended
        if removed:
            entry["removed"] = removed
        self.steps.append(entry)
        self._final = _apply(previous, entry)

    def final_state(self) -> dict[str, Any]:
        final = getattr(self, "_final", None)
        if final is None:
            final = dict(self.initial)
            for step in self.steps:
                final = _apply(final, step)
            self._final = final
        return final

    # ---- reading (the replay) ----
    def states(self):
        """The full official state after each step: ``(step index from 1, step, state)``."""
        state = dict(self.initial)
        for index, step in enumerate(self.steps, start=1):
            state = _apply(state, step)
            yield index, step, dict(state)

    def to_dict(self) -> dict[str, Any]:
        """The file's content: float64 tensors of a state packed into one vector per state, their keys and
        shapes listed once (a trace of many small tensors would be mostly zip headers otherwise)."""
        keys = sorted({key for state in [self.initial, *(step["state"] for step in self.steps)] for key in state})
        shapes = {}
        for state in [self.initial, *(step["state"] for step in self.steps)]:
            for key, value in state.items():
                if isinstance(value, Tensor):
                    shapes.setdefault(key, list(value.shape))
        position = {key: i for i, key in enumerate(keys)}
        return {"format": FORMAT, "meta": self.meta, "teacher": self.teacher, "keys": keys,
                "shapes": [shapes.get(key, []) for key in keys],
                "initial": _pack(self.initial, position, shapes), "draws": self.draws,
                "steps": [{"kind": step["kind"], "losses": step["losses"],
                           "state": _pack(step["state"], position, shapes),
                           **({"appended": step["appended"]} if step.get("appended") else {}),
                           **({"removed": step["removed"]} if step.get("removed") else {})}
                          for step in self.steps]}

    def to_bytes(self) -> bytes:
        buffer = io.BytesIO()
        torch.save(self.to_dict(), buffer)
        return buffer.getvalue()

    def save(self, path: str | Path) -> str:
        """Write the file (refusing one of ``MAX_BYTES`` or more); returns its sha256."""
        data = self.to_bytes()
        if len(data) >= MAX_BYTES:
            raise TraceError(f"the trace would take {len(data):,} bytes, over the {MAX_BYTES:,} a committed trace "
                             f"may; use smaller networks, batches or fewer steps")
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_bytes(data)
        return hashlib.sha256(data).hexdigest()


def _apply(state: dict[str, Any], step: dict[str, Any]) -> dict[str, Any]:
    """``state`` after ``step``: its changed entries set, its appended rows added, its removed keys gone."""
    removed = set(step.get("removed", ()))
    grown = {key: torch.cat([state[key], rows]) for key, rows in step.get("appended", {}).items()}
    return {**{k: v for k, v in state.items() if k not in removed}, **step["state"], **grown}


def _pack(state: dict[str, Any], position: dict[str, int], shapes: dict[str, list[int]]) -> dict[str, Any]:
    """Float64 tensors of their key's first shape packed; the rest (other dtypes, None -- state the official loop
    holds only part of the time --, a tensor that grew: a pool method's feature memory) as they are."""
    def packable(key: str, value: Any) -> bool:
        return isinstance(value, Tensor) and value.dtype == torch.float64 and list(value.shape) == shapes[key]

    packed = [(position[k], v) for k, v in sorted(state.items()) if packable(k, v)]
    other = {k: v for k, v in state.items() if not packable(k, v)}
    values = torch.cat([v.reshape(-1) for _, v in packed]) if packed else torch.zeros(0, dtype=torch.float64)
    return {"index": torch.tensor([i for i, _ in packed], dtype=torch.int64), "values": values, "other": other}


def _unpack(packed: dict[str, Any], keys: list[str], shapes: list[list[int]]) -> dict[str, Any]:
    state = dict(packed["other"])
    offset = 0
    for index in packed["index"].tolist():
        shape = shapes[index]
        count = math.prod(shape)
        state[keys[index]] = packed["values"][offset:offset + count].reshape(shape).clone()
        offset += count
    if offset != packed["values"].numel():
        raise TraceError("a packed state does not match its keys and shapes")
    return state


def load_trace(path: str | Path) -> Trace:
    """A trace file, read with ``weights_only=True``; a file that is not one raises :class:`TraceError`."""
    path = Path(path)
    if not path.is_file():
        raise TraceError(f"trace {path} does not exist; regenerate it with the command in its .json")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a file torch cannot read, or one that would need code to load
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise TraceError(f"{path} is not a readable trace ({first[:200]})") from None
    if not isinstance(data, dict) or data.get("format") not in READABLE_FORMATS:
        raise TraceError(f"{path} is not a trace of format {' or '.join(map(str, READABLE_FORMATS))}")
    missing = {"meta", "teacher", "keys", "shapes", "initial", "draws", "steps"} - set(data)
    if missing:
        raise TraceError(f"{path} lacks {sorted(missing)}")
    try:
        keys, shapes = data["keys"], data["shapes"]
        steps = [{"kind": step["kind"], "losses": step["losses"], "state": _unpack(step["state"], keys, shapes),
                  **({"appended": dict(step["appended"])} if step.get("appended") else {}),
                  **({"removed": list(step["removed"])} if step.get("removed") else {})}
                 for step in data["steps"]]
        return Trace(data["meta"], data["teacher"], _unpack(data["initial"], keys, shapes), list(data["draws"]), steps)
    except (KeyError, IndexError, TypeError, RuntimeError) as error:
        raise TraceError(f"{path} is not a well-formed trace ({error})") from None


def file_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
