"""server-lr, server-tau and server-beta-2 reach Flower's FedOpt strategies; 0 keeps Flower's defaults."""

from __future__ import annotations

from flwr.serverapp.strategy import FedAdagrad, FedYogi

from server.strategy import flower_strategy, server_optimiser_args


def test_only_the_settings_given_become_flower_arguments() -> None:
    assert server_optimiser_args(0.0, 0.0, 0.0) == {}
    assert server_optimiser_args(0.01, 1e-8, 0.999) == {"eta": 0.01, "tau": 1e-8, "beta_2": 0.999}


def test_fedyogi_gets_the_server_optimiser_settings() -> None:
    strategy = flower_strategy("fedyogi", 2, 0.0, server_optimiser_args(0.03, 1e-8, 0.999))
    assert isinstance(strategy, FedYogi)
    assert (strategy.eta, strategy.tau, strategy.beta_2) == (0.03, 1e-8, 0.999)


def test_zero_settings_keep_flowers_defaults() -> None:
    default = FedYogi()
    strategy = flower_strategy("fedyogi", 2, 0.0, server_optimiser_args(0.0, 0.0, 0.0))
    assert (strategy.eta, strategy.tau, strategy.beta_2) == (default.eta, default.tau, default.beta_2)


def test_fedadagrad_is_available() -> None:
    strategy = flower_strategy("fedadagrad", 2, 0.0, server_optimiser_args(0.3, 1e-8, 0.0))
    assert isinstance(strategy, FedAdagrad) and (strategy.eta, strategy.tau) == (0.3, 1e-8)
