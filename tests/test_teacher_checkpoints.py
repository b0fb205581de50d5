"""Teacher checkpoints as they come (issue 13): every file is built inside the test, nothing is downloaded.

Old PyTorch BatchNorm files, published key names (``linear.*``, the ZSKT/CMI WideResNet, the
pytorch/examples AlexNet), wrappers with training state, ``.safetensors``, ``--teacher-key-map``
through the CLI, truly mismatching files, and torchvision's weights read from ``$TORCH_HOME``.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

from dfkd_bench.cli import main
from dfkd_bench.config import TeacherSpec
from dfkd_bench.errors import CheckpointError, ConfigError
from dfkd_bench.models import build_model
from dfkd_bench.teachers.checkpoints import fit_state_dict, read_checkpoint, state_sha256
from dfkd_bench.teachers.loading import build_teacher, cached_teacher_path, resolve_teacher


@pytest.fixture(autouse=True)
def _own_caches(tmp_path, monkeypatch):
    """Converted copies and the torch hub cache go to this test's folder, never to the home folder."""
    monkeypatch.setenv("DFKD_BENCH_TEACHERS", str(tmp_path / "teacher-cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))


def _model(arch: str, classes: int = 10, channels: int = 3, size: int = 32, seed: int = 0):
    torch.manual_seed(seed)
    model = build_model(arch, classes, channels, size)
    with torch.no_grad():  # non-trivial BatchNorm statistics, so a mix-up of buffers would show
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 1.5)
                module.num_batches_tracked.fill_(0)
    return model.eval()


def _loads_the_same(spec: TeacherSpec, reference: torch.nn.Module, classes=10, channels=3, size=32):
    teacher = build_teacher(spec, classes, channels, size)
    for key, value in reference.state_dict().items():
        assert torch.equal(teacher.model.state_dict()[key], value), key
    x = torch.rand(2, channels, size, size)
    mean = torch.tensor(spec.mean).view(1, -1, 1, 1)
    std = torch.tensor(spec.std).view(1, -1, 1, 1)
    torch.testing.assert_close(teacher(x), reference((x - mean) / std))
    return teacher


def _without_counters(state):
    return OrderedDict((k, v) for k, v in state.items() if not k.endswith("num_batches_tracked"))


# ------------------------------------------------------------- file forms ---

def test_old_pytorch_batchnorm_file_without_num_batches_tracked(tmp_path):
    reference = _model("resnet20")
    state = _without_counters(reference.state_dict())
    assert len(state) < len(reference.state_dict())  # the case is real: 19 BatchNorms lose their counter
    path = tmp_path / "old.pth"
    torch.save(state, path)
    spec = resolve_teacher("cifar10", "resnet20", checkpoint=str(path))
    teacher = _loads_the_same(spec, reference)
    counters = [v for k, v in teacher.model.state_dict().items() if k.endswith("num_batches_tracked")]
    assert len(counters) == 19 and all(int(c) == 0 and c.dtype == torch.long for c in counters)
    # Same weights, same identity as the file a current PyTorch writes (counters 0).
    current = tmp_path / "current.pt"
    torch.save(reference.state_dict(), current)
    assert resolve_teacher("cifar10", "resnet20", checkpoint=str(current)).sha256 == spec.sha256


def test_he_resnet_as_published_linear_classifier_module_prefix_best_prec1(tmp_path):
    """The issue's file: {'state_dict': {'module.…', 'module.linear.*'}, 'best_prec1': …}, pre-0.4.1 BatchNorm."""
    reference = _model("resnet56")
    published = OrderedDict((f"module.{k.replace('fc.', 'linear.', 1) if k.startswith('fc.') else k}", v)
                            for k, v in _without_counters(reference.state_dict()).items())
    assert "module.linear.weight" in published and "module.fc.weight" not in published
    path = tmp_path / "resnet56.th"
    torch.save({"state_dict": published, "best_prec1": 93.39, "epoch": 200}, path)
    spec = resolve_teacher("cifar10", "resnet56", checkpoint=str(path),
                           mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])
    assert spec.path == str(path.resolve())  # known names need no converted copy: the loader renames itself
    _loads_the_same(spec, reference)
    ours = tmp_path / "ours.pt"
    torch.save(reference.state_dict(), ours)
    assert resolve_teacher("cifar10", "resnet56", checkpoint=str(ours)).sha256 == spec.sha256


