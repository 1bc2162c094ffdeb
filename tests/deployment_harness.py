"""Shared harness of the loopback deployment tests: real Flower processes on 127.0.0.1.

Every process is started in its own session with a private ``FLWR_HOME`` and Flower's
runtime installation, telemetry and update check off; only the process groups a test
started are ever stopped (by pid).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import replace
from pathlib import Path

from common.data.site_config import SiteConfig
from common.data.site_data import SiteData, write_site_data
from common.deploy.approved_apps import approve_app
from common.deploy.provision import COORDINATOR_KIT, Endpoint, KitInfo, ProvisionResult, default_app_dir
from common.privacy.policy import load_policy, write_policy
from common.security.keys import read_identity
from simulations.sites import declared_size
from tests.conftest import FLOWER_ENV

BIN = Path(sys.executable).parent
HAS_FLOWER = (BIN / "flower-superlink").exists()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _process_table() -> dict[int, tuple[int, int, str]]:
    """{pid: (parent pid, start time in clock ticks, state)} of every process, from /proc."""
    table = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        table[int(stat.parent.name)] = (int(fields[1]), int(fields[19]), fields[0])
    return table


def _descendants(root: int, table: dict[int, tuple[int, int, str]]) -> dict[int, int]:
    """{pid: start time} of every live (not zombie) process below ``root``."""
    children: dict[int, list[int]] = {}
    for pid, (parent, _, _) in table.items():
        children.setdefault(parent, []).append(pid)
    found, todo = {}, list(children.get(root, []))
    while todo:
        pid = todo.pop()
        if table[pid][2] != "Z":
            found[pid] = table[pid][1]
        todo += children.get(pid, [])
    return found


def _await_gone(pids: dict[int, int], timeout: float = 30.0) -> None:
    """Wait until every process of ``pids`` ({pid: start time}) that was SIGKILLed has died, reaping those this
    process adopted: a kill is delivered asynchronously, and a loaded machine may take a moment to end a process."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        table = _process_table()
        left = [pid for pid, start in pids.items() if pid in table and table[pid][1] == start and table[pid][2] != "Z"]
        for pid in pids:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
        if not left:
            return
        time.sleep(0.05)


def become_subreaper() -> None:
    """Adopt the orphans of the processes this test starts (Flower's SuperExec leaves its parent's session and
    outlives it), so that stopping them can find them as descendants of this process (Linux PR_SET_CHILD_SUBREAPER)."""
    ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)


class Processes:
    """Processes this test started, each the leader of its own session, and everything they started in turn.

    :meth:`stop_all` stops exactly those, by pid (checked against each process's start time, so a
    reused pid is never touched): the session leaders' groups first, then any descendant this test's
    process adopted, whether the test passed or failed.
    """

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.started: list[tuple[str, subprocess.Popen]] = []
        become_subreaper()
        self.before = set(_descendants(os.getpid(), _process_table()))

    def env(self, flwr_home: Path) -> dict[str, str]:
        return {
            **os.environ,
            **FLOWER_ENV,
            "FLWR_HOME": str(flwr_home),
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        }

    def start(self, name: str, argv: list[str], flwr_home: Path) -> subprocess.Popen:
        log = (self.logs / f"{name}.log").open("wb")
        process = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, env=self.env(flwr_home), start_new_session=True, cwd=self.logs
        )
        log.close()
        self.started.append((name, process))
        return process

    def kill(self, name: str) -> None:
        """SIGKILL the process group started under ``name`` and every process below it: a crash, not a shutdown.

        The processes below it include those that left its session (Flower's SuperExec and the app it
        runs): they would notice their parent's death by being re-parented to init, but this test's
        process adopts them (it is their subreaper), so the crash takes them down with it.
        """
        for started, process in self.started:
            if started == name and process.poll() is None:
                table = _process_table()
                below = _descendants(process.pid, table)
                os.killpg(process.pid, signal.SIGKILL)
                for pid, start in below.items():
                    current = _process_table().get(pid)
                    if current is not None and current[1] == start:
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(pid, signal.SIGKILL)
                process.wait()
                _await_gone(below)

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")

    def stop_all(self) -> None:
        ours = {
            pid: start for pid, start in _descendants(os.getpid(), _process_table()).items() if pid not in self.before
        }
        for _, process in reversed(self.started):
            try:
                os.killpg(process.pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
        deadline = time.monotonic() + 15
        for _, process in reversed(self.started):
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            process.wait()
        self._stop_adopted(ours)

    def _stop_adopted(self, ours: dict[int, int]) -> None:
        """SIGKILL what is left of the processes this test started (by pid and start time), and reap them."""
        table = _process_table()
        ours |= self._ours(table)
        for pid, start in ours.items():
            if pid in table and table[pid][1] == start:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        for pid in ours:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)

    def _ours(self, table: dict[int, tuple[int, int, str]]) -> dict[int, int]:
        return {pid: start for pid, start in _descendants(os.getpid(), table).items() if pid not in self.before}

    def alive(self) -> list[int]:
        """Pids this test started that still run (none after :meth:`stop_all`)."""
        return sorted(self._ours(_process_table()))


