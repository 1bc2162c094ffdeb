"""What DP federated evaluation costs: training noise, budget left, and what the released metrics are worth.

A site whose policy says ``evaluation = "dp"`` releases each evaluation the coordinator asks
for as a Gaussian-noised histogram of its test predictions, and its run plan reserves
``release_share`` (0.1) of the run's epsilon for those releases, so the training rounds get
more noise. This benchmark runs the real apps in process (``run_federation`` over
``DirectGrid`` with ``client.app.app``) on ``wdbc`` and ``heart-disease`` with the default
recipe and the simulated sites' policy (lifetime cap 10, the default accountant, DP evaluation), in
three variants that differ only in the run setting ``federated-evaluation``:

- a: ``none``, no federated evaluation (the rounds get the whole run budget);
- b: ``last``, one DP evaluation after the last round (the default);
- c: ``every``, one DP evaluation per round (``max_evaluations_per_run`` raised to the rounds).

Each seed pretrains one source model that all variants and epsilons start from, and every run
starts from fresh site ledgers; the policies' per-run limit is set to the epsilon asked, so
the request decides each run's budget. Per variant it reports, per site: the rounds' and the
releases' noise multipliers (the site's stored plan, ``state/plans/*.json``), the epsilon spent
(its ledger), how many more runs like this one fit under the cap (the run's ledger history
composed n-fold by the site's accountant) and how many more rounds at the run's training noise
(the audit's computation, ``common.privacy.audit.recompute.Accounting.rounds_left``); and the
final global model's exact AUC, balanced accuracy and F1 (the benchmark holds the test splits,
as the simulator does) beside what the coordinator derives from the noisy histograms, and the
error of each release against the exact metrics of the model it evaluated. The AUC of a
histogram is binned even without noise, so the binning's own error is reported apart.

The sites draw their noise from the operating system's CSPRNG, as real sites do, so the
figures vary from one invocation to the next. Nothing is timed against a target.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis import rdp as rdp_analysis

from client.budget import PLANS_DIR, RunPlan
from common.data.scenarios import Scenario, load_scenario
from common.data.site_config import site_dir
from common.data.site_data import SiteData
from common.model.checkpoint import load_checkpoint
from common.model.metrics import classification_metrics, evaluation_counts, metrics_from_counts
from common.model.pretraining import pretrain_source
from common.model.training import as_tensors, predict_proba, use_one_torch_thread
from common.model.zoo import FedModel
from common.privacy.accounting import DEFAULT_ACCOUNTANT, Accountant, AccountingError, Step, compose_epsilon
from common.privacy.audit.recompute import Accounting
from common.privacy.ledger import TRAIN, Ledger
from common.run_record import RunRecord
from common.settings import RunSettings
from server.federation import ROUND_CHECKPOINT_DIR
from simulations.benchmarks.communication import heart_data_dir
from simulations.benchmarks.harness import bar_plot, fmt, mean_sd, prewrite_policies, run_inprocess
from simulations.benchmarks.report import (
    header,
    markdown_table,
    result_head,
    this_machine,
    write_result,
)

logger = logging.getLogger(__name__)

NAME = "evaluation-cost"
SCENARIOS = ("wdbc", "heart-disease")
QUICK_SCENARIOS = ("wdbc",)
NEEDS_DATA = {"heart-disease"}
EPSILONS = (1.0, 3.0, 8.0)
QUICK_EPSILONS = (3.0,)
SEEDS = 5
CAP = 10.0
DELTA = 1e-5
METRICS = ("roc-auc", "balanced-accuracy", "f1")
SHORT = {"roc-auc": "AUC", "balanced-accuracy": "BA", "f1": "F1"}
#: Search bound for "runs within the cap" (the audit's bound for rounds left).
MAX_RUNS = 10_000
PLOT = "evaluation-cost.png"


@dataclass(frozen=True)
class Variant:
    """One value of the run setting ``federated-evaluation``, with its letter in the tables."""

    setting: str
    letter: str
    label: str


VARIANTS = (
    Variant("none", "a", "no federated evaluation"),
    Variant("last", "b", "one DP evaluation after the last round"),
    Variant("every", "c", "one DP evaluation per round"),
)


@dataclass(frozen=True)
class Recipe:
    """The run's recipe: RunSettings' defaults (FedAvg, batch 16, SGD lr 0.05) and the site policy's accountant."""

    rounds: int = 3
    local_epochs: int = 2
    accountant: Accountant = DEFAULT_ACCOUNTANT


