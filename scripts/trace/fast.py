"""Trace FastDFKD's official meta-synthesizer loop (zju-vipa/Fast-Datafree) for the step-equivalence replay
(``results/traces/fast_cifar10.pt``).

    python scripts/trace/fast.py --official CHECKOUT

CHECKOUT is a checkout of zju-vipa/Fast-Datafree at 0dcecbc (the tracer checks the files it reads against that
commit and refuses others). It runs the official ``datafree_kd.main()`` -- argument parsing, the teacher, the
student, the ``Generator``, ``FastMetaSynthesizer`` (its inner Adam over the fast generator and z, the first-order
meta gradient ``fomaml_grad`` and the meta Adam at lr_g x g_steps, the DeepInversionHook L_bn with the bn_mmt
moving average, the one-hot and decision-adversarial terms from epoch ``warmup`` on, the lowest-loss iterate into
the PNG ``ImagePool``), the student's SGD with CosineAnnealingLR(200, 2e-4) stepped per epoch from ``warmup`` on,
and ``train()``: KD at T = 20 on the pool read through the CIFAR-10 train transform -- with the wrnS162-5 line of
scripts/fast_cifar.sh for CIFAR-10 made trace-sized: 4 epochs (``warmup`` 2: two epochs of synthesis only, the
first without L_adv) of 2 synthesis steps and 2 KD steps, from the suite's initial weights with the suite's
random draws, in float64, and replays the trace through the engine.

Aligned (stated in the trace's ``alignments``):
* the teacher's view in synthesis: the official kornia RandomCrop(32, padding=4) + RandomHorizontalFlip (integer
  shifts) is replaced by the suite's ``random_views`` on the suite's draws (CHOSEN in the suite: sub-pixel shifts,
  bilinear), followed by the official normalizer; everything around it is the official code's;
* the pool's data order: the official DataLoader shuffles the PNG files each pass; the suite draws uniformly with
  replacement. The official loader is given the suite's draws: the image indices (mapped to the files by the
  order they were written), and each image's crop offsets and flip, which the official transform's own
  ``torch.randint`` / ``torch.rand`` calls (torchvision RandomCrop.get_params, RandomHorizontalFlip) return;
  the images are read from the official PNG files through the official transform (ToTensor, Normalize);
* the order of two independent updates: the official meta step is taken inside the last inner iteration, before
  that iteration's fast step; the engine takes it after the synthesis stage. They touch disjoint tensors, and
  the trace records G_meta with the step the engine takes it in;
* the next batch: the engine prepares batch k+1 (its z and labels, the fast copy of G_meta, a fresh Adam, the
  meta gradient at zero) when batch k ends, before the KD steps; the official ``synthesize()`` does it when it
  starts. The draws are handed out in the engine's order, and the state recorded during the KD steps is
  the batch the official loop will start from (these draws, G_meta, a fresh Adam);
* trace size: batch 3 (256), nz 2 (256), the official Generator's own ngf 2 (64), the official WideResNet with
  its widths 16/32/64 scaled and depth 10 (WRN-40-2 -> WRN-16-2: teacher widen 2, student widen 1), a random
  teacher, g_steps 2 (5), kd_steps = ep_steps = 2 (400), warmup 2 (20), epochs 202 (220; the official scheduler's
  T_max is a literal 200 = the script's epochs - warmup, so the suite's 202 - 2 gives the same curve), the pool's
  capacity the 12 images the trace writes (unbounded: PNG files); reset_l0 (at synthesis 120 + warmup) is not
  reached.

Patched at run time (never the arithmetic):
* imports: ``kornia`` (augmentations, replaced as above; not installable here), ``termcolor`` (log colours) and
  ``torchvision.models.utils`` (removed in torchvision 0.13, imported by mobilenetv2.py) are stubbed;
* CPU: ``.cuda()`` of tensors and modules (``fomaml_grad``, ``Generator.clone``, ``train()``) returns the object;
  the synthesizer is built with ``device='cpu'`` (the script passes ``--gpu 0``);
* data and checkpoints: ``registry``'s CIFAR-10 data set holds no images (its train transform is the official
  one), the evaluator returns 0 (the trace holds the training steps and ends after the traced epochs), the
  teacher's checkpoint is the trace's teacher; every path is in a temporary folder;
* sizes: ``Generator`` and ``FastMetaSynthesizer`` get nz 2 and ngf 2 (datafree_kd.py hard-codes nz = 256);
  ``registry.get_model`` returns the trace-sized official WRNs; the suite's initial weights are copied into the
  student and the meta generator before the first draw.
"""

