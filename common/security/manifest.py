"""The federation manifest: which sites exist and which keys speak for them.

The coordinator signs the manifest with its Ed25519 key. A site that holds the
coordinator's fingerprint, received out of band (phone, letter, a signed email),
loads the manifest with that fingerprint and thereby trusts exactly the site keys
the coordinator vouched for. The coordinator uses it to know which signing key
belongs to which site id.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import re
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature

from common.errors import SecurityError
from common.io import JsonError, canonical_json, parse_json
from common.security.keys import Identity, PublicIdentity, write_public_file

logger = logging.getLogger(__name__)

MANIFEST_FORMAT = "fedtransfer-manifest"
MANIFEST_VERSION = 2
MANIFEST_FILE = "manifest.json"  # the file name a site or coordinator keeps its manifest under
DEFAULT_VALIDITY_DAYS = 365
SIZE_RANGE = (1, 1_000_000_000)  # a declared size (aggregation weight): an integer in this range, inclusive
_SIGNATURE_DOMAIN = b"fedtransfer-manifest-v2\x00"
_ENDORSEMENT_DOMAIN = b"fedtransfer-manifest-v2/rotation\x00"
_FINGERPRINT_RE = re.compile(r"[0-9a-f]{64}")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


class ManifestError(SecurityError):
    """The manifest cannot be trusted or used."""


class ManifestSignatureInvalid(ManifestError):
    """The coordinator's signature does not cover this manifest's content."""


class ManifestFingerprintMismatch(ManifestError):
    """The manifest is signed by a coordinator other than the expected one."""


class UnknownSite(ManifestError):
    """A site id is not listed in the manifest."""


class ManifestFormatError(ManifestError):
    """The manifest is not well-formed."""


class ManifestExpired(ManifestError):
    """The manifest's validity ended; the coordinator must sign a fresh one."""


def _utc(value: Any, what: str) -> datetime:
    try:
        moment = datetime.fromisoformat(value)
    except (TypeError, ValueError) as exc:
        raise ManifestFormatError(f"manifest field {what!r} is not an ISO 8601 time: {value!r}") from exc
    if moment.utcoffset() is None or moment.utcoffset().total_seconds() != 0:
        raise ManifestFormatError(f"manifest field {what!r} must be in UTC: {value!r}")
    return moment


def check_text(value: Any, what: str) -> str:
    """A non-empty name or label with no control characters (no fake log lines or terminal escapes)."""
    if not isinstance(value, str) or not value or _CONTROL_RE.search(value) or len(value) > 200:
        raise ManifestFormatError(f"{what} must be 1-200 printable characters, got {value!r}")
    return value


