"""``fedtransfer pretrain`` and ``fedtransfer scenarios``: the source model and the built-in scenarios."""

from __future__ import annotations

import argparse
from dataclasses import fields
from pathlib import Path

from rich.table import Table

from common.cli.console import console
from common.model.pretrain_settings import IMAGE_PRETRAIN, TABULAR_PRETRAIN, PretrainConfig
from common.settings import CLASS_WEIGHTS, OPTIMIZERS, RunSettings

PRETRAIN_HELP = {
    "epochs": "most epochs over the source training rows",
    "lr": "learning rate",
    "batch_size": "batch size",
    "optimizer": "optimiser",
    "class_weights": "loss for imbalanced classes",
    "validation_fraction": "share of the source training rows held out for validation (0: none)",
    "patience": "stop after this many epochs without a better validation score (0: never)",
}
CHOICES = {"optimizer": OPTIMIZERS, "class_weights": CLASS_WEIGHTS}

COMMANDS = ("pretrain", "scenarios")


def _cmd_pretrain(args: argparse.Namespace) -> int:
    from common.data.scenarios import load_scenario
    from common.model.pretraining import pretrain_source

    scenario = load_scenario(args.scenario, seed=args.seed, data_dir=Path(args.data_dir) if args.data_dir else None)
    overrides = {f.name: getattr(args, f.name) for f in fields(PretrainConfig) if getattr(args, f.name) is not None}
    card = pretrain_source(scenario, Path(args.out), seed=args.seed, overrides=overrides)
    console.print(
        f"Wrote {args.out}: {card.arch} on {card.source_description} (weights sha256 {card.weights_sha256[:16]}...)"
    )
    for split in ("source_validation", "source_test"):
        if split in card.lineage:
            metrics = card.lineage[split]
            console.print(
                f"  {split.replace('_', ' ')}: AUC {metrics['roc-auc']:.3f}, balanced accuracy "
                f"{metrics['balanced-accuracy']:.3f}, F1 {metrics['f1']:.3f} ({int(metrics['test-size'])} rows)"
            )
    if "warning" in card.lineage:
        console.print(f"[bold yellow]warning[/bold yellow]: {card.lineage['warning']}")
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
    data_help = (
        "folder with the heart-disease or PneumoniaMNIST files (default: $FEDTRANSFER_DATA_DIR, "
        "$FEDTRANSFER_PNEUMONIA_DIR)"
    )
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
    for spec in fields(PretrainConfig):
        tables, images = getattr(TABULAR_PRETRAIN, spec.name), getattr(IMAGE_PRETRAIN, spec.name)
        default = f"{tables}" if tables == images else f"{tables} for tables, {images} for images"
        options = {"choices": CHOICES[spec.name]} if spec.name in CHOICES else {"type": type(tables)}
        pre.add_argument(
            "--" + spec.name.replace("_", "-"),
            default=None,
            help=f"{PRETRAIN_HELP[spec.name]} (default: the scenario's [pretrain] table, else {default})",
            **options,
        )
    pre.set_defaults(func=_cmd_pretrain)

    scn = commands.add_parser(
        "scenarios", help="list the built-in scenarios", description="List the built-in scenarios and their sites."
    )
    scn.add_argument("--data-dir", default="", help=data_help)
    scn.set_defaults(func=_cmd_scenarios)
