"""Tests of dfkd_bench.data: every loader on a small copy the test writes itself.

Each layout (torchvision pickles, MNIST idx files, ImageFolder trees, the
original Tiny-ImageNet tree) is written into ``tmp_path`` with pixel values
that encode the image's identity, so the tests can check that labels and
pixels come back exactly, not just that something loads. The only test that
reads the real data is marked ``data`` and skipped when it is absent.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.datasets.cifar as tv_cifar
from PIL import Image

from dfkd_bench.data.catalog import DatasetInfo, get_dataset_info, list_datasets
from dfkd_bench.data.loaders import build_dataset, load_as_tensors
from dfkd_bench.errors import ConfigError, DatasetNotFoundError

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
SHARED_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"


# --------------------------------------------------------------------------- #
# helpers
# --------------------------------------------------------------------------- #


def coded_image(code: int, size: int = 32, channels: int = 3) -> np.ndarray:
    """An HxWxC uint8 image whose pixels identify ``code`` (and vary in space)."""
    rng = np.random.default_rng(code)
    image = rng.integers(0, 256, size=(size, size, channels), dtype=np.uint8)
    image[0, 0, 0] = code % 256  # readable marker
    return image


def save_png(path: Path, array: np.ndarray) -> None:
    """Save losslessly (PNG, whatever the extension) so pixels round-trip exactly."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array.squeeze(-1) if array.shape[-1] == 1 else array).save(path, format="PNG")


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def as_uint8_hwc(image: torch.Tensor) -> np.ndarray:
    """Invert ToTensor: C x H x W float in [0, 1] -> H x W x C uint8."""
    return (image * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()


def write_cifar_tree(base: Path, classes: list[str], train_per_class: int = 2, test_per_class: int = 1) -> dict:
    """An ImageFolder CIFAR tree; returns {(split, label, k): pixels}."""
    pixels = {}
    for split, per_class in (("train", train_per_class), ("test", test_per_class)):
        for label, name in enumerate(classes):
            for k in range(per_class):
                image = coded_image(1000 * (split == "test") + 10 * label + k)
                save_png(base / split / name / f"{k:04d}.png", image)
                pixels[(split, label, k)] = image
    return pixels


def write_class_tree(base: Path, num_classes: int, splits: tuple[str, ...], names=None) -> None:
    """One tiny image per class per split; the same bytes everywhere, for speed."""
    data = png_bytes(coded_image(7, size=24))
    names = names or [f"n{i:08d}" for i in range(num_classes)]
    for split in splits:
        for name in names:
            folder = base / split / name
            folder.mkdir(parents=True)
            (folder / "img_0.png").write_bytes(data)


def assert_one_line_error(excinfo, *fragments: str) -> None:
    message = str(excinfo.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


# --------------------------------------------------------------------------- #
# registry
# --------------------------------------------------------------------------- #


def test_list_datasets_names_and_consistent_infos():
    infos = list_datasets()
    assert [i.name for i in infos] == [
        "digits", "mnist", "cifar10", "cifar100", "tinyimagenet", "imagenet", "places365", "food101",
    ]
    for info in infos:
        assert isinstance(info, DatasetInfo)
        assert len(info.mean) == len(info.std) == info.channels
        assert get_dataset_info(info.name) is info
    assert get_dataset_info("cifar10").std == (0.2023, 0.1994, 0.2010)
    assert get_dataset_info("imagenet").image_size == 256
    assert get_dataset_info("tinyimagenet").num_classes == 200


def test_dataset_names_ignore_case_and_separators():
    assert get_dataset_info("CIFAR-10").name == "cifar10"
    assert get_dataset_info("Tiny_ImageNet").name == "tinyimagenet"


def test_unknown_dataset_is_a_one_line_config_error_with_suggestions():
    with pytest.raises(ConfigError) as excinfo:
        get_dataset_info("cifar1O")
    assert_one_line_error(excinfo, "'cifar1O'", "did you mean 'cifar10'", "known datasets: digits, mnist")
    with pytest.raises(ConfigError):
        build_dataset("svhn", None, "test")


def test_bad_split_and_image_size_are_config_errors():
    with pytest.raises(ConfigError, match="split"):
        build_dataset("digits", None, "val")
    for bad in (0, -3, 16.0):
        with pytest.raises(ConfigError, match="image_size"):
            build_dataset("digits", None, "train", image_size=bad)


# --------------------------------------------------------------------------- #
# digits
# --------------------------------------------------------------------------- #


def test_digits_split_sizes_disjoint_and_stratified():
    from sklearn.datasets import load_digits

    train = build_dataset("digits", None, "train")
    test = build_dataset("digits", None, "test")
    assert len(train) + len(test) == 1797
    assert len(test) == 360
    assert not set(train.indices) & set(test.indices)
    target = load_digits().target
    assert train.targets == target[train.indices].tolist()
    assert test.targets == target[test.indices].tolist()
    # stratified: every class is split 80/20 up to rounding
    for label in range(10):
        n_label = int((target == label).sum())
        assert abs(test.targets.count(label) - 0.2 * n_label) <= 1


def test_digits_split_is_deterministic_and_never_changes():
    a = build_dataset("digits", "/does/not/matter", "test")
    b = build_dataset("digits", None, "test")
    assert torch.equal(a.images, b.images) and a.targets == b.targets
    # The test indices are pinned: if scikit-learn ever changed how
    # train_test_split draws, teachers trained on the old train split would
    # have seen part of the new test split.
    digest = hashlib.sha256(np.asarray(b.indices, dtype=np.int64).tobytes()).hexdigest()
    assert digest.startswith("2fbaae31b8c6aad1")


@pytest.mark.parametrize("size", [16, 32, 8, 5])
def test_digits_shapes_range_and_items(size):
    dataset = build_dataset("digits", None, "train", image_size=size)
    image, label = dataset[3]
    assert image.shape == (1, size, size) and image.dtype == torch.float32
    assert isinstance(label, int) and 0 <= label < 10
    assert dataset.images.min() >= 0 and dataset.images.max() <= 1


def test_digits_default_size_is_16_and_native_pixels_are_sixteenths():
    from sklearn.datasets import load_digits

    assert build_dataset("digits", None, "train")[0][0].shape == (1, 16, 16)
    native = build_dataset("digits", None, "train", image_size=8)
    expected = torch.from_numpy(load_digits().images[native.indices[0]] / 16.0).float()
    assert torch.equal(native[0][0][0], expected)


def test_digits_mean_std_match_train_split():
    images = build_dataset("digits", None, "train", image_size=16).images
    info = get_dataset_info("digits")
    assert abs(images.mean().item() - info.mean[0]) < 1e-3
    assert abs(images.std(unbiased=False).item() - info.std[0]) < 1e-3


# --------------------------------------------------------------------------- #
# MNIST
# --------------------------------------------------------------------------- #


def write_mnist(raw: Path, n_train: int = 20, n_test: int = 12) -> dict:
    """MNIST idx files as torchvision reads them (big-endian magic + dims)."""
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    arrays = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n, dtype=np.uint8)
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 2051, n, 28, 28) + images.tobytes())
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 2049, n) + labels.tobytes())
        arrays[prefix] = (images, labels)
    return arrays


