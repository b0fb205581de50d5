"""Time the suite against official loops on the same protocol, in one process: DFAD and DAFL per iteration, the
CIFAR-10 pool and generator methods per optimiser step.

    python scripts/trace/time_official.py --dfad CHECKOUT --dafl CHECKOUT [--iterations 2] [--rounds 2]
    python scripts/trace/time_official.py --datafree CHECKOUT --fast CHECKOUT --nayer CHECKOUT [--steps 2]
                                          [--step-rounds 2] [--methods dfq,zskt,deepinv,cmi,fast,nayer]

Per iteration (DFAD, DAFL):

For each method, on this CPU with one thread, float32:

* the suite's iteration is the engine's ``run_iteration()`` for the method's MNIST paper protocol as it
  resolves on a CPU (``dfkd-bench list --card M --dataset mnist``: channels-last as the protocol sets it,
  the unfused optimisers and deterministic algorithms of ``auto`` on a CPU), with a random LeNet-5 teacher;
* the official iteration is one iteration of the official loop (``DFAD_mnist.main()``'s ``train()``;
  ``DAFL-train.py``'s loop), run as the tracers run it (``scripts/trace/dfad.py``, ``dafl.py``) but at the
  protocol's sizes: LeNet-5 -> LeNet-5-half, GeneratorA / the script's Generator at full width, the
  protocol's batch and noise, 28-px inputs (zero-padded to 32 for the official LeNet-5: the same numbers).

A warm-up block of each, then blocks of ``--iterations`` iterations alternate (official, suite) for
``--rounds`` rounds, so that a slow moment of a shared machine hits both. Per iteration it keeps the wall
time and this thread's CPU time (``time.thread_time``, less sensitive to other processes); it prints the
medians and the ratios suite / official, and writes them as JSON (``--out``). The engine's deterministic
algorithms (on for a CPU) are process-wide: the official loop runs under them too.

Per optimiser step (DFQ, ZSKT, DeepInversion, CMI of the DataFree collection zju-vipa/CMI, FastDFKD of
zju-vipa/Fast-Datafree, NAYER of tmtuan1307/NAYER): a full iteration of a pool method is hundreds of synthesis
steps, so each kind of step (a synthesis step, a student KD step) is timed, at the protocol's full sizes; see
``time_steps.py`` for exactly what is timed. The file keeps the entries of the runs it does not repeat.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import dafl  # noqa: E402
import dfad  # noqa: E402
import time_steps  # noqa: E402

from dfkd_bench.traces.replay import build_trainer  # noqa: E402

PROTOCOLS = {  # the official sizes: (module, batch, noise, ngf, draws per official iteration)
    "dfad": (dfad, 512, 100, 64, 6),
    "dafl": (dafl, 512, 100, 64, 1),
}


class Clock:
    """``torch.randn`` for the official loop: torch's own draw, and at the first draw of each iteration the
    wall and thread-CPU time; at the first draw of iteration ``iterations + 1`` it ends the loop."""

    def __init__(self, draws_per_iteration: int, iterations: int):
        self.per, self.iterations = draws_per_iteration, iterations
        self.draws = 0
        self.marks: list[tuple[float, float]] = []
        self.randn = torch.randn

    def __call__(self, *size, **kwargs):
        if self.draws % self.per == 0:
            self.marks.append((time.perf_counter(), time.thread_time()))
            if len(self.marks) > self.iterations:
                raise common.TraceDone
        self.draws += 1
        return self.randn(*size, **kwargs)

    def intervals(self) -> list[tuple[float, float]]:
        return [(b[0] - a[0], b[1] - a[1]) for a, b in zip(self.marks, self.marks[1:])]


def official_block(module, checkout: Path, workdir: Path, teacher: dict, iterations: int) -> list[tuple[float, float]]:
    _, batch, noise, ngf, per = PROTOCOLS[module.__name__]
    clock = Clock(per, iterations)
    sizes = dict(widths=(list(common.LENET5_WIDTHS), list(common.LENET5_HALF_WIDTHS)), ngf=ngf, batch=batch, nz=noise)
    if module is dfad:
        sizes["iterations"] = iterations + 1  # the loop's end is the clock's: one more iteration than timed
    module.run_official(checkout, workdir, teacher, clock, **sizes)
    return clock.intervals()


def suite_block(trainer, iterations: int) -> list[tuple[float, float]]:
    times = []
    for _ in range(iterations):
        wall, cpu = time.perf_counter(), time.thread_time()
        trainer.set_learning_rate()
        trainer.run_iteration()
        trainer.iteration += 1
        times.append((time.perf_counter() - wall, time.thread_time() - cpu))
    return times


def time_method(method: str, checkout: Path, iterations: int, rounds: int) -> dict:
    module = PROTOCOLS[method][0]
    common.check_checkout(checkout, module.REPO, module.COMMIT, module.FILES)
    config, _ = common.protocol_config(method, "mnist", architectures={}, teacher_arch="lenet5",
                                       student_arch="lenet5_half", train=dict(drift_every=0), params={}, why={})
    teacher = common.random_lenet_teacher(list(common.LENET5_WIDTHS))
    teacher = {k: v.float() for k, v in teacher.items()}
    with tempfile.TemporaryDirectory(prefix=f"{method}-timing-") as tmp:
        trainer = build_trainer({"method": method, "config": config}, teacher, Path(tmp))
        official, suite = [], []
        official_block(module, checkout, Path(tmp), teacher, 1)  # warm-up
        suite_block(trainer, 1)
        for _ in range(rounds):
            official += official_block(module, checkout, Path(tmp), teacher, iterations)
            suite += suite_block(trainer, iterations)
    result = {"iterations": len(suite)}
    for name, times in (("official", official), ("suite", suite)):
        result[f"{name}_wall_s"] = statistics.median(t[0] for t in times)
        result[f"{name}_cpu_s"] = statistics.median(t[1] for t in times)
    result["suite_over_official_wall"] = result["suite_wall_s"] / result["official_wall_s"]
    result["suite_over_official_cpu"] = result["suite_cpu_s"] / result["official_cpu_s"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dfad", type=Path, help=f"a checkout of {dfad.REPO} at {dfad.COMMIT[:7]}")
    parser.add_argument("--dafl", type=Path, help=f"a checkout of {dafl.REPO} at {dafl.COMMIT[:7]}")
    parser.add_argument("--iterations", type=int, default=2, help="timed iterations per block (default 2)")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds (default 2)")
    parser.add_argument("--datafree", type=Path, help=f"a checkout of {time_steps.datafree.REPO} at "
                                                      f"{time_steps.datafree.COMMIT[:7]} (DFQ, ZSKT, DeepInversion, CMI)")
    parser.add_argument("--fast", type=Path, help=f"a checkout of {time_steps.fast.REPO} at "
                                                  f"{time_steps.fast.COMMIT[:7]}")
    parser.add_argument("--nayer", type=Path, help=f"a checkout of {time_steps.nayer.REPO} at "
                                                   f"{time_steps.nayer.COMMIT[:7]}")
    parser.add_argument("--zskt", type=Path, help=f"a checkout of {time_steps.zskt.REPO} at "
                                                  f"{time_steps.zskt.COMMIT[:7]} (ZSKT's own code)")
    parser.add_argument("--methods", default=",".join(time_steps.SETTINGS),
                        help="per-step methods to time, of those whose checkout is given (default: all)")
    parser.add_argument("--steps", type=int, default=1, help="timed steps of each kind per block (default 1)")
    parser.add_argument("--step-rounds", type=int, default=2, help="alternating rounds of step blocks (default 2)")
    parser.add_argument("--out", type=Path, default=common.TRACES / "timing_cpu.json")
    args = parser.parse_args()
    checkouts = {"datafree": args.datafree, "fast": args.fast, "nayer": args.nayer, "zskt": args.zskt}
    step_methods = [m for m in args.methods.split(",") if checkouts[time_steps.SETTINGS[m]["official"]] is not None]
    if not (args.dfad or args.dafl or step_methods):
        raise SystemExit("error: pass at least one of --dfad, --dafl, --datafree, --fast, --nayer, --zskt (a checkout)")
    torch.set_num_threads(1)
    summary = json.loads(args.out.read_text()) if args.out.is_file() else {}
    results = {}
    for method in ("dfad", "dafl"):
        checkout = getattr(args, method)
        if checkout is None:
            continue
        results[method] = time_method(method, checkout.resolve(), args.iterations, args.rounds)
        r = results[method]
        print(f"{method}: suite {r['suite_wall_s']:.3f} s / official {r['official_wall_s']:.3f} s per iteration = "
              f"{r['suite_over_official_wall']:.2f} (wall); CPU {r['suite_cpu_s']:.3f} / {r['official_cpu_s']:.3f} s = "
              f"{r['suite_over_official_cpu']:.2f}  (medians of {r['iterations']} iterations each)")
    if results:
        summary.update({"command": "python scripts/trace/time_official.py " + " ".join(
            f"--{m} CHECKOUT" for m in results) + f" --iterations {args.iterations} --rounds {args.rounds}",
            "results": results})
    per_step = summary.setdefault("per_step", {"results": {}})
    for method in step_methods:
        checkout = checkouts[time_steps.SETTINGS[method]["official"]].resolve()
        r = per_step["results"][method] = time_steps.time_method(method, checkout, args.steps, args.step_rounds)
        for kind in time_steps.KINDS:
            k = r[kind]
            print(f"{method} {kind} step: CPU suite {k['suite_cpu_s']:.2f} s / official {k['official_cpu_s']:.2f} s = "
                  f"{k['suite_over_official_cpu']:.2f}; wall {k['suite_over_official_wall']:.2f}  (medians of "
                  f"{k['steps']} steps each)", flush=True)
        r["command"] = ("python scripts/trace/time_official.py " + " ".join(
            f"--{name} CHECKOUT" for name, path in checkouts.items() if path is not None)
            + f" --methods {','.join(step_methods)} --steps {args.steps} --step-rounds {args.step_rounds}")
        per_step["timed"] = time_steps.__doc__.split("\n\n", 1)[1].strip()
        write(args.out, summary)  # after each method: kept if the run is killed
    write(args.out, summary)
    print(f"wrote {args.out}")


def write(path: Path, summary: dict) -> None:
    summary.update({"threads": 1, "machine": {"torch": torch.__version__, "python": platform.python_version(),
                                              "processor": platform.processor() or platform.machine()}})
    path.write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
