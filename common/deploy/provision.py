"""Provisioning kits for a deployed federation: one for the coordinator, one per site.

A kit is a folder to copy to one machine. It holds everything that machine needs to
take part, and no private key that belongs to another machine::

    OUT/ca/                      the certificate authority (ca.key: keep it offline)
    OUT/coordinator/             the SuperLink and ServerApp machine
        tls/ca.pem  tls/superlink.pem  tls/superlink.key
        keys/coordinator.{enc,sign}.key  keys/coordinator.pub.json
        manifest.json            the coordinator-signed list of sites
        supernode-keys/SITE.pub  the sites' Flower authentication keys, to register
        flower-home/config.toml  Flower's connection to the SuperLink's loopback address (FLWR_HOME)
        start-superlink.sh  start-gateway.sh  register-supernodes.sh  run.sh
        kit.json
    OUT/sites/SITE/              one data site: no private key (the site made its own)
        tls/ca.pem
        manifest.json  site.toml  state/privacy-policy.toml  data/
        start-supernode.sh
        bin/flwr-clientapp       Flower's flwr-clientapp, for the apps the site approved only
        kit.json

A deployed site makes its keys itself (``fedtransfer keys site``, :mod:`common.deploy.site_keys`)
and sends only its signed enrolment (:mod:`common.security.enrolment`); its kit is then copied
into the folder that holds its keys. ``ProvisionRequest.sites`` instead makes each named site's
private keys here, in its kit (``keys/``, ``flower/``): for simulations and tests only, since
whoever provisions then holds every site's keys and can sign as any of them.

The SuperLink listens on the coordinator's loopback only (``control_address``): Flower 1.42
serves its unauthenticated Control API on the same port as the Fleet API. The sites dial the
fleet gateway (:mod:`common.deploy.gateway`), which forwards only Fleet API calls to it.

Every path written into a kit is absolute: it is where the kit will live on its machine
(``install_root/coordinator`` and ``install_root/SITE``, or where it was written when no
install root is given). Running ``provision`` again on the same ``OUT`` adds sites to the
federation: the CA, the SuperLink certificate, the coordinator's keys and the existing
sites' kits stay valid; the manifest is signed again with the new sites in it.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import shlex
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from common.data.site_config import SITE_CONFIG_FILE, SiteConfig
from common.errors import DeploymentError
from common.io import JsonError, parse_json
from common.privacy.policy import SitePolicy, write_policy
from common.security.enrolment import Enrolment
from common.security.keys import (
    COORDINATOR_NAME,
    Identity,
    PublicIdentity,
    read_identity,
    validate_name,
    write_identity,
    write_private_file,
    write_public_file,
)
from common.security.manifest import (
    DEFAULT_VALIDITY_DAYS,
    MANIFEST_FILE,
    Manifest,
    read_manifest,
    sign_manifest,
    write_manifest,
)

logger = logging.getLogger(__name__)

KIT_FILE = "kit.json"
KIT_FORMAT = "fedtransfer-kit"
CA_DIR = "ca"
COORDINATOR_KIT = "coordinator"
SITES_DIR = "sites"
CA_CERT = "ca.pem"
CA_KEY = "ca.key"
SUPERLINK_CERT = "superlink.pem"
SUPERLINK_KEY = "superlink.key"
AUTH_KEY = "supernode-auth.key"
AUTH_PUB = "supernode-auth.pub"
KEYS_DIR = "keys"  # a site's fedtransfer key pairs, inside its folder
SUPERNODE_DIR = "flower"  # its SuperNode authentication key pair
FLOWER_HOME = "flower-home"
SUPERLINK_SCRIPT = "start-superlink.sh"
GATEWAY_SCRIPT = "start-gateway.sh"
REGISTER_SCRIPT = "register-supernodes.sh"
RUN_SCRIPT = "run.sh"
SUPERNODE_SCRIPT = "start-supernode.sh"
BIN_DIR = "bin"  # a site kit's commands that go first on its SuperNode's PATH
CLIENTAPP_GATE = "flwr-clientapp"  # runs Flower's own, for apps the site approved (common.deploy.clientapp_gate)
POLICY_FILE = "privacy-policy.toml"
DEFAULT_RUNTIME_PORT = 9094
CA_DAYS = 3650
SERVER_CERT_DAYS = 825
RESERVED_NAMES = (COORDINATOR_KIT, CA_DIR, SITES_DIR)
FLOWER_ENV = {
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
}


class ProvisionError(DeploymentError):
    """The federation cannot be provisioned as asked; the message says what to change."""


@dataclass(frozen=True)
class Endpoint:
    """A ``host:port`` that SuperNodes dial; IPv6 hosts are written ``[::1]:8000``."""

    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> Endpoint:
        host, sep, port = text.strip().rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ProvisionError(f"SuperLink address {text!r} must be HOST:PORT, e.g. coordinator.example.org:8000")
        host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
        return cls(host, int(port))

    @property
    def ip(self) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
        try:
            return ipaddress.ip_address(self.host)
        except ValueError:
            return None

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


LOOPBACK_ENDPOINTS = (Endpoint("127.0.0.1", 0), Endpoint("::1", 0), Endpoint("localhost", 0))


@dataclass(frozen=True)
class KitInfo:
    """``kit.json``: what a kit is for and where it must live. It holds no secret."""

    federation: str
    role: str
    name: str
    install_dir: str
    superlink_address: str
    coordinator_fingerprint: str
    runtime_port: int = 0
    created: str = ""
    control_address: str = ""  # coordinator only: the SuperLink's own loopback address (Control API)
    site_keys: str = "site"  # site kits: "site" (made at the site) or "provisioner" (test provisioning)
    format: str = KIT_FORMAT

    def write(self, directory: Path) -> None:
        write_public_file(directory / KIT_FILE, json.dumps(asdict(self), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, directory: Path) -> KitInfo:
        path = Path(directory) / KIT_FILE
        if not path.is_file():
            raise ProvisionError(f"{directory} is not a fedtransfer kit: {KIT_FILE} is missing")
        try:
            raw = parse_json(path.read_bytes())
            info = cls(**raw)
        except (JsonError, TypeError) as err:
            raise ProvisionError(f"{path} is damaged ({err}); ask the coordinator for a fresh kit") from err
        if info.format != KIT_FORMAT or info.role not in ("coordinator", "site"):
            raise ProvisionError(f"{path} is not a fedtransfer kit description")
        return info


@dataclass(frozen=True)
class CertificateAuthority:
    """The federation's private CA: it signs the SuperLink's TLS certificate."""

    certificate: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @classmethod
    def generate(cls, federation: str, days: int = CA_DAYS) -> CertificateAuthority:
        key = ec.generate_private_key(ec.SECP384R1())
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedtransfer"),
                x509.NameAttribute(NameOID.COMMON_NAME, f"fedtransfer CA for federation {federation}"),
            ]
        )
        now = datetime.now(UTC)
        certificate = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5))
            .not_valid_after(now + timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA384())
        )
        return cls(certificate, key)

    @classmethod
    def load(cls, cert_path: Path, key_path: Path) -> CertificateAuthority:
        try:
            certificate = x509.load_pem_x509_certificate(Path(cert_path).read_bytes())
            key = serialization.load_pem_private_key(Path(key_path).read_bytes(), password=None)
        except FileNotFoundError as err:
            raise ProvisionError(f"CA file {err.filename} not found") from err
        except (ValueError, TypeError) as err:
            raise ProvisionError(
                f"cannot use the CA {cert_path} / {key_path}: {err} (an unencrypted PEM EC key is needed)"
            ) from err
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ProvisionError(f"CA key {key_path} is not an EC key")
        if certificate.public_key().public_numbers() != key.public_key().public_numbers():
            raise ProvisionError(f"CA key {key_path} does not belong to the certificate {cert_path}")
        try:
            if not certificate.extensions.get_extension_for_class(x509.BasicConstraints).value.ca:
                raise ProvisionError(f"{cert_path} is not a CA certificate (BasicConstraints ca=false)")
        except x509.ExtensionNotFound:
            raise ProvisionError(f"{cert_path} is not a CA certificate (no BasicConstraints)") from None
        return cls(certificate, key)

    def issue_server_certificate(
        self, endpoints: list[Endpoint], days: int = SERVER_CERT_DAYS
    ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        """A TLS server certificate with a SAN for every address the SuperLink is dialled at.

        Loopback names are always included: the SuperLink's own SuperExec (which starts the
        ServerApp) dials it at 127.0.0.1 (or ::1) even when it listens on 0.0.0.0, and checks
        the certificate against the CA like any other client.
        """
        key = ec.generate_private_key(ec.SECP384R1())
        names: list[x509.GeneralName] = []
        for endpoint in [*endpoints, *LOOPBACK_ENDPOINTS]:
            entry: x509.GeneralName = x509.IPAddress(endpoint.ip) if endpoint.ip else x509.DNSName(endpoint.host)
            if entry not in names:
                names.append(entry)
        now = datetime.now(UTC)
        not_after = min(now + timedelta(days=days), self.certificate.not_valid_after_utc)
        certificate = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, endpoints[0].host)]))
            .issuer_name(self.certificate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5))
            .not_valid_after(not_after)
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=True,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False)
            .sign(self.key, hashes.SHA384())
        )
        return certificate, key


def certificate_pem(certificate: x509.Certificate) -> str:
    return certificate.public_bytes(serialization.Encoding.PEM).decode("ascii")


def private_key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def supernode_auth_keypair() -> tuple[bytes, bytes]:
    """A SuperNode authentication key pair (EC P-384) in OpenSSH format: (private, public)."""
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return private, public + b"\n"


def _write_script(path: Path, lines: list[str]) -> None:
    write_public_file(path, "\n".join(["#!/bin/sh", *lines]) + "\n")
    os.chmod(path, 0o755)


def _flower_env_lines(flwr_home: Path) -> list[str]:
    env = " ".join(f"{k}={v}" for k, v in FLOWER_ENV.items())
    return [f"export FLWR_HOME={shlex.quote(str(flwr_home))} {env}"]


def flower_connection_toml(federation: str, address: Endpoint, ca_path: Path) -> str:
    """``$FLWR_HOME/config.toml``: the named connection to the federation's SuperLink."""
    return (
        "# Flower connection for fedtransfer federation " + json.dumps(federation) + "\n"
        "[superlink]\n"
        f"default = {json.dumps(federation)}\n\n"
        f"[superlink.{json.dumps(federation)}]\n"
        f"address = {json.dumps(str(address))}\n"
        f"root-certificates = {json.dumps(str(ca_path))}\n"
    )


