"""Trace DAFL's official MNIST loop for the step-equivalence replay (``results/traces/dafl_mnist.pt``).

    python scripts/trace/dafl.py --official CHECKOUT

CHECKOUT is a checkout of huawei-noah/Efficient-Computing at 225ddd2 (only
``Data-Efficient-Model-Compression/DAFL`` is read; the tracer checks those files against that commit
and refuses others). It executes the official script ``DAFL-train.py`` -- argument parsing with its
defaults, which are the MNIST run (batch 512, G Adam lr 0.2, S Adam lr 2e-3, oh 1, ie 5, a 0.1), the
generator class, the optimisers and the module-level training loop (one batch: the generator's
one-hot, information-entropy and activation losses and the student's KD on the detached images,
one backward, ``optimizer_G.step()`` then ``optimizer_S.step()``) -- for 5 iterations, from the
suite's initial weights with the suite's random draws, in float64, and replays the trace through
the engine (one engine iteration per official iteration: the generator step, then the student step
on the very images of that generator step, ``student_batch = generator_batch``).

Aligned (stated in the trace's ``alignments``):
* 28-px inputs: the official LeNet-5 and LeNet-5-half get the 28-px image zero-padded to 32 (what the
  suite's conv1 padding 2 computes); the generator is built with ``--img_size 28``.
* trace size: batch 8 (512), latent_dim 4 (100); the generator's widths 128/64 scaled to 4/2 and the
  LeNet-5 / LeNet-5-half widths scaled (``scale_widths``: only channel counts change); a random teacher.
* float64 and the draws: torch's default dtype is float64 on both sides; the official
  ``torch.randn`` returns the suite's draws.

Patched at run time (never the arithmetic):
* CPU: ``.cuda()`` of modules and tensors returns them unchanged (the script calls it throughout;
  ``nn.DataParallel`` without a GPU runs its module directly);
* data: ``torch.load(teacher_dir + 'teacher')`` returns the trace's teacher (the official script
  loads a pickled module); ``MNIST`` (the test set, read only after an epoch of 120 iterations) is an
  empty stand-in; the loop ends at its 6th draw (:class:`common.TraceDone`), before anything else;
* the networks: ``from lenet import LeNet5Half`` gets the trace-sized, 28-px class; the script's own
  ``Generator`` class has its widths scaled in its source before it runs; just before the first draw
  the suite's initial weights are copied into the student and the generator.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import types
from pathlib import Path
from unittest import mock

import torch
import torchvision.datasets.mnist

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from dfkd_bench.traces.format import Trace  # noqa: E402

REPO = "huawei-noah/Efficient-Computing"
COMMIT = "225ddd2e6ca41915434557f7f49d395e4f801e3e"
FOLDER = "Data-Efficient-Model-Compression/DAFL"
FILES = {f"{FOLDER}/DAFL-train.py": "e5eedb2d131670cc37de64a02ca733d7fdb3e2ec",
         f"{FOLDER}/lenet.py": "193e9501abaabb2f41079d8f30374cb0801d0f3b",
         f"{FOLDER}/resnet.py": "87bcdea4347b6337cc8abf68acaf9b22f89397c5"}
COMMAND = "python scripts/trace/dafl.py --official CHECKOUT"

ITERATIONS = 5
BATCH = 8
NOISE = 4
NGF = 2
TEACHER_WIDTHS = [3, 4, 12, 10]
STUDENT_WIDTHS = [2, 3, 6, 6]
ARCHITECTURES = {
    "trace_lenet5": {"registry": "model", "family": "lenet", "width": TEACHER_WIDTHS},
    "trace_lenet5_half": {"registry": "model", "family": "lenet", "width": STUDENT_WIDTHS},
    "trace_dafl_gen": {"registry": "generator", "family": "paper_generator", "kind": "dafl", "ngf": NGF},
}
WHY_SMALL = "a trace must stay well under 1 MB; the step's arithmetic does not depend on the sizes"


def meta() -> dict:
    config, sized = common.protocol_config(
        "dafl", "mnist", architectures=ARCHITECTURES, teacher_arch="trace_lenet5", student_arch="trace_lenet5_half",
        train=dict(epochs=1, steps_per_epoch=ITERATIONS, batch_size=BATCH, drift_every=0),
        params=dict(noise_dim=NOISE, generator="trace_dafl_gen"),
        why={"networks": WHY_SMALL, "batch_size": WHY_SMALL, "noise_dim": WHY_SMALL, "generator": WHY_SMALL,
             "epochs": f"{ITERATIONS} official iterations", "steps_per_epoch": f"{ITERATIONS} official iterations",
             "drift_every": "no measurement during a trace"})
    return {
        "method": "dafl",
        "official": {"repo": REPO, "commit": COMMIT, "entry": f"{FOLDER}/DAFL-train.py"},
        "command": COMMAND,
        "config": config,
        "trace_sized": sized,
        "architectures": ARCHITECTURES,
        "schedule": ["iteration"] * ITERATIONS,
        "load": ["student/", "method/generator/"],
        "uncompared": {"method/counters/": "the suite's count of synthetic images (a budget record, no arithmetic)"},
        "alignments": {
            "order": "none needed: an official iteration updates G, then S, from one batch; an engine iteration runs "
                     "the generator step, then the student step on that step's images (student_batch = "
                     "generator_batch)",
            "28-px inputs": "the official LeNet-5 and LeNet-5-half get the 28-px image zero-padded to 32 (what the "
                            "suite's conv1 padding 2 computes); the generator is built with --img_size 28",
            "networks": f"the script's Generator with widths 128/64 scaled to {2 * NGF}/{NGF}; LeNet-5 widths "
                        f"{TEACHER_WIDTHS} and LeNet-5-half widths {STUDENT_WIDTHS} by scaling the official classes' "
                        "channel counts; a random teacher",
            "batch and noise": f"batch {BATCH} (official 512), latent_dim {NOISE} (official 100)",
            "float64": "default dtype float64 on both sides",
            "draws": "the official torch.randn returns the suite's draws (its method stream, in the order drawn)",
        },
        "patches": {
            "cpu": ".cuda() of modules and tensors returns them unchanged",
            "data": "torch.load(teacher_dir + 'teacher') returns the trace's teacher; MNIST is an empty stand-in; the "
                    "loop ends at the draw after the traced iterations",
            "networks": "from lenet import LeNet5Half gets the trace-sized, 28-px class; the script's Generator "
                        "has its widths scaled in its source; the suite's initial weights copied in before the "
                        "first draw",
            "cwd": "a temporary folder",
        },
    }


class EmptyMNIST(torch.utils.data.Dataset):
    """The MNIST test set's stand-in (the traced iterations end before the script evaluates)."""

    def __init__(self, *args, **kwargs):
        pass

    def __len__(self) -> int:
        return 0

    def __getitem__(self, index):
        raise IndexError(index)


