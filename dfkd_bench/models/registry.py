"""Name -> constructor registries for classifiers and generators.

Every architecture the benchmark can train or distil is reached through a
string name, so that configs, checkpoints and the command line all speak the
same language. Built-in families register themselves with
:func:`register_model` / :func:`register_generator` when their module is
imported; the registry imports those modules lazily on first use, so
``from dfkd_bench.models.registry import build_model`` works on its own and
there is no import cycle between the registry and the family modules.

Besides the registered names, :func:`build_model` accepts

* ``timm:<name>`` -- any timm model, built with ``pretrained=False``;
* ``torchvision:<name>`` (alias ``tv:<name>``) -- any torchvision
  classification model, built with ``weights=None``.

Weights are never downloaded: a data-free benchmark must not silently pull
in networks trained on the very data it pretends not to have.

Every user-facing failure raises :class:`~dfkd_bench.errors.ConfigError` with
a one-line message that names the bad value and says what to do, because the
CLI prints that line and nothing else.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib
import re
from dataclasses import dataclass
from typing import Callable, Iterable

import torch.nn as nn

from dfkd_bench.errors import ConfigError

# Modules whose import registers the built-in classifiers / generators.
_BUILTIN_MODEL_MODULES = (
    "dfkd_bench.models.cifar_resnet",
    "dfkd_bench.models.wrn",
    "dfkd_bench.models.lenet",
)
_BUILTIN_GENERATOR_MODULES = ("dfkd_bench.models.generators",)

TIMM_PREFIX = "timm:"
TORCHVISION_PREFIXES = ("torchvision:", "tv:")
_LIST_HINT = "run `dfkd-bench list` to see the registered models"


@dataclass(frozen=True)
class ModelInfo:
    """What ``dfkd-bench list`` shows about one registered architecture."""

    name: str
    family: str
    default_image_size: int
    description: str


ModelBuilder = Callable[..., nn.Module]


@dataclass(frozen=True)
class KeyMap:
    """How a published checkpoint of an architecture names its weights, as rules to our names.

    A teacher file from another code base holds the same tensors under other names (``linear.*``
    where we say ``fc.*``, ``block1.layer.0.*`` where we say ``block1.0.*`` ...). ``rules`` are
    ``(pattern, replacement)`` pairs for :func:`re.sub`, applied in order to every key; the loader
    (:func:`dfkd_bench.teachers.checkpoints.fit_state_dict`) tries each known map of the architecture and
    keeps the one under which the file fits exactly.
    """

    name: str
    rules: tuple[tuple[str, str], ...]
    reshape: tuple[str, ...] = ()
    """Patterns (:func:`re.search`, on our names) of tensors the published layout stores in another
    shape of the same values, e.g. LeNet-5's C5 as a 5x5 convolution over a 5x5 map where ours is the
    equivalent Linear: such a tensor is reshaped to the architecture's shape when the element counts
    agree (a view, the values in the same order), never padded or cut."""

    def rename(self, key: str) -> str:
        for pattern, replacement in self.rules:
            key = re.sub(pattern, replacement, key)
        return key


_KEY_MAPS: dict[str, list[KeyMap]] = {}


def register_key_map(names: Iterable[str], name: str, rules: Iterable[tuple[str, str]],
                     reshape: Iterable[str] = ()) -> KeyMap:
    """Declare that checkpoints published as ``name`` fit the architectures ``names`` after ``rules``
    (and, for the keys matching ``reshape``, a reshape of the same values: :attr:`KeyMap.reshape`).

    Declared next to the architecture (in its model file), so the model and the names its public
    checkpoints use are read together.
    """
    key_map = KeyMap(name, tuple((re.compile(p).pattern, r) for p, r in rules),
                     tuple(re.compile(p).pattern for p in reshape))
    for arch in names:
        _KEY_MAPS.setdefault(arch.strip().lower(), []).append(key_map)
    return key_map


def key_maps_for(arch: str) -> list[KeyMap]:
    """The known key maps of ``arch`` (a registered name, or ``torchvision:<name>``), in declaration order."""
    _load_builtins(_BUILTIN_MODEL_MODULES)
    key = arch.strip().lower()
    for prefix in TORCHVISION_PREFIXES[1:]:  # tv:<name> is torchvision:<name>
        if key.startswith(prefix):
            key = TORCHVISION_PREFIXES[0] + key[len(prefix):]
    return list(_KEY_MAPS.get(key, ()))


@dataclass(frozen=True)
class _Entry:
    info: ModelInfo
    builder: ModelBuilder


_MODELS: dict[str, _Entry] = {}
_GENERATORS: dict[str, _Entry] = {}


def _make_register(table: dict[str, _Entry], kind: str):
    def register(
        name: str, *, family: str, default_image_size: int, description: str
    ) -> Callable[[ModelBuilder], ModelBuilder]:
        if name != name.strip().lower() or ":" in name:
            # Names are matched case-insensitively and ':' introduces the
            # timm/torchvision namespaces, so both would make a name unreachable.
            raise ValueError(f"{kind} name {name!r} must be lower case without ':'")

        def decorator(builder: ModelBuilder) -> ModelBuilder:
            if name in table:
                raise ValueError(f"{kind} {name!r} is registered twice")
            info = ModelInfo(name, family, int(default_image_size), description)
            table[name] = _Entry(info, builder)
            return builder

        return decorator

    return register


register_model = _make_register(_MODELS, "model")
register_model.__doc__ = """Register a classifier constructor under ``name``.

