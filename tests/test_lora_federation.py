"""``lora:R`` through the real apps: adapters travel, both ends attach them alike, the final model is plain."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from client.app import app as client_app
from common.model.checkpoint import load_checkpoint
from common.settings import RunSettings
from server.federation import SOURCE_MODEL_DIR
from simulations.inprocess import DirectGrid, run_on_grid
from tests.conftest import write_shifted_study


@pytest.mark.federation
def test_a_private_lora_round_folds_the_adapters_into_the_final_model(tmp_path: Path) -> None:
    study = write_shifted_study(tmp_path / "study", sites=2)
    grid = DirectGrid(client_app, num_nodes=2)
    settings = RunSettings(
        scenario=str(study),
        transfer_policy="lora:2",
        rounds=2,
        local_epochs=1,
        target_epsilon=3.0,
        out=str(tmp_path / "out"),
        sim_root=str(tmp_path / "sites"),
        min_sites=2,
        expected_sites=2,
    )
    record = run_on_grid(grid, settings)
    assert record.status == "completed" and all(len(r.aggregated_sites) == 2 for r in record.rounds if r.server_round)
    # mlp [32, 16] on 8 features: rank-2 adapters on both hidden layers, and the head
    adapters = 2 * (8 + 32) + 2 * (32 + 16)
    assert record.traffic["trainable-parameters"] == adapters + 16 * 2 + 2
    base, _ = load_checkpoint(tmp_path / "out" / SOURCE_MODEL_DIR)
    final, card = load_checkpoint(Path(record.final_checkpoint))  # a plain mlp: the card's architecture builds it
    assert set(final.state_dict()) == set(base.state_dict()) and card.default_transfer_policy == "lora:2"
    moved = [k for k, v in base.state_dict().items() if not torch.equal(final.state_dict()[k], v)]
    assert {k.split(".")[0] for k in moved} == {"backbone", "head"}  # the adapters, folded in, moved the backbone
