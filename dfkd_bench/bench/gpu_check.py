"""The Python steps of ``scripts/gpu_check.sh`` (issue 21): what a first GPU window measures.

``python -m dfkd_bench.bench.gpu_check env OUT.json --device D``
    torch, CUDA and the GPU's name, and the dense bf16 matmul rate measured here.
``python -m dfkd_bench.bench.gpu_check capture OUT.json --device D``
    per method (ABM, DFKD-Mem, MAD), one student stage with CUDA graphs (3 eager warm-up steps,
    one capture, replays) against the same stage with eager steps, from the same weights and the
    same inputs: how far the graph's weights and loss are from the eager ones, captures made,
    whether a capture failed (and its note).
``python -m dfkd_bench.bench.gpu_check verdicts OUT.json --bench BENCH.json --env ENV.json [--capture C.json]``
    one verdict line per target of the GPU-speed work (MAD student step <= 4 ms at the CIFAR
    configuration, fast >= 3x the reference images/s, MAD/ABM per student image <= 1.10, 0 host
    syncs, TFLOP/s against the measured peak), ``not judged on CPU`` where the device is a CPU.

On a CPU (``--device cpu``: a check of the whole chain, not of speed) the problem is made tiny:
the CIFAR pair with batch 8; the static step then runs without a graph.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from dfkd_bench.store import dumps_strict

METHODS = ("abm", "mem", "mad")
# The graph's student stage is compared with the eager one on the relative size of the difference
# of their weight updates: bf16 with cuDNN's autotuned (non-deterministic) kernels allows a little.
CAPTURE_TOLERANCE = {"cuda": 5e-2, "cpu": 0.0}


def _write(path: str, data: dict[str, Any]) -> None:
    Path(path).write_text(dumps_strict(data, indent=2, sort_keys=True) + "\n")


def environment(device: str) -> dict[str, Any]:
    import platform

    import torch

    info: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                            "cuda_runtime": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
                            "device": device}
    if device.startswith("cuda"):
        from dfkd_bench.bench.benchmark import measured_bf16_peak_tflops

        dev = torch.device(device)
        info["gpu"] = torch.cuda.get_device_name(dev)
        info["gpu_memory_gib"] = torch.cuda.get_device_properties(dev).total_memory / 2**30
        info["cudnn"] = torch.backends.cudnn.version()
        info["bf16_matmul_tflops_measured"] = measured_bf16_peak_tflops(dev)
    else:
        info["gpu"] = None
        info["bf16_matmul_tflops_measured"] = None
    return info


def _trainer(method: str, device: str, graphs: bool, folder: Path, teacher: str):
    from dfkd_bench.bench.benchmark import CONFIGS, FAST
    from dfkd_bench.train.engine import Trainer
    from dfkd_bench.cluster.experiment import RunRequest, TeacherOptions, build_run_configs

    spec = CONFIGS["gpu"]
    cuda = device.startswith("cuda")
    size = {"batch_size": 256} if cuda else {"batch_size": 8}
    overrides = {**spec["overrides"], **size, "student_steps": 6, "generator_steps": 1, "drift_every": 0,
                 "eval_every": 0, **FAST["gpu" if cuda else "cpu"], "cuda_graphs": graphs}
    if not cuda:
        overrides["amp"] = "none"
    request = RunRequest(methods=[method], dataset=spec["dataset"], seeds=[0], teacher_arch=spec["teacher_arch"],
                         student_arch=spec["student_arch"], overrides=overrides,
                         teacher=TeacherOptions(checkpoint=teacher))
    trainer = Trainer(build_run_configs(request)[0], folder / ("graph" if graphs else "eager"), device=device,
                      progress=False)
    trainer.build()
    return trainer


def capture_check(device: str) -> dict[str, Any]:
    """Per method: a student stage with graphs against the same stage eagerly, same weights and inputs."""
    import torch

    from dfkd_bench.bench.benchmark import CONFIGS, _random_teacher

    results: dict[str, Any] = {"device": device, "tolerance": CAPTURE_TOLERANCE["cuda" if device.startswith("cuda")
                                                                                else "cpu"], "methods": {}}
    with tempfile.TemporaryDirectory(prefix="dfkd-gpu-check-") as tmp:
        folder = Path(tmp)
        spec = CONFIGS["gpu"]
        teacher = _random_teacher(spec["teacher_arch"], spec["dataset"], folder)
        for method in METHODS:
            start = time.time()
            entry: dict[str, Any] = {}
            try:
                graph = _trainer(method, device, True, folder, teacher)
                eager = _trainer(method, device, False, folder, teacher)
                eager.student_module.load_state_dict(graph.student_module.state_dict())
                before = [p.detach().clone() for p in graph.student_module.parameters()]
                for trainer in (graph, eager):
                    trainer.generator_stage()
                    trainer.student_stage()
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                update_graph = torch.cat([(p.detach() - b).flatten().float()
                                          for p, b in zip(graph.student_module.parameters(), before)])
                update_eager = torch.cat([(p.detach() - b).flatten().float()
                                          for p, b in zip(eager.student_module.parameters(), before)])
                difference = (update_graph - update_eager).norm() / update_eager.norm().clamp_min(1e-30)
                step = graph.static_step
                loss_graph = (graph.sums["student_loss"] / graph.counts["student_loss"]).item()
                loss_eager = (eager.sums["student_loss"] / eager.counts["student_loss"]).item()
                entry = {"update_relative_difference": difference.item(), "loss_graph": loss_graph,
                         "loss_eager": loss_eager, "captures": getattr(step, "captures", 0),
                         "capture_failed": bool(getattr(step, "failed", False)),
                         "student_images_graph": graph.counters["student_images"],
                         "student_images_eager": eager.counters["student_images"],
                         "notes": [n for n in graph.notes if "graph" in n.lower()]}
                entry["same_step"] = (entry["update_relative_difference"] <= results["tolerance"]
                                      and entry["student_images_graph"] == entry["student_images_eager"]
                                      and not entry["capture_failed"])
                del graph, eager
            except Exception as error:  # noqa: BLE001 - reported in the summary, the window goes on
                entry = {"error": str(error).splitlines()[0][:500] if str(error) else type(error).__name__,
                         "same_step": False}
            entry["seconds"] = time.time() - start
            results["methods"][method] = entry
            print(f"capture {method}: " + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                                                   for k, v in entry.items() if k != "notes"), flush=True)
    return results


def verdicts(bench: dict[str, Any] | None, env: dict[str, Any], capture: dict[str, Any] | None) -> dict[str, Any]:
    """One line per target; ``met`` is None where it is not judged (a CPU, or a step that did not run)."""
    on_gpu = bool(env.get("gpu")) and str((bench or {}).get("device", env.get("device", ""))).startswith("cuda")
    lines: list[dict[str, Any]] = []

    def add(target: str, value: Any, limit: Any, met: bool | None, why: str = "") -> None:
        if not on_gpu:
            met, why = None, "not judged on CPU"
        lines.append({"target": target, "value": value, "limit": limit, "met": met, "why": why})

    methods = (bench or {}).get("methods", {})
    if bench is None or "mad" not in methods:
        for target in ("MAD student step <= 4 ms (CIFAR configuration)", "MAD fast >= 3x the reference images/s",
                       "MAD/ABM time per student image <= 1.10", "0 host syncs per fast-path iteration",
                       "TFLOP/s against the measured bf16 peak"):
            lines.append({"target": target, "value": None, "limit": None, "met": None,
                          "why": "bench did not finish" if on_gpu or env.get("gpu") else "not judged on CPU"})
    else:
        mad = methods["mad"]
        step_ms = mad["fast"]["ms_per_student_step"]
        add("MAD student step <= 4 ms (CIFAR configuration)", step_ms, 4.0, step_ms <= 4.0)
        speedup = mad["fast_over_reference_images_per_s"]
        add("MAD fast >= 3x the reference images/s", speedup, 3.0, speedup >= 3.0)
        ratio = (bench.get("ratios") or {}).get("mad_over_abm_per_image")
        add("MAD/ABM time per student image <= 1.10", ratio, 1.10, None if ratio is None else ratio <= 1.10)
        syncs = max(m["fast"]["host_syncs_per_iteration"] for m in methods.values())
        add("0 host syncs per fast-path iteration", syncs, 0, syncs == 0)
        best = max((m["fast"].get("tflops") or 0.0) for m in methods.values())
        peak = env.get("bf16_matmul_tflops_measured") or bench.get("peak_bf16_tflops_measured")
        fraction = best / peak if peak else None
        add("TFLOP/s against the measured bf16 peak", best, peak, None,
            f"{100 * fraction:.2f} % of the measured peak (reported, no limit set)" if fraction is not None else "")
    if capture is not None:
        for method, entry in capture.get("methods", {}).items():
            value = entry.get("update_relative_difference")
            ok = bool(entry.get("same_step"))
            line = {"target": f"{method}: graph-replayed student steps = eager steps (same inputs)", "value": value,
                    "limit": capture.get("tolerance"), "met": ok if on_gpu else None,
                    "why": entry.get("error", "") if on_gpu else "CPU: the static step without a graph"}
            if not on_gpu and "error" in entry:
                line["why"] = f"CPU: {entry['error']}"
            lines.append(line)
    judged = [line["met"] for line in lines if line["met"] is not None]
    return {"on_gpu": on_gpu, "verdicts": lines, "all_met": (all(judged) if judged else None)}


def print_verdicts(result: dict[str, Any], out=sys.stdout) -> None:
    for line in result["verdicts"]:
        word = {True: "MET   ", False: "MISSED", None: "n/a   "}[line["met"]]
        value = line["value"]
        shown = f"{value:.4g}" if isinstance(value, (int, float)) and not isinstance(value, bool) else str(value)
        print(f"verdict {word} {line['target']}: {shown}" + (f" ({line['why']})" if line["why"] else ""), file=out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dfkd_bench.bench.gpu_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("step", choices=("env", "capture", "verdicts"))
    parser.add_argument("out")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--bench")
    parser.add_argument("--env")
    parser.add_argument("--capture")
    args = parser.parse_args(argv)
    if args.step == "env":
        info = environment(args.device)
        _write(args.out, info)
        peak = info["bf16_matmul_tflops_measured"]
        print(f"torch {info['torch']} (CUDA {info['cuda_runtime']}), GPU: {info['gpu'] or 'none'}"
              + (f", bf16 matmul {peak:.0f} TFLOP/s measured" if peak else ""), flush=True)
    elif args.step == "capture":
        _write(args.out, capture_check(args.device))
    else:
        def read(path: str | None) -> dict[str, Any] | None:
            try:
                return json.loads(Path(path).read_text()) if path else None
            except (OSError, ValueError):
                return None

        result = verdicts(read(args.bench), read(args.env) or {}, read(args.capture))
        _write(args.out, result)
        print_verdicts(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
