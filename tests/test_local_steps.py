"""``local-steps``: a round of exactly N local updates, in plain and in DP-SGD training, and plain SGD."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from client.dp_training import dp_train, sample_rate_and_steps
from client.fine_tune import train_config
from common.model.training import TrainConfig, make_optimizer, shuffled_batches, train_plain, use_one_torch_thread
from common.privacy.noise import SecureRandom
from common.protocol import RoundInstruction


def _data(examples: int = 30) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return torch.randn((examples, 5), generator=generator), torch.randint(0, 2, (examples,), generator=generator)


@pytest.mark.parametrize("steps", [1, 7, 8, 19, 100])
def test_local_steps_train_exactly_that_many_updates(steps: int) -> None:
    use_one_torch_thread()
    x, y = _data()  # 8 batches of 4 per epoch (the last has 2 rows)
    stats = train_plain(nn.Linear(5, 2), x, y, TrainConfig(epochs=3, batch_size=4, lr=0.01, steps=steps, seed=2))
    assert stats.steps == steps


def test_zero_local_steps_train_whole_epochs() -> None:
    x, y = _data()
    stats = train_plain(nn.Linear(5, 2), x, y, TrainConfig(epochs=3, batch_size=4, lr=0.01, seed=2))
    assert stats.steps == 3 * math.ceil(30 / 4)


def test_local_steps_reshuffle_every_pass_and_see_every_row_once_per_pass() -> None:
    config = TrainConfig(batch_size=4, steps=16, seed=0)
    batches = list(shuffled_batches(30, config, torch.Generator().manual_seed(0)))
    first, second = torch.cat(batches[:8]), torch.cat(batches[8:])
    assert sorted(first.tolist()) == sorted(second.tolist()) == list(range(30))
    assert not torch.equal(first, second)


def test_no_rows_give_no_batches_even_with_local_steps() -> None:
    assert list(shuffled_batches(0, TrainConfig(steps=5), torch.Generator())) == []


def test_negative_local_steps_are_rejected() -> None:
    with pytest.raises(ValueError):
        TrainConfig(steps=-1)


def test_plain_sgd_has_no_momentum_and_sgd_has_momentum() -> None:
    params = list(nn.Linear(2, 2).parameters())
    assert make_optimizer(params, TrainConfig(optimizer="sgd-plain")).param_groups[0]["momentum"] == 0.0
    assert make_optimizer(params, TrainConfig(optimizer="sgd")).param_groups[0]["momentum"] == 0.9


def test_round_config_carries_local_steps_but_personalisation_trains_epochs() -> None:
    instruction = RoundInstruction(
        server_round=1,
        rounds=2,
        transfer_policy="full",
        base_fingerprint="a",
        base_card_sha256="c" * 64,
        frozen_fingerprint="b",
        local_epochs=2,
        batch_size=4,
        lr=0.01,
        optimizer="sgd-plain",
        proximal_mu=0.0,
        seed=0,
        personalise_epochs=3,
        dp=0,
        run_id="1",
        local_steps=100,
    )
    assert train_config(instruction).steps == 100
    personalise = train_config(instruction, epochs=instruction.personalise_epochs)
    assert (personalise.steps, personalise.epochs) == (0, 3)


def test_dp_steps_per_round_follow_local_steps() -> None:
    assert sample_rate_and_steps(30, 4, 2) == (1 / 8, 16)  # 30 is the site's declared size, never its exact count
    assert sample_rate_and_steps(30, 4, 2, local_steps=100) == (1 / 8, 100)


@pytest.mark.parametrize("steps", [5, 20])
def test_dp_training_takes_exactly_local_steps(steps: int) -> None:
    use_one_torch_thread()
    x, y = _data()
    config = TrainConfig(epochs=1, batch_size=4, lr=0.01, steps=steps)
    stats = dp_train(
        nn.Linear(5, 2),
        x,
        y,
        config,
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        sample_rate=1 / 8,
        steps=steps,
        expected_batch_size=30 / 8,
        source=SecureRandom(),
    )
    assert stats.steps == steps
    assert stats.updates <= steps
    assert stats.sample_rate == pytest.approx(1 / 8)


@pytest.mark.federation
def test_a_private_run_with_local_steps_spends_exactly_those_steps(tmp_path) -> None:
    """Through the real apps: each site's ledger and privacy report count local-steps per round, at 1 / batches."""
    from client.app import app as client_app
    from common.privacy.ledger import Ledger
    from common.privacy.policy import SitePolicy, write_policy
    from common.settings import RunSettings
    from simulations.inprocess import DirectGrid, run_on_grid
    from tests.conftest import write_shifted_study

    use_one_torch_thread()
    study = write_shifted_study(tmp_path / "study", sites=2)
    for site in range(2):
        policy = tmp_path / "sites" / f"site-{site}" / "state" / "privacy-policy.toml"
        policy.parent.mkdir(parents=True)
        write_policy(
            SitePolicy(max_epsilon=10.0, delta=1e-5, max_grad_norm=1.0, accountant="rdp", declared_size=120), policy
        )
    settings = RunSettings(
        scenario=str(study),
        rounds=2,
        local_epochs=3,
        local_steps=7,
        batch_size=16,
        out=str(tmp_path / "out"),
        sim_root=str(tmp_path / "sites"),
        min_sites=2,
        expected_sites=2,
        target_epsilon=3.0,
        personalise_epochs=0,
    )
    record = run_on_grid(DirectGrid(client_app, num_nodes=2, run_id=9001), settings)
    for site in range(2):
        entries = Ledger(tmp_path / "sites" / f"site-{site}" / "state").entries()
        assert [e.steps for e in entries] == [7, 7]
        assert record.round(1).sites[f"site-{site}"].train.values["steps"] == 7
        assert record.round(1).sites[f"site-{site}"].train.report["spends"][0]["steps"] == 7
        assert all(e.sample_rate == 1 / 8 for e in entries)  # one over the batches in the declared size (120 / 16)