@dataclass(frozen=True)
class Manifest:
    """A signed list of the federation's sites, their public identities and public declarations.

    ``serial`` grows with every manifest the coordinator signs (a site refuses an older one than it
    has seen); ``expires`` ends its validity; ``declared_sizes`` are the sites' public, rounded sizes
    (their aggregation weights); ``revoked`` maps every key fingerprint the federation no longer
    accepts to the time it was revoked. A manifest that changes the coordinator's key carries the
    previous coordinator's identity and its ``endorsement``: its signature over the same content.
    """

    federation: str
    coordinator: PublicIdentity
    sites: dict[str, PublicIdentity]
    created: str
    signature: bytes
    serial: int = 1
    expires: str = ""
    declared_sizes: dict[str, int] = field(default_factory=dict)
    revoked: dict[str, str] = field(default_factory=dict)
    previous_coordinator: PublicIdentity | None = None
    endorsement: bytes = b""

    def site(self, site_id: str) -> PublicIdentity:
        try:
            return self.sites[site_id]
        except KeyError:
            raise UnknownSite(
                f"site {site_id!r} is not in the manifest of federation "
                f"{self.federation!r} (known: {', '.join(sorted(self.sites)) or 'none'}); "
                "ask the coordinator to add it and send you the new manifest"
            ) from None

    def declared_size(self, site_id: str) -> int | None:
        """The size ``site_id`` declared when it enrolled (its aggregation weight), if the manifest lists one."""
        return self.declared_sizes.get(site_id)

    def expired(self, now: datetime | None = None) -> bool:
        return bool(self.expires) and (now or datetime.now(UTC)) >= datetime.fromisoformat(self.expires)

    def check_current(self, now: datetime | None = None) -> None:
        """ManifestExpired if the manifest's validity has ended."""
        if self.expired(now):
            raise ManifestExpired(
                f"the manifest of federation {self.federation!r} (serial {self.serial}) expired on {self.expires}; "
                "ask the coordinator for a freshly signed one"
            )

    def content(self) -> dict[str, Any]:
        """Everything the coordinator signs (all but the signatures)."""
        return {
            "format": MANIFEST_FORMAT,
            "version": MANIFEST_VERSION,
            "federation": self.federation,
            "created": self.created,
            "serial": self.serial,
            "expires": self.expires,
            "coordinator": self.coordinator.to_dict(),
            "sites": {site_id: self.sites[site_id].to_dict() for site_id in sorted(self.sites)},
            "declared-sizes": dict(sorted(self.declared_sizes.items())),
            "revoked": dict(sorted(self.revoked.items())),
            "previous-coordinator": self.previous_coordinator.to_dict() if self.previous_coordinator else None,
        }

    def _content_bytes(self, domain: bytes = _SIGNATURE_DOMAIN) -> bytes:
        return domain + canonical_json(self.content())

    def to_json(self) -> str:
        document = self.content()
        document["signature"] = base64.b64encode(self.signature).decode("ascii")
        document["endorsement"] = base64.b64encode(self.endorsement).decode("ascii")
        return json.dumps(document, indent=2, sort_keys=True) + "\n"

    def endorsed_by(self, previous: PublicIdentity) -> bool:
        """Whether ``previous`` (the coordinator key trusted so far) signed this manifest's change of key."""
        if self.previous_coordinator != previous or not self.endorsement:
            return False
        try:
            previous.signing_public_key().verify(self.endorsement, self._content_bytes(_ENDORSEMENT_DOMAIN))
        except InvalidSignature:
            return False
        return True

    @classmethod
    def from_json(cls, text: str, expected_coordinator_fingerprint: str | None) -> Manifest:
        """Parse and verify a manifest.

        The signature is checked against the coordinator key embedded in the
        manifest; that only proves integrity. Authenticity comes from
        ``expected_coordinator_fingerprint``, which the reader must have received
        out of band. ``None`` skips that check (trust on first use) and logs a warning.
        """
        manifest = _parse(text)
        try:
            manifest.coordinator.signing_public_key().verify(manifest.signature, manifest._content_bytes())
        except InvalidSignature:
            raise ManifestSignatureInvalid(
                f"manifest of federation {manifest.federation!r} has an invalid "
                "signature: it was altered after the coordinator signed it. Obtain a "
                "fresh copy from the coordinator."
            ) from None
        if manifest.previous_coordinator is not None and not manifest.endorsed_by(manifest.previous_coordinator):
            raise ManifestSignatureInvalid(
                f"manifest of federation {manifest.federation!r} names a previous coordinator key whose "
                "endorsement does not verify; obtain a fresh copy from the coordinator"
            )
        actual = manifest.coordinator.fingerprint()
        if expected_coordinator_fingerprint is None:
            logger.warning(
                "manifest of federation %r accepted without checking the coordinator "
                "fingerprint (%s); compare it with the one the coordinator gave you",
                manifest.federation,
                actual,
            )
        elif expected_coordinator_fingerprint.strip().lower() != actual:
            raise ManifestFingerprintMismatch(
                f"manifest of federation {manifest.federation!r} is signed by coordinator "
                f"key {actual}, but you expect {expected_coordinator_fingerprint}. Do not "
                "use it; confirm the fingerprint with the coordinator by phone or in person."
            )
        return manifest


_FIELDS = {
    "format",
    "version",
    "federation",
    "created",
    "serial",
    "expires",
    "coordinator",
    "sites",
    "declared-sizes",
    "revoked",
    "previous-coordinator",
    "signature",
    "endorsement",
}


def _parse(text: str) -> Manifest:
    try:
        data = parse_json(text)
    except JsonError as exc:
        raise ManifestFormatError(f"manifest is not valid JSON: {exc}") from exc
    if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
        raise ManifestFormatError("this is not a fedtransfer manifest")
    if data.get("version") != MANIFEST_VERSION:
        raise ManifestFormatError(
            f"manifest version {data.get('version')!r} is not supported; this "
            f"fedtransfer reads version {MANIFEST_VERSION}: ask the coordinator to sign it again"
        )
    if set(data) != _FIELDS:
        raise ManifestFormatError(f"manifest fields {sorted(data)} differ from the expected {sorted(_FIELDS)}")
    federation, raw_sites = check_text(data["federation"], "manifest field 'federation'"), data["sites"]
    _utc(data["created"], "created")
    if data["expires"] != "":
        _utc(data["expires"], "expires")
    serial = data["serial"]
    if type(serial) is not int or not 1 <= serial < 2**63:
        raise ManifestFormatError(f"manifest field 'serial' must be a positive integer, got {serial!r}")
    if not isinstance(raw_sites, dict):
        raise ManifestFormatError("manifest field 'sites' must be an object")
    try:
        coordinator = PublicIdentity.from_dict(data["coordinator"])
        sites = {site_id: PublicIdentity.from_dict(entry) for site_id, entry in raw_sites.items()}
        previous = data["previous-coordinator"]
        previous = None if previous is None else PublicIdentity.from_dict(previous)
        signature = _unb64(data["signature"], "signature")
        endorsement = _unb64(data["endorsement"], "endorsement")
    except ValueError as exc:
        raise ManifestFormatError(f"manifest entry is invalid: {exc}") from exc
    for site_id, identity in sites.items():
        if identity.name != site_id:
            raise ManifestFormatError(f"manifest lists identity {identity.name!r} under site id {site_id!r}")
    sizes = _declared_sizes(data["declared-sizes"], sites)
    revoked = _revoked(data["revoked"])
    _check_distinct_keys(coordinator, list(sites.values()), revoked)
    return Manifest(
        federation,
        coordinator,
        sites,
        data["created"],
        signature,
        serial,
        data["expires"],
        sizes,
        revoked,
        previous,
        endorsement,
    )


