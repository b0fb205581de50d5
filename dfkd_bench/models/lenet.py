"""LeNet-5 and LeNet-5-half, the MNIST teacher/student pair of DAFL (Chen et al. 2019).

Layout (full / half widths)::

    conv 5x5 -> 6 / 3 maps, ReLU, max-pool 2
    conv 5x5 -> 16 / 8 maps, ReLU, max-pool 2
    C5: 120 / 60 units, ReLU
    fc  84 / 42 units, ReLU
    fc  num_classes

DAFL feeds 32x32 images, for which C5 is a 5x5 conv over the 16x5x5 map. To
serve 16x16 digits, 28x28 MNIST and 32x32 inputs alike, this implementation
is *size-adaptive*:

* ``conv1`` uses ``padding=2`` when the input is smaller than 32, so a 28x28
  image yields the same 28x28 -> 14x14 -> 10x10 -> 5x5 maps as the classic
  LeNet-5 on a zero-padded 32x32 image (LeCun et al. 1998 also pad MNIST to
  32x32);
* C5 is a dense layer over the flattened final feature map. For a 32x32 (or
  28x28) input that map is 16x5x5, and a dense layer over it is exactly the
  classic 5x5 conv producing a 1x1 output -- same parameters, same function.
  For a 16x16 input the map is 16x2x2 and C5 simply has fewer inputs.

Because C5's input size is fixed at construction, a model built for one
``image_size`` only accepts inputs of that size. Any size of at least 12
(with padding) works; 1 or 3 input channels (or any other number) are fine.

``lenet5_bn`` / ``lenet5_half_bn`` (ours, not DAFL's) add a BatchNorm2d after
each conv (conv -> BN -> ReLU -> pool), the order of the ResNets and WRNs
the pool methods were published with. They exist so that the methods which
need the teacher's BatchNorm statistics (DeepInversion, CMI, FastDFKD, DFQ)
have a CPU-sized teacher to invert (docs/results.md, "The zoo with a BatchNorm teacher").
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from dfkd_bench.errors import ConfigError
from dfkd_bench.models.registry import register_key_map, register_model


class LeNet5(nn.Module):
    """Size-adaptive LeNet-5; ``width`` = (conv1, conv2, C5, F6) channels/units.

    ``c5_relu`` is C5's ReLU as a module (no weights, so the state dict is unchanged) whose
    output -- the 120 (60) post-ReLU C5 units -- is the "feature" DAFL's official LeNet-5
    returns with ``out_feature=True`` and its activation loss uses; ``feature_module`` names it
    for :func:`dfkd_bench.methods.zoo_common.feature_tap`.
    """

    feature_module = "c5_relu"

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 1,
        image_size: int = 32,
        width: tuple[int, int, int, int] = (6, 16, 120, 84),
        batchnorm: bool = False,
    ) -> None:
        super().__init__()
        c1, c2, c5, f6 = width
        padding = 2 if image_size < 32 else 0
        side = image_size + 2 * padding - 4  # conv1, 5x5
        side //= 2  # pool
        side -= 4  # conv2, 5x5
        side //= 2  # pool
        if side < 1:
            raise ConfigError(
                f"LeNet-5 needs image_size >= 12, got {image_size} "
                f"(two 5x5 convs and two 2x2 pools leave no pixels)"
            )
        self.image_size = image_size
        self.conv1 = nn.Conv2d(in_channels, c1, 5, padding=padding)
        self.conv2 = nn.Conv2d(c1, c2, 5)
        # Attributes only with batchnorm=True, so the plain LeNet-5's state_dict keys are unchanged.
        if batchnorm:
            self.bn1 = nn.BatchNorm2d(c1)
            self.bn2 = nn.BatchNorm2d(c2)
        self.batchnorm = batchnorm
        self.c5 = nn.Linear(c2 * side * side, c5)
        self.fc6 = nn.Linear(c5, f6)
        self.fc7 = nn.Linear(f6, num_classes)
        self.c5_relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(
                f"this LeNet-5 was built for {self.image_size}x{self.image_size} inputs, "
                f"got {tuple(x.shape[-2:])}"
            )
        if self.batchnorm:
            out = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2)
            out = F.max_pool2d(F.relu(self.bn2(self.conv2(out))), 2)
        else:
            out = F.max_pool2d(F.relu(self.conv1(x)), 2)
            out = F.max_pool2d(F.relu(self.conv2(out)), 2)
        out = self.c5_relu(self.c5(torch.flatten(out, 1)))
        out = F.relu(self.fc6(out))
        return self.fc7(out)


@register_model(
    "lenet5",
    family="lenet",
    default_image_size=32,
    description="LeNet-5 as in DAFL (6/16/120/84), size-adaptive for 16/28/32 px",
)
def lenet5(num_classes: int, in_channels: int = 1, image_size: int = 32) -> nn.Module:
    return LeNet5(num_classes, in_channels, image_size, width=(6, 16, 120, 84))


@register_model(
    "lenet5_half",
    family="lenet",
    default_image_size=32,
    description="LeNet-5-half as in DAFL (3/8/60/42), size-adaptive for 16/28/32 px",
)
def lenet5_half(num_classes: int, in_channels: int = 1, image_size: int = 32) -> nn.Module:
    return LeNet5(num_classes, in_channels, image_size, width=(3, 8, 60, 42))


@register_model(
    "lenet5_bn",
    family="lenet",
    default_image_size=32,
    description="LeNet-5 with BatchNorm after each conv (ours: a CPU teacher with BN statistics)",
)
def lenet5_bn(num_classes: int, in_channels: int = 1, image_size: int = 32) -> nn.Module:
    return LeNet5(num_classes, in_channels, image_size, width=(6, 16, 120, 84), batchnorm=True)


@register_model(
    "lenet5_half_bn",
    family="lenet",
    default_image_size=32,
    description="LeNet-5-half with BatchNorm after each conv (the student of lenet5_bn)",
)
def lenet5_half_bn(num_classes: int, in_channels: int = 1, image_size: int = 32) -> nn.Module:
    return LeNet5(num_classes, in_channels, image_size, width=(3, 8, 60, 42), batchnorm=True)


# The LeNet-5 of DAFL's lenet.py (huawei-noah/Efficient-Computing), which DFAD's network/lenet.py
# reuses: conv1, conv2, C5 as ``conv3`` (a 5x5 convolution over the 5x5 map of a 32 x 32 input, i.e.
# our Linear ``c5`` on the same 400 values in the same order), ``fc1`` = our ``fc6``, ``fc2`` = our
# ``fc7``. Their MNIST teachers (32 x 32 resized MNIST) load into ``--image-size 32`` LeNet-5s.
register_key_map(["lenet5", "lenet5_half"], "DAFL / DFAD LeNet-5 (C5 as conv3, fc1/fc2)",
                 [(r"^conv3\.", "c5."), (r"^fc1\.", "fc6."), (r"^fc2\.", "fc7.")], reshape=[r"^c5\.weight$"])
