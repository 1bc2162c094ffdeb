"""Scale: wall time per round and peak memory of Flower simulations with 2, 32, 256 and 1,000 sites.

Each number of sites runs Flower's real simulation engine (``flwr.simulation.run_simulation``
with ``simulations.waves.make_server_app(settings)`` and ``client.app.app``, as ``fedtransfer
simulate`` does) in a child process of its own, so that Ray starts fresh and memory is not
carried over. The parent samples the resident memory of the child and all its descendants
(Ray's GCS, raylet and workers) from ``/proc`` and keeps the peak. Round times come from the
coordinator's "round N/M done" log lines. Every site runs DP-SGD under its own policy and
budget, and releases a DP evaluation every round.

Sites beyond the scenario's 4 are deterministic copies: site k holds the data of scenario
site k mod 4 (with 2 sites, the first two). Every site therefore does the same work at every
size, and the growth shows what the engine and the coordinator add per site.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from flwr.simulation import run_simulation

from client.app import make_client_app
from common.data.scenarios import load_scenario
from common.data.site_config import SiteConfig
from common.data.site_data import write_site_data
from common.model.pretraining import pretrain_source
from common.privacy.policy import load_policy, write_policy
from common.settings import RunSettings
from simulations.benchmarks.harness import line_plot, round_clock
from simulations.benchmarks.report import (
    header,
    markdown_table,
    result_head,
    this_machine,
    write_result,
)
from simulations.sites import prepare_sites, site_configs
from simulations.waves import make_server_app

logger = logging.getLogger(__name__)

NAME = "scale"
SCENARIOS = ("wdbc",)
SIZES = (2, 32, 256, 1000)
#: The size per-site time and memory are compared with (targets: flat per-site time, memory <= 1.2x beyond it).
REFERENCE_SITES = 32
TARGET_MEMORY_FACTOR = 1.2
QUICK_SCENARIOS = ("wdbc",)
QUICK_SIZES = (2,)
ROUNDS = 3
QUICK_ROUNDS = 1
LOCAL_EPOCHS = 1
MEMORY_SAMPLE_SECONDS = 0.2
FLOWER_ENV = {
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
}


@dataclass(frozen=True)
class ScalePoint:
    """One simulation: its round times, the whole child's wall time and the tree's peak resident memory."""

    scenario: str
    sites: int
    rounds: int
    round_seconds: list[float]
    first_round_seconds: float
    steady_round_seconds: float
    process_seconds: float
    peak_rss_mb: float
    driver_peak_rss_mb: float


def write_study(scenario_name: str, sites: int, directory: Path, seed: int) -> Path:
    """A bring-your-own scenario TOML with ``sites`` sites copied deterministically from the scenario's."""
    scenario = load_scenario(scenario_name, seed=seed)
    directory.mkdir(parents=True, exist_ok=True)
    write_site_data(scenario.source, directory / "source", scenario.feature_names)
    entries = []
    for k in range(sites):
        base = scenario.sites[k % len(scenario.sites)]
        write_site_data(base, directory / f"site-{k}", scenario.feature_names)
        entries.append(f'[[sites]]\nname = "{base.name}-{k}"\npath = "site-{k}"\n')
    model_args = "".join(f"{key} = {json.dumps(value)}\n" for key, value in scenario.model.args.items())
    shape = json.dumps(list(scenario.input_shape))
    classes = json.dumps(list(scenario.class_names))
    study = directory / "study.toml"
    study.write_text(
        f'[scenario]\nname = "{scenario_name}-x{sites}"\ndescription = "{scenario_name} sites copied to {sites}"\n'
        f"class_names = {classes}\ninput_shape = {shape}\n\n"
        f'[model]\narch = "{scenario.model.arch}"\ntransfer_policy = "{scenario.transfer_policy}"\n{model_args}\n'
        '[source]\npath = "source"\n\n' + "\n".join(entries),
        encoding="utf-8",
    )
    return study


