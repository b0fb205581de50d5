"""DeepInversion / ADI, CMI and FastDFKD against their authors' code (issue 19): each loss term
against a value computed by hand from the official definition, and each behaviour the official
code has (normalised unclipped pixels, balanced labels, student in eval mode during synthesis,
best-iterate features in CMI's memory, FastDFKD's bn_mmt / reset_l0 / warm-up, pool augmentation)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dfkd_bench.train import zoo_losses
from dfkd_bench.train.batchnorm import BatchNormStatistics
from dfkd_bench.train.engine import Trainer
from dfkd_bench.cluster.experiment import RunRequest, TeacherOptions, build_run_configs
from dfkd_bench.models import build_model


# ------------------------------------------------------------ loss terms by hand ---

def _softmax(row: list[float], temperature: float) -> list[float]:
    exps = [math.exp(v / temperature) for v in row]
    return [e / sum(exps) for e in exps]


def _adi_by_hand(teacher: list[list[float]], student: list[list[float]]) -> float:
    """NVlabs/DeepInversion cifar10 code: T = 3, P (student), Q (teacher), M from the unclamped P, Q,
    all three clamped to [0.01, 0.99]; KLDivLoss(batchmean)(log P, M) = mean_i sum_j M (log M - log P)."""
    clamp = lambda v: min(max(v, 0.01), 0.99)  # noqa: E731
    kl_mp = kl_mq = 0.0
    for t_row, s_row in zip(teacher, student):
        p, q = _softmax(s_row, 3.0), _softmax(t_row, 3.0)
        m = [0.5 * (a + b) for a, b in zip(p, q)]
        p, q, m = [clamp(v) for v in p], [clamp(v) for v in q], [clamp(v) for v in m]
        kl_mp += sum(mj * (math.log(mj) - math.log(pj)) for mj, pj in zip(m, p))
        kl_mq += sum(mj * (math.log(mj) - math.log(qj)) for mj, qj in zip(m, q))
    js = 0.5 * kl_mp / len(teacher) + 0.5 * kl_mq / len(teacher)
    return 1.0 - min(max(js, 0.0), 1.0)


def test_adi_competition_is_the_official_clamped_one_minus_js_at_t3():
    mild_t, mild_s = [[6.0, 0.0, 1.0]], [[0.0, 0.0, 2.0]]
    value = zoo_losses.adi_competition(torch.tensor(mild_t), torch.tensor(mild_s)).item()
    assert value == pytest.approx(_adi_by_hand(mild_t, mild_s), rel=1e-6)
    # not the textbook JS at T = 1 that the suite used before (1 - 0.153 here)
    assert value != pytest.approx(1.0 - zoo_losses.js_divergence(torch.tensor(mild_t), torch.tensor(mild_s)).item(),
                                  rel=1e-3)
    # saturated probabilities are clamped to [0.01, 0.99]: two confident, opposite rows
    sharp_t, sharp_s = [[30.0, 0.0]], [[0.0, 30.0]]
    m, p = 0.5, 0.01  # M = (P + Q) / 2 = 1/2 exactly before clamping; P, Q -> 0.01 / 0.99
    kl = m * math.log(m / p) + m * math.log(m / 0.99)  # = 1.614 > 1: the term clamps JS to 1
    assert kl > 1
    assert zoo_losses.adi_competition(torch.tensor(sharp_t), torch.tensor(sharp_s)).item() == pytest.approx(0.0)
    both_t, both_s = mild_t + [[30.0, 0.0, 0.0]], mild_s + [[0.0, 30.0, 0.0]]
    assert zoo_losses.adi_competition(torch.tensor(both_t), torch.tensor(both_s)).item() == pytest.approx(
        _adi_by_hand(both_t, both_s), rel=1e-6)


def test_the_datafree_competition_is_one_minus_an_unclamped_js():
    """DeepInvSyntheiszer's loss_adv = -jsdiv(S, T, T=3) clamps the probabilities, not JS: where JS > 1 (two
    confident, opposite rows) NVlabs' 1 - clamp(JS, 0, 1) has no gradient, the DataFree term keeps one."""
    sharp_t, sharp_s = [[30.0, 0.0]], [[0.0, 30.0]]
    m, p = 0.5, 0.01
    js = 0.5 * (m * math.log(m / p) + m * math.log(m / 0.99)) + 0.5 * (m * math.log(m / 0.99) + m * math.log(m / p))
    student = torch.tensor([[0.0, 20.0]], requires_grad=True)  # JS > 1 here too; M passes a gradient
    for clamp in (True, False):
        value = zoo_losses.adi_competition(torch.tensor(sharp_t), torch.tensor(sharp_s), clamp=clamp).item()
        assert value == pytest.approx(0.0 if clamp else 1.0 - js, rel=1e-6)
    for clamp, moves in ((True, False), (False, True)):
        student.grad = None
        zoo_losses.adi_competition(torch.tensor([[30.0, 0.0]]), student, clamp=clamp).backward()
        assert (student.grad.abs().max().item() > 0) == moves


