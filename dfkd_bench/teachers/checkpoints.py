"""Teacher checkpoint files: reading them without running code (``weights_only=True``, or
safetensors), finding the state_dict inside, ``--teacher-key-map`` renames, fitting a state_dict
to an architecture (with one-line errors naming the mismatching keys) and content hashes.
"""

from __future__ import annotations

import functools
import hashlib
import os
import pickle
import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from dfkd_bench.errors import CheckpointError, ConfigError
from dfkd_bench.store import file_sha256


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
            tries.append((known.name, _reshaped(renamed, expected, known.reshape)))
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


def _reshaped(state: "OrderedDict[str, Tensor]", expected: dict[str, Tensor],
              patterns: Sequence[str]) -> "OrderedDict[str, Tensor]":
    """``state`` with each tensor whose key matches one of ``patterns`` reshaped to the architecture's
    shape, where the element counts agree (else left as it is, for :func:`_check_shapes` to name)."""
    if not patterns:
        return state
    out = OrderedDict(state)
    for key, value in state.items():
        target = expected.get(key)
        if (target is not None and any(re.search(p, key) for p in patterns)
                and tuple(value.shape) != tuple(target.shape) and value.numel() == target.numel()):
            out[key] = value.reshape(target.shape)
    return out


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
