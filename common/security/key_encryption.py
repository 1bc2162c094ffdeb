"""Private keys at rest under a passphrase: Scrypt to derive the key, AES-256-GCM to seal the PKCS8 bytes.

``cryptography``'s ``BestAvailableEncryption`` protects PKCS8 PEM files with PBKDF2-SHA256 at 2,048
iterations, cheap for a guessing attack. Our files use Scrypt (n = 2**17, r = 8, p = 1: 128 MiB and
about a third of a second per guess on a laptop core) and are a small JSON document:

    {"format": "fedtransfer-private-key", "version": 1,
     "kdf": {"name": "scrypt", "n": ..., "r": ..., "p": ..., "salt": b64},
     "cipher": "aes-256-gcm", "nonce": b64, "ciphertext": b64}

The ciphertext's associated data is the document without ``ciphertext``, so the parameters cannot
be changed without the passphrase noticing. Two verbs: :func:`seal_private_key` and
:func:`open_private_key`.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from common.errors import SecurityError
from common.io import JsonError, parse_json

FORMAT = "fedtransfer-private-key"
VERSION = 1
SCRYPT_N = 2**17
SCRYPT_R = 8
SCRYPT_P = 1
#: Largest parameters a file may ask for (256 MiB, a few seconds): reading a key must stay bounded.
MAX_N, MAX_R, MAX_P = 2**18, 8, 4
_SALT_LEN = 16
_NONCE_LEN = 12


class KeyDecryptionError(SecurityError):
    """A sealed private key is malformed, or the passphrase does not open it."""


def is_sealed(data: bytes) -> bool:
    """Whether ``data`` is a key file in this module's format (rather than a PEM file)."""
    return data.lstrip().startswith(b"{")


def seal_private_key(pkcs8_der: bytes, passphrase: bytes) -> bytes:
    """The key file for the unencrypted PKCS8 DER ``pkcs8_der`` under ``passphrase``."""
    if not passphrase:
        raise ValueError("passphrase must not be empty")
    kdf = {"name": "scrypt", "n": SCRYPT_N, "r": SCRYPT_R, "p": SCRYPT_P, "salt": _b64(os.urandom(_SALT_LEN))}
    header = {"format": FORMAT, "version": VERSION, "kdf": kdf, "cipher": "aes-256-gcm"}
    nonce = os.urandom(_NONCE_LEN)
    header["nonce"] = _b64(nonce)
    ciphertext = AESGCM(_derive(passphrase, kdf)).encrypt(nonce, pkcs8_der, _aad(header))
    return (json.dumps({**header, "ciphertext": _b64(ciphertext)}, indent=2, sort_keys=True) + "\n").encode()


def open_private_key(data: bytes, passphrase: bytes, origin: str) -> bytes:
    """The unencrypted PKCS8 DER inside the key file ``data``; :class:`KeyDecryptionError` otherwise."""
    try:
        document = parse_json(data)
    except JsonError as err:
        raise KeyDecryptionError(f"{origin} is not a readable key file: {err}") from err
    if not isinstance(document, dict) or document.get("format") != FORMAT or document.get("version") != VERSION:
        raise KeyDecryptionError(f"{origin} is not a {FORMAT} file of version {VERSION}; restore it from backup")
    if document.get("cipher") != "aes-256-gcm" or set(document) != {
        "format",
        "version",
        "kdf",
        "cipher",
        "nonce",
        "ciphertext",
    }:
        raise KeyDecryptionError(f"{origin} has unexpected fields or cipher; restore it from backup")
    kdf = _checked_kdf(document["kdf"], origin)
    header = {k: v for k, v in document.items() if k != "ciphertext"}
    nonce = _unb64(document["nonce"], origin)
    try:
        return AESGCM(_derive(passphrase, kdf)).decrypt(nonce, _unb64(document["ciphertext"], origin), _aad(header))
    except (InvalidTag, ValueError) as err:
        raise KeyDecryptionError(f"cannot decrypt {origin}: wrong passphrase (or a corrupted file)") from err


def _checked_kdf(kdf: Any, origin: str) -> dict[str, Any]:
    if not isinstance(kdf, dict) or kdf.get("name") != "scrypt" or set(kdf) != {"name", "n", "r", "p", "salt"}:
        raise KeyDecryptionError(f"{origin} names an unknown key derivation; restore it from backup")
    for name, largest in (("n", MAX_N), ("r", MAX_R), ("p", MAX_P)):
        value = kdf[name]
        if type(value) is not int or not 1 <= value <= largest:
            raise KeyDecryptionError(f"{origin} asks for Scrypt {name}={value!r}, outside 1..{largest}")
    if kdf["n"] & (kdf["n"] - 1) or kdf["n"] < 2:
        raise KeyDecryptionError(f"{origin} asks for Scrypt n={kdf['n']}, which is not a power of two")
    return kdf


def _derive(passphrase: bytes, kdf: dict[str, Any]) -> bytes:
    salt = _unb64(kdf["salt"], "the key file's salt")
    return Scrypt(salt=salt, length=32, n=kdf["n"], r=kdf["r"], p=kdf["p"]).derive(passphrase)


def _aad(header: dict[str, Any]) -> bytes:
    return json.dumps(header, sort_keys=True, separators=(",", ":")).encode()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: Any, origin: str) -> bytes:
    if not isinstance(text, str):
        raise KeyDecryptionError(f"{origin} holds a non-text value where base64 is expected")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as err:
        raise KeyDecryptionError(f"{origin} holds invalid base64: {err}") from err
