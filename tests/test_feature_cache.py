"""The feature cache keeps within its memory budget, spills the rest to disk exactly, never serves stale features."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from client.dp_training import dp_train, sample_rate_and_steps
from client.feature_cache import DISK_ENTRIES, FeatureCache, Features
from client.local_data import LocalData, frozen_features
from common.data.site_data import SiteData, Split
from common.model.training import TrainConfig, compute_features, use_one_torch_thread
from common.model.transfer import TransferPolicy
from common.model.zoo import build_model
from common.privacy.noise import SeededRandom


def _features(n: int, width: int, seed: int) -> Features:
    generator = torch.Generator().manual_seed(seed)
    return Features(
        torch.randn((n, width), generator=generator),
        torch.randint(0, 2, (n,), generator=generator),
        torch.randn((n // 2, width), generator=generator),
        torch.randint(0, 2, (n // 2,), generator=generator),
    )


def _equal(a: Features, b: Features) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.tensors().values(), b.tensors().values()))


def _never() -> Features:
    raise AssertionError("computed again: the cache did not serve it")


def test_entries_within_the_budget_stay_in_memory(tmp_path: Path) -> None:
    cache = FeatureCache(memory_bytes=2**20)
    first = cache.get("a", lambda: _features(100, 8, 0), tmp_path)
    assert cache.get("a", _never, tmp_path) is first
    assert cache.spilled == 0 and not any(tmp_path.iterdir())


def test_least_recently_used_entries_spill_and_come_back_bit_for_bit(tmp_path: Path) -> None:
    one = _features(200, 64, 1)
    cache = FeatureCache(memory_bytes=int(1.5 * one.nbytes))
    a = cache.get("a", lambda: _features(200, 64, 1), tmp_path)
    cache.get("b", lambda: _features(200, 64, 2), tmp_path)  # a no longer fits beside b: a is spilled
    assert cache.spilled == 1 and cache.in_memory() <= cache.memory_bytes
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [
        "test_x.npy",
        "test_y.npy",
        "train_x.npy",
        "train_y.npy",
    ]
    again = cache.get("a", _never, tmp_path)
    assert _equal(again, a) and _equal(again, one)


def test_an_entry_above_the_whole_budget_goes_to_disk_at_once(tmp_path: Path) -> None:
    cache = FeatureCache(memory_bytes=1000)
    big = cache.get("big", lambda: _features(300, 32, 3), tmp_path)
    assert cache.in_memory() == 0 and cache.spilled == 1
    assert isinstance(big.train_x, torch.Tensor) and _equal(big, _features(300, 32, 3))
    another_process = FeatureCache(memory_bytes=1000)  # a later SuperNode process finds it by its key
    assert _equal(another_process.get("big", _never, tmp_path), big)


def test_spilled_entries_are_bounded_on_disk(tmp_path: Path) -> None:
    cache = FeatureCache(memory_bytes=1)
    for i in range(DISK_ENTRIES + 3):
        cache.get(f"k{i}", lambda i=i: _features(10, 4, i), tmp_path)
    assert len([p for p in tmp_path.iterdir() if p.is_dir()]) == DISK_ENTRIES


def _local(x: np.ndarray, y: np.ndarray) -> LocalData:
    return LocalData(SiteData("site", Split(x, y), Split(x[:8], y[:8])), content_hash="c" * 64)


def test_another_input_adapter_with_the_same_weights_is_not_a_cache_hit(tmp_path: Path) -> None:
    torch.manual_seed(0)
    small = build_model("torchvision:resnet18", (1, 28, 28), 2, {"resize": 0})
    large = build_model("torchvision:resnet18", (1, 28, 28), 2, {"resize": 56})
    large.load_state_dict(small.state_dict())
    rng = np.random.default_rng(0)
    local = _local(rng.random((16, 1, 28, 28)).astype(np.float32), rng.integers(0, 2, 16))
    head = TransferPolicy.parse("head")
    a = frozen_features(local, small.eval(), head, tmp_path)
    b = frozen_features(local, large.eval(), head, tmp_path)
    assert not torch.allclose(a.train_x, b.train_x)


@pytest.mark.parametrize("policy_text", ["head", "last:1"])
def test_dp_on_spilled_resnet_features_gives_the_uncached_weights(tmp_path: Path, policy_text: str) -> None:
    """Exact: the same seeded noise gives the same weights from spilled features as from the whole model."""
    use_one_torch_thread()
    torch.manual_seed(3)
    base = build_model("torchvision:resnet18", (1, 28, 28), 2, {"resize": 0})
    transfer = TransferPolicy.parse(policy_text)
    generator = torch.Generator().manual_seed(5)
    x, y = torch.rand((48, 1, 28, 28), generator=generator), torch.randint(0, 2, (48,), generator=generator)
    config = TrainConfig(epochs=1, batch_size=16, lr=0.05, seed=0)
    rate, steps = sample_rate_and_steps(len(y), config.batch_size, config.epochs)

    def dp(module: torch.nn.Module, inputs: torch.Tensor) -> None:
        dp_train(
            module,
            inputs,
            y,
            config,
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            sample_rate=rate,
            steps=steps,
            expected_batch_size=rate * len(y),
            source=SeededRandom(11),
        )

    uncached = copy.deepcopy(base)
    transfer.apply(uncached)
    dp(uncached, x)

    cached = copy.deepcopy(base)
    transfer.apply(cached)
    frozen, trainable = transfer.split(cached)
    cache = FeatureCache(memory_bytes=1)  # everything spills
    features = cache.get("k", lambda: Features(compute_features(frozen, x), y, x[:0], y[:0]), tmp_path)
    assert cache.spilled == 1 and torch.equal(features.train_x, compute_features(frozen, x))
    dp(trainable, features.train_x)

    for name in transfer.trainable_names(base):
        torch.testing.assert_close(cached.state_dict()[name], uncached.state_dict()[name], rtol=0, atol=1e-5)
    assert not torch.equal(cached.head.weight, base.head.weight)
