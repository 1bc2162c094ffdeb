"""Transfer of a pretrained ResNet-18 to three chest X-ray hospitals under DP (the ``pneumonia`` scenario).

For each seed the coordinator pretrains the scenario's ResNet-18 on the source hospital (its
AUC on the whole official test split is set beside MedMNIST v2's centrally trained ResNet-18
at 28x28, about 0.944), then, with the ``head`` policy on the frozen backbone:

- source as-is: the pretrained model at each target;
- local-only without DP: each target fine-tunes the head alone, for as many epochs as the
  federated run's rounds x local epochs;
- local-only with DP: the same with DP-SGD at epsilon 1, 3 and 8 (``simulations.baselines``'
  DP baseline: noise calibrated with the sites' default accountant for the whole training;
  seeded noise, reproducible and NOT private: what is measured is the accuracy at that noise);
- federated with DP at epsilon 1, 3 and 8: the real apps in process (``run_federation`` and
  ``client.app.app``), FedAvg, the sites' own CSPRNG noise, their ledgers' epsilon;
- pooled without DP: the head fine-tuned on all targets' training data in one place.

Each target is tested on its own part of the official test split (with its skew and
acquisition shift); the benchmark scores the models itself (it holds the test splits):
ROC AUC, balanced accuracy and F1, the targets' mean per seed, then mean and sd over seeds.
"""

from __future__ import annotations

import logging
import resource
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from common.data.pneumonia import MEDMNIST_RESNET18_28_AUC
from common.data.scenario import Scenario
from common.data.scenarios import load_scenario
from common.data.site_data import SiteData, Split
from common.model.checkpoint import load_checkpoint
from common.model.metrics import classification_metrics
from common.model.pretraining import pretrain_source
from common.model.training import TrainConfig, as_tensors, predict_proba, use_one_torch_thread
from common.model.transfer import TransferPolicy
from common.model.zoo import FedModel
from common.privacy.accounting import DEFAULT_ACCOUNTANT
from common.settings import RunSettings
from simulations.baselines import PrivateBaseline, compute_baselines
from simulations.benchmarks.harness import fmt, ledger_epsilons, mean_sd, prewrite_policies, run_inprocess
from simulations.benchmarks.report import (
    header,
    markdown_table,
    result_head,
    this_machine,
    write_result,
)

logger = logging.getLogger(__name__)

NAME = "pneumonia"
SCENARIO = "pneumonia"
METRICS = ("roc-auc", "balanced-accuracy", "f1")
EPSILONS = (1.0, 3.0, 8.0)
QUICK_EPSILONS = (3.0,)
SEEDS = 5
DELTA = 1e-5
POLICY = "head"


@dataclass(frozen=True)
class Recipe:
    """Every method's training: rounds x local epochs of SGD (momentum 0.9) on the head, batch ``batch_size``."""

    rounds: int = 5
    local_epochs: int = 2
    batch_size: int = 64
    lr: float = 0.1
    max_grad_norm: float = 1.0
    source_images: int = 0  # 0: the scenario's whole source hospital
    pretrain_epochs: int = 0  # 0: the scenario's

    def train_config(self, seed: int) -> TrainConfig:
        return TrainConfig(
            epochs=self.rounds * self.local_epochs, batch_size=self.batch_size, lr=self.lr, optimizer="sgd", seed=seed
        )


RECIPE = Recipe()
QUICK_RECIPE = Recipe(rounds=1, local_epochs=1, source_images=256, pretrain_epochs=1)


def _scores(model: FedModel, sites: tuple[SiteData, ...]) -> dict[str, dict[str, float]]:
    return {
        site.name: classification_metrics(site.test.y, predict_proba(model, as_tensors(site.test.x, site.test.y)[0]))
        for site in sites
    }


def _reduced(scenario: Scenario, recipe: Recipe) -> Scenario:
    """The scenario with a smaller source or shorter pretraining (quick variant only)."""
    source, pretrain = scenario.source, scenario.pretrain
    if recipe.source_images:
        source = SiteData(
            "source",
            Split(source.train.x[: recipe.source_images], source.train.y[: recipe.source_images]),
            source.test,
        )
    if recipe.pretrain_epochs:
        pretrain = {**pretrain, "epochs": recipe.pretrain_epochs}
    return replace(scenario, source=source, pretrain=pretrain)


