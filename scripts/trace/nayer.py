"""Trace NAYER's official loop (tmtuan1307/NAYER) for the step-equivalence replay (``results/traces/nayer_cifar10.pt``).

    python scripts/trace/nayer.py --official CHECKOUT

CHECKOUT is a checkout of tmtuan1307/NAYER at c6bedcd (the tracer checks the files it reads against that commit
and refuses others). It runs the official ``datafree_kd.main()`` -- argument parsing, the teacher, the student,
the label-text embedding, ``NLGenerator`` and ``NAYER.synthesize()`` (G replaced by ``reinit()`` at the epochs the
g_life rule names, the noisy layer re-drawn by ``re_init_le()`` and the labels by ``generate_ys()`` before every
batch, a new Adam per batch over G and the noisy layer, the DeepInversionHook L_bn with the bn_mmt moving average,
the one-hot and decision-adversarial terms after the warm-up with the student in eval mode for an epoch's first
batch and in train mode for its later ones, the lowest-loss iterate into the PNG ``ImagePool``), the student's SGD
with CosineAnnealingLR(epochs - warmup, 2e-4) stepped per epoch from ``warmup`` on, and ``train()``: KD at T = 20
on the pool read through the CIFAR-10 train transform -- with the c10w402w162 line of scripts/nayer_100.sh made
trace-sized: 2 epochs (``warmup`` 1: one epoch of synthesis only, without L_adv) of 2 batches of 2 synthesis steps,
then 2 KD steps, from the suite's initial weights with the suite's random draws, in float64; the official loop
then runs into epoch 3 until its first synthesis draw (so that the draws the engine takes ahead for that epoch's
first batch are checked against the ones the official code consumes), and the trace is replayed through the engine.

Aligned (stated in the trace's ``alignments``):
* the teacher's view in synthesis: the official kornia RandomCrop(32, padding=4) + RandomHorizontalFlip (integer
  shifts) is replaced by the suite's ``random_views`` on the suite's draws (CHOSEN in the suite: sub-pixel shifts,
  bilinear), followed by the official normalizer; everything around it is the official code's;
* the draws of a batch's set-up: the uniform draws of ``reinit()`` (PyTorch's default initialisation of the new
  NLGenerator: each Linear / conv weight and bias, in construction order), the normal draws of ``re_init_le()``
  and the ``torch.randint`` of ``generate_ys()`` are the suite's (a ``uniform_(a, b)`` / ``normal_(m, s)`` of the
  official code returns ``u (b - a) + a`` / ``z s + m`` of the suite's ``u`` / ``z``, what those kernels compute);
* the next batch: the engine sets the next batch up (the draws above, a fresh Adam) as soon as a batch ends, before
  the KD steps; the official loop when it starts it. The draws are handed out in the engine's order, and the state
  recorded from a batch's last step until the next batch's first is the batch the official loop starts from next;
  the last step of a batch is recorded once the official loop has added the batch to the pool and updated the
  bn_mmt average (the engine does both inside that step);
* the pool's data order: as FastDFKD's tracer (common.png_pool_loader): the official DataLoader is given the suite's
  draws (image indices with replacement, crop offsets, flips), the images are the official PNG files through the
  official transform;
* the label-text embedding: the official label_embedding/cifar10_le.pickle (checked equal to the suite's shipped
  clip-cifar10.pt), in float64;
* trace size: see ``meta()["alignments"]["sizes"]``.

Patched at run time (never the arithmetic):
* imports: ``kornia`` (augmentations, replaced as above; not installable here), ``termcolor``, ``torchvision.models.
  utils``, ``wandb`` (logging; its init and log do nothing) and ``xlsxwriter`` (imported by fast_meta.py) are stubbed;
* the script bug: datafree_kd.py's ``--method`` choices are ``['nldf']`` while its code runs only ``nayer`` (the
  scripts' ``--method nayer`` is refused by argparse as published): ``nayer`` is added to the choices;
* CPU: the parsed ``--gpu 0`` becomes None (every ``.to(args.gpu)`` a no-op), ``.cuda()`` of tensors and modules
  (``NLGenerator.reinit``) returns the object;
* data and checkpoints: ``registry``'s CIFAR-10 data set holds no images (its train transform is the official one),
  the evaluator returns 0, the teacher's checkpoint is the trace's teacher, the label embedding is read from a copy
  in float64; every path is in a temporary folder;
* sizes: ``NLGenerator`` gets ngf 1 (datafree_kd.py hard-codes 64); ``registry.get_model`` returns the trace-sized
  official WRNs; the suite's initial student is copied into the official one before the first draw.
"""

