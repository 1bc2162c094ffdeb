"""Source-domain pretraining: the coordinator's model before any site touches it.

The source data is the coordinator's own (public, or one consenting hospital's), so its
labels may be counted: their class mix goes into the model card as the public prior of
class-weighted fine-tuning. Part of the source training split is held out for validation:
training keeps the epoch with the best validation score (early stopping), and the card
records the validation and test metrics.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.model_selection import train_test_split

from common.data.scenario import Scenario
from common.model.batchnorm import batch_statistics
from common.model.checkpoint import ModelCard, save_checkpoint
from common.model.metrics import classification_metrics, headline_metric
from common.model.pretrain_settings import PretrainConfig
from common.model.training import (
    TrainConfig,
    as_tensors,
    example_losses,
    label_prior,
    make_optimizer,
    predict_proba,
    shuffled_batches,
)
from common.model.zoo import FedModel, build_model

log = logging.getLogger(__name__)


def _split(y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Train and validation indices, stratified when every class has two rows or more."""
    indices = np.arange(len(y))
    if fraction <= 0 or len(y) < 10:
        return indices, indices[:0]
    stratify = y if np.bincount(y).min(initial=len(y)) >= 2 else None
    train, validation = train_test_split(indices, test_size=fraction, stratify=stratify, random_state=seed)
    return np.sort(train), np.sort(validation)


def _score(model: FedModel, x: np.ndarray, y: np.ndarray) -> dict[str, float]:
    return classification_metrics(y, predict_proba(model, as_tensors(x, y)[0]))


def fit_source(
    model: FedModel, x: np.ndarray, y: np.ndarray, config: PretrainConfig, seed: int, num_classes: int
) -> dict[str, Any]:
    """Train ``model`` in place on the source rows; keep the epoch with the best validation score."""
    train, validation = _split(np.asarray(y), config.validation_fraction, seed)
    prior = label_prior(y[train], num_classes)
    loss_config = TrainConfig(
        epochs=1,
        batch_size=config.batch_size,
        lr=config.lr,
        optimizer=config.optimizer,
        seed=seed,
        class_weights=config.class_weights,
        class_prior=prior if config.class_weights != "none" else (),
    )
    tx, ty = as_tensors(x[train], y[train])
    optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad], loss_config)
    generator = torch.Generator().manual_seed(seed)
    metric = headline_metric(num_classes)
    best: tuple[float, float] | None = None
    best_state, best_epoch, stale = copy.deepcopy(model.state_dict()), 0, 0
    for epoch in range(1, config.epochs + 1):
        model.train()
        for batch in shuffled_batches(len(ty), loss_config, generator):
            optimizer.zero_grad()
            example_losses(model(tx[batch]), ty[batch], loss_config).mean().backward()
            optimizer.step()
        if not len(validation):
            best_state, best_epoch = copy.deepcopy(model.state_dict()), epoch
            continue
        scores = _score(model, x[validation], y[validation])
        value = scores[metric] if not math.isnan(scores[metric]) else scores["balanced-accuracy"]
        key = (value, -scores["loss"])
        if best is None or key > best:
            best, best_state, best_epoch, stale = key, copy.deepcopy(model.state_dict()), epoch, 0
        else:
            stale += 1
            if config.patience and stale >= config.patience:
                break
    model.load_state_dict(best_state)
    result: dict[str, Any] = {
        "train_examples": int(len(train)),
        "validation_examples": int(len(validation)),
        "epochs_trained": epoch,
        "best_epoch": best_epoch,
        "class_prior": list(label_prior(y, num_classes)),
    }
    if len(validation):
        result["source_validation"] = _score(model, x[validation], y[validation])
    return result


def no_better_than_prior(metrics: Mapping[str, float]) -> bool:
    """Whether a model does no better than always predicting the majority class (or guessing)."""
    auc, balanced = metrics.get("roc-auc", math.nan), metrics.get("balanced-accuracy", math.nan)
    return (math.isnan(auc) or auc <= 0.55) and (math.isnan(balanced) or balanced <= 0.55)


def pretrain_source(
    scenario: Scenario, out_dir: Path, seed: int = 0, overrides: Mapping[str, Any] | None = None
) -> ModelCard:
    """Train the scenario's model on its source domain and write a checkpoint to ``out_dir``.

    A scenario without a source domain gets a seeded random initialisation instead (the
    card says so, and comparisons call it the initial model, not a source model).
    """
    torch.manual_seed(seed)
    num_classes = len(scenario.class_names)
    model = build_model(scenario.model.arch, scenario.input_shape, num_classes, scenario.model.args)
    lineage: dict[str, Any] = {"kind": "pretrained", "scenario": scenario.name, "seed": seed}
    prior = None
    if scenario.source is None:
        lineage["kind"] = "random-init"
        description = "no source domain: seeded random initialisation"
    else:
        config = PretrainConfig.for_scenario(scenario, overrides)
        source = scenario.source
        with batch_statistics(model):  # the coordinator's own source data: no DP, ordinary BatchNorm
            fitted = fit_source(model, source.train.x, source.train.y, config, seed, num_classes)
        prior = fitted.pop("class_prior")
        lineage.update(fitted, pretrain=config.__dict__, source_test=_score(model, source.test.x, source.test.y))
        description = scenario.source_description
        judged = lineage.get("source_validation", lineage["source_test"])
        if no_better_than_prior(judged):
            lineage["warning"] = "the source model does no better than the class prior on its validation split"
            log.warning(
                "the source model of %s does no better than the class prior (validation AUC %.3f, balanced "
                "accuracy %.3f): transfer from it is unlikely to help; tune [pretrain] (epochs, lr, class_weights)",
                scenario.name,
                judged["roc-auc"],
                judged["balanced-accuracy"],
            )
        log.info(
            "pretrained %s on %d source rows (best epoch %d of %d): source test AUC %.3f, balanced accuracy %.3f",
            scenario.model.arch,
            fitted["train_examples"],
            fitted["best_epoch"],
            fitted["epochs_trained"],
            lineage["source_test"]["roc-auc"],
            lineage["source_test"]["balanced-accuracy"],
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
        class_prior=prior,
        licence=scenario.data_licence,
        pretraining_data=description,
        lineage=lineage,
    )
