"""``dfkd-bench bench --packed K``: K runs packed on one device against one run alone.

Small students leave a big GPU mostly idle; ``--runs-per-gpu K`` trains K runs
at once, each in its own process (:class:`dfkd_bench.cluster.launch.PackRunner`). This
benchmark measures what that buys, in one process tree: worker processes
exactly like the packed runs' (one process per run, same thread count), each
building one run of the benchmark's configuration (``--config cpu``: the digits
preset; ``gpu``: CIFAR WRN-40-2 -> WRN-16-2, batch 256, n_S 60, n_G 3) with a
randomly initialised teacher (speed does not depend on its weights).

1. *Alone*: for each method of the packed set, one worker builds its run,
   warms up, then times ``--iterations`` iterations with nothing else running.
2. *Packed*: K workers (run i trains method i mod len(methods), seed i) build
   and warm up, wait at a barrier, start together and time the same number of
   iterations each.

An iteration is what the engine runs (:meth:`dfkd_bench.train.engine.Trainer.run_iteration`);
on CUDA each one is synchronised before its time stamp. The ratio printed is
the work of the K runs timed alone one after another (the sum of their alone
times) divided by the wall time of the K packed runs, from the first start to
the last finish: the aggregate throughput of K packed runs over that of one run
alone. Above 1, packing trains a sweep faster; K is a win while the ratio still
grows with K.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from dfkd_bench.errors import ConfigError, DfkdError
from dfkd_bench.store import dumps_strict

READY_TIMEOUT_S = 900.0  # building a run and its warm-up (CUDA graphs capture, cuDNN autotuning)


# ------------------------------------------------------------- the worker ---

def pack_bench_worker_main() -> int:
    """One benchmark worker: build the run described on stdin, warm up, say ``ready`` on the pipe
    ``argv[1]``, wait for ``go`` on stdin, time the iterations, write them as JSON on the pipe."""
    fd = int(sys.argv[1])
    spec = json.loads(sys.stdin.readline())
    import torch

    from dfkd_bench.bench.configs import CONFIGS
    from dfkd_bench.train.engine import Trainer
    from dfkd_bench.cluster.experiment import RunRequest, TeacherOptions, build_run_configs

    torch.set_num_threads(int(spec["threads"]))
    config_spec = CONFIGS[spec["kind"]]
    overrides = {**config_spec["overrides"], **spec["extra"], "drift_every": 0, "eval_every": 0}
    request = RunRequest(methods=[spec["method"]], dataset=config_spec["dataset"], seeds=[int(spec["seed"])],
                         teacher_arch=config_spec["teacher_arch"], student_arch=config_spec["student_arch"],
                         overrides=overrides, teacher=TeacherOptions(checkpoint=spec["teacher"]))
    trainer = Trainer(build_run_configs(request)[0], Path(spec["folder"]) / "runs", device=spec["device"],
                      progress=False)
    trainer.build()
    cuda = trainer.device.type == "cuda"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(trainer.device)

    for _ in range(int(spec["warmup"])):
        trainer.run_iteration()
    sync()
    os.write(fd, b"ready\n")
    if sys.stdin.readline().strip() != "go":
        return 1
    start = time.monotonic()
    stamps = []
    for _ in range(int(spec["iterations"])):
        trainer.run_iteration()
        sync()
        stamps.append(time.monotonic())
    os.write(fd, (json.dumps({"start": start, "stamps": stamps, "device": str(trainer.device),
                              "gpu": torch.cuda.get_device_name(trainer.device) if cuda else None}) + "\n").encode())
    os.close(fd)
    return 0


# ------------------------------------------------------------- the parent ---

class _Worker:
    def __init__(self, spec: dict[str, Any], threads: int):
        read_fd, write_fd = os.pipe()
        env = dict(os.environ, OMP_NUM_THREADS=str(threads))
        package_parent = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_parent, env.get("PYTHONPATH")) if p)
        command = [sys.executable, "-c",
                   "import sys; from dfkd_bench.bench.pack import pack_bench_worker_main; "
                   "sys.exit(pack_bench_worker_main())", str(write_fd)]
        try:
            self.process = subprocess.Popen(command, stdin=subprocess.PIPE, env=env, pass_fds=(write_fd,))
        except BaseException:
            os.close(read_fd)
            raise
        finally:
            os.close(write_fd)
        self.spec = spec
        self.pipe = os.fdopen(read_fd, "rb")
        assert self.process.stdin is not None
        self.process.stdin.write((json.dumps(spec) + "\n").encode())
        self.process.stdin.flush()

    def label(self) -> str:
        return f"{self.spec['method']} seed {self.spec['seed']}"

    def readline(self, timeout: float) -> bytes:
        ready, _, _ = select.select([self.pipe], [], [], timeout)
        if not ready:
            raise DfkdError(f"packed benchmark: the {self.label()} worker said nothing for {timeout:.0f} s")
        line = self.pipe.readline()
        if not line:
            code = self.process.wait()
            raise DfkdError(f"packed benchmark: the {self.label()} worker ended (exit status {code}) before "
                            "reporting; its error is printed above")
        return line

    def go(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(b"go\n")
        self.process.stdin.flush()

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        self.pipe.close()


def _timed_together(specs: list[dict[str, Any]], threads: int) -> list[dict[str, Any]]:
    """Start one worker per spec, let all of them build and warm up, start the timing at once."""
    workers: list[_Worker] = []
    try:
        for spec in specs:
            workers.append(_Worker(spec, threads))
        for worker in workers:
            if worker.readline(READY_TIMEOUT_S).strip() != b"ready":
                raise DfkdError(f"packed benchmark: the {worker.label()} worker did not get ready")
        for worker in workers:
            worker.go()
        results = [json.loads(worker.readline(READY_TIMEOUT_S)) for worker in workers]
        for worker in workers:
            worker.process.wait(timeout=60)
        return results
    finally:
        for worker in workers:
            worker.close()


def _per_iteration(result: dict[str, Any]) -> float:
    stamps = result["stamps"]
    return (stamps[-1] - result["start"]) / len(stamps)


def run_pack_benchmark(runs: int, *, kind: str = "auto", device: str = "auto", iterations: int = 10,
                       warmup: int = 2, methods: list[str] | tuple[str, ...] = ("abm", "mem", "mad"),
                       threads: int | None = None, extra: dict[str, Any] | None = None,
                       out=print) -> dict[str, Any]:
    """Time ``runs`` packed runs against each of their methods alone; print and return the ratio."""
    if not isinstance(runs, int) or runs < 1:
        raise ConfigError(f"--packed must be a positive number of runs, got {runs!r}")
    if iterations < 1 or warmup < 0:
        raise ConfigError("--iterations must be >= 1 and --warmup >= 0")
    methods = list(methods)
    if not methods:
        raise ConfigError("--methods: give at least one method to pack")
    from dfkd_bench.bench.configs import CONFIGS, random_teacher as _random_teacher
    from dfkd_bench.method_api import get_method

    for method in methods:
        get_method(method)
    if kind == "auto":
        import torch

        wants_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
        kind = "gpu" if wants_cuda else "cpu"
    if kind not in CONFIGS:
        raise ConfigError(f"--config {kind!r}: use one of auto, {', '.join(CONFIGS)}")
    # CHOSEN: the same thread count per run alone and packed (an equal share of the cores by
    # default), as `run --runs-per-gpu K` gives its workers: the ratio is then what packing adds.
    threads = int(threads) if threads else max(1, (os.cpu_count() or 1) // runs)
    spec_of = CONFIGS[kind]
    packed_methods = [methods[i % len(methods)] for i in range(runs)]
    with tempfile.TemporaryDirectory(prefix="dfkd-pack-bench-") as tmp:
        folder = Path(tmp)
        teacher = _random_teacher(spec_of["teacher_arch"], spec_of["dataset"], folder)
        base = {"kind": kind, "device": device, "iterations": iterations, "warmup": warmup, "threads": threads,
                "extra": dict(extra or {}), "teacher": teacher, "folder": str(folder)}
        out(f"packed benchmark: {runs} run{'s' if runs > 1 else ''} of {spec_of['dataset']} "
            f"({spec_of['teacher_arch']} -> {spec_of['student_arch']}) on one device ({device}), "
            f"{iterations} timed iterations each after {warmup} warm-up, {threads} CPU thread(s) per run")
        alone: dict[str, float] = {}
        alone_raw: dict[str, dict[str, Any]] = {}
        for method in dict.fromkeys(packed_methods):
            (result,) = _timed_together([{**base, "method": method, "seed": 0}], threads)
            alone[method] = _per_iteration(result)
            alone_raw[method] = result
            out(f"  alone   {method:5s} {alone[method] * 1e3:9.2f} ms/iteration")
        packed = _timed_together([{**base, "method": m, "seed": i} for i, m in enumerate(packed_methods)], threads)
    wall = max(r["stamps"][-1] for r in packed) - min(r["start"] for r in packed)
    for i, (method, result) in enumerate(zip(packed_methods, packed)):
        out(f"  packed  {method:5s} seed {i}: {_per_iteration(result) * 1e3:9.2f} ms/iteration "
            f"({_per_iteration(result) / alone[method]:.2f}x its time alone)")
    serial = sum(iterations * alone[m] for m in packed_methods)  # the same work, one run at a time
    ratio = serial / wall
    total = runs * iterations
    out(f"aggregate: {total / wall:.2f} iterations/s packed ({runs} at once, {wall:.2f} s) vs "
        f"{total / serial:.2f} iterations/s one run at a time ({serial:.2f} s)")
    out(f"packed/alone throughput ratio: {ratio:.2f} (K={runs})")
    results = {
        "runs_per_gpu": runs, "config": kind, "device": packed[0]["device"], "gpu": packed[0]["gpu"],
        "threads_per_run": threads, "iterations": iterations, "warmup": warmup, "methods": packed_methods,
        "alone_seconds_per_iteration": alone,
        "packed_seconds_per_iteration": [_per_iteration(r) for r in packed],
        "packed_wall_seconds": wall, "alone_serial_seconds": serial, "ratio": ratio,
    }
    out(dumps_strict(results, sort_keys=True))
    return results
