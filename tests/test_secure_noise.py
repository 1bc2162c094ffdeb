"""The sites' Gaussian noise from the CSPRNG: the sum-of-four Box-Muller draws, value for value, and its law."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from scipy import stats

from common.privacy import noise
from common.privacy.noise import SecureRandom

#: How far two float64 computations of one value may differ by rounding (std 1.7, sums of four draws of at most ~9).
ROUNDING = 1e-12


def _keyed(monkeypatch: pytest.MonkeyPatch, key: bytes) -> SecureRandom:
    """A SecureRandom whose AES key and counter come from ``key`` instead of the OS (tests only)."""
    fixed = iter([key[:32], key[32:48]])
    monkeypatch.setattr(noise.os, "urandom", lambda n: next(fixed))
    source = SecureRandom()
    monkeypatch.setattr(noise.os, "urandom", os.urandom)
    return source


def _sum_of_four(source: SecureRandom, n: int, std: float, angles_first: bool = False) -> np.ndarray:
    """The definition, with every intermediate array: 4n standard normals from 2n Box-Muller pairs (radii from
    the first 2n uniforms, angles from the last 2n), value i half the sum of draws i, n + i, 2n + i, 3n + i.
    ``angles_first`` swaps the two halves: a wrong reading of the stream, for the test that the comparison fails."""
    pairs = 2 * n
    u = source.uniform(2 * pairs).numpy()
    radii, angles = (u[pairs:], u[:pairs]) if angles_first else (u[:pairs], u[pairs:])
    radius = np.sqrt(-2.0 * np.log1p(-radii))
    angle = 2.0 * math.pi * angles
    draws = np.concatenate([radius * np.cos(angle), radius * np.sin(angle)])
    return draws.reshape(4, n).sum(axis=0) * (std / 2.0)


@pytest.mark.parametrize("shape", [(1,), (7,), (3, 5), (0,), ()])
def test_the_noise_is_the_sum_of_four_box_muller_draws_value_for_value(
    monkeypatch: pytest.MonkeyPatch, shape: tuple[int, ...]
) -> None:
    key = bytes(range(48))
    drawn = _keyed(monkeypatch, key).normal(shape, 1.7, dtype=torch.float64)
    expected = _sum_of_four(_keyed(monkeypatch, key), math.prod(shape), 1.7)
    assert drawn.shape == torch.Size(shape)
    # torch's and numpy's vectorised log, sine and cosine may round the last bit differently.
    assert np.allclose(drawn.numpy().reshape(-1), expected, rtol=0, atol=ROUNDING)


def test_the_comparison_above_can_fail(monkeypatch: pytest.MonkeyPatch) -> None:
    """Another key, or the stream's halves read the other way round, give other values."""
    drawn = _keyed(monkeypatch, bytes(range(48))).normal((64,), 1.0, dtype=torch.float64).numpy()
    assert not np.allclose(
        drawn, _sum_of_four(_keyed(monkeypatch, bytes(range(1, 49))), 64, 1.0), rtol=0, atol=ROUNDING
    )
    swapped = _sum_of_four(_keyed(monkeypatch, bytes(range(48))), 64, 1.0, angles_first=True)
    assert not np.allclose(drawn, swapped, rtol=0, atol=ROUNDING)


def test_the_noise_is_gaussian_with_the_asked_deviation() -> None:
    values = SecureRandom().normal((200_000,), 2.5, dtype=torch.float64).numpy()
    assert abs(values.mean()) < 0.03 and values.std() == pytest.approx(2.5, rel=0.01)
    assert stats.kstest(values / 2.5, "norm").pvalue > 1e-4
    second = SecureRandom().normal((200_000,), 2.5, dtype=torch.float64).numpy()
    assert not np.array_equal(values, second)  # a fresh key per source


def test_the_uniforms_are_the_top_53_bits_of_each_word_of_the_aes_ctr_stream(monkeypatch: pytest.MonkeyPatch) -> None:
    """Read from an independent AES-256-CTR encryptor under the same key: words with the top bit set (negative as
    signed integers) must not turn into negative or shifted values."""
    key = bytes(range(48))
    drawn = _keyed(monkeypatch, key).uniform(1000).numpy()
    stream = Cipher(algorithms.AES(key[:32]), modes.CTR(key[32:48])).encryptor().update(bytes(8 * 1000))
    words = np.frombuffer(stream, dtype="<u8")
    assert (words >> np.uint64(63)).any()  # the case the test is for
    assert np.array_equal(drawn, (words >> np.uint64(11)).astype(np.float64) * 2.0**-53)
    assert drawn.min() >= 0.0 and drawn.max() < 1.0
