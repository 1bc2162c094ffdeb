"""Pretrained-model families (torchvision, timm) as fedtransfer models: named stages, a new head, an input adapter.

An architecture is named ``torchvision:NAME`` or ``timm:NAME``. It is built as a
:class:`~common.model.zoo.FedModel` whose backbone is an ``nn.Sequential`` of *named stages*
(ResNet: ``input``, ``stem``, ``layer1`` .. ``layer4``, ``pool``) and whose head is a new
``nn.Linear`` for the scenario's classes, so the transfer policies (``last:K`` counts
stages) work as on the small models. The first stage, ``input``, is the input adapter: it
resizes, repeats a grey channel to three and normalises, identically at every site,
because it is part of the model that every site builds from the model card's
``arch_args``:

- ``channels``: ``"repeat"`` (grey data, the model's three input channels get the same
  image), ``"sum"`` (grey data, the first convolution's weights are summed over its input
  channels at import, so the model takes one channel), or ``"native"`` (data with as many
  channels as the model takes);
- ``resize``: the square side the images are resized to (bilinear), 0 to keep their size;
- ``mean``, ``std``: the normalisation per model input channel, after resizing;
- ``groupnorm_stages``: stages whose BatchNorm layers are GroupNorm (Opacus's
  ``ModuleValidator.fix``); every other BatchNorm is a
  :class:`~common.model.batchnorm.FixedBatchNorm2d` with the pretrained statistics.

So that DP-SGD can train any part, the models run deterministically and out of place:
dropout and stochastic depth are off, activations are not in place, and the residual
blocks of the listed torchvision families add their shortcut out of place (Opacus's
per-sample-gradient hooks refuse an in-place change of a hooked layer's output).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from common.errors import ConfigurationError
from common.model.batchnorm import fix_batchnorm, to_groupnorm
from common.model.torchvision_import import timm, torchvision
from common.model.zoo import PRETRAINED_FAMILIES, FedModel, UnknownArchitecture

TORCHVISION, TIMM = PRETRAINED_FAMILIES
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CHANNEL_MODES = ("repeat", "sum", "native")
MODEL_CHANNELS = 3


class BackboneError(ConfigurationError):
    """A pretrained architecture cannot be built as asked."""


class UnknownPretrained(BackboneError, UnknownArchitecture):
    """Not one of the pretrained architectures this version builds."""


class ChannelMismatch(BackboneError):
    """The data's number of channels does not fit the model's input (after the chosen adaptation)."""


@dataclass(frozen=True)
class Stage:
    """A named stage: the family's modules at ``paths``, then parameter-free ``then`` modules."""

    name: str
    paths: tuple[str, ...]
    then: tuple[str, ...] = ()


@dataclass(frozen=True)
class TorchvisionSpec:
    """How a torchvision classifier splits into stages, and where its head and first convolution are."""

    stages: tuple[Stage, ...]
    head: str
    first_conv: str
    native_size: int = 224


def _resnet() -> TorchvisionSpec:
    return TorchvisionSpec(
        stages=(
            Stage("stem", ("conv1", "bn1", "relu", "maxpool")),
            *(Stage(f"layer{i}", (f"layer{i}",)) for i in range(1, 5)),
            Stage("pool", ("avgpool",), ("flatten",)),
        ),
        head="fc",
        first_conv="conv1",
    )


TORCHVISION_SPECS: dict[str, TorchvisionSpec] = {
    "resnet18": _resnet(),
    "resnet50": _resnet(),
    "densenet121": TorchvisionSpec(
        stages=(
            Stage("stem", ("features.conv0", "features.norm0", "features.relu0", "features.pool0")),
            *(Stage(f"block{i}", (f"features.denseblock{i}", f"features.transition{i}")) for i in range(1, 4)),
            Stage("block4", ("features.denseblock4", "features.norm5"), ("relu",)),
            Stage("pool", (), ("avgpool", "flatten")),
        ),
        head="classifier",
        first_conv="features.conv0",
    ),
    "efficientnet_b0": TorchvisionSpec(
        stages=(
            Stage("stem", ("features.0",)),
            *(Stage(f"stage{i}", (f"features.{i}",)) for i in range(1, 8)),
            Stage("top", ("features.8",)),
            Stage("pool", ("avgpool",), ("flatten",)),
        ),
        head="classifier.1",
        first_conv="features.0.0",
    ),
    "mobilenet_v3_small": TorchvisionSpec(
        stages=(
            Stage("stem", ("features.0",)),
            *(Stage(f"block{i}", (f"features.{i}",)) for i in range(1, 12)),
            Stage("top", ("features.12",)),
            Stage("pool", ("avgpool",), ("flatten",)),
            Stage("neck", ("classifier.0", "classifier.1")),
        ),
        head="classifier.3",
        first_conv="features.0.0",
    ),
}


def known_architectures() -> list[str]:
    """The pretrained architectures this version builds (timm's are any ``timm:NAME`` timm knows)."""
    return [f"{TORCHVISION}:{name}" for name in TORCHVISION_SPECS] + [f"{TIMM}:<name>"]


