"""Replay a trace through the suite's OWN engine and method, in float64, and compare every step.

:func:`replay` builds the run the trace's ``meta["config"]`` describes with the engine's
:class:`~dfkd_bench.train.engine.Trainer` (``build()``: the method by name, its generator and
optimiser, the student's optimiser, the perf switches), loads the trace's initial weights, hands
the method the official loop's random draws (:attr:`MethodContext.draws
<dfkd_bench.method_api.MethodContext.draws>`), runs the engine's own stages in the order the
trace's ``schedule`` names, and after every optimisation step compares the loss terms the engine
accumulated and the full state (:func:`suite_state`) with the official values. Nothing of the
training step is re-implemented here; what this module adds around the engine:

* **float64** (:func:`float64_mode`): torch's default dtype is float64 while the run is built and
  replayed, and ``Tensor.float()`` -- which the suite uses to lift bf16 autocast outputs to full
  precision before a loss -- keeps a float64 tensor in float64 (it still makes float32 of any
  other dtype). In float32 a step differs from the official one by rounding that Adam's
  per-element normalisation and ReLU/LeakyReLU kinks amplify, so only float64 can show equality.
* **trace-sized networks** (:func:`architectures`): ``meta["architectures"]`` names each network by
  a family and its widths (``lenet``: :class:`~dfkd_bench.models.lenet.LeNet5` with ``width``;
  ``paper_generator``: :class:`~dfkd_bench.models.generators.PaperGenerator` of ``kind`` with
  ``ngf``; ``datafree_generator``: :class:`~dfkd_bench.models.generators.DataFreeGenerator` with ``ngf``
  and ``large``; ``wrn``: :class:`~dfkd_bench.models.wrn.WideResNet` of ``depth``, ``widen_factor`` and
  ``base_widths``); they are registered for the build only (:func:`~dfkd_bench.models.registry.scoped_registrations`).
  A new family is one entry of :data:`FAMILIES`.
* **the draws**: the method's ``MethodContext.randn`` / ``randint`` through its ``draws`` hook, and
  any other torch draw from the method's stream through :func:`method_stream`, both from the trace's
  list in order (:class:`DrawFeed`: each checked for kind and shape).
* **the schedule**: ``iteration`` (the engine's iteration: the student's learning rate of the
  iteration, ``run_iteration()``), ``student_stage`` (``end_generator_stage()`` then the engine's
  student stage: a student stage that the official loop runs before its first generator step) and
  ``generator_steps`` (the engine's generator stage without ``end_generator_stage()``: an official
  last generator step that no student stage follows).
"""

from __future__ import annotations

import contextlib
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

from dfkd_bench.config import RunConfig, TeacherSpec, TrainConfig, resolve_method_params
from dfkd_bench.models.generators import DataFreeGenerator, paper_generator
from dfkd_bench.models.lenet import LeNet5
from dfkd_bench.models.wrn import WideResNet
from dfkd_bench.models.registry import register_generator, register_model, scoped_registrations
from dfkd_bench.traces.format import (RTOL, Trace, TraceMismatch, comparison_scales, flatten,
                                      relative_difference)
from dfkd_bench.train.engine import Trainer

# ------------------------------------------------------------ networks ---

FAMILIES: dict[str, Callable[[dict[str, Any]], Callable[..., torch.nn.Module]]] = {
    "lenet": lambda spec: (lambda num_classes, in_channels, image_size: LeNet5(
        num_classes, in_channels, image_size, width=tuple(spec["width"]), batchnorm=spec.get("batchnorm", False))),
    "paper_generator": lambda spec: (lambda noise_dim, out_channels, image_size, conditioning="uncond", **_: (
        paper_generator(spec["kind"], noise_dim, out_channels, image_size, conditioning, ngf=spec["ngf"]))),
    "datafree_generator": lambda spec: (lambda noise_dim, out_channels, image_size, conditioning="uncond", **_: (
        DataFreeGenerator(spec.get("large", False), noise_dim, out_channels, image_size, ngf=spec["ngf"]))),
    "wrn": lambda spec: (lambda num_classes, in_channels, image_size: WideResNet(
        spec["depth"], spec["widen_factor"], num_classes, in_channels, base_widths=tuple(spec["base_widths"]))),
}
"""Trace-sized networks by family: ``spec -> builder`` as the model / generator registries call it."""


