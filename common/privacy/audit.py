"""The privacy officer's audit: verify what was spent on every dataset, and that the number is right.

Inputs are site state directories (each holding a privacy ledger) and coordinator run
directories (each holding ``run-record.json`` with the sites' signed privacy reports).
:func:`run_audit` checks, without trusting the code that wrote them:

1. **Ledger integrity**: the hash chain and head anchor (:meth:`Ledger.verify`), and the
   format of every entry (dataset id, kind, ranges, times, one entry per run and round,
   non-decreasing epsilon per dataset). Entries are of kind ``train`` (a round) or
   ``personalise`` (a run's private personalisation after its last round, spent at the
   site and never reported in a signed train report; it composes into the history like
   any other entry).
2. **Signed reports**: every privacy report in a run record verifies against the site key
   in the run's signed manifest, for exactly that run, round and base model, and the run
   record's plain copy says the same as the signed one.
3. **Agreement**: every round a site reported to the coordinator is in that site's
   ledger (same index, hash and parameters); every ledger entry of an audited run was
   reported (an unreported one counts; it is only flagged).
4. **Recomputation**: the epsilon after each ledger entry is recomputed from the raw
   ``(noise multiplier, sample rate, steps)`` history with Google's ``dp-accounting``
   (PLD for ledgers kept with Opacus PRV, RDP for RDP ledgers, or as asked), and a
   ledger that claims less than the recomputed value, beyond the tolerance, fails.
   Without a ledger, the rounds reported in the audited runs are a subset of the
   dataset's history, whose composition the claimed epsilon must still cover.
5. **Budget**: per site and dataset, spent, cap (from the site's policy), remaining, and
   the rounds left at the current noise; a dataset over its cap, or trained without DP,
   fails.

Nothing here writes to the audited directories except the ledger's lock file, which
readers share with a site that may be appending at the same time.
"""

from __future__ import annotations

import html
import json
import logging
import math
import re
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis import rdp as rdp_analysis

from common.privacy.accounting import (
    ACCOUNTANTS,
    AccountingError,
    Step,
    compose_epsilon,
    independent_epsilon,
)
from common.privacy.ledger import LEDGER_FILE, NON_PRIVATE_DIR, Ledger, LedgerEntry, LedgerError
from common.security.manifest import Manifest, ManifestError
from common.privacy.report import ReportInvalid, verify_report
from common.data.site_config import SITE_CONFIG_FILE, SiteConfig, SiteConfigError
from common.privacy.policy import PolicyError, SitePolicy, load_policy
from common.run_record import RUN_RECORD_FILE, RunRecord

log = logging.getLogger(__name__)

Method = Literal["pld", "rdp"]
Severity = Literal["fail", "warn", "info"]

#: Default relative tolerance between the claimed and the recomputed epsilon.
DEFAULT_TOLERANCE = 0.03
#: Smallest gap ever flagged: twice the discretisation error Opacus's PRV accountant
#: adds to its upper bound (0.01), so PRV ledgers never fail on rounding alone.
ABSOLUTE_TOLERANCE = 0.02
#: Rounds-left searches stop here and report "at least" this many.
MAX_ROUNDS_LEFT = 10_000
#: Ledger entry kinds: a training round, and a run's private personalisation (client/budget.py).
LEDGER_KINDS = ("train", "personalise")
#: The independent method matching each ledger accountant.
MATCHING_METHOD: dict[str, Method] = {"prv": "pld", "rdp": "rdp"}

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
#: Report fields compared with the ledger entry they name: report key -> entry attribute.
_REPORT_FIELDS = {
    "dataset-id": "dataset_id", "epsilon": "epsilon", "delta": "delta",
    "accountant": "accountant", "noise-multiplier": "noise_multiplier",
    "sample-rate": "sample_rate", "steps": "steps", "max-grad-norm": "max_grad_norm",
    "reference-epsilon": "reference_epsilon", "reference-accountant": "reference_accountant",
}


