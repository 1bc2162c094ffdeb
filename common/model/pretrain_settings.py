"""How the coordinator pretrains its source model: one record of options with defaults per data kind.

Kept free of torch so the command line can offer these options without loading it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING, Any

from common.errors import ConfigurationError
from common.settings import CLASS_WEIGHTS, OPTIMIZERS

if TYPE_CHECKING:
    from common.data.scenario import Scenario


class PretrainError(ConfigurationError, ValueError):
    """A pretraining option has an impossible value."""


@dataclass(frozen=True)
class PretrainConfig:
    """How the source model is trained; ``patience`` 0 trains every epoch (no early stopping)."""

    epochs: int = 60
    lr: float = 1e-2
    batch_size: int = 32
    optimizer: str = "adam"
    class_weights: str = "none"
    validation_fraction: float = 0.2
    patience: int = 10

    def __post_init__(self) -> None:
        problems = []
        if isinstance(self.epochs, bool) or not isinstance(self.epochs, int) or not 1 <= self.epochs <= 10_000:
            problems.append(f"epochs must be an integer in [1, 10000], got {self.epochs!r}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            problems.append(f"lr must be a number > 0, got {self.lr!r}")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            problems.append(f"batch_size must be an integer >= 1, got {self.batch_size!r}")
        if self.optimizer not in OPTIMIZERS:
            problems.append(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.class_weights not in CLASS_WEIGHTS:
            problems.append(f"class_weights must be one of {', '.join(CLASS_WEIGHTS)}, got {self.class_weights!r}")
        if not (isinstance(self.validation_fraction, (int, float)) and 0 <= self.validation_fraction <= 0.5):
            problems.append(f"validation_fraction must be in [0, 0.5], got {self.validation_fraction!r}")
        if isinstance(self.patience, bool) or not isinstance(self.patience, int) or self.patience < 0:
            problems.append(f"patience must be an integer >= 0, got {self.patience!r}")
        if problems:
            raise PretrainError("; ".join(problems))

    @classmethod
    def for_scenario(cls, scenario: Scenario, overrides: Mapping[str, Any] | None = None) -> PretrainConfig:
        """The default for the scenario's data (images or tables), then its [pretrain] table, then ``overrides``."""
        base = IMAGE_PRETRAIN if len(scenario.input_shape) == 3 else TABULAR_PRETRAIN
        changes = {**scenario.pretrain, **(overrides or {})}
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise PretrainError(f"unknown pretraining option(s) {unknown}; known: {sorted(known)}")
        return replace(base, **changes)


TABULAR_PRETRAIN = PretrainConfig()
IMAGE_PRETRAIN = PretrainConfig(epochs=40, lr=3e-3, patience=8)
