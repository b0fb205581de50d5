"""Trace the DataFree collection's official loops for the step-equivalence replays of DFQ, ZSKT,
DeepInversion and CMI (``results/traces/<method>_datafree_cifar10.pt``).

    python scripts/trace/datafree.py --official CHECKOUT --method dfq     # or zskt, deepinv, cmi, all

CHECKOUT is a checkout of zju-vipa/CMI (the "DataFree" collection) at 9e79fa9 (the tracer checks the
files it reads against that commit and refuses others). The suite's CIFAR paper protocols of these four
methods cite its scripts, so the traced loop is that repository's ``datafree_kd.py`` -- ``main()``, the
argument parsing of the cited script (``scripts/<method>/...sh``: every setting of it, except the
trace-sized ones below), the optimisers and scheduler ``main_worker()`` builds, its epoch loop of
``synthesizer.synthesize()`` then ``train()`` -- with the synthesizer the method selects
(``GenerativeSynthesizer``: DFQ and ZSKT; ``DeepInvSyntheiszer``; ``CMISynthesizer``), run for a few
iterations from the suite's initial weights with the suite's random draws, in float64, and replayed
through the engine. ZSKT: this is the DataFree re-implementation (no attention transfer), the code
behind the numbers the suite's ZSKT paper protocols quote; the authors' own ZSKT code
(polo5/ZeroShotKnowledgeTransfer) is traced separately. DeepInversion: the authors' code
(NVlabs/DeepInversion) has no distillation loop; the suite's ``synthesiser = datafree`` path, which
its paper protocols use, is the DataFree re-implementation traced here.

Aligned (stated in each trace's ``alignments``):
* trace size: WRN-10-2 teacher and WRN-10-1 student (the official WideResNet class at depth 10, its
  widths 16/32/64 scaled to 3/4/6), a random teacher with random BatchNorm statistics, batch 4, the
  generators' own ``ngf`` argument and noise 4 (``main_worker``'s ``ngf=64`` and ``nz = 256``
  literals scaled), 2 epochs of a few steps; the trace must stay well under 1 MB.
* float64 and the draws: torch's default dtype is float64 on both sides; every random draw of the
  official loop returns the suite's draw (its method stream, in the order the suite draws).

Patched at run time (never the arithmetic):
* imports: ``kornia`` (CMI's augmentations; see its alignments), ``termcolor`` (log colours) and
  ``torchvision.models.utils`` (removed in torchvision 0.13) are stubbed;
* CPU: ``main_worker`` runs with ``gpu=None`` (the scripts' ``--gpu 0`` moves every tensor to CUDA);
* data: CIFAR-10 is not downloaded (``registry.datasets.CIFAR10`` keeps only the official train
  transform the pool methods read their pools through); the per-epoch evaluation on the test set
  returns a constant (no test data; it changes no state); ``torch.load`` of the teacher checkpoint
  returns the trace's teacher; ``main()`` runs in a temporary folder (it writes logs, images and
  checkpoints there);
* networks: ``registry.MODEL_DICT``'s ``wrn40_2`` / ``wrn16_1`` are the trace-sized official
  WideResNets; just before the first draw the suite's initial weights are copied into the student
  and the generator.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import shlex
import sys
import tempfile
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from dfkd_bench.traces.format import Trace  # noqa: E402

REPO = "zju-vipa/CMI"
COMMIT = "9e79fa9e2328205f26dbdb226878f3a28f3bf4cc"
FILES = {"datafree_kd.py": "ef06c63484f08bf639b028c589a4a567f124f9d0",
         "registry.py": "7b39fd49ae8c0360a747b6ca990013888a23bbc5",
         "datafree/criterions.py": "2300005c683a9561dfa6f5c7c7bbd07ad4e3bacc",
         "datafree/hooks.py": "1893a5847bd11e0993cd51cd8b4cbe2b5459cb4f",
         "datafree/models/classifiers/wresnet.py": "2f37676dc13ab50533fc8c688dffc4c43ef5f2a9",
         "datafree/models/generator.py": "02407f9de285004780f861b0505b3083344397a3",
         "datafree/synthesis/generative.py": "496dd55f5da5f9bb3c7de2b1ea216d9e5cfb58e1",
         "datafree/synthesis/deepinversion.py": "8cfa1157be0f6c3bd5a565008deb50ac10e0cd4d",
         "datafree/synthesis/contrastive.py": "521a5fdbaf4c134e45e1d5d8c945cfc614805477",
         "datafree/utils/_utils.py": "0b26d31ce5f1bfad02c41a81a800a9e6d529476e"}
SCRIPTS = {"dfq": ("scripts/dfq/dfq_cifar10_wrn402_wrn161.sh", "f09934c6f36c906e0b2923d86324f04e2632fd21"),
           "zskt": ("scripts/zskt/zskt_cifar10_wrn402_wrn161.sh", "026564fc31e185f1f247834fda22fc2a08dd4132"),
           "deepinv": ("scripts/deepinv/deepinv_cifar10_wrn402_wrn161.sh", "cfaa85d51f972480205034429e23adfb3d018779"),
           "cmi": ("scripts/cmi/cmi_cifar10.sh", "8ceb69d447d2f89d587c7cd34e695ffe6842e575")}
METHODS = tuple(SCRIPTS)
COMMAND = "python scripts/trace/datafree.py --official CHECKOUT --method {method}"

# ------------------------------------------------------------------ trace size ---

BATCH = 4
NOISE = 4
NGF = 1
WRN_BASE = [3, 4, 6]  # the official WideResNet's 16 / 32 / 64
WRN_DEPTH = 10
ARCHITECTURES = {
    "trace_wrn10_2": {"registry": "model", "family": "wrn", "depth": WRN_DEPTH, "widen_factor": 2,
                      "base_widths": WRN_BASE},
    "trace_wrn10_1": {"registry": "model", "family": "wrn", "depth": WRN_DEPTH, "widen_factor": 1,
                      "base_widths": WRN_BASE},
    "trace_datafree_large_gen": {"registry": "generator", "family": "datafree_generator", "large": True, "ngf": NGF},
    "trace_datafree_gen": {"registry": "generator", "family": "datafree_generator", "large": False, "ngf": NGF},
}
OFFICIAL_MODELS = {"wrn40_2": 2, "wrn16_1": 1}  # the scripts' --teacher / --student, by widen factor
WHY_SMALL = "a trace must stay well under 1 MB; the step's arithmetic does not depend on the sizes"
MAIN_WORKER_SIZES = {256: NOISE, 64: NGF}  # main_worker's nz = 256 (and CMI's head_dim=256), ngf=64


def script_arguments(checkout: Path, method: str) -> list[str]:
    """The command-line arguments of the script the suite's protocol cites (``python datafree_kd.py \\ ...``)."""
    text = (checkout / SCRIPTS[method][0]).read_text().replace("\\", " ")  # line continuations
    words = shlex.split(text)
    if words[:2] != ["python", "datafree_kd.py"]:
        raise SystemExit(f"error: {SCRIPTS[method][0]} does not run datafree_kd.py; is this the pinned commit?")
    return words[2:]


