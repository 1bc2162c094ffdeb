"""The fedtransfer ServerApp: the coordinator's side of a federated transfer run."""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from common.model.training import use_one_torch_thread
from common.settings import RunSettings
from server.federation import run_federation
from simulations.waves import WaveGrid

use_one_torch_thread()
app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point for ``flwr run``: settings come from the run config."""
    run_federation(grid, RunSettings.from_run_config(context.run_config), context.run_id)


def make_server_app(settings: RunSettings) -> ServerApp:
    """A ServerApp bound to ``settings`` for Flower's simulation engine (which has no run config), handing
    the engine a round's instructions a wave at a time (see :mod:`simulations.waves`)."""
    bound = ServerApp()

    @bound.main()
    def _main(grid: Grid, context: Context) -> None:
        run_federation(WaveGrid(grid), settings, context.run_id)

    return bound
