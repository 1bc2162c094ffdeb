"""Instructions to many simulated sites, handed to Flower's simulation engine a wave at a time.

Flower 1.42's simulation engine delivers messages by polling: every 0.1 s, for every node,
it scans every instruction still stored (each checked for expiry and federation
membership) until the node's reply is pulled. With all of a round's instructions stored at
once, one sweep costs nodes x instructions checks, so a round grows with the square of the
number of sites (at 1,000 sites the polling thread took most of the driver's time while the
two Ray workers waited). Sending the instructions in waves bounds each sweep by nodes x wave;
the wave is sized so that a sweep stays within about :data:`CHECKS_PER_SWEEP` checks (all at
once up to 256 sites), never below :data:`MIN_WAVE` so the engine's workers stay busy.
:func:`make_server_app` builds the coordinator's ServerApp that sends them so.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from flwr.app import Context, Message
from flwr.serverapp import Grid, ServerApp
from flwr.supercore.run import Run

from common.interrupt import StopRequest
from common.settings import RunSettings
from server.federation import run_federation

#: Message checks one polling sweep of the engine may cost (nodes x instructions stored).
CHECKS_PER_SWEEP = 16_384
#: Fewest instructions in flight at once.
MIN_WAVE = 16


class WaveGrid(Grid):
    """``grid`` with :meth:`send_and_receive` split into waves of instructions.

    A wave holds ``wave`` messages if given, else :data:`CHECKS_PER_SWEEP` / nodes (at least
    :data:`MIN_WAVE`). A wave starts when the previous one has all its replies or has used the
    call's timeout; once the timeout is spent, the messages not yet sent are not sent (their
    sites miss the round, as they would had they not replied in time).
    """

    def __init__(self, grid: Grid, wave: int | None = None) -> None:
        if wave is not None and wave < 1:
            raise ValueError(f"wave must be at least 1, got {wave}")
        self.grid = grid
        self.wave = wave

    def wave_size(self) -> int:
        """Instructions per wave for the nodes connected now."""
        if self.wave is not None:
            return self.wave
        return max(MIN_WAVE, CHECKS_PER_SWEEP // max(1, len(list(self.grid.get_node_ids()))))

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        pending = list(messages)
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        wave = self.wave_size()
        for start in range(0, len(pending), wave):
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                break
            replies.extend(self.grid.send_and_receive(pending[start : start + wave], timeout=left))
        return replies

    def set_run(self, run: Run) -> None:
        self.grid.set_run(run)

    @property
    def run(self) -> Run:
        return self.grid.run

    def create_message(self, *args, **kwargs) -> Message:
        return self.grid.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.grid.pull_messages(message_ids)


def make_server_app(settings: RunSettings, stop: StopRequest | None = None) -> ServerApp:
    """The coordinator's ServerApp bound to ``settings`` for Flower's simulation engine (which has no run config),
    honouring ``stop`` and handing the engine a round's instructions a wave at a time."""
    bound = ServerApp()

    @bound.main()
    def _main(grid: Grid, context: Context) -> None:
        run_federation(WaveGrid(grid), settings, context.run_id, stop)

    return bound