def with_settings(arguments: list[str], settings: dict[str, str]) -> list[str]:
    """``arguments`` with each ``--name value`` of ``settings`` replaced (or appended)."""
    out = list(arguments)
    for name, value in settings.items():
        flag = f"--{name}"
        if flag in out:
            out[out.index(flag) + 1] = value
        else:
            out += [flag, value]
    return out


# -------------------------------------------------------- the official WRN ---
# datafree/models/classifiers/wresnet.py (ZSKT's WRN): block{g}.layer.{i}, convShortcut, the final bn1.

def wrn_suite_name(key: str) -> str:
    key = re.sub(r"^(block\d)\.layer\.", r"\1.", key)
    key = key.replace(".convShortcut.", ".conv_shortcut.")
    return re.sub(r"^bn1\.", "bn.", key)


def wrn_official_name(key: str) -> str:
    key = re.sub(r"^(block\d)\.(\d+)\.", r"\1.layer.\2.", key)
    key = key.replace(".conv_shortcut.", ".convShortcut.")
    return re.sub(r"^bn\.", "bn1.", key)


def random_wrn_teacher(seed: int = 1) -> dict[str, torch.Tensor]:
    """A random trace-sized WRN-10-2 teacher (float64, the suite's names) whose BatchNorm layers hold random
    affine parameters and running statistics (so that BatchNorm matching has something to match)."""
    from dfkd_bench.models.wrn import WideResNet

    torch.manual_seed(seed)
    model = WideResNet(WRN_DEPTH, 2, 10, 3, base_widths=tuple(WRN_BASE)).double()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                size = module.num_features
                module.weight.copy_(1 + 0.2 * torch.randn(size, generator=generator, dtype=torch.float64))
                module.bias.copy_(0.2 * torch.randn(size, generator=generator, dtype=torch.float64))
                module.running_mean.copy_(0.3 * torch.randn(size, generator=generator, dtype=torch.float64))
                module.running_var.copy_(0.5 + torch.rand(size, generator=generator, dtype=torch.float64))
    return model.state_dict()


