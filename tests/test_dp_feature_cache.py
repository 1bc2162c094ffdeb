"""Feature caching is exact: DP-SGD on cached frozen features equals DP-SGD on the whole model.

The site computes the frozen prefix's features once and runs ``dp_train`` on the trainable
suffix. With the same seeded random source, that must give the same trainable weights as running
``dp_train`` on the whole model (frozen parameters with requires_grad off) over raw inputs,
and neither path may touch the frozen weights.
"""

from __future__ import annotations

import copy

import pytest
import torch

from client.dp_training import dp_train, sample_rate_and_steps
from common.model.training import TrainConfig, compute_features, use_one_torch_thread
from common.model.transfer import TransferPolicy
from common.model.zoo import build_model
from common.privacy.noise import SeededRandom

CASES = [
    pytest.param("mlp", (30,), {"hidden": [32, 16]}, "head", 0.0, id="mlp-head"),
    pytest.param("mlp", (30,), {"hidden": [32, 16]}, "head", 0.5, id="mlp-head-fedprox"),
    pytest.param("cnn", (1, 24, 24), {}, "last:1", 0.0, id="cnn-last1"),
]


def _dp(module: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, config: TrainConfig, seed: int):
    rate, steps = sample_rate_and_steps(len(y), config.batch_size, config.epochs)
    return dp_train(
        module,
        x,
        y,
        config,
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        sample_rate=rate,
        steps=steps,
        expected_batch_size=rate * len(y),
        source=SeededRandom(seed),
    )


def _data(input_shape: tuple[int, ...], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn((72, *input_shape), generator=generator)
    y = torch.randint(0, 2, (72,), generator=generator)
    return x, y


@pytest.mark.parametrize(("arch", "input_shape", "args", "policy_text", "mu"), CASES)
def test_cached_features_give_the_uncached_weights(
    arch: str, input_shape: tuple[int, ...], args: dict, policy_text: str, mu: float
) -> None:
    use_one_torch_thread()
    torch.manual_seed(3)
    base = build_model(arch, input_shape, 2, args)
    transfer = TransferPolicy.parse(policy_text)
    x, y = _data(input_shape, seed=5)
    config = TrainConfig(epochs=2, batch_size=16, lr=0.05, proximal_mu=mu, seed=0)

    uncached = copy.deepcopy(base)
    transfer.apply(uncached)
    stats_uncached = _dp(uncached, x, y, config, seed=11)

    cached = copy.deepcopy(base)
    transfer.apply(cached)
    frozen, trainable = transfer.split(cached)
    stats_cached = _dp(trainable, compute_features(frozen, x), y, config, seed=11)

    assert (stats_cached.steps, stats_cached.updates) == (stats_uncached.steps, stats_uncached.updates)
    assert stats_cached.updates > 0
    assert stats_cached.mean_loss == pytest.approx(stats_uncached.mean_loss, abs=1e-5)
    before = base.state_dict()
    trained = transfer.trainable_names(base)
    for name in trained:
        torch.testing.assert_close(cached.state_dict()[name], uncached.state_dict()[name], rtol=0, atol=1e-5)
    assert any(not torch.equal(cached.state_dict()[name], before[name]) for name in trained), (
        "DP-SGD did not move the trainable weights"
    )
    for name in transfer.frozen_state(base):
        assert torch.equal(uncached.state_dict()[name], before[name]), f"uncached path changed frozen {name}"
        assert torch.equal(cached.state_dict()[name], before[name]), f"cached path changed frozen {name}"


def test_another_noise_seed_gives_other_weights() -> None:
    """The equality above is not vacuous: the noise seed does reach the weights."""
    torch.manual_seed(3)
    base = build_model("mlp", (30,), 2, {"hidden": [32, 16]})
    transfer = TransferPolicy("head")
    x, y = _data((30,), seed=5)
    config = TrainConfig(epochs=1, batch_size=16, lr=0.05, seed=0)
    weights = []
    for noise_seed in (11, 12):
        model = copy.deepcopy(base)
        transfer.apply(model)
        frozen, trainable = transfer.split(model)
        _dp(trainable, compute_features(frozen, x), y, config, seed=noise_seed)
        weights.append(model.head.weight.detach().clone())
    assert not torch.allclose(weights[0], weights[1])
