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
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature

from common.errors import SecurityError
from common.io import JsonError, canonical_json, parse_json
from common.security.keys import Identity, PublicIdentity, write_public_file

logger = logging.getLogger(__name__)

MANIFEST_FORMAT = "fedtransfer-manifest"
MANIFEST_VERSION = 1
MANIFEST_FILE = "manifest.json"  # the file name a site or coordinator keeps its manifest under
_SIGNATURE_DOMAIN = b"fedtransfer-manifest-v1\x00"


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


def _signed_content(
    federation: str, coordinator: PublicIdentity, sites: dict[str, PublicIdentity], created: str
) -> dict[str, Any]:
    return {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "federation": federation,
        "created": created,
        "coordinator": coordinator.to_dict(),
        "sites": {site_id: sites[site_id].to_dict() for site_id in sorted(sites)},
    }


def _check_distinct_keys(coordinator: PublicIdentity, sites: list[PublicIdentity]) -> None:
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


@dataclass(frozen=True)
class Manifest:
    """A signed list of the federation's sites and their public identities."""

    federation: str
    coordinator: PublicIdentity
    sites: dict[str, PublicIdentity]
    created: str
    signature: bytes

    def site(self, site_id: str) -> PublicIdentity:
        try:
            return self.sites[site_id]
        except KeyError:
            raise UnknownSite(
                f"site {site_id!r} is not in the manifest of federation "
                f"{self.federation!r} (known: {', '.join(sorted(self.sites)) or 'none'}); "
                "ask the coordinator to add it and send you the new manifest"
            ) from None

    def _content_bytes(self) -> bytes:
        return _SIGNATURE_DOMAIN + canonical_json(
            _signed_content(self.federation, self.coordinator, self.sites, self.created)
        )

    def to_json(self) -> str:
        content = _signed_content(self.federation, self.coordinator, self.sites, self.created)
        content["signature"] = base64.b64encode(self.signature).decode("ascii")
        return json.dumps(content, indent=2, sort_keys=True) + "\n"

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
            f"fedtransfer reads version {MANIFEST_VERSION}"
        )
    expected_keys = {"format", "version", "federation", "created", "coordinator", "sites", "signature"}
    if set(data) != expected_keys:
        raise ManifestFormatError(f"manifest fields {sorted(data)} differ from the expected {sorted(expected_keys)}")
    federation, created, raw_sites = data["federation"], data["created"], data["sites"]
    if not isinstance(federation, str) or not federation:
        raise ManifestFormatError("manifest field 'federation' must be a non-empty string")
    _check_created(created)
    if not isinstance(raw_sites, dict):
        raise ManifestFormatError("manifest field 'sites' must be an object")
    try:
        coordinator = PublicIdentity.from_dict(data["coordinator"])
        sites = {site_id: PublicIdentity.from_dict(entry) for site_id, entry in raw_sites.items()}
        signature = base64.b64decode(str(data["signature"]).encode("ascii"), validate=True)
    except (ValueError, binascii.Error) as exc:
        raise ManifestFormatError(f"manifest entry is invalid: {exc}") from exc
    for site_id, identity in sites.items():
        if identity.name != site_id:
            raise ManifestFormatError(f"manifest lists identity {identity.name!r} under site id {site_id!r}")
    _check_distinct_keys(coordinator, list(sites.values()))
    return Manifest(federation, coordinator, sites, created, signature)


def _check_created(created: Any) -> None:
    try:
        moment = datetime.fromisoformat(created)
    except (TypeError, ValueError) as exc:
        raise ManifestFormatError(f"manifest field 'created' is not an ISO 8601 time: {created!r}") from exc
    if moment.utcoffset() is None or moment.utcoffset().total_seconds() != 0:
        raise ManifestFormatError(f"manifest field 'created' must be in UTC: {created!r}")


def sign_manifest(federation: str, coordinator: Identity, sites: list[PublicIdentity]) -> Manifest:
    """Create a manifest listing ``sites``, signed by ``coordinator`` now."""
    return _sign_manifest_at(federation, coordinator, sites, datetime.now(UTC).replace(microsecond=0).isoformat())


def _sign_manifest_at(federation: str, coordinator: Identity, sites: list[PublicIdentity], created: str) -> Manifest:
    """:func:`sign_manifest` at a given time: the seam known-answer tests use."""
    if not isinstance(federation, str) or not federation:
        raise ManifestFormatError("federation name must be a non-empty string")
    public = coordinator.public()
    _check_distinct_keys(public, list(sites))
    site_map = {site.name: site for site in sites}
    unsigned = Manifest(federation, public, site_map, created, b"")
    signature = coordinator.signing_key.sign(unsigned._content_bytes())
    return Manifest(federation, public, site_map, created, signature)


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
