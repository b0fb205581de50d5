"""Fast teachers: the uint8 tensor cache, batched device-side augmentation, the in-memory trainer."""

from __future__ import annotations

import json
import os
import time

import numpy as np
import pytest
import torch
from PIL import Image

from dfkd_bench.cli import main
from dfkd_bench.errors import ConfigError
from dfkd_bench.teachers.fast_train import augment_batch, random_affine, random_crop_flip
from dfkd_bench.presets import teacher_recipes
from dfkd_bench.teachers.tensor_cache import cache_paths, split_tensors
from dfkd_bench.teachers.checkpoints import read_checkpoint
from dfkd_bench.teachers.training import learning_rate, recipe_for, train_teacher

CLASSES = [f"c{i}" for i in range(10)]


def make_image_folder(root, per_class=2, size=8):
    """A tiny CIFAR-10-shaped ImageFolder of PNGs (lossless: decoded pixels are known exactly)."""
    rng = np.random.default_rng(0)
    pixels = {}
    for split in ("train", "test"):
        for label, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True)
            for k in range(per_class):
                array = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                path = folder / f"{k}.png"
                Image.fromarray(array).save(path)
                pixels[str(path)] = array
    return pixels


def load(root, cache, size=8):
    from dfkd_bench.data.loaders import build_dataset

    dataset = build_dataset("cifar10", str(root), "train", image_size=size)
    return split_tensors(dataset, name="cifar10", split="train", image_size=size, cache_dir=cache)