from __future__ import annotations

import contextlib
import copy
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from dfkd_bench.methods.zoo_common import random_views  # noqa: E402
from dfkd_bench.traces.format import Trace  # noqa: E402
from dfkd_bench.traces.replay import suite_draws  # noqa: E402

REPO = "zju-vipa/Fast-Datafree"
COMMIT = "0dcecbc178b87048bedf730acb577045b3c0b57a"
FILES = {"datafree_kd.py": "3dfb4fc2af0e4292efd3ce21208278e41bba4e79",
         "registry.py": "a003bd3495debe83b507d46c8ed04d3c023924aa",
         "datafree/synthesis/fast_meta.py": "e26e568fc888f6bbbab8de52a9467f6a8a1ee916",
         "datafree/hooks.py": "ab113d010aa4c1f75c64c9c1075e7351b9066122",
         "datafree/criterions.py": "2300005c683a9561dfa6f5c7c7bbd07ad4e3bacc",
         "datafree/models/generator.py": "2a89a08d1f04f0bb678e29d5f0c7a90682401a10",
         "datafree/models/classifiers/wresnet.py": "2f37676dc13ab50533fc8c688dffc4c43ef5f2a9",
         "datafree/utils/_utils.py": "0b26d31ce5f1bfad02c41a81a800a9e6d529476e"}
COMMAND = "python scripts/trace/fast.py --official CHECKOUT"
NAME = "fast_cifar10"

EPOCHS = 4
WARMUP = 2
G_STEPS = 2
KD_STEPS = 2
BATCH = 3
NOISE = 2
NGF = 2
PADDING = 4
TEACHER = {"registry": "model", "family": "wrn", "depth": 10, "widen_factor": 2, "base_widths": [2, 3, 4]}
STUDENT = {"registry": "model", "family": "wrn", "depth": 10, "widen_factor": 1, "base_widths": [2, 3, 4]}
ARCHITECTURES = {
    "trace_wrn10_2": TEACHER,
    "trace_wrn10_1": STUDENT,
    "trace_datafree_gen": {"registry": "generator", "family": "datafree_generator", "ngf": NGF},
}
WHY_SMALL = "a trace must stay well under 1 MB; the step's arithmetic does not depend on the sizes"


