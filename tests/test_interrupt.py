"""Stopping a run when the operator asks (Ctrl-C, SIGTERM): at once before it begins, cleanly during it.

The in-process tests stop a real federation (ServerApp logic, strategy, ClientApps, ledgers) from
inside a round and resume it. The subprocess tests send signals to a real ``fedtransfer simulate``
(Flower's simulation engine, Ray) the way a terminal does: to the CLI's process group. The CLI
starts its work in a child process of its own session, so each test also checks that no process
of that session outlives the command.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from common.interrupt import RunInterrupted, StopRequest
from common.run_record import RUN_RECORD_FILE, RunRecord

REPO = Path(__file__).resolve().parents[1]
FEDTRANSFER = Path(sys.executable).with_name("fedtransfer")


def test_a_stop_request_interrupts_at_once_outside_the_federation_and_only_flags_inside() -> None:
    stop = StopRequest()
    with stop.graceful():
        stop.request("inside")
        assert stop.is_set()
    with pytest.raises(RunInterrupted, match="inside"):  # the first reason stays
        stop.check()
    with pytest.raises(RunInterrupted):
        StopRequest().request("outside")


# in process: a real federation stopped inside a round ---------------------------------------------


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A 3-round run stopped while its sites answer round 2, then resumed."""
    from client.app import app as client_app
    from common.settings import RunSettings
    from server.federation import run_federation
    from simulations.inprocess import DirectGrid
    from simulations.sites import prepare_sites
    from tests.conftest import write_shifted_study

    root = tmp_path_factory.mktemp("interrupt")
    settings = RunSettings(
        scenario=str(write_shifted_study(root / "study")),
        rounds=3,
        local_epochs=1,
        out=str(root / "out"),
        sim_root=str(root / "sites"),
        min_sites=2,
        expected_sites=3,
    )
    settings = prepare_sites(settings)
    stop = StopRequest()
    grid = DirectGrid(client_app, 3, run_id=601)
    grid.place_sites(Path(settings.sim_root))

    def stop_in_round_two(node: int, reply):
        if reply.metadata.message_type == "train" and len(grid.delivered) > 3:
            stop.request("interrupted by the test")
        return reply

    grid.on_reply = stop_in_round_two
    with stop.graceful():
        first = run_federation(grid, settings, 601, stop)
    saved = RunRecord.load(root / "out" / RUN_RECORD_FILE)
    final_after_stop = (root / "out" / "final-model").exists()
    again = DirectGrid(client_app, 3, run_id=602)
    again.place_sites(Path(settings.sim_root))
    resumed = run_federation(again, prepare_sites(settings.with_(resume=True)), 602)
    return {"root": root, "first": first, "saved": saved, "final": final_after_stop, "resumed": resumed}


@pytest.mark.federation
def test_a_run_stopped_in_a_round_ends_interrupted_after_its_last_completed_round(interrupted: dict) -> None:
    from server.federation import completed_round

    record = interrupted["saved"]
    assert record.status == "interrupted"
    assert record.stop_reason == "interrupted by the test; rounds completed: 1 of 3"
    assert completed_round(record, interrupted["root"] / "out") == 1
    assert [r.server_round for r in record.rounds] == [0, 1, 2]  # round 2 began: the sites may have spent on it
    assert not record.rounds[2].aggregated_sites
    assert not interrupted["final"]  # the run is not over: no final model until it completes


@pytest.mark.federation
def test_the_resumed_run_never_reuses_the_abandoned_round(interrupted: dict) -> None:
    from common.privacy.ledger import TRAIN, Ledger

    record = interrupted["resumed"]
    assert record.status == "completed" and record.run_id == interrupted["first"].run_id
    assert [r.server_round for r in record.rounds] == [0, 1, 3]
    assert [r.server_round for r in record.abandoned_rounds] == [2]
    for site in range(3):
        entries = Ledger(interrupted["root"] / "sites" / f"site-{site}" / "state").entries()
        spends = [(e.server_round, e.kind) for e in entries]
        assert len(spends) == len(set(spends))
        assert [e.server_round for e in entries if e.kind == TRAIN] == [1, 2, 3]  # 2: spent, then abandoned


# a real `fedtransfer simulate`, signalled like a terminal does ------------------------------------


