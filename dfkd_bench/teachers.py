"""Teachers: training (Table 4), the teacher cache, external checkpoints, evaluation.

Models in dfkd-bench take images in [0, 1]; :class:`NormalizedModel` applies
the normalisation a network was trained with. For the teachers we train that
is the dataset's; an external checkpoint may have been trained with another
one, so it is configurable (``--teacher-mean/--teacher-std``).

The teacher cache is a folder (``$DFKD_BENCH_TEACHERS``, default
``~/.cache/dfkd-bench/teachers``) of ``<dataset>-<arch>.pt`` files, each a
dict with ``state_dict`` and ``meta`` (accuracy, normalisation, recipe,
versions), readable with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
import pickle
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from dfkd_bench.config import TeacherSpec
from dfkd_bench.data import build_dataset, get_dataset_info
from dfkd_bench.errors import CheckpointError, ConfigError
from dfkd_bench.models import build_model
from dfkd_bench.presets import TeacherRecipe, get_preset
from dfkd_bench.store import atomic_write_bytes, file_sha256


class NormalizedModel(nn.Module):
    """``model((x - mean) / std)`` for images ``x`` in [0, 1]."""

    def __init__(self, model: nn.Module, mean: list[float], std: list[float]):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def forward(self, images: Tensor) -> Tensor:
        return self.model((images - self.mean.to(images.dtype)) / self.std.to(images.dtype))


def teacher_cache_dir() -> Path:
    return Path(os.environ.get("DFKD_BENCH_TEACHERS", Path.home() / ".cache" / "dfkd-bench" / "teachers"))


def cached_teacher_path(dataset: str, arch: str, cache_dir: str | os.PathLike | None = None) -> Path:
    safe_arch = arch.replace(":", "_").replace("/", "_")
    return Path(cache_dir or teacher_cache_dir()) / f"{dataset}-{safe_arch}.pt"


def teacher_sha256(path: str | os.PathLike) -> str:
    """The teacher's identity in run ids: a hash of its weights, not of the file.

    Training a teacher is deterministic (same weights on every retraining on
    the same machine and thread count), but its file also stores the training
    time; hashing the file would give every retrained or re-saved teacher a
    new identity, so finished runs would no longer be recognised as done and
    the report would split identical teachers into separate columns. The hash
    covers the state_dict as the loader sees it (``module.`` stripped), key by
    key in sorted order: name, dtype, shape and raw bytes. A file that holds
    no state_dict falls back to the file's hash (building the teacher then
    reports what is wrong with it). An external checkpoint's identity is the same hash taken after
    its keys are fitted to the architecture (:func:`resolve_teacher`), so a published file and the
    same weights saved under our names are one teacher.
    """
    stat = os.stat(path)
    return _teacher_sha256_cached(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _teacher_sha256_cached(path: str, size: int, mtime_ns: int) -> str:
    try:
        state = extract_state_dict(read_checkpoint(path), path)
    except CheckpointError:
        return file_sha256(path)  # a file that holds no state_dict: its bytes
    return state_sha256(state)


def state_sha256(state: dict[str, Tensor]) -> str:
    """The hash of a state_dict: key by key in sorted order, name, dtype, shape and raw bytes."""
    digest = hashlib.sha256(b"dfkd-bench teacher weights v1")
    for key in sorted(state):
        tensor = state[key].detach().cpu().contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def parse_floats(text: str | None, what: str) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{what} expects comma-separated numbers like 0.485,0.456,0.406, got {text!r}") from None


# ------------------------------------------------------- external checkpoints ---
#
# A teacher file as it comes: a raw state_dict or one wrapped with training state
# ({'state_dict': {'module.…'}, 'epoch', 'best_prec1', 'optimizer', 'arch' ...}), a .safetensors file,
# saved by an old PyTorch (BatchNorm without ``num_batches_tracked``), with the key names of the code
# base that trained it. The loader unwraps it, applies the user's ``--teacher-key-map`` renames, tries
# the architecture's known key maps (declared next to each architecture, see models.registry.KeyMap),
# fills the BatchNorm counters and loads strictly; what still does not fit is one error line naming
# a few missing and a few unexpected keys.

# CHOSEN: the names under which training scripts wrap their weights, tried in this order.
STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model", "net")
KEY_MAP_HINT = "--teacher-key-map OLD_PREFIX=NEW_PREFIX"
_SHOWN_KEYS = 3  # keys named per kind in a mismatch error


def _tensor_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(k, str) for k in obj) \
        and all(isinstance(v, Tensor) for v in obj.values())


def extract_state_dict(obj: Any, path: str | os.PathLike) -> "OrderedDict[str, Tensor]":
    """The weights inside a checkpoint; ``module.`` (DataParallel / DDP) stripped.

    Accepted: a raw state_dict; a dict holding one under ``state_dict``, ``model_state_dict``,
    ``model`` or ``net`` (also nested); otherwise, in a dict without tensors of its own, the one
    entry that is a name -> tensor dict (``s_state_dict`` ...). Entries beside the weights
    (``epoch``, ``best_prec1``, ``optimizer``, ``arch`` ...) are ignored.
    """
    for _ in range(3):  # {'model': {'state_dict': ...}} and the like
        if not isinstance(obj, dict):
            break
        inner = next((obj[k] for k in STATE_DICT_KEYS if isinstance(obj.get(k), dict) and obj[k]), None)
        if inner is None:
            break
        obj = inner
    if isinstance(obj, dict) and not any(isinstance(v, Tensor) for v in obj.values()):
        nested = [v for v in obj.values() if _tensor_dict(v)]
        if len(nested) == 1:  # e.g. {'s_state_dict': {...}, 'epoch': 3, 'optimizer': {...}}
            obj = nested[0]
    tensors = OrderedDict((k, v) for k, v in obj.items() if isinstance(k, str) and isinstance(v, Tensor)) \
        if isinstance(obj, dict) else OrderedDict()
    if not tensors:
        found = ""
        if isinstance(obj, dict) and obj:
            names = [repr(k) for k in list(obj)[:6]]
            found = f" (it holds {', '.join(names)}{', ...' if len(obj) > 6 else ''})"
        raise CheckpointError(
            f"{path}: expected a state_dict (name -> tensor) or a dict with 'state_dict' or 'model'{found}; "
            "save one with torch.save(model.state_dict(), PATH)"
        )
    return OrderedDict((k[len("module."):] if k.startswith("module.") else k, v) for k, v in tensors.items())


def parse_key_map(items: Sequence[str] | None) -> list[tuple[str, str]]:
    """``["linear.=fc.", "backbone.="]`` -> ``[("linear.", "fc."), ("backbone.", "")]``."""
    rules = []
    for item in items or ():
        old, sep, new = item.partition("=")
        if not sep or (not old and not new):
            raise ConfigError(f"--teacher-key-map expects OLD_PREFIX=NEW_PREFIX, e.g. linear.=fc. "
                              f"(or backbone.= to drop a prefix), got {item!r}")
        if old == new:
            raise ConfigError(f"--teacher-key-map {item} renames nothing; give two different prefixes")
        rules.append((old, new))
    return rules


def apply_key_map(state: "OrderedDict[str, Tensor]", rules: Sequence[tuple[str, str]],
                  source: str | os.PathLike) -> "OrderedDict[str, Tensor]":
    """Each ``(old, new)`` rule in turn renames every key starting with ``old`` (so rules can chain)."""
    for old, new in rules:
        renamed: OrderedDict[str, Tensor] = OrderedDict()
        hits = 0
        for key, value in state.items():
            if key.startswith(old):
                key, hits = new + key[len(old):], hits + 1
            if key in renamed:
                raise CheckpointError(f"--teacher-key-map {old}={new} gives two tensors of {source} the name "
                                      f"{key!r}; use a longer OLD_PREFIX")
            renamed[key] = value
        if not hits:
            starts = sorted({k.split(".")[0] + "." for k in state})
            shown = ", ".join(repr(s) for s in starts[:6]) + (", ..." if len(starts) > 6 else "")
            raise CheckpointError(f"--teacher-key-map {old}={new} matches no key of {source} (its keys start with "
                                  f"{shown}); fix OLD_PREFIX")
        state = renamed
    return state


def fill_batchnorm_counters(model: nn.Module, state: dict[str, Tensor]) -> int:
    """Add the ``num_batches_tracked`` buffers a file saved before PyTorch 0.4.1 lacks, in place.

    As PyTorch's own BatchNorm loader does for such files (state_dict version < 2): a BatchNorm
    whose running statistics are in the file but whose counter is not gets the counter 0. The
    counter only matters for training with ``momentum=None``; a teacher is frozen.
    """
    filled = 0
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats:
            prefix = f"{name}." if name else ""
            key = prefix + "num_batches_tracked"
            if key not in state and prefix + "running_mean" in state:
                state[key] = torch.tensor(0, dtype=torch.long)
                filled += 1
    return filled


@dataclass
class FittedState:
    """A checkpoint's weights under the architecture's names, ready for a strict load."""

    state: "OrderedDict[str, Tensor]"
    layout: str | None = None  # the known key map used, if any
    filled_counters: int = 0


def _suggest_key_map(missing: list[str], unexpected: list[str]) -> str | None:
    """The one prefix rename that turns the most unexpected keys into missing ones (``linear.=fc.``)."""
    wanted = set(missing)
    candidates: set[tuple[str, str]] = set()
    for key in unexpected[:20]:
        parts = key.split(".")
        for other in missing:
            other_parts = other.split(".")
            common = 0
            while common < min(len(parts), len(other_parts)) and parts[-1 - common] == other_parts[-1 - common]:
                common += 1
            if common:
                old = ".".join(parts[:len(parts) - common])
                new = ".".join(other_parts[:len(other_parts) - common])
                if old != new:
                    candidates.add((old + "." if old else "", new + "." if new else ""))
    best, best_score = None, 0
    for old, new in sorted(candidates, key=lambda rule: (len(rule[0]) + len(rule[1]), rule)):
        score = sum(1 for key in unexpected if key.startswith(old) and new + key[len(old):] in wanted)
        if score > best_score:
            best, best_score = f"{old}={new}", score
    return best


def _name_keys(kind: str, keys: list[str]) -> str:
    shown = ", ".join(repr(k) for k in keys[:_SHOWN_KEYS])
    more = f" and {len(keys) - _SHOWN_KEYS} more" if len(keys) > _SHOWN_KEYS else ""
    return f"{kind} key{'s' if len(keys) > 1 else ''} {shown}{more}"


def fit_state_dict(model: nn.Module, state: "OrderedDict[str, Tensor]", *, source: str | os.PathLike, arch: str,
                   key_map: Sequence[tuple[str, str]] = ()) -> FittedState:
    """``state`` under ``model``'s names, or a one-line error naming what does not fit.

    Order: the user's ``key_map`` (prefix renames), then the file as it is or under each known key
    map of ``arch``, the first that fits exactly winning; missing BatchNorm counters are filled.
    """
    from dfkd_bench.models.registry import key_maps_for

    expected = model.state_dict()
    state = apply_key_map(state, key_map, source)
    tries: list[tuple[str | None, OrderedDict[str, Tensor]]] = [(None, state)]
    for known in key_maps_for(arch):
        renamed = OrderedDict((known.rename(k), v) for k, v in state.items())
        if len(renamed) == len(state) and renamed.keys() != state.keys():
            tries.append((known.name, renamed))
    mismatch = None
    for layout, candidate in tries:
        candidate = OrderedDict(candidate)
        filled = fill_batchnorm_counters(model, candidate)
        missing = [k for k in expected if k not in candidate]
        unexpected = [k for k in candidate if k not in expected]
        if not missing and not unexpected:
            _check_shapes(expected, candidate, source, arch)
            return FittedState(candidate, layout, filled)
        # CHOSEN: the error names the keys of the file as it is (after the user's renames): a known
        # map that happens to match a few keys of an unrelated file would only confuse.
        mismatch = mismatch or (missing, unexpected)
    missing, unexpected = mismatch
    parts = [_name_keys(kind, keys) for kind, keys in (("missing", missing), ("unexpected", unexpected)) if keys]
    suggestion = _suggest_key_map(missing, unexpected) if missing and unexpected else None
    example = f" (here perhaps --teacher-key-map {suggestion})" if suggestion else ""
    raise CheckpointError(f"{source} does not fit --teacher-arch {arch}: {'; '.join(parts)}; rename keys with "
                          f"{KEY_MAP_HINT}{example}, repeatable, or check --teacher-arch")


def _check_shapes(expected: dict[str, Tensor], state: dict[str, Tensor], source, arch: str) -> None:
    wrong = [k for k, v in expected.items() if tuple(state[k].shape) != tuple(v.shape)]
    if wrong:
        key = wrong[0]
        more = f" (and {len(wrong) - 1} more keys of other shapes)" if len(wrong) > 1 else ""
        raise CheckpointError(
            f"{source} does not fit --teacher-arch {arch}: key {key!r} has shape {tuple(state[key].shape)}, "
            f"the architecture expects {tuple(expected[key].shape)}{more}; check --teacher-arch and that the "
            "file was trained for this dataset's number of classes and image size"
        )
    # Integer weights where the architecture has floating-point ones (a quantised or mangled export)
    # would be cast silently by load_state_dict and give a teacher that answers nonsense.
    wrong = [k for k, v in expected.items() if v.is_floating_point() and not state[k].is_floating_point()]
    if wrong:
        key = wrong[0]
        more = f" (and {len(wrong) - 1} more)" if len(wrong) > 1 else ""
        raise CheckpointError(
            f"{source} does not fit --teacher-arch {arch}: key {key!r} holds {str(state[key].dtype).removeprefix('torch.')} "
            f"values where the architecture has floating-point weights{more} (a quantised or damaged export?); "
            "save the floating-point weights: torch.save(model.float().state_dict(), PATH)"
        )


def load_state_into(model: nn.Module, state: "OrderedDict[str, Tensor]", path: str | os.PathLike,
                    arch: str, key_map: Sequence[tuple[str, str]] = ()) -> FittedState:
    """Fit ``state`` to ``model`` (:func:`fit_state_dict`) and load it strictly."""
    fitted = fit_state_dict(model, state, source=path, arch=arch, key_map=key_map)
    model.load_state_dict(fitted.state, strict=True)
    return fitted


def _is_safetensors(path: Path) -> bool:
    """A .safetensors file, by name or by its header (8-byte little-endian length, then JSON)."""
    if path.suffix.lower() == ".safetensors":
        return True
    with open(path, "rb") as handle:
        head = handle.read(9)
    return len(head) == 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") < path.stat().st_size


def _data_only_globals():
    """``torch.load(weights_only=True)`` plus the plain-data types training scripts store beside the weights.

    CHOSEN: numpy scalars and arrays (``'best_acc': np.float64(93.4)``) and ``argparse.Namespace``
    (timm's and many scripts' ``'args'``) are data, not code: their reconstruction runs no function
    named by the file, and everything inside them still passes the weights-only unpickler. Under
    both numpy module names (``numpy.core`` before numpy 2, ``numpy._core`` since). Nothing else is
    allowed; a file that needs more stays refused, with the reason.
    """
    import argparse
    import contextlib

    import numpy as np

    if not hasattr(torch.serialization, "safe_globals"):  # torch < 2.5: weights-only as it comes
        return contextlib.nullcontext()
    multiarray = getattr(getattr(np, "_core", None), "multiarray", None) or np.core.multiarray
    allowed: list[Any] = [argparse.Namespace, np.ndarray, np.dtype]
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed += [(multiarray._reconstruct, f"{module}._reconstruct"), (multiarray.scalar, f"{module}.scalar")]
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        allowed += [cls for cls in vars(dtypes).values() if isinstance(cls, type) and issubclass(cls, np.dtype)]
    return torch.serialization.safe_globals(allowed)


def not_a_file(path: Path) -> str:
    """Why ``path`` is not a weights file: ``does not exist``, ``is a folder ...``, ``is not a regular file ...``."""
    if not path.exists():
        return "does not exist"
    if path.is_dir():
        return "is a folder, not a weights file; pass the .pt/.pth/.safetensors file inside it"
    return "is not a regular file (a pipe or a device?); pass a .pt/.pth/.safetensors file"


def read_checkpoint(path: str | os.PathLike) -> Any:
    """A checkpoint's content: ``torch.load(weights_only=True)``, or the tensors of a .safetensors file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"teacher checkpoint {path} {not_a_file(path)}")
    if _is_safetensors(path):
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as error:
            first = str(error).strip().splitlines()[0] if str(error).strip() else "unreadable"
            raise CheckpointError(f"{path} is not a readable safetensors file ({first[:200]}); "
                                  "save one with safetensors.torch.save_file(model.state_dict(), PATH)") from None
    try:
        with _data_only_globals():
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        if isinstance(error, pickle.UnpicklingError) and hasattr(torch.serialization, "get_unsafe_globals_in_checkpoint"):
            try:
                objects = [name for name in torch.serialization.get_unsafe_globals_in_checkpoint(path)
                           if "numpy" not in name and name != "argparse.Namespace"]
            except Exception:
                objects = []
            if objects:  # e.g. torch.save(model): the file needs its code base (and runs code) to load
                shown = ", ".join(objects[:3]) + (", ..." if len(objects) > 3 else "")
                raise CheckpointError(
                    f"{path} stores Python objects ({shown}), not only weights, and is not loaded (that would run "
                    "code from the file); where it comes from, with the code that made it, save the model's weights "
                    "alone: torch.save(model.state_dict(), NEW_PATH)"
                ) from None
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(
            f"{path} is not a readable PyTorch checkpoint ({first[:200]}); "
            "pass a file saved with torch.save(model.state_dict(), PATH)"
        ) from None


