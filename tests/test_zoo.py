"""The DFKD zoo (DFAD, DFQ, ZSKT, DAFL, DeepInversion/ADI, CMI, FastDFKD): loss terms against
hand-computed values and each method's own behaviour on digits. The contract every method shares
(listing, state round trip, exact resume after SIGKILL, no host sync) is tests/test_contract.py."""

from __future__ import annotations

import math

import pytest
import torch

from dfkd_bench.train import zoo_losses
from dfkd_bench.train.engine import Trainer
from dfkd_bench.cluster.experiment import build_run_configs
from dfkd_bench.method_api import list_methods
from dfkd_bench.methods.zoo_common import random_views, stage_modules
from dfkd_bench.models import build_model
from test_contract import make_trainer, overrides_for  # pool methods finish a batch every 2 steps there

# ------------------------------------------------------------ loss terms by hand ---

def test_l1_discrepancy_by_hand():
    teacher = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    student = torch.tensor([[0.0, 4.0], [3.0, 3.0]])
    # |1| + |-2| + 0 + |1| over 4 entries
    assert zoo_losses.l1_discrepancy(teacher, student).item() == pytest.approx(1.0)


def test_attention_transfer_by_hand():
    teacher = torch.tensor([[[[2.0, 0.0]], [[0.0, 0.0]]]])  # (1, 2 channels, 1, 2): mean_c A^2 = [2, 0] -> [1, 0]
    student = torch.ones(1, 2, 1, 2)  # mean_c A^2 = [1, 1] -> [1/sqrt2, 1/sqrt2]
    # ((1 - 1/sqrt2)^2 + 1/2) / 2 positions = 1 - 1/sqrt2
    assert zoo_losses.attention_transfer(teacher, student).item() == pytest.approx(1 - 1 / math.sqrt(2))
    assert zoo_losses.attention_transfer(student, 3 * student).item() == pytest.approx(0.0, abs=1e-7)


def test_dafl_losses_by_hand():
    logits = torch.tensor([[0.0, math.log(3.0)]])  # softmax [1/4, 3/4], argmax 1
    assert zoo_losses.one_hot_loss(logits).item() == pytest.approx(math.log(4 / 3))
    features = torch.tensor([[1.0, -3.0], [2.0, -2.0]])
    assert zoo_losses.activation_loss(features).item() == pytest.approx(-2.0)
    batch = torch.tensor([[0.0, 0.0], [0.0, math.log(3.0)]])  # [1/2, 1/2] and [1/4, 3/4]: mean [3/8, 5/8]
    expected = 0.375 * math.log(0.375) + 0.625 * math.log(0.625)
    assert zoo_losses.information_entropy_loss(batch).item() == pytest.approx(expected)


def test_total_variation_l2_prior_and_feature_loss_by_hand():
    image = torch.tensor([[[[0.0, 1.0], [2.0, 3.0]]]])
    # horizontal (-1, -1): sqrt2; vertical (-2, -2): sqrt8; diagonals 2-1 = 1 and 0-3 = -3
    assert zoo_losses.total_variation(image).item() == pytest.approx(math.sqrt(2) + math.sqrt(8) + 1 + 3)
    assert zoo_losses.l2_prior(torch.tensor([3.0, 4.0])).item() == pytest.approx(5.0)
    loss = zoo_losses.feature_distribution_loss(
        [torch.tensor([1.0, 2.0]), torch.tensor([0.0])], [torch.tensor([1.0, 1.0]), torch.tensor([2.0])],
        [torch.tensor([1.0, 0.0]), torch.tensor([3.0])], [torch.tensor([4.0, 5.0]), torch.tensor([2.0])])
    assert loss.item() == pytest.approx(2.0 + 5.0 + 3.0 + 0.0)


def test_js_decision_adversarial_and_temperature_kd_by_hand():
    same = torch.tensor([[1.0, 2.0]])
    assert zoo_losses.js_divergence(same, same).item() == pytest.approx(0.0, abs=1e-7)
    assert zoo_losses.js_divergence(torch.tensor([[0.0, -1e4]]), torch.tensor([[-1e4, 0.0]])).item() == pytest.approx(
        math.log(2))
    teacher = torch.tensor([[math.log(3.0), 0.0], [0.0, math.log(3.0)]])  # [3/4, 1/4], [1/4, 3/4]
    student = torch.tensor([[math.log(2.0), 0.0], [math.log(2.0), 0.0]])  # [2/3, 1/3] twice
    kl_first = 0.75 * math.log(0.75 / (2 / 3)) + 0.25 * math.log(0.25 / (1 / 3))  # agrees on class 0
    # the second sample disagrees (teacher 1, student 0) and is masked out; mean over 2
    assert zoo_losses.decision_adversarial_loss(teacher, student).item() == pytest.approx(-kl_first / 2, rel=1e-5)
    p = [math.e / (1 + math.e), 1 / (1 + math.e)]  # softmax([2, 0] / 2)
    expected = 4 * sum(pi * math.log(pi / 0.5) for pi in p)  # T^2 * KL(p || uniform)
    assert zoo_losses.kd_with_temperature(torch.tensor([[2.0, 0.0]]), torch.zeros(1, 2), 2.0).item() == \
        pytest.approx(expected)


