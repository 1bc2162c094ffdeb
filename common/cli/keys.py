"""``fedtransfer keys ...``: key pairs made where they are used, site enrolments, and the signed manifest."""

from __future__ import annotations

import argparse
from datetime import UTC, datetime
from pathlib import Path

from common.cli.console import console
from common.errors import ConfigurationError
from common.security.enrolment import ENROLMENT_FORMAT, enrolment_file, read_enrolment
from common.security.keys import (
    COORDINATOR_NAME,
    Identity,
    PublicIdentity,
    passphrase_from_env,
    prompt_passphrase,
    read_identity,
    read_public_identity,
    write_identity,
)
from common.security.manifest import DEFAULT_VALIDITY_DAYS, read_manifest, sign_manifest, write_manifest

COMMANDS = ("keys",)


def _passphrase(args: argparse.Namespace, confirm: bool) -> bytes | None:
    if args.passphrase_env:
        return passphrase_from_env()
    if args.passphrase_prompt:
        return prompt_passphrase(confirm=confirm)
    return None


def _cmd_coordinator(args: argparse.Namespace) -> int:
    identity = Identity.generate(COORDINATOR_NAME)
    write_identity(identity, Path(args.out), _passphrase(args, confirm=True))
    console.print(
        f"Wrote the coordinator's keys to {args.out} (private keys 0600). Fingerprint: "
        f"[bold]{identity.public().fingerprint()}[/bold]"
    )
    console.print("Read the fingerprint to every site out of band; keep the .key files on this machine only.")
    return 0


def _cmd_site(args: argparse.Namespace) -> int:
    site_dir = Path(args.out)
    from common.deploy.site_keys import make_site_keys

    enrolment = make_site_keys(args.site_id, site_dir, args.declared_size, _passphrase(args, confirm=True))
    console.print(
        f"Wrote {args.site_id}'s keys under {site_dir} (keys/, flower/; private keys 0600, they never leave this "
        f"machine). Fingerprint: [bold]{enrolment.identity.fingerprint()}[/bold]"
    )
    console.print(
        f"Send {site_dir / enrolment_file(args.site_id)} to the coordinator and read them the fingerprint by phone. "
        "Copy the kit they send back into this same folder."
    )
    return 0


def _site_entry(path: Path) -> tuple[PublicIdentity, int | None]:
    """A site's public identity (and declared size) from its enrolment or its SITE.pub.json."""
    if ENROLMENT_FORMAT in path.read_text(encoding="utf-8", errors="replace")[:400]:
        enrolment = read_enrolment(path)
        return enrolment.identity, enrolment.declared_size
    return read_public_identity(path), None


def _cmd_manifest(args: argparse.Namespace) -> int:
    passphrase = _passphrase(args, confirm=False)
    coordinator = read_identity(Path(args.coordinator_keys), COORDINATOR_NAME, passphrase)
    previous = read_identity(Path(args.rotate_from), COORDINATOR_NAME, passphrase) if args.rotate_from else None
    old = (
        read_manifest(Path(args.replaces), (previous or coordinator).public().fingerprint()) if args.replaces else None
    )
    if old is not None and old.federation != args.federation:
        raise ConfigurationError(
            f"{args.replaces} is the manifest of federation {old.federation!r}, not {args.federation!r}"
        )
    now = datetime.now(UTC).replace(microsecond=0).isoformat()
    sites = dict(old.sites) if old else {}
    sizes = dict(old.declared_sizes) if old else {}
    revoked = dict(old.revoked) if old else {}
    for name in args.revoke:
        if name not in sites:
            raise ConfigurationError(
                f"cannot revoke {name!r}: the manifest {args.replaces or '(none)'} does not list it"
            )
        revoked[sites.pop(name).fingerprint()] = now
        sizes.pop(name, None)
    for path in args.sites:
        identity, size = _site_entry(Path(path))
        if identity.name in sites and sites[identity.name] != identity:  # a site's new keys: its old ones are revoked
            revoked[sites[identity.name].fingerprint()] = now
        sites[identity.name] = identity
        if size is not None:
            sizes[identity.name] = size
    if previous is not None:
        revoked[previous.public().fingerprint()] = now
    manifest = sign_manifest(
        args.federation,
        coordinator,
        list(sites.values()),
        serial=old.serial + 1 if old else 1,
        validity_days=args.valid_days,
        declared_sizes=sizes,
        revoked=revoked,
        previous=previous,
    )
    write_manifest(manifest, Path(args.out))
    read_manifest(Path(args.out), coordinator.public().fingerprint())
    console.print(
        f"Signed manifest serial {manifest.serial} of federation {args.federation!r} with {len(sites)} sites "
        f"({len(revoked)} revoked key(s)), {'valid until ' + manifest.expires if manifest.expires else 'no expiry'}: "
        f"{args.out}"
    )
    if previous is not None:
        console.print(
            f"It rotates the coordinator's key, endorsed by the old one: sites that trust "
            f"{previous.public().fingerprint()} accept the new key {coordinator.public().fingerprint()} from it."
        )
    else:
        console.print(
            f"Sites check it against the coordinator fingerprint, given to them out of band: "
            f"[bold]{coordinator.public().fingerprint()}[/bold]"
        )
    return 0


