"""DP-SGD fine-tuning of the trainable part, with Opacus's per-sample gradients and clipping.

Each step draws a Poisson batch (every record independently with the sample rate), has
Opacus compute and clip every record's gradient (``GradSampleModule`` and ``DPOptimizer``),
adds Gaussian noise of standard deviation ``noise_multiplier x max_grad_norm`` and divides
by the expected batch size. Every step adds noise, an empty batch included (its clipped
sum is zero, so the step moves the weights by noise alone): exactly what the accountant
counts. Sampling and noise come from a :class:`~common.privacy.noise.RandomSource`: the
operating system's CSPRNG at every real site.

The sample rate is set from public values (the batch size and the site's declared size),
never from the exact number of records.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer
from torch import nn

from common.model.batchnorm import check_per_sample_layers
from common.model.training import TrainConfig, example_losses, make_optimizer
from common.privacy.noise import RandomSource, poisson_sample


@dataclass(frozen=True)
class DPStats:
    """What one DP round did: ``steps`` noised steps (empty batches included), ``updates`` of them non-empty.

    ``mean_loss`` is for the site's own log only: it is computed on private batches and never leaves.
    """

    steps: int
    updates: int
    mean_loss: float
    sample_rate: float
    noise: str


def sample_rate_and_steps(declared_size: int, batch_size: int, epochs: int, local_steps: int = 0) -> tuple[float, int]:
    """The Poisson sample rate (1 / batches per epoch of the declared size) and the steps one round takes.

    Both come from public values: the site's declared size, the coordinator's batch size,
    epochs and ``local_steps`` (> 0: the round's exact number of steps; ``epochs`` is then unused).
    """
    batches = max(1, math.ceil(declared_size / batch_size))
    return 1.0 / batches, local_steps or batches * epochs


class _SourcedDPOptimizer(DPOptimizer):
    """Opacus's DPOptimizer with its Gaussian noise drawn from a :class:`RandomSource`."""

    def __init__(self, *args, source: RandomSource, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.source = source
        self.noise_draws = 0

    def add_noise(self) -> None:
        std = self.noise_multiplier * self.max_grad_norm
        for p in self.params:
            noise = self.source.normal(tuple(p.summed_grad.shape), std, p.summed_grad.dtype)
            p.grad = (p.summed_grad + noise).view_as(p)
        self.noise_draws += 1


def dp_train(
    trainable: nn.Module,
    features: torch.Tensor,
    labels: torch.Tensor,
    config: TrainConfig,
    *,
    noise_multiplier: float,
    max_grad_norm: float,
    sample_rate: float,
    steps: int,
    expected_batch_size: float,
    source: RandomSource,
) -> DPStats:
    """Train ``trainable`` in place for ``steps`` DP-SGD steps on precomputed features."""
    params = [p for p in trainable.parameters() if p.requires_grad]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Secure RNG turned off.*")
        check_per_sample_layers(trainable)  # Opacus's own check, except for the constants of fixed BatchNorm layers
        module = GradSampleModule(trainable, loss_reduction="sum", strict=False)
        optimizer = _SourcedDPOptimizer(
            make_optimizer(params, config),
            noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm,
            expected_batch_size=max(expected_batch_size, 1e-9),
            loss_reduction="mean",
            source=source,
        )
    anchor = {n: p.detach().clone() for n, p in trainable.named_parameters()}
    module.train()
    updates, total = 0, 0.0
    for _ in range(steps):
        batch = poisson_sample(source, len(labels), sample_rate)
        optimizer.zero_grad()
        if len(batch) == 0:
            for p in params:  # nothing sampled: a zero clipped sum, and the step adds noise all the same
                p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype)
        else:
            loss = example_losses(module(features[batch]), labels[batch], config).sum()
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*Full backward hook is firing.*")
                loss.backward()
            updates += 1
            total += float(loss.detach()) / len(batch)
        optimizer.step()
        if config.proximal_mu > 0:
            _proximal_pull(trainable, anchor, config.lr * config.proximal_mu)
    module.cleanup()
    if optimizer.noise_draws != steps:
        raise RuntimeError(f"DP-SGD added noise in {optimizer.noise_draws} of {steps} steps; refusing the round")
    return DPStats(
        steps=steps, updates=updates, mean_loss=total / max(updates, 1), sample_rate=sample_rate, noise=source.kind
    )


@torch.no_grad()
def _proximal_pull(module: nn.Module, anchor: dict[str, torch.Tensor], rate: float) -> None:
    """FedProx's pull towards the global weights, applied after the private step (post-processing)."""
    for name, param in module.named_parameters():
        param.sub_(rate * (param - anchor[name]))
