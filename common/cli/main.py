"""The ``fedtransfer`` command line."""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from rich.logging import RichHandler
from rich.table import Table

from common.errors import FedtransferError
from common.settings import STRATEGIES, RunSettings, parse_assignments

if TYPE_CHECKING:
    from common.run_record import RunRecord
    from simulations.simulate import SimulationResult

from common.cli import audit as cli_audit
from common.cli import bench as cli_bench
from common.cli import deploy as cli_deploy
from common.cli import keys as cli_keys
from common.cli.console import console, log_console

FLOWER_ENV = {
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
}


def _setup_logging(verbose: bool) -> None:
    for key, value in FLOWER_ENV.items():
        os.environ.setdefault(key, value)
    handler = RichHandler(console=log_console, show_path=False, markup=False)
    logging.basicConfig(level=logging.WARNING, handlers=[handler], format="%(message)s", force=True)
    for name in ("common", "server", "client", "simulations"):
        logging.getLogger(name).setLevel(logging.INFO)
    import flwr.supercore.logger  # noqa: F401  (creates Flower's console handler before we tune it)

    flower = logging.getLogger("flwr")
    flower.propagate = False
    for flower_handler in flower.handlers:  # fedtransfer reports every round and site itself
        flower_handler.setLevel(logging.INFO if verbose else logging.ERROR)


def _cmd_simulate(args: argparse.Namespace) -> int:
    from simulations.simulate import simulate

    scenario = str(Path(args.scenario).resolve()) if args.scenario.endswith(".toml") else args.scenario
    if args.resume:
        settings = RunSettings(out=args.resume, resume=True)
        console.print(
            f"[bold]fedtransfer simulate[/bold]: resuming the run in {args.resume} with the settings it started with"
        )
        return _report_simulation(simulate(settings))
    settings = RunSettings(
        scenario=scenario,
        num_server_rounds=args.rounds,
        local_epochs=args.local_epochs,
        strategy=args.strategy,
        policy=args.policy,
        checkpoint=args.checkpoint,
        seed=args.seed,
        out=args.out or f"fedtransfer-runs/{datetime.now():%Y%m%d-%H%M%S}",
        data_dir=args.data_dir,
        dp=not args.no_dp,
        target_epsilon=args.epsilon,
        delta=args.delta,
    ).with_run_config(parse_assignments(args.set))
    console.print(
        f"[bold]fedtransfer simulate[/bold]: scenario {settings.scenario}, {settings.num_server_rounds} rounds, "
        f"strategy {settings.strategy}, seed {settings.seed}"
    )
    if settings.dp:
        console.print(
            f"DP-SGD at every site: requested epsilon {settings.target_epsilon:g} for this run at delta "
            f"{settings.delta:g}; each site's own policy caps its cumulative spend"
        )
    else:
        console.print(
            "[bold red]NOT PRIVATE: --no-dp asks the sites to train WITHOUT differential privacy. Only sites whose "
            "policy allows it will; nothing protects their records.[/bold red]"
        )
    return _report_simulation(simulate(settings, Path(args.state_dir) if args.state_dir else None))


def _report_simulation(result: SimulationResult) -> int:
    from simulations.simulate import fmt, row_mean

    table = Table(title=f"Test accuracy per target site ({result.record.status}, run {result.record.run_id})")
    sites = sorted(result.comparison["source as-is"])
    table.add_column("method")
    for site in sites:
        table.add_column(site, justify="right")
    table.add_column("mean", justify="right")
    for method, values in result.comparison.items():
        table.add_row(method, *(fmt(values.get(s, math.nan)) for s in sites), fmt(row_mean(values)))
    console.print(table)
    console.print("Baselines are trained without DP on the same base model; pooled is the upper bound.")
    if "personalised" not in result.comparison:
        console.print(
            "Personalised results: non-private runs (--no-dp), or private runs that keep part of their budget "
            "for it (--set personalise-fraction=0.5)."
        )
    console.print(_privacy_table(result.record))
    console.print(f"Outputs in {result.out}: run-record.json, report.md, metrics.png, final-model/")
    return 0