def _build_for_shapes(arch: str, num_classes: int, channels: int, image_size: int) -> nn.Module:
    """The architecture without its initialisation cost (on the meta device) when it allows it."""
    try:
        with torch.device("meta"):
            return build_model(arch, num_classes=num_classes, in_channels=channels, image_size=image_size)
    except (ConfigError, CheckpointError):
        raise
    except Exception:  # a builder that needs real tensors
        return build_model(arch, num_classes=num_classes, in_channels=channels, image_size=image_size)


def build_teacher(spec: TeacherSpec, num_classes: int, channels: int, image_size: int,
                  device: torch.device | str = "cpu") -> NormalizedModel:
    """The frozen teacher of ``spec``: eval mode, no parameter gradients, normalising inputs.

    Known key maps and missing BatchNorm counters are handled here too, so a spec that points at a
    file as published loads; a user ``--teacher-key-map`` was applied by :func:`resolve_teacher`,
    which then points the spec at the renamed copy.
    """
    model = build_model(spec.arch, num_classes=num_classes, in_channels=channels, image_size=image_size)
    load_state_into(model, extract_state_dict(read_checkpoint(spec.path), spec.path), spec.path, spec.arch)
    teacher = NormalizedModel(model, spec.mean, spec.std).to(device)
    teacher.eval()
    for parameter in teacher.parameters():
        parameter.requires_grad_(False)
    return teacher


