"""Check a provisioned kit before its machine joins the federation.

:func:`check_kit` looks at a site kit (or the coordinator's kit) and returns findings in
an operator's words: files present, private keys private, keys and manifest consistent,
TLS certificate dates and names, the site's data loading against the model card, the
privacy policy parsing, the ledger writable, the approved apps signed. It changes nothing on disk.
"""

from __future__ import annotations

import http.client
import os
import socket
import ssl
import stat
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import (
    load_pem_private_key,
    load_ssh_private_key,
)

from common.data.site_config import SITE_CONFIG_FILE, SiteConfig, SiteConfigError
from common.data.site_data import DataError, infer_input_shape, load_site_data
from common.deploy.approved_apps import SHORT_HASH, ApprovedAppsError, approved_apps_path, load_site_approvals
from common.deploy.provision import (
    AUTH_KEY,
    BIN_DIR,
    CA_CERT,
    CLIENTAPP_GATE,
    GATEWAY_SCRIPT,
    MANIFEST_FILE,
    SUPERLINK_CERT,
    SUPERLINK_KEY,
    SUPERNODE_SCRIPT,
    Endpoint,
    KitInfo,
    ProvisionError,
)
from common.model.checkpoint import CARD_FILE, CheckpointError, ModelCard, load_card
from common.privacy.ledger import Ledger, LedgerError
from common.privacy.policy import PolicyError, load_policy
from common.security.keys import (
    COORDINATOR_NAME,
    KeyFileError,
    passphrase_from_env,
    read_identity,
    read_public_identity,
)
from common.security.manifest import ManifestError, read_manifest

ERROR, WARNING, OK = "error", "warning", "ok"
EXPIRY_WARNING = timedelta(days=30)


@dataclass(frozen=True)
class Finding:
    """One result: ``level`` is error (must fix before joining), warning or ok."""

    level: str
    check: str
    message: str


class _Findings(list):
    def add(self, level: str, check: str, message: str) -> None:
        self.append(Finding(level, check, message))


def has_errors(findings: list[Finding]) -> bool:
    return any(f.level == ERROR for f in findings)


def check_kit(kit: Path, model_card: Path | None = None, probe: bool = False) -> list[Finding]:
    """Every finding about the kit at ``kit``; ``model_card`` is a model-card.json or checkpoint directory.

    Without ``model_card``, a site kit's data is checked against ``KIT/model-card.json`` if the
    coordinator shipped one, else only for its shape.

    With ``probe``, a site kit also opens a TLS connection to the SuperLink and checks its
    certificate against the kit's CA and the address it dials.
    """
    kit = Path(kit).resolve()
    found = _Findings()
    try:
        info = KitInfo.load(kit)
    except ProvisionError as err:
        found.add(ERROR, "kit", str(err))
        return list(found)
    if Path(info.install_dir) != kit:
        found.add(
            ERROR,
            "location",
            f"this kit was made to live at {info.install_dir} but is at {kit}; "
            "move it there (its scripts and site.toml name that path) or provision again with --install-root",
        )
    else:
        found.add(OK, "location", f"{info.role} kit of federation {info.federation!r} at its install path")
    if info.role == "site":
        _check_site(kit, info, model_card, probe, found)
    else:
        _check_coordinator(kit, info, found)
    return list(found)


def _private_file(path: Path, what: str, found: _Findings) -> bool:
    if not path.is_file():
        found.add(ERROR, "files", f"{what} is missing: {path}")
        return False
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        found.add(
            ERROR, "permissions", f"{what} {path} can be read by other users (mode {mode:04o}); run: chmod 600 {path}"
        )
        return False
    return True


def _certificate(path: Path, what: str, found: _Findings) -> x509.Certificate | None:
    if not path.is_file():
        found.add(ERROR, "files", f"{what} is missing: {path}")
        return None
    try:
        certificate = x509.load_pem_x509_certificate(path.read_bytes())
    except ValueError:
        found.add(ERROR, "tls", f"{what} {path} is not a PEM certificate; copy it again from the coordinator")
        return None
    now = datetime.now(UTC)
    if now < certificate.not_valid_before_utc:
        found.add(
            ERROR,
            "tls",
            f"{what} is not valid before {certificate.not_valid_before_utc:%Y-%m-%d %H:%M} UTC; check this machine's "
            "clock",
        )
    elif now > certificate.not_valid_after_utc:
        found.add(
            ERROR,
            "tls",
            f"{what} expired on {certificate.not_valid_after_utc:%Y-%m-%d}; ask the coordinator for new certificates",
        )
    elif certificate.not_valid_after_utc - now < EXPIRY_WARNING:
        found.add(WARNING, "tls", f"{what} expires on {certificate.not_valid_after_utc:%Y-%m-%d}; plan a renewal")
    else:
        found.add(OK, "tls", f"{what} valid until {certificate.not_valid_after_utc:%Y-%m-%d}")
    return certificate


