"""Application-level envelopes: sealed updates uplink, signed instructions downlink.

Two verbs each way, nothing to configure:

- uplink, a site calls :func:`seal` and the coordinator :func:`open_envelope`;
- downlink, the coordinator calls :func:`sign_instruction` and each site
  :func:`verify_instruction`.

Wire format (all integers big-endian), one self-describing blob::

    magic "FTEV" | version u8 | type u8 | header_len u16 | header (canonical JSON)
    | body_len u64 | body | Ed25519 signature (64 bytes)

The signature covers every byte before it, prefixed with a domain tag that differs
per type, so a sealed update can never pass as an instruction or the reverse.

Sealed update (type 1): the header holds the :class:`EnvelopeContext` fields, the
ephemeral X25519 public key, the AES-GCM nonce and the fingerprint of the intended
recipient. The body is AES-256-GCM ciphertext plus tag; the key comes from
HKDF-SHA256 over X25519(ephemeral, recipient), with the protocol version and both
public keys in the HKDF info. Everything before ``body_len`` is the associated
data, so the context cannot be changed without breaking decryption.

Signed instruction (type 2): the header holds the context fields and the signer's
fingerprint; the body is the plaintext payload. Instructions are not secret (they
carry the global model, which every site receives), only authenticated.

This module knows nothing about Flower; an adapter elsewhere moves the blobs.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import (
    X25519PrivateKey,
    X25519PublicKey,
)
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from common.errors import SecurityError
from common.io import JsonError, canonical_json, parse_json
from common.security.keys import Identity, PublicIdentity, validate_name

PROTOCOL_VERSION = 1
BROADCAST = "*"
DEFAULT_MAX_BYTES = 64 * 2**20

_MAGIC = b"FTEV"
_PREFIX = struct.Struct(">4sBBH")
_BODY_LEN = struct.Struct(">Q")
_SIGNATURE_LEN = 64
_TAG_LEN = 16
_NONCE_LEN = 12
_KEY_LEN = 32
_MAX_HEADER_LEN = 4096
_TYPE_SEALED = 1
_TYPE_INSTRUCTION = 2
_TYPE_NAMES = {_TYPE_SEALED: "sealed update", _TYPE_INSTRUCTION: "signed instruction"}
_SIGN_DOMAIN = {
    _TYPE_SEALED: b"fedtransfer-envelope-v1/sealed-update\x00",
    _TYPE_INSTRUCTION: b"fedtransfer-envelope-v1/instruction\x00",
}
_HKDF_INFO = b"fedtransfer-envelope/seal\x00" + bytes([PROTOCOL_VERSION])
_CONTEXT_FIELDS = ("run_id", "round", "site_id", "kind", "base_model")
_SEALED_FIELDS = frozenset(_CONTEXT_FIELDS + ("ephemeral_key", "nonce", "recipient"))
_INSTRUCTION_FIELDS = frozenset(_CONTEXT_FIELDS + ("signer",))
_KIND_RE = re.compile(r"[a-z][a-z0-9-]{0,31}")
_HEX64_RE = re.compile(r"[0-9a-f]{64}")
_RUN_ID_RE = re.compile(r"[0-9a-f]{1,64}")
_MAX_ROUND = 2**32 - 1


class EnvelopeError(SecurityError):
    """An envelope was rejected. ``site`` and ``reason`` are kept for logs and reports."""

    def __init__(self, site: str, reason: str, *, instruction: bool = False) -> None:
        self.site = site
        self.reason = reason
        subject = f"instruction for site {site!r}" if instruction else f"update from site {site!r}"
        super().__init__(f"{subject} rejected: {reason}")


class MalformedEnvelope(EnvelopeError):
    """Truncated, badly framed, bad header, or a header that is too large."""


class UnknownSigner(EnvelopeError):
    """The claimed sender is not in the manifest, or is not the site it arrived as."""


class BadSignature(EnvelopeError):
    """The signature does not verify under the expected key."""


class WrongRecipient(EnvelopeError):
    """Sealed to another coordinator key, or an instruction meant for another site."""


class DecryptionFailed(EnvelopeError):
    """The ciphertext does not decrypt under this recipient's key."""


class ReplayedEnvelope(EnvelopeError):
    """Valid, but for another run or an earlier (or, uplink, different) round."""


