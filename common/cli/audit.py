"""``fedtransfer audit``: how much privacy budget each dataset has spent, and is that number right."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from rich import box
from rich.table import Table

from common.cli.console import console, log_console, say

if TYPE_CHECKING:
    from common.privacy.audit import AuditReport

COMMANDS = ("audit",)
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
_STYLE = {"fail": "bold red", "warn": "yellow", "info": "dim"}


def _table(title: str, header: list[str], rows: list[list[str]]) -> Table:
    """Every cell in full; on a narrow terminal the headers wrap instead."""
    table = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    for index, column in enumerate(header):
        width = max([len(row[index]) for row in rows] + [len(word) for word in column.split()])
        justify = "left" if column in ("site", "dataset", "status", "run", "verdict") else "right"
        table.add_column(column, justify=justify, min_width=width)
    for row in rows:
        table.add_row(*row)
    return table


def _print(report: AuditReport) -> None:
    from common.privacy.audit import EMPIRICAL_HEADER, SUMMARY_HEADER, empirical_rows, explanation, summary_rows

    if report.budgets:
        console.print(
            _table(
                "Privacy budget per site and dataset (cumulative over all runs)", SUMMARY_HEADER, summary_rows(report)
            )
        )
    if report.empirical:
        console.print(
            _table(
                "Empirical one-run canary audit (Steinke, Nasr, Jagielski 2023)",
                EMPIRICAL_HEADER,
                empirical_rows(report),
            )
        )
    for finding in report.findings:
        style = _STYLE[finding.severity]
        console.print(
            f"[{style}]{finding.severity.upper()}[/{style}] {finding.where}: {finding.message}", highlight=False
        )
    recomputed = len(report.recomputed)
    console.print(
        f"{recomputed} epsilon value(s) recomputed independently ({report.method}); a claim may lie at most "
        f"{report.tolerance:g} below (the accountant's documented error)."
    )
    meaning = explanation(report)
    if meaning:
        console.print(meaning, highlight=False)
    if report.passed:
        console.print("[bold green]AUDIT PASSED[/bold green]")
    else:
        console.print(f"[bold red]AUDIT FAILED: {len(report.failures())} failure(s)[/bold red]")


def _empirical(args: argparse.Namespace, report: AuditReport) -> None:
    from client.canary_audit import CanaryConfig, run_canary_audit

    config = CanaryConfig(canaries=args.canaries, seed=args.seed, target_epsilon=args.audit_epsilon)
    if not args.json:
        console.print(
            f"Empirical audit: training a twin model twice with {config.canaries} canaries through the site's DP-SGD "
            "code..."
        )
    audit = run_canary_audit(config)
    for run in (audit.honest, audit.control):
        report.empirical.append(run.to_dict())
    report.add("info" if audit.passed else "fail", "empirical audit", audit.explanation())


def _usage_error(message: str) -> int:
    log_console.print(f"[red]fedtransfer audit: {message}[/red]", highlight=False, soft_wrap=True)
    return EXIT_USAGE


def _cmd_audit(args: argparse.Namespace) -> int:
    from common.privacy.audit import AuditInputError, AuditReport, run_audit, write_plot, write_report
    from common.privacy.audit.model import DEFAULT_TOLERANCE

    if not args.paths and not args.empirical:
        return _usage_error("give site state directories and/or coordinator run directories, or --empirical")
    if args.report and Path(args.report).suffix.lower() not in (".md", ".html", ".htm"):
        return _usage_error(f"--report {args.report}: the report must end in .md or .html")
    tolerance = DEFAULT_TOLERANCE if args.tolerance is None else args.tolerance
    logging.getLogger("absl").setLevel(logging.ERROR)  # dp-accounting's notes on skipped RDP orders
    try:
        report = (
            run_audit(
                [Path(p) for p in args.paths],
                tolerance=tolerance,
                method=args.method,
                coordinator_fingerprint=args.coordinator_fingerprint,
            )
            if args.paths
            else AuditReport(inputs=[], tolerance=tolerance, method=args.method or "matching")
        )
    except (AuditInputError, ValueError) as exc:
        return _usage_error(str(exc))
    if args.empirical:
        from client.canary_audit import CanaryAuditError

        try:
            _empirical(args, report)
        except CanaryAuditError as exc:
            return _usage_error(f"--empirical: {exc}")
    written = []
    if args.report:
        written.append(write_report(report, Path(args.report)))
    if args.plot:
        written.append(write_plot(report, Path(args.plot)))
    if args.json:
        sys.stdout.write(json.dumps(report.to_dict(), indent=2, sort_keys=True) + "\n")
    else:
        _print(report)
    for path in written:
        say(f"Wrote {path}")
    return EXIT_OK if report.passed else EXIT_FAILED


def add_commands(commands: argparse._SubParsersAction) -> None:
    audit = commands.add_parser(
        "audit",
        help="verify every dataset's privacy spend from site ledgers and coordinator runs",
        description=(
            "Verify site privacy ledgers (hash chain, entry format), the sites' signed privacy "
            "reports in coordinator run records, and that both agree; recompute every epsilon "
            "with Google's dp-accounting; show spent, cap, remaining and rounds left per site "
            "and dataset. Exit status 1 if anything fails verification or exceeds a cap."
        ),
    )
    audit.add_argument(
        "paths",
        nargs="*",
        help="site state directories (or site folders holding state/) and coordinator run directories (or their "
        "run-record.json)",
    )
    audit.add_argument("--json", action="store_true", help="print the audit as JSON instead of tables")
    audit.add_argument("--report", default="", help="also write a report: PATH.md (Markdown) or PATH.html")
    audit.add_argument(
        "--plot",
        default="",
        help="also write a PNG plot (PATH, or PATH.png when PATH does not end in .png): cumulative epsilon per site "
        "over rounds and runs, caps dashed",
    )
    audit.add_argument(
        "--tolerance",
        type=float,
        default=None,
        help="how far below the recomputed epsilon a claim may lie, at most the accountant's documented error "
        "(default: that error)",
    )
    audit.add_argument(
        "--method",
        choices=("pld", "rdp", "prv"),
        default=None,
        help="independent accountant; default: Opacus PRV for PLD ledgers, dp-accounting PLD for PRV ledgers, "
        "dp-accounting RDP for RDP ledgers",
    )
    audit.add_argument(
        "--coordinator-fingerprint",
        default=None,
        help="the coordinator's key fingerprint, received out of band, to authenticate run manifests",
    )
    audit.add_argument(
        "--empirical",
        action="store_true",
        help="also run the one-run canary audit of the DP training code, with a noise-off control",
    )
    audit.add_argument(
        "--canaries", type=int, default=1000, help="canaries in the empirical audit (default: %(default)s)"
    )
    audit.add_argument(
        "--audit-epsilon",
        type=float,
        default=2.0,
        help="epsilon the empirical audit's twin run is calibrated to (default: %(default)s)",
    )
    audit.add_argument("--seed", type=int, default=0, help="seed of the empirical audit's twin (default: %(default)s)")
    audit.set_defaults(func=_cmd_audit)
