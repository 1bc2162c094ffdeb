"""Does transfer help? Every built-in scenario, several seeds, epsilon 1 / 3 / 8 and no DP, every metric.

Two stages, both through the real apps in process (``run_federation`` over ``DirectGrid``):

1. **Recipe choice, on validation splits only.** Each target site's training split is cut
   into a training part and a validation part (stratified, 25%), and the candidate recipes
   (:data:`CANDIDATES`: changes to the default run settings) run at epsilon
   :data:`GOAL_EPSILON` on every scenario and :data:`SELECTION_SEEDS` seeds, scored on the
   validation parts beside the baselines there (the base model, local-only with DP). The
   recipe that meets the issue's goal on the validation parts at the most seeds wins, then
   the best mean of ROC AUC and balanced accuracy; a candidate must meet the goal at more
   seeds than the default, or score :data:`MARGIN` higher, to replace it. Test splits are
   never looked at in this stage.
2. **Report, on test splits.** The default recipe and the chosen one run at every epsilon and
   without DP over :data:`SEEDS` seeds, beside the baselines of ``simulations.baselines``:
   the base model as-is, local-only without and with DP (same epsilon, same epochs), pooled.

Scores are the simulator's own, exact, on each site's held-out split: the global model from
its final checkpoint; a personalised copy (which never leaves its site) from the
predictions observed in process when the site evaluates it. The goals of the issue are
checked per seed and written out: whether they are met or not.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.model_selection import train_test_split

import client.app
import client.private_round
from common.data import scenarios
from common.data.scenario import Scenario
from common.data.scenarios import load_scenario
from common.data.site_data import SiteData, Split
from common.model.checkpoint import load_checkpoint
from common.model.pretraining import pretrain_source
from common.model.training import TrainConfig, predict_proba
from common.model.transfer import TransferPolicy
from common.model.zoo import FedModel
from common.settings import RunSettings
from simulations.baselines import MethodScores, PrivateBaseline, compute_baselines
from simulations.benchmarks.harness import fmt, mean_sd, prewrite_policies, run_inprocess
from simulations.benchmarks.report import (
    bench_command,
    header,
    markdown_table,
    result_head,
    this_machine,
)
from simulations.benchmarks.report import write_result as write_outputs
from simulations.comparison import federated_scores

log = logging.getLogger(__name__)

SCENARIOS = ("heart-disease", "synthetic-imaging", "pneumonia", "wdbc")
EPSILONS = (1.0, 3.0, 8.0)
GOAL_EPSILON = 3.0
SEEDS = 5
SELECTION_SEEDS = 3
VALIDATION_FRACTION = 0.25
MARGIN = 0.005
SHOWN = ("roc-auc", "balanced-accuracy", "f1", "sensitivity", "specificity", "accuracy")


@dataclass(frozen=True)
class Recipe:
    """A named change to the default run settings."""

    name: str
    changes: dict[str, Any] = field(default_factory=dict)

    def settings(self, **base: Any) -> RunSettings:
        return RunSettings(**{**base, **self.changes})


PERSONALISE = {"personalise_fraction": 0.3, "personalise_epochs": 10, "personalise_lr": 0.5}
CANDIDATES = (
    Recipe("default"),
    Recipe("balanced loss", {"class_weights": "balanced"}),
    Recipe("logit-adjusted loss", {"class_weights": "logit-adjust"}),
    Recipe("lr 0.2", {"lr": 0.2}),
    Recipe("batch 64", {"batch_size": 64}),
    Recipe("private personalisation", PERSONALISE),
    Recipe("balanced + private personalisation", {"class_weights": "balanced", **PERSONALISE}),
    Recipe("logit-adjusted + private personalisation", {"class_weights": "logit-adjust", **PERSONALISE}),
)


def validation_view(scenario: Scenario, seed: int) -> Scenario:
    """The scenario with each site's test split replaced by a validation part of its training split."""
    sites = []
    for site in scenario.sites:
        y = site.train.y
        counts = np.bincount(y)
        rare = np.isin(y, np.flatnonzero(counts < 4))  # a class this small stays whole in the training part
        pool = np.flatnonzero(~rare)
        stratify = y[pool] if len(np.unique(y[pool])) > 1 else None
        kept, held = train_test_split(pool, test_size=VALIDATION_FRACTION, stratify=stratify, random_state=seed)
        train = np.sort(np.concatenate([kept, np.flatnonzero(rare)]))
        sites.append(SiteData(site.name, Split(site.train.x[train], y[train]), Split(site.train.x[held], y[held])))
    return replace(scenario, sites=tuple(sites))