def _unb64(value: Any, what: str) -> bytes:
    try:
        return base64.b64decode(str(value).encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError) as exc:
        raise ValueError(f"{what} is not base64") from exc


def _declared_sizes(raw: Any, sites: dict[str, PublicIdentity]) -> dict[str, int]:
    if not isinstance(raw, dict) or not set(raw) <= set(sites):
        raise ManifestFormatError("manifest field 'declared-sizes' must map listed site ids to sizes")
    low, high = SIZE_RANGE
    for site_id, size in raw.items():
        if type(size) is not int or not low <= size <= high:
            raise ManifestFormatError(f"declared size of {site_id!r} must be an integer in [{low}, {high}]: {size!r}")
    return dict(raw)


def _revoked(raw: Any) -> dict[str, str]:
    if not isinstance(raw, dict) or not all(
        isinstance(k, str) and _FINGERPRINT_RE.fullmatch(k) and isinstance(v, str) for k, v in raw.items()
    ):
        raise ManifestFormatError("manifest field 'revoked' must map key fingerprints to times")
    for when in raw.values():
        _utc(when, "revoked")
    return dict(raw)


def _check_distinct_keys(
    coordinator: PublicIdentity, sites: list[PublicIdentity], revoked: dict[str, str] | None = None
) -> None:
    seen: dict[str, str] = {coordinator.fingerprint(): f"coordinator {coordinator.name!r}"}
    names: set[str] = set()
    for site in sites:
        if site.name in names:
            raise ManifestFormatError(f"site id {site.name!r} is listed twice")
        names.add(site.name)
        owner = seen.setdefault(site.fingerprint(), f"site {site.name!r}")
        if owner != f"site {site.name!r}":
            raise ManifestFormatError(
                f"site {site.name!r} uses the same keys as {owner}; every participant needs its own key pair"
            )
    listed_revoked = sorted(seen[fp] for fp in (revoked or {}) if fp in seen)
    if listed_revoked:
        raise ManifestFormatError(f"{', '.join(listed_revoked)} use a key the manifest itself lists as revoked")


def sign_manifest(
    federation: str,
    coordinator: Identity,
    sites: list[PublicIdentity],
    *,
    serial: int = 1,
    validity_days: int = DEFAULT_VALIDITY_DAYS,
    declared_sizes: dict[str, int] | None = None,
    revoked: dict[str, str] | None = None,
    previous: Identity | None = None,
) -> Manifest:
    """A manifest listing ``sites``, signed by ``coordinator`` now, valid for ``validity_days`` (0: no expiry).

    ``previous`` is the coordinator identity the sites trust so far, when this manifest rotates the
    coordinator's key: it endorses the new manifest, and sites accept the new key only that way.
    """
    now = datetime.now(UTC).replace(microsecond=0)
    expires = (now + timedelta(days=validity_days)).isoformat() if validity_days else ""
    return _sign_manifest_at(
        federation, coordinator, sites, now.isoformat(), serial, expires, declared_sizes, revoked, previous
    )


def _sign_manifest_at(
    federation: str,
    coordinator: Identity,
    sites: list[PublicIdentity],
    created: str,
    serial: int = 1,
    expires: str = "",
    declared_sizes: dict[str, int] | None = None,
    revoked: dict[str, str] | None = None,
    previous: Identity | None = None,
) -> Manifest:
    """:func:`sign_manifest` at a given time: the seam known-answer tests use."""
    check_text(federation, "federation name")
    public = coordinator.public()
    _check_distinct_keys(public, list(sites), revoked)
    site_map = {site.name: site for site in sites}
    unsigned = Manifest(
        federation,
        public,
        site_map,
        created,
        b"",
        serial,
        expires,
        _declared_sizes(dict(declared_sizes or {}), site_map),
        _revoked(dict(revoked or {})),
        previous.public() if previous else None,
    )
    endorsement = previous.signing_key.sign(unsigned._content_bytes(_ENDORSEMENT_DOMAIN)) if previous else b""
    return replace(unsigned, signature=coordinator.signing_key.sign(unsigned._content_bytes()), endorsement=endorsement)


def write_manifest(m: Manifest, path: Path) -> None:
    """Write the manifest as JSON (mode 0644; it holds only public keys)."""
    write_public_file(Path(path), m.to_json())
    logger.debug("wrote manifest of federation %r with %d sites to %s", m.federation, len(m.sites), path)


def read_manifest(path: Path, expected_coordinator_fingerprint: str | None) -> Manifest:
    """Read and verify a manifest file; see :meth:`Manifest.from_json`."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise ManifestError(f"manifest {path} not found; ask the coordinator for the federation manifest") from exc
    except UnicodeDecodeError as exc:
        raise ManifestFormatError(f"manifest {path} is not UTF-8 text") from exc
    return Manifest.from_json(text, expected_coordinator_fingerprint)
