"""``fedtransfer provision`` and ``fedtransfer site check``: kits for a deployed federation."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.table import Table

from common.cli.console import console
from common.data.site_config import SITE_CONFIG_FILE, SiteConfig

COMMANDS = ("provision", "gateway", "site")


def _names(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _cmd_provision(args: argparse.Namespace) -> int:
    from common.deploy.provision import (
        GATEWAY_SCRIPT,
        REGISTER_SCRIPT,
        RUN_SCRIPT,
        SUPERLINK_SCRIPT,
        SUPERNODE_SCRIPT,
        Endpoint,
        ProvisionError,
        ProvisionRequest,
        provision,
    )
    from common.privacy.policy import PolicyError, SitePolicy
    from common.security.enrolment import EnrolmentError, read_enrolment
    from common.security.keys import KeyFileError
    from common.security.manifest import ManifestError

    sites = _names(args.sites)
    try:
        enrolments = [read_enrolment(Path(path)) for path in args.enrolment]
        endpoints = [Endpoint.parse(a) for a in _names(",".join(args.superlink_address))]
        request = ProvisionRequest(
            federation=args.federation,
            sites=sites,
            enrolments=enrolments,
            superlink_addresses=endpoints,
            out=Path(args.out),
            ca_cert=Path(args.ca_cert) if args.ca_cert else None,
            ca_key=Path(args.ca_key) if args.ca_key else None,
            install_root=Path(args.install_root) if args.install_root else None,
            runtime_ports={
                site: args.runtime_port + i for i, site in enumerate([*sites, *(e.site_id for e in enrolments)])
            }
            if args.runtime_port
            else {},
            app_dir=Path(args.app_dir).resolve() if args.app_dir else None,
            policy=SitePolicy(max_epsilon=args.max_epsilon, delta=args.delta),
            min_sites=args.min_sites,
            control_port=args.control_port,
        )
        result = provision(request)
    except (ProvisionError, KeyFileError, ManifestError, PolicyError, EnrolmentError) as err:
        console.print(f"[bold red]Cannot provision:[/bold red] {err}")
        return 1
    if sites:
        console.print(
            f"[bold red]TEST PROVISIONING: the private keys of {', '.join(sites)} were made on this machine and are in "
            "their kits. Whoever holds them can sign as those sites, and their signed privacy reports prove nothing "
            "against this machine. For a real federation each site runs `fedtransfer keys site` and sends its "
            "enrolment (--enrolment).[/bold red]"
        )
    table = Table(title=f"Kits of federation {result.federation}")
    table.add_column("machine")
    table.add_column("kit")
    table.add_column("start with")
    table.add_row(
        "coordinator (SuperLink + ServerApp)",
        str(result.coordinator_kit),
        f"{SUPERLINK_SCRIPT} and {GATEWAY_SCRIPT}, then {REGISTER_SCRIPT}, then {RUN_SCRIPT}",
    )
    for site, kit in sorted(result.site_kits.items()):
        table.add_row(f"site {site}", str(kit), SUPERNODE_SCRIPT)
    console.print(table)
    if result.ca_dir is not None:
        console.print(
            f"The CA's private key is in {result.ca_dir / 'ca.key'}: keep it offline, on no federation machine."
        )
    if result.extended:
        console.print(
            f"Added {', '.join(result.added_sites)}; copy the coordinator kit's new manifest.json and "
            f"{REGISTER_SCRIPT} to the coordinator, then register the new keys."
        )
    for enrolment in request.enrolments:
        console.print(
            f"Enrolled {enrolment.site_id} with key fingerprint [bold]{enrolment.identity.fingerprint()}[/bold]"
            f"{'' if enrolment.declared_size is None else f', declared size {enrolment.declared_size}'}: confirm it "
            "with the site by phone before you send its kit."
        )
    console.print(
        "Copy each kit to its machine only (a site copies it into the folder holding its keys). Tell every site, by "
        "phone or in person, the coordinator fingerprint:"
    )
    console.print(f"  [bold]{result.coordinator_fingerprint}[/bold]")
    console.print(
        "Each site puts its data in the kit's data/ folder (or edits data-path in site.toml), then runs: fedtransfer "
        "site check --kit KIT"
    )
    return 0


def _cmd_site_check(args: argparse.Namespace) -> int:
    from common.deploy.site_check import ERROR, OK, WARNING, check_kit, has_errors

    styles = {OK: "green", WARNING: "yellow", ERROR: "bold red"}
    findings = check_kit(Path(args.kit), Path(args.model_card) if args.model_card else None, probe=args.probe)
    table = Table(title=f"Check of {args.kit}")
    for column in ("", "check", "finding"):
        table.add_column(column)
    for finding in findings:
        style = styles[finding.level]
        table.add_row(f"[{style}]{finding.level}[/{style}]", finding.check, finding.message)
    console.print(table)
    if has_errors(findings):
        console.print("[bold red]Fix the errors above before this machine joins the federation.[/bold red]")
        return 1
    console.print("[green]Ready to join.[/green]")
    return 0


def _cmd_gateway(args: argparse.Namespace) -> int:
    from common.deploy.gateway import GatewayConfig, serve_gateway
    from common.deploy.provision import Endpoint, ProvisionError
    from common.errors import ConfigurationError

    try:
        listen = Endpoint.parse(args.listen)
        Endpoint.parse(args.superlink)
    except ProvisionError as err:
        raise ConfigurationError(str(err)) from None
    serve_gateway(
        GatewayConfig(
            listen.host,
            listen.port,
            args.superlink,
            Path(args.ssl_certfile),
            Path(args.ssl_keyfile),
            Path(args.ssl_ca_certfile),
        )
    )
    return 0


def _cmd_sign_ledger(args: argparse.Namespace) -> int:
    from common.privacy.ledger import LEDGER_FILE, Ledger
    from common.security.keys import passphrase_from_env, read_identity

    config = SiteConfig.load(_site_config_path(args.site))
    identity = read_identity(config.keys_dir, config.site_id, passphrase_from_env())
    entries = Ledger(config.state_dir, signer=identity).sign_head()
    console.print(
        f"Signed the head of {config.state_dir / LEDGER_FILE} ({entries} entries) with site "
        f"{config.site_id}'s key {identity.public().fingerprint()[:16]}...; the site trains again."
    )
    return 0


def _site_config_path(site: str) -> Path:
    return Path(site) / SITE_CONFIG_FILE if Path(site).is_dir() else Path(site)


def _cmd_approve_app(args: argparse.Namespace) -> int:
    from common.deploy.approved_apps import ApprovedAppsError, approve_app, approved_apps_path, describe_fab
    from common.security.keys import passphrase_from_env, read_identity

    config = SiteConfig.load(_site_config_path(args.site))
    fab_file = Path(args.fab)
    try:
        fab = fab_file.read_bytes()
    except OSError as err:
        raise ApprovedAppsError(f"cannot read the FAB {fab_file}: {err.strerror or err}") from None
    app = describe_fab(fab, fab_file)
    identity = read_identity(config.keys_dir, config.site_id, passphrase_from_env())
    approved = approve_app(config, fab, args.note or app, identity)
    console.print(
        f"Site {config.site_id} approves {app} (FAB sha256 [bold]{approved.fab_sha256}[/bold]), signed with its key "
        f"{identity.public().fingerprint()[:16]}... in {approved_apps_path(config)}; its SuperNode runs this app from "
        "the next run on."
    )
    return 0


def _cmd_approved_apps(args: argparse.Namespace) -> int:
    from common.deploy.approved_apps import load_site_approvals

    config = SiteConfig.load(_site_config_path(args.site))
    approvals = load_site_approvals(config)
    table = Table(title=f"Apps site {config.site_id} runs (signature verified)")
    for column in ("FAB sha256", "approved at", "note"):
        table.add_column(column)
    for app in approvals.apps:
        table.add_row(app.fab_sha256, app.approved_at, app.note)
    console.print(table)
    return 0


def _cmd_clientapp(args: argparse.Namespace) -> int:
    from common.deploy.clientapp_gate import run_gated_clientapp

    flower_args = args.flower_args[1:] if args.flower_args[:1] == ["--"] else args.flower_args
    run_gated_clientapp(_site_config_path(args.site), flower_args)
    return 0


def add_commands(commands: argparse._SubParsersAction) -> None:
    prov = commands.add_parser(
        "provision",
        help="make the kits of a deployed federation",
        description="Write a kit for the coordinator and one per site: TLS CA and SuperLink certificate, Flower "
        "SuperNode "
        "authentication keys, fedtransfer keys and signed manifest, site configuration, privacy policy and launch "
        "scripts. Run it again on the same --out to add sites.",
    )
    prov.add_argument("--federation", required=True, help="federation name (letters, digits, . _ -)")
    prov.add_argument(
        "--enrolment",
        action="append",
        default=[],
        help="a site's SITE.enrolment.json (made by `fedtransfer keys site` at the site); repeat for every site",
    )
    prov.add_argument(
        "--sites",
        default="",
        help="TEST ONLY: comma-separated site ids whose private keys are made here, in their kits (simulations and "
        "tests; whoever provisions can then sign as those sites)",
    )
    prov.add_argument(
        "--superlink-address",
        required=True,
        action="append",
        help="HOST:PORT the sites dial; repeat (or separate by commas) for more names of the same SuperLink",
    )
    prov.add_argument("--out", required=True, help="directory for the kits (new, or an existing one to add sites)")
    prov.add_argument("--ca-cert", default="", help="use this existing CA certificate (PEM) instead of making a CA")
    prov.add_argument("--ca-key", default="", help="the existing CA's private key (PEM, unencrypted)")
    prov.add_argument(
        "--install-root",
        default="",
        help="where kits will live on their machines: ROOT/coordinator and ROOT/SITE (default: where they are written)",
    )
    prov.add_argument(
        "--runtime-port",
        type=int,
        default=0,
        help="first local runtime port of the SuperNodes, one per site (default: Flower's SuperNode port, then one "
        "more per site)",
    )
    prov.add_argument(
        "--app-dir", default="", help="the fedtransfer checkout on the coordinator machine (default: this one)"
    )
    prov.add_argument(
        "--max-epsilon",
        type=float,
        default=10.0,
        help="cumulative epsilon cap in each site's initial privacy policy (default: %(default)s)",
    )
    prov.add_argument(
        "--delta", type=float, default=1e-5, help="delta in each site's initial privacy policy (default: %(default)s)"
    )
    prov.add_argument(
        "--min-sites", type=int, default=0, help="fewest sites a round may aggregate (default: 2, or 1 for one site)"
    )
    prov.add_argument(
        "--control-port",
        type=int,
        default=0,
        help="port of the SuperLink itself on the coordinator's loopback (Control API; default: the sites' port + 1)",
    )
    prov.set_defaults(func=_cmd_provision)

    gateway = commands.add_parser(
        "gateway",
        help="serve the Fleet API to the sites, and nothing else (coordinator)",
        description="Listen where the sites dial (TLS with the SuperLink's certificate) and forward only Flower Fleet "
        "API calls to the SuperLink on the coordinator's loopback; the Control and Runtime APIs are not reachable "
        "here. The coordinator kit's start-gateway.sh runs it.",
    )
    gateway.add_argument("--listen", required=True, help="HOST:PORT the sites dial, e.g. 0.0.0.0:8000")
    gateway.add_argument(
        "--superlink", required=True, help="HOST:PORT of the SuperLink on loopback, e.g. 127.0.0.1:8001"
    )
    gateway.add_argument("--ssl-certfile", required=True, help="the SuperLink's TLS certificate (PEM)")
    gateway.add_argument("--ssl-keyfile", required=True, help="its private key (PEM)")
    gateway.add_argument("--ssl-ca-certfile", required=True, help="the federation's CA certificate (PEM)")
    gateway.set_defaults(func=_cmd_gateway)

    site = commands.add_parser(
        "site", help="site operator commands", description="Commands for a data site's operator."
    )
    sub = site.add_subparsers(dest="site_command", required=True)
    check = sub.add_parser(
        "check",
        help="check a kit before its machine joins",
        description="Check a site (or coordinator) kit: files, permissions, keys and manifest, certificate dates and "
        "names, "
        "data against the model card, privacy policy, ledger. Exit status 1 if anything must be fixed.",
    )
    check.add_argument("--kit", required=True, help="the kit directory")
    check.add_argument(
        "--model-card",
        default="",
        help="model-card.json or checkpoint directory to check the data against (default: KIT/model-card.json if "
        "present)",
    )
    check.add_argument(
        "--probe", action="store_true", help="also connect to the SuperLink and verify its TLS certificate"
    )
    check.set_defaults(func=_cmd_site_check)
    sign = sub.add_parser(
        "sign-ledger",
        help="sign the head of a ledger written before heads were signed (once, after an audit)",
        description="A privacy ledger written by an older fedtransfer has an unsigned head, which the site's budget "
        "guard "
        "refuses. After checking it with `fedtransfer audit`, the privacy officer signs its current head with "
        "the site's key, once; from then on every append is signed.",
    )
    sign.add_argument("site", help="the site folder (holding site.toml) or its site.toml")
    sign.set_defaults(func=_cmd_sign_ledger)
    approve = sub.add_parser(
        "approve-app",
        help="approve an app (FAB) this site may run, after reviewing it",
        description="Add the sha256 of a Flower App Bundle to the site's approved apps (STATE/approved-apps.json), "
        "signed with the site's key. The site's SuperNode refuses, before touching any data, every app not in that "
        "list. Build the FAB with `flwr build` in the checkout you reviewed (or review the .fab the coordinator "
        "sends): the same files give the same hash as the app the coordinator runs.",
    )
    approve.add_argument("fab", help="the reviewed app's .fab file")
    approve.add_argument("--site", required=True, help="the site folder (holding site.toml) or its site.toml")
    approve.add_argument("--note", default="", help="what the app is and who reviewed it (default: its name, version)")
    approve.set_defaults(func=_cmd_approve_app)
    listing = sub.add_parser(
        "approved-apps",
        help="list the apps this site approved (after verifying the list's signature)",
        description="Verify the site's approved apps against its key in the manifest and list them.",
    )
    listing.add_argument("--site", required=True, help="the site folder (holding site.toml) or its site.toml")
    listing.set_defaults(func=_cmd_approved_apps)
    gate = sub.add_parser(
        "clientapp",
        help="Flower's flwr-clientapp for approved apps only (started by the SuperNode, not by hand)",
        description="Run Flower's flwr-clientapp, installing the run's FAB only if the site approved it. The kit's "
        "bin/flwr-clientapp calls this; arguments after -- go to Flower.",
    )
    gate.add_argument("--site", required=True, help="the site folder (holding site.toml) or its site.toml")
    gate.add_argument("flower_args", nargs=argparse.REMAINDER, help="-- then flwr-clientapp's arguments")
    gate.set_defaults(func=_cmd_clientapp)
