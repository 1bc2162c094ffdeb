"""``fedtransfer app run``: the repository's Flower App on Flower's own simulation runtime, set up and checked.

``flwr run`` by hand trips over four things (see DESIGN.md's Flower facts): it looks up
``flower-superlink`` on PATH; its default ``:local:`` connection starts a detached SuperLink on
fixed ports that outlives the command, may belong to another user's session on a shared
machine, and keeps the working directory of its first run; and ``flwr run --stream`` exits 0
even when the run failed. This command starts a SuperLink of its own (127.0.0.1, a free port, a
private ``FLWR_HOME`` in the output folder, Flower's environment switches, a neutral working
directory), runs the app on it, reads the run's final status with ``flwr ls``, stops every
process it started, and exits non-zero unless the run completed.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from common.cli.console import console, say
from common.cli.main import FLOWER_ENV, Signalled, interrupted_status
from common.cli.simulate import add_setting_flags, settings_from_args
from common.data.site_config import SIM_ROOT_ENV
from common.errors import DeploymentError
from common.io import make_output_dir
from common.settings import RunSettings, SettingsError

COMMANDS = ("app",)
APP_DIR = Path(__file__).resolve().parents[2]  # the repository root is the Flower App
CONNECTION = "fedtransfer-local"
FLWR_HOME_DIR = "flwr-home"
SUPERLINK_LOG = "superlink.log"
RUN_LOG = "flwr-run.log"
COMPLETED = "finished:completed"
STARTUP_TIMEOUT = 60.0


class AppRunFailed(DeploymentError):
    """The Flower App run did not complete; the message names its status and the logs."""


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def flower_env(flwr_home: Path) -> dict[str, str]:
    """The environment every Flower process of the run gets: this installation's tools first on PATH."""
    tools = str(Path(sys.executable).parent)
    return os.environ | FLOWER_ENV | {"FLWR_HOME": str(flwr_home), "PATH": os.pathsep.join([tools, os.environ["PATH"]])}


def connection_toml(port: int) -> str:
    """``$FLWR_HOME/config.toml``: one connection, to the SuperLink this command started."""
    return (
        f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
        f'address = "127.0.0.1:{port}"\ninsecure = true\n'
    )


def run_config_args(settings: RunSettings) -> list[str]:
    """``--run-config KEY=VALUE`` for every setting that differs from the app's defaults (TOML values)."""
    defaults = RunSettings().as_run_config()
    changed = {k: v for k, v in settings.as_run_config().items() if v != defaults[k]}
    return [arg for key, value in changed.items() for arg in ("--run-config", f"{key}={json.dumps(value)}")]


class LocalFederation:
    """A SuperLink in simulation mode that this process started, and the ``flwr`` calls that use it."""

    def __init__(self, out: Path, sim_root: Path) -> None:
        self.out = out
        self.home = out / FLWR_HOME_DIR
        self.home.mkdir(parents=True, exist_ok=True)
        self.env = flower_env(self.home) | {SIM_ROOT_ENV: str(sim_root)}
        self.port = _free_port()
        self.superlink: subprocess.Popen | None = None
        self.run: subprocess.Popen | None = None

    def start(self) -> None:
        (self.home / "config.toml").write_text(connection_toml(self.port), encoding="utf-8")
        command = ["flower-superlink", "--insecure", "--simulation", "--isolation", "subprocess"]
        command += ["--host", "127.0.0.1", "--port", str(self.port), "--database", str(self.home / "state.db")]
        command += ["--log-file", str(self.home / SUPERLINK_LOG)]
        with (self.home / "superlink.out").open("w", encoding="utf-8") as output:
            self.superlink = subprocess.Popen(
                command,
                env=self.env,
                cwd=self.out,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its whole group (simulation runtime, Ray) is stopped at the end
            )
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while not self._healthy():
            if self.superlink.poll() is not None or time.monotonic() > deadline:
                raise AppRunFailed(
                    f"the local SuperLink did not start on 127.0.0.1:{self.port}; see {self.home / 'superlink.out'}"
                )
            time.sleep(0.5)

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as answer:
                return answer.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def flwr(self, *args: str, **options: Any) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["flwr", *args], env=self.env, cwd=self.out, capture_output=True, text=True, timeout=120, **options
        )

    def run_app(self, settings: RunSettings, sites: int, show: bool) -> int:
        """``flwr run --stream`` on this SuperLink, its output in the run's log (and on stderr with ``show``)."""
        federation = f"num-supernodes={sites} client-resources-num-cpus=1"
        command = ["flwr", "run", str(APP_DIR), CONNECTION, "--stream", *run_config_args(settings)]
        with (self.out / RUN_LOG).open("a", encoding="utf-8") as log:
            self.run = subprocess.Popen(
                [*command, "--federation-config", federation],
                env=self.env,
                cwd=self.out,
                stdout=subprocess.PIPE if show else log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                text=True,
            )
            if show:
                for line in self.run.stdout:
                    log.write(line)
                    sys.stderr.write(line)
            return self.run.wait()

    def last_run(self) -> dict[str, Any]:
        """The run's entry in ``flwr ls`` (this SuperLink holds this command's run only)."""
        listing = self.flwr("ls", CONNECTION, "--format", "json")
        try:
            runs = json.loads(listing.stdout[listing.stdout.index("{") :])["runs"]
        except (ValueError, KeyError) as err:
            raise AppRunFailed(f"flwr ls gave no run list ({listing.stdout.strip()[:200]})") from err
        return runs[-1] if runs else {}

    def stop(self) -> None:
        """Stop every process this command started, politely, then for good.

        ``flwr run`` and the SuperLink each lead a process group; the SuperLink starts its SuperExec in a
        session of its own, which holds the simulation runtime and Ray: every group found under them goes.
        """
        started = [p for p in (self.run, self.superlink) if p is not None]
        groups = {pgid for p in started for pgid in _groups_under(p.pid)}
        for signum in (signal.SIGTERM, signal.SIGKILL):
            for pgid in groups:
                try:
                    os.killpg(pgid, signum)
                except ProcessLookupError:
                    pass
            for process in started:
                try:
                    process.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    continue


