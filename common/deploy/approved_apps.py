"""The app code a site runs: its own signed list of the Flower App Bundles (FABs) it approved.

A FAB is the zip that ``flwr run`` uploads and every SuperNode installs before it runs the
ClientApp in it; it is identified by the sha256 of its bytes. ``flwr build`` writes the same
bytes for the same files, so a site that builds the FAB from the checkout it reviewed gets
the hash of the app the coordinator will run. The site keeps the hashes it approved in
``STATE_DIR/approved-apps.json``::

    {"format": "fedtransfer-approved-apps", "version": 1, "site": "hospital-a",
     "apps": [{"fab_sha256": "...", "note": "fedtransfer 0.1.0, reviewed by ...", "approved_at": "..."}],
     "signature": "<Ed25519, base64>"}

The signature, by the site's own signing key, covers everything else in the file (a domain tag,
then canonical JSON); it is checked against the site's key as the coordinator-signed manifest
lists it, so neither an edited list nor a swapped public key file is accepted. The check
before every run is :mod:`common.deploy.clientapp_gate`.

Flower 1.42 has a native check, ``flower-supernode --trusted-entities``, but it accepts only
FABs that Flower Hub has verified and signed (the SuperLink fills a FAB's verifications only
for apps fetched from the Hub); an app uploaded from a local folder carries none and is always
refused, so it does not fit a federation that builds its own app.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
import re
import tomllib
import zipfile
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature

from common.data.site_config import SiteConfig
from common.errors import FedtransferError, SecurityError
from common.io import JsonError, canonical_json, parse_json, write_atomic
from common.security.keys import Identity, PublicIdentity
from common.security.manifest import read_manifest

APPROVED_APPS_FILE = "approved-apps.json"
APPROVED_APPS_FORMAT = "fedtransfer-approved-apps"
APPROVED_APPS_VERSION = 1
_SIGNATURE_DOMAIN = b"fedtransfer-approved-apps-v1\x00"
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
#: How many hex digits of a FAB's hash name it in messages (Flower names installed apps by 8).
SHORT_HASH = 16


class ApprovedAppsError(SecurityError):
    """The site's list of approved apps is missing, damaged, or not signed by the site's key."""


class AppNotApproved(SecurityError):
    """The site has not approved the app (FAB) it is asked to run; nothing was installed or read."""


def fab_sha256(fab: bytes) -> str:
    """The hash that names a FAB, as Flower computes it: sha256 of its bytes, 64 hex digits."""
    return hashlib.sha256(fab).hexdigest()


def approve_command(site_config: Path) -> str:
    """The command a site's operator runs to approve a FAB they reviewed."""
    return f"fedtransfer site approve-app FAB_FILE --site {site_config}"


@dataclass(frozen=True)
class ApprovedApp:
    """One approved FAB: its sha256, the operator's note (what it is, who reviewed it), and when."""

    fab_sha256: str
    note: str
    approved_at: str

    @classmethod
    def from_dict(cls, raw: Any) -> ApprovedApp:
        if not isinstance(raw, dict) or set(raw) != {"fab_sha256", "note", "approved_at"}:
            raise ValueError("each approved app needs exactly fab_sha256, note and approved_at")
        if not all(isinstance(value, str) for value in raw.values()):
            raise ValueError("the fields of an approved app are strings")
        if _SHA256_RE.fullmatch(raw["fab_sha256"]) is None:
            raise ValueError(f"{raw['fab_sha256']!r} is not a sha256 (64 lowercase hex digits)")
        return cls(**raw)


@dataclass(frozen=True)
class ApprovedApps:
    """The FABs site ``site`` approved, oldest first."""

    site: str
    apps: tuple[ApprovedApp, ...] = ()

    def approves(self, fab_hash: str) -> bool:
        return any(app.fab_sha256 == fab_hash for app in self.apps)

    def with_app(self, app: ApprovedApp) -> ApprovedApps:
        """This list with ``app`` added (an app approved again keeps its first approval)."""
        return self if self.approves(app.fab_sha256) else replace(self, apps=(*self.apps, app))

    def content(self) -> dict[str, Any]:
        return {
            "format": APPROVED_APPS_FORMAT,
            "version": APPROVED_APPS_VERSION,
            "site": self.site,
            "apps": [asdict(app) for app in self.apps],
        }

    def statement(self) -> bytes:
        """The bytes the site signs: a domain tag, then the canonical JSON of the content."""
        return _SIGNATURE_DOMAIN + canonical_json(self.content())

    def signed_json(self, signer: Identity) -> str:
        if signer.name != self.site:
            raise ApprovedAppsError(f"the list of site {self.site!r} cannot be signed with the key of {signer.name!r}")
        signature = base64.b64encode(signer.signing_key.sign(self.statement())).decode("ascii")
        return json.dumps({**self.content(), "signature": signature}, indent=2, sort_keys=True) + "\n"


