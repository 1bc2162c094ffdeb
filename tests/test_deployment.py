"""Loopback deployment: real flower-superlink and flower-supernode processes, TLS and SuperNode auth.

Provision a 3-site federation, start everything with the kits' own scripts on 127.0.0.1,
run 2 rounds with ``flwr run`` and check the outcome at the coordinator and at every site.
In the same harness: an unregistered SuperNode is refused, a SuperNode without the CA cannot
connect, and a registered SuperNode holding a kit from another federation takes part in the
run but refuses the coordinator's signed instructions, while the other sites complete.
Every process is started in its own session and only those process groups are stopped.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from common.keys import read_public_identity
from common.ledger import Ledger
from common.manifest import read_manifest
from common.privacy_report import verify_report
from common.keys import write_private_file
from common.provision import Endpoint, ProvisionRequest, provision, supernode_auth_keypair
from common.scenarios import load_scenario
from common.site_data import write_site_data
from common.run_record import RunRecord

BIN = Path(sys.executable).parent
FLOWER_ENV = {
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
}
SITES = ["hospital-a", "hospital-b", "hospital-c"]
RUN_TIMEOUT = 420.0

pytestmark = pytest.mark.skipif(not (BIN / "flower-superlink").exists(), reason="Flower's executables are not installed next to this Python")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Processes:
    """Processes this test started, each the leader of its own session; stops exactly those groups."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.started: list[tuple[str, subprocess.Popen]] = []

    def env(self, flwr_home: Path) -> dict[str, str]:
        return {**os.environ, **FLOWER_ENV, "FLWR_HOME": str(flwr_home), "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}

    def start(self, name: str, argv: list[str], flwr_home: Path) -> subprocess.Popen:
        log = (self.logs / f"{name}.log").open("wb")
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=self.env(flwr_home), start_new_session=True, cwd=self.logs)
        log.close()
        self.started.append((name, process))
        return process

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")

    def stop_all(self) -> None:
        for _, process in reversed(self.started):
            try:
                os.killpg(process.pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
        deadline = time.monotonic() + 15
        for _, process in reversed(self.started):
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            process.wait()


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    logs = tmp_path / "logs"
    logs.mkdir()
    running = Processes(logs)
    try:
        yield running
    finally:
        running.stop_all()


def wait_for_port(port: int, process: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"process exited with {process.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.3)
    raise AssertionError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


def flwr(args: list[str], processes: Processes, flwr_home: Path, timeout: float = 60.0) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "flwr"), *args], env=processes.env(flwr_home), capture_output=True, text=True, timeout=timeout, cwd=processes.logs)


def last_json(text: str) -> dict:
    return json.loads(text[text.index("{"):text.rindex("}") + 1])