def run_official(checkout: Path, workdir: Path, teacher: dict, randn, *, widths=(TEACHER_WIDTHS, STUDENT_WIDTHS),
                 ngf: int = NGF, batch: int = BATCH, nz: int = NOISE) -> None:
    """The official ``DAFL-train.py`` executed, patched as the module docstring says: LeNet-5 / LeNet-5-half
    of ``widths`` on 28-px inputs, the script's Generator with widths 2 * ngf / ngf for 28 px, the teacher
    ``teacher`` (the suite's names), ``torch.randn`` replaced by ``randn`` (which ends the loop)."""
    folder = checkout / FOLDER
    scaled = common.load_official_module(folder / "lenet.py", "dafl_official_lenet_scaled", {
        "LeNet5": common.lenet_widths(common.LENET5_WIDTHS, widths[0]),
        "LeNet5Half": common.lenet_widths(common.LENET5_HALF_WIDTHS, widths[1])})
    lenet = types.ModuleType("lenet")  # what `from lenet import LeNet5Half` finds
    lenet.LeNet5Half = common.padded_to(scaled.LeNet5Half, 28, 2)
    lenet.LeNet5 = common.padded_to(scaled.LeNet5, 28, 2)
    teacher_module = lenet.LeNet5()
    with torch.no_grad():
        teacher_module.load_state_dict(common.official_lenet_state(teacher, teacher_module))
    script = common.load_official_module(folder / "DAFL-train.py", "dafl_official_train",
                                         {"Generator": {128: 2 * ngf, 64: ngf}}, run=False)
    argv = ["DAFL-train.py", "--dataset", "MNIST", "--batch_size", str(batch), "--latent_dim", str(nz),
            "--img_size", "28", "--n_epochs", "1", "--data", str(workdir), "--teacher_dir", f"{workdir}/",
            "--output_dir", f"{workdir}/"]
    with contextlib.ExitStack() as stack:
        for target, name, value in [
                (sys, "argv", argv), (torch, "randn", randn),
                (torch, "load", lambda *a, **k: teacher_module),
                (torch.nn.Module, "cuda", lambda self, *a, **k: self),
                (torch.Tensor, "cuda", lambda self, *a, **k: self),
                (torchvision.datasets.mnist, "MNIST", EmptyMNIST)]:
            stack.enter_context(mock.patch.object(target, name, value))
        stack.enter_context(mock.patch.dict(sys.modules, {"lenet": lenet}))
        stack.enter_context(mock.patch.object(sys, "path", [str(folder), *sys.path]))
        common.run_in(workdir, lambda: exec(script.__code__, script.__dict__))


