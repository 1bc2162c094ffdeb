"""Site ledgers: chain, signed head, entry format, epsilons recomputed, and each dataset's budget."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime

from common.data.site_data import DataError, dataset_fingerprint
from common.privacy.accounting import ACCOUNTANTS, DEFAULT_ACCOUNTANT
from common.privacy.audit.inputs import SiteInput
from common.privacy.audit.model import (
    MATCHING_METHOD,
    AuditReport,
    CurvePoint,
    DatasetBudget,
    Method,
    Recomputed,
    over_gap,
    verdict,
)
from common.privacy.audit.recompute import Accounting
from common.privacy.dataset_id import keyed_id
from common.privacy.ledger import (
    LEDGER_FILE,
    LEDGER_KINDS,
    NOISE_UNRECORDED,
    NON_PRIVATE_DIR,
    PERSONALISE,
    STATE_IN_USE_FILE,
    TRAIN,
    Ledger,
    LedgerEntry,
    LedgerError,
)
from common.privacy.noise import NOISE_KINDS
from common.privacy.policy import PolicyError, SitePolicy, load_policy

_SHA256 = re.compile(r"^[0-9a-f]{64}$")


@dataclass
class SiteLedger:
    """One site's verified ledger: entries (with older content-hash ids mapped to keyed ids), policy, usability."""

    site: SiteInput
    entries: list[LedgerEntry]
    policy: SitePolicy | None
    usable: bool
    dataset_of: dict[int, str]  # entry index -> the dataset id it counts under
    current_dataset: str = ""  # the identity of the files at the site's data path now, if the audit can tell

    def dataset_name(self, dataset_id: str) -> str:
        """The name of a dataset the site holds now (its data path); empty for any other."""
        return self.site.data_name if dataset_id and dataset_id == self.current_dataset else ""

    def dataset(self, entry: LedgerEntry) -> str:
        return self.dataset_of.get(entry.index, entry.dataset_id)


def _entry_format(entry: LedgerEntry) -> list[str]:
    """What is wrong with one (hash-valid) entry, as officer-readable phrases."""
    problems = []
    if not _SHA256.match(entry.dataset_id):
        problems.append(f"dataset_id {entry.dataset_id!r} is not a 64-digit hex identity")
    if entry.kind not in LEDGER_KINDS:
        problems.append(f"kind {entry.kind!r} is not one of {', '.join(LEDGER_KINDS)}")
    if entry.accountant not in ACCOUNTANTS:
        problems.append(f"accountant {entry.accountant!r} is not one of {', '.join(ACCOUNTANTS)}")
    if entry.noise not in (*NOISE_KINDS, NOISE_UNRECORDED):
        problems.append(f"noise {entry.noise!r} is not one of {', '.join(NOISE_KINDS)}")
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


def _dataset_key(site: SiteInput) -> bytes | None:
    """The site's dataset-identity key, if it has one (read only: the audit never creates it)."""
    try:
        return (site.state_dir / STATE_IN_USE_FILE).read_bytes()
    except OSError:
        return None


def _current_dataset(site: SiteInput) -> str:
    """The identity of the files at the site's data path now, as the site computes it ("" if unknown)."""
    key = _dataset_key(site)
    if key is None or site.data_path is None:
        return ""
    try:
        return keyed_id(key, dataset_fingerprint(site.data_path.expanduser()))
    except (DataError, OSError):
        return ""


def _dataset_map(site: SiteInput, entries: list[LedgerEntry]) -> dict[int, str]:
    """Entries recorded under a content hash (before keyed ids) count under the keyed id the site now uses."""
    key = _dataset_key(site)
    if key is None:
        return {}
    recorded = {e.dataset_id for e in entries}
    mapped = {e.index: keyed_id(key, e.dataset_id) for e in entries}
    return {index: dataset for index, dataset in mapped.items() if dataset in recorded}