def test_mnist_round_trips_pixels_and_labels_from_both_root_forms(tmp_path):
    arrays = write_mnist(tmp_path / "MNIST" / "raw")
    for root in (tmp_path, tmp_path / "MNIST"):
        for split, prefix in (("train", "train"), ("test", "t10k")):
            dataset = build_dataset("mnist", str(root), split)
            images, labels = arrays[prefix]
            assert len(dataset) == len(labels)
            for i in (0, len(labels) - 1):
                image, label = dataset[i]
                assert image.shape == (1, 28, 28)
                assert label == int(labels[i])
                assert np.array_equal(as_uint8_hwc(image)[..., 0], images[i])


def test_mnist_resizes_and_does_not_augment(tmp_path):
    write_mnist(tmp_path / "MNIST" / "raw")
    big = build_dataset("mnist", tmp_path, "train", image_size=32)
    assert big[0][0].shape == (1, 32, 32)
    plain = build_dataset("mnist", tmp_path, "train")
    augmented = build_dataset("mnist", tmp_path, "train", train_augment=True)
    assert torch.equal(plain[5][0], augmented[5][0])


def test_mnist_parent_folder_lookup(tmp_path):
    write_mnist(tmp_path / "mnist" / "MNIST" / "raw")
    assert len(build_dataset("mnist", tmp_path, "test")) == 12


