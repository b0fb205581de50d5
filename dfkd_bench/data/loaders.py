"""Datasets by name: where the benchmark's real images come from.

Data-free distillation never shows real images to the student, but a
benchmark still needs them in three places: to train the teachers, to
evaluate teachers and students on a held-out split, and (for some methods'
ablations) as a reference. This module turns a dataset *name* plus a folder
into a :class:`torch.utils.data.Dataset`, so that configs and the command
line only ever say ``cifar10`` and ``--data-root DIR``.

Conventions shared by every dataset here:

* Items are ``(image, label)`` with ``image`` a float tensor ``C x H x W`` in
  ``[0, 1]`` and ``label`` an ``int``. Images are **not normalised**: the
  normalisation a teacher was trained with (:attr:`DatasetInfo.mean` /
  :attr:`DatasetInfo.std`) belongs to the model wrapper, because a
  generator's images and real images must go through exactly the same
  normalisation and the only way to guarantee that is to do it in one place.
* ``split`` is ``"train"`` or ``"test"``; for datasets whose held-out split
  is officially called ``val`` (Tiny-ImageNet, ImageNet, Places365) ``"test"``
  means that split.
* ``train_augment=True`` adds the augmentation the benchmark's teachers are
  trained with; the test split is never augmented.
* A ``root`` may point at the folder that holds a dataset's layout, or at a
  parent folder that holds a child named like the dataset (``cifar10``,
  ``cifar-10``, ``cifar10-jpeg``, ``tiny-imagenet-200`` ...), so one
  ``--data-root`` can serve every dataset.
* Every way a root can be wrong raises
  :class:`~dfkd_bench.errors.DatasetNotFoundError` with a single line naming
  the dataset, the paths looked at and the layout expected, because the CLI
  prints that line and nothing else.
* Construction only lists files (and reads the small MNIST / CIFAR arrays);
  image files are decoded lazily in ``__getitem__``, so building a dataset
  for a run that only needs its size or a few items is cheap.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision import datasets as tv_datasets
from torchvision import transforms as T
from torchvision.datasets.folder import default_loader

from dfkd_bench.data.catalog import _INFOS, SPLITS, _normalise_name, get_dataset_info
from dfkd_bench.errors import ConfigError, DataError, DatasetNotFoundError

# The paper's generator for the 224-pixel teachers makes 256 x 256 images;
# real images of those datasets are evaluated the torchvision way (resize the
# short side to 256, centre-crop 224), i.e. a crop of 224/256 = 0.875.
_LARGE_EVAL_CROP = 224
_LARGE_CROP_FRACTION = 224 / 256

# Progress bars are noise for the small test splits that are cached often.
_PROGRESS_MIN_ITEMS = 5000


# --------------------------------------------------------------------------- #
# Transforms
# --------------------------------------------------------------------------- #


def _small_transform(size: int, augment: bool) -> Callable:
    """PIL -> tensor pipeline for the 32/64-pixel natural-image datasets.

    The resize is unconditional so that ImageFolder copies whose files are not
    exactly ``size`` pixels still give fixed-size tensors; PIL returns an
    unchanged copy when the size already matches, so native-size pixels stay
    exact. The augmentation is the standard one of the CIFAR / Tiny-ImageNet
    teacher recipes (random crop with 1/8 padding, i.e. 4 pixels at 32 and 8
    at 64, plus a horizontal flip).
    """
    steps: list[Callable] = [T.Resize((size, size))]
    if augment:
        steps += [T.RandomCrop(size, padding=size // 8), T.RandomHorizontalFlip()]
    steps.append(T.ToTensor())
    return T.Compose(steps)


def _mnist_transform(size: int, native: int) -> Callable:
    """PIL -> tensor pipeline for MNIST: resize only when another size is asked.

    There is no augmentation, even with ``train_augment=True``: a flip changes
    a digit's identity, and the LeNet-5 MNIST teachers of the data-free KD
    literature (DAFL, DFAD) are trained on the plain images.
    """
    steps: list[Callable] = []
    if size != native:
        steps.append(T.Resize((size, size)))
    steps.append(T.ToTensor())
    return T.Compose(steps)


def _large_transform(image_size: int | None, augment: bool) -> Callable:
    """PIL -> tensor pipeline for ImageNet, Places365 and Food101.

    Evaluation is torchvision's reference protocol: resize the short side to
    256 and take the central 224 x 224 crop. That is how torchvision's AlexNet
    reaches the 56.52 % top-1 the paper quotes for its ImageNet teacher, so
    the numbers here are comparable with it. Training uses the matching
    reference augmentation, ``RandomResizedCrop(224)`` plus a horizontal flip.

    ``image_size`` (``None`` means 224) is the crop; the resize keeps the same
    224/256 ratio, so ``image_size=256`` resizes to 292 and crops 256. Note
    that :attr:`DatasetInfo.image_size` (256) is the *generator's* resolution,
    not this crop: the teachers pool globally and accept either.
    """
    crop = _LARGE_EVAL_CROP if image_size is None else image_size
    if augment:
        steps: list[Callable] = [T.RandomResizedCrop(crop), T.RandomHorizontalFlip()]
    else:
        steps = [T.Resize(round(crop / _LARGE_CROP_FRACTION)), T.CenterCrop(crop)]
    steps.append(T.ToTensor())
    return T.Compose(steps)


# --------------------------------------------------------------------------- #
# Locating a dataset under a root
# --------------------------------------------------------------------------- #

# Extra words a folder named like a dataset may carry: `cifar10-jpeg`,
# `cifar10_png`, `food101-images`, ...
_FOLDER_SUFFIXES = ("", "jpeg", "jpg", "png", "images", "imagefolder", "data", "dataset")


def _candidates(root: Path, aliases: Sequence[str]) -> list[Path]:
    """``root`` itself, then its child folders named like the dataset.

    Children are compared after :func:`_normalise_name`, so ``CIFAR10``,
    ``cifar-10`` and ``cifar10-jpeg`` all match the alias ``cifar10`` while
    ``cifar100`` does not.
    """
    found = [root]
    if root.is_dir():
        wanted = {alias + suffix for alias in aliases for suffix in _FOLDER_SUFFIXES}
        for child in sorted(root.iterdir()):
            if child.is_dir() and _normalise_name(child.name) in wanted:
                found.append(child)
    return found


def _not_found(name: str, root: Path, looked: Sequence[Path], expected: str, hint: str) -> DatasetNotFoundError:
    if not root.exists():
        where = f"'{root}' does not exist"
    elif not root.is_dir():
        where = f"'{root}' is not a folder"
    else:
        paths = ", ".join(str(p) for p in looked)
        if len(looked) == 1:
            paths += f"; it has no child folder named like {name}"
        where = f"no dataset found under '{root}' (looked at {paths})"
    return DatasetNotFoundError(_one_line(f"{name}: {where}; expected {expected}. {hint}"))


def _one_line(message: str) -> str:
    """Collapse whitespace so that a wrapped library message stays one line."""
    return " ".join(message.split())


def _require_root(name: str, root: str | os.PathLike | None, expected: str) -> Path:
    if root is None:
        raise DatasetNotFoundError(
            f"{name}: --data-root is required: pass the folder that holds {expected}"
        )
    return Path(root).expanduser()


_DOWNLOAD_HINT = "Pass --data-root DIR, or --download to fetch it with torchvision."
_NO_DOWNLOAD_HINT = "Pass --data-root DIR (this dataset cannot be downloaded automatically)."


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ConfigError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")


def _check_image_size(image_size: int | None) -> None:
    if image_size is not None and (
        isinstance(image_size, bool) or not isinstance(image_size, int) or image_size <= 0
    ):
        raise ConfigError(f"image_size must be a positive integer, got {image_size!r}")


# --------------------------------------------------------------------------- #
# ImageFolder trees
# --------------------------------------------------------------------------- #


def _class_folder_names(directory: Path) -> list[str]:
    """The class folders of an ImageFolder split, in label order.

    Names sort as strings (ImageFolder's rule), which gives the canonical
    label order for the usual copies: CIFAR-10/100 class names and ImageNet
    wnids are alphabetical in their official order. Folders named only by
    digits (``0`` .. ``99``) are ordered numerically instead, because as
    strings ``10`` would come before ``2`` and silently permute the labels.
    Hidden folders (``.ipynb_checkpoints`` ...) are not classes.
    """
    names = [e.name for e in os.scandir(directory) if e.is_dir() and not e.name.startswith(".")]
    if names and all(n.isdigit() for n in names):
        return sorted(names, key=int)
    return sorted(names)


def _load_image(path: str) -> "Image.Image":
    """torchvision's loader, but a file that cannot be decoded (truncated, not an image) is one
    error line naming the file, in ``teacher train/eval`` as inside ``run``."""
    from PIL import Image

    try:
        return default_loader(path)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        reason = (getattr(error, "strerror", None) or str(error)).strip().splitlines()
        reason = reason[0] if reason else "unreadable"
        raise DataError(f"cannot read image {path}: {reason}; replace or delete the file") from None


class _ImageFolder(tv_datasets.ImageFolder):
    """torchvision's ImageFolder with :func:`_class_folder_names` as class order, and image files
    that cannot be read named in one error line (:func:`_load_image`)."""

    def __init__(self, root, transform=None, **kwargs) -> None:
        kwargs.setdefault("loader", _load_image)
        super().__init__(root, transform=transform, **kwargs)

    def find_classes(self, directory: str | os.PathLike) -> tuple[list[str], dict[str, int]]:
        classes = _class_folder_names(Path(directory))
        if not classes:
            raise FileNotFoundError(f"no class folder in {directory}")
        return classes, {c: i for i, c in enumerate(classes)}


def _image_folder_splits(base: Path, eval_dirs: Sequence[str]) -> tuple[Path, Path] | None:
    """``(train_dir, eval_dir)`` when ``base`` looks like an ImageFolder tree."""
    train = base / "train"
    if not train.is_dir():
        return None
    for name in eval_dirs:
        if (base / name).is_dir():
            return train, base / name
    return None


def _build_image_folder(
    name: str,
    base: Path,
    split: str,
    eval_dirs: Sequence[str],
    transform: Callable,
) -> Dataset:
    """An ImageFolder split, after checking both splits have the right classes.

    Both splits are checked (listing their top-level folders is cheap) so that
    a tree whose test split lacks a class, which would shift every later
    label, fails here instead of giving a silently wrong accuracy.
    """
    num_classes = _INFOS[name].num_classes
    splits = _image_folder_splits(base, eval_dirs)
    assert splits is not None
    train_dir, eval_dir = splits
    train_classes = _class_folder_names(train_dir)
    eval_classes = _class_folder_names(eval_dir)
    for directory, classes in ((train_dir, train_classes), (eval_dir, eval_classes)):
        if len(classes) != num_classes:
            raise DatasetNotFoundError(
                f"{name}: the ImageFolder tree '{directory}' has {len(classes)} class folders, "
                f"expected {num_classes}"
            )
    if train_classes != eval_classes:
        differ = sorted(set(train_classes) ^ set(eval_classes))
        raise DatasetNotFoundError(
            f"{name}: the class folders of '{train_dir}' and '{eval_dir}' differ "
            f"(e.g. {', '.join(differ[:3])}); both splits need the same {num_classes} classes"
        )
    folder = train_dir if split == "train" else eval_dir
    try:
        return _ImageFolder(str(folder), transform=transform)
    except FileNotFoundError as err:
        raise DatasetNotFoundError(_one_line(f"{name}: cannot read the ImageFolder tree '{folder}': {err}")) from None


def _image_folder_expected(eval_dirs: Sequence[str], num_classes: int) -> str:
    evals = " or ".join(f"{d}/<class>/" for d in eval_dirs)
    return f"an ImageFolder tree with train/<class>/ and {evals} ({num_classes} class folders)"


# --------------------------------------------------------------------------- #
# digits (scikit-learn)
# --------------------------------------------------------------------------- #

_DIGITS_TEST_FRACTION = 0.2
_DIGITS_SEED = 0


def _digits_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(images, labels, train_index, test_index)`` of scikit-learn's digits.

    The split is stratified, seeded and sorted, so it is the same on every
    machine and every call: teachers trained on the train part must never see
    the test part, however often the dataset is rebuilt.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    images = bunch.images.astype(np.float32) / 16.0  # pixel values are 0..16
    labels = bunch.target.astype(np.int64)
    train_idx, test_idx = train_test_split(
        np.arange(len(labels)),
        test_size=_DIGITS_TEST_FRACTION,
        random_state=_DIGITS_SEED,
        stratify=labels,
    )
    return images, labels, np.sort(train_idx), np.sort(test_idx)


class DigitsDataset(Dataset):
    """scikit-learn's 8x8 digits as ``1 x size x size`` tensors in ``[0, 1]``.

    All 1,797 images fit in a few hundred kilobytes, so they are resized once
    at construction (bilinear, antialiased) rather than per item. Training
    augmentation is a small random affine jitter, never a flip (flips change digits).
    """

    def __init__(self, split: str, image_size: int = 16, augment: bool = False) -> None:
        images, labels, train_idx, test_idx = _digits_split()
        index = train_idx if split == "train" else test_idx
        x = torch.from_numpy(images[index]).unsqueeze(1)
        if image_size != x.shape[-1]:
            x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False, antialias=True)
        self.images = x.clamp_(0.0, 1.0).contiguous()
        self.targets = labels[index].tolist()
        self.indices = index  # positions in sklearn's load_digits(), for provenance
        # Small affine jitter (no flips: they change digits). Without it a
        # LeNet-5 teacher overfits the 1,437 training digits at ~97.8 % test
        # accuracy; with it, it reaches ~99 %.
        self.transform = T.RandomAffine(degrees=10, translate=(0.1, 0.1), scale=(0.9, 1.1)) if augment else None

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.images[index]
        if self.transform is not None:
            image = self.transform(image)
        return image, self.targets[index]


def _build_digits(root, split, train_augment, image_size, download) -> Dataset:
    """``root`` and ``download`` are ignored: the data ships with scikit-learn."""
    augment = train_augment and split == "train"
    return DigitsDataset(split, image_size or _INFOS["digits"].image_size, augment=augment)


# --------------------------------------------------------------------------- #
# MNIST
# --------------------------------------------------------------------------- #

_MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
_MNIST_EXPECTED = "torchvision's MNIST/raw/ folder with the four uncompressed *-idx?-ubyte files"


def _mnist_root(candidate: Path) -> Path | None:
    """The folder to give torchvision (the one holding ``MNIST/raw``), if any.

    torchvision looks for ``<root>/MNIST/raw``, so a candidate that *is* the
    ``MNIST`` folder is served through its parent.
    """
    if all((candidate / "MNIST" / "raw" / f).is_file() for f in _MNIST_FILES):
        return candidate
    if candidate.name == "MNIST" and all((candidate / "raw" / f).is_file() for f in _MNIST_FILES):
        return candidate.parent
    return None


def _build_mnist(root, split, train_augment, image_size, download) -> Dataset:
    """MNIST via :class:`torchvision.datasets.MNIST`.

    Accepts the torchvision root (the folder holding ``MNIST/raw``), the
    ``MNIST`` folder itself, or a parent holding a child named ``mnist``.
    """
    info = _INFOS["mnist"]
    base = _require_root("mnist", root, _MNIST_EXPECTED)
    looked = _candidates(base, ("mnist",))
    tv_root = next((r for r in map(_mnist_root, looked) if r is not None), None)
    if tv_root is None:
        if not download:
            raise _not_found("mnist", base, looked, _MNIST_EXPECTED, _DOWNLOAD_HINT)
        tv_root = base
    transform = _mnist_transform(image_size or info.image_size, info.image_size)
    try:
        return tv_datasets.MNIST(str(tv_root), train=split == "train", transform=transform, download=download)
    except Exception as err:  # torchvision raises RuntimeError / URLError / ValueError
        raise DatasetNotFoundError(_one_line(f"mnist: cannot load MNIST from '{tv_root}': {err}")) from None


# --------------------------------------------------------------------------- #
# CIFAR-10 / CIFAR-100
# --------------------------------------------------------------------------- #

_CIFAR_CLASSES = {"cifar10": tv_datasets.CIFAR10, "cifar100": tv_datasets.CIFAR100}
_CIFAR_EVAL_DIRS = ("test", "val")


def _cifar_pickle_root(candidate: Path, base_folder: str) -> Path | None:
    """The folder to give torchvision (the parent of ``base_folder``), if any."""
    if (candidate / base_folder).is_dir():
        return candidate
    if candidate.name == base_folder and candidate.is_dir():
        return candidate.parent
    return None


def _build_cifar(name: str, root, split, train_augment, image_size, download) -> Dataset:
    """CIFAR-10/100 from torchvision's pickles or from an ImageFolder tree.

    When one folder holds both layouts the pickles win, because they hold the
    exact pixels. torchvision verifies the pickles' md5 sums, so a truncated or
    foreign file is reported instead of silently loaded.
    """
    info = _INFOS[name]
    tv_class = _CIFAR_CLASSES[name]
    base_folder = tv_class.base_folder
    expected = (
        f"torchvision's '{base_folder}' folder or "
        + _image_folder_expected(_CIFAR_EVAL_DIRS[:1], info.num_classes)
    )
    base = _require_root(name, root, expected)
    looked = _candidates(base, (name,))
    transform = _small_transform(image_size or info.image_size, train_augment and split == "train")

    def from_pickles(tv_root: Path) -> Dataset:
        try:
            return tv_class(str(tv_root), train=split == "train", transform=transform, download=download)
        except Exception as err:  # RuntimeError on a failed md5 check, URLError on download
            raise DatasetNotFoundError(
                _one_line(
                    f"{name}: cannot load torchvision's '{base_folder}' under '{tv_root}' ({err}); "
                    f"torchvision checks the md5 sums of the official files: re-extract "
                    f"{tv_class.filename} there, or pass --download"
                )
            ) from None

    for candidate in looked:
        tv_root = _cifar_pickle_root(candidate, base_folder)
        if tv_root is not None:
            return from_pickles(tv_root)
        if _image_folder_splits(candidate, _CIFAR_EVAL_DIRS) is not None:
            return _build_image_folder(name, candidate, split, _CIFAR_EVAL_DIRS, transform)
    if download:
        return from_pickles(base)
    raise _not_found(name, base, looked, expected, _DOWNLOAD_HINT)


# --------------------------------------------------------------------------- #
# Tiny-ImageNet-200
# --------------------------------------------------------------------------- #

_TINY_EVAL_DIRS = ("val", "test")
_TINY_EXPECTED = (
    "the Tiny-ImageNet-200 layout (wnids.txt, train/<wnid>/images/, val/images/ and "
    "val/val_annotations.txt) or " + _image_folder_expected(_TINY_EVAL_DIRS, 200)
)


class TinyImageNet200(Dataset):
    """Tiny-ImageNet-200 read from its original layout (not an ImageFolder tree).

    Labels index the **sorted** wnids, not the order of ``wnids.txt``: sorted
    wnids are what ImageFolder gives on ``train/``, so a teacher trained on
    either layout uses the same label for the same class. The official
    ``test/`` images are unlabelled, so the labelled ``val/`` split (its
    labels come from ``val/val_annotations.txt``) serves as the test split.
    """

    def __init__(self, root: str | os.PathLike, split: str, transform: Callable | None = None) -> None:
        self.root = Path(root)
        self.transform = transform
        wnids = self.root.joinpath("wnids.txt").read_text().split()
        self.classes = sorted(set(wnids))
        if len(self.classes) != 200:
            raise DatasetNotFoundError(
                f"tinyimagenet: '{self.root / 'wnids.txt'}' lists {len(self.classes)} wnids, expected 200"
            )
        self.class_to_idx = {wnid: i for i, wnid in enumerate(self.classes)}
        self.samples = self._train_samples() if split == "train" else self._val_samples()
        self.targets = [label for _, label in self.samples]

    def _train_samples(self) -> list[tuple[str, int]]:
        samples = []
        for wnid, label in self.class_to_idx.items():
            folder = self.root / "train" / wnid / "images"
            if not folder.is_dir():
                raise DatasetNotFoundError(f"tinyimagenet: missing train folder '{folder}' for wnid {wnid}")
            files = sorted(e.name for e in os.scandir(folder) if e.is_file() and not e.name.startswith("."))
            samples += [(str(folder / f), label) for f in files]
        return samples

    def _val_samples(self) -> list[tuple[str, int]]:
        annotations = self.root / "val" / "val_annotations.txt"
        images = self.root / "val" / "images"
        samples = []
        for line_no, line in enumerate(annotations.read_text().splitlines(), start=1):
            fields = line.split("\t")
            if not line.strip():
                continue
            if len(fields) < 2 or fields[1] not in self.class_to_idx:
                raise DatasetNotFoundError(
                    f"tinyimagenet: line {line_no} of '{annotations}' does not name an image and one of "
                    f"the wnids of wnids.txt: {line.strip()[:80]!r}"
                )
            samples.append((str(images / fields[0]), self.class_to_idx[fields[1]]))
        return samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        image = _load_image(path)  # RGB: a few Tiny-ImageNet JPEGs are greyscale
        if self.transform is not None:
            image = self.transform(image)
        return image, label


def _is_tiny_original(candidate: Path) -> bool:
    return (candidate / "wnids.txt").is_file() and (candidate / "val" / "val_annotations.txt").is_file()


def _build_tinyimagenet(root, split, train_augment, image_size, download) -> Dataset:
    info = _INFOS["tinyimagenet"]
    base = _require_root("tinyimagenet", root, _TINY_EXPECTED)
    looked = _candidates(base, ("tinyimagenet200", "tinyimagenet"))
    transform = _small_transform(image_size or info.image_size, train_augment and split == "train")
    for candidate in looked:
        if _is_tiny_original(candidate):
            return TinyImageNet200(candidate, split, transform)
        if _image_folder_splits(candidate, _TINY_EVAL_DIRS) is not None:
            return _build_image_folder("tinyimagenet", candidate, split, _TINY_EVAL_DIRS, transform)
    raise _not_found("tinyimagenet", base, looked, _TINY_EXPECTED, _NO_DOWNLOAD_HINT)


# --------------------------------------------------------------------------- #
# ImageNet, Places365, Food101
# --------------------------------------------------------------------------- #


@dataclass(frozen=True)
class _LargeSpec:
    """How to find one of the 224-pixel datasets in torchvision's layout."""

    aliases: tuple[str, ...]
    eval_dirs: tuple[str, ...]
    tv_expected: str
    downloadable: bool
    # candidate folder -> folder to give torchvision, or None
    locate: Callable[[Path, str], Path | None]
    # (torchvision root, split, transform, download) -> dataset
    build: Callable[[Path, str, Callable, bool], Dataset]


def _locate_imagenet(candidate: Path, split: str) -> Path | None:
    # torchvision's ImageNet needs meta.bin (or the devkit it makes it from)
    # next to train/ and val/ (or the archives it extracts them from).
    has_meta = (candidate / "meta.bin").is_file() or (candidate / "ILSVRC2012_devkit_t12.tar.gz").is_file()
    folder = "train" if split == "train" else "val"
    archive = f"ILSVRC2012_img_{folder}.tar"
    if has_meta and ((candidate / folder).is_dir() or (candidate / archive).is_file()):
        return candidate
    return None


def _locate_places365(candidate: Path, split: str) -> Path | None:
    return candidate if (candidate / "categories_places365.txt").is_file() else None


def _locate_food101(candidate: Path, split: str) -> Path | None:
    for base, tv_root in ((candidate / "food-101", candidate), (candidate, candidate.parent)):
        if base.name == "food-101" and (base / "meta").is_dir() and (base / "images").is_dir():
            return tv_root
    return None


def _places365(root: Path, split: str, transform: Callable, download: bool) -> Dataset:
    tv_split = "train-standard" if split == "train" else "val"
    dataset = tv_datasets.Places365(str(root), split=tv_split, small=False, download=download, transform=transform)
    if not os.path.isdir(dataset.images_dir):
        raise RuntimeError(f"the image folder '{dataset.images_dir}' is missing")
    return dataset


_LARGE_SPECS: dict[str, _LargeSpec] = {
    "imagenet": _LargeSpec(
        aliases=("imagenet", "imagenet1k", "ilsvrc2012", "ilsvrc"),
        eval_dirs=("val", "test"),
        tv_expected="torchvision's ImageNet layout (meta.bin or ILSVRC2012_devkit_t12.tar.gz next to train/ and val/)",
        downloadable=False,
        locate=_locate_imagenet,
        build=lambda r, s, t, d: tv_datasets.ImageNet(str(r), split="train" if s == "train" else "val", transform=t),
    ),
    "places365": _LargeSpec(
        aliases=("places365", "places365standard", "places"),
        eval_dirs=("val", "test"),
        tv_expected="torchvision's Places365 layout (categories_places365.txt, the file lists, data_large_standard/ and val_large/)",
        downloadable=True,
        locate=_locate_places365,
        build=_places365,
    ),
    "food101": _LargeSpec(
        aliases=("food101",),
        eval_dirs=("test", "val"),
        tv_expected="torchvision's Food101 layout (food-101/meta/ and food-101/images/)",
        downloadable=True,
        locate=_locate_food101,
        build=lambda r, s, t, d: tv_datasets.Food101(str(r), split=s, transform=t, download=d),
    ),
}


def _build_large(name: str, root, split, train_augment, image_size, download) -> Dataset:
    """ImageNet / Places365 / Food101 via torchvision, else an ImageFolder tree.

    torchvision's classes are preferred when their layout is present because
    they carry the official label lists; an ImageFolder tree of the same
    classes (wnid folders for ImageNet) gives the same labels, since the
    official class lists are alphabetical.
    """
    info = _INFOS[name]
    spec = _LARGE_SPECS[name]
    expected = f"{spec.tv_expected} or {_image_folder_expected(spec.eval_dirs, info.num_classes)}"
    base = _require_root(name, root, expected)
    looked = _candidates(base, spec.aliases)
    transform = _large_transform(image_size, train_augment and split == "train")

    def from_torchvision(tv_root: Path) -> Dataset:
        try:
            return spec.build(tv_root, split, transform, download)
        except Exception as err:  # torchvision raises RuntimeError / FileNotFoundError / URLError
            raise DatasetNotFoundError(_one_line(f"{name}: cannot load torchvision's layout under '{tv_root}': {err}")) from None

    for candidate in looked:
        tv_root = spec.locate(candidate, split)
        if tv_root is not None:
            return from_torchvision(tv_root)
        if _image_folder_splits(candidate, spec.eval_dirs) is not None:
            return _build_image_folder(name, candidate, split, spec.eval_dirs, transform)
    if download and spec.downloadable:
        return from_torchvision(base)
    hint = _DOWNLOAD_HINT if spec.downloadable else _NO_DOWNLOAD_HINT
    raise _not_found(name, base, looked, expected, hint)


# --------------------------------------------------------------------------- #
# Public entry points
# --------------------------------------------------------------------------- #

_BUILDERS: dict[str, Callable[..., Dataset]] = {
    "digits": _build_digits,
    "mnist": _build_mnist,
    "cifar10": partial(_build_cifar, "cifar10"),
    "cifar100": partial(_build_cifar, "cifar100"),
    "tinyimagenet": _build_tinyimagenet,
    "imagenet": partial(_build_large, "imagenet"),
    "places365": partial(_build_large, "places365"),
    "food101": partial(_build_large, "food101"),
}


def build_dataset(
    name: str,
    root: str | os.PathLike | None,
    split: str,
    *,
    train_augment: bool = False,
    image_size: int | None = None,
    download: bool = False,
) -> Dataset:
    """Build split ``split`` (``"train"`` or ``"test"``) of dataset ``name``.

    Items are ``(image, label)``: an un-normalised float ``C x H x W`` tensor
    in ``[0, 1]`` and an ``int``. ``image_size=None`` means the dataset's
    :attr:`DatasetInfo.image_size` (for ImageNet, Places365 and Food101: the
    224-pixel evaluation crop, see :func:`_large_transform`). ``root`` is
    ignored by ``digits``. ``train_augment`` only affects the train split.
    ``download=True`` lets torchvision fetch the datasets it can fetch into
    ``root`` when no copy is found there.

    Raises :class:`ConfigError` for an unknown name, split or size and
    :class:`DatasetNotFoundError` when ``root`` does not hold the dataset.
    """
    info = get_dataset_info(name)
    _check_split(split)
    _check_image_size(image_size)
    return _BUILDERS[info.name](root, split, train_augment, image_size, download)


def _to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Exact inverse of ``ToTensor`` for images made from 8-bit pixels."""
    low, high = float(images.min()), float(images.max())
    if low < -1e-6 or high > 1 + 1e-6:
        raise ValueError(
            f"load_as_tensors expects un-normalised images in [0, 1], got values in [{low:.3f}, {high:.3f}]"
        )
    return images.mul(255).round_().clamp_(0, 255).to(torch.uint8)


def load_as_tensors(
    dataset: Dataset, max_items: int | None = None, num_workers: int = 0, progress: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load a small-image dataset into memory as ``(uint8 N x C x H x W, int64 N)``.

    Used to cache test splits for fast repeated evaluation: decoding 10,000
    JPEGs for every evaluation of every student would dominate a small run.
    Images are stored as uint8 (a quarter of float32's memory); for images
    built from 8-bit pixels (PIL + ``ToTensor``) ``images.float() / 255``
    gives back exactly the dataset's tensors. Images that were resized in
    float (``digits``) are quantised to the nearest 1/255.

    ``max_items`` keeps the first ``max_items`` items (in dataset order). A
    progress bar is shown for more than 5,000 items unless ``progress`` is false.
    """
    from tqdm.auto import tqdm

    n = len(dataset)  # type: ignore[arg-type]
    if max_items is not None:
        if max_items < 0:
            raise ValueError(f"max_items must be >= 0, got {max_items}")
        n = min(n, max_items)
        dataset = Subset(dataset, range(n))
    loader = DataLoader(dataset, batch_size=512, shuffle=False, num_workers=num_workers)
    images, labels = [], []
    with tqdm(total=n, unit="img", desc="loading", disable=not progress or n <= _PROGRESS_MIN_ITEMS,
              leave=False) as bar:
        for x, y in loader:
            images.append(_to_uint8(x))
            labels.append(torch.as_tensor(y, dtype=torch.int64))
            bar.update(len(y))
    if not images:
        raise ValueError("load_as_tensors got an empty dataset")
    return torch.cat(images), torch.cat(labels)