# ----------------------------------------------------- pretrained by name ---

TEACHER_WEIGHTS_HELP = "cache | torchvision | torchvision:<WEIGHTS> (e.g. torchvision:IMAGENET1K_V1)"
# CHOSEN: where no trained teacher is needed because the paper used a published one. MAD's ImageNet
# teacher is torchvision's pretrained AlexNet (the preset's teacher arch); other datasets (and other
# arches on ImageNet) use the teacher cache unless --teacher-weights says otherwise.
PRESET_TEACHER_WEIGHTS = {"imagenet": "torchvision"}


def _torchvision_name(arch: str) -> str | None:
    from dfkd_bench.models.registry import TORCHVISION_PREFIXES

    key = arch.strip()
    for prefix in TORCHVISION_PREFIXES:
        if key.lower().startswith(prefix):
            return key[len(prefix):].strip()
    return "alexnet" if key.lower() == "alexnet" else None  # the registered alexnet is torchvision's


def torchvision_weights(arch: str, choice: str = "torchvision"):
    """The torchvision weights enum member ``choice`` names for ``arch`` (DEFAULT for plain ``torchvision``)."""
    import torchvision.models as tvm

    name = _torchvision_name(arch)
    if name is None:
        raise ConfigError(f"--teacher-weights {choice} needs a torchvision architecture (alexnet or "
                          f"torchvision:<name>), --teacher-arch is {arch}; pass --teacher-checkpoint for other weights")
    try:
        enum = tvm.get_model_weights(name)
    except (ValueError, KeyError):
        raise ConfigError(f"torchvision has no pretrained weights for {name!r}; see "
                          "torchvision.models.list_models() for the models that have") from None
    wanted = choice.partition(":")[2].strip()
    if not wanted:
        return enum.DEFAULT
    try:
        return enum[wanted]
    except KeyError:
        raise ConfigError(f"--teacher-weights {choice}: torchvision's {name} has the weights "
                          f"{', '.join(w.name for w in enum)}") from None