RECIPE = Recipe()
QUICK_RECIPE = Recipe(rounds=2, local_epochs=1)


@dataclass(frozen=True)
class SiteCost:
    """What one run cost one site: its plan's noise, its ledger's epsilon, and the budget it leaves."""

    site: str
    rounds_noise: float
    release_noise: float | None
    releases: int
    epsilon_spent: float
    more_runs: int
    more_rounds: int


@dataclass(frozen=True)
class Release:
    """One DP evaluation a site released: the coordinator's metrics, the exact ones, those of the exact histogram."""

    server_round: int
    site: str
    released: dict[str, float]
    exact: dict[str, float]
    binned: dict[str, float]


@dataclass(frozen=True)
class RunResult:
    """One federated run: its final global model's exact metrics per site, each site's cost, every release."""

    seed: int
    final_exact: dict[str, dict[str, float]]
    costs: list[SiteCost]
    unplanned: list[str]
    releases: list[Release]
    seconds: float


@dataclass(frozen=True)
class Cell:
    """One variant at one epsilon on one scenario, over the seeds (means over sites and seeds unless named)."""

    scenario: str
    epsilon: float
    variant: str
    letter: str
    evaluations: int
    rounds_noise: float
    rounds_noise_min: float
    rounds_noise_max: float
    release_noise: float | None
    epsilon_spent_mean: float
    epsilon_spent_max: float
    more_runs_mean: float
    more_runs_min: int
    more_rounds_mean: float
    more_rounds_min: int
    exact: dict[str, float]
    exact_sd: dict[str, float]
    released_final: dict[str, float | None]
    error: dict[str, float | None]
    auc_binning_error: float | None
    releases: int
    undefined_releases: int
    unplanned_sites: int
    seconds: float


# --- budget arithmetic -------------------------------------------------------------------


def _repeated(run: Sequence[Step], times: int) -> list[Step]:
    return [Step(s.noise_multiplier, s.sample_rate, s.steps * times) for s in run]


def _largest(fits: Callable[[int], bool], low: int) -> int:
    """Largest n in [low, MAX_RUNS] with ``fits(n)``, given ``fits(low)`` (or low 0) and ``fits`` non-increasing."""
    width = 1
    while low + width <= MAX_RUNS and fits(low + width):
        low, width = low + width, width * 2
    high = min(low + width, MAX_RUNS + 1)
    while high - low > 1:
        middle = (low + high) // 2
        if fits(middle):
            low = middle
        else:
            high = middle
    return low


def _rdp_runs_within_cap(run: Sequence[Step], delta: float, cap: float) -> int:
    """Runs within ``cap`` under Opacus's RDP analysis: RDP is additive, so n runs are n times one run's curve."""
    orders = RDPAccountant.DEFAULT_ALPHAS
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        curve = sum(
            (
                rdp_analysis.compute_rdp(
                    q=s.sample_rate, noise_multiplier=s.noise_multiplier, steps=s.steps, orders=orders
                )
                for s in run
            ),
            np.zeros(len(orders)),
        )

    def fits(times: int) -> bool:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            epsilon, _ = rdp_analysis.get_privacy_spent(orders=orders, rdp=times * curve, delta=delta)
        return bool(math.isfinite(epsilon) and epsilon <= cap)

    return _largest(fits, 0)


@functools.cache
def runs_within_cap(run: tuple[Step, ...], delta: float, accountant: Accountant, cap: float) -> int:
    """How many runs with exactly the history ``run`` compose to at most ``cap`` on a fresh dataset.

    RDP first (cheap, and looser, so rarely above the others' answer), then a PLD or PRV site's own accountant
    from there.
    """
    low = _rdp_runs_within_cap(run, delta, cap)
    if accountant == "rdp":
        return low

    def fits(times: int) -> bool:
        try:
            return compose_epsilon(_repeated(run, times), delta, accountant) <= cap
        except AccountingError:
            return False

    return _largest(fits, low if low and fits(low) else 0)


