"""Image generators for adversarial data-free distillation.

The architectures follow Table 8 of *Momentum Adversarial Distillation*
(Do et al., NeurIPS 2022), and the class conditioning follows its Appendix B.3.

Architectures
-------------
* ``gen32`` (Table 8a, CIFAR): Linear(d_z, 256*4*4) -> reshape 256x4x4 -> ReLU
  -> BN(256) -> [up x2 -> ConvBlockX] x3 (256->128->64->32) -> Conv2d(32, C, 1).
* ``gen64`` (Table 8b, TinyImageNet): the same from a 256x8x8 start.
* ``gen256`` (Table 8c, ImageNet-scale): Linear(d_z, 512*4*4) -> reshape ->
  ResNetBlockY(512, 512) -> [up x2 -> ResNetBlockY] x6
  (512->256->128->64->32->16->16) -> Conv2d(16, C, 3, padding=1).
* ``gen_small`` (ours, for 16/28/32 px digits and MNIST): Linear(d_z, 64*s*s)
  with s = image_size/4 -> reshape -> ReLU -> BN(64) -> up -> ConvBlockX(64, 32)
  -> up -> ConvBlockX(32, 16) -> Conv2d(16, C, 1).

The printed Table 8 has two typos which we resolve by the only reading that
makes the shapes consistent: 8a says "Reshape(16384, (256, 8, 8))" after a
Linear(d_z, 4096) whose output is listed as 256x4x4, so we reshape to 256x4x4;
8c ends with "Conv2d(32, 3, 3, 1, 1)" right after a block that outputs 16
channels, so the last conv has 16 input channels.

Building blocks (our choice)
----------------------------
Table 9, which defines ConvBlockX and ResNetBlockY, is an image that did not
survive in our copy of the paper. We therefore chose the conventional blocks
of the generators MAD builds on (DFAD / CMI / Fast-Datafree style), and state
the choice here so results are not mistaken for a faithful reproduction:

* ``ConvBlockX(in, out)`` = Conv2d(in, out, 3, padding=1, bias=False) ->
  BatchNorm2d(out) -> LeakyReLU(0.2). No conv bias because BN removes it.
* ``ResNetBlockY(in, out)`` = pre-activation residual block
  BN -> ReLU -> Conv3x3(in, out) -> BN -> ReLU -> Conv3x3(out, out), plus a
  1x1 conv shortcut when in != out (identity otherwise).

Upsampling is ``UpsamplingBilinear2d(scale_factor=2)`` (bilinear,
``align_corners=True``) as in the table. BatchNorm momentum is 0.1 throughout.

Conditioning (Appendix B.3)
---------------------------
The three kinds of generator differ only in their first (Linear) layer:

* ``uncond``: h = W z + b
* ``cat``:    h = W z + U e + b, with U a separate bias-free Linear
  (equivalent to a Linear over the concatenation [z, e])
* ``sum``:    h = W (z + e) + b, i.e. the generator sees G(z + e_y)

The class embeddings e = E(y) are *not* part of the generator: the method owns
the ``nn.Embedding(num_classes, noise_dim)`` because MAD trains it with its own
loss terms (L_NLL, L_NormReg) and keeps an EMA copy of the generator only.

Output
------
With ``output_logits=True`` the generator returns pre-sigmoid logits u (the
paper's G_lg in Eq. 11, which regularises the logits directly); the caller
applies ``torch.sigmoid``. With ``output_logits=False`` it returns
``sigmoid(u)``, an image in [0, 1] that the caller normalises for the teacher.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from dfkd_bench.errors import ConfigError
from dfkd_bench.models.registry import register_generator

CONDITIONINGS = ("uncond", "cat", "sum")

_BN_MOMENTUM = 0.1


class ConvBlockX(nn.Sequential):
    """Conv3x3 (no bias) -> BN -> LeakyReLU(0.2); our reading of Table 9a."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 3, stride=1, padding=1, bias=False),
            nn.BatchNorm2d(out_channels, momentum=_BN_MOMENTUM),
            nn.LeakyReLU(0.2),
        )


