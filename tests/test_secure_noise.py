"""The sites' Gaussian noise from the CSPRNG: the sum-of-four Box-Muller draws, value for value, and its law."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
from scipy import stats

from common.privacy import noise
from common.privacy.noise import SecureRandom


def _keyed(monkeypatch: pytest.MonkeyPatch, key: bytes) -> SecureRandom:
    """A SecureRandom whose AES key and counter come from ``key`` instead of the OS (tests only)."""
    fixed = iter([key[:32], key[32:48]])
    monkeypatch.setattr(noise.os, "urandom", lambda n: next(fixed))
    source = SecureRandom()
    monkeypatch.setattr(noise.os, "urandom", os.urandom)
    return source


def _sum_of_four(source: SecureRandom, n: int, std: float) -> np.ndarray:
    """The definition, with every intermediate array: 4n standard normals from 2n Box-Muller pairs (radii from
    the first 2n uniforms, angles from the last 2n), value i half the sum of draws i, n + i, 2n + i, 3n + i."""
    pairs = 2 * n
    u = source._uniform(2 * pairs)
    radius = np.sqrt(-2.0 * np.log1p(-u[:pairs]))
    angle = 2.0 * math.pi * u[pairs:]
    draws = np.concatenate([radius * np.cos(angle), radius * np.sin(angle)])
    return draws.reshape(4, n).sum(axis=0) * (std / 2.0)


@pytest.mark.parametrize("shape", [(1,), (7,), (3, 5), (0,), ()])
def test_the_noise_is_the_sum_of_four_box_muller_draws_bit_for_bit(
    monkeypatch: pytest.MonkeyPatch, shape: tuple[int, ...]
) -> None:
    key = bytes(range(48))
    drawn = _keyed(monkeypatch, key).normal(shape, 1.7, dtype=torch.float64)
    expected = _sum_of_four(_keyed(monkeypatch, key), math.prod(shape), 1.7)
    assert drawn.shape == torch.Size(shape)
    assert np.array_equal(drawn.numpy().reshape(-1), expected)


def test_the_comparison_above_can_fail(monkeypatch: pytest.MonkeyPatch) -> None:
    """Another key, or the draws summed in pairs of one Box-Muller pair, give other values."""
    drawn = _keyed(monkeypatch, bytes(range(48))).normal((64,), 1.0, dtype=torch.float64).numpy()
    assert not np.array_equal(drawn, _sum_of_four(_keyed(monkeypatch, bytes(range(1, 49))), 64, 1.0))


def test_the_noise_is_gaussian_with_the_asked_deviation() -> None:
    values = SecureRandom().normal((200_000,), 2.5, dtype=torch.float64).numpy()
    assert abs(values.mean()) < 0.03 and values.std() == pytest.approx(2.5, rel=0.01)
    assert stats.kstest(values / 2.5, "norm").pvalue > 1e-4
    second = SecureRandom().normal((200_000,), 2.5, dtype=torch.float64).numpy()
    assert not np.array_equal(values, second)  # a fresh key per source
