"""The site's own privacy policy, the coordinator's request, and how they combine.

A site (hospital) writes its policy in a TOML file it controls, for example::

    [privacy]
    max_epsilon = 8.0            # cumulative cap per dataset, over every run, ever
    max_epsilon_per_run = 3.0    # the most one run may spend
    declared_size = 500          # public, rounded size of the training data
    delta = 1e-5
    accountant = "pld"
    min_noise_multiplier = 0.5
    max_grad_norm = 1.0
    max_rounds_per_run = 50      # optional

The coordinator sends a :class:`PrivacyRequest` with every training instruction.
It arrives over the network and is validated like any untrusted input. The settings
actually used, :class:`EffectiveSettings`, are always the stricter of the two in
every field: the coordinator may ask for more privacy, never for less.
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.errors import PrivacyError
from common.privacy.accounting import ACCOUNTANTS, DEFAULT_ACCOUNTANT, Accountant
from common.security.manifest import SIZE_RANGE


class PolicyError(PrivacyError):
    """A site policy or a coordinator request is missing, malformed or out of range."""


EVALUATION_MODES = ("none", "dp")
#: Allowed ranges, shown to the operator in error messages.
MAX_EPSILON_RANGE = (0.0, 100.0)  # (exclusive, inclusive]
DELTA_RANGE = (0.0, 1e-2)  # (exclusive, inclusive]
MIN_NOISE_RANGE = (0.0, 100.0)  # [inclusive, inclusive]
GRAD_NORM_RANGE = (0.0, 1e4)  # (exclusive, inclusive]
ROUNDS_RANGE = (1, 100_000)  # [inclusive, inclusive]
EVALUATIONS_RANGE = (0, 1_000)  # [inclusive, inclusive]
RELEASE_SHARE_RANGE = (0.0, 0.5)  # (exclusive, inclusive]
REQUEST_DELTA_RANGE = (0.0, 1.0)  # (exclusive, exclusive)
REQUEST_EPSILON_RANGE = (0.0, 1e6)  # (exclusive, inclusive]
#: A run may spend at most this much of a dataset's budget unless the policy says otherwise:
#: the request that fedtransfer's defaults make, and under a third of a typical lifetime cap of 10,
#: so one run, even one that asks for far more, can never use up a dataset.
DEFAULT_MAX_EPSILON_PER_RUN = 3.0

_POLICY_KEYS = {
    "max_epsilon": "a number in (0, 100]: the cumulative epsilon cap for each dataset",
    "max_epsilon_per_run": "a number in (0, 100] (optional, default 3): the most one run may spend on a dataset",
    "delta": "a number in (0, 0.01]",
    "accountant": 'one of "pld", "prv", "rdp"',
    "min_noise_multiplier": "a number in [0, 100]",
    "max_grad_norm": "a number in (0, 10000]",
    "max_rounds_per_run": "an integer in [1, 100000] (optional)",
    "declared_size": "an integer in [1, 1000000000]: the public, rounded size of the site's training data",
    "evaluation": 'one of "none", "dp" (optional, default "none"): federated evaluation at this site',
    "max_evaluations_per_run": "an integer in [0, 1000] (optional, default 1): DP evaluations one run may ask for",
    "release_share": "a number in (0, 0.5] (optional, default 0.1): share of a run's epsilon for DP releases",
    "allow_loss_release": "true or false (optional, default false): release a DP training loss when asked",
    "allow_non_private": "true or false (optional, default false): may the coordinator ask for training without DP",
    "allow_reproducible_noise": "true or false (optional, default false): seeded, NOT private noise (public data)",
    "declared_class_prior": "a list of positive shares summing to 1, one per class (optional): the public class mix",
}


def _number(
    source: str, key: str, value: Any, low: float, high: float, *, low_open: bool, high_open: bool = False
) -> float:
    """A finite real in the given interval, else PolicyError naming source and key."""
    left, right = "(" if low_open else "[", ")" if high_open else "]"
    allowed = f"a number in {left}{low:g}, {high:g}{right}"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise PolicyError(f"{source}: {key} must be {allowed}, got {value!r}")
    number = float(value)
    too_low = number <= low if low_open else number < low
    too_high = number >= high if high_open else number > high
    if not math.isfinite(number) or too_low or too_high:
        raise PolicyError(f"{source}: {key} = {value!r} is out of range; allowed: {allowed}")
    return number


def _integer(source: str, key: str, value: Any, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise PolicyError(f"{source}: {key} must be an integer in [{low}, {high}], got {value!r}")
    return value


def _boolean(source: str, key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise PolicyError(f"{source}: {key} must be true or false, got {value!r}")
    return value


def _shares(source: str, key: str, value: Any) -> tuple[float, ...]:
    if (
        not isinstance(value, (list, tuple))
        or len(value) < 2
        or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < 1 for v in value)
        or abs(sum(value) - 1) > 0.01
    ):
        raise PolicyError(f"{source}: {key} must list 2 or more shares in (0, 1) summing to 1, got {value!r}")
    return tuple(float(v) / sum(value) for v in value)


def _choice(source: str, key: str, value: Any, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise PolicyError(f"{source}: {key} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


_CHECKS: dict[str, Any] = {
    "max_epsilon": lambda s, k, v: _number(s, k, v, *MAX_EPSILON_RANGE, low_open=True),
    "max_epsilon_per_run": lambda s, k, v: _number(s, k, v, *MAX_EPSILON_RANGE, low_open=True),
    "delta": lambda s, k, v: _number(s, k, v, *DELTA_RANGE, low_open=True),
    "accountant": lambda s, k, v: _choice(s, k, v, ACCOUNTANTS),
    "min_noise_multiplier": lambda s, k, v: _number(s, k, v, *MIN_NOISE_RANGE, low_open=False),
    "max_grad_norm": lambda s, k, v: _number(s, k, v, *GRAD_NORM_RANGE, low_open=True),
    "max_rounds_per_run": lambda s, k, v: _integer(s, k, v, *ROUNDS_RANGE),
    "declared_size": lambda s, k, v: _integer(s, k, v, *SIZE_RANGE),
    "evaluation": lambda s, k, v: _choice(s, k, v, EVALUATION_MODES),
    "max_evaluations_per_run": lambda s, k, v: _integer(s, k, v, *EVALUATIONS_RANGE),
    "release_share": lambda s, k, v: _number(s, k, v, *RELEASE_SHARE_RANGE, low_open=True),
    "allow_loss_release": _boolean,
    "allow_non_private": _boolean,
    "allow_reproducible_noise": _boolean,
    "declared_class_prior": _shares,
}


@dataclass(frozen=True)
class SitePolicy:
    """What the site allows for each of its datasets; validated on construction.

    ``declared_size`` is public: the coordinator sees it and weights the site's updates by
    it, and the DP sample rate is set from it, so the exact number of records never leaves.
    """

    max_epsilon: float
    delta: float
    accountant: Accountant = DEFAULT_ACCOUNTANT
    min_noise_multiplier: float = 0.5
    max_grad_norm: float = 1.0
    max_rounds_per_run: int | None = None
    max_epsilon_per_run: float = DEFAULT_MAX_EPSILON_PER_RUN
    declared_size: int | None = None
    evaluation: str = "none"
    max_evaluations_per_run: int = 1
    release_share: float = 0.1
    allow_loss_release: bool = False
    allow_non_private: bool = False
    allow_reproducible_noise: bool = False
    declared_class_prior: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        for key, check in _CHECKS.items():
            value = getattr(self, key)
            if value is not None:
                check("site policy", key, value)

    @property
    def run_limit(self) -> float:
        """The most one run may spend on a dataset: the per-run limit, never above the cap."""
        return min(self.max_epsilon, self.max_epsilon_per_run)


def load_policy(path: Path) -> SitePolicy:
    """Read and validate a site policy file; PolicyError names the file and the key."""
    path = Path(path)
    try:
        with path.open("rb") as handle:
            document = tomllib.load(handle)
    except FileNotFoundError as exc:
        raise PolicyError(f"{path}: site privacy policy file not found") from exc
    except OSError as exc:
        raise PolicyError(f"{path}: cannot read the site privacy policy: {exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise PolicyError(f"{path}: not valid TOML: {exc}") from exc
    extra_tables = sorted(set(document) - {"privacy"})
    if extra_tables:
        raise PolicyError(
            f"{path}: unknown top-level key(s) {', '.join(extra_tables)}; the policy file holds only a [privacy] table"
        )
    table = document.get("privacy")
    if not isinstance(table, dict):
        raise PolicyError(f"{path}: missing [privacy] table")
    unknown = sorted(set(table) - set(_POLICY_KEYS))
    if unknown:
        raise PolicyError(
            f"{path}: unknown key(s) in [privacy]: {', '.join(unknown)}; allowed keys: {', '.join(_POLICY_KEYS)}"
        )
    for required in ("max_epsilon", "delta"):
        if required not in table:
            raise PolicyError(f"{path}: [privacy] {required} is required ({_POLICY_KEYS[required]})")
    source = f"{path}: [privacy]"
    values = {key: _CHECKS[key](source, key, value) for key, value in table.items()}  # _shares normalises
    try:
        return SitePolicy(**values)
    except PolicyError as exc:
        raise PolicyError(f"{path}: {exc}") from exc


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return repr(value)


def write_policy(policy: SitePolicy, path: Path) -> None:
    """Write ``policy`` as a commented TOML file that :func:`load_policy` reads back."""

    def optional(key: str, example: str) -> str:
        value = getattr(policy, key)
        return f"{key} = {_toml(value)}" if value is not None else f"# {key} = {example}"

    text = f"""\
