"""The one interface every DFKD method implements, and the method registry.

The engine (``dfkd_bench/train/engine.py``) owns everything that must be identical
across methods -- the student, its optimiser and schedule, the budget, the
alternation of stages, evaluation, seeds, records and checkpoints -- and never
names a method. A method owns what differs:

* its own hyper-parameters, declared as a dataclass ``Params`` whose defaults
  are the paper's;
* how it synthesises data and trains its generator (``generator_step``);
* what happens between the generator stage and the student stage
  (``end_generator_stage``: e.g. MAD's EMA update);
* the loss the student minimises at one student step (``student_loss``);
* which synthetic sources to measure drift on and draw sample grids from
  (``measurement_sources``);
* its state for exact resume (``state_dict`` / ``load_state_dict``), and the attributes
  that hold state only inside a stage (``stage_state_attributes``: a stop request
  checkpoints the run after any optimiser step, in the middle of a stage).

Adding a method is one new file in ``methods/`` that subclasses
:class:`Method` (or ``methods.common.AdversarialMethod``) and decorates it
with :func:`register_method`; the engine does not change.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import inspect
import os
import pkgutil
import sys
import traceback
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from dfkd_bench.errors import ConfigError


@dataclass(frozen=True)
class PerfOptions:
    """Speed switches. None of them changes the mathematics (see tests/test_fast_path.py)."""

    fused_forward: bool = True
    """Run the student batches of all sources (G, EMA G, memory) through the
    teacher and the student as ONE concatenated forward, with per-source
    BatchNorm statistics. Off: one forward per source (the reference path)."""

    amp: str = "none"
    """``none`` or ``bf16``: autocast of teacher/student/generator forwards."""

    channels_last: bool = False
    """Convert models and synthetic batches to the channels-last memory format."""

    compile: bool = False
    """``torch.compile`` the student and teacher."""

    stage_buffer: bool = False
    """Sample G (and EMA G) for a whole student stage in one pass into a buffer
    (the paper's own suggestion in its Limitations) instead of once per step.
    The generator does not change during a student stage, and each batch is
    normalised with its own BatchNorm statistics, so the images are the same."""

    cuda_graphs: bool = False
    """Replay student steps from CUDA graphs (dfkd_bench/train/graphs.py) for methods whose class
    sets ``static_student_step``; on a CPU the same static-input code path runs without graphs."""

    fused_optimizer: bool = False
    """Fused optimiser kernels: one kernel for all parameters and no host-side step
    counters (Adam's default implementation reads its step count on the host)."""

    fallbacks: list = field(default_factory=list, compare=False, hash=False, repr=False)
    """What could not be had as asked (e.g. ``fused_optimizer`` on a torch without the fused kernel):
    one line each, filled by :func:`make_optimizer`; the engine records them in config.json
    (``resolved_perf``) and as notes."""

    def autocast(self, device: torch.device):
        enabled = self.amp == "bf16"
        # No weight-cast cache: each weight is cast once per forward anyway, and CUDA graphs need it off.
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled, cache_enabled=False)


class Float32Linear(nn.Linear):
    """A linear layer that computes in float32 even inside a bf16 autocast region.

    # CHOSEN (issue 21, item 7): under bf16 autocast a classifier's logits would leave the last
    # layer rounded to bf16 (8 bits of mantissa: a spacing of 0.125 near the logit bound
    # delta = 20 of Eqs. 10-11) before any ``.float()``. Only the last layer is kept in float32
    # (its input, the bf16 features, is upcast exactly): every loss then sees float32 logits,
    # while the convolutions, where the time goes, stay in bf16. A class swap, not a wrapper, so
    # state_dict keys, checkpoints and run ids do not change.
    """

    def forward(self, input: Tensor) -> Tensor:  # noqa: A002 - nn.Linear's name
        with torch.autocast(device_type=input.device.type, enabled=False):
            bias = self.bias.float() if self.bias is not None else None
            return nn.functional.linear(input.float(), self.weight.float(), bias)


def float32_logits(model: nn.Module, num_classes: int) -> bool:
    """Make the classifier of ``model`` (its last ``nn.Linear`` with ``num_classes`` outputs) a
    :class:`Float32Linear`; False if there is none (the logits then stay as autocast leaves them)."""
    heads = [m for m in model.modules() if type(m) is nn.Linear and m.out_features == num_classes]
    if not heads:
        return False
    heads[-1].__class__ = Float32Linear
    return True


def make_optimizer(name: str, params, perf: PerfOptions, **kwargs) -> torch.optim.Optimizer:
    """``sgd`` or ``adam`` over ``params``, with fused kernels when ``perf.fused_optimizer``
    (one kernel per step, and Adam keeps its step count on the device instead of the host)."""
    cls = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam}[name]
    params = list(params)
    if perf.fused_optimizer:
        try:
            return cls(params, fused=True, **kwargs)
        except (RuntimeError, TypeError) as error:  # an older torch without fused kernels for this device
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            line = f"{name}: unfused ({reason})"
            if line not in perf.fallbacks:
                perf.fallbacks.append(line)
    return cls(params, **kwargs)