def test_deepinversion_datafree_competes_with_the_unclamped_term(bn_lenet_teacher, tmp_path, monkeypatch):
    calls = []
    competition = zoo_losses.adi_competition
    monkeypatch.setattr(zoo_losses, "adi_competition", lambda *args, **kwargs: calls.append(kwargs) or competition(
        *args, **kwargs))
    for synthesiser, clamp in (("nvlabs", True), ("datafree", False)):
        _, method = make_method(bn_lenet_teacher, tmp_path / synthesiser, "deepinv", competition_weight=1.0,
                                synthesiser=synthesiser)
        method.generator_step()
        assert calls.pop()["clamp"] is clamp


def test_bn_feature_loss_is_deepinversions_hook_on_a_real_batchnorm_layer():
    """R_feature = ||running_var - var||_2 + ||running_mean - mean||_2 with the BIASED batch variance
    of the layer's input (the authors' DeepInversionFeatureHook), summed over layers."""
    torch.manual_seed(0)
    layer = nn.Sequential(nn.BatchNorm2d(2)).eval()
    layer[0].running_mean.copy_(torch.tensor([0.5, -1.0]))
    layer[0].running_var.copy_(torch.tensor([2.0, 0.25]))
    x = torch.randn(3, 2, 2, 2)
    stats = BatchNormStatistics(layer)
    with stats.recording():
        layer(x)
    loss = zoo_losses.feature_distribution_loss(stats.means, stats.vars, stats.running_means, stats.running_vars)
    values = x.permute(1, 0, 2, 3).reshape(2, -1).tolist()
    means = [sum(v) / len(v) for v in values]
    variances = [sum((a - mu) ** 2 for a in v) / len(v) for v, mu in zip(values, means)]  # biased
    by_hand = math.sqrt((2.0 - variances[0]) ** 2 + (0.25 - variances[1]) ** 2) + \
        math.sqrt((0.5 - means[0]) ** 2 + (-1.0 - means[1]) ** 2)
    assert loss.item() == pytest.approx(by_hand, rel=1e-5)


def test_fastdfkd_momentum_statistics_by_hand():
    means, variances = [torch.tensor([1.0, 3.0])], [torch.tensor([2.0])]
    past_means, past_vars = [torch.tensor([0.0, 1.0])], [torch.tensor([4.0])]
    blended_means, blended_vars = zoo_losses.momentum_statistics(means, variances, past_means, past_vars, 0.9)
    torch.testing.assert_close(blended_means[0], torch.tensor([0.1 * 1 + 0.9 * 0, 0.1 * 3 + 0.9 * 1]))
    torch.testing.assert_close(blended_vars[0], torch.tensor([0.1 * 2 + 0.9 * 4]))
    same = zoo_losses.momentum_statistics(means, variances, None, None, 0.9)  # first batch: no past
    assert torch.equal(same[0][0], means[0]) and torch.equal(same[1][0], variances[0])


def test_cmi_contrastive_loss_with_a_256_dimensional_head_by_hand():
    """CMI's L_cr as in datafree/synthesis/contrastive.py with the head of datafree_kd.py (head_dim=256):
    rows are [new instances, bank instances]; anchor = head(local), positive = head(global).detach();
    CE over (N + N') columns at tau; the mean over new rows plus the mean over bank rows."""
    from dfkd_bench.methods.cmi import CMIParams

    assert CMIParams().head_dim == 256  # the synthesiser's own default is 128; the script passes 256
    torch.manual_seed(0)
    head = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 256))
    local, global_ = torch.randn(3, 4), torch.randn(3, 4)  # 2 new instances + 1 from the bank
    anchors = F.normalize(head(local), dim=1)
    positives = F.normalize(head(global_), dim=1)
    loss = zoo_losses.cmi_contrastive_loss(anchors, positives, 0.2, new_rows=2).item()
    a, b = anchors.tolist(), positives.tolist()
    rows = []
    for i in range(3):
        logits = [sum(x * y for x, y in zip(a[i], b[j])) / 0.2 for j in range(3)]
        rows.append(-logits[i] + math.log(sum(math.exp(v) for v in logits)))
    assert loss == pytest.approx((rows[0] + rows[1]) / 2 + rows[2], rel=1e-5)