def test_module_prefix_inside_state_dict_with_training_state_beside_it(tmp_path):
    reference = _model("resnet20", classes=100)
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    reference(torch.rand(2, 3, 32, 32)).sum().backward()
    optimizer.step()
    reference.eval()
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[100, 150])
    path = tmp_path / "checkpoint.pth.tar"
    torch.save({"epoch": 164, "arch": "resnet20", "best_prec1": torch.tensor(68.2),
                "state_dict": {f"module.{k}": v for k, v in reference.state_dict().items()},
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, path)
    spec = resolve_teacher("cifar100", "resnet20", checkpoint=str(path))
    _loads_the_same(spec, reference, classes=100)
    for wrapper in ("model", "net", "s_state_dict"):  # the last: the only weights among other entries
        other = tmp_path / f"{wrapper}.pt"
        torch.save({wrapper: reference.state_dict(), "acc": 68.2, "epoch": 3, "optim": optimizer.state_dict()},
                   other)
        assert resolve_teacher("cifar100", "resnet20", checkpoint=str(other)).sha256 == spec.sha256
    two = tmp_path / "student_and_generator.pt"  # which of two state_dicts is the teacher? not guessed
    torch.save({"s_state_dict": reference.state_dict(), "g_state_dict": {"w": torch.zeros(1)}}, two)
    with pytest.raises(CheckpointError, match=r"expected a state_dict .*\(it holds 's_state_dict', 'g_state_dict'\)"):
        resolve_teacher("cifar100", "resnet20", checkpoint=str(two))


def test_numpy_scalars_and_script_arguments_beside_the_weights_are_ignored(tmp_path):
    import argparse

    import numpy as np

    reference = _model("resnet20")
    path = tmp_path / "ckpt.pth"
    torch.save({"net": reference.state_dict(), "acc": np.float64(91.7), "epoch": np.int64(199),
                "curve": np.array([10.0, 55.2, 91.7]), "args": argparse.Namespace(lr=0.1, model="resnet20")}, path)
    _loads_the_same(resolve_teacher("cifar10", "resnet20", checkpoint=str(path)), reference)


def test_a_pickled_model_is_refused_without_running_it(tmp_path):
    path = tmp_path / "whole.pth"
    torch.save({"net": torch.nn.Linear(2, 2), "acc": 90.0}, path)
    with pytest.raises(CheckpointError) as error:
        read_checkpoint(path)
    message = str(error.value)
    assert "\n" not in message and "stores Python objects (torch.nn.modules.linear.Linear)" in message
    assert "torch.save(model.state_dict(), NEW_PATH)" in message


def test_safetensors_by_suffix_and_by_content(tmp_path):
    from safetensors.torch import save_file

    reference = _model("resnet20")
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(path))
    spec = resolve_teacher("cifar10", "resnet20", checkpoint=str(path))
    _loads_the_same(spec, reference)
    renamed = tmp_path / "pytorch_model.bin"  # a safetensors file under another name is still recognised
    renamed.write_bytes(path.read_bytes())
    assert resolve_teacher("cifar10", "resnet20", checkpoint=str(renamed)).sha256 == spec.sha256
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="not a readable safetensors file") as error:
        read_checkpoint(broken)
    assert "\n" not in str(error.value)


def test_timm_teacher_from_a_local_safetensors_file(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    reference = build_model("timm:test_resnet", 10, 3, 32).eval()
    path = tmp_path / "model.safetensors"  # as a Hugging Face hub download of a timm model looks
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(path))
    spec = resolve_teacher("cifar10", "timm:test_resnet", checkpoint=str(path))
    _loads_the_same(spec, reference)


# ------------------------------------------------------ known key maps ---

def _meta_state(arch: str, classes: int, size: int):
    with torch.device("meta"):
        model = build_model(arch, classes, 3, size)
    return model, model.state_dict()


