"""Run settings: every hyper-parameter of a federated run, in one typed record.

The coordinator reads them from the Flower run config (``flwr run``) or from the CLI
(``fedtransfer simulate``). Sites never read the run config: the coordinator sends what
they need in each message's ConfigRecord.
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

from common.errors import ConfigurationError

#: Which rounds the sites are asked to evaluate (each evaluation is a DP release at the site).
FEDERATED_EVALUATION = ("last", "every", "none")
STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedyogi", "fedadagrad", "fedmedian", "fedtrimmedavg", "krum")
#: Flower's server-side optimisers; only they read server-lr, server-tau and server-beta-2.
SERVER_OPTIMISERS = ("fedadam", "fedyogi", "fedadagrad")
#: "sgd" has momentum 0.9, "sgd-plain" none (FLamby's client optimizer).
OPTIMIZERS = ("sgd", "sgd-plain", "adam")


class SettingsError(ConfigurationError, ValueError):
    """A run setting has the wrong type or an impossible value."""


@dataclass(frozen=True)
class RunSettings:
    """What the coordinator runs. Field names map to run-config keys with ``-`` for ``_``."""

    scenario: str = "wdbc"
    num_server_rounds: int = 3
    local_epochs: int = 2
    local_steps: int = 0
    batch_size: int = 16
    lr: float = 0.05
    optimizer: str = "sgd"
    strategy: str = "fedavg"
    proximal_mu: float = 0.01
    server_lr: float = 0.0
    server_tau: float = 0.0
    server_beta_2: float = 0.0
    policy: str = ""
    checkpoint: str = ""
    seed: int = 0
    out: str = "fedtransfer-runs/latest"
    sim_root: str = ""
    data_dir: str = ""
    min_sites: int = 2
    expected_sites: int = 0
    personalise_epochs: int = 2
    personalise_fraction: float = 0.0
    personalise_lr: float = 0.0
    round_timeout: float = 600.0
    coordinator_keys: str = ""
    manifest: str = ""
    max_update_norm: float = 0.0
    dp: bool = True
    target_epsilon: float = 3.0
    delta: float = 1e-5
    max_grad_norm: float = 1.0
    resume: bool = False
    federated_evaluation: str = "last"
    release_loss: bool = False
    reproducible_noise: bool = False
    per_site_scaling: bool = False

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise SettingsError(f"strategy {self.strategy!r} is not one of {', '.join(STRATEGIES)}")
        if self.num_server_rounds < 1:
            raise SettingsError("num-server-rounds must be at least 1")
        if self.local_epochs < 1 or self.batch_size < 1 or not self.lr > 0:
            raise SettingsError("local-epochs and batch-size must be >= 1 and lr > 0")
        if self.min_sites < 1:
            raise SettingsError("min-sites must be at least 1")
        numbers = {
            "lr": self.lr,
            "proximal-mu": self.proximal_mu,
            "round-timeout": self.round_timeout,
            "max-update-norm": self.max_update_norm,
            "target-epsilon": self.target_epsilon,
            "delta": self.delta,
            "max-grad-norm": self.max_grad_norm,
        }
        for key, value in numbers.items():
            if not math.isfinite(value) or value < 0:
                raise SettingsError(f"{key} must be a finite number >= 0, got {value!r}")
        if self.expected_sites < 0 or self.personalise_epochs < 0:
            raise SettingsError("expected-sites and personalise-epochs must be >= 0")
        # personalise-fraction: share of a private run's budget kept for its private personalisation (0: none)
        if not (math.isfinite(self.personalise_fraction) and 0 <= self.personalise_fraction < 1):
            raise SettingsError(f"personalise-fraction must be in [0, 1), got {self.personalise_fraction!r}")
        if not (math.isfinite(self.personalise_lr) and self.personalise_lr >= 0):
            raise SettingsError(f"personalise-lr must be >= 0 (0: the run's lr), got {self.personalise_lr!r}")
        if self.local_steps < 0:
            raise SettingsError(
                f"local-steps must be >= 0 (0 trains local-epochs whole epochs), got {self.local_steps}"
            )
        if self.optimizer not in OPTIMIZERS:
            raise SettingsError(f"optimizer {self.optimizer!r} is not one of {', '.join(OPTIMIZERS)}")
        self._check_server_optimiser()
        if self.per_site_scaling and self.dp:
            raise SettingsError(
                "per-site-scaling (FLamby's per-centre z-scoring from each site's own records) is for "
                "non-private reproduction runs only: it needs dp = false"
            )
        if self.federated_evaluation not in FEDERATED_EVALUATION:
            raise SettingsError(
                f"federated-evaluation {self.federated_evaluation!r} is not one of {', '.join(FEDERATED_EVALUATION)}"
            )
        if (
            not self.round_timeout > 0
            or not self.target_epsilon > 0
            or not 0 < self.delta < 1
            or not self.max_grad_norm > 0
        ):
            raise SettingsError("round-timeout, target-epsilon and max-grad-norm must be > 0 and delta in (0, 1)")

    def _check_server_optimiser(self) -> None:
        """server-lr, server-tau and server-beta-2: 0 keeps Flower's default for the strategy."""
        chosen = {"server-lr": self.server_lr, "server-tau": self.server_tau, "server-beta-2": self.server_beta_2}
        for key, value in chosen.items():
            if not math.isfinite(value) or value < 0:
                raise SettingsError(f"{key} must be a finite number >= 0 (0 keeps Flower's default), got {value!r}")
        if self.server_beta_2 >= 1:
            raise SettingsError(f"server-beta-2 must be in [0, 1), got {self.server_beta_2!r}")
        used = [key for key, value in chosen.items() if value > 0]
        if used and self.strategy not in SERVER_OPTIMISERS:
            raise SettingsError(
                f"{', '.join(used)} only apply to {', '.join(SERVER_OPTIMISERS)}, not strategy {self.strategy!r}"
            )
        if self.server_beta_2 > 0 and self.strategy == "fedadagrad":
            raise SettingsError("server-beta-2 does not apply to fedadagrad (it sums squared updates)")

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> RunSettings:
        """Build settings from a Flower run config; unknown keys are an error."""
        by_key = {f.name.replace("_", "-"): f for f in fields(cls)}
        unknown = sorted(set(run_config) - set(by_key))
        if unknown:
            raise SettingsError(f"unknown run-config keys {unknown}; known keys: {sorted(by_key)}")
        values: dict[str, Any] = {}
        for key, value in run_config.items():
            field = by_key[key]
            kind = type(getattr(cls(), field.name))
            # int(2.5) and int(True) would silently become 2 and 1; int(inf) raises OverflowError
            if (isinstance(value, bool) and kind is not bool) or (
                kind is int and isinstance(value, float) and not value.is_integer()
            ):
                raise SettingsError(f"run-config key {key!r} must be {kind.__name__}, got {value!r}")
            try:
                values[field.name] = kind(value)
            except (TypeError, ValueError) as err:
                raise SettingsError(f"run-config key {key!r} must be {kind.__name__}, got {value!r}") from err
        return cls(**values)

    def with_(self, **changes: Any) -> RunSettings:
        return replace(self, **changes)

    def as_run_config(self) -> dict[str, Any]:
        """The settings as Flower run-config keys (``-`` for ``_``)."""
        return {f.name.replace("_", "-"): getattr(self, f.name) for f in fields(self)}

    def with_run_config(self, run_config: Mapping[str, Any]) -> RunSettings:
        """These settings with some run-config keys changed; unknown keys and bad values are a SettingsError."""
        return RunSettings.from_run_config(self.as_run_config() | dict(run_config))


def parse_assignments(texts: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` pairs with TOML values (``local-steps=100``, ``optimizer="sgd-plain"``; bare words are strings)."""
    parsed: dict[str, Any] = {}
    for text in texts:
        key, sep, value = text.partition("=")
        if not sep or not key.strip():
            raise SettingsError(f"{text!r} is not KEY=VALUE (e.g. local-steps=100)")
        try:
            parsed[key.strip()] = tomllib.loads(f"value = {value.strip()}")["value"]
        except tomllib.TOMLDecodeError:
            parsed[key.strip()] = value.strip()
    return parsed