def prepare_scale_sites(settings: RunSettings) -> RunSettings:
    """The simulated sites of ``settings`` (``prepare_sites``), each allowing one DP evaluation per round.

    The simulated policy keeps the default ``max_evaluations_per_run`` of 1; with ``federated-evaluation
    = "every"`` its sites would plan one evaluation and decline the later rounds' (by design), and the
    rounds would not do the same work.
    """
    settings = prepare_sites(settings)
    for path in site_configs(Path(settings.sim_root), settings.expected_sites):
        policy_path = SiteConfig.load(path).policy_path
        policy = load_policy(policy_path)
        if policy.max_evaluations_per_run < settings.rounds:
            write_policy(replace(policy, max_evaluations_per_run=settings.rounds), policy_path)
    return settings


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as handle:
                ppid = int(handle.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    found, stack = [], [root]
    while stack:
        pid = stack.pop()
        found.append(pid)
        stack.extend(children.get(pid, []))
    return found


def _rss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _tree_rss_mb(root: int) -> float:
    return sum(_rss_kb(pid) for pid in _descendants(root)) / 1024


def _run_child(
    study: Path, checkpoint: Path, sites: int, rounds: int, seed: int, work: Path, dp: bool = True
) -> dict[str, Any]:
    """Run one simulation in a child process while sampling its process tree's memory."""
    spec = {
        "study": str(study),
        "checkpoint": str(checkpoint),
        "sites": sites,
        "rounds": rounds,
        "seed": seed,
        "work": str(work),
        "dp": dp,
    }
    env = {
        **os.environ,
        **FLOWER_ENV,
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[2]), os.environ.get("PYTHONPATH", "")]),
    }
    start = time.perf_counter()
    child = subprocess.Popen(
        [sys.executable, "-m", "simulations.benchmarks.scale", json.dumps(spec)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=env,
        text=True,
    )
    peak = [0.0]
    finished = threading.Event()

    def sample() -> None:
        while not finished.is_set():
            peak[0] = max(peak[0], _tree_rss_mb(child.pid))
            finished.wait(MEMORY_SAMPLE_SECONDS)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stdout, _ = child.communicate()
    finished.set()
    sampler.join()
    if child.returncode != 0:
        raise RuntimeError(
            f"scale: the simulation with {sites} sites failed (exit {child.returncode}); run it alone to see its log"
        )
    report = json.loads(stdout.strip().splitlines()[-1])
    return report | {"process_seconds": time.perf_counter() - start, "peak_rss_mb": peak[0]}


def scale_settings(spec: dict[str, Any]) -> RunSettings:
    """The run settings of one simulation of the study (before its sites are prepared)."""
    work = Path(spec["work"])
    return RunSettings(
        scenario=spec["study"],
        checkpoint=spec["checkpoint"],
        rounds=spec["rounds"],
        local_epochs=LOCAL_EPOCHS,
        dp=spec["dp"],
        seed=spec["seed"],
        personalise_epochs=0,
        federated_evaluation="every",
        out=str(work / "out"),
        sim_root=str(work / "sites"),
        min_sites=spec["sites"],
        expected_sites=spec["sites"],
    )


def simulate_once(spec: dict[str, Any]) -> dict[str, Any]:
    """In the child: one Flower simulation of the study; returns round times and the driver's peak RSS."""
    settings = prepare_scale_sites(scale_settings(spec))
    with round_clock() as clock:
        run_simulation(
            server_app=make_server_app(settings),
            client_app=make_client_app(Path(settings.sim_root)),
            num_supernodes=spec["sites"],
            backend_config={
                "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                "init_args": {"num_cpus": 2, "include_dashboard": False},
            },
        )
    rounds = clock.round_seconds()
    if len(rounds) != spec["rounds"]:
        raise RuntimeError(f"expected {spec['rounds']} rounds, the coordinator logged {len(rounds)}")
    return {"round_seconds": rounds, "driver_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _markdown(result: dict[str, Any], points: list[ScalePoint], machine_text: str) -> str:
    rows = [
        [
            p.scenario,
            p.sites,
            f"{p.first_round_seconds:.2f}",
            f"{p.steady_round_seconds:.2f}",
            f"{1000 * p.steady_round_seconds / p.sites:.1f}",
            f"{p.process_seconds:.1f}",
            f"{p.peak_rss_mb:.0f}",
            f"{p.driver_peak_rss_mb:.0f}",
        ]
        for p in points
    ]
    growth_rows = [
        [
            g["scenario"],
            f"{g['from_sites']} -> {g['to_sites']}",
            f"{g['sites_factor']:g}x",
            f"{g['per_site_time_factor']:.2f}x",
            f"{g['memory_factor']:.2f}x",
            "yes" if g["memory_factor"] <= TARGET_MEMORY_FACTOR else "NO",
        ]
        for g in result["growth"]
    ]
    lines = [
        machine_text,
        f"Flower's simulation engine (`run_simulation`, Ray, 1 CPU per client on a 2-CPU Ray instance, so two sites "
        f"train at a time), `make_server_app(settings)` + `client.app.app`; {result['rounds']} round(s) of "
        f"{LOCAL_EPOCHS} local epoch(s), FedAvg, the scenario's default model and transfer policy, **DP-SGD at every "
        "site** (its own policy, budget guard and signed ledger, the noise calibrated once per worker process for "
        "each distinct sample rate), a DP evaluation released by every site in every round (so rounds do the same "
        "work), envelopes on. Sites beyond 4 are copies of the scenario's sites (site k = site k mod 4). Round time: "
        "between the coordinator's round-done log lines (training, federated evaluation and a checkpoint); the first "
        "round also starts Ray's workers (each imports torch) and calibrates the noise, so growth is read on the "
        "later rounds (with a single round, later = first). Peak memory: summed resident memory of the child process "
        f"and every descendant (Ray's processes), sampled every {MEMORY_SAMPLE_SECONDS:g} s; driver: the child's own "
        "peak (the ServerApp and Flower's engine).",
        "",
        markdown_table(
            [
                "scenario",
                "sites",
                "first round s",
                "later rounds s",
                "later ms / site",
                "process s",
                "peak tree RSS MB",
                "driver peak MB",
            ],
            rows,
        ),
        "",
    ]
    if growth_rows:
        lines += [
            f"Growth from {REFERENCE_SITES} sites (targets: per-site time flat, memory <= {TARGET_MEMORY_FACTOR}x):",
            "",
            markdown_table(
                ["scenario", "sites", "sites factor", "per-site time factor", "memory factor", "memory target"],
                growth_rows,
            ),
            "",
        ]
    lines += ["![scale](scale-rounds.png)"]
    return "\n".join(lines)


def _growth(points: list[ScalePoint], scenarios: tuple[str, ...]) -> list[dict[str, Any]]:
    """Per-site later-round time and peak memory of each size against the reference size (or the smallest)."""
    growth = []
    for name in scenarios:
        mine = [p for p in points if p.scenario == name]
        if len(mine) < 2:
            continue
        base = next((p for p in mine if p.sites == REFERENCE_SITES), mine[0])
        for point in mine:
            if point.sites <= base.sites:
                continue
            growth.append(
                {
                    "scenario": name,
                    "from_sites": base.sites,
                    "to_sites": point.sites,
                    "sites_factor": point.sites / base.sites,
                    "per_site_time_factor": (point.steady_round_seconds / point.sites)
                    / (base.steady_round_seconds / base.sites),
                    "memory_factor": point.peak_rss_mb / base.peak_rss_mb,
                }
            )
    return growth


def run(out_dir: Path, quick: bool = False, seed: int = 0) -> dict[str, Any]:
    """Simulate every (scenario, sites); write ``scale.json``, ``scale.md`` and ``scale-rounds.png``."""
    machine = this_machine()
    out_dir = Path(out_dir)
    scenarios, sizes = (QUICK_SCENARIOS, QUICK_SIZES) if quick else (SCENARIOS, SIZES)
    rounds = QUICK_ROUNDS if quick else ROUNDS
    points: list[ScalePoint] = []
    with tempfile.TemporaryDirectory(prefix="fedtransfer-scale-") as work:
        for name in scenarios:
            checkpoint = Path(work) / f"{name}-source-model"
            pretrain_source(load_scenario(name, seed=seed), checkpoint, seed=seed)
            for sites in sizes:
                folder = Path(work) / f"{name}-{sites}"
                study = write_study(name, sites, folder / "study", seed)
                report = _run_child(study, checkpoint, sites, rounds, seed, folder)
                times = report["round_seconds"]
                steady = times[1:] or times  # the first round also starts Ray's workers
                points.append(
                    ScalePoint(
                        name,
                        sites,
                        rounds,
                        times,
                        times[0],
                        sum(steady) / len(steady),
                        report["process_seconds"],
                        report["peak_rss_mb"],
                        report["driver_peak_rss_mb"],
                    )
                )
                logger.info(
                    "scale %s x%d: %.2f s per steady round, peak %.0f MB",
                    name,
                    sites,
                    points[-1].steady_round_seconds,
                    report["peak_rss_mb"],
                )
    result: dict[str, Any] = {
        **result_head(NAME, quick, seed, machine),
        "rounds": rounds,
        "local_epochs": LOCAL_EPOCHS,
        "dp": True,
        "points": [asdict(p) for p in points],
        "growth": _growth(points, scenarios),
    }
    line_plot(
        out_dir / "scale-rounds.png",
        list(sizes),
        {
            f"{name} ms/site/round": [1000 * p.steady_round_seconds / p.sites for p in points if p.scenario == name]
            for name in scenarios
        }
        | {f"{name} peak GB": [p.peak_rss_mb / 1024 for p in points if p.scenario == name] for name in scenarios},
        "sites",
        "ms per site per round / peak GB",
        "Scale: Flower simulation engine, DP on",
        xlog=True,
        xticklabels=[str(s) for s in sizes],
    )
    result["plots"] = ["scale-rounds.png"]
    text = header("Scale: sites against round time and memory", machine, result["command"], quick)
    return write_result(out_dir, NAME, result, _markdown(result, points, text))


def main() -> None:
    """Child entry point: ``python -m simulations.benchmarks.scale SPEC_JSON`` prints one JSON line."""
    parser = argparse.ArgumentParser(description="one scale-benchmark simulation (used by `fedtransfer bench scale`)")
    parser.add_argument("spec", help="JSON with study, checkpoint, sites, rounds, seed, work")
    spec = json.loads(parser.parse_args().spec)
    print(json.dumps(simulate_once(spec)), flush=True)


if __name__ == "__main__":
    main()