def test_contrastive_losses_by_hand():
    eye = torch.eye(2)
    # logits = I / 1: each row -log(e / (e + 1)) = log(1 + 1/e)
    assert zoo_losses.contrastive_loss(eye, eye, 1.0).item() == pytest.approx(math.log(1 + math.exp(-1)))
    anchors = torch.eye(3, requires_grad=True)
    positives = torch.eye(3, requires_grad=True)
    # tau 0.5: rows [2, 0, 0] -> log(1 + 2 e^-2) each; one new row + the mean of two bank rows
    loss = zoo_losses.cmi_contrastive_loss(anchors, positives, 0.5, new_rows=1)
    assert loss.item() == pytest.approx(2 * math.log(1 + 2 * math.exp(-2)))
    loss.backward()
    assert anchors.grad is not None and positives.grad is None  # the global view is a target
    alone = zoo_losses.cmi_contrastive_loss(torch.eye(3), torch.eye(3), 0.5, new_rows=3)
    assert alone.item() == pytest.approx(math.log(1 + 2 * math.exp(-2)))


def test_random_views_identity_and_flip():
    images = torch.rand(3, 1, 6, 6)
    rng = torch.Generator().manual_seed(0)
    torch.testing.assert_close(random_views(images, rng, min_area=1.0, max_shift=0.0, flip=False), images)
    views = random_views(images, rng, min_area=1.0, max_shift=0.0, flip=True)
    for view, image in zip(views, images):  # each is the image or its mirror
        assert torch.allclose(view, image, atol=1e-6) or torch.allclose(view, image.flip(-1), atol=1e-6)


def test_stage_matching_rule_lenet_and_wrn():
    lenet = build_model("lenet5", 10, in_channels=1, image_size=16)
    stages = stage_modules(lenet, (1, 16, 16))
    assert stages == {(16, 16): lenet.conv1, (4, 4): lenet.conv2}
    wrn = build_model("wrn16_1", 10, in_channels=3, image_size=32)
    assert list(stage_modules(wrn, (3, 32, 32))) == [(32, 32), (16, 16), (8, 8)]  # ZSKT's three groups


# ------------------------------------------------------------------- contract ---

@pytest.mark.parametrize("method, setting, value", [
    ("deepinv", "memory_size", 0), ("cmi", "cr_temperature", 0.0), ("fast", "z_lr", -0.1),
    ("deepinv", "kd_temperature", 0.0), ("dafl", "entropy_weight", -1.0), ("zskt", "at_weight", -1.0),
    ("cmi", "negatives", 0), ("dfad", "generator_lr", -1e-3), ("deepinv", "synthesis_steps", 0),
])
def test_zoo_settings_out_of_range_are_one_line_errors(method, setting, value, digits_request):
    from dfkd_bench.errors import ConfigError

    with pytest.raises(ConfigError, match=setting):
        build_run_configs(digits_request([method], overrides={setting: value}))


def test_zoo_paper_symbols_are_unambiguous():
    """``--set SYMBOL=...`` aliases are global: a symbol must name one setting across all methods."""
    import dataclasses

    meaning: dict[str, set[str]] = {}
    for method in list_methods().values():
        for f in dataclasses.fields(method.Params):
            if f.metadata.get("paper"):
                meaning.setdefault(f.metadata["paper"], set()).add(f.name)
    assert {symbol: names for symbol, names in meaning.items() if len(names) > 1} == {}


def test_a_methods_preset_values_sit_between_the_preset_and_the_budget_and_set(digits_request):
    """Paper default < the preset's shared values < the method's own preset values < the budget's
    caps < ``--set``; other presets keep the paper defaults, other methods are untouched."""
    from dfkd_bench.cluster.experiment import build_run_configs

    def params(method, budget="default", **overrides):
        return build_run_configs(digits_request([method], overrides=overrides, budget=budget))[0].params

    deepinv = params("deepinv")
    assert (deepinv["synthesis_steps"], deepinv["kd_temperature"]) == (20, 1.0)  # paper: 2,000 and T = 20
    assert params("fast")["synthesis_steps"] == 5 and params("fast")["kd_temperature"] == 1.0
    cmi = params("cmi")
    assert (cmi["synthesis_steps"], cmi["generator"], cmi["noise_dim"]) == (20, "gen_tiny", 256)  # + the preset's G
    assert params("deepinv", budget="smoke")["synthesis_steps"] == 2  # the smoke cap still applies
    assert params("deepinv", synthesis_steps=7, kd_temperature=4.0)["synthesis_steps"] == 7
    assert params("deepinv", synthesis_steps=7, kd_temperature=4.0)["kd_temperature"] == 4.0
    from dfkd_bench.config import resolve_method_params
    from dfkd_bench.presets import get_preset, preset_method_params

    cifar = resolve_method_params("deepinv", preset_method_params(get_preset("cifar10"), "deepinv"), {})
    assert (cifar["synthesis_steps"], cifar["kd_temperature"]) == (2000, 20.0)