def audit_ledger(site: SiteInput, report: AuditReport) -> SiteLedger:
    where = f"site {site.site_id} ({site.state_dir})"
    policy: SitePolicy | None = None
    try:
        policy = load_policy(site.policy_path)
    except PolicyError as exc:
        report.add("fail", where, f"cannot read the site's privacy policy, so its cap is unknown: {exc}")
    if not (site.state_dir / LEDGER_FILE).exists() and not (site.state_dir / STATE_IN_USE_FILE).exists():
        return SiteLedger(site, [], policy, True, {})
    if site.site_key is None:
        report.add(
            "fail",
            where,
            "the ledger head's signature cannot be checked: no site key found "
            f"({site.key_source}); audit the site folder that holds site.toml, keys/ and the manifest",
        )
    ledger = Ledger(site.state_dir, site_key=site.site_key)
    try:
        count = ledger.verify()
        entries = ledger.entries()
    except LedgerError as exc:
        report.add("fail", where, f"ledger verification failed: {exc}")
        return SiteLedger(site, [], policy, False, {})
    signed = " and its head's signature" if ledger.head_signature_checked else ""
    report.add(
        "info", where, f"ledger hash chain, head anchor{signed} verify ({count} entries; key from {site.key_source})"
    )
    result = SiteLedger(site, entries, policy, True, _dataset_map(site, entries), _current_dataset(site))
    seen: dict[tuple[str, str, int, str], int] = {}
    last_epsilon: dict[str, tuple[int, float]] = {}
    for entry in entries:
        entry_where = f"{where}: ledger entry {entry.index}"
        problems = _entry_format(entry)
        if problems:
            result.usable = False
            report.add("fail", entry_where, "bad entry format: " + "; ".join(problems))
            continue
        dataset = result.dataset(entry)
        key = (dataset, entry.run_id, 0 if entry.kind == PERSONALISE else entry.server_round, entry.kind)
        if key in seen:
            what = "its personalisation" if entry.kind == PERSONALISE else f"{entry.kind} of round {entry.server_round}"
            report.add(
                "fail",
                entry_where,
                f"run {entry.run_id} {what} on dataset {dataset[:12]} is recorded twice (also entry {seen[key]})",
            )
        seen[key] = entry.index
        previous = last_epsilon.get(dataset)
        if previous and entry.epsilon < previous[1]:
            report.add(
                "fail",
                entry_where,
                f"epsilon {entry.epsilon:.4f} is below the {previous[1]:.4f} of entry "
                f"{previous[0]} for the same dataset: a cumulative spend cannot go down",
            )
        last_epsilon[dataset] = (entry.index, entry.epsilon)
    return result


def recompute_ledger(site: SiteLedger, report: AuditReport, accounting: Accounting, method: Method | None) -> None:
    """Recompute every entry's cumulative epsilon from its dataset's raw history with dp-accounting."""
    histories: dict[str, list] = {}
    for entry in site.entries:
        dataset = site.dataset(entry)
        history = histories.setdefault(dataset, [])
        history.append(entry.to_step())
        chosen = method or MATCHING_METHOD[entry.accountant]
        recomputed = accounting.independent(history, entry.delta, chosen)
        outcome = verdict(entry.epsilon, recomputed, report.tolerance)
        gap = report.tolerance if outcome == "under-reported" else over_gap(recomputed)
        report.recomputed.append(
            Recomputed(
                site.site.site_id,
                dataset,
                "ledger",
                entry.index,
                entry.run_id,
                entry.server_round,
                entry.delta,
                entry.epsilon,
                recomputed,
                chosen,
                gap,
                outcome,
            )
        )
        where = f"site {site.site.site_id}: ledger entry {entry.index}"
        matching = chosen == MATCHING_METHOD[entry.accountant]
        if outcome == "under-reported" and (matching or chosen == "pld"):
            report.add(
                "fail",
                where,
                f"the ledger claims epsilon {entry.epsilon:.4f} for dataset {dataset[:12]} after run "
                f"{entry.run_id} round {entry.server_round}, but its history composes to {recomputed:.4f} "
                f"({chosen}, dp-accounting, delta={entry.delta:g}), more than the accountant's error of "
                f"{report.tolerance:g} below: the ledger under-reports the spend",
            )
        elif outcome == "under-reported":
            report.add(
                "warn",
                where,
                f"the ledger's {entry.accountant} claim {entry.epsilon:.4f} is below "
                f"dp-accounting's {chosen} {recomputed:.4f}, the looser bound; not conclusive: "
                "use --method pld",
            )
        elif outcome == "over-reported":
            report.add(
                "warn",
                where,
                f"the ledger claims epsilon {entry.epsilon:.4f} but its history composes to "
                f"{recomputed:.4f} ({chosen}); the claim is the more conservative",
            )


