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

import contextlib
import sys
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


def meta() -> dict:
    return common.lenet_generator_meta(
        "dafl", official={"repo": REPO, "commit": COMMIT, "entry": f"{FOLDER}/DAFL-train.py"},
        command=COMMAND, generator="dafl", ngf=NGF, iterations=ITERATIONS, batch=BATCH, noise=NOISE,
        schedule=["iteration"] * ITERATIONS,
        alignments={
            "order": "none needed: an official iteration updates G, then S, from one batch; an engine iteration runs "
                     "the generator step, then the student step on that step's images (student_batch = "
                     "generator_batch)",
            "networks": f"the script's Generator with widths 128/64 scaled to {2 * NGF}/{NGF}; LeNet-5 widths "
                        f"{common.TEACHER_WIDTHS} and LeNet-5-half widths {common.STUDENT_WIDTHS} by scaling the "
                        "official classes' channel counts; a random teacher",
        },
        patches={
            "cpu": ".cuda() of modules and tensors returns them unchanged",
            "data": "torch.load(teacher_dir + 'teacher') returns the trace's teacher; MNIST is an empty stand-in; the "
                    "loop ends at the draw after the traced iterations",
            "networks": "from lenet import LeNet5Half gets the trace-sized, 28-px class; the script's Generator "
                        "has its widths scaled in its source; the suite's initial weights copied in before the "
                        "first draw",
            "cwd": "a temporary folder",
        })


class EmptyMNIST(torch.utils.data.Dataset):
    """The MNIST test set's stand-in (the traced iterations end before the script evaluates)."""

    def __init__(self, *args, **kwargs):
        pass

    def __len__(self) -> int:
        return 0

    def __getitem__(self, index):
        raise IndexError(index)


def run_official(checkout: Path, workdir: Path, teacher: dict, randn, *,
                 widths=(common.TEACHER_WIDTHS, common.STUDENT_WIDTHS),
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
    return common.trace_lenet_generator(
        meta(), official_file(checkout),
        lambda workdir, teacher, randn: run_official(checkout, workdir, teacher, randn),
        stop_after=ITERATIONS,
        # the script's module frame: its networks (in DataParallel) and optimisers are globals
        networks=lambda v: {"student": v["net"].module, "generator": v["generator"].module,
                            "optimizer_S": v["optimizer_S"], "optimizer_G": v["optimizer_G"]},
        student_losses=lambda v: {"kd_gen": v["loss_kd"], "student_loss": v["loss_kd"]},
        generator_losses=lambda v: {"gen_oh": v["loss_one_hot"], "gen_activation": v["loss_activation"],
                                    "gen_entropy": v["loss_information_entropy"],
                                    "gen_loss": v["loss"] - v["loss_kd"]})  # the official total holds S's KD too


if __name__ == "__main__":
    common.tracer_main(__doc__, trace, "dafl_mnist", REPO, COMMIT)
