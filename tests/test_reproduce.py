"""Issue 19, part A: paper protocols resolve to exactly their papers' settings, every reproduction file
dry-runs, and a tiny paper-protocol run records ``protocol`` and ``published``."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pandas as pd
import pytest

from dfkd_bench.cluster import sweep
from dfkd_bench.config import RunConfig, TrainConfig
from dfkd_bench.errors import ConfigError
from dfkd_bench.cluster.experiment import RunRequest, TeacherOptions, build_run_configs
from dfkd_bench.method_api import get_method
from conftest import SHARED_DATA, needs_shared_data

REPO = Path(__file__).resolve().parents[1]
REPRODUCE = sorted((REPO / "experiments" / "reproduce").glob("*.toml"))
COMMITTED_TEACHERS = REPO / "results" / "zoo" / "teachers"

# Every setting of the two MNIST protocols, typed in from the official scripts (not from the method files):
# DAFL-train.py defaults (huawei-noah/Efficient-Computing) and DFAD_mnist.py defaults (VainF/...).
OFFICIAL_MNIST = {
    "dafl": dict(
        train=dict(epochs=200, steps_per_epoch=120, generator_steps=1, student_steps=1, batch_size=512,
                   student_optimizer="adam", student_lr=2e-3, student_weight_decay=0.0, lr_decay=1.0,
                   lr_milestones=[], eval_every=120, drift_every=0, amp="none"),
        params=dict(generator="dafl_gen", noise_dim=100, generator_lr=0.2, oh_weight=1.0, activation_weight=0.1,
                    entropy_weight=5.0, entropy_log_base=10.0, student_batch="generator_batch"),
        published=dict(accuracy=98.20, std=None, teacher_accuracy=98.91, selection="best"),
        iterations=24_000),
    "dfad": dict(
        train=dict(epochs=40, steps_per_epoch=50, generator_steps=1, student_steps=5, batch_size=512,
                   student_optimizer="sgd", student_lr=0.01, student_weight_decay=1e-4, student_momentum=0.9,
                   lr_decay=1.0, lr_milestones=[], eval_every=50, drift_every=0, amp="none"),
        params=dict(generator="dfad_gen", noise_dim=100, generator_lr=1e-3),
        published=dict(accuracy=98.3, std=0.2, teacher_accuracy=98.9, selection="best"),
        iterations=2_000),
}


def assert_official_settings(config: RunConfig, expected: dict) -> None:
    """The run's engine settings, iterations, method settings and published block are the official ones."""
    for name, value in expected["train"].items():
        assert getattr(config.train, name) == value, name
    assert config.train.total_iterations == expected["iterations"]
    for name, value in expected["params"].items():
        assert config.params[name] == value, name
    for name, value in expected["published"].items():
        assert config.published[name] == value, name


def _configs(path: Path) -> list[RunConfig]:
    plan = sweep.plan_experiment(sweep.load_experiment(path), teacher_cache=str(COMMITTED_TEACHERS),
                                 allow_missing_teacher=True)
    return [run.config for run in plan.runs]


def test_there_is_a_reproduction_file_for_each_mnist_paper():
    assert {p.name for p in REPRODUCE} >= {"dafl_mnist.toml", "dfad_mnist.toml"}


@pytest.mark.parametrize("method", sorted(OFFICIAL_MNIST))
def test_mnist_paper_protocol_is_exactly_the_official_settings(method):
    expected = OFFICIAL_MNIST[method]
    configs = _configs(REPO / "experiments" / "reproduce" / f"{method}_mnist.toml")
    assert [c.seed for c in configs] == [0, 1, 2]
    for config in configs:
        assert config.protocol == "paper"
        assert (config.teacher.arch, config.student_arch) == ("lenet5", "lenet5_half")
        assert_official_settings(config, expected)
        # the method's paper defaults apply where the protocol says nothing (not the preset's gen_tiny etc.)
        defaults = get_method(method).Params()
        for name, value in config.params.items():
            if name not in expected["params"]:
                assert value == getattr(defaults, name), name


