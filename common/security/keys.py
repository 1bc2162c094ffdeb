"""Long-term key pairs of the coordinator and the sites, and the files that hold them.

Every participant has two key pairs: an X25519 pair to receive sealed messages and
an Ed25519 pair to sign. On disk an identity ``name`` is three files:

- ``name.enc.key`` and ``name.sign.key``: the private keys, mode 0600, either
  unencrypted PKCS8 PEM or sealed under a passphrase with Scrypt
  (:mod:`common.security.key_encryption`); a PEM key encrypted by an older version
  (PBKDF2) is still read and is sealed again with Scrypt when it is read;
- ``name.pub.json``: both public keys (base64) and the identity fingerprint, mode
  0644, safe to hand to anyone.

Passphrases come from the environment (:func:`passphrase_from_env`) or from an
interactive prompt (:func:`prompt_passphrase`), never from a command-line argument,
which other local users can read from the process list.
"""

from __future__ import annotations

import base64
import binascii
import getpass
import hashlib
import json
import logging
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.asymmetric.x25519 import (
    X25519PrivateKey,
    X25519PublicKey,
)

from common.errors import SecurityError
from common.io import JsonError, parse_json, write_atomic
from common.security.key_encryption import KeyDecryptionError, is_sealed, open_private_key, seal_private_key

logger = logging.getLogger(__name__)

PASSPHRASE_ENV_VAR = "FEDTRANSFER_KEY_PASSPHRASE"
COORDINATOR_NAME = "coordinator"  # the coordinator's identity name in key files and manifests
PUBLIC_FORMAT = "fedtransfer-public-identity"
PUBLIC_FORMAT_VERSION = 1
RAW_KEY_LEN = 32

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_FINGERPRINT_DOMAIN = b"fedtransfer-identity-v1\x00"


class KeyFileError(SecurityError):
    """A key file is missing, unsafe, of the wrong type or cannot be decrypted."""


def fingerprint_bytes(data: bytes) -> str:
    """Return the SHA-256 of ``data`` as 64 lowercase hex digits."""
    return hashlib.sha256(data).hexdigest()


def validate_name(name: str) -> str:
    """Return ``name`` if it is a valid participant name, else raise ``ValueError``.

    Names become file names and protocol fields: 1-64 characters from
    ``A-Z a-z 0-9 . _ -``, not starting with ``.``, ``_`` or ``-``.
    """
    if not isinstance(name, str) or _NAME_RE.fullmatch(name) is None:
        raise ValueError(
            f"invalid participant name {name!r}: use 1-64 characters from "
            "A-Z a-z 0-9 . _ - starting with a letter or digit"
        )
    return name


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: Any, what: str) -> bytes:
    if not isinstance(text, str):
        raise ValueError(f"{what} must be a base64 string")
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError) as exc:
        raise ValueError(f"{what} is not valid base64") from exc


@dataclass(frozen=True)
class PublicIdentity:
    """The public half of an identity: what others need to seal to it and verify it."""

    name: str
    encryption_key: bytes
    signing_key: bytes

    def __post_init__(self) -> None:
        validate_name(self.name)
        for what, key in (("encryption", self.encryption_key), ("signing", self.signing_key)):
            if not isinstance(key, bytes) or len(key) != RAW_KEY_LEN:
                raise ValueError(f"identity {self.name!r}: {what} key must be {RAW_KEY_LEN} raw bytes")

    def fingerprint(self) -> str:
        """SHA-256 hex over a domain tag, the X25519 key and the Ed25519 key.

        The name is not part of it: the fingerprint identifies key material, and
        the manifest binds names to fingerprints.
        """
        return fingerprint_bytes(_FINGERPRINT_DOMAIN + self.encryption_key + self.signing_key)

    def encryption_public_key(self) -> X25519PublicKey:
        return X25519PublicKey.from_public_bytes(self.encryption_key)

    def signing_public_key(self) -> Ed25519PublicKey:
        return Ed25519PublicKey.from_public_bytes(self.signing_key)

    def to_dict(self) -> dict[str, str]:
        """JSON-ready form: name, base64 keys and fingerprint."""
        return {
            "name": self.name,
            "encryption_key": _b64(self.encryption_key),
            "signing_key": _b64(self.signing_key),
            "fingerprint": self.fingerprint(),
        }

    @classmethod
    def from_dict(cls, data: Any) -> PublicIdentity:
        """Inverse of :meth:`to_dict`; ``ValueError`` if a field is missing or the
        stated fingerprint does not match the keys."""
        if not isinstance(data, dict):
            raise ValueError("public identity must be a JSON object")
        missing = {"name", "encryption_key", "signing_key", "fingerprint"} - data.keys()
        if missing:
            raise ValueError(f"public identity lacks {sorted(missing)}")
        identity = cls(
            name=data["name"],
            encryption_key=_unb64(data["encryption_key"], "encryption_key"),
            signing_key=_unb64(data["signing_key"], "signing_key"),
        )
        if data["fingerprint"] != identity.fingerprint():
            raise ValueError(f"identity {identity.name!r}: stated fingerprint does not match its keys")
        return identity


