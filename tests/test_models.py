"""Tests for the model zoo and the generators (dfkd_bench.models)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from dfkd_bench.errors import ConfigError
from dfkd_bench.models import (
    Generator,
    ModelInfo,
    build_generator,
    build_model,
    generator_for_image_size,
    list_generators,
    list_models,
)
from dfkd_bench.models.cifar_resnet import PadShortcut

NUM_CLASSES = 10

EXPECTED_MODELS = {
    "resnet18", "resnet34", "wrn16_1", "wrn16_2", "wrn40_1", "wrn40_2",
    "resnet20", "resnet32", "resnet44", "resnet56", "resnet110",
    "lenet5", "lenet5_half", "alexnet",
    "lenet5_bn", "lenet5_half_bn",
}  # fmt: skip


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def check_forward_and_input_grad(model: nn.Module, in_channels: int, size: int) -> None:
    """Logits of shape (2, classes) and a finite, non-zero gradient w.r.t. the input."""
    torch.manual_seed(0)
    model.eval()  # AlexNet's dropout would otherwise make the check random
    x = torch.randn(2, in_channels, size, size, requires_grad=True)
    logits = model(x)
    assert logits.shape == (2, NUM_CLASSES)
    assert torch.isfinite(logits).all()
    (logits * torch.randn_like(logits)).sum().backward()
    assert x.grad is not None
    assert torch.isfinite(x.grad).all()
    assert x.grad.abs().sum() > 0


# ---------------------------------------------------------------- registry


def test_registry_lists_every_required_model():
    infos = list_models()
    assert all(isinstance(i, ModelInfo) for i in infos)
    assert {i.name for i in infos} == EXPECTED_MODELS
    with pytest.raises(AttributeError):  # frozen
        infos[0].name = "x"  # type: ignore[misc]
    assert {i.name for i in list_generators()} == {"gen32", "gen64", "gen256", "gen_small", "gen_tiny",
                                                  "dfad_gen", "dafl_gen", "zskt_gen", "datafree_gen",
                                                  "datafree_large_gen"}


@pytest.mark.parametrize("info", list_models(), ids=lambda i: i.name)
def test_every_registered_model_forward_and_input_gradient(info: ModelInfo):
    model = build_model(info.name, NUM_CLASSES, in_channels=3, image_size=info.default_image_size)
    check_forward_and_input_grad(model, 3, info.default_image_size)


@pytest.mark.parametrize("name", ["timm:resnet18", "torchvision:resnet18", "tv:resnet18"])
def test_external_models_forward_and_input_gradient(name: str):
    model = build_model(name, NUM_CLASSES, in_channels=3, image_size=32)
    check_forward_and_input_grad(model, 3, 32)


def test_timm_model_with_one_input_channel():
    model = build_model("timm:resnet18", NUM_CLASSES, in_channels=1, image_size=32)
    check_forward_and_input_grad(model, 1, 32)


def test_no_dropout_in_zoo_except_alexnet():
    for info in list_models():
        model = build_model(info.name, NUM_CLASSES, image_size=info.default_image_size)
        has_dropout = any(isinstance(m, nn.modules.dropout._DropoutNd) for m in model.modules())
        assert has_dropout == (info.name == "alexnet"), info.name


@pytest.mark.parametrize("name", ["lenet5", "lenet5_half"])
@pytest.mark.parametrize("size", [16, 28, 32])
@pytest.mark.parametrize("channels", [1, 3])
def test_lenet_sizes_and_channels(name: str, size: int, channels: int):
    model = build_model(name, NUM_CLASSES, in_channels=channels, image_size=size)
    check_forward_and_input_grad(model, channels, size)


def test_lenet_classic_layout():
    """32x32: no padding, C5 sees 16x5x5 (= the classic 5x5 conv); 28x28 padded to match."""
    m32 = build_model("lenet5", NUM_CLASSES, in_channels=1, image_size=32)
    m28 = build_model("lenet5", NUM_CLASSES, in_channels=1, image_size=28)
    assert m32.conv1.padding == (0, 0) and m28.conv1.padding == (2, 2)
    assert m32.c5.in_features == m28.c5.in_features == 16 * 5 * 5
    assert m32.c5.out_features == 120 and m32.fc6.out_features == 84
    # Classic LeNet-5 with C5 as a 5x5 conv: 156 + 2416 + 48120 + 10164 + 850 parameters;
    # the dense C5 has exactly the same 16*5*5*120 + 120 parameters.
    assert n_params(m32) == n_params(m28) == 61706
    half = build_model("lenet5_half", NUM_CLASSES, in_channels=1, image_size=32)
    assert (half.conv1.out_channels, half.conv2.out_channels) == (3, 8)
    assert (half.c5.out_features, half.fc6.out_features) == (60, 42)
    with pytest.raises(ValueError, match="built for 32x32"):
        m32(torch.zeros(1, 1, 28, 28))


def test_lenet_rejects_too_small_input():
    with pytest.raises(ConfigError, match="image_size"):
        build_model("lenet5", NUM_CLASSES, in_channels=1, image_size=8)


@pytest.mark.parametrize(
    "name, expected, tol",
    [
        ("resnet20", 0.27e6, 0.02),
        ("resnet56", 0.85e6, 0.02),
        ("resnet110", 1.7e6, 0.02),
        ("wrn40_2", 2.2e6, 0.03),
        ("wrn16_2", 0.70e6, 0.03),
        ("resnet18", 11.17e6, 0.002),
        ("resnet34", 21.28e6, 0.002),
    ],
)
def test_published_parameter_counts(name: str, expected: float, tol: float):
    count = n_params(build_model(name, NUM_CLASSES))
    assert abs(count - expected) / expected <= tol, f"{name}: {count}"


@pytest.mark.parametrize("name", ["resnet20", "resnet56"])
def test_he_resnet_option_a_shortcuts_are_parameter_free(name: str):
    model = build_model(name, NUM_CLASSES)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert all(c.kernel_size == (3, 3) for c in convs), "no 1x1 shortcut convs"
    shortcuts = [m for m in model.modules() if isinstance(m, PadShortcut)]
    assert len(shortcuts) == 2  # one per down-sampling stage transition
    assert all(n_params(s) == 0 for s in shortcuts)


def test_option_a_shortcut_subsamples_and_zero_pads():
    x = torch.randn(2, 16, 8, 8)
    y = PadShortcut(16, 32, stride=2)(x)
    assert y.shape == (2, 32, 4, 4)
    assert torch.equal(y[:, 8:24], x[:, :, ::2, ::2])
    assert torch.count_nonzero(y[:, :8]) == 0 and torch.count_nonzero(y[:, 24:]) == 0


def test_cifar_resnet18_has_cifar_stem():
    model = build_model("resnet18", NUM_CLASSES)
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert not any(isinstance(m, nn.MaxPool2d) for m in model.modules())


# ---------------------------------------------------------------- errors


def test_unknown_model_name_is_one_line_config_error():
    with pytest.raises(ConfigError) as err:
        build_model("resnet19", NUM_CLASSES)
    msg = str(err.value)
    assert "resnet19" in msg and "dfkd-bench list" in msg
    assert "resnet18" in msg  # difflib suggestion
    assert "\n" not in msg


@pytest.mark.parametrize("name", ["timm:not_a_model_xyz", "torchvision:not_a_model_xyz", "tv:resnet1"])
def test_unknown_external_name_is_one_line_config_error(name: str):
    with pytest.raises(ConfigError) as err:
        build_model(name, NUM_CLASSES)
    msg = str(err.value)
    assert name.split(":", 1)[1] in msg and "\n" not in msg


def test_bad_channel_counts_are_rejected():
    with pytest.raises(ConfigError, match="3 input channels"):
        build_model("alexnet", NUM_CLASSES, in_channels=1, image_size=224)
    with pytest.raises(ConfigError, match="3 input channels"):
        build_model("torchvision:resnet18", NUM_CLASSES, in_channels=1)
    with pytest.raises(ConfigError, match="num_classes"):
        build_model("resnet18", 0)


def test_unknown_generator_name():
    with pytest.raises(ConfigError, match="gen33"):
        build_generator("gen33", 16, 3, 32)


# ---------------------------------------------------------------- generators

# (name, image size, output channels); gen256 kept to batch 2 as it is the slow one.
GENERATOR_CASES = [
    ("gen32", 32, 3),
    ("gen64", 64, 3),
    ("gen256", 256, 3),
    ("gen_small", 16, 1),
    ("gen_small", 28, 1),
    ("gen_small", 32, 3),
    ("gen_tiny", 16, 1),
    ("gen_tiny", 28, 1),
]
NOISE_DIM = 16


def _inputs(conditioning: str, batch: int = 2):
    z = torch.randn(batch, NOISE_DIM)
    e = None if conditioning == "uncond" else torch.randn(batch, NOISE_DIM)
    return z, e


@pytest.mark.parametrize("name, size, channels", GENERATOR_CASES)
def test_generator_shapes_and_sigmoid_output(name: str, size: int, channels: int):
    for conditioning in ("uncond", "cat", "sum"):
        torch.manual_seed(0)
        g_logits = build_generator(
            name, NOISE_DIM, channels, size, conditioning=conditioning, num_classes=10
        )
        g_image = build_generator(
            name, NOISE_DIM, channels, size, conditioning=conditioning, output_logits=False
        )
        g_image.load_state_dict(g_logits.state_dict())
        assert isinstance(g_logits, Generator)
        assert (g_logits.noise_dim, g_logits.out_channels, g_logits.image_size) == (
            NOISE_DIM, channels, size,
        )  # fmt: skip
        assert g_logits.conditioning == conditioning
        assert g_logits.output_logits is True and g_image.output_logits is False

        z, e = _inputs(conditioning)
        # Train mode (batch statistics) is what adversarial training uses; both
        # generators see the same batch, so their BN statistics agree.
        u = g_logits(z, e)
        img = g_image(z, e)
        assert u.shape == img.shape == (2, channels, size, size)
        assert img.min() >= 0 and img.max() <= 1
        assert torch.allclose(img, torch.sigmoid(u), atol=1e-6)
        assert u.min() < 0 < u.max(), "logits are not squashed"


def test_generator_gradients_reach_noise_and_embedding():
    g = build_generator("gen32", NOISE_DIM, 3, 32, conditioning="sum")
    z = torch.randn(2, NOISE_DIM, requires_grad=True)
    e = torch.randn(2, NOISE_DIM, requires_grad=True)
    g(z, e).sum().backward()
    assert z.grad.abs().sum() > 0 and e.grad.abs().sum() > 0
    assert all(p.grad is not None for p in g.parameters())


@pytest.mark.parametrize("conditioning", ["uncond", "cat", "sum"])
def test_generator_embedding_presence_is_checked(conditioning: str):
    g = build_generator("gen_small", NOISE_DIM, 1, 28, conditioning=conditioning)
    z = torch.randn(2, NOISE_DIM)
    if conditioning == "uncond":
        with pytest.raises(ValueError, match="no class embedding"):
            g(z, torch.randn(2, NOISE_DIM))
    else:
        with pytest.raises(ValueError, match="needs a class embedding"):
            g(z)
        with pytest.raises(ValueError, match="shape"):
            g(z, torch.randn(2, NOISE_DIM + 1))


def test_first_layer_formulas():
    """uncond: Wz+b; sum: W(z+e)+b with the same W; cat: Wz+Ue+b with a separate, bias-free U."""
    torch.manual_seed(0)
    z, e = torch.randn(3, NOISE_DIM), torch.randn(3, NOISE_DIM)

    g_sum = build_generator("gen32", NOISE_DIM, 3, 32, conditioning="sum")
    W, b = g_sum.fc.weight, g_sum.fc.bias
    assert g_sum.embed_proj is None
    assert torch.allclose(g_sum.first_layer(z, e), (z + e) @ W.T + b, atol=1e-5)
    # Not a concatenation in disguise: the first layer only has d_z inputs.
    assert W.shape == (256 * 4 * 4, NOISE_DIM)

    g_cat = build_generator("gen32", NOISE_DIM, 3, 32, conditioning="cat")
    W, b, U = g_cat.fc.weight, g_cat.fc.bias, g_cat.embed_proj.weight
    assert g_cat.embed_proj.bias is None
    assert U.shape == W.shape and not torch.equal(U, W)
    assert torch.allclose(g_cat.first_layer(z, e), z @ W.T + e @ U.T + b, atol=1e-5)

    g_un = build_generator("gen32", NOISE_DIM, 3, 32, conditioning="uncond")
    assert g_un.embed_proj is None
    assert torch.allclose(g_un.first_layer(z), z @ g_un.fc.weight.T + g_un.fc.bias, atol=1e-5)


def test_generator_architecture_follows_table_8():
    g32 = build_generator("gen32", NOISE_DIM, 3, 32)
    assert g32.fc.out_features == 4096 and g32.stem_shape == (256, 4, 4)
    bns = [m for m in g32.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns[0].num_features == 256 and all(bn.momentum == 0.1 for bn in bns)
    assert sum(isinstance(m, nn.UpsamplingBilinear2d) for m in g32.modules()) == 3
    last = g32.body[-1]
    assert isinstance(last, nn.Conv2d) and last.kernel_size == (1, 1) and last.in_channels == 32

    g64 = build_generator("gen64", NOISE_DIM, 3, 64)
    assert g64.fc.out_features == 16384 and g64.stem_shape == (256, 8, 8)

    g256 = build_generator("gen256", NOISE_DIM, 3, 256)
    assert g256.fc.out_features == 8192 and g256.stem_shape == (512, 4, 4)
    assert sum(isinstance(m, nn.UpsamplingBilinear2d) for m in g256.modules()) == 6
    last = g256.body[-1]
    assert isinstance(last, nn.Conv2d) and last.kernel_size == (3, 3) and last.in_channels == 16


@pytest.mark.parametrize(
    "name, size", [("gen32", 64), ("gen64", 32), ("gen256", 224), ("gen_small", 30)]
)
def test_generator_rejects_wrong_image_size(name: str, size: int):
    with pytest.raises(ConfigError, match=f"image_size={size}"):
        build_generator(name, NOISE_DIM, 3, size)


def test_generator_rejects_unknown_conditioning():
    with pytest.raises(ConfigError, match="conditioning"):
        build_generator("gen32", NOISE_DIM, 3, 32, conditioning="concat")


def test_generator_for_image_size():
    assert [generator_for_image_size(s) for s in (16, 28, 32, 64, 256)] == [
        "gen_small", "gen_small", "gen32", "gen64", "gen256",
    ]  # fmt: skip
    with pytest.raises(ConfigError, match="image_size=100"):
        generator_for_image_size(100)
