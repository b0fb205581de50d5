#!/usr/bin/env python3
"""ATen ops per MAD student step and host syncs per iteration of ANY checkout of dfkd-bench,
at the CIFAR configuration (WRN-40-2 -> WRN-16-2) made small enough for a CPU.

The benchmark of a checkout that predates `dfkd-bench bench`'s op and sync counters cannot
report them; this script counts them for it with today's dispatch-mode counters, so that
before/after numbers come from one method of counting:

    git worktree add /tmp/before a112b0c
    python scripts/count_step_ops.py /tmp/before     # the code before the GPU work
    python scripts/count_step_ops.py .               # this checkout
"""

import importlib.util
import sys
import tempfile
import types
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent


def main(root: str) -> None:
    root = str(Path(root).resolve())
    sys.path.insert(0, root)
    spec = importlib.util.spec_from_file_location("profiling", HERE / "dfkd_bench" / "profiling.py")
    profiling = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(profiling)
    import dfkd_bench

    methods = types.ModuleType("dfkd_bench.methods")  # the checkout's methods/, not the installed one
    methods.__path__ = [root + "/methods"]
    sys.modules["dfkd_bench.methods"] = methods
    dfkd_bench.methods = methods
    import dfkd_bench.bench.benchmark as bench

    fast = {**bench.FAST["gpu"], "compile": False, "stage_buffer": False}
    if "cuda_graphs" in fast:
        fast["cuda_graphs"] = False  # count the eager step: a replayed graph dispatches no ops
    small = dict(batch_size=8, student_steps=2, generator_steps=1)
    with tempfile.TemporaryDirectory() as tmp:
        variants = bench.build_variants("gpu", "cpu", ["mad"], fast, small, Path(tmp))
        for mode in ("fast", "reference"):
            trainer = variants[("mad", mode)]
            trainer.run_iteration()
            trainer.run_iteration()
            for _ in range(trainer.train_cfg.generator_steps):
                trainer.method.generator_step()
            trainer.method.end_generator_stage()
            with profiling.OpCounter() as ops:
                loss, _ = trainer.method.student_loss()
                trainer.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                trainer.optimizer.step()
            with profiling.HostSyncGuard(raise_on_sync=False) as guard:
                trainer.run_iteration()
            print(f"{root} {mode}: {ops.total} ATen ops per MAD student step, {len(guard.syncs)} host syncs per "
                  f"iteration (n_S 2, n_G 1, batch 8)")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else ".")
