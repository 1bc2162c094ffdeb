"""Loopback deployment faults: the SuperLink crashes and is restarted on its database, a SuperNode dies.

Three provisioned hospitals under TLS and SuperNode auth, each having approved the app's FAB,
start a 3-round run with ``flwr run``:

1. as soon as round 2 has begun the SuperLink is killed with everything below it (SIGKILL: its
   SuperExec and the ServerApp die with it, as on a crashed coordinator machine) and the SuperLink
   is started again by the kit's own script on the same database, which marks the interrupted
   Flower run finished:failed and refuses its messages; the SuperNodes reconnect;
2. ``flwr run ... resume=true out=RUN_DIR`` continues the recorded run after round 1; round 2,
   on which sites may already have spent budget, is recorded as abandoned and never reused;
3. hospital-c's SuperNode is killed as soon as it receives its round-3 instruction.

The run completes with the two others (``min-sites`` 2), hospital-c is recorded as failed in
round 3, and every site's ledger still holds, and verifies, the spend it recorded.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from common.data.scenarios import load_scenario
from common.deploy.provision import Endpoint, ProvisionRequest, provision
from common.privacy.ledger import Ledger
from common.privacy.report import verify_report
from common.run_record import RunRecord
from common.security.manifest import read_manifest
from tests.deployment_harness import (
    HAS_FLOWER,
    Processes,
    approve_the_app,
    free_port,
    give_site_data,
    register_sites,
    run_status,
    start_coordinator,
    start_run,
    start_superlink,
    wait_for,
    wait_until_finished,
)

SITES = ["hospital-a", "hospital-b", "hospital-c"]
DOOMED = "hospital-c"
FEDERATION = "loopback"

pytestmark = [
    pytest.mark.deployment,
    pytest.mark.skipif(not HAS_FLOWER, reason="Flower's executables are not installed next to this Python"),
]


def round_begun(out: Path, server_round: int) -> bool:
    """The coordinator durably noted that ``server_round`` began (sites may spend budget on it from then on)."""
    path = out / "run-record.json"
    return path.is_file() and any(
        r.server_round == server_round and r.flower_run_id for r in RunRecord.load(path).rounds
    )


def test_superlink_restart_resumes_and_a_dead_supernode_is_dropped(tmp_path: Path, processes: Processes) -> None:
    began = time.monotonic()
    port = free_port()
    fed = provision(
        ProvisionRequest(
            FEDERATION,
            SITES,
            [Endpoint("127.0.0.1", port)],
            tmp_path / "kits",
            runtime_ports={site: free_port() for site in SITES},
            control_port=free_port(),
        )
    )
    scenario = load_scenario("wdbc")
    for index, site in enumerate(SITES):
        give_site_data(fed.site_kits[site], scenario.sites[index], scenario.feature_names)
    approve_the_app(fed.site_kits.values(), processes, tmp_path / "app")
    coordinator = fed.coordinator_kit
    home = coordinator / "flower-home"

    start_coordinator(coordinator, processes)
    register_sites(coordinator, processes)
    for site in SITES:
        processes.start(site, [str(fed.site_kits[site] / "start-supernode.sh")], fed.site_kits[site] / "flower-home")

    out = tmp_path / "run-out"
    first = start_run(coordinator, f'rounds=3 local-epochs=1 round-timeout=150 out="{out}"', processes)
    wait_for(lambda: round_begun(out, 2), 400, "round 2 to begin", interval=0.5)
    processes.kill("superlink")
    print(f"killed the SuperLink at {time.monotonic() - began:.0f} s")
    start_superlink(coordinator, processes, name="superlink-restarted")

    resumed = start_run(coordinator, f'resume=true out="{out}"', processes)
    assert resumed != first
    wait_for(
        lambda: f"[RUN {resumed}" in processes.log(DOOMED),
        300,
        f"{DOOMED} to receive the resumed run's instruction",
        interval=0.3,
    )
    processes.kill(DOOMED)
    print(f"killed {DOOMED} at {time.monotonic() - began:.0f} s")

    status = wait_until_finished(resumed, FEDERATION, processes, home, 420)
    print(f"resumed run {status} at {time.monotonic() - began:.0f} s")
    assert status == "finished:completed", (
        f"run {resumed} is {status!r}\n" + processes.log("superlink-restarted")[-4000:]
    )

    assert run_status(first, FEDERATION, processes, home) == "finished:failed"
    record = RunRecord.load(out / "run-record.json")
    assert record.status == "completed" and len(record.run_id) == 32
    assert [r.server_round for r in record.rounds if r.server_round > 0] == [1, 3]
    assert [r.server_round for r in record.abandoned_rounds] == [2]
    assert record.round(1).aggregated_sites == SITES and record.round(1).flower_run_id == first
    last = record.round(3)
    assert last.flower_run_id == resumed and last.aggregated_sites == ["hospital-a", "hospital-b"]
    assert last.sites[DOOMED].status in ("failed", "no-reply"), last.sites[DOOMED]
    manifest = read_manifest(coordinator / "manifest.json", fed.coordinator_fingerprint)
    for server_round, sites in ((1, SITES), (3, SITES[:2])):
        for site in sites:
            entry = record.round(server_round).sites[site]
            signed = entry.train.report_signed
            assert (
                verify_report(
                    signed,
                    record.run_id,
                    server_round,
                    record.base_model["fingerprint"],
                    manifest.site(site),
                )
                == entry.train.report
            )

    for site in SITES:
        ledger = Ledger(fed.site_kits[site] / "state")
        rounds = [e.server_round for e in ledger.entries() if e.run_id == record.run_id]
        assert ledger.verify() == len(ledger.entries()) and len(rounds) == len(set(rounds)), (site, rounds)
        assert 1 in rounds and set(rounds) <= ({1, 2} if site == DOOMED else {1, 2, 3}), (site, rounds)
        assert site == DOOMED or 3 in rounds, (site, rounds)
    assert (out / "final-model" / "model.safetensors").is_file()
