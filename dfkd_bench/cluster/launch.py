"""Launchers: inline (this process), local (submitit's local executor), slurm (submitit).

Jobs receive a configuration dictionary and a results folder, never models.
Runs already ``done`` are skipped before anything is submitted, so a launch
can be repeated after failures. On SLURM, many runs go out as ONE job array
(``executor.map_array``).

Preemption. submitit asks SLURM for ``SIGUSR2`` shortly before a time limit
and on preemption, and its handler calls our job's ``checkpoint()`` and
requeues the job. A consistent state can only be saved between two optimiser
steps, so :class:`RunJob` puts its own handler in front: the signal only
*requests* a stop; the engine finishes the current step, writes a checkpoint
there (in the middle of its stage if need be) and raises :class:`RunInterrupted`;
then we hand over to submitit's handler, which requeues the job. The requeued job runs the same
configuration and resumes from that checkpoint. A job killed without warning
(``scontrol requeue``, node failure, SIGKILL) resumes from its last periodic
checkpoint instead -- exactly, because checkpoints hold every random state.

Packing (``--runs-per-gpu K``). Small students leave a big GPU mostly idle, so
K runs can train at once on one device, each in its own worker process
(:class:`PackRunner`): separate CUDA contexts, no shared GIL, and a crash of
one run does not touch the others. Each worker is an ordinary run -- its own
folder, lock, records and checkpoints -- so resuming, locking and preemption
work as for a run alone: the launcher forwards a stop (Ctrl-C, SIGTERM,
SLURM's SIGUSR2) to every worker, each finishes its optimiser step and writes a
checkpoint, and a requeued SLURM job trains the same pack again. With the
inline launcher the K workers are children of ``dfkd-bench`` itself; with the
local and SLURM launchers each job trains a pack of K runs. A worker has
``DFKD_BENCH_RUNS_PER_GPU=K`` and ``DFKD_BENCH_PACK_SLOT`` (0..K-1) in its
environment, so a run can record how it was packed; a run trained alone has
``DFKD_BENCH_RUNS_PER_GPU=1``.

A launch never claims a run is done when it is not: runs being trained by
another process are named and not launched again, and the launch then exits
with an error (after training the others), so ``run && report`` never reports
too early.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dfkd_bench.errors import ConfigError, DfkdError
from dfkd_bench.store import RunStore

if TYPE_CHECKING:  # the engine pulls in torch and torchvision: import it only when a run starts
    from dfkd_bench.config import RunConfig
    from dfkd_bench.method_api import DistributedInfo


def add_launcher_arguments(parser: argparse.ArgumentParser) -> None:
    from dfkd_bench.store import TensorboardFlag

    group = parser.add_argument_group("launching")
    group.add_argument("--tensorboard", action=TensorboardFlag)  # sets DFKD_BENCH_TENSORBOARD=1 for the runs
    group.add_argument("--launcher", choices=["inline", "local", "slurm"], default=None,
                       help="inline: in this process (default); local: submitit's local executor (subprocesses); "
                            "slurm: one SLURM job array through submitit")
    group.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: auto)")
    group.add_argument("--workers", type=int, default=None, help="data-loading processes for evaluation (default: 0)")
    group.add_argument("--threads", type=int, default=None,
                       help="inline: torch CPU threads (default: torch's); local/slurm jobs use --cpus-per-task. "
                            "CPU results are bit-identical only for the same thread count")
    group.add_argument("--runs-per-gpu", type=int, default=None, metavar="K",
                       help="train K runs at once on one device, each in its own process (inline: here; local and "
                            "slurm: each job trains K runs of the list). Default: 1")
    group.add_argument("--yes", action="store_true",
                       help=f"go ahead with more than {MAX_RUNS_WITHOUT_YES:,} runs at once, or with more work per "
                            "iteration than 10x any paper's (n_S, n_G, batch ...; README \"Reliability\"); both "
                            "are refused without it")
    group.add_argument("--no-progress", action="store_true", help="no progress bars")
    group.add_argument("--no-wait", action="store_true",
                       help="local/slurm: submit and return; check with `dfkd-bench status`")
    slurm = parser.add_argument_group("SLURM (with --launcher slurm; also settable in experiment files)")
    slurm.add_argument("--partition", help="SLURM partition")
    slurm.add_argument("--account", help="SLURM account")
    slurm.add_argument("--qos", help="SLURM quality of service")
    slurm.add_argument("--time", type=int, help="time limit per job, minutes (default: 240)")
    slurm.add_argument("--gpus-per-node", type=int,
                       help="GPUs per job; more than 1 runs DistributedDataParallel, one process per GPU (default: 0)")
    slurm.add_argument("--cpus-per-task", type=int, help="CPUs per process (default: 2)")
    slurm.add_argument("--mem-gb", type=float, help="memory per job in GB (default: 8)")
    slurm.add_argument("--constraint", help="SLURM node constraint")
    slurm.add_argument("--array-parallelism", type=int,
                       help="at most this many jobs of the array at once (slurm; local: at once on this machine)")
    slurm.add_argument("--slurm-extra", action="append", metavar="KEY=VALUE",
                       help="any other sbatch option, e.g. --slurm-extra exclude=node3 (repeatable)")
    slurm.add_argument("--slurm-setup", action="append", metavar="LINE",
                       help="a shell line run before the job, e.g. 'module load cuda' (repeatable)")
    slurm.add_argument("--submitit-dir", help="where submitit keeps job scripts and logs (default: RESULTS/_submitit)")


# More runs than this at once are refused without --yes: a typo in --seeds or a grid can otherwise
# start (or, for a sweep, spend many minutes expanding) tens of thousands of runs.
MAX_RUNS_WITHOUT_YES = 1000


def check_work_size(count: int, args: argparse.Namespace | None, what: str) -> None:
    """Refuse ``count`` runs (or grid combinations) above :data:`MAX_RUNS_WITHOUT_YES` without ``--yes``."""
    if count > MAX_RUNS_WITHOUT_YES and not getattr(args, "yes", False):
        raise ConfigError(f"{count:,} runs ({what}), more than {MAX_RUNS_WITHOUT_YES:,} at once; check the list, "
                          "and pass --yes if you mean it")


# Work per iteration beyond what any paper uses is refused without --yes, as many runs are: a typo like
# n_S=1000000000 would otherwise start a run whose one stage outlasts any job. Each limit is ten times the
# largest value among the presets and the paper protocols of this suite (tests/test_stop.py recomputes those
# maxima, so a protocol with a larger value must raise its limit), which leaves room for sensitivity sweeps.
WORK_LIMIT_FACTOR = 10
WORK_LIMITS: dict[str, tuple[int, str, str]] = {
    # setting: (the papers' largest value, where it comes from, what it counts)
    "student_steps": (2000, "SpaceshipNet's 2,000 KD steps per epoch in its official CIFAR scripts",
                      "student steps per iteration, n_S"),
    "generator_steps": (1000, "DeepInversion's 1,000 synthesis steps per iteration in its DataFree protocol",
                        "generator steps per iteration, n_G"),
    "synthesis_steps": (2000, "DeepInversion's 2,000 Adam steps per batch", "synthesis steps per batch"),
    "pretrain_steps": (200, "the MAD paper's 200 on ImageNet", "generator pre-training steps, pgs"),
    "batch_size": (1024, "DAFL's batch of 1,024 on CIFAR", "images per step, bs"),
    "student_images_per_step": (2048, "the equal-images control's 2 x bs at DAFL's batch", "student images per step"),
    "drift_samples": (1024, "the drift measurement's default (MAD, Sec. 5.2.3)", "images per drift measurement"),
    "sample_count": (64, "the sample grids' default", "images per sample grid"),
}


def check_work_bounds(configs: list["RunConfig"], args: argparse.Namespace | None) -> None:
    """Refuse a run whose per-iteration work exceeds :data:`WORK_LIMITS` without ``--yes``, in one line,
    before any run folder exists."""
    if getattr(args, "yes", False):
        return
    for config in configs:
        values = {**config.params, **{name: getattr(config.train, name) for name in WORK_LIMITS
                                      if hasattr(config.train, name)}}
        for name, (paper, source, what) in WORK_LIMITS.items():
            value = values.get(name)
            limit = WORK_LIMIT_FACTOR * paper
            if isinstance(value, int) and not isinstance(value, bool) and value > limit:
                raise ConfigError(f"{name}={value:,} ({what}, {config.method}) is far beyond what any paper uses "
                                  f"(at most {paper:,}: {source}); runs with more than {limit:,} are refused: "
                                  f"check it (lower {name}), or pass --yes if you mean it")


LAUNCH_DEFAULTS = {
    "launcher": "inline", "device": "auto", "workers": 0, "time": 240, "gpus_per_node": 0, "cpus_per_task": 2,
    "mem_gb": 8.0, "array_parallelism": None, "partition": None, "account": None, "qos": None, "constraint": None,
    "slurm_extra": None, "slurm_setup": None, "submitit_dir": None, "no_wait": False, "no_progress": False,
    "threads": None, "runs_per_gpu": 1,
}
# The environment a run is trained in says how it was packed (see the module docstring).
RUNS_PER_GPU_ENV = "DFKD_BENCH_RUNS_PER_GPU"
PACK_SLOT_ENV = "DFKD_BENCH_PACK_SLOT"


# The numeric launch options, their range and what the error says they must be: ONE table for the
# command line (``--threads``) and experiment files (``[resources] threads``).
LAUNCH_INT_RANGES: dict[str, tuple[int, int, str]] = {
    "workers": (0, 1024, "an integer from 0 (load in this process) to 1024"),
    "threads": (1, 4096, "an integer from 1 to 4096"),
    "time": (1, 10**7, "a positive number of minutes"),
    "gpus_per_node": (0, 1024, "an integer from 0 to 1024"),
    "cpus_per_task": (1, 4096, "an integer from 1 to 4096"),
    "array_parallelism": (1, 10**6, "a positive integer"),
    "runs_per_gpu": (1, 256, "an integer from 1 to 256"),
}


def check_device_name(name: Any, flag: str = "--device") -> None:
    """A device torch knows and the suite supports (cpu, cuda, cuda:N, mps, or auto)."""
    if name is None or name == "auto":
        return
    hint = "use auto, cpu, cuda or cuda:N"
    if not isinstance(name, str):
        raise ConfigError(f"{flag} {name!r} is not a device; {hint}")
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        raise ConfigError(f"{flag} {name!r} is not a device; {hint}") from None
    if device.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"{flag} {name!r} is not supported; {hint}")
    if device.type == "cuda" and device.index is not None and torch.cuda.is_available() \
            and device.index >= torch.cuda.device_count():
        raise ConfigError(f"{flag} {name}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                          f"numbered from 0")


def check_launch_option(name: str, value: Any, flag: str | None = None) -> None:
    """One launch option in range, the same for ``--name`` and ``[resources] name`` (``flag`` names it)."""
    flag = flag or "--" + name.replace("_", "-")
    if value is None:
        return
    if name in LAUNCH_INT_RANGES:
        low, high, meaning = LAUNCH_INT_RANGES[name]
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            raise ConfigError(f"{flag} must be {meaning}, got {value!r}")
    elif name == "mem_gb":
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value < float("inf"):
            raise ConfigError(f"{flag} must be a finite number of GB > 0, got {value!r}")
    elif name == "device":
        check_device_name(value, flag)
    elif name == "launcher" and value not in ("inline", "local", "slurm"):
        raise ConfigError(f"{flag} = {value!r} is not one of inline, local, slurm")


def launch_options(args: argparse.Namespace | None, file_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Defaults < experiment file ``[resources]`` < command line."""
    options = dict(LAUNCH_DEFAULTS)
    for key, value in (file_options or {}).items():
        key = key.replace("-", "_")
        if key not in LAUNCH_DEFAULTS:
            raise DfkdError(f"unknown launch/resource option {key!r}; known: {', '.join(sorted(LAUNCH_DEFAULTS))}")
        check_launch_option(key, value, f"[resources] {key}")
        options[key] = value
    if args is not None:
        for key in LAUNCH_DEFAULTS:
            value = getattr(args, key, None)
            if value is not None and value is not False:  # 0 is a value (e.g. --runs-per-gpu 0 is refused)
                options[key] = value
    packing = options["runs_per_gpu"]
    if not isinstance(packing, int) or isinstance(packing, bool) or not 1 <= packing <= 256:
        raise ConfigError(f"--runs-per-gpu (runs_per_gpu) must be an integer from 1 to 256, got {packing!r}")
    if packing > 1 and int(options["gpus_per_node"] or 0) > 1:
        raise ConfigError(f"--runs-per-gpu {packing} packs runs of one device each, but --gpus-per-node "
                          f"{options['gpus_per_node']} trains each run on several GPUs; use one of the two")
    return options