def test_mnist_missing_file_is_reported(tmp_path):
    write_mnist(tmp_path / "MNIST" / "raw")
    (tmp_path / "MNIST" / "raw" / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DatasetNotFoundError) as excinfo:
        build_dataset("mnist", tmp_path, "test")
    assert_one_line_error(excinfo, "mnist", str(tmp_path), "MNIST/raw")


# --------------------------------------------------------------------------- #
# CIFAR pickles
# --------------------------------------------------------------------------- #


def _dump(path: Path, obj) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def write_cifar10_pickles(base: Path, per_batch: int = 4, n_test: int = 6) -> dict:
    """torchvision's cifar-10-batches-py with the real files' keys and array layout."""
    folder = base / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    out = {"train": ([], []), "test": ([], [])}
    batches = [(f"data_batch_{i}", "train", per_batch) for i in range(1, 6)] + [("test_batch", "test", n_test)]
    for file_name, split, n in batches:
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)  # rows: 1024 R, 1024 G, 1024 B
        labels = rng.integers(0, 10, size=n).tolist()
        _dump(folder / file_name, {"batch_label": file_name, "labels": labels, "data": data,
                                   "filenames": [f"{file_name}_{i}.png" for i in range(n)]})
        out[split][0].append(data)
        out[split][1].extend(labels)
    _dump(folder / "batches.meta", {"label_names": CIFAR10_CLASSES, "num_cases_per_batch": per_batch, "num_vis": 3072})
    return {split: (np.concatenate(d).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), np.array(l))
            for split, (d, l) in out.items()}