def default_app_dir() -> Path | None:
    """The fedtransfer Flower App (the repository root) if this installation runs from a checkout."""
    root = Path(__file__).resolve().parents[2]  # common/deploy/provision.py -> the repository root
    pyproject = root / "pyproject.toml"
    return root if pyproject.is_file() and "[tool.flwr.app" in pyproject.read_text() else None


@dataclass(frozen=True)
class ProvisionRequest:
    """What to provision. ``superlink_addresses[0]`` is the address sites dial.

    ``enrolments`` are the sites that made their own keys (deployments). ``sites`` names sites whose
    private keys are made here, in their kits: for simulations and tests only.
    """

    federation: str
    sites: list[str]
    superlink_addresses: list[Endpoint]
    out: Path
    ca_cert: Path | None = None
    ca_key: Path | None = None
    install_root: Path | None = None
    runtime_ports: dict[str, int] = field(default_factory=dict)
    app_dir: Path | None = None
    policy: SitePolicy = field(default_factory=lambda: SitePolicy(max_epsilon=10.0, delta=1e-5))
    min_sites: int = 0
    control_port: int = 0  # the SuperLink's port on the coordinator's loopback (0: the sites' port + 1)
    enrolments: list[Enrolment] = field(default_factory=list)
    manifest_days: int = DEFAULT_VALIDITY_DAYS

    @property
    def site_ids(self) -> list[str]:
        return [*self.sites, *(e.site_id for e in self.enrolments)]

    @property
    def control_address(self) -> Endpoint:
        """Where the SuperLink itself listens: loopback only, reached by the gateway, flwr and the ServerApp."""
        public = self.superlink_addresses[0].port
        return Endpoint("127.0.0.1", self.control_port or (public + 1 if public < 65535 else public - 1))


