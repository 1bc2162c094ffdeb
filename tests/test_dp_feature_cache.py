"""Feature caching is exact: DP-SGD on cached frozen features equals DP-SGD on the whole model.

The site computes the frozen prefix's features once and runs ``dp_train`` on the trainable
suffix. With the same ``noise_seed``, that must give the same trainable weights as running
``dp_train`` on the whole model (frozen parameters with requires_grad off) over raw inputs,
and neither path may touch the frozen weights.
"""

from __future__ import annotations

import copy

import pytest
import torch

from client.dp_training import dp_train
from common.model.zoo import build_model
from common.model.training import TrainConfig, compute_features, use_one_torch_thread
from common.model.transfer import TransferPolicy

CASES = [
    pytest.param("mlp", (30,), {"hidden": [32, 16]}, "head", 0.0, id="mlp-head"),
    pytest.param("mlp", (30,), {"hidden": [32, 16]}, "head", 0.5, id="mlp-head-fedprox"),
    pytest.param("cnn", (1, 24, 24), {}, "last:1", 0.0, id="cnn-last1"),
]


def _data(input_shape: tuple[int, ...], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn((72, *input_shape), generator=generator)
    y = torch.randint(0, 2, (72,), generator=generator)
    return x, y


@pytest.mark.parametrize(("arch", "input_shape", "args", "policy_text", "mu"), CASES)
def test_cached_features_give_the_uncached_weights(arch: str, input_shape: tuple[int, ...], args: dict, policy_text: str, mu: float) -> None:
    use_one_torch_thread()
    torch.manual_seed(3)
    base = build_model(arch, input_shape, 2, args)
    policy = TransferPolicy.parse(policy_text)
    x, y = _data(input_shape, seed=5)
    config = TrainConfig(epochs=2, batch_size=16, lr=0.05, proximal_mu=mu, seed=0)

    uncached = copy.deepcopy(base)
    policy.apply(uncached)
    stats_uncached = dp_train(uncached, x, y, config, 1.0, 1.0, [], "prv", noise_seed=11)

    cached = copy.deepcopy(base)
    policy.apply(cached)
    frozen, trainable = policy.split(cached)
    stats_cached = dp_train(trainable, compute_features(frozen, x), y, config, 1.0, 1.0, [], "prv", noise_seed=11)

    assert (stats_cached.steps, stats_cached.updates) == (stats_uncached.steps, stats_uncached.updates)
    assert stats_cached.updates > 0
    assert stats_cached.mean_loss == pytest.approx(stats_uncached.mean_loss, abs=1e-5)
    before = base.state_dict()
    trained = policy.trainable_names(base)
    for name in trained:
        torch.testing.assert_close(cached.state_dict()[name], uncached.state_dict()[name], rtol=0, atol=1e-5)
    assert any(not torch.equal(cached.state_dict()[name], before[name]) for name in trained), "DP-SGD did not move the trainable weights"
    for name in policy.frozen_state(base):
        assert torch.equal(uncached.state_dict()[name], before[name]), f"uncached path changed frozen {name}"
        assert torch.equal(cached.state_dict()[name], before[name]), f"cached path changed frozen {name}"


def test_another_noise_seed_gives_other_weights() -> None:
    """The equality above is not vacuous: the noise seed does reach the weights."""
    torch.manual_seed(3)
    base = build_model("mlp", (30,), 2, {"hidden": [32, 16]})
    policy = TransferPolicy("head")
    x, y = _data((30,), seed=5)
    config = TrainConfig(epochs=1, batch_size=16, lr=0.05, seed=0)
    weights = []
    for noise_seed in (11, 12):
        model = copy.deepcopy(base)
        policy.apply(model)
        frozen, trainable = policy.split(model)
        dp_train(trainable, compute_features(frozen, x), y, config, 1.0, 1.0, [], "prv", noise_seed=noise_seed)
        weights.append(model.head.weight.detach().clone())
    assert not torch.allclose(weights[0], weights[1])
