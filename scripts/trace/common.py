"""What every tracer shares: the suite's side of a trace, and the run-time harness around official code.

A tracer (``scripts/trace/<method>.py``) runs an official training loop from a checkout path given
on the command line; nothing here or there is imported by ``dfkd_bench``. See
``dfkd_bench/traces/__init__.py`` for the steps of writing one; the pieces:

* :func:`protocol_config` -- the suite's run under the protocol that cites the official code,
  trace-sized (every change from the protocol listed in ``meta["trace_sized"]``);
* :func:`suite_start` -- the engine's own ``build()`` of that run in float64: the suite's initial
  state, its parameter order and its method's random stream;
* :func:`load_official_module` / :func:`scale_widths` -- official source loaded from the checkout,
  optionally with integer widths of named classes replaced (trace-sized networks, same arithmetic);
* :class:`OfficialRun` -- feeds the official ``torch.randn`` the suite's draws, records after each
  official optimiser step (a post-step hook; or where the step ends, :meth:`OfficialRun.record_step`)
  the losses read from the official frame and the full state in the suite's names, and ends the loop
  after the last step;
* :func:`suite_draws_by_site` / :class:`SiteDraws` -- for an official loop that draws in another order
  than the suite: the suite's own run first, its draws handed to official calls by purpose;
* :func:`finish` -- saves the trace, replays the file on every engine path, writes the summary.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import hashlib
import json
import platform
import re
import sys
import tempfile
import types
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

REPO = Path(__file__).resolve().parents[2]
TRACES = REPO / "results" / "traces"

from dfkd_bench.traces.format import RTOL, Trace, flatten, load_trace, optimizer_state_in_order  # noqa: E402
from dfkd_bench.traces.replay import (build_trainer, float64_mode, replay_variants, suite_draws,  # noqa: E402
                                      suite_state)


class TraceDone(Exception):
    """Raised into the official loop to end it after the traced steps."""


# ------------------------------------------------------------------ the suite ---

def protocol_config(method: str, dataset: str, *, architectures: dict[str, dict[str, Any]],
                    teacher_arch: str, student_arch: str, train: dict[str, Any], params: dict[str, Any],
                    why: dict[str, str], seed: int = 0) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(config, trace_sized)``: the paper protocol of ``method`` on ``dataset`` as the suite resolves it,
    with the trace-sized ``train`` / ``params`` / architectures; ``trace_sized`` lists every setting that
    differs from the protocol (``[protocol value, trace value, why]``, the reason from ``why``)."""
    from dfkd_bench.cluster.experiment import resolve_settings
    from dfkd_bench.data.catalog import get_dataset_info

    p_teacher, p_student, size, p_train, p_params = resolve_settings(method, dataset, "paper")
    info = get_dataset_info(dataset)
    protocol_train = dataclasses.asdict(p_train)
    config = {
        "dataset": dataset, "protocol": "paper", "seed": seed, "image_size": size, "channels": info.channels,
        "num_classes": info.num_classes, "teacher_arch": teacher_arch, "teacher_mean": list(info.mean),
        "teacher_std": list(info.std), "student_arch": student_arch, "student_mean": list(info.mean),
        "student_std": list(info.std), "train": {**protocol_train, **train}, "params": {**p_params, **params},
    }
    sized = {role: [protocol, f"{arch} {architectures[arch]}", why["networks"]]
             for role, protocol, arch in (("teacher_arch", p_teacher, teacher_arch),
                                          ("student_arch", p_student, student_arch))
             if arch != protocol}
    for name, value in train.items():
        if protocol_train[name] != value:
            sized[f"train.{name}"] = [protocol_train[name], value, why[name]]
    for name, value in params.items():
        if p_params.get(name) != value:
            shown = f"{value} {architectures[value]}" if value in architectures else value
            sized[f"params.{name}"] = [p_params.get(name), shown, why[name]]
    return config, sized


@contextlib.contextmanager
def suite_start(meta: dict[str, Any], teacher: dict[str, Tensor], workdir: Path):
    """The engine's trainer of ``meta``'s run, built in float64 (inside :func:`float64_mode`, which
    the official loop then shares): ``trainer.student_module``, ``trainer.method`` ... hold the
    suite's initial state, and ``trainer.method_rng`` is the method's random stream."""
    with float64_mode():
        yield build_trainer(meta, teacher, workdir)


