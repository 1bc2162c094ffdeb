"""Smoke runs of the backbone-cache and pneumonia benchmarks (quick variants): files, keys, finite figures.

The figures are never compared with targets here; BENCHMARKS.md quotes the full runs.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from common.data import pneumonia
from simulations.benchmarks import BENCHMARKS
from tests.conftest import numbers_in
from tests.test_pneumonia import DATA_DIR
from tests.test_pneumonia import pytestmark as data_present

pytestmark = [data_present, pytest.mark.slow]


@pytest.mark.parametrize("name", ["backbone-cache", "pneumonia"])
def test_quick_variant_writes_finite_figures(tmp_path: Path, name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(pneumonia.DIR_ENV, str(DATA_DIR))
    result = BENCHMARKS[name](tmp_path, quick=True, seed=0)
    written = json.loads((tmp_path / f"{name}.json").read_text())
    assert written == json.loads(json.dumps(result)) and written["quick"] is True
    assert all(math.isfinite(n) for n in numbers_in(written))
    markdown = (tmp_path / f"{name}.md").read_text()
    assert "Machine:" in markdown and f"fedtransfer bench {name} --quick" in markdown
    if name == "backbone-cache":
        assert all(row["max_weight_difference"] <= 1e-5 for row in written["rows"])
        assert {row["resize"] for row in written["rows"]} == {0, 224}
    else:
        methods = {(c["method"], c["epsilon"]) for c in written["cells"]}
        assert {("source as-is", None), ("local-only", None), ("local-only", 3.0), ("federated", 3.0)} <= methods
        assert written["traffic"]["update-bytes-per-site-per-round"] == (512 * 2 + 2) * 4
