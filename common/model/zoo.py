"""The model zoo: small models that expose a backbone (a sequence of blocks) and a head.

Every model computes ``head(backbone(x))`` and its backbone is an ``nn.Sequential`` of
blocks, so a transfer policy can freeze a prefix of blocks and train the rest. The
models avoid BatchNorm and in-place operations so Opacus can train any part of them.
Pretrained families (``torchvision:NAME``, ``timm:NAME``) are built by
:mod:`common.model.backbones` with the same shape: named stages and a linear head.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from common.errors import ConfigurationError

#: Families of pretrained architectures, named ``FAMILY:NAME`` and built by :mod:`common.model.backbones`.
PRETRAINED_FAMILIES = ("torchvision", "timm")
#: The arguments a pretrained family's architecture takes (its input adapter and BatchNorm choice; docs/models.md).
PRETRAINED_ARGUMENTS = ("channels", "resize", "mean", "std", "groupnorm_stages")


def is_pretrained(arch: str) -> bool:
    """Whether ``arch`` names a pretrained family's architecture (``torchvision:resnet18``, ``timm:NAME``)."""
    return arch.partition(":")[0] in PRETRAINED_FAMILIES


class UnknownArchitecture(ConfigurationError, ValueError):
    """The model card or scenario names an architecture this version does not have."""


class FedModel(nn.Module):
    """A classifier split into ``backbone`` (blocks) and ``head`` (a linear layer)."""

    def __init__(self, backbone: nn.Sequential, head: nn.Linear) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def parametrised_blocks(self) -> list[int]:
        """Indices of the backbone blocks that hold parameters, in order."""
        return [i for i, block in enumerate(self.backbone) if any(True for _ in block.parameters())]


def _logreg(input_shape: Sequence[int], num_classes: int) -> FedModel:
    (features,) = input_shape
    return FedModel(nn.Sequential(), nn.Linear(features, num_classes))


def _mlp(input_shape: Sequence[int], num_classes: int, hidden: Sequence[int] = (32, 16)) -> FedModel:
    (features,) = input_shape
    blocks: list[nn.Module] = []
    width = features
    for size in hidden:
        blocks.append(nn.Sequential(nn.Linear(width, size), nn.ReLU()))
        width = size
    return FedModel(nn.Sequential(*blocks), nn.Linear(width, num_classes))


def _cnn(input_shape: Sequence[int], num_classes: int, channels: Sequence[int] = (8, 16)) -> FedModel:
    in_channels = input_shape[0]
    blocks: list[nn.Module] = []
    for width in channels:
        blocks.append(
            nn.Sequential(
                nn.Conv2d(in_channels, width, kernel_size=3, padding=1),
                nn.GroupNorm(min(4, width), width),
                nn.ReLU(),
                nn.MaxPool2d(2),
            )
        )
        in_channels = width
    blocks.append(nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten()))
    return FedModel(nn.Sequential(*blocks), nn.Linear(in_channels, num_classes))


ARCHITECTURES: dict[str, Callable[..., FedModel]] = {"logreg": _logreg, "mlp": _mlp, "cnn": _cnn}


def architecture_arguments(arch: str) -> tuple[str, ...]:
    """The keyword arguments architecture ``arch`` accepts beyond the input shape and the number of classes."""
    if is_pretrained(arch):
        return PRETRAINED_ARGUMENTS
    if arch not in ARCHITECTURES:
        raise UnknownArchitecture(f"unknown model architecture {arch!r}; this version knows {sorted(ARCHITECTURES)}")
    return tuple(inspect.signature(ARCHITECTURES[arch]).parameters)[2:]


def known_architectures() -> list[str]:
    """Every architecture name this version builds: the small zoo and the pretrained families."""
    from common.model.backbones import known_architectures as pretrained

    return sorted(ARCHITECTURES) + pretrained()


def build_model(
    arch: str, input_shape: Sequence[int], num_classes: int, args: Mapping[str, Any] | None = None
) -> FedModel:
    """Build a freshly initialised model of architecture ``arch``."""
    if is_pretrained(arch):
        from common.model.backbones import build_pretrained

        return build_pretrained(arch, input_shape, num_classes, dict(args or {}))
    if arch not in ARCHITECTURES:
        raise UnknownArchitecture(f"unknown model architecture {arch!r}; this version knows {known_architectures()}")
    try:
        return ARCHITECTURES[arch](tuple(input_shape), num_classes, **dict(args or {}))
    except (TypeError, ValueError) as err:
        raise UnknownArchitecture(
            f"cannot build {arch!r} for input shape {tuple(input_shape)} with arguments {dict(args or {})}: {err}"
        ) from err