def parameter_names(module: nn.Module, strip: str = "") -> list[str]:
    """The names of ``module``'s parameters in the order an optimiser over ``module.parameters()`` holds them."""
    return [name[len(strip):] if strip and name.startswith(strip) else name for name, _ in module.named_parameters()]


# ---------------------------------------------------------- official code ---

def check_checkout(checkout: Path, repo: str, commit: str, files: dict[str, str]) -> None:
    """Refuse (one line) a checkout whose files are not those of ``repo@commit``: ``files`` maps each file
    the tracer reads to its git blob id at the pinned commit (any copy of the files passes, git or not)."""
    for relative, blob in files.items():
        path = checkout / relative
        if not path.is_file():
            raise SystemExit(f"error: {path} does not exist; pass --official a checkout of {repo} at {commit[:7]}")
        data = path.read_bytes()
        found = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        if found != blob:
            raise SystemExit(f"error: {path} is not the file of {repo}@{commit[:7]} (git blob {found[:10]}, expected "
                             f"{blob[:10]}); check out commit {commit}")


def stub_module(name: str, **attributes: Any) -> None:
    """Register an importable module ``name`` holding ``attributes`` (for imports the official code makes
    of packages this environment lacks or that moved; see each tracer's docstring)."""
    module = types.ModuleType(name)
    module.__dict__.update(attributes)
    sys.modules[name] = module


class _ScaleWidths(ast.NodeTransformer):
    def __init__(self, classes: dict[str, dict[int, int]]):
        self.classes = classes
        self.current: dict[int, int] | None = None
        self.replaced: dict[str, dict[int, int]] = {name: {} for name in classes}
        self.name = ""

    def visit_ClassDef(self, node: ast.ClassDef | ast.FunctionDef) -> ast.AST:
        if node.name not in self.classes or self.current is not None:
            return self.generic_visit(node)
        self.current, self.name = self.classes[node.name], node.name
        self.generic_visit(node)
        self.current = None
        return node

    visit_FunctionDef = visit_ClassDef

    def visit_Constant(self, node: ast.Constant) -> ast.AST:
        if self.current is not None and type(node.value) is int and node.value in self.current:
            counts = self.replaced[self.name]
            counts[node.value] = counts.get(node.value, 0) + 1
            return ast.copy_location(ast.Constant(self.current[node.value]), node)
        return node


def scale_widths(tree: ast.Module, classes: dict[str, dict[int, int]]) -> dict[str, dict[int, int]]:
    """Replace, inside each named class (or function) of ``tree``, the integer literals ``old`` by ``new``
    (its channel widths, a noise or feature dimension); returns how often each was replaced and fails if a
    named width was not found. Only sizes change: every operation, its order and its other constants stay
    the official code's."""
    transformer = _ScaleWidths(classes)
    transformer.visit(tree)
    for name, widths in classes.items():
        missing = sorted(set(widths) - set(transformer.replaced[name]))
        if missing:
            raise SystemExit(f"error: class {name} of the official code has no width {missing}; is this the pinned "
                             f"commit?")
    return transformer.replaced


def load_official_module(path: Path, name: str, widths: dict[str, dict[int, int]] | None = None,
                         run: bool = True) -> types.ModuleType:
    """The official file ``path`` as module ``name`` (its code objects keep the file's path, so frames of
    it are recognised), optionally with :func:`scale_widths` applied; ``run=False`` returns the module
    unexecuted (execute it with ``exec(module.__code__, module.__dict__)``)."""
    tree = ast.parse(path.read_text(), str(path))
    if widths:
        scale_widths(tree, widths)
    code = compile(ast.fix_missing_locations(tree), str(path), "exec")
    module = types.ModuleType(name)
    module.__file__ = str(path)
    module.__code__ = code
    sys.modules[name] = module
    if run:
        exec(code, module.__dict__)
    return module


