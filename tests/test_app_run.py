"""``fedtransfer app run``: the Flower App on Flower's own simulation runtime, with a private SuperLink.

The slow tests run the real thing (``flower-superlink``, ``flwr run``, the simulation runtime, Ray)
and check what ``flwr run --stream`` alone does not: the exit status follows the run's final
status, and no process of the run outlives the command.
"""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from common.cli.app import connection_toml, flower_env, run_config_args
from common.run_record import RUN_RECORD_FILE, RunRecord
from common.settings import RunSettings

FEDTRANSFER = Path(sys.executable).with_name("fedtransfer")


def test_only_changed_settings_travel_as_toml_run_config() -> None:
    args = run_config_args(RunSettings(rounds=2, out="/tmp/a b", dp=False, lr=0.1))
    pairs = dict(arg.split("=", 1) for arg in args[1::2])
    assert args[::2] == ["--run-config"] * 4
    assert tomllib.loads("\n".join(f"{k} = {v}" for k, v in pairs.items())) == {
        "rounds": 2,
        "out": "/tmp/a b",
        "dp": False,
        "lr": 0.1,
    }


def test_flower_finds_this_installations_tools_and_its_own_superlink(tmp_path: Path) -> None:
    env = flower_env(tmp_path)
    assert env["PATH"].split(":")[0] == str(Path(sys.executable).parent)
    assert (Path(env["PATH"].split(":")[0]) / "flower-superlink").is_file()
    assert env["FLWR_HOME"] == str(tmp_path) and env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] == "1"
    config = tomllib.loads(connection_toml(45678))
    connection = config["superlink"][config["superlink"]["default"]]
    assert connection == {"address": "127.0.0.1:45678", "insecure": True}


def _ours_alive(flwr_home: Path) -> list[int]:
    """Processes whose environment names this run's private FLWR_HOME."""
    alive = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if f"FLWR_HOME={flwr_home}".encode() in environ.read_bytes().split(b"\0"):
                alive.append(int(environ.parent.name))
        except OSError:
            continue
    return alive


@pytest.mark.slow
def test_app_run_completes_and_stops_what_it_started(tmp_path: Path) -> None:
    out = tmp_path / "run"
    done = subprocess.run(
        [str(FEDTRANSFER), "app", "run", "--rounds", "1", "--out", str(out)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "finished:completed" in done.stdout
    assert RunRecord.load(out / RUN_RECORD_FILE).status == "completed"
    assert _ours_alive(out / "flwr-home") == []


@pytest.mark.slow
def test_a_failed_run_is_a_failure_exit_status_not_zero(tmp_path: Path) -> None:
    out = tmp_path / "run"
    done = subprocess.run(
        [str(FEDTRANSFER), "app", "run", "--checkpoint", str(tmp_path / "missing"), "--out", str(out)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 6, done.stdout + done.stderr
    error = done.stderr.strip().splitlines()[-1]
    assert error.startswith("error (AppRunFailed): Flower run") and "finished:failed" in error
    assert "no model card" in error and "flwr run exited 0" in error  # what flwr run --stream alone reports
    assert _ours_alive(out / "flwr-home") == []