class AuditInputError(Exception):
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
    """Cumulative epsilon of one dataset after one round (for the plot)."""

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
        self.findings.append(Finding(severity, where, message))
        log.debug("audit %s: %s: %s", severity, where, message)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict; non-finite numbers become ``null``."""
        data = asdict(self)
        data["passed"] = self.passed
        return _json_safe(data)


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


# inputs ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class SiteInput:
    """A site state directory, the site id it belongs to, and its policy file."""

    site_id: str
    state_dir: Path
    policy_path: Path


def _site_input(state_dir: Path) -> SiteInput:
    state_dir = state_dir.resolve()
    config_path = state_dir.parent / SITE_CONFIG_FILE
    if config_path.is_file():
        try:
            config = SiteConfig.load(config_path)
        except SiteConfigError as exc:
            log.warning("ignoring %s: %s", config_path, exc)
        else:
            if config.state_dir.expanduser().resolve() == state_dir:
                return SiteInput(config.site_id, state_dir, config.policy_path)
    name = state_dir.parent.name if state_dir.name == "state" else state_dir.name
    return SiteInput(name, state_dir, state_dir / "privacy-policy.toml")


def classify_inputs(paths: Sequence[Path]) -> tuple[list[SiteInput], list[Path]]:
    """Sort paths into site state directories and run-record files.

    Accepted: a state directory (holds ``privacy-ledger.jsonl``), a site folder (holds
    ``state/``), a run directory or its ``run-record.json``. A run directory with
    simulated sites under ``sites/*/state`` contributes those sites too.
    """
    sites: dict[Path, SiteInput] = {}
    runs: list[Path] = []
    for raw in paths:
        path = Path(raw).expanduser()
        if path.is_file() and path.name == RUN_RECORD_FILE:
            runs.append(path.resolve())
            continue
        if not path.is_dir():
            raise AuditInputError(f"{path}: no such directory or run-record.json")
        found = False
        if (path / RUN_RECORD_FILE).is_file():
            runs.append((path / RUN_RECORD_FILE).resolve())
            found = True
            for ledger in sorted(path.glob(f"sites/*/state/{LEDGER_FILE}")):
                sites.setdefault(ledger.parent.resolve(), _site_input(ledger.parent))
        for candidate in (path, path / "state"):
            if any((candidate / name).exists() for name in (LEDGER_FILE, NON_PRIVATE_DIR, "privacy-policy.toml")):
                sites.setdefault(candidate.resolve(), _site_input(candidate))
                found = True
                break
        if not found:
            raise AuditInputError(
                f"{path}: neither a site state directory (with {LEDGER_FILE}), a site folder "
                f"(with state/), nor a coordinator run directory (with {RUN_RECORD_FILE})"
            )
    return list(sites.values()), list(dict.fromkeys(runs))


# accounting helpers ---------------------------------------------------------------------


class _Accounting:
    """Memoised independent and Opacus epsilons (the same history recurs across sites)."""

    def __init__(self) -> None:
        self._independent: dict[tuple[Any, ...], float] = {}
        self._rounds_left: dict[tuple[Any, ...], tuple[int, bool]] = {}

    @staticmethod
    def _key(history: Sequence[Step]) -> tuple[tuple[float, float, int], ...]:
        totals: dict[tuple[float, float], int] = {}
        for step in history:
            key = (step.noise_multiplier, step.sample_rate)
            totals[key] = totals.get(key, 0) + step.steps
        return tuple(sorted((s, q, n) for (s, q), n in totals.items() if n))

    def independent(self, history: Sequence[Step], delta: float, method: Method) -> float:
        key = (self._key(history), delta, method)
        if key not in self._independent:
            self._independent[key] = independent_epsilon(history, delta, method)
        return self._independent[key]

    @staticmethod
    def fits(history: Sequence[Step], delta: float, accountant: str, cap: float) -> bool:
        try:
            return compose_epsilon(history, delta, accountant) <= cap  # type: ignore[arg-type]
        except AccountingError:
            return False

    def rounds_left(
        self, history: Sequence[Step], step: Step, delta: float, accountant: str, cap: float
    ) -> tuple[int, bool]:
        """Largest n with history + n x step within cap, by the site's own accountant.

        RDP is linear in the steps, so its answer comes from two RDP curves at once; it is
        never more than PRV's (RDP is the looser bound). For a PRV site the search then
        gallops and bisects upward from there with PRV. Returns (n, at_least).
        """
        key = (self._key(history), step, delta, accountant, cap)
        if key not in self._rounds_left:
            rdp_n, at_least = _rdp_rounds_left(history, step, delta, cap)
            if accountant == "rdp" or at_least:
                self._rounds_left[key] = (rdp_n, at_least)
            else:
                self._rounds_left[key] = self._search_up(history, step, delta, accountant, cap, rdp_n)
        return self._rounds_left[key]

    def _search_up(
        self, history: Sequence[Step], step: Step, delta: float, accountant: str, cap: float, low: int
    ) -> tuple[int, bool]:
        def fits(n: int) -> bool:
            extra = Step(step.noise_multiplier, step.sample_rate, step.steps * n)
            return self.fits([*history, extra], delta, accountant, cap)

        if not fits(low):
            low, high = 0, low
        else:
            width, high = 1, low + 1
            while fits(high):
                low, width = high, width * 2
                if low >= MAX_ROUNDS_LEFT:
                    return MAX_ROUNDS_LEFT, True
                high = min(low + width, MAX_ROUNDS_LEFT + 1)
        while high - low > 1:
            middle = (low + high) // 2
            if fits(middle):
                low = middle
            else:
                high = middle
        return low, False