from __future__ import annotations

import contextlib
import copy
import io
import pickle
import re
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

REPO = "tmtuan1307/NAYER"
COMMIT = "c6bedcd49ad7362ff3dc5697202d97e303919a05"
FILES = {"datafree_kd.py": "a6d3aa01a77f60788abc4a99fc71c93fa436c42c",
         "registry.py": "3b2af8b8786ea03fd593cbf3076f926799a274fa",
         "datafree/synthesis/nayer.py": "facf56d6951f372afcc9c6f3fd562d787db09116",
         "datafree/hooks.py": "ab113d010aa4c1f75c64c9c1075e7351b9066122",
         "datafree/criterions.py": "2300005c683a9561dfa6f5c7c7bbd07ad4e3bacc",
         "datafree/models/generator.py": "aa47c142b1c605f3ec6835385f2bd69fa8b49e50",
         "datafree/models/classifiers/wresnet.py": "2f37676dc13ab50533fc8c688dffc4c43ef5f2a9",
         "datafree/utils/_utils.py": "1fa6280f6f164e1ba1beba9c482334b046c1ae5d",
         "label_embedding/cifar10_le.pickle": "29ef311b525b6ac2bc94826e0d735f069ca19e13"}
COMMAND = "python scripts/trace/nayer.py --official CHECKOUT"
NAME = "nayer_cifar10"

EPOCHS = 2  # official epochs traced: the warm-up epoch, then one with L_adv and KD
WARMUP = 1
G_LOOPS = GWP_LOOPS = 2  # batches per epoch (official g_loops 2, gwp_loops 10)
G_STEPS = 2
KD_STEPS = 2
BATCH = 3  # the KD batch (official 512)
SYNTHESIS_BATCH = 10  # one image of each class: one noisy layer (official 400)
LE_EMB_SIZE = 2
NGF = 1
PADDING = 4
BATCHES = WARMUP * GWP_LOOPS + (EPOCHS - WARMUP) * G_LOOPS
TEACHER = {"registry": "model", "family": "wrn", "depth": 10, "widen_factor": 2, "base_widths": [2, 3, 4]}
STUDENT = {"registry": "model", "family": "wrn", "depth": 10, "widen_factor": 1, "base_widths": [2, 3, 4]}
ARCHITECTURES = {"trace_wrn10_2": TEACHER, "trace_wrn10_1": STUDENT}
TEACHER_SEED = 14
"""The random teacher whose argmax the student shares on some images in 3 of the 4 adversarial steps -- both of
the batch whose L_adv sees the student in train mode -- so that L_adv's masked term and its gradient through the
student are not zero there (with the default seed 1 the train-mode steps' masks are empty)."""
WHY_SMALL = "a trace must stay well under 1 MB; the step's arithmetic does not depend on the sizes"


