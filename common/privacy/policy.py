"""The site's own privacy policy, the coordinator's request, and how they combine.

A site (hospital) writes its policy in a TOML file it controls, for example::

    [privacy]
    max_epsilon = 8.0            # cumulative cap per dataset, over every run, ever
    delta = 1e-5
    accountant = "prv"
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

from common.privacy.accounting import ACCOUNTANTS, Accountant


class PolicyError(Exception):
    """A site policy or a coordinator request is missing, malformed or out of range."""


#: Allowed ranges, shown to the operator in error messages.
MAX_EPSILON_RANGE = (0.0, 100.0)  # (exclusive, inclusive]
DELTA_RANGE = (0.0, 1e-2)  # (exclusive, inclusive]
MIN_NOISE_RANGE = (0.0, 100.0)  # [inclusive, inclusive]
GRAD_NORM_RANGE = (0.0, 1e4)  # (exclusive, inclusive]
ROUNDS_RANGE = (1, 100_000)  # [inclusive, inclusive]
REQUEST_DELTA_RANGE = (0.0, 1.0)  # (exclusive, exclusive)
REQUEST_EPSILON_RANGE = (0.0, 1e6)  # (exclusive, inclusive]

_POLICY_KEYS = {
    "max_epsilon": "a number in (0, 100]: the cumulative epsilon cap for each dataset",
    "delta": "a number in (0, 0.01]",
    "accountant": 'one of "prv", "rdp"',
    "min_noise_multiplier": "a number in [0, 100]",
    "max_grad_norm": "a number in (0, 10000]",
    "max_rounds_per_run": "an integer in [1, 100000] (optional)",
    "allow_non_private": "true or false (optional, default false): whether the coordinator may ask for training without DP",
}


def _number(source: str, key: str, value: Any, low: float, high: float, *, low_open: bool,
            high_open: bool = False) -> float:
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
        raise PolicyError(
            f"{source}: {key} must be an integer in [{low}, {high}], got {value!r}"
        )
    return value


@dataclass(frozen=True)
class SitePolicy:
    """What the site allows for each of its datasets; validated on construction."""

    max_epsilon: float
    delta: float
    accountant: Accountant = "prv"
    min_noise_multiplier: float = 0.5
    max_grad_norm: float = 1.0
    max_rounds_per_run: int | None = None
    allow_non_private: bool = False

    def __post_init__(self) -> None:
        _validate_policy(self, "site policy")


def _validate_policy(policy: SitePolicy, source: str) -> None:
    _number(source, "max_epsilon", policy.max_epsilon, *MAX_EPSILON_RANGE, low_open=True)
    _number(source, "delta", policy.delta, *DELTA_RANGE, low_open=True)
    if policy.accountant not in ACCOUNTANTS:
        raise PolicyError(
            f"{source}: accountant must be one of {', '.join(ACCOUNTANTS)}, got {policy.accountant!r}"
        )
    _number(source, "min_noise_multiplier", policy.min_noise_multiplier, *MIN_NOISE_RANGE,
            low_open=False)
    _number(source, "max_grad_norm", policy.max_grad_norm, *GRAD_NORM_RANGE, low_open=True)
    if policy.max_rounds_per_run is not None:
        _integer(source, "max_rounds_per_run", policy.max_rounds_per_run, *ROUNDS_RANGE)
    if not isinstance(policy.allow_non_private, bool):
        raise PolicyError(f"{source}: allow_non_private must be true or false, got {policy.allow_non_private!r}")


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
            f"{path}: unknown top-level key(s) {', '.join(extra_tables)}; "
            "the policy file holds only a [privacy] table"
        )
    table = document.get("privacy")
    if not isinstance(table, dict):
        raise PolicyError(f"{path}: missing [privacy] table")
    unknown = sorted(set(table) - set(_POLICY_KEYS))
    if unknown:
        raise PolicyError(
            f"{path}: unknown key(s) in [privacy]: {', '.join(unknown)}; "
            f"allowed keys: {', '.join(_POLICY_KEYS)}"
        )
    for required in ("max_epsilon", "delta"):
        if required not in table:
            raise PolicyError(
                f"{path}: [privacy] {required} is required ({_POLICY_KEYS[required]})"
            )
    source = f"{path}: [privacy]"
    values = {
        "max_epsilon": _number(source, "max_epsilon", table["max_epsilon"], *MAX_EPSILON_RANGE,
                               low_open=True),
        "delta": _number(source, "delta", table["delta"], *DELTA_RANGE, low_open=True),
    }
    if "accountant" in table:
        if table["accountant"] not in ACCOUNTANTS:
            raise PolicyError(
                f"{source} accountant must be {_POLICY_KEYS['accountant']}, got {table['accountant']!r}"
            )
        values["accountant"] = table["accountant"]
    if "min_noise_multiplier" in table:
        values["min_noise_multiplier"] = _number(
            source, "min_noise_multiplier", table["min_noise_multiplier"], *MIN_NOISE_RANGE,
            low_open=False,
        )
    if "max_grad_norm" in table:
        values["max_grad_norm"] = _number(
            source, "max_grad_norm", table["max_grad_norm"], *GRAD_NORM_RANGE, low_open=True
        )
    if "max_rounds_per_run" in table:
        values["max_rounds_per_run"] = _integer(
            source, "max_rounds_per_run", table["max_rounds_per_run"], *ROUNDS_RANGE
        )
    if "allow_non_private" in table:
        values["allow_non_private"] = table["allow_non_private"]
    try:
        return SitePolicy(**values)
    except PolicyError as exc:
        raise PolicyError(f"{path}: {exc}") from exc


def write_policy(policy: SitePolicy, path: Path) -> None:
    """Write ``policy`` as a commented TOML file that :func:`load_policy` reads back."""
    rounds = (
        f"max_rounds_per_run = {policy.max_rounds_per_run}"
        if policy.max_rounds_per_run is not None
        else "# max_rounds_per_run = 50"
    )
    text = f"""\
