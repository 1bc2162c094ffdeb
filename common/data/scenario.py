"""What a transfer-learning scenario is: a source domain for pretraining, target sites, a model."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from sklearn.model_selection import train_test_split

from common.data.site_data import SiteData, Split
from common.errors import ConfigurationError

ARCHITECTURES = ("logreg", "mlp", "cnn")


class ScenarioError(ConfigurationError):
    """A scenario name is unknown or a scenario file is incomplete or inconsistent."""


@dataclass(frozen=True)
class ModelSpec:
    """The model architecture of a scenario and its keyword arguments."""

    arch: str
    args: dict = field(default_factory=dict)


@dataclass(frozen=True, eq=False)
class Scenario:
    """A transfer-learning scenario: optional source domain, target sites, model and policy."""

    name: str
    description: str
    source: SiteData | None
    sites: tuple[SiteData, ...]
    input_shape: tuple[int, ...]
    class_names: tuple[str, ...]
    feature_names: tuple[str, ...] | None
    model: ModelSpec
    transfer_policy: str
    source_description: str
    preprocessing: str
    #: Built-in generated or bundled public data: the only data a run may train on with reproducible
    #: (seeded, NOT private) noise, and only when asked.
    public_data: bool = False
    #: Pretraining options that differ from the defaults (common.model.pretrain_settings.PretrainConfig).
    pretrain: dict = field(default_factory=dict)
    #: Run settings (RunSettings field names) that make transfer work best on this scenario, as chosen on
    #: validation splits by ``fedtransfer bench transfer``; ``fedtransfer simulate`` applies those the user
    #: did not set.
    recipe: dict = field(default_factory=dict)
    #: The licence of the data (and so of the source model pretrained on it), recorded in the model card.
    data_licence: str = ""


def standardise(site: SiteData, mean: np.ndarray, std: np.ndarray) -> SiteData:
    return SiteData(
        site.name,
        Split((site.train.x - mean) / std, site.train.y),
        Split((site.test.x - mean) / std, site.test.y),
    )


def stratified(name: str, x: np.ndarray, y: np.ndarray, test_fraction: float, seed: int) -> SiteData:
    train, test = train_test_split(np.arange(len(y)), test_size=test_fraction, stratify=y, random_state=seed)
    return SiteData(name, Split(x[train], y[train]), Split(x[test], y[test]))