def san_matches(certificate: x509.Certificate, endpoint: Endpoint) -> bool:
    """Whether the certificate names the host the address dials (as IP address or DNS name)."""
    try:
        names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return False
    if endpoint.ip is not None:
        return endpoint.ip in names.get_values_for_type(x509.IPAddress)
    return endpoint.host.lower() in (n.lower() for n in names.get_values_for_type(x509.DNSName))


def _check_site(kit: Path, info: KitInfo, model_card: Path | None, probe: bool, found: _Findings) -> None:
    ca = _certificate(kit / "tls" / CA_CERT, "CA certificate", found)
    auth = kit / "flower" / AUTH_KEY
    if _private_file(auth, "SuperNode authentication key", found):
        try:
            key = load_ssh_private_key(auth.read_bytes(), password=None)
        except (ValueError, TypeError):
            found.add(ERROR, "flower", f"{auth} is not an unencrypted OpenSSH private key; Flower cannot use it")
        else:
            if isinstance(key, ec.EllipticCurvePrivateKey):
                found.add(OK, "flower", "SuperNode authentication key is an EC key in OpenSSH format")
            else:
                found.add(ERROR, "flower", f"{auth} holds a {type(key).__name__}; Flower needs an EC (NIST curve) key")
    script = kit / SUPERNODE_SCRIPT
    if not script.is_file() or not os.access(script, os.X_OK):
        found.add(ERROR, "files", f"{script} is missing or not executable; run: chmod 755 {script}")
    else:
        _check_supernode_flags(script, found)
    try:
        site = SiteConfig.load(kit / SITE_CONFIG_FILE)
    except SiteConfigError as err:
        found.add(ERROR, "site config", str(err))
        return
    if site.site_id != info.name:
        found.add(
            ERROR,
            "site config",
            f"{kit / SITE_CONFIG_FILE} names site {site.site_id!r} but the kit is for {info.name!r}",
        )
    relative = [str(p) for p in (site.data_path, site.state_dir, site.keys_dir, site.manifest) if not p.is_absolute()]
    if relative:
        found.add(
            ERROR,
            "site config",
            f"paths in {SITE_CONFIG_FILE} must be absolute (the ClientApp runs elsewhere): {', '.join(relative)}",
        )
    _check_site_keys(site, info, found)
    if info.site_keys != "site":
        found.add(
            WARNING,
            "keys",
            "this kit's private keys were made by whoever provisioned it (test provisioning), who can therefore sign "
            "as this site; for a real federation make your own with `fedtransfer keys site` and enrol them",
        )
    bundled = kit / CARD_FILE
    _check_data(site, model_card or (bundled if bundled.is_file() else None), found)
    _check_policy_and_ledger(site, found)
    _check_approved_apps(kit, site, found)
    if (
        probe
        and ca is not None
        and _probe_superlink(kit / "tls" / CA_CERT, Endpoint.parse(info.superlink_address), found)
    ):
        _probe_control_plane(kit / "tls" / CA_CERT, Endpoint.parse(info.superlink_address), found)


def _check_supernode_flags(script: Path, found: _Findings) -> None:
    """The SuperNode must dial over TLS with node authentication: Flower's ``--insecure`` retries forever."""
    words = script.read_text().split()
    if "--insecure" in words:
        found.add(
            ERROR,
            "tls",
            f"{script} starts the SuperNode with --insecure, but this federation's gateway speaks only TLS; the "
            "SuperNode would retry forever without saying why. Remove --insecure: the kit dials with "
            "--root-certificates tls/ca.pem",
        )
    for flag, what in (
        ("--root-certificates", "the federation's CA certificate (TLS)"),
        ("--auth-supernode-private-key", "the SuperNode authentication key"),
    ):
        if flag not in words:
            found.add(ERROR, "tls", f"{script} does not pass {flag} ({what}); restore the script from the kit")


