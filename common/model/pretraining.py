"""Source-domain pretraining: the coordinator's model before any site touches it."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from common.data.scenario import Scenario
from common.model.checkpoint import ModelCard, save_checkpoint
from common.model.metrics import classification_metrics
from common.model.training import TrainConfig, as_tensors, predict_proba, train_plain
from common.model.zoo import build_model

log = logging.getLogger(__name__)

TABULAR_PRETRAIN = TrainConfig(epochs=60, batch_size=32, lr=1e-2, optimizer="adam")
IMAGE_PRETRAIN = TrainConfig(epochs=12, batch_size=32, lr=3e-3, optimizer="adam")


def pretrain_source(scenario: Scenario, out_dir: Path, seed: int = 0) -> ModelCard:
    """Train the scenario's model on its source domain and write a checkpoint to ``out_dir``.

    A scenario without a source domain gets a seeded random initialisation instead.
    """
    torch.manual_seed(seed)
    model = build_model(scenario.model.arch, scenario.input_shape, len(scenario.class_names), scenario.model.args)
    lineage: dict = {"kind": "pretrained", "scenario": scenario.name, "seed": seed}
    if scenario.source is None:
        lineage["kind"] = "random-init"
        description = "no source domain: seeded random initialisation"
    else:
        base = IMAGE_PRETRAIN if len(scenario.input_shape) == 3 else TABULAR_PRETRAIN
        config = TrainConfig(**{**base.__dict__, "seed": seed})
        x, y = as_tensors(scenario.source.train.x, scenario.source.train.y)
        stats = train_plain(model, x, y, config)
        xt, _ = as_tensors(scenario.source.test.x, scenario.source.test.y)
        metrics = classification_metrics(scenario.source.test.y, predict_proba(model, xt))
        lineage.update(train_examples=stats.examples, epochs=config.epochs, source_test=metrics)
        description = scenario.source_description
        log.info(
            "pretrained %s on %d source rows: source test accuracy %.3f",
            scenario.model.arch,
            stats.examples,
            metrics["accuracy"],
        )
    return save_checkpoint(
        model,
        out_dir,
        arch=scenario.model.arch,
        arch_args=dict(scenario.model.args),
        input_shape=list(scenario.input_shape),
        class_names=list(scenario.class_names),
        feature_names=list(scenario.feature_names) if scenario.feature_names else None,
        source_description=description,
        preprocessing=scenario.preprocessing,
        default_transfer_policy=scenario.transfer_policy,
        lineage=lineage,
    )