def test_three_hospitals_on_loopback_with_tls_and_node_auth(tmp_path: Path, processes: Processes) -> None:
    port = free_port()
    address = [Endpoint("127.0.0.1", port)]
    ports = {site: free_port() for site in SITES}
    fed = provision(ProvisionRequest("loopback", SITES, address, tmp_path / "kits", runtime_ports=ports))
    ca = tmp_path / "kits" / "ca"
    foreign = provision(ProvisionRequest("elsewhere", ["stranger"], address, tmp_path / "foreign-kits", ca_cert=ca / "ca.pem", ca_key=ca / "ca.key",
                                         runtime_ports={"stranger": free_port()}))
    scenario = load_scenario("wdbc")
    for index, site in enumerate(SITES):
        write_site_data(scenario.sites[index], fed.site_kits[site] / "data", scenario.feature_names)
    write_site_data(scenario.sites[3], foreign.site_kits["stranger"] / "data", scenario.feature_names)
    coordinator = fed.coordinator_kit
    coordinator_home = coordinator / "flower-home"

    superlink = processes.start("superlink", [str(coordinator / "start-superlink.sh")], coordinator_home)
    wait_for_port(port, superlink)
    register = subprocess.run([str(coordinator / "register-supernodes.sh")], env=processes.env(coordinator_home), capture_output=True, text=True, timeout=120)
    assert register.returncode == 0, register.stdout + register.stderr
    # the coordinator's mistake: it registers a SuperNode whose site kit belongs to another federation
    stranger = flwr(["supernode", "register", str(foreign.coordinator_kit / "supernode-keys" / "stranger.pub"), "loopback"], processes, coordinator_home)
    assert stranger.returncode == 0, stranger.stdout + stranger.stderr
    # a registered key used by a SuperNode that does not trust our CA
    no_ca_key = tmp_path / "no-ca" / "auth.key"
    private, public = supernode_auth_keypair()
    write_private_file(no_ca_key, private)
    (tmp_path / "no-ca" / "auth.pub").write_bytes(public)
    registered = flwr(["supernode", "register", str(tmp_path / "no-ca" / "auth.pub"), "loopback"], processes, coordinator_home)
    assert registered.returncode == 0, registered.stdout + registered.stderr

    for site in SITES:
        kit = fed.site_kits[site]
        processes.start(site, [str(kit / "start-supernode.sh")], kit / "flower-home")
    processes.start("stranger", [str(foreign.site_kits["stranger"] / "start-supernode.sh")], foreign.site_kits["stranger"] / "flower-home")

    unregistered_key = tmp_path / "unregistered" / "auth.key"
    write_private_file(unregistered_key, supernode_auth_keypair()[0])
    site_a = fed.site_kits["hospital-a"]
    common_args = ["--superlink", f"127.0.0.1:{port}", "--node-config", f'site-config="{site_a / "site.toml"}"', "--max-retries", "2", "--max-wait-time", "20"]
    unregistered = processes.start("unregistered", [str(BIN / "flower-supernode"), *common_args, "--root-certificates", str(site_a / "tls" / "ca.pem"),
                                                    "--auth-supernode-private-key", str(unregistered_key), "--port", str(free_port())], tmp_path / "unregistered")
    no_ca = processes.start("no-ca", [str(BIN / "flower-supernode"), *common_args, "--auth-supernode-private-key", str(no_ca_key), "--port", str(free_port())],
                            tmp_path / "no-ca")

    out = tmp_path / "run-out"
    started = subprocess.run(
        [str(coordinator / "run.sh"), "--run-config", f'num-server-rounds=2 local-epochs=1 expected-sites=4 min-sites=3 out="{out}"', "--format", "json"],
        env=processes.env(coordinator_home), capture_output=True, text=True, timeout=180,
    )
    assert started.returncode == 0, started.stdout + started.stderr
    run_id = last_json(started.stdout)["run-id"]

    status = ""
    deadline = time.monotonic() + RUN_TIMEOUT
    while time.monotonic() < deadline:
        listing = flwr(["ls", "--run-id", str(run_id), "--format", "json", "loopback"], processes, coordinator_home)
        status = last_json(listing.stdout)["runs"][0]["status"] if listing.returncode == 0 else status
        if status.startswith("finished"):
            break
        time.sleep(3)
    assert status == "finished:completed", f"run {run_id} is {status!r}\n" + processes.log("superlink")[-4000:]

    record = RunRecord.load(out / "run-record.json")
    assert record.status == "completed"
    assert (out / "final-model" / "model.safetensors").is_file() and record.final_checkpoint == str(out / "final-model")
    manifest = read_manifest(coordinator / "manifest.json", fed.coordinator_fingerprint)
    base = record.base_model["fingerprint"]
    for server_round in (1, 2):
        current = record.round(server_round)
        assert current.aggregated_sites == SITES
        for site in SITES:
            entry = current.sites[site]
            assert entry.status == "ok", (site, entry.reason)
            report = verify_report(entry.privacy_signed, int(run_id), server_round, base, manifest.site(site))
            assert report == entry.privacy
        refused = {name: s for name, s in current.sites.items() if name not in SITES}
        assert len(refused) == 1 and next(iter(refused.values())).status in ("failed", "rejected"), current.sites
    for site in SITES:
        entries = [e for e in Ledger(fed.site_kits[site] / "state").entries() if e.run_id == str(run_id)]
        assert sorted(e.server_round for e in entries) == [1, 2], site
    assert not Ledger(foreign.site_kits["stranger"] / "state").entries(), "the stranger must not train for a coordinator it does not trust"
    assert read_public_identity(fed.site_kits["hospital-a"] / "keys" / "hospital-a.pub.json") == manifest.site("hospital-a")

    for name, process in (("unregistered", unregistered), ("no-ca", no_ca)):
        try:
            process.wait(timeout=90)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the {name} SuperNode is still running: it should have been refused\n{processes.log(name)[-2000:]}")
        assert process.returncode != 0 and "Exit Code: 305" in processes.log(name), processes.log(name)[-2000:]
    assert "Failed to activate SuperNode" in processes.log("unregistered")
    assert "No SuperNode found with the given public key" in processes.log("superlink")
    assert "CERTIFICATE_VERIFY_FAILED" in processes.log("no-ca")
