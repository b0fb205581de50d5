"""Time the suite against official pool and generator loops per optimiser step (CIFAR-10 paper protocols).

Used by ``time_official.py`` (``--fast``, ``--nayer``, ``--datafree`` checkouts). For each method, on this CPU
with one thread, float32, at the protocol's full sizes (networks, batch, noise, generator width), with a random
WRN-40-2 teacher (weights do not change the arithmetic's cost):

* the suite's side is the engine's ``run_iteration()`` of the method's CIFAR-10 paper protocol as it resolves on
  a CPU (channels-last, fused optimisers and deterministic algorithms as ``auto`` sets them there);
* the official side is the official ``datafree_kd.main()`` from a checkout, run as the tracers run it
  (``fast.py``, ``nayer.py``, ``datafree.py``: CPU, no data set, the teacher's checkpoint replaced, the kornia
  augmentations replaced by the suite's ``random_views``, which kornia is not installable here), with torch's own
  random draws and the pool's DataLoader in-process (``num_workers=0``: its decoding counted on this thread, as
  the suite's pool reads are);
* both sides run with the same few changes from the protocol that do not change one step's work but bring the
  steps to time within a few minutes: no warm-up epochs (synthesis and KD from the first epoch, L_adv on), a few
  synthesis steps per batch (pool methods), a few KD steps per generator step (DFQ, ZSKT), one batch per epoch.

A global optimiser step post-hook stamps every step (wall time and this thread's CPU time). A step of the
student's optimiser is a KD step; any other optimiser's (Adam over a generator, its latent, CMI's head or the
pixels) a synthesis step. A step's time is the time since the previous step of the same optimiser when no step of
the other kind lies between (a synthesis step inside a batch, a KD step inside a stage: the steady state, no stage
boundary; CMI's head Adam steps between two generator Adam steps belong to the same synthesis step); DFQ's and
ZSKT's one generator step per iteration, which never has such a neighbour, is timed since the step before it (the
iteration's last KD step). In each block the first timed step of each kind is a warm-up and dropped; blocks of each side
alternate (official first), each a fresh run, so that a slow moment of the shared machine hits both.
"""

from __future__ import annotations

import collections
import contextlib
import importlib
import io
import pickle
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable
from unittest import mock

import torch
import torch.optim.optimizer as optim_hooks
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import fast  # noqa: E402
import nayer  # noqa: E402
import zskt  # noqa: E402

# the DataFree tracer under another name than the official package ``datafree`` it runs
datafree = common.load_official_module(Path(__file__).resolve().parent / "datafree.py", "datafree_tracer")

from dfkd_bench.methods.zoo_common import random_views  # noqa: E402
from dfkd_bench.traces.replay import build_trainer  # noqa: E402

WRN40_2 = {"depth": 40, "widen_factor": 2, "base_widths": [16, 32, 64]}
WRN16_2 = {"depth": 16, "widen_factor": 2, "base_widths": [16, 32, 64]}  # ZSKT's own CIFAR-10 teacher
KINDS = ("synthesis", "student")


class StopTiming(common.TraceDone):
    """Raised from the step hook when a block has its steps (ends the official loop as a tracer's end does)."""


class StepClock:
    """The global optimiser step post-hook of one block (see the module doc)."""

    def __init__(self, is_student: Callable[[torch.optim.Optimizer], bool], wanted: int, any_previous: set[str]):
        self.is_student, self.wanted, self.any_previous = is_student, wanted, any_previous
        self.events: list[tuple[str, int, float, float]] = []
        self.handle = None

    def __enter__(self) -> "StepClock":
        self.handle = optim_hooks.register_optimizer_step_post_hook(self.hook)
        return self

    def __exit__(self, *exc) -> None:
        self.handle.remove()

    def hook(self, optimizer, *_args) -> None:
        wall, cpu = time.perf_counter(), time.thread_time()
        self.events.append(("student" if self.is_student(optimizer) else "synthesis", id(optimizer), wall, cpu))
        if all(len(times) > self.wanted for times in self.times().values()):
            raise StopTiming

    def times(self) -> dict[str, list[tuple[float, float]]]:
        """Per kind, the timed steps so far, the warm-up (first) one included."""
        out: dict[str, list[tuple[float, float]]] = {kind: [] for kind in KINDS}
        last: dict[int, int] = {}  # optimiser -> index of its latest step
        for index, (kind, optimizer, wall, cpu) in enumerate(self.events):
            before = last.get(optimizer)
            last[optimizer] = index
            if kind in self.any_previous:
                before = index - 1 if index else None
            elif before is not None and any(e[0] != kind for e in self.events[before + 1:index]):
                before = None  # a stage boundary lies between
            if before is not None:
                out[kind].append((wall - self.events[before][2], cpu - self.events[before][3]))
        return out

    def timed(self) -> dict[str, list[tuple[float, float]]]:
        return {kind: times[1:1 + self.wanted] for kind, times in self.times().items()}


