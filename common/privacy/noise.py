"""Where a site's DP randomness comes from: Poisson sampling and Gaussian noise.

Two sources, one interface:

- :class:`SecureRandom` (every deployed site, every run on real data): AES-256 in
  counter mode keyed from the operating system's CSPRNG (``os.urandom``), a
  cryptographically secure stream that neither the coordinator nor anyone who replays
  the training can predict. Gaussian samples are drawn with the Box-Muller transform and
  each returned value is the normalised sum of four of them, the defence Opacus's
  ``secure_mode`` uses against floating-point attacks on the sampler (Holohan and Braghin
  2021; Jin et al. 2022).
- :class:`SeededRandom` (opt-in, simulations on built-in generated or bundled data only):
  a seeded ``torch.Generator``. Anyone who knows the seed can replay the training with
  and without a record and tell the difference exactly, so results drawn from it carry
  **no** differential-privacy guarantee; the ledger marks them and the audit fails them.
"""

from __future__ import annotations

import math
import os
from typing import Literal, Protocol

import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

NoiseKind = Literal["csprng", "seeded"]
#: What the ledger and reports call each source.
NOISE_KINDS: tuple[NoiseKind, ...] = ("csprng", "seeded")

_MANTISSA = 2.0**-53
_TOP_53 = (1 << 53) - 1
_ZEROS = bytes(1 << 20)
#: How many Gaussian values :meth:`SecureRandom.normal` computes at a time.
NOISE_CHUNK = 1 << 16


class RandomSource(Protocol):
    """Uniforms for Poisson sampling and Gaussian noise; ``kind`` names the source."""

    kind: NoiseKind

    def uniform(self, n: int) -> torch.Tensor:
        """``n`` float64 values uniform in [0, 1)."""

    def normal(self, shape: tuple[int, ...], std: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Gaussian noise of mean 0 and standard deviation ``std``."""


def poisson_sample(source: RandomSource, n: int, rate: float) -> torch.Tensor:
    """Indices of the records a Poisson-sampled batch holds: each of ``n`` independently with ``rate``."""
    return torch.nonzero(source.uniform(n) < rate).flatten()


class SecureRandom:
    """AES-256-CTR keyed from ``os.urandom``: a CSPRNG stream, new for every instance."""

    kind: NoiseKind = "csprng"

    def __init__(self) -> None:
        self._stream = Cipher(algorithms.AES(os.urandom(32)), modes.CTR(os.urandom(16))).encryptor()

    def uniform(self, n: int) -> torch.Tensor:
        """The top 53 bits of each next 64-bit word of the stream, scaled onto the float64 grid of [0, 1)."""
        return _to_unit(self._words(n))

    def _words(self, n: int) -> torch.Tensor:
        """The next ``n`` 64-bit words of the stream, written straight into a tensor, 1 MiB at a time."""
        # Two spare words: the stream asks for room for a block less one byte past each input's length.
        words = torch.empty(max(n, 0) + 2, dtype=torch.int64)
        out = memoryview(words.numpy()).cast("B")
        for start in range(0, 8 * max(n, 0), len(_ZEROS)):
            size = min(len(_ZEROS), 8 * n - start)
            self._stream.update_into(_ZEROS[:size], out[start : start + size + 15])
        return words[: max(n, 0)]

    def normal(self, shape: tuple[int, ...], std: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Each value is half the sum of four independent standard normals: the cosine and sine parts of two
        Box-Muller pairs, value i taking pairs i and n + i of 2n pairs drawn from 4n uniforms (the radii's
        uniforms first, then the angles'), summed in the order cos(i), cos(n + i), sin(i), sin(n + i).
        Computed with torch's vectorised kernels, :data:`NOISE_CHUNK` values at a time, so the
        intermediate values stay small (no temporaries of 4n values)."""
        n = math.prod(shape)
        words = self._words(4 * n)
        total = torch.empty(n, dtype=torch.float64)
        for start in range(0, n, NOISE_CHUNK):
            stop = min(n, start + NOISE_CHUNK)
            radius_i, radius_n, angle_i, angle_n = (
                _to_unit(words[offset + start : offset + stop]) for offset in (0, n, 2 * n, 3 * n)
            )
            for radius in (radius_i, radius_n):
                radius.neg_().log1p_().mul_(-2.0).sqrt_()  # 1 - u lies in (0, 1]: the log is finite
            for angle in (angle_i, angle_n):
                angle.mul_(2.0 * math.pi)
            part = total[start:stop]
            torch.mul(torch.cos(angle_i), radius_i, out=part)
            part += torch.cos(angle_n).mul_(radius_n)
            part += angle_i.sin_().mul_(radius_i)
            part += angle_n.sin_().mul_(radius_n)
        total *= std / 2.0
        return total.reshape(shape).to(dtype)


def _to_unit(words: torch.Tensor) -> torch.Tensor:
    """64-bit words to floats uniform on the float64 grid of [0, 1): their top 53 bits times 2^-53."""
    return words.bitwise_right_shift(11).bitwise_and_(_TOP_53).to(torch.float64).mul_(_MANTISSA)


class SeededRandom:
    """A seeded ``torch.Generator``: reproducible, and therefore NOT private."""

    kind: NoiseKind = "seeded"

    def __init__(self, seed: int) -> None:
        self._generator = torch.Generator().manual_seed(seed)

    def uniform(self, n: int) -> torch.Tensor:
        return torch.rand(max(n, 0), generator=self._generator, dtype=torch.float64)

    def normal(self, shape: tuple[int, ...], std: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.normal(0.0, std, size=shape, generator=self._generator, dtype=torch.float64).to(dtype)
