"""``dfkd-bench bench``: how fast is one iteration of ABM, DFKD-Mem and MAD?

In ONE process and one run, the benchmark builds each method twice -- the
fast path and the plain reference path (fp32, eager, one forward per source,
float32 memory bank) -- on the same configuration, and interleaves timed
iterations of all of them round-robin after a warm-up, so that a slow
moment of the machine hits every variant alike. An iteration is exactly what
the engine runs (:meth:`dfkd_bench.train.engine.Trainer.run_iteration`): one
generator stage and one student stage.

No data and no trained teacher are needed: speed does not depend on the
teacher's weights, so a randomly initialised teacher of the right architecture
is used.

Per variant it prints the median iteration time and its spread (interquartile
range), the student training images per second (all images the student trains
on in a stage: from G, the EMA G and memory), the peak memory (CUDA: peak
allocated; CPU: the process's peak resident set during that variant's
iterations, read from /proc after resetting the high-water mark) and the
ratios the issue asks for. The last line is one JSON object for scripts.
"""

from __future__ import annotations

import math
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from dfkd_bench.bench.configs import CONFIGS, FAST, METHODS, REFERENCE
from dfkd_bench.bench.configs import random_teacher as _random_teacher
from dfkd_bench.store import dumps_strict

# Dense bf16 peaks from the vendors' datasheets, for "achieved vs peak".
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "V100": 125.0}


def _peak_rss_reset() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _peak_rss_mb() -> float:
    import torch

    from dfkd_bench.train.engine import peak_memory_mb

    return peak_memory_mb(torch.device("cpu"))


def _rss_mb() -> float:
    """The process's current resident set (MB), from /proc/self/statm."""
    import os

    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        return 0.0
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


