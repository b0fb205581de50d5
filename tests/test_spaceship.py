"""SpaceshipNet (issue 29) against its authors' code (skgyu/SpaceshipNet, model_CFE_mSARC_base_V37.py): each
loss term against a value computed by hand from the official definition, the whole student loss and its
gradient against the official mechanism (tensor hooks + ``autograd.grad`` w.r.t. the parameters with a one-hot
``grad_outputs``, ``fc_like_conv``, ``nn.KLDivLoss()``), and each behaviour of the official loop (a persistent
generator trained on 0.5 CE + L_bn with fixed z and balanced labels, pools of the best iterate's features,
student images decoded by the current generator in eval mode, channel exchange)."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dfkd_bench.cluster.experiment import RunRequest, TeacherOptions, build_run_configs
from dfkd_bench.errors import ConfigError
from dfkd_bench.method_api import get_method
from dfkd_bench.methods import spaceship
from dfkd_bench.methods.zoo_common import root_model
from dfkd_bench.models import build_generator
from dfkd_bench.train.engine import Trainer
from test_pool_fidelity import bn_lenet_teacher, make_method, save_random_bn_teacher  # noqa: F401 - a fixture
from test_reproduce import _configs

REPO = Path(__file__).resolve().parents[1]


def _softmax(row: list[float], temperature: float) -> list[float]:
    exps = [math.exp(v / temperature) for v in row]
    return [e / sum(exps) for e in exps]


# ------------------------------------------------------------ loss terms by hand ---

@pytest.mark.parametrize("temperature", [30.0, 2.0])
def test_kd_is_the_official_kldivloss_mean_times_t_squared_by_hand(temperature):
    """train_S: nn.KLDivLoss()(log_softmax(s/T), softmax(t/T)) * alpha T^2 -- the default reduction 'mean'
    averages the N x C entries p (log p - log q)."""
    teacher, student = [[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]], [[0.0, 1.0, 0.0], [1.0, -1.0, 0.0]]
    entries = []
    for t_row, s_row in zip(teacher, student):
        p, q = _softmax(t_row, temperature), _softmax(s_row, temperature)
        entries += [pj * (math.log(pj) - math.log(qj)) for pj, qj in zip(p, q)]
    official = sum(entries) / len(entries) * temperature ** 2
    value = spaceship.spaceship_kd(torch.tensor(teacher), torch.tensor(student), temperature, "mean").item()
    assert value == pytest.approx(official, rel=1e-4)  # float32 cancellation at T = 30, as in the official loss
    batchmean = spaceship.spaceship_kd(torch.tensor(teacher), torch.tensor(student), temperature, "batchmean").item()
    assert batchmean == pytest.approx(sum(entries) / 2 * temperature ** 2, rel=1e-4)  # C = 3 times the official


def test_class_activation_maps_are_the_classifier_at_every_position_by_hand():
    """cope_fclikeconv: a bias-free 1x1 conv whose weight is the classifier's: CAM[c] = sum_d W[c, d] F[d]."""
    features = torch.tensor([[[[1.0, 3.0]], [[2.0, -1.0]]]])  # 1 x 2 channels x 1 x 2 positions
    weight = torch.tensor([[1.0, 0.0], [0.5, -1.0], [2.0, 1.0]])  # 3 classes x 2
    by_hand = [[1 * 1 + 0 * 2, 1 * 3 + 0 * -1], [0.5 * 1 - 1 * 2, 0.5 * 3 - 1 * -1], [2 * 1 + 1 * 2, 2 * 3 + 1 * -1]]
    cams = spaceship.class_activation_maps(features, weight)
    assert cams.shape == (1, 3, 1, 2)
    assert cams[0, :, 0, :].tolist() == by_hand
    official = F.conv2d(features, weight[:, :, None, None])  # fc_like_conv itself
    assert torch.equal(cams, official)


