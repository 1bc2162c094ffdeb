"""Local fine-tuning of the trainable part at a site, and its evaluation."""

from __future__ import annotations

import copy

from common.model.metrics import classification_metrics
from common.model.zoo import FedModel
from common.protocol import RoundInstruction
from common.model.training import TrainConfig, TrainStats, predict_proba, train_plain
from common.model.transfer import TransferPolicy
from client.local_data import Features


def train_config(instruction: RoundInstruction, epochs: int | None = None) -> TrainConfig:
    """The round's local training; ``epochs`` (personalisation) trains whole epochs instead of local-steps."""
    return TrainConfig(
        epochs=instruction.local_epochs if epochs is None else epochs,
        steps=instruction.local_steps if epochs is None else 0,
        batch_size=instruction.batch_size,
        lr=instruction.lr,
        optimizer=instruction.optimizer,
        proximal_mu=instruction.proximal_mu,
        seed=instruction.seed * 100_003 + instruction.server_round,
    )


def fine_tune(model: FedModel, policy: TransferPolicy, features: Features, config: TrainConfig) -> TrainStats:
    """Train the model's trainable part in place on the frozen-prefix features."""
    _, trainable = policy.split(model)
    return train_plain(trainable, features.train_x, features.train_y, config)


def evaluate(model: FedModel, policy: TransferPolicy, features: Features) -> dict[str, float]:
    _, trainable = policy.split(model)
    proba = predict_proba(trainable, features.test_x)
    return classification_metrics(features.test_y.numpy(), proba)


def personalised_metrics(model: FedModel, policy: TransferPolicy, features: Features, config: TrainConfig) -> dict[str, float]:
    """Fine-tune a private copy's head on local data, evaluate it; nothing of it leaves the site."""
    local = copy.deepcopy(model)
    TransferPolicy("head").apply(local)
    _, trainable = policy.split(local)
    head_config = TrainConfig(**{**config.__dict__, "proximal_mu": 0.0})
    train_plain(trainable, features.train_x, features.train_y, head_config)
    metrics = evaluate(local, policy, features)
    return {f"p-{k}": v for k, v in metrics.items()}