def _rdp_rounds_left(history: Sequence[Step], step: Step, delta: float, cap: float) -> tuple[int, bool]:
    """Rounds left under Opacus's RDP analysis (the sums RDPAccountant forms), by bisection."""
    orders = RDPAccountant.DEFAULT_ALPHAS
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = sum(
            (rdp_analysis.compute_rdp(q=s.sample_rate, noise_multiplier=s.noise_multiplier,
                                      steps=s.steps, orders=orders) for s in history if s.steps),
            np.zeros(len(orders)),
        )
        per_round = rdp_analysis.compute_rdp(q=step.sample_rate, noise_multiplier=step.noise_multiplier,
                                             steps=step.steps, orders=orders)

    def fits(n: int) -> bool:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            eps, _ = rdp_analysis.get_privacy_spent(orders=orders, rdp=base + n * per_round, delta=delta)
        return bool(math.isfinite(eps) and eps <= cap)

    if fits(MAX_ROUNDS_LEFT):
        return MAX_ROUNDS_LEFT, True
    low, high = 0, MAX_ROUNDS_LEFT
    if not fits(0):
        return 0, False
    while high - low > 1:
        middle = (low + high) // 2
        if fits(middle):
            low = middle
        else:
            high = middle
    return low, False


def _allowed_gap(recomputed: float, tolerance: float) -> float:
    return max(tolerance * recomputed, ABSOLUTE_TOLERANCE)


def _verdict(claimed: float, recomputed: float, tolerance: float) -> str:
    gap = _allowed_gap(recomputed, tolerance)
    if claimed < recomputed - gap:
        return "under-reported"
    if claimed > recomputed + gap:
        return "over-reported"
    return "ok"


# ledger checks --------------------------------------------------------------------------


def _entry_format(entry: LedgerEntry) -> list[str]:
    """What is wrong with one (hash-valid) entry, as officer-readable phrases."""
    problems = []
    if not _SHA256.match(entry.dataset_id):
        problems.append(f"dataset_id {entry.dataset_id!r} is not a sha256 hex digest")
    if entry.kind not in LEDGER_KINDS:
        problems.append(f"kind {entry.kind!r} is not one of {', '.join(LEDGER_KINDS)}")
    if entry.accountant not in ACCOUNTANTS:
        problems.append(f"accountant {entry.accountant!r} is not one of {', '.join(ACCOUNTANTS)}")
    if not 0 < entry.delta < 1:
        problems.append(f"delta {entry.delta!r} is not in (0, 1)")
    if not entry.noise_multiplier > 0:
        problems.append(f"noise_multiplier {entry.noise_multiplier!r} is not positive")
    if not 0 < entry.sample_rate <= 1:
        problems.append(f"sample_rate {entry.sample_rate!r} is not in (0, 1]")
    if entry.steps < 1:
        problems.append(f"steps {entry.steps!r} is not a positive count")
    if entry.server_round < 1:
        problems.append(f"server_round {entry.server_round!r} is not positive")
    if not entry.max_grad_norm > 0:
        problems.append(f"max_grad_norm {entry.max_grad_norm!r} is not positive")
    if not entry.epsilon >= 0:
        problems.append(f"epsilon {entry.epsilon!r} is negative")
    if not entry.run_id:
        problems.append("run_id is empty")
    try:
        moment = datetime.fromisoformat(entry.time)
        if moment.utcoffset() is None:
            problems.append(f"time {entry.time!r} has no time zone")
    except ValueError:
        problems.append(f"time {entry.time!r} is not an ISO 8601 time")
    return problems


@dataclass
class _SiteLedger:
    site: SiteInput
    entries: list[LedgerEntry]
    policy: SitePolicy | None
    usable: bool


