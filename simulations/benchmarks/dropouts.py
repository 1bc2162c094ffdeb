"""Dropouts: rounds completed and final accuracy when 0, 1 or 2 of the 4 wdbc hospitals fail.

Every case is a real federation in one process (``DirectGrid``: the ServerApp logic, the
strategy wrapper, the secure channel and the ClientApp, with only the relay replaced). The
failing sites train in round 1, then crash in every later round (their ClientApp raises,
as a site whose process dies does). With ``min-sites`` 2 the run goes on with whoever is
left; the last case asks for 3 sites and so stops cleanly after round 1 when two fail.
The final global model is scored on every hospital's test split, failed ones included.

The full variant trains with DP (site policies: the simulated ones with the RDP accountant,
cap 10, run target epsilon 3) for 5 rounds, with reproducible (seeded, NOT private) noise,
which the simulated sites allow on wdbc's bundled public data, so that the cases differ only
in their failures; ``quick`` trains without DP for 2 rounds, for smoke tests only. No
federated evaluation is asked for (each would be a DP release at the sites); the simulator
scores the final model itself.
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from flwr.app import Context, Message

from client.app import app as client_app
from common.data.scenarios import Scenario, load_scenario
from common.model.checkpoint import load_checkpoint
from common.model.pretraining import pretrain_source
from common.model.training import use_one_torch_thread
from common.model.zoo import FedModel
from common.protocol import CONFIG
from common.settings import RunSettings
from server.federation import FINAL_MODEL_DIR
from simulations.benchmarks.harness import prewrite_policies, site_scores
from simulations.benchmarks.report import (
    Machine,
    bench_command,
    header,
    markdown_table,
    result_head,
    this_machine,
    write_result,
)
from simulations.inprocess import DirectGrid, run_on_grid

logger = logging.getLogger(__name__)

NAME = "dropouts"
SCENARIO = "wdbc"
CASES: tuple[tuple[int, int], ...] = ((0, 2), (1, 2), (2, 2), (2, 3))  # (failing sites, min-sites)
ROUNDS, QUICK_ROUNDS = 5, 2
FAIL_FROM_ROUND = 2


@dataclass(frozen=True)
class DropoutCase:
    """One federation: which sites failed, what the run did, how good its final model is."""

    failing_sites: int
    failed: list[str]
    min_sites: int
    rounds_planned: int
    rounds_completed: int
    status: str
    stop_reason: str
    accuracy_all: float
    loss_all: float
    accuracy_healthy: float
    accuracy_failed: float
    seconds: float


class CrashingSites:
    """fedtransfer's ClientApp, except that the given nodes crash on training from ``from_round`` on."""

    def __init__(self, nodes: set[int], from_round: int) -> None:
        self.nodes = nodes
        self.from_round = from_round

    def __call__(self, msg: Message, context: Context) -> Message:
        if (
            context.node_id in self.nodes
            and msg.metadata.message_type == "train"
            and int(msg.content[CONFIG]["server-round"]) >= self.from_round
        ):
            raise RuntimeError(f"node {context.node_id} is down")
        return client_app(msg, context)


def _score(model: FedModel, scenario: Scenario, indices: list[int], metric: str = "accuracy") -> float:
    """Mean test ``metric`` of ``model`` over the scenario sites at ``indices`` (0 sites: 0.0)."""
    scores = site_scores(model, [scenario.sites[i] for i in indices], metric)
    return sum(scores.values()) / len(scores) if scores else 0.0


def run_case(
    scenario: Scenario, checkpoint: Path, out: Path, failing: int, min_sites: int, rounds: int, dp: bool, seed: int
) -> DropoutCase:
    """One federation of all the scenario's sites in which the last ``failing`` of them crash after round 1."""
    sites = len(scenario.sites)
    failed_indices = list(range(sites - failing, sites))
    grid = DirectGrid(client_app, num_nodes=sites)
    grid.client_app = CrashingSites({grid.node_ids[i] for i in failed_indices}, FAIL_FROM_ROUND)
    if dp:
        prewrite_policies(out / "sites", scenario, allow_non_private=False, accountant="rdp")
    settings = RunSettings(
        scenario=SCENARIO,
        checkpoint=str(checkpoint),
        rounds=rounds,
        local_epochs=1,
        dp=dp,
        seed=seed,
        personalise_epochs=0,
        federated_evaluation="none",
        reproducible_noise=dp,
        out=str(out / "run"),
        sim_root=str(out / "sites"),
        min_sites=min_sites,
        expected_sites=sites,
    )
    started = time.perf_counter()
    record = run_on_grid(grid, settings)
    seconds = time.perf_counter() - started
    model, _ = load_checkpoint(out / "run" / FINAL_MODEL_DIR)
    healthy = [i for i in range(sites) if i not in failed_indices]
    return DropoutCase(
        failing_sites=failing,
        failed=[scenario.sites[i].name for i in failed_indices],
        min_sites=min_sites,
        rounds_planned=rounds,
        rounds_completed=sum(1 for r in record.rounds if r.aggregated_sites),
        status=record.status,
        stop_reason=record.stop_reason,
        accuracy_all=_score(model, scenario, list(range(sites))),
        loss_all=_score(model, scenario, list(range(sites)), "loss"),
        accuracy_healthy=_score(model, scenario, healthy),
        accuracy_failed=_score(model, scenario, failed_indices),
        seconds=seconds,
    )


