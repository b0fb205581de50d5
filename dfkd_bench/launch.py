"""Launchers: inline (this process), local (submitit's local executor), slurm (submitit).

Jobs receive a configuration dictionary and a results folder, never models.
Runs already ``done`` are skipped before anything is submitted, so a launch
can be repeated after failures. On SLURM, many runs go out as ONE job array
(``executor.map_array``).

Preemption. submitit asks SLURM for ``SIGUSR2`` shortly before a time limit
and on preemption, and its handler calls our job's ``checkpoint()`` and
requeues the job. Saving a consistent state is only possible between two
iterations, so :class:`RunJob` puts its own handler in front: the signal only
*requests* a stop; the engine finishes the current iteration, writes a
checkpoint and raises :class:`RunInterrupted`; then we hand over to
submitit's handler, which requeues the job. The requeued job runs the same
configuration and resumes from that checkpoint. A job killed without warning
(``scontrol requeue``, node failure, SIGKILL) resumes from its last periodic
checkpoint instead -- exactly, because checkpoints hold every random state.
"""

from __future__ import annotations

import argparse
import datetime
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from typing import TYPE_CHECKING

from dfkd_bench.errors import DfkdError
from dfkd_bench.store import RunStore

if TYPE_CHECKING:  # the engine pulls in torch and torchvision: import it only when a run starts
    from dfkd_bench.config import RunConfig
    from dfkd_bench.method_api import DistributedInfo


def add_launcher_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("launching")
    group.add_argument("--launcher", choices=["inline", "local", "slurm"], default=None,
                       help="inline: in this process (default); local: submitit's local executor (subprocesses); "
                            "slurm: one SLURM job array through submitit")
    group.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: auto)")
    group.add_argument("--workers", type=int, default=None, help="data-loading processes for evaluation (default: 0)")
    group.add_argument("--threads", type=int, default=None,
                       help="inline: torch CPU threads (default: torch's); local/slurm jobs use --cpus-per-task. "
                            "CPU results are bit-identical only for the same thread count")
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


LAUNCH_DEFAULTS = {
    "launcher": "inline", "device": "auto", "workers": 0, "time": 240, "gpus_per_node": 0, "cpus_per_task": 2,
    "mem_gb": 8.0, "array_parallelism": None, "partition": None, "account": None, "qos": None, "constraint": None,
    "slurm_extra": None, "slurm_setup": None, "submitit_dir": None, "no_wait": False, "no_progress": False,
    "threads": None,
}


