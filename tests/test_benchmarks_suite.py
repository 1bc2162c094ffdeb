"""Smoke runs of the flamby, transfer-privacy, evaluation-cost, speed and scale benchmarks: files, keys, figures.

Quick mode only (1 seed, 1-2 rounds, few configurations, 2 sites for scale); the figures are
never compared with targets here, only checked to exist and be finite, and the budget plans
to be ordered as the release share makes them.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from common.data.heart_disease import DATA_DIR_ENV
from common.privacy.accounting import Step, compose_epsilon
from simulations.benchmarks import BENCHMARKS
from simulations.benchmarks.communication import heart_data_dir
from simulations.benchmarks.evaluation_cost import _skip_reason, runs_within_cap
from simulations.benchmarks.harness import Stopwatch
from tests.conftest import numbers_in

pytestmark = pytest.mark.slow

SUITE = ("flamby", "transfer-privacy", "evaluation-cost", "speed", "scale")
NEEDS_HEART_DATA = {"flamby", "transfer-privacy"}
PLOTS = {
    "flamby": "flamby-accuracy.png",
    "transfer-privacy": "transfer-privacy-epsilon.png",
    "evaluation-cost": "evaluation-cost.png",
    "speed": "speed-rounds.png",
    "scale": "scale-rounds.png",
}


@pytest.fixture(scope="module", params=SUITE)
def figures(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[str, Path, dict[str, Any]]:
    name = request.param
    if name in NEEDS_HEART_DATA and not heart_data_dir().is_dir():
        pytest.skip(f"the Fed-Heart-Disease files are not at {heart_data_dir()}; set {DATA_DIR_ENV}")
    out = tmp_path_factory.mktemp(name)
    return name, out, BENCHMARKS[name](out, quick=True, seed=0)


def test_the_suite_is_registered() -> None:
    assert set(SUITE) <= set(BENCHMARKS)


def test_each_benchmark_writes_json_markdown_and_a_plot(figures: tuple[str, Path, dict[str, Any]]) -> None:
    name, out, result = figures
    written = json.loads((out / f"{name}.json").read_text())
    assert written == json.loads(json.dumps(result))
    assert written["benchmark"] == name and written["quick"] is True and written["seed"] == 0
    assert {"platform", "cores", "load_average"} <= set(written["machine"])
    assert all(math.isfinite(n) for n in numbers_in(written)), f"{name}: a figure is NaN or infinite"
    markdown = (out / f"{name}.md").read_text()
    assert f"fedtransfer bench {name} --quick" in markdown and "|---" in markdown
    assert written["plots"] == [PLOTS[name]]
    assert (out / PLOTS[name]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_figure_keys(figures: tuple[str, Path, dict[str, Any]]) -> None:
    name, _, result = figures
    if name == "flamby":
        methods = {m["method"] for m in result["methods"]}
        assert {"pooled", "local Cleveland", "local VA"} <= methods and len(result["centres"]) == 4
        assert {"method", "per_client_mean", "meets_pooled_target"} <= set(result["best_federated"])
        assert all(0 <= m["per_client_mean"] <= 1 for m in result["methods"])
    elif name == "transfer-privacy":
        cells = {(c["method"], c["epsilon"]) for c in result["cells"]}
        assert {
            ("source only", None),
            ("local-only", None),
            ("local-only", 1.0),
            ("federated from scratch", None),
            ("federated transfer", 1.0),
            ("personalised", None),
        } <= cells
        for cell in result["cells"]:
            if cell["epsilon"] is not None:  # spent epsilon, from the ledgers, within what was asked (RDP)
                assert 0 < cell["epsilon_spent_max"] <= cell["epsilon"] + 1e-6
        assert {"federated_transfer", "local_only_no_dp", "met"} <= set(result["goal"])
        released = {c["method"]: c["released_mean"] for c in result["cells"] if c["epsilon"] == 1.0}
        assert released["federated transfer"] is not None  # the default DP evaluation after the last round
    elif name == "evaluation-cost":
        _check_evaluation_cost(result)
    elif name == "speed":
        assert (
            len(result["ours"]["round_seconds"]) == len(result["peer"]["round_seconds"]) == result["config"]["rounds"]
        )
        assert result["ratio_median"] > 0 and result["not_instrumented"] == []
        parts = result["breakdown"]["seconds"]
        assert {"data", "training", "DP accounting", "crypto", "ledger", "Flower and the rest"} <= set(parts)
        assert parts["training"] > 0 and parts["crypto"] > 0 and parts["DP accounting"] > 0
    else:
        (point,) = result["points"]
        assert point["sites"] == 2 and len(point["round_seconds"]) == result["rounds"]
        assert point["peak_rss_mb"] > 0 and point["driver_peak_rss_mb"] > 0


def _check_evaluation_cost(result: dict[str, Any]) -> None:
    cells = {c["variant"]: c for c in result["cells"]}
    assert set(cells) == {"none", "last", "every"} and result["scenarios"] == ["wdbc"]
    none, last, every = cells["none"], cells["last"], cells["every"]
    rounds, sites = result["recipe"]["rounds"], len(result["test_rows"]["wdbc"])
    assert (none["evaluations"], last["evaluations"], every["evaluations"]) == (0, 1, rounds)
    assert (none["releases"], last["releases"], every["releases"]) == (0, sites, sites * rounds)
    # the release share costs the rounds noise; more releases in the same share cost each release noise
    assert last["rounds_noise"] == every["rounds_noise"] > none["rounds_noise"]
    assert none["release_noise"] is None and every["release_noise"] > last["release_noise"] > 0
    for cell in result["cells"]:
        assert 0 < cell["epsilon_spent_max"] <= cell["epsilon"] + 1e-6
        assert cell["more_runs_min"] >= 0 and cell["more_rounds_min"] >= 0
    for cell in (last, every):
        assert all(0 <= cell["error"][m] <= 1 for m in ("roc-auc", "balanced-accuracy", "f1"))
    assert {r["versus"] for r in result["ratios"]} == {"b/a", "c/a"}
    assert all(r["rounds_noise"] > 1 for r in result["ratios"])


def test_evaluation_cost_skips_heart_disease_without_its_data(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path / "absent"))
    assert _skip_reason("wdbc") is None
    assert str(tmp_path / "absent") in (_skip_reason("heart-disease") or "")


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_runs_within_cap_is_the_largest_composition_within_the_cap(accountant: str) -> None:
    run = (Step(1.5, 0.25, 24), Step(4.0, 1.0, 1))
    runs = runs_within_cap(run, 1e-5, accountant, 10.0)

    def composed(times: int) -> float:
        repeated = [Step(s.noise_multiplier, s.sample_rate, s.steps * times) for s in run]
        return compose_epsilon(repeated, 1e-5, accountant)

    assert runs >= 1 and composed(runs) <= 10.0 < composed(runs + 1)


def test_stopwatch_counts_nested_time_once() -> None:
    watch = Stopwatch()
    with watch.measure("outer"):
        with watch.measure("inner"):
            sum(range(10_000))
    assert watch.calls == {"outer": 1, "inner": 1}
    assert watch.seconds["outer"] >= 0 and watch.seconds["inner"] > 0