class ResNetBlockY(nn.Module):
    """Pre-activation residual block; our reading of Table 9b."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.residual = nn.Sequential(
            nn.BatchNorm2d(in_channels, momentum=_BN_MOMENTUM),
            nn.ReLU(),
            nn.Conv2d(in_channels, out_channels, 3, stride=1, padding=1, bias=False),
            nn.BatchNorm2d(out_channels, momentum=_BN_MOMENTUM),
            nn.ReLU(),
            nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False),
        )
        self.shortcut: nn.Module = (
            nn.Identity()
            if in_channels == out_channels
            else nn.Conv2d(in_channels, out_channels, 1, bias=False)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.residual(x) + self.shortcut(x)


def _up() -> nn.Module:
    return nn.UpsamplingBilinear2d(scale_factor=2)


class Generator(nn.Module):
    """Noise (plus optional class embedding) -> image, or its pre-sigmoid logits.

    The first layer maps the input to ``stem_shape`` (C0 x H0 x W0) and
    ``body`` turns that tensor into ``out_channels x image_size x image_size``
    logits. Only the first layer depends on ``conditioning``; see the module
    docstring for the three formulas.

    Attributes: ``noise_dim``, ``out_channels``, ``image_size``,
    ``conditioning``, ``num_classes`` (informational, may be ``None``) and
    ``output_logits``. ``fc`` is the Linear holding W and b; ``embed_proj``
    is the bias-free U of the ``cat`` generator (``None`` otherwise).
    """

    def __init__(
        self,
        *,
        noise_dim: int,
        out_channels: int,
        image_size: int,
        stem_shape: tuple[int, int, int],
        body: nn.Module,
        conditioning: str = "uncond",
        num_classes: int | None = None,
        output_logits: bool = True,
    ) -> None:
        super().__init__()
        if conditioning not in CONDITIONINGS:
            raise ConfigError(
                f"unknown generator conditioning {conditioning!r}; "
                f"choose one of {', '.join(CONDITIONINGS)}"
            )
        self.noise_dim = noise_dim
        self.out_channels = out_channels
        self.image_size = image_size
        self.conditioning = conditioning
        self.num_classes = num_classes
        self.output_logits = output_logits
        self.stem_shape = tuple(stem_shape)

        stem_features = stem_shape[0] * stem_shape[1] * stem_shape[2]
        self.fc = nn.Linear(noise_dim, stem_features)
        self.embed_proj = (
            nn.Linear(noise_dim, stem_features, bias=False) if conditioning == "cat" else None
        )
        self.body = body

    def first_layer(
        self, z: torch.Tensor, class_embedding: torch.Tensor | None = None
    ) -> torch.Tensor:
        """h of Appendix B.3, flat (N x C0*H0*W0); validates the inputs."""
        if z.dim() != 2 or z.shape[1] != self.noise_dim:
            raise ValueError(
                f"z must have shape (N, {self.noise_dim}), got {tuple(z.shape)}"
            )
        if self.conditioning == "uncond":
            if class_embedding is not None:
                raise ValueError(
                    "an unconditional generator takes no class embedding; build it with "
                    "conditioning='cat' or 'sum' to condition on classes"
                )
            return self.fc(z)
        if class_embedding is None:
            raise ValueError(
                f"a conditioning={self.conditioning!r} generator needs a class embedding "
                f"e = E(y) of shape (N, {self.noise_dim})"
            )
        if class_embedding.shape != z.shape:
            raise ValueError(
                f"class embedding must have the shape of z, {tuple(z.shape)}, "
                f"got {tuple(class_embedding.shape)}"
            )
        if self.conditioning == "sum":
            return self.fc(z + class_embedding)
        return self.fc(z) + self.embed_proj(class_embedding)

    def forward(
        self, z: torch.Tensor, class_embedding: torch.Tensor | None = None
    ) -> torch.Tensor:
        h = self.first_layer(z, class_embedding).view(z.shape[0], *self.stem_shape)
        logits = self.body(h)
        return logits if self.output_logits else torch.sigmoid(logits)

    def extra_repr(self) -> str:
        return (
            f"noise_dim={self.noise_dim}, out_channels={self.out_channels}, "
            f"image_size={self.image_size}, conditioning={self.conditioning!r}, "
            f"output_logits={self.output_logits}"
        )


def _require_size(name: str, image_size: int, expected: int) -> None:
    if image_size != expected:
        other = _GENERATOR_BY_SIZE.get(image_size)
        hint = (
            f"use generator {other!r}"
            if other
            else "use 'gen_small' (any size divisible by 4) or resize the data"
        )
        raise ConfigError(
            f"generator {name!r} produces {expected}x{expected} images, "
            f"got image_size={image_size}; {hint}"
        )


def _convx_body(stem_channels: int, out_channels: int) -> nn.Sequential:
    """Table 8a/8b body: ReLU, BN, then three (up, ConvBlockX) stages and a 1x1 conv."""
    return nn.Sequential(
        nn.ReLU(),
        nn.BatchNorm2d(stem_channels, momentum=_BN_MOMENTUM),
        _up(),
        ConvBlockX(stem_channels, 128),
        _up(),
        ConvBlockX(128, 64),
        _up(),
        ConvBlockX(64, 32),
        nn.Conv2d(32, out_channels, 1, stride=1, padding=0),
    )


@register_generator(
    "gen32",
    family="generator",
    default_image_size=32,
    description="MAD Table 8a (CIFAR): 256x4x4 stem, 3 bilinear-up + ConvBlockX stages",
)
def gen32(*, noise_dim: int, out_channels: int, image_size: int, **kwargs) -> Generator:
    _require_size("gen32", image_size, 32)
    return Generator(
        noise_dim=noise_dim,
        out_channels=out_channels,
        image_size=image_size,
        stem_shape=(256, 4, 4),
        body=_convx_body(256, out_channels),
        **kwargs,
    )


@register_generator(
    "gen64",
    family="generator",
    default_image_size=64,
    description="MAD Table 8b (TinyImageNet): 256x8x8 stem, 3 bilinear-up + ConvBlockX stages",
)
def gen64(*, noise_dim: int, out_channels: int, image_size: int, **kwargs) -> Generator:
    _require_size("gen64", image_size, 64)
    return Generator(
        noise_dim=noise_dim,
        out_channels=out_channels,
        image_size=image_size,
        stem_shape=(256, 8, 8),
        body=_convx_body(256, out_channels),
        **kwargs,
    )


@register_generator(
    "gen256",
    family="generator",
    default_image_size=256,
    description="MAD Table 8c (ImageNet-scale): 512x4x4 stem, 6 bilinear-up + ResNetBlockY stages",
)
def gen256(*, noise_dim: int, out_channels: int, image_size: int, **kwargs) -> Generator:
    _require_size("gen256", image_size, 256)
    layers: list[nn.Module] = [ResNetBlockY(512, 512)]
    channels = (512, 256, 128, 64, 32, 16, 16)
    for c_in, c_out in zip(channels[:-1], channels[1:]):
        layers += [_up(), ResNetBlockY(c_in, c_out)]
    # Table 8c prints Conv2d(32, 3, 3, 1, 1); the block before it outputs 16 channels.
    layers.append(nn.Conv2d(16, out_channels, 3, stride=1, padding=1))
    return Generator(
        noise_dim=noise_dim,
        out_channels=out_channels,
        image_size=image_size,
        stem_shape=(512, 4, 4),
        body=nn.Sequential(*layers),
        **kwargs,
    )


def _small_generator(name: str, width: int, noise_dim: int, out_channels: int, image_size: int,
                     **kwargs) -> Generator:
    """``width`` x (s/4)^2 stem -> up -> ConvBlockX(width, width/2) -> up -> ConvBlockX(width/2, width/4) -> 1x1."""
    if image_size % 4 != 0:
        raise ConfigError(
            f"generator '{name}' needs an image_size divisible by 4 (two x2 upsamplings), "
            f"got image_size={image_size}"
        )
    s = image_size // 4
    body = nn.Sequential(
        nn.ReLU(),
        nn.BatchNorm2d(width, momentum=_BN_MOMENTUM),
        _up(),
        ConvBlockX(width, width // 2),
        _up(),
        ConvBlockX(width // 2, width // 4),
        nn.Conv2d(width // 4, out_channels, 1, stride=1, padding=0),
    )
    return Generator(noise_dim=noise_dim, out_channels=out_channels, image_size=image_size,
                     stem_shape=(width, s, s), body=body, **kwargs)


@register_generator(
    "gen_small",
    family="generator",
    default_image_size=28,
    description="small generator for 16/28/32 px digits: 64x(s/4)^2 stem, 2 up + ConvBlockX stages (64-32-16)",
)
def gen_small(*, noise_dim: int, out_channels: int, image_size: int, **kwargs) -> Generator:
    return _small_generator("gen_small", 64, noise_dim, out_channels, image_size, **kwargs)


@register_generator(
    "gen_tiny",
    family="generator",
    default_image_size=16,
    description="gen_small at half width (32-16-8): a quarter of its convolution cost, for CPU runs",
)
def gen_tiny(*, noise_dim: int, out_channels: int, image_size: int, **kwargs) -> Generator:
    return _small_generator("gen_tiny", 32, noise_dim, out_channels, image_size, **kwargs)


_GENERATOR_BY_SIZE = {16: "gen_small", 28: "gen_small", 32: "gen32", 64: "gen64", 256: "gen256"}


def generator_for_image_size(image_size: int) -> str:
    """The default generator name for square images of side ``image_size``.

    16 and 28 px (digits, MNIST) -> ``gen_small``; 32 -> ``gen32`` (CIFAR);
    64 -> ``gen64`` (TinyImageNet); 256 -> ``gen256`` (ImageNet-scale, as in
    MAD, which generates at 256 and lets the data pipeline crop/resize).
    """
    name = _GENERATOR_BY_SIZE.get(image_size)
    if name is None:
        sizes = ", ".join(str(s) for s in sorted(_GENERATOR_BY_SIZE))
        raise ConfigError(
            f"no default generator for image_size={image_size}; supported sizes: {sizes} "
            f"(pick a generator explicitly, e.g. gen_small for sizes divisible by 4)"
        )
    return name


# ---- the DFKD papers' own generators (for their paper protocols) ---------------------------
# Each is built from the layer list of the authors' official code (facts, not code), with the
# official module names so that a published generator checkpoint loads as it is. Unlike the
# generators above they end in the teacher's NORMALISED input space (a BatchNorm over the
# output channels), as in those code bases: their attribute ``output_space = "normalized"``
# tells a method to map the output to [0, 1]-space images with the teacher's mean and std
# (x = out * std + mean), so that the teacher sees exactly ``out``. They are unconditional.


class PaperGenerator(nn.Module):
    """``Linear(nz, 128 * (s/4)^2)`` -> 128 x s/4 x s/4 -> BN -> nearest x2 -> conv 128->128, BN, LReLU(0.2)
    -> nearest x2 -> conv 128->64, BN, LReLU(0.2) -> conv 64->C -> [tanh] -> BN(C).

    * ``dfad_gen``: DFAD's ``GeneratorA`` (VainF/Data-Free-Adversarial-Distillation, network/gan.py,
      ngf = 64): tanh, then ``BatchNorm2d(C, affine=False)``.
    * ``dafl_gen``: DAFL's generator (huawei-noah/Efficient-Computing, DAFL-train.py): the same
      layers with ``BatchNorm2d(128, 0.8)`` and ``BatchNorm2d(64, 0.8)`` -- the second positional
      argument of BatchNorm2d is ``eps``, so eps = 0.8 in the two conv blocks.
    * ``zskt_gen``: ZSKT's generator (polo5/ZeroShotKnowledgeTransfer, models/generator.py): no
      tanh, the output BatchNorm is affine (``BatchNorm2d(C, affine=True)``); its layers sit in one
      ``nn.Sequential`` called ``layers``.

    All 3x3 convolutions have a bias (PyTorch's default, as in the official code). ``ngf`` scales the
    widths as DFAD's ``GeneratorA(ngf=...)`` does (2 * ngf and ngf channels); every registered generator
    has the official ngf = 64, smaller ones serve the step-equivalence traces (:mod:`dfkd_bench.traces`).
    """

    output_space = "normalized"

    def __init__(self, kind: str, noise_dim: int, out_channels: int, image_size: int, ngf: int = 64) -> None:
        super().__init__()
        if image_size % 4 != 0:
            raise ConfigError(f"generator '{kind}_gen' needs an image_size divisible by 4 (two x2 upsamplings), "
                              f"got image_size={image_size}")
        self.kind = kind
        self.noise_dim = noise_dim
        self.out_channels = out_channels
        self.image_size = image_size
        self.init_size = image_size // 4
        eps = 0.8 if kind == "dafl" else 1e-5
        wide = 2 * ngf
        self.wide = wide
        head = [nn.Conv2d(ngf, out_channels, 3, stride=1, padding=1)]
        if kind == "zskt":
            head.append(nn.BatchNorm2d(out_channels, affine=True))
        else:
            head += [nn.Tanh(), nn.BatchNorm2d(out_channels, affine=False)]
        block1 = [nn.Conv2d(wide, wide, 3, stride=1, padding=1), nn.BatchNorm2d(wide, eps), nn.LeakyReLU(0.2)]
        block2 = [nn.Conv2d(wide, ngf, 3, stride=1, padding=1), nn.BatchNorm2d(ngf, eps), nn.LeakyReLU(0.2)]
        linear = nn.Linear(noise_dim, wide * self.init_size ** 2)
        if kind == "zskt":
            self.layers = nn.Sequential(linear, _View(wide, self.init_size), nn.BatchNorm2d(wide),
                                        nn.Upsample(scale_factor=2, mode="nearest"), *block1,
                                        nn.Upsample(scale_factor=2, mode="nearest"), *block2, *head)
        else:
            self.l1 = nn.Sequential(linear)
            self.conv_blocks0 = nn.Sequential(nn.BatchNorm2d(wide))
            self.conv_blocks1 = nn.Sequential(*block1)
            self.conv_blocks2 = nn.Sequential(*block2, *head)

    def forward(self, z: torch.Tensor, class_embedding: torch.Tensor | None = None) -> torch.Tensor:
        if class_embedding is not None:
            raise ValueError(f"{self.kind}_gen is unconditional; it takes no class embedding")
        if z.dim() != 2 or z.shape[1] != self.noise_dim:
            raise ValueError(f"z must have shape (N, {self.noise_dim}), got {tuple(z.shape)}")
        if self.kind == "zskt":
            return self.layers(z)
        out = self.l1(z).view(z.shape[0], self.wide, self.init_size, self.init_size)
        out = nn.functional.interpolate(self.conv_blocks0(out), scale_factor=2, mode="nearest")
        out = nn.functional.interpolate(self.conv_blocks1(out), scale_factor=2, mode="nearest")
        return self.conv_blocks2(out)

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, noise_dim={self.noise_dim}, out_channels={self.out_channels}, " \
               f"image_size={self.image_size}, output_space='normalized'"


class _View(nn.Module):
    def __init__(self, channels: int, side: int) -> None:
        super().__init__()
        self.shape = (channels, side, side)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.shape[0], *self.shape)


def paper_generator(kind: str, noise_dim: int, out_channels: int, image_size: int, conditioning: str = "uncond",
                    ngf: int = 64, **_ignored) -> PaperGenerator:
    """A :class:`PaperGenerator` of ``kind`` (``dfad``, ``dafl``, ``zskt``), refusing a class condition."""
    if conditioning != "uncond":
        raise ConfigError(f"generator '{kind}_gen' is unconditional (as in its paper); "
                          f"use conditioning=uncond or another generator")
    return PaperGenerator(kind, noise_dim, out_channels, image_size, ngf)


@register_generator("dfad_gen", family="paper", default_image_size=32,
                    description="DFAD's GeneratorA: 128 ch at s/4, nearest x2, convs 128-128-64-C, tanh + BN(affine=False)")
def dfad_gen(*, noise_dim: int, out_channels: int, image_size: int, **kwargs) -> PaperGenerator:
    return paper_generator("dfad", noise_dim, out_channels, image_size, **kwargs)


@register_generator("dafl_gen", family="paper", default_image_size=32,
                    description="DAFL's generator: DFAD's shape with BatchNorm eps 0.8 in the conv blocks")
def dafl_gen(*, noise_dim: int, out_channels: int, image_size: int, **kwargs) -> PaperGenerator:
    return paper_generator("dafl", noise_dim, out_channels, image_size, **kwargs)


@register_generator("zskt_gen", family="paper", default_image_size=32,
                    description="ZSKT's generator: DFAD's shape without tanh, ending in an affine BatchNorm")
def zskt_gen(*, noise_dim: int, out_channels: int, image_size: int, **kwargs) -> PaperGenerator:
    return paper_generator("zskt", noise_dim, out_channels, image_size, **kwargs)


# ---- the DataFree collection's generators (zju-vipa/CMI and zju-vipa/Fast-Datafree) ---------
# datafree/models/generator.py of both repositories: ``Generator`` (CMI, FastDFKD) and
# ``LargeGenerator`` (the collection's DFQ, ZSKT, DAFL, DFAD re-implementations), built from their layer
# lists (facts, not code) with the official module names (``l1``, ``conv_blocks`` and its indices), so a
# published generator's state dict loads as it is. They end in a sigmoid there; here they end before it
# (``output_space = "logits"``, as gen32): every method applies the sigmoid itself, the same images.


class DataFreeGenerator(nn.Module):
    """``Linear(nz, w * (s/4)^2)`` -> w x s/4 x s/4 -> BN(w) -> nearest x2 -> conv w->2*ngf (no bias), BN, LReLU(0.2)
    -> nearest x2 -> conv 2*ngf->ngf (no bias), BN, LReLU(0.2) -> conv ngf->C (bias) [-> sigmoid, applied by the
    method]; ngf = 64 and w = 2 * ngf (``Generator``) or 4 * ngf (``LargeGenerator``)."""

    output_space = "logits"

    def __init__(self, large: bool, noise_dim: int, out_channels: int, image_size: int, ngf: int = 64) -> None:
        super().__init__()
        name = "datafree_large_gen" if large else "datafree_gen"
        if image_size % 4 != 0:
            raise ConfigError(f"generator '{name}' needs an image_size divisible by 4 (two x2 upsamplings), "
                              f"got image_size={image_size}")
        self.name, self.noise_dim, self.out_channels, self.image_size = name, noise_dim, out_channels, image_size
        self.init_size = image_size // 4
        width = ngf * (4 if large else 2)
        self.l1 = nn.Sequential(nn.Linear(noise_dim, width * self.init_size ** 2))
        self.conv_blocks = nn.Sequential(
            nn.BatchNorm2d(width), nn.Upsample(scale_factor=2),
            nn.Conv2d(width, ngf * 2, 3, stride=1, padding=1, bias=False), nn.BatchNorm2d(ngf * 2),
            nn.LeakyReLU(0.2), nn.Upsample(scale_factor=2),
            nn.Conv2d(ngf * 2, ngf, 3, stride=1, padding=1, bias=False), nn.BatchNorm2d(ngf),
            nn.LeakyReLU(0.2),
            nn.Conv2d(ngf, out_channels, 3, stride=1, padding=1),
        )

    def forward(self, z: torch.Tensor, class_embedding: torch.Tensor | None = None) -> torch.Tensor:
        if class_embedding is not None:
            raise ValueError(f"{self.name} is unconditional; it takes no class embedding")
        if z.dim() != 2 or z.shape[1] != self.noise_dim:
            raise ValueError(f"z must have shape (N, {self.noise_dim}), got {tuple(z.shape)}")
        out = self.l1(z).view(z.shape[0], -1, self.init_size, self.init_size)
        return self.conv_blocks(out)

    def extra_repr(self) -> str:
        return f"noise_dim={self.noise_dim}, out_channels={self.out_channels}, image_size={self.image_size}, " \
               f"output_space='logits' (pre-sigmoid)"


def _datafree_generator(large: bool, noise_dim: int, out_channels: int, image_size: int,
                        conditioning: str = "uncond", **_ignored) -> DataFreeGenerator:
    if conditioning != "uncond":
        raise ConfigError(f"generator '{'datafree_large_gen' if large else 'datafree_gen'}' is unconditional (as in "
                          f"its code); use conditioning=uncond or another generator")
    return DataFreeGenerator(large, noise_dim, out_channels, image_size)


@register_generator("datafree_gen", family="paper", default_image_size=32,
                    description="the DataFree collection's Generator (CMI, FastDFKD): 128 ch at s/4, convs "
                                "128-128-64-C, pre-sigmoid")
def datafree_gen(*, noise_dim: int, out_channels: int, image_size: int, **kwargs) -> DataFreeGenerator:
    return _datafree_generator(False, noise_dim, out_channels, image_size, **kwargs)


@register_generator("datafree_large_gen", family="paper", default_image_size=32,
                    description="the DataFree collection's LargeGenerator (its DFQ, ZSKT re-implementations): "
                                "256 ch at s/4, convs 256-128-64-C, pre-sigmoid")
def datafree_large_gen(*, noise_dim: int, out_channels: int, image_size: int, **kwargs) -> DataFreeGenerator:
    return _datafree_generator(True, noise_dim, out_channels, image_size, **kwargs)