class WrongKind(EnvelopeError):
    """Valid, but a different message kind than expected."""


class WrongBaseModel(EnvelopeError):
    """Valid, but bound to a different base model."""


class PayloadTooLarge(EnvelopeError):
    """The envelope exceeds the size limit."""


@dataclass(frozen=True)
class EnvelopeContext:
    """What a message is about; bound into every envelope and checked on opening.

    ``run_id``: the coordinator's run, chosen by the coordinator (1-64 lowercase hex digits; a new run gets
    128 random bits), never the relay's run number. ``server_round``: 0 .. 2**32-1.
    ``site_id``: for an update, the sending site; for an instruction, the
    addressed site or ``"*"`` (:data:`BROADCAST`) for all sites. ``kind``:
    lowercase message kind such as ``"train-reply"`` (1-32 of ``a-z 0-9 -``).
    ``base_model``: SHA-256 hex fingerprint of the base model.
    """

    run_id: str
    server_round: int
    site_id: str
    kind: str
    base_model: str

    def __post_init__(self) -> None:
        if not isinstance(self.run_id, str) or _RUN_ID_RE.fullmatch(self.run_id) is None:
            raise ValueError(f"run_id must be 1-64 lowercase hex digits, got {self.run_id!r}")
        if type(self.server_round) is not int or not 0 <= self.server_round <= _MAX_ROUND:
            raise ValueError(f"server_round must be an int in 0..2**32-1, got {self.server_round!r}")
        if self.site_id != BROADCAST:
            validate_name(self.site_id)
        if not isinstance(self.kind, str) or _KIND_RE.fullmatch(self.kind) is None:
            raise ValueError(f"kind must be 1-32 characters of a-z 0-9 -, got {self.kind!r}")
        if not isinstance(self.base_model, str) or _HEX64_RE.fullmatch(self.base_model) is None:
            raise ValueError(f"base_model must be a lowercase SHA-256 hex digest, got {self.base_model!r}")

    def _header_fields(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "round": self.server_round,
            "site_id": self.site_id,
            "kind": self.kind,
            "base_model": self.base_model,
        }


@dataclass(frozen=True)
class _Parsed:
    associated: bytes
    header: dict[str, Any]
    context: EnvelopeContext
    body: bytes
    signed: bytes
    signature: bytes


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _associated(kind: int, header: Mapping[str, Any]) -> bytes:
    """Prefix and header: the AEAD associated data of a sealed update."""
    header_bytes = canonical_json(header)
    if len(header_bytes) > _MAX_HEADER_LEN:
        raise ValueError(f"envelope header of {len(header_bytes)} bytes is too large")
    return _PREFIX.pack(_MAGIC, PROTOCOL_VERSION, kind, len(header_bytes)) + header_bytes


def _signed(kind: int, associated: bytes, body: bytes, signer: Identity) -> bytes:
    unsigned = associated + _BODY_LEN.pack(len(body)) + body
    return unsigned + signer.signing_key.sign(_SIGN_DOMAIN[kind] + unsigned)