def official_file(checkout: Path) -> Path:
    return (checkout / FOLDER / "DAFL-train.py").resolve()


def trace(checkout: Path) -> Trace:
    common.check_checkout(checkout, REPO, COMMIT, FILES)
    spec = meta()
    teacher = common.random_lenet_teacher(TEACHER_WIDTHS)
    with tempfile.TemporaryDirectory(prefix="dafl-trace-") as tmp, common.suite_start(spec, teacher, Path(tmp)) as suite:
        layout = common.LeNetGeneratorLayout(suite)
        result = Trace(spec, teacher, {})
        loop: dict = {}

        def state():
            return layout.state(loop["student"], loop["optimizer_S"], loop["generator"], loop["optimizer_G"])

        def on_first_draw(frame):  # the script's module frame: its networks and optimisers are globals
            names = frame.f_locals
            loop.update(student=names["net"].module, generator=names["generator"].module,
                        optimizer_S=names["optimizer_S"], optimizer_G=names["optimizer_G"])
            layout.load_initial(loop["student"], loop["generator"])
            result.initial = state()  # before the first step: the optimisers hold no state yet
            run.record(loop["optimizer_G"], "generator", lambda v: {
                "gen_oh": v["loss_one_hot"], "gen_activation": v["loss_activation"],
                "gen_entropy": v["loss_information_entropy"],
                "gen_loss": v["loss"] - v["loss_kd"]})  # the official total holds the student's KD too
            run.record(loop["optimizer_S"], "student", lambda v: {"kd_gen": v["loss_kd"], "student_loss": v["loss_kd"]})

        run = common.OfficialRun(result, suite.method_rng, official_file(checkout), state=state,
                                 stop_after=ITERATIONS, on_first_draw=on_first_draw)
        run_official(checkout, Path(tmp), teacher, run.randn)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--official", type=Path, required=True,
                        help=f"a checkout of {REPO} at {COMMIT[:7]} (only {FOLDER} is read)")
    parser.add_argument("--out", type=Path, default=common.TRACES, help="where to write dafl_mnist.pt/.json")
    args = parser.parse_args()
    common.finish(trace(args.official.resolve()), "dafl_mnist", args.out)


if __name__ == "__main__":
    main()