def _federated(
    scenario: Scenario, checkpoint: Path, recipe: Recipe, epsilon: float, seed: int, root: Path, data_dir: str
) -> tuple[dict[str, dict[str, float]], list[float], dict[str, int]]:
    sites = len(scenario.sites)
    prewrite_policies(
        root / "sites",
        scenario,
        allow_non_private=False,
        max_epsilon=epsilon,
        max_epsilon_per_run=epsilon,
        delta=DELTA,
        min_noise_multiplier=0.0,
        max_grad_norm=recipe.max_grad_norm,
    )
    settings = RunSettings(
        scenario=SCENARIO,
        data_dir=data_dir,
        checkpoint=str(checkpoint),
        transfer_policy=POLICY,
        rounds=recipe.rounds,
        local_epochs=recipe.local_epochs,
        batch_size=recipe.batch_size,
        lr=recipe.lr,
        optimizer="sgd",
        strategy="fedavg",
        target_epsilon=epsilon,
        delta=DELTA,
        max_grad_norm=recipe.max_grad_norm,
        seed=seed,
        out=str(root / "out"),
        sim_root=str(root / "sites"),
        min_sites=sites,
        expected_sites=sites,
    )
    record = run_inprocess(settings, sites)
    final, _ = load_checkpoint(Path(record.final_checkpoint))
    return _scores(final, scenario.sites), ledger_epsilons(root / "sites", sites), record.traffic


@dataclass(frozen=True)
class Cell:
    """One method over the seeds: the targets' mean of each metric (mean and sd over seeds), epsilon, seconds."""

    method: str
    epsilon: float | None
    metrics: dict[str, tuple[float, float]]
    per_site_auc: dict[str, float]
    epsilon_spent: float | None
    seconds: float


def _cell(method: str, epsilon: float | None, runs: list[dict[str, dict[str, float]]], spent, seconds) -> Cell:
    names = sorted(runs[0])
    metrics = {m: mean_sd([statistics.fmean(run[s][m] for s in names) for run in runs]) for m in METRICS}
    per_site = {s: mean_sd([run[s]["roc-auc"] for run in runs])[0] for s in names}
    finite = [e for e in spent if e == e]
    return Cell(method, epsilon, metrics, per_site, max(finite) if finite else None, seconds)


def _sweep(scenario: Scenario, seeds: list[int], epsilons: tuple[float, ...], recipe: Recipe, work: Path, data_dir):
    runs: dict[tuple[str, float | None], list[dict[str, dict[str, float]]]] = {}
    spent: dict[tuple[str, float | None], list[float]] = {}
    seconds: dict[tuple[str, float | None], float] = {}
    source: list[dict[str, float]] = []
    traffic: dict[str, int] = {}

    def add(key, scores, eps, elapsed) -> None:
        runs.setdefault(key, []).append(scores)
        spent.setdefault(key, []).extend(eps)
        seconds[key] = seconds.get(key, 0.0) + elapsed

    transfer = TransferPolicy.parse(POLICY)
    for seed in seeds:
        start = time.perf_counter()
        card = pretrain_source(scenario, work / f"source-{seed}", seed=seed)
        add(("pretraining", None), {}, [], time.perf_counter() - start)
        source.append(card.lineage["source_test"])
        base, _ = load_checkpoint(work / f"source-{seed}")
        start = time.perf_counter()
        baselines = compute_baselines(scenario, base, transfer, recipe.train_config(seed))
        elapsed = (time.perf_counter() - start) / len(baselines)
        for scores in baselines:
            add((scores.method, None), scores.sites, [], elapsed)
        for epsilon in epsilons:
            start = time.perf_counter()
            promise = PrivateBaseline(epsilon, DELTA, recipe.max_grad_norm, DEFAULT_ACCOUNTANT)
            private = compute_baselines(scenario, base, transfer, recipe.train_config(seed), promise)
            scores = next(m for m in private if m.method == "local-only (DP)").sites
            add(("local-only", epsilon), scores, [epsilon], time.perf_counter() - start)
            start = time.perf_counter()
            scores, eps, traffic = _federated(
                scenario, work / f"source-{seed}", recipe, epsilon, seed, work / f"fed-{epsilon:g}-{seed}", data_dir
            )
            add(("federated", epsilon), scores, eps, time.perf_counter() - start)
            logger.info("pneumonia seed %d epsilon %g done", seed, epsilon)
    cells = [
        _cell(method, epsilon, by_seed, spent[(method, epsilon)], seconds[(method, epsilon)] / len(seeds))
        for (method, epsilon), by_seed in runs.items()
        if method != "pretraining"
    ]
    return cells, source, traffic, seconds[("pretraining", None)] / len(seeds)


ORDER = ("source as-is", "local-only", "federated", "pooled")


