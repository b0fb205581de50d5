"""Typed run configuration, overrides, budgets and the run id.

A run is fully described by a :class:`RunConfig`: the method and its
hyper-parameters, the dataset and architectures, the teacher (by content
hash), the engine settings (:class:`TrainConfig`) and the seed. Its
``run_id`` is a hash of everything that can change the result, so the same
experiment always lands in the same folder and a finished run is never
repeated, while a different one never collides.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING, Any, ClassVar

from dfkd_bench.errors import ConfigError, quote
from dfkd_bench.method_api import PerfOptions, get_method, param_fields

if TYPE_CHECKING:
    import torch


def setting(default: Any, doc: str, paper: str | None = None, *, in_hash: bool = True):
    """An engine setting with its meaning, paper symbol, and whether it belongs in the run id."""
    metadata = {"doc": doc, "paper": paper, "in_hash": in_hash}
    if isinstance(default, (list, tuple)):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


LR_SCHEDULES = ("step", "cosine", "cosine_epoch")


@dataclass
class TrainConfig:
    """What the engine does, identically for every method (Tables 5-6 of the paper)."""

    epochs: int = setting(300, "number of epochs", "ep")
    steps_per_epoch: int = setting(50, "iterations per epoch; one iteration = one generator stage + one student stage", "spe")
    generator_steps: int = setting(3, "generator steps per stage", "n_G")
    student_steps: int = setting(60, "student steps per stage", "n_S")
    batch_size: int = setting(256, "synthetic images per source per step (global, over all ranks)", "bs")
    student_images_per_step: int = setting(0, "0: each method's own number of student images per step (ABM one batch, "
                                              "MAD and DFKD-Mem two); N: every method's student trains on N per step, "
                                              "split evenly over its sources (equal-images control: 2 x bs)")
    student_optimizer: str = setting("sgd", "student optimiser: sgd or adam", "opt_S")
    student_lr: float = setting(1e-2, "student learning rate", "lr_S")
    student_weight_decay: float = setting(5e-4, "student weight decay", "wd_S")
    student_momentum: float = setting(0.9, "student SGD momentum (ignored by adam)", "mo_S")
    lr_decay: float = setting(0.1, "factor applied to the student learning rate at each milestone", "ld")
    lr_milestones: list[int] = setting([100, 200], "epochs at which the student learning rate is decayed", "ldep")
    lr_schedule: str = setting("step", "student learning-rate schedule: step (x lr_decay at each of lr_milestones), "
                                       "cosine (lr_S * (1 + cos(pi * t / T)) / 2 at iteration t of T: ZSKT's official "
                                       "CosineAnnealingLR stepped per pseudo-batch) or cosine_epoch (the same over epochs, "
                                       "set once per epoch: the DataFree code's CosineAnnealingLR(T_max=epochs)); "
                                       "the cosine ones ignore lr_decay and lr_milestones")
    student_grad_clip: float = setting(0.0, "clip the student's gradient norm at this value before each step "
                                            "(ZSKT's official code: 5); 0: no clipping")
    lr_min: float = setting(0.0, "the cosine schedules' floor (PyTorch's eta_min; FastDFKD's code: 2e-4)")
    student_warmup_epochs: int = setting(0, "epochs at the start that run the generator stage only: the student is "
                                            "not trained and its schedule starts after them (FastDFKD's --warmup)")
    eval_every: int = setting(50, "evaluate the student on the real test split every this many iterations (and at the end)")
    eval_batch_size: int = setting(1000, "batch size of evaluation", in_hash=False)
    drift_every: int = setting(500, "measure JS drift (Sec. 5.2.3) every this many iterations; 0 disables it")
    drift_tau: int = setting(50, "drift lag tau: the student S_{t-tau} is compared with the teacher on samples of G_t")
    drift_samples: int = setting(1024, "fresh synthetic samples per source for each drift measurement")
    sample_every: int = setting(0, "save a sample grid of every source every this many iterations; 0: only at the end", in_hash=False)
    sample_count: int = setting(64, "images per sample grid", in_hash=False)
    checkpoint_every: int = setting(50, "checkpoint every this many iterations", in_hash=False)
    checkpoint_minutes: float = setting(10.0, "also checkpoint when this many minutes passed since the last one", in_hash=False)
    log_every: int = setting(10, "refresh the progress bar's losses every this many iterations", in_hash=False)
    fused_forward: bool = setting(True, "fast path: one concatenated teacher/student forward over all sources")
    amp: str = setting("auto", "autocast dtype for forwards: auto (bf16 on CUDA, none elsewhere), none or bf16")
    channels_last: str | bool = setting("auto", "channels-last memory format for models and batches: auto (on for "
                                                "CUDA), true or false")
    compile: bool = setting(False, "torch.compile the student and the teacher")
    stage_buffer: bool = setting(False, "sample a whole student stage of G (and EMA G) in one pass into a buffer")
    deterministic: str | bool = setting("auto", "deterministic algorithms: auto (on for CPU, where resume is "
                                                "bit-exact; off for CUDA, where they are slow), true or false",
                                        in_hash=False)
    fused_optimizer: str | bool = setting("auto", "fused optimiser kernels (no host synchronisation): auto (on for "
                                                  "CUDA), true or false", in_hash=False)
    cuda_graphs: str | bool = setting("auto", "replay student steps from CUDA graphs: auto (on for CUDA with one "
                                              "process and an SGD student), true (on a CPU: the same static-input "
                                              "path without graphs) or false", in_hash=False)
    on_nonfinite: str = setting("fail", "a non-finite loss or weight: fail (stop, mark the run failed, keep the last "
                                        "good checkpoint) or continue (keep training, for study)", in_hash=False)

    # Settings whose value "auto" is resolved per device when a run starts (resolved_perf).
    AUTO_SETTINGS: ClassVar[tuple[str, ...]] = ("amp", "channels_last", "deterministic", "fused_optimizer",
                                                "cuda_graphs")
    # CHOSEN: in the run id "auto" stands for the value these settings had by default before
    # "auto" existed (the plain CPU path), so run folders made earlier keep their names. The
    # device is not in the run id either; config.json records what a run actually used.
    _HASH_AS: ClassVar[dict[str, Any]] = {"amp": "none", "channels_last": False}
    # Settings added after runs were stored: left out of the run id while at their default.
    _HASH_OMIT_DEFAULT: ClassVar[dict[str, Any]] = {"student_images_per_step": 0, "lr_schedule": "step",
                                                    "student_grad_clip": 0.0, "lr_min": 0.0,
                                                    "student_warmup_epochs": 0}

    def __post_init__(self) -> None:
        for name in ("channels_last", "deterministic", "fused_optimizer", "cuda_graphs"):
            value = getattr(self, name)
            if isinstance(value, str) and value.lower() in ("true", "false"):
                setattr(self, name, value.lower() == "true")

    def learning_rate(self, iteration: int) -> float:
        """The student's learning rate at ``iteration`` (counting from 0), from the iteration number alone,
        so a resumed run needs no scheduler state. ``cosine``: ``lr_S (1 + cos(pi t / T)) / 2`` with t the
        iteration and T the run's iterations (PyTorch's CosineAnnealingLR, stepped once per iteration);
        ``cosine_epoch``: the same with t the epoch and T the epochs (stepped once per epoch). Both decay to
        ``lr_min`` (eta_min) and count from the end of ``student_warmup_epochs``."""
        epoch = iteration // self.steps_per_epoch
        if self.lr_schedule in ("cosine", "cosine_epoch"):
            # the clock starts after the student's warm-up epochs (FastDFKD steps its scheduler only after them)
            warmup = self.student_warmup_epochs
            if self.lr_schedule == "cosine":
                t, horizon = iteration - warmup * self.steps_per_epoch, self.total_iterations - warmup * self.steps_per_epoch
            else:
                t, horizon = epoch - warmup, self.epochs - warmup
            t = min(max(t, 0), horizon)
            return self.lr_min + (self.student_lr - self.lr_min) * 0.5 * (1.0 + math.cos(math.pi * t / horizon))
        decays = sum(1 for milestone in self.lr_milestones if epoch >= milestone)
        return self.student_lr * self.lr_decay ** decays

    def hashed_value(self, name: str) -> Any:
        value = getattr(self, name)
        return self._HASH_AS.get(name, value) if value == "auto" else value

    def resolved(self, device: "torch.device | str") -> "TrainConfig":
        """This configuration with every ``auto`` setting decided for ``device``."""
        cuda = str(device).startswith("cuda")
        choices = {"amp": "bf16" if cuda else "none", "channels_last": cuda, "deterministic": not cuda,
                   "fused_optimizer": cuda, "cuda_graphs": cuda and self.student_optimizer == "sgd"}
        changes = {name: choices[name] for name in self.AUTO_SETTINGS if getattr(self, name) == "auto"}
        return dataclasses.replace(self, **changes)

    @property
    def total_iterations(self) -> int:
        return self.epochs * self.steps_per_epoch

    @property
    def perf(self) -> PerfOptions:
        """The speed switches; call on a :meth:`resolved` configuration (``auto`` reads as off)."""
        return PerfOptions(fused_forward=self.fused_forward, amp="bf16" if self.amp == "bf16" else "none",
                           channels_last=self.channels_last is True, compile=self.compile,
                           stage_buffer=self.stage_buffer, fused_optimizer=self.fused_optimizer is True,
                           cuda_graphs=self.cuda_graphs is True)

    def validate(self) -> None:
        """Every value in its range, as one error line naming the setting (``--set KEY=VALUE``)."""
        for f in fields(self):  # a config built in code or read from a file bypasses coerce()
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{f.name} must be a finite number, got {value}; pass e.g. --set {f.name}=0.1")
        positive = ("epochs", "steps_per_epoch", "student_steps", "batch_size", "eval_batch_size", "checkpoint_every")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        # One iteration runs at least one student step: more than 10^12 iterations is a typo.
        if self.total_iterations > 10**12:
            raise ConfigError(f"epochs x steps_per_epoch = {self.total_iterations} iterations is beyond any budget; "
                              "pass e.g. --set ep=300 --set spe=50")
        for name in ("batch_size", "eval_batch_size", "drift_samples", "sample_count", "student_images_per_step"):
            if getattr(self, name) > 2**31 - 1:
                raise ConfigError(f"{name}={getattr(self, name)} is too large (at most {2**31 - 1})")
        if self.student_lr < 0:
            raise ConfigError(f"student_lr (lr_S) must be >= 0 (0 freezes the student), got {self.student_lr}")
        if self.student_weight_decay < 0:
            raise ConfigError(f"student_weight_decay (wd_S) must be >= 0, got {self.student_weight_decay}")
        if not 0 <= self.student_momentum < 1:
            raise ConfigError(f"student_momentum (mo_S) must be in [0, 1), got {self.student_momentum}")
        if not 0 < self.lr_decay <= 1:
            raise ConfigError(f"lr_decay (ld) is the factor applied at each milestone and must be in (0, 1], "
                              f"got {self.lr_decay}")
        if not isinstance(self.lr_milestones, list) or not all(
                isinstance(m, int) and not isinstance(m, bool) and m >= 0 for m in self.lr_milestones):
            raise ConfigError(f"lr_milestones (ldep) must be epochs (integers >= 0) like 100,200, "
                              f"got {self.lr_milestones!r}")
        if not self.checkpoint_minutes > 0:
            raise ConfigError(f"checkpoint_minutes must be > 0, got {self.checkpoint_minutes}")
        for name in ("generator_steps", "eval_every", "drift_every", "drift_tau", "sample_every", "log_every",
                     "student_images_per_step"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ConfigError(f"lr_schedule={self.lr_schedule!r} is not one of {', '.join(LR_SCHEDULES)}")
        if not self.student_grad_clip >= 0:
            raise ConfigError(f"student_grad_clip must be >= 0 (0: no clipping), got {self.student_grad_clip}")
        if not 0 <= self.lr_min <= self.student_lr:
            raise ConfigError(f"lr_min must be in [0, student_lr = {self.student_lr}], got {self.lr_min}")
        if not 0 <= self.student_warmup_epochs < self.epochs:
            raise ConfigError(f"student_warmup_epochs must be in [0, epochs = {self.epochs}), "
                              f"got {self.student_warmup_epochs}")
        if self.student_optimizer not in ("sgd", "adam"):
            raise ConfigError(f"student_optimizer={self.student_optimizer!r} is not one of sgd, adam")
        if self.amp not in ("auto", "none", "bf16"):
            raise ConfigError(f"amp={self.amp!r} is not one of auto, none, bf16")
        for name in ("channels_last", "deterministic", "fused_optimizer", "cuda_graphs"):
            if getattr(self, name) not in ("auto", True, False):
                raise ConfigError(f"{name}={getattr(self, name)!r} is not one of auto, true, false")
        if self.on_nonfinite not in ("fail", "continue"):
            raise ConfigError(f"on_nonfinite={self.on_nonfinite!r} is not one of fail, continue")
        if self.drift_every and not 1 <= self.drift_tau:
            raise ConfigError(f"drift_tau must be >= 1 (Sec. 5.2.3: 0 < tau < t), got {self.drift_tau}")
        if self.drift_every and self.drift_samples < 1:
            raise ConfigError(f"drift_samples must be positive, got {self.drift_samples}")


@dataclass
class TeacherSpec:
    """Which teacher, by content: ``sha256`` of its weights (``teachers.teacher_sha256``) is what the run id uses."""

    arch: str
    path: str
    sha256: str
    mean: list[float]
    std: list[float]
    test_accuracy: float | None = None


@dataclass
class RunConfig:
    method: str
    dataset: str
    seed: int
    teacher: TeacherSpec
    student_arch: str
    image_size: int
    num_classes: int
    channels: int
    student_mean: list[float]
    student_std: list[float]
    train: TrainConfig
    params: dict[str, Any]
    preset: str = ""
    budget: str = "default"
    data_root: str | None = None
    protocol: str = "common"
    """``common`` (one protocol for every method: the preset's) or ``paper`` (the method's own)."""
    published: dict[str, Any] | None = None
    """A paper-protocol run's published number (PaperProtocol.published); None for common runs."""

    # ------------------------------------------------------------ identity ---
    def hashed_dict(self) -> dict[str, Any]:
        """Everything that can change the result (not paths, not logging cadence)."""
        train = {f.name: self.train.hashed_value(f.name) for f in fields(TrainConfig) if f.metadata.get("in_hash", True)
                 and not (f.name in TrainConfig._HASH_OMIT_DEFAULT
                          and getattr(self.train, f.name) == TrainConfig._HASH_OMIT_DEFAULT[f.name])}
        teacher = {k: v for k, v in asdict(self.teacher).items() if k not in ("path", "test_accuracy")}
        return {
            "method": self.method, "dataset": self.dataset, "seed": self.seed, "teacher": teacher,
            "student_arch": self.student_arch, "image_size": self.image_size, "num_classes": self.num_classes,
            "channels": self.channels, "student_mean": self.student_mean, "student_std": self.student_std,
            "train": train, "params": _hashed_params(self.method, self.params),
            # CHOSEN: the protocol enters the run id only when it is not "common", so every run id
            # made before protocols existed stays the same; ``published`` never enters it.
            **({"protocol": self.protocol} if self.protocol != "common" else {}),
        }

    @property
    def run_id(self) -> str:
        canonical = json.dumps(self.hashed_dict(), sort_keys=True, separators=(",", ":"), default=str)
        return hashlib.sha256(canonical.encode()).hexdigest()[:12]

    @property
    def run_name(self) -> str:
        """Folder name: readable prefix plus the configuration hash."""
        return f"{self.method}-{self.dataset}-{self.student_arch.replace(':', '_')}-s{self.seed}-{self.run_id}"

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        if data.get("published") is None:  # a common run has no "published" (the report's contract)
            data.pop("published", None)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RunConfig":
        data = dict(data)
        data["teacher"] = TeacherSpec(**data["teacher"])
        train_fields = {f.name for f in fields(TrainConfig)}
        data["train"] = TrainConfig(**{k: v for k, v in data["train"].items() if k in train_fields})
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def method_params(self):
        """The method's ``Params`` dataclass instance built from ``self.params``."""
        method = get_method(self.method)
        return method.Params(**self.params)


