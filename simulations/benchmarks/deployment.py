"""Deployment at scale: real SuperLink and SuperNode processes on loopback, TLS and SuperNode authentication.

A federation of 16 sites (4 with ``--quick``) is provisioned with ``common.deploy.provision``,
each site kit gets a copy of a ``wdbc`` site's data (site k holds scenario site k mod 4),
declares its size and approves the app (the FAB ``flwr build`` makes of this checkout), and
everything is started with the kits' own scripts through the loopback deployment harness of
the tests (``tests/deployment_harness.py``: a private ``FLWR_HOME`` per process, 127.0.0.1
only, every process it started stopped by pid). One run of 3 rounds (1 with ``--quick``)
with the default settings (DP-SGD at every site, a DP evaluation after the last round) is
started with the coordinator kit's ``run.sh``.

Measured while it runs:

- **round time**: when each round's aggregate first appears in the coordinator's run record
  (polled every 0.2 s); round 1 counts from the run's start and includes starting the
  ServerApp, pretraining the source model, and the sites' first contact;
- **memory per SuperNode**: the resident memory of each SuperNode process and of everything
  it runs (its SuperExec and the ClientApp process Flower starts for every message), sampled
  every 0.25 s: the peak of each, and the SuperNode's own resident memory at the end.
"""

from __future__ import annotations

import importlib
import json
import logging
import re
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from common.data.scenarios import load_scenario
from common.deploy.provision import Endpoint, ProvisionRequest, provision
from common.errors import DeploymentError
from common.run_record import RUN_RECORD_FILE
from simulations.benchmarks.report import (
    header,
    markdown_table,
    result_head,
    this_machine,
    write_result,
)

logger = logging.getLogger(__name__)

NAME = "deployment"
SCENARIO = "wdbc"
SITES, QUICK_SITES = 16, 4
ROUNDS, QUICK_ROUNDS = 3, 1
RUN_TIMEOUT = 1800.0
MEMORY_SAMPLE_SECONDS = 0.25
RECORD_POLL_SECONDS = 0.2


class HarnessUnavailable(DeploymentError):
    """The loopback harness (``tests/deployment_harness.py``) or Flower's executables are not here."""


@dataclass(frozen=True)
class SuperNodeMemory:
    """One site's SuperNode: peak resident MB of the SuperNode alone, of it and all it ran at once, at the end."""

    site: str
    peak_supernode_mb: float
    peak_tree_mb: float
    end_supernode_mb: float


def _harness() -> ModuleType:
    checkout = str(Path(__file__).resolve().parents[2])  # the source checkout this module runs from
    if checkout not in sys.path:
        sys.path.append(checkout)
    try:
        harness = importlib.import_module("tests.deployment_harness")
    except ImportError as err:
        raise HarnessUnavailable(
            f"the deployment benchmark runs from a source checkout: it needs tests/deployment_harness.py ({err})"
        ) from err
    if not harness.HAS_FLOWER:
        raise HarnessUnavailable("Flower's executables (flower-superlink, flower-supernode) are not next to Python")
    return harness


def _rss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


