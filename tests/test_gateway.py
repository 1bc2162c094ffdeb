"""The fleet gateway forwards Fleet API calls, byte for byte with their headers, and nothing else."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from starlette.testclient import TestClient

from common.deploy.gateway import GatewayConfig, create_gateway, is_fleet_call
from common.deploy.provision import CertificateAuthority, Endpoint, certificate_pem


@pytest.fixture
def gateway(tmp_path: Path):
    ca = CertificateAuthority.generate("gw")
    (tmp_path / "ca.pem").write_text(certificate_pem(ca.certificate))
    seen: list[httpx.Request] = []

    def superlink(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, content=b"\x08\x01" + request.content, headers={"content-type": "application/x"})

    config = GatewayConfig(
        "127.0.0.1", 0, "127.0.0.1:1", tmp_path / "c.pem", tmp_path / "k.pem", tmp_path / "ca.pem", max_body_bytes=1000
    )
    with TestClient(create_gateway(config, transport=httpx.MockTransport(superlink))) as client:
        yield client, seen


def test_a_fleet_call_is_forwarded_with_its_body_and_authentication_headers(gateway) -> None:
    client, seen = gateway
    headers = {"content-type": "application/protobuf", "flwr-public-key": "cHVi", "flwr-signature": "c2ln"}
    answer = client.post("/v1/fleet/pull-messages", content=b"\x01\x02", headers=headers)
    assert answer.status_code == 200 and answer.content == b"\x08\x01\x01\x02"
    (forwarded,) = seen
    assert forwarded.url.path == "/v1/fleet/pull-messages" and forwarded.content == b"\x01\x02"
    assert forwarded.headers["flwr-public-key"] == "cHVi" and forwarded.headers["flwr-signature"] == "c2ln"


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/v1/control/list-runs"),
        ("POST", "/v1/control/unregister-node"),
        ("POST", "/v1/runtime/acquire-task"),
        ("POST", "/v1/fleet/../control/list-runs"),
        ("POST", "/v1/fleet/%2e%2e/control/start-run"),
        ("POST", "/v1/fleet/pull-messages/../../control/list-runs"),
        ("POST", "/v1/fleet/pull-messages?x=1"),
        ("GET", "/v1/fleet/pull-messages"),
        ("GET", "/docs"),
        ("GET", "/health"),
    ],
)
def test_everything_else_is_404_and_never_reaches_the_superlink(gateway, method: str, path: str) -> None:
    client, seen = gateway
    answer = client.request(method, path, content=b"" if method == "POST" else None)
    assert answer.status_code == 404 and "only the Flower Fleet API" in answer.text
    assert seen == []


def test_an_oversized_body_is_refused(gateway) -> None:
    client, seen = gateway
    assert client.post("/v1/fleet/push-object", content=b"x" * 1001).status_code == 413
    assert seen == []


def test_fleet_paths_are_exactly_one_call_name() -> None:
    assert is_fleet_call("POST", "/v1/fleet/confirm-message-received")
    assert not is_fleet_call("POST", "/v1/fleet/")
    assert not is_fleet_call("POST", "/v1/fleet/a/b")
    assert not is_fleet_call("PUT", "/v1/fleet/pull-messages")
    assert str(Endpoint("::1", 8000)) == "[::1]:8000"
