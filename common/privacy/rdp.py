"""Opacus's RDP of one Poisson-subsampled Gaussian step, with its per-term scalar calls done on arrays.

Opacus 1.6's ``compute_rdp`` sums a series term by term in Python, calling scipy's ``binom`` (and, at
fractional orders, ``log_ndtr`` twice) on one number per term; those calls are most of its cost. Here
each term's value comes out of the same arithmetic, in the same order, on whole arrays of terms (scipy's
functions give the same value on an array as on one number; ``math.log`` stays per term, as numpy's
logarithm may differ in the last bit), and only the running log-space sum stays a loop, through Opacus's
own ``_log_add`` and ``_log_sub``, with its own stopping rule. ``tests/test_rdp.py`` checks the values
against Opacus's bit for bit. Opacus is pinned to 1.6 in ``pyproject.toml`` because this module repeats
its arithmetic and calls its private helpers.
"""

from __future__ import annotations

import math

import numpy as np
from opacus.accountants.analysis.rdp import _log_add, _log_sub
from scipy import special

#: Terms of the fractional-order series computed at once (the series usually ends within a few dozen).
SERIES_CHUNK = 64
#: Opacus ends the fractional-order series after the first term whose two parts are both below exp(-30).
_SERIES_END = -30


def subsampled_gaussian_rdp(q: float, sigma: float, order: float) -> float:
    """``opacus.accountants.analysis.rdp.compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=order)``."""
    if q == 0:
        return 0.0
    if sigma == 0:
        return math.inf
    if q == 1.0:
        return order / (2 * sigma**2)
    if math.isinf(order):
        return math.inf
    if float(order).is_integer():
        log_a = _log_a_integer(q, sigma, int(order))
    else:
        log_a = _log_a_fractional(q, sigma, order)
    return float(log_a / (order - 1))


def _log_a_integer(q: float, sigma: float, alpha: int) -> float:
    """Opacus's ``_compute_log_a_for_int_alpha``: log of sum_i C(alpha, i) q^i (1 - q)^(alpha - i)
    exp((i^2 - i) / (2 sigma^2)), summed from i = 0 up."""
    i = np.arange(alpha + 1)
    log_coefs = np.fromiter(map(math.log, special.binom(alpha, i).tolist()), float, alpha + 1)
    terms = log_coefs + i * math.log(q) + (alpha - i) * math.log(1 - q) + (i * i - i) / (2 * (sigma**2))
    log_a = -np.inf
    for term in terms.tolist():
        log_a = _log_add(log_a, term)
    return float(log_a)


def _log_a_fractional(q: float, sigma: float, alpha: float) -> float:
    """Opacus's ``_compute_log_a_for_frac_alpha``: two series in i = 0, 1, ..., each term added (or, where
    the generalised binomial coefficient is negative, subtracted) in log space, until a term whose two parts
    are both below exp(-30)."""
    log_a0, log_a1 = -np.inf, -np.inf
    z0 = sigma**2 * math.log(1 / q - 1) + 0.5
    start = 0
    while True:
        i = np.arange(start, start + SERIES_CHUNK)
        coefs = special.binom(alpha, i)
        log_coefs = np.fromiter(map(math.log, np.abs(coefs).tolist()), float, SERIES_CHUNK)
        j = alpha - i
        log_t0 = log_coefs + i * math.log(q) + j * math.log(1 - q)
        log_t1 = log_coefs + j * math.log(q) + i * math.log(1 - q)
        log_e0 = math.log(0.5) + _log_erfc((i - z0) / (math.sqrt(2) * sigma))
        log_e1 = math.log(0.5) + _log_erfc((z0 - j) / (math.sqrt(2) * sigma))
        log_s0 = log_t0 + (i * i - i) / (2 * (sigma**2)) + log_e0
        log_s1 = log_t1 + (j * j - j) / (2 * (sigma**2)) + log_e1
        for positive, s0, s1 in zip((coefs > 0).tolist(), log_s0.tolist(), log_s1.tolist(), strict=True):
            if positive:
                log_a0, log_a1 = _log_add(log_a0, s0), _log_add(log_a1, s1)
            else:
                log_a0, log_a1 = _log_sub(log_a0, s0), _log_sub(log_a1, s1)
            if max(s0, s1) < _SERIES_END:
                return _log_add(log_a0, log_a1)
        start += SERIES_CHUNK


def _log_erfc(x: np.ndarray) -> np.ndarray:
    """Opacus's ``_log_erfc``: log(erfc(x)) as log(2) + log_ndtr(-x sqrt(2))."""
    return math.log(2) + special.log_ndtr(-x * 2**0.5)