@contextlib.contextmanager
def architectures(specs: dict[str, dict[str, Any]]):
    """Register ``{name: {"registry": "model" | "generator", "family": ..., widths...}}`` for the block."""
    with scoped_registrations():
        for name, spec in specs.items():
            if spec.get("family") not in FAMILIES:
                raise TraceMismatch(f"architecture {name!r}: family {spec.get('family')!r} is not one of "
                                    f"{', '.join(FAMILIES)} (dfkd_bench.traces.replay.FAMILIES)")
            register = register_model if spec["registry"] == "model" else register_generator
            register(name, family="trace", default_image_size=0,
                     description=f"trace-sized {spec['family']}")(FAMILIES[spec["family"]](spec))
        yield


@contextlib.contextmanager
def float64_mode():
    """float64 by default, and ``Tensor.float()`` leaving float64 tensors as they are (see the module doc)."""
    previous = torch.get_default_dtype()
    original = torch.Tensor.float
    # the engine's build() sets the process-wide deterministic-algorithms switch of its run: restored after
    deterministic = (torch.are_deterministic_algorithms_enabled(),
                     torch.is_deterministic_algorithms_warn_only_enabled())

    def float_or_float64(self, *args, **kwargs):
        return self if self.dtype == torch.float64 else original(self, *args, **kwargs)

    torch.set_default_dtype(torch.float64)
    torch.Tensor.float = float_or_float64
    try:
        yield
    finally:
        torch.Tensor.float = original
        torch.set_default_dtype(previous)
        torch.use_deterministic_algorithms(deterministic[0], warn_only=deterministic[1])


# ---------------------------------------------------------------- suite ---

def run_config(meta: dict[str, Any], teacher_path: str, train: dict[str, Any] | None = None,
               params: dict[str, Any] | None = None) -> RunConfig:
    """The :class:`RunConfig` of ``meta["config"]``, with ``train`` / ``params`` changed (a mutation)."""
    cfg = meta["config"]
    train_cfg = TrainConfig(**{**cfg["train"], **(train or {})})
    return RunConfig(
        method=meta["method"], dataset=cfg["dataset"], seed=cfg["seed"],
        teacher=TeacherSpec(arch=cfg["teacher_arch"], path=teacher_path, sha256="trace", mean=cfg["teacher_mean"],
                            std=cfg["teacher_std"]),
        student_arch=cfg["student_arch"], image_size=cfg["image_size"], num_classes=cfg["num_classes"],
        channels=cfg["channels"], student_mean=cfg["student_mean"], student_std=cfg["student_std"],
        train=train_cfg, params=resolve_method_params(meta["method"], {}, {**cfg["params"], **(params or {})}),
        protocol=cfg.get("protocol", "common"),
    )


def build_trainer(meta: dict[str, Any], teacher: dict[str, Tensor], workdir: str | Path,
                  train: dict[str, Any] | None = None, params: dict[str, Any] | None = None) -> Trainer:
    """The engine's trainer of the trace's run, built (call inside :func:`float64_mode`)."""
    teacher_path = Path(workdir) / "teacher.pt"
    torch.save(teacher, teacher_path)
    config = run_config(meta, str(teacher_path), train, params)
    trainer = Trainer(config, Path(workdir) / "runs", device="cpu", progress=False)
    with architectures(meta.get("architectures", {})):
        trainer.build()
    return trainer


def suite_state(trainer: Trainer) -> dict[str, Any]:
    """The run's full state in the trace's flat names: the student network (``student/``), the student's
    optimiser (``student_optimizer/``) and the method's state dict (``method/``)."""
    state = flatten("student", trainer.student_module.model.state_dict())
    flatten("student_optimizer", trainer.optimizer.state_dict(), state)
    flatten("method", trainer.method.state_dict(), state)
    return state


