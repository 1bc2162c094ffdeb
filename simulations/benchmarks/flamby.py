"""FLamby Fed-Heart-Disease reproduction: our strategies, local-only and pooled, beside FLamby's numbers.

Scenario ``heart-disease-flamby``: the 4 centres with FLamby's preprocessing and split,
logistic regression trained from a seeded random initialisation, no DP. Each federated
setting runs the real ServerApp logic and ClientApp in process (``DirectGrid``) with
Flower's own FedAvg, FedProx, FedAdam or FedYogi; local-only and pooled train the same
model with FLamby's recipe (Adam lr 1e-3, batch 4, 50 epochs). The figure is FLamby's
"per-client mean": the mean test accuracy over the 4 centres and the seeds.
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.metrics import classification_metrics
from common.models import build_model
from common.scenarios import Scenario, load_scenario
from common.settings import RunSettings
from common.site_data import SiteData
from common.training import TrainConfig, as_tensors, predict_proba, train_plain, use_one_torch_thread
from simulations.benchmarks.communication import heart_data_dir
from simulations.benchmarks.harness import bar_plot, fmt, last_evaluated, mean_sd, run_inprocess
from simulations.benchmarks.report import bench_command, header, machine_record, markdown_table, this_machine, write_result

logger = logging.getLogger(__name__)

NAME = "flamby"
SCENARIO = "heart-disease-flamby"

#: FLamby's published per-client mean test accuracy (5 seeds), from the data folder's README.
FLAMBY_PER_CLIENT = {
    "pooled": 0.735, "fedavg": 0.685, "fedprox": 0.685, "fedadam": 0.726, "fedyogi": 0.731,
}
FLAMBY_LOCAL = {"Cleveland": 0.722, "Hungary": 0.629, "Switzerland": 0.567, "VA": 0.637}
FLAMBY_POOLED_TARGET = FLAMBY_PER_CLIENT["pooled"]

#: FLamby's recipe for pooled and local-only training.
CENTRAL_RECIPE = TrainConfig(epochs=50, batch_size=4, lr=1e-3, optimizer="adam")
QUICK_CENTRAL_RECIPE = TrainConfig(epochs=2, batch_size=4, lr=1e-3, optimizer="adam")


@dataclass(frozen=True)
class FederatedSetting:
    """One federated configuration; ``flamby`` names the FLamby row it is compared with."""

    label: str
    strategy: str
    rounds: int
    local_epochs: int
    lr: float
    optimizer: str = "sgd"
    batch_size: int = 4
    proximal_mu: float = 0.01
    flamby: str = ""


#: Batch 4 and 2 local epochs: 100 updates per round at Cleveland (199 rows), as FLamby's 100, fewer at the
#: smaller centres (our sites train epochs, not a fixed number of updates). Our SGD has momentum 0.9.
SETTINGS = (
    FederatedSetting("fedavg (FLamby recipe)", "fedavg", 20, 2, 1e-3, flamby="fedavg"),
    FederatedSetting("fedprox mu 0.01 (FLamby recipe)", "fedprox", 20, 2, 1e-3, flamby="fedprox"),
    FederatedSetting("fedadam (FLamby recipe)", "fedadam", 20, 2, 1e-3, flamby="fedadam"),
    FederatedSetting("fedyogi (FLamby recipe)", "fedyogi", 20, 2, 1e-3, flamby="fedyogi"),
    FederatedSetting("fedyogi, 1 local epoch", "fedyogi", 20, 1, 1e-3, flamby="fedyogi"),
    FederatedSetting("fedyogi, adam lr 1e-3, 1 local epoch", "fedyogi", 20, 1, 1e-3, optimizer="adam", flamby="fedyogi"),
    FederatedSetting("fedavg, adam lr 1e-3, 10 rounds", "fedavg", 10, 2, 1e-3, optimizer="adam", flamby="fedavg"),
)
QUICK_SETTINGS = (
    FederatedSetting("fedavg (FLamby recipe)", "fedavg", 2, 1, 1e-3, flamby="fedavg"),
    FederatedSetting("fedyogi (FLamby recipe)", "fedyogi", 2, 1, 1e-3, flamby="fedyogi"),
)
SEEDS = 5


@dataclass(frozen=True)
class MethodResult:
    """Test accuracy of one method: per centre and seed, the per-client mean and the pooled-test accuracy."""

    method: str
    flamby_reference: float | None
    per_client_mean: float
    per_client_sd: float
    pooled_test: float
    per_centre: dict[str, float]
    by_seed: list[dict[str, float]]
    seconds: float
    setting: dict[str, Any] | None = None


def _pooled_accuracy(per_centre: dict[str, float], sites: tuple[SiteData, ...]) -> float:
    sizes = {site.name: len(site.test) for site in sites}
    return sum(per_centre[name] * sizes[name] for name in per_centre) / sum(sizes[name] for name in per_centre)


def _summarise(method: str, reference: float | None, by_seed: list[dict[str, float]], sites: tuple[SiteData, ...],
               seconds: float, setting: dict[str, Any] | None = None) -> MethodResult:
    names = [site.name for site in sites]
    values = [seed_result[name] for seed_result in by_seed for name in names if name in seed_result]
    mean, sd = mean_sd(values)
    per_centre = {name: mean_sd([r[name] for r in by_seed if name in r])[0] for name in names}
    pooled = mean_sd([_pooled_accuracy(r, sites) for r in by_seed if set(r) == set(names)])[0]
    return MethodResult(method, reference, mean, sd, pooled, per_centre, by_seed, seconds, setting)


def _fit_and_score(scenario: Scenario, train_on: list[SiteData], recipe: TrainConfig, seed: int) -> dict[str, float]:
    torch.manual_seed(seed)
    model = build_model(scenario.model.arch, scenario.input_shape, len(scenario.class_names), scenario.model.args)
    x = np.concatenate([site.train.x for site in train_on])
    y = np.concatenate([site.train.y for site in train_on])
    train_plain(model, *as_tensors(x, y), TrainConfig(**{**recipe.__dict__, "seed": seed}))
    scores = {}
    for site in scenario.sites:
        xt, _ = as_tensors(site.test.x, site.test.y)
        scores[site.name] = classification_metrics(site.test.y, predict_proba(model, xt))["accuracy"]
    return scores


def _central(scenario: Scenario, seeds: list[int], recipe: TrainConfig) -> list[MethodResult]:
    results = []
    start = time.perf_counter()
    pooled = [_fit_and_score(scenario, list(scenario.sites), recipe, seed) for seed in seeds]
    results.append(_summarise("pooled", FLAMBY_PER_CLIENT["pooled"], pooled, scenario.sites, time.perf_counter() - start))
    for site in scenario.sites:
        start = time.perf_counter()
        own = [_fit_and_score(scenario, [site], recipe, seed) for seed in seeds]
        results.append(_summarise(f"local {site.name}", FLAMBY_LOCAL.get(site.name), own, scenario.sites, time.perf_counter() - start))
    return results


def _federated(setting: FederatedSetting, seeds: list[int], scenario: Scenario, data_dir: Path, work: Path) -> MethodResult:
    by_seed = []
    start = time.perf_counter()
    for seed in seeds:
        root = work / f"{setting.strategy}-{setting.rounds}-{setting.local_epochs}-{setting.lr:g}-{setting.optimizer}-{seed}"
        settings = RunSettings(
            scenario=SCENARIO, data_dir=str(data_dir), num_server_rounds=setting.rounds, local_epochs=setting.local_epochs,
            batch_size=setting.batch_size, lr=setting.lr, optimizer=setting.optimizer, strategy=setting.strategy,
            proximal_mu=setting.proximal_mu, dp=False, seed=seed, personalise_epochs=0, out=str(root / "out"),
            sim_root=str(root / "sites"), min_sites=len(scenario.sites), expected_sites=len(scenario.sites),
        )
        by_seed.append(last_evaluated(run_inprocess(settings, len(scenario.sites))))
        logger.info("flamby %s seed %d: %s", setting.label, seed, by_seed[-1])
    return _summarise(setting.label, FLAMBY_PER_CLIENT.get(setting.flamby), by_seed, scenario.sites,
                      time.perf_counter() - start, asdict(setting))


def _markdown(result: dict[str, Any], methods: list[MethodResult], machine_text: str) -> str:
    rows = [
        [m.method, fmt(m.per_client_mean), fmt(m.per_client_sd), "n/a" if m.flamby_reference is None else fmt(m.flamby_reference),
         fmt(m.pooled_test), *[fmt(m.per_centre.get(c, float("nan"))) for c in result["centres"]], f"{m.seconds:.1f}"]
        for m in methods
    ]
    best = result["best_federated"]
    lines = [
        machine_text,
        f"Scenario `{SCENARIO}` (FLamby's preprocessing and split), logistic regression, no DP, "
        f"{len(result['seeds'])} seed(s) {result['seeds']} (the seed sets the initialisation and the batch order; "
        "the split is FLamby's fixed random_state=43). Federated rows: the real ServerApp/ClientApp in process "
        "(`DirectGrid`), Flower's strategies with their default server-side hyper-parameters, accuracy of the global "
        "model on each centre's test split after the last round. Pooled and local rows: "
        f"{result['central_recipe']} on a seeded fresh model (FLamby's recipe); a local model is trained on its own "
        "centre and, as in FLamby, tested on every centre. Per-client mean: mean over the 4 centres' test splits and the "
        "seeds (FLamby's figure); pooled test: accuracy on all 254 test rows.",
        "",
        markdown_table(["method", "per-client mean", "sd", "FLamby", "pooled test", *result["centres"], "seconds"], rows),
        "",
        f"Best federated setting: **{best['method']}** at {fmt(best['per_client_mean'])} per-client mean against FLamby's "
        f"pooled {FLAMBY_POOLED_TARGET}: target {'MET' if best['meets_pooled_target'] else 'NOT met'}. "
        "The best is picked on the test splits, as a hyper-parameter search that reads test accuracy would: read it as "
        "an optimistic figure.",
        "",
        f"Differences from FLamby: our sites train whole local epochs ({SETTINGS[0].local_epochs} epochs of batch "
        f"{SETTINGS[0].batch_size} = "
        f"{', '.join(f'{n} updates at {c}' for c, n in result['updates_per_round'].items())}) where FLamby runs 100 updates "
        "at every centre; our SGD has momentum "
        "0.9; pooled training here uses each centre's own z-scoring (FLamby z-scores pooled training with pooled "
        "statistics); the model has 2 logits with softmax cross-entropy (equivalent to FLamby's 1 logit + sigmoid).",
        "",
        "![per-client mean accuracy](flamby-accuracy.png)",
    ]
    return "\n".join(lines)


def run(out_dir: Path, quick: bool = False, seed: int = 0) -> dict[str, Any]:
    """Run every setting over the seeds; write ``flamby.json``, ``flamby.md`` and ``flamby-accuracy.png``."""
    use_one_torch_thread()
    machine = this_machine()
    out_dir = Path(out_dir)
    data_dir = heart_data_dir()
    seeds = [seed] if quick else list(range(seed, seed + SEEDS))
    scenario = load_scenario(SCENARIO, seed=seed, data_dir=data_dir)
    recipe = QUICK_CENTRAL_RECIPE if quick else CENTRAL_RECIPE
    start = time.perf_counter()
    methods = _central(scenario, seeds, recipe)
    with tempfile.TemporaryDirectory(prefix="fedtransfer-flamby-") as work:
        for setting in QUICK_SETTINGS if quick else SETTINGS:
            methods.append(_federated(setting, seeds, scenario, data_dir, Path(work)))
    federated = [m for m in methods if m.setting is not None]
    best = max(federated, key=lambda m: m.per_client_mean)
    result: dict[str, Any] = {
        "benchmark": NAME,
        "quick": quick,
        "seed": seed,
        "seeds": seeds,
        "machine": machine_record(machine),
        "command": bench_command(NAME, quick, seed),
        "scenario": SCENARIO,
        "centres": [site.name for site in scenario.sites],
        "updates_per_round": {site.name: SETTINGS[0].local_epochs * math.ceil(len(site.train) / SETTINGS[0].batch_size)
                              for site in scenario.sites},
        "central_recipe": f"Adam lr {recipe.lr:g}, batch {recipe.batch_size}, {recipe.epochs} epochs",
        "flamby_published": {"per_client_mean": FLAMBY_PER_CLIENT, "local": FLAMBY_LOCAL},
        "methods": [asdict(m) for m in methods],
        "best_federated": {
            "method": best.method,
            "per_client_mean": best.per_client_mean,
            "meets_pooled_target": best.per_client_mean >= FLAMBY_POOLED_TARGET,
        },
        "wall_seconds": time.perf_counter() - start,
    }
    bar_plot(
        out_dir / "flamby-accuracy.png",
        [m.method for m in methods],
        {"ours": [m.per_client_mean for m in methods],
         "FLamby": [m.flamby_reference if m.flamby_reference is not None else float("nan") for m in methods]},
        "per-client mean test accuracy",
        f"Fed-Heart-Disease, {len(seeds)} seed(s)",
        reference={"FLamby pooled 0.735": FLAMBY_POOLED_TARGET},
    )
    result["plots"] = ["flamby-accuracy.png"]
    text = header("FLamby Fed-Heart-Disease reproduction", machine, result["command"], quick)
    return write_result(out_dir, NAME, result, _markdown(result, methods, text))