@pytest.mark.parametrize("arch, rename, layout", [
    ("resnet18", lambda k: re.sub(r"^fc\.", "linear.", k), "DAFL / DFAD / CMI ResNet"),
    ("resnet34", lambda k: re.sub(r"^fc\.", "linear.", k), "DAFL / DFAD / CMI ResNet"),
    ("resnet110", lambda k: re.sub(r"^fc\.", "linear.", k), "pytorch_resnet_cifar10"),
    ("wrn40_2", lambda k: re.sub(r"^bn\.", "bn1.", re.sub(r"^(block\d)\.", r"\1.layer.", k)
                                 .replace(".conv_shortcut.", ".convShortcut.")), "ZSKT / CMI WideResNet"),
    ("alexnet", lambda k: re.sub(r"^features\.", "features.module.", k), "pytorch/examples ImageNet"),
])
def test_published_key_names_of_each_architecture_are_known(arch, rename, layout):
    """Key level only (meta tensors, no memory): the names the DFKD repositories publish map onto ours."""
    size = 224 if arch == "alexnet" else 32
    model, ours = _meta_state(arch, 1000 if arch == "alexnet" else 10, size)
    published = OrderedDict((rename(k), v) for k, v in ours.items())
    assert set(published) != set(ours)
    fitted = fit_state_dict(model, published, source="published.pt", arch=arch)
    assert fitted.layout is not None and fitted.layout.startswith(layout)
    assert set(fitted.state) == set(ours)
    assert all(fitted.state[k].shape == ours[k].shape for k in ours)


def test_zskt_wide_resnet_file_loads_with_its_values(tmp_path):
    reference = _model("wrn16_2")
    zskt = OrderedDict()
    for key, value in reference.state_dict().items():
        key = re.sub(r"^(block\d)\.", r"\1.layer.", key).replace(".conv_shortcut.", ".convShortcut.")
        zskt[re.sub(r"^bn\.", "bn1.", key)] = value
    assert "block1.layer.0.convShortcut.weight" in zskt and "bn1.running_var" in zskt
    path = tmp_path / "last.pth.tar"
    torch.save({"state_dict": zskt, "epoch": 200}, path)
    _loads_the_same(resolve_teacher("cifar10", "wrn16_2", checkpoint=str(path)), reference)


class _DaflLeNet5(torch.nn.Module):
    """The LeNet-5 / LeNet-5-half layer list and forward of DAFL's lenet.py (huawei-noah/Efficient-Computing,
    Data-Efficient-Model-Compression/DAFL/lenet.py; DFAD's network/lenet.py is the same file), typed in:
    C5 is ``conv3``, a 5x5 convolution, and the head is ``fc1``/``fc2``."""

    def __init__(self, widths):
        super().__init__()
        c1, c2, c5, f6 = widths
        self.conv1 = torch.nn.Conv2d(1, c1, kernel_size=(5, 5))
        self.conv2 = torch.nn.Conv2d(c1, c2, kernel_size=(5, 5))
        self.conv3 = torch.nn.Conv2d(c2, c5, kernel_size=(5, 5))
        self.fc1 = torch.nn.Linear(c5, f6)
        self.fc2 = torch.nn.Linear(f6, 10)
        self.c5 = c5

    def forward(self, img):
        out = torch.nn.functional.max_pool2d(torch.relu(self.conv1(img)), 2, 2)
        out = torch.nn.functional.max_pool2d(torch.relu(self.conv2(out)), 2, 2)
        feature = torch.relu(self.conv3(out)).view(-1, self.c5)
        return self.fc2(torch.relu(self.fc1(feature)))


