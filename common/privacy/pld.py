"""dp-accounting's privacy loss distribution of DP-SGD's step, with its per-point Python loops vectorised.

A site's accounting is dominated by loops in dp-accounting 0.6 that run Python code once per grid
point: building the pessimistic connect-the-dots PLD of a Poisson-subsampled Gaussian (one inverse
privacy loss per discretisation point, about 3,500 to 9,000 of them, then a dictionary of every
point) and self-composing a PLD (one ``logsumexp`` over the distribution per Chernoff order, 40
orders, to bound the tails it may truncate). This module does the same arithmetic on whole arrays
and leaves the rest to the library:

- :func:`subsampled_gaussian` takes the library's ``GaussianPrivacyLoss`` with its
  ``get_delta_for_epsilon`` computed on arrays, and the connect-the-dots probabilities
  (Doroshenko et al. 2022, Algorithm 1) as ``create_pmf_pessimistic_connect_dots_fixed_gap``
  computes them, built dense directly where the library would go through a dictionary;
- :func:`self_compose` is ``DensePLDPmf.self_compose`` with the 40 ``logsumexp`` computed at once
  over a matrix, with scipy's arithmetic.

``tests/test_pld.py`` checks that every probability, truncation bound, infinite mass and composed
epsilon equals the library's own (``from_gaussian_mechanism``, ``PrivacyLossDistribution.self_compose``)
bit for bit, and the audit recomputes every ledger with dp-accounting itself. dp-accounting is pinned
in ``pyproject.toml`` because this module reads private constants and attributes of it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from dp_accounting.pld import pld_pmf, privacy_loss_distribution
from dp_accounting.pld.privacy_loss_mechanism import AdditiveNoisePrivacyLoss, AdjacencyType, GaussianPrivacyLoss
from scipy import fft, signal, special

PrivacyLossDistribution = privacy_loss_distribution.PrivacyLossDistribution

#: dp-accounting's defaults for ``from_gaussian_mechanism`` and ``self_compose``.
LOG_MASS_TRUNCATION_BOUND = -50.0
TAIL_MASS_TRUNCATION = 1e-15
#: Smaller distributions go to the library's scan, as fast there as these arrays.
EPSILON_SCAN_MIN_SIZE = 2048
#: Points scanned exactly past where an estimate puts the end of the scan for an epsilon.
EPSILON_SCAN_MARGIN = 64
#: Points looked at by that estimate at once (the scan usually stops within the top half of a distribution).
EPSILON_SCAN_WINDOW = 16384
#: Below minus this loss, exp(-loss) overflows a float; the library's scan raises there, so it gets such a PMF.
_EXP_SAFE_LOSS = 700.0


class _Normal:
    """The centred normal distribution at one scale, computed as scipy's ``stats.norm(scale=...)`` computes it
    (its cdf, log cdf and quantile are ``ndtr``, ``log_ndtr`` and ``ndtri`` of the standardised value), without
    the 0.3 ms that building that frozen distribution costs or the 30-80 us of each of its calls."""

    def __init__(self, scale: float) -> None:
        self.scale = scale

    def cdf(self, x: float | np.ndarray) -> float | np.ndarray:
        return special.ndtr(np.asarray(x, dtype=float) / self.scale)[()]

    def logcdf(self, x: float | np.ndarray) -> float | np.ndarray:
        return special.log_ndtr(np.asarray(x, dtype=float) / self.scale)[()]

    def ppf(self, p: float | np.ndarray) -> float | np.ndarray:
        return (special.ndtri(np.asarray(p, dtype=float)) * self.scale)[()]


class _ArrayGaussianPrivacyLoss(GaussianPrivacyLoss):
    """``GaussianPrivacyLoss`` whose hockey-stick divergence inverts the privacy loss on whole arrays."""

    def __init__(
        self,
        standard_deviation: float,
        sampling_prob: float,
        adjacency_type: AdjacencyType,
    ) -> None:
        """``GaussianPrivacyLoss(standard_deviation, sensitivity=1, pessimistic_estimate=True,
        log_mass_truncation_bound=-50, sampling_prob, adjacency_type)``, its noise a :class:`_Normal`."""
        if not standard_deviation > 0:
            raise ValueError(f"Standard deviation is not a positive real number: {standard_deviation}")
        self._standard_deviation = standard_deviation
        self._gaussian_random_variable = _Normal(standard_deviation)
        self._pessimistic_estimate = True
        self._log_mass_truncation_bound = LOG_MASS_TRUNCATION_BOUND
        AdditiveNoisePrivacyLoss.__init__(self, 1, False, sampling_prob, adjacency_type)

    def get_delta_for_epsilon(self, epsilon: float | Sequence[float]) -> float | np.ndarray:
        scalar = isinstance(epsilon, (int, float))
        epsilons = np.atleast_1d(np.asarray(epsilon, dtype=float))
        deltas = np.zeros_like(epsilons)
        q = self.sampling_prob
        if q == 1.0:
            inside = np.full(epsilons.shape, True)
        elif self.adjacency_type == AdjacencyType.ADD:
            inside = epsilons < -math.log1p(-q)  # the divergence is 0 beyond
        elif self.adjacency_type == AdjacencyType.REMOVE:
            inside = epsilons > math.log1p(-q)
            deltas[~inside] = -np.expm1(epsilons[~inside])
        else:
            raise ValueError(f"{self.adjacency_type} adjacency is not supported here")
        chosen = epsilons[inside]
        cutoffs = self._inverse_privacy_losses(chosen)
        deltas[inside] = self.mu_upper_cdf(cutoffs) - np.exp(chosen + self.mu_lower_log_cdf(cutoffs))
        deltas = np.clip(deltas, 0, 1)
        return float(deltas[0]) if scalar else deltas

    def _inverse_privacy_losses(self, losses: np.ndarray) -> np.ndarray:
        """``inverse_privacy_loss`` of each value, the subsampled cases as dp-accounting computes them:
        REMOVE: the unsubsampled inverse at log(exp(loss) / q + 1 - 1 / q); ADD: sensitivity plus it at
        -log(exp(-loss) / q + 1 - 1 / q); at the loss where that argument is 0 (to ``math.isclose``), the
        inverse at -infinity (REMOVE) or +infinity (ADD)."""
        q = self.sampling_prob
        sensitivity = self.sensitivity
        variance = self._standard_deviation**2
        add = self.adjacency_type == AdjacencyType.ADD
        if q == 1.0:
            unsubsampled = losses
        else:
            edge = -math.log(1 - q) if add else math.log(1 - q)
            at_edge = np.abs(losses - edge) <= 1e-9 * np.maximum(np.abs(losses), abs(edge))
            exponent = -losses if add else losses
            with np.errstate(divide="ignore", invalid="ignore"):
                shifted = exponent + np.log(1 / q)
                unsubsampled = np.where(
                    exponent == 0, np.log(1 / q + (1 - 1 / q)), shifted + np.log1p(-np.exp(np.log(1 / q - 1) - shifted))
                )
            if add:
                unsubsampled = -unsubsampled
            unsubsampled = np.where(at_edge, math.inf if add else -math.inf, unsubsampled)
        removed = -0.5 * sensitivity - unsubsampled * variance / sensitivity
        return sensitivity + removed if add else removed


def subsampled_gaussian(sigma: float, q: float, interval: float) -> PrivacyLossDistribution:
    """``from_gaussian_mechanism(sigma, sampling_prob=q, value_discretization_interval=interval)`` with its
    other arguments at their defaults (sensitivity 1, pessimistic, connect-the-dots, add-or-remove)."""

    def pmf(adjacency: AdjacencyType) -> pld_pmf.PLDPmf:
        loss = _ArrayGaussianPrivacyLoss(sigma, sampling_prob=q, adjacency_type=adjacency)
        bounds = loss.connect_dots_bounds()
        upper = math.ceil(bounds.epsilon_upper / interval)
        lower = math.floor(bounds.epsilon_lower / interval)
        deltas = loss.get_delta_for_epsilon(np.arange(lower, upper + 1) * interval)
        return _connect_the_dots(interval, lower, upper, deltas)

    remove = pmf(AdjacencyType.REMOVE)
    if q == 1.0:
        return PrivacyLossDistribution(remove)
    return PrivacyLossDistribution(remove, pmf(AdjacencyType.ADD))


def _connect_the_dots(interval: float, lower: int, upper: int, deltas: np.ndarray) -> pld_pmf.PLDPmf:
    """The pessimistic connect-the-dots PMF on the losses lower..upper (times ``interval``) from each loss's
    hockey-stick divergence (Doroshenko et al. 2022, Algorithm 1), as ``create_pmf_pessimistic_connect_dots_fixed_gap``
    computes it; a distribution too large to be sparse is built dense directly instead of through a dictionary
    of every point. Smaller ones, and any input the library would refuse, go to the library's function."""
    deltas = np.asarray(deltas, dtype=np.float64)
    dense = upper - lower + 1 > pld_pmf._MAX_PMF_SPARSE_SIZE and deltas.size == upper - lower + 1
    valid = np.all((deltas >= 0) & (deltas <= 1)) and not np.any(np.diff(deltas) > pld_pmf._DELTA_DIFF_TOLERANCE)
    if not (dense and valid):
        return pld_pmf.create_pmf_pessimistic_connect_dots_fixed_gap(interval, lower, upper, deltas)
    deltas = np.minimum.accumulate(deltas)
    steps = np.diff(deltas)
    probs = np.zeros_like(deltas)
    # First loss: what the divergence leaves below it; middle ones: the change of slope between neighbours;
    # the last: its share of the final drop; the divergence at the last loss is the infinite loss's mass.
    probs[0] = 1 - deltas[0] + steps[0] / math.expm1(interval)
    probs[1:-1] = (steps[1:] - steps[:-1] * math.exp(interval)) / math.expm1(interval)
    probs[-1] = steps[-1] / math.expm1(-interval)
    probs = np.maximum(0.0, probs)
    return pld_pmf.DensePLDPmf(interval, lower, probs, deltas[-1], True)