def write_cifar100_pickles(base: Path, n_train: int = 8, n_test: int = 5) -> dict:
    folder = base / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(2)
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        fine = rng.integers(0, 100, size=n).tolist()
        _dump(folder / split, {"filenames": [f"{i}.png" for i in range(n)], "batch_label": split,
                               "fine_labels": fine, "coarse_labels": [f // 5 for f in fine], "data": data})
        out[split] = (data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), np.array(fine))
    _dump(folder / "meta", {"fine_label_names": [f"class{i:03d}" for i in range(100)],
                            "coarse_label_names": [f"super{i:02d}" for i in range(20)]})
    return out


@pytest.fixture
def skip_cifar_md5(monkeypatch):
    """The fake pickles cannot have the real md5 sums: check existence only.

    The loader still goes through torchvision's CIFAR10/CIFAR100 classes;
    only their module-level ``check_integrity`` is replaced.
    """
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda fpath, md5=None: os.path.isfile(fpath))


def assert_matches_arrays(dataset, images: np.ndarray, labels: np.ndarray) -> None:
    assert len(dataset) == len(labels)
    for i in range(len(labels)):
        image, label = dataset[i]
        assert image.shape == (3, 32, 32)
        assert label == int(labels[i])
        assert np.array_equal(as_uint8_hwc(image), images[i])


def test_cifar10_pickles_round_trip(tmp_path, skip_cifar_md5):
    arrays = write_cifar10_pickles(tmp_path)
    for split in ("train", "test"):
        assert_matches_arrays(build_dataset("cifar10", str(tmp_path), split), *arrays[split])
    assert len(build_dataset("cifar10", tmp_path, "train")) == 20


@pytest.mark.parametrize("form", ["batches_folder", "child_folder"])
def test_cifar10_pickles_other_root_forms(tmp_path, skip_cifar_md5, form):
    if form == "batches_folder":
        arrays = write_cifar10_pickles(tmp_path)
        root = tmp_path / "cifar-10-batches-py"
    else:
        arrays = write_cifar10_pickles(tmp_path / "CIFAR10")
        root = tmp_path
    assert_matches_arrays(build_dataset("cifar10", root, "test"), *arrays["test"])


def test_cifar10_pickles_failing_md5_are_reported(tmp_path):
    write_cifar10_pickles(tmp_path)
    with pytest.raises(DatasetNotFoundError) as excinfo:
        build_dataset("cifar10", tmp_path, "test")
    assert_one_line_error(excinfo, "cifar10", str(tmp_path), "cifar-10-batches-py")


def test_cifar100_pickles_round_trip(tmp_path, skip_cifar_md5):
    arrays = write_cifar100_pickles(tmp_path)
    for split in ("train", "test"):
        assert_matches_arrays(build_dataset("cifar100", tmp_path, split), *arrays[split])


def test_cifar_train_augmentation_only_on_train_split(tmp_path, skip_cifar_md5):
    write_cifar10_pickles(tmp_path)
    plain_test = build_dataset("cifar10", tmp_path, "test")
    aug_test = build_dataset("cifar10", tmp_path, "test", train_augment=True)
    assert all(torch.equal(plain_test[i][0], aug_test[i][0]) for i in range(len(plain_test)))

    torch.manual_seed(0)
    plain = build_dataset("cifar10", tmp_path, "train")[0][0]
    augmented = build_dataset("cifar10", tmp_path, "train", train_augment=True)
    views = [augmented[0][0] for _ in range(8)]
    assert all(v.shape == (3, 32, 32) for v in views)
    assert any(not torch.equal(v, plain) for v in views)
    # crop + flip only move pixels (and pad with zeros): no new values appear
    assert all(set(v.unique().tolist()) <= set(plain.unique().tolist()) | {0.0} for v in views)


def test_cifar_resizes_when_asked(tmp_path, skip_cifar_md5):
    write_cifar10_pickles(tmp_path)
    assert build_dataset("cifar10", tmp_path, "test", image_size=64)[0][0].shape == (3, 64, 64)
    assert build_dataset("cifar10", tmp_path, "train", image_size=16, train_augment=True)[0][0].shape == (3, 16, 16)


# --------------------------------------------------------------------------- #
# CIFAR ImageFolder trees
# --------------------------------------------------------------------------- #


def check_cifar_tree(dataset, pixels: dict, split: str) -> None:
    per_class = {"train": 2, "test": 1}[split]
    assert len(dataset) == 10 * per_class
    for index in range(len(dataset)):
        label, k = divmod(index, per_class)  # ImageFolder order: class, then file name
        image, got = dataset[index]
        assert got == label
        assert np.array_equal(as_uint8_hwc(image), pixels[(split, label, k)])


def test_cifar10_image_folder_direct_root(tmp_path):
    pixels = write_cifar_tree(tmp_path, CIFAR10_CLASSES)
    for split in ("train", "test"):
        check_cifar_tree(build_dataset("cifar10", str(tmp_path), split), pixels, split)


@pytest.mark.parametrize("child", ["cifar10", "cifar10-jpeg", "CIFAR10", "cifar-10"])
def test_cifar10_image_folder_parent_root(tmp_path, child):
    pixels = write_cifar_tree(tmp_path / child, CIFAR10_CLASSES)
    (tmp_path / "cifar100").mkdir()  # a sibling that must not be mistaken for cifar10
    check_cifar_tree(build_dataset("cifar10", tmp_path, "test"), pixels, "test")


def test_cifar100_does_not_pick_up_a_cifar10_child(tmp_path):
    write_cifar_tree(tmp_path / "cifar10-jpeg", CIFAR10_CLASSES)
    with pytest.raises(DatasetNotFoundError) as excinfo:
        build_dataset("cifar100", tmp_path, "test")
    assert_one_line_error(excinfo, "cifar100", str(tmp_path), "cifar-100-python", "--data-root")


def test_numeric_class_folders_are_ordered_numerically(tmp_path):
    write_class_tree(tmp_path, 100, ("train", "test"), names=[str(i) for i in range(100)])
    dataset = build_dataset("cifar100", tmp_path, "test")
    assert dataset.classes[:3] == ["0", "1", "2"]
    label_of = {Path(path).parent.name: label for path, label in dataset.samples}
    assert all(label_of[str(i)] == i for i in range(100))


def test_image_folder_with_wrong_class_count(tmp_path):
    write_cifar_tree(tmp_path, CIFAR10_CLASSES[:3])
    with pytest.raises(DatasetNotFoundError) as excinfo:
        build_dataset("cifar10", tmp_path, "train")
    assert_one_line_error(excinfo, "cifar10", str(tmp_path / "train"), "3 class folders", "expected 10")


def test_image_folder_with_different_train_and_test_classes(tmp_path):
    write_cifar_tree(tmp_path, CIFAR10_CLASSES)
    (tmp_path / "test" / "truck").rename(tmp_path / "test" / "lorry")
    with pytest.raises(DatasetNotFoundError) as excinfo:
        build_dataset("cifar10", tmp_path, "train")
    assert_one_line_error(excinfo, "cifar10", "differ", "lorry")


def test_image_folder_with_an_empty_class_folder(tmp_path):
    write_cifar_tree(tmp_path, CIFAR10_CLASSES)
    for file in (tmp_path / "test" / "cat").iterdir():
        file.unlink()
    with pytest.raises(DatasetNotFoundError) as excinfo:
        build_dataset("cifar10", tmp_path, "test")
    assert_one_line_error(excinfo, "cifar10", str(tmp_path / "test"), "cat")


# --------------------------------------------------------------------------- #
# errors shared by every dataset that needs a root
# --------------------------------------------------------------------------- #

ROOTED = ["mnist", "cifar10", "cifar100", "tinyimagenet", "imagenet", "places365", "food101"]


@pytest.mark.parametrize("name", ROOTED)
def test_missing_root(tmp_path, name):
    missing = tmp_path / "nowhere"
    with pytest.raises(DatasetNotFoundError) as excinfo:
        build_dataset(name, str(missing), "test")
    assert_one_line_error(excinfo, f"{name}:", str(missing), "expected", "--data-root")


@pytest.mark.parametrize("name", ROOTED)
def test_root_without_the_dataset(tmp_path, name):
    (tmp_path / "train" / "a").mkdir(parents=True)  # a train/ without a test split
    (tmp_path / "notes.txt").write_text("nothing to see")
    with pytest.raises(DatasetNotFoundError) as excinfo:
        build_dataset(name, tmp_path, "train")
    assert_one_line_error(excinfo, f"{name}:", f"looked at {tmp_path}", "expected")


@pytest.mark.parametrize("name", ROOTED)
def test_none_root_says_data_root_is_required(name):
    with pytest.raises(DatasetNotFoundError) as excinfo:
        build_dataset(name, None, "train")
    assert_one_line_error(excinfo, f"{name}:", "--data-root is required")


def test_root_that_is_a_file(tmp_path):
    file = tmp_path / "cifar.tar"
    file.write_bytes(b"")
    with pytest.raises(DatasetNotFoundError) as excinfo:
        build_dataset("cifar10", file, "test")
    assert_one_line_error(excinfo, "cifar10", str(file), "not a folder")


# --------------------------------------------------------------------------- #
# Tiny-ImageNet
# --------------------------------------------------------------------------- #

TINY_WNIDS = [f"n{(7919 * i) % 100000:08d}" for i in range(200)]  # deliberately not sorted


def write_tiny_original(base: Path) -> list[tuple[str, str]]:
    """The original layout; every image's marker pixel is its class's sorted index."""
    sorted_wnids = sorted(TINY_WNIDS)
    (base / "val" / "images").mkdir(parents=True)
    (base / "wnids.txt").write_text("\n".join(TINY_WNIDS) + "\n")
    for wnid in TINY_WNIDS:
        image = coded_image(sorted_wnids.index(wnid), size=64)
        save_png(base / "train" / wnid / "images" / f"{wnid}_0.JPEG", image)
        (base / "train" / wnid / f"{wnid}_boxes.txt").write_text(f"{wnid}_0.JPEG\t0\t0\t63\t63\n")
    val = [(f"val_{i}.JPEG", TINY_WNIDS[(37 * i) % 200]) for i in range(6)]
    for file, wnid in val:
        save_png(base / "val" / "images" / file, coded_image(sorted_wnids.index(wnid), size=64))
    (base / "val" / "val_annotations.txt").write_text(
        "".join(f"{file}\t{wnid}\t0\t0\t63\t63\n" for file, wnid in val)
    )
    (base / "test" / "images").mkdir(parents=True)  # unlabelled in the original: ignored
    return val


def test_tinyimagenet_original_layout_relabels_val(tmp_path):
    val = write_tiny_original(tmp_path / "tiny-imagenet-200")
    sorted_wnids = sorted(TINY_WNIDS)
    for root in (tmp_path / "tiny-imagenet-200", tmp_path):
        test = build_dataset("tinyimagenet", str(root), "test")
        assert len(test) == len(val)
        for i, (_, wnid) in enumerate(val):
            image, label = test[i]
            assert image.shape == (3, 64, 64)
            assert label == sorted_wnids.index(wnid)
            assert as_uint8_hwc(image)[0, 0, 0] == label  # the pixels belong to that class
    train = build_dataset("tinyimagenet", tmp_path, "train", train_augment=True)
    assert len(train) == 200
    plain_train = build_dataset("tinyimagenet", tmp_path, "train")
    for index in (0, 57, 199):
        image, label = plain_train[index]
        assert label == index and as_uint8_hwc(image)[0, 0, 0] == index
        assert train[index][0].shape == (3, 64, 64)


def test_tinyimagenet_unknown_wnid_in_annotations(tmp_path):
    write_tiny_original(tmp_path)
    with open(tmp_path / "val" / "val_annotations.txt", "a") as f:
        f.write("val_99.JPEG\tn99999999\t0\t0\t1\t1\n")
    with pytest.raises(DatasetNotFoundError) as excinfo:
        build_dataset("tinyimagenet", tmp_path, "test")
    assert_one_line_error(excinfo, "tinyimagenet", "val_annotations.txt", "line 7")


def test_tinyimagenet_image_folder_layout(tmp_path):
    write_class_tree(tmp_path / "tinyimagenet", 200, ("train", "val"))
    dataset = build_dataset("tinyimagenet", tmp_path, "test", image_size=32)
    assert len(dataset) == 200
    image, label = dataset[199]
    assert image.shape == (3, 32, 32) and label == 199


# --------------------------------------------------------------------------- #
# ImageNet, Places365, Food101
# --------------------------------------------------------------------------- #


@pytest.fixture(scope="module")
def large_trees(tmp_path_factory):
    """ImageFolder trees with the right class counts, one image per class per split."""
    base = tmp_path_factory.mktemp("large")
    write_class_tree(base / "imagenet", 1000, ("train", "val"))
    write_class_tree(base / "places365", 365, ("train", "val"))
    write_class_tree(base / "food-101", 101, ("train", "test"))
    return base


@pytest.mark.parametrize("name, child, n", [("imagenet", "imagenet", 1000), ("places365", "places365", 365),
                                            ("food101", "food-101", 101)])
def test_large_image_folder_trees(large_trees, name, child, n):
    for root in (large_trees, large_trees / child):
        dataset = build_dataset(name, root, "test")
        assert len(dataset) == n
        image, label = dataset[n - 1]
        assert label == n - 1
        assert image.shape == (3, 224, 224)  # Resize(256) + CenterCrop(224)
        assert 0 <= image.min() and image.max() <= 1
    train = build_dataset(name, large_trees, "train", train_augment=True, image_size=64)
    assert len(train) == n and train[0][0].shape == (3, 64, 64)
    assert build_dataset(name, large_trees, "test", image_size=256)[0][0].shape == (3, 256, 256)


def test_large_eval_transform_is_resize_256_center_crop_224(large_trees):
    dataset = build_dataset("imagenet", large_trees, "test")
    text = repr(dataset.transform)
    assert "Resize(size=256" in text and "CenterCrop(size=(224, 224))" in text
    train = build_dataset("imagenet", large_trees, "train", train_augment=True)
    assert "RandomResizedCrop(size=(224, 224)" in repr(train.transform)


def test_imagenet_wrong_class_count(tmp_path):
    write_class_tree(tmp_path, 10, ("train", "val"))
    with pytest.raises(DatasetNotFoundError) as excinfo:
        build_dataset("imagenet", tmp_path, "test")
    assert_one_line_error(excinfo, "imagenet", str(tmp_path), "10 class folders", "expected 1000")


def test_imagenet_torchvision_layout(tmp_path):
    wnids = [f"n{i:08d}" for i in range(1000)]
    write_class_tree(tmp_path, 1000, ("val",), names=wnids)
    torch.save(({w: (f"class {w}",) for w in wnids}, wnids), tmp_path / "meta.bin")
    dataset = build_dataset("imagenet", tmp_path, "test")
    assert type(dataset).__name__ == "ImageNet"
    assert len(dataset) == 1000 and dataset[999][1] == 999


def test_food101_torchvision_layout(tmp_path):
    classes = [f"dish_{i:03d}" for i in range(101)]
    base = tmp_path / "food-101"
    data = png_bytes(coded_image(3, size=40))
    for i, name in enumerate(classes):
        (base / "images" / name).mkdir(parents=True)
        for k in range(2):
            (base / "images" / name / f"{k}.jpg").write_bytes(data)
    (base / "meta").mkdir()
    (base / "meta" / "train.json").write_text(json.dumps({c: [f"{c}/0"] for c in classes}))
    (base / "meta" / "test.json").write_text(json.dumps({c: [f"{c}/1"] for c in reversed(classes)}))
    for root in (tmp_path, base):
        dataset = build_dataset("food101", root, "test")
        assert type(dataset).__name__ == "Food101"
        assert len(dataset) == 101
        image, label = dataset[0]
        assert label == 100 and image.shape == (3, 224, 224)


# --------------------------------------------------------------------------- #
# load_as_tensors
# --------------------------------------------------------------------------- #


def test_load_as_tensors_round_trips_uint8_pixels(tmp_path):
    pixels = write_cifar_tree(tmp_path, CIFAR10_CLASSES, train_per_class=3)
    dataset = build_dataset("cifar10", tmp_path, "train")
    images, labels = load_as_tensors(dataset)
    assert images.dtype == torch.uint8 and images.shape == (30, 3, 32, 32)
    assert labels.dtype == torch.int64 and labels.tolist() == [i // 3 for i in range(30)]
    for index in range(30):
        label, k = divmod(index, 3)
        assert np.array_equal(images[index].permute(1, 2, 0).numpy(), pixels[("train", label, k)])
        assert torch.equal(images[index].float() / 255, dataset[index][0])


def test_load_as_tensors_max_items_and_workers(tmp_path):
    write_cifar_tree(tmp_path, CIFAR10_CLASSES)
    dataset = build_dataset("cifar10", tmp_path, "train")
    images, labels = load_as_tensors(dataset, max_items=7, num_workers=1)
    assert images.shape[0] == labels.shape[0] == 7
    assert torch.equal(images, load_as_tensors(dataset)[0][:7])
    assert load_as_tensors(dataset, max_items=1000)[0].shape[0] == 20


def test_load_as_tensors_digits_quantises_to_nearest_level():
    dataset = build_dataset("digits", None, "test")
    images, labels = load_as_tensors(dataset)
    assert images.shape == (360, 1, 16, 16) and labels.tolist() == dataset.targets
    assert (images.float() / 255 - dataset.images).abs().max() <= 0.5 / 255 + 1e-6


def test_load_as_tensors_rejects_normalised_images():
    normalised = torch.utils.data.TensorDataset(torch.randn(4, 3, 8, 8), torch.zeros(4, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        load_as_tensors(normalised)


# --------------------------------------------------------------------------- #
# the real data (../shared/data), when present
# --------------------------------------------------------------------------- #


@pytest.mark.data
def test_real_mnist_and_cifar10_jpeg():
    if not (SHARED_DATA / "MNIST" / "raw").is_dir() or not (SHARED_DATA / "cifar10-jpeg").is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA.resolve()}")
    for root in (SHARED_DATA, SHARED_DATA / "MNIST"):
        train = build_dataset("mnist", root, "train")
        test = build_dataset("mnist", root, "test")
        assert (len(train), len(test)) == (60000, 10000)
        image, label = test[0]
        assert image.shape == (1, 28, 28) and label == 7  # the first MNIST test digit is a 7
    for root in (SHARED_DATA, SHARED_DATA / "cifar10-jpeg"):
        train = build_dataset("cifar10", root, "train")
        test = build_dataset("cifar10", root, "test")
        assert (len(train), len(test)) == (50000, 10000)
        assert train.classes == CIFAR10_CLASSES
        image, label = test[9999]
        assert image.shape == (3, 32, 32) and label == 9