def _set_leaf(tree: Any, path: list[str], value: Tensor) -> None:
    for part in path[:-1]:
        tree = tree[int(part)] if isinstance(tree, list) else tree[part if part in tree else int(part)]
    last = path[-1]
    target = tree[last] if last in tree else tree[int(last)]
    target.copy_(value)


def load_initial(trainer: Trainer, initial: dict[str, Any], prefixes: list[str]) -> None:
    """Copy the entries of ``initial`` under ``prefixes`` (weights: ``student/``, ``method/generator/`` ...)
    into the run: the student's network directly, the method's through its own ``load_state_dict``."""
    chosen = {k: v for k, v in initial.items() if any(k.startswith(p) for p in prefixes)}
    student = trainer.student_module.model.state_dict()
    method = trainer.method.state_dict()
    for key, value in chosen.items():
        root, _, rest = key.partition("/")
        if root == "student":
            student[rest].copy_(value)
        elif root == "method":
            _set_leaf(method, rest.split("/"), value)
        else:
            raise TraceMismatch(f"meta.load names {key!r}; only student/ and method/ entries are weights")
    trainer.student_module.model.load_state_dict(student)
    trainer.method.load_state_dict(method)


class DrawFeed:
    """``MethodContext.draws``: the official loop's draws, in order, each checked for kind and shape (and an
    integer draw for the range ``[low, high)`` the suite asks it from, when it says)."""

    def __init__(self, draws: list[dict[str, Any]]):
        self.draws = draws
        self.used = 0

    def __call__(self, kind: str, shape: tuple[int, ...], high: int | None = None, low: int = 0) -> Tensor:
        if self.used >= len(self.draws):
            raise TraceMismatch(f"the suite asked for a {kind} draw of shape {list(shape)} after the "
                                f"{len(self.draws)} draws of the official loop")
        draw = self.draws[self.used]
        value = draw["value"]
        if draw["kind"] != kind or tuple(value.shape) != tuple(shape):
            raise TraceMismatch(f"draw {self.used + 1}: the suite asked for {kind} {list(shape)}, the official "
                                f"loop drew {draw['kind']} {list(value.shape)}")
        if high is not None and value.numel() and not (low <= int(value.min()) and int(value.max()) < high):
            raise TraceMismatch(f"draw {self.used + 1}: the suite asked for {kind} in [{low}, {high}), the official "
                                f"loop drew values in [{int(value.min())}, {int(value.max())}]")
        self.used += 1
        return value.clone()


def run_schedule(trainer: Trainer, schedule: list[str]) -> None:
    """The engine's stages in the order ``schedule`` names (see the module doc)."""
    for item in schedule:
        trainer.set_learning_rate()
        if item == "iteration":
            trainer.run_iteration()
            trainer.iteration += 1
        elif item == "student_stage":
            trainer.method.end_generator_stage()
            trainer.student_stage()
        elif item == "generator_steps":
            trainer.generator_stage(end_stage=False)
        else:
            raise TraceMismatch(f"schedule item {item!r} is not one of iteration, student_stage, generator_steps")


def recording(trainer: Trainer, on_step: Callable[[str, dict[str, Tensor]], None]) -> None:
    """Call ``on_step(kind, terms)`` after every optimisation step of the engine (its ``accumulate``)."""
    accumulate = trainer.accumulate

    def accumulate_and_report(terms: dict[str, Tensor]) -> None:
        accumulate(terms)
        on_step("generator" if trainer._phase == "synthesis" else "student", terms)

    trainer.accumulate = accumulate_and_report


# --------------------------------------------------------------- replay ---

@dataclass
class StepResult:
    index: int
    """0: the state before the first step; then the steps in order."""
    kind: str
    max_relative_difference: float
    worst: str


