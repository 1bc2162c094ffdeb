"""Shared fixtures: Flower's environment switches, a small shifted multi-site study, the deployment tests' processes."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest

if TYPE_CHECKING:
    from tests.deployment_harness import Processes

FLOWER_ENV = {
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
}
os.environ.update(FLOWER_ENV)
TIERS = ("federation", "deployment", "slow")


def pytest_configure(config: pytest.Config) -> None:
    """One torch thread, as at a site (client.app): the models are small, extra threads only contend."""
    from common.model.training import use_one_torch_thread

    use_one_torch_thread()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test without a tier marker is a unit test: ``pytest -m unit`` is the fast tier."""
    for item in items:
        if not any(item.get_closest_marker(tier) for tier in TIERS):
            item.add_marker(pytest.mark.unit)


def _write_csv(path: Path, x: np.ndarray, y: np.ndarray) -> None:
    header = ",".join([f"f{i}" for i in range(x.shape[1])] + ["label"])
    rows = [",".join(f"{v:.6f}" for v in row) + f",{int(label)}" for row, label in zip(x, y)]
    path.write_text(header + "\n" + "\n".join(rows) + "\n")


def write_shifted_study(root: Path, sites: int = 3, seed: int = 0) -> Path:
    """A bring-your-own study where the target sites' decision rule is rotated away from the source's.

    The source model scores around 0.7 on the targets; adapting its last layers fixes most of it.
    """
    rng = np.random.default_rng(seed)
    features = 8
    w_source = rng.normal(size=features)
    w_target = w_source + 1.4 * rng.normal(size=features)
    data = root / "data"
    data.mkdir(parents=True)

    def draw(n: int, w: np.ndarray, shift: float) -> tuple[np.ndarray, np.ndarray]:
        x = rng.normal(size=(n, features)) + shift
        return x, (x @ w - shift * w.sum() > 0).astype(int)

    _write_csv(data / "source.csv", *draw(400, w_source, 0.0))
    entries = []
    for i in range(sites):
        _write_csv(data / f"site{i}.csv", *draw(160, w_target, 0.2 * i))
        entries.append(f'[[sites]]\nname = "site-{i}"\npath = "data/site{i}.csv"\n')
    toml = root / "study.toml"
    toml.write_text(
        '[scenario]\nname = "shifted-study"\ndescription = "rotated decision rule at the targets"\n'
        'label_column = "label"\nclass_names = ["negative", "positive"]\n\n'
        '[model]\narch = "mlp"\nhidden = [32, 16]\ntransfer_policy = "last:1"\n\n'
        '[source]\npath = "data/source.csv"\ndescription = "synthetic source site"\n\n' + "\n".join(entries)
    )
    return toml


def numbers_in(value: Any) -> list[float]:
    """Every number in a benchmark's JSON-like result (booleans and nulls left out)."""
    if isinstance(value, bool) or value is None:
        return []
    if isinstance(value, (int, float)):
        return [float(value)]
    if isinstance(value, dict):
        return [n for v in value.values() for n in numbers_in(v)]
    if isinstance(value, list):
        return [n for v in value for n in numbers_in(v)]
    return []


@pytest.fixture
def shifted_study(tmp_path: Path) -> Path:
    return write_shifted_study(tmp_path / "study")


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    """Real Flower processes a deployment test starts; exactly those process groups are stopped afterwards."""
    from tests.deployment_harness import Processes

    logs = tmp_path / "logs"
    logs.mkdir()
    running = Processes(logs)
    try:
        yield running
    finally:
        running.stop_all()
        assert not running.alive(), f"processes this test started still run: {running.alive()}"