@dataclass(frozen=True)
class ProvisionResult:
    """Where the kits are and what the operators must exchange out of band."""

    federation: str
    coordinator_kit: Path
    site_kits: dict[str, Path]
    coordinator_fingerprint: str
    ca_dir: Path | None
    added_sites: list[str]
    extended: bool = False


def _validate(request: ProvisionRequest) -> None:
    try:
        validate_name(request.federation)
    except ValueError as err:
        raise ProvisionError(f"federation name: {err}") from None
    if not request.site_ids:
        raise ProvisionError("give at least one site's enrolment with --enrolment (or, for a test, --sites)")
    for site in request.site_ids:
        try:
            validate_name(site)
        except ValueError as err:
            raise ProvisionError(f"site name: {err}") from None
        if site in RESERVED_NAMES:
            raise ProvisionError(f"site name {site!r} is reserved; choose another")
    if len(set(request.site_ids)) != len(request.site_ids):
        raise ProvisionError("a site is listed twice (in --sites or --enrolment)")
    if not request.superlink_addresses:
        raise ProvisionError(
            "give the SuperLink address the sites dial, e.g. --superlink-address coordinator.example.org:8000"
        )
    if (request.ca_cert is None) != (request.ca_key is None):
        raise ProvisionError("give both --ca-cert and --ca-key, or neither")
    if request.control_address.port == request.superlink_addresses[0].port:
        raise ProvisionError("--control-port must differ from the port the sites dial")
    if not 0 <= request.control_port < 65536:
        raise ProvisionError(f"--control-port {request.control_port} is not a TCP port")


