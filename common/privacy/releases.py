"""DP releases beside the DP-SGD update: the Gaussian mechanism on counts and on clipped sums.

Each release is one Gaussian mechanism with noise multiplier ``sigma`` (noise standard
deviation over the L2 sensitivity under adding or removing one record). Its privacy loss
is exactly that of one DP-SGD step at sample rate 1 with that noise multiplier, so the
ledger records it as ``Step(sigma, 1.0, 1)`` and it composes with the training rounds in
the dataset's one history.
"""

from __future__ import annotations

import numpy as np
import torch

from common.privacy.ledger import LOSS, RELEASE_KINDS
from common.privacy.noise import RandomSource

#: Per-record cross-entropy is clipped to [0, LOSS_BOUND] before a DP training-loss release,
#: so one record moves the sum by at most LOSS_BOUND.
LOSS_BOUND = 5.0
#: One record lands in one cell of an evaluation histogram.
COUNT_SENSITIVITY = 1.0


def noisy_counts(counts: np.ndarray, noise_multiplier: float, source: RandomSource) -> list[list[float]]:
    """``counts`` plus Gaussian noise of standard deviation ``noise_multiplier`` (sensitivity 1) in every cell."""
    counts = np.asarray(counts, dtype=np.float64)
    noise = source.normal(counts.shape, noise_multiplier * COUNT_SENSITIVITY, torch.float64).numpy()
    return (counts + noise).tolist()


def noisy_mean_loss(losses: torch.Tensor, declared_size: int, noise_multiplier: float, source: RandomSource) -> float:
    """Mean per-record loss: clipped to [0, LOSS_BOUND], summed, noised (std ``noise_multiplier`` x LOSS_BOUND),
    divided by the public ``declared_size``, never by the exact count."""
    total = float(losses.detach().double().clamp(0.0, LOSS_BOUND).sum())
    total += float(source.normal((1,), noise_multiplier * LOSS_BOUND, torch.float64)[0])
    return total / declared_size


def release_sensitivity(kind: str) -> float:
    """The L2 sensitivity of a release kind: what its ledger entry records as its clipping bound."""
    if kind not in RELEASE_KINDS:
        raise ValueError(f"{kind!r} is not a DP release kind")
    return LOSS_BOUND if kind == LOSS else COUNT_SENSITIVITY