def test_tensor_cache_built_reused_rebuilt_and_never_trusts_a_corrupt_file(tmp_path):
    root, cache = tmp_path / "data", tmp_path / "cache"
    pixels = make_image_folder(root)
    first = load(root, cache)
    assert first.source == "built" and first.images.dtype == torch.uint8
    assert first.images.shape == (20, 3, 8, 8) and first.labels.tolist() == [i // 2 for i in range(20)]
    first_path = sorted(p for p in pixels if "/train/" in p)[0]  # c0/0.png, item 0
    assert torch.equal(first.images[0], torch.from_numpy(pixels[first_path]).permute(2, 0, 1))

    again = load(root, cache)
    assert again.source == "reused" and torch.equal(again.images, first.images)

    # the source changes: one image replaced (other pixels, other size/mtime) -> rebuilt with the new pixels
    replaced = root / "train" / "c3" / "1.png"
    new_pixels = np.full((8, 8, 3), 7, dtype=np.uint8)
    Image.fromarray(new_pixels).save(replaced)
    os.utime(replaced, ns=(time.time_ns(), time.time_ns() + 10**9))
    changed = load(root, cache)
    assert changed.source == "built" and changed.reason == "the source images changed"
    assert torch.equal(changed.images[7], torch.full((3, 8, 8), 7, dtype=torch.uint8))
    assert load(root, cache).source == "reused"

    # a file added to a class -> rebuilt, one more image
    Image.fromarray(new_pixels).save(root / "train" / "c9" / "extra.png")
    assert (grown := load(root, cache)).source == "built" and grown.images.shape[0] == 21

    # corrupt tensor file (same length, one byte flipped): the checksum catches it, never loaded
    tensor_path, meta_path = cache_paths(cache, "cifar10", "train", 8)
    data = bytearray(tensor_path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    tensor_path.write_bytes(bytes(data))
    rebuilt = load(root, cache)
    assert rebuilt.source == "built" and "checksum" in rebuilt.reason
    assert torch.equal(rebuilt.images, grown.images)

    # truncated file, and a missing or garbage sidecar: rebuilt too
    tensor_path.write_bytes(tensor_path.read_bytes()[:100])
    assert load(root, cache).source == "built"
    meta_path.unlink()
    assert load(root, cache).source == "built"
    meta_path.write_text("{not json")
    assert load(root, cache).source == "built"
    assert json.loads(meta_path.read_text())["files"] == 21 and load(root, cache).source == "reused"


def test_random_crop_flip_by_hand():
    image = torch.arange(16, dtype=torch.uint8).view(1, 1, 4, 4)
    generator = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(200):
        out = random_crop_flip(image, 1, generator)
        assert out.shape == (1, 1, 4, 4) and out.dtype == torch.uint8
        seen.add(tuple(out.flatten().tolist()))
    padded = torch.nn.functional.pad(image, (1, 1, 1, 1))[0, 0]
    expected = set()
    for oy in range(3):
        for ox in range(3):
            crop = padded[oy:oy + 4, ox:ox + 4]
            expected.add(tuple(crop.flatten().tolist()))
            expected.add(tuple(crop.flip(1).flatten().tolist()))
    assert seen == expected  # every one of the 3 x 3 offsets x 2 flips, nothing else
    # offset (1, 1) without flip is the image itself; with flip its mirror
    assert tuple(range(16)) in seen and tuple(image[0, 0].flip(1).flatten().tolist()) in seen
    # a known crop: offset (0, 0) = zero row on top, zero column on the left
    assert (0, 0, 0, 0, 0, 0, 1, 2, 0, 4, 5, 6, 0, 8, 9, 10) in seen


def test_random_crop_flip_is_per_image_and_seeded():
    images = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8).repeat(32, 1, 1, 1)
    a = random_crop_flip(images, 2, torch.Generator().manual_seed(5))
    b = random_crop_flip(images, 2, torch.Generator().manual_seed(5))
    assert a.shape == images.shape and torch.equal(a, b)
    assert a.is_contiguous(memory_format=torch.channels_last)
    assert len({tuple(x.flatten().tolist()) for x in a[::2]}) > 5  # images of one batch get different crops
    # channels move together: each output pixel comes from one input position for all channels
    centre = random_crop_flip(images, 0, torch.Generator().manual_seed(1), flip=False)
    assert torch.equal(centre, images)


def test_augment_batch_converts_and_keeps_range():
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    out = augment_batch(images, "crop_flip", torch.Generator().manual_seed(0))
    assert out.dtype == torch.float32 and out.shape == (4, 3, 32, 32) and 0 <= out.min() and out.max() <= 1
    plain = augment_batch(images, "none", torch.Generator())
    torch.testing.assert_close(plain, images.float() / 255)
    digits = torch.zeros(3, 1, 16, 16)
    digits[:, :, 6:10, 6:10] = 1.0
    jittered = random_affine(digits, torch.Generator().manual_seed(0))
    assert jittered.shape == digits.shape and set(jittered.unique().tolist()) <= {0.0, 1.0}
    identity = random_affine(digits, torch.Generator(), degrees=0.0, translate=0.0, scale=(1.0, 1.0))
    assert torch.equal(identity, digits)


def test_recipes_and_one_cycle_schedule():
    assert set(teacher_recipes("cifar10")) == {"paper", "fast"} and set(teacher_recipes("digits")) == {"paper"}
    fast = recipe_for("cifar10", "fast")
    assert fast.schedule == "onecycle" and fast.batch_size == 512
    assert learning_rate(fast, 0.0) == 0.0
    assert learning_rate(fast, fast.warmup_epochs) == pytest.approx(fast.lr)
    assert learning_rate(fast, fast.warmup_epochs / 2) == pytest.approx(fast.lr / 2)
    assert learning_rate(fast, (fast.warmup_epochs + fast.epochs) / 2) == pytest.approx(fast.lr / 2)
    assert learning_rate(fast, fast.epochs) == 0.0
    paper = recipe_for("cifar10")
    assert paper.schedule == "step" and learning_rate(paper, 100) == pytest.approx(0.1 * 0.1 ** 1)
    with pytest.raises(ConfigError, match="digits has the teacher recipe"):
        recipe_for("digits", "fast")
    with pytest.raises(ConfigError, match="use --pipeline loader") as error:  # before any data is touched
        train_teacher("imagenet", "alexnet", data_root="/nonexistent", pipeline="tensors", progress=False)
    assert "\n" not in str(error.value)


def test_in_memory_digits_teacher_is_sane_fast_and_reproducible(tmp_path, capsys):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # CPU time, not wall time: the test machines are shared
    try:
        start = time.process_time()
        a = train_teacher("digits", "lenet5", cache_dir=str(tmp_path / "a"), epochs=8, workers=0, progress=False)
        elapsed = time.process_time() - start
        b = train_teacher("digits", "lenet5", cache_dir=str(tmp_path / "b"), epochs=8, workers=0, progress=False)
    finally:
        torch.set_num_threads(threads)
    assert a["pipeline"] == "tensors" and a["test_accuracy"] >= 90.0, a["test_accuracy"]
    assert elapsed < 20, elapsed  # 8 epochs of 22 batches; about 3 s of CPU on one core
    wa, wb = read_checkpoint(a["path"])["state_dict"], read_checkpoint(b["path"])["state_dict"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)  # same seed: same weights
    assert main(["teacher", "train", "--dataset", "digits", "--arch", "lenet5", "--recipe", "fast",
                 "--teacher-cache", str(tmp_path / "c"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --recipe fast: digits has the teacher recipe(s) paper") and err.count("\n") == 1
