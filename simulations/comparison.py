"""The comparison a simulated run ends with: every method on every target site, every metric clinicians read.

Methods, in order: the base model as-is (source model, or the initial model when there is no
source), local-only without DP, local-only with DP at the run's epsilon, the federated global
model, the sites' personalised copies, pooled. Each row says whether it is private and who
evaluated it: the simulator (exact, with bootstrap 95% intervals: it holds every site's test
split) or the sites' DP releases (noisy; the personalised copies never leave their sites).
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from common.data.scenario import Scenario  # noqa: E402
from common.model.checkpoint import load_checkpoint  # noqa: E402
from common.model.metrics import METRIC_NAMES  # noqa: E402
from common.model.training import as_tensors, predict_proba  # noqa: E402
from common.run_record import RunRecord  # noqa: E402
from simulations.baselines import NOT_PRIVATE, MethodScores  # noqa: E402

COMPARISON_PLOT = "comparison.png"
ORDER = ("source as-is", "initial model", "local-only", "local-only (DP)", "federated", "personalised", "pooled")
LABELS = {
    "roc-auc": "AUC",
    "balanced-accuracy": "bal. acc.",
    "f1": "F1",
    "sensitivity": "sens.",
    "specificity": "spec.",
    "accuracy": "acc.",
    "test-size": "n",
}
SHOWN = tuple(m for m in METRIC_NAMES if m != "test-size")


def _privacy(record: RunRecord) -> str:
    settings = record.settings
    if not settings.get("dp", True):
        return NOT_PRIVATE
    return f"DP, epsilon {settings.get('target_epsilon'):g}, delta {settings.get('delta'):g}"


def federated_scores(record: RunRecord, scenario: Scenario, seed: int) -> MethodScores:
    """The final global model on every site's test split, scored by the simulator."""
    scores = MethodScores("federated", _privacy(record))
    model, _ = load_checkpoint(Path(record.final_checkpoint))
    for site in scenario.sites:
        scores.add(site.name, site.test.y, predict_proba(model, as_tensors(site.test.x, site.test.y)[0]), seed)
    return scores


def personalised_scores(record: RunRecord) -> MethodScores | None:
    """The personalised copies as their sites released them (noisy with DP); None if no site released any."""
    last = next((r for r in reversed(record.rounds) if any(s.personalised for s in r.sites.values())), None)
    if last is None:
        return None
    evaluated = "the sites' DP releases (noisy)" if record.settings.get("dp", True) else "the sites (exact counts)"
    scores = MethodScores("personalised", _privacy(record), evaluated_by=evaluated)
    for site, entry in last.sites.items():
        if entry.personalised:
            scores.sites[site] = {m: float(entry.personalised.get(m, math.nan)) for m in METRIC_NAMES}
    return scores


def ordered(methods: list[MethodScores]) -> list[MethodScores]:
    return sorted(methods, key=lambda m: ORDER.index(m.method))


def fmt(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.3f}"


def _interval(scores: MethodScores, site: str, metric: str) -> str:
    low, high = scores.intervals.get(site, {}).get(metric, [math.nan, math.nan])
    return "" if math.isnan(low) else f" [{low:.2f}, {high:.2f}]"


def test_sizes(methods: list[MethodScores]) -> dict[str, int]:
    """Test rows per site, from the simulator's own evaluations (exact)."""
    sizes: dict[str, int] = {}
    for scores in methods:
        if scores.evaluated_by == "simulator":
            for site, metrics in scores.sites.items():
                sizes.setdefault(site, int(metrics["test-size"]))
    return sizes


def comparison_markdown(methods: list[MethodScores], metric: str) -> str:
    """report.md's comparison: means over sites of every metric, then the headline metric per site with intervals."""
    sizes = test_sizes(methods)
    sites = sorted(sizes)
    lines = [
        "## Comparison on the target sites' test sets",
        "",
        f"{len(sites)} target sites, test rows per site: "
        + ", ".join(f"{s} {sizes[s]}" for s in sites)
        + ". Means over sites; the simulator scores every model it holds on each site's test split "
        "(a deployed coordinator cannot: it sees only the sites' DP releases). Brackets: bootstrap 95% intervals. "
        "Pooled trains on all target sites' data in one place without DP: a reference, not an upper bound.",
        "",
        "| method | privacy | evaluated by | " + " | ".join(LABELS[m] for m in SHOWN) + " |",
        "|---" * (len(SHOWN) + 3) + "|",
    ]
    for scores in methods:
        cells = " | ".join(fmt(scores.mean(m)) for m in SHOWN)
        lines.append(f"| {scores.method} | {scores.privacy} | {scores.evaluated_by} | {cells} |")
    lines += [
        "",
        f"### {LABELS[metric]} per site",
        "",
        "| method | " + " | ".join(f"{s} (n={sizes[s]})" for s in sites) + " |",
        "|---" * (len(sites) + 1) + "|",
    ]
    for scores in methods:
        cells = [fmt(scores.sites.get(s, {}).get(metric, math.nan)) + _interval(scores, s, metric) for s in sites]
        lines.append(f"| {scores.method} | " + " | ".join(cells) + " |")
    lines += ["", f"![comparison]({COMPARISON_PLOT})"]
    return "\n".join(lines)


def plot_comparison(methods: list[MethodScores], metric: str, path: Path) -> Path:
    """The headline metric per site and method, with bootstrap intervals where the simulator scored the model."""
    sites = sorted(test_sizes(methods))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(sites) + 2), 4))
    width = 0.8 / max(len(methods), 1)
    for index, scores in enumerate(methods):
        xs, ys, errors = [], [], [[], []]
        for position, site in enumerate(sites):
            value = scores.sites.get(site, {}).get(metric, math.nan)
            if math.isnan(value):
                continue
            low, high = scores.intervals.get(site, {}).get(metric, [value, value])
            low, high = (value, value) if math.isnan(low) else (low, high)
            xs.append(position + (index - (len(methods) - 1) / 2) * width)
            ys.append(value)
            errors[0].append(max(value - low, 0.0))
            errors[1].append(max(high - value, 0.0))
        ax.bar(xs, ys, width, yerr=errors, capsize=2, label=scores.method)
    ax.set_xticks(range(len(sites)), sites, rotation=20 if len(sites) > 4 else 0)
    ax.set_ylabel(LABELS[metric])
    ax.set_ylim(0, 1.05)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