def torchvision_weights_file(weights, download: bool = False, progress: bool = True) -> Path:
    """The file of torchvision ``weights`` in the torch hub cache (``$TORCH_HOME/hub/checkpoints``).

    Downloaded there only with ``download``; otherwise a missing file is one error line saying
    which file to put where.
    """
    from urllib.parse import urlparse

    folder = Path(torch.hub.get_dir()) / "checkpoints"
    filename = os.path.basename(urlparse(weights.url).path)
    path = folder / filename
    if path.is_file():
        return path
    if not download:
        raise CheckpointError(f"torchvision's pretrained weights {weights} are not in the torch hub cache: put "
                              f"{filename} (from {weights.url}) into {folder} (the folder follows $TORCH_HOME), "
                              "or pass --download to fetch it there")
    try:
        torch.hub.load_state_dict_from_url(weights.url, model_dir=str(folder), map_location="cpu", progress=progress,
                                           check_hash=True, weights_only=True)
    except Exception as error:
        reason = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"could not download {weights.url} into {folder} ({reason}); fetch it by hand and "
                              f"put it there as {filename}") from None
    return path


def _teacher_weights_choice(dataset: str, arch: str, checkpoint: str | None, weights: str | None) -> str:
    if weights is not None:
        choice = weights.strip()
        if choice != "cache" and choice != "torchvision" and not choice.startswith("torchvision:"):
            raise ConfigError(f"--teacher-weights {weights!r} is not one of {TEACHER_WEIGHTS_HELP}")
        if checkpoint is not None:
            raise ConfigError(f"--teacher-weights {weights} and --teacher-checkpoint name two teachers; keep one")
        return choice
    if checkpoint is not None:
        return "checkpoint"
    default = PRESET_TEACHER_WEIGHTS.get(dataset)
    if default and arch.strip().lower() == get_preset(dataset).teacher_arch:
        return default
    return "cache"