# ------------------------------------------------------------------ methods ---
# method: (official runner key, the suite's train / params changes, the official script's changes,
#          kinds timed since the previous step of any kind)
SETTINGS: dict[str, dict[str, Any]] = {
    "dfq": dict(official="datafree", train=dict(student_steps=2), script={"kd_steps": "2"},
                any_previous={"synthesis"}, changes="kd_steps 2 (10)"),
    "zskt": dict(official="datafree", train=dict(student_steps=2), script={"kd_steps": "2"},
                 any_previous={"synthesis"}, changes="kd_steps 2 (5)"),
    "deepinv": dict(official="datafree", train=dict(generator_steps=4), params=dict(synthesis_steps=4),
                    script={"g_steps": "4"}, changes="g_steps 4 (1000)"),
    "cmi": dict(official="datafree", train=dict(generator_steps=4), params=dict(synthesis_steps=4),
                script={"g_steps": "4"}, changes="g_steps 4 (200)"),
    "fast": dict(official="fast", train=dict(student_warmup_epochs=0), params=dict(warmup=0),
                 script={"warmup": "0"}, changes="warmup 0 (20): L_adv and KD from the first epoch"),
    "nayer": dict(official="nayer", train=dict(generator_steps=4, student_warmup_epochs=0),
                  params=dict(synthesis_steps=4, warmup=0, g_loops=1),
                  script={"g_steps": "4", "warmup": "0", "g_loops": "1"},
                  changes="g_steps 4 (30), g_loops 1 (2), warmup 0 (20): L_adv and KD from the first epoch"),
    # ZSKT's own code (polo5, scripts/ZeroShot/main0.sh): the suite's ZSKT with the settings that express it (as
    # scripts/trace/zskt.py), at main0.sh's sizes: WRN-16-2 -> WRN-16-1, batch 128, z 100, 10 student steps
    "zskt_polo5": dict(official="zskt", method="zskt", teacher=WRN16_2, any_previous={"synthesis"},
                       changes="none (main0.sh's settings; no checkpoint saved)"),
}


def teacher_state(method: str) -> dict[str, torch.Tensor]:
    spec = SETTINGS[method].get("teacher", WRN40_2)
    return {k: v.float() for k, v in common.random_wrn_teacher(spec).items()}


def suite_config(method: str) -> dict[str, Any]:
    """The suite's run of ``method`` (SETTINGS' changes applied)."""
    from dfkd_bench.cluster.experiment import resolve_settings

    settings = SETTINGS[method]
    if method == "zskt_polo5":
        trace = zskt.meta()["config"]
        pseudo_batches = 80_000
        train = {**trace["train"], "batch_size": 128, "student_steps": 10, "steps_per_epoch": pseudo_batches,
                 "eval_every": pseudo_batches}
        params = {**trace["params"], "generator": "zskt_gen", "noise_dim": 100,
                  "generator_cosine_iterations": pseudo_batches}
        config, _ = common.protocol_config("zskt", "cifar10", architectures={"wrn16_2": "(registered)"},
                                           teacher_arch="wrn16_2",
                                           student_arch="wrn16_1", train=train, params=params,
                                           why=collections.defaultdict(lambda: zskt.WHY_POLO5))
        return config
    teacher_arch, student_arch, *_ = resolve_settings(method, "cifar10", "paper")
    config, _ = common.protocol_config(method, "cifar10", architectures={}, teacher_arch=teacher_arch,
                                       student_arch=student_arch, train={**settings.get("train", {}), "drift_every": 0},
                                       params=settings.get("params", {}),
                                       why=collections.defaultdict(lambda: settings["changes"]))
    return config