def test_grad_cam_weights_are_the_spatial_mean_of_the_selected_logits_gradient_by_hand():
    """gradcam_cope: a_k = mean_{h,w} dy_c / dA_k, cam = sum_k a_k A_k, no ReLU. For y = W mean_{h,w} relu(A) + b:
    dy_c / dA_k[h, w] = W[c, k] / 4 where A_k[h, w] > 0, else 0, so a_k = W[c, k] (positives of A_k) / 16."""
    values = [[[[1.0, -2.0], [3.0, 0.5]], [[-1.0, -1.0], [2.0, 4.0]]],
              [[[0.5, 0.5], [-3.0, 1.0]], [[2.0, -0.5], [1.0, -2.0]]]]  # 2 samples x 2 channels x 2 x 2
    weight = [[1.0, -2.0], [0.5, 3.0], [-1.0, 1.0]]
    classes = [2, 1]
    features = torch.tensor(values, requires_grad=True)
    logits = torch.relu(features).mean(dim=(2, 3)) @ torch.tensor(weight).t() + torch.tensor([0.1, 0.2, 0.3])
    selected = logits.gather(1, torch.tensor(classes)[:, None]).sum()
    (cam,) = spaceship.grad_cams([features], selected, retain_graph=True)
    for i in range(2):
        a = [weight[classes[i]][k] * sum(v > 0 for row in values[i][k] for v in row) / 16 for k in range(2)]
        for h in range(2):
            for w in range(2):
                by_hand = sum(a[k] * values[i][k][h][w] for k in range(2))
                assert cam[i, h, w].item() == pytest.approx(by_hand, rel=1e-6)
    assert (cam < 0).any()  # no ReLU on the map
    # the weights a_k are constants (no create_graph): d(sum cam) / dA_k[h, w] = a_k
    (grad,) = torch.autograd.grad(cam.sum(), features)
    assert grad[0, 0, 0, 0].item() == pytest.approx(weight[2][0] * 3 / 16)  # 3 of sample 0's channel 0 are > 0
    assert grad[1, 1, 1, 1].item() == pytest.approx(weight[1][1] * 2 / 16)


def test_channel_exchange_keeps_half_of_each_rows_channels_and_takes_the_rest_from_the_mirror_row():
    """channel_mix_batch: row i keeps nc // 2 channels picked without replacement and takes the others from row
    N-1-i (the middle row of an odd batch mixes with itself)."""
    rows, channels = 5, 7
    features = torch.arange(rows * channels * 4, dtype=torch.float32).view(rows, channels, 2, 2)
    mixed = spaceship.channel_exchange(features, torch.Generator().manual_seed(0))
    picks = []
    for i in range(rows):
        own = [torch.equal(mixed[i, c], features[i, c]) for c in range(channels)]
        mirror = [torch.equal(mixed[i, c], features[rows - 1 - i, c]) for c in range(channels)]
        assert all(a or b for a, b in zip(own, mirror))
        if i != rows // 2:
            assert sum(own) == channels // 2
        picks.append(tuple(own))
    assert len(set(picks)) > 2  # drawn per row
    again = spaceship.channel_exchange(features, torch.Generator().manual_seed(1))
    assert not torch.equal(again, mixed)


# ------------------------------------------------------------ the generator ---

@pytest.mark.parametrize("arch, size, ends, shapes", [
    ("datafree_gen", 32, [0, 4, 8], [(128, 8, 8), (128, 16, 16), (64, 32, 32)]),  # CMIGeneratorV3's three
    ("gen_tiny", 16, [1, 3, 5], [(32, 4, 4), (16, 8, 8), (8, 16, 16)]),
    ("gen32", 32, [1, 3, 5, 7], [(256, 4, 4), (128, 8, 8), (64, 16, 16), (32, 32, 32)]),
])
def test_generator_levels_are_the_officials_and_decode_from_each_of_them(arch, size, ends, shapes):
    torch.manual_seed(0)
    generator = build_generator(arch, 256, 3, size).eval()
    levels = spaceship.GeneratorLevels(generator)
    assert levels.ends == ends
    z = torch.randn(4, 256)
    with torch.no_grad():
        out, features = levels.forward(z)
        assert torch.equal(out, generator(z))
        assert [tuple(f.shape[1:]) for f in features] == shapes
        for level, feature in enumerate(features):  # generate_using_convout(conv_out, conv_idx)
            torch.testing.assert_close(levels.decode(feature, level), out)


def test_a_generator_without_levels_is_one_line():
    with pytest.raises(ConfigError, match="spaceship decodes features"):
        spaceship.GeneratorLevels(build_generator("dfad_gen", 256, 3, 32))