# ------------------------------------------------------------------- meta ---

PROTOCOL_SETTINGS = {
    # method: (suite train / params of the trace, official script settings of the trace, generator)
    "dfq": (dict(epochs=2, steps_per_epoch=2, student_steps=2, batch_size=BATCH, eval_every=2),
            dict(noise_dim=NOISE, generator="trace_datafree_large_gen"),
            {"batch_size": str(BATCH), "epochs": "2", "kd_steps": "2", "ep_steps": "4"}),
    "zskt": (dict(epochs=2, steps_per_epoch=2, student_steps=2, batch_size=BATCH, eval_every=2),
             dict(noise_dim=NOISE, generator="trace_datafree_large_gen"),
             {"batch_size": str(BATCH), "epochs": "2", "kd_steps": "2", "ep_steps": "4"}),
}


def meta(method: str) -> dict[str, Any]:
    train, params, official = PROTOCOL_SETTINGS[method]
    why = {"networks": WHY_SMALL, "batch_size": WHY_SMALL, "noise_dim": WHY_SMALL, "generator": WHY_SMALL,
           "epochs": "2 official epochs (the cosine schedule steps once)",
           "steps_per_epoch": "ep_steps // kd_steps official iterations per epoch",
           "student_steps": "kd_steps", "eval_every": "once per epoch, as the protocol"}
    config, sized = common.protocol_config(method, "cifar10", architectures=ARCHITECTURES,
                                           teacher_arch="trace_wrn10_2", student_arch="trace_wrn10_1",
                                           train=train, params=params, why=why)
    iterations = train["epochs"] * train["steps_per_epoch"]
    script = SCRIPTS[method][0]
    spec = {
        "method": method,
        "official": {"repo": REPO, "commit": COMMIT, "entry": f"datafree_kd.py main() with {script}"},
        "command": COMMAND.format(method=method),
        "config": config,
        "trace_sized": sized,
        "architectures": ARCHITECTURES,
        "schedule": ["iteration"] * iterations,
        "load": ["student/", "method/generator/"],
        "uncompared": {"method/counters/": "the suite's count of synthetic images (a budget record, no arithmetic)"},
        "official_settings": official,
        "alignments": {
            "networks": f"the official WideResNet at depth {WRN_DEPTH} with its widths 16/32/64 scaled to "
                        f"{'/'.join(map(str, WRN_BASE))} (teacher widen factor 2, student 1; official WRN-40-2 -> "
                        f"WRN-16-1), a random teacher with random BatchNorm statistics; the generator's own ngf "
                        f"argument {NGF} and nz {NOISE} (main_worker's literals ngf=64 and nz = 256 scaled)",
            "batch, epochs and steps": "the script's settings except " + ", ".join(
                f"--{name} {value}" for name, value in official.items()) + " (trace-sized)",
            "float64": "default dtype float64 on both sides",
            "draws": "every random draw of the official loop returns the suite's draw (its method stream)",
            "normalisation": "CIFAR-10's statistics are the same on both sides",
        },
        "patches": {
            "imports": "kornia, termcolor and torchvision.models.utils stubbed",
            "cpu": "main_worker(gpu=None) (the script's --gpu 0 moves tensors to CUDA)",
            "data": "no CIFAR-10 download (the official train transform is kept); the per-epoch test-set "
                    "evaluation returns a constant (it changes no state); torch.load of the teacher returns the "
                    "trace's teacher",
            "networks": "registry.MODEL_DICT's wrn40_2 / wrn16_1 are the trace-sized official WideResNets; the "
                        "suite's initial weights are copied into the student and the generator before the first draw",
            "cwd": "a temporary folder (main() writes logs, images and checkpoints)",
        },
    }
    if method == "zskt":
        spec["uncompared"]["method/generator_stages"] = ("the suite's clock of ZSKT's own generator cosine "
                                                         "schedule, off in this protocol (no arithmetic)")
        spec["alignments"]["attention"] = ("the DataFree ZSKT has no attention transfer; the suite's at_weight is 0 "
                                           "and its at_gen term 0, recorded as 0")
    return spec