@contextmanager
def registered(scenario: Scenario) -> Iterator[str]:
    """``scenario`` (an in-memory view) under a name the real apps can load, for the duration of the block."""
    name = f"{scenario.name}-view"
    scenarios._BUILTINS[name] = lambda seed, data_dir, private: scenario
    try:
        yield name
    finally:
        del scenarios._BUILTINS[name]


@contextmanager
def personalised_predictions() -> Iterator[dict[str, np.ndarray]]:
    """Observe, in process, each site's personalised copy's class probabilities on its held-out split.

    ``client.app.evaluate_round`` is wrapped to know which site evaluates which global model,
    and ``client.private_round.evaluation_histogram`` to score any other model (the site's
    copy) exactly before the site adds noise to its histogram. The originals are restored on exit.
    """
    found: dict[str, np.ndarray] = {}
    current: dict[str, Any] = {}
    evaluate_round, evaluation_histogram = client.app.evaluate_round, client.private_round.evaluation_histogram

    def observed_round(session: Any, dataset: Any, model: FedModel, *args: Any) -> Any:
        current.update(site=session.site_id, model=model)
        return evaluate_round(session, dataset, model, *args)

    def observed_histogram(model: FedModel, transfer: TransferPolicy, features: Any) -> np.ndarray:
        if current and model is not current["model"]:
            found[current["site"]] = predict_proba(transfer.split(model)[1], features.test_x)
        return evaluation_histogram(model, transfer, features)

    client.app.evaluate_round, client.private_round.evaluation_histogram = observed_round, observed_histogram
    try:
        yield found
    finally:
        client.app.evaluate_round, client.private_round.evaluation_histogram = evaluate_round, evaluation_histogram


@dataclass
class Cell:
    """One (scenario, recipe, epsilon, seed): every method's scores."""

    scenario: str
    recipe: str
    epsilon: float | None
    seed: int
    methods: dict[str, MethodScores]
    seconds: float


def _federated(
    view: Scenario, name: str, checkpoint: Path, recipe: Recipe, epsilon: float | None, seed: int, root: Path
) -> dict[str, MethodScores]:
    private = epsilon is not None
    sites = len(view.sites)
    cap = max(10.0, epsilon or 0.0)
    prewrite_policies(root / "sites", view, allow_non_private=not private, max_epsilon=cap, max_epsilon_per_run=cap)
    settings = recipe.settings(
        scenario=name,
        checkpoint=str(checkpoint),
        seed=seed,
        dp=private,
        target_epsilon=epsilon or 3.0,
        out=str(root / "out"),
        sim_root=str(root / "sites"),
        min_sites=1,
        expected_sites=sites,
    )
    if not private:
        settings = settings.with_(personalise_fraction=0.0)
    with personalised_predictions() as copies:
        record = run_inprocess(settings, sites)
    privacy = f"DP, epsilon {epsilon:g}" if private else "no DP"
    scores = {"federated": federated_scores(record, view, seed)}
    scores["federated"].privacy = privacy
    if copies:
        personalised = MethodScores("personalised", privacy)
        for site in view.sites:
            if site.name in copies:
                personalised.add(site.name, site.test.y, copies[site.name], seed)
        scores["personalised"] = personalised
    return scores


def _baseline_config(settings: RunSettings, prior: list[float] | None) -> TrainConfig:
    weighted = settings.class_weights != "none" and prior
    return TrainConfig(
        epochs=settings.rounds * settings.local_epochs,
        batch_size=settings.batch_size,
        lr=settings.lr,
        optimizer=settings.optimizer,
        seed=settings.seed,
        class_weights=settings.class_weights if weighted else "none",
        class_prior=tuple(prior) if weighted else (),
    )


def evaluate(
    scenario: Scenario,
    view: Scenario,
    recipe: Recipe,
    epsilons: tuple[float | None, ...],
    seed: int,
    baselines: bool,
) -> list[Cell]:
    """Run ``recipe`` at each epsilon on ``view`` (its held-out splits scored), with baselines if asked."""
    cells = []
    with tempfile.TemporaryDirectory(prefix="fedtransfer-transfer-") as tmp:
        root = Path(tmp)
        checkpoint = root / "source-model"
        card = pretrain_source(scenario, checkpoint, seed=seed)
        base, _ = load_checkpoint(checkpoint)
        transfer = TransferPolicy.parse(scenario.transfer_policy)
        for epsilon in epsilons:
            start = time.perf_counter()
            with registered(view) as name:
                methods = _federated(view, name, checkpoint, recipe, epsilon, seed, root / f"run-{epsilon}")
            if baselines:
                settings = recipe.settings(seed=seed)
                config = _baseline_config(settings, card.class_prior)
                promise = PrivateBaseline(epsilon, settings.delta, settings.max_grad_norm) if epsilon else None
                for scores in compute_baselines(view, base, transfer, config, promise):
                    if scores.method != "local-only (DP)" or epsilon is not None:
                        methods[scores.method] = scores
            cells.append(Cell(scenario.name, recipe.name, epsilon, seed, methods, time.perf_counter() - start))
    return cells


