"""DP-SGD fine-tuning of the trainable part with Opacus, one fresh PrivacyEngine per round.

The engine's accountant starts from a deep copy of the dataset's earlier history, so the
epsilon it reports after the round is the composition over everything the dataset ever
spent. Batches are Poisson-sampled; an empty batch makes no update but still counts as
a step in the returned step count, which the ledger records (a conservative count).
"""

from __future__ import annotations

import copy
import math
import secrets
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from opacus import PrivacyEngine
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from common.privacy.accounting import Step
from common.model.training import TrainConfig, make_optimizer, round_batches


@dataclass(frozen=True)
class DPStats:
    """What one DP round did: ``steps`` sampled batches (empty ones included), at ``sample_rate``."""

    steps: int
    updates: int
    examples: int
    mean_loss: float
    sample_rate: float
    engine_history: list[tuple[float, float, int]]


def sample_rate_and_steps(examples: int, batch_size: int, epochs: int, local_steps: int = 0) -> tuple[float, int]:
    """Opacus's Poisson sample rate (1 / batches per epoch) and the steps one round takes.

    ``local_steps`` > 0 is the round's exact number of sampled batches (``epochs`` is then unused).
    """
    batches = max(1, math.ceil(examples / batch_size))
    return 1.0 / batches, local_steps or batches * epochs


def dp_train(
    trainable: nn.Module,
    features: torch.Tensor,
    labels: torch.Tensor,
    config: TrainConfig,
    noise_multiplier: float,
    max_grad_norm: float,
    prior: Sequence[Step],
    accountant: str,
    noise_seed: int | None = None,
) -> DPStats:
    """Train ``trainable`` in place with DP-SGD on precomputed features.

    ``noise_seed`` makes sampling and noise reproducible and is for simulations only;
    ``None`` (deployment) draws them from the operating system's randomness, which the
    coordinator cannot predict.
    """
    seed = secrets.randbits(63) if noise_seed is None else noise_seed
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(TensorDataset(features, labels), batch_size=config.batch_size, generator=generator)
    optimizer = make_optimizer([p for p in trainable.parameters() if p.requires_grad], config)
    anchor = {n: p.detach().clone() for n, p in trainable.named_parameters()}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Secure RNG turned off.*")
        engine = PrivacyEngine(accountant=accountant)
        engine.accountant.history = copy.deepcopy([(s.noise_multiplier, s.sample_rate, s.steps) for s in prior])
        module, dp_optimizer, dp_loader = engine.make_private(
            module=trainable,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm,
            poisson_sampling=True,
            noise_generator=generator,
        )
    loss_fn = nn.CrossEntropyLoss()
    module.train()
    steps = updates = 0
    total = 0.0
    for x, y in round_batches(lambda: dp_loader, config):  # Poisson sampling: every pass yields its batches, some empty
        steps += 1
        if len(y) == 0:
            continue
        dp_optimizer.zero_grad()
        loss = loss_fn(module(x), y)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*Full backward hook is firing.*")
            loss.backward()
        dp_optimizer.step()
        if config.proximal_mu > 0:
            _proximal_pull(trainable, anchor, config.lr * config.proximal_mu)
        updates += 1
        total += float(loss.detach())
    module.remove_hooks()
    return DPStats(
        steps=steps,
        updates=updates,
        examples=len(labels),
        mean_loss=total / max(updates, 1),
        sample_rate=dp_loader.sample_rate,
        engine_history=copy.deepcopy(engine.accountant.history),
    )


@torch.no_grad()
def _proximal_pull(module: nn.Module, anchor: dict[str, torch.Tensor], rate: float) -> None:
    """FedProx's pull towards the global weights, applied after the private step (post-processing)."""
    for name, param in module.named_parameters():
        param.sub_(rate * (param - anchor[name]))
