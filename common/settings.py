"""Run settings: every hyper-parameter of a federated run, in one typed record.

The coordinator reads them from the Flower run config (``flwr run``) or from the CLI
(``fedtransfer simulate``). Sites never read the run config: the coordinator sends what
they need in each message's ConfigRecord.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from datetime import datetime
from pathlib import Path
from typing import Any

from common.errors import ConfigurationError

#: Which rounds the sites are asked to evaluate (each evaluation is a DP release at the site).
FEDERATED_EVALUATION = ("last", "every", "none")
STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedyogi", "fedadagrad", "fedmedian", "fedtrimmedavg", "krum")
#: Flower's server-side optimisers; only they read server-lr, server-tau and server-beta-2.
SERVER_OPTIMISERS = ("fedadam", "fedyogi", "fedadagrad")
#: "sgd" has momentum 0.9, "sgd-plain" none (FLamby's client optimizer).
OPTIMIZERS = ("sgd", "sgd-plain", "adam")
#: How training losses treat imbalanced classes (common.model.training.example_losses).
CLASS_WEIGHTS = ("none", "balanced", "logit-adjust")
#: Headline metrics a comparison can lead with (empty: roc-auc for two classes, balanced-accuracy otherwise).
HEADLINE_METRICS = ("", "roc-auc", "balanced-accuracy", "f1", "sensitivity", "specificity", "accuracy")


class SettingsError(ConfigurationError, ValueError):
    """A run setting has the wrong type or an impossible value."""


def setting(default: Any, help: str, *, choices: tuple[str, ...] = (), simulate: bool = True) -> Any:
    """A RunSettings field with what the CLI and the docs say about it.

    ``simulate=False``: a deployment-only setting that ``fedtransfer simulate`` does not offer.
    """
    return field(default=default, metadata={"help": help, "choices": choices, "simulate": simulate})


@dataclass(frozen=True)
class RunSettings:
    """What the coordinator runs: the one declaration of every setting.

    Field names map to run-config keys and ``fedtransfer simulate`` flags with ``-`` for ``_``;
    pyproject.toml's ``[tool.flwr.app.config]`` lists the same keys and defaults (a test checks it).
    """

    scenario: str = setting("wdbc", "built-in scenario name or path to a scenario.toml")
    rounds: int = setting(3, "federated rounds")
    local_epochs: int = setting(2, "local epochs per round")
    local_steps: int = setting(0, "local optimiser steps per round instead of epochs (0: use local-epochs)")
    batch_size: int = setting(16, "local batch size (with DP: the expected Poisson batch size)")
    lr: float = setting(0.05, "local learning rate")
    optimizer: str = setting("sgd", "local optimiser: sgd (momentum 0.9), sgd-plain, adam", choices=OPTIMIZERS)
    strategy: str = setting("fedavg", "Flower aggregation strategy", choices=STRATEGIES)
    proximal_mu: float = setting(0.01, "FedProx's proximal term (strategy fedprox only)")
    server_lr: float = setting(0.0, "server learning rate of fedadam/fedyogi/fedadagrad (0: Flower's default)")
    server_tau: float = setting(0.0, "server tau of fedadam/fedyogi/fedadagrad (0: Flower's default)")
    server_beta_2: float = setting(0.0, "server beta-2 of fedadam/fedyogi (0: Flower's default)")
    transfer_policy: str = setting(
        "", "which layers train: head, last:K, full, bias or lora:R (empty: the model card's default)"
    )
    checkpoint: str = setting("", "start from this checkpoint directory instead of pretraining the source model")
    seed: int = setting(0, "seed for data splits, initialisation and batch order")
    out: str = setting("", "output directory (empty: fedtransfer-runs/<date-time>)")
    sim_root: str = setting(
        "",
        "where simulated sites keep data, keys, privacy policy and ledger; reuse it to carry spend (empty: OUT/sites)",
    )
    data_dir: str = setting(
        "",
        "folder with the heart-disease or PneumoniaMNIST files (empty: $FEDTRANSFER_DATA_DIR, "
        "$FEDTRANSFER_PNEUMONIA_DIR)",
    )
    min_sites: int = setting(2, "sites a round needs before it starts")
    expected_sites: int = setting(0, "sites the coordinator waits for, up to round-timeout (0: min-sites)")
    personalise_epochs: int = setting(2, "epochs of each site's own fine-tune after the last round (0: none)")
    personalise_fraction: float = setting(
        0.0, "share of a private run's budget kept for private personalisation (0: none)"
    )
    personalise_lr: float = setting(0.0, "learning rate of the private personalisation (0: lr)")
    round_timeout: float = setting(600.0, "seconds a round waits for the sites' replies")
    coordinator_keys: str = setting("", "the coordinator's key folder (deployments)", simulate=False)
    manifest: str = setting("", "the signed federation manifest (deployments)", simulate=False)
    max_update_norm: float = setting(
        0.0,
        "drop site updates farther than this (L2) from the global model (0: the bound measured for the transfer "
        "policy at the default lr, local epochs and batch size, scaled up with lr x local epochs / batch size)",
    )
    dp: bool = setting(True, "ask the sites for DP-SGD (--no-dp: NOT PRIVATE, only sites whose policy allows it)")
    target_epsilon: float = setting(3.0, "epsilon the coordinator requests for this run; each site caps it")
    delta: float = setting(1e-5, "delta the coordinator requests; each site caps it")
    max_grad_norm: float = setting(1.0, "per-example gradient clipping bound of DP-SGD")
    resume: bool = setting(False, "continue the interrupted run in --out from its last completed round")
    federated_evaluation: str = setting(
        "last", "when sites release a DP evaluation: last round, every round, none", choices=FEDERATED_EVALUATION
    )
    release_loss: bool = setting(False, "ask sites for a DP release of their training loss (their policy decides)")
    reproducible_noise: bool = setting(
        False, "seeded DP noise for reproducible experiments (NOT private; only sites whose policy allows it)"
    )
    per_site_scaling: bool = setting(False, "z-score each site with its own statistics (FLamby reproduction, no DP)")
    class_weights: str = setting(
        "none",
        "loss for imbalanced classes: none, balanced, logit-adjust (prior: the site's declared class mix, else the "
        "source's)",
        choices=CLASS_WEIGHTS,
    )
    metric: str = setting(
        "",
        "headline metric of the comparison (empty: roc-auc for two classes, balanced-accuracy otherwise)",
        choices=HEADLINE_METRICS,
    )

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise SettingsError(f"strategy {self.strategy!r} is not one of {', '.join(STRATEGIES)}")
        if self.rounds < 1:
            raise SettingsError("rounds must be at least 1")
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
        if self.class_weights not in CLASS_WEIGHTS:
            raise SettingsError(f"class-weights {self.class_weights!r} is not one of {', '.join(CLASS_WEIGHTS)}")
        if self.metric not in HEADLINE_METRICS:
            raise SettingsError(f"metric {self.metric!r} is not one of {', '.join(HEADLINE_METRICS[1:])}")
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

    def output_dir(self, now: datetime | None = None) -> Path:
        """Where the run writes: ``out``, or ``fedtransfer-runs/<date-time>`` when it is empty."""
        return Path(self.out or f"fedtransfer-runs/{(now or datetime.now()):%Y%m%d-%H%M%S}").expanduser().resolve()

    def with_run_config(self, run_config: Mapping[str, Any]) -> RunSettings:
        """These settings with some run-config keys changed; unknown keys and bad values are a SettingsError."""
        return RunSettings.from_run_config(self.as_run_config() | dict(run_config))
