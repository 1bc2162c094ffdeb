"""Site-owned privacy budgets across rounds and runs, through the real apps in process.

Site 2's own policy caps its cumulative epsilon at 1.0 and its clipping norm at 1.0; the
coordinator asks for epsilon 3 and clipping norm 5. The site must override the request,
spend at most its cap, and decline the next run once the cap is reached, while the other
sites carry their spend from the first run into the second.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from client.app import app as client_app
from common.privacy.ledger import Ledger
from common.privacy.policy import SitePolicy, write_policy
from common.settings import RunSettings
from simulations.inprocess import DirectGrid, run_on_grid

pytestmark = pytest.mark.federation

CAPS = {0: 10.0, 1: 10.0, 2: 1.0}


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory: pytest.TempPathFactory):
    from tests.conftest import write_shifted_study

    root = tmp_path_factory.mktemp("budget")
    study = write_shifted_study(root / "study")
    for site, cap in CAPS.items():  # RDP keeps this test quick; PRV, the default, runs in test_simulation
        policy = root / "sites" / f"site-{site}" / "state" / "privacy-policy.toml"
        policy.parent.mkdir(parents=True)
        write_policy(
            SitePolicy(max_epsilon=cap, delta=1e-5, max_grad_norm=1.0, accountant="rdp", declared_size=120), policy
        )
    records = []
    for run_id in (7001, 7002):
        grid = DirectGrid(client_app, num_nodes=3, run_id=run_id)
        settings = RunSettings(
            scenario=str(study),
            rounds=2,
            local_epochs=1,
            out=str(root / f"out-{run_id}"),
            sim_root=str(root / "sites"),
            min_sites=2,
            expected_sites=3,
            target_epsilon=3.0,
            delta=1e-5,
            max_grad_norm=5.0,
        )
        records.append(run_on_grid(grid, settings))
    return root, records


def _ledger(root: Path, site: int) -> Ledger:
    return Ledger(root / "sites" / f"site-{site}" / "state")


def test_site_policy_overrides_a_weaker_request(two_runs) -> None:
    root, (first, _) = two_runs
    report = first.round(1).sites["site-2"].train.report
    assert set(report["overridden"]) >= {"target_epsilon", "max_grad_norm"}
    assert report["spends"][0]["clip"] == 1.0 and report["cap-epsilon"] == 1.0
    assert report["grad-sample-mode"] == "ghost-direct"  # last:1 of an MLP trains two linear layers: not linear
    entries = _ledger(root, 2).entries()
    assert [e.server_round for e in entries] == [1, 2]
    assert all(e.max_grad_norm == 1.0 and e.epsilon <= 1.0 for e in entries)
    assert first.round(2).sites["site-0"].train.report["spends"][0]["clip"] == 1.0


def test_spend_carries_into_the_next_run(two_runs) -> None:
    root, (first, second) = two_runs
    after_first = first.round(2).sites["site-0"].train.report["epsilon"]
    assert 2.5 < after_first <= 3.0
    entries = _ledger(root, 0).entries()
    runs = [first.run_id, second.run_id]
    assert first.run_id != second.run_id and all(len(r) == 32 for r in runs)  # chosen by the coordinator
    assert [(e.run_id, e.server_round) for e in entries] == [(run, r) for run in runs for r in (1, 2)]
    assert entries[2].epsilon > after_first
    assert second.round(2).sites["site-0"].train.report["epsilon"] == pytest.approx(entries[3].epsilon)


def test_exhausted_site_declines_and_the_run_finishes_with_the_others(two_runs) -> None:
    root, (_, second) = two_runs
    assert second.status == "completed"
    for server_round in (1, 2):
        current = second.round(server_round)
        assert current.sites["site-2"].status == "declined"
        assert "cap" in current.sites["site-2"].reason or "budget" in current.sites["site-2"].reason.lower()
        assert current.aggregated_sites == ["site-0", "site-1"]
    assert len(_ledger(root, 2).entries()) == 2


def test_no_ledger_exceeds_its_cap_and_every_chain_verifies(two_runs) -> None:
    root, _ = two_runs
    for site, cap in CAPS.items():
        ledger = _ledger(root, site)
        assert ledger.verify() == len(ledger.entries()) > 0
        assert max(e.epsilon for e in ledger.entries()) <= cap
