"""The Control API stays off the hospitals' network: a real SuperLink on loopback behind the fleet gateway.

A client on the site's side, holding only the kit's CA certificate, reaches the Fleet address and
nothing else there: Flower's own CLI cannot list runs through it, and a raw Control or Runtime API
call gets 404. The coordinator reaches the Control API on its loopback address, which proves the
calls above would have worked had the SuperLink been exposed. ``fedtransfer site check --probe``
says both: ok through the gateway, an error for a site pointed at the SuperLink itself.
"""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path

import pytest

from common.deploy.provision import KIT_FILE, Endpoint, KitInfo, ProvisionRequest, flower_connection_toml, provision
from common.deploy.site_check import CONTROL_PROBES, ERROR, OK, check_kit, control_api_status
from tests.deployment_harness import HAS_FLOWER, Processes, flwr, free_port, start_coordinator

pytestmark = [
    pytest.mark.deployment,
    pytest.mark.skipif(not HAS_FLOWER, reason="Flower's executables are not installed next to this Python"),
]


def _control_findings(kit: Path) -> list:
    return [f for f in check_kit(kit, probe=True) if f.check == "control plane"]


def test_the_fleet_address_does_not_serve_the_control_api(tmp_path: Path, processes: Processes) -> None:
    port, control = free_port(), free_port()
    fed = provision(
        ProvisionRequest("cp", ["hospital-a"], [Endpoint("127.0.0.1", port)], tmp_path / "kits", control_port=control)
    )
    coordinator, site = fed.coordinator_kit, fed.site_kits["hospital-a"]
    ca = site / "tls" / "ca.pem"
    start_coordinator(coordinator, processes)

    for path in CONTROL_PROBES:
        assert control_api_status(ca, Endpoint("127.0.0.1", port), path) == 404, path
        assert control_api_status(ca, Endpoint("127.0.0.1", control), path) != 404, path

    # Flower's own CLI, configured as an outsider at a site would be (the public CA and the Fleet address)
    outsider = tmp_path / "outsider-home"
    outsider.mkdir()
    (outsider / "config.toml").write_text(flower_connection_toml("cp", Endpoint("127.0.0.1", port), ca))
    refused = flwr(["ls", "--format", "json", "cp"], processes, outsider)
    assert '"success": false' in refused.stdout and "404 Not Found" in refused.stdout, refused.stdout + refused.stderr
    allowed = flwr(["ls", "--format", "json", "cp"], processes, coordinator / "flower-home")
    assert allowed.returncode == 0 and '"success": true' in allowed.stdout, allowed.stdout + allowed.stderr

    (finding,) = _control_findings(site)
    assert finding.level == OK, finding

    exposed = replace(KitInfo.load(site), superlink_address=str(Endpoint("127.0.0.1", control)))
    (site / KIT_FILE).write_text(json.dumps(asdict(exposed)))
    (finding,) = _control_findings(site)
    assert finding.level == ERROR and "Control/Runtime API is reachable" in finding.message, finding
