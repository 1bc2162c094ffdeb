"""Reference points for a simulated run, on the same sites and the same base model, scored by the simulator.

- **source as-is** (or **initial model** when the scenario has no source: a seeded random
  initialisation): the base model, unadapted;
- **local-only**: each site fine-tunes alone, as long as one site trains over the whole run,
  without DP; **local-only (DP)**: the same with DP-SGD at the run's epsilon and delta (what a
  site could do alone under the same promise);
- **pooled**: all target sites' training data in one place, without DP. It is a reference,
  not a bound: with little data per site or strong shift it can lose to the federated model.

Every model is scored on every site's test split with every metric of
:data:`~common.model.metrics.METRIC_NAMES` and a bootstrap 95% interval (the simulator
holds the test data; a deployed coordinator never does).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from client.dp_training import dp_train, sample_rate_and_steps
from common.data.scenario import Scenario
from common.data.site_data import SiteData
from common.model.metrics import bootstrap_intervals, classification_metrics
from common.model.training import (
    TrainConfig,
    as_tensors,
    compute_features,
    predict_proba,
    train_plain,
)
from common.model.transfer import TransferPolicy
from common.model.zoo import FedModel
from common.privacy.accounting import calibrate_noise
from common.privacy.noise import SeededRandom

NO_SITE_DATA, NOT_PRIVATE = "no site data", "no DP"


@dataclass
class MethodScores:
    """One method's scores: ``sites[site][metric]`` and bootstrap ``intervals[site][metric] = [low, high]``."""

    method: str
    privacy: str
    evaluated_by: str = "simulator"
    sites: dict[str, dict[str, float]] = field(default_factory=dict)
    intervals: dict[str, dict[str, list[float]]] = field(default_factory=dict)

    def add(self, site: str, y_true: np.ndarray, proba: np.ndarray, seed: int) -> None:
        self.sites[site] = {k: v for k, v in classification_metrics(y_true, proba).items() if k != "loss"}
        self.intervals[site] = {k: list(v) for k, v in bootstrap_intervals(y_true, proba, seed=seed).items()}

    def mean(self, metric: str) -> float:
        """Mean over the sites that have a value (a site that declined has none)."""
        values = [m[metric] for m in self.sites.values() if not math.isnan(m.get(metric, math.nan))]
        return float(np.mean(values)) if values else math.nan

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "privacy": self.privacy,
            "evaluated_by": self.evaluated_by,
            "sites": self.sites,
            "intervals": self.intervals,
        }


@dataclass(frozen=True)
class PrivateBaseline:
    """The DP promise of the run a DP local-only baseline keeps: epsilon and delta over the whole run."""

    epsilon: float
    delta: float
    max_grad_norm: float
    accountant: str = "pld"


def _fit(base: FedModel, transfer: TransferPolicy, x: torch.Tensor, y: torch.Tensor, config: TrainConfig) -> FedModel:
    model = copy.deepcopy(base)
    transfer.apply(model)
    frozen, trainable = transfer.split(model)
    train_plain(trainable, compute_features(frozen, x), y, config)
    return model


def _fit_private(
    base: FedModel, transfer: TransferPolicy, site: SiteData, config: TrainConfig, promise: PrivateBaseline
) -> FedModel:
    """DP-SGD on one site alone, calibrated so the whole fit spends the run's epsilon (seeded noise: a baseline)."""
    model = copy.deepcopy(base)
    transfer.apply(model)
    frozen, trainable = transfer.split(model)
    x, y = as_tensors(site.train.x, site.train.y)
    sample_rate, steps = sample_rate_and_steps(len(y), config.batch_size, config.epochs, config.steps)
    sigma = calibrate_noise([], sample_rate, steps, promise.epsilon, promise.delta, promise.accountant)
    dp_train(
        trainable,
        compute_features(frozen, x),
        y,
        config,
        noise_multiplier=sigma,
        max_grad_norm=promise.max_grad_norm,
        sample_rate=sample_rate,
        steps=steps,
        expected_batch_size=sample_rate * len(y),
        source=SeededRandom(config.seed),
    )
    return model


def _proba(model: FedModel, site: SiteData) -> np.ndarray:
    return predict_proba(model, as_tensors(site.test.x, site.test.y)[0])


def compute_baselines(
    scenario: Scenario,
    base: FedModel,
    transfer: TransferPolicy,
    config: TrainConfig,
    promise: PrivateBaseline | None = None,
) -> list[MethodScores]:
    """Score the base model, local-only (and, given ``promise``, local-only with DP) and pooled fine-tuning."""
    sites = scenario.sites
    seed = config.seed
    initial = MethodScores("source as-is" if scenario.source is not None else "initial model", NO_SITE_DATA)
    local = MethodScores("local-only", NOT_PRIVATE)
    private = None
    if promise is not None:
        private = MethodScores("local-only (DP)", f"DP, epsilon {promise.epsilon:g}, delta {promise.delta:g}")
    for site in sites:
        initial.add(site.name, site.test.y, _proba(base, site), seed)
        x, y = as_tensors(site.train.x, site.train.y)
        local.add(site.name, site.test.y, _proba(_fit(base, transfer, x, y, config), site), seed)
        if private is not None:
            fitted = _fit_private(base, transfer, site, config, promise)
            private.add(site.name, site.test.y, _proba(fitted, site), seed)
    px = torch.cat([as_tensors(s.train.x, s.train.y)[0] for s in sites])
    py = torch.cat([as_tensors(s.train.x, s.train.y)[1] for s in sites])
    pooled_model = _fit(base, transfer, px, py, config)
    pooled = MethodScores("pooled", NOT_PRIVATE)
    for site in sites:
        pooled.add(site.name, site.test.y, _proba(pooled_model, site), seed)
    return [m for m in (initial, local, private, pooled) if m is not None]