@dataclass(frozen=True)
class DistributedInfo:
    """Where this process sits in a data-parallel job (world_size 1 when alone)."""

    rank: int = 0
    world_size: int = 1
    process_group: Any = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@dataclass
class MethodContext:
    """Everything the engine hands to a method. Images are always in [0, 1]:
    ``teacher`` and ``student`` apply their own input normalisation."""

    teacher: nn.Module
    student: nn.Module
    student_module: nn.Module
    num_classes: int
    image_shape: tuple[int, int, int]
    batch_size: int
    student_steps: int
    device: torch.device
    rng: torch.Generator
    perf: PerfOptions = field(default_factory=PerfOptions)
    distributed: DistributedInfo = field(default_factory=DistributedInfo)
    note: Callable[..., None] = lambda message, show=True: print(message) if show else None
    """``note(message, show=True)``: kept in the run's config.json, printed unless ``show`` is False."""
    wrap_distributed: Callable[[nn.Module], nn.Module] = lambda module: module
    student_images_per_step: int = 0
    """This rank's share of ``TrainConfig.student_images_per_step`` (0: the method's own number)."""
    draws: Callable[..., Tensor] | None = None
    """None in every run. The step-equivalence replay (:mod:`dfkd_bench.traces`) sets it to hand out
    the random draws an official training loop consumed: ``draws(kind, shape, high)`` returns the next
    recorded draw (``kind`` ``"randn"``, ``"rand"``, or ``"randint"`` below ``high``) and fails if its kind or
    shape differ. It replaces only the method's own stream (``rng`` None), never a measurement's."""

    dataset: str = ""
    """The run's dataset name (``digits``, ``cifar10``, ...), for a method whose inputs depend on the
    classes' names (NAYER's label-text embeddings); empty when a test builds a context by hand."""

    def draw(self, kind: str, shape: tuple[int, ...], high: int | None = None) -> Tensor:
        """A draw of this process alone (an augmentation's positions, a pool's sample), not a slice of a
        global batch: ``rand`` (uniform in [0, 1)) or ``randint`` (below ``high``) of ``shape`` from ``rng``
        -- the same call as drawing from ``rng`` directly -- or, in a replay, the next recorded draw."""
        if self.draws is not None:
            return self.draws(kind, tuple(shape), high).to(self.device)
        if kind == "rand":
            return torch.rand(shape, generator=self.rng, device=self.device)
        if kind == "randint":
            return torch.randint(high, shape, generator=self.rng, device=self.device)
        raise ValueError(f"a process-local draw is rand or randint, not {kind!r}")

    def uniform_(self, tensor: Tensor, low: float, high: float) -> Tensor:
        """Fill ``tensor`` in place uniformly in ``[low, high)`` from ``rng`` -- the very call
        ``tensor.uniform_(low, high, generator=rng)``, so a run draws what it drew before the hook --
        or, in a replay, from the next recorded ``rand`` draw ``u`` of the tensor's shape as ``uniform_``
        computes it, ``u * (high - low) + low`` (a parameter's re-initialisation: NAYER's new generator)."""
        if self.draws is not None:
            uniform = self.draws("rand", tuple(tensor.shape), None).to(tensor)
            return tensor.copy_(uniform * (high - low) + low)
        return tensor.uniform_(low, high, generator=self.rng)

    def normal_(self, tensor: Tensor, mean: float = 0.0, std: float = 1.0) -> Tensor:
        """Fill ``tensor`` in place with normal draws from ``rng`` -- the very call ``tensor.normal_(mean,
        std, generator=rng)`` -- or, in a replay, from the next recorded ``randn`` draw ``z`` of the tensor's
        shape, ``z * std + mean`` (as ``normal_`` computes it)."""
        if self.draws is not None:
            normal = self.draws("randn", tuple(tensor.shape), None).to(tensor)
            return tensor.copy_(normal * std + mean)
        return tensor.normal_(mean, std, generator=self.rng)
    preemption_point: Callable[[str, int], None] = lambda phase, steps: None
    """``preemption_point(phase, steps)``: a method that runs optimiser steps in a loop of its own (e.g.
    generator pre-training, ``phase = "pretrain"``) calls it after each step with the steps done so far.
    When a stop was requested it raises (an engine exception that must not be caught), the engine
    checkpoints the run there and the method's ``stage_state_attributes`` must say where its loop stands;
    on resume the engine calls the same method (``pretrain()``) again, which continues from there."""

    # ---- randomness that is identical for 1 process and N data-parallel ranks ----
    def randn(self, rows: int, cols: int, rng: torch.Generator | None = None) -> Tensor:
        """Standard-normal rows for this rank's share of a global batch.

        Every rank draws the global batch from the same generator and keeps
        its slice, so N ranks see exactly the noise one process would.
        """
        world, rank = self.distributed.world_size, self.distributed.rank
        if self.draws is not None and rng is None:
            draws = self.draws("randn", (rows * world, cols), None).to(self.device)
        else:
            draws = torch.randn(rows * world, cols, generator=rng or self.rng, device=self.device)
        return draws[rank * rows:(rank + 1) * rows]

    def randint(self, high: int, rows: int, rng: torch.Generator | None = None) -> Tensor:
        world, rank = self.distributed.world_size, self.distributed.rank
        if self.draws is not None and rng is None:
            draws = self.draws("randint", (rows * world,), high).to(self.device)
        else:
            draws = torch.randint(high, (rows * world,), generator=rng or self.rng, device=self.device)
        return draws[rank * rows:(rank + 1) * rows]


