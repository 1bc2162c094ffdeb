"""Coordinator run records: the sites' signed reports, checked and compared with the sites' ledgers."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.privacy.accounting import Step
from common.privacy.audit.ledgers import SiteLedger
from common.privacy.audit.model import (
    MATCHING_METHOD,
    AuditReport,
    CurvePoint,
    DatasetBudget,
    Method,
    Recomputed,
    json_safe,
)
from common.privacy.audit.recompute import Accounting
from common.privacy.egress import EgressViolation, check_reply
from common.privacy.ledger import PERSONALISE
from common.privacy.report import ReportInvalid, verify_report
from common.run_record import RunRecord
from common.security.keys import PublicIdentity
from common.security.manifest import Manifest, ManifestError

#: Spend fields of a report compared with the ledger entry they name: report key -> entry attribute.
_SPEND_FIELDS = {
    "kind": "kind",
    "ledger-hash": "hash",
    "noise-multiplier": "noise_multiplier",
    "sample-rate": "sample_rate",
    "steps": "steps",
    "clip": "max_grad_norm",
}
#: Report fields compared with the last entry the reply caused.
_REPORT_FIELDS = {
    "dataset-id": "dataset_id",
    "epsilon": "epsilon",
    "delta": "delta",
    "accountant": "accountant",
    "reference-epsilon": "reference_epsilon",
    "reference-accountant": "reference_accountant",
    "noise": "noise",
}


@dataclass(frozen=True)
class Reported:
    """One verified reply of one site in one round of an audited run."""

    site: str
    run_id: str
    server_round: int
    phase: str
    status: str
    report: dict[str, Any]


def _normalise(value: Any) -> Any:
    return json.loads(json.dumps(json_safe(value), sort_keys=True))


def _claimed_coordinator(manifest_json: str) -> str | None:
    """The coordinator fingerprint a manifest names (its signature is checked when it is opened)."""
    try:
        return PublicIdentity.from_dict(json.loads(manifest_json)["coordinator"]).fingerprint()
    except (ValueError, KeyError, TypeError):
        return None


def _open_manifest(
    record: RunRecord, report: AuditReport, fingerprint: str | None, site_fingerprints: dict[str, str]
) -> Manifest:
    """The run's manifest, authenticated by the fingerprint given, else by one a site's site.toml holds.

    Without either, it is opened on its own key (trust on first use) and the audit says, once, how to
    check it.
    """
    claimed = _claimed_coordinator(record.manifest)
    manifest = Manifest.from_json(record.manifest, fingerprint or claimed)
    if fingerprint is not None:
        return manifest
    if claimed in site_fingerprints:
        report.add(
            "info",
            f"run {record.run_id}",
            f"manifest signed by the coordinator key {claimed[:16]}... that site {site_fingerprints[claimed]}'s "
            "site.toml names",
        )
    else:
        report.add(
            "warn",
            f"run {record.run_id}",
            f"its manifest is signed by coordinator key {manifest.coordinator.fingerprint()[:16]}..., which nothing "
            "given to the audit confirms. Pass --coordinator-fingerprint with the fingerprint the coordinator gave "
            "you out of band (a deployed site keeps it in its site.toml as coordinator-fingerprint), or audit the "
            "run together with its sites' folders: a simulation keeps each simulated site's site.toml under its "
            "--sim-root (by default OUT/sites/).",
        )
    return manifest


def audit_run(
    path: Path, report: AuditReport, fingerprint: str | None, site_fingerprints: dict[str, str] | None = None
) -> tuple[str, list[Reported]] | None:
    """Check one run's signed privacy reports; ``site_fingerprints`` maps a coordinator fingerprint that a
    given site's site.toml holds to that site."""
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
        manifest = _open_manifest(record, report, fingerprint, site_fingerprints or {})
    except ManifestError as exc:
        report.add("fail", where, f"the run's manifest does not verify: {exc}")
        return run_id, []
    base = str(record.base_model.get("fingerprint", ""))
    reported: list[Reported] = []
    for rnd in record.rounds:
        for site_id, site in sorted(rnd.sites.items()):
            for phase, reply in (("train", site.train), ("evaluate", site.evaluate)):
                site_where = f"run {run_id} round {rnd.server_round} site {site_id} ({phase})"
                if reply is None:
                    continue
                try:
                    signed = verify_report(
                        reply.report_signed,
                        record.run_id,
                        rnd.server_round,
                        base,
                        manifest.site(site_id),
                    )
                    check_reply(phase, reply.status, reply.values, phase == "train" and reply.status == "ok", signed)
                except (ReportInvalid, ManifestError) as exc:
                    report.add("fail", site_where, f"the privacy report's signature does not verify: {exc}")
                    continue
                except EgressViolation as exc:
                    report.add("fail", site_where, f"the recorded reply breaks the egress rule: {exc}")
                    continue
                if _normalise(signed) != _normalise(reply.report):
                    report.add(
                        "fail",
                        site_where,
                        "the run record's copy of the report differs from the one the site "
                        "signed; the signed report is used",
                    )
                if signed.get("dp") is False:
                    report.add(
                        "fail", site_where, "the site trained WITHOUT differential privacy; no epsilon bound holds"
                    )
                elif signed.get("noise") == "seeded":
                    report.add("fail", site_where, "the site drew reproducible (seeded) noise: NOT private")
                reported.append(Reported(site_id, run_id, rnd.server_round, phase, reply.status, signed))
    report.add("info", where, f"{len(reported)} signed privacy report(s) verify and obey the egress rule")
    return run_id, reported


