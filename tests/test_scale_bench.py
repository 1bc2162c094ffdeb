"""The scale benchmark's sites release a DP evaluation in every round, as its description says."""

from __future__ import annotations

from pathlib import Path

import pytest

from client.app import make_client_app
from common.data.scenarios import load_scenario
from common.model.pretraining import pretrain_source
from common.protocol import STATUS_OK
from simulations.benchmarks.scale import prepare_scale_sites, scale_settings, write_study
from simulations.inprocess import DirectGrid, run_on_grid

ROUNDS, SITES = 3, 5  # site 4 is a copy of scenario site 0


@pytest.mark.federation
def test_every_scale_site_releases_an_evaluation_every_round(tmp_path: Path) -> None:
    checkpoint = tmp_path / "source-model"
    pretrain_source(load_scenario("wdbc", seed=0), checkpoint, seed=0)
    spec = {
        "study": str(write_study("wdbc", SITES, tmp_path / "study", 0)),
        "checkpoint": str(checkpoint),
        "sites": SITES,
        "rounds": ROUNDS,
        "seed": 0,
        "work": str(tmp_path / "work"),
        "dp": True,
    }
    settings = prepare_scale_sites(scale_settings(spec))
    record = run_on_grid(DirectGrid(make_client_app(Path(settings.sim_root)), SITES), settings)
    released = {
        (r.server_round, site): (s.evaluate.status, s.evaluate.reason)
        for r in record.rounds
        for site, s in r.sites.items()
        if s.evaluate is not None
    }
    assert len(released) == ROUNDS * SITES
    assert {status for status, _ in released.values()} == {STATUS_OK}, sorted(released.items())