@pytest.mark.parametrize("arch, widths", [("lenet5", (6, 16, 120, 84)), ("lenet5_half", (3, 8, 60, 42))])
def test_dafl_and_dfad_lenet_files_load_with_their_values(arch, widths, tmp_path):
    """DAFL's and DFAD's MNIST teachers (32 x 32 inputs) load as ``--image-size 32`` LeNet-5s: C5's 5x5
    kernel is reshaped onto our Linear over the same 400 (200) values, and the logits are the same."""
    torch.manual_seed(3)
    official = _DaflLeNet5(widths).eval()
    path = tmp_path / "mnist-lenet5.pt"
    torch.save(official.state_dict(), path)  # the official train_teacher.py saves a bare state dict
    spec = resolve_teacher("mnist", arch, checkpoint=str(path))
    teacher = build_teacher(spec, 10, 1, 32)
    x = torch.rand(4, 1, 32, 32)
    mean, std = torch.tensor(spec.mean).view(1, -1, 1, 1), torch.tensor(spec.std).view(1, -1, 1, 1)
    torch.testing.assert_close(teacher(x), official((x - mean) / std), rtol=1e-5, atol=1e-5)
    fitted = fit_state_dict(build_model(arch, 10, 1, 32), official.state_dict(), source=str(path), arch=arch)
    assert fitted.layout == "DAFL / DFAD LeNet-5 (C5 as conv3, fc1/fc2)"
    # the reshape is of equal element counts only: a C5 of another size is named, not padded or cut
    wrong = OrderedDict(official.state_dict())
    wrong["conv3.weight"] = torch.zeros(widths[2], widths[1], 4, 4)
    with pytest.raises(CheckpointError, match=r"key 'c5\.weight' has shape"):
        fit_state_dict(build_model(arch, 10, 1, 32), wrong, source="bad.pt", arch=arch)


# --------------------------------------------------------- key map (CLI) ---

def _renamed_lenet(teacher_cache, path):
    """The cached digits teacher saved as another code base would: backbone.* and a 'classifier' head."""
    state = read_checkpoint(cached_teacher_path("digits", "lenet5", teacher_cache))["state_dict"]
    renamed = {("classifier." + k[len("fc7."):]) if k.startswith("fc7.") else f"backbone.{k}": v
               for k, v in state.items()}
    torch.save({"model_state_dict": renamed, "epoch": 4}, path)
    return path