def suite_block(method: str, teacher: dict[str, torch.Tensor], wanted: int) -> dict[str, list[tuple[float, float]]]:
    """A fresh engine run of the protocol (with the changes of SETTINGS) until it has its steps."""
    settings = SETTINGS[method]
    config = suite_config(method)
    with tempfile.TemporaryDirectory(prefix=f"{method}-timing-") as tmp:
        trainer = build_trainer({"method": settings.get("method", method), "config": config}, teacher, Path(tmp))
        with StepClock(lambda o: o is trainer.optimizer, wanted, settings.get("any_previous", set())) as clock:
            try:
                while True:
                    trainer.set_learning_rate()
                    trainer.run_iteration()
                    trainer.iteration += 1
            except StopTiming:
                pass
        return clock.timed()


# ------------------------------------------------------------ official runs ---

@contextlib.contextmanager
def official_imports(checkout: Path):
    """``checkout`` first on the import path, and the official packages (``datafree``, ``registry``,
    ``datafree_kd``: the same names in every DataFree-derived repository) forgotten afterwards."""
    names = ("datafree", "registry", "datafree_kd")
    forget = lambda: [sys.modules.pop(n) for n in list(sys.modules) if n.split(".")[0] in names]  # noqa: E731
    forget()
    sys.path.insert(0, str(checkout))
    try:
        common.stub_datafree_imports(wandb=dict(init=lambda *a, **k: None, log=lambda *a, **k: None),
                                     xlsxwriter={})
        yield
    finally:
        sys.path.remove(str(checkout))
        forget()


def kornia_views(padding: int = 4) -> SimpleNamespace:
    """What the official code builds as kornia's augmentations: the suite's random_views (global RNG)."""
    return SimpleNamespace(
        RandomCrop=lambda size, padding=padding, **_: (lambda x: random_views(x, None, min_area=1.0,
                                                                               max_shift=float(padding))),
        RandomHorizontalFlip=lambda *a, **k: (lambda x: x),  # random_views flips
        RandomResizedCrop=lambda size, scale=(0.25, 1.0), **_: (lambda x: random_views(x, None, min_area=scale[0])))