class MemorySampler:
    """Peak resident memory of each SuperNode and of everything it runs, sampled in a background thread.

    A SuperNode's processes are its descendants and the processes whose command line names its
    runtime port (Flower's SuperExec leaves its parent's session, and our harness adopts it).
    """

    def __init__(self, harness: ModuleType, supernodes: dict[str, tuple[int, int]]) -> None:
        self.harness = harness
        self.supernodes = supernodes  # site -> (pid, runtime port)
        self.peak_own = dict.fromkeys(supernodes, 0.0)
        self.peak_tree = dict.fromkeys(supernodes, 0.0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def sample(self) -> None:
        table = self.harness._process_table()
        live = {p: _cmdline(p) for p, (_, _, state) in table.items() if state != "Z"}
        for site, (pid, port) in self.supernodes.items():
            names_port = re.compile(rf":{port}(?!\d)")
            tree = {pid, *self.harness._descendants(pid, table)} | {p for p, c in live.items() if names_port.search(c)}
            for member in list(tree):
                tree |= set(self.harness._descendants(member, table))
            own = _rss_mb(pid)
            self.peak_own[site] = max(self.peak_own[site], own)
            self.peak_tree[site] = max(self.peak_tree[site], sum(_rss_mb(p) for p in tree))

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(MEMORY_SAMPLE_SECONDS)


class RoundWatcher:
    """When each round's aggregate first appears in the run record (polled in a background thread)."""

    def __init__(self, record: Path) -> None:
        self.record = record
        self.aggregated: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> RoundWatcher:
        self.started = time.perf_counter()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._poll()

    def _poll(self) -> None:
        try:
            rounds = json.loads(self.record.read_text())["rounds"]
        except (OSError, ValueError, KeyError):
            return
        for entry in rounds:
            if entry.get("aggregated_sites"):
                self.aggregated.setdefault(int(entry["server_round"]), time.perf_counter())

    def _run(self) -> None:
        while not self._stop.is_set():
            self._poll()
            self._stop.wait(RECORD_POLL_SECONDS)

    def round_seconds(self) -> list[float]:
        ends = [self.started, *(self.aggregated[r] for r in sorted(self.aggregated))]
        return [b - a for a, b in zip(ends, ends[1:])]


def _deploy_and_run(harness: ModuleType, work: Path, sites: int, rounds: int, seed: int) -> dict[str, Any]:
    names = [f"site-{k:02d}" for k in range(sites)]
    port = harness.free_port()
    runtime_ports = {name: harness.free_port() for name in names}
    federation = provision(
        ProvisionRequest(
            "bench",
            names,
            [Endpoint("127.0.0.1", port)],
            work / "kits",
            runtime_ports=runtime_ports,
            control_port=harness.free_port(),
        )
    )
    scenario = load_scenario(SCENARIO, seed=seed)
    for k, name in enumerate(names):
        site = scenario.sites[k % len(scenario.sites)]
        harness.give_site_data(federation.site_kits[name], site, scenario.feature_names)
    coordinator = federation.coordinator_kit
    out = work / "run-out"
    processes = harness.Processes(work)
    try:
        harness.approve_the_app(federation.site_kits.values(), processes, work / "app")
        harness.start_coordinator(coordinator, processes)
        harness.register_sites(coordinator, processes)
        supernodes = {}
        for name in names:
            kit = federation.site_kits[name]
            started = processes.start(name, [str(kit / "start-supernode.sh")], kit / "flower-home")
            supernodes[name] = (started.pid, runtime_ports[name])
        with MemorySampler(harness, supernodes) as memory:
            memory.sample()
            idle = {name: _rss_mb(pid) for name, (pid, _) in supernodes.items()}
            with RoundWatcher(out / RUN_RECORD_FILE) as watcher:
                run_id = harness.start_run(
                    coordinator,
                    f'rounds={rounds} local-epochs=1 expected-sites={sites} min-sites={sites} out="{out}"',
                    processes,
                )
                status = harness.wait_until_finished(
                    run_id, "bench", processes, coordinator / "flower-home", RUN_TIMEOUT
                )
                finished = time.perf_counter()
            memory.sample()
            end = {name: _rss_mb(pid) for name, (pid, _) in supernodes.items()}
        if status != "finished:completed":
            raise DeploymentError(
                f"deployment benchmark: run {run_id} ended {status!r}; see the logs in {work}\n"
                + processes.log("superlink")[-3000:]
            )
        record = json.loads((out / RUN_RECORD_FILE).read_text())
        return {
            "round_seconds": watcher.round_seconds(),
            "run_seconds": finished - watcher.started,
            "aggregated_sites": [len(r["aggregated_sites"]) for r in record["rounds"] if r["server_round"] > 0],
            "supernodes": [
                asdict(SuperNodeMemory(name, memory.peak_own[name], memory.peak_tree[name], end[name]))
                for name in names
            ],
            "idle_supernode_mb": statistics.median(idle.values()),
        }
    finally:
        processes.stop_all()


def _markdown(result: dict[str, Any], machine_text: str) -> str:
    rounds = result["round_seconds"]
    nodes = result["supernodes"]

    def spread(key: str) -> str:
        values = [n[key] for n in nodes]
        return f"{statistics.median(values):.0f} ({min(values):.0f}-{max(values):.0f})"

    lines = [
        machine_text,
        f"{result['sites']} sites, each a real `flower-supernode` process started by its kit's script (TLS to the "
        "fleet gateway in front of the SuperLink, SuperNode authentication with the registered key, its own runtime "
        "port on 127.0.0.1), one `flower-superlink` on loopback and its gateway started by the coordinator kit's "
        f"scripts, one run of {result['rounds']} round(s) of 1 "
        f"local epoch started with the kit's `run.sh`: scenario `{SCENARIO}` (site k holds scenario site k mod 4), "
        "DP-SGD at every site, a DP evaluation after the last round. Flower 1.42 starts a ClientApp process for "
        "every message, so every site imports torch and opens its keys, ledger and data once per round.",
        "",
        markdown_table(
            ["round", "seconds", "sites aggregated"],
            [[i + 1, f"{s:.1f}", result["aggregated_sites"][i]] for i, s in enumerate(rounds)],
        ),
        "",
        f"Run: {result['run_seconds']:.1f} s from `run.sh` to the last aggregate and `flwr ls` reporting it "
        f"finished; rounds after the first: {statistics.median(rounds[1:] or rounds):.1f} s (median).",
        "",
        "Memory per SuperNode, MB (median over sites, range in brackets):",
        "",
        markdown_table(
            ["SuperNode idle", "SuperNode at the end", "SuperNode peak", "SuperNode + SuperExec + ClientApp peak"],
            [
                [
                    f"{result['idle_supernode_mb']:.0f}",
                    spread("end_supernode_mb"),
                    spread("peak_supernode_mb"),
                    spread("peak_tree_mb"),
                ]
            ],
        ),
    ]
    return "\n".join(lines)


def run(out_dir: Path, quick: bool = False, seed: int = 0) -> dict[str, Any]:
    """Deploy on loopback, run, measure; write ``deployment.json`` and ``deployment.md``."""
    harness = _harness()
    machine = this_machine()
    sites, rounds = (QUICK_SITES, QUICK_ROUNDS) if quick else (SITES, ROUNDS)
    with tempfile.TemporaryDirectory(prefix="fedtransfer-deployment-") as work:
        measured = _deploy_and_run(harness, Path(work), sites, rounds, seed)
    result: dict[str, Any] = {
        **result_head(NAME, quick, seed, machine),
        "sites": sites,
        "rounds": rounds,
        **measured,
    }
    text = header("Deployment: SuperNodes on loopback", machine, result["command"], quick)
    return write_result(out_dir, NAME, result, _markdown(result, text))