def _install_dir(request: ProvisionRequest, generated: Path, name: str) -> Path:
    return (request.install_root / name) if request.install_root else generated.resolve()


def provision(request: ProvisionRequest) -> ProvisionResult:
    """Write the coordinator's kit and one kit per site; add sites if ``out`` already holds a federation."""
    _validate(request)
    out = Path(request.out)
    coordinator_dir = out / COORDINATOR_KIT
    if (coordinator_dir / KIT_FILE).exists():
        return _add_sites(request, coordinator_dir)
    if out.exists() and any(out.iterdir()):
        raise ProvisionError(
            f"{out} exists and is not empty; choose a new directory (or an existing kit directory to add sites)"
        )
    out.mkdir(parents=True, exist_ok=True)
    ca_dir: Path | None = None
    if request.ca_cert is not None and request.ca_key is not None:
        ca = CertificateAuthority.load(request.ca_cert, request.ca_key)
    else:
        ca = CertificateAuthority.generate(request.federation)
        ca_dir = out / CA_DIR
        ca_dir.mkdir(mode=0o700)
        write_private_file(ca_dir / CA_KEY, private_key_pem(ca.key))
        write_public_file(ca_dir / CA_CERT, certificate_pem(ca.certificate))
    coordinator = Identity.generate(COORDINATOR_NAME)
    _write_coordinator_kit(request, coordinator_dir, ca, coordinator)
    site_kits, manifest = _write_sites(request, out, ca.certificate, coordinator, None)
    _finish_coordinator_kit(request, coordinator_dir, manifest)
    logger.info(
        "provisioned federation %s: coordinator kit %s, %d site kits",
        request.federation,
        coordinator_dir,
        len(site_kits),
    )
    return ProvisionResult(
        request.federation, coordinator_dir, site_kits, coordinator.public().fingerprint(), ca_dir, request.site_ids
    )


def _add_sites(request: ProvisionRequest, coordinator_dir: Path) -> ProvisionResult:
    info = KitInfo.load(coordinator_dir)
    if info.federation != request.federation:
        raise ProvisionError(f"{request.out} holds federation {info.federation!r}, not {request.federation!r}")
    installed = Path(info.install_dir)
    request = replace(request, install_root=None if installed == coordinator_dir.resolve() else installed.parent)
    coordinator = read_identity(coordinator_dir / "keys", COORDINATOR_NAME)
    manifest = read_manifest(coordinator_dir / MANIFEST_FILE, coordinator.public().fingerprint())
    clash = sorted(set(request.site_ids) & set(manifest.sites))
    if clash:
        raise ProvisionError(
            f"site(s) {', '.join(clash)} are already in federation {request.federation!r}; to replace a site's keys, "
            "revoke it first (see docs/deployment.md)"
        )
    ca_certificate = x509.load_pem_x509_certificate((coordinator_dir / "tls" / CA_CERT).read_bytes())
    site_kits, new_manifest = _write_sites(request, Path(request.out), ca_certificate, coordinator, manifest)
    _finish_coordinator_kit(request, coordinator_dir, new_manifest)
    logger.info("added %s to federation %s", ", ".join(request.site_ids), request.federation)
    return ProvisionResult(
        request.federation,
        coordinator_dir,
        site_kits,
        coordinator.public().fingerprint(),
        None,
        request.site_ids,
        extended=True,
    )