def _audit_ledger(site: SiteInput, report: AuditReport) -> _SiteLedger:
    where = f"site {site.site_id} ({site.state_dir})"
    policy: SitePolicy | None = None
    try:
        policy = load_policy(site.policy_path)
    except PolicyError as exc:
        report.add("fail", where, f"cannot read the site's privacy policy, so its cap is unknown: {exc}")
    if not (site.state_dir / LEDGER_FILE).exists():
        return _SiteLedger(site, [], policy, True)
    ledger = Ledger(site.state_dir)
    try:
        count = ledger.verify()
        entries = ledger.entries()
    except LedgerError as exc:
        report.add("fail", where, f"ledger verification failed: {exc}")
        return _SiteLedger(site, [], policy, False)
    report.add("info", where, f"ledger hash chain and head anchor verify ({count} entries)")
    usable = True
    seen: dict[tuple[str, str, int, str], int] = {}
    last_epsilon: dict[str, tuple[int, float]] = {}
    for entry in entries:
        entry_where = f"{where}: ledger entry {entry.index}"
        problems = _entry_format(entry)
        if problems:
            usable = False
            report.add("fail", entry_where, "bad entry format: " + "; ".join(problems))
            continue
        key = (entry.dataset_id, entry.run_id, entry.server_round, entry.kind)
        if entry.kind != "train":  # one personalisation per run and dataset
            key = (entry.dataset_id, entry.run_id, 0, entry.kind)
        if key in seen:
            what = "its personalisation" if entry.kind != "train" else f"round {entry.server_round}"
            report.add(
                "fail", entry_where,
                f"run {entry.run_id} {what} on dataset {entry.dataset_id[:12]} "
                f"is recorded twice (also entry {seen[key]})",
            )
        seen[key] = entry.index
        previous = last_epsilon.get(entry.dataset_id)
        if previous and entry.epsilon < previous[1]:
            report.add(
                "fail", entry_where,
                f"epsilon {entry.epsilon:.4f} is below the {previous[1]:.4f} of entry {previous[0]} "
                "for the same dataset: a cumulative spend cannot go down",
            )
        last_epsilon[entry.dataset_id] = (entry.index, entry.epsilon)
    return _SiteLedger(site, entries, policy, usable)


def _recompute_ledger(
    site: _SiteLedger, report: AuditReport, accounting: _Accounting, method: Method | None
) -> None:
    histories: dict[str, list[Step]] = {}
    for entry in site.entries:
        history = histories.setdefault(entry.dataset_id, [])
        history.append(entry.to_step())
        chosen = method or MATCHING_METHOD[entry.accountant]
        recomputed = accounting.independent(history, entry.delta, chosen)
        verdict = _verdict(entry.epsilon, recomputed, report.tolerance)
        gap = _allowed_gap(recomputed, report.tolerance)
        report.recomputed.append(Recomputed(
            site.site.site_id, entry.dataset_id, "ledger", entry.index, entry.run_id,
            entry.server_round, entry.delta, entry.epsilon, recomputed, chosen, gap, verdict,  # type: ignore[arg-type]
        ))
        where = f"site {site.site.site_id}: ledger entry {entry.index}"
        if verdict == "under-reported" and chosen in ("pld", MATCHING_METHOD[entry.accountant]):
            report.add(
                "fail", where,
                f"the ledger claims epsilon {entry.epsilon:.4f} for dataset {entry.dataset_id[:12]} "
                f"after run {entry.run_id} round {entry.server_round}, but its history composes to "
                f"{recomputed:.4f} ({chosen}, dp-accounting, delta={entry.delta:g}); the gap exceeds "
                f"the tolerance of {gap:.4f}: the ledger under-reports the spend",
            )
        elif verdict == "under-reported":
            report.add(
                "warn", where,
                f"the ledger's {entry.accountant} claim {entry.epsilon:.4f} is below dp-accounting's "
                f"{chosen} {recomputed:.4f}, which is the looser bound; not conclusive: use --method pld",
            )
        elif verdict == "over-reported":
            severity: Severity = "fail" if chosen == MATCHING_METHOD[entry.accountant] else "warn"
            report.add(
                severity, where,
                f"the ledger claims epsilon {entry.epsilon:.4f} but its history composes to "
                f"{recomputed:.4f} ({chosen}); the ledger's {entry.accountant} accountant "
                f"disagrees beyond the tolerance of {gap:.4f} (the claim is the more conservative)",
            )


def _ledger_budgets(site: _SiteLedger, report: AuditReport, accounting: _Accounting) -> None:
    by_dataset: dict[str, list[LedgerEntry]] = {}
    for entry in site.entries:
        by_dataset.setdefault(entry.dataset_id, []).append(entry)
    marker_dir = site.site.state_dir / NON_PRIVATE_DIR
    non_private = {p.name for p in marker_dir.iterdir()} if marker_dir.is_dir() else set()
    for dataset_id in sorted(set(by_dataset) | non_private):
        entries = by_dataset.get(dataset_id, [])
        report.budgets.append(
            _one_budget(site, dataset_id, entries, dataset_id in non_private, report, accounting)
        )


