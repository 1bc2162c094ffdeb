"""The audit for people: tables, a Markdown or HTML report, and a plot of each dataset's spend."""

from __future__ import annotations

import html
import math
from pathlib import Path

from common.privacy.audit.model import AuditReport, DatasetBudget


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
    """Rows of the budget table (see :data:`BUDGET_HEADER`)."""
    return [
        [
            b.site,
            b.dataset,
            str(b.rounds),
            str(b.releases),
            str(b.runs),
            _fmt(b.spent_claimed),
            _fmt(b.spent_recomputed),
            "n/a" if b.delta is None else f"{b.delta:g}",
            _fmt(b.cap, 2),
            _fmt(b.remaining),
            rounds_left_text(b),
            b.status,
        ]
        for b in report.budgets
    ]


BUDGET_HEADER = [
    "site",
    "dataset",
    "rounds",
    "releases",
    "runs",
    "epsilon spent",
    "recomputed",
    "delta",
    "cap",
    "remaining",
    "rounds left",
    "status",
]
#: The budget table on a terminal: what a privacy officer reads first (the reports hold every column).
SUMMARY_HEADER = ["site", "dataset", "epsilon", "delta", "cap", "remaining", "rounds left", "status"]


def summary_rows(report: AuditReport) -> list[list[str]]:
    """Rows of the terminal's budget table (see :data:`SUMMARY_HEADER`)."""
    return [
        [
            b.site,
            b.dataset,
            _fmt(max(b.spent_claimed, b.spent_recomputed)),
            "n/a" if b.delta is None else f"{b.delta:g}",
            "n/a" if b.cap is None else f"{b.cap:g}",
            _fmt(b.remaining),
            rounds_left_text(b),
            b.status,
        ]
        for b in report.budgets
    ]


RECOMPUTED_HEADER = [
    "site",
    "source",
    "entry",
    "run",
    "round",
    "delta",
    "claimed",
    "recomputed",
    "method",
    "allowed gap",
    "verdict",
]


def recomputed_rows(report: AuditReport) -> list[list[str]]:
    return [
        [
            r.site,
            r.source,
            str(r.index),
            r.run_id,
            str(r.server_round),
            f"{r.delta:g}",
            _fmt(r.claimed, 4),
            _fmt(r.recomputed, 4),
            r.method,
            _fmt(r.allowed_gap, 4),
            r.verdict,
        ]
        for r in report.recomputed
    ]


def empirical_rows(report: AuditReport) -> list[list[str]]:
    return [
        [
            e["label"],
            str(e["canaries"]),
            f"{e['delta']:g}",
            _fmt(e["noise_multiplier"], 4),
            _fmt(e["accounted_epsilon"]),
            _fmt(e["lower_bound"]),
            f"{e['correct']}/{e['guesses']}",
            e["verdict"],
        ]
        for e in report.empirical
    ]


EMPIRICAL_HEADER = [
    "run",
    "canaries",
    "delta",
    "noise",
    "accounted epsilon",
    "lower bound (95%)",
    "correct guesses",
    "verdict",
]


def explanation(report: AuditReport) -> str:
    """What the figures mean, in plain words and with this audit's largest spend."""
    private = [b for b in report.budgets if b.private and b.delta is not None]
    if not private:
        return ""
    worst = max(private, key=lambda b: max(b.spent_claimed, b.spent_recomputed))
    epsilon, delta = max(worst.spent_claimed, worst.spent_recomputed), worst.delta
    return (
        "What the figures mean: epsilon measures how much any one patient's record can change what a site has "
        "released (its model updates and noisy evaluations), over every run that used the dataset; smaller is more "
        f"private. The largest here, epsilon {epsilon:.2f} at delta {delta:g} ({worst.site}), means that whatever "
        "anyone concludes from everything that site released, the coordinator included, is at most "
        f"{math.exp(epsilon):.1f} times (e to the power epsilon) more likely with a given patient's record in the "
        f"data than without it, except with a probability of at most delta (1 in {1 / delta:,.0f}). The cap is the "
        "most the site's policy allows over the dataset's lifetime; remaining is what is left for future runs; "
        "rounds left is how many more rounds like the last one fit under the cap."
    )