def wait_for_port(port: int, process: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"process exited with {process.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.3)
    raise AssertionError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


def flwr(args: list[str], processes: Processes, flwr_home: Path, timeout: float = 60.0) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "flwr"), *args],
        env=processes.env(flwr_home),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=processes.logs,
    )


def last_json(text: str) -> dict:
    return json.loads(text[text.index("{") : text.rindex("}") + 1])


def run_status(run_id: int, federation: str, processes: Processes, flwr_home: Path) -> str:
    listing = flwr(["ls", "--run-id", str(run_id), "--format", "json", federation], processes, flwr_home)
    return last_json(listing.stdout)["runs"][0]["status"] if listing.returncode == 0 else ""


def wait_until_finished(run_id: int, federation: str, processes: Processes, flwr_home: Path, timeout: float) -> str:
    """Poll ``flwr ls`` until the run finishes or ``timeout`` passes; return its last status."""
    status = ""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = run_status(run_id, federation, processes, flwr_home) or status
        if status.startswith("finished"):
            break
        time.sleep(3)
    return status


def wait_for(condition: Callable[[], bool], timeout: float, what: str, interval: float = 1.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


def start_superlink(coordinator: Path, processes: Processes, name: str = "superlink") -> subprocess.Popen:
    """Start the coordinator kit's SuperLink (on its database, on loopback) and wait until it listens."""
    control = Endpoint.parse(KitInfo.load(coordinator).control_address)
    superlink = processes.start(name, [str(coordinator / "start-superlink.sh")], coordinator / "flower-home")
    wait_for_port(control.port, superlink)
    return superlink


def start_gateway(coordinator: Path, processes: Processes) -> subprocess.Popen:
    """Start the coordinator kit's fleet gateway (where the sites dial) and wait until it listens."""
    gateway = processes.start("gateway", [str(coordinator / "start-gateway.sh")], coordinator / "flower-home")
    wait_for_port(Endpoint.parse(KitInfo.load(coordinator).superlink_address).port, gateway)
    return gateway


def start_coordinator(coordinator: Path, processes: Processes) -> None:
    """The SuperLink on loopback and the fleet gateway in front of it, as the deployment walkthrough starts them."""
    start_superlink(coordinator, processes)
    start_gateway(coordinator, processes)


def register_sites(coordinator: Path, processes: Processes) -> None:
    register = subprocess.run(
        [str(coordinator / "register-supernodes.sh")],
        env=processes.env(coordinator / "flower-home"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert register.returncode == 0, register.stdout + register.stderr


def start_run(coordinator: Path, run_config: str, processes: Processes) -> int:
    """Start a run with the coordinator kit's ``run.sh``; return its Flower run id."""
    started = subprocess.run(
        [str(coordinator / "run.sh"), "--run-config", run_config, "--format", "json"],
        env=processes.env(coordinator / "flower-home"),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert started.returncode == 0, started.stdout + started.stderr
    return int(last_json(started.stdout)["run-id"])


def install_kits(result: ProvisionResult, homes: Path) -> ProvisionResult:
    """Copy every kit into its machine's folder (``homes/coordinator``, ``homes/SITE``: where a site made its keys)."""
    kits = {site: homes / site for site in result.site_kits}
    for site, kit in result.site_kits.items():
        shutil.copytree(kit, kits[site], dirs_exist_ok=True)
    shutil.copytree(result.coordinator_kit, homes / COORDINATOR_KIT)
    return replace(result, coordinator_kit=homes / COORDINATOR_KIT, site_kits=kits)


def give_site_data(kit: Path, site: SiteData, feature_names: tuple[str, ...] | None) -> None:
    """What a hospital does before its SuperNode joins: put its data in the kit and declare its size publicly."""
    write_site_data(site, kit / "data", feature_names)
    policy = kit / "state" / "privacy-policy.toml"
    write_policy(replace(load_policy(policy), declared_size=declared_size(len(site.train))), policy)


def approve_the_app(kits: Iterable[Path], processes: Processes, workdir: Path) -> bytes:
    """What each site does once it has reviewed the app: build its FAB with ``flwr build`` from the same checkout
    the coordinator's ``run.sh`` runs, and approve it with its own key (``fedtransfer site approve-app``, in
    process here). Returns the FAB."""
    workdir.mkdir(parents=True, exist_ok=True)
    built = subprocess.run(
        [str(BIN / "flwr"), "build", "--app", str(default_app_dir())],
        env=processes.env(workdir / "flower-home"),
        capture_output=True,
        text=True,
        timeout=120,
        cwd=workdir,
    )
    assert built.returncode == 0, built.stdout + built.stderr
    (fab_file,) = workdir.glob("*.fab")
    fab = fab_file.read_bytes()
    for kit in kits:
        site = SiteConfig.load(kit / "site.toml")
        approve_app(site, fab, "reviewed by the test", read_identity(site.keys_dir, site.site_id))
    return fab