def meta() -> dict:
    engine_warmup = WARMUP * GWP_LOOPS // G_LOOPS
    train = dict(epochs=100 + engine_warmup, generator_steps=G_LOOPS * G_STEPS, student_steps=KD_STEPS,
                 batch_size=BATCH, student_warmup_epochs=engine_warmup, drift_every=0)
    params = dict(synthesis_steps=G_STEPS, synthesis_batch_size=SYNTHESIS_BATCH, warmup=WARMUP, gwp_loops=GWP_LOOPS,
                  le_emb_size=LE_EMB_SIZE, ngf=NGF, memory_size=SYNTHESIS_BATCH * BATCHES)
    why = {"networks": WHY_SMALL, "batch_size": f"{WHY_SMALL} (the KD batch, official 512)",
           "synthesis_batch_size": f"{WHY_SMALL}: one image of each of the 10 classes, one noisy layer (official "
                                   f"400: 40 of each class, 40 noisy layers; 400 mod 10 = 0 random labels as here)",
           "le_emb_size": f"{WHY_SMALL} (the noisy layer's width, official 1000)", "ngf": f"{WHY_SMALL} (official 64)",
           "generator_steps": f"g_loops {G_LOOPS} x g_steps {G_STEPS} (official 2 x 30)",
           "synthesis_steps": f"g_steps {G_STEPS} (official 30)",
           "student_steps": f"{WHY_SMALL} (kd_steps = ep_steps {KD_STEPS}, official 400)",
           "student_warmup_epochs": f"warmup {WARMUP} epoch of gwp_loops {GWP_LOOPS} batches = {engine_warmup} "
                                    f"iteration of g_loops {G_LOOPS} (official 20 x 10 = 100 x 2)",
           "warmup": f"warmup {WARMUP} (official 20)", "gwp_loops": f"gwp_loops {GWP_LOOPS} (official 10)",
           "epochs": f"the official cosine's T_max is epochs - warmup = 100 as in the protocol (120 - 20): official "
                     f"--epochs {100 + WARMUP}, the engine's {100 + engine_warmup}",
           "memory_size": f"the {SYNTHESIS_BATCH * BATCHES} images the trace writes (the official pool is unbounded)",
           "drift_every": "no measurement during a trace"}
    config, sized = common.protocol_config(
        "nayer", "cifar10", architectures=ARCHITECTURES, teacher_arch="trace_wrn10_2", student_arch="trace_wrn10_1",
        train=train, params=params, why=why)
    return {
        "method": "nayer",
        "official": {"repo": REPO, "commit": COMMIT, "entry": "datafree_kd.py main() -> NAYER.synthesize(), train()"},
        "command": COMMAND,
        "config": config,
        "trace_sized": sized,
        "architectures": ARCHITECTURES,
        "schedule": ["iteration"] * EPOCHS,
        "load": ["student/"],
        "uncompared": {
            "method/counters/": "the suite's count of synthetic and pool images (a budget record, no arithmetic)",
            "method/steps_on_batch": "the suite's count of steps on the batch in progress (the official loop index it); "
                                     "its effect, when a batch joins the pool, is compared in method/pool/",
            "method/batches_done": "the suite's count of finished batches (the official ep and gs); its effects -- "
                                   "L_adv after the warm-up, the student's mode, G's replacement -- are compared in "
                                   "the losses, the student's buffers and method/batch/",
            "method/best_loss": "the lowest synthesis loss of the batch (the official best_cost): compared as the "
                                "losses it is the minimum of",
            "method/best_images": "the lowest-loss iterate (the official best_inputs): compared where it acts, as "
                                  "the pool's images after the batch (method/pool/images, uint8)",
        },
        "alignments": {
            "views": "the teacher's (and student's) view in synthesis: the suite's random_views on the suite's draws "
                     "(CHOSEN: sub-pixel shifts up to 4 px, bilinear, and flips) replaces the official kornia "
                     "RandomCrop(32, padding=4) + RandomHorizontalFlip (integer shifts); the official normalizer "
                     "follows",
            "batch set-up draws": "the official NLGenerator.reinit() (PyTorch's default initialisation: each Linear / "
                                  "conv weight and bias uniform_, in construction order), re_init_le() (normal_) and "
                                  "generate_ys() (torch.randint, drawn even for 0 labels) are given the suite's draws: "
                                  "uniform_(a, b) / normal_(m, s) return u (b - a) + a / z s + m of the suite's u / z, "
                                  "what those kernels compute",
            "next batch": "the engine sets batch k+1 up (G's replacement when due, the noisy layer, the labels, a fresh "
                          "Adam) when batch k ends, inside its last step and before the KD steps; the official loop "
                          "when it starts it. The draws are handed out in the engine's order; the state recorded from "
                          "batch k's last step until batch k+1's first is the batch the official loop starts from next "
                          "(built by the official reinit() / re_init_le() / generate_ys() on those draws), and batch "
                          "k's last step is recorded once the official loop has added it to the pool and updated the "
                          "bn_mmt average. The official loop is run into the epoch after the last traced one until its "
                          "first synthesis draw, and must have consumed exactly the draws taken ahead",
            "pool order": "the official DataLoader's shuffle is given the suite's draws: per KD step the image "
                          "indices (with replacement, mapped to the PNG files in the order written), then each "
                          "image's crop rows, crop columns and flip, returned by the torch.randint / torch.rand "
                          "calls of the official transform (RandomCrop(32, padding=4), RandomHorizontalFlip); the "
                          "images are the official PNG files through the official transform",
            "label embedding": "the official label_embedding/cifar10_le.pickle (CLIP ViT-B/32, float16), equal to the "
                               "suite's clip-cifar10.pt, in float64 on both sides",
            "networks": f"the official WideResNet with widths 16/32/64 scaled to {TEACHER['base_widths']} and depth 10 "
                        f"(teacher widen 2, student widen 1), the official NLGenerator with ngf {NGF} (64) and "
                        f"le_emb_size {LE_EMB_SIZE} (1000); a random teacher (seed {TEACHER_SEED}: L_adv's mask not "
                        f"empty in 3 of the 4 adversarial steps)",
            "sizes": f"synthesis batch {SYNTHESIS_BATCH} (400), KD batch {BATCH} (512), g_steps {G_STEPS} (30), "
                     f"kd_steps = ep_steps {KD_STEPS} (400), warmup {WARMUP} (20), gwp_loops {GWP_LOOPS} (10), "
                     f"g_loops {G_LOOPS} and g_life 10 as published, {EPOCHS} epochs traced; the official T_max "
                     f"100 (120 - 20) kept by --epochs {100 + WARMUP}",
            "float64": "default dtype float64 on both sides",
        },
        "patches": {
            "imports": "kornia (replaced: see alignments), termcolor, torchvision.models.utils, wandb (no-op init and "
                       "log) and xlsxwriter stubbed",
            "script bug": "datafree_kd.py's --method choices are ['nldf'] while its code runs only 'nayer': 'nayer' "
                          "added to the choices (the script's --method nayer)",
            "cpu": "the parsed --gpu 0 becomes None (.to(args.gpu) a no-op); .cuda() of tensors and modules "
                   "(NLGenerator.reinit) returns the object",
            "data": "registry's CIFAR-10 data set holds no images (the official train transform kept); the evaluator "
                    "returns 0; the teacher checkpoint is the trace's teacher; the label embedding is read from a "
                    "float64 copy; paths in a temporary folder",
            "sizes": f"NLGenerator gets ngf {NGF}; registry.get_model returns the trace-sized official WRNs; the "
                     "suite's initial student copied into the official one before the first draw",
        },
    }