@dataclass
class ReplayResult:
    steps: list[StepResult] = field(default_factory=list)
    per_key: dict[str, float] = field(default_factory=dict)
    """Each compared entry's largest relative difference over the steps."""
    mismatch: str | None = None
    """Why the replay stopped early (the suite drew, stepped or held something the official loop did not)."""

    @property
    def max_relative_difference(self) -> float:
        if self.mismatch is not None or not self.steps:
            return math.inf
        return max(step.max_relative_difference for step in self.steps)

    @property
    def optimisation_steps(self) -> int:
        return sum(1 for step in self.steps if step.index > 0)

    def within(self, rtol: float = RTOL) -> bool:
        return self.max_relative_difference <= rtol

    def describe(self, rtol: float = RTOL) -> str:
        """One line: the largest difference and where, and the first step beyond ``rtol`` if any."""
        if self.mismatch is not None:
            return f"not equivalent: {self.mismatch}"

        def where(step: StepResult) -> str:
            return "the initial state" if step.index == 0 else f"step {step.index} ({step.kind})"

        worst = max(self.steps, key=lambda s: s.max_relative_difference)
        text = (f"max relative difference {self.max_relative_difference:.3g} over {self.optimisation_steps} steps "
                f"(worst: {worst.worst} at {where(worst)})")
        first = next((s for s in self.steps if s.max_relative_difference > rtol), None)
        if first is not None:
            text += f"; first beyond {rtol:g}: {first.worst} at {where(first)} ({first.max_relative_difference:.3g})"
        return text


def compare(suite: dict[str, Any], official: dict[str, Any], uncompared: dict[str, str],
            what: str, per_key: dict[str, float] | None = None,
            ahead: dict[str, str] | None = None) -> tuple[float, str]:
    """The largest relative difference between two flat states, and where; a key one side lacks
    (outside ``uncompared``; for the suite's side, outside ``ahead``) is a :class:`TraceMismatch`. A value
    None is no entry. Optimiser settings a newer torch adds compare only when both sides have them."""
    def skipped(key: str, prefixes: dict[str, str]) -> bool:
        return any(key.startswith(prefix) for prefix in prefixes)

    suite = {k: v for k, v in suite.items() if v is not None}
    official = {k: v for k, v in official.items() if v is not None}
    only_suite = sorted(k for k in set(suite) - set(official)
                        if not skipped(k, {**uncompared, **(ahead or {})}) and "/param_groups/" not in k)
    only_official = sorted(k for k in set(official) - set(suite) if "/param_groups/" not in k)
    if only_suite or only_official:
        parts = ([f"the suite has {only_suite[:3]} the official loop has not"] if only_suite else []) + (
            [f"the official loop has {only_official[:3]} the suite has not"] if only_official else [])
        raise TraceMismatch(f"{what}: " + "; ".join(parts))
    worst, where = 0.0, ""
    scales = comparison_scales(official)
    for key in sorted(set(suite) & set(official)):
        if skipped(key, uncompared):
            continue
        difference = relative_difference(suite[key], official[key], scales.get(key))
        if per_key is not None:
            per_key[key] = max(per_key.get(key, 0.0), difference)
        if difference > worst or not where:
            worst, where = difference, key
    return worst, where


class _Beyond(Exception):
    """A step beyond ``stop_beyond``: the replay ends there (a mutation test needs no more)."""