@pytest.mark.parametrize("path", REPRODUCE, ids=[p.stem for p in REPRODUCE])
def test_every_reproduction_file_resolves_to_its_methods_paper_protocol(path):
    text = path.read_text()
    configs = _configs(path)
    assert configs
    for config in configs:
        protocol = get_method(config.method).paper_protocols[config.dataset]
        assert config.protocol == "paper" and config.published == protocol.published
        # the header cites the published number, or says that it was not read (SpaceshipNet's CIFAR-10)
        cited = f"{protocol.accuracy}" if protocol.accuracy is not None else "Published: NOT READ"
        assert cited in text.replace("98.20", "98.2")
        assert (config.teacher.arch, config.student_arch, config.image_size) == (
            protocol.teacher_arch, protocol.student_arch, protocol.image_size)
        for name, value in protocol.train.items():
            assert getattr(config.train, name) == value, name
        for name, value in protocol.params.items():
            assert config.params[name] == value, name
        assert set(config.published) == {"accuracy", "std", "source", "teacher_accuracy", "selection"}


@pytest.mark.parametrize("path", REPRODUCE, ids=[p.stem for p in REPRODUCE])
def test_every_reproduction_file_dry_runs(path, tmp_path, capsys):
    from dfkd_bench.cli import main

    assert main(["sweep", str(path), "--dry-run", "--results-dir", str(tmp_path / "runs"),
                 "--teacher-cache", str(COMMITTED_TEACHERS)]) == 0
    assert "dry run: nothing launched" in capsys.readouterr().out
    assert not (tmp_path / "runs").exists()


def test_common_runs_keep_their_ids_and_record_no_published(digits_request):
    config = build_run_configs(digits_request(["abm"]))[0]
    assert config.protocol == "common"
    assert "protocol" not in config.hashed_dict() and "published" not in config.to_dict()
    assert config.to_dict()["protocol"] == "common"
    paper = RunConfig.from_dict({**config.to_dict(), "protocol": "paper"})
    assert paper.run_id != config.run_id  # the protocol is part of a paper run's identity


def test_a_paper_protocol_the_method_lacks_is_a_one_line_error(digits_request):
    request = digits_request(["dafl"])
    request.protocol = "paper"
    with pytest.raises(ConfigError, match="dafl has no paper protocol for digits"):
        build_run_configs(request)
    mnist = RunRequest(methods=["dafl"], dataset="mnist", seeds=[0], protocol="paper", student_arch="lenet5",
                       teacher=TeacherOptions(cache_dir=str(COMMITTED_TEACHERS)))
    with pytest.raises(ConfigError, match="fixes student_arch = lenet5_half"):
        build_run_configs(mnist)


@needs_shared_data("MNIST")
@pytest.mark.parametrize("method", ["dafl", "dfad"])
def test_tiny_mnist_paper_protocol_run_records_protocol_and_published(method, tmp_path):
    results = tmp_path / "runs"
    from dfkd_bench.cli import main

    tiny = ["--set", "ep=1", "--set", "spe=2", "--set", "bs=16", "--set", "eval_every=2", "--set", "eval_batch_size=5000"]
    assert main(["sweep", str(REPO / "experiments" / "reproduce" / f"{method}_mnist.toml"), "--results-dir",
                 str(results), "--data-root", str(SHARED_DATA), "--teacher-cache", str(COMMITTED_TEACHERS),
                 "--threads", "1", "--no-progress", *tiny]) == 0
    folders = sorted(p for p in results.iterdir() if (p / "done").exists())
    assert len(folders) == 3
    config = json.loads((folders[0] / "config.json").read_text())
    assert config["protocol"] == "paper"
    assert config["published"]["accuracy"] == OFFICIAL_MNIST[method]["published"]["accuracy"]
    assert config["published"]["selection"] == "best"
    assert config["params"]["generator"] == f"{method}_gen"
    records = [json.loads(line) for line in (folders[0] / "records.jsonl").read_text().splitlines()]
    assert any("test_accuracy" in r for r in records)
    # The report's protocol card of these runs: the tiny override shows as a difference from the paper and
    # from the code's protocol; what the runs kept of the protocol is unmarked; CHOSEN deviations keep their reason.
    assert main(["report", "--results-dir", str(results), "--out", str(tmp_path / "report"), "--formats", "png"]) == 0
    cards = pd.read_csv(tmp_path / "report" / "table_protocol_cards.csv", keep_default_na=False)
    rows = cards.set_index("setting")
    expected_epochs = str(OFFICIAL_MNIST[method]["train"]["epochs"])
    assert rows.loc["epochs", "runs"] == "1" and rows.loc["epochs", "paper"] == expected_epochs
    assert rows.loc["epochs", "mark"] == f"differs from the paper; differs from the code's protocol ({expected_epochs})"
    lr = f"{OFFICIAL_MNIST[method]['params']['generator_lr']:g}"
    assert (rows.loc["generator_lr", "runs"], rows.loc["generator_lr", "mark"]) == (lr, "")
    assert rows.loc["image_size", "runs"] == "28" and rows.loc["image_size", "mark"].startswith("CHOSEN: 28 px")
    assert rows.loc["teacher", "runs"] == "-" and rows.loc["teacher", "mark"].startswith("CHOSEN")
    report = (tmp_path / "report" / "report.md").read_text()
    assert "## Protocol cards of the reproductions" in report and "| epochs | " + expected_epochs + " | 1 |" in report