def _one_budget(
    site: _SiteLedger, dataset_id: str, entries: list[LedgerEntry], non_private: bool,
    report: AuditReport, accounting: _Accounting,
) -> DatasetBudget:
    policy = site.policy
    where = f"site {site.site.site_id}: dataset {dataset_id[:12]}"
    history = [e.to_step() for e in entries]
    claimed = entries[-1].epsilon if entries else 0.0
    delta = policy.delta if policy else (entries[-1].delta if entries else None)
    accountant = policy.accountant if policy else (entries[-1].accountant if entries else "prv")
    recomputed = (
        accounting.independent(history, delta, MATCHING_METHOD[accountant]) if history and delta else 0.0
    )
    cap = policy.max_epsilon if policy else None
    curve = [CurvePoint(e.run_id, e.server_round, e.epsilon) for e in entries]
    common = dict(
        site=site.site.site_id, dataset_id=dataset_id, source="ledger", rounds=sum(e.kind == "train" for e in entries),
        runs=len({e.run_id for e in entries}), spent_claimed=claimed,
        spent_recomputed=recomputed, delta=delta, accountant=accountant, curve=curve,
        noise_multiplier=next((e.noise_multiplier for e in reversed(entries) if e.kind == "train"),
                              entries[-1].noise_multiplier if entries else None),
    )
    if non_private:
        report.add(
            "fail", where,
            f"was trained WITHOUT differential privacy at this site (marker {NON_PRIVATE_DIR}/"
            f"{dataset_id[:12]}...); no epsilon bound holds for it. Its policy allowed "
            "allow_non_private; a new copy of the files gets a new budget, this one never does",
        )
        return DatasetBudget(**common, cap=cap, remaining=None, rounds_left=0,
                             rounds_left_at_least=False, private=False, status="not-private")
    if cap is None or delta is None:
        return DatasetBudget(**common, cap=None, remaining=None, rounds_left=None,
                             rounds_left_at_least=False, private=True, status="unknown-cap")
    spent = max(claimed, recomputed)
    status = "ok"
    if claimed > cap or recomputed > cap + _allowed_gap(recomputed, report.tolerance):
        status = "over-cap"
        report.add(
            "fail", where,
            f"spent epsilon {spent:.4f} (claimed {claimed:.4f}, recomputed {recomputed:.4f}) is over "
            f"the site's cap of {cap:g}",
        )
    rounds_left: int | None = None
    at_least = False
    rounds = [e for e in entries if e.kind == "train"]
    if rounds and status == "ok":
        rounds_left, at_least = accounting.rounds_left(history, rounds[-1].to_step(), delta, accountant, cap)
    return DatasetBudget(**common, cap=cap, remaining=cap - spent, rounds_left=rounds_left,
                         rounds_left_at_least=at_least, private=True, status=status)  # type: ignore[arg-type]


# run records ----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Reported:
    site: str
    run_id: str
    server_round: int
    status: str
    report: dict[str, Any]


def _normalise(value: Any) -> Any:
    return json.loads(json.dumps(_json_safe(value), sort_keys=True))


def _audit_run(
    path: Path, report: AuditReport, fingerprint: str | None
) -> tuple[str, list[_Reported]] | None:
    where = f"run record {path}"
    try:
        record = RunRecord.load(path)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        report.add("fail", where, f"cannot read the run record: {exc}")
        return None
    run_id = str(record.run_id)
    where = f"run {run_id}"
    if not record.manifest:
        report.add("fail", where, "the run record holds no federation manifest, so no report signature can be checked")
        return run_id, []
    try:
        manifest = Manifest.from_json(record.manifest, fingerprint)
    except ManifestError as exc:
        report.add("fail", where, f"the run's manifest does not verify: {exc}")
        return run_id, []
    if fingerprint is None:
        report.add(
            "warn", where,
            f"manifest signature checked against its own coordinator key {manifest.coordinator.fingerprint()[:16]}...; "
            "pass --coordinator-fingerprint (received out of band) to prove it is your coordinator's",
        )
    base = str(record.base_model.get("fingerprint", ""))
    reported: list[_Reported] = []
    for rnd in record.rounds:
        for site_id, site in sorted(rnd.sites.items()):
            site_where = f"run {run_id} round {rnd.server_round} site {site_id}"
            if not site.privacy_signed:
                if site.status in ("ok", "declined"):
                    report.add("fail", site_where, f"status {site.status} but no signed privacy report is recorded")
                continue
            try:
                signed = verify_report(site.privacy_signed, rnd.flower_run_id or record.run_id, rnd.server_round, base, manifest.site(site_id))
            except (ReportInvalid, ManifestError) as exc:
                report.add("fail", site_where, f"the privacy report's signature does not verify: {exc}")
                continue
            if _normalise(signed) != _normalise(site.privacy):
                report.add(
                    "fail", site_where,
                    "the run record's plain privacy summary differs from the report the site signed; "
                    "the signed report is used",
                )
            if signed.get("dp") is False:
                report.add("fail", site_where, "the site trained WITHOUT differential privacy in this round; no epsilon bound holds")
            reported.append(_Reported(site_id, run_id, rnd.server_round, site.status, signed))
    report.add("info", where, f"{len(reported)} signed privacy report(s) verify")
    return run_id, reported


