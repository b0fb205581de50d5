"""CIFAR-style residual networks.

Two families share this file because both are "ResNet for 32x32 inputs", but
they differ in everything else:

* **ResNet-18/34 (CIFAR variant)** -- the teachers and students of the DFKD
  literature (DAFL, DFAD, CMI, Fast-Datafree, MAD). The ImageNet stem
  (7x7 stride-2 conv + max-pool) is replaced by a single 3x3 stride-1 conv so
  that a 32x32 image is not shrunk to 8x8 before the first block. Stages of
  BasicBlocks with 64/128/256/512 channels, projection (1x1 conv + BN)
  shortcuts where the shape changes, global average pooling, linear head.
  With 10 classes: 11.17M (ResNet-18) and 21.28M (ResNet-34) parameters.

* **ResNet-20/32/44/56/110** of He et al. 2016 (Sec. 4.2): 6n+2 layers, three
  stages of n BasicBlocks with 16/32/64 channels, and the parameter-free
  "option A" shortcut -- subsample by taking every other pixel and zero-pad
  the new channels -- so that the published parameter counts
  (0.27M / 0.46M / 0.66M / 0.85M / 1.7M) are reproduced.

All poolings are adaptive, so the networks accept any input of at least
8x8 (ResNet-18/34) or 4x4 (He et al.), not only 32x32. No op is in-place, so
gradients can flow back to the input images, which generator-based DFKD needs.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from dfkd_bench.models.registry import register_key_map, register_model


def _init_weights(model: nn.Module) -> None:
    """He initialisation for convs, unit/zero BN, as in the reference code."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class BasicBlock(nn.Module):
    """Two 3x3 convs with a residual connection (He et al. 2016, Fig. 2 left).

    ``shortcut`` is the module applied to the input on the skip path; the
    caller chooses it so the same block serves both the projection (option B)
    and the zero-padding (option A) variants.
    """

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int, shortcut: nn.Module) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


def _projection_shortcut(in_planes: int, planes: int, stride: int) -> nn.Module:
    """Option B: 1x1 conv + BN where the shape changes, identity elsewhere."""
    if stride == 1 and in_planes == planes:
        return nn.Identity()
    return nn.Sequential(
        nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
    )


class PadShortcut(nn.Module):
    """Option A shortcut of He et al. 2016: parameter-free.

    Spatial subsampling by ``x[:, :, ::stride, ::stride]`` and zero-padding of
    the extra channels, split evenly before and after the existing ones as in
    the reference Torch implementation.
    """

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        if planes < in_planes:
            raise ValueError("option-A shortcut cannot reduce the number of channels")
        self.stride = stride
        self.pad_before = (planes - in_planes) // 2
        self.pad_after = planes - in_planes - self.pad_before

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride != 1:
            x = x[:, :, :: self.stride, :: self.stride]
        # F.pad pads the last dims first: (W_l, W_r, H_t, H_b, C_front, C_back).
        return F.pad(x, (0, 0, 0, 0, self.pad_before, self.pad_after))

    def extra_repr(self) -> str:
        return f"stride={self.stride}, pad=({self.pad_before}, {self.pad_after})"


class CifarResNet(nn.Module):
    """ResNet-18/34 with the 3x3 stride-1 stem used throughout the DFKD literature."""

    def __init__(self, num_blocks: list[int], num_classes: int, in_channels: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        in_planes = 64
        stages = []
        for i, (planes, n) in enumerate(zip((64, 128, 256, 512), num_blocks)):
            blocks = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(
                    BasicBlock(in_planes, planes, stride, _projection_shortcut(in_planes, planes, stride))
                )
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.fc(torch.flatten(self.avgpool(out), 1))


class HeResNet(nn.Module):
    """ResNet-(6n+2) for CIFAR of He et al. 2016, Sec. 4.2, option-A shortcuts."""

    def __init__(self, depth: int, num_classes: int, in_channels: int = 3) -> None:
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise ValueError(f"depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        in_planes = 16
        stages = []
        for i, planes in enumerate((16, 32, 64)):
            blocks = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                shortcut: nn.Module = (
                    nn.Identity()
                    if stride == 1 and in_planes == planes
                    else PadShortcut(in_planes, planes, stride)
                )
                blocks.append(BasicBlock(in_planes, planes, stride, shortcut))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        return self.fc(torch.flatten(self.avgpool(out), 1))


def _register_cifar_resnet(name: str, num_blocks: list[int], params: str) -> None:
    depth = 2 + 2 * sum(num_blocks)

    @register_model(
        name,
        family="resnet-cifar",
        default_image_size=32,
        description=f"ResNet-{depth}, CIFAR stem (3x3 conv, no max-pool), {params} params",
    )
    def build(num_classes: int, in_channels: int = 3, image_size: int = 32) -> nn.Module:
        return CifarResNet(num_blocks, num_classes, in_channels)


def _register_he_resnet(depth: int, params: str) -> None:
    @register_model(
        f"resnet{depth}",
        family="resnet-he",
        default_image_size=32,
        description=f"ResNet-{depth} of He et al. 2016 (16/32/64 ch, option-A shortcuts), {params} params",
    )
    def build(num_classes: int, in_channels: int = 3, image_size: int = 32) -> nn.Module:
        return HeResNet(depth, num_classes, in_channels)


_register_cifar_resnet("resnet18", [2, 2, 2, 2], "11.2M")
_register_cifar_resnet("resnet34", [3, 4, 6, 3], "21.3M")
for _depth, _params in ((20, "0.27M"), (32, "0.46M"), (44, "0.66M"), (56, "0.85M"), (110, "1.7M")):
    _register_he_resnet(_depth, _params)

# Known names of public checkpoints of the same networks (the loader tries each; see KeyMap).
# Y. Idelbayev's pytorch_resnet_cifar10 (the most used He-ResNet-20...110 CIFAR-10 weights, option-A
# shortcuts as a parameter-free lambda): conv1/bn1/layer{1,2,3}.i.{conv,bn}{1,2} as ours, classifier
# ``linear``; its files are {'state_dict': {'module.…'}, 'best_prec1': …}, saved before PyTorch 0.4.1
# (no BatchNorm ``num_batches_tracked``), both of which the loader handles on its own.
register_key_map([f"resnet{d}" for d in (20, 32, 44, 56, 110)], "pytorch_resnet_cifar10 (classifier 'linear')",
                 [(r"^linear\.", "fc.")])
# DAFL's CIFAR ResNet, reused by DFAD, CMI ('DataFree'), Fast-Datafree and the DFKD repositories after
# them: the same layout as ours (3x3 stem, ``shortcut`` = 1x1 conv + BN), classifier ``linear``.
register_key_map(["resnet18", "resnet34"], "DAFL / DFAD / CMI ResNet (classifier 'linear')",
                 [(r"^linear\.", "fc.")])
