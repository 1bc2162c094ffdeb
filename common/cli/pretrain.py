"""``fedtransfer pretrain`` and ``fedtransfer scenarios``: the source model and the built-in scenarios."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.table import Table

from common.cli.console import console
from common.settings import RunSettings


def _cmd_pretrain(args: argparse.Namespace) -> int:
    from common.data.scenarios import load_scenario
    from common.model.pretraining import pretrain_source

    scenario = load_scenario(args.scenario, seed=args.seed, data_dir=Path(args.data_dir) if args.data_dir else None)
    card = pretrain_source(scenario, Path(args.out), seed=args.seed)
    console.print(
        f"Wrote {args.out}: {card.arch} on {card.source_description} (weights sha256 {card.weights_sha256[:16]}...)"
    )
    return 0


def _cmd_scenarios(args: argparse.Namespace) -> int:
    from common.data.scenarios import ScenarioError, load_scenario, scenario_names
    from common.data.site_data import DataError

    table = Table(title="Built-in scenarios")
    for column in ("name", "sites", "model", "transfer policy", "description"):
        table.add_column(column)
    for name in scenario_names():
        try:
            s = load_scenario(name, data_dir=Path(args.data_dir) if args.data_dir else None)
        except (ScenarioError, DataError) as err:  # a scenario whose data is absent is listed with the reason
            table.add_row(name, "-", "-", "-", f"unavailable: {err}")
            continue
        table.add_row(name, ", ".join(site.name for site in s.sites), s.model.arch, s.transfer_policy, s.description)
    console.print(table)
    return 0


def add_commands(commands: argparse._SubParsersAction) -> None:
    defaults = RunSettings()
    data_help = "folder with the heart-disease files (default: $FEDTRANSFER_DATA_DIR)"
    pre = commands.add_parser(
        "pretrain",
        help="train a scenario's source model and write a checkpoint",
        description="Train the scenario's model on its source domain and write model.safetensors + model-card.json.",
    )
    pre.add_argument(
        "--scenario", default=defaults.scenario, help="scenario name or scenario.toml (default: %(default)s)"
    )
    pre.add_argument("--out", required=True, help="checkpoint directory to write")
    pre.add_argument("--seed", type=int, default=defaults.seed, help="seed (default: %(default)s)")
    pre.add_argument("--data-dir", default="", help=data_help)
    pre.set_defaults(func=_cmd_pretrain)

    scn = commands.add_parser(
        "scenarios", help="list the built-in scenarios", description="List the built-in scenarios and their sites."
    )
    scn.add_argument("--data-dir", default="", help=data_help)
    scn.set_defaults(func=_cmd_scenarios)