def self_compose(pld: PrivacyLossDistribution, n: int) -> PrivacyLossDistribution:
    """``pld.self_compose(n)`` (tail mass truncation 1e-15)."""
    remove = _self_compose_pmf(pld._pmf_remove, n)
    if pld._symmetric:
        return PrivacyLossDistribution(remove)
    return PrivacyLossDistribution(remove, _self_compose_pmf(pld._pmf_add, n))


def compose(first: PrivacyLossDistribution, second: PrivacyLossDistribution) -> PrivacyLossDistribution:
    """``first.compose(second)`` (tail mass truncation 1e-15)."""
    remove = _compose_pmfs(first._pmf_remove, second._pmf_remove)
    if first._symmetric and second._symmetric:
        return PrivacyLossDistribution(remove)
    return PrivacyLossDistribution(remove, _compose_pmfs(first._pmf_add, second._pmf_add))


def _compose_pmfs(first: pld_pmf.PLDPmf, second: pld_pmf.PLDPmf) -> pld_pmf.PLDPmf:
    """``compose_pmfs``: two small sparse PMFs through the library; otherwise ``DensePLDPmf.compose``, the
    FFT convolution of the probabilities, with its tails truncated on arrays."""
    if (
        isinstance(first, pld_pmf.SparsePLDPmf)
        and isinstance(second, pld_pmf.SparsePLDPmf)
        and first.size * second.size <= pld_pmf._MAX_PMF_SPARSE_SIZE
    ):
        return pld_pmf.compose_pmfs(first, second, TAIL_MASS_TRUNCATION)
    first, second = first.to_dense_pmf(), second.to_dense_pmf()
    first.validate_composable(second)
    probs = signal.fftconvolve(first._probs, second._probs)
    infinity = first._infinity_mass + second._infinity_mass - first._infinity_mass * second._infinity_mass
    offset, probs, right = _truncate_tails(probs)
    return pld_pmf.DensePLDPmf(
        first._discretization,
        first._lower_loss + second._lower_loss + offset,
        probs,
        infinity + right,
        first._pessimistic_estimate,
    )