def resolve_teacher(dataset: str, arch: str, *, checkpoint: str | None = None, mean: list[float] | None = None,
                    std: list[float] | None = None, cache_dir: str | None = None,
                    data_root: str | None = None, key_map: Sequence[str] | None = None,
                    weights: str | None = None, download: bool = False,
                    image_size: int | None = None) -> TeacherSpec:
    """The teacher a run uses: an external checkpoint, published weights by name, or the cached one.

    An external file is checked against ``arch`` here, before any run starts, and its identity
    (``sha256``) is the hash of its weights as loaded (after renaming), so the same weights give
    the same run ids whatever file form they came in. With a ``key_map`` the renamed weights are
    written once to ``<teacher cache>/converted/`` and the runs load that copy.
    """
    info = get_dataset_info(dataset)
    rules = parse_key_map(key_map)
    choice = _teacher_weights_choice(dataset, arch, checkpoint, weights)
    if rules and choice != "checkpoint":
        raise ConfigError("--teacher-key-map renames the keys of a --teacher-checkpoint file; pass the file too")
    size = image_size or get_preset(dataset).image_size
    if choice == "checkpoint":
        path = Path(checkpoint).resolve()
        if not path.is_file():
            raise CheckpointError(f"--teacher-checkpoint {checkpoint} {not_a_file(path)}")
        path, sha = _prepare_external(path, arch, info.num_classes, info.channels, size, rules, cache_dir)
        return TeacherSpec(arch=arch, path=str(path), sha256=sha,
                           mean=list(mean or info.mean), std=list(std or info.std))
    if choice.startswith("torchvision"):
        chosen = torchvision_weights(arch, choice)
        classes = len(chosen.meta.get("categories") or ()) or None
        if classes is not None and classes != info.num_classes:
            raise ConfigError(f"torchvision's {chosen} classify {classes} classes, {dataset} has "
                              f"{info.num_classes}; pass --teacher-checkpoint or train one with "
                              f"dfkd-bench teacher train --dataset {dataset} --arch {arch}")
        path = torchvision_weights_file(chosen, download=download).resolve()
        path, sha = _prepare_external(path, arch, info.num_classes, info.channels, size, [], cache_dir)
        preprocess = chosen.transforms()
        return TeacherSpec(arch=arch, path=str(path), sha256=sha,
                           mean=list(mean or getattr(preprocess, "mean", info.mean)),
                           std=list(std or getattr(preprocess, "std", info.std)))
    path = cached_teacher_path(dataset, arch, cache_dir)
    if not path.is_file():
        root = f" --data-root {data_root}" if data_root else (" --data-root DIR" if dataset != "digits" else "")
        cache = f" --teacher-cache {cache_dir}" if cache_dir else ""
        raise CheckpointError(
            f"no cached {arch} teacher for {dataset} in {path.parent}; make one with: "
            f"dfkd-bench teacher train --dataset {dataset} --arch {arch}{root}{cache}"
        )
    # Checked against the architecture at this image size before any run starts (e.g. a 16-pixel
    # LeNet asked for at --image-size 13 would otherwise fail inside the run, leaving a failed folder).
    _prepare_external(path, arch, info.num_classes, info.channels, size, [], cache_dir)
    meta = _cached_meta(str(path), *_stat_key(path))
    return TeacherSpec(arch=arch, path=str(path), sha256=teacher_sha256(path),
                       mean=list(meta.get("mean", info.mean)), std=list(meta.get("std", info.std)),
                       test_accuracy=meta.get("test_accuracy"))


def _prepare_external(path: Path, arch: str, num_classes: int, channels: int, image_size: int,
                      rules: Sequence[tuple[str, str]], cache_dir: str | None) -> tuple[Path, str]:
    """(the file runs load, the weights' hash); see :func:`resolve_teacher`."""
    size, mtime_ns = _stat_key(path)
    key = (str(path), size, mtime_ns, arch, num_classes, channels, image_size, tuple(rules),
           str(cache_dir or teacher_cache_dir()))
    target, sha = _prepare_external_cached(*key)
    if not target.is_file():  # the converted copy was deleted since: write it again
        _prepare_external_cached.cache_clear()
        target, sha = _prepare_external_cached(*key)
    return target, sha


