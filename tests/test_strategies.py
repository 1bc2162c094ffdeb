"""Every selectable Flower strategy aggregates fedtransfer's checked updates (non-private, in process)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from client.app import app as client_app
from common.model.checkpoint import load_checkpoint
from common.settings import STRATEGIES, RunSettings
from simulations.inprocess import DirectGrid, run_on_grid
from tests.conftest import write_shifted_study

pytestmark = pytest.mark.federation


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_strategy_completes_and_moves_only_the_trainable_part(strategy: str, tmp_path: Path) -> None:
    study = write_shifted_study(tmp_path / "study", sites=4)
    grid = DirectGrid(client_app, num_nodes=4)
    settings = RunSettings(
        scenario=str(study),
        rounds=2,
        local_epochs=1,
        strategy=strategy,
        dp=False,
        out=str(tmp_path / "out"),
        sim_root=str(tmp_path / "sites"),
        min_sites=3,
        expected_sites=4,
    )
    record = run_on_grid(grid, settings)
    assert record.status == "completed"
    assert record.round(2).aggregated_sites == [f"site-{i}" for i in range(4)]
    base, _ = load_checkpoint(tmp_path / "out" / "source-model")
    final, card = load_checkpoint(tmp_path / "out" / "final-model")
    changed = {n for n, t in base.state_dict().items() if not torch.equal(t, final.state_dict()[n])}
    assert changed and all(n.startswith(("head.", "backbone.1.")) for n in changed), changed
    assert card.lineage["strategy"] == strategy
