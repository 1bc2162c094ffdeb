"""A site's enrolment: the public keys it made itself, signed with its own key, for the coordinator.

A hospital makes its private keys on its own machine (``fedtransfer keys site``) and sends only
``SITE.enrolment.json``: its public identity, the public half of its Flower SuperNode
authentication key, and its public declared size (its aggregation weight), signed by the
site's Ed25519 key. The signature proves the sender holds that key and binds the SuperNode key
and the size to it; the coordinator still confirms the site's fingerprint out of band (by phone)
before it provisions the site, exactly as each site confirms the coordinator's.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_public_key

from common.errors import SecurityError
from common.io import JsonError, canonical_json, parse_json
from common.security.keys import Identity, PublicIdentity, write_public_file
from common.security.manifest import SIZE_RANGE

ENROLMENT_FORMAT = "fedtransfer-enrolment"
ENROLMENT_VERSION = 1
_SIGNATURE_DOMAIN = b"fedtransfer-enrolment-v1\x00"
_FIELDS = {"format", "version", "identity", "supernode-key", "declared-size", "created", "signature"}


class EnrolmentError(SecurityError):
    """An enrolment file is malformed, or its signature does not verify."""


def enrolment_file(site_id: str) -> str:
    return f"{site_id}.enrolment.json"


@dataclass(frozen=True)
class Enrolment:
    """What a site sends the coordinator to join: public keys only, signed by the site."""

    identity: PublicIdentity
    supernode_key: str  # OpenSSH public key line of the SuperNode's authentication key (EC)
    declared_size: int | None
    created: str
    signature: bytes

    @property
    def site_id(self) -> str:
        return self.identity.name

    def content(self) -> dict[str, Any]:
        return {
            "format": ENROLMENT_FORMAT,
            "version": ENROLMENT_VERSION,
            "identity": self.identity.to_dict(),
            "supernode-key": self.supernode_key,
            "declared-size": self.declared_size,
            "created": self.created,
        }

    def to_json(self) -> str:
        return json.dumps({**self.content(), "signature": base64.b64encode(self.signature).decode()}, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes, origin: str = "enrolment") -> Enrolment:
        """Parse and verify an enrolment; :class:`EnrolmentError` names what is wrong."""
        try:
            data = parse_json(text)
        except JsonError as err:
            raise EnrolmentError(f"{origin} is not valid JSON: {err}") from None
        if not isinstance(data, dict) or data.get("format") != ENROLMENT_FORMAT or set(data) != _FIELDS:
            raise EnrolmentError(f"{origin} is not a fedtransfer enrolment file (made by `fedtransfer keys site`)")
        if data["version"] != ENROLMENT_VERSION:
            raise EnrolmentError(
                f"{origin} has version {data['version']!r}; this fedtransfer reads {ENROLMENT_VERSION}"
            )
        try:
            identity = PublicIdentity.from_dict(data["identity"])
            signature = base64.b64decode(str(data["signature"]), validate=True)
            datetime.fromisoformat(data["created"])
        except (ValueError, TypeError) as err:
            raise EnrolmentError(f"{origin} is invalid: {err}") from None
        enrolment = cls(identity, data["supernode-key"], data["declared-size"], data["created"], signature)
        enrolment._check(origin)
        try:
            identity.signing_public_key().verify(signature, _SIGNATURE_DOMAIN + canonical_json(enrolment.content()))
        except InvalidSignature:
            raise EnrolmentError(
                f"{origin}: the signature does not verify with the site's own key; the file was altered, ask "
                f"{identity.name} to send it again"
            ) from None
        return enrolment

    def _check(self, origin: str) -> None:
        size = self.declared_size
        low, high = SIZE_RANGE
        if size is not None and (type(size) is not int or not low <= size <= high):
            raise EnrolmentError(f"{origin}: declared size must be an integer in [{low}, {high}], got {size!r}")
        try:
            key = load_ssh_public_key(str(self.supernode_key).encode("ascii"))
        except (ValueError, UnicodeEncodeError, TypeError):
            raise EnrolmentError(f"{origin}: the SuperNode key is not an OpenSSH public key") from None
        if not isinstance(key, ec.EllipticCurvePublicKey):
            raise EnrolmentError(f"{origin}: the SuperNode key must be an EC key (Flower's SuperNode authentication)")


def make_enrolment(identity: Identity, supernode_key: str, declared_size: int | None) -> Enrolment:
    """Sign an enrolment for ``identity`` now."""
    created = datetime.now(UTC).replace(microsecond=0).isoformat()
    unsigned = Enrolment(identity.public(), supernode_key.strip(), declared_size, created, b"")
    unsigned._check("the enrolment")
    signature = identity.signing_key.sign(_SIGNATURE_DOMAIN + canonical_json(unsigned.content()))
    return Enrolment(unsigned.identity, unsigned.supernode_key, declared_size, created, signature)


def write_enrolment(enrolment: Enrolment, path: Path) -> None:
    write_public_file(Path(path), enrolment.to_json())


def read_enrolment(path: Path) -> Enrolment:
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise EnrolmentError(f"cannot read the enrolment {path}: {err.strerror or err}") from None
    return Enrolment.from_json(data, origin=str(path))