# Site privacy policy for fedtransfer. This file belongs to the site: the coordinator
# can ask for stricter settings, never weaker ones. Every dataset on this site has its
# own budget, composed over every round of every run that ever trained on it.

[privacy]
# Cumulative epsilon cap for each dataset over all runs, ever. Once reached, the site
# refuses to train on that dataset. Allowed: (0, 100].
max_epsilon = {policy.max_epsilon!r}

# The most one run may spend on a dataset, whatever the coordinator asks. Allowed: (0, 100].
max_epsilon_per_run = {policy.max_epsilon_per_run!r}

# Delta of the (epsilon, delta) guarantee, per dataset. Keep it well below
# 1 / (number of records). Allowed: (0, 0.01].
delta = {policy.delta!r}

# Privacy accountant: "pld" (tight and fast: Google's dp-accounting), "prv" (tight, Opacus,
# ten times slower) or "rdp" (looser). The coordinator cannot choose it.
accountant = "{policy.accountant}"

# Smallest DP-SGD noise multiplier the site accepts, whatever the budget allows.
# Allowed: [0, 100].
min_noise_multiplier = {policy.min_noise_multiplier!r}

# Largest per-example gradient clipping norm the site accepts. Allowed: (0, 10000].
max_grad_norm = {policy.max_grad_norm!r}

