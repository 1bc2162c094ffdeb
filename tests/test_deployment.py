"""Loopback deployment: real flower-superlink and flower-supernode processes, TLS and SuperNode auth.

Provision a federation of four hospitals, start everything with the kits' own scripts on
127.0.0.1, run 2 rounds with ``flwr run`` and check the outcome at the coordinator and at every
site. Three hospitals approved the app first (its FAB, built with ``flwr build``) and train.
In the same harness: an unregistered SuperNode is refused, a SuperNode without the CA cannot
connect, a registered SuperNode holding a kit from another federation takes part in the
run but refuses the coordinator's signed instructions, and a fourth hospital that did not
approve the app refuses it before installing it, while the other sites complete.
Every process is started in its own session and only those process groups are stopped.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from common.data.scenarios import load_scenario
from common.deploy.approved_apps import SHORT_HASH, fab_sha256
from common.deploy.provision import Endpoint, ProvisionRequest, provision, supernode_auth_keypair
from common.deploy.site_keys import make_site_keys
from common.privacy.ledger import Ledger
from common.privacy.report import verify_report
from common.run_record import RunRecord
from common.security.keys import read_public_identity, write_private_file
from common.security.manifest import read_manifest
from simulations.sites import declared_size
from tests.deployment_harness import (
    BIN,
    HAS_FLOWER,
    Processes,
    approve_the_app,
    flwr,
    free_port,
    give_site_data,
    install_kits,
    register_sites,
    start_coordinator,
    start_run,
    wait_until_finished,
)

SITES = ["hospital-a", "hospital-b", "hospital-c"]
UNAPPROVED = "hospital-d"  # enrolled and registered, but it never approved the app
RUN_TIMEOUT = 420.0

pytestmark = [
    pytest.mark.deployment,
    pytest.mark.skipif(not HAS_FLOWER, reason="Flower's executables are not installed next to this Python"),
]


def test_three_hospitals_on_loopback_with_tls_and_node_auth(tmp_path: Path, processes: Processes) -> None:
    port = free_port()
    address = [Endpoint("127.0.0.1", port)]
    ports = {site: free_port() for site in [*SITES, UNAPPROVED]}
    scenario = load_scenario("wdbc")
    homes = tmp_path / "srv"  # each machine's folder: the hospitals make their keys there, then copy their kit in
    enrolments = [
        make_site_keys(site, homes / site, declared_size(len(scenario.sites[index].train)), None)
        for index, site in enumerate([*SITES, UNAPPROVED])
    ]
    fed = install_kits(
        provision(
            ProvisionRequest(
                "loopback",
                [],
                address,
                tmp_path / "kits",
                install_root=homes,
                runtime_ports=ports,
                control_port=free_port(),
                enrolments=enrolments,
            )
        ),
        homes,
    )
    assert not [p for p in (tmp_path / "kits").rglob("*.key") if "sites" in p.parts]  # no site key left home
    ca = tmp_path / "kits" / "ca"
    foreign = provision(
        ProvisionRequest(
            "elsewhere",
            ["stranger"],
            address,
            tmp_path / "foreign-kits",
            ca_cert=ca / "ca.pem",
            ca_key=ca / "ca.key",
            runtime_ports={"stranger": free_port()},
        )
    )
    for index, site in enumerate([*SITES, UNAPPROVED]):
        give_site_data(fed.site_kits[site], scenario.sites[index], scenario.feature_names)
    give_site_data(foreign.site_kits["stranger"], scenario.sites[3], scenario.feature_names)
    fab = approve_the_app(
        [*(fed.site_kits[s] for s in SITES), foreign.site_kits["stranger"]], processes, tmp_path / "app"
    )
    coordinator = fed.coordinator_kit
    coordinator_home = coordinator / "flower-home"

    start_coordinator(coordinator, processes)
    register_sites(coordinator, processes)
    # the coordinator's mistake: it registers a SuperNode whose site kit belongs to another federation
    stranger = flwr(
        ["supernode", "register", str(foreign.coordinator_kit / "supernode-keys" / "stranger.pub"), "loopback"],
        processes,
        coordinator_home,
    )
    assert stranger.returncode == 0, stranger.stdout + stranger.stderr
    # a registered key used by a SuperNode that does not trust our CA
    no_ca_key = tmp_path / "no-ca" / "auth.key"
    private, public = supernode_auth_keypair()
    write_private_file(no_ca_key, private)
    (tmp_path / "no-ca" / "auth.pub").write_bytes(public)
    registered = flwr(
        ["supernode", "register", str(tmp_path / "no-ca" / "auth.pub"), "loopback"], processes, coordinator_home
    )
    assert registered.returncode == 0, registered.stdout + registered.stderr

    for site in [*SITES, UNAPPROVED]:
        kit = fed.site_kits[site]
        processes.start(site, [str(kit / "start-supernode.sh")], kit / "flower-home")
    processes.start(
        "stranger",
        [str(foreign.site_kits["stranger"] / "start-supernode.sh")],
        foreign.site_kits["stranger"] / "flower-home",
    )

    unregistered_key = tmp_path / "unregistered" / "auth.key"
    write_private_file(unregistered_key, supernode_auth_keypair()[0])
    site_a = fed.site_kits["hospital-a"]
    common_args = [
        "--superlink",
        f"127.0.0.1:{port}",
        "--node-config",
        f'site-config="{site_a / "site.toml"}"',
        "--max-retries",
        "2",
        "--max-wait-time",
        "20",
    ]
    unregistered = processes.start(
        "unregistered",
        [
            str(BIN / "flower-supernode"),
            *common_args,
            "--root-certificates",
            str(site_a / "tls" / "ca.pem"),
            "--auth-supernode-private-key",
            str(unregistered_key),
            "--port",
            str(free_port()),
        ],
        tmp_path / "unregistered",
    )
    no_ca = processes.start(
        "no-ca",
        [
            str(BIN / "flower-supernode"),
            *common_args,
            "--auth-supernode-private-key",
            str(no_ca_key),
            "--port",
            str(free_port()),
        ],
        tmp_path / "no-ca",
    )

    out = tmp_path / "run-out"
    run_id = start_run(coordinator, f'rounds=2 local-epochs=1 expected-sites=5 min-sites=3 out="{out}"', processes)

    status = wait_until_finished(run_id, "loopback", processes, coordinator_home, RUN_TIMEOUT)
    assert status == "finished:completed", f"run {run_id} is {status!r}\n" + processes.log("superlink")[-4000:]

    record = RunRecord.load(out / "run-record.json")
    assert record.status == "completed" and record.round(1).flower_run_id == run_id
    assert len(record.run_id) == 32 and record.run_id != str(run_id)  # the coordinator's, not the relay's
    assert (out / "final-model" / "model.safetensors").is_file() and record.final_checkpoint == str(out / "final-model")
    manifest = read_manifest(coordinator / "manifest.json", fed.coordinator_fingerprint)
    base = record.base_model["fingerprint"]
    refusal_hash = fab_sha256(fab)[:SHORT_HASH]
    for server_round in (1, 2):
        current = record.round(server_round)
        assert current.aggregated_sites == SITES
        for site in SITES:
            entry = current.sites[site]
            assert entry.status == "ok", (site, entry.reason)
            report = verify_report(entry.train.report_signed, record.run_id, server_round, base, manifest.site(site))
            assert report == entry.train.report and report["dp"] is True
        refused = {name: s for name, s in current.sites.items() if name not in SITES}
        assert len(refused) == 2 and all(s.status in ("failed", "rejected") for s in refused.values()), current.sites
        not_approved = [s for s in refused.values() if f"refusing app FAB sha256 {refusal_hash}" in s.reason]
        assert len(not_approved) == 1, current.sites  # the stranger refused the instructions, not the app
    assert sorted(record.participants) == SITES  # who joined: neither the stranger nor the unapproved site
    for site in SITES:
        joined = record.participants[site]
        assert joined.key_fingerprint == manifest.site(site).fingerprint() and joined.joined_round == 1
    assert len({record.participants[site].node_id for site in SITES}) == len(SITES)
    for site in SITES:
        entries = [e for e in Ledger(fed.site_kits[site] / "state").entries() if e.run_id == record.run_id]
        assert sorted(e.server_round for e in entries) == [1, 2], site
    unapproved = fed.site_kits[UNAPPROVED]
    assert not Ledger(unapproved / "state").entries() and not (unapproved / "flower-home" / "apps").exists()
    assert f"ERROR fedtransfer: refusing app FAB sha256 {refusal_hash}" in processes.log(UNAPPROVED)
    assert (fed.site_kits["hospital-a"] / "flower-home" / "apps").is_dir()  # where an approved app is installed
    assert not Ledger(foreign.site_kits["stranger"] / "state").entries(), (
        "the stranger must not train for a coordinator it does not trust"
    )
    assert read_public_identity(fed.site_kits["hospital-a"] / "keys" / "hospital-a.pub.json") == manifest.site(
        "hospital-a"
    )

    for name, process in (("unregistered", unregistered), ("no-ca", no_ca)):
        try:
            process.wait(timeout=90)
        except subprocess.TimeoutExpired:
            pytest.fail(
                f"the {name} SuperNode is still running: it should have been refused\n{processes.log(name)[-2000:]}"
            )
        assert process.returncode != 0 and "Exit Code: 305" in processes.log(name), processes.log(name)[-2000:]
    assert "Failed to activate SuperNode" in processes.log("unregistered")
    assert "No SuperNode found with the given public key" in processes.log("superlink")
    assert "CERTIFICATE_VERIFY_FAILED" in processes.log("no-ca")
