"""Progress as log records: library code says what it is doing and how far it got; only the CLI renders it.

A record carries a :class:`Progress` under the ``progress`` attribute (``log.info(..., extra=progress(...))``).
``fedtransfer simulate`` turns these into a progress display on a terminal; everywhere else they are
ordinary log lines, except *transient* ones (a count of replies, say), which only a display shows.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

PROGRESS = "progress"

#: The tasks a run reports, in the order they happen.
STARTUP, PRETRAINING, ROUNDS, BASELINES = "start-up", "pretraining", "rounds", "baselines"


@dataclass(frozen=True)
class Progress:
    """Where one task stands: ``completed`` of ``total`` (None: not countable), what it is doing now."""

    task: str
    completed: float | None = None
    total: float | None = None
    detail: str = ""
    transient: bool = False
    finished: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def progress(task: str, **fields: Any) -> dict[str, Progress]:
    """The ``extra`` of a log call that reports progress on ``task``."""
    return {PROGRESS: Progress(task, **fields)}