def _later_params(method_name: str) -> dict[str, Any]:
    """A method's parameters added after runs were stored, with the default they had implicitly."""
    from dfkd_bench.method_api import list_methods

    method = list_methods().get(method_name)
    return dict(getattr(getattr(method, "Params", None), "HASH_OMIT_DEFAULT", {})) if method is not None else {}


def with_later_defaults(method_name: str, train: dict[str, Any],
                        params: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A stored configuration's engine and method settings with those added after it was made filled in
    at the default it ran with (the settings the run id leaves out at their default): a run stored
    before ``lr_schedule`` existed ran the ``step`` schedule. For reading stored runs (the report)."""
    return {**TrainConfig._HASH_OMIT_DEFAULT, **train}, {**_later_params(method_name), **params}


def _hashed_params(method_name: str, params: dict[str, Any]) -> dict[str, Any]:
    """The method's parameters as the run id sees them: those its ``Params`` class lists in
    ``HASH_OMIT_DEFAULT`` (parameters added after runs were stored, as TrainConfig._HASH_OMIT_DEFAULT)
    are left out while at that default, so every run made before they existed keeps its id."""
    omit = _later_params(method_name)
    return {k: v for k, v in params.items() if not (k in omit and v == omit[k])}


# ---------------------------------------------------------------- overrides ---

def _paper_aliases() -> dict[str, str]:
    """Paper symbols (``lambda3``, ``n_S``, ``alpha`` ...) -> setting names."""
    from dfkd_bench.method_api import list_methods

    aliases = {}
    for f in fields(TrainConfig):
        if f.metadata.get("paper"):
            aliases[f.metadata["paper"]] = f.name
    for method in list_methods().values():
        for f in dataclasses.fields(method.Params):
            if f.metadata.get("paper"):
                aliases[f.metadata["paper"]] = f.name
    return aliases


MAX_INTEGER = 2**63 - 1
"""The largest integer a setting takes (int64): beyond it a value is a typo, whatever the setting."""


def parse_value(text: str, key: str = "") -> Any:
    """``--set`` values: JSON when it parses (numbers, true/false, lists), else the string. A number of
    thousands of digits or a list nested thousands deep is one error line naming ``key``."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        lowered = text.lower()
        if lowered in ("true", "false"):
            return lowered == "true"
        return text
    except (ValueError, RecursionError):  # an integer beyond Python's digit limit; absurd nesting
        raise ConfigError(f"{key or 'a --set value'}: {quote(text)} is not a value any setting takes (a number of "
                          "thousands of digits, or lists nested too deep); pass a number, a word or a list") from None
    _check_integers(value, key)
    return value


def _check_integers(value: Any, key: str) -> None:
    """Every integer in ``value`` (a number or a list) within int64."""
    for item in value if isinstance(value, list) else [value]:
        if isinstance(item, int) and not isinstance(item, bool) and abs(item) > MAX_INTEGER:
            raise ConfigError(f"{key or 'a --set value'}: {quote(item)} is out of range (integers go up to "
                              f"2^63 - 1); pass a smaller number")


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["a=1", "lambda3=0.1"]`` -> ``{"a": 1, "nll_weight": 0.1}`` (paper symbols resolved).

    A setting given twice (also once by name and once by its paper symbol) is refused: silently
    keeping the last one hides a typo in a long command.
    """
    aliases = _paper_aliases()
    overrides: dict[str, Any] = {}
    given_as: dict[str, str] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {quote(item)}")
        key, value = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"--set expects key=value with a setting name before '=', got {quote(item)}")
        if len(key) > MAX_KEY_CHARS:
            raise ConfigError(f"unknown setting {quote(key)} (setting names are short words; "
                              "`dfkd-bench list --settings` prints them)")
        name = aliases.get(key, key)
        if name in overrides:
            also = "" if given_as[name] == key else f" (as {given_as[name]!r})"
            raise ConfigError(f"--set {key} is given twice{also}; keep one --set {name}=VALUE")
        overrides[name] = parse_value(value.strip(), key)
        given_as[name] = key
    return overrides


MAX_KEY_CHARS = 64  # no setting name or paper symbol is longer; a longer one is not looked up (difflib)


def _finite(value: Any, key: str) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{key} must be a finite number, got {value}")
    return value


def coerce(value: Any, example: Any, key: str) -> Any:
    """Convert an override to the type of the setting it replaces; non-finite numbers are refused."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{key} must be a finite number, got {value}")
    if isinstance(example, bool):
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} expects true or false, got {value!r}")
    if isinstance(example, int) and not isinstance(example, bool):
        if isinstance(value, (int, float)) and not isinstance(value, bool) and float(value).is_integer():
            return int(value)
        raise ConfigError(f"{key} expects an integer, got {value!r}")
    if isinstance(example, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return _finite(float(value), key)
        raise ConfigError(f"{key} expects a number, got {value!r}")
    if isinstance(example, list):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            items = [value]
        elif isinstance(value, str):
            items = [parse_value(v.strip()) for v in value.split(",") if v.strip()]
        elif isinstance(value, list):
            items = value
        else:
            raise ConfigError(f"{key} expects a list, got {value!r}")
        # Elements take the type of the default's elements (lr_milestones: integers).
        item_example = example[0] if example else None
        if item_example is None:
            return [_finite(item, key) for item in items]
        try:
            return [coerce(item, item_example, key) for item in items]
        except ConfigError:
            kind = "integers like 100,200" if isinstance(item_example, int) else "numbers like 0.5,0.25"
            raise ConfigError(f"{key} expects comma-separated {kind}, got {value!r}") from None
    if isinstance(example, str):
        if isinstance(value, (list, dict)):
            raise ConfigError(f"{key} expects a word like {example!r}, got {value!r}")
        return str(value).lower() if isinstance(value, bool) else str(value)
    return value


def apply_train_overrides(train: TrainConfig, overrides: dict[str, Any]) -> TrainConfig:
    names = {f.name for f in fields(TrainConfig)}
    defaults = TrainConfig()
    # "auto" settings take auto, true or false whatever a preset set them to.
    changes = {k: coerce(v, getattr(defaults if k in TrainConfig.AUTO_SETTINGS else train, k), k)
               for k, v in overrides.items() if k in names}
    return dataclasses.replace(train, **changes)


def resolve_method_params(method_name: str, shared: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """The method's parameters: paper defaults < preset values < user overrides.

    Only parameters the method declares are kept, so e.g. an ABM run is the
    same run (same id) whatever alpha a sweep gives MAD.
    """
    method = get_method(method_name)
    declared = param_fields(method)
    defaults = asdict(method.Params())
    values = dict(defaults)
    for source in (shared, overrides):
        for key, value in source.items():
            if key in declared:
                values[key] = coerce(value, defaults[key], key)
    params = method.Params(**values)
    params.validate()
    return asdict(params)


def check_override_keys(method_names: list[str], overrides: dict[str, Any]) -> None:
    """Every ``--set`` key must mean something to the engine or to one of the methods."""
    engine_keys = {f.name for f in fields(TrainConfig)}
    method_keys: set[str] = set()
    for name in method_names:
        method_keys |= set(param_fields(get_method(name)))
    for key in overrides:
        if key not in engine_keys and key not in method_keys:
            import difflib

            close = difflib.get_close_matches(key, sorted(engine_keys | method_keys | set(_paper_aliases())), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ConfigError(
                f"unknown setting {key!r} for methods {', '.join(method_names)}{hint} "
                f"(`dfkd-bench list --settings` prints all settings)"
            )
