"""A coordinator that dies between rounds resumes to the same model; sites never lose recorded spend."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from flwr.app import Message

from client.app import app as client_app
from common.privacy.ledger import Ledger
from common.privacy.policy import SitePolicy, write_policy
from common.settings import RunSettings
from simulations.inprocess import DirectGrid, run_on_grid
from tests.conftest import write_shifted_study

pytestmark = pytest.mark.federation


class CoordinatorCrash(RuntimeError):
    pass


def _settings(study: Path, root: Path, out: str, **changes) -> RunSettings:
    """Reproducible noise (synthetic data, allowed by the policies below): the same seed gives the same model.
    Every round asks for an evaluation, so each round is a train and an evaluate message per site."""
    return RunSettings(
        scenario=str(study),
        rounds=4,
        local_epochs=1,
        strategy="fedadam",
        out=str(root / out),
        sim_root=str(root / f"sites-{out}"),
        min_sites=2,
        expected_sites=3,
        reproducible_noise=True,
        federated_evaluation="every",
        **changes,
    )


def _rdp_policies(sim_root: Path) -> None:
    for site in range(3):
        path = sim_root / f"site-{site}" / "state" / "privacy-policy.toml"
        path.parent.mkdir(parents=True)
        write_policy(
            SitePolicy(
                max_epsilon=10.0, delta=1e-5, accountant="rdp", declared_size=120, allow_reproducible_noise=True
            ),
            path,
        )


class CrashingGrid(DirectGrid):
    """The coordinator dies while looking for sites at the start of round ``crash_round``."""

    def __init__(self, crash_round: int, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.crash_round = crash_round

    def get_node_ids(self):
        finished_rounds = len(self.delivered) // (2 * len(self.node_ids))  # a train and an evaluate message per site
        if finished_rounds == self.crash_round - 1 and len(self.delivered) % (2 * len(self.node_ids)) == 0:
            raise CoordinatorCrash("coordinator lost between rounds")
        return super().get_node_ids()


def _crash_after_sites_answered(grid: DirectGrid, server_round: int) -> None:
    def crash(node: int, reply: Message) -> Message:
        instruction = next(m for n, m in reversed(grid.delivered) if n == node)
        if (
            reply.metadata.message_type == "train"
            and int(instruction.content["config"]["server-round"]) == server_round
        ):
            raise CoordinatorCrash(f"coordinator lost during round {server_round}")
        return reply

    grid.on_reply = crash


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("resume")
    study = write_shifted_study(root / "study")
    for name in ("straight", "resumed", "midround"):
        _rdp_policies(root / f"sites-{name}")
    straight = DirectGrid(client_app, 3, run_id=501)
    run_on_grid(straight, _settings(study, root, "straight"))

    first = CrashingGrid(3, client_app, 3, run_id=502)
    with pytest.raises(CoordinatorCrash):
        run_on_grid(first, _settings(study, root, "resumed"))
    second = DirectGrid(client_app, 3, run_id=503)
    run_on_grid(second, _settings(study, root, "resumed", resume=True))

    first = DirectGrid(client_app, 3, run_id=504)
    _crash_after_sites_answered(first, 3)
    with pytest.raises(CoordinatorCrash):
        run_on_grid(first, _settings(study, root, "midround"))
    second = DirectGrid(client_app, 3, run_id=505)
    run_on_grid(second, _settings(study, root, "midround", resume=True))
    return root


def _card(root: Path, out: str) -> dict:
    return json.loads((root / out / "final-model" / "model-card.json").read_text())


def test_resume_between_rounds_reaches_the_uninterrupted_model(runs: Path) -> None:
    straight, resumed = _card(runs, "straight"), _card(runs, "resumed")
    assert resumed["model_fingerprint"] == straight["model_fingerprint"]
    record = json.loads((runs / "resumed" / "run-record.json").read_text())
    assert record["status"] == "completed" and len(record["run_id"]) == 32  # chosen by the coordinator
    assert [r["flower_run_id"] for r in record["rounds"][1:]] == [502, 502, 503, 503]


def test_resume_keeps_the_run_plan_and_every_ledger_round_once(runs: Path) -> None:
    for site in range(3):
        entries = Ledger(runs / "sites-resumed" / f"site-{site}" / "state").entries()
        run_id = json.loads((runs / "resumed" / "run-record.json").read_text())["run_id"]
        assert [(e.run_id, e.server_round) for e in entries] == [(run_id, r) for r in (1, 2, 3, 4)]
        assert len({e.noise_multiplier for e in entries}) == 1


def test_a_round_interrupted_after_sites_spent_is_never_reused(runs: Path) -> None:
    record = json.loads((runs / "midround" / "run-record.json").read_text())
    assert [r["server_round"] for r in record["abandoned_rounds"]] == [3]
    assert [r["server_round"] for r in record["rounds"]] == [0, 1, 2, 4]
    assert record["status"] == "completed"
    spent = {
        site: [e.server_round for e in Ledger(runs / "sites-midround" / f"site-{site}" / "state").entries()]
        for site in range(3)
    }
    # Flower samples sites in random order: the first one asked answered round 3 before the crash
    assert sorted(spent.values()) == [[1, 2, 3, 4], [1, 2, 4], [1, 2, 4]]
