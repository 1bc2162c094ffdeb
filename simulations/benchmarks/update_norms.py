"""Honest update norms per transfer policy: what the default ``max-update-norm`` is chosen from.

The coordinator drops a training update whose L2 distance from the global model exceeds a bound
(``server/channel.py``): a malicious site can still move the model, but only so far. The bound must
sit above every honest update, or honest sites are dropped. This benchmark measures honest updates
through the real apps in process (``DirectGrid``): every built-in scenario whose data is present,
each transfer policy (``head``, ``last:1``, ``full``, ``bias``, ``lora:4``; pneumonia ``head`` only),
at the default settings, with DP (the default) and without, over several seeds; the bound stays out
of the way (``max-update-norm`` 1e9). Each row gives the largest and the median update norm seen,
and the default bound of that policy (``DEFAULT_UPDATE_BOUNDS``) as a multiple of the largest.
"""

from __future__ import annotations

import logging
import statistics
import tempfile
from pathlib import Path
from typing import Any

from common.data.scenarios import ScenarioError, load_scenario
from common.data.site_data import DataError
from common.model.training import use_one_torch_thread
from common.model.transfer import PolicyParseError, TransferPolicy
from common.settings import RunSettings
from server.channel import DEFAULT_UPDATE_BOUNDS
from simulations.benchmarks.harness import run_inprocess
from simulations.benchmarks.report import (
    bench_command,
    header,
    markdown_table,
    result_head,
    this_machine,
    write_result,
)

logger = logging.getLogger(__name__)

NAME = "update-norms"
SCENARIOS = ("wdbc", "heart-disease", "synthetic-imaging", "pneumonia")
POLICIES = ("head", "last:1", "full", "bias", "lora:4")
#: pneumonia's ResNet-18 is measured with its default policy only: a policy that trains inside the backbone
#: costs minutes per run there on 2 cores.
POLICIES_OF = {"pneumonia": ("head",)}
SEEDS, QUICK_SEEDS = 3, 1
ROUNDS, QUICK_ROUNDS = 3, 1
UNBOUNDED = 1e9


def _norms(scenario: str, policy: str, dp: bool, seed: int, rounds: int, work: Path) -> list[float]:
    folder = work / f"{scenario}-{policy.replace(':', '')}-{'dp' if dp else 'plain'}-{seed}"
    settings = RunSettings(
        scenario=scenario,
        transfer_policy=policy,
        rounds=rounds,
        seed=seed,
        dp=dp,
        out=str(folder / "out"),
        sim_root=str(folder / "sites"),
        federated_evaluation="none",
        personalise_epochs=0,
        max_update_norm=UNBOUNDED,
    )
    sites = len(load_scenario(scenario, seed=seed).sites)
    record = run_inprocess(settings.with_(min_sites=sites, expected_sites=sites), sites)
    return [s.update_norm for r in record.rounds for s in r.sites.values() if s.update_norm is not None]


def _available(scenario: str) -> bool:
    try:
        load_scenario(scenario)
    except (ScenarioError, DataError) as err:
        logger.warning("update-norms: skipping %s: %s", scenario, err)
        return False
    return True


def run(out_dir: Path, quick: bool = False, seed: int = 0) -> dict[str, Any]:
    """Measure honest update norms; write ``update-norms.json`` and ``update-norms.md``."""
    use_one_torch_thread()
    machine = this_machine()
    seeds = range(seed, seed + (QUICK_SEEDS if quick else SEEDS))
    rounds = QUICK_ROUNDS if quick else ROUNDS
    scenarios = [s for s in SCENARIOS if _available(s)]
    rows = []
    with tempfile.TemporaryDirectory(prefix=f"fedtransfer-{NAME}-") as scratch:
        for scenario in scenarios:
            for policy in POLICIES_OF.get(scenario, POLICIES):
                for dp in (True, False):
                    try:
                        norms = [n for s in seeds for n in _norms(scenario, policy, dp, s, rounds, Path(scratch))]
                    except PolicyParseError as err:  # a model without that many blocks (heart-disease: logreg)
                        logger.info("update-norms: %s has no %s: %s", scenario, policy, err)
                        break
                    largest = max(norms)
                    bound = DEFAULT_UPDATE_BOUNDS[TransferPolicy.parse(policy).kind]
                    rows.append(
                        {
                            "scenario": scenario,
                            "transfer_policy": policy,
                            "dp": dp,
                            "updates": len(norms),
                            "median": statistics.median(norms),
                            "largest": largest,
                            "default_bound": bound,
                            "bound_over_largest": bound / largest,
                        }
                    )
                    logger.info(
                        "update-norms: %s %s dp=%s largest %.3g over %d updates",
                        scenario,
                        policy,
                        dp,
                        largest,
                        len(norms),
                    )
    per_policy = {
        policy: max(r["largest"] for r in rows if r["transfer_policy"] == policy)
        for policy in POLICIES
        if any(r["transfer_policy"] == policy for r in rows)
    }
    result: dict[str, Any] = {
        **result_head(NAME, quick, seed, machine),
        "seeds": len(seeds),
        "rounds": rounds,
        "scenarios": scenarios,
        "rows": rows,
        "largest_per_policy": per_policy,
        "default_bounds": dict(DEFAULT_UPDATE_BOUNDS),
    }
    table = markdown_table(
        [
            "scenario",
            "transfer policy",
            "DP",
            "updates",
            "median norm",
            "largest norm",
            "default bound",
            "bound / largest",
        ],
        [
            [
                r["scenario"],
                r["transfer_policy"],
                "yes" if r["dp"] else "no",
                r["updates"],
                f"{r['median']:.3g}",
                f"{r['largest']:.3g}",
                f"{r['default_bound']:g}",
                f"{r['bound_over_largest']:.1f}x",
            ]
            for r in rows
        ],
    )
    markdown = "\n".join(
        [
            header("Honest update norms per transfer policy", machine, bench_command(NAME, quick, seed), quick),
            f"L2 distance of each honest site's update from the global model, {rounds} round(s) x {len(seeds)} "
            "seed(s) per row, default settings otherwise (lr, local epochs, batch size, requested epsilon 3). The "
            "default bound of each policy is three times the largest honest update measured here.",
            "",
            table,
        ]
    )
    return write_result(out_dir, NAME, result, markdown)