def _truncate_tails(probs: np.ndarray) -> tuple[int, np.ndarray, float]:
    """The library's pessimistic ``_truncate_tails``: drop the longest prefix and suffix each holding at most
    half of 1e-15 (sums accumulated in the same order), move the prefix's mass onto the first point kept and
    return the suffix's as mass at infinite loss."""
    half = TAIL_MASS_TRUNCATION / 2
    left = _prefix_at_most(probs, half)
    right = len(probs) - _prefix_at_most(probs[::-1], half)
    right = max(right, left + 1)
    left_mass = np.sum(probs[:left])
    right_mass = np.sum(probs[right:])
    kept = probs[left:right]
    kept[0] += left_mass
    return left, kept, right_mass


def _prefix_at_most(values: np.ndarray, threshold: float) -> int:
    """Length of the longest prefix whose running sum (added left to right) stays at or below ``threshold``."""
    over = np.flatnonzero(np.cumsum(values) > threshold)
    return int(over[0]) if len(over) else len(values)


def epsilon_for_delta(pld: PrivacyLossDistribution, delta: float) -> float:
    """``pld.get_epsilon_for_delta(delta)``: the larger of the two adjacencies' epsilons."""
    remove = _epsilon_for_delta(pld._pmf_remove, delta)
    if pld._symmetric:
        return remove
    return max(remove, _epsilon_for_delta(pld._pmf_add, delta))