def _write_coordinator_kit(
    request: ProvisionRequest, kit: Path, ca: CertificateAuthority, coordinator: Identity
) -> None:
    install = _install_dir(request, kit, COORDINATOR_KIT)
    tls = kit / "tls"
    tls.mkdir(parents=True, mode=0o700)
    certificate, key = ca.issue_server_certificate(request.superlink_addresses)
    write_public_file(tls / CA_CERT, certificate_pem(ca.certificate))
    write_public_file(tls / SUPERLINK_CERT, certificate_pem(certificate))
    write_private_file(tls / SUPERLINK_KEY, private_key_pem(key))
    write_identity(coordinator, kit / "keys")
    (kit / "state").mkdir(mode=0o700)
    (kit / "runs").mkdir(mode=0o700)
    (kit / FLOWER_HOME).mkdir(mode=0o700)
    address, control = request.superlink_addresses[0], request.control_address
    write_public_file(
        kit / FLOWER_HOME / "config.toml",
        flower_connection_toml(request.federation, control, install / "tls" / CA_CERT),
    )
    listen = "127.0.0.1" if address.ip is not None and address.ip.is_loopback else "0.0.0.0"
    flower_home = install / FLOWER_HOME
    tls = {name: shlex.quote(str(install / "tls" / name)) for name in (CA_CERT, SUPERLINK_CERT, SUPERLINK_KEY)}
    _write_script(
        kit / SUPERLINK_SCRIPT,
        [
            f"# SuperLink of fedtransfer federation {request.federation}: TLS, SuperNode authentication, state on "
            "disk.",
            f"# It listens on loopback only ({control}): its Control API has no authentication. The sites reach its",
            f"# Fleet API through the fleet gateway ({GATEWAY_SCRIPT}) at {address}.",
            "set -eu",
            *_flower_env_lines(flower_home),
            "exec flower-superlink \\",
            f"  --ssl-ca-certfile {tls[CA_CERT]} \\",
            f"  --ssl-certfile {tls[SUPERLINK_CERT]} \\",
            f"  --ssl-keyfile {tls[SUPERLINK_KEY]} \\",
            "  --enable-supernode-auth \\",
            f"  --database {shlex.quote(str(install / 'state' / 'superlink.db'))} \\",
            "  --disable-runtime-dependency-installation \\",
            f"  --host {control.host} --port {control.port}",
        ],
    )
    _write_script(
        kit / GATEWAY_SCRIPT,
        [
            f"# Fleet gateway of fedtransfer federation {request.federation}: the only address the sites dial.",
            f"# Sites dial {address}; open TCP port {address.port} to them (and only that port). It forwards",
            f"# only Fleet API calls to the SuperLink at {control}; the Control API stays unreachable from the sites.",
            "set -eu",
            "exec fedtransfer gateway \\",
            f"  --listen {shlex.quote(str(Endpoint(listen, address.port)))} \\",
            f"  --superlink {shlex.quote(str(control))} \\",
            f"  --ssl-certfile {tls[SUPERLINK_CERT]} \\",
            f"  --ssl-keyfile {tls[SUPERLINK_KEY]} \\",
            f"  --ssl-ca-certfile {tls[CA_CERT]}",
        ],
    )
    KitInfo(
        request.federation,
        "coordinator",
        COORDINATOR_NAME,
        str(install),
        str(address),
        coordinator.public().fingerprint(),
        created=_now(),
        control_address=str(control),
    ).write(kit)