def _check_site_keys(site: SiteConfig, info: KitInfo, found: _Findings) -> None:
    for suffix in ("enc.key", "sign.key"):
        _private_file(site.keys_dir / f"{site.site_id}.{suffix}", "site private key", found)
    if site.coordinator_fingerprint != info.coordinator_fingerprint:
        found.add(
            ERROR,
            "manifest",
            "the coordinator fingerprint in site.toml differs from the one this kit was made with; "
            "confirm the right one with the coordinator by phone",
        )
    try:
        identity = read_identity(site.keys_dir, site.site_id, passphrase_from_env())
        manifest = read_manifest(site.manifest, site.coordinator_fingerprint)
    except (KeyFileError, ManifestError) as err:
        found.add(ERROR, "keys", str(err))
        return
    if site.site_id not in manifest.sites:
        found.add(
            ERROR,
            "manifest",
            f"site {site.site_id!r} is not in the manifest of federation {manifest.federation!r}; "
            "ask the coordinator for the current manifest",
        )
    elif manifest.sites[site.site_id].fingerprint() != identity.public().fingerprint():
        found.add(
            ERROR,
            "manifest",
            f"the manifest lists other keys for site {site.site_id!r} than the ones in {site.keys_dir}; "
            "the kit is mixed up with another one: ask the coordinator for a fresh kit",
        )
    elif manifest.federation != info.federation:
        found.add(
            ERROR,
            "manifest",
            f"the manifest is for federation {manifest.federation!r}, the kit for {info.federation!r}",
        )
    else:
        found.add(
            OK,
            "keys",
            f"site keys match the manifest of federation {manifest.federation!r}, signed by the expected coordinator",
        )
        _check_enrolled_size(site, manifest.declared_size(site.site_id), found)


def _check_enrolled_size(site: SiteConfig, enrolled: int | None, found: _Findings) -> None:
    """The policy's declared size must be the one the site enrolled with: the coordinator weights it by that."""
    if enrolled is None:
        return
    try:
        declared = load_policy(site.policy_path).declared_size
    except PolicyError:
        return  # the policy check reports it
    if declared != enrolled:
        found.add(
            ERROR,
            "privacy policy",
            f"{site.policy_path}: declared_size {declared} differs from the size {enrolled} this site enrolled with "
            "(the manifest); the coordinator would drop its updates. Enrol the new size or restore the old one",
        )


def _card(model_card: Path | None) -> ModelCard | None:
    if model_card is None:
        return None
    path = Path(model_card)
    if path.is_dir():
        return load_card(path)
    return ModelCard.from_json(path.read_text(), origin=str(path))


def _check_data(site: SiteConfig, model_card: Path | None, found: _Findings) -> None:
    try:
        card = _card(model_card)
    except (CheckpointError, OSError) as err:
        found.add(ERROR, "model card", f"cannot read the model card {model_card}: {err}")
        return
    try:
        if card is None:
            shape = infer_input_shape(site.data_path, site.label_column)
            found.add(
                WARNING,
                "data",
                f"{site.data_path}: {shape[0] if len(shape) == 1 else shape} features per row; "
                "not checked against the model (pass --model-card to check it)",
            )
            return
        data = load_site_data(
            site.data_path,
            card.input_shape,
            card.num_classes,
            label_column=site.label_column,
            name=site.site_id,
            require_two_train_classes=False,
        )
    except DataError as err:
        found.add(ERROR, "data", str(err))
        return
    found.add(
        OK,
        "data",
        f"{site.data_path}: {len(data.train)} train and {len(data.test)} test rows fit the model "
        f"({card.arch}, input {card.input_shape}, {card.num_classes} classes)",
    )