def _epsilon_for_delta(pmf: pld_pmf.PLDPmf, delta: float) -> float:
    """``DensePLDPmf.get_epsilon_for_delta``, its scan from the largest loss down done a chunk at a time on
    arrays (other and small PMFs go to the library).

    The library walks the losses from the top, adding each probability to the mass above and
    exp(-loss) times it to the lower distribution's mass, and stops at the first loss that
    log((mass above - delta) / lower mass) reaches. Here the losses are the library's own (a float
    counted down from the largest by repeated subtraction of the interval), both masses are running
    sums added in the library's order, and exp(-loss) is ``math.exp``; ``np.log`` only finds where
    the scan stops: each loss it puts within 1e-12 of the stop is decided again with ``math.log``,
    and the value is the library's, from the masses at the stop.
    """
    if not isinstance(pmf, pld_pmf.DensePLDPmf) or pmf._infinity_mass > delta or pmf.size < EPSILON_SCAN_MIN_SIZE:
        return pmf.get_epsilon_for_delta(delta)
    interval = pmf._discretization
    probs = np.flip(pmf._probs)
    top = (pmf._lower_loss + len(probs) - 1) * interval
    losses = np.cumsum(np.concatenate(([top], np.full(len(probs) - 1, -interval))))
    if len(losses) and losses[-1] < -_EXP_SAFE_LOSS:
        return pmf.get_epsilon_for_delta(delta)  # exp(-loss) would overflow, as the library reports
    upper, lower = float(pmf._infinity_mass), 0.0
    start = 0
    while start < len(probs):
        end = start + _scan_length(probs[start:], losses[start:], upper, lower, delta)
        loss, prob = losses[start:end], probs[start:end]
        # The masses before each point of the part, then after its last.
        uppers = np.cumsum(np.concatenate(([upper], prob)))
        lowers = np.cumsum(np.concatenate(([lower], np.fromiter(map(math.exp, (-loss).tolist()), float) * prob)))
        stop = _first_stop(uppers[:-1], lowers[:-1], loss, delta)
        underflow = np.flatnonzero((uppers[1:] >= delta) & (lowers[1:] == 0))
        if len(underflow) and (stop is None or underflow[0] < stop):
            return max(0, float(loss[underflow[0]]))
        at = len(prob) if stop is None else stop
        upper, lower = float(uppers[at]), float(lowers[at])
        if stop is not None:
            break
        start = end
    if upper <= lower + delta:
        return 0
    return math.log((upper - delta) / lower)


def _scan_length(probs: np.ndarray, losses: np.ndarray, upper: float, lower: float, delta: float) -> int:
    """How many points to scan exactly: to a little past where the scan stops with ``np.exp`` in place of
    ``math.exp`` (they differ by a unit in the last place at most, so the exact stop is at or next to it),
    looking at most :data:`EPSILON_SCAN_WINDOW` points ahead."""
    probs, losses = probs[:EPSILON_SCAN_WINDOW], losses[:EPSILON_SCAN_WINDOW]
    with np.errstate(over="ignore"):
        lowers = lower + np.cumsum(np.exp(-losses) * probs)
    uppers = upper + np.cumsum(probs)
    stop = _first_stop(uppers[:-1], lowers[:-1], losses[1:], delta)  # masses after a point, the next loss
    return len(probs) if stop is None else min(len(probs), stop + 2 + EPSILON_SCAN_MARGIN)