def _groups_under(root: int) -> set[int]:
    """The process groups of ``root`` and of every process descended from it (Linux /proc)."""
    parents: dict[int, int] = {}
    groups: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        pid = int(stat.parent.name)
        parents[pid], groups[pid] = int(fields[1]), int(fields[2])
    found, todo = {root}, [root]
    while todo:
        parent = todo.pop()
        children = [pid for pid, ppid in parents.items() if ppid == parent and pid not in found]
        found.update(children)
        todo += children
    return {groups[pid] for pid in found if pid in groups} | {root}


def _with_scenario(settings: RunSettings, open_settings: frozenset[str]) -> tuple[RunSettings, int]:
    """The settings with the scenario's recipe applied to those left open, as ``fedtransfer simulate`` does, and
    the simulated sites and the coordinator's keys written (a resumed run keeps its own settings and keys);
    returns the settings bound to them and the number of simulated sites."""
    from common.data.scenarios import load_scenario
    from common.run_record import RUN_RECORD_FILE, RunRecord
    from simulations.simulate import with_recipe
    from simulations.sites import prepare_sites

    chosen = settings
    if settings.resume:
        record = Path(settings.out) / RUN_RECORD_FILE
        if not record.is_file():
            raise AppRunFailed(f"nothing to resume in {settings.out}: it holds no {RUN_RECORD_FILE}")
        chosen = RunSettings(**{**RunRecord.load(record).settings, "resume": True, "out": settings.out})
    scenario = load_scenario(
        chosen.scenario,
        seed=chosen.seed,
        data_dir=Path(chosen.data_dir) if chosen.data_dir else None,
        private=not chosen.per_site_scaling,
    )
    if not settings.resume:
        chosen = settings = with_recipe(settings, scenario, open_settings)
    prepared = prepare_sites(chosen)
    keys = {"coordinator_keys": prepared.coordinator_keys, "manifest": prepared.manifest}
    return settings.with_(sim_root=prepared.sim_root, **keys), len(scenario.sites)


def _cmd_app_run(args: argparse.Namespace) -> int:
    settings, open_settings = settings_from_args(args)
    if settings.resume and not settings.out:
        raise SettingsError("--resume needs --out DIR: the folder of the run to continue")
    out = make_output_dir(settings.output_dir())
    settings = settings.with_(out=str(out), sim_root=str(Path(settings.sim_root or out / "sites").resolve()))
    settings, sites = _with_scenario(settings, open_settings)
    console.print(
        f"[bold]fedtransfer app run[/bold]: the Flower App in {APP_DIR} on a local SuperLink, {sites} simulated "
        f"sites; logs in {out / RUN_LOG}"
    )
    federation = LocalFederation(out, Path(settings.sim_root))
    try:
        federation.start()
        code = federation.run_app(settings, sites, show=args.verbose)
        run = federation.last_run()
    except Signalled as stop:
        federation.stop()
        resume = shlex.join(["fedtransfer", "app", "run", "--resume", "--out", str(out)])
        say(f"Interrupted: the run and its SuperLink were stopped. Resume from the last completed round::\n  {resume}")
        return interrupted_status(stop.signum)
    finally:
        federation.stop()
    status = run.get("status", "no run")
    if status != COMPLETED:
        raise AppRunFailed(
            f"Flower run {run.get('run-id', '?')} ended {status} ({run.get('status-details', 'no details')}), "
            f"flwr run exited {code}; see {out / RUN_LOG} and {federation.home / SUPERLINK_LOG}"
        )
    return _summary(out, run)


def _summary(out: Path, run: dict[str, Any]) -> int:
    from common.run_record import COMPLETED as RECORD_COMPLETED
    from common.run_record import RUN_RECORD_FILE, RunRecord

    record = RunRecord.load(out / RUN_RECORD_FILE)
    rounds = sum(1 for r in record.rounds if r.aggregated_sites)
    console.print(
        f"Flower run {run['run-id']} {run['status']} in {run.get('elapsed', 0):.0f} s: run record says "
        f"{record.status!r}, {rounds} round(s) aggregated. Outputs in {out}: run-record.json, report.md, final-model/"
    )
    return 0 if record.status == RECORD_COMPLETED else 1


def add_commands(commands: argparse._SubParsersAction) -> None:
    app = commands.add_parser(
        "app",
        help="run the Flower App with Flower's own simulation runtime",
        description="Commands for the repository's Flower App (server.app:app, client.app:app).",
    )
    sub = app.add_subparsers(dest="app_command", required=True)
    run = sub.add_parser(
        "run",
        help="flwr run on a private local SuperLink, checked",
        description=__doc__.split("\n\n", 1)[1],
    )
    add_setting_flags(run)
    run.set_defaults(func=_cmd_app_run)