def _parse(blob: bytes, site: str, max_bytes: int, *, instruction: bool) -> _Parsed:
    def malformed(reason: str) -> MalformedEnvelope:
        return MalformedEnvelope(site, reason, instruction=instruction)

    if not isinstance(blob, (bytes, bytearray, memoryview)):
        raise malformed(f"expected bytes, got {type(blob).__name__}")
    blob = bytes(blob)
    if len(blob) > max_bytes:
        raise PayloadTooLarge(
            site,
            f"envelope is {len(blob)} bytes, above the limit of {max_bytes}; raise "
            "max_bytes only if the model is legitimately this large",
            instruction=instruction,
        )
    if len(blob) < _PREFIX.size:
        raise malformed(f"truncated: {len(blob)} bytes is shorter than the fixed prefix")
    magic, version, kind, header_len = _PREFIX.unpack_from(blob)
    if magic != _MAGIC:
        raise malformed("not a fedtransfer envelope (bad magic bytes)")
    if version != PROTOCOL_VERSION:
        raise malformed(
            f"protocol version {version} is not supported (this side speaks "
            f"{PROTOCOL_VERSION}); upgrade fedtransfer on both ends"
        )
    if kind not in _TYPE_NAMES:
        raise malformed(f"unknown envelope type {kind}")
    wanted = _TYPE_INSTRUCTION if instruction else _TYPE_SEALED
    if kind != wanted:
        raise malformed(f"got a {_TYPE_NAMES[kind]} where a {_TYPE_NAMES[wanted]} was expected")
    if header_len > _MAX_HEADER_LEN:
        raise malformed(f"header of {header_len} bytes exceeds the {_MAX_HEADER_LEN}-byte limit")
    body_start = _PREFIX.size + header_len + _BODY_LEN.size
    if len(blob) < body_start + _SIGNATURE_LEN:
        raise malformed(f"truncated: {len(blob)} bytes cannot hold the header and signature")
    header_bytes = blob[_PREFIX.size : _PREFIX.size + header_len]
    (body_len,) = _BODY_LEN.unpack_from(blob, _PREFIX.size + header_len)
    expected_total = body_start + body_len + _SIGNATURE_LEN
    if len(blob) != expected_total:
        state = "truncated" if len(blob) < expected_total else "trailing bytes"
        raise malformed(f"{state}: framing announces {expected_total} bytes, got {len(blob)}")
    header = _parse_header(header_bytes, instruction, malformed)
    try:
        context = EnvelopeContext(
            run_id=header["run_id"],
            server_round=header["round"],
            site_id=header["site_id"],
            kind=header["kind"],
            base_model=header["base_model"],
        )
    except ValueError as exc:
        raise malformed(f"bad header field: {exc}") from None
    signed_end = body_start + body_len
    return _Parsed(
        associated=blob[: _PREFIX.size + header_len],
        header=header,
        context=context,
        body=blob[body_start:signed_end],
        signed=blob[:signed_end],
        signature=blob[signed_end:],
    )


def _parse_header(
    header_bytes: bytes, instruction: bool, malformed: Callable[[str], MalformedEnvelope]
) -> dict[str, Any]:
    try:
        header = parse_json(header_bytes.decode("ascii"), max_depth=1)
    except (UnicodeDecodeError, JsonError) as exc:
        raise malformed(f"header is not valid JSON: {exc}") from None
    if not isinstance(header, dict):
        raise malformed("header is not a JSON object")
    fields = _INSTRUCTION_FIELDS if instruction else _SEALED_FIELDS
    if set(header) != fields:
        raise malformed(f"header fields {sorted(header)} differ from {sorted(fields)}")
    if canonical_json(header) != header_bytes:
        raise malformed("header is not in canonical form")
    return header