def _site_cost(state: Path, site: str, accounting: Accounting) -> SiteCost | None:
    """One site's plan, ledger and budget left after the run (its state directory holds at most one run's plan);
    None if the site planned nothing (it declined the run)."""
    plan_files = sorted((state / PLANS_DIR).glob("*.json"))
    if not plan_files:
        return None
    (plan_file,) = plan_files
    plan = RunPlan.from_dict(json.loads(plan_file.read_text(encoding="utf-8")))
    entries = Ledger(state).entries()
    history = tuple(e.to_step() for e in entries)
    settings = plan.settings
    more_rounds, _ = accounting.rounds_left(list(history), plan.step(TRAIN), settings.delta, settings.accountant, CAP)
    releases = sum(plan.release_counts.values())
    return SiteCost(
        site=site,
        rounds_noise=plan.noise_multiplier,
        release_noise=plan.release_noise_multiplier if releases else None,
        releases=releases,
        epsilon_spent=max((e.epsilon for e in entries), default=math.nan),
        more_runs=runs_within_cap(history, settings.delta, settings.accountant, CAP) - 1 if history else 0,
        more_rounds=more_rounds,
    )


# --- one run -----------------------------------------------------------------------------


def _exact_and_binned(model: FedModel, site: SiteData) -> tuple[dict[str, float], dict[str, float]]:
    """The exact metrics of ``model`` on the site's test split, and those of its noise-free evaluation histogram."""
    x, _ = as_tensors(site.test.x, site.test.y)
    proba = predict_proba(model, x)
    return classification_metrics(site.test.y, proba), metrics_from_counts(evaluation_counts(site.test.y, proba))


def _releases(record: RunRecord, out: Path, scenario: Scenario) -> list[Release]:
    """Every DP evaluation of the run, beside the exact metrics of the round's global model at that site."""
    sites = {site.name: site for site in scenario.sites}
    releases = []
    for current in record.rounds:
        released = {name: entry.metrics for name, entry in current.sites.items() if entry.metrics}
        if not released:
            continue
        model, _ = load_checkpoint(out / ROUND_CHECKPOINT_DIR / f"round-{current.server_round}")
        for name, metrics in sorted(released.items()):
            exact, binned = _exact_and_binned(model, sites[name])
            releases.append(Release(current.server_round, name, metrics, exact, binned))
    return releases


def _run(
    scenario: Scenario,
    checkpoint: Path,
    recipe: Recipe,
    epsilon: float,
    variant: Variant,
    seed: int,
    root: Path,
    accounting: Accounting,
) -> RunResult:
    """One run of the real apps from fresh site ledgers, then its costs and releases."""
    sites = len(scenario.sites)
    prewrite_policies(
        root / "sites",
        scenario,
        allow_non_private=False,
        max_epsilon=CAP,
        max_epsilon_per_run=epsilon,
        delta=DELTA,
        accountant=recipe.accountant,
        max_evaluations_per_run=recipe.rounds,
    )
    settings = RunSettings(
        scenario=scenario.name,
        data_dir=str(heart_data_dir()) if scenario.name in NEEDS_DATA else "",
        checkpoint=str(checkpoint),
        rounds=recipe.rounds,
        local_epochs=recipe.local_epochs,
        target_epsilon=epsilon,
        delta=DELTA,
        seed=seed,
        federated_evaluation=variant.setting,
        out=str(root / "out"),
        sim_root=str(root / "sites"),
        expected_sites=sites,
    )
    start = time.perf_counter()
    record = run_inprocess(settings, sites)
    seconds = time.perf_counter() - start
    final, _ = load_checkpoint(Path(record.final_checkpoint))
    costs = {
        site.name: _site_cost(site_dir(root / "sites", site.name) / "state", site.name, accounting)
        for site in scenario.sites
    }
    return RunResult(
        seed=seed,
        final_exact={site.name: _exact_and_binned(final, site)[0] for site in scenario.sites},
        costs=[cost for cost in costs.values() if cost is not None],
        unplanned=[name for name, cost in costs.items() if cost is None],
        releases=_releases(record, root / "out", scenario),
        seconds=seconds,
    )


# --- aggregation -------------------------------------------------------------------------


