"""An in-process stand-in for Flower's transport: the apps talk by direct calls.

Every fedtransfer component runs for real (ServerApp logic, strategy wrapper, secure
channel, ClientApp with its mods, DP training, ledgers); only the relay between them is
replaced by direct calls in one process. Tests use it to tamper with, drop or replay
messages on the way; benchmarks use it to run many small federations without starting
Flower's simulation engine for each. ``fedtransfer simulate`` uses Flower's engine.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from uuid import uuid4

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from common.run_record import RunRecord
from common.settings import RunSettings
from server.federation import run_federation
from simulations.sites import prepare_sites, site_configs

Interceptor = Callable[[int, Message], Message | None]


class DirectGrid(Grid):
    """Delivers each message to ``client_app`` in this process; node i is simulated site i."""

    def __init__(self, client_app: ClientApp, num_nodes: int, run_id: int = 4242) -> None:
        self.client_app = client_app
        self.run_id = run_id
        self.node_ids = list(range(101, 101 + num_nodes))
        self.contexts = {
            node: Context(
                run_id=run_id,
                node_id=node,
                node_config={"partition-id": i, "num-partitions": num_nodes},
                state=RecordDict(),
                run_config={},
            )
            for i, node in enumerate(self.node_ids)
        }
        self.on_instruction: Interceptor = lambda node, msg: msg
        self.on_reply: Interceptor = lambda node, msg: msg
        self.delivered: list[tuple[int, Message]] = []
        self.unpulled: list[Message] = []
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = run_id, 0, 0

    def place_sites(self, sim_root: Path) -> None:
        """Give node i the site configuration of simulated site i (its node config, as a SuperNode's would)."""
        for node, config in zip(self.node_ids, site_configs(sim_root, len(self.node_ids))):
            self.contexts[node].node_config["site-config"] = str(config)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.node_ids)

    def _deliver(self, msg: Message) -> Message | None:
        node = msg.metadata.dst_node_id
        delivered = self.on_instruction(node, msg)
        if delivered is None:
            return None
        self.delivered.append((node, delivered))
        try:
            reply = self.client_app(delivered, self.contexts[node])
        except Exception as err:  # noqa: BLE001 - like Flower, a ClientApp exception becomes an error reply
            reply = Message(
                Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=f"{type(err).__name__}: {err}"),
                reply_to=delivered,
            )
        return self.on_reply(node, reply)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return [reply for msg in messages if (reply := self._deliver(msg)) is not None]

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Deliver each message now, with an id as Flower's grids give it; its reply waits for ``pull_messages``."""
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = str(uuid4())
            reply = self._deliver(msg)
            if reply is not None:
                self.unpulled.append(reply)
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        wanted = set(message_ids)
        pulled = [r for r in self.unpulled if r.metadata.reply_to_message_id in wanted]
        self.unpulled = [r for r in self.unpulled if r.metadata.reply_to_message_id not in wanted]
        return pulled

    def create_message(self, *args, **kwargs):  # not used by fedtransfer's ServerApp
        raise AssertionError("DirectGrid does not create messages")

    def get_nodes(self, *args, **kwargs):
        raise AssertionError("DirectGrid has no node metadata")

    @property
    def run(self):
        raise AssertionError("DirectGrid has no run object")

    def set_run(self, run_id: int) -> None:
        self.run_id = run_id


def run_on_grid(grid: DirectGrid, settings: RunSettings) -> RunRecord:
    """Write the simulated sites, point each node at its own, and run the federation over ``grid``."""
    bound = prepare_sites(settings)
    grid.place_sites(Path(bound.sim_root))
    return run_federation(grid, bound, grid.run_id)