@contextlib.contextmanager
def packing_environment(runs_per_gpu: int, slot: int | None = None) -> Iterator[None]:
    """Say in this process's environment how the run trained here is packed (restored afterwards)."""
    values = {RUNS_PER_GPU_ENV: str(runs_per_gpu), PACK_SLOT_ENV: None if slot is None else str(slot)}
    before = {key: os.environ.get(key) for key in values}
    try:
        for key, value in values.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


# Why a run is not done when nothing says why: its process was killed from outside (SIGKILL, OOM killer).
NO_ERROR_RECORDED = ("its process stopped without recording an error (killed from outside, e.g. out of memory?); "
                     "run the same command again: it resumes from its last checkpoint")


def describe_failure(error: BaseException) -> str:
    """One line saying why a run failed, without an exception class name for errors a user can fix.

    A failure to write (a results folder that became read-only, a full disk) while recording an
    earlier error keeps both: the earlier error is the cause, the write failure says why it is not
    in error.txt.
    """
    def one(e: BaseException) -> str:
        if isinstance(e, DfkdError):
            text = str(e)
        elif isinstance(e, OSError) and e.strerror:
            where = e.filename2 or e.filename  # a rename names its destination second
            text = f"cannot access {where}: {e.strerror}" if where else e.strerror
        else:  # a bug or a library error: its class says what it is
            text = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        return lines[0] if lines else type(e).__name__

    text = one(error)
    context = error.__context__
    if isinstance(error, OSError) and context is not None and not error.__suppress_context__ \
            and not isinstance(context, (KeyboardInterrupt, SystemExit)):
        return f"{one(context)} (and it could not be recorded: {text})"
    return text


