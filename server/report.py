"""The run report: a Markdown summary and a PNG of metrics per round per site."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from common.model.metrics import METRIC_NAMES  # noqa: E402
from common.run_record import RunRecord  # noqa: E402

REPORT_FILE = "report.md"
PLOT_FILE = "metrics.png"


def _fmt(value: float | None) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


def _site_metrics(record: RunRecord, server_round: int, site: str) -> dict[str, float]:
    """The metrics shown for a site and round: the simulator's exact ones if it measured them, else the
    ones derived from the site's DP release."""
    simulated = record.simulator_evaluation.get(str(server_round))
    if simulated is not None:
        return simulated.get(site, {})
    entry = next((r.sites.get(site) for r in record.rounds if r.server_round == server_round), None)
    return entry.metrics if entry is not None else {}


def round_table(record: RunRecord, metric: str = "roc-auc") -> list[str]:
    sites = record.site_ids()
    lines = ["| round | " + " | ".join(sites) + " | source (central) |", "|---" * (len(sites) + 2) + "|"]
    for r in record.rounds:
        cells = []
        for site in sites:
            entry = r.sites.get(site)
            if record.simulator_evaluation:
                cells.append(_fmt(_site_metrics(record, r.server_round, site).get(metric)))
            elif entry is None:
                cells.append("")
            elif entry.status != "ok":
                cells.append(entry.status)
            else:
                cells.append(_fmt(entry.metrics.get(metric)))
        lines.append(f"| {r.server_round} | " + " | ".join(cells) + f" | {_fmt(r.central.get(metric))} |")
    return lines


def released_table(record: RunRecord) -> list[str]:
    """What the sites released in their DP evaluations, as the coordinator derives it (noisy)."""
    rows = [
        (r.server_round, site, s)
        for r in record.rounds
        for site, s in sorted(r.sites.items())
        if s.metrics or s.personalised
    ]
    if not rows:
        return ["No site released an evaluation in this run (a site's policy decides; see docs/privacy.md)."]
    lines = ["| round | site | model | " + " | ".join(METRIC_NAMES) + " |", "|---" * (len(METRIC_NAMES) + 3) + "|"]
    for server_round, site, entry in rows:
        for label, values in (("global", entry.metrics), ("personalised", entry.personalised)):
            if values:
                lines.append(
                    f"| {server_round} | {site} | {label} | "
                    + " | ".join(_fmt(values.get(m)) for m in METRIC_NAMES)
                    + " |"
                )
    return lines


def privacy_lines(record: RunRecord) -> list[str]:
    """Cumulative epsilon per site per round (the max across sites, never a mean), and declines."""
    sites = record.site_ids()
    reports = [
        reply.report for r in record.rounds for s in r.sites.values() for reply in (s.train, s.evaluate) if reply
    ]
    if any(p.get("dp") is False for p in reports):
        return [
            "## Privacy",
            "",
            "**NOT PRIVATE: sites trained without differential privacy in this run "
            "(requested with --no-dp and allowed by their policies). No epsilon bound holds.**",
        ]
    accountants = sorted({str(p.get("accountant")) for p in reports if "accountant" in p})
    deltas = sorted({p.get("delta") for p in reports if "delta" in p})
    lines = [
        "## Privacy: cumulative epsilon per site dataset (record-level DP)",
        "",
        f"delta {', '.join(f'{d:g}' for d in deltas) or 'n/a'}; accountant {', '.join(accountants) or 'n/a'}; "
        "each value composes every round of every run that touched the site's dataset (and, in the last round, "
        "a private personalisation if the run reserved one).",
        "",
        "| round | " + " | ".join(sites) + " | max across sites |",
        "|---" * (len(sites) + 2) + "|",
    ]
    for r in (r for r in record.rounds if r.server_round > 0):
        cells, values = [], []
        for site in sites:
            entry = r.sites.get(site)
            epsilon = entry.epsilon() if entry else None
            if epsilon is not None:
                values.append(epsilon)
            if entry is None:
                cells.append("")
            elif entry.status != "ok":
                cells.append(entry.status + (f" ({_fmt(epsilon)})" if epsilon is not None else ""))
            else:
                cells.append(_fmt(epsilon))
        lines.append(f"| {r.server_round} | " + " | ".join(cells) + f" | {_fmt(max(values)) if values else 'n/a'} |")
    declined = sorted(
        {
            f"{site} (round {r.server_round}: {s.reason})"
            for r in record.rounds
            for site, s in r.sites.items()
            if s.status == "declined"
        }
    )
    lines += ["", "Declined: " + ("; ".join(declined) if declined else "none")]
    return lines