def generator_suite_name(key: str) -> str:
    """An official NLGenerator state key in the suite's NoisyLayerGenerator names."""
    key = re.sub(r"^le1\.", "noisy.", key)
    key = re.sub(r"^l1\.0\.", "l1.", key)
    return re.sub(r"^conv_blocks\.", "body.", key)


class _Planner:
    """The suite's draws, handed to the official loop in the engine's order (see the module doc)."""

    def __init__(self, trace: Trace, rng: torch.Generator, on_first):
        self.draw = suite_draws(trace, rng)
        self.on_first = on_first
        self.started = False
        self.queue: list[tuple[str, torch.Tensor]] = []  # a batch's set-up, drawn ahead
        self.ahead = False
        self.done = False  # the traced epochs are over: the next synthesis draw ends the run
        self.finished = False

    def setup(self, kind: str, shape: tuple[int, ...], high: int | None = None) -> torch.Tensor:
        """A draw of a batch's set-up (reinit, re_init_le, generate_ys): drawn ahead, or now."""
        if not self.started:
            self.started = True
            self.on_first()
        if self.ahead:
            value = self.draw(kind, tuple(shape), high)
            self.queue.append((kind, value))
            return value.clone()
        if self.queue:
            queued_kind, value = self.queue.pop(0)
            if queued_kind != kind or tuple(value.shape) != tuple(shape):
                raise RuntimeError(f"the official loop drew {kind} {list(shape)} where the engine drew "
                                   f"{queued_kind} {list(value.shape)} ahead")
            return value.clone()
        return self.draw(kind, tuple(shape), high)

    def fresh(self, kind: str, shape: tuple[int, ...], high: int | None = None) -> torch.Tensor:
        """A draw of the pool's order (KD), taken when the official code needs it."""
        return self.draw(kind, tuple(shape), high)

    def view(self, kind: str, shape: tuple[int, ...], high: int | None = None) -> torch.Tensor:
        """A draw of a synthesis step's view: its batch is set up, so every set-up draw taken ahead is used."""
        if self.queue:
            raise RuntimeError(f"the official loop took a synthesis step without the set-up draws taken ahead "
                               f"({[k for k, _ in self.queue]})")
        if self.done:
            self.finished = True
            raise common.TraceDone
        return self.draw(kind, tuple(shape), high)

    @contextlib.contextmanager
    def drawing_ahead(self):
        self.ahead = True
        try:
            yield
        finally:
            self.ahead = False

    # what the official code calls
    def uniform_(self, tensor: torch.Tensor, low: float = 0.0, high: float = 1.0, *, generator=None) -> torch.Tensor:
        value = self.setup("rand", tuple(tensor.shape)).to(tensor)
        with torch.no_grad():
            return tensor.copy_(value * (high - low) + low)

    def normal_(self, tensor: torch.Tensor, mean: float = 0.0, std: float = 1.0, *, generator=None) -> torch.Tensor:
        value = self.setup("randn", tuple(tensor.shape)).to(tensor)
        with torch.no_grad():
            return tensor.copy_(value * std + mean)

    def randint(self, *args, low=0, high=None, size=None, **kwargs) -> torch.Tensor:
        if len(args) == 3:
            low, high, size = args
        elif len(args) == 2:
            high, size = args
        if low != 0:
            raise RuntimeError("the traced loop draws torch.randint(high, size) only")
        return self.setup("randint", tuple(size), high)