@functools.lru_cache(maxsize=64)
def _prepare_external_cached(path: str, size: int, mtime_ns: int, arch: str, num_classes: int, channels: int,
                             image_size: int, rules: tuple[tuple[str, str], ...], cache_dir: str) -> tuple[Path, str]:
    model = _build_for_shapes(arch, num_classes, channels, image_size)
    fitted = fit_state_dict(model, extract_state_dict(read_checkpoint(path), path), source=path, arch=arch,
                            key_map=rules)
    sha = state_sha256(fitted.state)
    if not rules:  # build_teacher redoes the known renames and the BatchNorm counters on its own
        return Path(path), sha
    safe_arch = arch.replace(":", "_").replace("/", "_")
    target = Path(cache_dir) / "converted" / f"{sha[:16]}-{safe_arch}.pt"
    if not target.is_file() or teacher_sha256(target) != sha:
        import io

        buffer = io.BytesIO()
        torch.save({"state_dict": fitted.state,
                    "meta": {"source": path, "arch": arch, "key_map": [f"{o}={n}" for o, n in rules]}}, buffer)
        try:
            atomic_write_bytes(target, buffer.getvalue())
        except OSError as error:
            raise CheckpointError(f"cannot write the renamed copy of {path} into {target.parent} "
                                  f"({error.strerror or error}); pass --teacher-cache DIR (or set "
                                  "$DFKD_BENCH_TEACHERS) to a folder you can write") from None
    return target, sha


def _stat_key(path: Path) -> tuple[int, int]:
    stat = os.stat(path)
    return stat.st_size, stat.st_mtime_ns


@functools.lru_cache(maxsize=64)
def _cached_meta(path: str, size: int, mtime_ns: int) -> dict[str, Any]:
    return read_checkpoint(path).get("meta", {})


# ------------------------------------------------------------------ evaluate ---

@torch.no_grad()
def evaluate_classifier(model: nn.Module, loader, device: torch.device, progress: bool = False,
                        desc: str = "eval") -> dict[str, float]:
    """Top-1 accuracy (%) and mean cross-entropy of ``model`` on a loader of ([0,1] images, labels)."""
    was_training = model.training
    model.eval()
    correct, total, loss = 0, 0, 0.0
    for images, labels in tqdm(loader, desc=desc, disable=not progress, leave=False):
        images, labels = images.to(device), labels.to(device)
        logits = model(images)
        loss += F.cross_entropy(logits.float(), labels, reduction="sum").item()
        correct += (logits.argmax(1) == labels).sum().item()
        total += labels.numel()
    model.train(was_training)
    return {"accuracy": 100.0 * correct / max(total, 1), "cross_entropy": loss / max(total, 1), "samples": total}


def default_workers() -> int:
    return min(8, max(0, (os.cpu_count() or 1) - 1))


# --------------------------------------------------------------------- train ---

PIPELINES = ("auto", "tensors", "loader")


def recipe_for(dataset: str, name: str = "paper") -> TeacherRecipe:
    """A teacher recipe of ``dataset``: ``paper`` (the preset's; Table 4 where the paper has one)
    or ``fast`` (the short CIFAR recipe, see presets.py for its origin)."""
    from dfkd_bench.presets import teacher_recipes

    recipes = teacher_recipes(dataset)
    if not recipes:
        raise ConfigError(f"no teacher recipe for {dataset}")
    if name not in recipes:
        raise ConfigError(f"--recipe {name}: {dataset} has the teacher recipe(s) {', '.join(recipes)}; "
                          f"use one of them")
    return recipes[name]


def learning_rate(recipe: TeacherRecipe, epoch_float: float) -> float:
    """``step`` (Table 4): linear warm-up, then step decay at the milestones. ``onecycle``: linear
    from 0 to the peak over the warm-up epochs, then linear down to 0 at the end of training."""
    base = recipe.effective_lr
    if recipe.schedule == "onecycle":
        warmup = max(float(recipe.warmup_epochs), 1e-9)
        if epoch_float < warmup:
            return base * epoch_float / warmup
        return base * max(0.0, (recipe.epochs - epoch_float) / max(recipe.epochs - warmup, 1e-9))
    if recipe.warmup_epochs and epoch_float < recipe.warmup_epochs:
        return base * epoch_float / recipe.warmup_epochs
    decays = sum(1 for m in recipe.milestones if epoch_float >= m)
    return base * recipe.lr_decay ** decays


def tensor_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where decoded training/test images are kept: ``tensors/`` inside the teacher cache."""
    return Path(cache_dir or teacher_cache_dir()) / "tensors"


def _eval_epochs(epochs: int) -> set[int]:
    return {e for e in range(1, epochs + 1) if e == epochs or e % max(1, epochs // 10) == 0}


class TeacherStop:
    """A stop request for teacher training (set by SIGINT/SIGTERM in ``teacher train``).

    While the data are read (``training`` False) nothing is lost by stopping at once, so the
    signal handler may raise :class:`TeacherInterrupted` there; once epochs run, a stop is
    honoured at the end of the epoch, after its checkpoint is written.
    """

    def __init__(self) -> None:
        self.requested = False
        self.reason = ""
        self.training = False

    def request(self, reason: str) -> None:
        self.requested = True
        self.reason = reason


class TeacherInterrupted(Exception):
    """Teacher training stopped on request; its last epoch's checkpoint (if any) is saved."""