@dataclass(frozen=True)
class Identity:
    """A participant's private keys. Never leaves the machine it was made on."""

    name: str
    encryption_key: X25519PrivateKey = field(repr=False)
    signing_key: Ed25519PrivateKey = field(repr=False)

    def __post_init__(self) -> None:
        validate_name(self.name)
        if not isinstance(self.encryption_key, X25519PrivateKey):
            raise TypeError("encryption_key must be an X25519PrivateKey")
        if not isinstance(self.signing_key, Ed25519PrivateKey):
            raise TypeError("signing_key must be an Ed25519PrivateKey")

    @classmethod
    def generate(cls, name: str) -> Identity:
        return cls(name, X25519PrivateKey.generate(), Ed25519PrivateKey.generate())

    def public(self) -> PublicIdentity:
        raw = serialization.Encoding.Raw, serialization.PublicFormat.Raw
        return PublicIdentity(
            name=self.name,
            encryption_key=self.encryption_key.public_key().public_bytes(*raw),
            signing_key=self.signing_key.public_key().public_bytes(*raw),
        )


def _check_key_folder(folder: Path) -> None:
    """Refuse a key folder that others may write to: they could swap or add key files in it."""
    try:
        mode = folder.stat().st_mode
    except FileNotFoundError:
        return  # a missing key file or folder is reported where it is read
    if mode & 0o022:
        raise KeyFileError(
            f"key folder {folder} is writable by its group or by others (mode {stat.S_IMODE(mode):04o}); "
            f"refusing to use it. Run: chmod 700 {folder}"
        )


def _key_paths(out_dir: Path, name: str) -> tuple[Path, Path, Path]:
    validate_name(name)
    return (
        out_dir / f"{name}.enc.key",
        out_dir / f"{name}.sign.key",
        out_dir / f"{name}.pub.json",
    )


