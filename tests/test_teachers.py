"""Teachers: the cache, external checkpoints in every accepted form, clear errors."""

from __future__ import annotations

import pytest
import torch

from dfkd_bench.cli import main
from dfkd_bench.errors import CheckpointError
from dfkd_bench.models import build_model
from dfkd_bench.teachers.checkpoints import read_checkpoint
from dfkd_bench.teachers.loading import build_teacher, cached_teacher_path, evaluate_classifier, resolve_teacher


@pytest.fixture()
def lenet_state():
    torch.manual_seed(0)
    return build_model("lenet5", 10, 1, 16).state_dict()


@pytest.mark.parametrize("form", ["raw", "state_dict", "model", "module_prefix", "nested_module_prefix"])
def test_external_checkpoint_forms_round_trip(form, lenet_state, tmp_path):
    if form == "raw":
        payload = lenet_state
    elif form == "state_dict":
        payload = {"state_dict": lenet_state, "epoch": 3}
    elif form == "model":
        payload = {"model": lenet_state}
    elif form == "module_prefix":  # saved from DataParallel / DDP
        payload = {f"module.{k}": v for k, v in lenet_state.items()}
    else:
        payload = {"state_dict": {f"module.{k}": v for k, v in lenet_state.items()}}
    path = tmp_path / f"{form}.pt"
    torch.save(payload, path)
    spec = resolve_teacher("digits", "lenet5", checkpoint=str(path), mean=[0.5], std=[0.25])
    assert spec.mean == [0.5] and spec.std == [0.25] and len(spec.sha256) == 64
    teacher = build_teacher(spec, 10, 1, 16)
    for key, value in teacher.model.state_dict().items():
        assert torch.equal(value, lenet_state[key]), key
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    x = torch.rand(2, 1, 16, 16)  # the configured normalisation is applied
    reference = build_model("lenet5", 10, 1, 16)
    reference.load_state_dict(lenet_state)
    reference.eval()
    torch.testing.assert_close(teacher(x), reference((x - 0.5) / 0.25))


def test_mismatching_checkpoint_names_the_first_bad_key(tmp_path):
    """Refused when the teacher is resolved (before any run folder exists), and again when loaded."""
    path = tmp_path / "half.pt"
    torch.save(build_model("lenet5_half", 10, 1, 16).state_dict(), path)
    with pytest.raises(CheckpointError) as error:
        resolve_teacher("digits", "lenet5", checkpoint=str(path))
    message = str(error.value)
    assert "\n" not in message and "does not fit --teacher-arch lenet5" in message
    assert "key 'conv1.weight' has shape (3, 1, 5, 5), the architecture expects (6, 1, 5, 5)" in message
    from dfkd_bench.config import TeacherSpec

    with pytest.raises(CheckpointError, match="key 'conv1.weight' has shape"):
        build_teacher(TeacherSpec(arch="lenet5", path=str(path), sha256="x", mean=[0.5], std=[0.5]), 10, 1, 16)
    extra = tmp_path / "extra.pt"
    state = build_model("lenet5", 10, 1, 16).state_dict()
    state["head.weight"] = torch.zeros(1)
    torch.save(state, extra)
    with pytest.raises(CheckpointError, match="unexpected key 'head.weight'; rename keys with --teacher-key-map"):
        resolve_teacher("digits", "lenet5", checkpoint=str(extra))


def test_unreadable_and_missing_checkpoints_are_one_line_errors(tmp_path):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint") as error:
        read_checkpoint(garbage)
    assert "\n" not in str(error.value)
    with pytest.raises(CheckpointError, match="does not exist"):
        resolve_teacher("digits", "lenet5", checkpoint=str(tmp_path / "nope.pt"))
    tensor_only = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), tensor_only)
    with pytest.raises(CheckpointError, match="expected a state_dict"):
        resolve_teacher("digits", "lenet5", checkpoint=str(tensor_only))
    no_weights = tmp_path / "no_weights.pt"
    torch.save({"epoch": 3, "optimizer": {"state": {}, "param_groups": []}}, no_weights)
    with pytest.raises(CheckpointError, match="expected a state_dict .* \\(it holds 'epoch', 'optimizer'\\)"):
        resolve_teacher("digits", "lenet5", checkpoint=str(no_weights))