def _check_policy_and_ledger(site: SiteConfig, found: _Findings) -> None:
    try:
        policy = load_policy(site.policy_path)
    except PolicyError as err:
        found.add(ERROR, "privacy policy", str(err))
    else:
        found.add(
            OK,
            "privacy policy",
            f"cap epsilon {policy.max_epsilon:g} at delta {policy.delta:g} per dataset, at most "
            f"{policy.run_limit:g} per run ({site.policy_path})",
        )
        if policy.declared_size is None:
            found.add(
                ERROR,
                "privacy policy",
                f"{site.policy_path}: declared_size is missing; declare the public, rounded "
                "number of training records (the site cannot train without it)",
            )
    state = site.state_dir
    if not state.is_dir():
        found.add(ERROR, "ledger", f"state directory {state} does not exist; create it (mkdir -m 700 {state})")
        return
    try:
        with tempfile.TemporaryFile(dir=state):
            pass
    except OSError as err:
        found.add(
            ERROR,
            "ledger",
            f"cannot write in the state directory {state} ({err.strerror}); the privacy ledger lives there",
        )
        return
    try:
        site_key = read_identity(site.keys_dir, site.site_id, passphrase_from_env()).public()
    except KeyFileError:
        site_key = None  # the keys check reports it
    try:
        entries = Ledger(state, site_key=site_key).verify()
    except LedgerError as err:
        found.add(ERROR, "ledger", str(err))
        return
    signed = "its head signed by this site's key, " if site_key is not None and entries else ""
    found.add(OK, "ledger", f"privacy ledger in {state} is writable and intact ({signed}{entries} entries)")


def _check_approved_apps(kit: Path, site: SiteConfig, found: _Findings) -> None:
    gate = kit / BIN_DIR / CLIENTAPP_GATE
    if not gate.is_file() or not os.access(gate, os.X_OK):
        found.add(
            ERROR,
            "approved apps",
            f"{gate} is missing or not executable: without it the SuperNode runs any app it is sent; ask the "
            "coordinator for a fresh kit (kits made before app approval lack it)",
        )
    path = approved_apps_path(site)
    if not path.exists():
        found.add(
            WARNING,
            "approved apps",
            f"no app approved yet ({path}): the SuperNode refuses every run until you review the app, build its FAB "
            f"(flwr build) and run `fedtransfer site approve-app FAB_FILE --site {kit}`",
        )
        return
    try:
        approvals = load_site_approvals(site)
    except (ApprovedAppsError, ManifestError) as err:
        found.add(ERROR, "approved apps", str(err))
        return
    hashes = ", ".join(f"{app.fab_sha256[:SHORT_HASH]}..." for app in approvals.apps)
    found.add(OK, "approved apps", f"{len(approvals.apps)} app(s) approved, signed by this site's key: {hashes}")


def _probe_superlink(ca_path: Path, endpoint: Endpoint, found: _Findings, timeout: float = 5.0) -> bool:
    context = ssl.create_default_context(cafile=str(ca_path))
    try:
        with socket.create_connection((endpoint.host, endpoint.port), timeout=timeout) as raw:
            with context.wrap_socket(raw, server_hostname=endpoint.host):
                pass
    except ssl.SSLCertVerificationError as err:
        found.add(
            ERROR,
            "superlink",
            f"the SuperLink at {endpoint} presents a certificate this kit's CA does not accept: {err.verify_message}",
        )
    except OSError as err:
        found.add(
            ERROR,
            "superlink",
            f"cannot reach the SuperLink at {endpoint}: {err}; check the address, the firewall and that it runs",
        )
    else:
        found.add(OK, "superlink", f"TLS connection to {endpoint} verified with the kit's CA")
        return True
    return False


#: A harmless Control API call (list the runs) and a Runtime API path: neither may be served where the sites dial.
CONTROL_PROBES = ("/v1/control/list-runs", "/v1/runtime/acquire-task")


def control_api_status(ca_path: Path, endpoint: Endpoint, path: str, timeout: float = 5.0) -> int:
    """The HTTP status the address the sites dial gives a POST to ``path`` (an empty protobuf request)."""
    context = ssl.create_default_context(cafile=str(ca_path))
    connection = http.client.HTTPSConnection(endpoint.host, endpoint.port, timeout=timeout, context=context)
    try:
        connection.request("POST", path, body=b"", headers={"content-type": "application/protobuf"})
        return connection.getresponse().status
    finally:
        connection.close()


def _probe_control_plane(ca_path: Path, endpoint: Endpoint, found: _Findings) -> None:
    """The Fleet address must not serve Flower's Control API (no authentication in open-source Flower)."""
    for path in CONTROL_PROBES:
        try:
            status = control_api_status(ca_path, endpoint, path)
        except (OSError, http.client.HTTPException) as err:
            found.add(ERROR, "control plane", f"cannot ask {endpoint} whether it serves {path}: {err}")
            return
        if status != 404:
            found.add(
                ERROR,
                "control plane",
                f"{endpoint} answers {path} (HTTP {status}): the SuperLink's Control/Runtime API is reachable from "
                "this site, so anyone here can start runs or unregister sites. Tell the coordinator: the SuperLink "
                "must listen on loopback behind the fleet gateway (docs/deployment.md)",
            )
            return
    found.add(OK, "control plane", f"{endpoint} serves the Fleet API only: the Control and Runtime APIs are not here")


