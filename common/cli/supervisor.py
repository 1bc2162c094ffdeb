"""``fedtransfer simulate`` runs its work in a child process (:mod:`common.cli.simulation_worker`), watched from here.

The child holds PyTorch, Flower and Ray; this process only draws progress and answers signals.
So something is on screen at once; the first Ctrl-C or SIGTERM asks the run to stop cleanly (the
sites finish the step in progress, the round is abandoned, Ray shuts down, the run record says
"interrupted"); a second one stops every process of the run at once. The child runs in its own
session: a Ctrl-C at the terminal reaches this process only, and the second stop can end the
child's whole process group (Ray's processes included) and nothing else. Flower's and Ray's own
output goes to the run's log file unless ``-v``; Ray worker crashes found there are summarised.
"""

from __future__ import annotations

import json
import logging
import os
import re
import select
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from common.cli.console import log_console
from common.cli.main import Signalled
from common.cli.progress import RunProgress
from common.cli.simulation_worker import EVENT_LOG
from common.progress import STARTUP
from common.settings import RunSettings

LOG_FILE = "simulate.log"
#: How Ray's and the workers' output names a worker process that died: by its pid.
WORKER_CRASH = (
    re.compile(r"\((?:\w+ )?pid=(\d+)\) Fatal Python error"),
    re.compile(r"A worker died or was killed .*Worker PID: (\d+)"),
)
STOPPING = (
    "stopping: the sites finish the step in progress, the round is abandoned, then Ray shuts down "
    "(press Ctrl-C again to stop at once)"
)


@dataclass
class Outcome:
    """How the child ended: its last event (result, interrupted, error or crash; None if it sent none)."""

    event: dict[str, Any] | None
    returncode: int
    log_path: Path | None
    signum: int | None = None
    forced: bool = False
    worker_crashes: list[int] = field(default_factory=list)


def worker_crashes(log_path: Path | None) -> list[int]:
    """The pids of the Ray worker processes that the run's log reports dead."""
    if log_path is None or not log_path.is_file():
        return []
    with log_path.open(encoding="utf-8", errors="replace") as lines:
        return sorted({int(m.group(1)) for line in lines for pattern in WORKER_CRASH if (m := pattern.search(line))})


class Supervisor:
    """Starts the child, relays its events to the log and the progress display, and turns signals into stops."""

    def __init__(self, settings: RunSettings, open_settings: frozenset[str], verbose: bool) -> None:
        self.settings = settings
        self.open_settings = open_settings
        self.verbose = verbose
        self.log_path = None if verbose else settings.output_dir() / LOG_FILE
        self.child: subprocess.Popen | None = None
        self.signum: int | None = None
        self.forced = False
        self.announced = False
        self.last: dict[str, Any] | None = None
        self.progress = RunProgress(log_console, enabled=log_console.is_terminal and not verbose)

    def _on_signal(self, signum: int, frame: object) -> None:
        if self.child is None:
            raise Signalled(signum)
        if self.signum is None:
            self.signum = signum
            name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
            self._tell_child(f"stop interrupted by the operator ({name})")
        elif not self.forced:
            self.forced = True
            os.killpg(self.child.pid, signal.SIGKILL)

    def _tell_child(self, line: str) -> None:
        try:
            self.child.stdin.write(line + "\n")
            self.child.stdin.flush()
        except OSError:  # it has exited already
            pass

    def _start(self, events_fd: int) -> subprocess.Popen:
        log = None
        if self.log_path is not None:
            log = self.log_path.open("a", encoding="utf-8")
            log.write(f"--- fedtransfer simulate, {datetime.now():%Y-%m-%d %H:%M:%S} ---\n")
            log.flush()
        try:
            return subprocess.Popen(
                [sys.executable, "-m", "common.cli.simulation_worker", str(events_fd), "1" if self.verbose else "0"],
                stdin=subprocess.PIPE,
                stdout=log,
                stderr=subprocess.STDOUT if log else None,
                pass_fds=(events_fd,),
                start_new_session=True,
                text=True,
            )
        finally:
            if log is not None:
                log.close()

    def run(self) -> Outcome:
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        read_fd, write_fd = os.pipe()
        try:
            with self.progress:
                self.progress.begin(STARTUP, "loading PyTorch, Opacus and Flower")
                try:
                    self.child = self._start(write_fd)
                finally:
                    os.close(write_fd)
                self._tell_child(json.dumps({"settings": self.settings.__dict__, "open": sorted(self.open_settings)}))
                self._relay(read_fd)
            returncode = self._reap()
        finally:
            os.close(read_fd)
            for s, handler in previous.items():
                signal.signal(s, handler)
        return Outcome(self.last, returncode, self.log_path, self.signum, self.forced, worker_crashes(self.log_path))

    def _relay(self, read_fd: int) -> None:
        pending = b""
        while True:
            ready, _, _ = select.select([read_fd], [], [], 0.25)
            self._announce_stop()
            if not ready:
                continue
            chunk = os.read(read_fd, 1 << 16)
            if not chunk:
                return
            *lines, pending = (pending + chunk).split(b"\n")
            for line in lines:
                self._on_event(json.loads(line))

    def _announce_stop(self) -> None:
        if self.signum is not None and not self.announced:
            self.announced = True
            self.progress.note(STOPPING)
            if not self.progress.display.live.is_started:
                log_console.print(STOPPING, highlight=False)

    def _on_event(self, event: dict[str, Any]) -> None:
        if event["event"] != EVENT_LOG:
            self.last = event
            return
        progress = event.get("progress")
        if progress is not None:
            self.progress.update(progress)
            if progress.get("transient"):
                return
        record = logging.makeLogRecord(
            {"name": event["name"], "levelno": event["level"], "levelname": logging.getLevelName(event["level"])}
            | {"msg": event["message"], "args": None, "created": event["created"]}
        )
        logging.getLogger(event["name"]).handle(record)

    def _reap(self) -> int:
        """Wait for the child, stop whatever it left in its process group, then collect its status."""
        os.waitid(os.P_PID, self.child.pid, os.WEXITED | os.WNOWAIT)
        try:
            os.killpg(self.child.pid, signal.SIGKILL)  # the exited child still holds its group id: only its own
        except ProcessLookupError:
            pass
        return self.child.wait()


def supervise(settings: RunSettings, open_settings: frozenset[str], verbose: bool) -> Outcome:
    """Run ``fedtransfer simulate``'s work for ``settings`` in a child process; see the module docstring.

    ``open_settings``: the settings the user left open, which the scenario's recipe may set."""
    return Supervisor(settings, open_settings, verbose).run()
