"""Trace SpaceshipNet's official loop (skgyu/SpaceshipNet) for the step-equivalence replay
(``results/traces/spaceship_cifar10.pt``).

    python scripts/trace/spaceship.py --official CHECKOUT --datafree DATAFREE

CHECKOUT is a checkout of skgyu/SpaceshipNet at 30a76b0 and DATAFREE one of zju-vipa/CMI at 9e79fa9 (or of any
DataFree-collection repository holding the same ``datafree/models/classifiers/wresnet.py``, e.g. tmtuan1307/NAYER):
SpaceshipNet's ``networks/wresnet_1028_R2.py`` subclasses ``networks.wresnet.WideResNet``, a file the repository
does not ship; its names and constructor (``dropout_rate``) are those of the DataFree collection's WideResNet (the
tracer checks every file it reads against its git blob and refuses others). It runs the official entry point
``code/SpaceshipNet/train/train_cvpr2023.py`` (``TrainOptions().parse()`` of a config, ``create_model`` of
``model_CFE_mSARC_base`` with the V37 functions, the epoch loop with its evaluation and scheduler) on the published
CIFAR-10 config ``scripts/DFKD_Cifar10_ResNet34_ResNet18_V37_conv012.yaml`` made trace-sized -- per epoch ``train_G``
(a fresh Adam over G per batch, the DeepInversion L_bn and the cross-entropy at lambda_cls 0.5, the lowest-loss
iterate's features into three pools) and ``train_S`` (a level and a pool batch, the channel exchange with
probability 0.7, the current G in eval mode decoding, KL at T = 30 with ``nn.KLDivLoss()``'s element mean, the CAM
and Grad-CAM MSEs, the student's SGD, CosineAnnealingLR(200) stepped per epoch) -- from the suite's initial
weights with the suite's random draws, in float64, and replays the trace through the engine. The official loop
runs into the epoch after the last traced one until its first synthesis draw, so that the noise the engine draws
ahead for that batch is checked against the one the official code consumes.

Aligned (stated in the trace's ``alignments``):
* the networks: the official ``wrn_16_2_1028_R2`` / ``wrn_16_1_1028_R2`` (Grad-CAM at the last block of each group,
  CAM on the final BN-ReLU) with depth 10 and the WideResNet's widths 16/32/64 scaled; the published config's
  ResNet18_1028 / ResNet34_1028 live in ``networks/resnet_cifar_1028.py``, which the repository does not ship;
* the augmentations: the official kornia RandomCrop(32, padding=4) + RandomHorizontalFlip (of the teacher's view in
  synthesis and of the student's decoded images) is the suite's ``random_crop_flip`` on the suite's draws (integer
  offsets in [0, 8] of the zero-padded image, rows then columns, and a flip with probability 1/2: what kornia
  computes for those offsets);
* the host draws: the official ``np.random.choice(conv_idx, 1)`` and ``np.random.rand()`` (the level and the CFE
  coin) return the suite's host draws (``host_rng.randrange(3)``, ``host_rng.random()``, from a copy of the suite's
  host generator); each ``np.random.choice(C, C // 2, replace=False)`` of ``channel_mix_feature`` (row i) returns
  the channels the suite keeps in row i (those whose rank in the suite's ``torch.rand`` row is below C // 2);
* the pool's data order: the official DataLoaders (shuffled, without replacement within a pass) are given the
  suite's draws: per student step the pool positions (with replacement), mapped to the lmdb keys in the order
  written;
* the next batch: the engine draws batch k+1's noise when batch k ends (before the student steps), the official
  ``train_G`` when it starts; the draw is handed out in the engine's order and the state recorded during the
  student steps is the batch the official loop starts from next (that noise, the balanced labels, G, a fresh Adam);
* ``generate_input(test=True)`` draws a noise tensor that ``train_G`` discards: it comes from torch's own generator;
* trace size: see ``meta()["alignments"]["sizes"]``.

Patched at run time (never the arithmetic):
* imports: ``kornia`` (augmentations, replaced as above), ``easydict`` (a dict with attribute access: the options),
  ``lmdb`` (an in-memory store: the feature pools stay in memory), ``pickle5`` (the standard ``pickle``, which has
  protocol 5), ``pyarrow``, ``cv2`` and ``h5py`` (imported, not used on this path) are stubbed; ``networks.wresnet``
  is the DataFree collection's wresnet.py (see above);
* CPU: the config's ``gpu_ids`` is empty (``opt.device`` the CPU) and ``Tensor.cuda()`` returns the tensor;
* data and checkpoints: the CIFAR-10 test set is a blank image of each class (the per-epoch evaluation reads it;
  nothing of training depends on it), the teacher's ``pretrained_loc`` is the trace's teacher saved in a temporary
  folder, ``num_workers`` 0, every path in a temporary folder; ``record_batchimg`` and ``record_feature_fuse``
  (image grids for inspection, written with ``make_grid(range=...)``, which torchvision no longer has) do nothing;
* sizes: ``scale_widths`` on the DataFree WideResNet's widths and on the depth of ``wrn_16_*_1028_R2``; the config's
  sizes (batch, g_steps, kd_steps, the generator's ngf and input_dim); the suite's initial student and generator are
  copied into the official ones after ``create_model``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import pickle
import runpy
import sys
import tempfile
import types
from pathlib import Path
from unittest import mock

import numpy as np
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from dfkd_bench.teachers.fast_train import random_crop_flip  # noqa: E402
from dfkd_bench.traces.format import Trace  # noqa: E402
from dfkd_bench.traces.replay import suite_draws  # noqa: E402

REPO = "skgyu/SpaceshipNet"
COMMIT = "30a76b0101efa6a3b2405a9346ff95e16e14cd19"
CODE = "code/SpaceshipNet"
FILES = {f"{CODE}/{path}": blob for path, blob in {
    "train/train_cvpr2023.py": "b962833d2192afa7eae7721b4da9ce10d66d4740",
    "models/model_CFE_mSARC_base.py": "76eb13c7ce2f85da7b1838134c1d863e2d1864e9",
    "models/model_CFE_mSARC_bases/model_CFE_mSARC_base_V37.py": "438e31b8a6c2096dd1ca0d59e489ab14be1aaa20",
    "models/base_model.py": "a6359aa42538c4b6de6ee64cb352626586f45ebb",
    "models/test_functions.py": "1b7a32fa9b622f0fee0077cc36522b005212d7f2",
    "models/models.py": "eacbbc1d79d2ee016c21fca630a2d29232fd2c6b",
    "networks/__init__.py": "c619bb06e15e8a28656fce2d2e553f5aa4b54470",
    "networks/cmi_generator.py": "56a426aa86a8c9204040448e51a322e2ef46ded4",
    "networks/init.py": "56eed4a8771f278c06e1f9e1b2b7efe33043be72",
    "networks/scheduler.py": "05f3ebff06426de4284e8cd5808c99cc593c41c3",
    "networks/wresnet_1028_R2.py": "940d4c1ba7a6108d506b4d4f0af6297aca0218f5",
    "options/base_options.py": "673b4a8a3dfdab75a6688a031896b8cf923fcc37",
    "options/train_options.py": "368ac9be008fcb0cc7249eca6672b8e3bab0a6a4",
    "skyu_tools/net_magnifier.py": "b544057247a175c8ce5bb9202319b41652da9f5e",
    "skyu_tools/skyu_util.py": "1c56cdb3d8b8913d2f203e199949e608826c2743",
    "datafree/utils/_utils.py": "ad82227d9bc6dce35211845d1706d3e1aadef6ea",
    "data/lmdbDataset.py": "05f90f2c621098cb9813fac52dd7a5182093876b",
    "scripts/DFKD_Cifar10_ResNet34_ResNet18_V37_conv012.yaml": "65524e2613a82641e1711ae0947f1764c5114e0d",
}.items()}
DATAFREE_REPO = "zju-vipa/CMI"
DATAFREE_COMMIT = "9e79fa9e2328205f26dbdb226878f3a28f3bf4cc"
DATAFREE_WRESNET = "datafree/models/classifiers/wresnet.py"
DATAFREE_FILES = {DATAFREE_WRESNET: "2f37676dc13ab50533fc8c688dffc4c43ef5f2a9"}
CONFIG = f"{CODE}/scripts/DFKD_Cifar10_ResNet34_ResNet18_V37_conv012.yaml"
COMMAND = "python scripts/trace/spaceship.py --official CHECKOUT --datafree DATAFREE"
NAME = "spaceship_cifar10"

EPOCHS = 2
G_STEPS = 3
KD_STEPS = 4
BATCH = 4
NOISE = 3
NGF = 1
PADDING = 4
TEACHER = {"registry": "model", "family": "wrn", "depth": 10, "widen_factor": 2, "base_widths": [2, 3, 4]}
STUDENT = {"registry": "model", "family": "wrn", "depth": 10, "widen_factor": 1, "base_widths": [2, 3, 4]}
GENERATOR = {"registry": "generator", "family": "datafree_generator", "ngf": NGF}
ARCHITECTURES = {"trace_wrn10_2": TEACHER, "trace_wrn10_1": STUDENT, "trace_datafree_gen": GENERATOR}
TEACHER_SEED = 1
WHY_SMALL = "a trace must stay well under 1 MB; the step's arithmetic does not depend on the sizes"


def meta() -> dict:
    train = dict(generator_steps=G_STEPS, student_steps=KD_STEPS, batch_size=BATCH, drift_every=0)
    params = dict(generator="trace_datafree_gen", noise_dim=NOISE, synthesis_steps=G_STEPS,
                  memory_size=BATCH * EPOCHS)
    why = {"networks": WHY_SMALL, "batch_size": f"{WHY_SMALL} (official 256)",
           "generator": f"{WHY_SMALL} (CMIGeneratorV3 with ngf {NGF}, official 64)",
           "noise_dim": f"{WHY_SMALL} (input_dim, official 256)",
           "generator_steps": f"g_steps {G_STEPS} (official 200)",
           "synthesis_steps": f"g_steps {G_STEPS} (official 200)",
           "student_steps": f"kd_steps {KD_STEPS} (official 2000)",
           "memory_size": f"the {BATCH * EPOCHS} images the trace writes (the official pools are unbounded)",
           "drift_every": "no measurement during a trace"}
    config, sized = common.protocol_config(
        "spaceship", "cifar10", architectures=ARCHITECTURES, teacher_arch="trace_wrn10_2",
        student_arch="trace_wrn10_1", train=train, params=params, why=why)
    return {
        "method": "spaceship",
        "official": {"repo": REPO, "commit": COMMIT,
                     "entry": f"{CODE}/train/train_cvpr2023.py -> model_CFE_mSARC_base_V37 train_G(), train_S()"},
        "command": COMMAND,
        "config": config,
        "trace_sized": sized,
        "architectures": ARCHITECTURES,
        "schedule": ["iteration"] * EPOCHS,
        "load": ["student/"],
        "uncompared": {
            "method/counters/": "the suite's count of synthetic and pool images (a budget record, no arithmetic)",
            "method/steps_on_batch": "the suite's count of steps on the batch in progress (the official loop index); "
                                     "its effect, when a batch joins the pools, is compared in method/pool/ and "
                                     "method/banks/",
            "method/batches_done": "the suite's count of finished batches (the official epoch)",
            "method/best_loss": "the lowest synthesis loss of the batch (the official best_cost): compared as the "
                                "losses it is the minimum of",
            "method/best_images": "the lowest-loss iterate's images (the official best_inputs): compared where they "
                                  "act, as the image pool after the batch (method/pool/images)",
            "method/host_rng": "the suite's host generator of the level and the CFE coin: its draws are handed to the "
                               "official np.random calls and compared where they act (the pool batch, the exchange)",
        },
        "alignments": {
            "networks": f"the official wrn_16_2_1028_R2 (teacher) and wrn_16_1_1028_R2 (student) with depth 10 and "
                        f"the DataFree WideResNet's widths 16/32/64 scaled to {TEACHER['base_widths']} (the published "
                        f"config's ResNet18_1028 / ResNet34_1028 are in networks/resnet_cifar_1028.py, which the "
                        f"repository does not ship; networks.wresnet, which wresnet_1028_R2.py subclasses and the "
                        f"repository does not ship either, is the DataFree collection's {DATAFREE_WRESNET} at "
                        f"{DATAFREE_REPO}@{DATAFREE_COMMIT[:7]}); the official CMIGeneratorV3 with ngf {NGF} (64); a "
                        f"random teacher",
            "augmentations": "the official kornia RandomCrop(32, padding=4) + RandomHorizontalFlip of the teacher's "
                             "view in train_G and of the student's decoded images in train_S is the suite's "
                             "random_crop_flip on the suite's draws: integer offsets in [0, 8] of the zero-padded "
                             "image (rows, then columns) and a flip with probability 1/2, what kornia computes for "
                             "those offsets",
            "host draws": "np.random.choice(conv_idx, 1) and np.random.rand() (the level, the CFE coin) return the "
                          "suite's host draws (host_rng.randrange(3), host_rng.random(), from a copy of the suite's "
                          "host generator); np.random.choice(C, C // 2, replace=False) of row i in channel_mix_batch "
                          "returns the channels the suite keeps in row i (rank below C // 2 in its torch.rand row)",
            "pool order": "the official DataLoaders over the three lmdb pools (shuffled, without replacement within a "
                          "pass, re-created after each synthesis) are given the suite's draws: per student step the "
                          "pool positions (uniform with replacement), mapped to the lmdb keys in the order written",
            "next batch": "the engine draws batch k+1's noise when batch k ends, before the student steps; the "
                          "official train_G when it starts. The draw is handed out in the engine's order, and the "
                          "state recorded during the student steps is the batch the official loop starts from next "
                          "(that noise, the balanced labels of generate_input(test=True), G, a fresh Adam). The "
                          "official loop is run into the epoch after the last traced one until its first synthesis "
                          "draw, and must have consumed exactly the draws taken ahead",
            "discarded noise": "generate_input(test=True) also draws torch.randn((batch, input_dim - classes)), "
                               "which train_G discards: it comes from torch's own generator",
            "pool images": "the official pools store the images as floats (never trained on); the suite's image pool "
                           "(uint8, its pool_rounding) is compared with the official floats rounded the same way",
            "sizes": f"batch {BATCH} (256), g_steps {G_STEPS} (200), kd_steps {KD_STEPS} (2000), input_dim {NOISE} "
                     f"(256), ngf {NGF} (64), {EPOCHS} epochs traced of max_epoch 199 (CosineAnnealingLR T_max 200 "
                     f"as published)",
            "float64": "default dtype float64 on both sides",
        },
        "patches": {
            "imports": "kornia (replaced: see alignments), easydict (a dict with attribute access), lmdb (an in-memory "
                       "store: the pools stay in memory), pickle5 (the standard pickle), pyarrow, cv2 and h5py "
                       "(imported, unused on this path) stubbed; networks.wresnet supplied (see alignments)",
            "cpu": "the config's gpu_ids is empty (opt.device the CPU); Tensor.cuda() returns the tensor",
            "data": "the CIFAR-10 test set is a blank image of each class (the per-epoch evaluation; nothing of "
                    "training reads it); the teacher's pretrained_loc is the trace's teacher in a temporary folder; "
                    "num_workers 0; record_batchimg and record_feature_fuse (image grids for inspection, written with "
                    "make_grid(range=...), gone from torchvision) do nothing; paths in a temporary folder",
            "sizes": "scale_widths on the DataFree WideResNet's widths and the depth of wrn_16_*_1028_R2; the "
                     "config's batch_size, g_steps, kd_steps, generator ngf and input_dim; the suite's initial "
                     "student and generator copied into the official ones after create_model",
        },
    }


# ------------------------------------------------------------------ stubs ---

class EasyDict(dict):
    """What the official options need of ``easydict.EasyDict``: a dict whose items are attributes, nested
    dicts (also inside lists) converted."""

    def __init__(self, d=None, **kwargs):
        super().__init__()
        for key, value in {**(d or {}), **kwargs}.items():
            setattr(self, key, value)

    def __setattr__(self, name, value):
        if isinstance(value, (list, tuple)):
            value = type(value)(EasyDict(x) if isinstance(x, dict) else x for x in value)
        elif isinstance(value, dict) and not isinstance(value, EasyDict):
            value = EasyDict(value)
        super().__setattr__(name, value)
        super().__setitem__(name, value)

    __setitem__ = __setattr__


class _MemoryTxn:
    def __init__(self, store: dict):
        self.store = store

    def put(self, key: bytes, value: bytes) -> None:
        self.store[bytes(key)] = bytes(value)

    def get(self, key: bytes):
        return self.store.get(bytes(key))

    def stat(self) -> dict:
        return {"entries": len(self.store)}

    def commit(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *args):
        return False


class MemoryEnv:
    """``lmdb.open(path)``: a store in memory (the pools of a trace)."""

    stores: dict[str, dict] = {}

    def __init__(self, path, **kwargs):
        self.path = str(path)
        self.store = MemoryEnv.stores.setdefault(self.path, {})

    def begin(self, write: bool = False) -> _MemoryTxn:
        return _MemoryTxn(self.store)

    def sync(self) -> None:
        pass


def stub_imports() -> None:
    import pandas  # noqa: F401  (imported by the official modules; before the pyarrow stub, which it would read)

    common.stub_datafree_imports(easydict={"EasyDict": EasyDict}, lmdb={"open": MemoryEnv},
                                 pickle5={"dumps": pickle.dumps, "loads": pickle.loads}, pyarrow={}, cv2={},
                                 h5py={})


class BlankTestSet(torch.utils.data.Dataset):
    """The CIFAR-10 test set of the per-epoch evaluation: a blank image of each class (nothing of training reads
    it; the official per-class accuracy divides by each class's count)."""

    def __init__(self, *args, **kwargs):
        pass

    def __len__(self) -> int:
        return 10

    def __getitem__(self, index):
        return {"image": torch.zeros(3, 32, 32), "label": index}


# ------------------------------------------------------------------ draws ---

class _Planner:
    """The suite's draws, handed to the official loop in the engine's order (see the module doc)."""

    def __init__(self, trace: Trace, rng: torch.Generator, host):
        self.draw = suite_draws(trace, rng)
        self.host = host  # a copy of the suite's host generator
        self.queue: list[torch.Tensor] = []  # the next batch's noise, drawn ahead
        self.rows: list[set[int]] = []  # the channels the suite keeps, per row of the batch being exchanged
        self.done = False  # the traced epochs are over: the next synthesis draw ends the run
        self.finished = False

    def noise(self, shape: tuple[int, ...]) -> torch.Tensor:
        if self.queue:
            value = self.queue.pop(0)
            if tuple(value.shape) != tuple(shape):
                raise RuntimeError(f"the official loop drew noise {list(shape)}, the engine {list(value.shape)}")
            return value.clone()
        return self.draw("randn", tuple(shape)).clone()

    def ahead(self, shape: tuple[int, ...]) -> None:
        if self.queue:
            raise RuntimeError("a batch's noise was drawn ahead twice")
        self.queue.append(self.draw("randn", tuple(shape)))

    def fresh(self, kind: str, shape: tuple[int, ...], high: int | None = None) -> torch.Tensor:
        return self.draw(kind, tuple(shape), high)

    def synthesis_view(self, kind: str, shape: tuple[int, ...], high: int | None = None) -> torch.Tensor:
        if self.queue:
            raise RuntimeError("the official loop took a synthesis step without the noise drawn ahead")
        if self.done:
            self.finished = True
            raise common.TraceDone
        return self.draw(kind, tuple(shape), high)

    # numpy's draws in the V37 functions
    def choice(self, a, size=None, replace=True, p=None):
        if isinstance(a, (list, tuple)):  # the level: np.random.choice(opt.conv_idx, 1)
            if size != 1 or p is not None:
                raise RuntimeError(f"unexpected np.random.choice({a}, {size})")
            return np.array([a[self.host.randrange(len(a))]])
        channels, keep = int(a), int(size)  # channel_mix_feature: np.random.choice(nc, nc // 2, replace=False)
        if replace or keep != channels // 2:
            raise RuntimeError(f"unexpected np.random.choice({a}, {size}, replace={replace})")
        if not self.rows:
            raise RuntimeError("channel_mix_feature without a batch being exchanged")
        kept = sorted(self.rows.pop(0))
        return np.array(kept, dtype=np.int64)

    def rand(self, *shape):
        if shape:
            raise RuntimeError("unexpected np.random.rand with a shape")
        return self.host.random()

    def exchange(self, features: torch.Tensor) -> None:
        """Before channel_mix_batch: the suite's torch.rand of the batch, as the set of kept channels per row."""
        rows, channels = features.shape[:2]
        ranks = self.draw("rand", (rows, channels)).argsort(dim=1).argsort(dim=1)
        self.rows = [set(torch.nonzero(ranks[i] < channels // 2).flatten().tolist()) for i in range(rows)]


def pool_loader(planner: _Planner, lmdb_dataset: type, on_build) -> type:
    """``torch.utils.data.DataLoader``: over an official lmdb pool, the suite's positions per batch (default
    collation); anything else (the test set) the real DataLoader."""
    real = torch.utils.data.DataLoader

    class TraceLoader:
        def __new__(cls, dataset, *args, **kwargs):
            if not isinstance(dataset, lmdb_dataset):
                return real(dataset, *args, **kwargs)
            return super().__new__(cls)

        def __init__(self, dataset, batch_size=1, **kwargs):
            self.dataset, self.batch_size = dataset, batch_size
            on_build()

        def __iter__(self):
            while True:
                index = planner.fresh("randint", (self.batch_size,), len(self.dataset))
                yield torch.utils.data.default_collate([self.dataset[i] for i in index.tolist()])

    return TraceLoader


# ------------------------------------------------------------------ trace ---

def trace_config(checkout: Path, folder: Path, teacher_path: Path) -> Path:
    """The published CIFAR-10 config made trace-sized (and CPU, temporary paths): written to ``folder``."""
    config = yaml.safe_load((checkout / CONFIG).read_text())
    config.update(gpu_ids=[], dataroot=str(folder / "dataset"), g_steps=G_STEPS, kd_steps=KD_STEPS, batch_size=BATCH,
                  num_workers=0)
    config["generator"].update(ngf=NGF, input_dim=NOISE)
    config["student_net"].update(arc="wrn_16_1_1028_R2")
    config["teacher_net"].update(arc="wrn_16_2_1028_R2", pretrained_loc=str(teacher_path))
    path = folder / Path(CONFIG).name
    path.write_text(yaml.safe_dump(config))
    return path


def trace(checkout: Path, datafree: Path) -> Trace:
    import random

    common.check_checkout(checkout, REPO, COMMIT, FILES)
    common.check_checkout(datafree, DATAFREE_REPO, DATAFREE_COMMIT, DATAFREE_FILES)
    spec = meta()
    teacher = common.random_wrn_teacher(TEACHER, seed=TEACHER_SEED)
    code = checkout / CODE
    with tempfile.TemporaryDirectory(prefix="spaceship-trace-") as tmp, \
            common.suite_start(spec, teacher, Path(tmp)) as suite:
        student_shapes = {k: v.shape for k, v in suite.student_module.model.state_dict().items()}
        student_names = common.parameter_names(suite.student_module.model)
        initial_student = {k: v.clone() for k, v in suite.student_module.model.state_dict().items()}
        initial_generator = {k: v.clone() for k, v in suite.method.generator.state_dict().items()}
        rounding = spec["config"]["params"].get("pool_rounding", "nearest")
        bank_shapes = [tuple(bank.images.shape[1:]) for bank in suite.method.banks]
        host = random.Random()
        host.setstate(suite.method.host_rng.getstate())
        teacher_path = Path(tmp) / "teacher.pth"
        torch.save({common.wrn_official_name(k): v for k, v in teacher.items()}, teacher_path)
        config_path = trace_config(checkout, Path(tmp), teacher_path)

        stub_imports()
        # the official datafree/ is a namespace package: the tracers' folder (scripts/trace/datafree.py) must not
        # shadow it
        sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != Path(__file__).resolve().parent]
        sys.path.insert(0, str(code))
        import data.cifar10Dataset
        import data.lmdbDataset
        import models.model_CFE_mSARC_bases.model_CFE_mSARC_base_V37 as v37
        import models.models
        import networks

        depth = {16: TEACHER["depth"]}
        wresnet = common.load_official_module(datafree / DATAFREE_WRESNET, "networks.wresnet",
                                              {"WideResNet": dict(zip(common.WRN_OFFICIAL_WIDTHS,
                                                                      TEACHER["base_widths"]))})
        networks.wresnet = wresnet
        common.load_official_module(code / "networks" / "wresnet_1028_R2.py", "networks.wresnet_1028_R2",
                                    {"wrn_16_1_1028_R2": depth, "wrn_16_2_1028_R2": depth})
        v37_file = Path(v37.__file__).resolve()

        real_adam = torch.optim.Adam
        result = Trace(spec, teacher, {})
        planner = _Planner(result, suite.method_rng, host)
        live: dict = {"trainer": None, "student_steps": 0, "in_batch": False}

        def generator_key(key: str) -> str:  # CMIGeneratorV3 -> the suite's DataFreeGenerator
            layer, _, rest = key.partition(".")
            index = {"layer1": "0", "conv_layer1": "2", "conv_layer2": "6", "conv_layer3": "9"}
            if layer == "l1":
                return key
            block, _, leaf = rest.partition(".")
            if layer == "layer1":
                return f"conv_blocks.0.{rest}"
            return f"conv_blocks.{int(index[layer]) + int(block)}.{leaf}"

        def official_generator_state(generator) -> dict:
            return {generator_key(k): v.detach() for k, v in generator.state_dict().items()}

        def pools(t) -> dict:
            out = {}
            banks = []
            for level in range(3):
                store = MemoryEnv.stores.get(getattr(t, f"data_pool{level}").lmdb_path, {})
                keys = pickle.loads(store[b"__keys__"]) if b"__keys__" in store else []
                entries = [pickle.loads(store[key.encode("ascii")]) for key in keys]
                if entries:
                    features = torch.stack([torch.as_tensor(f) for f, _, _ in entries])
                    banks.append({"images": features, "next_slot": len(entries) % (BATCH * EPOCHS),
                                  "size": len(entries)})
                    if level == 0:
                        scaled = torch.stack([torch.as_tensor(i) for _, _, i in entries]).clamp(0, 1) * 255
                        images = (scaled.floor() if rounding == "floor" else scaled.round()).to(torch.uint8)
                        out["pool"] = {"images": images, "next_slot": len(entries) % (BATCH * EPOCHS),
                                       "size": len(entries)}
                else:
                    banks.append({"images": torch.zeros((0, *bank_shapes[level])), "next_slot": 0, "size": 0})
            out.setdefault("pool", {"images": torch.zeros((0, 3, 32, 32), dtype=torch.uint8), "next_slot": 0,
                                    "size": 0})
            out["banks"] = banks
            return out

        def batch_state(t) -> tuple[dict | None, list | None]:
            if live["in_batch"]:  # synthesising: the official frame's batch
                v = common.official_frame(v37_file).f_locals
                batch = {"generator": official_generator_state(t.generator), "z": v["z"].detach(),
                         "labels": t.labels, "optimizer": v["optimizer"].state_dict()}
                return batch, v.get("best_conv_out")
            if not planner.queue:
                return None, None  # before the first batch
            # between batches: the one the official loop starts from next (see alignments, "next batch")
            labels = torch.tensor([i % 10 for i in range(BATCH)])  # generate_input(test=True) for 10 classes
            fresh = real_adam([{"params": [p.detach().clone() for p in t.generator.parameters()]}],
                                     lr=t.opt["optimizer_G"]["lr"][0], betas=[0.5, 0.999])
            return {"generator": official_generator_state(t.generator), "z": planner.queue[0], "labels": labels,
                    "optimizer": fresh.state_dict()}, None

        def state() -> dict:
            t = live["trainer"]
            batch, best = batch_state(t)
            return common.full_state({
                "student": common.renamed(t.student_net.state_dict(), common.wrn_suite_name, student_shapes),
                "student_optimizer": common.optimizer_in_suite_order(
                    t.optimizer_S, t.student_net, student_names, common.wrn_official_name, student_shapes),
                "method": {**pools(t), "batch": batch, "best_features": best},
            })

        def generator_losses(v) -> dict:
            return {"gen_oh": float(v["cls_loss"]) / v["opt"].lambda_cls, "gen_bn": float(v["loss_bn_meanvar"]),
                    "gen_loss": float(v["loss_G"])}

        def student_losses(v) -> dict:
            return {"kd_pool": float(v["kl_loss"]), "msarc_cam": float(v["loss_mSARC_cam_mse"]),
                    "msarc_gradcam": float(v["loss_mSARC_gradcams_mse"]), "student_loss": float(v["loss"])}

        def after_student_step(*_) -> None:
            result.step("student", student_losses(common.official_frame(v37_file).f_locals), state())
            live["student_steps"] += 1
            planner.done = live["student_steps"] == EPOCHS * KD_STEPS

        class TracedAdam(real_adam):  # train_G's optimiser of a batch
            def __init__(self, params, *args, **kwargs):
                super().__init__(params, *args, **kwargs)
                live["in_batch"] = True
                self.register_step_post_hook(lambda *_: result.step(
                    "generator", generator_losses(common.official_frame(v37_file).f_locals), state()))

        real_create = models.models.create_model

        def create_model(opt):
            t = real_create(opt)
            live["trainer"] = t
            with torch.no_grad():
                t.student_net.load_state_dict({common.wrn_official_name(k): v for k, v in initial_student.items()})
                shapes = {generator_key(k): k for k in t.generator.state_dict()}
                t.generator.load_state_dict({shapes[k]: v for k, v in initial_generator.items()})
            t.aug = lambda x: random_crop_flip(x, PADDING, None, draw=(
                planner.synthesis_view if live["in_batch"] else planner.fresh)).contiguous()
            real_mix = t.channel_mix_batch

            def channel_mix_batch(feature, labels):
                planner.exchange(feature)
                out = real_mix(feature, labels)
                if planner.rows:
                    raise RuntimeError("channel_mix_batch left rows of the suite's exchange unused")
                return out

            t.channel_mix_batch = channel_mix_batch
            t.record_batchimg = lambda *a, **k: None
            t.record_feature_fuse = lambda *a, **k: None
            t.optimizer_S.register_step_post_hook(after_student_step)
            result.initial = state()
            return t

        def batch_finished() -> None:
            """The official train_G builds its pool loaders (three per batch): the batch has joined the pools;
            draw the next batch's noise, as the engine does then."""
            if not live["in_batch"]:
                return
            live["in_batch"] = False
            planner.ahead((BATCH, NOISE))

        real_randn = torch.randn

        def randn(*args, **kwargs):
            caller = sys._getframe(1)
            if Path(caller.f_code.co_filename).resolve() == v37_file and caller.f_code.co_name == "train_G":
                size = kwargs.get("size", args[0] if len(args) == 1 else args)
                return planner.noise(tuple(size))
            return real_randn(*args, **kwargs)

        argv = ["train_cvpr2023.py", "--config", str(config_path), "--exps_dir", str(Path(tmp) / "experiments")]
        numpy_random = common.Proxy(np.random, choice=planner.choice, rand=planner.rand)
        with contextlib.ExitStack() as stack:
            for target, name, value in [
                    (sys, "argv", argv), (torch, "randn", randn), (torch.Tensor, "cuda", lambda self, *a, **k: self),
                    (torch.optim, "Adam", TracedAdam),
                    (torch.utils.data, "DataLoader", pool_loader(planner, data.lmdbDataset.LMDBFeatureLabelImageDataset,
                                                                 batch_finished)),
                    (v37, "np", common.Proxy(np, random=numpy_random)),
                    (data.cifar10Dataset, "Cifar10Dataset", BlankTestSet),
                    (models.models, "create_model", create_model)]:
                stack.enter_context(mock.patch.object(target, name, value))
            stack.enter_context(contextlib.redirect_stdout(io.StringIO()))  # the official loop prints every step
            common.run_in(code, lambda: runpy.run_path(str(code / "train" / "train_cvpr2023.py"), run_name="__main__"))
        if not planner.finished:
            raise SystemExit("error: the official loop ended before the first synthesis draw after the traced epochs")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--official", type=Path, required=True, help=f"a checkout of {REPO} at {COMMIT[:7]}")
    parser.add_argument("--datafree", type=Path, required=True,
                        help=f"a checkout of {DATAFREE_REPO} at {DATAFREE_COMMIT[:7]} (its {DATAFREE_WRESNET})")
    parser.add_argument("--out", type=Path, default=common.TRACES, help=f"where to write {NAME}.pt/.json")
    args = parser.parse_args()
    common.finish(trace(args.official.resolve(), args.datafree.resolve()), NAME, args.out)


if __name__ == "__main__":
    main()