def _finish_coordinator_kit(request: ProvisionRequest, kit: Path, manifest: Manifest) -> None:
    """The manifest, the keys to register and the run script: everything that lists the sites."""
    info = KitInfo.load(kit)
    install = Path(info.install_dir)
    write_manifest(manifest, kit / MANIFEST_FILE)
    flower_home = install / FLOWER_HOME
    register = [
        f"# Register the sites' SuperNode keys with the SuperLink of federation {request.federation} (run once, "
        "SuperLink up).",
        "# flwr supernode ls shows them; flwr supernode unregister NODE_ID revokes one.",
        "set -eu",
        *_flower_env_lines(flower_home),
    ]
    for site in sorted(manifest.sites):
        key = install / "supernode-keys" / f"{site}.pub"
        register.append(
            f"flwr supernode register {shlex.quote(str(key))} {shlex.quote(request.federation)} --name "
            f'{shlex.quote(site)} "$@"'
        )
    _write_script(kit / REGISTER_SCRIPT, register)
    sites = len(manifest.sites)
    min_sites = request.min_sites or min(2, sites)
    app = request.app_dir or default_app_dir()
    app_line = (
        f"APP=${{FEDTRANSFER_APP:-{shlex.quote(str(app))}}}"
        if app
        else "APP=${FEDTRANSFER_APP:?set FEDTRANSFER_APP to the fedtransfer checkout (the Flower App)}"
    )
    run_config = " ".join(
        [
            f"coordinator-keys={json.dumps(str(install / 'keys'))}",
            f"manifest={json.dumps(str(install / MANIFEST_FILE))}",
            f"expected-sites={sites}",
            f"min-sites={min_sites}",
        ]
    )
    _write_script(
        kit / RUN_SCRIPT,
        [
            f"# Start a run of federation {request.federation} on its {sites} sites; the ServerApp runs on the "
            "SuperLink machine.",
            "# Extra arguments go to flwr run, e.g. --run-config 'rounds=5 checkpoint=\"/srv/models/base\"'.",
            "# flwr run exits 0 even when the run fails: check flwr ls --run-id ID --format json.",
            "set -eu",
            *_flower_env_lines(flower_home),
            app_line,
            f"OUT={shlex.quote(str(install / 'runs'))}/$(date -u +%Y%m%dT%H%M%SZ)",
            f'exec flwr run "$APP" {shlex.quote(request.federation)} \\',
            f"  --run-config {shlex.quote(run_config)} \\",
            '  --run-config "out=\\"$OUT\\"" "$@"',
        ],
    )


@dataclass(frozen=True)
class _NewSite:
    """A site joining the federation: its public keys, and its private keys only when made here (tests)."""

    public: PublicIdentity
    supernode_key: str
    declared_size: int | None = None
    identity: Identity | None = None
    supernode_private: bytes = b""

    @classmethod
    def made_here(cls, site: str) -> _NewSite:
        identity = Identity.generate(site)
        private, public = supernode_auth_keypair()
        return cls(identity.public(), public.decode("ascii"), None, identity, private)

    @classmethod
    def enrolled(cls, enrolment: Enrolment) -> _NewSite:
        return cls(enrolment.identity, enrolment.supernode_key + "\n", enrolment.declared_size)


def _new_sites(request: ProvisionRequest) -> list[_NewSite]:
    return [*(_NewSite.made_here(site) for site in request.sites), *map(_NewSite.enrolled, request.enrolments)]