def test_protocol_card_shows_paper_official_and_ours_with_differences_marked(capsys):
    from dfkd_bench.cli import main
    from dfkd_bench.cluster.protocol_card import card_rows

    rows = {row["setting"]: row for row in card_rows("dafl", "mnist")}
    assert rows["generator_lr"]["paper"] == "0.2" and rows["generator_lr"]["ours_paper"] == "0.2"
    assert rows["generator_lr"]["ours_common"] == "0.001" and "common differs" in rows["generator_lr"]["mark"]
    assert rows["image_size"]["paper"].startswith("32") and rows["image_size"]["ours_paper"] == "28"
    assert rows["image_size"]["mark"].startswith("CHOSEN")
    assert rows["entropy_weight"]["mark"] == ""  # the same everywhere: nothing marked
    assert main(["list", "--card", "dfad", "--dataset", "mnist"]) == 0
    out = capsys.readouterr().out
    assert "published 98.3 +- 0.2 %" in out and "dfad_gen" in out and "CHOSEN" in out
    assert main(["list", "--card", "dafl", "--dataset", "digits"]) != 0  # no such protocol: one error line
    error = capsys.readouterr()
    assert (error.err + error.out).strip().splitlines() == [
        "error: dafl has no paper protocol for digits (it has: cifar10, cifar100, mnist); "
        "pass --dataset with one of them"]


REQUIRED_TRAIN = {"epochs", "steps_per_epoch", "generator_steps", "student_steps", "batch_size", "student_optimizer",
                  "student_lr", "student_weight_decay", "lr_decay", "lr_milestones", "eval_every"}


def test_every_paper_protocol_fixes_every_setting_a_protocol_needs():
    """A protocol that left e.g. the batch to the preset would silently run the common protocol's value."""
    from dfkd_bench.method_api import list_methods

    declared = 0
    for name, method in list_methods().items():
        for dataset, protocol in method.paper_protocols.items():
            declared += 1
            assert REQUIRED_TRAIN <= set(protocol.train), (name, dataset, REQUIRED_TRAIN - set(protocol.train))
            # the generator's size and lr, or a pool method's synthesis steps and lr, where the method has them
            own = {f.name for f in dataclasses.fields(method.Params)}
            needed = {"noise_dim", "generator_lr", "synthesis_steps", "synthesis_lr"} & own
            assert needed and needed <= set(protocol.params), (name, dataset, needed - set(protocol.params))
            for key in protocol.train:  # a misspelt engine setting would silently not apply
                assert key in {f.name for f in dataclasses.fields(TrainConfig)}, (name, dataset, key)
            assert (REPO / "experiments" / "reproduce" / f"{name}_{dataset}.toml").exists(), (name, dataset)
    assert declared >= 16


def test_run_protocol_paper_without_a_protocol_is_one_line_before_any_folder(tmp_path, capsys):
    from dfkd_bench.cli import main

    results = tmp_path / "runs"
    assert main(["run", "--methods", "dafl", "--dataset", "digits", "--protocol", "paper",
                 "--results-dir", str(results)]) != 0
    captured = capsys.readouterr()
    assert (captured.err + captured.out).strip().splitlines() == [
        "error: dafl has no paper protocol for digits (it has: cifar10, cifar100, mnist); "
        "use protocol common, or another dataset"]
    assert not results.exists()