def test_generator_initialisation_is_the_official_kaiming():
    """networks.weights_init('kaiming'): kaiming_normal_(a=0, fan_in) = N(0, 2 / fan_in), biases 0, BN N(1, .02)."""
    generator = build_generator("datafree_gen", 256, 3, 32)
    spaceship.kaiming_init(generator, torch.Generator().manual_seed(0))
    linear, conv = generator.l1[0], generator.conv_blocks[2]
    assert linear.weight.std().item() == pytest.approx(math.sqrt(2 / 256), rel=0.01)
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / (128 * 9)), rel=0.02)
    assert torch.all(linear.bias == 0) and torch.all(generator.conv_blocks[9].bias == 0)
    bn = generator.conv_blocks[0]
    assert bn.weight.mean().item() == pytest.approx(1.0, abs=0.01) and bn.weight.std().item() == pytest.approx(
        0.02, rel=0.3)
    assert torch.all(bn.bias == 0)


# ------------------------------------------------------------ the loop on a BatchNorm teacher ---

def test_synthesis_trains_only_the_persistent_generator_on_half_ce_plus_bn(bn_lenet_teacher, tmp_path):
    """train_G: Adam(G, lr 1e-3, betas (0.5, 0.999)) without z; balanced labels; L = 0.5 CE + L_bn, no adversarial
    term (the student takes no part); z fixed within a batch; G is not reset when a batch is finished."""
    trainer, method = make_method(bn_lenet_teacher, tmp_path, "spaceship")
    batch = trainer.local_batch
    assert torch.equal(method.labels, torch.arange(batch) % 10)
    assert not method.z.requires_grad
    (group,) = method.optimizer.param_groups
    assert group["betas"] == (0.5, 0.999) and group["lr"] == 1e-3
    assert [id(p) for p in group["params"]] == [id(p) for p in method.generator.parameters()]
    z = method.z.clone()
    student_state = copy.deepcopy(trainer.student_module.state_dict())
    terms = method.generator_step()
    assert set(terms) == {"gen_oh", "gen_bn", "gen_loss"}
    assert terms["gen_loss"].item() == pytest.approx(0.5 * terms["gen_oh"].item() + terms["gen_bn"].item(), rel=1e-6)
    assert torch.equal(method.z, z)
    for key, value in trainer.student_module.state_dict().items():
        assert torch.equal(value, student_state[key]), key
    method.generator_step()
    generator_after = copy.deepcopy(method.generator.state_dict())
    method.end_generator_stage()  # the batch is finished: a new z and a new optimiser, the same G
    for key, value in method.generator.state_dict().items():
        assert torch.equal(value, generator_after[key]), key
    assert not torch.equal(method.z, z)
    assert method.optimizer.state == {}


def test_pools_get_the_best_iterates_features_at_every_level(bn_lenet_teacher, tmp_path):
    trainer, method = make_method(bn_lenet_teacher, tmp_path, "spaceship")
    seen = []
    for _ in range(2):
        terms = method.generator_step()
        seen.append((terms["gen_loss"].item(), [f.clone() for f in method.step_features]))
    method.end_generator_stage()
    best = min(seen, key=lambda item: item[0])[1]
    assert [tuple(f.shape[1:]) for f in best] == [(32, 4, 4), (16, 8, 8), (8, 16, 16)]  # gen_tiny's levels
    for bank, features in zip(method.banks, best):
        assert bank.size == trainer.local_batch
        torch.testing.assert_close(bank.images[:bank.size], features)


def test_feature_pools_store_float32_as_the_runs_own_precision(bn_lenet_teacher, tmp_path):
    """feature_dtype float32 is full precision: the official pools keep the features as computed, so in a float64
    step-equivalence replay they are float64 (float32 storage rounded them: 1.1e-7, beyond RTOL, in the trace)."""
    from dfkd_bench.methods.mem import MemoryBank

    _, method = make_method(bn_lenet_teacher, tmp_path, "spaceship")
    assert {bank.images.dtype for bank in method.banks} == {torch.float32}
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        assert spaceship.feature_storage("float32") == torch.float64
        for name, stored in (("float32", torch.float64), ("float16", torch.float16)):
            assert MemoryBank(2, (3,), spaceship.feature_storage(name), torch.device("cpu")).images.dtype == stored
    finally:
        torch.set_default_dtype(previous)