class InProcessLoader(torch.utils.data.DataLoader):
    """The official pool's DataLoader with its workers in this process (their CPU time counted)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **{**kwargs, "num_workers": 0, "pin_memory": False})


def run_datafree_kd(checkout: Path, argv: list[str], teacher: dict[str, torch.Tensor], wanted: int,
                    any_previous: set[str], synthesis_modules: list[str], extra: Callable[[Any], list] | None = None,
                    prepare: Callable[[Path], None] | None = None) -> dict[str, list[tuple[float, float]]]:
    """``datafree_kd.main()`` of ``checkout`` with ``argv`` (its ``--gpu`` parsed as None: the CPU), full-size official networks,
    until the step hook has its steps."""
    official_teacher = {common.wrn_official_name(k): v for k, v in teacher.items()}
    real_load = torch.load

    def load(path, *args, **kwargs):
        if isinstance(path, str) and path.startswith("checkpoints/pretrained/"):
            return {"state_dict": official_teacher}
        return real_load(path, *args, **kwargs)

    with official_imports(checkout), tempfile.TemporaryDirectory(prefix="official-timing-") as tmp:
        if prepare is not None:
            prepare(Path(tmp))
        registry = importlib.import_module("registry")
        evaluators = importlib.import_module("datafree.evaluators")
        kd = importlib.import_module("datafree_kd")
        real_parse = kd.parser.parse_args

        def parse_args(*args, **kwargs):  # the CPU: .to(None) / .cuda(None) leave a tensor where it is
            parsed = real_parse(*args, **kwargs)
            parsed.gpu = None
            return parsed

        patches = [(kd.parser, "parse_args", parse_args), (sys, "argv", ["datafree_kd.py", *argv]), (torch, "load", load),
                   (torch.Tensor, "cuda", lambda self, *a, **k: self), (nn.Module, "cuda", lambda self, *a, **k: self),
                   (torch.utils.data, "DataLoader", InProcessLoader),
                   (registry.datasets, "CIFAR10", lambda root, train=True, download=False, transform=None:
                       SimpleNamespace(transform=transform)),
                   (evaluators, "classification_evaluator",
                    lambda loader: (lambda student, device=None: {"Acc": (0.0, 0.0), "Loss": 0.0}))]
        patches += [(importlib.import_module(name), "augmentation", kornia_views()) for name in synthesis_modules]
        if extra is not None:
            patches += extra(kd)
        with contextlib.ExitStack() as stack:
            for target, name, value in patches:
                stack.enter_context(mock.patch.object(target, name, value))
            stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
            stack.enter_context(warnings.catch_warnings())
            warnings.simplefilter("ignore")
            clock = stack.enter_context(StepClock(lambda o: isinstance(o, torch.optim.SGD), wanted, any_previous))
            common.run_in(Path(tmp), kd.main)
        return clock.timed()


def official_datafree(method: str, checkout: Path, teacher, wanted: int) -> dict[str, list[tuple[float, float]]]:
    settings = SETTINGS[method]
    argv = datafree.with_settings(datafree.script_arguments(checkout, method), settings["script"])
    modules = {"cmi": ["datafree.synthesis.contrastive"]}.get(method, [])
    return run_datafree_kd(checkout, argv, teacher, wanted, settings.get("any_previous", set()), modules)


def official_fast(method: str, checkout: Path, teacher, wanted: int) -> dict[str, list[tuple[float, float]]]:
    argv = ["--batch_size", "256", "--lr", "0.2", "--kd_steps", "400", "--ep_steps", "400", "--adv", "1.1",
            "--bn", "10.0", "--oh", "0.4", "--act", "0", "--balance", "0", "--T", "20", "--seed", "0",
            "--bn_mmt", "0.9", "--warmup", SETTINGS["fast"]["script"]["warmup"], "--epochs", "220", "--dataset",
            "cifar10", "--method", "fast_meta", "--g_steps", "5", "--lr_z", "0.01", "--lr_g", "3e-3", "--student",
            "wrn16_2", "--is_maml", "1", "--reset_l0", "1", "--reset_bn", "0", "--save_dir", "run/wrnS162-5",
            "--log_tag", "wrnS162-5"]  # scripts/fast_cifar.sh's wrnS162-5 line (as fast.py reads it)
    return run_datafree_kd(checkout, argv, teacher, wanted, set(), ["datafree.synthesis.fast_meta"])


def official_nayer(method: str, checkout: Path, teacher, wanted: int) -> dict[str, list[tuple[float, float]]]:
    script = SETTINGS["nayer"]["script"]
    argv = ["--batch_size", "512", "--synthesis_batch_size", "400", "--lr", "0.2", "--warmup", script["warmup"],
            "--epochs", "120", "--dataset", "cifar10", "--method", "nayer", "--lr_g", "4e-3", "--teacher", "wrn40_2",
            "--student", "wrn16_2", "--save_dir", "run/c10w402w162-nayer", "--adv", "1.33", "--bn", "10.0",
            "--oh", "0.5", "--g_steps", script["g_steps"], "--g_life", "10", "--g_loops", script["g_loops"],
            "--gwp_loops", "10", "--log_tag", "c10w402w162-nayer-ep120"]  # scripts/nayer_100.sh, c10w402w162

    def extra(kd) -> list:  # datafree_kd.py's --method choices are ['nldf'] (see nayer.py's docstring)
        return [(kd.parser._option_string_actions["--method"], "choices", ["nldf", "nayer"])]

    def prepare(folder: Path) -> None:  # the official label embedding, read from the working folder, on the CPU
        (folder / "label_embedding").mkdir()
        embedding = nayer.official_embedding(checkout).float()
        (folder / "label_embedding" / "cifar10_le.pickle").write_bytes(pickle.dumps(embedding))

    return run_datafree_kd(checkout, argv, teacher, wanted, set(), ["datafree.synthesis.nayer"], extra, prepare)


def official_zskt(method: str, checkout: Path, teacher, wanted: int) -> dict[str, list[tuple[float, float]]]:
    """polo5's main.py as a script with main0.sh's CIFAR-10 settings (as scripts/trace/zskt.py runs it, full size:
    the official WRNs and Generator unscaled, torch's own draws)."""
    import runpy

    official_teacher = {common.wrn_official_name(k): v for k, v in teacher.items()}
    common.stub_module("utils.logger", Logger=zskt._NoLogger)
    sys.path.insert(0, str(checkout))
    try:
        with tempfile.TemporaryDirectory(prefix="official-timing-") as tmp:
            solver = importlib.import_module("solver")
            loaders = importlib.import_module("utils.loaders")
            wresnet = importlib.import_module("models.wresnet")

            def select_model(dataset, model_name, pretrained=False, pretrained_models_path=None):
                widen = {"WRN-16-2": 2, "WRN-16-1": 1}[model_name]
                model = wresnet.WideResNet(depth=16, num_classes=10, widen_factor=widen, dropRate=0.0)
                if pretrained:
                    model.load_state_dict(official_teacher)
                return model

            argv = ["main.py", "--dataset", "CIFAR10", "--total_n_pseudo_batches", "8e4", "--n_generator_iter", "1",
                    "--n_student_iter", "10", "--batch_size", "128", "--z_dim", "100", "--student_learning_rate",
                    "2e-3", "--generator_learning_rate", "1e-3", "--teacher_architecture", "WRN-16-2",
                    "--student_architecture", "WRN-16-1", "--KL_temperature", "1", "--AT_beta", "250",
                    "--pretrained_models_path", tmp, "--datasets_path", tmp, "--log_directory_path", tmp,
                    "--save_final_model", "False", "--save_n_checkpoints", "0", "--save_model_path", tmp,
                    "--seeds", "0", "--workers", "0", "--use_gpu", "False"]
            # the student's optimiser is Adam here: a step over a 4-d first parameter (the WRN's conv1) is a KD step
            is_student = lambda o: o.param_groups[0]["params"][0].dim() == 4  # noqa: E731
            with contextlib.ExitStack() as stack:
                for target, name, value in [
                        (sys, "argv", argv), (solver, "select_model", select_model),
                        (solver, "get_test_loader", lambda args: None),
                        (solver.ZeroShotKTSolver, "test", lambda self: 0.0),
                        (loaders.LearnableLoader, "samples", lambda self, n, grid=True: None)]:
                    stack.enter_context(mock.patch.object(target, name, value))
                stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
                clock = stack.enter_context(StepClock(is_student, wanted, SETTINGS[method]["any_previous"]))
                common.run_in(Path(tmp), lambda: runpy.run_path(str(checkout / "main.py"), run_name="__main__"))
            return clock.timed()
    finally:
        sys.path.remove(str(checkout))
        for name in [n for n in sys.modules if n.split(".")[0] in ("solver", "models", "utils")]:
            sys.modules.pop(name)


OFFICIAL = {"datafree": (official_datafree, datafree), "fast": (official_fast, fast),
            "nayer": (official_nayer, nayer), "zskt": (official_zskt, zskt)}


def time_method(method: str, checkout: Path, steps: int, rounds: int) -> dict[str, Any]:
    """Per kind: the medians of ``steps`` x ``rounds`` timed steps of each side and their ratio."""
    run, module = OFFICIAL[SETTINGS[method]["official"]]
    files = dict(module.FILES)
    if module is datafree:
        files[datafree.SCRIPTS[method][0]] = datafree.SCRIPTS[method][1]
    common.check_checkout(checkout, module.REPO, module.COMMIT, files)
    teacher = teacher_state(method)
    official: dict[str, list] = {kind: [] for kind in KINDS}
    suite: dict[str, list] = {kind: [] for kind in KINDS}
    for _ in range(rounds):
        for kind, times in run(method, checkout, teacher, steps).items():
            official[kind] += times
        for kind, times in suite_block(method, teacher, steps).items():
            suite[kind] += times
    result: dict[str, Any] = {"official": {"repo": module.REPO, "commit": module.COMMIT},
                              "changes_both_sides": SETTINGS[method]["changes"],
                              "synthesis_timed_since": "the previous step of any kind"
                              if "synthesis" in SETTINGS[method].get("any_previous", set())
                              else "the previous step of the same optimiser"}
    for kind in KINDS:
        entry = {"steps": min(len(official[kind]), len(suite[kind]))}
        for side, times in (("official", official[kind]), ("suite", suite[kind])):
            entry[f"{side}_wall_s"] = statistics.median(t[0] for t in times)
            entry[f"{side}_cpu_s"] = statistics.median(t[1] for t in times)
        entry["suite_over_official_wall"] = entry["suite_wall_s"] / entry["official_wall_s"]
        entry["suite_over_official_cpu"] = entry["suite_cpu_s"] / entry["official_cpu_s"]
        result[kind] = entry
    return result