The decorated function is called as ``builder(num_classes=..., in_channels=...,
image_size=...)`` and must return an ``nn.Module`` mapping an already
normalised ``N x C x H x W`` batch to logits.
"""

register_generator = _make_register(_GENERATORS, "generator")
register_generator.__doc__ = """Register a generator constructor under ``name``.

The decorated function receives the keyword arguments of
:func:`build_generator` (minus ``name``) and returns a
:class:`~dfkd_bench.models.generators.Generator`.
"""


@contextlib.contextmanager
def scoped_registrations():
    """``with scoped_registrations(): register_model(...)(builder) ...`` -- classifiers and generators
    registered inside the block are unregistered at its end (the step-equivalence replay's trace-sized
    architectures, which must not stay in ``dfkd-bench list`` or collide with a second replay)."""
    _load_builtins(_BUILTIN_MODEL_MODULES)
    _load_builtins(_BUILTIN_GENERATOR_MODULES)
    saved = {id(table): dict(table) for table in (_MODELS, _GENERATORS)}
    try:
        yield
    finally:
        for table in (_MODELS, _GENERATORS):
            table.clear()
            table.update(saved[id(table)])


def _load_builtins(modules: Iterable[str]) -> None:
    for module in modules:
        importlib.import_module(module)


def _suggest(bad: str, candidates: Iterable[str]) -> str:
    close = difflib.get_close_matches(bad, list(candidates), n=3, cutoff=0.6)
    return f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""


def _natural_key(text: str) -> tuple:
    """Sort ``resnet20`` before ``resnet110``: digit runs compare as numbers."""
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text))


def _check_positive_int(what: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{what} must be a positive integer, got {value!r}")
    return value


def list_models() -> list[ModelInfo]:
    """All registered classifiers, sorted by family then name.

    timm and torchvision models are not listed (there are over a thousand);
    they are reachable as ``timm:<name>`` and ``torchvision:<name>``.
    """
    _load_builtins(_BUILTIN_MODEL_MODULES)
    return sorted((e.info for e in _MODELS.values()), key=lambda i: (i.family, _natural_key(i.name)))


def list_generators() -> list[ModelInfo]:
    """All registered generators, sorted by name."""
    _load_builtins(_BUILTIN_GENERATOR_MODULES)
    return sorted((e.info for e in _GENERATORS.values()), key=lambda i: _natural_key(i.name))


def build_model(
    name: str, num_classes: int, in_channels: int = 3, image_size: int = 32
) -> nn.Module:
    """Build a randomly initialised classifier that returns logits.

    ``name`` is a registered name (see :func:`list_models`), ``timm:<name>``
    or ``torchvision:<name>`` / ``tv:<name>``. ``image_size`` is the side of
    the square input; most architectures pool globally and ignore it, but
    size-dependent ones (LeNet-5, fixed-size timm models such as ViTs) need it.
    """
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"model name must be a non-empty string, got {name!r}; {_LIST_HINT}")
    _check_positive_int("num_classes", num_classes)
    _check_positive_int("in_channels", in_channels)
    _check_positive_int("image_size", image_size)

    key = name.strip()
    if key.lower().startswith(TIMM_PREFIX):
        return _build_timm(key[len(TIMM_PREFIX):].strip(), num_classes, in_channels, image_size)
    for prefix in TORCHVISION_PREFIXES:
        if key.lower().startswith(prefix):
            return _build_torchvision(key[len(prefix):].strip(), num_classes, in_channels)

    _load_builtins(_BUILTIN_MODEL_MODULES)
    entry = _MODELS.get(key.lower())
    if entry is None:
        raise ConfigError(
            f"unknown model {name!r}{_suggest(key.lower(), _MODELS)}; {_LIST_HINT}, "
            f"or use timm:<name> / torchvision:<name>"
        )
    return entry.builder(num_classes=num_classes, in_channels=in_channels, image_size=image_size)


def build_generator(
    name: str,
    noise_dim: int,
    out_channels: int,
    image_size: int,
    conditioning: str = "uncond",
    num_classes: int | None = None,
    output_logits: bool = True,
) -> nn.Module:
    """Build a generator mapping noise (and optionally a class embedding) to images.

    See :mod:`dfkd_bench.models.generators` for the architectures and for the
    meaning of ``conditioning`` and ``output_logits``.
    """
    _load_builtins(_BUILTIN_GENERATOR_MODULES)
    key = name.strip().lower() if isinstance(name, str) else name
    entry = _GENERATORS.get(key)
    if entry is None:
        raise ConfigError(
            f"unknown generator {name!r}{_suggest(str(key), _GENERATORS)}; "
            f"run `dfkd-bench list` to see the registered generators"
        )
    _check_positive_int("noise_dim", noise_dim)
    _check_positive_int("out_channels", out_channels)
    _check_positive_int("image_size", image_size)
    if num_classes is not None:
        _check_positive_int("num_classes", num_classes)
    return entry.builder(
        noise_dim=noise_dim,
        out_channels=out_channels,
        image_size=image_size,
        conditioning=conditioning,
        num_classes=num_classes,
        output_logits=bool(output_logits),
    )


def _build_timm(name: str, num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    import timm

    if not name or not timm.is_model(name):
        suggestion = _suggest(name, timm.list_models()) if name else ""
        raise ConfigError(
            f"unknown timm model {name!r}{suggestion}; see timm.list_models() for valid names"
        )
    kwargs: dict[str, object] = {}
    # Transformers and other fixed-size models bake the input size into their
    # position embeddings; tell them ours instead of failing at forward time.
    if getattr(timm.get_pretrained_cfg(name.split(".")[0]), "fixed_input_size", False):
        kwargs["img_size"] = image_size
    return timm.create_model(
        name, pretrained=False, num_classes=num_classes, in_chans=in_channels, **kwargs
    )


def _build_torchvision(name: str, num_classes: int, in_channels: int) -> nn.Module:
    import torchvision.models as tvm

    available = tvm.list_models(module=tvm)  # classification models only
    if name not in available:
        raise ConfigError(
            f"unknown torchvision classification model {name!r}{_suggest(name, available)}; "
            f"see torchvision.models.list_models() for valid names"
        )
    if in_channels != 3:
        raise ConfigError(
            f"torchvision:{name} only supports 3 input channels, got in_channels={in_channels}; "
            f"use a timm:<name> or a built-in model for {in_channels}-channel data"
        )
    return tvm.get_model(name, weights=None, num_classes=num_classes)


@register_model(
    "alexnet",
    family="alexnet",
    default_image_size=224,
    description="torchvision AlexNet (Krizhevsky et al. 2012), MAD's ImageNet-scale teacher",
)
def alexnet(num_classes: int, in_channels: int = 3, image_size: int = 224) -> nn.Module:
    """torchvision's AlexNet, registered under a bare name because MAD uses it
    as the teacher on ImageNet / Places365 / Food101.

    It lives here rather than in a family module because it is a thin wrapper
    over the torchvision adapter above. Its stride-4 stem and three max-pools
    need inputs of at least 63x63; it keeps torchvision's dropout (the only
    zoo model with dropout), so switch it to ``eval()`` for deterministic use.
    """
    if in_channels != 3:
        raise ConfigError(
            f"alexnet only supports 3 input channels, got in_channels={in_channels}"
        )
    if image_size < 63:
        raise ConfigError(
            f"alexnet needs image_size >= 63 (stride-4 stem and three max-pools), got {image_size}"
        )
    return _build_torchvision("alexnet", num_classes, in_channels)


# torchvision's own AlexNet checkpoints (the ImageNet weights) use our names as they are. The
# ImageNet example of pytorch/examples, which trained many published AlexNets, wraps only
# ``model.features`` in DataParallel for AlexNet and VGG and saves
# {'epoch', 'arch', 'state_dict', 'best_acc1', 'optimizer'}, so the keys read ``features.module.0.weight``.
register_key_map(("alexnet", "torchvision:alexnet"), "pytorch/examples ImageNet (DataParallel features)",
                 [(r"^features\.module\.", "features.")])