def _cross_check(
    ledgers: list[_SiteLedger], runs: dict[str, list[_Reported]], report: AuditReport
) -> None:
    by_site = {s.site.site_id: s for s in ledgers if s.usable}
    for run_id, reports in runs.items():
        for rep in reports:
            if rep.status != "ok" or not rep.report.get("dp") or "ledger-index" not in rep.report:
                continue
            site = by_site.get(rep.site)
            if site is None:
                continue
            where = f"run {run_id} round {rep.server_round} site {rep.site}"
            index = rep.report["ledger-index"]
            entry = site.entries[index] if isinstance(index, int) and 0 <= index < len(site.entries) else None
            if entry is None or entry.hash != rep.report.get("ledger-hash"):
                report.add(
                    "fail", where,
                    f"the signed report names ledger entry {index} with hash "
                    f"{str(rep.report.get('ledger-hash'))[:16]}..., which the site's ledger at "
                    f"{site.site.state_dir} does not hold: the ledger and the coordinator disagree",
                )
                continue
            differing = [
                key for key, attr in _REPORT_FIELDS.items()
                if key in rep.report and _normalise(rep.report[key]) != _normalise(getattr(entry, attr))
            ]
            if entry.run_id != run_id or entry.server_round != rep.server_round:
                differing.append("run/round")
            if differing:
                report.add(
                    "fail", where,
                    f"ledger entry {index} differs from the signed report in {', '.join(differing)}",
                )
    reported_keys = {
        (rep.site, run_id, rep.server_round): rep
        for run_id, reports in runs.items() for rep in reports
    }
    for site in by_site.values():
        for entry in site.entries:
            if entry.run_id not in runs:
                continue
            if entry.kind == "personalise":
                report.add(
                    "info", f"site {site.site.site_id}: ledger entry {entry.index}",
                    f"run {entry.run_id}: private personalisation after round {entry.server_round}, "
                    "spent at the site and recorded in its ledger only (no update left the site); "
                    "it counts in the dataset's history",
                )
                continue
            rep = reported_keys.get((site.site.site_id, entry.run_id, entry.server_round))
            if rep is None or rep.status != "ok":
                report.add(
                    "warn", f"site {site.site.site_id}: ledger entry {entry.index}",
                    f"run {entry.run_id} round {entry.server_round} was spent at the site but the "
                    "coordinator recorded no successful report of it (the update may not have "
                    "arrived); the spend counts all the same",
                )
    unaudited = sorted({e.run_id for s in by_site.values() for e in s.entries} - set(runs))
    if runs and unaudited:
        report.add(
            "info", "cross-check",
            f"runs in the ledgers without a run record among the inputs (not cross-checked): {', '.join(unaudited)}",
        )


def _report_only_checks(
    ledger_sites: set[str], runs: dict[str, list[_Reported]], report: AuditReport,
    accounting: _Accounting, method: Method | None,
) -> None:
    """For sites without a ledger among the inputs: recompute from the reported rounds alone."""
    by_dataset: dict[tuple[str, str], list[_Reported]] = {}
    for reports in runs.values():
        for rep in reports:
            if rep.site in ledger_sites or rep.status != "ok" or not rep.report.get("dp"):
                continue
            if not isinstance(rep.report.get("ledger-index"), int):
                continue
            by_dataset.setdefault((rep.site, str(rep.report.get("dataset-id"))), []).append(rep)
    for (site_id, dataset_id), reps in sorted(by_dataset.items()):
        reps.sort(key=lambda r: r.report["ledger-index"])
        history: list[Step] = []
        curve: list[CurvePoint] = []
        where = f"site {site_id} (reports only): dataset {dataset_id[:12]}"
        for rep in reps:
            p = rep.report
            try:
                history.append(Step(float(p["noise-multiplier"]), float(p["sample-rate"]), int(p["steps"])))
                claimed, delta, accountant = float(p["epsilon"]), float(p["delta"]), str(p["accountant"])
                chosen = method or MATCHING_METHOD[accountant]
            except (KeyError, TypeError, ValueError) as exc:  # KeyError also for an unknown accountant
                report.add("fail", where, f"run {rep.run_id} round {rep.server_round}: malformed report ({exc})")
                break
            recomputed = accounting.independent(history, delta, chosen)
            verdict = "under-reported" if claimed < recomputed - _allowed_gap(recomputed, report.tolerance) else "ok"
            report.recomputed.append(Recomputed(
                site_id, dataset_id, "reports", p["ledger-index"], rep.run_id, rep.server_round,
                delta, claimed, recomputed, chosen, _allowed_gap(recomputed, report.tolerance), verdict,  # type: ignore[arg-type]
            ))
            curve.append(CurvePoint(rep.run_id, rep.server_round, claimed))
            if verdict == "under-reported":
                report.add(
                    "fail" if chosen in ("pld", MATCHING_METHOD.get(accountant)) else "warn", where,
                    f"run {rep.run_id} round {rep.server_round} reports epsilon {claimed:.4f}, but the "
                    f"reported rounds alone compose to {recomputed:.4f} ({chosen}): under-reported",
                )
        if not curve:
            continue
        last = reps[len(curve) - 1].report
        cap = float(last["cap-epsilon"]) if isinstance(last.get("cap-epsilon"), (int, float)) else None
        claimed = curve[-1].epsilon
        status = "over-cap" if cap is not None and claimed > cap else "ok"
        if status == "over-cap":
            report.add("fail", where, f"reported epsilon {claimed:.4f} is over the reported cap {cap:g}")
        report.budgets.append(DatasetBudget(
            site=site_id, dataset_id=dataset_id, source="reports", rounds=len(curve),
            runs=len({c.run_id for c in curve}), spent_claimed=claimed,
            spent_recomputed=report.recomputed[-1].recomputed, cap=cap,
            remaining=cap - claimed if cap is not None else None, rounds_left=None,
            rounds_left_at_least=False, noise_multiplier=history[-1].noise_multiplier,
            delta=float(last["delta"]), accountant=str(last["accountant"]), private=True,
            status=status, curve=curve,  # type: ignore[arg-type]
        ))
        report.add("info", where, "no site ledger among the inputs: only the rounds of the audited runs were recomputed, and rounds left are unknown")