class _Draws:
    """A host generator that draws the level and the CFE coin the test asks for."""

    def __init__(self, level: int, coin: float):
        self.level, self.coin = level, coin

    def randrange(self, count: int) -> int:
        assert count == 3
        return self.level

    def random(self) -> float:
        return self.coin


@pytest.mark.parametrize("level", [0, 1, 2])
def test_student_images_are_stored_features_decoded_by_the_current_generator_in_eval_mode(bn_lenet_teacher,
                                                                                          tmp_path, level):
    trainer, method = make_method(bn_lenet_teacher, tmp_path, "spaceship", pool_augment="none")
    for _ in range(2):
        method.generator_step()
    method.end_generator_stage()
    row = method.banks[level].images[3].clone()
    method.banks[level].images[:] = row  # every stored row is row 3: any sample of the pool is known
    method.generator_step()  # G moves on after the batch was stored: the student sees the CURRENT G
    buffers = [b.clone() for b in method.generator.buffers()]
    method.host_rng = _Draws(level, coin=0.9)  # 0.9 > 0.7: no exchange
    images = method.student_images()
    assert method.generator.training and all(torch.equal(a, b) for a, b in zip(buffers, method.generator.buffers()))
    with torch.no_grad():
        reference = copy.deepcopy(method.generator).eval()
        expected = torch.sigmoid(spaceship.GeneratorLevels(reference).decode(row[None], level))
    assert images.shape == (trainer.local_batch, 1, 16, 16)
    torch.testing.assert_close(images, expected.expand_as(images))
    method.host_rng = _Draws(level, coin=0.5)  # 0.5 < 0.7: exchanged (a row exchanged with itself is itself)
    torch.testing.assert_close(method.student_images(), expected.expand_as(images))


def test_the_cfe_coin_exchanges_with_probability_exchange_p(bn_lenet_teacher, tmp_path, monkeypatch):
    trainer, method = make_method(bn_lenet_teacher, tmp_path, "spaceship")
    method.generator_step()
    calls = []
    exchange = spaceship.channel_exchange
    monkeypatch.setattr(spaceship, "channel_exchange", lambda f, rng: calls.append(1) or exchange(f, rng))
    for coin, exchanged in ((0.69, 1), (0.71, 0)):
        calls.clear()
        method.host_rng = _Draws(0, coin)
        method.student_images()
        assert len(calls) == exchanged


def test_lenet_has_grad_cam_at_both_resolutions_and_no_cam(bn_lenet_teacher, tmp_path):
    trainer, method = make_method(bn_lenet_teacher, tmp_path, "spaceship")
    assert method.gradcam_resolutions == [(16, 16), (4, 4)]
    assert method.teacher_map is None
    assert any("CAM term is skipped" in note for note in trainer.notes)
    loss, terms = method.student_loss()
    assert set(terms) == {"kd_pool", "msarc_gradcam", "student_loss"} and math.isfinite(loss.item())


# ------------------------------------------------------------ the whole student loss against the official ---

@pytest.fixture(scope="module")
def wrn_teacher(tmp_path_factory) -> str:
    """A WRN-16-1 digits teacher, random weights and running statistics: a network with the official CAM (a
    linear classifier over the global average of its last map), as the paper's WRN pairs."""
    return save_random_bn_teacher(tmp_path_factory.mktemp("wrn_teacher"), "wrn16_1", 0.2)


def wrn_trainer(wrn_teacher, tmp_path, **overrides) -> Trainer:
    request = RunRequest(methods=["spaceship"], dataset="digits", seeds=[0], budget="smoke", teacher_arch="wrn16_1",
                         student_arch="wrn16_1", overrides={"synthesis_steps": 2, **overrides},
                         teacher=TeacherOptions(checkpoint=wrn_teacher))
    trainer = Trainer(build_run_configs(request)[0], tmp_path, device="cpu", progress=False)
    trainer.setup()
    trainer.method.pretrain()
    return trainer