def official_embedding(checkout: Path) -> torch.Tensor:
    """The official CIFAR-10 label embedding (read with an unpickler that admits only a tensor), checked equal to
    the one the suite ships, as float64."""
    sys.path.insert(0, str(common.REPO / "scripts"))
    from nayer_label_embeddings import _TensorOnly

    from dfkd_bench.methods.nayer import label_embedding

    data = (checkout / "label_embedding" / "cifar10_le.pickle").read_bytes()
    official = _TensorOnly(io.BytesIO(data)).load().detach().cpu()
    shipped, _ = label_embedding("clip", "cifar10", 10)
    if not torch.equal(official.float(), shipped):
        raise SystemExit("error: methods/nayer_label_embeddings/clip-cifar10.pt differs from the official pickle; "
                         "regenerate it with scripts/nayer_label_embeddings.py official")
    return official.to(torch.float64)


def trace(checkout: Path) -> Trace:
    common.check_checkout(checkout, REPO, COMMIT, FILES)
    spec = meta()
    teacher = common.random_wrn_teacher(TEACHER, seed=TEACHER_SEED)
    with tempfile.TemporaryDirectory(prefix="nayer-trace-") as tmp, \
            common.suite_start(spec, teacher, Path(tmp)) as suite:
        student_shapes = {k: v.shape for k, v in suite.student_module.model.state_dict().items()}
        student_names = common.parameter_names(suite.student_module.model)
        initial_student = {k: v.clone() for k, v in suite.student_module.model.state_dict().items()}
        embedding = official_embedding(checkout)
        (Path(tmp) / "label_embedding").mkdir()
        (Path(tmp) / "label_embedding" / "cifar10_le.pickle").write_bytes(pickle.dumps(embedding))

        common.stub_datafree_imports(wandb={"init": lambda *a, **k: None, "log": lambda *a, **k: None},
                                     xlsxwriter={})
        sys.path.insert(0, str(checkout))
        import datafree
        import datafree.models.generator as official_generator
        import datafree.synthesis.nayer as official_nayer
        import datafree_kd
        import registry

        wresnet = common.load_official_module(checkout / "datafree" / "models" / "classifiers" / "wresnet.py",
                                              "nayer_official_wresnet_scaled",
                                              {"WideResNet": dict(zip(common.WRN_OFFICIAL_WIDTHS,
                                                                      TEACHER["base_widths"]))})
        official_teacher = {common.wrn_official_name(k): v for k, v in teacher.items()}
        real_adam, real_sgd = torch.optim.Adam, torch.optim.SGD
        NLGenerator = official_generator.NLGenerator
        real_reinit, real_re_init_le = NLGenerator.reinit, NLGenerator.re_init_le
        nayer_file = Path(official_nayer.__file__).resolve()
        kd_file = Path(datafree_kd.__file__).resolve()

        result = Trace(spec, teacher, {})
        live: dict = {"synth": None, "student": None, "sgd": None, "started": False, "pending": None, "held": None,
                      "evaluations": 0}

        def get_model(name, num_classes, pretrained=False, **kwargs):
            widen = {"wrn40_2": 2, "wrn16_2": 1}[name]
            return wresnet.WideResNet(depth=10, num_classes=num_classes, widen_factor=widen)

        def build_student(name, num_classes, pretrained=False, **kwargs):
            model = get_model(name, num_classes, pretrained)
            if not pretrained:
                live["student"] = model
            return model

        def synthesizer(*args, **kwargs):
            s = official_nayer.NAYER(*args, **kwargs)
            s.aug = lambda x: s.normalizer(random_views(x, None, min_area=1.0, max_shift=float(PADDING),
                                                        draw=planner.view))
            live["synth"] = s
            return s

        def with_suite_draws(method):
            def traced(self, *args, **kwargs):
                with mock.patch.object(torch.Tensor, "uniform_", lambda t, *a, **k: planner.uniform_(t, *a, **k)), \
                        mock.patch.object(torch.Tensor, "normal_", lambda t, *a, **k: planner.normal_(t, *a, **k)):
                    return method(self, *args, **kwargs)
            return traced

        def batch_state() -> dict | None:
            s = live["synth"]
            if live["pending"] is not None:  # between batches: the one the official loop starts from next
                generator, labels = live["pending"]
                optimizer = real_adam([{"params": list(generator.parameters())}], lr=s.lr_g, betas=[0.5, 0.999])
            elif not live["started"]:
                return None  # before the first batch
            else:  # synthesising: the official frame's batch
                v = common.official_frame(nayer_file).f_locals
                generator, labels, optimizer = v["self"].generator, v["targets"], v["optimizer"]
            return {"generator": {generator_suite_name(k): t.detach() for k, t in generator.state_dict().items()},
                    "labels": labels, "optimizer": optimizer.state_dict()}

        def state() -> dict:
            s = live["synth"]
            mmt = None if s.hooks[0].mmt is None else ([h.mmt[0] for h in s.hooks], [h.mmt[1] for h in s.hooks])
            return common.full_state({
                "student": common.renamed(live["student"].state_dict(), common.wrn_suite_name, student_shapes),
                "student_optimizer": common.optimizer_in_suite_order(
                    live["sgd"], live["student"], student_names, common.wrn_official_name, student_shapes),
                "method": {"pool": common.png_pool_state(s.data_pool.root, SYNTHESIS_BATCH * BATCHES),
                           "batch": batch_state(), "bn_momentum": mmt},
            })

        def on_first() -> None:  # inside the first synthesize(), before its first draw: the suite's initial student
            with torch.no_grad():
                live["student"].load_state_dict({common.wrn_official_name(k): v for k, v in initial_student.items()})
            result.initial = state()

        planner = _Planner(result, suite.method_rng, on_first)

        def generator_losses(v) -> dict:
            s = v["self"]
            losses = {"gen_oh": v["loss_oh"], "gen_bn": v["loss_bn"], "gen_loss": v["loss"]}
            if s.adv > 0 and s.ep > s.ep_start:
                losses["gen_adv"] = v["loss_adv"]
            return {k: float(t.detach().reshape(())) for k, t in losses.items()}

        def after_generator_step(*_) -> None:
            v = common.official_frame(nayer_file).f_locals
            losses = generator_losses(v)
            if v["it"] == v["self"].g_steps - 1:
                live["held"] = losses  # recorded when the batch is in the pool (see alignments, "next batch")
            else:
                result.step("generator", losses, state())

        def batch_finished() -> None:
            """The official loop builds its pool loader: the batch is in the pool and bn_mmt updated. Set up the
            batch it starts next, on the draws it will take (ahead), then record the batch's last step."""
            if live["held"] is None:
                return  # main_worker's validation loader
            v = common.official_frame(nayer_file).f_locals
            s = v["self"]
            with planner.drawing_ahead():
                generator = s.generator
                if v["gs"] == v["g_loops"] - 1 and ((s.ep - s.ep_start) % s.g_life == 0 or s.ep % s.g_life == 0):
                    generator = generator.reinit()  # the next synthesize() replaces G first
                else:
                    generator = copy.deepcopy(generator)
                generator.re_init_le()
                targets, _ = s.generate_ys(cr=0.0)
            live["pending"] = (generator, targets)
            result.step("generator", live["held"], state())
            live["held"] = None

        class TracedAdam(real_adam):
            def __init__(self, params, *args, **kwargs):
                super().__init__(params, *args, **kwargs)
                live["started"], live["pending"] = True, None  # a batch starts: its own G and Adam
                self.register_step_post_hook(after_generator_step)

        class TracedSGD(real_sgd):
            def __init__(self, params, *args, **kwargs):
                super().__init__(params, *args, **kwargs)
                live["sgd"] = self
                self.register_step_post_hook(lambda *_: result.step("student", {
                    name: float(common.official_frame(kd_file).f_locals["loss_s"].detach())
                    for name in ("kd_pool", "student_loss")}, state()))

        def evaluator(*args, **kwargs):
            def evaluate(model, device=None):
                live["evaluations"] += 1
                planner.done = live["evaluations"] == EPOCHS - WARMUP
                return {"Acc": (0.0, 0.0), "Loss": 0.0}
            return evaluate

        real_load = torch.load

        def teacher_checkpoint(path, *args, **kwargs):  # the teacher's file; anything else (the pickle's storage) read
            if isinstance(path, str) and path.startswith("checkpoints/pretrained/"):
                return {"state_dict": official_teacher}
            return real_load(path, *args, **kwargs)

        real_parse = datafree_kd.parser.parse_args

        def parse_args(*args, **kwargs):
            parsed = real_parse(*args, **kwargs)
            parsed.gpu = None  # the CPU: .to(None) leaves a tensor where it is
            return parsed

        argv = ["datafree_kd.py", "--batch_size", str(BATCH), "--synthesis_batch_size", str(SYNTHESIS_BATCH),
                "--lr", "0.2", "--gpu", "0", "--warmup", str(WARMUP), "--epochs", str(100 + WARMUP),
                "--dataset", "cifar10", "--method", "nayer", "--lr_g", "4e-3", "--teacher", "wrn40_2",
                "--student", "wrn16_2", "--save_dir", "run/c10w402w162-nayer", "--adv", "1.33", "--bn", "10.0",
                "--oh", "0.5", "--g_steps", str(G_STEPS), "--g_life", "10", "--g_loops", str(G_LOOPS),
                "--gwp_loops", str(GWP_LOOPS), "--log_tag", "c10w402w162-nayer-ep120",
                "--kd_steps", str(KD_STEPS), "--ep_steps", str(KD_STEPS), "--le_emb_size", str(LE_EMB_SIZE)]
        with contextlib.ExitStack() as stack:
            for target, name, value in [
                    (sys, "argv", argv), (datafree_kd.parser, "parse_args", parse_args),
                    (datafree_kd.parser._option_string_actions["--method"], "choices", ["nldf", "nayer"]),
                    (torch, "randint", planner.randint),
                    (torch, "load", teacher_checkpoint),
                    (torch.Tensor, "cuda", lambda self, *a, **k: self), (nn.Module, "cuda", lambda self, *a, **k: self),
                    (torch.optim, "Adam", TracedAdam), (torch.optim, "SGD", TracedSGD),
                    (torch.utils.data, "DataLoader", common.png_pool_loader(planner.fresh, SYNTHESIS_BATCH, PADDING,
                                                                            on_build=batch_finished)),
                    (NLGenerator, "reinit", with_suite_draws(real_reinit)),
                    (NLGenerator, "re_init_le", with_suite_draws(real_re_init_le)),
                    (registry, "get_model", build_student),
                    (registry.datasets, "CIFAR10", lambda root, train=True, download=False, transform=None:
                        SimpleNamespace(transform=transform)),
                    # what datafree_kd.py reaches as datafree.models.generator.NLGenerator, datafree.synthesis.NAYER
                    # and datafree.evaluators (the official modules stay as they are)
                    (datafree_kd, "datafree", common.Proxy(
                        datafree,
                        models=common.Proxy(datafree.models, generator=common.Proxy(
                            official_generator, NLGenerator=lambda **kwargs: NLGenerator(**{**kwargs, "ngf": NGF}))),
                        synthesis=common.Proxy(datafree.synthesis, NAYER=synthesizer),
                        evaluators=common.Proxy(datafree.evaluators, classification_evaluator=evaluator)))]:
                stack.enter_context(mock.patch.object(target, name, value))
            stack.enter_context(contextlib.redirect_stdout(io.StringIO()))  # the official loop prints every step
            common.run_in(Path(tmp), datafree_kd.main)
        if not planner.finished:
            raise SystemExit("error: the official loop ended before the first synthesis draw after the traced epochs")
    return result


def main() -> None:
    common.tracer_main(__doc__, trace, NAME, REPO, COMMIT)


if __name__ == "__main__":
    main()
