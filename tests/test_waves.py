"""WaveGrid: a round's instructions reach Flower's simulation engine a wave at a time, all of them, in order."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Message, RecordDict

from client.app import app as client_app
from common.settings import RunSettings
from server.federation import run_federation
from simulations.inprocess import DirectGrid
from simulations.sites import prepare_sites
from simulations.waves import WaveGrid


class RecordingGrid(DirectGrid):
    """DirectGrid that remembers each send_and_receive call's size and can be slow."""

    def __init__(self, num_nodes: int, seconds_per_call: float = 0.0) -> None:
        super().__init__(client_app, num_nodes=num_nodes)
        self.calls: list[int] = []
        self.seconds_per_call = seconds_per_call

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        self.calls.append(len(messages))
        time.sleep(self.seconds_per_call)
        return [Message(RecordDict({"c": ConfigRecord({"n": m.metadata.dst_node_id})}), reply_to=m) for m in messages]


def _messages(grid: DirectGrid) -> list[Message]:
    return [
        Message(RecordDict({"c": ConfigRecord({"x": 1})}), dst_node_id=node, message_type="train")
        for node in grid.get_node_ids()
    ]


def test_every_message_is_sent_in_waves_and_every_reply_returned() -> None:
    inner = RecordingGrid(num_nodes=10)
    replies = WaveGrid(inner, wave=4).send_and_receive(_messages(inner), timeout=60)
    assert inner.calls == [4, 4, 2]
    assert [r.content["c"]["n"] for r in replies] == list(inner.get_node_ids())


def test_no_wave_starts_after_the_timeout() -> None:
    inner = RecordingGrid(num_nodes=10, seconds_per_call=0.3)
    replies = list(WaveGrid(inner, wave=4).send_and_receive(_messages(inner), timeout=0.5))
    assert inner.calls == [4, 4] and len(replies) == 8


def test_wave_must_be_positive() -> None:
    with pytest.raises(ValueError):
        WaveGrid(RecordingGrid(num_nodes=1), wave=0)


@pytest.mark.federation
def test_a_run_in_waves_is_the_same_run(tmp_path: Path) -> None:
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
    inner = DirectGrid(client_app, num_nodes=4, run_id=55)
    inner.place_sites(Path(settings.sim_root))
    record = run_federation(WaveGrid(inner, wave=3), settings, inner.run_id)
    assert record.status == "completed"
    assert record.round(1).aggregated_sites == sorted(record.round(1).sites)
    assert len(record.round(1).aggregated_sites) == 4


def test_the_wave_shrinks_as_nodes_grow() -> None:
    from simulations.waves import CHECKS_PER_SWEEP, MIN_WAVE

    few = RecordingGrid(num_nodes=8)
    assert WaveGrid(few).wave_size() == CHECKS_PER_SWEEP // 8  # everything at once
    many = RecordingGrid(num_nodes=CHECKS_PER_SWEEP // MIN_WAVE * 4)
    assert WaveGrid(many).wave_size() == MIN_WAVE
