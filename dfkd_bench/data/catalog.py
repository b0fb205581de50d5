"""The datasets the benchmark knows, by name: classes, channels, the presets' image size and the
normalisation its teachers are trained with (:class:`DatasetInfo`). Reads no file: a config,
a dry run or ``dfkd-bench list`` needs these facts without the images.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass

from dfkd_bench.errors import ConfigError

SPLITS = ("train", "test")

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class DatasetInfo:
    """Static facts about a dataset that configs and model wrappers need.

    ``image_size`` is the default resolution the paper's presets use for the
    dataset (for the ImageNet-like datasets, the generator's 256 x 256; real
    images of those are evaluated as 224-pixel centre crops, see
    :func:`build_dataset`). ``mean`` / ``std`` are the per-channel
    normalisation the teachers are trained with; datasets themselves return
    un-normalised images.
    """

    name: str
    num_classes: int
    channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    description: str


# Mean / std of the `digits` train split (1,437 images, see _digits_split),
# after scaling the 0..16 pixels to [0, 1] and resizing 8x8 -> 16x16 with
# bilinear interpolation (antialias=True): the mean and the (population)
# standard deviation over all pixels of all train images. Recomputed by
# tests/test_data.py::test_digits_mean_std_match_train_split.
_DIGITS_MEAN = (0.3054,)
_DIGITS_STD = (0.3190,)

_INFOS: dict[str, DatasetInfo] = {
    info.name: info
    for info in (
        DatasetInfo(
            name="digits",
            num_classes=10,
            channels=1,
            image_size=16,
            mean=_DIGITS_MEAN,
            std=_DIGITS_STD,
            description=(
                "scikit-learn's 8x8 handwritten digits (1,797 images), fixed stratified "
                "80/20 split, upsampled to 16x16; ships with scikit-learn, no download"
            ),
        ),
        DatasetInfo(
            name="mnist",
            num_classes=10,
            channels=1,
            image_size=28,
            mean=(0.1307,),
            std=(0.3081,),
            description="MNIST handwritten digits, 60,000 train / 10,000 test, 28x28 grey",
        ),
        DatasetInfo(
            name="cifar10",
            num_classes=10,
            channels=3,
            image_size=32,
            mean=(0.4914, 0.4822, 0.4465),
            std=(0.2023, 0.1994, 0.2010),
            description="CIFAR-10, 50,000 train / 10,000 test, 32x32 colour, 10 classes",
        ),
        DatasetInfo(
            name="cifar100",
            num_classes=100,
            channels=3,
            image_size=32,
            mean=(0.5071, 0.4865, 0.4409),
            std=(0.2673, 0.2564, 0.2762),
            description="CIFAR-100, 50,000 train / 10,000 test, 32x32 colour, 100 fine classes",
        ),
        DatasetInfo(
            name="tinyimagenet",
            num_classes=200,
            channels=3,
            image_size=64,
            mean=(0.4802, 0.4481, 0.3975),
            std=(0.2302, 0.2265, 0.2262),
            description=(
                "Tiny-ImageNet-200, 100,000 train / 10,000 val (used as test), 64x64 colour; "
                "labels index the sorted wnids"
            ),
        ),
        DatasetInfo(
            name="imagenet",
            num_classes=1000,
            channels=3,
            image_size=256,
            mean=_IMAGENET_MEAN,
            std=_IMAGENET_STD,
            description=(
                "ImageNet-1k (ILSVRC 2012), val used as test; evaluated as 224 centre crops "
                "of the 256-resized image"
            ),
        ),
        DatasetInfo(
            name="places365",
            num_classes=365,
            channels=3,
            image_size=256,
            mean=_IMAGENET_MEAN,
            std=_IMAGENET_STD,
            description=(
                "Places365-Standard (high-resolution images), val used as test; evaluated as "
                "224 centre crops of the 256-resized image"
            ),
        ),
        DatasetInfo(
            name="food101",
            num_classes=101,
            channels=3,
            image_size=256,
            mean=_IMAGENET_MEAN,
            std=_IMAGENET_STD,
            description=(
                "Food-101, 75,750 train / 25,250 test; evaluated as 224 centre crops of the "
                "256-resized image"
            ),
        ),
    )
}


def _normalise_name(name: str) -> str:
    """Lower-case and drop separators, so ``CIFAR-10`` and ``tiny_imagenet`` resolve."""
    return re.sub(r"[^a-z0-9]", "", name.lower())


def get_dataset_info(name: str) -> DatasetInfo:
    """Return the :class:`DatasetInfo` of ``name``.

    Names are matched ignoring case and separators (``CIFAR-10`` is
    ``cifar10``). An unknown name raises :class:`ConfigError` with one line
    that suggests close matches and lists the known names.
    """
    key = _normalise_name(str(name))
    for info in _INFOS.values():
        if _normalise_name(info.name) == key:
            return info
    close = difflib.get_close_matches(key, list(_INFOS), n=3, cutoff=0.6)
    hint = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
    raise ConfigError(
        f"unknown dataset {name!r}{hint}; known datasets: {', '.join(_INFOS)}"
    )


def list_datasets() -> list[DatasetInfo]:
    """All datasets the benchmark can load, in a stable order (small to large)."""
    return list(_INFOS.values())
