"""The deployment benchmark's small variant: 4 real SuperNodes on loopback (TLS, SuperNode auth), 1 round.

The 16-SuperNode, 3-round benchmark (``fedtransfer bench deployment``) is too heavy for any test
tier; this runs its code end to end on 4 sites, in the deployment tier, and checks what it
measures exists and is sane (never how fast).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from simulations.benchmarks import BENCHMARKS
from tests.conftest import numbers_in
from tests.deployment_harness import HAS_FLOWER

pytestmark = [
    pytest.mark.deployment,
    pytest.mark.skipif(not HAS_FLOWER, reason="Flower's executables are not installed next to this Python"),
]


def test_four_supernodes_complete_a_round_and_are_measured(tmp_path: Path) -> None:
    result = BENCHMARKS["deployment"](tmp_path, quick=True, seed=0)
    written = json.loads((tmp_path / "deployment.json").read_text())
    assert written == json.loads(json.dumps(result))
    assert all(math.isfinite(n) for n in numbers_in(written))
    assert result["sites"] == 4 and result["rounds"] == 1
    assert len(result["round_seconds"]) == 1 and result["round_seconds"][0] > 0
    assert result["aggregated_sites"] == [4]
    nodes = result["supernodes"]
    assert sorted(n["site"] for n in nodes) == [f"site-{k:02d}" for k in range(4)]
    for node in nodes:
        # a ClientApp process (torch imported) ran under each SuperNode at some point
        assert 0 < node["end_supernode_mb"] and 0 < node["peak_supernode_mb"] < node["peak_tree_mb"]
    assert "fedtransfer bench deployment --quick" in (tmp_path / "deployment.md").read_text()
