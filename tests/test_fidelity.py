"""Issue 19, part A: the zoo's DFQ / ZSKT / DAFL / DFAD against their official definitions.

Every expected value here is computed by hand from the official code's definition (named in
each test), not by calling the function under test another way.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dfkd_bench.train import zoo_losses
from dfkd_bench.method_api import get_method
from dfkd_bench.models import build_generator, build_model


# ------------------------------------------------------------------ loss terms ---

def test_zskt_kl_is_the_official_mean_reduction_kl_over_n_times_c():
    # polo5/ZeroShotKnowledgeTransfer solver.py: F.kl_div(log_softmax(S), softmax(T)), reduction 'mean'.
    teacher = torch.tensor([[0.0, math.log(3.0)], [0.0, 0.0]])  # p = [1/4, 3/4] and [1/2, 1/2]
    student = torch.tensor([[0.0, 0.0], [0.0, math.log(3.0)]])  # q = [1/2, 1/2] and [1/4, 3/4]
    kl_row0 = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    kl_row1 = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    by_hand = (kl_row0 + kl_row1) / (2 * 2)  # N = 2 rows, C = 2 classes
    assert zoo_losses.kl_mean_over_entries(teacher, student).item() == pytest.approx(by_hand, rel=1e-6)
    # ... which is what ZSKT uses by default, in both losses.
    method = get_method("zskt")
    assert method.Params().kl_reduction == "mean"


def test_dafl_information_entropy_uses_log10():
    # DAFL-train.py: (softmax_o_T * torch.log10(softmax_o_T)).sum() of the batch-mean softmax.
    batch = torch.tensor([[0.0, 0.0], [0.0, math.log(3.0)]])  # mean [3/8, 5/8]
    by_hand = 0.375 * math.log10(0.375) + 0.625 * math.log10(0.625)
    assert zoo_losses.information_entropy_loss(batch, 10.0).item() == pytest.approx(by_hand, rel=1e-6)
    assert get_method("dafl").Params().entropy_log_base == 10.0
    # DFQ keeps the natural log (the DataFree re-implementation's class_balance_loss).
    natural = 0.375 * math.log(0.375) + 0.625 * math.log(0.625)
    assert zoo_losses.information_entropy_loss(batch).item() == pytest.approx(natural, rel=1e-6)


def test_dfq_weights_are_the_datafree_scripts():
    # zju-vipa/CMI scripts/dfq/*.sh: --adv 1 --bn 1 --oh 1 --balance 20; generative.py: Adam betas (0.5, 0.999).
    params = get_method("dfq").Params()
    assert (params.adv_weight, params.bn_weight, params.oh_weight, params.balance_weight) == (1.0, 1.0, 1.0, 20.0)
    assert (params.generator_beta1, params.generator_beta2) == (0.5, 0.999)


def test_dfq_generator_loss_by_hand():
    """-KL + oh * CE(argmax) + 20 * sum p log p on a batch whose terms are known by hand."""
    method = get_method("dfq")
    teacher = torch.tensor([[0.0, math.log(3.0)], [0.0, 0.0]])
    student = torch.zeros(2, 2)
    kl = (0.25 * math.log(0.5) + 0.75 * math.log(1.5) + 0.0) / 2  # batch mean of per-row KL(T || S)
    oh = (math.log(4 / 3) + math.log(2.0)) / 2  # CE to argmax (row 2: argmax 0, p = 1/2)
    mean_p = [(0.25 + 0.5) / 2, (0.75 + 0.5) / 2]
    balance = sum(p * math.log(p) for p in mean_p)
    fake = type("FakeDFQ", (), {"params": method.Params(), "bn_stats": None})()
    loss, terms = method.generator_objective(fake, None, teacher, student)
    assert terms["gen_balance"].item() == pytest.approx(balance, rel=1e-6)
    assert loss.item() == pytest.approx(-kl + oh + 20 * balance, rel=1e-5)


def test_dafl_activation_loss_taps_lenet5_c5_after_relu():
    # DAFL lenet.py: feature = relu3(conv3(...)).view(-1, 120); loss_activation = -features_T.abs().mean().
    from dfkd_bench.methods.zoo_common import feature_tap, tapping

    torch.manual_seed(0)
    model = build_model("lenet5", 10, 1, 28)
    tap = feature_tap(model)
    x = torch.rand(3, 1, 28, 28)
    with tapping(tap):
        model(x)
    (features,) = tap.take()
    assert features.shape == (3, 120)
    stage = F.max_pool2d(F.relu(model.conv2(F.max_pool2d(F.relu(model.conv1(x)), 2))), 2)
    c5 = F.relu(model.c5(stage.flatten(1)))
    assert torch.equal(features, c5)
    assert zoo_losses.activation_loss(features).item() == pytest.approx(-c5.abs().mean().item(), rel=1e-6)


def test_lenet_activation_tap_leaves_outputs_and_state_dict_keys_alone():
    torch.manual_seed(0)
    model = build_model("lenet5", 10, 1, 28)
    assert list(model.state_dict()) == ["conv1.weight", "conv1.bias", "conv2.weight", "conv2.bias", "c5.weight",
                                        "c5.bias", "fc6.weight", "fc6.bias", "fc7.weight", "fc7.bias"]
    x = torch.rand(2, 1, 28, 28)
    out = F.max_pool2d(F.relu(model.conv1(x)), 2)
    out = F.max_pool2d(F.relu(model.conv2(out)), 2)
    out = F.relu(model.fc6(F.relu(model.c5(out.flatten(1)))))
    assert torch.equal(model(x), model.fc7(out))


# ------------------------------------------------------------ paper generators ---

def _count_by_hand(nz: int, channels: int, side: int, output_affine: bool) -> int:
    s = side // 4
    linear = nz * 128 * s * s + 128 * s * s
    bn128, bn64 = 2 * 128, 2 * 64
    conv1 = 128 * 128 * 9 + 128
    conv2 = 128 * 64 * 9 + 64
    conv3 = 64 * channels * 9 + channels
    return linear + bn128 + conv1 + bn128 + conv2 + bn64 + conv3 + (2 * channels if output_affine else 0)


@pytest.mark.parametrize("name, affine", [("dfad_gen", False), ("dafl_gen", False), ("zskt_gen", True)])
@pytest.mark.parametrize("nz, channels, side", [(100, 1, 32), (256, 3, 32), (100, 1, 28)])
def test_paper_generators_shape_and_parameter_count(name, affine, nz, channels, side):
    torch.manual_seed(0)
    generator = build_generator(name, nz, channels, side)
    assert sum(p.numel() for p in generator.parameters()) == _count_by_hand(nz, channels, side, affine)
    out = generator(torch.randn(8, nz))
    assert out.shape == (8, channels, side, side)
    assert generator.output_space == "normalized"
    if not affine:  # tanh then BatchNorm(affine=False) in train mode: zero mean, unit variance per channel
        assert out.mean(dim=(0, 2, 3)).abs().max().item() < 1e-4
        assert out.var(dim=(0, 2, 3), unbiased=False).sub(1).abs().max().item() < 1e-2


def test_paper_generator_layers_follow_the_official_code():
    dfad, dafl = build_generator("dfad_gen", 100, 1, 32), build_generator("dafl_gen", 100, 1, 32)
    assert dfad.conv_blocks1[1].eps == 1e-5 and dafl.conv_blocks1[1].eps == 0.8 and dafl.conv_blocks2[1].eps == 0.8
    assert dafl.conv_blocks0[0].eps == 1e-5
    assert isinstance(dfad.conv_blocks2[-2], torch.nn.Tanh) and not dfad.conv_blocks2[-1].affine
    zskt = build_generator("zskt_gen", 100, 3, 32)
    assert zskt.layers[-1].affine and not any(isinstance(m, torch.nn.Tanh) for m in zskt.modules())
    assert dfad.l1[0].out_features == 128 * 8 * 8


def _datafree_layers_by_hand(nz: int, ngf: int, width: int, channels: int, side: int) -> torch.nn.Module:
    """The layer list of datafree/models/generator.py (zju-vipa/CMI, Fast-Datafree), typed in as facts:
    l1 = Sequential(Linear(nz, width * (side/4)^2)); conv_blocks = BN(width), Upsample x2, Conv(width, 2 ngf, 3,
    pad 1, no bias), BN, LeakyReLU(0.2), Upsample x2, Conv(2 ngf, ngf, no bias), BN, LeakyReLU(0.2),
    Conv(ngf, C, bias), Sigmoid; width = 2 ngf (Generator) or 4 ngf (LargeGenerator)."""
    nn = torch.nn

    class ByHand(nn.Module):
        def __init__(self):
            super().__init__()
            self.l1 = nn.Sequential(nn.Linear(nz, width * (side // 4) ** 2))
            self.conv_blocks = nn.Sequential(
                nn.BatchNorm2d(width), nn.Upsample(scale_factor=2), nn.Conv2d(width, 2 * ngf, 3, 1, 1, bias=False),
                nn.BatchNorm2d(2 * ngf), nn.LeakyReLU(0.2), nn.Upsample(scale_factor=2),
                nn.Conv2d(2 * ngf, ngf, 3, 1, 1, bias=False), nn.BatchNorm2d(ngf), nn.LeakyReLU(0.2),
                nn.Conv2d(ngf, channels, 3, 1, 1), nn.Sigmoid())

        def forward(self, z):
            return self.conv_blocks(self.l1(z).view(z.shape[0], width, side // 4, side // 4))

    return ByHand()


@pytest.mark.parametrize("name, width", [("datafree_gen", 128), ("datafree_large_gen", 256)])
@pytest.mark.parametrize("nz, channels, side", [(256, 3, 32), (100, 1, 28)])
def test_datafree_generators_are_the_official_layers(name, width, nz, channels, side):
    # parameters by hand: Linear, BN(width), conv width->128 (no bias), BN(128), conv 128->64 (no bias), BN(64),
    # conv 64->C (bias); e.g. datafree_gen at nz 256, C 3, 32 px: 2,105,344 + 256 + 147,456 + 256 + 73,728 + 128
    # + 1,731 = 2,328,899
    s = side // 4
    by_count = (nz * width * s * s + width * s * s) + 2 * width + width * 128 * 9 + 2 * 128 + 128 * 64 * 9 + 2 * 64 \
        + 64 * channels * 9 + channels
    torch.manual_seed(0)
    generator = build_generator(name, nz, channels, side)
    assert sum(p.numel() for p in generator.parameters()) == by_count
    if (name, nz, channels, side) == ("datafree_gen", 256, 3, 32):
        assert by_count == 2_328_899
    official = _datafree_layers_by_hand(nz, 64, width, channels, side)
    official.load_state_dict(generator.state_dict())  # the official module names: a published state dict loads
    generator.train(), official.train()
    z = torch.randn(6, nz)
    torch.testing.assert_close(torch.sigmoid(generator(z)), official(z))  # ours ends before the sigmoid
    assert generator.output_space == "logits"


def test_a_normalised_space_generator_is_refused_by_abm(digits_request, tmp_path):
    from dfkd_bench.train.engine import Trainer
    from dfkd_bench.errors import ConfigError
    from dfkd_bench.cluster.experiment import build_run_configs

    config = build_run_configs(digits_request(["abm"], overrides={"generator": "dfad_gen"}))[0]
    with pytest.raises(ConfigError, match="normalised space"):
        Trainer(config, tmp_path, device="cpu", progress=False).setup()


# ------------------------------------------------ what the student trains on, as in the official loops ---

def _trainer(digits_request, folder, method, **overrides):
    from dfkd_bench.train.engine import Trainer
    from dfkd_bench.cluster.experiment import build_run_configs

    config = build_run_configs(digits_request([method], overrides=overrides))[0]
    trainer = Trainer(config, folder, device="cpu", progress=False)
    trainer.setup()
    return trainer


def test_dafl_student_trains_on_the_generator_steps_own_images(digits_request, tmp_path):
    # DAFL-train.py: loss_kd = kdloss(net(gen_imgs.detach()), outputs_T.detach()) on the G step's batch.
    # The teacher runs once, in the G step (outputs_T); its logits serve the student steps (issue 28).
    trainer = _trainer(digits_request, tmp_path, "dafl", generator_lr=0.5)
    method = trainer.method
    seen, student_saw = [], []
    hook = trainer.teacher.register_forward_pre_hook(lambda _m, inputs: seen.append(inputs[0].detach().clone()))
    student_hook = trainer.student_module.register_forward_pre_hook(
        lambda _m, inputs: student_saw.append(inputs[0].detach().clone()))
    method.generator_step()
    method.end_generator_stage()
    method.student_loss()
    method.student_loss()
    hook.remove()
    student_hook.remove()
    assert len(seen) == 1 and len(student_saw) == 2
    assert torch.equal(student_saw[0], seen[0]) and torch.equal(student_saw[1], seen[0])


def test_zskt_student_steps_reuse_the_generator_steps_z_through_the_updated_generator(digits_request, tmp_path):
    # ZSKT LearnableLoader: one z for n_G + n_S batches, images regenerated by the (updated) generator.
    trainer = _trainer(digits_request, tmp_path, "zskt", generator_lr=0.5)
    method = trainer.method
    method.generator_step()
    z, _ = method._last_noise
    method.end_generator_stage()
    expected = method.synthesize(method.net.generator, (z, None))
    seen = []
    hook = trainer.teacher.register_forward_pre_hook(lambda _m, inputs: seen.append(inputs[0].detach().clone()))
    method.student_loss()
    method.student_loss()
    hook.remove()
    assert torch.allclose(seen[0], expected) and torch.equal(seen[0], seen[1])


def test_zskt_clips_the_generator_gradient_norm(digits_request, tmp_path):
    assert get_method("zskt").Params().generator_grad_clip == 5.0  # solver.py: clip_grad_norm_(G, 5)
    # At 0.1 (unclipped norms are ~0.6 on this smoke set-up, below the official 5) the clip must act.
    trainer = _trainer(digits_request, tmp_path, "zskt", generator_grad_clip=0.1)
    method = trainer.method
    norms = []
    original = method.optimizer.step

    def step(*args, **kwargs):
        grads = [p.grad.flatten() for p in method.net.parameters() if p.grad is not None]
        norms.append(torch.cat(grads).norm().item())
        return original(*args, **kwargs)

    method.optimizer.step = step
    method.params.generator_lr = 0.0
    for _ in range(3):
        method.generator_step()
    assert norms and max(norms) <= 0.1 + 1e-5


def test_a_normalised_space_generator_feeds_the_teacher_its_output_exactly(digits_request, tmp_path):
    trainer = _trainer(digits_request, tmp_path, "dfad", generator="dfad_gen", noise_dim=100)
    method = trainer.method
    assert method.normalized_output
    torch.manual_seed(1)
    z = torch.randn(8, 100)
    raw = method.net.generator(z)  # tanh + BatchNorm(affine=False): the normalised image itself
    images = method.generator_images(raw)
    inner = []
    teacher_net = trainer.teacher.model
    hook = teacher_net.register_forward_pre_hook(lambda _m, inputs: inner.append(inputs[0]))
    with torch.no_grad():
        trainer.teacher(images)
    hook.remove()
    assert torch.allclose(inner[0], raw, atol=1e-5)


def test_zskt_attention_taps_are_the_three_wrn_groups():
    # ZSKT wresnet.py: activation1..3 = outputs of block1..3, before the final BN-ReLU.
    from dfkd_bench.methods.zskt import attention_blocks

    for arch in ("wrn40_2", "wrn16_1"):
        wrn = build_model(arch, 10, in_channels=3, image_size=32)
        assert attention_blocks(wrn, (3, 32, 32)) == {(32, 32): wrn.block1, (16, 16): wrn.block2, (8, 8): wrn.block3}
    lenet = build_model("lenet5", 10, in_channels=1, image_size=28)
    assert list(attention_blocks(lenet, (1, 28, 28)).values()) == [lenet.conv1, lenet.conv2]


def test_zskt_attention_taps_follow_forward_order_on_batchnorm_lenet():
    # LeNet-5-BN registers bn1, bn2 after conv2; a registration-order rule tapped conv2 twice
    # (a 4x4 map under the 16x16 key) and a BN teacher with a plain student crashed.
    from dfkd_bench.methods.zskt import attention_blocks

    for arch in ("lenet5_bn", "lenet5_half_bn"):
        lenet = build_model(arch, 10, in_channels=1, image_size=16)
        assert attention_blocks(lenet, (1, 16, 16)) == {(16, 16): lenet.conv1, (4, 4): lenet.conv2}


@pytest.mark.parametrize("method", ["dfq", "zskt"])
def test_student_batches_use_the_generators_running_statistics_in_eval_mode(digits_request, tmp_path, method):
    # DataFree's synthesizer.sample draws student batches with G.eval(); the common protocol keeps train mode.
    import copy

    eval_mode = _trainer(digits_request, tmp_path / "eval", method, student_generator_mode="eval")
    train_mode = _trainer(digits_request, tmp_path / "train", method)
    eval_mode.method.net.load_state_dict(train_mode.method.net.state_dict())
    generator = eval_mode.method.net.generator
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in generator.modules())
    for module in generator.modules():  # running statistics unlike any batch's
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.fill_(3.0)
    buffers = copy.deepcopy(dict(generator.named_buffers()))
    z = torch.randn(16, eval_mode.method.params.noise_dim)
    expected_eval = torch.sigmoid(copy.deepcopy(generator).eval()(z, None).float())
    torch.testing.assert_close(eval_mode.method.synthesize(generator, (z, None)), expected_eval)
    assert generator.training  # put back
    assert all(torch.equal(buffers[k], v) for k, v in generator.named_buffers())  # eval: nothing updated
    trained = train_mode.method.synthesize(train_mode.method.net.generator, (z, None))
    assert not torch.allclose(trained, expected_eval)  # train mode: batch statistics, another image
    assert "student_generator_mode" not in train_mode.config.hashed_dict()["params"]  # default: old run ids



@pytest.mark.parametrize("method", ["dfq", "zskt", "dfad"])
def test_the_generator_step_sees_the_student_in_eval_mode_only_when_asked(digits_request, tmp_path, method):
    # DataFree's GenerativeSynthesizer.synthesize() calls self.student.eval(); the official DFAD, DAFL and ZSKT
    # code (and the default here) keep the student in train mode in the generator step.
    for mode in ("train", "eval"):
        trainer = _trainer(digits_request, tmp_path / mode, method, generator_step_student_mode=mode)
        student = trainer.method.ctx.student_module
        seen = []
        hook = student.register_forward_pre_hook(lambda module, _inputs: seen.append(module.training))
        try:
            trainer.method.generator_step()
        finally:
            hook.remove()
        assert seen == [mode == "train"], (mode, seen)  # one student forward, in the asked mode
        assert student.training  # put back for the student stage
    defaults = _trainer(digits_request, tmp_path / "default", method).config.hashed_dict()["params"]
    for name in ("generator_beta1", "student_generator_mode", "generator_step_student_mode"):
        assert name not in defaults, name  # at their defaults: the run ids of earlier runs


def test_student_mode_in_a_generator_step_without_the_student_is_refused(digits_request, tmp_path):
    from dfkd_bench.errors import ConfigError

    with pytest.raises(ConfigError, match="dafl's generator step does not run the student"):
        _trainer(digits_request, tmp_path, "dafl", generator_step_student_mode="eval")


@pytest.mark.parametrize("method, overrides, betas", [
    ("dfq", {}, (0.5, 0.999)),  # the DataFree re-implementation's GenerativeSynthesizer
    ("zskt", {}, (0.9, 0.999)),  # polo5's solver.py: optim.Adam(generator, lr) -- Adam's defaults
    ("zskt", {"generator_beta1": 0.5}, (0.5, 0.999)),  # ZSKT's DataFree protocol
    ("dafl", {}, (0.9, 0.999)),
])
def test_the_generators_adam_betas_reach_its_optimiser(digits_request, tmp_path, method, overrides, betas):
    trainer = _trainer(digits_request, tmp_path, method, **overrides)
    assert tuple(trainer.method.optimizer.param_groups[0]["betas"]) == betas


def test_zskt_without_attention_is_the_batch_mean_kl_at_temperature_one(digits_request, tmp_path):
    """The DataFree re-implementation's ZSKT (its paper protocol): student loss KLDiv() = batch-mean
    KL(T || S), no attention term, so nothing is tapped."""
    from dfkd_bench.methods.common import Source

    trainer = _trainer(digits_request, tmp_path, "zskt", at_weight=0.0, kl_reduction="batchmean")
    method = trainer.method
    assert method.resolutions == [] and not method.teacher_tap._handles and not method.student_tap._handles
    images = torch.rand(4, *trainer.method.ctx.image_shape)
    with torch.no_grad():
        teacher, student = method.ctx.teacher(images), method.ctx.student(images)
        loss, terms = method.distill([Source("gen", images, 1.0)])
    p, log_q = F.softmax(teacher, 1), F.log_softmax(student, 1)
    by_hand = sum(float((p[i] * (p[i].log() - log_q[i])).sum()) for i in range(4)) / 4
    assert float(loss) == pytest.approx(by_hand, rel=1e-5)
    assert float(terms["at_gen"]) == 0.0


def test_zskt_datafree_protocol_settings_train_end_to_end(digits_request, tmp_path):
    """The method settings of ZSKT's paper protocol (the DataFree re-implementation's) together, on a smoke
    digits run: it trains, and its records say it ran without attention and with the DataFree modes."""
    import json

    protocol = get_method("zskt").paper_protocols["cifar10"]
    params = dict(protocol.params)  # datafree_large_gen at digits' 16 px as at CIFAR's 32
    trainer = _trainer(digits_request, tmp_path, "zskt", **params)
    trainer.train()
    config = json.loads(trainer.store.config_path.read_text())
    for name in ("at_weight", "kl_reduction", "student_batch", "generator_beta1", "student_generator_mode",
                 "generator_step_student_mode"):
        assert config["params"][name] == protocol.params[name], name
    records = [json.loads(line) for line in trainer.store.records_path.read_text().splitlines()]
    trained = [r for r in records if "loss/kd_gen" in r]  # the step-0 evaluation has no losses yet
    assert trained and all(r["loss/at_gen"] == 0.0 and math.isfinite(r["loss/kd_gen"]) for r in trained)
    assert all(math.isfinite(r["test_accuracy"]) for r in records if r.get("kind") == "eval")


def test_fast_reset_l0_reinitialises_the_official_modules_of_the_datafree_generator(digits_request, tmp_path):
    # Fast-Datafree datafree/synthesis/fast_meta.py, reset_l0: for n, m in named_modules(): if n == "l1.0" or
    # n == "conv_blocks.0": normal_(m.weight, 0, 0.02); constant_(m.bias, 0) -- at ep == 120 + ep_start.
    trainer = _trainer(digits_request, tmp_path / "datafree", "fast", generator="datafree_gen", warmup=0)
    method = trainer.method
    linear, bn = method.meta_generator.l1[0], method.meta_generator.conv_blocks[0]
    assert method.reset_l0_modules() == [linear, bn]
    with torch.no_grad():
        for module in (linear, bn):
            module.weight.fill_(5.0), module.bias.fill_(5.0)
    method.batches_done = 119  # the batch about to start is the 120th after the warm-up
    method.prepare_generator()
    for module in (linear, bn):
        assert module.bias.abs().max().item() == 0.0
        assert module.weight.abs().max().item() < 0.2 and 0.01 < module.weight.std().item() < 0.03
    untouched = method.meta_generator.conv_blocks[3]  # the next BatchNorm keeps its values
    assert torch.equal(untouched.weight, torch.ones_like(untouched.weight))
    # the suite's generators have neither name: their first Linear, as before (the committed runs)
    tiny = _trainer(digits_request, tmp_path / "tiny", "fast")
    assert tiny.method.reset_l0_modules() == [tiny.method.meta_generator.fc]
