"""Instructions to many simulated sites, handed to Flower's simulation engine a few at a time.

Flower 1.42's simulation engine delivers messages by polling: every 0.1 s, for every node,
it scans every instruction still stored (each checked for expiry and federation
membership) until the node's reply is pulled. With all of a round's instructions stored at
once, one sweep costs nodes x instructions checks, so a round grows with the square of the
number of sites. :class:`WaveGrid` therefore keeps at most a window of instructions
awaiting a reply, sized so that a sweep stays within about :data:`CHECKS_PER_SWEEP` checks
(all at once up to 128 sites), never below :data:`MIN_WAVE` so the engine's workers stay
busy; each reply pulled lets the next instruction go, so no wave waits for its slowest
site. :func:`make_server_app` builds the coordinator's ServerApp that sends them so.
"""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from common.interrupt import StopRequest
from common.settings import RunSettings
from server.federation import run_federation
from server.interruptible_grid import InterruptibleGrid

#: Message checks one polling sweep of the engine may cost (nodes x instructions stored).
CHECKS_PER_SWEEP = 16_384
#: Fewest instructions in flight at once: enough to keep the engine's workers fed between two sweeps.
MIN_WAVE = 32
#: Seconds between two pulls of the replies: the engine's in-memory state answers a pull at once, and
#: each reply pulled sooner frees its place in the window sooner.
PULL_SECONDS = 0.02


class WaveGrid(InterruptibleGrid):
    """An :class:`InterruptibleGrid` with at most a window of instructions awaiting a reply at once.

    The window holds ``wave`` messages if given, else :data:`CHECKS_PER_SWEEP` / nodes (at
    least :data:`MIN_WAVE`), and replies are pulled every :data:`PULL_SECONDS`. Without ``stop`` it is
    never interrupted.
    """

    pull_interval = PULL_SECONDS

    def __init__(self, grid: Grid, wave: int | None = None, stop: StopRequest | None = None) -> None:
        if wave is not None and wave < 1:
            raise ValueError(f"wave must be at least 1, got {wave}")
        super().__init__(grid, stop if stop is not None else StopRequest())
        self.wave = wave

    def wave_size(self) -> int:
        """Instructions in flight at once for the nodes connected now."""
        if self.wave is not None:
            return self.wave
        return max(MIN_WAVE, CHECKS_PER_SWEEP // max(1, len(list(self.grid.get_node_ids()))))

    def in_flight_limit(self) -> int:
        return self.wave_size()


def make_server_app(settings: RunSettings, stop: StopRequest | None = None) -> ServerApp:
    """The coordinator's ServerApp bound to ``settings`` for Flower's simulation engine (which has no run config),
    honouring ``stop`` and handing the engine a round's instructions a wave at a time."""
    bound = ServerApp()

    @bound.main()
    def _main(grid: Grid, context: Context) -> None:
        run_federation(WaveGrid(grid, stop=stop), settings, context.run_id, stop)

    return bound