# ------------------------------------------------------------ behaviours on a BatchNorm teacher ---

def save_random_bn_teacher(folder, arch: str, mean_bound: float) -> str:
    """A digits teacher ``arch`` with random weights (seed 0) and non-trivial running statistics (means in
    +- ``mean_bound``, variances in [0.5, 2]), saved in ``folder``; its path."""
    torch.manual_seed(0)
    model = build_model(arch, 10, 1, 16)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-mean_bound, mean_bound)
            module.running_var.uniform_(0.5, 2.0)
    path = folder / f"{arch}.pt"
    torch.save(model.state_dict(), path)
    return str(path)


@pytest.fixture(scope="module")
def bn_lenet_teacher(tmp_path_factory) -> str:
    """A LeNet-5-BN digits teacher with random weights and non-trivial running statistics."""
    return save_random_bn_teacher(tmp_path_factory.mktemp("bn_teacher"), "lenet5_bn", 0.5)


def make_method(bn_lenet_teacher, tmp_path, method: str, **overrides):
    request = RunRequest(methods=[method], dataset="digits", seeds=[0], budget="smoke", teacher_arch="lenet5_bn",
                         student_arch="lenet5_half_bn", overrides={"synthesis_steps": 2, **overrides},
                         teacher=TeacherOptions(checkpoint=bn_lenet_teacher))
    trainer = Trainer(build_run_configs(request)[0], tmp_path, device="cpu", progress=False)
    trainer.setup()
    trainer.method.pretrain()
    return trainer, trainer.method


def test_zskt_runs_with_a_batchnorm_teacher_and_a_plain_student(bn_lenet_teacher, tmp_path):
    # Its attention taps once tapped the teacher's conv2 (4x4) at the 16x16 key: a shape error.
    request = RunRequest(methods=["zskt"], dataset="digits", seeds=[0], budget="smoke", teacher_arch="lenet5_bn",
                         student_arch="lenet5_half", teacher=TeacherOptions(checkpoint=bn_lenet_teacher))
    trainer = Trainer(build_run_configs(request)[0], tmp_path, device="cpu", progress=False)
    trainer.setup()
    trainer.method.pretrain()
    trainer.run_iteration()
    assert [tuple(f.shape[-2:]) for f in trainer.method.teacher_tap.take()] == []  # taken during the step
    assert trainer.method.resolutions == [(16, 16), (4, 4)]


def _student_bn_buffers(trainer) -> list[torch.Tensor]:
    return [b.detach().clone() for name, b in trainer.student_module.named_buffers() if "running" in name]


def test_deepinversion_optimises_normalised_unclipped_pixels_with_balanced_labels(bn_lenet_teacher, tmp_path):
    trainer, method = make_method(bn_lenet_teacher, tmp_path, "deepinv")
    n = trainer.local_batch
    assert method.labels.tolist() == [i % 10 for i in range(n)]  # every class in turn, not random
    start = method.pixels.detach().clone()
    assert start.min() < -1 and start.max() > 1  # randn in the teacher's normalised space
    mean, std = method.mean, method.std
    torch.testing.assert_close(method.current_images(), mean + std * start)
    method.generator_step()
    moved = (method.pixels.detach() - start).abs().max().item()
    assert moved == pytest.approx(method.params.synthesis_lr, rel=1e-3)  # Adam's first step: lr in x units
    # never clipped: the images leave [0, 1]
    images = method.current_images()
    assert images.min() < 0 or images.max() > 1


def test_adi_competition_term_uses_t3_and_an_eval_mode_student(bn_lenet_teacher, tmp_path):
    trainer, method = make_method(bn_lenet_teacher, tmp_path, "deepinv", competition_weight=1.0, jitter=0)
    before = _student_bn_buffers(trainer)
    pixels = method.pixels.detach().clone()
    terms = method.generator_step()
    for a, b in zip(before, _student_bn_buffers(trainer)):
        assert torch.equal(a, b)  # eval mode: the student's running statistics are untouched
    assert trainer.student_module.training  # and it is back in train mode for its own steps
    with torch.no_grad():
        images = method.to_images(pixels)
        trainer.student_module.eval()
        student = trainer.student_module(images)
        trainer.student_module.train()
        teacher = trainer.teacher(images)
    expected = _adi_by_hand(teacher.tolist(), student.tolist())
    assert terms["gen_competition"].item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("method_name,overrides", [("cmi", {}), ("fast", {"warmup": 1})])
