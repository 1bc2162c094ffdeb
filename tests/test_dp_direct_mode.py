"""The ``direct`` grad-sample mode against Opacus's hooks: the same per-record gradients, so the same clipped sums."""

from __future__ import annotations

import copy

import pytest
import torch
from opacus import GradSampleModule
from torch import nn

from client.dp_training import UnsupportedGradSampleMode, _DirectStep, _SourcedDPOptimizer, dp_train
from common.model.batchnorm import FixedBatchNorm2d
from common.model.training import TrainConfig, example_losses, use_one_torch_thread
from common.privacy.noise import SeededRandom
from tests.dp_parts import cnn_last_block, frozen_middle, mlp

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing")

CONFIG = TrainConfig(class_weights="balanced", class_prior=(0.4, 0.6))


def _fixed_batchnorm() -> tuple[nn.Module, torch.Tensor]:
    norm = FixedBatchNorm2d.from_batchnorm(nn.BatchNorm2d(4).eval())
    conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
    part = nn.Sequential(conv, norm, nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    return part, torch.randn(24, 3, 6, 6)


PARTS = {
    "cnn last:1": cnn_last_block,
    "mlp": mlp,
    "frozen middle": frozen_middle,
    "fixed batchnorm": _fixed_batchnorm,
}


def _opacus_samples(part: nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    module = GradSampleModule(copy.deepcopy(part), loss_reduction="sum", strict=False)  # as the hooks mode
    example_losses(module(x), y, CONFIG).sum().backward()
    samples = [p.grad_sample.clone() for p in module.parameters() if p.requires_grad]
    module.cleanup()
    return samples


@pytest.mark.parametrize("name", PARTS)
def test_the_per_record_gradients_are_opacus_s(name: str) -> None:
    use_one_torch_thread()
    torch.manual_seed(5)
    part, x = PARTS[name]()
    y = torch.arange(len(x)) % 2
    expected = _opacus_samples(part, x, y)
    mine = copy.deepcopy(part)
    step = _DirectStep(mine, CONFIG, 0.0, 1.0, len(y), SeededRandom(0))
    step.backward(x, y)
    got = [p.grad_sample for p in mine.parameters() if p.requires_grad]
    assert len(got) == len(expected) > 0
    for ours, theirs in zip(got, expected):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    assert all(p.grad is None for p in mine.parameters()), "the direct mode computes no plain gradient"
    step.optimizer.clip_and_accumulate()
    summed = [p.summed_grad for p in mine.parameters() if p.requires_grad]
    reference = _reference_clipped_sum(part, x, y, 1.0)
    for ours, theirs in zip(summed, reference):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    step.close()
    assert not any(m._forward_hooks for m in mine.modules())


def _reference_clipped_sum(part: nn.Module, x: torch.Tensor, y: torch.Tensor, clip: float) -> list[torch.Tensor]:
    """The clipped sum straight from Opacus's per-record gradients, computed by hand."""
    samples = _opacus_samples(part, x, y)
    norms = torch.stack([s.reshape(len(y), -1).norm(dim=1) for s in samples], dim=1).norm(dim=1)
    factors = (clip / (norms + 1e-6)).clamp(max=1.0)
    assert (factors < 1).any(), "the bound must bind for some records"
    return [torch.einsum("i,i...", factors, s) for s in samples]


def test_a_layer_called_twice_is_refused() -> None:
    shared = nn.Linear(4, 4)
    part = nn.Sequential(shared, nn.ReLU(), shared, nn.Linear(4, 2))
    with pytest.raises(UnsupportedGradSampleMode):
        dp_train(
            part,
            torch.randn(16, 4),
            torch.arange(16) % 2,
            TrainConfig(),
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            sample_rate=0.9,
            steps=1,
            expected_batch_size=14.4,
            source=SeededRandom(0),
            mode="direct",
        )


def test_a_failed_round_leaves_no_hooks() -> None:
    part, x = mlp()
    with pytest.raises(IndexError):
        dp_train(
            part,
            x,
            torch.arange(len(x)) + 5,  # labels beyond the two classes: cross-entropy fails in the first step
            TrainConfig(),
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            sample_rate=0.9,
            steps=2,
            expected_batch_size=21.6,
            source=SeededRandom(0),
            mode="direct",
        )
    assert not any(m._forward_hooks for m in part.modules())
    part(x)  # the part still runs as a plain module


def test_an_unsupported_layer_is_refused() -> None:
    part = nn.Sequential(nn.Linear(4, 4), nn.PReLU(), nn.Linear(4, 2))
    with pytest.raises(UnsupportedGradSampleMode):
        _DirectStep(part, TrainConfig(), 1.0, 1.0, 8, SeededRandom(0))


def test_the_optimizer_is_opacus_s() -> None:
    part, _ = mlp()
    step = _DirectStep(part, TrainConfig(), 1.0, 1.0, 8, SeededRandom(0))
    assert isinstance(step.optimizer, _SourcedDPOptimizer)
    step.close()