def _check_control_address(kit: Path, info: KitInfo, found: _Findings) -> None:
    """The SuperLink itself (Control API) listens on loopback; the sites dial the fleet gateway."""
    control = Endpoint.parse(info.control_address) if info.control_address else None
    if control is None or control.ip is None or not control.ip.is_loopback:
        found.add(
            ERROR,
            "control plane",
            "this kit runs the SuperLink where the sites can reach it, and with it Flower's unauthenticated Control "
            "API; provision the coordinator kit again (the SuperLink on loopback, start-gateway.sh in front of it)",
        )
    elif not (kit / GATEWAY_SCRIPT).is_file():
        found.add(ERROR, "files", f"{kit / GATEWAY_SCRIPT} is missing: the sites reach the SuperLink through it")
    else:
        found.add(
            OK,
            "control plane",
            f"the SuperLink listens on {control} only; sites dial the gateway at {info.superlink_address}",
        )


def _check_coordinator(kit: Path, info: KitInfo, found: _Findings) -> None:
    tls = kit / "tls"
    ca = _certificate(tls / CA_CERT, "CA certificate", found)
    server = _certificate(tls / SUPERLINK_CERT, "SuperLink certificate", found)
    if _private_file(tls / SUPERLINK_KEY, "SuperLink TLS key", found) and server is not None:
        key = load_pem_private_key((tls / SUPERLINK_KEY).read_bytes(), password=None)
        if key.public_key().public_numbers() != server.public_key().public_numbers():
            found.add(ERROR, "tls", f"{tls / SUPERLINK_KEY} does not belong to {tls / SUPERLINK_CERT}")
    if ca is not None and server is not None:
        try:
            server.verify_directly_issued_by(ca)
        except (ValueError, TypeError):
            found.add(ERROR, "tls", "the SuperLink certificate is not signed by the kit's CA; sites will refuse it")
        endpoint = Endpoint.parse(info.superlink_address)
        if san_matches(server, endpoint):
            found.add(OK, "tls", f"SuperLink certificate names {endpoint.host}, the address sites dial")
        else:
            found.add(
                ERROR,
                "tls",
                f"the SuperLink certificate has no SAN for {endpoint.host}; sites dialling {endpoint} will refuse it",
            )
    _check_control_address(kit, info, found)
    for suffix in ("enc.key", "sign.key"):
        _private_file(kit / "keys" / f"{COORDINATOR_NAME}.{suffix}", "coordinator private key", found)
    try:
        identity = read_identity(kit / "keys", COORDINATOR_NAME, passphrase_from_env())
        manifest = read_manifest(kit / MANIFEST_FILE, info.coordinator_fingerprint)
        read_public_identity(kit / "keys" / f"{COORDINATOR_NAME}.pub.json")
    except (KeyFileError, ManifestError) as err:
        found.add(ERROR, "keys", str(err))
        return
    if identity.public().fingerprint() != info.coordinator_fingerprint:
        found.add(ERROR, "keys", "the coordinator keys in this kit are not the ones the sites were told to trust")
    missing = [s for s in sorted(manifest.sites) if not (kit / "supernode-keys" / f"{s}.pub").is_file()]
    if missing:
        found.add(ERROR, "flower", f"no SuperNode key to register for {', '.join(missing)} in {kit / 'supernode-keys'}")
    allowed = {
        Path("keys") / f"{COORDINATOR_NAME}.enc.key",
        Path("keys") / f"{COORDINATOR_NAME}.sign.key",
        Path("tls") / SUPERLINK_KEY,
    }
    stray = sorted(str(p.relative_to(kit)) for p in kit.rglob("*.key") if p.relative_to(kit) not in allowed)
    if stray:
        found.add(
            ERROR,
            "separation",
            f"private keys that do not belong on the coordinator machine are in its kit: {', '.join(stray)}; "
            "move them off this machine",
        )
    found.add(
        OK,
        "keys",
        f"coordinator keys sign the manifest of {len(manifest.sites)} sites: {', '.join(sorted(manifest.sites))}",
    )