class MemoryProbe:
    """Memory now and the high-water mark since the last reset, in MB: CUDA allocated bytes on a
    GPU, the resident set on a CPU."""

    def __init__(self, device) -> None:
        self.device = device
        self.cuda = getattr(device, "type", str(device)) == "cuda"

    def now(self) -> float:
        if self.cuda:
            import torch

            return torch.cuda.memory_allocated(self.device) / 2**20
        return _rss_mb()

    def reset_peak(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            _peak_rss_reset()

    def peak(self) -> float:
        if self.cuda:
            import torch

            return torch.cuda.max_memory_allocated(self.device) / 2**20
        return _peak_rss_mb()


def _student_images_per_iteration(trainer) -> int:
    """Images the student trains on per iteration (every source of every student step),
    counted by the engine over one student stage."""
    trainer.generator_stage()
    before = trainer.counters["student_images"]
    trainer.student_stage()
    return int(trainer.counters["student_images"] - before)


def build_variants(kind: str, device: str, methods, fast_overrides: dict[str, Any], extra: dict[str, Any], folder: Path,
                   resident: dict | None = None, probe: MemoryProbe | None = None):
    """Build every (method, mode) trainer; ``resident[(method, mode)]`` gets the memory (MB) its
    build added (see :class:`MemoryProbe`)."""
    from dfkd_bench.train.engine import Trainer
    from dfkd_bench.cluster.experiment import RunRequest, TeacherOptions, build_run_configs

    spec = CONFIGS[kind]
    teacher = _random_teacher(spec["teacher_arch"], spec["dataset"], folder)
    variants = {}
    modes = [("fast", fast_overrides), ("reference", REFERENCE)]
    if kind == "gpu" or str(device).startswith("cuda"):
        # what the CUDA graphs add (the fast path with eager student steps), and where FLOPs are counted
        modes.insert(1, ("fast_eager", {**fast_overrides, "cuda_graphs": False}))
    for mode, perf in modes:
        for method in methods:
            overrides = {**spec["overrides"], **extra, **perf, "drift_every": 0, "eval_every": 0}
            if method == "mem":
                overrides["memory_dtype"] = "uint8" if mode == "fast" else "float32"
            request = RunRequest(methods=[method], dataset=spec["dataset"], seeds=[0], teacher_arch=spec["teacher_arch"],
                                 student_arch=spec["student_arch"], overrides=overrides,
                                 teacher=TeacherOptions(checkpoint=teacher))
            before = probe.now() if probe is not None else 0.0
            trainer = Trainer(build_run_configs(request)[0], folder / "runs", device=device, progress=False)
            trainer.build()
            variants[(method, mode)] = trainer
            if probe is not None and resident is not None:
                resident[(method, mode)] = max(0.0, probe.now() - before)
    return variants


def _flops_per_iteration(trainer) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        trainer.run_iteration()
    return float(counter.get_total_flops())


def eager_variant_for_flops(variants: dict, method: str):
    """The trainer whose iteration FLOPs stand for the fast path's: ``fast_eager`` (the same
    mathematics with eager student steps) where it exists. A replayed CUDA graph dispatches
    nothing, so counting on ``fast`` would miss every replayed student step."""
    return variants.get((method, "fast_eager")) or variants[(method, "fast")]


def flops_per_iteration(variants: dict, method: str) -> float:
    return _flops_per_iteration(eager_variant_for_flops(variants, method))


def time_variants(variants: dict, iterations: int, warmup: int, probe: MemoryProbe, sync,
                  resident: dict | None = None) -> tuple[dict, dict, dict]:
    """Warm up each variant, then time ``iterations`` interleaved iterations of all of them.

    Returns per variant the iteration times, the student-stage times and the peak memory (MB) of
    that variant alone: the memory its build and warm-up added (``resident`` holds the build's
    share) plus the most one of its timed iterations added on top of what was allocated when it
    began -- not the process's peak, which holds every variant at once.
    """
    import time as _time

    resident = dict(resident or {})
    for key, trainer in variants.items():  # warm-up (and compilation, optimiser state, graph capture)
        sync()
        before = probe.now()
        for _ in range(warmup):
            trainer.run_iteration()
        sync()
        resident[key] = resident.get(key, 0.0) + max(0.0, probe.now() - before)
    sync()
    times: dict = {key: [] for key in variants}
    student_times: dict = {key: [] for key in variants}
    transient: dict = {key: 0.0 for key in variants}
    for _ in range(iterations):
        for key, trainer in variants.items():
            sync()
            probe.reset_peak()
            base = probe.now()
            start = _time.perf_counter()
            trainer.generator_stage()
            sync()
            middle = _time.perf_counter()
            trainer.student_stage()
            sync()
            end = _time.perf_counter()
            times[key].append(end - start)
            student_times[key].append(end - middle)
            transient[key] = max(transient[key], probe.peak() - base)
    peaks = {key: resident[key] + max(0.0, transient[key]) for key in variants}
    return times, student_times, peaks


def measured_bf16_peak_tflops(device, size: int = 8192, repeats: int = 20) -> float:
    """The GPU's achievable dense bf16 matmul rate, timed here (not a datasheet number)."""
    import torch

    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    torch.cuda.synchronize(device)
    return 2 * size**3 * repeats / (time.perf_counter() - start) / 1e12


def count_step_work(trainer) -> dict[str, float]:
    """ATen ops per student step (counted over one student stage) and host synchronisations
    in one whole iteration (generator stage + student stage), both with dispatch modes."""
    from dfkd_bench.train.profiling import HostSyncGuard, OpCounter

    trainer.generator_stage()
    with OpCounter() as ops:
        trainer.student_stage()
    with HostSyncGuard(raise_on_sync=False) as guard:
        trainer.run_iteration()
    steps = trainer.train_cfg.student_steps
    images = _student_images_per_iteration(trainer)
    return {"aten_ops_per_student_step": ops.total / steps, "student_images_per_iter": images,
            "aten_ops_per_student_image": ops.total / images,
            "host_syncs_per_iteration": len(guard.syncs),
            "host_sync_kinds": sorted({s.split(" (")[0] for s in guard.syncs})}


def run_benchmark(kind: str = "auto", device: str = "auto", iterations: int = 10, warmup: int = 2,
                  methods=METHODS, compile: bool = False, stage_buffer: bool = False,
                  extra: dict[str, Any] | None = None, out=sys.stdout) -> dict[str, Any]:
    import torch

    from dfkd_bench.runtime import resolve_device
    from dfkd_bench.methods.mem import MemoryBank

    dev = resolve_device(device)
    kind = ("gpu" if dev.type == "cuda" else "cpu") if kind == "auto" else kind
    fast = {**FAST[kind], "compile": compile, "stage_buffer": stage_buffer}
    probe = MemoryProbe(dev)
    with tempfile.TemporaryDirectory() as tmp:
        resident: dict[tuple[str, str], float] = {}
        variants = build_variants(kind, str(dev), methods, fast, dict(extra or {}), Path(tmp),
                                  resident=resident, probe=probe)

        def sync():
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)

        times, student_times, peaks = time_variants(variants, iterations, warmup, probe, sync, resident)
        work = {key: count_step_work(trainer) for key, trainer in variants.items()}
        flops = {}
        if dev.type == "cuda":
            for method in methods:
                flops[method] = flops_per_iteration(variants, method)
        measured_peak = measured_bf16_peak_tflops(dev) if dev.type == "cuda" else None

    results: dict[str, Any] = {"device": str(dev), "kind": kind, "iterations": iterations, "warmup": warmup,
                               "config": {**CONFIGS[kind], "fast": fast, "reference": REFERENCE,
                                          "set": dict(extra or {})}, "methods": {}}
    results["torch"] = torch.__version__
    if dev.type == "cuda":
        results["gpu"] = torch.cuda.get_device_name(dev)
    for (method, mode), samples in times.items():
        trainer = variants[(method, mode)]
        images = work[(method, mode)]["student_images_per_iter"]
        median = statistics.median(samples)
        q = statistics.quantiles(samples, n=4) if len(samples) >= 2 else [median, median, median]
        entry = {"iter_s_median": median, "iter_s_iqr": q[2] - q[0], "iter_s_min": min(samples),
                 "iter_s_max": max(samples), "student_images_per_iter": images, "images_per_s": images / median,
                 "s_per_image": median / images, "peak_mem_mb": peaks[(method, mode)],
                 "ms_per_student_step": 1000 * statistics.median(student_times[(method, mode)])
                 / trainer.train_cfg.student_steps,
                 **work[(method, mode)]}
        if mode == "fast" and method in flops:
            entry["tflops"] = flops[method] / median / 1e12
        results["methods"].setdefault(method, {})[mode] = entry

    def ratio(a: str, b: str, key: str, mode: str = "fast") -> float:
        if a not in results["methods"] or b not in results["methods"]:
            return float("nan")
        return results["methods"][a][mode][key] / results["methods"][b][mode][key]

    results["ratios"] = {
        "mad_over_abm_per_image": ratio("mad", "abm", "s_per_image"),
        "mad_over_abm_per_iter": ratio("mad", "abm", "iter_s_median"),
        "mem_over_abm_per_iter": ratio("mem", "abm", "iter_s_median"),
        "mem_over_abm_per_image": ratio("mem", "abm", "s_per_image"),
        "reference_mad_over_abm_per_iter": ratio("mad", "abm", "iter_s_median", "reference"),
    }
    for method in results["methods"]:
        entry = results["methods"][method]
        entry["fast_over_reference_images_per_s"] = entry["fast"]["images_per_s"] / entry["reference"]["images_per_s"]
        entry["fast_over_reference_ops_per_image"] = (entry["fast"]["aten_ops_per_student_image"]
                                                      / entry["reference"]["aten_ops_per_student_image"])
        if "fast_eager" in entry:
            entry["graphs_over_eager_images_per_s"] = entry["fast"]["images_per_s"] / entry["fast_eager"]["images_per_s"]
    bank = MemoryBank(8192, (3, 32, 32), "uint8", torch.device("cpu"))
    results["memory_bank_8192_cifar_mb"] = bank.nbytes / 1e6
    if "gpu" in results:
        results["peak_bf16_tflops_datasheet"] = next(
            (v for k, v in PEAK_BF16_TFLOPS.items() if k in results["gpu"]), None)
        results["peak_bf16_tflops_measured"] = measured_peak
    results["targets"] = _targets(results)
    _print_table(results, out)
    return results