@dataclass(frozen=True)
class PaperProtocol:
    """A method's own paper protocol on one dataset (``protocol = "paper"``; docs/protocols.md).

    ``train`` (engine settings) and ``params`` (the method's settings) over the engine's and the
    method's defaults give every setting the paper (or, where it is silent, its official code)
    fixes; the dataset preset's shared values do not apply, except the engine settings that do
    not change the mathematics (evaluation cadence aside, which the protocol sets to the
    paper's). ``published`` is what the paper reports and goes into each run's config.json.
    ``official`` lists settings of the official code (``name -> value``) for the protocol card;
    ``deviations`` the differences this suite keeps (``name -> reason``, each also ``# CHOSEN``).
    """

    source: str
    accuracy: float | None
    """None where no published number could be read (the source says why); the report then shows none."""
    std: float | None
    teacher_accuracy: float | None
    selection: str
    teacher_arch: str
    student_arch: str
    image_size: int
    train: dict[str, Any]
    params: dict[str, Any]
    official: dict[str, Any] = field(default_factory=dict)
    deviations: dict[str, str] = field(default_factory=dict)
    code: str = ""

    @property
    def published(self) -> dict[str, Any]:
        """The record's ``published`` block (the report's contract)."""
        return {"accuracy": self.accuracy, "std": self.std, "source": self.source,
                "teacher_accuracy": self.teacher_accuracy, "selection": self.selection}


