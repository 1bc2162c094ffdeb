"""A Grid that stops waiting when the operator asks, and reports each reply as it arrives.

Flower's grids wait for the sites' replies until all have come or the round times out.
Wrapped in :class:`InterruptibleGrid`, every wait also ends as soon as a stop is requested
(:class:`common.interrupt.RunInterrupted`), and the number of replies received so far is
logged as transient progress. A subclass may bound how many instructions await a reply at
once (:meth:`InterruptibleGrid.in_flight_limit`): the next instruction then goes out as soon
as a reply frees a place, so no instruction waits for a whole batch to finish.
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

    #: Seconds between two pulls of the replies.
    pull_interval = PULL_INTERVAL

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

    def in_flight_limit(self) -> int | None:
        """Most instructions of one :meth:`send_and_receive` awaiting a reply at once; None: no limit."""
        return None

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Push, then pull until every reply is in or ``timeout`` passed, interruptible.

        At most :meth:`in_flight_limit` instructions await a reply at once; each reply pulled lets
        the next instruction go. Once ``timeout`` is spent, instructions not yet pushed are not
        pushed (their sites miss the round, as if they had not replied in time).
        """
        queue = list(messages)
        if not queue:
            self.stop.check()
            return []
        phase = PHASES.get(queue[0].metadata.message_type, queue[0].metadata.message_type)
        limit = self.in_flight_limit() or len(queue)
        deadline = None if timeout is None else time.monotonic() + timeout
        pending: set[str] = set()
        replies: list[Message] = []
        sent = 0
        _report(phase, 0, len(queue))
        while True:
            expired = deadline is not None and time.monotonic() >= deadline
            room = limit - len(pending)
            if not expired and room > 0 and sent < len(queue):
                batch = queue[sent : sent + room]
                sent += len(batch)
                pending |= {i for i in self.push_messages(batch) if i}
                continue
            if expired or not pending:
                return replies
            self.stop.wait(self.pull_interval)
            received = list(self.pull_messages(pending))
            replies += received
            pending -= {m.metadata.reply_to_message_id for m in received}
            if received:
                _report(phase, len(replies), len(queue))


def _report(phase: str, received: int, asked: int) -> None:
    log.info(
        "%s: %d of %d site(s) replied",
        phase,
        received,
        asked,
        extra=progress(ROUNDS, detail=f"{phase}: {received} of {asked} sites replied", transient=True),
    )