def test_generator_pool_methods_synthesise_with_the_student_in_eval_mode(bn_lenet_teacher, tmp_path, method_name,
                                                                          overrides):
    trainer, method = make_method(bn_lenet_teacher, tmp_path, method_name, **overrides)
    before = _student_bn_buffers(trainer)
    terms = method.generator_step()
    assert "gen_adv" in terms  # the student took part
    for a, b in zip(before, _student_bn_buffers(trainer)):
        assert torch.equal(a, b)
    assert trainer.student_module.training


def test_cmi_head_is_256_wide_and_memory_gets_the_best_iterates_features(bn_lenet_teacher, tmp_path):
    trainer, method = make_method(bn_lenet_teacher, tmp_path, "cmi")
    assert method.head[-1].out_features == 256
    seen = []
    for _ in range(2):
        terms = method.generator_step()
        seen.append((terms["gen_loss"].item(), method.step_features.clone()))
    method.end_generator_stage()  # the batch is finished: its features join the memory
    best = min(seen, key=lambda item: item[0])[1]
    assert method.memory.size == trainer.local_batch
    torch.testing.assert_close(method.memory.data[:trainer.local_batch], best)


def test_fastdfkd_bn_momentum_reset_l0_and_warmup(bn_lenet_teacher, tmp_path):
    trainer, method = make_method(bn_lenet_teacher, tmp_path, "fast", warmup=1)
    assert method.params.bn_mmt == 0.9 and method.params.reset_l0
    assert "gen_adv" in method.generator_step()  # warmup 1: the code's ep >= 1 holds on the first batch
    method.generator_step()
    last = [m.clone() for m in method.last_statistics[0]]
    method.end_generator_stage()
    assert all(torch.equal(a, b) for a, b in zip(method.bn_momentum[0], last))  # first batch: the past is it
    method.generator_step()
    method.generator_step()
    newer = [m.clone() for m in method.last_statistics[0]]
    method.end_generator_stage()
    for past, old, new in zip(method.bn_momentum[0], last, newer):
        torch.testing.assert_close(past, 0.9 * old + 0.1 * new)
    # reset_l0: G_meta's first layer is re-drawn once, at batch 120 + warmup; the rest is kept
    first = method.meta_generator.fc
    others = {k: v.clone() for k, v in method.meta_generator.state_dict().items() if not k.startswith("fc.")}
    weight = first.weight.detach().clone()
    method.batches_done = 120 + 1 - 2  # the next batch is number 120 + warmup - 1 (counting from 1): no reset
    method.prepare_generator()
    assert torch.equal(first.weight, weight)
    method.batches_done = 120 + 1 - 1
    method.prepare_generator()
    assert not torch.equal(first.weight, weight) and torch.all(first.bias == 0)
    assert first.weight.std().item() == pytest.approx(0.02, rel=0.1)
    for key, value in method.meta_generator.state_dict().items():
        if key in others:
            assert torch.equal(value, others[key]), key


@pytest.mark.parametrize("augment", ["crop_flip", "none"])
def test_pool_images_go_through_the_train_transform_in_kd(bn_lenet_teacher, tmp_path, augment):
    trainer, method = make_method(bn_lenet_teacher, tmp_path, "fast", pool_augment=augment)
    method.pool.push(torch.ones((trainer.local_batch, 1, 16, 16)))
    images = method.student_images()
    assert images.shape == (trainer.local_batch, 1, 16, 16)
    if augment == "none":
        assert torch.equal(images, torch.ones_like(images))
    else:  # 2 pixels of zero padding (16 / 8) show up in the random crops
        assert (images == 0).any() and ((images == 0) | (images == 1)).all()


def test_cpu_presets_keep_pool_augmentation_off_and_say_why():
    from dfkd_bench.method_api import get_method

    for name in ("deepinv", "cmi", "fast"):
        method = get_method(name)
        assert method.Params().pool_augment == "crop_flip"
        assert method.preset_params["digits"]["pool_augment"] == "none"


def test_lenet5_bn_adds_batchnorm_and_leaves_lenet5_keys_alone():
    plain, bn = build_model("lenet5", 10, 1, 16), build_model("lenet5_bn", 10, 1, 16)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in plain.modules())
    assert sum(isinstance(m, nn.BatchNorm2d) for m in bn.modules()) == 2
    assert set(plain.state_dict()) < set(bn.state_dict())
    assert sorted(plain.state_dict()) == ["c5.bias", "c5.weight", "conv1.bias", "conv1.weight", "conv2.bias",
                                          "conv2.weight", "fc6.bias", "fc6.weight", "fc7.bias", "fc7.weight"]
    half = build_model("lenet5_half_bn", 10, 1, 16)
    assert half(torch.zeros(2, 1, 16, 16)).shape == (2, 10)