def _official_student_loss(teacher: nn.Module, student: nn.Module, images, temperature: float):
    """V37 train_S's loss, the authors' way: tensor hooks on each group's output collect the gradients of
    autograd.grad(out, net.parameters(), grad_outputs=one_hot(teacher argmax)); fc_like_conv is a 1x1 conv
    holding a COPY of the classifier's weight; nn.KLDivLoss() (mean) * alpha T^2."""
    teacher = copy.deepcopy(teacher)
    for parameter in teacher.parameters():  # the official teacher's weights require gradients (never stepped)
        parameter.requires_grad_(True)
    saved = {}

    def instrument(model, kind):
        root = root_model(model)
        saved[kind] = {"outputs": [], "gradients": [], "map": []}

        def group_output(_module, _inputs, output):
            saved[kind]["outputs"].append(output)
            output.register_hook(lambda grad: saved[kind]["gradients"].append(grad))

        for name in ("block1", "block2", "block3"):  # the official WRN's Grad-CAM layers (wresnet_1028_R2.py)
            getattr(root, name).register_forward_hook(group_output)
        root.avgpool.register_forward_pre_hook(lambda _m, inputs: saved[kind]["map"].append(inputs[0]))
        return root

    t_root, s_root = instrument(teacher, "t"), instrument(student, "s")
    teacher_out, student_out = teacher(images), student(images)
    one_hot = F.one_hot(teacher_out.max(1)[1], num_classes=10).float()
    cams = {}
    for kind, net, out in (("t", teacher, teacher_out), ("s", student, student_out)):
        torch.autograd.grad(out, list(net.parameters()), grad_outputs=one_hot, retain_graph=True)
        cams[kind] = [(g.mean([2, 3]).unsqueeze(2).unsqueeze(3) * a).sum(dim=1)
                      for g, a in zip(saved[kind]["gradients"][::-1], saved[kind]["outputs"])]
    kl = nn.KLDivLoss()(F.log_softmax(student_out / temperature, dim=1), F.softmax(teacher_out / temperature, dim=1))
    kl = kl * temperature * temperature
    fc_like = {kind: root.fc.weight.detach().clone()[:, :, None, None] for kind, root in (("t", t_root), ("s", s_root))}
    cam = nn.MSELoss()(F.conv2d(saved["s"]["map"][0], fc_like["s"]), F.conv2d(saved["t"]["map"][0], fc_like["t"]))
    gradcam = sum(nn.MSELoss()(s, t) for s, t in zip(cams["s"], cams["t"]))
    return kl + cam + gradcam, {"kd_pool": kl, "msarc_cam": cam, "msarc_gradcam": gradcam}


def test_the_student_loss_and_its_gradient_are_the_officials(wrn_teacher, tmp_path):
    trainer = wrn_trainer(wrn_teacher, tmp_path, kd_temperature=30.0, kl_reduction="mean")
    method, ctx = trainer.method, trainer.method.ctx
    assert method.gradcam_resolutions == [(16, 16), (8, 8), (4, 4)] and method.teacher_map.resolution == (4, 4)
    images = torch.rand((trainer.local_batch, 1, 16, 16), generator=torch.Generator().manual_seed(3))
    method.student_images = lambda: images
    official_student = copy.deepcopy(ctx.student)  # before the method's forward moves the BN statistics
    official_loss, official_terms = _official_student_loss(ctx.teacher, official_student, images, 30.0)
    official_loss.backward()
    loss, terms = method.student_loss()
    trainer.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    assert loss.item() == pytest.approx(official_loss.item(), rel=1e-4)  # float32
    for name, value in official_terms.items():  # the KL at T = 30 loses digits to float32 cancellation (both ways)
        assert terms[name].item() == pytest.approx(value.item(), rel=1e-3 if name == "kd_pool" else 1e-5), name
    for (name, ours), theirs in zip(ctx.student.named_parameters(), official_student.parameters()):
        scale = theirs.grad.abs().max().item()
        assert scale > 0 and (ours.grad - theirs.grad).abs().max().item() <= 1e-4 * scale, name  # float32


def test_the_cam_term_sends_no_gradient_to_the_students_classifier(wrn_teacher, tmp_path):
    trainer = wrn_trainer(wrn_teacher, tmp_path, kd_weight=0.0, gradcam_weight=0.0)
    method = trainer.method
    method.generator_step()
    loss, terms = method.student_loss()
    assert set(terms) == {"kd_pool", "msarc_cam", "student_loss"} and terms["msarc_cam"].item() > 0
    loss.backward()
    root = root_model(trainer.student_module)
    assert torch.all(root.fc.weight.grad == 0) and root.block3[0].conv1.weight.grad.abs().sum() > 0


