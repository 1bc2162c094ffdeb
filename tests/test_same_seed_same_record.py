"""The same seed gives the same run: a refactoring may move code, not change what a run does.

A fixed private run on ``wdbc`` with reproducible noise (bundled public data) is compared
with the record kept in ``tests/golden/wdbc-seed0.json``: every round's aggregated sites and
site statuses, every site's composed epsilon and ledger history, and the final global
model's trainable weights (to 1e-5: float sums may round differently on another CPU).
When a change is *meant* to alter a run, regenerate the record and say why in the commit:
``python -m tests.test_same_seed_same_record``.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch

from client.app import app as client_app
from common.data.site_config import simulated_site_dir
from common.model.checkpoint import load_checkpoint
from common.privacy.ledger import Ledger
from common.settings import RunSettings
from server.federation import FINAL_MODEL_DIR
from simulations.inprocess import DirectGrid, run_on_grid

pytestmark = pytest.mark.federation

GOLDEN = Path(__file__).parent / "golden" / "wdbc-seed0.json"
SITES = 4


def summary(root: Path) -> dict[str, Any]:
    """What the fixed run did, in a form that does not depend on file layout or field order."""
    settings = RunSettings(
        scenario="wdbc",
        rounds=2,
        local_epochs=1,
        seed=0,
        out=str(root / "out"),
        sim_root=str(root / "sites"),
        min_sites=SITES,
        expected_sites=SITES,
        reproducible_noise=True,
    )
    grid = DirectGrid(client_app, num_nodes=SITES, run_id=777)
    record = run_on_grid(grid, settings)
    model, _ = load_checkpoint(root / "out" / FINAL_MODEL_DIR)
    state = model.state_dict()
    return {
        "status": record.status,
        "rounds": [
            {
                "round": r.server_round,
                "aggregated": r.aggregated_sites,
                "sites": {name: s.status for name, s in sorted(r.sites.items())},
            }
            for r in record.rounds
        ],
        "ledgers": [
            [
                (e.kind, e.server_round, round(e.noise_multiplier, 6), e.sample_rate, e.steps, round(e.epsilon, 6))
                for e in Ledger(simulated_site_dir(root / "sites", i) / "state").entries()
            ]
            for i in range(SITES)
        ],
        "head": {name: state[name].flatten().tolist() for name in sorted(state) if name.startswith("head.")},
    }


def test_the_fixed_run_reproduces_its_record(tmp_path: Path) -> None:
    golden = json.loads(GOLDEN.read_text())
    now = json.loads(json.dumps(summary(tmp_path)))  # tuples to lists, as in the file
    head = now.pop("head")
    expected_head = golden.pop("head")
    assert now == golden
    for name, values in expected_head.items():
        torch.testing.assert_close(torch.tensor(head[name]), torch.tensor(values), rtol=0, atol=1e-5)


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as folder:
        GOLDEN.write_text(json.dumps(summary(Path(folder)), indent=1) + "\n")
    print(f"wrote {GOLDEN}", file=sys.stderr)