def _descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        for task in Path(f"/proc/{current}/task").glob("*"):
            try:
                children = [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                continue
            found += children
            todo += children
    return found


def _worker(cli: subprocess.Popen) -> int:
    """The pid of the CLI's child (the run's own session), once it exists."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for pid in _descendants(cli.pid):
            try:
                if "common.cli.simulation_worker" in Path(f"/proc/{pid}/cmdline").read_text():
                    return pid
            except OSError:
                continue
        assert cli.poll() is None, "the CLI ended before starting its worker"
        time.sleep(0.05)
    raise AssertionError("the CLI started no worker within 60 s")


def _session_alive(session: int) -> list[int]:
    """Processes still in the session the worker led (Ray's included)."""
    alive = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == session and fields[0] != "Z":  # field 6 of stat: the session id
            alive.append(int(stat.parent.name))
    return alive


def _start(out: Path, *flags: str) -> subprocess.Popen:
    return subprocess.Popen(
        [str(FEDTRANSFER), "simulate", "--out", str(out), *flags],
        cwd=out.parent,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, like a shell job: the signal goes to the group
    )


def _signal_and_wait(cli: subprocess.Popen, signum: int) -> tuple[str, str, float]:
    os.killpg(cli.pid, signum)
    sent = time.monotonic()
    try:
        out, err = cli.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(cli.pid, signal.SIGKILL)
        cli.communicate()
        name = signal.Signals(signum).name
        raise AssertionError(f"fedtransfer simulate did not stop within 120 s of {name}") from None
    return out, err, time.monotonic() - sent


def _wait_for(path: Path, cli: subprocess.Popen, seconds: float = 600) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert cli.poll() is None, f"the run ended before {path} appeared: {cli.communicate()}"
        assert time.monotonic() < deadline, f"{path} did not appear within {seconds:g} s"
        time.sleep(0.1)


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_during_a_round_stops_simulate_cleanly_and_the_printed_command_resumes_it(
    tmp_path: Path, signum: int
) -> None:
    out = tmp_path / "run"
    cli = _start(out, "--rounds", "3")
    session = _worker(cli)
    _wait_for(out / "checkpoints" / "round-1" / "strategy-state.safetensors", cli)
    stdout, stderr, took = _signal_and_wait(cli, signum)
    print(f"{signal.Signals(signum).name}: stopped {took:.1f} s after the signal")

    assert cli.returncode == 128 + signum, stderr
    assert "Traceback" not in stdout + stderr
    assert _session_alive(session) == []  # Ray's processes too
    record = RunRecord.load(out / RUN_RECORD_FILE)
    assert record.status == "interrupted", record.stop_reason
    name = "Ctrl-C" if signum == signal.SIGINT else "SIGTERM"
    assert record.stop_reason.startswith(f"interrupted by the operator ({name}); rounds completed: ")
    completed = int(record.stop_reason.split("rounds completed: ")[1].split()[0])
    assert completed >= 1 and f"Interrupted after round {completed} of 3" in stderr
    command = stderr.strip().splitlines()[-1].strip()
    assert shlex.split(command)[1:] == ["simulate", "--resume", "--out", str(out)]
    if signum != signal.SIGINT:
        return
    resumed = subprocess.run(
        [str(FEDTRANSFER), *shlex.split(command)[1:]], cwd=out.parent, capture_output=True, text=True, timeout=900
    )
    assert resumed.returncode == 0, resumed.stderr
    record = RunRecord.load(out / RUN_RECORD_FILE)
    begun = [r.server_round for r in record.abandoned_rounds]
    assert record.status == "completed"
    # The signal lands inside round completed + 1 (begun, then abandoned: its number is not reused) or, when it
    # comes just between two rounds, before that round began (nothing abandoned); either way nothing is lost.
    if begun:
        assert begun == [completed + 1]
        assert [r.server_round for r in record.rounds] == [0, *range(1, completed + 1), *range(completed + 2, 4)]
    else:
        assert [r.server_round for r in record.rounds] == [0, 1, 2, 3]


@pytest.mark.slow
def test_ctrl_c_during_start_up_ends_in_one_line_and_leaves_nothing_running(tmp_path: Path) -> None:
    early = subprocess.Popen(
        [str(FEDTRANSFER), "simulate", "--out", str(tmp_path / "early")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    time.sleep(0.05)  # the CLI is still loading
    _, stderr, _ = _signal_and_wait(early, signal.SIGINT)
    assert early.returncode == 130 and "Traceback" not in stderr

    cli = _start(tmp_path / "run")
    session = _worker(cli)  # the worker exists: it is loading PyTorch and Flower
    stdout, stderr, _ = _signal_and_wait(cli, signal.SIGINT)
    assert cli.returncode == 130
    assert "Traceback" not in stdout + stderr
    assert "nothing to resume" in stderr
    assert _session_alive(session) == []
    log = (tmp_path / "run" / "simulate.log").read_text()
    assert "Traceback" not in log, log