def _headline(scores: MethodScores) -> float:
    return (scores.mean("roc-auc") + scores.mean("balanced-accuracy")) / 2


def _best_method(methods: dict[str, MethodScores]) -> MethodScores:
    """The recipe's outcome for a site: its personalised copy when the recipe makes one, else the global model."""
    return methods.get("personalised", methods["federated"])


def choose_recipe(name: str, seeds: list[int], quick: bool) -> tuple[str, list[dict[str, Any]]]:
    """Stage 1: every candidate at the goal epsilon on validation splits, beside the baselines there.

    The winner is the recipe that meets the issue's goal (:func:`goal_check`) on the validation parts at the
    most seeds; among those, the best mean (AUC + bal. acc.) / 2. The default stays unless a candidate meets the
    goal at more seeds, or at as many and scores :data:`MARGIN` higher.
    """
    rows = []
    candidates = CANDIDATES[:2] if quick else CANDIDATES
    for recipe in candidates:
        values, met = [], 0
        for seed in seeds:
            scenario = load_scenario(name, seed=seed)
            for cell in evaluate(scenario, validation_view(scenario, seed), recipe, (GOAL_EPSILON,), seed, True):
                values.append(_headline(_best_method(cell.methods)))
                met += meets_goal(goal_check(cell))
        rows.append(
            {"recipe": recipe.name, "validation_score": float(np.mean(values)), "goal_seeds": met, "per_seed": values}
        )
        log.info(
            "%s: recipe %r scores %.4f on validation, meets the goal at %d of %d seeds",
            name,
            recipe.name,
            rows[-1]["validation_score"],
            met,
            len(seeds),
        )
    default = rows[0]
    best = max(rows, key=lambda r: (r["goal_seeds"], r["validation_score"]))
    better = (
        best["goal_seeds"] > default["goal_seeds"] or best["validation_score"] > default["validation_score"] + MARGIN
    )
    return (best["recipe"] if better else "default"), rows


def _available(name: str) -> str:
    """Empty if the scenario's data can be loaded, else why not."""
    try:
        load_scenario(name, seed=0)
    except Exception as err:  # noqa: BLE001  (a benchmark reports what it could not run)
        return f"{type(err).__name__}: {err}"
    return ""


def goal_check(cell: Cell) -> dict[str, Any]:
    """The issue's goal for one run: the recipe's outcome beats the base model (AUC and balanced accuracy) and
    local-only with DP (mean of the two), and no method predicts one class at a site (F1 = 0)."""
    ours = _best_method(cell.methods)
    base = next(m for k, m in cell.methods.items() if k in ("source as-is", "initial model"))
    local_dp = cell.methods.get("local-only (DP)")
    collapsed = [
        site for scores in cell.methods.values() for site, metrics in scores.sites.items() if metrics["f1"] == 0.0
    ]
    return {
        "seed": cell.seed,
        "ours": ours.method,
        "beats_base_auc": ours.mean("roc-auc") > base.mean("roc-auc"),
        "beats_base_balanced": ours.mean("balanced-accuracy") > base.mean("balanced-accuracy"),
        "beats_local_dp": local_dp is not None and _headline(ours) > _headline(local_dp),
        "collapsed": sorted(set(collapsed)),
    }


def meets_goal(check: dict[str, Any]) -> bool:
    return bool(
        check["beats_base_auc"] and check["beats_base_balanced"] and check["beats_local_dp"] and not check["collapsed"]
    )


def _goals(cells: list[Cell]) -> dict[str, Any]:
    """The issue's goals at the goal epsilon, per seed."""
    checks = [goal_check(cell) for cell in cells if cell.epsilon == GOAL_EPSILON]
    return {"met": bool(checks) and all(meets_goal(c) for c in checks), "per_seed": checks}


def _summary(cells: list[Cell]) -> list[list[Any]]:
    """Rows: (recipe, epsilon, method) with mean (sd over seeds) of each metric's mean over sites."""
    rows = []
    keys = sorted({(c.recipe, c.epsilon) for c in cells}, key=lambda k: (k[0], k[1] is None, k[1] or 0))
    for recipe, epsilon in keys:
        group = [c for c in cells if (c.recipe, c.epsilon) == (recipe, epsilon)]
        methods = []
        for cell in group:
            methods += [m for m in cell.methods if m not in methods]
        for method in methods:
            present = [c.methods[method] for c in group if method in c.methods]
            cells_text = []
            for metric in SHOWN:
                mean, sd = mean_sd([m.mean(metric) for m in present])
                cells_text.append(f"{fmt(mean)} ({fmt(sd, 2)})")
            label = "no DP" if epsilon is None else f"{epsilon:g}"
            rows.append([recipe, label, method, present[0].privacy, *cells_text])
    return rows