def meta() -> dict:
    train = dict(epochs=200 + WARMUP, generator_steps=G_STEPS, student_steps=KD_STEPS, batch_size=BATCH,
                 student_warmup_epochs=WARMUP, drift_every=0)
    params = dict(generator="trace_datafree_gen", noise_dim=NOISE, synthesis_steps=G_STEPS, warmup=WARMUP,
                  memory_size=BATCH * EPOCHS)
    why = {"networks": WHY_SMALL, "batch_size": WHY_SMALL, "noise_dim": WHY_SMALL, "generator": WHY_SMALL,
           "generator_steps": f"{WHY_SMALL} (g_steps 2, official 5)", "synthesis_steps": "g_steps 2 (official 5)",
           "student_steps": f"{WHY_SMALL} (kd_steps = ep_steps 2, official 400)",
           "student_warmup_epochs": f"warmup {WARMUP} (official 20)", "warmup": f"warmup {WARMUP} (official 20)",
           "epochs": f"200 + warmup: the official CosineAnnealingLR's T_max is a literal 200 (= 220 - 20)",
           "memory_size": f"the {BATCH * EPOCHS} images the trace writes (the official pool is unbounded)",
           "drift_every": "no measurement during a trace"}
    config, sized = common.protocol_config(
        "fast", "cifar10", architectures=ARCHITECTURES, teacher_arch="trace_wrn10_2", student_arch="trace_wrn10_1",
        train=train, params=params, why=why)
    return {
        "method": "fast",
        "official": {"repo": REPO, "commit": COMMIT,
                     "entry": "datafree_kd.py main() -> FastMetaSynthesizer.synthesize(), train()"},
        "command": COMMAND,
        "config": config,
        "trace_sized": sized,
        "architectures": ARCHITECTURES,
        "schedule": ["iteration"] * EPOCHS,
        "load": ["student/", "method/meta_generator/"],
        "uncompared": {
            "method/counters/": "the suite's count of synthetic and pool images (a budget record, no arithmetic)",
            "method/steps_on_batch": "the suite's count of steps on the batch in progress (the official loop index); "
                                     "its effect, when a batch joins the pool, is compared in method/pool/",
            "method/batches_done": "the suite's count of finished batches (the official ep - 1); its effects -- "
                                   "L_adv from warmup on, the pool -- are compared in the losses and method/pool/",
            "method/best_loss": "the lowest synthesis loss of the batch (the official best_cost): compared as the "
                                "losses it is the minimum of",
            "method/best_images": "the lowest-loss iterate (the official best_inputs): compared where it acts, as "
                                  "the pool's images after the stage (method/pool/images, uint8)",
        },
        "alignments": {
            "views": "the teacher's (and student's) view in synthesis: the suite's random_views on the suite's draws "
                     "(CHOSEN: sub-pixel shifts up to 4 px, bilinear, and flips) replaces the official kornia "
                     "RandomCrop(32, padding=4) + RandomHorizontalFlip (integer shifts); the official normalizer "
                     "follows",
            "pool order": "the official DataLoader's shuffle is given the suite's draws: per KD step the image "
                          "indices (with replacement, mapped to the PNG files in the order written), then each "
                          "image's crop rows, crop columns and flip, returned by the torch.randint / torch.rand "
                          "calls of the official transform (RandomCrop(32, padding=4), RandomHorizontalFlip); the "
                          "images are the official PNG files through the official transform",
            "meta step": "the official meta step (inside the last inner iteration, before its fast step) is "
                         "recorded with the next step, where the engine takes it (after the synthesis stage): the "
                         "two updates touch disjoint tensors (G_meta; the fast G and z)",
            "next batch": "the engine prepares batch k+1 (z, labels, the fast copy of G_meta, a fresh Adam, zero meta "
                          "gradient) when batch k ends, the official synthesize() when it starts: the draws are handed "
                          "out in the engine's order and the state recorded during KD steps is the batch the "
                          "official loop starts from next (those draws, its G_meta, a fresh Adam)",
            "networks": f"the official WideResNet with widths 16/32/64 scaled to {TEACHER['base_widths']} and depth "
                        f"10 (teacher widen 2, student widen 1), the official Generator with ngf {NGF} (64) and nz "
                        f"{NOISE} (256); a random teacher",
            "sizes": f"batch {BATCH} (256), g_steps {G_STEPS} (5), kd_steps = ep_steps {KD_STEPS} (400), warmup "
                     f"{WARMUP} (20), {EPOCHS} epochs traced; the official T_max 200 kept by epochs 200 + warmup; "
                     "reset_l0 (at synthesis 120 + warmup) not reached",
            "float64": "default dtype float64 on both sides",
        },
        "patches": {
            "imports": "kornia (replaced: see alignments), termcolor and torchvision.models.utils stubbed",
            "cpu": ".cuda() of tensors and modules returns the object; the synthesizer built with device='cpu'",
            "data": "registry's CIFAR-10 data set holds no images (the official train transform kept); the "
                    "evaluator returns 0 and ends the run after the traced epochs; the teacher checkpoint is the "
                    "trace's teacher; paths in a temporary folder",
            "sizes": "Generator and FastMetaSynthesizer get nz 2 and ngf 2; registry.get_model returns the "
                     "trace-sized official WRNs; the suite's initial weights copied into the student and G_meta "
                     "before the first draw",
        },
    }


