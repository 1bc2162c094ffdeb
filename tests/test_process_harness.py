"""The deployment tests' harness stops every process a test started, even the ones that left its session."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

from tests.deployment_harness import Processes

ESCAPEE = """
import os, subprocess, sys, time
# like Flower's SuperExec: a child in a session of its own that outlives its parent
subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"], start_new_session=True)
print("started", flush=True)
time.sleep(300)
"""


def test_stop_all_stops_descendants_in_other_sessions_and_orphans(tmp_path: Path) -> None:
    processes = Processes(tmp_path)
    processes.start("parent", [sys.executable, "-c", ESCAPEE], tmp_path)
    deadline = time.monotonic() + 30
    while len(processes.alive()) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(processes.alive()) == 2
    parent = processes.started[0][1]
    os.kill(parent.pid, signal.SIGKILL)  # the parent alone dies: its child is orphaned and adopted by this process
    parent.wait()
    assert len(processes.alive()) == 1
    processes.stop_all()
    assert processes.alive() == []


def test_a_crash_takes_down_what_the_process_started(tmp_path: Path) -> None:
    processes = Processes(tmp_path)
    processes.start("parent", [sys.executable, "-c", ESCAPEE], tmp_path)
    deadline = time.monotonic() + 30
    while len(processes.alive()) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(processes.alive()) == 2
    processes.kill("parent")  # as a crashed coordinator machine: the child in its own session goes too
    assert processes.alive() == []