def _markdown(result: dict[str, Any], machine_text: str) -> str:
    lines = [machine_text, ""]
    for name, outcome in result["scenarios"].items():
        lines += [f"### {name}", ""]
        if "unavailable" in outcome:
            lines += [f"Not run: {outcome['unavailable']}", ""]
            continue
        sizes = outcome["test_sizes"]
        lines += [
            f"Target sites and test rows: {', '.join(f'{s} {n}' for s, n in sizes.items())}. Seeds "
            f"{outcome['seeds']}. Recipe chosen on validation splits at epsilon {GOAL_EPSILON:g}: "
            f"**{outcome['chosen']}**.",
            "",
            markdown_table(
                ["recipe", "seeds meeting the goal on validation", "validation (AUC + bal. acc.) / 2", "per seed"],
                [
                    [
                        r["recipe"],
                        f"{r['goal_seeds']} of {len(r['per_seed'])}",
                        fmt(r["validation_score"], 4),
                        ", ".join(fmt(v) for v in r["per_seed"]),
                    ]
                    for r in outcome["selection"]
                ],
            ),
            "",
            "Test splits: mean over sites, then mean (sd) over seeds.",
            "",
            markdown_table(
                ["recipe", "epsilon", "method", "privacy", "AUC", "bal. acc.", "F1", "sens.", "spec.", "acc."],
                outcome["summary"],
            ),
            "",
        ]
        goal = outcome["goals"]
        failed = [
            f"seed {c['seed']}: "
            + ", ".join(
                text
                for text, bad in (
                    ("AUC not above the base model", not c["beats_base_auc"]),
                    ("balanced accuracy not above the base model", not c["beats_base_balanced"]),
                    ("not above local-only with DP", not c["beats_local_dp"]),
                    (f"F1 = 0 at {', '.join(c['collapsed'])}", bool(c["collapsed"])),
                )
                if bad
            )
            for c in goal["per_seed"]
            if not meets_goal(c)
        ]
        lines += [
            f"Goal at epsilon {GOAL_EPSILON:g} with the chosen recipe ({goal['method']}): beats the base model in "
            "AUC and balanced accuracy and local-only with DP at every seed, no method with F1 = 0: "
            + ("**met**." if goal["met"] else "**not met** (" + "; ".join(failed) + ")."),
            "",
        ]
    return "\n".join(lines)


def run(out_dir: Path, quick: bool = False, seed: int = 0) -> dict[str, Any]:
    machine = this_machine()
    seeds = [seed] if quick else list(range(seed, seed + SEEDS))
    selection_seeds = [seed] if quick else list(range(seed, seed + SELECTION_SEEDS))
    epsilons: tuple[float | None, ...] = (GOAL_EPSILON,) if quick else (*EPSILONS, None)
    names = SCENARIOS[:1] if quick else SCENARIOS
    result: dict[str, Any] = {
        **result_head("transfer", quick, seed, machine),
        "candidates": [{"recipe": r.name, "changes": r.changes} for r in CANDIDATES],
        "scenarios": {},
    }
    machine_text = header("Transfer on the built-in scenarios", machine, bench_command("transfer", quick, seed), quick)
    for name in names:
        missing = _available(name)
        if missing:
            result["scenarios"][name] = {"unavailable": missing}
            continue
        chosen, selection = choose_recipe(name, selection_seeds, quick)
        recipes = [r for r in CANDIDATES if r.name in {"default", chosen}]
        cells: list[Cell] = []
        for s in seeds:
            scenario = load_scenario(name, seed=s)
            for recipe in recipes:
                cells += evaluate(scenario, scenario, recipe, epsilons, s, baselines=True)
        chosen_cells = [c for c in cells if c.recipe == chosen]
        goals = _goals(chosen_cells)
        goals["method"] = _best_method(chosen_cells[0].methods).method if chosen_cells else ""
        scenario = load_scenario(name, seed=seed)
        result["scenarios"][name] = {
            "seeds": seeds,
            "chosen": chosen,
            "selection": selection,
            "test_sizes": {site.name: len(site.test.y) for site in scenario.sites},
            "summary": _summary(cells),
            "goals": goals,
            "cells": [
                {
                    "recipe": c.recipe,
                    "epsilon": c.epsilon,
                    "seed": c.seed,
                    "seconds": c.seconds,
                    "methods": {k: m.to_dict() for k, m in c.methods.items()},
                }
                for c in cells
            ],
        }
        write_outputs(out_dir, "transfer", result, _markdown(result, machine_text))  # what is done so far
    return write_outputs(out_dir, "transfer", result, _markdown(result, machine_text))