class _Planner:
    """The suite's draws, handed to the official loop in the engine's order (see the module doc)."""

    def __init__(self, trace: Trace, rng: torch.Generator, on_first: callable):
        self.draw = suite_draws(trace, rng)
        self.queue: list[torch.Tensor] = []
        self.on_first = on_first
        self.started = False

    def _next(self, kind: str, shape: tuple[int, ...], high: int | None = None) -> torch.Tensor:
        """The official torch.randn / torch.randint of synthesize() (z, targets): drawn ahead, or now."""
        if not self.started:
            self.started = True
            self.on_first()
        if self.queue:
            value = self.queue.pop(0)
            assert tuple(value.shape) == tuple(shape), (value.shape, shape)
            return value
        return self.draw(kind, shape, high)

    def fresh(self, kind: str, shape: tuple[int, ...], high: int | None = None) -> torch.Tensor:
        """A draw of an augmentation or of the pool's order, taken when the official code needs it."""
        return self.draw(kind, tuple(shape), high)

    def randn(self, *args, size=None, **kwargs):
        shape = tuple(size if size is not None else (args[0] if len(args) == 1 else args))
        return self._next("randn", shape)

    def randint(self, *args, low=0, high=None, size=None, **kwargs):
        if len(args) == 3:
            low, high, size = args
        elif len(args) == 2:
            high, size = args
        assert low == 0
        return self._next("randint", tuple(size), high)

    def prepare_next_batch(self, batch: int, nz: int, classes: int) -> None:
        """The engine draws the next batch's z and labels when a batch ends: draw them now, hand them out later."""
        self.queue = [self.draw("randn", (batch, nz)), self.draw("randint", (batch,), classes)]


