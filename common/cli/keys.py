"""``fedtransfer keys ...``: key pairs for the coordinator and the sites, and the signed manifest."""

from __future__ import annotations

import argparse
from pathlib import Path

from common.cli.console import console
from common.security.keys import (
    COORDINATOR_NAME,
    Identity,
    passphrase_from_env,
    prompt_passphrase,
    read_identity,
    read_public_identity,
    write_identity,
)
from common.security.manifest import read_manifest, sign_manifest, write_manifest

COMMANDS = ("keys",)


def _passphrase(args: argparse.Namespace, confirm: bool) -> bytes | None:
    if args.passphrase_env:
        return passphrase_from_env()
    if args.passphrase_prompt:
        return prompt_passphrase(confirm=confirm)
    return None


def _write(name: str, args: argparse.Namespace) -> int:
    identity = Identity.generate(name)
    write_identity(identity, Path(args.out), _passphrase(args, confirm=True))
    console.print(
        f"Wrote {name}'s keys to {args.out} (private keys 0600). Fingerprint: "
        f"[bold]{identity.public().fingerprint()}[/bold]"
    )
    receiver = "every site (with the fingerprint, out of band)" if name == COORDINATOR_NAME else "the coordinator"
    console.print(
        f"Give {Path(args.out) / (name + '.pub.json')} to {receiver}; keep the .key files on this machine only."
    )
    return 0


def _cmd_coordinator(args: argparse.Namespace) -> int:
    return _write(COORDINATOR_NAME, args)


def _cmd_site(args: argparse.Namespace) -> int:
    return _write(args.site_id, args)


def _cmd_manifest(args: argparse.Namespace) -> int:
    coordinator = read_identity(Path(args.coordinator_keys), COORDINATOR_NAME, _passphrase(args, confirm=False))
    sites = [read_public_identity(Path(p)) for p in args.site_public_keys]
    manifest = sign_manifest(args.federation, coordinator, sites)
    write_manifest(manifest, Path(args.out))
    read_manifest(Path(args.out), coordinator.public().fingerprint())
    console.print(f"Signed manifest of federation {args.federation!r} with {len(sites)} sites: {args.out}")
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
        help="make key pairs and the signed federation manifest",
        description="Make X25519 (encryption) and Ed25519 (signing) key pairs, and the coordinator-signed federation "
        "manifest.",
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
        "site", help="a site's key pairs", description="Write SITE.enc.key, SITE.sign.key (0600) and SITE.pub.json."
    )
    site.add_argument("--site-id", required=True, help="the site's id (letters, digits, . _ -)")
    site.add_argument("--out", required=True, help="directory for the key files")
    _passphrase_options(site)
    site.set_defaults(func=_cmd_site)

    manifest = sub.add_parser(
        "manifest",
        help="sign the federation manifest",
        description="List the sites' public keys in a manifest signed by the coordinator.",
    )
    manifest.add_argument("--federation", required=True, help="federation name")
    manifest.add_argument("--coordinator-keys", required=True, help="directory holding the coordinator's keys")
    manifest.add_argument("--out", required=True, help="manifest file to write (JSON)")
    manifest.add_argument("site_public_keys", nargs="+", help="the sites' SITE.pub.json files")
    _passphrase_options(manifest)
    manifest.set_defaults(func=_cmd_manifest)