# ----------------------------------------------------------------- the job ---

def _distributed_from_submitit() -> "DistributedInfo":
    """One process per GPU under SLURM: initialise torch.distributed from submitit's environment."""
    import submitit
    import torch
    import torch.distributed as dist

    from dfkd_bench.method_api import DistributedInfo

    env = submitit.JobEnvironment()
    if env.num_tasks <= 1:
        return DistributedInfo()
    os.environ.setdefault("MASTER_ADDR", env.hostnames[0])
    os.environ.setdefault("MASTER_PORT", str(20000 + int(str(env.job_id).split("_")[0]) % 20000))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(env.local_rank)
    dist.init_process_group(backend, rank=env.global_rank, world_size=env.num_tasks)
    return DistributedInfo(rank=env.global_rank, world_size=env.num_tasks)


class _PreemptionSignal:
    """SLURM's preemption / time-limit signal (SIGUSR2, which submitit handles) turned into a stop
    request, so that the runs finish their optimiser step and checkpoint first; submitit's own handler
    then requeues the job (it calls the job's ``checkpoint()`` and exits)."""

    def __init__(self) -> None:
        from dfkd_bench.train.engine import StopRequest

        self.stop = StopRequest()
        self._submitit_handler = signal.getsignal(signal.SIGUSR2)
        self._pending: list[tuple[int, Any]] = []
        signal.signal(signal.SIGUSR2, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        self.stop.request(signal.Signals(signum).name)
        self._pending.append((signum, frame))

    def requeue_if_preempted(self) -> None:
        if self._pending and callable(self._submitit_handler):
            self._submitit_handler(*self._pending[-1])  # -> job.checkpoint() -> requeue -> exit


class RunJob:
    """The picklable callable a submitit job runs: ``RunJob(...)(config_dict)``."""

    def __init__(self, results_dir: str, device: str = "auto", workers: int = 0, threads: int | None = None):
        self.results_dir = str(results_dir)
        self.device = device
        self.workers = workers
        self.threads = threads

    def __call__(self, config: dict[str, Any]) -> dict[str, Any]:
        import torch

        from dfkd_bench.config import RunConfig
        from dfkd_bench.train.engine import RunInterrupted, train_run
        from dfkd_bench.method_api import DistributedInfo

        if self.threads:
            torch.set_num_threads(self.threads)
        run_config = RunConfig.from_dict(config)
        preemption = _PreemptionSignal()
        distributed = _distributed_from_submitit() if "SLURM_JOB_ID" in os.environ else DistributedInfo()
        device = self.device
        if distributed.world_size > 1 and device in ("auto", "cuda") and torch.cuda.is_available():
            device = f"cuda:{torch.cuda.current_device()}"
        try:
            with packing_environment(1):
                return train_run(run_config, self.results_dir, device=device, progress=False,
                                 distributed=distributed, stop=preemption.stop, workers=self.workers)
        except RunInterrupted:
            preemption.requeue_if_preempted()
            raise

    def checkpoint(self, config: dict[str, Any]):
        """submitit calls this on preemption/timeout: requeue the same run (it resumes from its checkpoint)."""
        import submitit

        return submitit.helpers.DelayedSubmission(RunJob(self.results_dir, self.device, self.workers, self.threads),
                                                  config)


# ----------------------------------------------------------------- packing ---

@dataclass
class _Worker:
    """One run trained by a child process of a pack."""

    config: "RunConfig"
    slot: int
    process: subprocess.Popen
    outcome_fd: int
    started: float = field(default_factory=time.time)
    signalled: bool = False

    def signal(self, signum: int) -> None:
        if self.process.poll() is None:
            try:
                self.process.send_signal(signum)
            except ProcessLookupError:
                pass

    def read_outcome(self) -> dict[str, Any]:
        """What the worker reported through its pipe (``status``, ``message``); read once it has exited."""
        chunks = []
        try:
            while True:
                chunk = os.read(self.outcome_fd, 65536)
                if not chunk:
                    break
                chunks.append(chunk)
        except OSError:
            pass
        finally:
            os.close(self.outcome_fd)
        try:
            outcome = json.loads(b"".join(chunks).decode() or "null")
        except ValueError:
            outcome = None
        if isinstance(outcome, dict) and outcome.get("status"):
            return outcome
        code = self.process.returncode
        how = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit status {code}"
        return {"status": "failed", "message": f"its worker process ended with {how} before reporting"}


_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR2)


