"""``fedtransfer simulate``: a whole federated transfer run on one machine, with baselines."""

from __future__ import annotations

import logging
import math
import os
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

from flwr.simulation import run_simulation

from client.app import make_client_app
from common.data.scenario import Scenario
from common.data.scenarios import load_scenario
from common.errors import DeploymentError
from common.interrupt import StopRequest
from common.io import make_output_dir
from common.model.checkpoint import load_checkpoint
from common.model.metrics import classification_metrics, headline_metric
from common.model.pretraining import pretrain_source
from common.model.training import TrainConfig, as_tensors, predict_proba
from common.model.transfer import TransferPolicy
from common.progress import BASELINES, PRETRAINING, STARTUP, progress
from common.run_record import FAILED, INTERRUPTED, RUN_RECORD_FILE, RunRecord
from common.settings import RunSettings
from server.federation import ROUND_CHECKPOINT_DIR
from server.report import write_report
from simulations.baselines import MethodScores, PrivateBaseline, compute_baselines
from simulations.comparison import (
    COMPARISON_PLOT,
    comparison_markdown,
    federated_scores,
    ordered,
    personalised_scores,
    plot_comparison,
)
from simulations.sites import prepare_sites
from simulations.waves import make_server_app

log = logging.getLogger(__name__)

METHODS = ("source as-is", "local-only", "federated", "personalised", "pooled")


class SimulationFailed(DeploymentError):
    """The simulated run did not produce a run record."""


@dataclass(frozen=True)
class SimulationResult:
    record: RunRecord
    out: Path
    comparison: list[MethodScores]  # every method, in the order of simulations.comparison.ORDER
    metric: str  # the headline metric


def _load(settings: RunSettings) -> Scenario:
    return load_scenario(
        settings.scenario,
        seed=settings.seed,
        data_dir=Path(settings.data_dir) if settings.data_dir else None,
        private=not settings.per_site_scaling,
    )


def _number(value: object) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan


def simulator_evaluation(record: RunRecord, out: Path, scenario: Scenario) -> None:
    """Evaluate the global model of every round on every simulated site's test split, as the simulator.

    The simulator holds every site's data, so it can measure the models exactly; a deployed
    coordinator cannot (it sees only the sites' DP releases). Filled into
    ``record.simulator_evaluation`` and labelled so in the report.
    """
    directories = {0: Path(record.base_model["path"])}
    directories |= {
        r.server_round: out / ROUND_CHECKPOINT_DIR / f"round-{r.server_round}" for r in record.rounds if r.server_round
    }
    for server_round, directory in sorted(directories.items()):
        if not (directory / "model.safetensors").is_file():
            continue
        model, _ = load_checkpoint(directory)
        record.simulator_evaluation[str(server_round)] = {
            site.name: classification_metrics(
                site.test.y, predict_proba(model, as_tensors(site.test.x, site.test.y)[0])
            )
            for site in scenario.sites
        }


def with_recipe(settings: RunSettings, scenario: Scenario, open_settings: frozenset[str]) -> RunSettings:
    """``settings`` with the scenario's recipe applied to the settings left open (never to one the user set)."""
    recipe = {key: value for key, value in scenario.recipe.items() if key in open_settings}
    if not recipe:
        return settings
    log.info(
        "scenario %s's recipe (chosen on validation splits by `fedtransfer bench transfer`): %s",
        scenario.name,
        ", ".join(f"{key.replace('_', '-')} {value}" for key, value in recipe.items()),
    )
    return settings.with_(**recipe)