def write_private_file(path: Path, data: bytes) -> None:
    """Create ``path`` with mode 0600 in one step (its folder 0700 if new); never replace an existing file."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError as exc:
        raise KeyFileError(
            f"{path} already exists; refusing to overwrite a private key. Move it "
            "away first if you really mean to replace this identity."
        ) from exc
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def write_public_file(path: Path, text: str) -> None:
    """Atomically write (or replace) a world-readable text file with mode 0644."""
    write_atomic(path, text.encode("utf-8"), mode=0o644)


def write_identity(identity: Identity, out_dir: Path, passphrase: bytes | None = None) -> None:
    """Write ``identity`` as ``{name}.enc.key``, ``{name}.sign.key`` and ``{name}.pub.json``.

    Private keys are created 0600 in a folder no one else may write to, and are never overwritten
    (:class:`KeyFileError`).
    With a ``passphrase`` they are sealed with Scrypt and AES-256-GCM; ``None`` writes them
    unencrypted, an empty passphrase is refused.
    """
    if passphrase is not None and not passphrase:
        raise ValueError("passphrase must not be empty; pass None for unencrypted keys")
    out_dir = Path(out_dir)
    out_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    _check_key_folder(out_dir)
    enc_path, sign_path, pub_path = _key_paths(out_dir, identity.name)
    for path in (enc_path, sign_path):
        if path.exists() or path.is_symlink():
            raise KeyFileError(
                f"{path} already exists; refusing to overwrite a private key. Move it "
                "away first if you really mean to replace this identity."
            )

    def pem(key: X25519PrivateKey | Ed25519PrivateKey) -> bytes:
        if passphrase is None:
            return key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        der = key.private_bytes(
            serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        return seal_private_key(der, passphrase)

    write_private_file(enc_path, pem(identity.encryption_key))
    try:
        write_private_file(sign_path, pem(identity.signing_key))
    except BaseException:
        enc_path.unlink(missing_ok=True)
        raise
    public = identity.public()
    document = {"format": PUBLIC_FORMAT, "version": PUBLIC_FORMAT_VERSION, **public.to_dict()}
    write_public_file(pub_path, json.dumps(document, indent=2, sort_keys=True) + "\n")
    logger.debug(
        "wrote identity %r to %s (fingerprint %s, %s)",
        identity.name,
        out_dir,
        public.fingerprint(),
        "sealed with Scrypt" if passphrase is not None else "unencrypted",
    )


def _read_private_key(path: Path, passphrase: bytes | None) -> object:
    try:
        st = path.stat()
    except FileNotFoundError as exc:
        raise KeyFileError(
            f"private key {path} not found; create it with `fedtransfer provision` or check the key directory"
        ) from exc
    if not stat.S_ISREG(st.st_mode):
        raise KeyFileError(f"private key {path} is not a regular file")
    if st.st_mode & 0o077:
        raise KeyFileError(
            f"private key {path} is readable by other users (mode "
            f"{stat.S_IMODE(st.st_mode):04o}); refusing to use it. Run "
            f"`chmod 600 {path}` and consider the key exposed if others could log in."
        )
    data = path.read_bytes()
    if is_sealed(data):
        if passphrase is None:
            raise KeyFileError(
                f"private key {path} is passphrase-protected; set "
                f"{PASSPHRASE_ENV_VAR} or enter the passphrase when prompted"
            )
        try:
            return serialization.load_der_private_key(open_private_key(data, passphrase, f"private key {path}"), None)
        except KeyDecryptionError as exc:
            raise KeyFileError(str(exc)) from exc
        except ValueError as exc:
            raise KeyFileError(f"private key {path} holds no PKCS8 key; restore it from backup") from exc
    try:
        key = serialization.load_pem_private_key(data, password=passphrase)
    except TypeError as exc:
        if passphrase is None:
            raise KeyFileError(
                f"private key {path} is passphrase-protected; set "
                f"{PASSPHRASE_ENV_VAR} or enter the passphrase when prompted"
            ) from exc
        raise KeyFileError(
            f"private key {path} is not encrypted but a passphrase was given; unset {PASSPHRASE_ENV_VAR} for this key"
        ) from exc
    except ValueError as exc:
        if passphrase is not None and b"ENCRYPTED PRIVATE KEY" in data:
            raise KeyFileError(f"cannot decrypt private key {path}: wrong passphrase (or a corrupted file)") from exc
        raise KeyFileError(f"private key {path} is not a PKCS8 PEM private key; restore it from backup") from exc
    if passphrase is not None:
        _reseal_with_scrypt(path, key, passphrase)
    return key


def _reseal_with_scrypt(path: Path, key: Any, passphrase: bytes) -> None:
    """Replace a PEM key encrypted with PBKDF2 (older versions) by the same key sealed with Scrypt."""
    der = key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    try:
        write_atomic(path, seal_private_key(der, passphrase), mode=0o600)
    except OSError as exc:
        logger.warning(
            "private key %s is still encrypted with PBKDF2: could not re-encrypt it with Scrypt: %s", path, exc
        )
        return
    logger.warning("private key %s was encrypted with PBKDF2 (2,048 iterations); it is now sealed with Scrypt", path)


def read_identity(out_dir: Path, name: str, passphrase: bytes | None = None) -> Identity:
    """Load the private identity ``name`` written by :func:`write_identity`."""
    enc_path, sign_path, _ = _key_paths(Path(out_dir), name)
    _check_key_folder(Path(out_dir))
    enc_key = _read_private_key(enc_path, passphrase)
    if not isinstance(enc_key, X25519PrivateKey):
        raise KeyFileError(
            f"{enc_path} holds a {type(enc_key).__name__}, not an X25519 encryption "
            "key; the key files may have been swapped or renamed"
        )
    sign_key = _read_private_key(sign_path, passphrase)
    if not isinstance(sign_key, Ed25519PrivateKey):
        raise KeyFileError(
            f"{sign_path} holds a {type(sign_key).__name__}, not an Ed25519 signing "
            "key; the key files may have been swapped or renamed"
        )
    return Identity(name, enc_key, sign_key)


def read_public_identity(path: Path) -> PublicIdentity:
    """Load a ``{name}.pub.json`` file and check its fingerprint against its keys."""
    path = Path(path)
    try:
        document = parse_json(path.read_bytes())
    except FileNotFoundError as exc:
        raise KeyFileError(f"public identity file {path} not found") from exc
    except JsonError as exc:
        raise KeyFileError(f"public identity file {path} is not valid JSON: {exc}") from exc
    if not isinstance(document, dict) or document.get("format") != PUBLIC_FORMAT:
        raise KeyFileError(f"{path} is not a fedtransfer public identity file")
    if document.get("version") != PUBLIC_FORMAT_VERSION:
        raise KeyFileError(
            f"{path} has format version {document.get('version')!r}; this fedtransfer "
            f"reads version {PUBLIC_FORMAT_VERSION}"
        )
    try:
        return PublicIdentity.from_dict(document)
    except ValueError as exc:
        raise KeyFileError(f"public identity file {path} is invalid: {exc}") from exc


def passphrase_from_env(var: str = PASSPHRASE_ENV_VAR) -> bytes | None:
    """The passphrase in environment variable ``var`` (UTF-8), or ``None`` if unset or empty."""
    value = os.environ.get(var)
    if not value:
        return None
    return value.encode("utf-8")


def prompt_passphrase(confirm: bool, prompt: str = "Key passphrase: ") -> bytes:
    """Ask for a passphrase on the terminal without echo; with ``confirm``, ask twice."""
    first = getpass.getpass(prompt)
    if not first:
        raise KeyFileError("empty passphrase; enter a passphrase to protect the private keys")
    if confirm and getpass.getpass("Repeat passphrase: ") != first:
        raise KeyFileError("the two passphrases differ; nothing was written, try again")
    return first.encode("utf-8")