def padded_to(module_class: type, side: int, pad: int) -> type:
    """A subclass of an official classifier that zero-pads its ``side``-px input by ``pad`` on every edge
    before its own forward (same parameters, same names): what the suite's LeNet-5 computes on 28-px
    inputs with conv1 padding 2, which the official LeNet-5 computes on the 32-px zero-padded image."""
    class Padded(module_class):
        def forward(self, img, *args, **kwargs):
            if img.shape[-1] != side:
                raise ValueError(f"the traced network expects {side}-px inputs, got {tuple(img.shape)}")
            return super().forward(torch.nn.functional.pad(img, (pad, pad, pad, pad)), *args, **kwargs)

    Padded.__name__ = Padded.__qualname__ = f"{module_class.__name__}Padded{side}"
    return Padded


def renamed(state: dict[str, Tensor], rename: Callable[[str], str], shapes: dict[str, torch.Size]) -> dict[str, Tensor]:
    """An official state dict in the suite's names (``rename``), each tensor in the suite's shape (a 5x5
    convolution over a 5x5 map is the suite's dense C5 layer: the same numbers, flattened)."""
    out = {}
    for key, value in state.items():
        suite_key = rename(key)
        out[suite_key] = value.detach().reshape(shapes[suite_key]) if suite_key in shapes else value.detach()
    return out


def optimizer_in_suite_order(optimizer: torch.optim.Optimizer, official: nn.Module, suite_names: list[str],
                             official_name: Callable[[str], str], shapes: dict[str, torch.Size]) -> dict[str, Any]:
    """An official optimiser's state dict indexed like the suite's optimiser (``suite_names``: the suite's
    parameter order), each moment in the shape of the suite's parameter."""
    params = [official.get_parameter(official_name(name)) for name in suite_names]
    state = optimizer_state_in_order(optimizer, params)
    for index, entry in state["state"].items():
        shape = shapes[suite_names[index]]
        state["state"][index] = {k: (v.reshape(shape) if isinstance(v, Tensor) and v.numel() == shape.numel()
                                     and v.dim() > 0 else v) for k, v in entry.items()}
    return state


def official_frame(path: Path):
    """The innermost frame running code of the official file ``path`` (the loop whose step is recorded)."""
    frame = sys._getframe(1)
    while frame is not None and Path(frame.f_code.co_filename) != path:
        frame = frame.f_back
    if frame is None:
        raise RuntimeError(f"no frame of {path} on the stack")
    return frame


class OfficialRun:
    """The run-time harness around an official loop (one per trace).

    * ``randn``: a replacement for ``torch.randn`` that returns the suite's next draw (from its method
      stream, recorded in the trace), shaped as the official call asks; its ``stop_after``-th call
      onwards raises :class:`TraceDone` (the loop ends before drawing what it would not use);
    * ``on_first_draw(frame)`` runs before the first draw (e.g. copying the suite's initial weights into
      networks the official code built, with their optimisers, at module level);
    * ``record(optimizer, kind, losses)``: after every ``optimizer.step()`` the official loop makes, read
      ``losses(frame_variables)`` and ``state()`` and add the step to the trace.
    """

    def __init__(self, trace: Trace, rng: torch.Generator, official_file: Path, state: Callable[[], dict[str, Any]],
                 stop_after: int, on_first_draw: Callable[[Any], None] | None = None):
        self.trace = trace
        self.draw = suite_draws(trace, rng)
        self.official_file = official_file
        self.state = state
        self.stop_after = stop_after
        self.on_first_draw = on_first_draw
        self.draws = 0

    def randn(self, *size, **kwargs) -> Tensor:
        size = size or (kwargs["size"],)  # torch.randn(size=(...)) as well as torch.randn(a, b) / ((a, b))
        shape = tuple(size[0]) if len(size) == 1 and isinstance(size[0], (tuple, list, torch.Size)) else size
        if self.draws >= self.stop_after:
            raise TraceDone
        if self.draws == 0 and self.on_first_draw is not None:
            self.on_first_draw(official_frame(self.official_file))
        self.draws += 1
        rows = shape[0]
        cols = int(torch.Size(shape[1:]).numel())
        return self.draw("randn", (rows, cols)).reshape(shape)

    def record(self, optimizer: torch.optim.Optimizer, kind: str,
               losses: Callable[[dict[str, Any]], dict[str, Any]], official_file: Path | None = None) -> None:
        """``losses`` reads the innermost frame of ``official_file`` (default: the run's) -- the official
        function that made the step, when it lives in another file than the loop."""
        optimizer.register_step_post_hook(lambda *_args: self.record_step(kind, losses, official_file))

    def record_step(self, kind: str, losses: Callable[[dict[str, Any]], dict[str, Any]],
                    official_file: Path | None = None) -> None:
        """Add a step now (where an official step ends after its optimiser's, e.g. pixels clipped after
        Adam's step): ``losses`` of the innermost frame of ``official_file`` and the full state."""
        variables = official_frame(official_file or self.official_file).f_locals
        values = {name: float(value.detach()) if isinstance(value, Tensor) else float(value)
                  for name, value in losses(variables).items()}
        self.trace.step(kind, values, self.state())