# Largest number of training rounds one run may use on a dataset (optional).
# Allowed: an integer in [1, 100000].
{optional("max_rounds_per_run", "50")}

# The size of the training data this site declares PUBLICLY, rounded (for example to
# the nearest 50). The coordinator weights this site's updates by it and the DP sample
# rate is set from it; the exact number of records never leaves. Required to train.
{optional("declared_size", "500")}

# Federated evaluation: "none" (nothing about the test data leaves), or "dp": a noisy
# histogram of test predictions, released with the Gaussian mechanism and recorded in
# the ledger like a training round. On test sets of a few hundred records or fewer the
# noise dominates at sensible budgets; see docs/privacy.md.
evaluation = "{policy.evaluation}"

# How many DP evaluations one run may ask for (the coordinator usually asks for one,
# after the last round). Allowed: an integer in [0, 1000].
max_evaluations_per_run = {policy.max_evaluations_per_run!r}

# Share of each run's epsilon kept for DP releases (evaluations, a DP training loss);
# the training rounds get the rest. Allowed: (0, 0.5].
release_share = {policy.release_share!r}

# Whether to release a DP training loss (clipped per record, Gaussian noise, recorded in
# the ledger) when the coordinator asks for it. The raw loss never leaves.
allow_loss_release = {_toml(policy.allow_loss_release)}

# Whether the coordinator may ask this site to train WITHOUT differential privacy.
# Keep false for patient data; true only for simulations on public data.
allow_non_private = {_toml(policy.allow_non_private)}

# Whether the coordinator may ask for reproducible (seeded) noise: NOT private, for
# simulations on built-in generated or bundled public data only. Keep false otherwise.
allow_reproducible_noise = {_toml(policy.allow_reproducible_noise)}

