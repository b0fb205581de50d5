"""A dataset split decoded once into memory: ``(uint8 N x C x H x W images, int64 N labels)``.

Training a small-image teacher from device-resident tensors needs every
training image decoded. For image-file datasets (an ImageFolder tree such as
``cifar10-jpeg``) decoding 60,000 JPEGs costs far more than an epoch on a GPU,
so the decoded tensors are stored on disk, next to the teacher cache
(``<teacher cache>/tensors/``), and reused by the next ``teacher train``.

A stored cache is never trusted blindly:

* its **fingerprint** (every image file's relative path, size, mtime and
  label, plus the dataset name, split, image size and this format's version)
  must equal the source folder's current one -- a file added, removed,
  replaced or touched rebuilds the cache;
* its **checksum** (sha256 of the tensor file's bytes, kept in a small JSON
  sidecar written after the tensor file) must match -- a truncated or
  corrupted file, or one whose sidecar is missing, rebuilds the cache;
* the loaded tensors must have the recorded shape and dtype.

Datasets that already live in memory (digits, MNIST, CIFAR pickles) are
converted directly and not stored: reading them again costs seconds.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from dfkd_bench.store import atomic_write_bytes, file_sha256

FORMAT_VERSION = 1


@dataclass
class SplitTensors:
    """A whole split in memory. ``images`` is uint8 (or float in [0, 1] for digits, whose pixels are
    not 8-bit); ``source`` says where it came from: ``built``, ``reused`` or ``memory``."""

    images: Tensor
    labels: Tensor
    source: str
    path: str | None = None
    reason: str = ""


def file_samples(dataset: Dataset) -> list[tuple[str, int]] | None:
    """The ``(path, label)`` list of an image-file dataset (ImageFolder-like), else ``None``."""
    samples = getattr(dataset, "samples", None)
    if isinstance(samples, list) and samples and isinstance(samples[0], (tuple, list)) \
            and isinstance(samples[0][0], str):
        return [(str(p), int(y)) for p, y in samples]
    return None


def source_fingerprint(samples: list[tuple[str, int]], *, dataset: str, split: str, image_size: int) -> str:
    """sha256 over every file's path (relative to their common folder), size, mtime (ns) and label."""
    root = os.path.commonpath([p for p, _ in samples]) if len(samples) > 1 else os.path.dirname(samples[0][0])
    digest = hashlib.sha256(f"dfkd-bench tensors v{FORMAT_VERSION}|{dataset}|{split}|{image_size}|"
                            f"{len(samples)}\n".encode())
    for path, label in samples:
        stat = os.stat(path)
        digest.update(f"{os.path.relpath(path, root)}|{stat.st_size}|{stat.st_mtime_ns}|{label}\n".encode())
    return digest.hexdigest()


def cache_paths(cache_dir: str | os.PathLike, dataset: str, split: str, image_size: int) -> tuple[Path, Path]:
    """``(tensor file, JSON sidecar)`` of a split in ``cache_dir``."""
    stem = Path(cache_dir) / f"{dataset}-{split}-{image_size}px"
    return stem.with_suffix(".tensors.pt"), stem.with_suffix(".tensors.json")


def _check_stored(tensor_path: Path, meta_path: Path, fingerprint: str) -> tuple[dict[str, Any] | None, str]:
    """``(sidecar, "")`` when the stored cache is current and intact, else ``(None, why not)``."""
    if not tensor_path.is_file() or not meta_path.is_file():
        return None, "no cache yet"
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        return None, "its description file is unreadable"
    if not isinstance(meta, dict) or meta.get("version") != FORMAT_VERSION:
        return None, "it was written by another version"
    if meta.get("fingerprint") != fingerprint:
        return None, "the source images changed"
    if meta.get("sha256") != file_sha256(tensor_path):
        return None, "its checksum does not match (corrupt or partly written)"
    return meta, ""


def _decode(dataset: Dataset, workers: int, progress: bool) -> tuple[Tensor, Tensor]:
    from dfkd_bench.data.loaders import load_as_tensors

    return load_as_tensors(dataset, num_workers=workers, progress=progress)


def split_tensors(dataset: Dataset, *, name: str, split: str, image_size: int,
                  cache_dir: str | os.PathLike | None, workers: int = 0, progress: bool = False) -> SplitTensors:
    """The whole split of ``dataset`` (built without augmentation) as tensors.

    Image-file datasets go through the on-disk cache in ``cache_dir`` (built when missing, stale or
    corrupt; reused otherwise); without ``cache_dir`` they are decoded every time. Other datasets
    are converted in memory.
    """
    from dfkd_bench.data.loaders import DigitsDataset

    if isinstance(dataset, DigitsDataset):  # float pixels (resized in float): keep them exact
        return SplitTensors(dataset.images.clone(), torch.as_tensor(dataset.targets, dtype=torch.int64), "memory")
    samples = file_samples(dataset)
    if samples is None or cache_dir is None:
        images, labels = _decode(dataset, workers, progress)
        return SplitTensors(images, labels, "memory")
    fingerprint = source_fingerprint(samples, dataset=name, split=split, image_size=image_size)
    tensor_path, meta_path = cache_paths(cache_dir, name, split, image_size)
    meta, reason = _check_stored(tensor_path, meta_path, fingerprint)
    if meta is not None:
        try:
            stored = torch.load(tensor_path, map_location="cpu", weights_only=True)
            images, labels = stored["images"], stored["labels"]
            if (list(images.shape) == meta.get("shape") and images.dtype == torch.uint8
                    and labels.dtype == torch.int64 and labels.shape == (images.shape[0],)):
                return SplitTensors(images, labels, "reused", str(tensor_path))
            reason = "its tensors do not have the recorded shape"
        except Exception:  # noqa: BLE001 - any unreadable file is rebuilt, never trusted
            reason = "it cannot be read"
    images, labels = _decode(dataset, workers, progress)
    if labels.tolist() != [y for _, y in samples]:
        raise RuntimeError("decoded labels differ from the dataset's file list")  # a bug, not a user error
    buffer = io.BytesIO()
    torch.save({"images": images, "labels": labels}, buffer)
    payload = buffer.getvalue()
    meta_path.unlink(missing_ok=True)  # a crash between the two writes leaves no sidecar: rebuilt next time
    atomic_write_bytes(tensor_path, payload)
    sidecar = {"version": FORMAT_VERSION, "dataset": name, "split": split, "image_size": image_size,
               "fingerprint": fingerprint, "sha256": hashlib.sha256(payload).hexdigest(),
               "shape": list(images.shape), "files": len(samples)}
    atomic_write_bytes(meta_path, json.dumps(sidecar, indent=1).encode())
    return SplitTensors(images, labels, "built", str(tensor_path), reason)