def ledger_budgets(site: SiteLedger, report: AuditReport, accounting: Accounting) -> None:
    by_dataset: dict[str, list[LedgerEntry]] = {}
    for entry in site.entries:
        by_dataset.setdefault(site.dataset(entry), []).append(entry)
    marker_dir = site.site.state_dir / NON_PRIVATE_DIR
    non_private = {p.name for p in marker_dir.iterdir()} if marker_dir.is_dir() else set()
    non_private |= {site.dataset_of.get(e.index, e.dataset_id) for e in site.entries if e.dataset_id in non_private}
    for dataset_id in sorted(set(by_dataset) | non_private):
        report.budgets.append(
            _one_budget(site, dataset_id, by_dataset.get(dataset_id, []), dataset_id in non_private, report, accounting)
        )


def _one_budget(
    site: SiteLedger,
    dataset_id: str,
    entries: list[LedgerEntry],
    non_private: bool,
    report: AuditReport,
    accounting: Accounting,
) -> DatasetBudget:
    policy = site.policy
    name = site.dataset_name(dataset_id)
    where = f"site {site.site.site_id}: dataset {name or dataset_id[:12]}"
    history = [e.to_step() for e in entries]
    claimed = entries[-1].epsilon if entries else 0.0
    delta = policy.delta if policy else (entries[-1].delta if entries else None)
    accountant = policy.accountant if policy else (entries[-1].accountant if entries else DEFAULT_ACCOUNTANT)
    recomputed = accounting.independent(history, delta, MATCHING_METHOD[accountant]) if history and delta else 0.0
    cap = policy.max_epsilon if policy else None
    rounds = [e for e in entries if e.kind == TRAIN]
    common = dict(
        site=site.site.site_id,
        dataset_id=dataset_id,
        dataset_name=name,
        source="ledger",
        rounds=len(rounds),
        runs=len({e.run_id for e in entries}),
        spent_claimed=claimed,
        spent_recomputed=recomputed,
        delta=delta,
        accountant=accountant,
        curve=[CurvePoint(e.run_id, e.server_round, e.epsilon) for e in entries],
        noise_multiplier=rounds[-1].noise_multiplier if rounds else (entries[-1].noise_multiplier if entries else None),
        releases=len(entries) - len(rounds) - sum(e.kind == PERSONALISE for e in entries),
    )
    seeded = [e.index for e in entries if e.noise == "seeded"]
    if non_private or seeded:
        why = (
            f"was trained WITHOUT differential privacy at this site (marker {NON_PRIVATE_DIR}/...); its policy "
            "allowed allow_non_private"
            if non_private
            else f"has ledger entries {seeded} drawn with reproducible (seeded) noise, which anyone who knows the "
            "seed can replay: reproducible noise, NOT private (its policy allowed allow_reproducible_noise)"
        )
        report.add(
            "fail",
            where,
            f"{why}; no epsilon bound holds for it. A new copy of the files gets a new budget, this one never does",
        )
        return DatasetBudget(
            **common,
            cap=cap,
            remaining=None,
            rounds_left=0,
            rounds_left_at_least=False,
            private=False,
            status="not-private",
        )
    unrecorded = [e.index for e in entries if e.noise == NOISE_UNRECORDED]
    if unrecorded:
        report.add(
            "warn",
            where,
            f"ledger entries {unrecorded} were written before the noise source was recorded: "
            "a simulated site then drew seeded noise, a deployed one the operating system's",
        )
    if cap is None or delta is None:
        return DatasetBudget(
            **common,
            cap=None,
            remaining=None,
            rounds_left=None,
            rounds_left_at_least=False,
            private=True,
            status="unknown-cap",
        )
    spent = max(claimed, recomputed)
    status = "ok"
    if claimed > cap or recomputed > cap + report.tolerance:
        status = "over-cap"
        report.add(
            "fail",
            where,
            f"spent epsilon {spent:.4f} (claimed {claimed:.4f}, recomputed {recomputed:.4f}) "
            f"is over the site's cap of {cap:g}",
        )
    rounds_left: int | None = None
    at_least = False
    if rounds and status == "ok":
        rounds_left, at_least = accounting.rounds_left(history, rounds[-1].to_step(), delta, accountant, cap)
    return DatasetBudget(
        **common,
        cap=cap,
        remaining=cap - spent,
        rounds_left=rounds_left,
        rounds_left_at_least=at_least,
        private=True,
        status=status,
    )
