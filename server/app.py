"""The fedtransfer ServerApp: the coordinator's side of a federated transfer run."""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from common.model.training import use_one_torch_thread
from common.settings import RunSettings
from server.federation import run_federation

use_one_torch_thread()
app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point for ``flwr run``: settings come from the run config."""
    run_federation(grid, RunSettings.from_run_config(context.run_config), context.run_id)