@pytest.mark.parametrize("method, setting, value", [
    ("deepinv", "competition_temperature", 0.0), ("deepinv", "jitter", -1), ("fast", "bn_mmt", 1.0),
    ("cmi", "pool_augment", "cutout"),
])
def test_new_pool_settings_out_of_range_are_one_line_errors_before_any_run(method, setting, value, digits_request):
    from dfkd_bench.errors import ConfigError

    with pytest.raises(ConfigError, match=setting):
        build_run_configs(digits_request([method], overrides={setting: value}))


# ------------------------------------------- DeepInversion as the DataFree re-implementation synthesises ---

def test_total_variation_l1_is_the_datafree_mean_absolute_form_by_hand():
    # criterions.get_image_prior_losses: sum over 4 neighbour differences of mean(|d| / 255) * 255 = mean |d|.
    x = torch.tensor([[[[0.0, 1.0], [3.0, 7.0]]]])
    horizontal = (abs(0 - 1) + abs(3 - 7)) / 2  # x[..., :-1] - x[..., 1:]
    vertical = (abs(0 - 3) + abs(1 - 7)) / 2  # x[:, :, :-1] - x[:, :, 1:]
    diagonal_up = abs(3 - 1)  # x[:, :, 1:, :-1] - x[:, :, :-1, 1:]
    diagonal_down = abs(0 - 7)  # x[:, :, :-1, :-1] - x[:, :, 1:, 1:]
    assert zoo_losses.total_variation_l1(x).item() == pytest.approx(horizontal + vertical + diagonal_up + diagonal_down)


def test_deepinversion_datafree_synthesiser_clips_sorts_and_saves_the_last_iterate(bn_lenet_teacher, tmp_path):
    """DeepInvSyntheiszer: random labels sorted, Adam betas (0.5, 0.99), R_TV (mean-|d| form) on the batch before
    jitter and flip, pixels clipped to the image range after every step, the last iterate into the pool."""
    trainer, method = make_method(bn_lenet_teacher, tmp_path, "deepinv", synthesiser="datafree", tv_weight=0.001)
    labels = method.labels.tolist()
    assert labels == sorted(labels) and labels != [i % 10 for i in range(len(labels))]
    assert tuple(method.optimizer.param_groups[0]["betas"]) == (0.5, 0.99)
    low, high = -method.mean / method.std, (1 - method.mean) / method.std
    before = method.pixels.detach().clone()
    terms = method.generator_step()
    assert terms["gen_tv"].item() == pytest.approx(zoo_losses.total_variation_l1(before).item(), rel=1e-5)
    pixels = method.pixels.detach()
    assert torch.all(pixels >= low - 1e-6) and torch.all(pixels <= high + 1e-6)
    assert torch.any(pixels == low) or torch.any(pixels == high)  # randn starts outside: clipped onto the bounds
    method.generator_step()  # synthesis_steps = 2: the batch is finished
    last, best = method.current_images(), method.best_images.clone()
    assert not torch.allclose(best, last, atol=0.5 / 255 + 1e-6)  # the lowest-loss iterate is another one
    method.end_generator_stage()
    stored = method.pool._decode(method.pool.images[:method.pool.size]).float()
    torch.testing.assert_close(stored, last, atol=0.5 / 255 + 1e-6, rtol=0)  # the final iterate, as 8-bit pixels
    # the default (NVlabs) synthesiser: balanced labels, Adam's default betas, out of the run id
    nvlabs_trainer, nvlabs = make_method(bn_lenet_teacher, tmp_path / "nvlabs", "deepinv")
    assert tuple(nvlabs.optimizer.param_groups[0]["betas"]) == (0.9, 0.999)
    assert "synthesiser" not in nvlabs_trainer.config.hashed_dict()["params"]
    assert trainer.config.hashed_dict()["params"]["synthesiser"] == "datafree"


def test_random_flip_flips_the_whole_batch_half_of_the_time():
    from dfkd_bench.methods.zoo_common import random_flip

    images = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(2, 1, 3, 4)
    rng = torch.Generator().manual_seed(0)
    outcomes = []
    for _ in range(200):
        out = random_flip(images, rng)
        assert torch.equal(out, images) or torch.equal(out, images.flip(3))
        outcomes.append(torch.equal(out, images.flip(3)))
    assert 70 < sum(outcomes) < 130
