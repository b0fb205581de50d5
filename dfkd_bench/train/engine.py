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
"""

from __future__ import annotations

import contextlib
import copy
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
from dfkd_bench.errors import DfkdError
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
    """Set by a signal (Ctrl-C, SIGTERM, SLURM's preemption signal); honoured between iterations."""

    def __init__(self) -> None:
        self.requested = False
        self.reason = ""

    def request(self, reason: str) -> None:
        self.requested = True
        self.reason = reason


class RunInterrupted(Exception):
    """The run stopped at an iteration boundary after a stop request; its checkpoint is saved."""


class RunDiverged(DfkdError):
    """A loss or a student weight became NaN or infinite (``on_nonfinite=fail``): the run stops
    without writing a checkpoint, so its last checkpoint is the last good state."""


@contextlib.contextmanager
def stop_on_signals(stop: StopRequest, signals=(signal.SIGINT, signal.SIGTERM)):
    """First signal: finish the iteration, checkpoint, stop. Second SIGINT: stop at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {}

    def handler(signum, frame):
        if stop.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        stop.request(signal.Signals(signum).name)

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
        )
        self.method = get_method(cfg.method)(cfg.method_params(), ctx)
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

    def run_iteration(self) -> None:
        """One iteration: the generator stage, then the student stage. The benchmark times exactly this.

        Nothing in here synchronises the host with the device (no ``.item()``, no host
        tensors copied over): tests/test_host_sync.py fails if something does.
        """
        self.generator_stage()
        # student_warmup_epochs: the first epochs only synthesise (FastDFKD's --warmup); a host-side integer test
        if self.iteration >= self.train_cfg.student_warmup_epochs * self.train_cfg.steps_per_epoch:
            self.student_stage()

    def generator_stage(self, end_stage: bool = True) -> None:
        """The n_G generator steps, then ``method.end_generator_stage()`` (which prepares the student
        stage); ``end_stage=False`` leaves the latter out (the step-equivalence replay's last stage)."""
        with self._stage("synthesis"):
            for _ in range(self.train_cfg.generator_steps):
                self.accumulate(self.method.generator_step())
            if end_stage:
                self.method.end_generator_stage()

    def student_stage(self) -> None:
        with self._stage("student"):
            for _ in range(self.train_cfg.student_steps):
                self.student_step()

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
    def checkpoint_state(self) -> dict[str, Any]:
        state = {
            "iteration": self.iteration,
            "run_id": self.config.run_id,
            "student": self.student_module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "method": self.method.state_dict(),
            "rng": rng_state(self.method_rng),
            "elapsed": self.wall_time(),
        }
        if self.distributed.is_main:
            state.update({
                "records": self.records,
                "sums": {k: v.cpu() for k, v in self.sums.items()}, "counts": self.counts,
                "drift_snapshots": {k: {n: t.cpu() for n, t in v.items()} for k, v in self.drift_snapshots.items()},
                "best_accuracy": self.best_accuracy,
            })
        self.budget_counters()  # adds up pending stage times
        state["counters"] = dict(self.counters)
        return state

    def save_checkpoint(self) -> None:
        self.check_finite()  # never checkpoint a diverged state
        self.store.save_checkpoint_shard(self.checkpoint_state(), self.iteration, self.distributed.rank)
        fault_point("before_commit", self.iteration)
        self._barrier()
        if self.distributed.is_main:
            self.store.commit_checkpoint(self.iteration, self.distributed.world_size)
        self._barrier()
        self.last_checkpoint_time = time.time()

    def restore(self, state: dict[str, Any]) -> None:
        if state.get("run_id") != self.config.run_id:
            raise DfkdError(f"checkpoint of {self.store.path} belongs to another configuration; delete the folder")
        self.iteration = state["iteration"]
        self.student_module.load_state_dict(state["student"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.method.load_state_dict(state["method"])
        restore_rng_state(state["rng"], self.method_rng)
        self.elapsed_before = state["elapsed"]
        if self.distributed.is_main:
            self.records = state["records"]
            self.sums = {k: v.to(self.device) for k, v in state["sums"].items()}
            self.counts = dict(state["counts"])
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
        if resumed:
            self.restore(state)
            self.note(f"resumed from iteration {self.iteration}")
        else:
            with self._stage("synthesis"):
                self.method.pretrain()
            if self.distributed.is_main:
                # A start killed before its first checkpoint may have left records behind;
                # this start produces them all again.
                self.store.rewrite_records([])
                self.eval_record()
        if self.distributed.is_main:
            resolved = {**cfg.to_dict(), "run_id": cfg.run_id, "run_name": cfg.run_name,
                        "resolved_perf": self.resolved_perf(),
                        "environment": environment_info(self.device, self.distributed),
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
            self.run_iteration()
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
                stop = self.stop.requested
                if self.distributed.world_size > 1:
                    # Ranks agree only at logging steps and counted checkpoints: no per-iteration sync.
                    if self.iteration % train.checkpoint_every == 0 or self.iteration % max(train.log_every, 1) == 0:
                        due, stop = self._agree(due, stop)
                    else:
                        due = stop = False
                if due or stop:
                    self.save_checkpoint()
                if stop:
                    bar.close()
                    raise RunInterrupted(f"stopped by {self.stop.reason} at iteration {self.iteration}; "
                                         "run the same command again to resume")
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