def simulate(
    settings: RunSettings, open_settings: frozenset[str] = frozenset(), stop: StopRequest | None = None
) -> SimulationResult:
    """Pretrain (unless a checkpoint is given), run Flower's simulation engine, then the baselines.

    With ``settings.resume`` the interrupted run in ``settings.out`` continues with the
    settings it was started with. ``open_settings``: the settings (field names) the caller left
    at their defaults; the scenario's recipe (``Scenario.recipe``) sets those it names. Once
    ``stop`` is requested during the federation, the run ends "interrupted" (no baselines, an
    empty comparison); before or after it, the request raises ``RunInterrupted`` where it arrives.
    """
    log.info("loading the scenario", extra=progress(STARTUP, detail="loading the scenario", transient=True))
    out = settings.output_dir()
    if settings.resume and not settings.out:
        raise SimulationFailed("resume needs --out: the folder of the run to continue")
    make_output_dir(out)
    if settings.resume:
        if not (out / RUN_RECORD_FILE).is_file():
            raise SimulationFailed(f"nothing to resume in {out}: it holds no {RUN_RECORD_FILE}")
        bound = RunSettings(**{**RunRecord.load(out / RUN_RECORD_FILE).settings, "resume": True, "out": str(out)})
        scenario = _load(bound)
        checkpoint = Path(bound.checkpoint)
    else:
        (out / RUN_RECORD_FILE).unlink(missing_ok=True)
        scenario = _load(settings)
        settings = with_recipe(settings, scenario, open_settings)
        checkpoint = Path(settings.checkpoint).expanduser() if settings.checkpoint else out / "source-model"
        if not settings.checkpoint:
            log.info(
                "pretraining the source model",
                extra=progress(PRETRAINING, detail=f"{scenario.model.arch} on the source domain", transient=True),
            )
            pretrain_source(scenario, checkpoint, seed=settings.seed)
        bound = settings.with_(
            checkpoint=str(checkpoint.resolve()),
            out=str(out),
            sim_root=str(Path(settings.sim_root or out / "sites").expanduser().resolve()),
            min_sites=min(settings.min_sites, len(scenario.sites)),
            expected_sites=len(scenario.sites),
        )
    bound = prepare_sites(bound)
    num_sites = len(scenario.sites)
    os.environ.setdefault(
        "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0"
    )  # CPU only: keep Ray from touching device variables
    log.info(
        "starting Flower's simulation engine with %d sites",
        num_sites,
        extra=progress(STARTUP, detail=f"starting Flower's simulation engine (Ray), {num_sites} sites", transient=True),
    )
    with stop.graceful() if stop is not None else nullcontext():
        run_simulation(
            server_app=make_server_app(bound, stop),
            client_app=make_client_app(Path(bound.sim_root)),
            num_supernodes=num_sites,
            backend_config={
                "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                "init_args": {"num_cpus": 2, "include_dashboard": False},
            },
        )
    if not (out / RUN_RECORD_FILE).is_file():
        raise SimulationFailed(f"the simulated run wrote no run record to {out}; see the log for the ServerApp's error")
    record = RunRecord.load(out / RUN_RECORD_FILE)
    if record.status == INTERRUPTED:
        return SimulationResult(record=record, out=out, comparison=[], metric="")
    if stop is not None:
        stop.check()
    if record.status == FAILED or not record.final_checkpoint:
        raise SimulationFailed(f"the simulated run {record.status}: {record.stop_reason}")
    base, card = load_checkpoint(checkpoint)
    transfer = TransferPolicy.parse(bound.transfer_policy or card.default_transfer_policy)
    # the centralised baselines train as much as one site does over the whole run, with the same loss
    weighted = bound.class_weights != "none" and card.class_prior
    config = TrainConfig(
        epochs=bound.rounds * bound.local_epochs,
        steps=bound.rounds * bound.local_steps,
        batch_size=bound.batch_size,
        lr=bound.lr,
        optimizer=bound.optimizer,
        seed=bound.seed,
        class_weights=bound.class_weights if weighted else "none",
        class_prior=tuple(card.class_prior) if weighted else (),
    )
    promise = PrivateBaseline(bound.target_epsilon, bound.delta, bound.max_grad_norm) if bound.dp else None
    log.info(
        "training the baselines",
        extra=progress(BASELINES, detail="source as-is, local-only and pooled, scored on every site", transient=True),
    )
    simulator_evaluation(record, out, scenario)
    methods = compute_baselines(scenario, base, transfer, config, promise)
    methods.append(federated_scores(record, scenario, bound.seed))
    personalised = personalised_scores(record)
    if personalised is not None:
        methods.append(personalised)
    methods = ordered(methods)
    metric = headline_metric(len(scenario.class_names), bound.metric)
    record.simulator_comparison = {"metric": metric, "methods": [m.to_dict() for m in methods]}
    record.save(out)
    plot_comparison(methods, metric, out / COMPARISON_PLOT)
    write_report(record, out, [comparison_markdown(methods, metric)])
    return SimulationResult(record=record, out=out, comparison=methods, metric=metric)