class Method(ABC):
    """Base class of a DFKD method. See the module docstring for the contract."""

    name: ClassVar[str] = ""
    label: ClassVar[str] = ""
    """How tables and figures name the method (default: ``name``), e.g. ``DFKD-Mem``."""
    summary: ClassVar[str] = ""
    Params: ClassVar[type] = type(None)
    preset_params: ClassVar[dict[str, dict[str, Any]]] = {}
    """Values of this method's OWN parameters for a dataset preset, by preset name (e.g. a
    CPU-sized synthesis budget on ``digits``). They apply over the preset's shared values and
    under the budget's caps and ``--set``; each value should say why (``# CHOSEN``)."""

    paper_protocols: ClassVar[dict[str, PaperProtocol]] = {}
    """This method's own paper protocol per dataset it reports (see :class:`PaperProtocol`)."""

    no_trace_reason: ClassVar[str] = ""
    """Why no step-equivalence trace of the authors' code exists for this method (e.g. none is public),
    for its protocol card; a committed trace (``results/traces``, :mod:`dfkd_bench.traces`) makes the
    card show the replay's result instead, and without either the card says "no trace yet"."""

    def __init__(self, params: Any, ctx: MethodContext):
        self.params = params
        self.ctx = ctx

    def pretrain(self) -> None:
        """Called once before the first iteration (e.g. generator pre-training)."""

    @abstractmethod
    def generator_step(self) -> dict[str, Tensor]:
        """One optimisation step of the method's synthesiser. Returns detached loss terms."""

    def end_generator_stage(self) -> None:
        """Called after the n_G generator steps of a stage, before the student stage."""

    @abstractmethod
    def student_loss(self) -> tuple[Tensor, dict[str, Tensor]]:
        """The loss of one student step (the engine does backward and the optimiser step)."""

    pool_based: ClassVar[bool] = False
    """True for a method that synthesises batches by optimisation into a pool and distils the student
    on the pool (DeepInversion, CMI, FastDFKD); False for a generator trained against the student.
    Tests and tools tell the two kinds apart by this attribute, never by method names."""

    # ---- the static form of a student step (optional; lets the engine replay it from a CUDA graph) ----
    static_student_step: ClassVar[bool] = False
    """Set to True IN THE CLASS BODY of a method (it is not inherited: the engine reads the
    concrete class's own attribute) to promise that ``student_loss()`` is exactly
    ``student_loss_from(student_batch())`` followed by ``finish_student_step(keep)``, and
    that ``student_loss_from`` is a pure device function of ``batch`` and of module state
    updated in place: no random draws, no host reads, no Python state that differs between
    steps. The engine may then capture it once and replay it."""

    def student_batch(self) -> dict[str, Tensor]:
        """Host side of a student step: this step's input tensors (noise, stored images, ...)."""
        raise NotImplementedError(f"{type(self).__name__} has no static student step")

    def student_loss_from(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor], Any]:
        """Device side: ``(loss, detached terms, keep)``; ``keep`` goes to :meth:`finish_student_step`."""
        raise NotImplementedError(f"{type(self).__name__} has no static student step")

    def finish_student_step(self, keep: Any) -> None:
        """Host side after the step ran (eagerly or replayed), e.g. pushing images into a memory."""

    @abstractmethod
    def measurement_sources(self, num_samples: int, rng: torch.Generator) -> dict[str, Tensor]:
        """Fresh samples per synthetic source, e.g. ``{"gen": ..., "gen_ema": ...}``.

        Used for the drift measurement (Sec. 5.2.3) and sample grids (Fig. 5).
        Must not change the method's state (no optimiser steps, no buffers).
        """

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    # ---- state inside a stage (a stop request in the middle of a stage) ----
    stage_state_attributes: ClassVar[tuple[str, ...] | None] = None
    """The attributes in which the method keeps state that lives only INSIDE a stage, between two of its
    optimiser steps, beyond :meth:`state_dict` (which a checkpoint between iterations needs alone): the
    noise a student stage drew at its start, the step it has reached, how far a pre-training loop got ...
    Each class of a method's hierarchy lists its own; their union (:meth:`stage_state_names`) is saved
    when a stop request checkpoints a run in the middle of a stage, so that the same command continues
    exactly from that step. Their values must be tensors, numbers, strings, None, or lists, tuples and
    dicts of them. ``None`` in every class of the hierarchy (a method that subclasses :class:`Method`
    directly and does not say): a stop in the middle of a stage falls back to the start of the
    iteration, and the engine says which steps are lost. The shared bases (``AdversarialMethod``,
    ``PoolMethod``) declare theirs, so a method built on them needs to list only what it adds."""

    @classmethod
    def stage_state_names(cls) -> tuple[str, ...] | None:
        """The union of ``stage_state_attributes`` over the class hierarchy; None if no class declares it."""
        declared = [vars(klass)["stage_state_attributes"] for klass in reversed(cls.__mro__)
                    if vars(klass).get("stage_state_attributes") is not None]
        if not declared:
            return None
        return tuple(dict.fromkeys(name for names in declared for name in names))

    def stage_state_dict(self) -> dict[str, Any]:
        """The values of :meth:`stage_state_names` (call only when it is not None)."""
        return {name: getattr(self, name) for name in self.stage_state_names() or ()}

    def load_stage_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`stage_state_dict` saved (after :meth:`load_state_dict`), tensors on the device."""
        for name, value in state.items():
            setattr(self, name, _on_device(value, self.ctx.device))


def _on_device(value: Any, device: torch.device) -> Any:
    """``value`` with every tensor in it (in lists, tuples, dicts) moved to ``device``."""
    if isinstance(value, Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {key: _on_device(item, device) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_on_device(item, device) for item in value)
    return value


# ---------------------------------------------------------------- registry ---

_METHODS: dict[str, type[Method]] = {}
_DISCOVERED = False
_BROKEN: dict[str, str] = {}
"""Method files of ``methods/`` that failed to import, by module name: one line saying why."""


def _import_failure(where: str, error: BaseException) -> str:
    """One line naming the method file, the line in it where importing failed, and the error."""
    if isinstance(error, SyntaxError) and error.lineno:
        return f"{where} failed to import: line {error.lineno}: {error.msg}"
    frames = [frame for frame in traceback.extract_tb(error.__traceback__)
              if frame.filename.endswith(os.path.basename(where))]
    line = f"line {frames[-1].lineno}: " if frames else ""
    message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return f"{where} failed to import: {line}{message}"


def _check_params_are_dataclass_fields(cls: type[Method]) -> None:
    """Refuse a ``Params`` class in whose MRO a class declares annotated settings without being a
    dataclass itself (``class Params(Base.Params): extra: int = 2`` without ``@dataclass``): its
    new fields would silently not exist and ``--set extra=2`` would be refused."""
    fields_ = {f.name for f in dataclasses.fields(cls.Params)}
    for klass in cls.Params.__mro__:
        if klass is object:
            continue
        own = inspect.get_annotations(klass)
        missing = [name for name in own if name not in fields_ and not name.startswith("_")]
        if missing and "__dataclass_fields__" not in vars(klass):
            raise TypeError(f"{cls.__qualname__}.Params: {klass.__qualname__} declares {', '.join(missing)} but "
                            f"is not decorated with @dataclass, so they would not be settings; add @dataclass")


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: make ``cls`` available as ``--methods cls.name``."""
    if not cls.name:
        raise TypeError(f"{cls.__qualname__} must set a class attribute `name`")
    if not dataclasses.is_dataclass(cls.Params):
        raise TypeError(f"{cls.__qualname__}.Params must be a dataclass of hyper-parameters")
    _check_params_are_dataclass_fields(cls)
    for preset, values in cls.preset_params.items():
        unknown = set(values) - {f.name for f in dataclasses.fields(cls.Params)}
        if unknown:
            raise TypeError(f"{cls.__qualname__}.preset_params[{preset!r}] sets {sorted(unknown)}, "
                            f"which are not fields of its Params")
    for dataset, protocol in cls.paper_protocols.items():
        unknown = set(protocol.params) - {f.name for f in dataclasses.fields(cls.Params)}
        if unknown:
            raise TypeError(f"{cls.__qualname__}.paper_protocols[{dataset!r}] sets {sorted(unknown)}, "
                            f"which are not fields of its Params")
        if protocol.selection not in ("best", "final"):
            raise TypeError(f"{cls.__qualname__}.paper_protocols[{dataset!r}].selection must be best or final")
    existing = _METHODS.get(cls.name)
    if existing is not None and existing.__qualname__ != cls.__qualname__:
        raise TypeError(f"method name {cls.name!r} is registered twice ({existing.__qualname__}, {cls.__qualname__})")
    _METHODS[cls.name] = cls
    return cls