def run_audit(
    paths: Sequence[Path],
    tolerance: float = DEFAULT_TOLERANCE,
    method: Method | None = None,
    coordinator_fingerprint: str | None = None,
) -> AuditReport:
    """Audit site ledgers and coordinator runs; see the module docstring for what is checked.

    ``method`` forces the independent accountant ("pld" or "rdp"); by default each ledger
    is recomputed with the one matching its accountant (PRV -> PLD, RDP -> RDP).
    Raises AuditInputError for paths that are neither.
    """
    if not (math.isfinite(tolerance) and 0 <= tolerance < 1):
        raise ValueError(f"tolerance must be a fraction in [0, 1), got {tolerance!r}")
    if method not in (None, "pld", "rdp"):
        raise ValueError(f"method must be 'pld' or 'rdp', got {method!r}")
    site_inputs, run_paths = classify_inputs(paths)
    report = AuditReport(
        inputs=[str(p) for p in paths], tolerance=tolerance,
        method=method or "matching (prv->pld, rdp->rdp)",
    )
    accounting = _Accounting()
    ledgers = [_audit_ledger(site, report) for site in site_inputs]
    report.sites = [s.site.site_id for s in ledgers]
    for site in ledgers:
        if site.usable:
            _recompute_ledger(site, report, accounting, method)
            _ledger_budgets(site, report, accounting)
    runs: dict[str, list[_Reported]] = {}
    for path in run_paths:
        audited = _audit_run(path, report, coordinator_fingerprint)
        if audited:
            runs[audited[0]] = audited[1]
    report.runs = list(runs)
    _cross_check(ledgers, runs, report)
    _report_only_checks({s.site.site_id for s in ledgers}, runs, report, accounting, method)
    return report


# report writers -------------------------------------------------------------------------