def _spends(rep: Reported) -> list[dict[str, Any]]:
    return [s for s in rep.report.get("spends", []) if isinstance(s, dict)]


def cross_check(ledgers: list[SiteLedger], runs: dict[str, list[Reported]], report: AuditReport) -> None:
    """Every spend a site reported is in its ledger as reported; every ledger entry of an audited run was reported."""
    by_site = {s.site.site_id: s for s in ledgers if s.usable}
    reported_entries: dict[str, set[int]] = {}
    for run_id, reports in runs.items():
        for rep in reports:
            site = by_site.get(rep.site)
            if site is None or rep.report.get("dp") is False:
                continue
            where = f"run {run_id} round {rep.server_round} site {rep.site} ({rep.phase})"
            spends = _spends(rep)
            for spend in spends:
                index = spend.get("ledger-index")
                entry = site.entries[index] if isinstance(index, int) and 0 <= index < len(site.entries) else None
                if entry is None or entry.hash != spend.get("ledger-hash"):
                    report.add(
                        "fail",
                        where,
                        f"the signed report names ledger entry {index} with hash "
                        f"{str(spend.get('ledger-hash'))[:16]}..., which the site's ledger at "
                        f"{site.site.state_dir} does not hold: the ledger and the coordinator disagree",
                    )
                    continue
                reported_entries.setdefault(rep.site, set()).add(entry.index)
                differing = [
                    key
                    for key, attr in _SPEND_FIELDS.items()
                    if key in spend and _normalise(spend[key]) != _normalise(getattr(entry, attr))
                ]
                if entry.run_id != run_id or entry.server_round != rep.server_round:
                    differing.append("run/round")
                if differing:
                    report.add(
                        "fail",
                        where,
                        f"ledger entry {entry.index} differs from the signed report in {', '.join(differing)}",
                    )
            if spends:
                last = max(spends, key=lambda s: s.get("ledger-index", -1))
                index = last.get("ledger-index")
                if isinstance(index, int) and 0 <= index < len(site.entries):
                    entry = site.entries[index]
                    differing = [
                        key
                        for key, attr in _REPORT_FIELDS.items()
                        if key in rep.report and _normalise(rep.report[key]) != _normalise(getattr(entry, attr))
                    ]
                    if differing:
                        report.add(
                            "fail",
                            where,
                            f"the report's {', '.join(differing)} differ from its last ledger entry {index}",
                        )
    for site in by_site.values():
        for entry in site.entries:
            if entry.run_id not in runs or entry.index in reported_entries.get(site.site.site_id, set()):
                continue
            where = f"site {site.site.site_id}: ledger entry {entry.index}"
            if entry.kind == PERSONALISE:
                report.add(
                    "warn",
                    where,
                    f"run {entry.run_id}: a private personalisation the coordinator recorded no "
                    "report of (the evaluation after it may not have arrived); it counts all the same",
                )
            else:
                report.add(
                    "warn",
                    where,
                    f"run {entry.run_id} round {entry.server_round}: {entry.kind} spent at the site "
                    "but the coordinator recorded no report of it (the reply may not have "
                    "arrived); the spend counts all the same",
                )
    unaudited = sorted({e.run_id for s in by_site.values() for e in s.entries} - set(runs))
    if runs and unaudited:
        report.add(
            "info",
            "cross-check",
            f"runs in the ledgers without a run record among the inputs (not cross-checked): {', '.join(unaudited)}",
        )