def test_missing_cached_teacher_says_the_command_that_makes_it(tmp_path):
    with pytest.raises(CheckpointError) as error:
        resolve_teacher("mnist", "lenet5", cache_dir=str(tmp_path), data_root="/data")
    assert "dfkd-bench teacher train --dataset mnist --arch lenet5 --data-root /data" in str(error.value)


def test_cached_teacher_has_its_accuracy_and_evaluates(teacher_cache):
    spec = resolve_teacher("digits", "lenet5", cache_dir=str(teacher_cache))
    assert spec.path == str(cached_teacher_path("digits", "lenet5", teacher_cache))
    meta = read_checkpoint(spec.path)["meta"]
    from torch.utils.data import DataLoader

    from dfkd_bench.data.loaders import build_dataset

    teacher = build_teacher(spec, 10, 1, 16)
    metrics = evaluate_classifier(teacher, DataLoader(build_dataset("digits", None, "test"), batch_size=128),
                                  torch.device("cpu"))
    assert metrics["accuracy"] == pytest.approx(meta["test_accuracy"], abs=1e-6)
    assert metrics["samples"] == 360


def test_teacher_eval_cli_with_cache_and_with_external_checkpoint(teacher_cache, tmp_path, capsys):
    assert main(["teacher", "eval", "--dataset", "digits", "--teacher-cache", str(teacher_cache)]) == 0
    cached = capsys.readouterr().out
    assert "accuracy" in cached and "360 images" in cached
    external = tmp_path / "teacher.pt"
    torch.save({"state_dict": read_checkpoint(cached_teacher_path("digits", "lenet5", teacher_cache))["state_dict"]},
               external)
    assert main(["teacher", "eval", "--dataset", "digits", "--teacher-checkpoint", str(external),
                 "--teacher-arch", "lenet5"]) == 0
    out = capsys.readouterr().out
    assert out.split("accuracy")[1].split("%")[0] == cached.split("accuracy")[1].split("%")[0]


def test_cli_errors_are_one_line_without_traceback(tmp_path, capsys):
    assert main(["run", "--methods", "abm,madd", "--dataset", "digits", "--results-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown method 'madd'") and err.count("\n") == 1
    assert main(["run", "--dataset", "mnist", "--data-root", str(tmp_path / "none"),
                 "--teacher-cache", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "dfkd-bench teacher train --dataset mnist --arch lenet5" in err and "Traceback" not in err
    assert main(["teacher", "eval", "--dataset", "cifar10", "--data-root", str(tmp_path / "missing"),
                 "--teacher-checkpoint", __file__, "--teacher-arch", "wrn40_2"]) == 2
    assert "Traceback" not in capsys.readouterr().err


def test_teacher_identity_is_its_weights_not_its_file(lenet_state, tmp_path):
    """A retrained (same weights, other training time) or re-saved teacher keeps its run ids."""
    forms = {
        "cache": {"state_dict": lenet_state, "meta": {"train_seconds": 25.1}},
        "retrained": {"state_dict": lenet_state, "meta": {"train_seconds": 31.7}},
        "raw": dict(lenet_state),
        "ddp": {"model": {f"module.{k}": v for k, v in lenet_state.items()}},
    }
    ids = set()
    for name, payload in forms.items():
        torch.save(payload, tmp_path / f"{name}.pt")
        ids.add(resolve_teacher("digits", "lenet5", checkpoint=str(tmp_path / f"{name}.pt")).sha256)
    assert len(ids) == 1 and len(ids.pop()) == 64
    changed = {k: v.clone() for k, v in lenet_state.items()}
    first = next(k for k, v in changed.items() if v.is_floating_point())
    changed[first].view(-1)[0] += 1e-6
    torch.save(changed, tmp_path / "changed.pt")
    assert resolve_teacher("digits", "lenet5", checkpoint=str(tmp_path / "changed.pt")).sha256 != \
        resolve_teacher("digits", "lenet5", checkpoint=str(tmp_path / "raw.pt")).sha256