def replay(trace: Trace, *, train: dict[str, Any] | None = None, params: dict[str, Any] | None = None,
           schedule: list[str] | None = None, before: Callable[[Trainer], None] | None = None,
           stop_beyond: float | None = None) -> ReplayResult:
    """Replay ``trace`` through the engine (``train`` / ``params`` / ``schedule`` change the suite's run, as
    the perf variants and the mutation tests do; ``before(trainer)`` runs after the build, e.g. to patch a
    method in a test) and compare every step; with ``stop_beyond``, end at the first step whose difference
    exceeds it. Never raises for a difference: the result says it."""
    meta = trace.meta
    uncompared = dict(meta.get("uncompared", {}))
    ahead = dict(meta.get("ahead", {}))
    result = ReplayResult()
    official_steps = list(trace.states())
    with tempfile.TemporaryDirectory(prefix="dfkd-trace-") as workdir, float64_mode():
        try:
            trainer = build_trainer(meta, trace.teacher, workdir, train, params)
            load_initial(trainer, trace.initial, meta["load"])
            if before is not None:
                before(trainer)
            feed = DrawFeed(trace.draws)
            trainer.method.ctx.draws = feed
            difference, worst = compare(suite_state(trainer), trace.initial, uncompared, "before the first step",
                                        result.per_key, ahead)
            result.steps.append(StepResult(0, "initial", difference, worst))
            if stop_beyond is not None and difference > stop_beyond:
                raise _Beyond

            def on_step(kind: str, terms: dict[str, Tensor]) -> None:
                index = len(result.steps)
                if index > len(official_steps):
                    raise TraceMismatch(f"the suite ran a {kind} step after the official loop's {len(official_steps)}")
                _, official, state = official_steps[index - 1]
                if official["kind"] != kind:
                    raise TraceMismatch(f"step {index}: the suite ran a {kind} step, the official loop a "
                                        f"{official['kind']} step")
                losses = {f"loss/{k}": v.detach() for k, v in terms.items()}
                expected = {f"loss/{k}": v for k, v in official["losses"].items()}
                loss_difference, loss_worst = compare(losses, expected, uncompared, f"step {index} ({kind}) losses",
                                                      result.per_key)
                difference, worst = compare(suite_state(trainer), state, uncompared, f"after step {index} ({kind})",
                                            result.per_key, ahead)
                if loss_difference > difference:
                    difference, worst = loss_difference, loss_worst
                result.steps.append(StepResult(index, kind, difference, worst))
                if stop_beyond is not None and difference > stop_beyond:
                    raise _Beyond

            recording(trainer, on_step)
            with method_stream(trainer.method_rng, feed=feed):
                run_schedule(trainer, schedule if schedule is not None else meta["schedule"])
            if result.optimisation_steps < len(official_steps):
                raise TraceMismatch(f"the suite ran {result.optimisation_steps} steps, the official loop "
                                    f"{len(official_steps)}")
            if feed.used < len(trace.draws):
                raise TraceMismatch(f"the suite used {feed.used} of the official loop's {len(trace.draws)} draws")
        except TraceMismatch as error:
            result.mismatch = str(error)
        except _Beyond:
            pass
    return result


VARIANTS: dict[str, dict[str, Any]] = {
    "reference": dict(amp="none", channels_last=False, fused_optimizer=False, cuda_graphs=False, fused_forward=False,
                      stage_buffer=False, compile=False),
    "fast": dict(amp="none", channels_last=True, fused_optimizer=True, cuda_graphs=True, fused_forward=True,
                 stage_buffer=False, compile=False, deterministic=False),
}
"""The engine paths every trace is replayed on: ``reference`` (eager, no fused kernels, contiguous memory)
and ``fast`` (what the float32 paper protocols resolve to on a GPU -- channels-last, fused optimisers, the
static student step that CUDA graphs replay (on a CPU the same static-input path without a graph), no
deterministic algorithms -- as the first H200 run of DFAD's MNIST protocol recorded in ``resolved_perf``)."""


def replay_variants(trace: Trace) -> dict[str, ReplayResult]:
    """:func:`replay` on each of :data:`VARIANTS`."""
    return {name: replay(trace, train=settings) for name, settings in VARIANTS.items()}


# ----------------------------------------------------------- recording ---

_RANDN, _RANDINT, _RAND = torch.randn, torch.randint, torch.rand  # torch's own, even while a tracer replaces them
_TORCH_DRAWS = ("randn", "rand", "randint", "randperm")


def _draw_shape(kind: str, args: tuple, kwargs: dict[str, Any]) -> tuple[int, ...]:
    """The shape of the tensor a torch draw call returns (``randn(2, 3)``, ``randn((2, 3))``, ``rand(size=...)``,
    ``randint(high, size)``, ``randint(low, high, size)``, ``randperm(n)``)."""
    if kind == "randperm":
        return (int(args[0] if args else kwargs["n"]),)
    if kind == "randint":
        size = kwargs["size"] if "size" in kwargs else args[-1]
        return tuple(int(n) for n in size)
    size = args if args else (kwargs["size"],)
    size = size[0] if len(size) == 1 and isinstance(size[0], (tuple, list, torch.Size)) else size
    return tuple(int(n) for n in size)


