"""What an audit establishes: findings, recomputed epsilons and per-dataset budgets, as plain records."""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from common.errors import ConfigurationError
from common.privacy.accounting import PRV_EPS_ERROR

log = logging.getLogger(__name__)

Method = Literal["pld", "rdp", "prv"]
Severity = Literal["fail", "warn", "info"]

#: The largest gap allowed below the recomputed epsilon before a claim fails as under-reported:
#: the accountant's own documented error (Opacus's PRV adds its discretisation error, 0.01, to its
#: bound; dp-accounting's PLD is computed to a finer grid). A ledger rewritten to claim even 1%
#: less than its history composes to (0.03 at epsilon 3) fails.
DEFAULT_TOLERANCE = PRV_EPS_ERROR
#: A claim above the recomputed value by more than this (relative) is flagged as over-reported.
OVER_REPORT_TOLERANCE = 0.03
#: Rounds-left searches stop here and report "at least" this many.
MAX_ROUNDS_LEFT = 10_000
#: The independent method matching each ledger accountant.
MATCHING_METHOD: dict[str, Method] = {"pld": "prv", "prv": "pld", "rdp": "rdp"}


class AuditInputError(ConfigurationError):
    """A path given to the audit is neither a site state directory nor a coordinator run."""


@dataclass(frozen=True)
class Finding:
    """One thing the audit found; any ``fail`` makes the audit fail."""

    severity: Severity
    where: str
    message: str


@dataclass(frozen=True)
class Recomputed:
    """One ledger entry (or reported round) with its epsilon recomputed independently."""

    site: str
    dataset_id: str
    source: Literal["ledger", "reports"]
    index: int
    run_id: str
    server_round: int
    delta: float
    claimed: float
    recomputed: float
    method: Method
    allowed_gap: float
    verdict: Literal["ok", "under-reported", "over-reported"]


@dataclass(frozen=True)
class CurvePoint:
    """Cumulative epsilon of one dataset after one ledger entry (for the plot)."""

    run_id: str
    server_round: int
    epsilon: float


@dataclass(frozen=True)
class DatasetBudget:
    """Budget status of one dataset at one site; epsilons at the site's delta and accountant."""

    site: str
    dataset_id: str
    source: Literal["ledger", "reports"]
    rounds: int
    runs: int
    spent_claimed: float
    spent_recomputed: float
    cap: float | None
    remaining: float | None
    rounds_left: int | None
    rounds_left_at_least: bool
    noise_multiplier: float | None
    delta: float | None
    accountant: str
    private: bool
    status: Literal["ok", "over-cap", "not-private", "unknown-cap"]
    curve: list[CurvePoint] = field(default_factory=list)
    releases: int = 0
    dataset_name: str = ""  # the site's data path, for the dataset it holds now (ids alone for others)

    @property
    def dataset(self) -> str:
        """The dataset as the tables show it: its name, else the start of its keyed identity."""
        return self.dataset_name or self.dataset_id[:12]


@dataclass
class AuditReport:
    """Everything one audit established; ``passed`` is False if any finding is a failure."""

    inputs: list[str]
    tolerance: float
    method: str
    findings: list[Finding] = field(default_factory=list)
    recomputed: list[Recomputed] = field(default_factory=list)
    budgets: list[DatasetBudget] = field(default_factory=list)
    sites: list[str] = field(default_factory=list)
    runs: list[str] = field(default_factory=list)
    empirical: list[dict[str, Any]] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not any(f.severity == "fail" for f in self.findings)

    def failures(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "fail"]

    def add(self, severity: Severity, where: str, message: str) -> None:
        if any(f == Finding(severity, where, message) for f in self.findings):
            return
        self.findings.append(Finding(severity, where, message))
        log.debug("audit %s: %s: %s", severity, where, message)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict; non-finite numbers become ``null``."""
        data = asdict(self)
        data["passed"] = self.passed
        return json_safe(data)


def json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def over_gap(recomputed: float) -> float:
    """How far above the recomputed epsilon a claim may lie before it is flagged as over-reported."""
    return max(OVER_REPORT_TOLERANCE * recomputed, 2 * PRV_EPS_ERROR)


def verdict(claimed: float, recomputed: float, tolerance: float) -> Literal["ok", "under-reported", "over-reported"]:
    if claimed < recomputed - tolerance:
        return "under-reported"
    if claimed > recomputed + over_gap(recomputed):
        return "over-reported"
    return "ok"