def launch_options(args: argparse.Namespace | None, file_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Defaults < experiment file ``[resources]`` < command line."""
    options = dict(LAUNCH_DEFAULTS)
    for key, value in (file_options or {}).items():
        key = key.replace("-", "_")
        if key not in LAUNCH_DEFAULTS:
            raise DfkdError(f"unknown launch/resource option {key!r}; known: {', '.join(sorted(LAUNCH_DEFAULTS))}")
        options[key] = value
    if args is not None:
        for key in LAUNCH_DEFAULTS:
            value = getattr(args, key, None)
            if value not in (None, False):
                options[key] = value
    return options


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
        from dfkd_bench.engine import RunInterrupted, StopRequest, train_run
        from dfkd_bench.method_api import DistributedInfo

        if self.threads:
            torch.set_num_threads(self.threads)
        run_config = RunConfig.from_dict(config)
        stop = StopRequest()
        submitit_handler = signal.getsignal(signal.SIGUSR2)
        pending: list[tuple[int, Any]] = []

        def on_preemption(signum, frame):
            stop.request(signal.Signals(signum).name)
            pending.append((signum, frame))

        signal.signal(signal.SIGUSR2, on_preemption)
        distributed = _distributed_from_submitit() if "SLURM_JOB_ID" in os.environ else DistributedInfo()
        device = self.device
        if distributed.world_size > 1 and device in ("auto", "cuda") and torch.cuda.is_available():
            device = f"cuda:{torch.cuda.current_device()}"
        try:
            return train_run(run_config, self.results_dir, device=device, progress=False,
                             distributed=distributed, stop=stop, workers=self.workers)
        except RunInterrupted:
            if pending and callable(submitit_handler):
                submitit_handler(*pending[-1])  # -> self.checkpoint() -> requeue -> exit
            raise

    def checkpoint(self, config: dict[str, Any]):
        """submitit calls this on preemption/timeout: requeue the same run (it resumes from its checkpoint)."""
        import submitit

        return submitit.helpers.DelayedSubmission(RunJob(self.results_dir, self.device, self.workers, self.threads),
                                                  config)


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


def pending_configs(configs: list["RunConfig"], results_dir: str | os.PathLike) -> list["RunConfig"]:
    """The runs to launch: not done, not being trained elsewhere, not queued in SLURM already."""
    seen, pending = set(), []
    for config in configs:
        if config.run_name in seen:
            continue
        seen.add(config.run_name)
        store = RunStore(results_dir, config.run_name)
        if store.is_done():
            continue
        if store.status() == "running":
            print(f"  {config.run_name}: being trained by another process; not launched again")
            continue
        job = _active_slurm_job(store)
        if job:
            print(f"  {config.run_name}: SLURM job {job} is still queued or running; not launched again")
            continue
        pending.append(config)
    return pending


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
    parameters: dict[str, Any] = {
        "timeout_min": int(options["time"]), "cpus_per_task": int(options["cpus_per_task"]),
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
    """Run (or submit) every configuration not yet done; return the summaries of done runs."""
    from dfkd_bench.engine import RunInterrupted, StopRequest, stop_on_signals, train_run

    options = launch_options(args, file_options)
    results_dir = Path(results_dir)
    todo = pending_configs(configs, results_dir)
    total = len({c.run_name for c in configs})
    print(f"{total} runs: {total - len(todo)} already done (skipped), {len(todo)} to run "
          f"[{options['launcher']} launcher] -> {results_dir}", flush=True)
    if options["launcher"] == "inline":
        if options["threads"]:
            import torch

            torch.set_num_threads(int(options["threads"]))
        for config in todo:
            stop = StopRequest()
            try:
                with stop_on_signals(stop):
                    train_run(config, results_dir, device=options["device"], progress=not options["no_progress"],
                              stop=stop, workers=int(options["workers"] or 0))
            except RunInterrupted as stopped:
                print(f"{config.run_name}: {stopped}", file=sys.stderr)
                raise DfkdError("interrupted; checkpoint saved. Run the same command again to resume") from None
            except Exception as error:  # recorded in the run's error.txt; go on with the other runs
                if len(todo) == 1:  # _raise_if_failed reports it as the one error line
                    continue
                detail = str(error).splitlines()[0] if str(error) else ""
                print(f"{config.run_name} failed: {type(error).__name__}: {detail} "
                      f"(details in {RunStore(results_dir, config.run_name).error_path})", file=sys.stderr)
        _raise_if_failed(todo, results_dir, total, where="the errors above")
        return collect_summaries(configs, results_dir)

    if not todo:
        return collect_summaries(configs, results_dir)
    folder = Path(options["submitit_dir"] or results_dir / "_submitit")
    cluster = "slurm" if options["launcher"] == "slurm" else "local"
    if cluster == "slurm" and not _slurm_available():
        raise DfkdError("--launcher slurm: no SLURM here (`sbatch` not found or `scontrol ping` fails); "
                        "use --launcher inline or local, or start a cluster (scripts/slurm/start.sh)")
    executor = make_executor(options, folder, cluster)
    job = RunJob(str(results_dir.resolve()), device=options["device"], workers=int(options["workers"] or 0),
                 threads=int(options["cpus_per_task"]))
    payloads = [config.to_dict() for config in todo]
    if cluster == "slurm":
        jobs = executor.map_array(job, payloads)
        for submitted, config in zip(jobs, todo):  # lets a relaunch see the run is already queued
            RunStore(results_dir, config.run_name).mark_submitted(submitted.job_id, cluster)
        if len(jobs) == 1:  # submitit submits a one-element map as a plain job, not an array
            print(f"submitted job {jobs[0].job_id}; logs in {folder}", flush=True)
        else:
            print(f"submitted job array {jobs[0].job_id.split('_')[0]} with {len(jobs)} tasks; logs in {folder}",
                  flush=True)
    else:
        parallel = int(options["array_parallelism"] or 1)
        jobs = _run_local(executor, job, payloads, parallel)
    if options["no_wait"]:
        print(f"not waiting; follow with: dfkd-bench status --results-dir {results_dir}")
        return []
    _wait(jobs, todo, results_dir)
    _raise_if_failed(todo, results_dir, total, where=f"the errors above; job logs in {folder}")
    return collect_summaries(configs, results_dir)


def _raise_if_failed(todo: list["RunConfig"], results_dir: Path, total: int, where: str) -> None:
    """A launch with failed runs must not exit 0: scripts and CI would take it for a success."""
    failed = [c.run_name for c in todo if not RunStore(results_dir, c.run_name).is_done()]
    if not failed:
        return
    if len(todo) == 1:  # one run: its own error is the message, on one line
        store = RunStore(results_dir, failed[0])
        reason = store.last_error_line() or "no error recorded"
        raise DfkdError(f"{reason} [run {failed[0]}; details in {store.error_path}]")
    lines = [f"{name}: {RunStore(results_dir, name).last_error_line() or 'no error recorded'}" for name in failed]
    print("failed runs:\n  " + "\n  ".join(lines), file=sys.stderr)
    raise DfkdError(f"{len(failed)} of {total} runs did not finish ({where}); "
                    "fix the cause and run the same command again: done runs are skipped")


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

