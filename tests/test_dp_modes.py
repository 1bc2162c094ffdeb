"""The grad-sample modes in ``dp_train`` (Opacus's and ours): the same clipped, noised steps whichever
computes them."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from client.dp_training import (
    GRAD_SAMPLE_MODES,
    OPACUS_MODES,
    UnsupportedGradSampleMode,
    dp_train,
    grad_sample_mode,
    supported_modes,
)
from common.model.training import TrainConfig, use_one_torch_thread
from common.privacy.noise import SeededRandom
from tests.dp_parts import cnn_last_block


def _bias_only_head() -> tuple[nn.Module, torch.Tensor]:
    head = nn.Linear(6, 2)
    head.weight.requires_grad_(False)
    return head, torch.randn(48, 6, generator=torch.Generator().manual_seed(4))


def _mlp_head() -> tuple[nn.Module, torch.Tensor]:
    return nn.Sequential(nn.Linear(6, 2)), torch.randn(48, 6, generator=torch.Generator().manual_seed(5))


def _cnn_last_block() -> tuple[nn.Module, torch.Tensor]:
    return cnn_last_block(48, 1.0, torch.Generator().manual_seed(3))


PARTS = {"cnn last:1": _cnn_last_block, "bias-only head": _bias_only_head, "linear head": _mlp_head}


def _train(part: nn.Module, features: torch.Tensor, mode: str, sample_rate: float = 0.25, steps: int = 12):
    labels = torch.arange(len(features)) % 2
    return dp_train(
        part,
        features,
        labels,
        TrainConfig(epochs=1, batch_size=12, lr=0.1),
        noise_multiplier=0.7,
        max_grad_norm=0.5,  # small enough that clipping binds
        sample_rate=sample_rate,
        steps=steps,
        expected_batch_size=sample_rate * len(features),
        source=SeededRandom(11),
        mode=mode,
    )


@pytest.mark.parametrize("name", PARTS)
def test_every_mode_takes_the_same_steps(name: str) -> None:
    use_one_torch_thread()
    base, features = PARTS[name]()
    trained = {}
    for mode in supported_modes(base, features):
        part = copy.deepcopy(base)
        stats = _train(part, features, mode)
        assert stats.grad_sample_mode == mode and stats.steps == 12
        trained[mode] = {k: v.detach().clone() for k, v in part.state_dict().items()}
    assert any(not torch.equal(trained["hooks"][k], v) for k, v in base.state_dict().items())
    for mode, state in trained.items():
        for key, value in state.items():
            torch.testing.assert_close(value, trained["hooks"][key], rtol=1e-4, atol=1e-5, msg=f"{mode} {key}")


@pytest.mark.parametrize("mode", GRAD_SAMPLE_MODES)
def test_empty_batches_are_noised_in_every_mode(mode: str) -> None:
    use_one_torch_thread()
    part, features = _mlp_head()
    before = copy.deepcopy(part.state_dict())
    stats = _train(part, features, mode, sample_rate=1e-6, steps=5)  # every batch is empty
    assert stats.updates == 0 and stats.steps == 5
    assert all(not torch.equal(before[k], v) for k, v in part.state_dict().items())


def test_the_linear_mode_applies_to_a_last_linear_layer_only() -> None:
    assert "linear" not in supported_modes(_cnn_last_block()[0])
    assert "linear" in supported_modes(_bias_only_head()[0])
    assert "linear" in supported_modes(_mlp_head()[0])
    two_layers = nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 2))
    assert "linear" not in supported_modes(two_layers)
    two_layers[0].requires_grad_(False)  # a frozen prefix: only the last layer trains
    assert "linear" in supported_modes(two_layers)
    with_statistics = nn.Sequential(nn.BatchNorm1d(6), nn.Linear(6, 2))
    with_statistics[0].requires_grad_(False)
    assert "linear" not in supported_modes(with_statistics)  # its running statistics would move
    unflattened = nn.Sequential(nn.Linear(6, 2))
    assert "linear" not in supported_modes(unflattened, torch.randn(4, 3, 6))  # 3-D inputs: no factorisation
    with pytest.raises(UnsupportedGradSampleMode):
        _train(_cnn_last_block()[0], _cnn_last_block()[1], "linear")
    with pytest.raises(UnsupportedGradSampleMode):
        _train(unflattened, torch.randn(48, 3, 6), "linear")


def test_the_mode_follows_the_trainable_layers() -> None:
    trainable, _ = _cnn_last_block()
    assert supported_modes(trainable) == (*OPACUS_MODES, "direct", "ghost-direct")
    assert grad_sample_mode(trainable) == "ghost-direct"
    assert grad_sample_mode(_bias_only_head()[0]) == "linear"
    assert grad_sample_mode(_mlp_head()[0]) == "linear"
    assert _train(*_mlp_head(), mode=None).grad_sample_mode == "linear"  # what the site's privacy report names
    unusual = nn.Sequential(nn.Linear(6, 4), nn.PReLU(), nn.Linear(4, 2))  # PReLU: no expanded weights, no direct
    assert supported_modes(unusual) == OPACUS_MODES
    assert grad_sample_mode(unusual) == "hooks"
    unusual[1].weight.requires_grad_(False)
    assert grad_sample_mode(unusual) == "ghost-direct"
    stats = _train(unusual, torch.randn(48, 6), mode=None)
    assert stats.grad_sample_mode == "ghost-direct"