# --------------------------------------------------------- the official code ---

def import_official(checkout: Path) -> SimpleNamespace:
    """The official modules, imported from the checkout (with the import stubs of the docstring)."""
    common.stub_module("termcolor", colored=lambda text, *_args, **_kwargs: text)
    common.stub_module("torchvision.models.utils", load_state_dict_from_url=torch.hub.load_state_dict_from_url)
    augmentation = SimpleNamespace(RandomCrop=None, RandomHorizontalFlip=None, RandomResizedCrop=None)
    common.stub_module("kornia.augmentation", **vars(augmentation))
    common.stub_module("kornia", augmentation=sys.modules["kornia.augmentation"])
    sys.path.insert(0, str(checkout))
    import datafree  # noqa: F401 -- the official package
    import registry

    kd = common.load_official_module(checkout / "datafree_kd.py", "datafree_kd_traced",
                                     {"main_worker": MAIN_WORKER_SIZES})
    wrn = common.load_official_module(checkout / "datafree" / "models" / "classifiers" / "wresnet.py",
                                      "datafree_wresnet_traced", {"WideResNet": dict(zip((16, 32, 64), WRN_BASE))})
    return SimpleNamespace(datafree=datafree, registry=registry, kd=kd, wrn=wrn, kd_file=Path(kd.__file__))


