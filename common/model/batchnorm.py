"""BatchNorm under DP: normalise with fixed, pretrained statistics, or swap for GroupNorm.

A BatchNorm layer in training mode normalises each record with statistics of the whole
batch and updates its running statistics from private data: neither is a per-record
function, so DP-SGD's per-sample gradients and its guarantee do not hold. An imported
model therefore has every BatchNorm replaced by :class:`FixedBatchNorm2d`, which always
normalises with the pretrained running statistics (stored, never updated) whether the
model is in training or evaluation mode. Its scale and shift (``weight``, ``bias``) may
still train, with per-sample gradients from :func:`_fixed_batchnorm_grad_sample`
(registered with Opacus here). The state-dict names are BatchNorm's, without
``num_batches_tracked``.

:func:`to_groupnorm` is the other choice: Opacus's ``ModuleValidator.fix`` replaces the
BatchNorm layers of chosen stages by freshly initialised GroupNorm (the pretrained scale,
shift and statistics are lost there). :func:`batch_statistics` gives non-private
pretraining (the coordinator's own source data) ordinary BatchNorm for its duration.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from opacus.grad_sample import register_grad_sampler
from torch import nn
from torch.nn import functional as F

from common.errors import ConfigurationError


class LayerNotPrivate(ConfigurationError):
    """A trainable layer cannot get exact per-sample gradients (it holds statistics it would update)."""


class FixedBatchNorm2d(nn.Module):
    """BatchNorm2d that always normalises with its stored running statistics (a per-record function)."""

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    @classmethod
    def from_batchnorm(cls, bn: nn.BatchNorm2d) -> FixedBatchNorm2d:
        fixed = cls(bn.num_features, bn.eps)
        with torch.no_grad():
            if bn.affine:
                fixed.weight.copy_(bn.weight)
                fixed.bias.copy_(bn.bias)
            if bn.running_mean is not None:
                fixed.running_mean.copy_(bn.running_mean)
                fixed.running_var.copy_(bn.running_var)
        return fixed

    def normalised(self, x: torch.Tensor) -> torch.Tensor:
        shape = (1, -1, 1, 1)
        return (x - self.running_mean.view(shape)) * torch.rsqrt(self.running_var.view(shape) + self.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, statistics fixed"


@register_grad_sampler(FixedBatchNorm2d)
def _fixed_batchnorm_grad_sample(
    layer: FixedBatchNorm2d, activations: list[torch.Tensor], backprops: torch.Tensor
) -> dict[nn.Parameter, torch.Tensor]:
    """Per-sample gradients of the scale and shift: y = weight * x_hat + bias, per channel."""
    samples = {}
    if layer.weight.requires_grad:
        samples[layer.weight] = (backprops * layer.normalised(activations[0])).sum(dim=(2, 3))
    if layer.bias.requires_grad:
        samples[layer.bias] = backprops.sum(dim=(2, 3))
    return samples


def fix_batchnorm(module: nn.Module) -> int:
    """Replace every ``nn.BatchNorm2d`` inside ``module`` by a :class:`FixedBatchNorm2d` in place; return how many."""
    replaced = 0
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            setattr(module, name, FixedBatchNorm2d.from_batchnorm(child))
            replaced += 1
        else:
            replaced += fix_batchnorm(child)
    return replaced


def to_groupnorm(module: nn.Module) -> nn.Module:
    """Opacus's ``ModuleValidator.fix``: every BatchNorm in ``module`` becomes a fresh GroupNorm."""
    from opacus.validators import ModuleValidator

    return ModuleValidator.fix(module)


@contextmanager
def batch_statistics(model: nn.Module) -> Iterator[None]:
    """Ordinary BatchNorm (batch statistics, running statistics updated) for non-private training only.

    Each :class:`FixedBatchNorm2d` is swapped for an ``nn.BatchNorm2d`` sharing its tensors, so
    what the block learns lands in the fixed layers, which are put back on exit.
    """
    swapped: list[tuple[nn.Module, str, FixedBatchNorm2d]] = []
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, FixedBatchNorm2d):
                bn = nn.BatchNorm2d(child.num_features, eps=child.eps)
                bn.weight, bn.bias = child.weight, child.bias
                bn.running_mean, bn.running_var = child.running_mean, child.running_var
                setattr(parent, name, bn)
                swapped.append((parent, name, child))
    try:
        yield
    finally:
        for parent, name, child in swapped:
            setattr(parent, name, child)


def check_per_sample_layers(module: nn.Module) -> None:
    """Refuse a trainable layer that holds buffers, unless they are a :class:`FixedBatchNorm2d`'s constant statistics.

    Opacus refuses every trainable layer with buffers (a BatchNorm would update its statistics
    from private data); the fixed layers' buffers are never updated, so they alone pass.
    """
    for name, layer in module.named_modules():
        if isinstance(layer, FixedBatchNorm2d):
            continue
        trainable = any(p.requires_grad for p in layer.parameters(recurse=False))
        if trainable and any(True for _ in layer.buffers(recurse=False)):
            raise LayerNotPrivate(
                f"trainable layer {name or type(layer).__name__} ({type(layer).__name__}) keeps statistics of the "
                "data it sees, so DP-SGD cannot train it; freeze it, or import the model again (BatchNorm becomes "
                "FixedBatchNorm2d or GroupNorm)"
            )
