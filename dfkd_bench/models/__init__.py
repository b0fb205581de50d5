"""Model zoo: classifiers (teachers / students) and generators, by name.

Public API::

    build_model(name, num_classes, in_channels=3, image_size=32) -> nn.Module
    list_models() -> list[ModelInfo]
    build_generator(name, noise_dim, out_channels, image_size,
                    conditioning="uncond", num_classes=None, output_logits=True)
    list_generators() -> list[ModelInfo]
    generator_for_image_size(image_size) -> str

Registered names are listed by ``dfkd-bench list``; any timm model is reachable
as ``timm:<name>`` and any torchvision classifier as ``torchvision:<name>``
(or ``tv:<name>``), always without pretrained weights.

May import: errors.
"""

from dfkd_bench.models.generators import (
    CONDITIONINGS,
    ConvBlockX,
    Generator,
    ResNetBlockY,
    generator_for_image_size,
)
from dfkd_bench.models.registry import (
    ModelInfo,
    build_generator,
    build_model,
    list_generators,
    list_models,
    register_generator,
    register_model,
)

__all__ = [
    "CONDITIONINGS",
    "ConvBlockX",
    "Generator",
    "ModelInfo",
    "ResNetBlockY",
    "build_generator",
    "build_model",
    "generator_for_image_size",
    "list_generators",
    "list_models",
    "register_generator",
    "register_model",
]