def full_state(parts: dict[str, Any]) -> dict[str, Any]:
    """``{"student": state dict, "student_optimizer": ..., "method": {...}}`` flattened as the suite's
    :func:`~dfkd_bench.traces.replay.suite_state` is."""
    out: dict[str, Any] = {}
    for prefix, value in parts.items():
        flatten(prefix, value, out)
    return out


# ------------------------------------------------- draws the suite makes first ---
# An official loop that draws in another order than the suite (a pool method: the suite starts its next
# batch when one is finished, the official code at its next synthesis; it draws its crops per image, the
# suite per batch) cannot be handed the suite's draws one by one as it asks. Its tracer runs the suite first
# (its own draws, the trace's draws) and hands each official draw the suite's draw of the same purpose.

_NOT_A_SITE = ("/dfkd_bench/traces/", "method_api.py", "/torch/", "contextlib", "/unittest/", "/scripts/trace/")


def _draw_site() -> str:
    frame = sys._getframe(2)
    while frame is not None:
        if not any(part in frame.f_code.co_filename for part in _NOT_A_SITE):
            return frame.f_code.co_qualname
        frame = frame.f_back
    return "?"


def suite_draws_by_site(meta: dict[str, Any], teacher: dict[str, Tensor]) -> tuple[Trace, list[str]]:
    """The suite's own run of ``meta`` (:func:`~dfkd_bench.traces.replay.record_suite`: its draws are the
    trace's) and, for each draw, the suite function that made it (``random_roll``, ``MemoryBank.sample``,
    ``DeepInversion.init_batch`` ...)."""
    from unittest import mock

    from dfkd_bench.traces.replay import record_suite

    sites: list[str] = []
    draw = Trace.draw

    def draw_at_site(self, kind: str, value: Tensor) -> Tensor:
        sites.append(_draw_site())
        return draw(self, kind, value)

    with mock.patch.object(Trace, "draw", draw_at_site):
        suite = record_suite(meta, teacher)
    return suite, sites


class SiteDraws:
    """The suite's draws queued by site: ``take(site, kind)`` hands out the next one of ``site`` (an official
    draw of the same purpose), checking its kind; :meth:`left` counts what no official call took."""

    def __init__(self, draws: list[dict[str, Any]], sites: list[str]):
        from collections import deque

        self.queues: dict[str, Any] = {}
        for draw, site in zip(draws, sites, strict=True):
            self.queues.setdefault(site, deque()).append(draw)

    def take(self, site: str, kind: str) -> Tensor:
        queue = self.queues.get(site)
        if not queue:
            raise SystemExit(f"error: the official loop asked for a {kind} draw of {site} beyond the suite's "
                             f"({sorted(self.queues)}); the official and the suite's run differ in their draws")
        draw = queue.popleft()
        if draw["kind"] != kind:
            raise SystemExit(f"error: the official loop asked for a {kind} draw of {site}, the suite drew "
                             f"{draw['kind']}")
        return draw["value"].clone()

    def left(self) -> dict[str, int]:
        return {site: len(queue) for site, queue in self.queues.items() if queue}

# ------------------------------------------- the DataFree collection (zju-vipa) ---
# FastDFKD's and NAYER's official repositories share zju-vipa's DataFree code: datafree_kd.py, the PNG
# ImagePool read through an UnlabeledImageDataset, the kornia augmentation of the synthesizers.