def trace(checkout: Path) -> Trace:
    common.check_checkout(checkout, REPO, COMMIT, FILES)
    spec = meta()
    teacher = common.random_wrn_teacher(TEACHER)
    with tempfile.TemporaryDirectory(prefix="fast-trace-") as tmp, \
            common.suite_start(spec, teacher, Path(tmp)) as suite:
        student_shapes = {k: v.shape for k, v in suite.student_module.model.state_dict().items()}
        student_names = common.parameter_names(suite.student_module.model)
        initial_student = {k: v.clone() for k, v in suite.student_module.model.state_dict().items()}
        initial_meta = {k: v.clone() for k, v in suite.method.meta_generator.state_dict().items()}

        common.stub_datafree_imports()
        sys.path.insert(0, str(checkout))
        import datafree
        import datafree.synthesis.fast_meta as fast_meta
        import datafree_kd
        import registry

        wresnet = common.load_official_module(checkout / "datafree" / "models" / "classifiers" / "wresnet.py",
                                              "fast_official_wresnet_scaled",
                                              {"WideResNet": dict(zip(common.WRN_OFFICIAL_WIDTHS,
                                                                      TEACHER["base_widths"]))})
        official_teacher = {common.wrn_official_name(k): v for k, v in teacher.items()}
        real_adam, real_sgd = torch.optim.Adam, torch.optim.SGD
        real_generator = datafree.models.generator.Generator
        fast_meta_file = Path(fast_meta.__file__).resolve()
        kd_file = Path(datafree_kd.__file__).resolve()

        result = Trace(spec, teacher, {})
        live: dict = {"fast": None, "held": None, "student": None, "sgd": None, "synth": None,
                      "next_stats": None, "epochs": 0}

        def get_model(name, num_classes, pretrained=False, **kwargs):
            widen = {"wrn40_2": 2, "wrn16_2": 1}[name]
            return wresnet.WideResNet(depth=10, num_classes=num_classes, widen_factor=widen)

        def synthesizer(*args, **kwargs):
            s = fast_meta.FastMetaSynthesizer(*args, **{**kwargs, "nz": NOISE, "device": "cpu"})
            s.aug = lambda x: s.normalizer(random_views(x, None, min_area=1.0, max_shift=float(PADDING),
                                                        draw=planner.fresh))
            live["synth"] = s
            return s

        original_synthesize = fast_meta.FastMetaSynthesizer.synthesize

        def synthesize(self, targets=None):
            out = original_synthesize(self, targets)
            live["fast"] = None  # the batch is done: from now on the state shows the next one
            live["next_stats"] = [h.tmp_val for h in self.hooks]
            planner.prepare_next_batch(self.synthesis_batch_size, self.nz, self.num_classes)
            return out

        def batch_state(s):
            if live["fast"] is None and not planner.queue:
                return None  # before the first batch
            if live["fast"] is not None:  # synthesising: the official frame's batch
                v = common.official_frame(fast_meta_file).f_locals
                return {"generator": {k: t.detach() for k, t in v["fast_generator"].state_dict().items()},
                        "z": v["z"].detach(), "labels": v["targets"], "optimizer": v["optimizer"].state_dict(),
                        "meta_grads": [p.grad.detach().clone() for p in s.generator.parameters()],
                        "last_statistics": ([h.tmp_val[0].detach() for h in s.hooks],
                                            [h.tmp_val[1].detach() for h in s.hooks])}
            # between batches: the one the official loop starts from next (see alignments, "next batch")
            z, labels = planner.queue
            fresh = [p.detach().clone() for p in s.generator.parameters()]
            optimizer = real_adam([{"params": fresh}, {"params": [z.clone()], "lr": s.lr_z}], lr=s.lr_g,
                                  betas=[0.5, 0.999])
            stats = live["next_stats"]
            return {"generator": {k: t.detach() for k, t in s.generator.state_dict().items()}, "z": z,
                    "labels": labels, "optimizer": optimizer.state_dict(),
                    "meta_grads": [torch.zeros_like(p) for p in s.generator.parameters()],
                    "last_statistics": ([m.detach() for m, _ in stats], [v.detach() for _, v in stats])}

        def state() -> dict:
            s = live["synth"]
            meta_generator, meta_optimizer = live["held"] or (s.generator.state_dict(), s.meta_optimizer.state_dict())
            mmt = None if s.hooks[0].mmt is None else ([h.mmt[0] for h in s.hooks], [h.mmt[1] for h in s.hooks])
            return common.full_state({
                "student": common.renamed(live["student"].state_dict(), common.wrn_suite_name, student_shapes),
                "student_optimizer": common.optimizer_in_suite_order(
                    live["sgd"], live["student"], student_names, common.wrn_official_name, student_shapes),
                "method": {"pool": common.png_pool_state(s.data_pool.root, BATCH * EPOCHS), "batch": batch_state(s),
                           "meta_generator": {k: t.detach() for k, t in meta_generator.items()},
                           "meta_optimizer": meta_optimizer, "bn_momentum": mmt},
            })

        def on_first() -> None:  # inside the first synthesize(), before its z: the suite's initial weights
            with torch.no_grad():
                live["student"].load_state_dict({common.wrn_official_name(k): v for k, v in initial_student.items()})
                live["synth"].generator.load_state_dict(initial_meta)
            result.initial = state()

        planner = _Planner(result, suite.method_rng, on_first)

        def generator_losses() -> dict:
            v = common.official_frame(fast_meta_file).f_locals
            s = v["self"]
            losses = {"gen_oh": v["loss_oh"], "gen_bn": v["loss_bn"], "gen_loss": v["loss"]}
            if s.adv > 0 and s.ep >= s.ep_start:
                losses["gen_adv"] = v["loss_adv"]
            return {k: float(t.detach().reshape(())) for k, t in losses.items()}

        def record(kind: str, losses) -> None:
            result.step(kind, losses(), state())
            live["held"] = None

        class TracedAdam(real_adam):
            def __init__(self, params, *args, **kwargs):
                super().__init__(params, *args, **kwargs)
                if len(self.param_groups) == 2:  # the inner optimiser of a batch: fast G and z
                    live["fast"] = self
                    self.register_step_post_hook(lambda *_: record("generator", generator_losses))
                else:  # the meta optimiser: hold G_meta as it was until the fast step is recorded
                    self.register_step_pre_hook(lambda *_: live.update(held=(
                        copy.deepcopy(live["synth"].generator.state_dict()),
                        copy.deepcopy(live["synth"].meta_optimizer.state_dict()))))

        class TracedSGD(real_sgd):
            def __init__(self, params, *args, **kwargs):
                super().__init__(params, *args, **kwargs)
                live["sgd"] = self
                self.register_step_post_hook(lambda *_: record("student", lambda: {
                    name: float(common.official_frame(kd_file).f_locals["loss_s"].detach())
                    for name in ("kd_pool", "student_loss")}))

        def evaluator(*args, **kwargs):
            def evaluate(model, device=None):
                live["epochs"] += 1
                if live["epochs"] == EPOCHS:
                    raise common.TraceDone
                return {"Acc": (0.0, 0.0), "Loss": 0.0}
            return evaluate

        def build_student(name, num_classes, pretrained=False, **kwargs):
            model = get_model(name, num_classes, pretrained)
            if not pretrained:
                live["student"] = model
            return model

        argv = ["datafree_kd.py", "--batch_size", str(BATCH), "--lr", "0.2", "--kd_steps", str(KD_STEPS),
                "--ep_steps", str(KD_STEPS), "--adv", "1.1", "--bn", "10.0", "--oh", "0.4", "--act", "0",
                "--balance", "0", "--gpu", "0", "--T", "20", "--seed", "0", "--bn_mmt", "0.9", "--warmup",
                str(WARMUP), "--epochs", str(200 + WARMUP), "--dataset", "cifar10", "--method", "fast_meta",
                "--g_steps", str(G_STEPS), "--lr_z", "0.01", "--lr_g", "3e-3", "--student", "wrn16_2",
                "--is_maml", "1", "--reset_l0", "1", "--reset_bn", "0", "--save_dir", "run/wrnS162-5",
                "--log_tag", "wrnS162-5"]
        with contextlib.ExitStack() as stack:
            for target, name, value in [
                    (sys, "argv", argv), (torch, "randn", planner.randn), (torch, "randint", planner.randint),
                    (torch, "load", lambda *a, **k: {"state_dict": official_teacher}),
                    (torch.Tensor, "cuda", lambda self, *a, **k: self), (nn.Module, "cuda", lambda self, *a, **k: self),
                    (torch.optim, "Adam", TracedAdam), (torch.optim, "SGD", TracedSGD),
                    (torch.utils.data, "DataLoader", common.png_pool_loader(planner.fresh, BATCH, PADDING)),
                    (registry, "get_model", build_student),
                    (registry.datasets, "CIFAR10", lambda root, train=True, download=False, transform=None:
                        SimpleNamespace(transform=transform)),
                    # what datafree_kd.py reaches as datafree.models.generator.Generator, datafree.synthesis.
                    # FastMetaSynthesizer and datafree.evaluators (the official modules stay as they are: their
                    # classes name themselves in super())
                    (datafree_kd, "datafree", common.Proxy(
                        datafree,
                        models=common.Proxy(datafree.models, generator=common.Proxy(
                            datafree.models.generator, Generator=lambda nz=100, ngf=64, img_size=32, nc=3:
                                real_generator(nz=NOISE, ngf=NGF, img_size=img_size, nc=nc))),
                        synthesis=common.Proxy(datafree.synthesis, FastMetaSynthesizer=synthesizer),
                        evaluators=common.Proxy(datafree.evaluators, classification_evaluator=evaluator))),
                    (fast_meta.FastMetaSynthesizer, "synthesize", synthesize)]:
                stack.enter_context(mock.patch.object(target, name, value))
            common.run_in(Path(tmp), datafree_kd.main)
    return result


def main() -> None:
    common.tracer_main(__doc__, trace, NAME, REPO, COMMIT)


if __name__ == "__main__":
    main()