# Site privacy policy for fedtransfer. This file belongs to the site: the coordinator
# can ask for stricter settings, never weaker ones. Every dataset on this site has its
# own budget, composed over every round of every run that ever trained on it.

[privacy]
# Cumulative epsilon cap for each dataset over all runs, ever. Once reached, the site
# refuses to train on that dataset. Allowed: (0, 100].
max_epsilon = {policy.max_epsilon!r}

# Delta of the (epsilon, delta) guarantee, per dataset. Keep it well below
# 1 / (number of records). Allowed: (0, 0.01].
delta = {policy.delta!r}

# Privacy accountant: "prv" (tight, Opacus's default) or "rdp" (looser, cheaper).
# The coordinator cannot choose it.
accountant = "{policy.accountant}"

# Smallest DP-SGD noise multiplier the site accepts, whatever the budget allows.
# Allowed: [0, 100].
min_noise_multiplier = {policy.min_noise_multiplier!r}

# Largest per-example gradient clipping norm the site accepts. Allowed: (0, 10000].
max_grad_norm = {policy.max_grad_norm!r}

# Largest number of training rounds one run may use on a dataset (optional).
# Allowed: an integer in [1, 100000].
{rounds}

# Whether the coordinator may ask this site to train WITHOUT differential privacy.
# Keep false for patient data; true only for simulations on public data.
allow_non_private = {"true" if policy.allow_non_private else "false"}
"""
    Path(path).write_text(text, encoding="utf-8")


_REQUEST_KEYS = {
    "target_epsilon": "dp-target-epsilon",
    "delta": "dp-delta",
    "max_grad_norm": "dp-max-grad-norm",
    "planned_rounds": "dp-planned-rounds",
}


@dataclass(frozen=True)
class PrivacyRequest:
    """The privacy settings the coordinator asks for in one run; validated on construction."""

    target_epsilon: float
    delta: float
    max_grad_norm: float
    planned_rounds: int

    def __post_init__(self) -> None:
        _validate_request(
            {field: getattr(self, field) for field in _REQUEST_KEYS}, "coordinator request"
        )

    def to_config(self) -> dict[str, float | int]:
        """Flat dict for a Flower ConfigRecord; keys are ``dp-target-epsilon`` etc."""
        return {key: getattr(self, field) for field, key in _REQUEST_KEYS.items()}

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> PrivacyRequest:
        """Parse and validate the request keys of a received config (other keys are ignored)."""
        missing = [key for key in _REQUEST_KEYS.values() if key not in cfg]
        if missing:
            raise PolicyError(
                f"coordinator request: missing key(s) {', '.join(missing)} in the training config"
            )
        values = {field: cfg[key] for field, key in _REQUEST_KEYS.items()}
        _validate_request(values, "coordinator request")
        return cls(
            target_epsilon=float(values["target_epsilon"]),
            delta=float(values["delta"]),
            max_grad_norm=float(values["max_grad_norm"]),
            planned_rounds=int(values["planned_rounds"]),
        )


def _validate_request(values: Mapping[str, Any], source: str) -> None:
    keys = _REQUEST_KEYS
    _number(source, keys["target_epsilon"], values["target_epsilon"], *REQUEST_EPSILON_RANGE,
            low_open=True)
    _number(source, keys["delta"], values["delta"], *REQUEST_DELTA_RANGE, low_open=True,
            high_open=True)
    _number(source, keys["max_grad_norm"], values["max_grad_norm"], *GRAD_NORM_RANGE,
            low_open=True)
    _integer(source, keys["planned_rounds"], values["planned_rounds"], *ROUNDS_RANGE)


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
        )


def effective_settings(policy: SitePolicy, request: PrivacyRequest) -> EffectiveSettings:
    """Combine policy and request, taking the stricter value field by field."""
    overridden: list[str] = []
    if policy.max_epsilon < request.target_epsilon:
        overridden.append("target_epsilon")
    if policy.delta < request.delta:
        overridden.append("delta")
    if policy.max_grad_norm < request.max_grad_norm:
        overridden.append("max_grad_norm")
    rounds = request.planned_rounds
    if policy.max_rounds_per_run is not None and policy.max_rounds_per_run < rounds:
        overridden.append("planned_rounds")
        rounds = policy.max_rounds_per_run
    return EffectiveSettings(
        run_target_epsilon=min(request.target_epsilon, policy.max_epsilon),
        cap_epsilon=policy.max_epsilon,
        delta=min(request.delta, policy.delta),
        max_grad_norm=min(request.max_grad_norm, policy.max_grad_norm),
        planned_rounds=rounds,
        min_noise_multiplier=policy.min_noise_multiplier,
        accountant=policy.accountant,
        overridden=tuple(overridden),
    )