def training_checkpoint_path(dataset: str, arch: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where an unfinished teacher training keeps its per-epoch checkpoint: ``training/`` in the cache."""
    final = cached_teacher_path(dataset, arch, cache_dir)
    return final.parent / "training" / final.name


def _load_training_checkpoint(path: Path, key: str, progress: bool) -> dict[str, Any] | None:
    """The checkpoint of the same training (same ``key``), else None (with a line saying why)."""
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - a torn or foreign file: train from the start
        print(f"teacher training: ignoring the unreadable checkpoint {path} ({str(error).splitlines()[0][:200]}); "
              "training from the start")
        return None
    if not isinstance(state, dict) or state.get("key") != key:
        print(f"teacher training: {path} belongs to another training (recipe, seed, pipeline or device differ); "
              "training from the start")
        return None
    return state


def _save_training_checkpoint(path: Path, state: dict[str, Any]) -> None:
    import io

    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def train_teacher(dataset: str, arch: str, *, data_root: str | None = None, cache_dir: str | None = None,
                  epochs: int | None = None, batch_size: int | None = None, lr: float | None = None,
                  seed: int = 0, device: str = "auto", workers: int | None = None,
                  image_size: int | None = None, progress: bool = True, download: bool = False,
                  recipe: str = "paper", pipeline: str = "auto", stop: TeacherStop | None = None) -> dict[str, Any]:
    """Train ``arch`` on ``dataset`` with one of its recipes; store it in the teacher cache.

    After every epoch the whole training state (weights, optimiser, random streams, history) is
    written atomically to :func:`training_checkpoint_path`; the same call after a kill or a stop
    continues from the last epoch (on a CPU, to bit-identical weights) and removes it when done.
    ``stop.requested`` ends the training after the current epoch with :class:`TeacherInterrupted`.

    ``pipeline``: ``tensors`` trains from whole splits held on the device with batched device-side
    augmentation (:mod:`dfkd_bench.fast_train`; decoded image files cached in
    :func:`tensor_cache_dir`); ``loader`` is the classic DataLoader path; ``auto`` (default) picks
    ``tensors`` for the datasets that fit in memory (digits, MNIST, CIFAR, Tiny-ImageNet).
    """
    from dfkd_bench.runtime import resolve_device, seed_everything
    from dfkd_bench.fast_train import IN_MEMORY_DATASETS, augmentation_for, train_in_memory

    if pipeline not in PIPELINES:
        raise ConfigError(f"--pipeline {pipeline!r} is not one of {', '.join(PIPELINES)}")
    info = get_dataset_info(dataset)
    dataset = info.name
    base_recipe = recipe_for(dataset, recipe)
    changes = {k: v for k, v in (("epochs", epochs), ("batch_size", batch_size), ("lr", lr)) if v is not None}
    if "epochs" in changes:  # keep the decay points and the warm-up at the same fractions of training
        scale = changes["epochs"] / base_recipe.epochs
        changes["milestones"] = tuple(max(1, round(m * scale)) for m in base_recipe.milestones)
        if base_recipe.schedule == "onecycle":
            changes["warmup_epochs"] = max(1, round(base_recipe.warmup_epochs * scale))
    recipe_used = TeacherRecipe(**{**asdict(base_recipe), **changes})
    preset = get_preset(dataset)
    size = image_size or preset.image_size
    if pipeline == "auto":
        pipeline = "tensors" if dataset in IN_MEMORY_DATASETS else "loader"
    elif pipeline == "tensors" and dataset not in IN_MEMORY_DATASETS:
        raise ConfigError(f"--pipeline tensors holds whole splits in memory, which {dataset} does not fit; "
                          f"use --pipeline loader (or auto); in memory: {', '.join(IN_MEMORY_DATASETS)}")
    dev = resolve_device(device)
    seed_everything(seed)
    workers = default_workers() if workers is None else workers
    model = NormalizedModel(build_model(arch, info.num_classes, info.channels, size), info.mean, info.std).to(dev)
    start = time.time()
    extra: dict[str, Any] = {}
    # The checkpoint continues only the same training: same recipe, seed, pipeline, size and device kind.
    import json as _json

    key = _json.dumps({"dataset": dataset, "arch": arch, "recipe": asdict(recipe_used), "seed": seed,
                       "pipeline": pipeline, "image_size": size, "device": dev.type,
                       "workers": workers if pipeline == "loader" else None}, sort_keys=True, default=str)
    checkpoint_path = training_checkpoint_path(dataset, arch, cache_dir)
    resume = _load_training_checkpoint(checkpoint_path, key, progress)
    elapsed_before = float(resume.get("elapsed", 0.0)) if resume else 0.0
    if resume is not None:
        print(f"teacher training: resuming from epoch {int(resume['epoch'])} of {recipe_used.epochs} ({checkpoint_path})")

    def on_epoch_end(state: dict[str, Any]) -> None:
        state = {**state, "key": key, "elapsed": elapsed_before + time.time() - start}
        if state["epoch"] < recipe_used.epochs:  # the last epoch's state is the teacher file itself
            _save_training_checkpoint(checkpoint_path, state)
        if stop is not None and stop.requested and state["epoch"] < recipe_used.epochs:
            raise TeacherInterrupted(
                f"teacher training stopped by {stop.reason or 'a stop request'} after epoch {state['epoch']} of "
                f"{recipe_used.epochs}; checkpoint {checkpoint_path}; run the same command again to resume")

    def check_stop_before_training() -> None:
        if stop is not None:
            if stop.requested:
                raise TeacherInterrupted(f"teacher training stopped by {stop.reason or 'a stop request'} before its "
                                         "first epoch (nothing to save); run the same command again to start it")
            stop.training = True
    if pipeline == "tensors":
        from dfkd_bench.tensor_cache import split_tensors

        loaded_at = time.time()
        splits = {}
        for split in ("train", "test"):
            data = build_dataset(dataset, data_root, split, image_size=size, download=download)
            splits[split] = split_tensors(data, name=dataset, split=split, image_size=size,
                                          cache_dir=tensor_cache_dir(cache_dir), workers=workers,
                                          progress=progress)
        extra["data_seconds"] = time.time() - loaded_at
        extra["tensor_cache"] = {k: v.source for k, v in splits.items()}
        steps = recipe_used.epochs * max(1, len(splits["train"].labels) // recipe_used.batch_size)
        bar = tqdm(total=steps, desc=f"teacher {dataset}/{arch}", disable=not progress)

        def report(step: int, total: int, status: dict[str, Any]) -> None:
            bar.n = step
            bar.set_postfix({k: (f"{v:.3f}" if isinstance(v, float) else v) for k, v in status.items()})

        if resume is not None:
            bar.n = int(resume["epoch"]) * max(1, len(splits["train"].labels) // recipe_used.batch_size)
        check_stop_before_training()
        resolved: dict[str, Any] = {}
        try:
            history = train_in_memory(model, (splits["train"].images, splits["train"].labels),
                                      (splits["test"].images, splits["test"].labels), recipe=recipe_used,
                                      lr_at=learning_rate, augmentation=augmentation_for(dataset), device=dev,
                                      seed=seed, progress=report, eval_epochs=_eval_epochs(recipe_used.epochs),
                                      start_state=resume, on_epoch_end=on_epoch_end, info=resolved)
        finally:
            bar.close()
        extra["resolved_perf"] = resolved
    else:
        history = _train_with_loader(model, dataset, data_root, size, download, recipe_used, dev, workers, seed,
                                     progress, arch, start_state=resume, on_epoch_end=on_epoch_end,
                                     before_training=check_stop_before_training)
    final = history[-1]
    meta = {
        "dataset": dataset, "arch": arch, "num_classes": info.num_classes, "channels": info.channels,
        "image_size": size, "mean": list(info.mean), "std": list(info.std),
        "test_accuracy": final["accuracy"], "test_cross_entropy": final["cross_entropy"],
        "train_seconds": elapsed_before + time.time() - start, "recipe": asdict(recipe_used), "seed": seed,
        "history": history, "resumed_from_epoch": int(resume["epoch"]) if resume else None,
        "torch": str(torch.__version__), "device": str(dev), "pipeline": pipeline, **extra,
    }
    path = cached_teacher_path(dataset, arch, cache_dir)
    import io

    buffer = io.BytesIO()
    state = {k: v.detach().cpu().contiguous() for k, v in model.model.state_dict().items()}
    torch.save({"state_dict": state, "meta": meta}, buffer)
    atomic_write_bytes(path, buffer.getvalue())
    checkpoint_path.unlink(missing_ok=True)
    return {"path": str(path), **meta}


def _train_with_loader(model: nn.Module, dataset: str, data_root: str | None, size: int, download: bool,
                       recipe: TeacherRecipe, dev: torch.device, workers: int, seed: int, progress: bool,
                       arch: str, start_state: dict[str, Any] | None = None, on_epoch_end=None,
                       before_training=None) -> list[dict[str, Any]]:
    """The classic path: a DataLoader decodes and augments on the CPU (datasets too big for memory).

    Checkpointed per epoch like the in-memory path (plus the global random state, which the
    augmentation uses with ``workers=0``). # CHOSEN: with ``workers > 0`` the persistent worker
    processes keep their own random streams across epochs, which a resume starts afresh (seeded
    from the saved generator): the weights are then not bit-identical to an uninterrupted
    training, only trained by the same recipe on the same data order; with ``workers=0`` they are.
    """
    train_set = build_dataset(dataset, data_root, "train", train_augment=True, image_size=size, download=download)
    test_set = build_dataset(dataset, data_root, "test", image_size=size, download=download)
    generator = torch.Generator().manual_seed(seed)
    train_loader = DataLoader(train_set, batch_size=recipe.batch_size, shuffle=True, num_workers=workers,
                              drop_last=len(train_set) > recipe.batch_size, generator=generator,
                              persistent_workers=workers > 0, pin_memory=dev.type == "cuda")
    test_loader = DataLoader(test_set, batch_size=max(256, recipe.batch_size), num_workers=workers)
    optimizer = torch.optim.SGD(model.parameters(), lr=recipe.effective_lr, momentum=recipe.momentum,
                                weight_decay=recipe.weight_decay, nesterov=bool(recipe.nesterov and recipe.momentum))
    steps_per_epoch = len(train_loader)
    bar = tqdm(total=recipe.epochs * steps_per_epoch, desc=f"teacher {dataset}/{arch}", disable=not progress)
    history = []
    eval_epochs = _eval_epochs(recipe.epochs)
    first_epoch = 0
    if start_state is not None:
        model.load_state_dict(start_state["model"])
        optimizer.load_state_dict(start_state["optimizer"])
        generator.set_state(start_state["generator"])
        torch.set_rng_state(start_state["torch_rng"])
        history = [dict(entry) for entry in start_state["history"]]
        first_epoch = int(start_state["epoch"])
        bar.n = first_epoch * steps_per_epoch
    if before_training is not None:
        before_training()
    for epoch in range(first_epoch, recipe.epochs):
        model.train()
        for step, (images, labels) in enumerate(train_loader):
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(recipe, epoch + step / steps_per_epoch)
            images, labels = images.to(dev, non_blocking=True), labels.to(dev, non_blocking=True)
            loss = F.cross_entropy(model(images), labels, label_smoothing=recipe.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            bar.update(1)
            if step % 20 == 0:
                bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.3f}")
        if not math.isfinite(loss.item()):
            raise ConfigError(f"teacher training diverged at epoch {epoch + 1} (loss {loss.item()}); lower --lr")
        if epoch + 1 in eval_epochs:
            metrics = evaluate_classifier(model, test_loader, dev)
            history.append({"epoch": epoch + 1, **metrics})
            bar.set_postfix(epoch=epoch + 1, test_acc=f"{metrics['accuracy']:.2f}")
        if on_epoch_end is not None:
            on_epoch_end({"epoch": epoch + 1, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                          "generator": generator.get_state(), "torch_rng": torch.get_rng_state(),
                          "history": [dict(entry) for entry in history]})
    bar.close()
    return history
