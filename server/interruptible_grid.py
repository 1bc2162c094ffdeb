"""A Grid that stops waiting when the operator asks, and reports each reply as it arrives.

Flower's grids wait for the sites' replies until all have come or the round times out.
Wrapped in :class:`InterruptibleGrid`, every wait also ends as soon as a stop is requested
(:class:`common.interrupt.RunInterrupted`), and the number of replies received so far is
logged as transient progress.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

from flwr.app import Message
from flwr.serverapp import Grid

from common.interrupt import StopRequest
from common.progress import ROUNDS, progress

log = logging.getLogger(__name__)

PULL_INTERVAL = 0.1
PHASES = {"train": "training", "evaluate": "evaluating"}


class InterruptibleGrid(Grid):
    """Delegates to ``grid``; each call raises ``RunInterrupted`` once ``stop`` is set."""

    def __init__(self, grid: Grid, stop: StopRequest) -> None:
        self.grid = grid
        self.stop = stop

    def set_run(self, run_id: int) -> None:
        self.grid.set_run(run_id)

    @property
    def run(self):  # noqa: ANN201 - Flower's Run
        return self.grid.run

    def create_message(self, *args, **kwargs) -> Message:
        return self.grid.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        self.stop.check()
        return self.grid.get_node_ids()

    def get_nodes(self):  # noqa: ANN201 - Flower's NodeInfo list
        self.stop.check()
        return self.grid.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        self.stop.check()
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        self.stop.check()
        return self.grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Flower's send-and-receive (push, then pull until every reply is in or ``timeout`` passed), interruptible."""
        messages = list(messages)
        if not messages:
            self.stop.check()
            return []
        phase = PHASES.get(messages[0].metadata.message_type, messages[0].metadata.message_type)
        pending = {i for i in self.push_messages(messages) if i}
        asked = len(pending)
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        _report(phase, 0, asked)
        while pending and (deadline is None or time.monotonic() < deadline):
            self.stop.wait(PULL_INTERVAL)
            received = list(self.pull_messages(pending))
            replies += received
            pending -= {m.metadata.reply_to_message_id for m in received}
            if received:
                _report(phase, len(replies), asked)
        return replies


def _report(phase: str, received: int, asked: int) -> None:
    log.info(
        "%s: %d of %d site(s) replied",
        phase,
        received,
        asked,
        extra=progress(ROUNDS, detail=f"{phase}: {received} of {asked} sites replied", transient=True),
    )