def _worker_preexec():
    """What a worker runs between fork and exec (built here: nothing may be imported in there).

    It blocks the stop signals until the worker has its handlers (the mask survives exec), so that a
    stop sent while Python starts is kept, not fatal; and (Linux) it asks for a SIGTERM when the
    launching process dies (e.g. killed by ``timeout --kill-after``): the worker then stops as on
    any stop -- at once while it still sets up, else after its optimiser step with a checkpoint --
    instead of dying with whatever it trained since its last checkpoint.
    """
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        prctl = None

    def prepare() -> None:  # pragma: no cover - runs in the child
        signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
        if prctl is not None:
            prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG

    return prepare


class PackRunner:
    """Train runs with at most ``runs_per_gpu`` of them at once, each in its own worker process.

    # CHOSEN: processes, not threads: each run has its own CUDA context and interpreter (no GIL
    # between the runs), a crash or an out-of-memory of one run leaves the others running, and a
    # worker is exactly an inline run (same code path, same records).
    The workers run in their own session, so a terminal's Ctrl-C reaches only the launcher, which
    forwards one SIGTERM to each (a second Ctrl-C would otherwise kill a worker mid-step);
    each then finishes its optimiser step, writes a checkpoint and exits.
    """

    def __init__(self, results_dir: str | os.PathLike, runs_per_gpu: int, *, device: str = "auto", workers: int = 0,
                 threads: int | None = None, log: bool = True):
        self.results_dir = str(Path(results_dir).resolve())
        self.runs_per_gpu = int(runs_per_gpu)
        self.device = device
        self.workers = int(workers or 0)
        # CHOSEN: without --threads, each worker gets an equal share of the CPU cores, so K workers
        # do not oversubscribe the machine. CPU results are bit-identical only for the same count.
        self.threads = int(threads) if threads else max(1, (os.cpu_count() or 1) // self.runs_per_gpu)
        self.log = log

    def _print(self, message: str) -> None:
        if self.log:
            print(f"  {datetime.datetime.now():%H:%M:%S} {message}", flush=True)

    def _start(self, config: "RunConfig", slot: int) -> _Worker:
        read_fd, write_fd = os.pipe()
        package_parent = str(Path(__file__).resolve().parent.parent)
        env = dict(os.environ)
        env[RUNS_PER_GPU_ENV] = str(self.runs_per_gpu)
        env[PACK_SLOT_ENV] = str(slot)
        env["OMP_NUM_THREADS"] = str(self.threads)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_parent, env.get("PYTHONPATH")) if p)
        payload = {"config": config.to_dict(), "results_dir": self.results_dir, "device": self.device,
                   "workers": self.workers, "threads": self.threads}
        command = [sys.executable, "-c",
                   "import sys; from dfkd_bench.cluster.launch import pack_worker_main; sys.exit(pack_worker_main())",
                   str(write_fd)]
        try:
            process = subprocess.Popen(command, stdin=subprocess.PIPE, env=env, pass_fds=(write_fd,),
                                       start_new_session=True, preexec_fn=_worker_preexec())
        except BaseException:
            os.close(read_fd)
            raise
        finally:
            os.close(write_fd)
        assert process.stdin is not None
        try:
            process.stdin.write(json.dumps(payload).encode())
            process.stdin.close()
        except BrokenPipeError:  # it died at once; its exit is reported like any other
            pass
        self._print(f"{config.run_name}: started [slot {slot + 1}/{self.runs_per_gpu}, pid {process.pid}, "
                    f"{self.threads} CPU thread{'s' if self.threads > 1 else ''}]")
        return _Worker(config=config, slot=slot, process=process, outcome_fd=read_fd)

    def _finished(self, worker: _Worker) -> dict[str, Any]:
        outcome = worker.read_outcome()
        store = RunStore(self.results_dir, worker.config.run_name)
        name = worker.config.run_name
        if outcome["status"] == "done" and store.is_done():
            accuracy = store.summary().get("final_accuracy")
            shown = f"{accuracy:.2f} %" if isinstance(accuracy, (int, float)) else "-"
            self._print(f"{name}: done, final accuracy {shown} ({(time.time() - worker.started) / 60:.1f} min)")
        elif outcome["status"] == "interrupted":
            self._print(f"{name}: stopped; checkpoint saved")
        else:
            outcome = {"status": "failed", "message": outcome.get("message") or store.last_error_line()
                       or NO_ERROR_RECORDED}
            self._print(f"{name}: failed: {outcome['message']}")
        return outcome

    def run(self, configs: list["RunConfig"], stop) -> dict[str, dict[str, Any]]:
        """``{run name: {"status": done | failed | interrupted | not started, "message": ...}}``.

        ``stop`` is the launcher's :class:`~dfkd_bench.train.engine.StopRequest`: once set, no new run
        starts and every worker is asked (SIGTERM) to checkpoint and stop.
        """
        queue = list(configs)
        running: dict[int, _Worker] = {}
        outcomes: dict[str, dict[str, Any]] = {}
        try:
            while running or (queue and not stop.requested):  # after a stop: wait for the running only
                if stop.requested:
                    for worker in running.values():
                        if not worker.signalled:
                            worker.signal(signal.SIGTERM)
                            worker.signalled = True
                while queue and not stop.requested and len(running) < self.runs_per_gpu:
                    config = queue.pop(0)
                    if RunStore(self.results_dir, config.run_name).is_done():  # e.g. in a requeued pack job
                        outcomes[config.run_name] = {"status": "done"}
                        continue
                    slot = min(set(range(self.runs_per_gpu)) - set(running))
                    running[slot] = self._start(config, slot)
                for slot, worker in list(running.items()):
                    if worker.process.poll() is not None:
                        outcomes[worker.config.run_name] = self._finished(worker)
                        del running[slot]
                time.sleep(0.05)
        except BaseException:  # a second Ctrl-C, or a bug here: no worker may outlive the launcher
            for worker in running.values():
                worker.signal(signal.SIGKILL)
            for worker in running.values():
                worker.process.wait()
                os.close(worker.outcome_fd)
            raise
        for config in queue:
            outcomes[config.run_name] = {"status": "not started", "message": "stopped before it started"}
        return outcomes


