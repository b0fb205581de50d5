#!/usr/bin/env python3
"""How long a run takes from SIGTERM to exit, per method: the README's "Reliability" table.

For each method, a run of the dataset's preset (CPU: digits, 1,200 iterations of one generator step and
five student steps on batch 128) is started with `dfkd-bench run`, sent SIGTERM at a random moment once
it trains, and timed until its stop line (printed once the checkpoint is committed, after the optimiser
step during which the signal arrived) and until its process has exited (Python's teardown of torch and
the other libraries comes after that, with nothing left to lose); the same command then
resumes it, and the next sample stops it again. Each stop's message says where it fell (a generator or
student step in the middle of a stage, or an iteration's end).

    python scripts/stop_latency.py                      # every method, 6 stops each, digits, 1 thread
    python scripts/stop_latency.py --methods mad,cmi --samples 10 --set student_steps=400

Wall-clock numbers on a shared machine: the load average is printed with them.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def wait_until_training(results: Path, process: subprocess.Popen, timeout: float = 600.0) -> bool:
    """True once the run's records exist (written after set-up, by a start or a resume), False if it ended."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return False
        if any(path.stat().st_size for path in results.glob("*/records.jsonl")):
            return True
        time.sleep(0.05)
    raise TimeoutError("the run did not start training")


def sample(command: list[str], results: Path, env: dict, rng: random.Random) -> dict | None:
    """One start, stopped by SIGTERM a random 1-4 s into training; None if it finished first. Times the
    stop line (printed once the checkpoint is committed: nothing is lost from then on, not even by a
    SIGKILL) and the process's exit (after the interpreter's teardown)."""
    for records in results.glob("*/records.jsonl"):
        records.unlink()  # a resume writes them back from its checkpoint once it is set up
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines: list[tuple[float, str]] = []
    reader = threading.Thread(target=lambda: lines.extend((time.monotonic(), line) for line in process.stderr),
                              daemon=True)
    reader.start()
    if not wait_until_training(results, process):
        process.wait()
        return None
    time.sleep(rng.uniform(1.0, 4.0))
    sent = time.monotonic()
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=600)
    exited = time.monotonic() - sent
    reader.join(timeout=10)
    if process.returncode == 0:
        return None
    stops = [(at, line) for at, line in lines if "stopped by SIGTERM" in line]
    if not stops or process.returncode != 2:
        raise RuntimeError(f"unexpected end (status {process.returncode}): {''.join(l for _, l in lines)[-2000:]}")
    at, line = stops[0]
    stop = re.search(r"stopped by SIGTERM (after (\w+) step|at iteration|while setting up)", line)
    where = stop.group(2) or ("iteration end" if "iteration" in stop.group(1) else "set-up")
    size = max((p.stat().st_size for p in results.glob("*/checkpoints/*.pt")), default=0)
    return {"saved": at - sent, "exited": exited, "where": where, "checkpoint_mb": size / 2**20}


def main() -> int:
    from dfkd_bench.method_api import list_methods

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="all", help="comma-separated, or all (default)")
    parser.add_argument("--samples", type=int, default=6, help="stops per method (default 6)")
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--teacher-cache", default=str(ROOT / "results" / "zoo" / "teachers"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="as for dfkd-bench run")
    parser.add_argument("--seed", type=int, default=0, help="of the random moments")
    args = parser.parse_args()
    methods = list(list_methods()) if args.methods == "all" else args.methods.split(",")
    rng = random.Random(args.seed)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    env.pop("DFKD_BENCH_SIGNAL", None)
    print(f"load average before: {' '.join(f'{x:.1f}' for x in os.getloadavg())} on {os.cpu_count()} cores",
          flush=True)
    rows = []
    for method in methods:
        with tempfile.TemporaryDirectory() as folder:
            results = Path(folder)
            command = [sys.executable, "-m", "dfkd_bench.cli", "run", "--methods", method, "--dataset", args.dataset,
                       "--teacher-cache", args.teacher_cache, "--results-dir", str(results), "--no-progress",
                       "--threads", str(args.threads), *[a for item in args.set for a in ("--set", item)]]
            samples = [s for s in (sample(command, results, env, rng) for _ in range(args.samples)) if s]
        saved, exited = [s["saved"] for s in samples], [s["exited"] for s in samples]
        where = {place: sum(1 for s in samples if s["where"] == place) for place in
                 ("generator", "student", "pretrain", "iteration end", "set-up")}
        row = (f"| {method} | {len(samples)} | {statistics.median(saved):.2f} | {max(saved):.2f} | "
               f"{statistics.median(exited):.2f} | {max(exited):.2f} | "
               f"{', '.join(f'{k} {v}' for k, v in where.items() if v)} | "
               f"{max(s['checkpoint_mb'] for s in samples):.1f} |")
        print(row, flush=True)
        rows.append(row)
    print(f"load average after: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    print("\n| method | stops | checkpoint saved, median s | worst s | process exited, median s | worst s | "
          "where the stops fell | checkpoint MB |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | --- | ---: |")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
