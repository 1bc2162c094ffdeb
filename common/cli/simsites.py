"""``fedtransfer simulated-sites``: write a scenario's simulated sites for ``flwr run`` on Flower's simulation engine.

``fedtransfer simulate`` does this itself. With ``flwr run`` the simulator's work happens first, here:
each site's folder (data, keys, policy, state) and the coordinator's keys and signed manifest. The
simulated ClientApps find their folders from the ``FEDTRANSFER_SIM_ROOT`` environment variable of
the machine that runs them, never from a message.
"""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path

from common.cli.console import console
from common.settings import RunSettings

COMMANDS = ("simulated-sites",)


def _cmd_simulated_sites(args: argparse.Namespace) -> int:
    from common.data.site_config import SIM_ROOT_ENV
    from simulations.sites import prepare_sites

    root = Path(args.root).expanduser().resolve()
    scenario = str(Path(args.scenario).resolve()) if args.scenario.endswith(".toml") else args.scenario
    bound = prepare_sites(RunSettings(scenario=scenario, seed=args.seed, sim_root=str(root), dp=not args.no_dp))
    run_config = " ".join(
        f"{key}={json.dumps(value)}"
        for key, value in (
            ("scenario", scenario),
            ("seed", args.seed),
            ("coordinator-keys", bound.coordinator_keys),
            ("manifest", bound.manifest),
        )
    )
    console.print(f"Wrote the simulated sites of {args.scenario} under {root}. Run them with:")
    console.print(f"  export {SIM_ROOT_ENV}={shlex.quote(str(root))}", highlight=False, soft_wrap=True)
    console.print(f"  flwr run APP --run-config {shlex.quote(run_config)} ...", highlight=False, soft_wrap=True)
    return 0


def add_commands(commands: argparse._SubParsersAction) -> None:
    defaults = RunSettings()
    sites = commands.add_parser(
        "simulated-sites",
        help="write a scenario's simulated sites and coordinator keys for flwr run",
        description="Write each simulated site's folder (data, keys, privacy policy, state) and the simulated "
        "coordinator's keys and signed manifest under --root, and print the run config and environment that "
        "`flwr run` with a simulation federation needs. `fedtransfer simulate` does all of this itself.",
    )
    sites.add_argument("--scenario", default=defaults.scenario, help="scenario name or scenario.toml (%(default)s)")
    sites.add_argument("--root", required=True, help="folder for the simulated sites (kept across runs)")
    sites.add_argument("--seed", type=int, default=defaults.seed, help="seed of the data split (%(default)s)")
    sites.add_argument(
        "--no-dp", action="store_true", help="let the sites' new policies allow runs WITHOUT DP (NOT private)"
    )
    sites.set_defaults(func=_cmd_simulated_sites)
