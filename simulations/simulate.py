"""``fedtransfer simulate``: a whole federated transfer run on one machine, with baselines."""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

from flwr.simulation import run_simulation

from client.app import make_client_app
from common.data.scenario import Scenario
from common.data.scenarios import load_scenario
from common.errors import DeploymentError
from common.io import make_output_dir
from common.model.checkpoint import load_checkpoint
from common.model.metrics import classification_metrics
from common.model.pretraining import pretrain_source
from common.model.training import TrainConfig, as_tensors, predict_proba
from common.model.transfer import TransferPolicy
from common.run_record import RUN_RECORD_FILE, RunRecord
from common.settings import RunSettings
from server.app import make_server_app
from server.federation import ROUND_CHECKPOINT_DIR
from server.report import write_report
from simulations.baselines import Baselines, compute_baselines
from simulations.sites import prepare_sites

log = logging.getLogger(__name__)

METHODS = ("source as-is", "local-only", "federated", "personalised", "pooled")


class SimulationFailed(DeploymentError):
    """The simulated run did not produce a run record."""


@dataclass(frozen=True)
class SimulationResult:
    record: RunRecord
    out: Path
    comparison: dict[str, dict[str, float]]  # {method: {site: accuracy}}
    metric: str = "accuracy"


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


def comparison_table(record: RunRecord, baselines: Baselines, metric: str) -> dict[str, dict[str, float]]:
    """{method: {site: metric}}: baselines, the final global model (evaluated by the simulator) and the
    privately personalised copies (as the sites released them)."""
    final = record.simulator_evaluation.get(str(max((r.server_round for r in record.rounds), default=0)), {})
    last = next((r for r in reversed(record.rounds) if any(s.personalised for s in r.sites.values())), None)
    personalised = {s: _number(e.personalised.get(metric)) for s, e in last.sites.items()} if last else {}
    table = {
        m: {s: v[metric] for s, v in baselines.per_site[m].items()} for m in ("source as-is", "local-only", "pooled")
    }
    table["federated"] = {site: _number(values.get(metric)) for site, values in final.items()}
    if any(not math.isnan(v) for v in personalised.values()):
        table["personalised"] = personalised
    return {m: table[m] for m in METHODS if m in table}


def row_mean(values: dict[str, float]) -> float:
    """Mean over the sites that have a value (a site that declined the last round has none)."""
    present = [v for v in values.values() if not math.isnan(v)]
    return sum(present) / len(present) if present else math.nan


def fmt(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.3f}"


def comparison_markdown(table: dict[str, dict[str, float]], metric: str) -> str:
    sites = sorted(table["source as-is"])
    lines = [
        f"## Comparison on the target sites' test sets ({metric})",
        "",
        "Baselines (source as-is, local-only, pooled) are trained without DP on the same base model. The federated "
        "model is evaluated by the simulator itself, which holds every site's test split (a deployed coordinator "
        "sees only the sites' DP releases). Personalised results are what the sites released: with DP, a noisy "
        "histogram of their private copy's predictions.",
        "",
        "| method | " + " | ".join(sites) + " | mean |",
        "|---" * (len(sites) + 2) + "|",
    ]
    for method, values in table.items():
        cells = [fmt(values.get(s, math.nan)) for s in sites]
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {fmt(row_mean(values))} |")
    return "\n".join(lines)


def simulate(settings: RunSettings) -> SimulationResult:
    """Pretrain (unless a checkpoint is given), run Flower's simulation engine, then the baselines.

    With ``settings.resume`` the interrupted run in ``settings.out`` continues with the
    settings it was started with.
    """
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
        checkpoint = Path(settings.checkpoint).expanduser() if settings.checkpoint else out / "source-model"
        if not settings.checkpoint:
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
    run_simulation(
        server_app=make_server_app(bound),
        client_app=make_client_app(Path(bound.sim_root)),
        num_supernodes=num_sites,
        backend_config={
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            "init_args": {"num_cpus": 2, "include_dashboard": False},
        },
    )
    if not (out / RUN_RECORD_FILE).is_file():
        raise SimulationFailed(
            f"the simulated run wrote no run record to {out}; see the log above for the ServerApp error"
        )
    record = RunRecord.load(out / RUN_RECORD_FILE)
    if record.status == "failed" or not record.final_checkpoint:
        raise SimulationFailed(f"the simulated run {record.status}: {record.stop_reason}")
    base, card = load_checkpoint(checkpoint)
    transfer = TransferPolicy.parse(bound.transfer_policy or card.default_transfer_policy)
    # the centralised baselines train as much as one site does over the whole run
    config = TrainConfig(
        epochs=bound.rounds * bound.local_epochs,
        steps=bound.rounds * bound.local_steps,
        batch_size=bound.batch_size,
        lr=bound.lr,
        optimizer=bound.optimizer,
        seed=bound.seed,
    )
    simulator_evaluation(record, out, scenario)
    record.save(out)
    table = comparison_table(record, compute_baselines(scenario, base, transfer, config), "accuracy")
    write_report(record, out, [comparison_markdown(table, "accuracy")])
    return SimulationResult(record=record, out=out, comparison=table)
