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
  widths 16/32/64 scaled to 2/3/4), a random teacher with random BatchNorm statistics; batch 4 (pool
  methods: 2, their state holds a batch of pixels), the generators' own ``ngf`` argument 1 and noise 4,
  CMI's head 4 wide, a feature memory of 8 and 1 negative (``main_worker``'s literals ``ngf=64``,
  ``nz = 256``, ``head_dim=256``, ``bank_size=40960``, ``n_neg=4096`` scaled), 1 or 2 epochs of a few
  steps, 2 synthesis steps per batch; each trace stays well under 1 MB.
* float64 and the draws: torch's default dtype is float64 on both sides; every random draw of the
  official loop returns the suite's draw (its method stream). DFQ and ZSKT draw in the suite's order
  (``common.OfficialRun.randn``). The pool methods do not (the suite starts its next batch when one is
  finished, the official code at its next synthesize(); it crops per image, the suite per batch): their
  tracers record the suite's own run first (``common.suite_draws_by_site``) and hand each official draw
  the suite's draw of the same purpose -- DeepInversion's pixels (torch.randn in synthesize()), labels
  (torch.randint), jitter (random.randint, random.random: the suite's u < 0.5 is random() > 0.5 of 1 - u);
  CMI's z and labels, reset_model's ``nn.init.normal_`` (mean + std * the suite's draw), the memory's
  negatives (``random.sample``: the suite's permutation, cut); the pool's batches (below).
* the pool (DeepInversion, CMI): the official pool is PNG files, read back as the suite's uint8 pool
  state; its DataLoader (shuffled epochs) yields batches at the suite's draws of pool indices (the suite
  draws with replacement, CHOSEN), each image through the official train transform with the suite's crop
  offsets and flip draws. The suite's next batch is "ahead" (``meta["ahead"]``): compared from the
  official loop's next synthesis step on.
* DeepInversion: an official synthesis step is recorded after its ``clip_images`` (Adam's step, then the
  clip); R_compete is the suite's 1 - JS where the official loss has -JS (gen_competition = 1 + loss_adv).
* CMI: the official kornia views are replaced by the suite's ``random_views`` (CHOSEN there) with the
  suite's draws, then the official normaliser; the official code sorts its labels, the suite does not
  (CHOSEN: the same distribution): the trace's label draws are the suite's, sorted.

Patched at run time (never the arithmetic):
* imports: ``kornia`` (CMI's augmentations, replaced before use), ``termcolor`` (log colours) and
  ``torchvision.models.utils`` (removed in torchvision 0.13) are stubbed;
* CPU: ``main_worker`` runs with ``gpu=None`` (the scripts' ``--gpu 0`` moves every tensor to CUDA);
* data: CIFAR-10 is not downloaded (``registry.datasets.CIFAR10`` keeps only the official train
  transform the pool methods read their pools through); the per-epoch evaluation on the test set
  returns a constant (no test data; it changes no state); ``torch.load`` of the teacher checkpoint
  returns the trace's teacher; the pool's DataLoader is the one above; ``main()`` runs in a temporary
  folder (it writes logs, images, the pool and checkpoints there);
* networks: ``registry.MODEL_DICT``'s ``wrn40_2`` / ``wrn16_1`` are the trace-sized official
  WideResNets; just before the first draw the suite's initial weights are copied into the student,
  the generator (DFQ, ZSKT) and CMI's head.
"""

from __future__ import annotations

import argparse
import contextlib
import io
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
COMMAND = "python scripts/trace/datafree.py --official CHECKOUT --method {method}"

# ------------------------------------------------------------------ trace size ---

BATCH = 4
POOL_BATCH = 2  # a pool method's state holds its batch of 32 x 32 x 3 pixels (and their Adam moments)
POOL_STEPS = 2  # synthesis steps per batch (g_steps)
POOL_MEMORY = 16  # the official pool is unbounded: this holds every image of a trace
NOISE = 4
NGF = 1
WRN_BASE = [2, 3, 4]  # the official WideResNet's 16 / 32 / 64
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
BANK = 8  # CMI's feature memory (bank_size=40960): a multiple of the batch that the trace does not fill
NEGATIVES = 1  # CMI's negatives per step (n_neg=4096): fewer than the memory holds after one batch
# main_worker's literals: nz = 256 (and CMI's head_dim=256), ngf=64, CMI's bank_size=40960 and n_neg=4096
MAIN_WORKER_SIZES = {256: NOISE, 64: NGF, 40960: BANK, 4096: NEGATIVES}


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

wrn_suite_name, wrn_official_name = common.wrn_suite_name, common.wrn_official_name


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
    # method: (the suite's train and params settings of the trace, the script's settings of the trace)
    "dfq": (dict(epochs=2, steps_per_epoch=2, student_steps=2, batch_size=BATCH, eval_every=2),
            dict(noise_dim=NOISE, generator="trace_datafree_large_gen"),
            {"batch_size": str(BATCH), "epochs": "2", "kd_steps": "2", "ep_steps": "4"}),
    "zskt": (dict(epochs=2, steps_per_epoch=2, student_steps=2, batch_size=BATCH, eval_every=2),
             dict(noise_dim=NOISE, generator="trace_datafree_large_gen"),
             {"batch_size": str(BATCH), "epochs": "2", "kd_steps": "2", "ep_steps": "4"}),
    # DeepInversion: one epoch (its state holds a batch of pixels and their Adam moments: two epochs would
    # take the trace over 1 MB); CMI: two (a second batch: a reset generator, a fed feature memory)
    "deepinv": (dict(epochs=1, generator_steps=POOL_STEPS, student_steps=2, batch_size=POOL_BATCH),
                dict(synthesis_steps=POOL_STEPS, memory_size=POOL_MEMORY),
                {"batch_size": str(POOL_BATCH), "epochs": "1", "kd_steps": "2", "ep_steps": "2",
                 "g_steps": str(POOL_STEPS)}),
    "cmi": (dict(epochs=2, generator_steps=POOL_STEPS, student_steps=2, batch_size=POOL_BATCH),
            dict(synthesis_steps=POOL_STEPS, memory_size=POOL_MEMORY, generator="trace_datafree_gen",
                 noise_dim=NOISE, head_dim=NOISE, feature_memory=BANK, negatives=NEGATIVES),
            {"batch_size": str(POOL_BATCH), "epochs": "2", "kd_steps": "2", "ep_steps": "2",
             "g_steps": str(POOL_STEPS)}),
}
POOL_BATCH_STATE = ("method/batch/", "method/steps_on_batch", "method/best_loss", "method/best_features")
"""A pool method's batch in progress: the official synthesize() holds it in local variables, so between
two calls the official state has none (None) while the suite has started its next batch."""


def meta(method: str) -> dict[str, Any]:
    train, params, official = PROTOCOL_SETTINGS[method]
    why = {"networks": WHY_SMALL, "batch_size": WHY_SMALL, "noise_dim": WHY_SMALL, "generator": WHY_SMALL,
           "epochs": "official epochs of a trace" + (": 2, the cosine schedule steps once" if train["epochs"] == 2
                                                      else ": 1, a second batch would take the trace over 1 MB"),
           "steps_per_epoch": "ep_steps // kd_steps official iterations per epoch",
           "student_steps": "kd_steps", "eval_every": "once per epoch, as the protocol",
           "generator_steps": "g_steps", "synthesis_steps": "g_steps",
           "memory_size": "the official pool is unbounded (PNG files); this holds every image of the trace",
           "head_dim": WHY_SMALL + " (main_worker's head_dim=256 literal scaled)",
           "feature_memory": "a multiple of the batch the trace does not fill (main_worker's bank_size=40960 "
                             "literal scaled)",
           "negatives": "fewer than the memory holds after one batch (main_worker's n_neg=4096 literal scaled)"}
    config, sized = common.protocol_config(method, "cifar10", architectures=ARCHITECTURES,
                                           teacher_arch="trace_wrn10_2", student_arch="trace_wrn10_1",
                                           train=train, params=params, why=why)
    iterations = config["train"]["epochs"] * config["train"]["steps_per_epoch"]
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
    if method in ("deepinv", "cmi"):
        spec["load"] = ["student/"] + (["method/head/"] if method == "cmi" else [])
        spec["ahead"] = {prefix: "the suite starts its next batch when one is finished (its draws made then), the "
                                 "official synthesize() at its next call: compared from its first synthesis step on"
                         for prefix in POOL_BATCH_STATE}
        spec["alignments"]["pool"] = (
            "the official pool is PNG files, read back (uint8) for the state; the official DataLoader over it "
            "(shuffled epochs, 4 workers) is replaced by batches at the suite's draws of pool indices, which the "
            "suite draws with replacement (CHOSEN: zoo_common.PoolMethod.student_images), each image read "
            "through the official train transform (RandomCrop(32, padding=4), RandomHorizontalFlip, ToTensor, "
            "Normalize) with the suite's crop offsets and flip draws")
        spec["patches"]["data"] += ("; the pool's DataLoader yields batches at the suite's draws (see the "
                                    "alignments)")
    if method == "deepinv":
        spec["uncompared"]["method/best_images"] = (
            "the suite's lowest-loss iterate, which synthesiser = datafree does not use (the pool gets the last "
            "iterate, as the official best_inputs, which aliases the optimised tensor)")
        spec["alignments"]["competition"] = (
            "the suite's R_compete is 1 - JS, the official loss_adv -JS (the same gradient): the trace records "
            "gen_competition = 1 + loss_adv, gen_loss = loss + adv and best_loss = best_cost + adv")
    if method == "cmi":
        spec["alignments"]["augmentation"] = (
            "the official views are kornia's RandomCrop(32, padding=4) + RandomHorizontalFlip (global) and "
            "RandomResizedCrop(32, scale=(0.25, 1)) + RandomHorizontalFlip (local), then the normaliser; the suite's "
            "are zoo_common.random_views (CHOSEN there: square windows, bilinear, sub-pixel positions). The "
            "synthesizer's aug is the suite's random_views with the suite's draws, then the official normaliser")
        spec["alignments"]["labels"] = (
            "the official code sorts each batch's random labels (for visualisation), the suite keeps them in drawn "
            "order (CHOSEN in methods/cmi.py: z's rows are i.i.d., the same distribution); the trace's label draws "
            "are the suite's, sorted, so both sides use the same labels")
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

    def __init__(self, trainer, generator_attribute: str | None = "net"):
        student = trainer.student_module.model
        self.student_shapes = {k: v.shape for k, v in student.state_dict().items()}
        self.student_names = common.parameter_names(student)
        self.initial_student = {k: v.clone() for k, v in student.state_dict().items()}
        method = trainer.method
        if generator_attribute is None:  # DeepInversion: no generator
            return
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


# ------------------------------------------------------------ pool methods ---

def official_pool(root: Path, batch: int) -> dict[str, Any]:
    """The official ImagePool (``root/<batch>-<image>.png``) as the suite's pool state, in the suite's slot
    order (batch by batch, image by image)."""
    import numpy as np
    from PIL import Image

    files = sorted(root.glob("*-*.png"), key=lambda path: tuple(int(n) for n in path.stem.split("-")))
    if [pool_slot(path, batch) for path in files] != list(range(len(files))):
        raise SystemExit(f"error: the official pool {root} holds {[f.name for f in files]}: not whole batches")
    images = [torch.from_numpy(np.array(Image.open(path))).permute(2, 0, 1).contiguous() for path in files]
    stacked = torch.stack(images) if images else torch.zeros((0, 3, 32, 32), dtype=torch.uint8)
    return {"images": stacked, "next_slot": len(files), "size": len(files)}


def pool_slot(path: Path | str, batch: int) -> int:
    """The suite's pool slot of the official pool file ``<batch>-<image>.png``."""
    number, image = (int(n) for n in Path(path).stem.split("-"))
    return number * batch + image


class FedLoader:
    """The official ``DataLoader(dataset, batch_size, shuffle=True, ...)`` over the pool, yielding batches at
    the suite's draws: the pool indices of ``MemoryBank.sample``, each image read through the official
    dataset (its train transform) with the crop offsets and flip draws of the suite's ``random_crop_flip``."""

    def __init__(self, draws: common.SiteDraws, batch: int, dataset: Any = None, *_args, **_kwargs):
        self.draws, self.batch, self.dataset = draws, batch, dataset

    def __iter__(self):
        while True:
            position = {pool_slot(path, self.batch): i for i, path in enumerate(self.dataset.images)}
            slots = self.draws.take("MemoryBank.sample", "randint").tolist()
            rows = self.draws.take("random_crop_flip", "randint").tolist()
            cols = self.draws.take("random_crop_flip", "randint").tolist()
            flips = self.draws.take("random_crop_flip", "rand")
            images = []
            for k, slot in enumerate(slots):
                offsets = iter([torch.tensor([rows[k]]), torch.tensor([cols[k]])])
                with mock.patch.object(torch, "randint", lambda *_a, **_k: next(offsets)), \
                        mock.patch.object(torch, "rand", lambda *_a, k=k, **_k: flips[k:k + 1].clone()):
                    images.append(self.dataset[position[slot]])  # RandomCrop: i, then j; then the flip
            yield torch.stack(images)


def innermost_frame(path: Path, function: str):
    """The innermost frame of ``function`` in the official file ``path``, or None."""
    frame = sys._getframe(1)
    while frame is not None and not (Path(frame.f_code.co_filename) == path and frame.f_code.co_name == function):
        frame = frame.f_back
    return frame


def routed(original: Callable[..., Any], function: str, fed: Callable[..., Any]) -> Callable[..., Any]:
    """``original``, except when called from an official function named ``function``: then ``fed``."""
    def call(*args, **kwargs):
        if sys._getframe(1).f_code.co_name == function:
            return fed(*args, **kwargs)
        return original(*args, **kwargs)

    return call


def trace_deepinv(checkout: Path, method: str) -> Trace:
    """DeepInvSyntheiszer.synthesize() (g_steps Adam steps on the pixels of a new batch, pooled as PNG
    files), then train() (kd_steps student steps on the pool), once per epoch (ep_steps = kd_steps)."""
    spec = meta(method)
    teacher = random_wrn_teacher()
    suite_run, sites = common.suite_draws_by_site(spec, teacher)
    draws = common.SiteDraws(suite_run.draws, sites)
    adv = spec["config"]["params"]["competition_weight"]
    with tempfile.TemporaryDirectory(prefix="datafree-trace-") as tmp, \
            common.suite_start(spec, teacher, Path(tmp)) as suite:
        layout = Layout(suite, generator_attribute=None)
        official = import_official(checkout)
        module = official.datafree.synthesis.deepinversion
        deepinv_file = Path(module.__file__).resolve()
        result = Trace(spec, teacher, {}, draws=list(suite_run.draws))
        loop: dict[str, Any] = {}

        def state() -> dict[str, Any]:
            synthesizer = loop["synthesizer"]
            method_state: dict[str, Any] = {"pool": official_pool(Path(synthesizer.data_pool.root), POOL_BATCH),
                                            "batches_done": synthesizer.data_pool._idx}
            frame = innermost_frame(deepinv_file, "synthesize")
            if frame is not None and "optimizer" in frame.f_locals:  # a batch in progress
                v = frame.f_locals
                method_state.update(steps_on_batch=v["it"] + 1, best_loss=torch.tensor(v["best_cost"] + adv),
                                    batch={"pixels": v["inputs"].detach(), "labels": v["targets"],
                                           "optimizer": v["optimizer"].state_dict()})
            return common.full_state({**layout.student_state(loop["student"], loop["optimizer"]),
                                      "method": method_state})

        def on_first_draw() -> None:  # in main_worker: the networks, synthesizer and optimiser it built
            frame = common.official_frame(official.kd_file)
            loop.update({name: frame.f_locals[name] for name in ("student", "synthesizer", "optimizer")})
            layout.load_initial(loop["student"], None)
            result.initial = state()
            run.record(loop["optimizer"], "student", lambda v: {"kd_pool": v["loss_s"], "student_loss": v["loss_s"]},
                       official.kd_file)

        def pixels(*_args, **_kwargs) -> torch.Tensor:
            if not loop:
                on_first_draw()
            return draws.take("DeepInversion.init_batch", "randn")

        def clip_and_record(*args, **kwargs):  # an official synthesis step ends with the pixels clipped
            clipped = clip_images(*args, **kwargs)
            run.record_step("generator", lambda v: {
                "gen_loss": v["loss"] + adv, "gen_ce": v["loss_oh"], "gen_tv": v["loss_tv"], "gen_bn": v["loss_bn"],
                "gen_competition": 1 + v["loss_adv"]}, deepinv_file)
            return clipped

        roll: list[int] = []

        def randint(low: int, high: int) -> int:  # jitter_and_flip's random.randint(-lim, lim), twice
            if not roll:
                roll.extend(draws.take("random_roll", "randint").tolist())
            return roll.pop(0)

        clip_images = module.clip_images
        run = common.OfficialRun(result, suite.method_rng, official.kd_file, state=state, stop_after=0)
        run_main(official, method, checkout, spec, teacher, Path(tmp), [
            (torch, "randn", routed(torch.randn, "synthesize", pixels)),
            (torch, "randint", routed(torch.randint, "synthesize",
                                      lambda *a, **k: draws.take("random_sorted_labels", "randint"))),
            (module, "random", SimpleNamespace(randint=randint,  # flip = random.random() > 0.5: the suite's u < 0.5
                                               random=lambda: 1.0 - float(draws.take("random_flip", "rand")))),
            (module, "clip_images", clip_and_record),
            (torch.utils.data, "DataLoader", lambda *a, **k: FedLoader(draws, POOL_BATCH, *a, **k))])
        if draws.left() != {"DeepInversion.init_batch": 1, "random_sorted_labels": 1}:  # the suite's next batch
            raise SystemExit(f"error: the official loop left suite draws unused: {draws.left()}")
    return result


def official_memory(bank: Any) -> dict[str, Any]:
    """CMI's official MemoryBank (its first ``n_updates`` rows, filled in order) as the suite's FeatureBank state."""
    size = min(bank.n_updates, bank.max_size)
    return {"data": bank.data[:size].clone(), "next_slot": bank._ptr, "size": size}


def sorted_label_draws(suite_run: Trace, sites: list[str], site: str) -> list[dict[str, Any]]:
    """The suite's draws with each label draw (``randint`` at ``site``) sorted (CMI's alignment)."""
    return [{"kind": draw["kind"], "value": draw["value"].sort().values}
            if (where, draw["kind"]) == (site, "randint") else draw
            for draw, where in zip(suite_run.draws, sites, strict=True)]


def trace_cmi(checkout: Path, method: str) -> Trace:
    """CMISynthesizer.synthesize() (g_steps Adam steps on a re-initialised generator, its z and the contrastive
    head; the lowest-loss iterate pooled as PNG files, its features into the memory), then train() (kd_steps
    student steps on the pool), once per epoch (ep_steps = kd_steps)."""
    from dfkd_bench.methods.zoo_common import random_views
    from dfkd_bench.traces.replay import method_stream

    spec = meta(method)
    teacher = random_wrn_teacher()
    suite_run, sites = common.suite_draws_by_site(spec, teacher)
    labels = "GeneratorPoolMethod.init_batch"
    trace_draws = sorted_label_draws(suite_run, sites, labels)
    draws = common.SiteDraws(trace_draws, sites)
    with tempfile.TemporaryDirectory(prefix="datafree-trace-") as tmp, \
            common.suite_start(spec, teacher, Path(tmp)) as suite:
        layout = Layout(suite, generator_attribute="generator")
        initial_head = {k: v.clone() for k, v in suite.method.head.state_dict().items()}
        official = import_official(checkout)
        module = official.datafree.synthesis.contrastive
        cmi_file = Path(module.__file__).resolve()
        result = Trace(spec, teacher, {}, draws=trace_draws)
        loop: dict[str, Any] = {}

        def state() -> dict[str, Any]:
            synthesizer = loop["synthesizer"]
            head = synthesizer.head.head
            method_state: dict[str, Any] = {
                "pool": official_pool(Path(synthesizer.data_pool.root), POOL_BATCH),
                "batches_done": synthesizer.data_pool._idx, "memory": official_memory(synthesizer.mem_bank),
                "head": head.state_dict(),
                "head_optimizer": common.optimizer_in_suite_order(
                    synthesizer.optimizer_head, head, common.parameter_names(head), lambda name: name,
                    {k: v.shape for k, v in head.state_dict().items()})}
            frame = innermost_frame(cmi_file, "synthesize")
            if frame is not None and "best_features" in frame.f_locals:  # a batch in progress, stepped
                v = frame.f_locals
                method_state.update(
                    steps_on_batch=v["it"] + 1, best_loss=torch.tensor(v["best_cost"]), best_images=v["best_inputs"],
                    best_features=v["best_features"],
                    batch={"generator": synthesizer.generator.state_dict(), "z": v["z"].detach(),
                           "labels": v["targets"], "optimizer": v["optimizer"].state_dict()})
            return common.full_state({**layout.student_state(loop["student"], loop["optimizer"]),
                                      "method": method_state})

        def on_first_draw() -> None:  # in main_worker: the networks, synthesizer and optimiser it built
            frame = common.official_frame(official.kd_file)
            loop.update({name: frame.f_locals[name] for name in ("student", "synthesizer", "optimizer")})
            synthesizer = loop["synthesizer"]
            layout.load_initial(loop["student"], None)
            with torch.no_grad():
                synthesizer.head.head.load_state_dict(initial_head)
            normalizer = synthesizer.normalizer

            def views(inputs: torch.Tensor) -> list[torch.Tensor]:  # the CHOSEN views of the suite, the draws fed
                with method_stream(rng, feed=lambda kind, *_shape_and_range: draws.take("random_views", kind)):
                    return [normalizer(random_views(inputs, rng, min_area=1.0, max_shift=4.0)),
                            normalizer(random_views(inputs, rng, min_area=0.25))]

            synthesizer.aug = views
            result.initial = state()
            run.record(synthesizer.optimizer_head, "generator", lambda v: {
                "gen_loss": v["loss"], "gen_oh": v["loss_oh"], "gen_bn": v["loss_bn"], "gen_adv": v["loss_adv"],
                "gen_cr": v["loss_cr"]}, cmi_file)
            run.record(loop["optimizer"], "student", lambda v: {"kd_pool": v["loss_s"], "student_loss": v["loss_s"]},
                       official.kd_file)

        def noise(*args, **kwargs) -> torch.Tensor:  # synthesize()'s z
            if not loop:
                on_first_draw()
            return draws.take(labels, "randn")

        def normal(tensor: torch.Tensor, mean: float = 0.0, std: float = 1.0) -> torch.Tensor:  # reset_model
            with torch.no_grad():
                return tensor.copy_(mean + std * draws.take("reset_generator", "randn"))

        def negatives(population, k: int) -> list[int]:  # MemoryBank.get_data's random.sample
            return draws.take("FeatureBank.sample", "randperm")[:k].tolist() if len(population) else []

        rng = torch.Generator()  # the suite's random_views draws from it: served from the trace
        run = common.OfficialRun(result, suite.method_rng, official.kd_file, state=state, stop_after=0)
        run_main(official, method, checkout, spec, teacher, Path(tmp), [
            (torch, "randn", routed(torch.randn, "synthesize", noise)),
            (torch, "randint", routed(torch.randint, "synthesize", lambda *a, **k: draws.take(labels, "randint"))),
            (torch.nn.init, "normal_", routed(torch.nn.init.normal_, "reset_model", normal)),
            (module, "random", SimpleNamespace(sample=negatives)),
            (module, "augmentation", SimpleNamespace(RandomCrop=_unused, RandomHorizontalFlip=_unused,
                                                     RandomResizedCrop=_unused)),
            (torch.utils.data, "DataLoader", lambda *a, **k: FedLoader(draws, POOL_BATCH, *a, **k))])
        batches = spec["config"]["train"]["epochs"] + 1  # the suite starts the next batch after the last one
        expected = {labels: 2, "reset_generator": sites.count("reset_generator") // batches}
        if draws.left() != expected:  # only the suite's next batch
            raise SystemExit(f"error: the official loop left suite draws unused: {draws.left()}")
    return result


def _unused(*_args, **_kwargs) -> None:
    """kornia's augmentations, built by CMISynthesizer.__init__ and replaced before use (see the alignments)."""


TRACERS: dict[str, Callable[[Path, str], Trace]] = {"dfq": trace_generative, "zskt": trace_generative,
                                                    "deepinv": trace_deepinv, "cmi": trace_cmi}


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
