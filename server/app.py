"""The fedtransfer ServerApp: the coordinator's side of a federated transfer run."""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from common.interrupt import StopRequest
from common.model.training import use_one_torch_thread
from common.settings import RunSettings
from server.federation import run_federation

use_one_torch_thread()
app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point for ``flwr run``: settings come from the run config."""
    run_federation(grid, RunSettings.from_run_config(context.run_config), context.run_id)


def make_server_app(settings: RunSettings, stop: StopRequest | None = None) -> ServerApp:
    """A ServerApp bound to ``settings`` (the in-process simulation has no run config) that honours ``stop``."""
    bound = ServerApp()

    @bound.main()
    def _main(grid: Grid, context: Context) -> None:
        run_federation(grid, settings, context.run_id, stop)

    return bound