def pack_worker_main() -> int:
    """A worker process of a pack: train the run described on stdin, report on the pipe ``argv[1]``."""
    # A stop that arrives while torch is still being imported is kept, not fatal: the run then
    # ends at once when its handlers are in place (nothing trained yet), like any stop during set-up.
    early: list[int] = []
    for signum in _STOP_SIGNALS:
        signal.signal(signum, lambda number, frame: early.append(number))
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)  # blocked since the fork (_worker_preexec)
    outcome_fd = int(sys.argv[1])
    job = json.loads(sys.stdin.read())
    outcome = _train_in_worker(job, early)
    os.write(outcome_fd, json.dumps(outcome).encode())
    os.close(outcome_fd)
    return {"done": 0, "interrupted": 3}.get(outcome["status"], 1)


class _SetupAwareStop:
    """The worker's stop request. Until the engine first asks whether to stop (just before the
    first step of this start), nothing has been trained since the last checkpoint, so a stop
    ends the worker at once -- e.g. one still decoding the test split when a deadline's SIGTERM
    comes, which would otherwise only stop after setting up and training a step, and be
    killed by then (``timeout --kill-after``). After that, a stop is honoured after the optimiser
    step, with a checkpoint, as in every run (``engine.StopRequest`` does the same for inline runs)."""

    def __init__(self) -> None:
        self._requested = False
        self.reason = ""
        self.training = False

    @property
    def requested(self) -> bool:
        self.training = True  # the engine's loop reads this once an iteration is done
        return self._requested

    def request(self, reason: str) -> None:
        self._requested = True
        self.reason = reason


def _stop_in_worker(stop: _SetupAwareStop, signum: int) -> None:
    from dfkd_bench.train.engine import RunInterrupted

    if stop._requested and signum == signal.SIGINT and stop.training:
        raise KeyboardInterrupt
    stop.request(signal.Signals(signum).name)
    if not stop.training:
        raise RunInterrupted(f"stopped by {stop.reason} while setting up (nothing trained since the last "
                             "checkpoint, nothing lost); run the same command again to resume")


def _train_in_worker(job: dict[str, Any], early: list[int]) -> dict[str, Any]:
    from dfkd_bench.train.engine import RunInterrupted

    stop = _SetupAwareStop()
    previous = {}
    try:
        # SIGUSR2: SLURM's preemption warning, in case it reaches the workers directly.
        for signum in _STOP_SIGNALS:
            previous[signum] = signal.signal(signum, lambda number, frame: _stop_in_worker(stop, number))
        if early:  # checked once the real handlers are in place, so no signal falls in between
            _stop_in_worker(stop, early[0])
        import torch

        from dfkd_bench.config import RunConfig
        from dfkd_bench.train.engine import train_run

        if job.get("threads"):
            torch.set_num_threads(int(job["threads"]))
        config = RunConfig.from_dict(job["config"])
        train_run(config, job["results_dir"], device=job["device"], progress=False, stop=stop,  # type: ignore[arg-type]
                  workers=int(job.get("workers") or 0))
        return {"status": "done"}
    except RunInterrupted as error:
        return {"status": "interrupted", "message": str(error)}
    except BaseException as error:  # noqa: BLE001 - everything is reported to the launcher
        return {"status": "failed", "message": describe_failure(error)[:4000]}
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


class PackJob:
    """The picklable callable of a local/SLURM job that trains a pack of runs on one device:
    ``PackJob(...)([config_dict, ...])``. Preemption works as for :class:`RunJob`: every worker
    checkpoints, then submitit requeues the job, which trains the same pack again (done runs are skipped)."""

    def __init__(self, results_dir: str, runs_per_gpu: int, device: str = "auto", workers: int = 0,
                 threads: int | None = None):
        self.results_dir = str(results_dir)
        self.runs_per_gpu = int(runs_per_gpu)
        self.device = device
        self.workers = workers
        self.threads = threads

    def __call__(self, configs: list[dict[str, Any]]) -> list[str]:
        from dfkd_bench.config import RunConfig

        preemption = _PreemptionSignal()
        runner = PackRunner(self.results_dir, self.runs_per_gpu, device=self.device, workers=self.workers,
                            threads=self.threads)
        outcomes = runner.run([RunConfig.from_dict(c) for c in configs], preemption.stop)
        if any(o["status"] in ("interrupted", "not started") for o in outcomes.values()):
            preemption.requeue_if_preempted()
        problems = [f"{name}: {o.get('message', o['status'])}" for name, o in outcomes.items() if o["status"] != "done"]
        if problems:  # the job fails, so that SLURM and `_wait` see it; each run's error is in its folder
            raise RuntimeError(f"{len(problems)} of {len(outcomes)} runs of this pack did not finish: "
                               + "; ".join(problems))
        return sorted(outcomes)

    def checkpoint(self, configs: list[dict[str, Any]]):
        """submitit calls this on preemption/timeout: requeue the same pack (its runs resume from their checkpoints)."""
        import submitit

        return submitit.helpers.DelayedSubmission(
            PackJob(self.results_dir, self.runs_per_gpu, self.device, self.workers, self.threads), configs)


# --------------------------------------------------------------- launching ---

def _active_slurm_job(store: RunStore) -> str | None:
    """The id of a SLURM job submitted for this run that is still queued or running, if any."""
    import json
    import shutil
    import subprocess

    path = store.path / "submitted.json"
    if not path.exists() or not shutil.which("squeue"):
        return None
    try:
        job_id = json.loads(path.read_text())["job_id"]
        out = subprocess.run(["squeue", "-h", "-j", str(job_id), "-o", "%T"], capture_output=True, text=True,
                             timeout=20)
    except (OSError, ValueError, KeyError, subprocess.SubprocessError):
        return None
    return str(job_id) if out.returncode == 0 and out.stdout.strip() else None