def _write_sites(
    request: ProvisionRequest,
    out: Path,
    ca_certificate: x509.Certificate,
    coordinator: Identity,
    previous: Manifest | None,
) -> tuple[dict[str, Path], Manifest]:
    joining = _new_sites(request)
    existing = list(previous.sites.values()) if previous else []
    sizes = {**(previous.declared_sizes if previous else {})}
    sizes |= {new.public.name: new.declared_size for new in joining if new.declared_size is not None}
    manifest = sign_manifest(
        request.federation,
        coordinator,
        existing + [new.public for new in joining],
        serial=previous.serial + 1 if previous else 1,
        validity_days=request.manifest_days,
        declared_sizes=sizes,
        revoked=previous.revoked if previous else None,
    )
    coordinator_dir = out / COORDINATOR_KIT
    info = KitInfo.load(coordinator_dir)
    address = Endpoint.parse(info.superlink_address)
    kits: dict[str, Path] = {}
    ordered = sorted(manifest.sites)
    for new in joining:
        site = new.public.name
        kit = out / SITES_DIR / site
        if kit.exists():
            raise ProvisionError(f"{kit} already exists; move it away before provisioning site {site!r} again")
        kit.mkdir(parents=True, mode=0o700)
        install = _install_dir(request, kit, site)
        port = request.runtime_ports.get(site, DEFAULT_RUNTIME_PORT + ordered.index(site))
        write_public_file_in(kit / "tls", CA_CERT, certificate_pem(ca_certificate))
        write_public_file_in(coordinator_dir / "supernode-keys", f"{site}.pub", new.supernode_key)
        if new.identity is not None:  # test provisioning: the site's private keys are made here
            write_private_file(kit / SUPERNODE_DIR / AUTH_KEY, new.supernode_private)
            write_public_file(kit / SUPERNODE_DIR / AUTH_PUB, new.supernode_key)
            write_identity(new.identity, kit / KEYS_DIR)
        write_manifest(manifest, kit / MANIFEST_FILE)
        (kit / "data").mkdir(mode=0o700)
        (kit / "state").mkdir(mode=0o700)
        (kit / FLOWER_HOME).mkdir(mode=0o700)
        config = SiteConfig(
            site_id=site,
            data_path=install / "data",
            state_dir=install / "state",
            keys_dir=install / KEYS_DIR,
            manifest=install / MANIFEST_FILE,
            coordinator_fingerprint=coordinator.public().fingerprint(),
            privacy_policy=install / "state" / POLICY_FILE,
        )
        policy = (
            request.policy if new.declared_size is None else replace(request.policy, declared_size=new.declared_size)
        )
        write_policy(policy, kit / "state" / POLICY_FILE)
        write_public_file(kit / SITE_CONFIG_FILE, config.to_toml())
        node_config = f"site-config={json.dumps(str(install / SITE_CONFIG_FILE))}"
        (kit / BIN_DIR).mkdir(mode=0o755)
        _write_script(
            kit / BIN_DIR / CLIENTAPP_GATE,
            [
                f"# Flower's flwr-clientapp for site {site}, run only for an app (FAB) this site approved with",
                "# `fedtransfer site approve-app`; any other app is refused before it is installed (docs/security.md).",
                f'exec fedtransfer site clientapp --site {shlex.quote(str(install / SITE_CONFIG_FILE))} -- "$@"',
            ],
        )
        _write_script(
            kit / SUPERNODE_SCRIPT,
            [
                f"# SuperNode of site {site} in fedtransfer federation {request.federation}.",
                f"# It dials the SuperLink at {address} (outbound HTTPS only); its local runtime port {port} stays on "
                "127.0.0.1.",
                f"# Its ClientApps start as {BIN_DIR}/{CLIENTAPP_GATE}: only apps this site approved run.",
                "set -eu",
                *_flower_env_lines(install / FLOWER_HOME),
                f'export PATH={shlex.quote(str(install / BIN_DIR))}:"$PATH"',
                "exec flower-supernode \\",
                f"  --superlink {shlex.quote(str(address))} \\",
                f"  --root-certificates {shlex.quote(str(install / 'tls' / CA_CERT))} \\",
                f"  --auth-supernode-private-key {shlex.quote(str(install / SUPERNODE_DIR / AUTH_KEY))} \\",
                f"  --node-config {shlex.quote(node_config)} \\",
                f"  --port {port}",
            ],
        )
        KitInfo(
            request.federation,
            "site",
            site,
            str(install),
            str(address),
            coordinator.public().fingerprint(),
            runtime_port=port,
            created=_now(),
            site_keys="site" if new.identity is None else "provisioner",
        ).write(kit)
        kits[site] = kit
    return kits, manifest


def write_public_file_in(directory: Path, name: str, text: str) -> None:
    directory.mkdir(parents=True, exist_ok=True, mode=0o755)
    write_public_file(directory / name, text)


def _now() -> str:
    return datetime.now(UTC).replace(microsecond=0).isoformat()