def _intro(report: AuditReport) -> list[str]:
    verdict = "PASSED" if report.passed else f"FAILED ({len(report.failures())} failure(s))"
    meaning = explanation(report)
    return [
        f"Verdict: {verdict}",
        *([meaning] if meaning else []),
        f"Inputs: {', '.join(report.inputs) or 'none'}",
        f"Sites: {', '.join(report.sites) or 'none'}; runs: {', '.join(report.runs) or 'none'}",
        f"Recomputation: dp-accounting, method {report.method}; a claimed epsilon fails when "
        f"it is below the recomputed one by more than {report.tolerance:g} (the accountant's documented error).",
    ]


def write_markdown(report: AuditReport, path: Path) -> Path:
    """Write the audit as a Markdown report."""

    def table(header: list[str], rows: list[list[str]]) -> list[str]:
        return [
            "| " + " | ".join(header) + " |",
            "|" + "---|" * len(header),
            *("| " + " | ".join(row) + " |" for row in rows),
            "",
        ]

    lines = [
        "# fedtransfer privacy audit",
        "",
        *(f"- {line}" for line in _intro(report)),
        "",
        "## Budget per site and dataset",
        "",
        *table(BUDGET_HEADER, budget_rows(report)),
        "## Findings",
        "",
    ]
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

    findings = (
        "".join(
            f'<li class="{f.severity}"><b>{e(f.severity)}</b> {e(f.where)}: {e(f.message)}</li>'
            for f in report.findings
        )
        or "<li>none</li>"
    )
    parts = [
        '<!DOCTYPE html><html><head><meta charset="utf-8"><title>fedtransfer privacy audit</title>',
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #999;padding:3px 8px}li.fail{color:#b00}li.warn{color:#a60}</style>",
        "</head><body><h1>fedtransfer privacy audit</h1><ul>",
        "".join(f"<li>{e(line)}</li>" for line in _intro(report)),
        "</ul>",
        "<h2>Budget per site and dataset</h2>",
        table(BUDGET_HEADER, budget_rows(report)),
        "<h2>Findings</h2><ul>",
        findings,
        "</ul>",
        "<h2>Epsilon recomputed independently</h2>",
        table(RECOMPUTED_HEADER, recomputed_rows(report)),
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


def plot_path(path: Path) -> Path:
    """Where :func:`write_plot` writes for ``path``: ``path`` itself if it ends in .png, else ``path`` + .png."""
    path = Path(path)
    return path if path.suffix.lower() == ".png" else path.with_name(path.name + ".png")


def write_plot(report: AuditReport, path: Path) -> Path:
    """PNG of cumulative epsilon per site dataset over its rounds (all runs), caps dashed; returns the file."""
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
        label = f"{budget.site} ({budget.dataset})"
        ax.plot(xs, ys, marker="o", color=colour, label=label)
        starts = [x for x, prev, point in zip(xs[1:], budget.curve, budget.curve[1:]) if point.run_id != prev.run_id]
        for x in starts:
            ax.axvline(x - 0.5, color=colour, linestyle=":", linewidth=0.8)
        if budget.cap is not None:
            ax.axhline(
                budget.cap, color=colour, linestyle="--", linewidth=1, label=f"cap {budget.site} = {budget.cap:g}"
            )
    ax.set_xlabel("rounds trained on the dataset, all runs in ledger order (dotted: a new run)")
    ax.set_ylabel("cumulative epsilon")
    ax.set_title("Privacy spent per site dataset")
    ax.set_ylim(bottom=0)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if report.budgets:
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    path = plot_path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