@dataclass
class LaunchPlan:
    """What a launch finds: runs to train, runs done, runs being trained elsewhere (run name -> by whom)."""

    todo: list["RunConfig"]
    done: list[str]
    elsewhere: dict[str, str]
    total: int


def _trainer_of(store: RunStore) -> str:
    """``process PID on HOST`` from the held lock, else from the heartbeat (a trainer on another node)."""
    for path in ([store.lock_path] if store.is_locked() else []) + [store.heartbeat_path]:
        try:
            owner = path.read_text().strip()
        except OSError:
            continue
        if owner:
            return f"process {owner.rsplit(':', 1)[-1]} on {owner.rsplit(':', 1)[0]}" if ":" in owner else owner
    return "another process"


def plan_launch(configs: list["RunConfig"], results_dir: str | os.PathLike, quiet: bool = False) -> LaunchPlan:
    """Sort the runs: done, being trained elsewhere (a live lock or heartbeat, a queued SLURM job), to launch."""
    seen: set[str] = set()
    plan = LaunchPlan(todo=[], done=[], elsewhere={}, total=0)
    for config in configs:
        if config.run_name in seen:
            continue
        seen.add(config.run_name)
        store = RunStore(results_dir, config.run_name)
        if store.is_done():
            plan.done.append(config.run_name)
            continue
        if store.status() == "running":
            plan.elsewhere[config.run_name] = _trainer_of(store)
        elif job := _active_slurm_job(store):
            plan.elsewhere[config.run_name] = f"SLURM job {job} (queued or running)"
        else:
            plan.todo.append(config)
            continue
        if not quiet:
            print(f"  {config.run_name}: being trained by {plan.elsewhere[config.run_name]}; not launched again")
    plan.total = len(seen)
    return plan


def pending_configs(configs: list["RunConfig"], results_dir: str | os.PathLike) -> list["RunConfig"]:
    """The runs to launch: not done, not being trained elsewhere, not queued in SLURM already."""
    return plan_launch(configs, results_dir).todo


def ensure_results_dir(results_dir: Path) -> None:
    """Create the results folder and check that it can be written, or say why not in one line."""
    hint = "pass a --results-dir you can write to"
    if results_dir.exists() and not results_dir.is_dir():
        raise DfkdError(f"cannot create results folder {results_dir}: it is a file; {hint}")
    try:
        results_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise DfkdError(f"cannot create results folder {results_dir}: {error.strerror or error}; {hint}") from None
    probe = results_dir / f".write-test.{os.getpid()}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise DfkdError(f"cannot write in results folder {results_dir}: {error.strerror or error}; {hint}") from None


def check_runs_can_start(configs: list["RunConfig"]) -> None:
    """Input errors a run would only meet once started (an unknown or unfitting architecture), found
    before any run folder exists, so that a typo leaves no ``failed`` run behind.

    The models are built on PyTorch's ``meta`` device: no memory, no weights, only the registry's checks.
    """
    import torch

    from dfkd_bench.models import build_model

    seen: set[tuple] = set()
    for config in configs:
        for role, arch in (("student", config.student_arch), ("teacher", config.teacher.arch)):
            key = (role, arch, config.num_classes, config.channels, config.image_size)
            if key in seen:
                continue
            seen.add(key)
            try:
                with torch.device("meta"):
                    build_model(arch, config.num_classes, config.channels, config.image_size)
            except DfkdError as error:
                raise ConfigError(f"{role} architecture: {error}") from None
            except Exception:  # noqa: BLE001
                # CHOSEN: only the registry's own (user) errors stop a launch here; anything else
                # (a model that cannot be built on the meta device) is left to the run, which records it.
                pass


def _memory_bytes(device: str) -> tuple[int, str] | None:
    """The memory a run on ``device`` can have at most, and what it is called; None if unknown."""
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        index = torch.device(device).index or 0
        return torch.cuda.get_device_properties(index).total_memory, f"the {torch.cuda.get_device_name(index)}'s memory"
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "this machine's memory"
    except (ValueError, OSError, AttributeError):
        return None


def check_todo_can_start(todo: list["RunConfig"], options: dict[str, Any]) -> None:
    """What the runs to train would only find out once started, checked before any folder exists:
    the device, the dataset's test split, the generator for the image size, a batch that cannot fit.

    With the SLURM launcher the runs train on other machines: only what does not depend on the
    machine (the generator) is checked here.
    """
    import torch

    from dfkd_bench.data.loaders import build_dataset
    from dfkd_bench.models import build_generator, generator_for_image_size

    here = options["launcher"] in ("inline", "local")
    device = str(options["device"] or "auto")
    if here and todo:
        from dfkd_bench.runtime import resolve_device

        device = str(resolve_device(device))  # --device cuda without CUDA: one line, now
    seen: set[tuple] = set()
    for config in todo:
        params = config.params
        if isinstance(params.get("generator"), str) and isinstance(params.get("noise_dim", 1), int):
            key = ("generator", params["generator"], params.get("noise_dim"), params.get("conditioning"),
                   config.channels, config.image_size, config.num_classes)
            if key not in seen:
                seen.add(key)
                name = params["generator"]
                try:
                    if name == "auto":
                        name = generator_for_image_size(config.image_size)
                    with torch.device("meta"):
                        build_generator(name, int(params.get("noise_dim", 100)), config.channels, config.image_size,
                                        conditioning=params.get("conditioning", "uncond"),
                                        num_classes=config.num_classes)
                except DfkdError as error:
                    raise ConfigError(f"{config.method} on {config.dataset}: {error}") from None
                except Exception:  # noqa: BLE001 - not buildable on the meta device: the run will tell
                    pass
        if not here:
            continue
        key = ("data", config.dataset, config.data_root, config.image_size)
        if key not in seen:
            seen.add(key)
            build_dataset(config.dataset, config.data_root, "test", image_size=config.image_size)
        memory = _memory_bytes(device)
        batch = config.train.batch_size * config.channels * config.image_size ** 2 * 4
        if memory is not None and batch > memory[0]:
            raise ConfigError(f"batch_size={config.train.batch_size} needs {batch / 2**30:.1f} GB for one batch of "
                              f"{config.image_size}x{config.image_size} images alone, more than {memory[1]} "
                              f"({memory[0] / 2**30:.1f} GB); lower batch_size")


