"""Plain fine-tuning of the trainable part at a site, and the site's view of a model on its test split."""

from __future__ import annotations

import copy
import logging

import numpy as np

from client.local_data import Features
from common.model.checkpoint import ModelCard
from common.model.metrics import evaluation_counts
from common.model.training import TrainConfig, TrainStats, predict_proba, train_plain
from common.model.transfer import TransferPolicy
from common.model.zoo import FedModel
from common.privacy.policy import SitePolicy
from common.protocol import RoundInstruction

log = logging.getLogger(__name__)


def class_prior(policy: SitePolicy, card: ModelCard) -> tuple[float, ...]:
    """The public class mix a class-weighted loss uses: the site's declaration, else the source's (model card)."""
    for prior in (policy.declared_class_prior, card.class_prior):
        if prior and len(prior) == card.num_classes:
            return tuple(prior)
    return ()


def train_config(
    instruction: RoundInstruction, prior: tuple[float, ...] = (), epochs: int | None = None
) -> TrainConfig:
    """The round's local training; ``epochs`` (personalisation) trains whole epochs instead of local-steps.

    A class-weighted loss needs a public prior; without one the site trains unweighted and says so.
    """
    weights = instruction.class_weights if prior else "none"
    if instruction.class_weights != "none" and not prior:
        log.warning(
            "class-weights %s asked for, but neither the site's policy (declared_class_prior) nor the model card "
            "gives a class prior: training unweighted",
            instruction.class_weights,
        )
    return TrainConfig(
        class_weights=weights,
        class_prior=prior if weights != "none" else (),
        epochs=instruction.local_epochs if epochs is None else epochs,
        steps=instruction.local_steps if epochs is None else 0,
        batch_size=instruction.batch_size,
        lr=instruction.lr if epochs is None or instruction.personalise_lr <= 0 else instruction.personalise_lr,
        optimizer=instruction.optimizer,
        proximal_mu=instruction.proximal_mu if epochs is None else 0.0,
        seed=instruction.seed * 100_003 + instruction.server_round,
    )


def fine_tune(model: FedModel, transfer: TransferPolicy, features: Features, config: TrainConfig) -> TrainStats:
    """Train the trainable part in place (its parameters that require gradients) on the frozen-prefix features."""
    _, trainable = transfer.split(model)
    return train_plain(trainable, features.train_x, features.train_y, config)


def evaluation_histogram(model: FedModel, transfer: TransferPolicy, features: Features) -> np.ndarray:
    """The exact evaluation histogram of ``model`` on the test split; it leaves only with noise (or not at all)."""
    _, trainable = transfer.split(model)
    return evaluation_counts(features.test_y.numpy(), predict_proba(trainable, features.test_x))


def personalised_copy(model: FedModel, bias_only: bool) -> FedModel:
    """A private copy of ``model`` whose head alone (or only its bias, under DP) will train."""
    local = copy.deepcopy(model)
    for name, param in local.named_parameters():
        param.requires_grad_(name == "head.bias" if bias_only else name.startswith("head."))
    return local
