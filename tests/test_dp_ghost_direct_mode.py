"""The ``ghost-direct`` grad-sample mode against Opacus's per-sample gradients: the same per-record norms without
per-record gradients, so the same clipped sums; an empty batch steps by noise alone."""

from __future__ import annotations

import copy

import pytest
import torch
from opacus import GradSampleModule
from torch import nn

from client.dp_training import (
    _ClippedSumOptimizer,
    _GhostDirectStep,
    _product_norms,
    dp_train,
    grad_sample_mode,
    supported_modes,
)
from common.model.batchnorm import FixedBatchNorm2d
from common.model.training import TrainConfig, example_losses, use_one_torch_thread
from common.privacy.noise import SeededRandom
from common.settings import CLASS_WEIGHTS
from tests.dp_parts import cnn_last_block, frozen_middle, mlp

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing")

#: Every loss shaping ``example_losses`` knows.
CONFIGS = {
    weights: TrainConfig(class_weights=weights, class_prior=(0.4, 0.6) if weights != "none" else ())
    for weights in CLASS_WEIGHTS
}


def _fixed_batchnorm_block() -> tuple[nn.Module, torch.Tensor]:
    """A ResNet-like block with fixed BatchNorm: a strided conv to one position (the ResNet-18 ``layer4`` case at
    28x28), a conv at 3x3 positions (the ghost-norm identity), a frozen-bias conv, and a linear head."""
    norm = FixedBatchNorm2d.from_batchnorm(nn.BatchNorm2d(8).eval())
    with torch.no_grad():
        norm.running_mean.uniform_(-0.5, 0.5)
        norm.running_var.uniform_(0.5, 2.0)
        norm.weight.uniform_(0.5, 1.5)
    wide = nn.Conv2d(8, 16, 3, padding=1)
    wide.bias.requires_grad_(False)
    part = nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False),  # 5x5 -> 3x3
        norm,
        nn.ReLU(),
        wide,  # 3x3 positions, 72 inputs, 16 outputs: ghost norm
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, stride=2, padding=1),  # 3x3 -> 2x2
        nn.ReLU(),
        nn.Conv2d(16, 8, 2),  # 2x2 -> one position
        nn.Flatten(),
        nn.Linear(8, 2),
    )
    return part, torch.randn(24, 3, 5, 5)


def _sequence() -> tuple[nn.Module, torch.Tensor]:
    """A linear layer applied at 5 positions of each record (3-D inputs), then flattened into the head."""
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Flatten(), nn.Linear(30, 2)), torch.randn(24, 5, 4)


PARTS = {
    "cnn last:1": cnn_last_block,
    "fixed batchnorm block": _fixed_batchnorm_block,
    "mlp": mlp,
    "frozen middle": frozen_middle,
    "sequence": _sequence,
}


def _opacus_samples(part: nn.Module, x: torch.Tensor, y: torch.Tensor, config: TrainConfig) -> list[torch.Tensor]:
    """Every trainable parameter's per-record gradients, from Opacus's hooks mode."""
    module = GradSampleModule(copy.deepcopy(part), loss_reduction="sum", strict=False)
    example_losses(module(x), y, config).sum().backward()
    samples = [p.grad_sample.clone() for p in module.parameters() if p.requires_grad]
    module.cleanup()
    return samples


def _opacus_norms(samples: list[torch.Tensor]) -> torch.Tensor:
    """Each record's joint gradient norm over all trainable parameters (Opacus's flat clipping)."""
    return torch.stack([s.flatten(1).norm(dim=1) for s in samples], dim=1).norm(dim=1)


def _clipped_sum(samples: list[torch.Tensor], factors: torch.Tensor) -> list[torch.Tensor]:
    return [torch.einsum("i,i...", factors, s) for s in samples]


def _batch(name: str) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(5)
    part, x = PARTS[name]()
    x = x * torch.linspace(0.05, 3.0, len(x)).view(-1, *([1] * (x.dim() - 1)))  # small and large gradients
    return part, x, torch.arange(len(x)) % 2


@pytest.mark.parametrize("config_name", CONFIGS)
@pytest.mark.parametrize("name", PARTS)
def test_the_per_record_norms_are_opacus_s(name: str, config_name: str) -> None:
    use_one_torch_thread()
    config = CONFIGS[config_name]
    part, x, y = _batch(name)
    expected = _opacus_norms(_opacus_samples(part, x, y, config))
    mine = copy.deepcopy(part)
    step = _GhostDirectStep(mine, config, 0.0, 1.0, len(y), SeededRandom(0))
    squared, _, loss = step.squared_norms(x, y)
    step.close()
    torch.testing.assert_close(squared.sqrt(), expected, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(loss, example_losses(part(x), y, config).sum().detach())
    assert all(p.grad is None for p in mine.parameters()), "no gradient of the parameters to find the norms"


@pytest.mark.parametrize("config_name", CONFIGS)
@pytest.mark.parametrize("name", PARTS)
def test_the_clipped_sum_is_opacus_s(name: str, config_name: str) -> None:
    use_one_torch_thread()
    config = CONFIGS[config_name]
    part, x, y = _batch(name)
    samples = _opacus_samples(part, x, y, config)
    norms = _opacus_norms(samples)
    clip = float(norms.median())  # half the records clipped, half not
    factors = (clip / (norms + 1e-6)).clamp(max=1.0)
    assert (factors < 1).sum() >= len(y) // 3 and (factors == 1).sum() >= len(y) // 3
    mine = copy.deepcopy(part)
    step = _GhostDirectStep(mine, config, 0.0, clip, len(y), SeededRandom(0))
    step.backward(x, y)
    got = [p.grad for p in mine.parameters() if p.requires_grad]
    assert len(got) == len(samples) > 0
    for ours, theirs in zip(got, _clipped_sum(samples, factors)):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-6)
    step.close()
    assert not any(m._forward_hooks for m in mine.modules())


