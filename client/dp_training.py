"""DP-SGD fine-tuning of the trainable part, with Opacus's per-sample gradients and clipping.

Each step draws a Poisson batch (every record independently with the sample rate), has
Opacus compute and clip every record's gradient, adds Gaussian noise of standard deviation
``noise_multiplier x max_grad_norm`` and divides by the expected batch size. Every step adds
noise, an empty batch included (its clipped sum is zero, so the step moves the weights by
noise alone): exactly what the accountant counts. Sampling and noise come from a
:class:`~common.privacy.noise.RandomSource`: the operating system's CSPRNG at every real site.

Opacus offers several ways to get the clipped per-record gradients (its *grad-sample modes*):
backward hooks (``hooks``), PyTorch's expanded weights (``ew``), ``torch.func`` (``functorch``)
and ghost clipping (``ghost``: per-record gradient norms without materialising the per-record
gradients, then a second backward pass of the clipped loss). They compute the same clipped sum;
:func:`grad_sample_mode` picks, per trainable part, the one ``fedtransfer bench dp`` measured
fastest, and the site reports it.

The sample rate is set from public values (the batch size and the site's declared size),
never from the exact number of records.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Literal

import torch
from opacus import GradSampleModule
from opacus.grad_sample import GradSampleModuleExpandedWeights, GradSampleModuleFastGradientClipping
from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping
from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping
from torch import nn

from common.model.batchnorm import check_per_sample_layers
from common.model.training import TrainConfig, example_losses, make_optimizer
from common.privacy.noise import RandomSource, poisson_sample

GradSampleMode = Literal["hooks", "ew", "functorch", "ghost"]
GRAD_SAMPLE_MODES: tuple[GradSampleMode, ...] = ("hooks", "ew", "functorch", "ghost")
#: Layers PyTorch's expanded weights compute per-record gradients for (``torch.nn.utils._expanded_weights``).
_EXPANDED_WEIGHT_LAYERS = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.Embedding,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.InstanceNorm3d,
)


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
    grad_sample_mode: str = "hooks"


def sample_rate_and_steps(declared_size: int, batch_size: int, epochs: int, local_steps: int = 0) -> tuple[float, int]:
    """The Poisson sample rate (1 / batches per epoch of the declared size) and the steps one round takes.

    Both come from public values: the site's declared size, the coordinator's batch size,
    epochs and ``local_steps`` (> 0: the round's exact number of steps; ``epochs`` is then unused).
    """
    batches = max(1, math.ceil(declared_size / batch_size))
    return 1.0 / batches, local_steps or batches * epochs


def grad_sample_mode(trainable: nn.Module) -> GradSampleMode:
    """Opacus's grad-sample mode for ``trainable``, as ``fedtransfer bench dp`` measured it.

    Expanded weights were the fastest on every model of the zoo and transfer policy measured (backward
    hooks next, within a few tens of percent; ``torch.func`` and ghost clipping slower at these
    sizes); hooks wherever a trainable layer is one expanded weights cannot handle.
    """
    training = [m for m in trainable.modules() if any(p.requires_grad for p in m.parameters(recurse=False))]
    return "ew" if all(type(m) in _EXPANDED_WEIGHT_LAYERS for m in training) else "hooks"


class _SourcedNoise:
    """Noise from a :class:`RandomSource`, one draw covering every parameter per step; the noised sum is
    divided by the expected batch size. Mixed into Opacus's optimizers (``params``, ``summed_grad``)."""

    params: list[nn.Parameter]
    noise_multiplier: float
    max_grad_norm: float
    expected_batch_size: float

    def __init__(self, *args, source: RandomSource, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.source = source
        self.noise_draws = 0

    def add_noise(self) -> None:
        sums = [p.summed_grad for p in self.params]
        sizes = [s.numel() for s in sums]
        noise = self.source.normal((sum(sizes),), self.noise_multiplier * self.max_grad_norm, sums[0].dtype)
        for p, summed, part in zip(self.params, sums, torch.split(noise, sizes)):
            p.grad = (summed + part.view_as(summed).to(summed.dtype)).view_as(p)
        self.noise_draws += 1

    def scale_grad(self) -> None:
        for p in self.params:
            p.grad /= self.expected_batch_size


class _SourcedDPOptimizer(_SourcedNoise, DPOptimizer):
    """Opacus's DPOptimizer (clips the per-record gradients it is given) with our noise."""


class _SourcedGhostOptimizer(_SourcedNoise, DPOptimizerFastGradientClipping):
    """Opacus's optimizer for ghost clipping (receives the clipped sum in ``p.grad``) with our noise."""


class _ExampleLoss(nn.Module):
    """:func:`example_losses` as a loss module whose ``reduction`` Opacus may set (ghost clipping asks "none")."""

    def __init__(self, config: TrainConfig) -> None:
        super().__init__()
        self.config = config
        self.reduction = "sum"

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        losses = example_losses(logits, labels, self.config)
        return losses if self.reduction == "none" else losses.sum() if self.reduction == "sum" else losses.mean()


class _PrivateStep:
    """One trainable part wrapped for a grad-sample mode: the clipped-sum backward of a batch, or of none."""

    def __init__(
        self,
        trainable: nn.Module,
        config: TrainConfig,
        mode: GradSampleMode,
        noise_multiplier: float,
        max_grad_norm: float,
        expected_batch_size: float,
        source: RandomSource,
    ) -> None:
        self.mode = mode
        self.params = [p for p in trainable.parameters() if p.requires_grad]
        loss_fn = _ExampleLoss(config)
        settings = dict(
            noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm,
            expected_batch_size=max(expected_batch_size, 1e-9),
            loss_reduction="sum",
            source=source,
        )
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*Secure RNG turned off.*")
            if mode == "ghost":
                self.module = GradSampleModuleFastGradientClipping(
                    trainable, loss_reduction="sum", max_grad_norm=max_grad_norm, use_ghost_clipping=True
                )
                self.optimizer = _SourcedGhostOptimizer(make_optimizer(self.params, config), **settings)
                self.loss_fn = DPLossFastGradientClipping(self.module, self.optimizer, loss_fn, loss_reduction="sum")
            else:
                self.module = (
                    GradSampleModuleExpandedWeights(trainable, loss_reduction="sum")
                    if mode == "ew"
                    else GradSampleModule(
                        trainable, loss_reduction="sum", strict=False, force_functorch=mode == "functorch"
                    )
                )
                self.optimizer = _SourcedDPOptimizer(make_optimizer(self.params, config), **settings)
                self.loss_fn = loss_fn
        self.module.train()

    def backward(self, features: torch.Tensor, labels: torch.Tensor) -> float:
        """The clipped per-record gradients of one non-empty batch, ready for the optimizer; its summed loss."""
        loss = self.loss_fn(self.module(features), labels)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*Full backward hook is firing.*")
            loss.backward()
        return float(loss.detach())

    def nothing_sampled(self) -> None:
        """An empty batch: a zero clipped sum, to which the step adds noise all the same."""
        for p in self.params:
            if self.mode == "ghost":
                p.grad = torch.zeros_like(p)
            else:
                p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype)


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
    mode: GradSampleMode | None = None,
) -> DPStats:
    """Train ``trainable`` in place for ``steps`` DP-SGD steps on precomputed features.

    ``mode`` is Opacus's grad-sample mode (default: :func:`grad_sample_mode`).
    """
    mode = mode or grad_sample_mode(trainable)
    check_per_sample_layers(trainable)  # Opacus's own check, except for the constants of fixed BatchNorm layers
    private = _PrivateStep(trainable, config, mode, noise_multiplier, max_grad_norm, expected_batch_size, source)
    anchor = {n: p.detach().clone() for n, p in trainable.named_parameters()} if config.proximal_mu > 0 else {}
    updates, total = 0, 0.0
    for _ in range(steps):
        batch = poisson_sample(source, len(labels), sample_rate)
        private.optimizer.zero_grad()
        if len(batch) == 0:
            private.nothing_sampled()
        else:
            total += private.backward(features[batch], labels[batch]) / len(batch)
            updates += 1
        private.optimizer.step()
        if config.proximal_mu > 0:
            _proximal_pull(trainable, anchor, config.lr * config.proximal_mu)
    private.module.cleanup()
    draws = private.optimizer.noise_draws
    if draws != steps:
        raise RuntimeError(f"DP-SGD added noise in {draws} of {steps} steps; refusing the round")
    return DPStats(
        steps=steps,
        updates=updates,
        mean_loss=total / max(updates, 1),
        sample_rate=sample_rate,
        noise=source.kind,
        grad_sample_mode=mode,
    )


@torch.no_grad()
def _proximal_pull(module: nn.Module, anchor: dict[str, torch.Tensor], rate: float) -> None:
    """FedProx's pull towards the global weights, applied after the private step (post-processing)."""
    for name, param in module.named_parameters():
        param.sub_(rate * (param - anchor[name]))