def _draw_range(kind: str, args: tuple, kwargs: dict[str, Any]) -> tuple[int | None, int]:
    """``(high, low)`` of an integer draw (``randint(high, size)``, ``randint(low, high, size)``, ``randperm(n)``);
    ``(None, 0)`` for a real one."""
    if kind == "randperm":
        return int(args[0] if args else kwargs["n"]), 0
    if kind != "randint":
        return None, 0
    bounds = [*args[:-1]] if "size" not in kwargs else [*args]
    low = kwargs.get("low", bounds[0] if len(bounds) == 2 else 0)
    high = kwargs.get("high", bounds[-1] if bounds else None)
    return int(high), int(low)


@contextlib.contextmanager
def method_stream(rng: torch.Generator, *, feed: Callable[..., Tensor] | None = None,
                  record: Callable[[str, Tensor], Any] | None = None):
    """Inside the block, every ``torch.randn`` / ``rand`` / ``randint`` / ``randperm`` call made with
    ``generator=rng`` (the method's stream: a pool method's pixels, labels, jitter, pool indices, crops,
    ...; ``MethodContext.randn`` / ``randint`` have their own hook) is served by ``feed(kind, shape, high,
    low)`` (the replay: the official loop's draws; ``high`` None for a real draw) or drawn as usual and
    passed to ``record(kind, value)``. Draws from any other generator are torch's own."""
    def serve(kind: str, original: Callable[..., Tensor]) -> Callable[..., Tensor]:
        def draw(*args, **kwargs) -> Tensor:
            if kwargs.get("generator") is not rng:
                return original(*args, **kwargs)
            if feed is None:
                value = original(*args, **kwargs)
                record(kind, value)
                return value
            value = feed(kind, _draw_shape(kind, args, kwargs), *_draw_range(kind, args, kwargs))
            return value.to(device=kwargs.get("device") or value.device, dtype=kwargs.get("dtype") or value.dtype)

        return draw

    originals = {kind: getattr(torch, kind) for kind in _TORCH_DRAWS}
    try:
        for kind, original in originals.items():
            setattr(torch, kind, serve(kind, original))
        yield
    finally:
        for kind, original in originals.items():
            setattr(torch, kind, original)


def suite_draws(trace: Trace, rng: torch.Generator) -> Callable[..., Tensor]:
    """A ``MethodContext.draws`` that draws from ``rng`` (the suite's method stream) and records each
    draw in ``trace``: a tracer hands the same values to the official loop."""
    def draw(kind: str, shape: tuple[int, ...], high: int | None = None) -> Tensor:
        if kind == "randn":
            value = _RANDN(shape, generator=rng)
        elif kind == "rand":
            value = _RAND(shape, generator=rng)
        else:
            value = _RANDINT(high, shape, generator=rng)
        return trace.draw(kind, value)

    return draw


def record_suite(meta: dict[str, Any], teacher: dict[str, Tensor]) -> Trace:
    """A trace of the SUITE itself (its own draws from its method stream): what :func:`replay` must
    reproduce exactly. The harness's own test, and a tracer's way to see the suite's steps."""
    with tempfile.TemporaryDirectory(prefix="dfkd-trace-") as workdir, float64_mode():
        trainer = build_trainer(meta, teacher, workdir)
        trace = Trace(meta, teacher, suite_state(trainer))
        trainer.method.ctx.draws = suite_draws(trace, trainer.method_rng)

        def on_step(kind: str, terms: dict[str, Tensor]) -> None:
            trace.step(kind, {k: float(v) for k, v in terms.items()}, suite_state(trainer))

        recording(trainer, on_step)
        with method_stream(trainer.method_rng, record=trace.draw):
            run_schedule(trainer, meta["schedule"])
    return trace
