"""Our clipping against Opacus's: the ``linear`` grad-sample mode and the flat clipping of Opacus's modes give the
same clipped per-record gradient sums on random inputs."""

from __future__ import annotations

import copy

import pytest
import torch
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer
from torch import nn

from client.dp_training import _LinearStep, _SourcedDPOptimizer
from common.model.training import TrainConfig, example_loss_gradients, example_losses, use_one_torch_thread
from common.model.transfer import TransferPolicy
from common.model.zoo import build_model
from common.privacy.noise import SeededRandom
from common.settings import CLASS_WEIGHTS

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing")

#: Every loss shaping ``example_losses`` knows: a new one fails here until ``example_loss_gradients`` follows it.
CONFIGS = {
    weights: TrainConfig(class_weights=weights, class_prior=(0.2, 0.3, 0.5) if weights != "none" else ())
    for weights in CLASS_WEIGHTS
}


def _part(kind: str) -> tuple[nn.Module, torch.Tensor]:
    """A trainable part and a batch of its inputs: what trains differs by ``kind``."""
    torch.manual_seed(7)
    features = torch.randn(40, 5) * torch.linspace(0.05, 4.0, 40).unsqueeze(1)  # small and large gradients
    if kind == "weight and bias":
        return nn.Sequential(nn.Linear(5, 3)), features
    if kind == "bias only":
        layer = nn.Linear(5, 3)
        layer.weight.requires_grad_(False)
        return layer, features
    if kind == "weight only":
        layer = nn.Linear(5, 3)
        layer.bias.requires_grad_(False)
        return nn.Sequential(layer), features
    if kind == "no bias":
        return nn.Sequential(nn.Linear(5, 3, bias=False)), features
    if kind == "frozen prefix":
        part = nn.Sequential(nn.Flatten(), nn.Linear(10, 4), nn.Tanh(), nn.Linear(4, 3))
        part[1].requires_grad_(False)
        return part, torch.randn(40, 2, 5)
    raise ValueError(kind)


KINDS = ("weight and bias", "bias only", "weight only", "no bias", "frozen prefix")


def _opacus_clipped_sum(part: nn.Module, x: torch.Tensor, y: torch.Tensor, config: TrainConfig, clip: float):
    module = GradSampleModule(copy.deepcopy(part), loss_reduction="sum")
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = DPOptimizer(
        torch.optim.SGD(params, lr=0.1),
        noise_multiplier=0.0,
        max_grad_norm=clip,
        expected_batch_size=len(y),
        loss_reduction="sum",
    )
    example_losses(module(x), y, config).sum().backward()
    optimizer.clip_and_accumulate()
    norms = torch.stack([p.grad_sample.reshape(len(y), -1).norm(dim=1) for p in params], dim=1).norm(dim=1)
    sums = [p.summed_grad.clone() for p in params]
    module.cleanup()
    return sums, norms


def _linear_clipped_sum(part: nn.Module, x: torch.Tensor, y: torch.Tensor, config: TrainConfig, clip: float):
    part = copy.deepcopy(part)
    step = _LinearStep(part, config, 0.0, clip, len(y), SeededRandom(0))
    step.backward(x, y)
    return [p.grad.clone() for p in part.parameters() if p.requires_grad]


@pytest.mark.parametrize("config_name", CONFIGS)
@pytest.mark.parametrize("kind", KINDS)
def test_the_clipped_sum_is_opacus_s(kind: str, config_name: str) -> None:
    use_one_torch_thread()
    config = CONFIGS[config_name]
    part, x = _part(kind)
    y = torch.arange(len(x)) % 3
    for clip in (0.3, 1.0, 50.0):
        expected, norms = _opacus_clipped_sum(part, x, y, config, clip)
        if clip == 0.3:
            assert (norms > clip).sum() > len(y) // 2, "the bound must bind for most records"
        if clip == 50.0:
            assert (norms < clip).all(), "and for none at the largest bound"
        got = _linear_clipped_sum(part, x, y, config, clip)
        assert len(got) == len(expected)
        for mine, theirs in zip(got, expected):
            torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6)


def test_a_wrong_clipping_would_be_caught() -> None:
    """The comparison above can fail: the unclipped sum (what a missed clipping would give) differs."""
    part, x = _part("weight and bias")
    y = torch.arange(len(x)) % 3
    clipped, _ = _opacus_clipped_sum(part, x, y, TrainConfig(), 0.3)
    unclipped, _ = _opacus_clipped_sum(part, x, y, TrainConfig(), 1e9)
    assert not torch.allclose(clipped[0], unclipped[0], rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("config_name", CONFIGS)
def test_the_loss_gradients_are_autograd_s(config_name: str) -> None:
    config = CONFIGS[config_name]
    logits = torch.randn(30, 3, generator=torch.Generator().manual_seed(2), requires_grad=True)
    labels = torch.arange(30) % 3
    (expected,) = torch.autograd.grad(example_losses(logits, labels, config).sum(), logits)
    torch.testing.assert_close(example_loss_gradients(logits.detach(), labels, config), expected)


def _summed_by(clip_and_accumulate, part: nn.Module, x: torch.Tensor, y: torch.Tensor, clip: float):
    module = GradSampleModule(copy.deepcopy(part), loss_reduction="sum")
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = _SourcedDPOptimizer(
        torch.optim.SGD(params, lr=0.1),
        noise_multiplier=0.0,
        max_grad_norm=clip,
        expected_batch_size=max(len(y), 1),
        loss_reduction="sum",
        source=SeededRandom(0),
    )
    if len(y):
        example_losses(module(x), y, TrainConfig()).sum().backward()
    else:
        for p in params:
            p.grad_sample = torch.zeros((0, *p.shape))
    clip_and_accumulate(optimizer)
    sums = [p.summed_grad.clone() for p in params]
    module.cleanup()
    return sums


@pytest.mark.parametrize("records", [16, 1, 0])
def test_the_flat_clipping_is_opacus_s(records: int) -> None:
    """Opacus's modes clip through ``_SourcedDPOptimizer.clip_and_accumulate``: the same sums as Opacus's own."""
    use_one_torch_thread()
    model = build_model("cnn", (1, 16, 16), 2)
    transfer = TransferPolicy.parse("last:1")
    transfer.apply(model)
    frozen, trainable = transfer.split(model)
    with torch.no_grad():
        x = frozen.eval()(torch.randn(records, 1, 16, 16, generator=torch.Generator().manual_seed(9)) * 3)
    y = torch.arange(records) % 2
    for clip in (0.05, 1e3):
        ours = _summed_by(_SourcedDPOptimizer.clip_and_accumulate, trainable, x, y, clip)
        opacus = _summed_by(DPOptimizer.clip_and_accumulate, trainable, x, y, clip)
        assert len(ours) == len(opacus) == 6
        for mine, theirs in zip(ours, opacus):
            torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6)