def _fmt(value: float | None, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    return f"{value:.{digits}f}"


def rounds_left_text(budget: DatasetBudget) -> str:
    if budget.rounds_left is None:
        return "unknown"
    return f">= {budget.rounds_left}" if budget.rounds_left_at_least else str(budget.rounds_left)


def budget_rows(report: AuditReport) -> list[list[str]]:
    """Rows of the budget table: site, dataset, rounds, runs, spent, recomputed, cap, remaining, rounds left, status."""
    return [
        [b.site, b.dataset_id[:12], str(b.rounds), str(b.runs), _fmt(b.spent_claimed),
         _fmt(b.spent_recomputed), _fmt(b.cap, 2), _fmt(b.remaining), rounds_left_text(b), b.status]
        for b in report.budgets
    ]


BUDGET_HEADER = ["site", "dataset", "rounds", "runs", "epsilon spent", "recomputed", "cap",
                 "remaining", "rounds left", "status"]
RECOMPUTED_HEADER = ["site", "source", "entry", "run", "round", "claimed", "recomputed",
                     "method", "allowed gap", "verdict"]


def recomputed_rows(report: AuditReport) -> list[list[str]]:
    return [
        [r.site, r.source, str(r.index), r.run_id, str(r.server_round), _fmt(r.claimed, 4),
         _fmt(r.recomputed, 4), r.method, _fmt(r.allowed_gap, 4), r.verdict]
        for r in report.recomputed
    ]


def empirical_rows(report: AuditReport) -> list[list[str]]:
    return [
        [e["label"], str(e["canaries"]), _fmt(e["noise_multiplier"], 4), _fmt(e["accounted_epsilon"]),
         _fmt(e["lower_bound"]), f"{e['correct']}/{e['guesses']}", e["verdict"]]
        for e in report.empirical
    ]


EMPIRICAL_HEADER = ["run", "canaries", "noise", "accounted epsilon", "lower bound (95%)",
                    "correct guesses", "verdict"]


def _intro(report: AuditReport) -> list[str]:
    verdict = "PASSED" if report.passed else f"FAILED ({len(report.failures())} failure(s))"
    return [
        f"Verdict: {verdict}",
        f"Inputs: {', '.join(report.inputs) or 'none'}",
        f"Sites: {', '.join(report.sites) or 'none'}; runs: {', '.join(report.runs) or 'none'}",
        f"Recomputation: dp-accounting, method {report.method}; a claimed epsilon fails when "
        f"it is below the recomputed one by more than max({report.tolerance:g} x recomputed, "
        f"{ABSOLUTE_TOLERANCE:g}).",
    ]


def write_markdown(report: AuditReport, path: Path) -> Path:
    """Write the audit as a Markdown report."""

    def table(header: list[str], rows: list[list[str]]) -> list[str]:
        return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
                *("| " + " | ".join(row) + " |" for row in rows), ""]

    lines = ["# fedtransfer privacy audit", "", *(f"- {line}" for line in _intro(report)), "",
             "## Budget per site and dataset", "",
             *table(BUDGET_HEADER, budget_rows(report)),
             "## Findings", ""]
    lines += [f"- **{f.severity}** {f.where}: {f.message}" for f in report.findings] or ["- none"]
    lines += ["", "## Epsilon recomputed independently", "", *table(RECOMPUTED_HEADER, recomputed_rows(report))]
    if report.empirical:
        lines += ["## Empirical one-run canary audit", "", *table(EMPIRICAL_HEADER, empirical_rows(report))]
    path = Path(path)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_html(report: AuditReport, path: Path) -> Path:
    """Write the audit as a self-contained HTML report."""
    e = html.escape

    def table(header: list[str], rows: list[list[str]]) -> str:
        head = "".join(f"<th>{e(h)}</th>" for h in header)
        body = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in rows)
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"

    findings = "".join(
        f'<li class="{f.severity}"><b>{e(f.severity)}</b> {e(f.where)}: {e(f.message)}</li>'
        for f in report.findings
    ) or "<li>none</li>"
    parts = [
        "<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>fedtransfer privacy audit</title>",
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #999;padding:3px 8px}li.fail{color:#b00}li.warn{color:#a60}</style>",
        "</head><body><h1>fedtransfer privacy audit</h1><ul>",
        "".join(f"<li>{e(line)}</li>" for line in _intro(report)), "</ul>",
        "<h2>Budget per site and dataset</h2>", table(BUDGET_HEADER, budget_rows(report)),
        "<h2>Findings</h2><ul>", findings, "</ul>",
        "<h2>Epsilon recomputed independently</h2>", table(RECOMPUTED_HEADER, recomputed_rows(report)),
    ]
    if report.empirical:
        parts += ["<h2>Empirical one-run canary audit</h2>", table(EMPIRICAL_HEADER, empirical_rows(report))]
    parts.append("</body></html>")
    path = Path(path)
    path.write_text("".join(parts) + "\n", encoding="utf-8")
    return path


def write_report(report: AuditReport, path: Path) -> Path:
    """Markdown for ``.md``, HTML for ``.html``/``.htm``."""
    suffix = Path(path).suffix.lower()
    if suffix == ".md":
        return write_markdown(report, path)
    if suffix in (".html", ".htm"):
        return write_html(report, path)
    raise ValueError(f"{path}: the report must end in .md or .html")


def write_plot(report: AuditReport, path: Path) -> Path:
    """PNG of cumulative epsilon per site dataset over its rounds (all runs), caps dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(8, 4.5))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for number, budget in enumerate(b for b in report.budgets if b.curve):
        colour = colours[number % len(colours)]
        xs = list(range(1, len(budget.curve) + 1))
        ys = [p.epsilon for p in budget.curve]
        label = f"{budget.site} ({budget.dataset_id[:8]})"
        ax.plot(xs, ys, marker="o", color=colour, label=label)
        starts = [x for x, prev, point in zip(xs[1:], budget.curve, budget.curve[1:]) if point.run_id != prev.run_id]
        for x in starts:
            ax.axvline(x - 0.5, color=colour, linestyle=":", linewidth=0.8)
        if budget.cap is not None:
            ax.axhline(budget.cap, color=colour, linestyle="--", linewidth=1, label=f"cap {budget.site} = {budget.cap:g}")
    ax.set_xlabel("rounds trained on the dataset, all runs in ledger order (dotted: a new run)")
    ax.set_ylabel("cumulative epsilon")
    ax.set_title("Privacy spent per site dataset")
    ax.set_ylim(bottom=0)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if report.budgets:
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
