"""THE training loop shared by every method. It never names a method.

One iteration (the paper's "step"; ``epochs x steps_per_epoch`` of them) is::

    n_G x method.generator_step()          # the generator stage
    method.end_generator_stage()            # e.g. MAD's EMA update (Eq. 5)
    n_S x [method.student_loss() -> backward -> student optimiser step]

Around it the engine owns what must be identical for all methods: seeds,
the student, its optimiser and learning-rate schedule, evaluation on the real
test split, the drift measurement of Sec. 5.2.3, sample grids, records,
checkpoints and exact resume, and data parallelism. Measurements use their
own random streams and never change what is trained.

Stopping. A stop request (Ctrl-C, SIGTERM, SLURM's SIGUSR2) is honoured after the
optimiser step during which it came, in any stage: after every generator, student
and pre-training step the engine passes a *preemption point*; there it writes a
checkpoint of the run in the middle of its stage -- the position (stage and steps
done), the running loss sums, every random state, and what the method keeps only
inside a stage (``Method.stage_state_attributes``: the stage's noise, the step it
reached ...) -- and stops; the same command continues from that step, with the
records an uninterrupted run writes (bit-identical on a CPU). A method that does
not declare its state inside a stage falls back to the start of the iteration
(the engine keeps a copy of that state while such a method runs) and says which
steps are lost. Before the first step of a start nothing has been trained since
the last checkpoint, so a stop then ends the run at once.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
import os
import platform
import random
import signal
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from dfkd_bench import __version__
from dfkd_bench.train.batchnorm import no_batchnorm_sync, synchronise_batchnorm
from dfkd_bench.config import RunConfig
from dfkd_bench.data.loaders import build_dataset, load_as_tensors
from dfkd_bench.errors import CheckpointError, DfkdError, user_message
from dfkd_bench.train.graphs import StaticStep
from dfkd_bench.train.losses import js_divergence_per_sample
from dfkd_bench.method_api import DistributedInfo, MethodContext, float32_logits, get_method, make_optimizer
from dfkd_bench.models import build_model
from dfkd_bench.runtime import resolve_device, seed_everything  # noqa: F401 (engine.resolve_device)
from dfkd_bench.store import RunStore
from dfkd_bench.teachers.loading import NormalizedModel, build_teacher

# ------------------------------------------------------------------ helpers ---


def derived_seed(seed: int, stream: str, step: int = 0) -> int:
    """Independent, reproducible seeds for the separate random streams of a run."""
    offsets = {"method": 1, "drift": 2, "samples": 3}
    return (seed * 1_000_003 + offsets[stream] * 7_919 + step * 104_729) % (2**63 - 1)


def rng_state(method_rng: torch.Generator) -> dict[str, Any]:
    """Every random state of the process, as tensors and plain containers only, so that a checkpoint
    loads with ``torch.load(weights_only=True)`` (numpy's state holds an array: stored as a tensor)."""
    name, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"name": str(name), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
                  "pos": int(position), "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
        "torch": torch.get_rng_state(),
        "method": method_rng.get_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any], method_rng: torch.Generator) -> None:
    random.setstate(state["python"])
    numpy_state = state["numpy"]
    np.random.set_state((numpy_state["name"], numpy_state["keys"].numpy().astype(np.uint32), numpy_state["pos"],
                         numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    method_rng.set_state(state["method"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def git_commit() -> str:
    try:
        root = Path(__file__).resolve().parent.parent
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5)
        if out.returncode != 0:
            return "unknown"
        return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


@functools.lru_cache(maxsize=1)
def code_version() -> dict[str, str]:
    """The code this process runs: the package version and the git commit (``-dirty`` with local edits)."""
    return {"version": __version__, "commit": git_commit()}


def _unsaveable(value: Any) -> str:
    """"" when a checkpoint loaded weights-only can hold ``value`` (tensors, numbers, strings, None, in
    lists, tuples and dicts); else the type of what it cannot hold."""
    if value is None or isinstance(value, (Tensor, bool, int, float, str)):
        return ""
    if type(value) in (list, tuple):
        return next((kind for kind in map(_unsaveable, value) if kind), "")
    if type(value) is dict:
        return next((kind for item in value.items() for kind in map(_unsaveable, item) if kind), "")
    return type(value).__name__


def _copy_tensors(value: Any) -> Any:
    """A copy of a checkpoint state whose tensors do not change with the live ones (records, which are
    never changed once written, are shared)."""
    if isinstance(value, Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {key: (list(item) if key == "records" else _copy_tensors(item)) for key, item in value.items()}
    if type(value) in (list, tuple):
        return type(value)(_copy_tensors(item) for item in value)
    return value


def environment_info(device: torch.device, distributed: DistributedInfo) -> dict[str, Any]:
    import importlib.metadata as md

    versions = {}
    for package in ("torch", "torchvision", "timm", "numpy", "submitit"):
        try:
            versions[package] = md.version(package)
        except md.PackageNotFoundError:
            versions[package] = None
    info = {
        "dfkd_bench": __version__, "git_commit": git_commit(), "python": sys.version.split()[0],
        "platform": platform.platform(), "hostname": platform.node(), "versions": versions,
        "device": str(device), "world_size": distributed.world_size, "torch_threads": torch.get_num_threads(),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"), "slurm_array_task_id": os.environ.get("SLURM_ARRAY_TASK_ID"),
        # Runs sharing this device (the launchers' --runs-per-gpu K) and this run's slot among them.
        "runs_per_gpu": int(os.environ.get("DFKD_BENCH_RUNS_PER_GPU") or 1),
        "pack_slot": int(os.environ["DFKD_BENCH_PACK_SLOT"]) if os.environ.get("DFKD_BENCH_PACK_SLOT") else None,
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def fault_point(name: str, iteration: int) -> None:
    """Fault injection for the resume tests: ``DFKD_BENCH_FAULT=name@iteration`` SIGKILLs
    this process at that point, so tests can kill a run at precise, nasty moments
    (between writing a checkpoint and committing it, mid-stage, right after a record)."""
    if os.environ.get("DFKD_BENCH_FAULT") == f"{name}@{iteration}":
        os.kill(os.getpid(), signal.SIGKILL)


def signal_point(phase: str, iteration: int, step: int) -> None:
    """Signal injection for the stop tests: ``DFKD_BENCH_SIGNAL=phase:iteration:step`` (optionally
    ``...:SIGNAME``, default SIGTERM) sends this process the signal while it runs optimiser step
    ``step`` (1-based) of ``phase`` in iteration ``iteration`` (0-based), so a test can check that the
    stop comes right after that step, whatever the stage."""
    wanted = os.environ.get("DFKD_BENCH_SIGNAL")
    if wanted:
        parts = wanted.split(":")
        if parts[:3] == [phase, str(iteration), str(step)]:
            os.kill(os.getpid(), getattr(signal, parts[3] if len(parts) > 3 else "SIGTERM"))


# Record fields that differ between two runs of the same configuration (timing and memory).
# Everything else in a record is reproduced exactly by a resumed run (tests/test_resume.py).
NONDETERMINISTIC_RECORD_KEYS = frozenset({"wall_time", "time/synthesis", "time/student", "peak_memory_mb"})


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory so far: allocated by torch on a GPU, the process's resident peak on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


class StopRequest:
    """Set by a signal (Ctrl-C, SIGTERM, SLURM's preemption signal); honoured after the optimiser step
    during which it came (see the module docstring). ``training`` turns True when the engine first asks
    (after its first step of this start): before that a stop loses nothing, and :func:`stop_on_signals`
    ends the run at once (e.g. while the test split is read)."""

    def __init__(self) -> None:
        self._requested = False
        self.reason = ""
        self.training = False

    @property
    def requested(self) -> bool:
        self.training = True
        return self._requested

    @requested.setter
    def requested(self, value: bool) -> None:
        self._requested = bool(value)

    def request(self, reason: str) -> None:
        self._requested = True
        self.reason = reason


class RunInterrupted(Exception):
    """The run stopped after a stop request; its checkpoint is saved (or nothing was trained since the last)."""


class _StopHere(BaseException):
    """Raised at a preemption point when the ranks agreed to stop; caught by :meth:`Trainer.train`, which
    checkpoints and raises :class:`RunInterrupted`. A BaseException, so that no method's ``except
    Exception`` swallows it on its way out of a pre-training loop."""


class RunDiverged(DfkdError):
    """A loss or a student weight became NaN or infinite (``on_nonfinite=fail``): the run stops
    without writing a checkpoint, so its last checkpoint is the last good state."""


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR2)
"""Ctrl-C, the scheduler's SIGTERM, and SIGUSR2: what submitit asks SLURM to send before a time limit or
preemption (``#SBATCH --signal=USR2@120`` does the same for a ``dfkd-bench run`` in a batch script)."""


@contextlib.contextmanager
def stop_on_signals(stop: StopRequest, signals=STOP_SIGNALS):
    """First signal: checkpoint after the current optimiser step and stop (at once, nothing lost, before
    the first step). Second SIGINT: stop at once, without a checkpoint."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {}

    def handler(signum, frame):
        if stop._requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        stop.request(signal.Signals(signum).name)
        if not stop.training:
            raise RunInterrupted(f"stopped by {stop.reason} while setting up, before its first step (nothing "
                                 "trained since the last checkpoint, nothing lost); run the same command again to "
                                 "resume")

    for sig in signals:
        previous[sig] = signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


# --------------------------------------------------------------- evaluation ---


class TestSet:
    """The real test split, preloaded as uint8 tensors when small, else streamed."""

    def __init__(self, config: RunConfig, device: torch.device, batch_size: int, workers: int = 0,
                 progress: bool = True):
        dataset = build_dataset(config.dataset, config.data_root, "test", image_size=config.image_size)
        self.device = device
        self.batch_size = batch_size
        self.images: Tensor | None = None
        if config.image_size <= 64:
            images, labels = load_as_tensors(dataset, num_workers=workers, progress=progress)
            self.images, self.labels = images.to(device), labels.to(device)
            self.size = len(labels)
        else:
            from torch.utils.data import DataLoader

            self.loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, pin_memory=device.type == "cuda")
            self.size = len(dataset)

    def batches(self):
        if self.images is not None:
            for start in range(0, self.size, self.batch_size):
                yield (self.images[start:start + self.batch_size].float() / 255,
                       self.labels[start:start + self.batch_size])
        else:
            for images, labels in self.loader:
                yield images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)

    @torch.no_grad()
    def predictions(self, model: nn.Module) -> tuple[Tensor, Tensor]:
        """Logits of ``model`` (in eval mode) over the whole test split, and the labels."""
        was_training = model.training
        model.eval()
        logits, labels = [], []
        for images, target in self.batches():
            logits.append(model(images).float())
            labels.append(target)
        model.train(was_training)
        return torch.cat(logits), torch.cat(labels)


# ------------------------------------------------------------------- engine ---


class Trainer:
    """Builds everything a run needs and runs the loop."""

    def __init__(self, config: RunConfig, results_dir: str | os.PathLike, *, device: str = "auto",
                 progress: bool = True, distributed: DistributedInfo | None = None,
                 stop: StopRequest | None = None, workers: int = 0):
        self.config = config
        self.store = RunStore(results_dir, config.run_name)
        self.device = resolve_device(device)
        # Every "auto" setting decided for this device (recorded in config.json as resolved_perf).
        self.train_cfg = config.train.resolved(self.device)
        self.distributed = distributed or DistributedInfo()
        self.progress = progress and self.distributed.is_main
        self.stop = stop or StopRequest()
        self.workers = workers
        self.notes: list[str] = []
        # The code each part of the run ran with: [{"from_iteration", "version", "commit"}, ...] (config.json).
        self.code_history: list[dict[str, Any]] = []
        # Running state (all of it goes into checkpoints).
        self.iteration = 0
        self.records: list[dict[str, Any]] = []
        self.sums: dict[str, Tensor] = {}
        self.counts: dict[str, int] = {}
        self.drift_snapshots: dict[int, dict[str, Tensor]] = {}
        self.elapsed_before = 0.0
        self.best_accuracy = -1.0
        self._last_finite: Tensor | None = None  # last iteration whose loss sums were all finite (on device)
        # Cumulative budget counters (issue "budgets that are fair"): images through the student in its
        # training steps and through the teacher in training, and seconds per stage.
        self.counters: dict[str, float] = {"student_images": 0, "teacher_images": 0, "time/synthesis": 0.0,
                                           "time/student": 0.0}
        self._phase: str | None = None  # "synthesis" or "student" while a stage runs
        self._stage_marks: list[tuple[str, Any, Any]] = []  # CUDA events of stages not yet added up
        # Inside an iteration: (stage, optimiser steps of it done) at the last preemption point; None between.
        self.position: tuple[str, int] | None = None
        # Data parallel: whether the ranks agree on a stop after every step, and on which CPU (gloo) group
        # (None: the default group).
        self._stop_every_step = False
        self._stop_group: Any = None
        self._iteration_start: dict[str, Any] | None = None  # fallback copy (see _without_stage_state)

    # ------------------------------------------------------------- setup ---
    def note(self, message: str, show: bool = True) -> None:
        """Keep ``message`` in the run's config.json; print it too unless ``show`` is False
        (for facts a user cannot act on, e.g. a term skipped because the teacher lacks BN)."""
        if message not in self.notes:
            self.notes.append(message)
            if show and self.distributed.is_main:
                tqdm.write(f"[{self.config.run_name}] note: {message}")

    def _wrap_distributed(self, module: nn.Module) -> nn.Module:
        if self.distributed.world_size == 1:
            return module
        from torch.nn.parallel import DistributedDataParallel

        synchronise_batchnorm(module, self.distributed.process_group)
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=device_ids, process_group=self.distributed.process_group,
                                       broadcast_buffers=False)

    def build(self) -> None:
        """Teacher, student, method and optimiser: everything an iteration needs (no data)."""
        cfg, train = self.config, self.train_cfg
        train.validate()
        if train.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True, warn_only=True)
        else:
            torch.use_deterministic_algorithms(False)
            if self.device.type == "cuda":
                torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest kernels
        world = self.distributed.world_size
        if train.batch_size % world:
            raise DfkdError(f"batch_size {train.batch_size} is not divisible by the {world} processes")
        if train.student_images_per_step % world:
            raise DfkdError(f"student_images_per_step {train.student_images_per_step} is not divisible by the "
                            f"{world} processes")
        self.local_batch = train.batch_size // world
        # Same seed => same student and generator initialisation for every method.
        seed_everything(cfg.seed)
        student_net = build_model(cfg.student_arch, cfg.num_classes, cfg.channels, cfg.image_size)
        self.student_module = NormalizedModel(student_net, cfg.student_mean, cfg.student_std).to(self.device)
        self.teacher = build_teacher(cfg.teacher, cfg.num_classes, cfg.channels, cfg.image_size, self.device)
        perf = train.perf
        if perf.amp == "bf16" and self.device.type == "cpu":
            self.note("bf16 autocast on CPU is slow; it is meant for GPUs")
        if perf.amp == "bf16":  # the losses see float32 logits (method_api.Float32Linear)
            for name, model in (("student", self.student_module), ("teacher", self.teacher)):
                if not float32_logits(model, cfg.num_classes):
                    self.note(f"bf16: the {name} has no nn.Linear classifier; its logits leave autocast in bf16",
                              show=False)
        if perf.channels_last:
            self.student_module = self.student_module.to(memory_format=torch.channels_last)
            self.teacher = self.teacher.to(memory_format=torch.channels_last)
        self.student = self._wrap_distributed(self.student_module)
        if perf.compile:
            self.student = torch.compile(self.student)
            self.teacher = torch.compile(self.teacher)
        self.method_rng = torch.Generator(device=self.device).manual_seed(derived_seed(cfg.seed, "method"))
        ctx = MethodContext(
            teacher=self.teacher, student=self.student, student_module=self.student_module,
            num_classes=cfg.num_classes, image_shape=(cfg.channels, cfg.image_size, cfg.image_size),
            batch_size=self.local_batch, student_steps=train.student_steps, device=self.device,
            rng=self.method_rng, perf=perf, distributed=self.distributed, note=self.note,
            wrap_distributed=self._wrap_distributed,
            student_images_per_step=train.student_images_per_step // world, dataset=cfg.dataset,
            preemption_point=self.preemption_point,
        )
        self.method = get_method(cfg.method)(cfg.method_params(), ctx)
        if world > 1:
            self._stop_every_step, self._stop_group = self._cpu_group()
        self._count_rows(self.teacher, "teacher_images", ("synthesis", "student"))
        self._count_rows(self.student_module, "student_images", ("student",))
        self.static_step = self._static_student_step(perf)
        if train.student_optimizer == "sgd":
            self.optimizer = make_optimizer("sgd", self.student_module.parameters(), perf, lr=train.student_lr,
                                            momentum=train.student_momentum, weight_decay=train.student_weight_decay)
        else:
            self.optimizer = make_optimizer("adam", self.student_module.parameters(), perf, lr=train.student_lr,
                                            weight_decay=train.student_weight_decay)
        self.perf_fallbacks = perf.fallbacks  # filled by every make_optimizer of the run (method's too)
        for line in perf.fallbacks:
            self.note(f"fused optimiser not available, running unfused: {line}")

    def resolved_perf(self) -> dict[str, Any]:
        """Every ``auto`` setting as decided for this device, and what fell back (config.json)."""
        resolved: dict[str, Any] = {name: getattr(self.train_cfg, name) for name in self.train_cfg.AUTO_SETTINGS}
        fallbacks = list(getattr(self, "perf_fallbacks", []))
        if fallbacks:
            # asked for, not had: a fused optimiser the torch build lacks runs unfused (same mathematics)
            resolved["fused_optimizer_fallback"] = fallbacks
        return resolved

    def setup(self) -> None:
        """:meth:`build`, plus the test split, the drift snapshot model and the running state."""
        cfg, train = self.config, self.train_cfg
        self.build()
        self.snapshot_student = copy.deepcopy(self.student_module).eval()
        for parameter in self.snapshot_student.parameters():
            parameter.requires_grad_(False)
        if self.distributed.is_main:
            self.test_set = TestSet(cfg, self.device, train.eval_batch_size, self.workers, self.progress)
            teacher_logits, labels = self.test_set.predictions(self.teacher)
            self.teacher_predictions = teacher_logits.argmax(1)
            self.teacher_test_accuracy = 100.0 * (self.teacher_predictions == labels).float().mean().item()

    def learning_rate(self, iteration: int) -> float:
        """The student's learning rate (``TrainConfig.learning_rate``: step decay at the milestone epochs, or
        cosine; derived from the iteration, so resume needs no scheduler state)."""
        return self.train_cfg.learning_rate(iteration)

    def set_learning_rate(self) -> None:
        """Set the student's learning rate of the current iteration on its optimiser."""
        for group in self.optimizer.param_groups:
            group["lr"] = self.learning_rate(self.iteration)

    def clip_student_gradients(self) -> None:
        """``student_grad_clip`` > 0: clip the student's gradient norm (ZSKT: clip_grad_norm_(S, 5)), on the
        device (no host read), after backward and before the optimiser step."""
        if self.train_cfg.student_grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.student_module.parameters(), self.train_cfg.student_grad_clip)

    def run_iteration(self, start: tuple[str, int] | None = None) -> None:
        """One iteration: the generator stage, then the student stage. The benchmark times exactly this.
        ``start``: resume it after that many steps of that stage (a checkpoint taken in its middle).

        Nothing in here synchronises the host with the device (no ``.item()``, no host
        tensors copied over): tests/test_host_sync.py fails if something does.
        """
        phase, done = start or ("generator", 0)
        if phase == "generator":
            self.generator_stage(done)
            done = 0
        # student_warmup_epochs: the first epochs only synthesise (FastDFKD's --warmup); a host-side integer test
        if self.iteration >= self.train_cfg.student_warmup_epochs * self.train_cfg.steps_per_epoch:
            self.student_stage(done)

    def generator_stage(self, first: int = 0, end_stage: bool = True) -> None:
        """The n_G generator steps (from step ``first`` on, when resuming in the middle of the stage), then
        ``method.end_generator_stage()`` (which prepares the student stage); ``end_stage=False`` leaves the
        latter out (the step-equivalence replay's last stage)."""
        steps = self.train_cfg.generator_steps
        with self._stage("synthesis"):
            for step in range(first, steps):
                signal_point("generator", self.iteration, step + 1)
                self.accumulate(self.method.generator_step())
                self.preemption_point("generator", step + 1)
            if end_stage:
                self.method.end_generator_stage()

    def student_stage(self, first: int = 0) -> None:
        """The n_S student steps (from step ``first`` on, when resuming in the middle of the stage)."""
        steps = self.train_cfg.student_steps
        with self._stage("student"):
            for step in range(first, steps):
                signal_point("student", self.iteration, step + 1)
                self.student_step()
                if step + 1 < steps:  # after the last one the iteration ends: the loop checks there
                    self.preemption_point("student", step + 1)

    # ------------------------------------------------------------ stopping ---
    def preemption_point(self, phase: str, steps: int) -> None:
        """After each optimiser step of a stage (``steps`` of ``phase`` done in this iteration): stop here
        when a stop was requested. One attribute read alone (data parallel: one CPU all-reduce)."""
        self.position = (phase, steps)
        if self._stop_agreed():
            raise _StopHere
        if phase not in ("generator", "student"):  # a method's own loop (the engine's signal before each step)
            signal_point(phase, self.iteration, steps + 1)

    def _stop_agreed(self) -> bool:
        if self.distributed.world_size == 1:
            return self.stop.requested
        if not self._stop_every_step:  # no CPU group: the ranks agree at iteration ends only
            return False
        import torch.distributed as dist

        flag = torch.tensor([1.0 if self.stop.requested else 0.0])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._stop_group)
        return bool(flag[0] > 0)

    def stop_reason(self) -> str:
        """What stopped the run: the signal's name, or (data parallel) another rank's stop request."""
        return self.stop.reason or "a stop request of another rank"

    def _cpu_group(self) -> tuple[bool, Any]:
        """``(True, group)``: the process group on which the ranks agree, after every step, whether to stop:
        gloo, on CPU tensors, so that it never waits for the device (the run's own group when it is gloo)."""
        import torch.distributed as dist

        try:
            if dist.get_backend(self.distributed.process_group) == "gloo":
                return True, self.distributed.process_group
            return True, dist.new_group(backend="gloo")  # collective: every rank builds it here
        except Exception as error:  # noqa: BLE001 - no gloo here: stop at iteration ends, as before
            self.note(f"stop requests are honoured at iteration ends only (no gloo group: {user_message(error)})")
            return False, None

    def stage_state_support(self) -> str:
        """"" when the method's state inside a stage can be checkpointed exactly; else why not."""
        names = self.method.stage_state_names()
        if names is None:
            return (f"method {self.config.method} does not declare the state it keeps inside a stage "
                    "(Method.stage_state_attributes)")
        for name in names:
            kind = _unsaveable(getattr(self.method, name, None))
            if kind:
                return f"its stage state {name} holds a {kind}, which a checkpoint cannot hold"
        return ""

    def _stage_description(self, phase: str, steps: int) -> str:
        if phase == "pretrain":
            return f"step {steps:,} of generator pre-training"
        total = {"generator": self.train_cfg.generator_steps, "student": self.train_cfg.student_steps}.get(phase)
        of = f" of {total:,}" if total else ""
        return f"{phase} step {steps:,}{of} in iteration {self.iteration + 1:,}"

    def _stop_in_stage(self) -> None:
        """A stop at a preemption point: checkpoint there (or, for a method whose state inside a stage
        cannot be saved, at the start of the iteration), then :class:`RunInterrupted`."""
        phase, steps = self.position
        where = self._stage_description(phase, steps)
        reason = self.stage_state_support()
        if not reason:
            self.save_checkpoint(position=self.position)
            raise RunInterrupted(f"stopped by {self.stop_reason()} after {where}; checkpoint saved there; run the "
                                 "same command again to resume")
        if self._iteration_start is not None:
            self.save_checkpoint(state=self._iteration_start)
            saved = f"checkpoint saved at the start of iteration {self.iteration + 1:,}"
        else:
            saved = "nothing saved (the last checkpoint stands)"
        raise RunInterrupted(f"stopped by {self.stop_reason()} after {where}, but {reason}: {saved}, so the steps "
                             f"of that iteration done so far (up to {where}) are lost and run again; run the same "
                             "command again to resume")

    # ------------------------------------------------------ budget counters ---
    def _count_rows(self, module: nn.Module, counter: str, phases: tuple[str, ...]) -> None:
        """Count the images through ``module`` during the given stages (a host-side hook: no sync)."""
        def hook(_module, inputs):
            if self._phase in phases and inputs and isinstance(inputs[0], Tensor):
                self.counters[counter] += inputs[0].shape[0]

        module.register_forward_pre_hook(hook)

    @contextlib.contextmanager
    def _stage(self, phase: str):
        """Time a stage without synchronising: CUDA events on a GPU, read at the next sync point."""
        self._phase = phase
        if self.device.type == "cuda":
            start = torch.cuda.Event(enable_timing=True)
            start.record()
            try:
                yield
            finally:
                end = torch.cuda.Event(enable_timing=True)
                end.record()
                self._stage_marks.append((phase, start, end))
                self._phase = None
        else:
            start = time.perf_counter()
            try:
                yield
            finally:
                self.counters[f"time/{phase}"] += time.perf_counter() - start
                self._phase = None

    def budget_counters(self) -> dict[str, Any]:
        """The cumulative counters for a record (adds up pending CUDA events: a sync point)."""
        if self._stage_marks:
            self._stage_marks[-1][2].synchronize()
            for phase, start, end in self._stage_marks:
                self.counters[f"time/{phase}"] += start.elapsed_time(end) / 1000.0
            self._stage_marks = []
        method_counts = {k: v for k, v in getattr(self.method, "counters", {}).items()}
        return {**self.counters, **method_counts,
                "device": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu",
                "peak_memory_mb": peak_memory_mb(self.device)}

    def _static_student_step(self, perf) -> StaticStep | None:
        """The student step as a replayable graph, when the switch, the method and the set-up allow it."""
        if not perf.cuda_graphs:
            return None
        if not vars(type(self.method)).get("static_student_step", False):
            self.note(f"method {self.config.method} has no static student step: CUDA graphs are not used")
            return None
        if self.distributed.world_size > 1 or perf.compile:
            self.note("CUDA graphs are not used with data parallelism or torch.compile")
            return None
        if self.train_cfg.student_optimizer != "sgd":
            self.note("CUDA graphs need the SGD student optimiser (Adam's step counter is not capturable here)")
            return None

        def step(batch: dict[str, Tensor]):
            loss, terms, keep = self.method.student_loss_from(batch)
            loss.backward()
            self.clip_student_gradients()
            self.optimizer.step()
            return terms, keep

        return StaticStep(step, lambda: self.optimizer.zero_grad(set_to_none=True), self.device, note=self.note,
                          counters=self.counters)

    def student_step(self) -> None:
        if self.static_step is not None:
            self.static_step.invalidate_if_changed(tuple(group["lr"] for group in self.optimizer.param_groups))
            terms, keep = self.static_step(self.method.student_batch())
            fault_point("mid_stage", self.iteration)
            self.method.finish_student_step(keep)
            self.accumulate(terms)
            return
        loss, terms = self.method.student_loss()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        fault_point("mid_stage", self.iteration)
        self.clip_student_gradients()
        self.optimizer.step()
        self.accumulate(terms)

    # ------------------------------------------------------- accounting ---
    def accumulate(self, terms: dict[str, Tensor]) -> None:
        """Add this step's loss terms to the running sums: one fused kernel, no host sync."""
        old = [name for name in terms if name in self.sums]
        if old:
            torch._foreach_add_([self.sums[name] for name in old], [terms[name].detach().float() for name in old])
        for name, value in terms.items():
            if name not in self.sums:
                self.sums[name] = value.detach().float().clone()
            self.counts[name] = self.counts.get(name, 0) + 1

    def track_finiteness(self) -> None:
        """Once per iteration, on the device: remember the last iteration at which every running
        loss sum was finite, so that a divergence found later names the iteration it began."""
        if not self.sums or self.train_cfg.on_nonfinite != "fail":
            return
        if self._last_finite is None:
            self._last_finite = torch.full((), self.iteration - 1, dtype=torch.long, device=self.device)
        finite = torch.stack(list(self.sums.values())).isfinite().all()
        self._last_finite.masked_fill_(finite, self.iteration)

    def check_finite(self) -> None:
        """At logging, evaluation and checkpoint steps (one host sync): stop a diverged run."""
        if self.train_cfg.on_nonfinite != "fail":
            return
        bad_terms = [name for name, value in self.sums.items() if not torch.isfinite(value).all()]
        weights = [p for p in self.student_module.parameters()]
        weights_finite = bool(torch.stack(torch._foreach_norm(weights)).isfinite().all()) if weights else True
        if not bad_terms and weights_finite:
            return
        first = int(self._last_finite) + 1 if self._last_finite is not None else self.iteration
        first = max(1, min(first, self.iteration))
        if bad_terms:
            name = "student_loss" if "student_loss" in bad_terms else bad_terms[0]
            value = self.sums[name]
            kind = "NaN" if torch.isnan(value).any() else "infinite"
            what = f"{name} is {kind}" + (f" (also {', '.join(n for n in bad_terms if n != name)})"
                                          if len(bad_terms) > 1 else "")
        else:
            what, first = "a student weight is NaN or infinite", self.iteration
        raise RunDiverged(
            f"diverged: {what} at iteration {first}; lower lr_S (now {self.train_cfg.student_lr:g}) or the "
            f"generator's learning rate, or --set on_nonfinite=continue to keep training for study; "
            f"the last checkpoint before it is kept"
        )

    def synchronise_sums(self) -> None:
        """Data parallel: average the running loss sums over ranks (every rank must call it)."""
        if self.distributed.world_size == 1:
            return
        import torch.distributed as dist

        for name in sorted(self.sums):
            dist.all_reduce(self.sums[name], group=self.distributed.process_group)
            self.sums[name] /= self.distributed.world_size

    def running_means(self, reset: bool) -> dict[str, float]:
        means = {name: (self.sums[name] / self.counts[name]).item() for name in self.sums}
        if reset:
            self.sums, self.counts = {}, {}
        return means

    def wall_time(self) -> float:
        return self.elapsed_before + (time.time() - self.start_time)

    def record(self, record: dict[str, Any]) -> None:
        if not self.distributed.is_main:
            return
        record = {"run": self.config.run_name, "method": self.config.method, "seed": self.config.seed, **record}
        self.records.append(record)
        self.store.append_record(record)
        fault_point("after_record", self.iteration)
        self.store.touch_heartbeat()

    # ------------------------------------------------------ measurements ---
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        logits, labels = self.test_set.predictions(self.student_module)
        predictions = logits.argmax(1)
        return {
            "test_accuracy": 100.0 * (predictions == labels).float().mean().item(),
            "test_cross_entropy": F.cross_entropy(logits, labels).item(),
            "teacher_agreement": 100.0 * (predictions == self.teacher_predictions).float().mean().item(),
        }

    def eval_record(self) -> dict[str, Any]:
        metrics = self.evaluate()
        self.best_accuracy = max(self.best_accuracy, metrics["test_accuracy"])
        losses = self.running_means(reset=True) if self.sums else {}
        record = {
            "kind": "eval", "step": self.iteration, "epoch": self.iteration / self.train_cfg.steps_per_epoch,
            "wall_time": self.wall_time(), "lr": self.learning_rate(max(self.iteration - 1, 0)),
            **metrics, **{f"loss/{name}": value for name, value in losses.items()},
            **self.budget_counters(),
        }
        self.record(record)
        return record

    def _measurement_batches(self, count: int, rng: torch.Generator) -> dict[str, Tensor]:
        """``count`` fresh samples per source, drawn in training-sized batches (same BN statistics)."""
        chunks: dict[str, list[Tensor]] = {}
        remaining = count
        while remaining > 0:
            with no_batchnorm_sync():  # only rank 0 measures
                sources = self.method.measurement_sources(self.local_batch, rng)
            for name, images in sources.items():
                chunks.setdefault(name, []).append(images)
            remaining -= self.local_batch
        return {name: torch.cat(parts)[:count] for name, parts in chunks.items()}

    @torch.no_grad()
    def measure_drift(self, snapshot: dict[str, Tensor]) -> dict[str, float]:
        """Sec. 5.2.3: mean JS(S_{t-tau}, T) on fresh samples of each source at step t."""
        self.snapshot_student.load_state_dict(snapshot)
        rng = torch.Generator(device=self.device).manual_seed(derived_seed(self.config.seed, "drift", self.iteration))
        sources = self._measurement_batches(self.train_cfg.drift_samples, rng)
        result = {}
        for name, images in sources.items():
            p_teacher = F.softmax(self.teacher(images).float(), dim=1)
            p_student = F.softmax(self.snapshot_student(images).float(), dim=1)
            result[f"js_{name}"] = js_divergence_per_sample(p_teacher, p_student).mean().item()
        return result

    def save_samples(self) -> None:
        from torchvision.utils import save_image

        rng = torch.Generator(device=self.device).manual_seed(derived_seed(self.config.seed, "samples", self.iteration))
        sources = self._measurement_batches(self.train_cfg.sample_count, rng)
        folder = self.store.samples_folder()
        files = {}
        for name, images in sources.items():
            path = folder / f"step{self.iteration:07d}_{name}.png"
            save_image(images.float().cpu(), path, nrow=int(math.ceil(math.sqrt(images.shape[0]))), padding=1)
            files[name] = str(path.relative_to(self.store.path))
        self.record({"kind": "samples", "step": self.iteration, "files": files})

    def after_iteration(self) -> None:
        """Snapshots, drift, evaluation and samples due at the end of this iteration."""
        train, t = self.train_cfg, self.iteration
        if train.drift_every and self.distributed.is_main:
            if (t + train.drift_tau) % train.drift_every == 0 and t + train.drift_tau <= train.total_iterations:
                self.drift_snapshots[t + train.drift_tau] = {
                    k: v.detach().clone() for k, v in self.student_module.state_dict().items()
                }
            if t in self.drift_snapshots:
                drift = self.measure_drift(self.drift_snapshots.pop(t))
                self.record({"kind": "drift", "step": t, "tau": train.drift_tau, **drift})
        last = t == train.total_iterations
        if (train.eval_every and t % train.eval_every == 0) or last:
            self.synchronise_sums()
            if self.distributed.is_main:
                self.eval_record()
            else:
                self.sums, self.counts = {}, {}
        if self.distributed.is_main:
            if train.sample_every and t % train.sample_every == 0 and not last:
                self.save_samples()

    # -------------------------------------------------------- checkpoint ---
    def checkpoint_state(self, position: tuple[str, int] | None = None, sync: bool = True) -> dict[str, Any]:
        """Everything a resume needs; ``position``: taken there in the middle of iteration ``iteration + 1``
        (adds the method's state inside the stage). ``sync`` False: without adding up pending stage times
        (no host synchronisation)."""
        state = {
            "iteration": self.iteration,
            "run_id": self.config.run_id,
            "code": code_version(),
            "code_history": self.code_history,
            "student": self.student_module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "method": self.method.state_dict(),
            "rng": rng_state(self.method_rng),
            "elapsed": self.wall_time(),
        }
        if position is not None:
            state["position"] = [position[0], int(position[1])]
            state["stage"] = self.method.stage_state_dict()
        # Every rank's running loss sums: the ranks average them at the next evaluation, which a rank
        # that lost its own (resumed without them) would leave with other terms or other counts.
        state.update({"sums": {k: v.cpu() for k, v in self.sums.items()}, "counts": dict(self.counts)})
        if self.distributed.is_main:
            state.update({
                "records": self.records,
                "drift_snapshots": {k: {n: t.cpu() for n, t in v.items()} for k, v in self.drift_snapshots.items()},
                "best_accuracy": self.best_accuracy,
            })
        if sync:
            self.budget_counters()  # adds up pending stage times
        state["counters"] = dict(self.counters)
        return state

    def save_checkpoint(self, position: tuple[str, int] | None = None, state: dict[str, Any] | None = None) -> None:
        """Write and commit a checkpoint: of now (at ``position`` in the middle of a stage, or between
        iterations), or ``state`` (the copy of an iteration's start, see :meth:`_stop_in_stage`)."""
        self.check_finite()  # never checkpoint a diverged state
        iteration = self.iteration if state is None else state["iteration"]
        if state is None:
            state = self.checkpoint_state(position)
        self.store.save_checkpoint_shard(state, iteration, self.distributed.rank, position)
        fault_point("before_commit", iteration)
        self._barrier()
        if self.distributed.is_main:
            self.store.commit_checkpoint(iteration, self.distributed.world_size, position)
        self._barrier()
        self.last_checkpoint_time = time.time()

    def _keep_iteration_start(self) -> None:
        """For a method whose state inside a stage cannot be saved: a copy of the state at the start of
        the iteration, so that a stop in its middle can checkpoint that (no host synchronisation)."""
        if self.method.stage_state_names() is None:
            self._iteration_start = _copy_tensors(self.checkpoint_state(sync=False))

    def restore(self, state: dict[str, Any]) -> None:
        if state.get("run_id") != self.config.run_id:
            raise DfkdError(f"checkpoint of {self.store.path} belongs to another configuration; delete the folder")
        self.check_code_version(state)
        try:
            self._restore(state)
        except (KeyError, RuntimeError, ValueError, TypeError, IndexError, AttributeError) as error:
            written = state.get("code")
            by = (f"dfkd-bench {written.get('version')}, commit {written.get('commit')}" if isinstance(written, dict)
                  else "a dfkd-bench that did not record its version")
            detail = f"it has no {error}" if isinstance(error, KeyError) else user_message(error)[:200]
            raise CheckpointError(
                f"checkpoint of {self.store.path} (written by {by}) cannot be restored by this version "
                f"({__version__}, commit {code_version()['commit']}): {detail}; run it with the version that wrote "
                f"it, or delete {self.store.pointer_path} to restart it from scratch") from None

    def check_code_version(self, state: dict[str, Any]) -> None:
        """A checkpoint written by other code: the run continues (CHOSEN: a requeued SLURM job may pick up an
        updated checkout; refusing would strand every run of a sweep) and says so, in a note and in
        config.json's ``code_history``; from there on its records are not those the old code would give."""
        written, now = state.get("code"), code_version()
        if isinstance(written, dict) and (written.get("version"), written.get("commit")) != (now["version"],
                                                                                          now["commit"]):
            self.note(f"resumed at iteration {state.get('iteration')} under other code than the checkpoint's: it was "
                      f"written by dfkd-bench {written.get('version')} (commit {written.get('commit')}), this is "
                      f"{now['version']} (commit {now['commit']}); the records from there on come from this code "
                      "(config.json: code_history)")

    def _restore(self, state: dict[str, Any]) -> None:
        self.iteration = state["iteration"]
        self.student_module.load_state_dict(state["student"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.method.load_state_dict(state["method"])
        position = state.get("position")
        self.position = (str(position[0]), int(position[1])) if position else None
        if self.position is not None:
            self.method.load_stage_state_dict(state["stage"])
        restore_rng_state(state["rng"], self.method_rng)
        self.code_history = [dict(entry) for entry in state.get("code_history") or []]
        now = code_version()
        last = self.code_history[-1] if self.code_history else {}
        if (last.get("version"), last.get("commit")) != (now["version"], now["commit"]):
            self.code_history.append({"from_iteration": self.iteration, **now})
        self.elapsed_before = state["elapsed"]
        # (a checkpoint written before every rank kept its sums has them on rank 0 only)
        self.sums = {k: v.to(self.device) for k, v in state.get("sums", {}).items()}
        self.counts = dict(state.get("counts", {}))
        if self.distributed.is_main:
            self.records = state["records"]
            self.drift_snapshots = {int(k): {n: t.to(self.device) for n, t in v.items()}
                                    for k, v in state["drift_snapshots"].items()}
            self.best_accuracy = state["best_accuracy"]
            # Records after the checkpoint came from iterations that will run again.
            self.store.rewrite_records(self.records)
        for name in self.counters:
            self.counters[name] = state.get("counters", {}).get(name, self.counters[name])

    def _agree(self, *flags: bool) -> tuple[bool, ...]:
        """Data parallel: every rank takes the same checkpoint/stop decision (a signal or a
        clock may reach one rank only, and a checkpoint is collective)."""
        if self.distributed.world_size == 1:
            return flags
        import torch.distributed as dist

        values = torch.tensor([float(f) for f in flags], device=self.device)
        dist.all_reduce(values, op=dist.ReduceOp.MAX, group=self.distributed.process_group)
        return tuple(bool(v) for v in values.tolist())

    def _barrier(self) -> None:
        if self.distributed.world_size > 1:
            import torch.distributed as dist

            dist.barrier(group=self.distributed.process_group)

    # -------------------------------------------------------------- loop ---
    def train(self) -> dict[str, Any]:
        cfg, train = self.config, self.train_cfg
        self.setup()
        self.start_time = time.time()
        self.last_checkpoint_time = time.time()
        state = self.store.load_checkpoint(self.distributed.rank, self.distributed.world_size)
        resumed = state is not None
        start = None  # where the first iteration of this start begins (a checkpoint in the middle of a stage)
        if resumed:
            self.restore(state)
            start = self.position
            where = f" (after {self._stage_description(*start)})" if start else ""
            self.note(f"resumed from iteration {self.iteration}{where}")
        else:
            self.code_history = [{"from_iteration": 0, **code_version()}]
        if self.stop.requested:  # from now on a stop waits for the next step (this read marks it so)
            # A stop whose signal came during the set-up and was not acted on at once (a signal handler's
            # exception is lost when it fires inside a finaliser): nothing trained yet, nothing lost.
            raise RunInterrupted(f"stopped by {self.stop.reason} while setting up, before its first step (nothing "
                                 "trained since the last checkpoint, nothing lost); run the same command again to "
                                 "resume")
        if not resumed or (start is not None and start[0] == "pretrain"):
            try:
                with self._stage("synthesis"):
                    self.method.pretrain()  # continues where a stop in its middle left it
            except _StopHere:
                self._stop_in_stage()
            start = self.position = None
            if self.distributed.is_main:
                # A start killed before its first checkpoint may have left records behind;
                # this start produces them all again.
                self.store.rewrite_records([])
                self.eval_record()
        if self.distributed.is_main:
            resolved = {**cfg.to_dict(), "run_id": cfg.run_id, "run_name": cfg.run_name,
                        "resolved_perf": self.resolved_perf(),
                        "environment": environment_info(self.device, self.distributed),
                        "code_history": self.code_history,
                        "teacher_test_accuracy_here": self.teacher_test_accuracy, "notes": self.notes}
            self.store.write_config(resolved)
        total = train.total_iterations
        bar = tqdm(total=total, initial=self.iteration, disable=not self.progress, dynamic_ncols=True,
                   desc=f"{cfg.method} {cfg.dataset} s{cfg.seed}", unit="it")
        # The last record can be a samples or drift record (e.g. sample_every=3): take the last evaluation's.
        evals = [r for r in self.records if r.get("kind") == "eval"]
        last_accuracy = evals[-1]["test_accuracy"] if evals else float("nan")
        while self.iteration < total:
            self.set_learning_rate()
            if start is None:
                self._keep_iteration_start()
            try:
                self.run_iteration(start)
            except _StopHere:
                bar.close()
                self._stop_in_stage()
            start = self.position = None
            self.iteration += 1
            bar.update(1)
            self.track_finiteness()
            logging_step = bool(train.log_every) and self.iteration % train.log_every == 0
            if logging_step or self.iteration == total or (train.eval_every and self.iteration % train.eval_every == 0):
                self.check_finite()  # the host synchronisations between evaluations happen here
            loss = None  # for the progress bar only: read at logging steps, before an evaluation resets the sums
            if logging_step and self.progress and "student_loss" in self.sums:
                loss = (self.sums["student_loss"] / self.counts["student_loss"]).item()
            records_before = len(self.records)
            self.after_iteration()
            if len(self.records) > records_before:
                evals = [r for r in self.records[records_before:] if r["kind"] == "eval"]
                if evals:
                    last_accuracy = evals[-1]["test_accuracy"]
            if logging_step and self.distributed.is_main:
                self.store.touch_heartbeat()
                if self.progress and loss is not None:
                    bar.set_postfix(loss=f"{loss:.4f}", acc=f"{last_accuracy:.2f}")
            if self.iteration < total:
                due = (self.iteration % train.checkpoint_every == 0
                       or time.time() - self.last_checkpoint_time > 60 * train.checkpoint_minutes)
                if self.distributed.world_size > 1:
                    # Ranks agree on a checkpoint only at logging steps and counted checkpoints (no device
                    # sync per iteration); on a stop after every iteration, through the CPU group.
                    counted = (self.iteration % train.checkpoint_every == 0
                               or self.iteration % max(train.log_every, 1) == 0)
                    if self._stop_every_step:
                        due = self._agree(due)[0] if counted else False
                        stop = self._stop_agreed()
                    elif counted:
                        due, stop = self._agree(due, self.stop.requested)
                    else:
                        due = stop = False
                else:
                    stop = self.stop.requested
                if due or stop:
                    self.save_checkpoint()
                if stop:
                    bar.close()
                    raise RunInterrupted(f"stopped by {self.stop_reason()} at iteration {self.iteration}; checkpoint "
                                         "saved; run the same command again to resume")
        bar.close()
        return self.finish()

    def finish(self) -> dict[str, Any]:
        if not self.distributed.is_main:
            self._barrier()
            return {}
        self.save_samples()
        torch.save(self.student_module.model.state_dict(), self.store.student_path)
        evals = [r for r in self.records if r["kind"] == "eval"]
        final = evals[-1]
        summary = {
            "run": self.config.run_name, "run_id": self.config.run_id, "method": self.config.method,
            "dataset": self.config.dataset, "seed": self.config.seed, "iterations": self.iteration,
            "final_accuracy": final["test_accuracy"], "best_accuracy": max(r["test_accuracy"] for r in evals),
            "final_cross_entropy": final["test_cross_entropy"], "teacher_agreement": final["teacher_agreement"],
            "teacher_accuracy": self.teacher_test_accuracy, "wall_time": self.wall_time(), "notes": self.notes,
        }
        self.store.mark_done(summary)
        self._barrier()
        return summary


def train_run(config: RunConfig, results_dir: str | os.PathLike, *, device: str = "auto", progress: bool = True,
              distributed: DistributedInfo | None = None, stop: StopRequest | None = None,
              workers: int = 0) -> dict[str, Any]:
    """Train one run to completion (or resume it); return its summary. Done runs return at once."""
    store = RunStore(results_dir, config.run_name)
    if store.is_done():
        return store.summary()
    distributed = distributed or DistributedInfo()
    lock = store.lock() if distributed.is_main else contextlib.nullcontext()
    with lock:
        if distributed.is_main:
            store.remove_stale_temp_files()  # of writes a kill interrupted (we hold the lock: none is ours)
        if distributed.is_main and not store.config_path.exists():
            # Written again with the environment once set up; this copy lets `status` and
            # `report` see what a run is even if it fails during setup.
            store.write_config({**config.to_dict(), "run_id": config.run_id, "run_name": config.run_name})
        try:
            trainer = Trainer(config, results_dir, device=device, progress=progress, distributed=distributed,
                              stop=stop, workers=workers)
            return trainer.train()
        except RunInterrupted:
            raise
        except BaseException as error:
            if distributed.is_main and not isinstance(error, (KeyboardInterrupt, SystemExit)):
                message = str(error) if isinstance(error, DfkdError) else traceback.format_exc()
                store.mark_failed(message)
            raise
