"""``fedtransfer simulate``: its flags come from :class:`common.settings.RunSettings`, one per setting."""

from __future__ import annotations

import argparse
import math
import shlex
import shutil
import signal
import sys
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.table import Table

from common.cli.console import console, error_line, say
from common.cli.main import interrupted_status
from common.io import make_output_dir
from common.settings import RunSettings, SettingsError

COMMANDS = ("simulate",)

if TYPE_CHECKING:
    from common.cli.supervisor import Outcome
    from common.run_record import RunRecord
    from simulations.simulate import SimulationResult


def simulate_flags() -> list[str]:
    """The run-config keys ``fedtransfer simulate`` offers as flags."""
    return [f.name.replace("_", "-") for f in fields(RunSettings) if f.metadata["simulate"]]


def add_setting_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per run setting that a simulation offers, with its help and default."""
    defaults = RunSettings()
    for spec in fields(RunSettings):
        if not spec.metadata["simulate"]:
            continue
        flag = "--" + spec.name.replace("_", "-")
        default = getattr(defaults, spec.name)
        shown = repr(default) if default == "" else str(default)
        # None: not given, so the scenario's recipe may set it (settings_from_args)
        options: dict[str, Any] = {"dest": spec.name, "default": None, "help": f"{spec.metadata['help']} ({shown})"}
        if isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **options)
            continue
        if spec.metadata["choices"]:
            options["choices"] = spec.metadata["choices"]
        parser.add_argument(flag, type=type(default), metavar=spec.name.upper(), **options)


def settings_from_args(args: argparse.Namespace) -> tuple[RunSettings, frozenset[str]]:
    """The settings the flags give, and the names of those left at their defaults (a scenario recipe may set them)."""
    given = {f.name: getattr(args, f.name) for f in fields(RunSettings) if getattr(args, f.name, None) is not None}
    if str(given.get("scenario", "")).endswith(".toml"):
        given["scenario"] = str(Path(given["scenario"]).resolve())
    return RunSettings(**given), frozenset(f.name for f in fields(RunSettings)) - set(given)


def _cmd_simulate(args: argparse.Namespace) -> int:
    from common.cli.supervisor import supervise

    settings, open_settings = settings_from_args(args)
    if settings.resume and not settings.out:
        raise SettingsError("--resume needs --out DIR: the folder of the run to continue")
    settings = settings.with_(out=str(make_output_dir(settings.output_dir())))
    if settings.resume:
        console.print(
            f"[bold]fedtransfer simulate[/bold]: resuming the run in {settings.out} with the settings it started with"
        )
    else:
        _banner(settings)
    return _conclude(supervise(settings, open_settings, args.verbose), settings)


def _banner(settings: RunSettings) -> None:
    rounds = f"{settings.rounds} round{'s' if settings.rounds != 1 else ''}"
    console.print(
        f"[bold]fedtransfer simulate[/bold]: scenario {settings.scenario}, {rounds}, "
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


def _program() -> str:
    """How the user called fedtransfer, as they can type it again."""
    invoked = Path(sys.argv[0])
    on_path = shutil.which("fedtransfer")
    if invoked.name != "fedtransfer" or (on_path and Path(on_path).resolve() == invoked.resolve()):
        return "fedtransfer"
    return str(invoked)


def resume_command(out: str) -> str:
    return shlex.join([_program(), "simulate", "--resume", "--out", out])


def _conclude(outcome: Outcome, settings: RunSettings) -> int:
    """Print how the run ended; the exit status says the same (0, an error family's, or 128 + the signal)."""
    from common.cli.simulation_worker import EVENT_CRASH, EVENT_ERROR, EVENT_INTERRUPTED
    from common.run_record import COMPLETED, INTERRUPTED, RUN_RECORD_FILE

    event = outcome.event or {}
    log_note = f"; the run's log: {outcome.log_path}" if outcome.log_path else ""
    stopped_by = interrupted_status(outcome.signum or signal.SIGINT)
    resume = f"\n  {resume_command(settings.out)}"
    if outcome.forced:
        say(
            "Stopped at once: every process of the run was killed, and a site may have been cut off mid-step. The "
            f"run can still be resumed from its last completed round:{resume}"
        )
        return stopped_by
    if event.get("event") == EVENT_INTERRUPTED or (not event and outcome.signum):
        record = Path(settings.out) / RUN_RECORD_FILE
        if event.get("status") == COMPLETED:
            say(f"Interrupted after the federated run completed ({record}); the baselines were not computed.")
        elif event.get("completed"):
            say(
                f"Interrupted after round {event['completed']} of {event['rounds']}: {record} says "
                f'"{INTERRUPTED}"; the round in progress was abandoned. Resume the run with:{resume}'
            )
        elif settings.resume and event.get("status"):
            say(f"Interrupted before the resumed run began; {record} is as it was. Resume it with:{resume}")
        else:
            say("Interrupted before any round completed: nothing to resume; start the run again.")
        return stopped_by
    if event.get("event") == EVENT_ERROR:
        error_line(event["type"], event["message"] + log_note)
        return int(event["exit_status"])
    if event.get("event") == EVENT_CRASH:
        error_line("", f"the simulation failed unexpectedly ({event['type']}: {event['message']}){log_note}")
        return 1
    if not event:
        error_line("", f"the simulation process ended with status {outcome.returncode} without a result{log_note}")
        return 1
    return _finished(outcome)


def _finished(outcome: Outcome) -> int:
    from common.run_record import RUN_RECORD_FILE, RunRecord
    from simulations.baselines import MethodScores
    from simulations.simulate import SimulationResult

    out = Path(outcome.event["out"])
    record = RunRecord.load(out / RUN_RECORD_FILE)
    methods = [MethodScores(**scores) for scores in record.simulator_comparison["methods"]]
    status = _report(SimulationResult(record, out, methods, record.simulator_comparison["metric"]))
    if outcome.worker_crashes:
        pids = ", ".join(map(str, outcome.worker_crashes))
        say(
            f"{len(outcome.worker_crashes)} Ray worker process(es) died during the run (pid {pids}); the run went on, "
            f"and its record lists any site that missed a round. Details: {outcome.log_path}"
        )
    if outcome.log_path is not None:
        say(f"Flower's and Ray's own log: {outcome.log_path}")
    return status


SHORT_NAMES = {
    "source as-is": "source",
    "initial model": "initial",
    "local-only": "local",
    "local-only (DP)": "local DP",
    "federated": "federated",
    "personalised": "personal.",
    "pooled": "pooled",
}


def _short_privacy(privacy: str) -> str:
    if privacy.startswith("DP, epsilon "):
        return "DP e=" + privacy.split()[2].rstrip(",")
    return {"no DP": "no DP", "no site data": "-"}.get(privacy, privacy)


def _report(result: SimulationResult) -> int:
    from simulations.comparison import LABELS, SHOWN, fmt, test_sizes

    methods, metric = result.comparison, result.metric
    summary = Table(title=f"Mean over target sites ({result.record.status}, run {result.record.run_id})")
    for column in ("method", "privacy", *(LABELS[m] for m in SHOWN)):
        summary.add_column(
            column, justify="left" if column in ("method", "privacy") else "right", no_wrap=column == "method"
        )
    for scores in methods:
        summary.add_row(scores.method, _short_privacy(scores.privacy), *(fmt(scores.mean(m)) for m in SHOWN))
    console.print(summary)
    sizes = test_sizes(methods)
    per_site = Table(title=f"{LABELS[metric]} per target site (n: test rows)")
    per_site.add_column("site")
    per_site.add_column("n", justify="right")
    for scores in methods:
        per_site.add_column(SHORT_NAMES.get(scores.method, scores.method), justify="right")
    for site in sorted(sizes):
        cells = (fmt(scores.sites.get(site, {}).get(metric, math.nan)) for scores in methods)
        per_site.add_row(site, str(sizes[site]), *cells)
    console.print(per_site)
    console.print(
        "The simulator scores every model it holds on each site's test split (bootstrap 95% intervals in "
        "report.md). Pooled trains on all target data in one place without DP: a reference, not a bound."
    )
    if any(s.method == "personalised" for s in methods):
        console.print("Personalised: each site's own copy, as the site released it (noisy under DP).")
    else:
        console.print(
            "Personalised results: non-private runs (--no-dp), or private runs that keep part of their budget "
            "for it (--personalise-fraction 0.5)."
        )
    console.print(_privacy_table(result.record))
    console.print(f"Outputs in {result.out}: run-record.json, report.md, metrics.png, comparison.png, final-model/")
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


def add_commands(commands: argparse._SubParsersAction) -> None:
    sim = commands.add_parser(
        "simulate",
        help="run a federated transfer scenario on this machine",
        description="Pretrain (or load) a source model, fine-tune it across simulated sites with Flower's simulation "
        "engine, and compare with source-only, local-only and pooled baselines. Every flag is a run setting "
        "(pyproject.toml's [tool.flwr.app.config] lists the same keys); defaults in parentheses.",
    )
    add_setting_flags(sim)
    sim.set_defaults(func=_cmd_simulate)
