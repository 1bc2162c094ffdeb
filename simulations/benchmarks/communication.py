"""Communication per transfer policy: uplink bytes per site per round against the full model.

For wdbc (MLP), heart-disease (logistic regression; needs the Fed-Heart-Disease files, never
downloads them) and synthetic-imaging (CNN), every transfer policy the model supports, with
the sealed envelope's overhead over Flower's plain ArrayRecord (see ``payloads``).
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

from common.data.heart_disease import DATA_DIR_ENV
from common.data.scenarios import load_scenario
from common.data.site_data import DataError
from common.model.training import use_one_torch_thread
from simulations.benchmarks.payloads import (
    TRAFFIC_HEADERS,
    PolicyTraffic,
    every_policy,
    policy_traffic,
    scenario_model,
    traffic_notes,
    traffic_rows,
)
from simulations.benchmarks.report import (
    Machine,
    bench_command,
    header,
    markdown_table,
    result_head,
    this_machine,
    write_result,
)

logger = logging.getLogger(__name__)

NAME = "comm"
SCENARIOS = ("wdbc", "heart-disease", "synthetic-imaging")
NEEDS_DATA = {"heart-disease"}
SHARED_HEART_DIR = Path(__file__).resolve().parents[3] / "shared" / "data" / "fed-heart-disease"


def heart_data_dir() -> Path:
    """Where the Fed-Heart-Disease files are read from: $FEDTRANSFER_DATA_DIR, else ../shared/data/fed-heart-disease."""
    return Path(os.environ.get(DATA_DIR_ENV) or SHARED_HEART_DIR)


def _scenario_traffic(name: str, seed: int) -> list[PolicyTraffic]:
    data_dir = heart_data_dir() if name in NEEDS_DATA else None
    scenario = load_scenario(name, seed=seed, data_dir=data_dir)
    return policy_traffic(scenario, every_policy(scenario_model(scenario, seed)), seed)


def _markdown(
    machine: Machine, result: dict[str, Any], traffic: list[PolicyTraffic], skipped: list[dict[str, str]]
) -> str:
    lines = [
        header(
            "Communication per transfer policy",
            machine,
            bench_command(NAME, result["quick"], result["seed"]),
            result["quick"],
        )
    ]
    lines.append(traffic_notes(traffic) + "\n")
    lines.append(markdown_table(TRAFFIC_HEADERS, traffic_rows(traffic)))
    for skip in skipped:
        lines.append(f"\nSkipped {skip['scenario']}: {skip['reason']}")
    return "\n".join(lines)


def run(out_dir: Path, quick: bool = False, seed: int = 0) -> dict[str, Any]:
    """Measure uplink bytes per policy; write ``comm.json`` and ``comm.md``.

    Byte counts are exact, so ``quick`` changes nothing but the label.
    """
    use_one_torch_thread()
    machine = this_machine()
    traffic: list[PolicyTraffic] = []
    skipped: list[dict[str, str]] = []
    for name in SCENARIOS:
        try:
            traffic += _scenario_traffic(name, seed)
        except (DataError, OSError) as err:
            if name not in NEEDS_DATA:
                raise
            reason = f"its data is not available ({err}); set {DATA_DIR_ENV} to the Fed-Heart-Disease folder"
            logger.warning("comm benchmark: skipping %s: %s", name, reason)
            skipped.append({"scenario": name, "reason": reason})
    result: dict[str, Any] = {
        **result_head(NAME, quick, seed, machine),
        "traffic": [asdict(t) for t in traffic],
        "skipped": skipped,
    }
    return write_result(out_dir, NAME, result, _markdown(machine, result, traffic, skipped))
