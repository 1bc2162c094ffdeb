"""The fleet gateway: the only door from the hospitals' network to the coordinator.

Flower 1.42's ``flower-superlink`` serves its Fleet API (what SuperNodes use), its Control
API (start and stop runs, register and unregister SuperNodes: no authentication in open-source
Flower) and its Runtime API (what the ServerApp uses) on one address and port, with no option
to split them. So the SuperLink listens on the coordinator's loopback only, and this gateway
listens on the address the sites dial: it terminates TLS with the SuperLink's certificate and
forwards ``POST /v1/fleet/...`` requests, byte for byte with their SuperNode-authentication
headers, to the SuperLink over TLS on loopback. Every other method or path is answered
``404`` without reaching the SuperLink, so a hospital (or anyone holding the public CA
certificate) cannot reach the Control or Runtime API.
"""

from __future__ import annotations

import contextlib
import logging
import re
import ssl
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from pathlib import Path

import httpx
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

log = logging.getLogger(__name__)

FLEET_PREFIX = "/v1/fleet/"
_FLEET_CALL = re.compile(r"/v1/fleet/[a-z0-9-]{1,64}")
#: Largest request body forwarded; Flower splits messages into objects, each far smaller than this.
MAX_BODY_BYTES = 256 * 2**20
#: Seconds to wait for the SuperLink's answer to one forwarded call.
UPSTREAM_TIMEOUT = 300.0
NOT_FLEET = (
    "not found: this address serves only the Flower Fleet API (SuperNodes); the Control API is not reachable here"
)
#: Headers that describe one connection, not the request: never forwarded either way.
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
        "accept-encoding",
        "content-encoding",
    }
)


@dataclass(frozen=True)
class GatewayConfig:
    """Where the gateway listens, the loopback SuperLink it forwards to, and the TLS files of both ends."""

    listen_host: str
    listen_port: int
    superlink: str  # HOST:PORT of the SuperLink on loopback
    certfile: Path
    keyfile: Path
    ca_certfile: Path
    max_body_bytes: int = MAX_BODY_BYTES


def is_fleet_call(method: str, path: str) -> bool:
    """Whether a request may pass: a POST to one Fleet API call, ``/v1/fleet/NAME`` (NAME of ``a-z 0-9 -``)."""
    return method == "POST" and _FLEET_CALL.fullmatch(path) is not None


def _forwarded(headers: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    return [(name, value) for name, value in headers if name.lower() not in _HOP_BY_HOP]


class BodyTooLarge(Exception):
    """A request body above the gateway's limit."""


async def _body(request: Request, limit: int) -> bytes:
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge
        chunks.append(chunk)
    return b"".join(chunks)


def create_gateway(config: GatewayConfig, transport: httpx.AsyncBaseTransport | None = None) -> Starlette:
    """The gateway's ASGI app; ``transport`` replaces the network to the SuperLink (tests)."""
    verify = ssl.create_default_context(cafile=str(config.ca_certfile))
    upstream = httpx.AsyncClient(
        base_url=f"https://{config.superlink}",
        verify=verify,
        timeout=UPSTREAM_TIMEOUT,
        transport=transport,
        follow_redirects=False,
    )

    async def forward(request: Request) -> Response:
        path = request.url.path
        peer = request.client.host if request.client else "unknown"
        if not is_fleet_call(request.method, path) or request.url.query:
            log.warning("refused %s %s from %s: not a Fleet API call", request.method, path, peer)
            return PlainTextResponse(NOT_FLEET, status_code=404)
        try:
            body = await _body(request, config.max_body_bytes)
        except BodyTooLarge:
            return PlainTextResponse(f"request body above {config.max_body_bytes} bytes", status_code=413)
        except ClientDisconnect:
            return Response(status_code=400)
        headers = [*_forwarded(request.headers.items()), ("accept-encoding", "identity")]
        try:
            answer = await upstream.post(path, content=body, headers=headers)
        except httpx.HTTPError as err:
            log.error("the SuperLink at %s did not answer %s: %s", config.superlink, path, err)
            return PlainTextResponse("the SuperLink is not reachable", status_code=502)
        return Response(
            answer.content, status_code=answer.status_code, headers=dict(_forwarded(answer.headers.items()))
        )

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        await upstream.aclose()

    return Starlette(
        routes=[Route("/{path:path}", forward, methods=["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"])],
        lifespan=lifespan,
    )


def serve_gateway(config: GatewayConfig) -> None:
    """Run the gateway until interrupted (TLS with the SuperLink's certificate)."""
    import uvicorn

    log.info(
        "fleet gateway on %s:%d (TLS) forwarding only %s... to the SuperLink at %s",
        config.listen_host,
        config.listen_port,
        FLEET_PREFIX,
        config.superlink,
    )
    uvicorn.run(
        create_gateway(config),
        host=config.listen_host,
        port=config.listen_port,
        ssl_certfile=str(config.certfile),
        ssl_keyfile=str(config.keyfile),
        access_log=True,
        log_level="info",
    )