@pytest.mark.slow
def test_the_cam_and_grad_cam_path_never_synchronises_the_host(wrn_teacher, tmp_path):
    from dfkd_bench.train.profiling import HostSyncGuard

    trainer = wrn_trainer(wrn_teacher, tmp_path, channels_last=True, fused_optimizer=True)
    assert trainer.method.teacher_map is not None
    trainer.run_iteration()
    trainer.iteration += 1
    with HostSyncGuard(raise_on_sync=False) as guard:
        for _ in range(2):  # a batch is finished, pushed, and the student trains on the pools
            trainer.run_iteration()
            trainer.iteration += 1
    assert guard.syncs == [], guard.syncs[:5]
    assert trainer.method.banks[0].size > 0


# ------------------------------------------------------------ settings and protocols ---

def test_defaults_are_the_official_scripts_and_the_cpu_presets_say_why():
    params = get_method("spaceship").Params()
    official = dict(synthesis_steps=200, synthesis_lr=1e-3, oh_weight=0.5, bn_weight=1.0, exchange_p=0.7,
                    cam_weight=1.0, gradcam_weight=1.0, kd_temperature=30.0, kd_weight=1.0, kl_reduction="mean",
                    noise_dim=256, pool_augment="crop_flip", feature_dtype="float32")
    assert {name: getattr(params, name) for name in official} == official
    digits = get_method("spaceship").preset_params["digits"]
    assert digits == dict(kd_temperature=1.0, pool_augment="none", synthesis_steps=20, kl_reduction="batchmean",
                          memory_size=7680)
    source = (REPO / "methods" / "spaceship.py").read_text()
    assert "CHOSEN:\n    # * 20 synthesis steps per batch" in source


@pytest.mark.parametrize("setting, value", [("exchange_p", 1.5), ("kl_reduction", "sum"), ("feature_dtype", "int8"),
                                            ("cam_weight", -1.0)])
def test_bad_settings_are_one_line_errors_before_any_run(setting, value, digits_request):
    with pytest.raises(ConfigError, match=setting):
        build_run_configs(digits_request(["spaceship"], overrides={setting: value}))


# Typed in from the official scripts (skgyu/SpaceshipNet 30a76b0, scripts/DFKD_Cifar{10,100}_ResNet34_ResNet18_V37_
# conv012*.yaml, options/train_options.py, networks/scheduler.py), NOT from the method file.
_OFFICIAL_TRAIN = dict(epochs=200, steps_per_epoch=1, generator_steps=200, student_steps=2000, batch_size=256,
                       student_optimizer="sgd", student_lr=0.1, student_momentum=0.9, student_weight_decay=1e-4,
                       lr_schedule="cosine_epoch", eval_every=1, amp="none", drift_every=0)
_OFFICIAL_PARAMS = dict(generator="datafree_gen", noise_dim=256, synthesis_steps=200, synthesis_lr=1e-3,
                        oh_weight=0.5, bn_weight=1.0, exchange_p=0.7, cam_weight=1.0, gradcam_weight=1.0,
                        kd_temperature=30.0, kd_weight=1.0, kl_reduction="mean", feature_dtype="float32",
                        pool_augment="crop_flip")


@pytest.mark.parametrize("dataset, published", [("cifar10", None), ("cifar100", 77.41)])
def test_paper_protocols_are_the_official_scripts(dataset, published, capsys):
    from dfkd_bench.cli import main

    configs = _configs(REPO / "experiments" / "reproduce" / f"spaceship_{dataset}.toml")
    assert [c.seed for c in configs] == [0, 1, 2]
    for config in configs:
        assert config.protocol == "paper" and (config.teacher.arch, config.student_arch) == ("resnet34", "resnet18")
        for name, value in _OFFICIAL_TRAIN.items():
            assert getattr(config.train, name) == value, name
        assert config.train.total_iterations == 200
        for name, value in _OFFICIAL_PARAMS.items():
            assert config.params[name] == value, name
        # the unbounded official pools: every batch of the run stays
        assert config.params["memory_size"] >= config.train.total_iterations * config.train.batch_size
        assert config.published["accuracy"] == published and config.published["selection"] == "best"
    assert main(["list", "--card", "spaceship", "--dataset", dataset]) == 0
    out = capsys.readouterr().out
    assert (f"published {published} %" if published else "published: none read") in out
    assert "cosine_epoch" in out and "CHOSEN" in out