class Layout:
    """The suite's side of a DataFree run: the student's and the generator's names, order and shapes."""

    def __init__(self, trainer, generator_attribute: str = "net"):
        student = trainer.student_module.model
        self.student_shapes = {k: v.shape for k, v in student.state_dict().items()}
        self.student_names = common.parameter_names(student)
        self.initial_student = {k: v.clone() for k, v in student.state_dict().items()}
        method = trainer.method
        generator = method.net.generator if generator_attribute == "net" else getattr(method, generator_attribute)
        self.generator_shapes = {k: v.shape for k, v in generator.state_dict().items()}
        self.generator_names = common.parameter_names(generator)
        self.initial_generator = {k: v.clone() for k, v in generator.state_dict().items()}

    def load_initial(self, student: torch.nn.Module, generator: torch.nn.Module | None) -> None:
        with torch.no_grad():
            student.load_state_dict({wrn_official_name(k): v for k, v in self.initial_student.items()})
            if generator is not None:
                generator.load_state_dict(self.initial_generator)

    def student_state(self, student: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        return {"student": common.renamed(student.state_dict(), wrn_suite_name, self.student_shapes),
                "student_optimizer": common.optimizer_in_suite_order(optimizer, student, self.student_names,
                                                                     wrn_official_name, self.student_shapes)}

    def generator_optimizer(self, optimizer: torch.optim.Optimizer, generator: torch.nn.Module) -> dict[str, Any]:
        return common.optimizer_in_suite_order(optimizer, generator, self.generator_names, lambda name: name,
                                               self.generator_shapes)


def run_main(official: SimpleNamespace, method: str, checkout: Path, spec: dict[str, Any],
             teacher: dict[str, torch.Tensor], folder: Path, patches: list[tuple[Any, str, Any]]) -> str:
    """``datafree_kd.main()`` with the script's arguments (trace-sized) and the patches of the docstring plus
    ``patches``; returns what the official code printed."""
    wrn = official.wrn

    def model(name: str, num_classes: int, pretrained: bool = False, **_kwargs):
        if name not in OFFICIAL_MODELS:
            raise SystemExit(f"error: the script names model {name!r}; the tracer knows {sorted(OFFICIAL_MODELS)}")
        return wrn.WideResNet(depth=WRN_DEPTH, num_classes=num_classes, widen_factor=OFFICIAL_MODELS[name])

    official_teacher = {wrn_official_name(k): v for k, v in teacher.items()}
    arguments = with_settings(script_arguments(checkout, method), spec["official_settings"])
    main_worker = official.kd.main_worker
    evaluation = {"Acc": (0.0, 0.0), "Loss": 0.0}
    printed = io.StringIO()
    with contextlib.ExitStack() as stack:
        for target, name, value in [
                (sys, "argv", ["datafree_kd.py", *arguments]),
                (official.kd, "main_worker", lambda gpu, ngpus, args: main_worker(None, ngpus, args)),
                (official.registry, "datasets", SimpleNamespace(
                    CIFAR10=lambda root, train, download, transform: SimpleNamespace(transform=transform))),
                (official.registry, "MODEL_DICT", {name: (lambda num_classes, name=name: model(name, num_classes))
                                                   for name in OFFICIAL_MODELS}),
                (official.datafree.evaluators, "classification_evaluator",
                 lambda loader: (lambda student, device=None: evaluation)),
                (torch, "load", lambda *args, **kwargs: {"state_dict": official_teacher}),
                *patches]:
            stack.enter_context(mock.patch.object(target, name, value))
        stack.enter_context(contextlib.redirect_stdout(printed))
        stack.enter_context(warnings.catch_warnings())
        warnings.simplefilter("ignore")  # the script's seed / GPU / DataLoader-workers warnings
        common.run_in(folder, official.kd.main)
    return printed.getvalue()


# ------------------------------------------------------------ DFQ and ZSKT ---

def trace_generative(checkout: Path, method: str) -> Trace:
    """DFQ / ZSKT: GenerativeSynthesizer.synthesize() (g_steps generator steps), then train() (kd_steps
    student steps on fresh samples of G in eval mode), ep_steps // kd_steps times per epoch."""
    spec = meta(method)
    teacher = random_wrn_teacher()
    with tempfile.TemporaryDirectory(prefix="datafree-trace-") as tmp, \
            common.suite_start(spec, teacher, Path(tmp)) as suite:
        layout = Layout(suite)
        official = import_official(checkout)
        generative_file = Path(official.datafree.synthesis.generative.__file__).resolve()
        result = Trace(spec, teacher, {})
        loop: dict[str, Any] = {}

        def state() -> dict[str, Any]:
            synthesizer = loop["synthesizer"]
            method_state = {"generator": {f"generator.{k}": v.detach()
                                          for k, v in synthesizer.generator.state_dict().items()},
                            "generator_optimizer": layout.generator_optimizer(synthesizer.optimizer,
                                                                              synthesizer.generator)}
            return common.full_state({**layout.student_state(loop["student"], loop["optimizer"]),
                                      "method": method_state})

        def generator_losses(v: dict[str, Any]) -> dict[str, Any]:
            losses = {"gen_loss": v["loss"], "gen_kd": -v["loss_adv"]}
            if method == "dfq":
                losses.update(gen_oh=v["loss_oh"], gen_balance=v["loss_balance"], gen_bn=v["loss_bn"])
            return losses

        def student_losses(v: dict[str, Any]) -> dict[str, Any]:
            losses = {"kd_gen": v["loss_s"], "student_loss": v["loss_s"]}
            if method == "zskt":
                losses["at_gen"] = 0.0
            return losses

        def on_first_draw(frame) -> None:  # in main_worker: the networks, synthesizer and optimiser it built
            loop.update({name: frame.f_locals[name] for name in ("student", "synthesizer", "optimizer")})
            layout.load_initial(loop["student"], loop["synthesizer"].generator)
            result.initial = state()
            run.record(loop["synthesizer"].optimizer, "generator", generator_losses, generative_file)
            run.record(loop["optimizer"], "student", student_losses, official.kd_file)

        train = spec["config"]["train"]
        iterations = train["epochs"] * train["steps_per_epoch"]
        run = common.OfficialRun(result, suite.method_rng, official.kd_file, state=state,
                                 stop_after=iterations * (1 + train["student_steps"]), on_first_draw=on_first_draw)
        run_main(official, method, checkout, spec, teacher, Path(tmp), [(torch, "randn", run.randn)])
    return result


TRACERS: dict[str, Callable[[Path, str], Trace]] = {"dfq": trace_generative, "zskt": trace_generative}


def trace(checkout: Path, method: str) -> Trace:
    common.check_checkout(checkout, REPO, COMMIT, {**FILES, SCRIPTS[method][0]: SCRIPTS[method][1]})
    return TRACERS[method](checkout, method)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--official", type=Path, required=True, help=f"a checkout of {REPO} at {COMMIT[:7]}")
    parser.add_argument("--method", choices=[*TRACERS, "all"], required=True)
    parser.add_argument("--out", type=Path, default=common.TRACES, help="where to write the traces")
    args = parser.parse_args()
    torch.set_num_threads(1)  # float64 convolutions of tiny networks: one thread is the fastest
    for method in TRACERS if args.method == "all" else [args.method]:
        common.finish(trace(args.official.resolve(), method), f"{method}_datafree_cifar10", args.out)


if __name__ == "__main__":
    main()
