"""The process that runs ``fedtransfer simulate``'s work, started and watched by :mod:`common.cli.supervisor`.

It runs in a session of its own, so a Ctrl-C at the terminal reaches only the ``fedtransfer``
process, which asks this one to stop by writing ``stop REASON`` to its standard input (an end
of input means that process is gone: stop too). Its own standard output and error (Flower's,
Ray's and the Ray workers' logs) go to the run's log file unless ``-v``. fedtransfer's log
records, with their progress, and the outcome go to the supervisor as JSON lines on the file
descriptor given as the first argument.

Usage (by the supervisor only): ``python -m common.cli.simulation_worker EVENTS_FD VERBOSE`` with
``{"settings": {...}, "open": [names of the settings left open]}`` as one JSON line on standard input.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import traceback
from datetime import UTC, datetime
from typing import Any, TextIO

from common.cli.main import FLOWER_ENV, OUR_LOGGERS, tune_flower_logging
from common.errors import FedtransferError
from common.interrupt import RunInterrupted, StopRequest
from common.progress import PROGRESS
from common.run_record import INTERRUPTED, RUN_RECORD_FILE, RunRecord
from common.settings import RunSettings

#: The events this process sends, one JSON object per line, each with its ``event``.
EVENT_LOG, EVENT_RESULT, EVENT_INTERRUPTED = "log", "result", "interrupted"
EVENT_ERROR, EVENT_CRASH = "error", "crash"


class EventChannel:
    """JSON lines to the supervisor; safe from any thread."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.lock = threading.Lock()

    def send(self, event: str, **fields: Any) -> None:
        line = json.dumps({"event": event, **fields}, default=str)
        with self.lock:
            self.stream.write(line + "\n")
            self.stream.flush()


class EventHandler(logging.Handler):
    """Sends each log record, with its progress, to the supervisor."""

    def __init__(self, channel: EventChannel) -> None:
        super().__init__()
        self.channel = channel

    def emit(self, record: logging.LogRecord) -> None:
        progress = getattr(record, PROGRESS, None)
        try:
            self.channel.send(
                EVENT_LOG,
                name=record.name,
                level=record.levelno,
                message=record.getMessage(),
                created=record.created,
                progress=progress.to_dict() if progress is not None else None,
            )
        except (OSError, ValueError):  # the supervisor is gone; the log file still has the record
            self.handleError(record)


def _setup_logging(channel: EventChannel, verbose: bool) -> None:
    """fedtransfer's records go to the supervisor (and, without ``-v``, to the log file); the rest to stderr."""
    for key, value in FLOWER_ENV.items():
        os.environ.setdefault(key, value)
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr, force=True
    )
    to_supervisor = EventHandler(channel)
    to_log_file = logging.StreamHandler(sys.stderr)
    to_log_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    for name in OUR_LOGGERS:
        ours = logging.getLogger(name)
        ours.setLevel(logging.INFO)
        ours.propagate = False
        ours.handlers = [to_supervisor] if verbose else [to_supervisor, to_log_file]
    tune_flower_logging(verbose=True)  # Flower's log goes where stderr goes: the log file, or the screen with -v
    if not verbose:
        from flwr.supercore.logger import update_console_handler

        update_console_handler(timestamps=True, colored=False)
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")


def _watch_supervisor(stop: StopRequest) -> None:
    """Turn ``stop REASON`` on stdin, or its end, into a SIGINT to this process (its handler decides what stops)."""
    for line in sys.stdin:
        if line.startswith("stop"):
            stop.reason = stop.reason or line.removeprefix("stop").strip()
            os.kill(os.getpid(), signal.SIGINT)
    stop.reason = stop.reason or "the fedtransfer process that started the run ended"
    os.kill(os.getpid(), signal.SIGINT)


def _interrupted_early(channel: EventChannel, settings: RunSettings, started: str) -> None:
    """Stopped outside the federation: say how the run's record stands, if this run (or the resumed one) has one.

    Only light modules here: the stop may have cut an import short.
    """
    path = settings.output_dir() / RUN_RECORD_FILE
    record = RunRecord.load(path) if path.is_file() else None
    mine = record is not None and (settings.resume or record.started >= started)
    channel.send(EVENT_INTERRUPTED, status=record.status if mine else None, completed=None, rounds=settings.rounds)


def run(channel: EventChannel, settings: RunSettings, open_settings: frozenset[str], verbose: bool) -> int:
    started = datetime.now(UTC).isoformat(timespec="seconds")
    stop = StopRequest()
    try:
        signal.signal(signal.SIGINT, lambda signum, frame: stop.request(stop.reason or "SIGINT"))
        threading.Thread(target=_watch_supervisor, args=(stop,), name="supervisor-watch", daemon=True).start()
        _setup_logging(channel, verbose)
        from simulations.simulate import simulate

        result = simulate(settings, open_settings, stop)
        if stop.is_set() and result.record.status != INTERRUPTED:
            stop.check()
    except RunInterrupted:
        _interrupted_early(channel, settings, started)
        return 1
    except FedtransferError as err:
        channel.send(EVENT_ERROR, type=type(err).__name__, exit_status=err.exit_status, message=str(err))
        return err.exit_status
    except Exception as err:  # noqa: BLE001 - reported in one line; the traceback goes to the log
        traceback.print_exc()
        channel.send(EVENT_CRASH, type=type(err).__name__, message=str(err))
        return 1
    if result.record.status == INTERRUPTED:
        from server.federation import completed_round

        completed = completed_round(result.record, result.out)
        rounds = result.record.settings["rounds"]
        channel.send(EVENT_INTERRUPTED, status=INTERRUPTED, completed=completed, rounds=rounds)
        return 1
    channel.send(EVENT_RESULT, out=str(result.out))  # the comparison is in the run record
    return 0


def main() -> int:
    events_fd, verbose = int(sys.argv[1]), sys.argv[2] == "1"
    given = json.loads(sys.stdin.readline())
    with os.fdopen(events_fd, "w", encoding="utf-8") as events:
        return run(EventChannel(events), RunSettings(**given["settings"]), frozenset(given["open"]), verbose)


if __name__ == "__main__":
    sys.exit(main())