def _targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets, each with the measured value and whether it is met."""
    methods, targets = results["methods"], []

    def add(name: str, value: float, limit: float, at_most: bool = True, judged: bool = True) -> None:
        met = (value <= limit if at_most else value >= limit) if judged else None
        targets.append({"target": name, "value": value, "limit": limit, "met": None if met is None else bool(met)})

    for method, modes in methods.items():
        add(f"{method} fast path host syncs per iteration == 0", modes["fast"]["host_syncs_per_iteration"], 0)
        add(f"{method} fast/reference ATen ops per student image <= 1", modes["fast_over_reference_ops_per_image"], 1.0)
    if not math.isnan(results["ratios"]["mad_over_abm_per_image"]):
        add("MAD/ABM time per student image <= 1.10", results["ratios"]["mad_over_abm_per_image"], 1.10)
    if results["kind"] == "gpu" and "mad" in methods:  # judged only where they are meant: on a CUDA device
        on_gpu = results["device"].startswith("cuda")
        add("MAD fast path >= 3x the reference images/s", methods["mad"]["fast_over_reference_images_per_s"], 3.0,
            at_most=False, judged=on_gpu)
        add("MAD student step <= 4 ms", methods["mad"]["fast"]["ms_per_student_step"], 4.0, judged=on_gpu)
    return targets


def _print_table(results: dict[str, Any], out) -> None:
    config = results["config"]
    print(f"device: {results.get('gpu', results['device'])} (torch {results['torch']}); config: {config['dataset']} "
          f"{config['teacher_arch']} -> {config['student_arch']}, {config['overrides']}"
          + (f", --set {config['set']}" if config["set"] else "") + f"; {results['iterations']} "
          f"timed iterations per variant after {results['warmup']} warm-up, interleaved", file=out)
    print(f"fast path: {config['fast']}; reference: {config['reference']}", file=out)
    header = (f"{'method':6s} {'mode':10s} {'iter median s':>13s} {'IQR s':>8s} {'imgs/iter':>9s} {'images/s':>9s} "
              f"{'ms/S step':>9s} {'ops/S step':>10s} {'syncs/it':>8s} {'peak MB':>8s} {'TFLOP/s':>8s}")
    print(header, file=out)
    for method, modes in results["methods"].items():
        for mode in [m for m in ("fast", "fast_eager", "reference") if m in modes]:
            e = modes[mode]
            tflops = f"{e['tflops']:8.1f}" if "tflops" in e else f"{'-':>8s}"
            print(f"{method:6s} {mode:10s} {e['iter_s_median']:13.4f} {e['iter_s_iqr']:8.4f} "
                  f"{e['student_images_per_iter']:9d} {e['images_per_s']:9.0f} {e['ms_per_student_step']:9.2f} "
                  f"{e['aten_ops_per_student_step']:10.0f} {e['host_syncs_per_iteration']:8d} "
                  f"{e['peak_mem_mb']:8.0f} {tflops}", file=out)
    for method, modes in results["methods"].items():
        kinds = modes["reference"]["host_sync_kinds"]
        print(f"{method}: fast path = {modes['fast_over_reference_images_per_s']:.2f}x the images/s of the reference "
              f"path, {modes['fast_over_reference_ops_per_image']:.2f}x its ATen ops per student image"
              + (f"; reference-path syncs: {', '.join(kinds)}" if kinds else ""), file=out)
    if any("fast_eager" in modes for modes in results["methods"].values()):
        where = ("" if results["device"].startswith("cuda")
                 else " (on this CPU: the same static-input step without a graph)")
        print(f"fast = fast_eager + CUDA-graph replay of student steps{where}; a replayed step dispatches only the "
              "copies of its inputs, hence its ATen op count; " + ", ".join(
                  f"{m}: graphs {modes['graphs_over_eager_images_per_s']:.2f}x eager"
                  for m, modes in results["methods"].items()), file=out)
    r = results["ratios"]
    print(f"MAD/ABM per iteration: {r['mad_over_abm_per_iter']:.3f} (the paper reports ~1.40 for its "
          f"implementation); DFKD-Mem/ABM per iteration: {r['mem_over_abm_per_iter']:.3f}", file=out)
    print(f"DFKD-Mem bank of 8,192 CIFAR images (uint8): {results['memory_bank_8192_cifar_mb']:.1f} MB "
          "(target <= 30 MB)", file=out)
    if results.get("peak_bf16_tflops_measured"):
        best = max(m["fast"].get("tflops", 0.0) for m in results["methods"].values())
        peak = results["peak_bf16_tflops_measured"]
        print(f"achieved {best:.1f} TFLOP/s vs {peak:.0f} TFLOP/s measured dense bf16 matmul peak on this GPU "
              f"({100 * best / peak:.1f} %; datasheet: {results.get('peak_bf16_tflops_datasheet')})", file=out)
    elif results["kind"] == "cpu":
        print("GPU targets (MAD fast >= 3x reference, MAD student step <= 4 ms, TFLOP/s vs the measured bf16 peak) "
              "need `dfkd-bench bench --config gpu` on a CUDA device", file=out)
    for target in results["targets"]:
        verdict = {True: "MET   ", False: "MISSED", None: "n/a   "}[target["met"]]
        where = " (not judged: needs a CUDA device)" if target["met"] is None else ""
        print(f"target {verdict} {target['target']}: {target['value']:.3f}{where}", file=out)
    summary: dict[str, Any] = {}
    for method, modes in results["methods"].items():
        summary[method] = {mode: {k: modes[mode][k] for k in (
            "iter_s_median", "images_per_s", "peak_mem_mb", "ms_per_student_step", "aten_ops_per_student_step",
            "host_syncs_per_iteration")} for mode in ("fast", "fast_eager", "reference") if mode in modes}
        summary[method]["fast_over_reference_images_per_s"] = modes["fast_over_reference_images_per_s"]
        if "graphs_over_eager_images_per_s" in modes:
            summary[method]["graphs_over_eager_images_per_s"] = modes["graphs_over_eager_images_per_s"]
        if "tflops" in modes["fast"]:
            summary[method]["tflops"] = modes["fast"]["tflops"]
    summary.update({k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in results["ratios"].items()})
    summary["device"] = results.get("gpu", results["device"])
    summary["peak_bf16_tflops_measured"] = results.get("peak_bf16_tflops_measured")
    judged = [t["met"] for t in results["targets"] if t["met"] is not None]
    # nothing judged is not "met": null, so that a script never reads success from an empty benchmark
    summary["targets_met"] = all(judged) if judged else None
    print(dumps_strict(summary, sort_keys=True), file=out)  # strict JSON: a missing ratio is null


def add_bench_command(subparsers) -> None:
    parser = subparsers.add_parser(
        "bench", help="time ABM, DFKD-Mem and MAD iterations (fast vs reference path) in one process",
        description=__doc__.split("\n\n")[1] if __doc__ else None)
    parser.add_argument("--device", default="auto", help="cpu or cuda (default: auto)")
    parser.add_argument("--config", choices=["auto", "cpu", "gpu"], default="auto",
                        help="cpu: small digits-sized problem; gpu: CIFAR WRN-40-2 -> WRN-16-2, bs 256, n_S 60, n_G 3")
    parser.add_argument("--iterations", type=int, default=10, help="timed iterations per variant (default: 10)")
    parser.add_argument("--warmup", type=int, default=2, help="warm-up iterations per variant (default: 2)")
    parser.add_argument("--methods", default=",".join(METHODS), help="methods to time (default: abm,mem,mad)")
    parser.add_argument("--compile", action="store_true", help="also torch.compile student and teacher on the fast path")
    parser.add_argument("--stage-buffer", action="store_true", help="fast path samples a whole student stage at once")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a setting of the configuration")
    parser.add_argument("--json-out", metavar="PATH", help="also write the full results as JSON")
    parser.add_argument("--packed", type=int, metavar="K",
                        help="instead: aggregate throughput of K runs packed on one device (one process each, "
                             "as run --runs-per-gpu K) against one run alone; prints the ratio")
    parser.set_defaults(func=_cmd_bench)


MAX_PACKED = 256  # as --runs-per-gpu: K worker processes, each with its own CUDA context


def check_json_out(path: str | None) -> None:
    """``--json-out PATH``: one error line before anything is timed if PATH cannot be written."""
    import os

    from dfkd_bench.errors import ConfigError

    if not path:
        if path is not None:
            raise ConfigError("--json-out needs a file name, e.g. --json-out bench.json")
        return
    target = Path(path).expanduser()
    if target.is_dir():
        raise ConfigError(f"--json-out {path} is a folder; give a file name, e.g. --json-out {target / 'bench.json'}")
    if target.exists() and not os.access(target, os.W_OK):
        raise ConfigError(f"--json-out {path} cannot be written (permission denied); choose another file")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=target.parent, prefix=".write-test-"):
            pass
    except OSError as error:
        raise ConfigError(f"--json-out {path}: its folder {target.parent} cannot be written "
                          f"({error.strerror or error}); choose another file") from None


def check_bench_args(args) -> list[str]:
    """Everything ``bench`` is given, checked before anything is built or timed; the method list."""
    from dfkd_bench.errors import ConfigError
    from dfkd_bench.method_api import get_method

    methods = [m.strip() for m in (args.methods or "").split(",") if m.strip()]
    if not methods:
        raise ConfigError(f"--methods {args.methods!r} names no method: give at least one, e.g. --methods "
                          f"{','.join(METHODS)}")
    for method in methods:
        get_method(method)
    if args.packed is not None and not 1 <= args.packed <= MAX_PACKED:
        raise ConfigError(f"--packed must be a number of runs from 1 to {MAX_PACKED}, got {args.packed}")
    check_json_out(args.json_out)
    return methods


def _cmd_bench(args) -> int:
    from dfkd_bench.config import parse_overrides
    from dfkd_bench.store import atomic_write_bytes

    methods = check_bench_args(args)
    if args.packed is not None:
        from dfkd_bench.bench.pack import run_pack_benchmark

        results = run_pack_benchmark(args.packed, kind=args.config, device=args.device, iterations=args.iterations,
                                     warmup=args.warmup, methods=methods,
                                     extra=parse_overrides(args.set or []))
    else:
        results = run_benchmark(kind=args.config, device=args.device, iterations=args.iterations, warmup=args.warmup,
                                methods=methods, compile=args.compile,
                                stage_buffer=args.stage_buffer, extra=parse_overrides(args.set or []))
    if args.json_out:
        atomic_write_bytes(Path(args.json_out).expanduser(),
                           (dumps_strict(results, indent=2, sort_keys=True) + "\n").encode())
    return 0