def report_only_checks(
    ledger_sites: set[str],
    runs: dict[str, list[Reported]],
    report: AuditReport,
    accounting: Accounting,
    method: Method | None,
) -> None:
    """For sites without a ledger among the inputs: recompute from the spends their reports name."""
    by_dataset: dict[tuple[str, str], list[Reported]] = {}
    for reports in runs.values():
        for rep in reports:
            if rep.site in ledger_sites or rep.status != "ok" or rep.report.get("dp") is False or not _spends(rep):
                continue
            by_dataset.setdefault((rep.site, str(rep.report.get("dataset-id"))), []).append(rep)
    for (site_id, dataset_id), reps in sorted(by_dataset.items()):
        reps.sort(key=lambda r: max(s.get("ledger-index", -1) for s in _spends(r)))
        history: list[Step] = []
        curve: list[CurvePoint] = []
        where = f"site {site_id} (reports only): dataset {dataset_id[:12]}"
        for rep in reps:
            p = rep.report
            try:
                history += [
                    Step(float(s["noise-multiplier"]), float(s["sample-rate"]), int(s["steps"])) for s in _spends(rep)
                ]
                claimed, delta, accountant = float(p["epsilon"]), float(p["delta"]), str(p["accountant"])
                chosen = method or MATCHING_METHOD[accountant]
            except (KeyError, TypeError, ValueError) as exc:  # KeyError also for an unknown accountant
                report.add("fail", where, f"run {rep.run_id} round {rep.server_round}: malformed report ({exc})")
                break
            recomputed = accounting.independent(history, delta, chosen)
            outcome = "under-reported" if claimed < recomputed - report.tolerance else "ok"
            index = max(s["ledger-index"] for s in _spends(rep))
            report.recomputed.append(
                Recomputed(
                    site_id,
                    dataset_id,
                    "reports",
                    index,
                    rep.run_id,
                    rep.server_round,
                    delta,
                    claimed,
                    recomputed,
                    chosen,
                    report.tolerance,
                    outcome,
                )
            )
            curve.append(CurvePoint(rep.run_id, rep.server_round, claimed))
            if outcome == "under-reported":
                report.add(
                    "fail" if chosen in ("pld", MATCHING_METHOD.get(accountant)) else "warn",
                    where,
                    f"run {rep.run_id} round {rep.server_round} reports epsilon {claimed:.4f}, but the reported "
                    f"spends alone compose to {recomputed:.4f} ({chosen}): under-reported",
                )
        if not curve:
            continue
        last = reps[len(curve) - 1].report
        cap = float(last["cap-epsilon"]) if isinstance(last.get("cap-epsilon"), (int, float)) else None
        claimed = curve[-1].epsilon
        status = "over-cap" if cap is not None and claimed > cap else "ok"
        if status == "over-cap":
            report.add("fail", where, f"reported epsilon {claimed:.4f} is over the reported cap {cap:g}")
        report.budgets.append(
            DatasetBudget(
                site=site_id,
                dataset_id=dataset_id,
                source="reports",
                rounds=sum(r.phase == "train" for r in reps),
                runs=len({c.run_id for c in curve}),
                spent_claimed=claimed,
                spent_recomputed=report.recomputed[-1].recomputed,
                cap=cap,
                remaining=cap - claimed if cap is not None else None,
                rounds_left=None,
                rounds_left_at_least=False,
                noise_multiplier=history[-1].noise_multiplier,
                delta=float(last["delta"]),
                accountant=str(last["accountant"]),
                private=True,
                status=status,
                curve=curve,
            )
        )
        report.add(
            "info",
            where,
            "no site ledger among the inputs: only the spends the audited runs reported were "
            "recomputed, and rounds left are unknown",
        )
