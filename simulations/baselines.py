"""Reference points for a simulated run, on the same sites and the same base model.

source as-is (no adaptation), local-only fine-tuning (each site alone, same number of
epochs as the whole federated run), and pooled fine-tuning (all target sites' training
data in one place, the usual upper bound). These baselines train without DP.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from common.data.scenario import Scenario
from common.data.site_data import SiteData
from common.model.metrics import classification_metrics
from common.model.training import (
    TrainConfig,
    as_tensors,
    compute_features,
    predict_proba,
    train_plain,
)
from common.model.transfer import TransferPolicy
from common.model.zoo import FedModel


@dataclass(frozen=True)
class Baselines:
    """Per-site metrics of each baseline: ``{method: {site: metrics}}``."""

    per_site: dict[str, dict[str, dict[str, float]]]


def _fit(base: FedModel, transfer: TransferPolicy, x: torch.Tensor, y: torch.Tensor, config: TrainConfig) -> FedModel:
    model = copy.deepcopy(base)
    transfer.apply(model)
    frozen, trainable = transfer.split(model)
    train_plain(trainable, compute_features(frozen, x), y, config)
    return model


def _score(model: FedModel, site: SiteData) -> dict[str, float]:
    x, _ = as_tensors(site.test.x, site.test.y)
    return classification_metrics(site.test.y, predict_proba(model, x))


def compute_baselines(scenario: Scenario, base: FedModel, transfer: TransferPolicy, config: TrainConfig) -> Baselines:
    """Score source as-is, local-only and pooled fine-tuning on every target site's test split."""
    sites = scenario.sites
    source = {s.name: _score(base, s) for s in sites}
    local = {}
    for site in sites:
        x, y = as_tensors(site.train.x, site.train.y)
        local[site.name] = _score(_fit(base, transfer, x, y, config), site)
    px = torch.cat([as_tensors(s.train.x, s.train.y)[0] for s in sites])
    py = torch.cat([as_tensors(s.train.x, s.train.y)[1] for s in sites])
    pooled_model = _fit(base, transfer, px, py, config)
    pooled = {s.name: _score(pooled_model, s) for s in sites}
    return Baselines({"source as-is": source, "local-only": local, "pooled": pooled})