def _parse(data: bytes, path: Path) -> tuple[ApprovedApps, bytes]:
    try:
        raw = parse_json(data)
        if not isinstance(raw, dict) or set(raw) != {"format", "version", "site", "apps", "signature"}:
            raise ValueError("expected exactly format, version, site, apps and signature")
        if raw["format"] != APPROVED_APPS_FORMAT or raw["version"] != APPROVED_APPS_VERSION:
            raise ValueError(f"not a {APPROVED_APPS_FORMAT} file of version {APPROVED_APPS_VERSION}")
        if not isinstance(raw["site"], str) or not isinstance(raw["apps"], list):
            raise ValueError("site must be a string and apps a list")
        apps = ApprovedApps(raw["site"], tuple(ApprovedApp.from_dict(app) for app in raw["apps"]))
        signature = base64.b64decode(str(raw["signature"]), validate=True)
    except (JsonError, ValueError, binascii.Error) as err:
        raise ApprovedAppsError(
            f"{path} is damaged ({err}); move it away and approve the apps again with `fedtransfer site approve-app`"
        ) from None
    return apps, signature


def read_approved_apps(path: Path, site_key: PublicIdentity) -> ApprovedApps:
    """Read ``path`` and verify its signature under ``site_key``; :class:`ApprovedAppsError` if it does not."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ApprovedAppsError(f"site {site_key.name} has approved no app yet ({path} does not exist)") from None
    except OSError as err:
        raise ApprovedAppsError(f"cannot read the site's approved apps {path}: {err.strerror or err}") from None
    apps, signature = _parse(data, path)
    if apps.site != site_key.name:
        raise ApprovedAppsError(f"{path} lists the apps of site {apps.site!r}, not of {site_key.name!r}")
    try:
        site_key.signing_public_key().verify(signature, apps.statement())
    except InvalidSignature:
        raise ApprovedAppsError(
            f"{path} is not signed by site {site_key.name}'s key {site_key.fingerprint()[:16]}... (edited, or signed "
            "by another key); move it away and approve the apps again with `fedtransfer site approve-app`"
        ) from None
    return apps


def write_approved_apps(apps: ApprovedApps, path: Path, signer: Identity) -> None:
    """Sign ``apps`` with the site's key and write them to ``path`` atomically (mode 0644: the list is public)."""
    write_atomic(Path(path), apps.signed_json(signer).encode("ascii"), mode=0o644)


def approved_apps_path(site: SiteConfig) -> Path:
    return site.state_dir / APPROVED_APPS_FILE


def site_key(site: SiteConfig) -> PublicIdentity:
    """The site's public key as the coordinator-signed manifest lists it."""
    return read_manifest(site.manifest, site.coordinator_fingerprint).site(site.site_id)


def load_site_approvals(site: SiteConfig) -> ApprovedApps:
    """The apps site ``site`` approved, verified under its key in the manifest."""
    return read_approved_apps(approved_apps_path(site), site_key(site))


def check_approved(fab: bytes, approvals: ApprovedApps | FedtransferError, site_config: Path) -> str:
    """The FAB's hash if ``approvals`` lists it, else :class:`AppNotApproved` with the command that approves it.

    ``approvals`` is the error met while loading the site's list when it cannot be used: every FAB is refused.
    """
    fab_hash = fab_sha256(fab)
    if isinstance(approvals, ApprovedApps):
        if approvals.approves(fab_hash):
            return fab_hash
        reason = f"site {approvals.site} has not approved it"
    else:
        reason = str(approvals)
    raise AppNotApproved(
        f"refusing app FAB sha256 {fab_hash[:SHORT_HASH]}... before installing it ({reason}); after reviewing that "
        f"app, build its FAB with `flwr build` and run `{approve_command(site_config)}`"
    )


def describe_fab(fab: bytes, origin: Path) -> str:
    """``name version`` of the Flower App in ``fab``; :class:`ApprovedAppsError` if it is not a FAB."""
    try:
        with zipfile.ZipFile(io.BytesIO(fab)) as archive:
            names = set(archive.namelist())
            if ".info/CONTENT" not in names or "pyproject.toml" not in names:
                raise ValueError("no .info/CONTENT or pyproject.toml")
            project = tomllib.loads(archive.read("pyproject.toml").decode("utf-8"))["project"]
        return f"{project['name']} {project['version']}"
    except (zipfile.BadZipFile, ValueError, KeyError, TypeError, UnicodeDecodeError) as err:
        raise ApprovedAppsError(
            f"{origin} is not a Flower App Bundle ({err}); build one with `flwr build` in the reviewed checkout"
        ) from None


def approve_app(site: SiteConfig, fab: bytes, note: str, signer: Identity) -> ApprovedApp:
    """Add ``fab`` to the site's approved apps (creating the list if needed), signed with ``signer``.

    An existing list must verify first: approving on top of a list someone edited would sign their edit.
    """
    path = approved_apps_path(site)
    key = site_key(site)
    if signer.public().fingerprint() != key.fingerprint():
        raise ApprovedAppsError(
            f"the keys in {site.keys_dir} are not site {site.site_id}'s keys in the manifest {site.manifest}; "
            "approve with the site's own keys"
        )
    current = read_approved_apps(path, key) if path.exists() else ApprovedApps(site.site_id)
    fab_hash = fab_sha256(fab)
    approved_at = datetime.now(UTC).replace(microsecond=0).isoformat()
    updated = current.with_app(ApprovedApp(fab_hash, note, approved_at))
    if updated is not current:
        write_approved_apps(updated, path, signer)
    return next(app for app in updated.apps if app.fab_sha256 == fab_hash)