def _discover() -> None:
    """Import every module of ``dfkd_bench.methods`` (the repo's ``methods/``, plus the folders of
    ``$DFKD_BENCH_METHOD_PATH``, separated like ``$PATH``) and of the ``dfkd_bench.methods``
    entry-point group, so that their decorators run."""
    global _DISCOVERED
    if _DISCOVERED:
        return
    _DISCOVERED = True
    package = importlib.import_module("dfkd_bench.methods")
    for folder in filter(None, os.environ.get("DFKD_BENCH_METHOD_PATH", "").split(os.pathsep)):
        if folder not in package.__path__:  # the user's own method files, outside the repository
            package.__path__.append(folder)
    for info in pkgutil.iter_modules(package.__path__):
        try:
            importlib.import_module(f"dfkd_bench.methods.{info.name}")
        except Exception as error:  # one broken method file must not take the others down
            path = os.path.join(getattr(info.module_finder, "path", ""), f"{info.name}.py")
            shown = f"methods/{info.name}.py" if os.path.dirname(path) == package.__path__[0] else path
            _BROKEN[info.name] = _import_failure(shown, error)
            print(f"warning: {_BROKEN[info.name]}; the other methods work", file=sys.stderr)
    try:
        from importlib.metadata import entry_points

        for entry in entry_points(group="dfkd_bench.methods"):
            entry.load()
    except Exception as error:  # a broken third-party plugin must not break the suite
        print(f"warning: could not load a dfkd_bench.methods entry point: {error}")


def get_method(name: str) -> type[Method]:
    _discover()
    if name not in _METHODS:
        if name in _BROKEN:
            raise ConfigError(f"method {name!r} is unavailable: {_BROKEN[name]}")
        close = difflib.get_close_matches(name, list(_METHODS), n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(
            f"unknown method {name!r}; registered methods: {', '.join(sorted(_METHODS))}.{hint} "
            f"(`dfkd-bench list` prints them)"
        )
    return _METHODS[name]


def list_methods() -> dict[str, type[Method]]:
    _discover()
    return dict(sorted(_METHODS.items()))


def param_fields(method: type[Method]) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(method.Params)}


def param_doc(field_: dataclasses.Field) -> str:
    return field_.metadata.get("doc", "")


def hparam(default: Any, doc: str, paper: str | None = None):
    """A hyper-parameter field with its paper default, its meaning and its paper symbol."""
    kwargs: dict[str, Any] = {"metadata": {"doc": doc, "paper": paper}}
    if isinstance(default, (list, dict, set)):
        kwargs["default_factory"] = lambda: type(default)(default)
    else:
        kwargs["default"] = default
    return field(**kwargs)