def stub_datafree_imports(**extra: dict[str, Any]) -> None:
    """Stub what the DataFree collection imports and this environment lacks: ``kornia`` (its augmentations
    are built in the synthesizers' ``__init__`` and replaced before use), ``termcolor`` (log colours),
    ``torchvision.models.utils`` (removed in torchvision 0.13), and each of ``extra`` (name -> attributes)."""
    def stub(name, **attributes):
        stub_module(name, **attributes)
        sys.modules[name].__path__ = []

    placeholder = lambda *args, **kwargs: None  # noqa: E731
    stub("kornia", augmentation=types.SimpleNamespace(RandomCrop=placeholder, RandomHorizontalFlip=placeholder))
    stub("kornia.geometry")
    stub("kornia.geometry.transform")
    stub("kornia.geometry.transform.affwarp", scale=None)
    stub("termcolor", colored=lambda text, *args, **kwargs: text)
    stub("torchvision.models.utils", load_state_dict_from_url=torch.hub.load_state_dict_from_url)
    for name, attributes in extra.items():
        stub(name, **attributes)


class Proxy:
    """``target`` with some attributes replaced (what one module sees of another)."""

    def __init__(self, target, **overrides):
        self._target, self._overrides = target, overrides

    def __getattr__(self, name):
        return self._overrides[name] if name in self._overrides else getattr(self._target, name)


def png_pool_state(root: str | Path, capacity: int, image_shape: tuple[int, int, int] = (3, 32, 32)) -> dict[str, Any]:
    """An official PNG pool (``ImagePool``: ``<batch>-<image>.png``) as the suite's pool state: its images in
    the order written (uint8, C x H x W), the next slot of a pool of ``capacity`` and its size."""
    import numpy as np
    from PIL import Image

    files = sorted(Path(root).glob("*.png"), key=lambda p: tuple(int(part) for part in p.stem.split("-")))
    images = [torch.from_numpy(np.array(Image.open(p))).permute(2, 0, 1) for p in files]
    stacked = torch.stack(images) if images else torch.zeros((0, *image_shape), dtype=torch.uint8)
    return {"images": stacked, "next_slot": len(images) % capacity, "size": len(images)}


def png_pool_loader(fresh: Callable[..., Tensor], batch: int, padding: int,
                    on_build: Callable[[], None] | None = None) -> type:
    """A replacement of ``torch.utils.data.DataLoader`` over an official PNG pool that hands the official data
    set the suite's draws: per batch the image indices (with replacement; pool position ``i`` is the file
    ``<i // batch>-<i % batch>``, the order written), then each image's crop rows, crop columns and flip, which
    the official transform's own ``torch.randint`` / ``torch.rand`` calls (RandomCrop(padding), RandomHorizontal
    Flip) return; the images are read from the PNG files through that transform. ``fresh(kind, shape, high)``
    draws; ``on_build()`` runs when the official code builds a loader (a pool that just grew)."""
    from unittest import mock

    class TraceLoader:
        def __init__(self, dataset, batch_size=1, **kwargs):
            self.dataset, self.batch_size = dataset, batch_size
            if on_build is not None:
                on_build()

        def __iter__(self):
            while True:
                yield self.batch()

        def batch(self) -> Tensor:
            files = {Path(path).stem: i for i, path in enumerate(self.dataset.images)}
            index = fresh("randint", (self.batch_size,), len(self.dataset))
            rows = fresh("randint", (self.batch_size,), 2 * padding + 1)
            cols = fresh("randint", (self.batch_size,), 2 * padding + 1)
            flips = fresh("rand", (self.batch_size,))
            images = []
            for k, i in enumerate(index.tolist()):
                offsets = [rows[k:k + 1], cols[k:k + 1]]
                with mock.patch.object(torch, "randint", lambda *a, **kw: offsets.pop(0)), \
                        mock.patch.object(torch, "rand", lambda *a, **kw: flips[k:k + 1]):
                    images.append(self.dataset[files[f"{i // batch}-{i % batch}"]])
            return torch.stack(images)

    return TraceLoader


# ------------------------------------------------------------------ finish ---

