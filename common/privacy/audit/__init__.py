"""The privacy officer's audit: verify what was spent on every dataset, and that the number is right.

Inputs are site state directories (each holding a privacy ledger) and coordinator run
directories (each holding ``run-record.json`` with the sites' signed privacy reports).
:func:`run_audit` checks, without trusting the code that wrote them:

1. **Ledger integrity** (:mod:`.ledgers`): the hash chain, the head anchor and its signature
   by the site's key (from the coordinator-signed manifest the site holds), a ledger deleted
   from a state directory in use, and the format of every entry (kind, ranges, times, one
   entry per run, round and kind, non-decreasing epsilon per dataset, the noise source).
2. **Signed reports** (:mod:`.runs`): every privacy report in a run record verifies against the
   site key in the run's signed manifest, for exactly that run, round and base model; the
   recorded reply obeys the egress rule; the record's plain copy equals the signed one.
3. **Agreement**: every spend a report names is in that site's ledger (same index, hash and
   parameters); every ledger entry of an audited run was reported (unreported ones count;
   they are flagged).
4. **Recomputation** (:mod:`.recompute`): the epsilon after each ledger entry, from the raw
   history by a code base the ledger did not use (Opacus PRV for ``pld`` ledgers, which
   dp-accounting wrote; dp-accounting's PLD for PRV ledgers and its RDP for RDP ledgers); a claim
   below it by more than the accountant's documented error fails.
5. **Budget**: per site and dataset, spent, cap, remaining and rounds left; a dataset over its
   cap, trained without DP, or with reproducible noise, fails.

Nothing here writes to the audited directories except the ledger's lock file, which
readers share with a site that may be appending at the same time.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from common.privacy.audit.inputs import classify_inputs
from common.privacy.audit.ledgers import audit_ledger, ledger_budgets, recompute_ledger
from common.privacy.audit.model import (
    DEFAULT_TOLERANCE,
    AuditInputError,
    AuditReport,
    Method,
)
from common.privacy.audit.recompute import Accounting
from common.privacy.audit.render import (
    BUDGET_HEADER,
    EMPIRICAL_HEADER,
    SUMMARY_HEADER,
    budget_rows,
    empirical_rows,
    explanation,
    summary_rows,
    write_html,
    write_markdown,
    write_plot,
    write_report,
)
from common.privacy.audit.runs import (
    Reported,
    audit_run,
    cross_check,
    report_only_checks,
)

__all__ = [
    "BUDGET_HEADER",
    "DEFAULT_TOLERANCE",
    "EMPIRICAL_HEADER",
    "SUMMARY_HEADER",
    "AuditInputError",
    "AuditReport",
    "budget_rows",
    "empirical_rows",
    "explanation",
    "summary_rows",
    "run_audit",
    "write_html",
    "write_markdown",
    "write_plot",
    "write_report",
]


def run_audit(
    paths: Sequence[Path],
    tolerance: float = DEFAULT_TOLERANCE,
    method: Method | None = None,
    coordinator_fingerprint: str | None = None,
) -> AuditReport:
    """Audit site ledgers and coordinator runs; see the module docstring for what is checked.

    ``tolerance`` is how far below the recomputed epsilon a claim may lie: at most the
    accountant's documented error (the default). ``method`` forces the independent accountant
    ("pld" or "rdp"). Raises AuditInputError for paths that are neither kind of input.
    """
    if not (math.isfinite(tolerance) and 0 <= tolerance <= DEFAULT_TOLERANCE):
        raise ValueError(
            f"tolerance must be in [0, {DEFAULT_TOLERANCE:g}] (the accountant's documented error), got {tolerance!r}"
        )
    if method not in (None, "pld", "rdp", "prv"):
        raise ValueError(f"method must be 'pld' or 'rdp', got {method!r}")
    site_inputs, run_paths = classify_inputs(paths)
    report = AuditReport(
        inputs=[str(p) for p in paths], tolerance=tolerance, method=method or "matching (pld->prv, prv->pld, rdp->rdp)"
    )
    accounting = Accounting()
    ledgers = [audit_ledger(site, report) for site in site_inputs]
    report.sites = [s.site.site_id for s in ledgers]
    for site in ledgers:
        if site.usable:
            recompute_ledger(site, report, accounting, method)
            ledger_budgets(site, report, accounting)
    runs: dict[str, list[Reported]] = {}
    site_fingerprints = {s.coordinator_fingerprint: s.site_id for s in site_inputs if s.coordinator_fingerprint}
    for path in run_paths:
        audited = audit_run(path, report, coordinator_fingerprint, site_fingerprints)
        if audited:
            runs[audited[0]] = audited[1]
    report.runs = list(runs)
    cross_check(ledgers, runs, report)
    report_only_checks({s.site.site_id for s in ledgers}, runs, report, accounting, method)
    return report