def _header_bytes_field(
    header: Mapping[str, Any], name: str, length: int, malformed: Callable[[str], MalformedEnvelope]
) -> bytes:
    value = header[name]
    try:
        raw = base64.b64decode(str(value).encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise malformed(f"header field {name!r} is not base64") from None
    if len(raw) != length:
        raise malformed(f"header field {name!r} must decode to {length} bytes")
    return raw


def _derive_key(shared: bytes, ephemeral_public: bytes, recipient_public: bytes) -> bytes:
    return HKDF(
        algorithm=hashes.SHA256(),
        length=_KEY_LEN,
        salt=None,
        info=_HKDF_INFO + ephemeral_public + recipient_public,
    ).derive(shared)


def seal(payload: bytes, context: EnvelopeContext, sender: Identity, recipient: PublicIdentity) -> bytes:
    """Encrypt ``payload`` to ``recipient`` and sign it as ``sender``.

    ``context.site_id`` must be the sender's name: a site can only seal as itself.
    Each call uses a fresh ephemeral key and nonce.
    """
    return _seal_with(X25519PrivateKey.generate(), os.urandom(_NONCE_LEN), payload, context, sender, recipient)


def _seal_with(
    ephemeral: X25519PrivateKey,
    nonce: bytes,
    payload: bytes,
    context: EnvelopeContext,
    sender: Identity,
    recipient: PublicIdentity,
) -> bytes:
    """:func:`seal` with a given ephemeral key and nonce: the seam known-answer tests use; never reuse either."""
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise TypeError(f"payload must be bytes, got {type(payload).__name__}")
    if context.site_id != sender.name:
        raise ValueError(f"site {sender.name!r} cannot seal an update labelled as site {context.site_id!r}")
    ephemeral_public = ephemeral.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    key = _derive_key(
        ephemeral.exchange(recipient.encryption_public_key()),
        ephemeral_public,
        recipient.encryption_key,
    )
    header = {
        **context._header_fields(),
        "ephemeral_key": _b64(ephemeral_public),
        "nonce": _b64(nonce),
        "recipient": recipient.fingerprint(),
    }
    associated = _associated(_TYPE_SEALED, header)
    ciphertext = AESGCM(key).encrypt(nonce, bytes(payload), associated)
    return _signed(_TYPE_SEALED, associated, ciphertext, sender)


def open_envelope(
    blob: bytes,
    expected: EnvelopeContext,
    recipient: Identity,
    manifest_sites: Mapping[str, PublicIdentity],
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> bytes:
    """Verify, decrypt and return the payload of an update from ``expected.site_id``.

    Checks, in this order, each with its own exception: size (PayloadTooLarge);
    framing and header (MalformedEnvelope); the claimed sender is in
    ``manifest_sites`` and is ``expected.site_id`` (UnknownSigner); its Ed25519
    signature (BadSignature); the recipient fingerprint is ours (WrongRecipient);
    decryption (DecryptionFailed); run id and round equal to ``expected``
    (ReplayedEnvelope); kind (WrongKind); base model (WrongBaseModel).
    """
    site = expected.site_id
    parsed = _parse(blob, site, max_bytes, instruction=False)
    claimed = parsed.context.site_id
    if claimed not in manifest_sites:
        raise UnknownSigner(
            site,
            f"it claims to come from {claimed!r}, which is not in the federation "
            "manifest; if this site joined recently, update the manifest",
        )
    if claimed != site:
        raise UnknownSigner(
            site,
            f"it is signed as site {claimed!r}: a relabelled or misrouted envelope",
        )
    try:
        manifest_sites[claimed].signing_public_key().verify(
            parsed.signature, _SIGN_DOMAIN[_TYPE_SEALED] + parsed.signed
        )
    except InvalidSignature:
        raise BadSignature(
            site,
            "the signature does not match the site's key in the manifest; the envelope "
            "was altered in transit or signed with another key",
        ) from None
    own = recipient.public().fingerprint()
    if parsed.header["recipient"] != own:
        raise WrongRecipient(
            site,
            f"it is sealed to coordinator key {parsed.header['recipient']}, not to this "
            f"coordinator ({own}); the site is using an outdated or wrong manifest",
        )

    def malformed(reason: str) -> MalformedEnvelope:
        return MalformedEnvelope(site, reason)

    ephemeral_public = _header_bytes_field(parsed.header, "ephemeral_key", _KEY_LEN, malformed)
    nonce = _header_bytes_field(parsed.header, "nonce", _NONCE_LEN, malformed)
    try:
        peer = X25519PublicKey.from_public_bytes(ephemeral_public)
        shared = recipient.encryption_key.exchange(peer)
        key = _derive_key(shared, ephemeral_public, recipient.public().encryption_key)
        payload = AESGCM(key).decrypt(nonce, parsed.body, parsed.associated)
    except (InvalidTag, ValueError):
        raise DecryptionFailed(site, "the ciphertext does not decrypt with this coordinator's key") from None
    _check_context(parsed.context, expected, site, instruction=False)
    return payload


def _check_context(got: EnvelopeContext, expected: EnvelopeContext, site: str, *, instruction: bool) -> None:
    if got.run_id != expected.run_id:
        raise ReplayedEnvelope(
            site,
            f"it belongs to run {got.run_id}, not the current run {expected.run_id}",
            instruction=instruction,
        )
    if instruction and got.server_round < expected.server_round:
        raise ReplayedEnvelope(
            site,
            f"it is for round {got.server_round}, older than round {expected.server_round} already accepted",
            instruction=True,
        )
    if not instruction and got.server_round != expected.server_round:
        raise ReplayedEnvelope(
            site,
            f"it is for round {got.server_round}, not the current round {expected.server_round}",
        )
    if got.kind != expected.kind:
        raise WrongKind(
            site,
            f"it is a {got.kind!r} message, expected {expected.kind!r}",
            instruction=instruction,
        )
    if got.base_model != expected.base_model:
        raise WrongBaseModel(
            site,
            f"it is bound to base model {got.base_model}, expected {expected.base_model}; "
            "the two sides hold different pretrained checkpoints",
            instruction=instruction,
        )


def sign_instruction(payload: bytes, context: EnvelopeContext, signer: Identity) -> bytes:
    """Sign ``payload`` (not encrypted) as the coordinator, bound to ``context``.

    ``context.site_id`` is ``"*"`` for an instruction every site may accept, or
    one site id for an instruction only that site accepts.
    """
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise TypeError(f"payload must be bytes, got {type(payload).__name__}")
    header = {**context._header_fields(), "signer": signer.public().fingerprint()}
    associated = _associated(_TYPE_INSTRUCTION, header)
    return _signed(_TYPE_INSTRUCTION, associated, bytes(payload), signer)


def verify_instruction(
    blob: bytes,
    expected: EnvelopeContext,
    coordinator: PublicIdentity,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> bytes:
    """Verify an instruction from ``coordinator`` and return its payload.

    ``expected`` is read as follows, because a site cannot predict the next round:

    - ``run_id``, ``kind`` and ``base_model`` must be equal;
    - ``server_round`` is the *minimum* acceptable round, normally the last round
      this site accepted: a round equal or greater is accepted, a smaller one is a
      ReplayedEnvelope;
    - ``site_id`` is this site's own id: an instruction addressed to ``"*"``
      (broadcast) or to this site is accepted, one addressed to another site is a
      WrongRecipient. Passing ``"*"`` accepts broadcasts only.

    Checks, in order: size (PayloadTooLarge), framing (MalformedEnvelope), signer
    fingerprint and Ed25519 signature (BadSignature), addressee (WrongRecipient),
    run and round (ReplayedEnvelope), kind (WrongKind), base model
    (WrongBaseModel).
    """
    site = expected.site_id
    parsed = _parse(blob, site, max_bytes, instruction=True)
    own = coordinator.fingerprint()
    if parsed.header["signer"] != own:
        raise BadSignature(
            site,
            f"it is signed by key {parsed.header['signer']}, not by the coordinator {coordinator.name!r} ({own})",
            instruction=True,
        )
    try:
        coordinator.signing_public_key().verify(parsed.signature, _SIGN_DOMAIN[_TYPE_INSTRUCTION] + parsed.signed)
    except InvalidSignature:
        raise BadSignature(
            site,
            f"the signature does not verify with coordinator {coordinator.name!r}'s key; "
            "it was altered or forged in transit",
            instruction=True,
        ) from None
    addressee = parsed.context.site_id
    if addressee not in (BROADCAST, site):
        raise WrongRecipient(site, f"it is addressed to site {addressee!r}", instruction=True)
    _check_context(parsed.context, expected, site, instruction=True)
    return parsed.body


def _max_context() -> EnvelopeContext:
    return EnvelopeContext("f" * 64, _MAX_ROUND, "s" * 64, "k" * 32, "0" * 64)


def envelope_overhead(payload_len: int, context: EnvelopeContext | None = None) -> int:
    """Bytes :func:`seal` adds to a payload of ``payload_len`` bytes.

    With ``context`` the figure is exact (the JSON header grows with the run id,
    round, site id and kind); without it, it is the upper bound over all valid
    contexts. The overhead does not depend on the payload length.
    """
    if payload_len < 0:
        raise ValueError("payload_len must be >= 0")
    header = {
        **(context or _max_context())._header_fields(),
        "ephemeral_key": _b64(bytes(_KEY_LEN)),
        "nonce": _b64(bytes(_NONCE_LEN)),
        "recipient": "0" * 64,
    }
    return _PREFIX.size + len(canonical_json(header)) + _BODY_LEN.size + _TAG_LEN + _SIGNATURE_LEN


def signed_context(blob: bytes, max_bytes: int = DEFAULT_MAX_BYTES) -> EnvelopeContext:
    """The context a signed statement claims, read WITHOUT checking its signature.

    Only for reporting what a statement says after :func:`verify_instruction` accepted it (for
    example its exact round), or to learn which run it claims before verifying that its signature
    covers exactly that run; never base a decision on an unverified context.
    """
    return _parse(blob, "unknown", max_bytes, instruction=True).context