def test_a_wrong_clipping_would_be_caught() -> None:
    """The comparison above can fail: clipping each layer on its own, or not at all, gives other sums."""
    part, x, y = _batch("fixed batchnorm block")
    config = CONFIGS["none"]
    samples = _opacus_samples(part, x, y, config)
    norms = _opacus_norms(samples)
    clip = float(norms.median())
    mine = copy.deepcopy(part)
    step = _GhostDirectStep(mine, config, 0.0, clip, len(y), SeededRandom(0))
    step.backward(x, y)
    got = torch.cat([p.grad.flatten() for p in mine.parameters() if p.requires_grad])
    per_parameter = [(clip / (s.flatten(1).norm(dim=1) + 1e-6)).clamp(max=1.0) for s in samples]
    wrong = {
        "per-parameter clipping": [torch.einsum("i,i...", f, s) for f, s in zip(per_parameter, samples)],
        "no clipping": [s.sum(0) for s in samples],
        "clipping one record only": _clipped_sum(samples, torch.cat([norms.new_tensor([0.5]), torch.ones(len(y) - 1)])),
    }
    right = torch.cat([g.flatten() for g in _clipped_sum(samples, (clip / (norms + 1e-6)).clamp(max=1.0))])
    torch.testing.assert_close(got, right, rtol=1e-4, atol=1e-6)
    for what, sums in wrong.items():
        assert not torch.allclose(got, torch.cat([g.flatten() for g in sums]), rtol=1e-3, atol=1e-4), what


@pytest.mark.parametrize(
    "positions, inputs, outputs",
    [(1, 30, 7), (4, 20, 20), (9, 72, 16), (64, 72, 16)],  # one position, ghost identity (x2), materialised
)
def test_the_product_norms_are_the_products(positions: int, inputs: int, outputs: int) -> None:
    generator = torch.Generator().manual_seed(positions)
    a = torch.randn(6, inputs, positions, generator=generator, dtype=torch.float64)
    b = torch.randn(6, outputs, positions, generator=generator, dtype=torch.float64)
    products = torch.stack([b[i] @ a[i].T for i in range(len(a))])
    norms, materialised = _product_norms(a, b)
    torch.testing.assert_close(norms, products.square().sum((1, 2)))
    if materialised is not None:
        torch.testing.assert_close(materialised, products)
    assert (materialised is None) == (positions * (inputs + outputs) <= inputs * outputs)


def test_an_empty_batch_steps_with_noise_only() -> None:
    use_one_torch_thread()
    part, x, _ = _batch("fixed batchnorm block")
    before = [p.detach().clone() for p in part.parameters() if p.requires_grad]
    noise_multiplier, clip, expected_batch = 0.8, 0.5, 6.0
    step = _GhostDirectStep(
        part, TrainConfig(optimizer="sgd-plain", lr=0.1), noise_multiplier, clip, expected_batch, SeededRandom(4)
    )
    assert isinstance(step.optimizer, _ClippedSumOptimizer)
    step.optimizer.zero_grad()
    step.nothing_sampled()
    assert step.optimizer.pre_step()
    step.optimizer.original_optimizer.step()
    step.close()
    sizes = [p.numel() for p in before]
    noise = SeededRandom(4).normal((sum(sizes),), noise_multiplier * clip) / expected_batch
    after = [p.detach() for p in part.parameters() if p.requires_grad]
    for old, new, drawn in zip(before, after, torch.split(noise, sizes)):
        torch.testing.assert_close(new, old - 0.1 * drawn.view_as(old))
    assert step.optimizer.noise_draws == 1


def test_dp_train_takes_empty_and_full_steps() -> None:
    use_one_torch_thread()
    part, x, y = _batch("frozen middle")
    kwargs = dict(noise_multiplier=1.0, max_grad_norm=1.0, steps=4, source=SeededRandom(2), mode="ghost-direct")
    before = {n: p.detach().clone() for n, p in part.named_parameters() if p.requires_grad}
    empty = dp_train(part, x, y, TrainConfig(), sample_rate=1e-6, expected_batch_size=1e-6 * len(y), **kwargs)
    assert empty.updates == 0 and empty.steps == 4 and empty.grad_sample_mode == "ghost-direct"
    assert all(not torch.equal(before[n], p) for n, p in part.named_parameters() if p.requires_grad)
    full = dp_train(part, x, y, TrainConfig(), sample_rate=0.5, expected_batch_size=0.5 * len(y), **kwargs)
    assert full.updates == 4


def test_the_mode_applies_where_direct_does() -> None:
    for name in PARTS:
        modes = supported_modes(PARTS[name]()[0])
        assert "ghost-direct" in modes and "direct" in modes
    unusual = nn.Sequential(nn.Linear(6, 4), nn.PReLU(), nn.Linear(4, 2))
    assert "ghost-direct" not in supported_modes(unusual)


def test_the_site_picks_it_where_it_applies_and_linear_does_not() -> None:
    for name in PARTS:
        part, x = PARTS[name]()
        assert grad_sample_mode(part, x) == "ghost-direct", name
    head = nn.Sequential(nn.Linear(6, 2))
    assert grad_sample_mode(head, torch.randn(4, 6)) == "linear"
    block, x = _fixed_batchnorm_block()
    stats = dp_train(
        block,
        x,
        torch.arange(len(x)) % 2,
        TrainConfig(),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        sample_rate=0.5,
        steps=2,
        expected_batch_size=0.5 * len(x),
        source=SeededRandom(0),
    )
    assert stats.grad_sample_mode == "ghost-direct"  # what the site's privacy report names
