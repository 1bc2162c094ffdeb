"""WaveGrid: a round's instructions reach Flower's simulation engine within a window, all of them, in order."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Message, RecordDict

from client.app import app as client_app
from common.interrupt import StopRequest
from common.settings import RunSettings
from server.federation import run_federation
from simulations.inprocess import DirectGrid
from simulations.sites import prepare_sites
from simulations.waves import WaveGrid


class RecordingGrid(DirectGrid):
    """DirectGrid that remembers each push's size and the most instructions awaiting a reply at once.

    With ``per_pull``, each pull returns at most that many of the replies waiting (slow sites);
    each pull takes ``seconds_per_pull``.
    """

    def __init__(self, num_nodes: int, per_pull: int | None = None, seconds_per_pull: float = 0.0) -> None:
        super().__init__(client_app, num_nodes=num_nodes)
        self.seconds_per_pull = seconds_per_pull
        self.pushes: list[int] = []
        self.per_pull = per_pull
        self.awaiting: set[str] = set()
        self.most_awaiting = 0

    def _deliver(self, msg: Message) -> Message | None:
        return Message(RecordDict({"c": ConfigRecord({"n": msg.metadata.dst_node_id})}), reply_to=msg)

    def push_messages(self, messages):
        ids = list(super().push_messages(list(messages)))
        self.pushes.append(len(ids))
        self.awaiting |= set(ids)
        self.most_awaiting = max(self.most_awaiting, len(self.awaiting))
        return ids

    def pull_messages(self, message_ids):
        time.sleep(self.seconds_per_pull)
        wanted = set(message_ids)
        ready = [r for r in self.unpulled if r.metadata.reply_to_message_id in wanted][: self.per_pull]
        taken = {r.metadata.reply_to_message_id for r in ready}
        self.unpulled = [r for r in self.unpulled if r.metadata.reply_to_message_id not in taken]
        self.awaiting -= taken
        return ready


def _messages(grid: DirectGrid) -> list[Message]:
    return [
        Message(RecordDict({"c": ConfigRecord({"x": 1})}), dst_node_id=node, message_type="train")
        for node in grid.get_node_ids()
    ]


def test_every_message_is_sent_within_the_window_and_every_reply_returned() -> None:
    inner = RecordingGrid(num_nodes=10)
    replies = WaveGrid(inner, wave=4).send_and_receive(_messages(inner), timeout=60)
    assert inner.pushes == [4, 4, 2] and inner.most_awaiting == 4
    assert sorted(r.content["c"]["n"] for r in replies) == sorted(inner.get_node_ids())


def test_each_reply_lets_the_next_instruction_go_without_waiting_for_the_rest() -> None:
    inner = RecordingGrid(num_nodes=10, per_pull=1)
    replies = WaveGrid(inner, wave=4).send_and_receive(_messages(inner), timeout=60)
    assert inner.pushes == [4, 1, 1, 1, 1, 1, 1] and inner.most_awaiting == 4
    assert len(replies) == 10


def test_nothing_is_pushed_after_the_timeout() -> None:
    inner = RecordingGrid(num_nodes=10, per_pull=1, seconds_per_pull=1.0)
    replies = list(WaveGrid(inner, wave=4).send_and_receive(_messages(inner), timeout=1.5))
    assert inner.pushes == [4, 1] and len(replies) == 2


def test_wave_must_be_positive() -> None:
    with pytest.raises(ValueError):
        WaveGrid(RecordingGrid(num_nodes=1), wave=0)


class PushCountingGrid(DirectGrid):
    """DirectGrid (the real sites) that remembers each push's size."""

    def __init__(self, num_nodes: int, run_id: int) -> None:
        super().__init__(client_app, num_nodes=num_nodes, run_id=run_id)
        self.pushes: list[int] = []

    def push_messages(self, messages):
        ids = list(super().push_messages(list(messages)))
        self.pushes.append(len(ids))
        return ids


@pytest.mark.federation
@pytest.mark.parametrize("interruptible", [False, True])
def test_a_run_in_waves_is_the_same_run(tmp_path: Path, interruptible: bool) -> None:
    """The same run, with every push within the window, also when the run can be stopped (as `simulate`'s)."""
    settings = RunSettings(
        scenario="wdbc",
        rounds=1,
        local_epochs=1,
        seed=0,
        out=str(tmp_path / "out"),
        sim_root=str(tmp_path / "sites"),
        min_sites=4,
        expected_sites=4,
    )
    settings = prepare_sites(settings)
    inner = PushCountingGrid(num_nodes=4, run_id=55)
    inner.place_sites(Path(settings.sim_root))
    stop = StopRequest() if interruptible else None
    record = run_federation(WaveGrid(inner, wave=3, stop=stop), settings, inner.run_id, stop)
    assert record.status == "completed"
    assert record.round(1).aggregated_sites == sorted(record.round(1).sites)
    assert len(record.round(1).aggregated_sites) == 4
    assert inner.pushes == [3, 1, 3, 1]  # training, then evaluation: never more than the window at once


def test_the_wave_shrinks_as_nodes_grow() -> None:
    from simulations.waves import CHECKS_PER_SWEEP, MIN_WAVE

    few = RecordingGrid(num_nodes=8)
    assert WaveGrid(few).wave_size() == CHECKS_PER_SWEEP // 8  # everything at once
    many = RecordingGrid(num_nodes=CHECKS_PER_SWEEP // MIN_WAVE * 4)
    assert WaveGrid(many).wave_size() == MIN_WAVE