def _first_stop(uppers: np.ndarray, lowers: np.ndarray, losses: np.ndarray, delta: float) -> int | None:
    """The first index where the library's scan stops: mass above > delta, lower mass > 0 and
    ``math.log((upper - delta) / lower) >= loss``; None if there is none."""
    valid = (uppers > delta) & (lowers > 0)
    with np.errstate(all="ignore"):
        estimate = np.log((uppers - delta) / lowers)
    close = valid & (np.abs(estimate - losses) <= 1e-12 * np.maximum(1.0, np.abs(losses)))
    stops = valid & ~close & (estimate >= losses)
    for i in np.flatnonzero(close):
        if math.log((float(uppers[i]) - delta) / float(lowers[i])) >= losses[i]:
            stops[i] = True
    found = np.flatnonzero(stops)
    return int(found[0]) if len(found) else None


def _self_compose_pmf(pmf: pld_pmf.PLDPmf, n: int) -> pld_pmf.PLDPmf:
    """``DensePLDPmf.self_compose``: an FFT power of the probabilities, truncated where a Chernoff bound
    at 40 orders says at most 1e-15 of the mass lies beyond (that mass is counted as infinite loss)."""
    if n <= 0:
        raise ValueError(f"n should be >= 1, n={n}")
    if isinstance(pmf, pld_pmf.SparsePLDPmf):
        # As SparsePLDPmf.self_compose: pairwise products while the result may stay small, else dense.
        if n == 1 or pmf.size**n <= pld_pmf._MAX_PMF_SPARSE_SIZE:
            return pmf.self_compose(n, TAIL_MASS_TRUNCATION)
        pmf = pmf.to_dense_pmf()
    probs = pmf._probs
    lower, upper = _self_convolve_bounds(probs, n)
    length = upper - lower + 1
    size = fft.next_fast_len(max(length, len(probs)))
    power = np.real(fft.ifft(fft.fft(probs, size) ** n))
    composed = np.roll(power, -lower)[:length]
    infinity = TAIL_MASS_TRUNCATION - math.expm1(n * math.log1p(-pmf._infinity_mass))
    return pld_pmf.DensePLDPmf(
        pmf._discretization, pmf._lower_loss * n + lower, np.array(composed), infinity, pmf._pessimistic_estimate
    )


def _self_convolve_bounds(probs: np.ndarray, n: int) -> tuple[int, int]:
    """dp-accounting's ``compute_self_convolve_bounds`` at its default orders: the indices outside which the
    n-fold convolution holds at most 1e-15 of the mass, by the Chernoff bound at each order."""
    size = len(probs)
    orders = np.concatenate((np.arange(-20, 0), np.arange(1, 21))) / size
    lower, upper = 0, (size - 1) * n
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        bounds = (n * _log_mgfs(probs, orders) + math.log(2 / TAIL_MASS_TRUNCATION)) / orders
    for order, bound in zip(orders, bounds, strict=True):
        if not math.isfinite(bound):
            continue
        if order > 0:
            upper = min(upper, math.ceil(bound))
        else:
            lower = max(lower, math.floor(bound))
    return lower, upper


def _log_mgfs(probs: np.ndarray, orders: np.ndarray) -> np.ndarray:
    """log(sum_i probs[i] exp(order i)) for each order, with the arithmetic of scipy 1.17's ``logsumexp(order i,
    b=probs)`` (the largest term taken out, the others summed relative to it, then ``log1p``), without its
    per-call overhead. Each row's largest term is at the last index with mass for a positive order, the first
    for a negative one."""
    held = np.flatnonzero(probs != 0)
    if len(held) == 0:
        return np.full(len(orders), -math.inf)
    # One buffer, computed in place: fresh arrays of this size cost more in page faults than in arithmetic.
    terms = np.multiply(orders[:, None], np.arange(len(probs))[None, :])
    terms[:, probs == 0] = -math.inf
    top = np.where(orders > 0, held[-1], held[0])
    rows = np.arange(len(orders))
    largest = terms[rows, top][:, None]
    terms[rows, top] = -math.inf
    np.subtract(terms, largest, out=terms)
    np.exp(terms, out=terms)
    np.multiply(probs, terms, out=terms)
    ratio = np.sum(terms, axis=1, keepdims=True)
    mass = probs[top][:, None]
    ratio = np.where(ratio == 0, ratio, ratio / mass)
    return (np.log1p(ratio) + np.log(mass) + largest)[:, 0]