def test_key_map_through_the_cli(teacher_cache, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DFKD_BENCH_TEACHERS", str(tmp_path / "cache"))
    path = _renamed_lenet(teacher_cache, tmp_path / "other.pt")
    base = ["teacher", "eval", "--dataset", "digits", "--teacher-arch", "lenet5", "--no-progress",
            "--device", "cpu", "--teacher-checkpoint", str(path)]
    assert main(base) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1 and captured.err.startswith("error: ")
    assert "missing keys 'conv1.weight', 'conv1.bias', 'conv2.weight' and 7 more" in captured.err
    assert "unexpected keys 'backbone.conv1.weight'" in captured.err
    assert "--teacher-key-map backbone.=" in captured.err and "Traceback" not in captured.err

    assert main(base + ["--teacher-key-map", "backbone.=", "--teacher-key-map", "classifier.=fc7."]) == 0
    mapped = capsys.readouterr().out
    assert main(["teacher", "eval", "--dataset", "digits", "--no-progress", "--device", "cpu",
                 "--teacher-cache", str(teacher_cache)]) == 0
    cached = capsys.readouterr().out
    accuracy = re.compile(r"accuracy (\d+\.\d+) %")
    assert accuracy.search(mapped).group(1) == accuracy.search(cached).group(1)
    assert "converted" in mapped  # the runs load the renamed copy in the teacher cache


def test_key_map_keeps_the_teacher_identity_and_reaches_the_runs(teacher_cache, tmp_path):
    from dfkd_bench.cluster.experiment import RunRequest, TeacherOptions, build_run_configs

    path = _renamed_lenet(teacher_cache, tmp_path / "other.pt")
    options = TeacherOptions(checkpoint=str(path), key_map=["backbone.=", "classifier.=fc7."],
                             cache_dir=str(tmp_path / "cache"))
    configs = build_run_configs(RunRequest(methods=["abm", "mad"], dataset="digits", seeds=[0], budget="smoke",
                                           teacher=options))
    cached = resolve_teacher("digits", "lenet5", cache_dir=str(teacher_cache))
    for config in configs:  # same weights as the cached teacher: same identity, same run ids
        assert config.teacher.sha256 == cached.sha256
        assert config.teacher.path.startswith(str(tmp_path / "cache" / "converted"))
    build_teacher(configs[0].teacher, 10, 1, 16)  # what a run (another process) does with the spec
    converted = configs[0].teacher.path
    Path(converted).unlink()  # a cleaned cache: the next resolve writes the copy again
    again = resolve_teacher("digits", "lenet5", checkpoint=str(path), key_map=options.key_map,
                            cache_dir=options.cache_dir)
    assert again.path == converted and Path(converted).is_file() and again.sha256 == cached.sha256


@pytest.mark.parametrize("items, fragment", [
    (["linear.fc."], "expects OLD_PREFIX=NEW_PREFIX"),
    (["="], "expects OLD_PREFIX=NEW_PREFIX"),
    (["fc.=fc."], "renames nothing"),
    (["linear.=fc."], "matches no key of"),
    (["conv1.=conv2."], "gives two tensors of"),
])
def test_bad_key_maps_are_one_line_errors(items, fragment, tmp_path):
    path = tmp_path / "lenet.pt"
    torch.save(_model("lenet5", channels=1, size=16).state_dict(), path)
    with pytest.raises((ConfigError, CheckpointError), match=fragment) as error:
        resolve_teacher("digits", "lenet5", checkpoint=str(path), key_map=items)
    assert "\n" not in str(error.value)


def test_key_map_without_a_checkpoint_is_refused():
    with pytest.raises(ConfigError, match="--teacher-key-map renames the keys of a --teacher-checkpoint"):
        resolve_teacher("digits", "lenet5", key_map=["a.=b."])


# ------------------------------------------------------- mismatching file ---

def test_truly_mismatching_file_names_missing_and_unexpected_keys(tmp_path, capsys):
    path = tmp_path / "resnet20.pt"
    torch.save({"state_dict": _model("resnet20").state_dict(), "epoch": 1}, path)
    with pytest.raises(CheckpointError) as error:
        resolve_teacher("cifar10", "wrn16_1", checkpoint=str(path))
    message = str(error.value)
    assert "\n" not in message and message.startswith(f"{path.resolve()} does not fit --teacher-arch wrn16_1: ")
    assert re.search(r"missing keys 'block1\.0\.bn1\.weight', '[^']+', '[^']+' and \d+ more", message)
    assert re.search(r"unexpected keys 'bn1\.weight', '[^']+', '[^']+' and \d+ more", message)
    assert "--teacher-key-map OLD_PREFIX=NEW_PREFIX" in message
    assert main(["run", "--dataset", "cifar10", "--teacher-arch", "wrn16_1", "--teacher-checkpoint", str(path),
                 "--results-dir", str(tmp_path / "results"), "--data-root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "missing keys 'block1.0.bn1.weight'" in err
    assert not (tmp_path / "results").exists()  # refused before any run folder exists


def test_an_unknown_classifier_name_gets_a_key_map_suggestion_that_works(tmp_path):
    reference = _model("resnet20")
    state = {re.sub(r"^fc\.", "classifier.", k): v for k, v in reference.state_dict().items()}
    path = tmp_path / "classifier.pt"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as error:
        resolve_teacher("cifar10", "resnet20", checkpoint=str(path))
    message = str(error.value)
    assert "missing keys 'fc.weight', 'fc.bias'; unexpected keys 'classifier.weight', 'classifier.bias'" in message
    assert "(here perhaps --teacher-key-map classifier.=fc.)" in message
    spec = resolve_teacher("cifar10", "resnet20", checkpoint=str(path), key_map=["classifier.=fc."])
    _loads_the_same(spec, reference)


def test_wrong_number_of_classes_names_the_shape(tmp_path):
    path = tmp_path / "c100.pt"
    torch.save(_model("resnet20", classes=100).state_dict(), path)
    with pytest.raises(CheckpointError, match=r"key 'fc\.weight' has shape \(100, 64\), the architecture expects "
                                              r"\(10, 64\) \(and 1 more keys of other shapes\)"):
        resolve_teacher("cifar10", "resnet20", checkpoint=str(path))


# ---------------------------------------------- torchvision weights by name ---

def _hub_file(tmp_path, name: str):
    import torchvision

    weights = torchvision.models.get_model_weights(name).DEFAULT
    folder = tmp_path / "torch-home" / "hub" / "checkpoints"
    return weights, folder, folder / weights.url.rsplit("/", 1)[-1]


def test_torchvision_weights_are_read_from_torch_home(tmp_path):
    import torchvision

    weights, folder, path = _hub_file(tmp_path, "squeezenet1_1")
    torch.manual_seed(0)
    reference = torchvision.models.squeezenet1_1(weights=None).eval()  # stands in for the published file
    folder.mkdir(parents=True)
    torch.save(reference.state_dict(), path)
    spec = resolve_teacher("imagenet", "torchvision:squeezenet1_1", weights="torchvision")
    assert spec.path == str(path.resolve())
    assert spec.mean == [0.485, 0.456, 0.406] and spec.std == [0.229, 0.224, 0.225]
    assert spec.sha256 == state_sha256(reference.state_dict())
    _loads_the_same(spec, reference, classes=1000, size=64)
    from dfkd_bench.cluster.experiment import RunRequest, TeacherOptions, build_run_configs

    configs = build_run_configs(RunRequest(methods=["abm", "mem", "mad"], dataset="imagenet", seeds=[0],
                                           teacher_arch="torchvision:squeezenet1_1", budget="smoke",
                                           teacher=TeacherOptions(weights="torchvision")))
    assert {c.teacher.path for c in configs} == {str(path.resolve())}


def test_torchvision_weights_missing_say_which_file_to_put_where(tmp_path, capsys, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("downloaded without --download")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)
    _, folder, path = _hub_file(tmp_path, "squeezenet1_1")
    with pytest.raises(CheckpointError) as error:
        resolve_teacher("imagenet", "torchvision:squeezenet1_1", weights="torchvision")
    message = str(error.value)
    assert "\n" not in message and f"put {path.name} (from https://" in message
    assert f"into {folder}" in message and "--download" in message
    # The paper's ImageNet teacher is the preset's default: no teacher to train, only a file to place.
    assert main(["run", "--methods", "abm,mem,mad", "--dataset", "imagenet", "--data-root", str(tmp_path / "R"),
                 "--results-dir", str(tmp_path / "results")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ")
    assert "put alexnet-owt-7be5be79.pth (from https://download.pytorch.org/models/alexnet-owt-7be5be79.pth) " \
           f"into {folder}" in err
    assert "teacher train" not in err


def test_download_only_with_the_flag_and_into_the_hub_cache(tmp_path, monkeypatch):
    import torchvision

    weights, folder, path = _hub_file(tmp_path, "squeezenet1_1")
    calls = []

    def fake_download(url, model_dir=None, check_hash=False, **kwargs):
        calls.append((url, model_dir, check_hash))
        torch.manual_seed(1)
        state = torchvision.models.squeezenet1_1(weights=None).state_dict()
        folder.mkdir(parents=True, exist_ok=True)
        torch.save(state, path)
        return state

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", fake_download)
    spec = resolve_teacher("imagenet", "torchvision:squeezenet1_1", weights="torchvision", download=True)
    assert calls == [(weights.url, str(folder), True)] and spec.path == str(path.resolve())
    resolve_teacher("imagenet", "torchvision:squeezenet1_1", weights="torchvision", download=True)
    assert len(calls) == 1  # present now: read, not fetched again


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(dataset="imagenet", arch="resnet34", weights="torchvision"), "needs a torchvision architecture"),
    (dict(dataset="cifar10", arch="alexnet", weights="torchvision"), "classify 1000 classes, cifar10 has 10"),
    (dict(dataset="imagenet", arch="alexnet", weights="torchvision:IMAGENET1K_V9"), "has the weights IMAGENET1K_V1"),
    (dict(dataset="imagenet", arch="alexnet", weights="timm"), "is not one of cache | torchvision"),
    (dict(dataset="imagenet", arch="alexnet", weights="torchvision", checkpoint=__file__), "name two teachers"),
])
def test_teacher_weights_choice_errors(kwargs, fragment):
    dataset, arch = kwargs.pop("dataset"), kwargs.pop("arch")
    with pytest.raises(ConfigError, match=re.escape(fragment)) as error:
        resolve_teacher(dataset, arch, **kwargs)
    assert "\n" not in str(error.value)


def test_imagenet_cache_choice_still_asks_for_a_trained_teacher(tmp_path):
    with pytest.raises(CheckpointError, match="dfkd-bench teacher train --dataset imagenet --arch alexnet"):
        resolve_teacher("imagenet", "alexnet", weights="cache", cache_dir=str(tmp_path))