def test_preset_values_of_a_parameter_the_method_lacks_are_refused_at_registration():
    from dataclasses import dataclass

    from dfkd_bench.method_api import Method, register_method

    @dataclass
    class Params:
        steps: int = 1

    class Bad(Method):
        name = "bad-preset-values"
        preset_params = {"digits": {"stpes": 3}}

    Bad.Params = Params
    with pytest.raises(TypeError, match="stpes"):
        register_method(Bad)
    assert "bad-preset-values" not in list_methods()


def test_pool_grows_by_one_batch_per_finished_batch(digits_request, tmp_path):
    trainer = make_trainer(digits_request, tmp_path, "deepinv", synthesis_steps=3)
    method = trainer.method
    method.pretrain()
    for stage in range(6):
        method.generator_step()
        method.end_generator_stage()
        assert method.pool.size == trainer.local_batch * ((stage + 1) // 3)
    loss, terms = method.student_loss()
    assert torch.isfinite(loss) and "kd_pool" in terms


def test_fast_meta_update_moves_meta_generator_by_the_summed_inner_gradients(digits_request, tmp_path):
    trainer = make_trainer(digits_request, tmp_path, "fast")
    method = trainer.method
    method.pretrain()
    before = [p.detach().clone() for p in method.meta_generator.parameters()]
    method.generator_step()
    torch.testing.assert_close(list(method.meta_generator.parameters()), before)  # untouched mid-batch
    assert any(g.abs().sum() > 0 for g in method.meta_grads)
    method.generator_step()
    method.end_generator_stage()  # batch done: one Adam step of the meta generator
    assert any(not torch.equal(p, q) for p, q in zip(method.meta_generator.parameters(), before))
    # the next batch starts from the updated meta generator
    for p, q in zip(method.generator.parameters(), method.meta_generator.parameters()):
        torch.testing.assert_close(p, q)


def test_cmi_memory_and_generator_reset(digits_request, tmp_path):
    trainer = make_trainer(digits_request, tmp_path, "cmi")
    method = trainer.method
    method.pretrain()
    terms = method.generator_step()
    assert {"gen_oh", "gen_adv", "gen_cr"} <= set(terms)
    assert "gen_bn" not in terms and any("L_bn" in note for note in trainer.notes)  # LeNet-5: no BatchNorm
    method.generator_step()
    method.end_generator_stage()
    assert method.memory.size == trainer.local_batch
    terms = method.generator_step()  # now with negatives from the memory
    assert torch.isfinite(terms["gen_cr"])


def test_dafl_generator_ignores_the_student(digits_request, tmp_path):
    trainer = make_trainer(digits_request, tmp_path, "dafl")
    calls = []
    handle = trainer.student_module.register_forward_hook(lambda *args: calls.append(1))
    terms = trainer.method.generator_step()
    handle.remove()
    assert not calls
    assert {"gen_oh", "gen_activation", "gen_entropy"} <= set(terms)


def test_zskt_attention_term_reaches_the_student(digits_request, tmp_path):
    trainer = make_trainer(digits_request, tmp_path, "zskt")
    method = trainer.method
    method.end_generator_stage()
    loss, terms = method.student_loss()
    assert terms["at_gen"] > 0
    loss.backward()
    conv1 = trainer.student_module.model.conv1.weight.grad
    assert conv1 is not None and conv1.abs().sum() > 0




def test_bn_matching_methods_match_a_batchnorm_teachers_statistics(tmp_path):
    """DFQ, DeepInversion, CMI and FastDFKD add a BatchNorm-statistics term when the teacher has BN."""
    from dfkd_bench.cluster.experiment import RunRequest, TeacherOptions

    torch.manual_seed(0)
    teacher = tmp_path / "resnet20.pt"
    torch.save(build_model("resnet20", 10, 1, 16).state_dict(), teacher)
    for method in ("dfq", "deepinv", "cmi", "fast"):
        request = RunRequest(methods=[method], dataset="digits", seeds=[0], budget="smoke", teacher_arch="resnet20",
                             student_arch="lenet5_half", overrides=overrides_for(method),
                             teacher=TeacherOptions(checkpoint=str(teacher)))
        trainer = Trainer(build_run_configs(request)[0], tmp_path / method, device="cpu", progress=False)
        trainer.build()
        trainer.method.pretrain()
        terms = trainer.method.generator_step()
        assert "gen_bn" in terms and torch.isfinite(terms["gen_bn"]), method
