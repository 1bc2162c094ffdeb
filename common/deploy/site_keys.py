"""A site's own keys, made on the site's machine, and the enrolment it sends the coordinator.

``SITE_DIR`` is where the site's kit will live (``/srv/fedtransfer/hospital-a``)::

    SITE_DIR/keys/SITE.enc.key  SITE_DIR/keys/SITE.sign.key  SITE_DIR/keys/SITE.pub.json
    SITE_DIR/flower/supernode-auth.key  SITE_DIR/flower/supernode-auth.pub
    SITE_DIR/SITE.enrolment.json      (public: send it to the coordinator)

The private keys never leave the machine; the coordinator's kit for the site holds no key and
is copied into the same folder.
"""

from __future__ import annotations

from pathlib import Path

from common.deploy.provision import AUTH_KEY, AUTH_PUB, KEYS_DIR, SUPERNODE_DIR, supernode_auth_keypair
from common.security.enrolment import Enrolment, enrolment_file, make_enrolment, write_enrolment
from common.security.keys import Identity, KeyFileError, write_identity, write_private_file, write_public_file


def make_site_keys(site_id: str, site_dir: Path, declared_size: int | None, passphrase: bytes | None) -> Enrolment:
    """Create the site's key pairs and SuperNode key under ``site_dir`` and write its signed enrolment there."""
    site_dir = Path(site_dir)
    auth = site_dir / SUPERNODE_DIR / AUTH_KEY
    if auth.exists():
        raise KeyFileError(f"{auth} already exists; refusing to replace this site's SuperNode key")
    identity = Identity.generate(site_id)
    write_identity(identity, site_dir / KEYS_DIR, passphrase)
    private, public = supernode_auth_keypair()
    write_private_file(auth, private)
    write_public_file(site_dir / SUPERNODE_DIR / AUTH_PUB, public.decode("ascii"))
    enrolment = make_enrolment(identity, public.decode("ascii"), declared_size)
    write_enrolment(enrolment, site_dir / enrolment_file(site_id))
    return enrolment