#: With more sites than this, the plot shows their mean and 10th/90th percentiles instead of a line per site.
MAX_LABELLED_SITES = 12


def plot_metrics(
    record: RunRecord, path: Path, metrics: tuple[str, ...] = ("roc-auc", "balanced-accuracy", "f1")
) -> Path:
    """Each site's metrics by round (their mean and spread beyond :data:`MAX_LABELLED_SITES` sites), beside the
    source model's central evaluation; written as a PNG to ``path``."""
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 4))
    sites = record.site_ids()
    labelled = len(sites) <= MAX_LABELLED_SITES
    for ax, metric in zip(axes, metrics):
        by_round: dict[int, list[float]] = {}
        for site in sites:
            points = [(r.server_round, _site_metrics(record, r.server_round, site).get(metric)) for r in record.rounds]
            points = [(x, y) for x, y in points if isinstance(y, float) and not math.isnan(y)]
            for x, y in points:
                by_round.setdefault(x, []).append(y)
            if points and labelled:
                ax.plot(*zip(*points), marker="o", label=site)
        if by_round and not labelled:
            rounds = sorted(by_round)
            for q, label in ((0.1, "10th and 90th percentiles"), (0.9, None)):
                quantiles = [float(np.quantile(by_round[x], q)) for x in rounds]
                ax.plot(rounds, quantiles, linestyle=":", color="grey", label=label)
            ax.plot(
                rounds, [float(np.mean(by_round[x])) for x in rounds], marker="o", label=f"mean of {len(sites)} sites"
            )
        central = [(r.server_round, r.central[metric]) for r in record.rounds if metric in r.central]
        if central:
            ax.plot(*zip(*central), marker="s", linestyle="--", color="black", label="source (central)")
        ax.set_title(metric)
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
    if axes[0].get_legend_handles_labels()[1]:
        axes[0].legend(fontsize=8)
    fig.suptitle(f"run {record.run_id}: {record.strategy}, transfer policy {record.transfer_policy}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def participant_lines(record: RunRecord) -> list[str]:
    """Who joined: each site's Flower node, its key's fingerprint, and when its first verified reply came."""
    lines = [
        "## Sites that joined",
        "",
        "| site | Flower node | key fingerprint | joined (UTC) | round |",
        "|---" * 5 + "|",
    ]
    for site, joined in sorted(record.participants.items()):
        key = f"{joined.key_fingerprint[:16]}..."
        lines.append(f"| {site} | {joined.node_id} | {key} | {joined.joined} | {joined.joined_round} |")
    return lines


def write_report(record: RunRecord, out: Path, extra_sections: list[str] | None = None) -> Path:
    """Write ``report.md`` and ``metrics.png`` into ``out``; return the report path."""
    plot_metrics(record, out / PLOT_FILE)
    lines = [
        f"# fedtransfer run {record.run_id}",
        "",
        f"- status: **{record.status}**" + (f" ({record.stop_reason})" if record.stop_reason else ""),
        f"- scenario: {record.settings.get('scenario') or 'deployment'}; strategy: {record.strategy}; "
        f"transfer policy: {record.transfer_policy}",
        f"- base model: {record.base_model['source']} (fingerprint {record.base_model['fingerprint'][:16]}...)",
        f"- final model: {record.final_checkpoint or 'none'}",
        *(
            [
                "- resumed after an interruption; round(s) "
                f"{', '.join(str(r.server_round) for r in record.abandoned_rounds)} "
                "began but never completed and were not reused (sites keep any spend they recorded for them)"
            ]
            if record.abandoned_rounds
            else []
        ),
        "",
        "## Test ROC AUC per round and site",
        "",
        (
            "Measured by the simulator on each simulated site's test split (it holds every site's data; a deployed "
            "coordinator cannot do this)."
            if record.simulator_evaluation
            else "Derived from each site's DP-released evaluation histogram (noisy; blank where a site released none)."
        ),
        "",
        *round_table(record),
        "",
        "## Federated evaluation as released by the sites (DP, noisy; what a deployed coordinator sees)",
        "",
        *released_table(record),
        "",
        f"![metrics]({PLOT_FILE})",
        "",
        *privacy_lines(record),
        "",
        *participant_lines(record),
        "",
    ]
    for section in extra_sections or []:
        lines += [section, ""]
    path = out / REPORT_FILE
    path.write_text("\n".join(lines))
    return path