def _optional(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _nan_if_none(value: float | None) -> float:
    return math.nan if value is None else value


def _site_mean(values: dict[str, dict[str, float]], metric: str) -> float:
    return mean_sd([v[metric] for v in values.values()])[0]


def _cell(scenario: str, epsilon: float, variant: Variant, runs: list[RunResult]) -> Cell:
    costs = [c for run in runs for c in run.costs]
    releases = [r for run in runs for r in run.releases]
    rounds_noise = [c.rounds_noise for c in costs]
    last_round = max((r.server_round for r in releases), default=0)
    undefined = sum(1 for r in releases if not all(math.isfinite(r.released.get(m, math.nan)) for m in METRICS))
    return Cell(
        scenario=scenario,
        epsilon=epsilon,
        variant=variant.setting,
        letter=variant.letter,
        evaluations=max((c.releases for c in costs), default=0),
        rounds_noise=mean_sd(rounds_noise)[0],
        rounds_noise_min=min(rounds_noise),
        rounds_noise_max=max(rounds_noise),
        release_noise=_optional(mean_sd([c.release_noise for c in costs if c.release_noise is not None])[0]),
        epsilon_spent_mean=mean_sd([c.epsilon_spent for c in costs])[0],
        epsilon_spent_max=max(c.epsilon_spent for c in costs),
        more_runs_mean=mean_sd([c.more_runs for c in costs])[0],
        more_runs_min=min(c.more_runs for c in costs),
        more_rounds_mean=mean_sd([c.more_rounds for c in costs])[0],
        more_rounds_min=min(c.more_rounds for c in costs),
        exact={m: mean_sd([_site_mean(run.final_exact, m) for run in runs])[0] for m in METRICS},
        exact_sd={m: mean_sd([_site_mean(run.final_exact, m) for run in runs])[1] for m in METRICS},
        released_final={
            m: _optional(mean_sd([r.released.get(m, math.nan) for r in releases if r.server_round == last_round])[0])
            for m in METRICS
        },
        error={
            m: _optional(mean_sd([abs(r.released.get(m, math.nan) - r.exact[m]) for r in releases])[0]) for m in METRICS
        },
        auc_binning_error=_optional(mean_sd([abs(r.binned["roc-auc"] - r.exact["roc-auc"]) for r in releases])[0]),
        releases=len(releases),
        undefined_releases=undefined,
        unplanned_sites=sum(len(run.unplanned) for run in runs),
        seconds=sum(run.seconds for run in runs),
    )


def _ratios(cells: list[Cell]) -> list[dict[str, Any]]:
    """Variants b and c against a at the same scenario and epsilon."""
    by_key = {(c.scenario, c.epsilon, c.letter): c for c in cells}
    ratios = []
    for cell in cells:
        base = by_key.get((cell.scenario, cell.epsilon, "a"))
        if base is None or cell.letter == "a":
            continue
        ratios.append(
            {
                "scenario": cell.scenario,
                "epsilon": cell.epsilon,
                "versus": f"{cell.letter}/a",
                "rounds_noise": cell.rounds_noise / base.rounds_noise,
                "more_runs": _optional(cell.more_runs_mean / base.more_runs_mean) if base.more_runs_mean else None,
                "more_rounds": _optional(cell.more_rounds_mean / base.more_rounds_mean)
                if base.more_rounds_mean
                else None,
                "exact_auc_difference": cell.exact["roc-auc"] - base.exact["roc-auc"],
            }
        )
    return ratios


# --- the benchmark -----------------------------------------------------------------------


def _scenario_cells(
    name: str, seeds: list[int], epsilons: tuple[float, ...], recipe: Recipe, work: Path, accounting: Accounting
) -> tuple[list[Cell], dict[str, int]]:
    """Every variant at every epsilon on one scenario; also the test rows per site (of the first seed's split)."""
    runs: dict[tuple[float, str], list[RunResult]] = {}
    test_rows: dict[str, int] = {}
    for seed in seeds:
        scenario = load_scenario(name, seed=seed, data_dir=heart_data_dir() if name in NEEDS_DATA else None)
        test_rows = test_rows or {site.name: len(site.test) for site in scenario.sites}
        checkpoint = work / f"{name}-source-{seed}"
        pretrain_source(scenario, checkpoint, seed=seed)
        for epsilon in epsilons:
            for variant in VARIANTS:
                root = work / f"{name}-eps{epsilon:g}-{variant.setting}-{seed}"
                result = _run(scenario, checkpoint, recipe, epsilon, variant, seed, root, accounting)
                runs.setdefault((epsilon, variant.setting), []).append(result)
                logger.info(
                    "%s %s epsilon %g %s seed %d: %.1f s", NAME, name, epsilon, variant.setting, seed, result.seconds
                )
    cells = [
        _cell(name, epsilon, variant, runs[(epsilon, variant.setting)]) for epsilon in epsilons for variant in VARIANTS
    ]
    return cells, test_rows


def _skip_reason(name: str) -> str | None:
    if name in NEEDS_DATA and not heart_data_dir().is_dir():
        return f"the Fed-Heart-Disease files are not at {heart_data_dir()} (set FEDTRANSFER_DATA_DIR)"
    return None


def _noise_text(cell: Cell) -> str:
    if cell.rounds_noise_max - cell.rounds_noise_min < 5e-4:
        return f"{cell.rounds_noise:.3f}"
    return f"{cell.rounds_noise:.3f} ({cell.rounds_noise_min:.2f}-{cell.rounds_noise_max:.2f})"


def _optional_text(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else fmt(value, digits)


def _cost_rows(cells: list[Cell], ratios: list[dict[str, Any]]) -> list[list[Any]]:
    ratio = {(r["scenario"], r["epsilon"], r["versus"][0]): r for r in ratios}
    rows = []
    for c in cells:
        r = ratio.get((c.scenario, c.epsilon, c.letter))
        rows.append(
            [
                c.scenario,
                f"{c.epsilon:g}",
                f"{c.letter}: {c.variant}",
                c.evaluations,
                _noise_text(c),
                "1" if r is None else f"{r['rounds_noise']:.3f}x",
                _optional_text(c.release_noise, 2),
                f"{c.epsilon_spent_mean:.2f} (max {c.epsilon_spent_max:.2f})",
                f"{c.more_runs_mean:.1f} (min {c.more_runs_min})",
                "1" if r is None else _optional_text(r["more_runs"], 2) + ("x" if r["more_runs"] is not None else ""),
                f"{c.more_rounds_mean:.1f} (min {c.more_rounds_min})",
            ]
        )
    return rows


def _utility_rows(cells: list[Cell]) -> list[list[Any]]:
    rows = []
    for c in cells:
        rows.append(
            [
                c.scenario,
                f"{c.epsilon:g}",
                f"{c.letter}: {c.variant}",
                *[f"{fmt(c.exact[m])} ({fmt(c.exact_sd[m])})" for m in METRICS],
                *[_optional_text(c.released_final[m]) for m in METRICS],
                *[_optional_text(c.error[m]) for m in METRICS],
                _optional_text(c.auc_binning_error),
                f"{c.releases} ({c.undefined_releases})",
            ]
        )
    return rows


def _markdown(result: dict[str, Any], cells: list[Cell], ratios: list[dict[str, Any]], machine_text: str) -> str:
    recipe = result["recipe"]
    sizes = "; ".join(
        f"{name}: {', '.join(f'{site} {rows}' for site, rows in rows_by_site.items())}"
        for name, rows_by_site in result["test_rows"].items()
    )
    lines = [
        machine_text,
        f"Scenarios {', '.join(f'`{s}`' for s in result['scenarios'])}; "
        f"{len(result['seeds'])} seed(s) {result['seeds']}; "
        f"FedAvg, {recipe['rounds']} rounds of {recipe['local_epochs']} local epoch(s), batch 16, SGD lr 0.05, the "
        "scenario's default model and transfer policy, DP-SGD (clipping 1, Poisson sampling) at every site. Site "
        "policies: the "
        f"simulated ones (lifetime cap {CAP:g}, delta {DELTA:g}, minimum noise 0.5, release share 0.1, "
        f'`evaluation = "dp"`) with the **{recipe["accountant"].upper()}** accountant, `max_epsilon_per_run` set to '
        f"the epsilon asked and `max_evaluations_per_run` {recipe['rounds']}; every run starts from fresh ledgers and "
        "from the seed's source model. Variants differ only in `federated-evaluation`: "
        + "; ".join(f"{v.letter}: `{v.setting}` ({v.label})" for v in VARIANTS)
        + ". Noise: the sites' CSPRNG, as "
        "deployed (so the figures vary between invocations by their noise).",
        "",
        "Noise multipliers from each site's stored plan (`state/plans/*.json`; mean over sites and seeds, range when "
        "the sites differ); the release noise is the standard deviation of the Gaussian noise in every cell of the "
        "histogram (sensitivity 1). Epsilon spent: each site's ledger after the run. More runs: how many more runs "
        f"with exactly this run's ledger history fit under the cap of {CAP:g} (the history composed n-fold by the "
        "site's accountant); more rounds: training rounds at this run's training noise after it (the audit's "
        "rounds-left computation). Ratios against variant a at the same scenario and epsilon.",
        "",
        markdown_table(
            [
                "scenario",
                "epsilon",
                "variant",
                "DP evaluations / site",
                "rounds' noise",
                "ratio vs a",
                "release noise",
                "epsilon spent",
                "more runs within cap",
                "ratio vs a",
                "more rounds",
            ],
            _cost_rows(cells, ratios),
        ),
        "",
        "Utility: the final global model's exact metrics (the benchmark holds the test splits; mean over sites, then "
        "over seeds, sd over seeds); 'released' is what the coordinator derives from the noisy histograms of the last "
        "evaluated round (mean over sites and seeds); |released - exact| is the mean absolute error of every release "
        "against the exact metrics of the model it evaluated at that site (each round's for variant c); 'AUC binning' "
        "the error of the noise-free histogram's AUC (8 logit bins), the part of the AUC error that no budget removes. "
        "Releases (undefined): how many, and how many gave an undefined metric (a noisy count clipped to 0). "
        f"Test rows per site: {sizes}.",
        "",
        markdown_table(
            [
                "scenario",
                "epsilon",
                "variant",
                *[f"exact {SHORT[m]} (sd)" for m in METRICS],
                *[f"released {SHORT[m]}" for m in METRICS],
                *[f"|released - exact| {SHORT[m]}" for m in METRICS],
                "AUC binning",
                "releases (undefined)",
            ],
            _utility_rows(cells),
        ),
    ]
    lines += [
        f"\n{c.scenario} at epsilon {c.epsilon:g}, variant {c.letter}: {c.unplanned_sites} site-run(s) "
        "declined the run (no noise within the site's limits); they are left out of the cost columns."
        for c in cells
        if c.unplanned_sites
    ]
    lines += [f"\nSkipped {s['scenario']}: {s['reason']}." for s in result["skipped"]]
    lines += ["", f"![exact and released AUC per variant]({PLOT})"]
    return "\n".join(lines)


def _plot(out_dir: Path, cells: list[Cell], seeds: int) -> None:
    labels = [f"{c.scenario} eps {c.epsilon:g} {c.letter}" for c in cells]
    series = {
        "exact AUC of the final model": [c.exact["roc-auc"] for c in cells],
        "released AUC (last evaluation)": [_nan_if_none(c.released_final["roc-auc"]) for c in cells],
        "|released - exact| AUC": [_nan_if_none(c.error["roc-auc"]) for c in cells],
    }
    bar_plot(out_dir / PLOT, labels, series, "AUC (mean over sites)", f"What DP evaluation costs, {seeds} seed(s)")


def run(out_dir: Path, quick: bool = False, seed: int = 0) -> dict[str, Any]:
    """Every variant at every epsilon on each scenario; write the JSON, Markdown and ``evaluation-cost.png``."""
    use_one_torch_thread()
    machine = this_machine()
    out_dir = Path(out_dir)
    seeds = [seed] if quick else list(range(seed, seed + SEEDS))
    scenarios = QUICK_SCENARIOS if quick else SCENARIOS
    epsilons = QUICK_EPSILONS if quick else EPSILONS
    recipe = QUICK_RECIPE if quick else RECIPE
    accounting = Accounting()
    cells: list[Cell] = []
    test_rows: dict[str, dict[str, int]] = {}
    skipped = []
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f"fedtransfer-{NAME}-") as work:
        for name in scenarios:
            reason = _skip_reason(name)
            if reason is not None:
                logger.warning("%s: skipping %s: %s", NAME, name, reason)
                skipped.append({"scenario": name, "reason": reason})
                continue
            scenario_cells, test_rows[name] = _scenario_cells(name, seeds, epsilons, recipe, Path(work), accounting)
            cells += scenario_cells
    ratios = _ratios(cells)
    result: dict[str, Any] = {
        **result_head(NAME, quick, seed, machine),
        "seeds": seeds,
        "scenarios": [name for name in scenarios if name in test_rows],
        "skipped": skipped,
        "epsilons": list(epsilons),
        "cap": CAP,
        "delta": DELTA,
        "recipe": asdict(recipe),
        "variants": [asdict(v) for v in VARIANTS],
        "test_rows": test_rows,
        "cells": [asdict(c) for c in cells],
        "ratios": ratios,
        "wall_seconds": time.perf_counter() - start,
        "plots": [PLOT],
    }
    _plot(out_dir, cells, len(seeds))
    for r in ratios:
        logger.info(
            "%s %s epsilon %g %s: rounds' noise %.3fx, more runs %s",
            NAME,
            r["scenario"],
            r["epsilon"],
            r["versus"],
            r["rounds_noise"],
            "n/a" if r["more_runs"] is None else f"{r['more_runs']:.2f}x",
        )
    text = header("What DP evaluation costs", machine, result["command"], quick)
    return write_result(out_dir, NAME, result, _markdown(result, cells, ratios, text))