def results_hint(results_dir: str | os.PathLike, count: int) -> str:
    """The last line of `run` / `sweep`: where the records are and how to look at them."""
    results_dir = str(results_dir)
    runs = "the run" if count == 1 else f"the {count} runs"
    return (f"records of {runs} in {results_dir}/ (one folder per run: config.json, records.jsonl, student.pt); "
            f"`dfkd-bench report --results-dir {results_dir}` draws tables and figures, "
            f"`dfkd-bench status --results-dir {results_dir}` lists them")


def collect_summaries(configs: list["RunConfig"], results_dir: str | os.PathLike) -> list[dict[str, Any]]:
    summaries, seen = [], set()
    for config in configs:
        store = RunStore(results_dir, config.run_name)
        if config.run_name not in seen and store.is_done():
            summaries.append(store.summary())
            seen.add(config.run_name)
    return summaries


def make_executor(options: dict[str, Any], folder: Path, cluster: str):
    import submitit

    executor = submitit.AutoExecutor(folder=str(folder), cluster=cluster)
    gpus = int(options["gpus_per_node"] or 0)
    # CHOSEN: --cpus-per-task is per run, so a job training a pack of K runs asks for K times as
    # many CPUs, and each run gets the thread count it would have alone (same CPU results).
    cpus = int(options["cpus_per_task"]) * int(options.get("runs_per_gpu") or 1)
    parameters: dict[str, Any] = {
        "timeout_min": int(options["time"]), "cpus_per_task": cpus,
        "gpus_per_node": gpus, "tasks_per_node": max(1, gpus), "nodes": 1, "name": "dfkd-bench",
    }
    if cluster == "slurm":
        parameters["mem_gb"] = float(options["mem_gb"])
        for key in ("partition", "account", "qos", "constraint"):
            if options[key]:
                parameters[f"slurm_{key}"] = options[key]
        if options["array_parallelism"]:
            parameters["slurm_array_parallelism"] = int(options["array_parallelism"])
        extra = {}
        for item in options["slurm_extra"] or []:
            key, _, value = item.partition("=")
            extra[key.strip()] = value.strip() or True
        if extra:
            parameters["slurm_additional_parameters"] = extra
        if options["slurm_setup"]:
            parameters["slurm_setup"] = list(options["slurm_setup"])
    executor.update_parameters(**parameters)
    return executor


def _wait(jobs, configs: list["RunConfig"], results_dir: str | os.PathLike, poll: float = 2.0) -> None:
    """Wait for every run to be done or failed, printing state changes (requeues included)."""
    last: dict[str, str] = {}
    while True:
        states = {}
        for job, config in zip(jobs, configs):
            store = RunStore(results_dir, config.run_name)
            if store.is_done():
                states[config.run_name] = "done"
            else:
                state = job.state
                states[config.run_name] = state
        for name, state in states.items():
            if last.get(name) != state:
                print(f"  {datetime.datetime.now():%H:%M:%S} {name}: {state}", flush=True)
        last = states
        # COMPLETED without a `done` marker: the job ended but its run did not finish (e.g. the run
        # folder was removed meanwhile); without it in this list the wait would never end.
        finished = all(
            s == "done" or s in ("FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL",
                                 "DEADLINE", "FINISHED", "INTERRUPTED", "COMPLETED")
            or s.startswith("CANCELLED")
            for s in states.values()
        )
        if finished:
            return
        time.sleep(poll)