def finish(trace: Trace, name: str, out_dir: Path = TRACES) -> dict[str, Any]:
    """Save ``trace`` as ``out_dir/NAME.pt``, replay it on every engine path, write ``NAME.json``; print the
    result. Exits non-zero (keeping both files, for study) if a replay is not within RTOL."""
    path = out_dir / f"{name}.pt"
    sha = trace.save(path)
    results = replay_variants(load_trace(path))  # the file as the tests read it
    meta = trace.meta
    summary = {
        "method": meta["method"], "trace": path.name, "sha256": sha, "official": meta["official"],
        "protocol": f"{meta['config']['dataset']} {meta['config']['protocol']} protocol",
        "steps": len(trace.steps), "dtype": "float64", "rtol": RTOL,
        "max_relative_difference": max(r.max_relative_difference for r in results.values()),
        "variants": {variant: r.max_relative_difference for variant, r in results.items()},
        "replays": {variant: r.describe() for variant, r in results.items()},
        "largest": {variant: dict(sorted(r.per_key.items(), key=lambda item: -item[1])[:6])
                    for variant, r in results.items()},
        "command": meta["command"], "alignments": meta["alignments"], "trace_sized": meta["trace_sized"],
        "patches": meta["patches"], "bytes": path.stat().st_size,
        "made_with": {"torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine()},
    }
    (out_dir / f"{name}.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    for variant, result in results.items():
        print(f"{name} [{variant}]: {result.describe()}")
    print(f"wrote {path} ({summary['bytes']:,} bytes) and {name}.json")
    if not all(result.within(RTOL) for result in results.values()):
        raise SystemExit(f"error: the suite is not step-equivalent to {meta['official']['repo']} within {RTOL:g}")
    return summary


# ------------------------------------------------------- the official LeNet-5 ---
# DAFL's lenet.py (and DFAD's network/lenet.py, "borrowed from" it): conv1, conv2, conv3 (a 5x5
# convolution over the 5x5 map: the suite's dense C5), fc1, fc2 -> the suite's conv1, conv2, c5, fc6, fc7.

LENET_NAMES = {"conv1": "conv1", "conv2": "conv2", "conv3": "c5", "fc1": "fc6", "fc2": "fc7"}
LENET_OFFICIAL = {suite: official for official, suite in LENET_NAMES.items()}
LENET5_WIDTHS = (6, 16, 120, 84)
LENET5_HALF_WIDTHS = (3, 8, 60, 42)


def lenet_suite_name(key: str) -> str:
    layer, _, rest = key.partition(".")
    return f"{LENET_NAMES[layer]}.{rest}"


def lenet_official_name(key: str) -> str:
    layer, _, rest = key.partition(".")
    return f"{LENET_OFFICIAL[layer]}.{rest}"


def lenet_widths(official: tuple[int, ...], trace: list[int]) -> dict[int, int]:
    """``scale_widths``'s map from an official LeNet-5's (conv1, conv2, C5, F6) widths to the trace's."""
    return dict(zip(official, trace))


def official_lenet_state(suite_state: dict[str, Tensor], official: nn.Module) -> dict[str, Tensor]:
    """A suite LeNet-5 state dict in an official LeNet-5's names and shapes (C5 as the 5x5 convolution)."""
    shapes = {k: v.shape for k, v in official.state_dict().items()}
    return {lenet_official_name(k): v.reshape(shapes[lenet_official_name(k)]) for k, v in suite_state.items()}


class LeNetGeneratorLayout:
    """The suite's side of a method whose state is a LeNet-5 student and a paper generator, each with its
    optimiser (DFAD, DAFL): names, order and shapes of the suite's run, its initial weights, and the
    official objects' state in the suite's names."""

    def __init__(self, trainer):
        student = trainer.student_module.model
        generator = trainer.method.net.generator
        self.student_shapes = {k: v.shape for k, v in student.state_dict().items()}
        self.generator_shapes = {k: v.shape for k, v in generator.state_dict().items()}
        self.student_names = parameter_names(student)
        self.generator_names = parameter_names(trainer.method.net, strip="generator.")
        self.initial_student = {k: v.clone() for k, v in student.state_dict().items()}
        self.initial_generator = {k: v.clone() for k, v in generator.state_dict().items()}

    def load_initial(self, student: nn.Module, generator: nn.Module) -> None:
        """Copy the suite's initial weights into the official student (a LeNet-5) and generator."""
        with torch.no_grad():
            student.load_state_dict(official_lenet_state(self.initial_student, student))
            generator.load_state_dict(self.initial_generator)

    def state(self, student: nn.Module, optimizer_s: torch.optim.Optimizer, generator: nn.Module,
              optimizer_g: torch.optim.Optimizer) -> dict[str, Any]:
        """The official run's full state, flat, in the names of the suite's ``suite_state``."""
        return full_state({
            "student": renamed(student.state_dict(), lenet_suite_name, self.student_shapes),
            "student_optimizer": optimizer_in_suite_order(optimizer_s, student, self.student_names,
                                                          lenet_official_name, self.student_shapes),
            "method": {"generator": {f"generator.{k}": v.detach() for k, v in generator.state_dict().items()},
                       "generator_optimizer": optimizer_in_suite_order(optimizer_g, generator, self.generator_names,
                                                                       lambda name: name, self.generator_shapes)},
        })


def random_lenet_teacher(widths: list[int], seed: int = 1) -> dict[str, Tensor]:
    """A randomly initialised trace-sized LeNet-5 teacher (float64, the suite's names) for 28-px inputs."""
    from dfkd_bench.models.lenet import LeNet5

    torch.manual_seed(seed)
    return LeNet5(10, 1, 28, width=tuple(widths)).double().state_dict()


def run_in(folder: Path, function: Callable[[], Any]) -> None:
    """``function()`` with ``folder`` as the working directory, ended by :class:`TraceDone`."""
    import os

    cwd = os.getcwd()
    os.chdir(folder)
    try:
        function()
    except TraceDone:
        pass
    finally:
        os.chdir(cwd)


# ------------------------------------------------------- the official WRN ---
# xternalz/WideResNet-pytorch as ZSKT (polo5) and the DataFree collection (zju-vipa) use it: blocks inside
# ``block{g}.layer``, the width-changing shortcut ``convShortcut``, the final BatchNorm ``bn1`` -> the suite's
# ``block{g}.{i}``, ``conv_shortcut``, ``bn`` (dfkd_bench/models/wrn.py registers the same key map).
WRN_OFFICIAL_WIDTHS = (16, 32, 64)


def wrn_suite_name(key: str) -> str:
    key = re.sub(r"^(block\d)\.layer\.", r"\1.", key)
    key = key.replace(".convShortcut.", ".conv_shortcut.")
    return re.sub(r"^bn1\.", "bn.", key)


def wrn_official_name(key: str) -> str:
    key = re.sub(r"^(block\d)\.(\d+)\.", r"\1.layer.\2.", key)
    key = key.replace(".conv_shortcut.", ".convShortcut.")
    return re.sub(r"^bn\.", "bn1.", key)


def random_wrn_teacher(spec: dict[str, Any], num_classes: int = 10, seed: int = 1,
                       logit_scale: float = 1.0) -> dict[str, Tensor]:
    """A randomly initialised trace-sized WRN teacher (float64, the suite's names) whose BatchNorm layers have
    random affine parameters and running statistics (not the identity a fresh BatchNorm is), its classifier's
    weights multiplied by ``logit_scale`` (confident logits: gradients large enough for a clipping to act)."""
    from dfkd_bench.models.wrn import WideResNet

    torch.manual_seed(seed)
    model = WideResNet(spec["depth"], spec["widen_factor"], num_classes, 3,
                       base_widths=tuple(spec["base_widths"])).double()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 2.0)
        model.fc.weight.mul_(logit_scale)
    return model.state_dict()


# ------------------------------------------------------- a LeNet-5 / paper-generator trace ---

TEACHER_WIDTHS = [3, 4, 12, 10]
"""The trace-sized LeNet-5 teacher's (conv1, conv2, C5, F6) widths (official 6, 16, 120, 84)."""
STUDENT_WIDTHS = [2, 3, 6, 6]
"""The trace-sized LeNet-5-half student's widths (official 3, 8, 60, 42)."""
WHY_SMALL = "a trace must stay well under 1 MB; the step's arithmetic does not depend on the sizes"


def lenet_generator_meta(method: str, *, official: dict[str, str], command: str, generator: str, ngf: int,
                         iterations: int, batch: int, noise: int, schedule: list[str],
                         alignments: dict[str, str], patches: dict[str, str]) -> dict[str, Any]:
    """The ``meta`` of a trace of ``method``'s MNIST paper protocol with a LeNet-5 pair and a paper generator
    (``generator`` ``dfad`` / ``dafl``), trace-sized: ``iterations`` official iterations, ``batch``, ``noise``,
    ``ngf`` and the widths above; ``alignments`` adds the method's own to the shared ones."""
    architectures = {
        "trace_lenet5": {"registry": "model", "family": "lenet", "width": TEACHER_WIDTHS},
        "trace_lenet5_half": {"registry": "model", "family": "lenet", "width": STUDENT_WIDTHS},
        f"trace_{generator}_gen": {"registry": "generator", "family": "paper_generator", "kind": generator, "ngf": ngf},
    }
    config, sized = protocol_config(
        method, "mnist", architectures=architectures, teacher_arch="trace_lenet5", student_arch="trace_lenet5_half",
        train=dict(epochs=1, steps_per_epoch=iterations, batch_size=batch, drift_every=0),
        params=dict(noise_dim=noise, generator=f"trace_{generator}_gen"),
        why={"networks": WHY_SMALL, "batch_size": WHY_SMALL, "noise_dim": WHY_SMALL, "generator": WHY_SMALL,
             "epochs": f"{iterations} official iterations", "steps_per_epoch": f"{iterations} official iterations",
             "drift_every": "no measurement during a trace"})
    return {
        "method": method, "official": official, "command": command, "config": config, "trace_sized": sized,
        "architectures": architectures, "schedule": schedule, "load": ["student/", "method/generator/"],
        "uncompared": {"method/counters/": "the suite's count of synthetic images (a budget record, no arithmetic)"},
        "alignments": {
            **alignments,
            "28-px inputs": "the official LeNet-5 and LeNet-5-half get the 28-px image zero-padded to 32 (what the "
                            "suite's conv1 padding 2 computes); the generator is built for 28 px",
            "batch and noise": f"batch {batch} (protocol {sized['train.batch_size'][0]}), noise {noise} (protocol "
                               f"{sized['params.noise_dim'][0]})",
            "float64": "default dtype float64 on both sides",
            "draws": "the official torch.randn returns the suite's draws (its method stream, in the order drawn)",
        },
        "patches": patches,
    }


def trace_lenet_generator(spec: dict[str, Any], official_file: Path, run_official: Callable[..., None], *,
                          stop_after: int, networks: Callable[[dict[str, Any]], dict[str, Any]],
                          student_losses: Callable[[dict[str, Any]], dict[str, Any]],
                          generator_losses: Callable[[dict[str, Any]], dict[str, Any]]) -> Trace:
    """Trace an official loop whose state is a LeNet-5 student and a paper generator with their optimisers:
    build the suite's run of ``spec`` (float64), then ``run_official(workdir, teacher, randn)``. Before the
    official loop's first draw, ``networks(frame variables)`` names its ``student``, ``generator``,
    ``optimizer_S`` and ``optimizer_G``; the suite's initial weights are copied into them, and every step of
    each optimiser is recorded with ``student_losses`` / ``generator_losses`` of the frame's variables."""
    teacher = random_lenet_teacher(TEACHER_WIDTHS)
    with tempfile.TemporaryDirectory(prefix=f"{spec['method']}-trace-") as tmp, \
            suite_start(spec, teacher, Path(tmp)) as suite:
        layout = LeNetGeneratorLayout(suite)
        result = Trace(spec, teacher, {})
        loop: dict[str, Any] = {}

        def state() -> dict[str, Any]:
            return layout.state(loop["student"], loop["optimizer_S"], loop["generator"], loop["optimizer_G"])

        def on_first_draw(frame) -> None:
            loop.update(networks(frame.f_locals))
            layout.load_initial(loop["student"], loop["generator"])
            result.initial = state()  # before the first step: the optimisers hold no state yet
            run.record(loop["optimizer_S"], "student", student_losses)
            run.record(loop["optimizer_G"], "generator", generator_losses)

        run = OfficialRun(result, suite.method_rng, official_file, state=state, stop_after=stop_after,
                          on_first_draw=on_first_draw)
        run_official(Path(tmp), teacher, run.randn)
    return result


def tracer_main(doc: str, trace: Callable[[Path], Trace], name: str, repo: str, commit: str) -> None:
    """A tracer's command line: ``--official CHECKOUT [--out DIR]``, then :func:`finish`."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--official", type=Path, required=True, help=f"a checkout of {repo} at {commit[:7]}")
    parser.add_argument("--out", type=Path, default=TRACES, help=f"where to write {name}.pt/.json")
    args = parser.parse_args()
    finish(trace(args.official.resolve()), name, args.out)
