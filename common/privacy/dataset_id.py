"""The identity of a site's dataset, as the ledger and the coordinator see it.

The sha256 of a site's data files tells "same data" from "new data", but it must never
leave the site: whoever knows every record but one could try each candidate for the last
one and find the one that reproduces the hash. What the ledger records and every report
carries is instead ``HMAC-SHA256(site key, content hash)``, under a 32-byte key created
at random in the site's state directory the first time it is used
(``dataset-id.key``, mode 0600, never sent). The same files keep the same identity at
this site, the coordinator cannot test a guess about their content, and two sites
holding identical files get unrelated identities.

Entries written before the key existed hold the content hash itself; the site's budget
counts them under the keyed identity too (see :func:`identities`).
"""

from __future__ import annotations

import hashlib
import hmac
import os
from pathlib import Path

from common.errors import PrivacyError
from common.io import fsync_dir
from common.privacy.ledger import STATE_IN_USE_FILE

KEY_BYTES = 32
_DOMAIN = b"fedtransfer-dataset-id-v1\x00"


class DatasetKeyError(PrivacyError):
    """The site's dataset-identity key cannot be read or created."""


def dataset_key(state_dir: Path) -> bytes:
    """The site's dataset-identity key, created (0600, exclusively, durably) on first use."""
    path = Path(state_dir) / STATE_IN_USE_FILE
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    else:
        try:
            os.write(fd, os.urandom(KEY_BYTES))
            os.fsync(fd)
        finally:
            os.close(fd)
        fsync_dir(path.parent)
    try:
        key = path.read_bytes()
    except OSError as exc:
        raise DatasetKeyError(f"{path}: cannot read the site's dataset-identity key: {exc}") from exc
    if len(key) != KEY_BYTES:
        raise DatasetKeyError(
            f"{path}: the dataset-identity key is {len(key)} bytes, not {KEY_BYTES}; it was damaged. Restore it "
            "from a backup: without it this site's datasets get new identities (and look like fresh budgets)."
        )
    return key


def keyed_id(key: bytes, content_hash: str) -> str:
    """The identity of the dataset whose files hash to ``content_hash``, under the site's ``key``."""
    return hmac.new(key, _DOMAIN + content_hash.encode("ascii"), hashlib.sha256).hexdigest()


def identities(key: bytes, content_hash: str) -> tuple[str, str]:
    """(keyed identity, the content hash older ledger entries were recorded under): both count."""
    return keyed_id(key, content_hash), content_hash
