"""Trace DFAD's official MNIST loop for the step-equivalence replay (``results/traces/dfad_mnist.pt``).

    python scripts/trace/dfad.py --official CHECKOUT

CHECKOUT is a checkout of VainF/Data-Free-Adversarial-Distillation at c161591 (the tracer checks the
files it reads against that commit and refuses others). It runs the official ``DFAD_mnist.main()``
-- argument parsing with the MNIST defaults of ``run_mnist.sh`` (batch, SGD lr 0.01, momentum 0.9,
weight decay 1e-4, Adam lr 1e-3, the networks' train/eval modes), the optimisers it builds and its
loop ``train()`` -- for 3 iterations (5 student steps, then 1 generator step, each), from the suite's
initial weights with the suite's random draws, in float64, and replays the trace through the engine.

Aligned (stated in the trace's ``alignments``):
* stage order: the official iteration runs its 5 student steps before its generator step, the
  engine the generator stage first (README, CHOSEN). The replay's schedule runs one engine student
  stage first, then 2 engine iterations, then one engine generator stage: the official order
  S5 G S5 G S5 G, every step compared.
* 28-px inputs: the suite's protocol feeds 28 x 28 images to a LeNet-5 whose conv1 pads by 2; the
  official LeNet-5 takes 32 x 32. The official networks here get the 28-px image zero-padded to 32
  (the same numbers), and GeneratorA is built for 28 px.
* trace size: batch 8 (protocol 512), nz 4 (100), GeneratorA's own ``ngf`` argument 2 (64), and the
  official LeNet-5 / LeNet-5-half classes with their widths scaled (``scale_widths``: only the channel
  counts change), a random teacher; the trace must stay well under 1 MB.
* float64 and the draws: torch's default dtype is float64 on both sides; the official
  ``torch.randn`` returns the suite's draws, from the suite's method stream.

Patched at run time (never the arithmetic):
* ``torchvision.models.utils`` (removed in torchvision 0.13; ``network/segmentation`` imports
  ``load_state_dict_from_url`` from it) and ``visdom`` (a plotting server ``utils/visualizer.py``
  imports; DFAD_mnist.py never plots) are stubbed so that ``import network`` works;
* data: ``get_dataloader`` (downloads MNIST) returns no loaders; ``torch.load(args.ckpt)`` returns the
  teacher's weights; ``test()``, called after the first epoch, ends the run (the trace holds the
  training steps); main() runs in a temporary folder (it creates ``checkpoint/student``);
* the networks main() builds are the trace-sized, 28-px classes above; just before the first draw
  the suite's initial weights are copied into the student and the generator.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from dfkd_bench.traces.format import Trace  # noqa: E402

REPO = "VainF/Data-Free-Adversarial-Distillation"
COMMIT = "c161591aae4c13e53943dcb61c162876421aad7a"
FILES = {"DFAD_mnist.py": "a7d6274d35b06a821f8e9eb08213b8eac477c6ca",
         "network/__init__.py": "6b0928463dc5cd0034761bb891f12f492329aa0a",
         "network/gan.py": "a106708fb7df99644f3c87705b317dd9df8c1dc9",
         "network/lenet.py": "0804abdba35b5f0b1ca8032c400ecfad86604d12"}
COMMAND = "python scripts/trace/dfad.py --official CHECKOUT"

ITERATIONS = 3
BATCH = 8
NOISE = 4
NGF = 2


def meta() -> dict:
    return common.lenet_generator_meta(
        "dfad", official={"repo": REPO, "commit": COMMIT, "entry": "DFAD_mnist.py main() -> train()"},
        command=COMMAND, generator="dfad", ngf=NGF, iterations=ITERATIONS, batch=BATCH, noise=NOISE,
        schedule=["student_stage", *["iteration"] * (ITERATIONS - 1), "generator_steps"],
        alignments={
            "stage order": "official: 5 student steps, then the generator step, per iteration; the engine: the "
                           "generator stage first. Replayed as one engine student stage, then "
                           f"{ITERATIONS - 1} engine iterations, then one engine generator stage: the official "
                           "S5 G S5 G S5 G, every step compared",
            "networks": f"GeneratorA(ngf={NGF}) by its own argument (official 64); LeNet-5 widths "
                        f"{common.TEACHER_WIDTHS} and LeNet-5-half widths {common.STUDENT_WIDTHS} by scaling the "
                        "official classes' channel counts; a random teacher",
        },
        patches={
            "imports": "torchvision.models.utils (removed in torchvision 0.13) and visdom (unused plotting) stubbed",
            "data": "get_dataloader returns no loaders; torch.load(args.ckpt) returns the teacher's weights; "
                    "test() ends the run after the traced epoch",
            "networks": "network.lenet.LeNet5/LeNet5Half and network.gan.GeneratorA replaced by the trace-sized, "
                        "28-px forms; the suite's initial weights copied in before the first draw",
            "cwd": "a temporary folder (main() writes checkpoint/student)",
        })


def run_official(checkout: Path, workdir: Path, teacher: dict, randn, *,
                 widths=(common.TEACHER_WIDTHS, common.STUDENT_WIDTHS),
                 ngf: int = NGF, batch: int = BATCH, nz: int = NOISE, iterations: int = ITERATIONS) -> None:
    """The official ``DFAD_mnist.main()`` for one epoch of ``iterations``, patched as the module docstring
    says: LeNet-5 / LeNet-5-half of ``widths`` on 28-px inputs, ``GeneratorA(ngf)`` for 28 px, the teacher
    ``teacher`` (the suite's names), ``torch.randn`` replaced by ``randn``; it ends at ``test()``."""
    common.stub_module("torchvision.models.utils", load_state_dict_from_url=torch.hub.load_state_dict_from_url)
    common.stub_module("visdom", Visdom=object)
    if str(checkout) not in sys.path:
        sys.path.insert(0, str(checkout))
    import DFAD_mnist  # the official script (its main() is not run on import)
    import network

    scaled = common.load_official_module(checkout / "network" / "lenet.py", "dfad_official_lenet_scaled", {
        "LeNet5": common.lenet_widths(common.LENET5_WIDTHS, widths[0]),
        "LeNet5Half": common.lenet_widths(common.LENET5_HALF_WIDTHS, widths[1])})

    sized_ngf = ngf

    def generator(nz=100, ngf=64, nc=1, img_size=32):
        assert (ngf, img_size) == (64, 32), "main() builds GeneratorA(nz=args.nz, nc=1, img_size=32)"
        return network.gan.GeneratorA(nz=nz, ngf=sized_ngf, nc=nc, img_size=28)

    teacher_module = common.padded_to(scaled.LeNet5, 28, 2)()
    official_teacher = common.official_lenet_state(teacher, teacher_module)

    def end_after_training(*_args, **_kwargs):
        raise common.TraceDone

    argv = ["DFAD_mnist.py", "--batch_size", str(batch), "--epochs", "1", "--epoch_itrs", str(iterations),
            "--nz", str(nz), "--no-cuda"]
    with contextlib.ExitStack() as stack:
        for target, name, value in [
                (sys, "argv", argv), (torch, "randn", randn), (torch, "load", lambda *a, **k: official_teacher),
                (DFAD_mnist, "get_dataloader", lambda args: (None, None)), (DFAD_mnist, "test", end_after_training),
                # what main() reaches as network.lenet.* and network.gan.GeneratorA (the official modules
                # themselves stay as they are: their classes name themselves in super())
                (DFAD_mnist, "network", SimpleNamespace(
                    lenet=SimpleNamespace(LeNet5=lambda: teacher_module,
                                          LeNet5Half=common.padded_to(scaled.LeNet5Half, 28, 2)),
                    gan=SimpleNamespace(GeneratorA=generator)))]:
            stack.enter_context(mock.patch.object(target, name, value))
        common.run_in(workdir, DFAD_mnist.main)


def official_file(checkout: Path) -> Path:
    return (checkout / "DFAD_mnist.py").resolve()


def trace(checkout: Path) -> Trace:
    common.check_checkout(checkout, REPO, COMMIT, FILES)
    return common.trace_lenet_generator(
        meta(), official_file(checkout),
        lambda workdir, teacher, randn: run_official(checkout, workdir, teacher, randn),
        stop_after=6 * ITERATIONS,
        # inside train(): the networks and optimisers main() built
        networks=lambda v: {name: v[name] for name in ("student", "generator", "optimizer_S", "optimizer_G")},
        student_losses=lambda v: {"l1_gen": v["loss_S"], "student_loss": v["loss_S"]},
        generator_losses=lambda v: {"gen_loss": v["loss_G"], "gen_l1": -v["loss_G"]})


if __name__ == "__main__":
    common.tracer_main(__doc__, trace, "dfad_mnist", REPO, COMMIT)
