"""Wide residual networks WRN-depth-k (Zagoruyko & Komodakis, BMVC 2016).

WRN-16-2 and WRN-40-2 are the standard CIFAR teacher/student pair of the DFKD
literature (DAFL, DFAD, CMI, Fast-Datafree, MAD); WRN-16-1 and WRN-40-1 are
the thinner students. The layout follows the reference implementation those
papers share:

* a 3x3 stem conv to 16 channels;
* three groups of n = (depth - 4) / 6 pre-activation blocks
  (BN -> ReLU -> conv3x3 -> BN -> ReLU -> conv3x3) of widths 16k, 32k, 64k,
  the first block of groups 2 and 3 striding by 2;
* a 1x1 conv shortcut where the width changes, fed with the *activated*
  input (the pre-activation is shared by both paths, as in the original code);
* a final BN -> ReLU, global average pooling and a linear head.

Dropout is 0 (the DFKD setting), so there is no dropout layer at all. The
original code pools with a fixed 8x8 window; we pool adaptively, which is
identical for 32x32 inputs and also works at other sizes. With 10 classes
WRN-16-2 has 0.69M (usually quoted as 0.70M) and WRN-40-2 2.24M parameters.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from dfkd_bench.models.registry import register_key_map, register_model


class WideBasicBlock(nn.Module):
    """Pre-activation residual block; 1x1 conv shortcut when the width changes."""

    def __init__(self, in_planes: int, out_planes: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, stride=1, padding=1, bias=False)
        self.equal_in_out = in_planes == out_planes
        self.conv_shortcut = (
            None
            if self.equal_in_out
            else nn.Conv2d(in_planes, out_planes, 1, stride=stride, padding=0, bias=False)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = F.relu(self.bn1(x))
        out = self.conv1(act)
        out = self.conv2(F.relu(self.bn2(out)))
        shortcut = x if self.conv_shortcut is None else self.conv_shortcut(act)
        return out + shortcut


class WideResNet(nn.Module):
    """WRN-depth-k for small images; ``depth`` must be 6n+4."""

    def __init__(
        self, depth: int, widen_factor: int, num_classes: int, in_channels: int = 3,
        base_widths: tuple[int, int, int] = (16, 32, 64),
    ) -> None:
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ValueError(f"WRN depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        # base_widths: (16, 32, 64) in every registered WRN; smaller ones serve the step-equivalence traces
        # (dfkd_bench.traces), which scale the reference code's same three constants
        first, second, third = base_widths
        widths = [first, first * widen_factor, second * widen_factor, third * widen_factor]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False)
        groups = []
        for g, stride in enumerate((1, 2, 2)):
            blocks = [
                WideBasicBlock(widths[g] if i == 0 else widths[g + 1], widths[g + 1], stride if i == 0 else 1)
                for i in range(n)
            ]
            groups.append(nn.Sequential(*blocks))
        self.block1, self.block2, self.block3 = groups
        self.bn = nn.BatchNorm2d(widths[3])
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[3], num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        out = F.relu(self.bn(out))
        return self.fc(torch.flatten(self.avgpool(out), 1))


def _register_wrn(depth: int, k: int, params: str) -> None:
    @register_model(
        f"wrn{depth}_{k}",
        family="wrn",
        default_image_size=32,
        description=f"Wide ResNet WRN-{depth}-{k} (pre-activation, no dropout), {params} params",
    )
    def build(num_classes: int, in_channels: int = 3, image_size: int = 32) -> nn.Module:
        return WideResNet(depth, k, num_classes, in_channels)


for _depth, _k, _params in ((16, 1, "0.18M"), (16, 2, "0.69M"), (40, 1, "0.56M"), (40, 2, "2.24M")):
    _register_wrn(_depth, _k, _params)

# The reference WRN code the DFKD papers share (xternalz/WideResNet-pytorch as used by ZSKT/ABM, CMI,
# Fast-Datafree): blocks inside ``block{g}.layer``, the width-changing shortcut ``convShortcut``, the
# final BatchNorm ``bn1``, classifier ``fc``; teacher files are {'state_dict': …} (plus epoch ...).
register_key_map([f"wrn{d}_{k}" for d, k in ((16, 1), (16, 2), (40, 1), (40, 2))],
                 "ZSKT / CMI WideResNet (block{g}.layer.i, convShortcut, bn1)",
                 [(r"^(block\d)\.layer\.", r"\1."), (r"\.convShortcut\.", ".conv_shortcut."), (r"^bn1\.", "bn.")])