class InputAdapter(nn.Module):
    """Resize, repeat a grey channel, normalise: the preprocessing every site applies, inside the model."""

    def __init__(self, repeat: int, size: int, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.repeat = repeat
        self.size = size
        self.register_buffer("mean", torch.tensor(list(mean)).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(list(std)).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.size and tuple(x.shape[-2:]) != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        if self.repeat > 1:
            x = x.expand(-1, self.repeat, -1, -1)
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        mean, std = self.mean.flatten().tolist(), self.std.flatten().tolist()
        return f"repeat={self.repeat}, size={self.size}, mean={mean}, std={std}"


@dataclass(frozen=True)
class InputOptions:
    """The input adaptation of an imported model, as its card's ``arch_args`` hold it."""

    channels: str
    resize: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def from_args(cls, input_shape: Sequence[int], args: Mapping[str, Any]) -> InputOptions:
        if len(input_shape) != 3:
            raise ChannelMismatch(
                f"input shape {tuple(input_shape)} is not an image (channels, height, width); "
                "pretrained image models take image data"
            )
        data_channels = int(input_shape[0])
        default = "native" if data_channels == MODEL_CHANNELS else "repeat"
        channels = str(args.get("channels", default))
        if channels not in CHANNEL_MODES:
            raise BackboneError(f"channels must be one of {', '.join(CHANNEL_MODES)}, not {channels!r}")
        if channels == "native" and data_channels != MODEL_CHANNELS:
            raise ChannelMismatch(
                f"the data has {data_channels} channel(s) but the model takes {MODEL_CHANNELS}; for grey images "
                "use channels 'repeat' (--channels repeat) or 'sum'"
            )
        if channels in ("repeat", "sum") and data_channels != 1:
            raise ChannelMismatch(
                f"channels {channels!r} adapts grey (1-channel) images, but the data has {data_channels} channels"
            )
        width = 1 if channels == "sum" else MODEL_CHANNELS
        mean = tuple(float(v) for v in args.get("mean", IMAGENET_MEAN))
        std = tuple(float(v) for v in args.get("std", IMAGENET_STD))
        if channels == "sum" and len(mean) == MODEL_CHANNELS:
            mean, std = (sum(mean) / len(mean),), (sum(std) / len(std),)
        if len(mean) != width or len(std) != width or min(std) <= 0:
            raise BackboneError(
                f"mean and std need {width} value(s) (std > 0) for channels {channels!r}, got {mean} and {std}"
            )
        resize = int(args.get("resize", 0))
        if resize < 0:
            raise BackboneError(f"resize must be 0 (keep the size) or a positive side, not {resize}")
        return cls(channels, resize, mean, std)

    def adapter(self) -> InputAdapter:
        return InputAdapter(MODEL_CHANNELS if self.channels == "repeat" else 1, self.resize, self.mean, self.std)

    def describe(self) -> str:
        steps = [f"resized to {self.resize}x{self.resize} (bilinear)"] if self.resize else ["kept at the data's size"]
        steps.append(
            {
                "repeat": "the grey channel repeated to 3",
                "sum": "the first convolution's weights summed over its 3 input channels (1-channel input)",
                "native": "channels as they are",
            }[self.channels]
        )
        steps.append(f"normalised with mean {list(self.mean)} and std {list(self.std)}")
        return "model input adapter: " + ", ".join(steps)


def split_arch(arch: str) -> tuple[str, str]:
    family, _, name = arch.partition(":")
    return family, name


def _get(root: nn.Module, path: str) -> nn.Module:
    return root.get_submodule(path) if path else root


def _set(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(_get(root, parent), name, module)


def _parameter_free(name: str) -> nn.Module:
    return {"flatten": nn.Flatten, "relu": nn.ReLU, "avgpool": lambda: nn.AdaptiveAvgPool2d(1)}[name]()


def _leaf(path: str) -> str:
    return path.replace(".", "_")


def _stage_module(root: nn.Module, stage: Stage) -> nn.Module:
    if len(stage.paths) == 1 and not stage.then:
        return _get(root, stage.paths[0])
    parts = [(_leaf(p), _get(root, p)) for p in stage.paths] + [(name, _parameter_free(name)) for name in stage.then]
    return nn.Sequential(OrderedDict(parts))


def stage_prefixes(arch: str) -> list[tuple[str, str]]:
    """(torchvision prefix, fedtransfer prefix) pairs that map a torchvision state dict onto the model's names."""
    spec = torchvision_spec(arch)
    pairs = []
    for stage in spec.stages:
        single = len(stage.paths) == 1 and not stage.then
        for path in stage.paths:
            pairs.append((f"{path}.", f"backbone.{stage.name}." if single else f"backbone.{stage.name}.{_leaf(path)}."))
    pairs.append((f"{spec.head}.", "head."))
    return pairs


def torchvision_spec(arch: str) -> TorchvisionSpec:
    family, name = split_arch(arch)
    if family != TORCHVISION or name not in TORCHVISION_SPECS:
        raise UnknownPretrained(
            f"unknown architecture {arch!r}; pretrained architectures are {', '.join(known_architectures())}"
        )
    return TORCHVISION_SPECS[name]


_models = torchvision().models


class OutOfPlaceBasicBlock(_models.resnet.BasicBlock):
    """ResNet's basic block, adding its shortcut out of place."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(y)) + shortcut)


class OutOfPlaceBottleneck(_models.resnet.Bottleneck):
    """ResNet's bottleneck block, adding its shortcut out of place."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        return self.relu(self.bn3(self.conv3(y)) + shortcut)


class OutOfPlaceMBConv(_models.efficientnet.MBConv):
    """EfficientNet's MBConv block, adding its shortcut out of place."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(x)
        return self.stochastic_depth(y) + x if self.use_res_connect else y


class OutOfPlaceInvertedResidual(_models.mobilenetv3.InvertedResidual):
    """MobileNetV3's inverted residual block, adding its shortcut out of place."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(x)
        return y + x if self.use_res_connect else y


OUT_OF_PLACE = {
    cls.__mro__[1]: cls
    for cls in (OutOfPlaceBasicBlock, OutOfPlaceBottleneck, OutOfPlaceMBConv, OutOfPlaceInvertedResidual)
}


def make_deterministic_and_out_of_place(model: nn.Module) -> None:
    """No dropout or stochastic depth, no in-place activations, residual blocks that add out of place."""
    for module in model.modules():
        if type(module) in OUT_OF_PLACE:
            module.__class__ = OUT_OF_PLACE[type(module)]
        if hasattr(module, "inplace"):
            module.inplace = False
        if isinstance(module, nn.Dropout) or type(module).__name__ in ("StochasticDepth", "DropPath"):
            module.p = 0.0
            if hasattr(module, "drop_prob"):
                module.drop_prob = 0.0


def _torchvision_model(name: str, input_shape: Sequence[int], num_classes: int, args: Mapping[str, Any]) -> FedModel:
    spec = torchvision_spec(f"{TORCHVISION}:{name}")
    options = InputOptions.from_args(input_shape, args)
    groupnorm = _groupnorm_stages(spec, args)
    network = torchvision().models.get_model(name, weights=None)
    if options.channels == "sum":
        conv = _get(network, spec.first_conv)
        _set(
            network,
            spec.first_conv,
            nn.Conv2d(
                1,
                conv.out_channels,
                conv.kernel_size,
                stride=conv.stride,
                padding=conv.padding,
                bias=conv.bias is not None,
            ),
        )
    stages: list[tuple[str, nn.Module]] = [("input", options.adapter())]
    for stage in spec.stages:
        module = _stage_module(network, stage)
        stages.append((stage.name, to_groupnorm(module) if stage.name in groupnorm else module))
    backbone = nn.Sequential(OrderedDict(stages))
    make_deterministic_and_out_of_place(backbone)
    fix_batchnorm(backbone)
    head = _get(network, spec.head)
    return FedModel(backbone, nn.Linear(head.in_features, num_classes))


def _groupnorm_stages(spec: TorchvisionSpec, args: Mapping[str, Any]) -> set[str]:
    wanted = [str(s) for s in args.get("groupnorm_stages", [])]
    names = [stage.name for stage in spec.stages]
    unknown = [s for s in wanted if s not in names]
    if unknown:
        raise BackboneError(f"groupnorm stages {unknown} are not stages of this model; its stages are {names}")
    return set(wanted)


def _timm_model(name: str, input_shape: Sequence[int], num_classes: int, args: Mapping[str, Any]) -> FedModel:
    """A timm model as one ``features`` stage (its classifier removed) and a new linear head."""
    options = InputOptions.from_args(input_shape, args)
    if options.channels == "sum":
        raise BackboneError("timm models take channels 'repeat' or 'native'")
    library = timm()
    if name not in library.list_models():
        raise UnknownPretrained(f"timm has no model {name!r}; `timm.list_models()` lists the names it knows")
    network = library.create_model(name, pretrained=False, num_classes=0, drop_rate=0.0, drop_path_rate=0.0)
    features = to_groupnorm(network) if "features" in _groupnorm_list(args) else network
    backbone = nn.Sequential(OrderedDict([("input", options.adapter()), ("features", features)]))
    make_deterministic_and_out_of_place(backbone)
    fix_batchnorm(backbone)
    width = getattr(network, "head_hidden_size", None) or network.num_features  # after a pre-logits layer, if any
    return FedModel(backbone, nn.Linear(width, num_classes))


def _groupnorm_list(args: Mapping[str, Any]) -> list[str]:
    wanted = [str(s) for s in args.get("groupnorm_stages", [])]
    if set(wanted) - {"features"}:
        raise BackboneError(f"a timm model has one stage, 'features'; groupnorm stages {wanted} do not exist")
    return wanted


def build_pretrained(arch: str, input_shape: Sequence[int], num_classes: int, args: Mapping[str, Any]) -> FedModel:
    """Build ``torchvision:NAME`` or ``timm:NAME`` (randomly initialised; weights are loaded afterwards)."""
    family, name = split_arch(arch)
    if family == TORCHVISION:
        return _torchvision_model(name, input_shape, num_classes, args)
    return _timm_model(name, input_shape, num_classes, args)