def run(out_dir: Path, quick: bool = False, seed: int = 0) -> dict[str, Any]:
    """Every method at every epsilon over the seeds; write ``pneumonia.json`` and ``pneumonia.md``."""
    use_one_torch_thread()
    machine = this_machine()
    seeds = [seed] if quick else list(range(seed, seed + SEEDS))
    epsilons = QUICK_EPSILONS if quick else EPSILONS
    recipe = QUICK_RECIPE if quick else RECIPE
    scenario = load_scenario(SCENARIO, seed=seed)
    from common.data.pneumonia import find_file

    data_dir = str(find_file(None).parent)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fedtransfer-pneumonia-") as work:
        cells, source, traffic, pretrain_seconds = _sweep(
            _reduced(scenario, recipe), seeds, epsilons, recipe, Path(work), data_dir
        )
    cells.sort(key=lambda c: (ORDER.index(c.method), c.epsilon or 0.0))
    result: dict[str, Any] = {
        **result_head(NAME, quick, seed, machine),
        "seeds": seeds,
        "targets": [site.name for site in scenario.sites],
        "epsilons": list(epsilons),
        "delta": DELTA,
        "accountant": DEFAULT_ACCOUNTANT,
        "recipe": asdict(recipe),
        "source_test": {m: mean_sd([s[m] for s in source]) for m in (*METRICS, "accuracy")},
        "medmnist_resnet18_28_auc": MEDMNIST_RESNET18_28_AUC,
        "cells": [asdict(c) for c in cells],
        "traffic": traffic,
        "pretrain_seconds": pretrain_seconds,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "wall_seconds": time.perf_counter() - start,
    }
    text = header("Pneumonia: a pretrained ResNet-18 at three chest X-ray hospitals", machine, result["command"], quick)
    return write_result(out_dir, NAME, result, _markdown(result, cells, text))


def _pm(pair: tuple[float, float]) -> str:
    return f"{fmt(pair[0])} ± {fmt(pair[1])}"


def _markdown(result: dict[str, Any], cells: list[Cell], text: str) -> str:
    names = result["targets"]
    rows = [
        [
            c.method,
            "no DP" if c.epsilon is None else f"{c.epsilon:g}",
            "-" if c.epsilon_spent is None else f"{c.epsilon_spent:.2f}",
            *[_pm(c.metrics[m]) for m in METRICS],
            *[fmt(c.per_site_auc[n]) for n in names],
            f"{c.seconds:.0f}",
        ]
        for c in cells
    ]
    source, recipe, traffic = result["source_test"], result["recipe"], result["traffic"]
    return "\n".join(
        [
            text,
            f"Scenario `{SCENARIO}`: ResNet-18 (torchvision, 28x28 input, grey repeated to 3 channels), pretrained at "
            f"the source hospital for {len(result['seeds'])} seed(s) {result['seeds']}; targets {', '.join(names)}; "
            f"transfer policy `{POLICY}` (the backbone frozen, its features cached at each site). Every method trains "
            f"{recipe['rounds']} x {recipe['local_epochs']} epochs of SGD (lr {recipe['lr']:g}, momentum 0.9, batch "
            f"{recipe['batch_size']}); federated: FedAvg over {recipe['rounds']} rounds, DP-SGD at every site "
            f"(clipping {recipe['max_grad_norm']:g}, Poisson sampling, noise from the OS CSPRNG), accountant "
            f"{result['accountant']}, delta {result['delta']:g}, the sites' policies capped at the epsilon asked; "
            "each federated run also makes its default DP evaluation release after the last round (inside the "
            "epsilon). Local-only DP: seeded noise, calibrated with the same accountant. Metrics on each target's "
            "own part of the official test split: the targets' mean per seed, mean ± sd over seeds; per-site columns "
            "are AUC. Seconds: per seed.",
            "",
            f"Source model on the whole official test split (624 X-rays, unaltered): AUC {_pm(source['roc-auc'])}, "
            f"balanced accuracy {_pm(source['balanced-accuracy'])}, F1 {_pm(source['f1'])}, accuracy "
            f"{_pm(source['accuracy'])}; MedMNIST v2 reports about {result['medmnist_resnet18_28_auc']:.3f} AUC for "
            "ResNet-18 at 28x28 trained centrally on the whole training split (4708 X-rays, not the source "
            f"hospital's part). Pretraining: {result['pretrain_seconds']:.0f} s per seed.",
            "",
            markdown_table(
                ["method", "epsilon asked", "epsilon spent", "AUC", "balanced accuracy", "F1", *names, "seconds"],
                rows,
            ),
            "",
            f"Traffic per site and round: {traffic.get('update-bytes-per-site-per-round', 0)} bytes of trainable "
            f"tensors each way ({traffic.get('trainable-parameters', 0)} parameters); the base model "
            f"({traffic.get('base-model-bytes-per-site', 0) / 2**20:.1f} MiB) once per site and run. Peak resident "
            f"memory of the benchmark process: {result['peak_rss_mib']:.0f} MiB; wall time "
            f"{result['wall_seconds'] / 60:.1f} min.",
        ]
    )