def _passphrase_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--passphrase-env",
        action="store_true",
        help="encrypt/decrypt private keys with the passphrase in $FEDTRANSFER_KEY_PASSPHRASE",
    )
    group.add_argument(
        "--passphrase-prompt", action="store_true", help="ask for the private-key passphrase at the terminal"
    )


def add_commands(commands: argparse._SubParsersAction) -> None:
    keys = commands.add_parser(
        "keys",
        help="make key pairs, a site's enrolment, and the signed federation manifest",
        description="Make key pairs on the machine that uses them, a site's signed enrolment, and the "
        "coordinator-signed federation manifest.",
    )
    sub = keys.add_subparsers(dest="keys_command", required=True)

    coordinator = sub.add_parser(
        "coordinator",
        help="the coordinator's key pairs",
        description="Write coordinator.enc.key, coordinator.sign.key (0600) and coordinator.pub.json.",
    )
    coordinator.add_argument("--out", required=True, help="directory for the key files")
    _passphrase_options(coordinator)
    coordinator.set_defaults(func=_cmd_coordinator)

    site = sub.add_parser(
        "site",
        help="a site's keys and enrolment, made at the site",
        description="At the site, in the folder its kit will live in: write keys/SITE.enc.key, keys/SITE.sign.key "
        "(0600), keys/SITE.pub.json, the Flower SuperNode key flower/supernode-auth.key (0600) and .pub, and "
        "SITE.enrolment.json, the public keys and declared size signed by the site, to send to the coordinator.",
    )
    site.add_argument("--site-id", required=True, help="the site's id (letters, digits, . _ -)")
    site.add_argument("--out", required=True, help="the site's folder, e.g. /srv/fedtransfer/hospital-a")
    site.add_argument(
        "--declared-size",
        type=int,
        default=None,
        help="the public, rounded number of training records (the site's aggregation weight; its privacy policy "
        "must declare the same)",
    )
    _passphrase_options(site)
    site.set_defaults(func=_cmd_site)

    manifest = sub.add_parser(
        "manifest",
        help="sign the federation manifest (a new one, or the next after --replaces)",
        description="Sign a manifest listing the sites' public keys. With --replaces, the next one after that "
        "manifest: its serial plus one, its sites, sizes and revocations kept, --revoke removes a site and revokes its "
        "key, a site given again with new keys has its old ones revoked. --rotate-from signs it as a new coordinator "
        "key endorsed by the old one.",
    )
    manifest.add_argument("--federation", required=True, help="federation name")
    manifest.add_argument("--coordinator-keys", required=True, help="directory holding the coordinator's keys")
    manifest.add_argument("--out", required=True, help="manifest file to write (JSON)")
    manifest.add_argument("--replaces", default="", help="the current manifest (the new one gets the next serial)")
    manifest.add_argument("--revoke", action="append", default=[], help="site id to remove and revoke (repeatable)")
    manifest.add_argument(
        "--rotate-from", default="", help="directory holding the OLD coordinator keys: endorse a change of key"
    )
    manifest.add_argument(
        "--valid-days",
        type=int,
        default=DEFAULT_VALIDITY_DAYS,
        help="days until the manifest expires (default: %(default)s; 0: no expiry)",
    )
    manifest.add_argument("sites", nargs="*", help="the sites' SITE.enrolment.json (or SITE.pub.json) files")
    _passphrase_options(manifest)
    manifest.set_defaults(func=_cmd_manifest)