def launch(configs: list["RunConfig"], results_dir: str | os.PathLike, args: argparse.Namespace | None = None,
           file_options: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Run (or submit) every configuration not yet done; return the summaries of done runs.

    Raises a one-line :class:`DfkdError` when a run failed, was interrupted, or is still being
    trained by another process (so a script never takes an unfinished launch for a finished one).
    """
    options = launch_options(args, file_options)
    results_dir = Path(results_dir)
    check_runs_can_start(configs)  # before anything is written
    plan = plan_launch(configs, results_dir)  # reads only
    check_todo_can_start(plan.todo, options)
    ensure_results_dir(results_dir)
    todo, total, packing = plan.todo, plan.total, int(options["runs_per_gpu"])
    line = (f"{total} runs: {len(plan.done)} already done (skipped), {len(todo)} to run "
            f"[{options['launcher']} launcher{f', {packing} runs per GPU' if packing > 1 else ''}] -> {results_dir}")
    if plan.elsewhere:
        line += f"; {len(plan.elsewhere)} being trained by another process (not launched again)"
    print(line, flush=True)
    failures: dict[str, str] = {}  # run name -> why, when its error.txt could not say it
    if options["launcher"] == "inline":
        if packing > 1 and len(todo) > 1:
            _launch_packed_inline(todo, results_dir, options, failures)
        else:
            _launch_inline(todo, results_dir, options, failures)
        _raise_if_failed(todo, results_dir, total, where="the errors above", failures=failures)
        _raise_if_elsewhere(plan, results_dir)
        return collect_summaries(configs, results_dir)

    if not todo:
        _raise_if_elsewhere(plan, results_dir)
        return collect_summaries(configs, results_dir)
    folder = Path(options["submitit_dir"] or results_dir / "_submitit")
    cluster = "slurm" if options["launcher"] == "slurm" else "local"
    if cluster == "slurm" and not _slurm_available():
        raise DfkdError("--launcher slurm: no SLURM here (`sbatch` not found or `scontrol ping` fails); "
                        "use --launcher inline or local, or start a cluster (scripts/slurm/start.sh)")
    executor = make_executor(options, folder, cluster)
    absolute = str(results_dir.resolve())
    if packing > 1:  # one job per pack of K runs, trained at once on the job's device
        packs = [todo[i:i + packing] for i in range(0, len(todo), packing)]
        job: Any = PackJob(absolute, packing, device=options["device"], workers=int(options["workers"] or 0),
                           threads=int(options["cpus_per_task"]))
        payloads: list[Any] = [[config.to_dict() for config in pack] for pack in packs]
    else:
        packs = [[config] for config in todo]
        job = RunJob(absolute, device=options["device"], workers=int(options["workers"] or 0),
                     threads=int(options["cpus_per_task"]))
        payloads = [config.to_dict() for config in todo]
    if cluster == "slurm":
        jobs = executor.map_array(job, payloads)
        for submitted, pack in zip(jobs, packs):  # lets a relaunch see the run is already queued
            for config in pack:
                RunStore(results_dir, config.run_name).mark_submitted(submitted.job_id, cluster)
        what = f" ({len(todo)} runs, {packing} per job)" if packing > 1 else ""
        if len(jobs) == 1:  # submitit submits a one-element map as a plain job, not an array
            print(f"submitted job {jobs[0].job_id}{what}; logs in {folder}", flush=True)
        else:
            print(f"submitted job array {jobs[0].job_id.split('_')[0]} with {len(jobs)} tasks{what}; logs in {folder}",
                  flush=True)
    else:
        parallel = int(options["array_parallelism"] or 1)
        jobs = _run_local(executor, job, payloads, parallel)
    if options["no_wait"]:
        print(f"not waiting; follow with: dfkd-bench status --results-dir {results_dir}")
        return []
    job_of_run = [submitted for submitted, pack in zip(jobs, packs) for _ in pack]
    _wait(job_of_run, [config for pack in packs for config in pack], results_dir)
    _raise_if_failed(todo, results_dir, total, where=f"the errors above; job logs in {folder}")
    _raise_if_elsewhere(plan, results_dir)
    return collect_summaries(configs, results_dir)


def _launch_inline(todo: list["RunConfig"], results_dir: Path, options: dict[str, Any],
                   failures: dict[str, str]) -> None:
    """One run after another in this process, with progress bars."""
    from dfkd_bench.train.engine import RunInterrupted, StopRequest, stop_on_signals, train_run

    if options["threads"]:
        import torch

        torch.set_num_threads(int(options["threads"]))
    for config in todo:
        stop = StopRequest()
        try:
            with stop_on_signals(stop), packing_environment(1):
                train_run(config, results_dir, device=options["device"], progress=not options["no_progress"],
                          stop=stop, workers=int(options["workers"] or 0))
        except RunInterrupted as stopped:
            print(f"{config.run_name}: {stopped}", file=sys.stderr)
            raise DfkdError("interrupted; checkpoint saved. Run the same command again to resume") from None
        except Exception as error:  # recorded in the run's error.txt; go on with the other runs
            failures[config.run_name] = describe_failure(error)
            if len(todo) == 1:  # _raise_if_failed reports it as the one error line
                continue
            store = RunStore(results_dir, config.run_name)
            details = f" (details in {store.error_path})" if store.error_path.is_file() else ""
            print(f"{config.run_name} failed: {failures[config.run_name]}{details}", file=sys.stderr)


def _launch_packed_inline(todo: list["RunConfig"], results_dir: Path, options: dict[str, Any],
                          failures: dict[str, str]) -> None:
    """K runs at once, each in a worker process of this one (see :class:`PackRunner`)."""
    from dfkd_bench.train.engine import StopRequest, stop_on_signals

    stop = StopRequest()
    stop.training = True  # the launcher trains nothing itself: a stop is forwarded to the workers
    runner = PackRunner(results_dir, int(options["runs_per_gpu"]), device=options["device"],
                        workers=int(options["workers"] or 0), threads=options["threads"])
    with stop_on_signals(stop):
        outcomes = runner.run(todo, stop)
    for name, outcome in outcomes.items():
        if outcome["status"] == "failed":
            failures[name] = outcome.get("message", "")
    if any(o["status"] in ("interrupted", "not started") for o in outcomes.values()):
        raise DfkdError("interrupted; checkpoints saved. Run the same command again to resume")


def _raise_if_failed(todo: list["RunConfig"], results_dir: Path, total: int, where: str,
                     failures: dict[str, str] | None = None) -> None:
    """A launch with failed runs must not exit 0: scripts and CI would take it for a success."""
    failures = failures or {}
    failed = [c.run_name for c in todo if not RunStore(results_dir, c.run_name).is_done()]
    if not failed:
        return

    def reason(name: str) -> str:
        try:
            recorded = RunStore(results_dir, name).last_error_line()
        except OSError:
            recorded = ""
        # What this launch saw first: it keeps the cause when recording it failed (a read-only folder ...).
        return failures.get(name) or recorded or NO_ERROR_RECORDED

    if len(todo) == 1:  # one run: its own error is the message, on one line
        store = RunStore(results_dir, failed[0])
        details = f"; details in {store.error_path}" if store.error_path.is_file() else ""
        raise DfkdError(f"{reason(failed[0])} [run {failed[0]}{details}]")
    lines = [f"{name}: {reason(name)}" for name in failed]
    print("failed runs:\n  " + "\n  ".join(lines), file=sys.stderr)
    raise DfkdError(f"{len(failed)} of {total} runs did not finish ({where}); "
                    "fix the cause and run the same command again: done runs are skipped")


def _raise_if_elsewhere(plan: LaunchPlan, results_dir: Path) -> None:
    """Runs another process is training are not done: say so and fail, rather than report too early.

    # CHOSEN: fail (exit 2) rather than wait: waiting on a run trained by someone else could hang for
    # days with no output; the message says how to follow it, and the same command then finishes.
    """
    still = {name: who for name, who in plan.elsewhere.items() if not RunStore(results_dir, name).is_done()}
    if not still:
        return
    name, who = next(iter(still.items()))
    more = f" and {len(still) - 1} more" if len(still) > 1 else ""
    raise DfkdError(f"{len(still)} of {plan.total} runs are still being trained by another process ({name} by "
                    f"{who}{more}), so their results are not there yet; follow them with `dfkd-bench status "
                    f"--results-dir {results_dir}` and run the same command again once they are done")


def _run_local(executor, job: RunJob, payloads: list[dict[str, Any]], parallel: int):
    """submitit's local executor starts every job at once; keep at most ``parallel`` running."""
    jobs, running = [], []
    for payload in payloads:
        while len([j for j in running if not j.done()]) >= parallel:
            time.sleep(0.5)
        submitted = executor.submit(job, payload)
        jobs.append(submitted)
        running.append(submitted)
    return jobs


def _slurm_available() -> bool:
    import shutil
    import subprocess

    if not shutil.which("sbatch"):
        return False
    try:
        return subprocess.run(["scontrol", "ping"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False

