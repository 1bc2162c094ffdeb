"""Trainable parts the grad-sample mode tests share: each returns the part and a batch of its inputs."""

from __future__ import annotations

import torch
from torch import nn

from common.model.transfer import TransferPolicy
from common.model.zoo import build_model


def cnn_last_block(
    records: int = 24, scale: float = 2.0, generator: torch.Generator | None = None
) -> tuple[nn.Module, torch.Tensor]:
    """The zoo CNN's last block (Conv2d at 8x8 positions, GroupNorm) and head, fed the frozen prefix's features."""
    model = build_model("cnn", (1, 16, 16), 2)
    transfer = TransferPolicy.parse("last:1")
    transfer.apply(model)
    frozen, trainable = transfer.split(model)
    with torch.no_grad():
        return trainable, frozen.eval()(torch.randn(records, 1, 16, 16, generator=generator) * scale)


def mlp() -> tuple[nn.Module, torch.Tensor]:
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2)), torch.randn(24, 6)


def frozen_middle() -> tuple[nn.Module, torch.Tensor]:
    """An MLP with LayerNorm whose middle layer and last bias are frozen."""
    part = nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    part[2].requires_grad_(False)
    part[4].bias.requires_grad_(False)
    return part, torch.randn(24, 6)