def _privacy_table(record: RunRecord) -> Table | str:
    last: dict[str, dict] = {}
    spent: dict[str, float] = {}
    declined: dict[str, int] = {}
    for r in record.rounds:
        for site, entry in r.sites.items():
            for reply in (entry.train, entry.evaluate):
                if reply is not None and "cap-epsilon" in reply.report:
                    last[site] = reply.report
            epsilon = entry.epsilon()
            if epsilon is not None:
                spent[site] = max(epsilon, spent.get(site, epsilon))
            if entry.status == "declined":
                declined[site] = declined.get(site, 0) + 1
    if any(not p.get("dp", True) for p in last.values()):
        return (
            "[bold red]NOT PRIVATE: these sites trained without differential privacy; no epsilon bound "
            "holds.[/bold red]"
        )
    table = Table(
        title="Privacy spent per site dataset (cumulative over all runs, private personalisation included; max across "
        "sites last)"
    )
    for column in ("site", "epsilon", "cap", "delta", "accountant", "declined rounds"):
        table.add_column(column, justify="left" if column in ("site", "accountant") else "right")
    for site in sorted(last):
        p = last[site]
        table.add_row(
            site,
            f"{spent.get(site, math.nan):.3f}",
            f"{p.get('cap-epsilon', math.nan):g}",
            f"{p.get('delta', math.nan):g}",
            str(p.get("accountant", "?")),
            str(declined.get(site, 0)),
        )
    values = list(spent.values())
    if values:
        table.add_row("max", f"{max(values):.3f}", "", "", "", "")
    return table


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
    for column in ("name", "sites", "model", "policy", "description"):
        table.add_column(column)
    for name in scenario_names():
        try:
            s = load_scenario(name, data_dir=Path(args.data_dir) if args.data_dir else None)
        except (ScenarioError, DataError) as err:  # a scenario whose data is absent is listed with the reason
            table.add_row(name, "-", "-", "-", f"unavailable: {err}")
            continue
        table.add_row(name, ", ".join(site.name for site in s.sites), s.model.arch, s.policy, s.description)
    console.print(table)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedtransfer", description="Federated, differentially private transfer learning for hospitals."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="show Flower's own log")
    commands = parser.add_subparsers(dest="command", required=True)

    defaults = RunSettings()
    sim = commands.add_parser(
        "simulate",
        help="run a federated transfer scenario on this machine",
        description="Pretrain (or load) a source model, fine-tune it across simulated sites with Flower's simulation "
        "engine, and compare with source-only, local-only and pooled baselines.",
    )
    sim.add_argument(
        "--scenario",
        default=defaults.scenario,
        help="built-in scenario name or path to a scenario.toml (default: %(default)s, offline)",
    )
    sim.add_argument(
        "--rounds", type=int, default=defaults.num_server_rounds, help="federated rounds (default: %(default)s)"
    )
    sim.add_argument(
        "--local-epochs", type=int, default=defaults.local_epochs, help="local epochs per round (default: %(default)s)"
    )
    sim.add_argument(
        "--strategy",
        choices=STRATEGIES,
        default=defaults.strategy,
        help="Flower aggregation strategy (default: %(default)s)",
    )
    sim.add_argument("--policy", default="", help="transfer policy: head, last:K or full (default: the scenario's)")
    sim.add_argument("--checkpoint", default="", help="start from this checkpoint directory instead of pretraining")
    sim.add_argument(
        "--seed", type=int, default=defaults.seed, help="seed for data splits and training (default: %(default)s)"
    )
    sim.add_argument("--out", default="", help="output directory (default: fedtransfer-runs/<date-time>)")
    sim.add_argument(
        "--state-dir",
        default="",
        help="where the simulated sites keep data, keys, privacy policy and ledger; reuse it to carry spend across "
        "runs (default: OUT/sites)",
    )
    sim.add_argument(
        "--epsilon",
        type=float,
        default=defaults.target_epsilon,
        help="epsilon the coordinator requests for this run; sites cap it by their own policy (default: %(default)s)",
    )
    sim.add_argument(
        "--delta", type=float, default=defaults.delta, help="delta the coordinator requests (default: %(default)s)"
    )
    sim.add_argument(
        "--no-dp",
        action="store_true",
        help="ask sites to train WITHOUT differential privacy (NOT PRIVATE; only sites whose policy allows it comply: "
        "simulated sites created by such a run do)",
    )
    sim.add_argument(
        "--resume",
        default="",
        metavar="DIR",
        help="continue the interrupted run in DIR (its --out) from its last completed round, with its own settings",
    )
    sim.add_argument(
        "--data-dir",
        default=os.environ.get("FEDTRANSFER_DATA_DIR", ""),
        help="folder with the heart-disease files (default: $FEDTRANSFER_DATA_DIR)",
    )
    sim.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any other run setting of pyproject.toml's [tool.flwr.app.config], repeatable, "
        "e.g. --set local-steps=100 --set optimizer=sgd-plain --set personalise-fraction=0.5",
    )
    sim.set_defaults(func=_cmd_simulate)

    pre = commands.add_parser(
        "pretrain",
        help="train a scenario's source model and write a checkpoint",
        description="Train the scenario's model on its source domain and write model.safetensors + model-card.json.",
    )
    pre.add_argument(
        "--scenario", default=defaults.scenario, help="scenario name or scenario.toml (default: %(default)s)"
    )
    pre.add_argument("--out", required=True, help="checkpoint directory to write")
    pre.add_argument("--seed", type=int, default=0, help="seed (default: %(default)s)")
    pre.add_argument(
        "--data-dir", default=os.environ.get("FEDTRANSFER_DATA_DIR", ""), help="folder with the heart-disease files"
    )
    pre.set_defaults(func=_cmd_pretrain)

    scn = commands.add_parser(
        "scenarios", help="list the built-in scenarios", description="List the built-in scenarios and their sites."
    )
    scn.add_argument(
        "--data-dir", default=os.environ.get("FEDTRANSFER_DATA_DIR", ""), help="folder with the heart-disease files"
    )
    scn.set_defaults(func=_cmd_scenarios)

    for module in (cli_keys, cli_deploy, cli_audit, cli_bench):
        module.add_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    try:
        return args.func(args)
    except FedtransferError as err:
        console.print(f"[bold red]error[/bold red] ({type(err).__name__}): {err}", highlight=False)
        return err.exit_status


if __name__ == "__main__":
    sys.exit(main())