# The class mix of this site's data this site declares PUBLICLY, one share per class in
# the model's class order, rounded (optional). Used only when a run asks for class-weighted
# training; without it the site uses the source data's mix from the model card.
{optional("declared_class_prior", "[0.85, 0.15]")}
"""
    Path(path).write_text(text, encoding="utf-8")


_REQUEST_KEYS = {
    "target_epsilon": "dp-target-epsilon",
    "delta": "dp-delta",
    "max_grad_norm": "dp-max-grad-norm",
    "planned_rounds": "dp-planned-rounds",
    "evaluations": "dp-evaluations",
    "release_loss": "dp-release-loss",
}


@dataclass(frozen=True)
class PrivacyRequest:
    """The privacy settings the coordinator asks for in one run; validated on construction."""

    target_epsilon: float
    delta: float
    max_grad_norm: float
    planned_rounds: int
    evaluations: int = 0
    release_loss: bool = False

    def __post_init__(self) -> None:
        _validate_request({field: getattr(self, field) for field in _REQUEST_KEYS}, "coordinator request")

    def to_config(self) -> dict[str, float | int]:
        """Flat dict for a Flower ConfigRecord; keys are ``dp-target-epsilon`` etc."""
        return {key: getattr(self, field) for field, key in _REQUEST_KEYS.items()}

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> PrivacyRequest:
        """Parse and validate the request keys of a received config (other keys are ignored)."""
        missing = [key for key in _REQUEST_KEYS.values() if key not in cfg]
        if missing:
            raise PolicyError(f"coordinator request: missing key(s) {', '.join(missing)} in the training config")
        values = {field: cfg[key] for field, key in _REQUEST_KEYS.items()}
        _validate_request(values, "coordinator request")
        return cls(
            target_epsilon=float(values["target_epsilon"]),
            delta=float(values["delta"]),
            max_grad_norm=float(values["max_grad_norm"]),
            planned_rounds=int(values["planned_rounds"]),
            evaluations=int(values["evaluations"]),
            release_loss=bool(values["release_loss"]),
        )


def _validate_request(values: Mapping[str, Any], source: str) -> None:
    keys = _REQUEST_KEYS
    _number(source, keys["target_epsilon"], values["target_epsilon"], *REQUEST_EPSILON_RANGE, low_open=True)
    _number(source, keys["delta"], values["delta"], *REQUEST_DELTA_RANGE, low_open=True, high_open=True)
    _number(source, keys["max_grad_norm"], values["max_grad_norm"], *GRAD_NORM_RANGE, low_open=True)
    _integer(source, keys["planned_rounds"], values["planned_rounds"], *ROUNDS_RANGE)
    _integer(source, keys["evaluations"], values["evaluations"], 0, ROUNDS_RANGE[1])
    _boolean(source, keys["release_loss"], values["release_loss"])


@dataclass(frozen=True)
class EffectiveSettings:
    """The settings a site actually trains with: the stricter of policy and request."""

    run_target_epsilon: float
    cap_epsilon: float
    delta: float
    max_grad_norm: float
    planned_rounds: int
    min_noise_multiplier: float
    accountant: Accountant
    overridden: tuple[str, ...]
    #: DP releases the run may make: evaluations, and one DP training loss per round if asked and allowed;
    #: ``release_share`` of the run's budget is theirs if it makes any.
    evaluations: int = 0
    release_loss: bool = False
    release_share: float = 0.0

    @property
    def releases(self) -> int:
        """Planned DP releases of the run (evaluations, training losses); personalisation's are apart."""
        return self.evaluations + (self.planned_rounds if self.release_loss else 0)

    def to_dict(self) -> dict[str, Any]:
        return {
            "run_target_epsilon": self.run_target_epsilon,
            "cap_epsilon": self.cap_epsilon,
            "delta": self.delta,
            "max_grad_norm": self.max_grad_norm,
            "planned_rounds": self.planned_rounds,
            "min_noise_multiplier": self.min_noise_multiplier,
            "accountant": self.accountant,
            "overridden": list(self.overridden),
            "evaluations": self.evaluations,
            "release_loss": self.release_loss,
            "release_share": self.release_share,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EffectiveSettings:
        return cls(
            run_target_epsilon=float(data["run_target_epsilon"]),
            cap_epsilon=float(data["cap_epsilon"]),
            delta=float(data["delta"]),
            max_grad_norm=float(data["max_grad_norm"]),
            planned_rounds=int(data["planned_rounds"]),
            min_noise_multiplier=float(data["min_noise_multiplier"]),
            accountant=data["accountant"],
            overridden=tuple(data["overridden"]),
            evaluations=int(data.get("evaluations", 0)),
            release_loss=bool(data.get("release_loss", False)),
            release_share=float(data.get("release_share", 0.0)),
        )


def effective_settings(policy: SitePolicy, request: PrivacyRequest) -> EffectiveSettings:
    """Combine policy and request, taking the stricter value field by field."""
    overridden: list[str] = []
    if policy.run_limit < request.target_epsilon:
        overridden.append("target_epsilon")
    if policy.delta < request.delta:
        overridden.append("delta")
    if policy.max_grad_norm < request.max_grad_norm:
        overridden.append("max_grad_norm")
    rounds = request.planned_rounds
    if policy.max_rounds_per_run is not None and policy.max_rounds_per_run < rounds:
        overridden.append("planned_rounds")
        rounds = policy.max_rounds_per_run
    evaluations = 0 if policy.evaluation == "none" else min(request.evaluations, policy.max_evaluations_per_run)
    if evaluations < request.evaluations:
        overridden.append("evaluations")
    release_loss = request.release_loss and policy.allow_loss_release
    if request.release_loss and not release_loss:
        overridden.append("release_loss")
    return EffectiveSettings(
        run_target_epsilon=min(request.target_epsilon, policy.run_limit),
        cap_epsilon=policy.max_epsilon,
        delta=min(request.delta, policy.delta),
        max_grad_norm=min(request.max_grad_norm, policy.max_grad_norm),
        planned_rounds=rounds,
        min_noise_multiplier=policy.min_noise_multiplier,
        accountant=policy.accountant,
        overridden=tuple(overridden),
        evaluations=evaluations,
        release_loss=release_loss,
        release_share=policy.release_share,
    )