def _markdown(machine: Machine, result: dict[str, Any], cases: list[DropoutCase]) -> str:
    privacy = (
        "without DP"
        if result["quick"]
        else "with DP (RDP accountant, run target epsilon 3; seeded, reproducible and NOT private noise)"
    )
    lines = [
        header(
            "Dropouts: rounds completed and final accuracy",
            machine,
            bench_command(NAME, result["quick"], result["seed"]),
            result["quick"],
        )
    ]
    lines.append(
        f"{SCENARIO}, 4 hospitals, FedAvg, {result['rounds']} rounds {privacy}. Failing sites train in round 1 and "
        "crash in "
        f"every round from {FAIL_FROM_ROUND} on. Accuracy is the final global model's on the hospitals' test splits, "
        f"computed by the benchmark itself (sites release no exact metrics, and none are asked to evaluate here); "
        f"the source model as-is scores {result['source_accuracy']:.3f} (loss {result['source_loss']:.3f}) on all "
        "four. "
        f"Each test split has {min(result['test_rows_per_site'])}-{max(result['test_rows_per_site'])} rows, so one "
        "row is "
        f"about {1 / min(result['test_rows_per_site']):.3f} of a site's accuracy.\n"
    )
    rows = [
        [
            c.failing_sites,
            ", ".join(c.failed) or "none",
            c.min_sites,
            f"{c.rounds_completed}/{c.rounds_planned}",
            c.status,
            f"{c.accuracy_all:.3f}",
            f"{c.loss_all:.3f}",
            f"{c.accuracy_healthy:.3f}",
            f"{c.accuracy_failed:.3f}" if c.failed else "-",
            f"{c.seconds:.1f}",
        ]
        for c in cases
    ]
    headers = [
        "failing",
        "failed sites",
        "min-sites",
        "rounds completed",
        "status",
        "accuracy (all 4)",
        "loss (all 4)",
        "accuracy (healthy)",
        "accuracy (failed)",
        "seconds",
    ]
    lines.append(markdown_table(headers, rows))
    lines += [
        f"\nStopped with {c.failing_sites} failing and min-sites {c.min_sites}: {c.stop_reason}"
        for c in cases
        if c.status == "stopped"
    ]
    return "\n".join(lines)


def run(out_dir: Path, quick: bool = False, seed: int = 0) -> dict[str, Any]:
    """Run every dropout case; write ``dropouts.json`` and ``dropouts.md``."""
    use_one_torch_thread()
    machine = this_machine()
    scenario = load_scenario(SCENARIO, seed=seed)
    rounds = QUICK_ROUNDS if quick else ROUNDS
    with tempfile.TemporaryDirectory(prefix=f"fedtransfer-{NAME}-") as scratch:  # run folders, sites and ledgers
        work = Path(scratch)
        checkpoint = work / "source-model"
        pretrain_source(scenario, checkpoint, seed=seed)
        source, _ = load_checkpoint(checkpoint)
        cases = [
            run_case(
                scenario,
                checkpoint,
                work / f"failing-{failing}-min-{min_sites}",
                failing,
                min_sites,
                rounds,
                dp=not quick,
                seed=seed,
            )
            for failing, min_sites in CASES
        ]
    result: dict[str, Any] = {
        **result_head(NAME, quick, seed, machine),
        "scenario": SCENARIO,
        "rounds": rounds,
        "dp": not quick,
        "source_accuracy": _score(source, scenario, list(range(len(scenario.sites)))),
        "source_loss": _score(source, scenario, list(range(len(scenario.sites))), "loss"),
        "test_rows_per_site": [len(site.test) for site in scenario.sites],
        "cases": [asdict(c) for c in cases],
    }
    return write_result(out_dir, NAME, result, _markdown(machine, result, cases))
