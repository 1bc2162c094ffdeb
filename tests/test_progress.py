"""Something on screen at once: the CLI answers before PyTorch loads, and the run's progress crosses to it.

``fedtransfer simulate`` prints its banner and starts its progress display in a process that never
loads PyTorch, Opacus, Flower or Ray (the run's own child process does); library code reports
progress as log records, which the child sends to the CLI as JSON and the CLI draws on a terminal.
"""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys

from rich.console import Console

from common.cli.progress import RunProgress
from common.cli.simulation_worker import EVENT_LOG, EventChannel, EventHandler
from common.progress import PRETRAINING, ROUNDS, STARTUP, progress

HEAVY = ("torch", "opacus", "flwr", "ray", "sklearn", "matplotlib")


def test_the_cli_and_the_simulate_supervisor_load_no_heavy_library() -> None:
    script = (
        "import sys\n"
        "from common.cli.main import build_parser\n"
        "import common.cli.supervisor\n"
        "build_parser('simulate').parse_args(['simulate', '--rounds', '2'])\n"
        "build_parser().parse_args(['audit', '--json'])\n"
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r}))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]", done.stdout


def test_progress_records_cross_to_the_cli_as_json() -> None:
    stream = io.StringIO()
    logger = logging.getLogger("tests.progress.crossing")
    logger.addHandler(EventHandler(EventChannel(stream)))
    logger.setLevel(logging.INFO)
    logger.info("round %d/%d done", 1, 3, extra=progress(ROUNDS, completed=1, total=3))
    event = json.loads(stream.getvalue())
    assert event["event"] == EVENT_LOG and event["message"] == "round 1/3 done"
    assert event["progress"] == {
        "task": ROUNDS,
        "completed": 1,
        "total": 3,
        "detail": "",
        "transient": False,
        "finished": False,
    }


def _frame(display: RunProgress) -> str:
    console = Console(file=io.StringIO(), width=160, color_system=None, force_terminal=True)
    console.print(display.display.get_renderable())
    return console.file.getvalue()


def test_the_display_follows_the_run_and_says_what_the_first_round_waits_for() -> None:
    display = RunProgress(Console(file=io.StringIO(), force_terminal=True), enabled=True)
    display.begin(STARTUP, "loading PyTorch, Opacus and Flower")
    assert "starting" in _frame(display) and "loading PyTorch" in _frame(display)
    display.update(progress(PRETRAINING, detail="mlp on the source domain", transient=True)["progress"].to_dict())
    display.update(progress(ROUNDS, completed=0, total=3)["progress"].to_dict())
    display.update(progress(ROUNDS, detail="training: 0 of 4 sites replied", transient=True)["progress"].to_dict())
    frame = _frame(display)
    assert "0/3" in frame and "round 1: training: 0 of 4 sites replied" in frame and "calibrates its noise" in frame
    display.update(progress(ROUNDS, completed=1, total=3)["progress"].to_dict())
    display.update(progress(ROUNDS, detail="training: 2 of 4 sites replied", transient=True)["progress"].to_dict())
    frame = _frame(display)
    assert "1/3" in frame and "round 2: training: 2 of 4 sites replied" in frame and "calibrates" not in frame
    display.note("stopping")
    assert "stopping" in _frame(display)


def test_the_display_draws_nothing_when_stderr_is_not_a_terminal() -> None:
    stream = io.StringIO()
    console = Console(file=stream)
    with RunProgress(console, enabled=console.is_terminal) as display:
        display.begin(STARTUP, "loading")
        display.update(progress(ROUNDS, completed=1, total=3)["progress"].to_dict())
    assert stream.getvalue() == ""
