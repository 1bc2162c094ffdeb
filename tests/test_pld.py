"""common.privacy.pld against dp-accounting itself: the same distributions, probability for probability."""

from __future__ import annotations

import dp_accounting
import numpy as np
import pytest
from dp_accounting.pld import pld_pmf, privacy_loss_distribution

from common.privacy import pld
from common.privacy.accounting import PLD_INTERVAL, PLD_SEARCH_INTERVAL

SIGMAS = (0.5, 1.1, 2.19, 12.0, 40.0)  # 12 and 40 give sparse distributions at these grids
RATES = (0.001, 0.06, 0.25, 0.9, 1.0)


def _library(sigma: float, q: float, interval: float) -> privacy_loss_distribution.PrivacyLossDistribution:
    return privacy_loss_distribution.from_gaussian_mechanism(
        standard_deviation=sigma,
        value_discretization_interval=interval,
        sampling_prob=q,
        neighboring_relation=dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE,
    )


def _parts(pmf: pld_pmf.PLDPmf) -> tuple:
    """Everything a PMF holds: its kind, where its losses start and their probabilities, its infinite mass."""
    if isinstance(pmf, pld_pmf.DensePLDPmf):
        return ("dense", pmf._discretization, pmf._lower_loss, pmf._probs.tolist(), pmf._infinity_mass)
    losses = sorted(pmf._loss_probs)
    return ("sparse", pmf._discretization, losses, [pmf._loss_probs[k] for k in losses], pmf._infinity_mass)


def _same(ours: privacy_loss_distribution.PrivacyLossDistribution, theirs) -> bool:
    return (
        ours._symmetric == theirs._symmetric
        and _parts(ours._pmf_remove) == _parts(theirs._pmf_remove)
        and _parts(ours._pmf_add) == _parts(theirs._pmf_add)
    )


@pytest.mark.parametrize("interval", [PLD_INTERVAL, PLD_SEARCH_INTERVAL])
@pytest.mark.parametrize("q", RATES)
@pytest.mark.parametrize("sigma", SIGMAS)
def test_the_distribution_and_its_self_compositions_are_dp_accountings_bit_for_bit(
    sigma: float, q: float, interval: float
) -> None:
    ours, theirs = pld.subsampled_gaussian(sigma, q, interval), _library(sigma, q, interval)
    assert _same(ours, theirs)
    for n in (1, 8, 24, 300):
        composed, expected = pld.self_compose(ours, n), theirs.self_compose(n)
        assert _same(composed, expected)
        assert composed.get_epsilon_for_delta(1e-5) == expected.get_epsilon_for_delta(1e-5)


def test_the_comparison_can_fail() -> None:
    """A neighbouring sigma, rate or step count gives another distribution, which the comparison sees."""
    theirs = _library(2.19, 0.25, PLD_INTERVAL)
    assert not _same(pld.subsampled_gaussian(2.19 * (1 + 1e-9), 0.25, PLD_INTERVAL), theirs)
    assert not _same(pld.subsampled_gaussian(2.19, 0.2500001, PLD_INTERVAL), theirs)
    assert not _same(pld.self_compose(pld.subsampled_gaussian(2.19, 0.25, PLD_INTERVAL), 9), theirs.self_compose(8))


def test_a_scalar_epsilon_gives_a_scalar_delta_as_the_library_does() -> None:
    from dp_accounting.pld.privacy_loss_mechanism import AdjacencyType, GaussianPrivacyLoss

    for adjacency in (AdjacencyType.ADD, AdjacencyType.REMOVE):
        ours = pld._ArrayGaussianPrivacyLoss(2.0, sampling_prob=0.25, adjacency_type=adjacency)
        theirs = GaussianPrivacyLoss(2.0, sensitivity=1, sampling_prob=0.25, adjacency_type=adjacency)
        for epsilon in (-1.0, 0.0, 0.1, 0.2876820724517809, 1.5):
            assert ours.get_delta_for_epsilon(epsilon) == theirs.get_delta_for_epsilon(epsilon)
        assert isinstance(ours.get_delta_for_epsilon(0.5), float)
        assert ours.privacy_loss_tail() == theirs.privacy_loss_tail()
        assert ours.connect_dots_bounds() == theirs.connect_dots_bounds()
    with pytest.raises(ValueError, match="Standard deviation"):
        pld._ArrayGaussianPrivacyLoss(0.0, sampling_prob=0.25, adjacency_type=AdjacencyType.ADD)


def test_self_compose_refuses_a_count_below_one() -> None:
    with pytest.raises(ValueError, match="n should be >= 1"):
        pld.self_compose(pld.subsampled_gaussian(2.0, 0.25, PLD_INTERVAL), 0)


def test_sparse_distributions_compose_through_the_library() -> None:
    sparse = pld.subsampled_gaussian(40.0, 0.001, PLD_INTERVAL)
    assert isinstance(sparse._pmf_remove, pld_pmf.SparsePLDPmf)
    assert np.isfinite(pld.self_compose(sparse, 50).get_epsilon_for_delta(1e-5))


@pytest.mark.parametrize(
    "first,second",
    [
        ((2.19, 0.25, 24), (3.2, 1.0, 1)),
        ((0.9, 0.06, 300), (1.1, 0.06, 8)),
        ((40.0, 0.001, 1), (12.0, 0.9, 1)),  # sparse with sparse
        ((40.0, 0.001, 1), (0.5, 0.25, 8)),  # sparse with dense
    ],
)
def test_composition_is_dp_accountings_bit_for_bit(first: tuple, second: tuple) -> None:
    def phase(sigma: float, q: float, n: int, ours: bool) -> privacy_loss_distribution.PrivacyLossDistribution:
        if ours:
            return pld.self_compose(pld.subsampled_gaussian(sigma, q, PLD_INTERVAL), n)
        return _library(sigma, q, PLD_INTERVAL).self_compose(n)

    identity = privacy_loss_distribution.identity(value_discretization_interval=PLD_INTERVAL)
    ours = pld.compose(pld.compose(identity, phase(*first, True)), phase(*second, True))
    theirs = identity.compose(phase(*first, False)).compose(phase(*second, False))
    assert _same(ours, theirs)
    assert ours.get_epsilon_for_delta(1e-5) == theirs.get_epsilon_for_delta(1e-5)


def test_the_truncated_tails_are_the_longest_prefix_and_suffix_within_half_the_bound() -> None:
    probs = np.array([1e-16, 2e-16, 3e-16, 0.5, 0.5 - 1e-15, 4e-16, 1e-16])
    offset, kept, right = pld._truncate_tails(probs.copy())
    # Half the bound is 5e-16: the prefix 1e-16 + 2e-16 fits, adding 3e-16 would not; the suffix 1e-16 + 4e-16 fits.
    assert offset == 2 and len(kept) == 3 and right == np.sum(probs[5:])
    assert kept[0] == 3e-16 + np.sum(probs[:2])
    library = pld_pmf._truncate_tails(probs.copy(), 1e-15, True)
    assert (offset, kept.tolist(), right) == (library[0], library[1].tolist(), library[2])


DELTAS = (1e-12, 1e-9, 1e-5, 1e-3, 0.1, 0.5)


@pytest.mark.parametrize("interval", [PLD_INTERVAL, PLD_SEARCH_INTERVAL])
@pytest.mark.parametrize(("sigma", "q", "n"), [(0.5, 0.25, 24), (1.47, 0.09, 78), (2.19, 1.0, 1), (40.0, 0.001, 300)])
def test_epsilon_for_delta_is_dp_accountings_bit_for_bit(sigma: float, q: float, n: int, interval: float) -> None:
    composed = _library(sigma, q, interval).self_compose(n)
    for delta in DELTAS:
        assert pld.epsilon_for_delta(composed, delta) == composed.get_epsilon_for_delta(delta)


def test_epsilon_for_delta_scans_past_its_estimate_and_takes_infinite_mass_as_the_library_does() -> None:
    composed = _library(0.9, 0.25, PLD_INTERVAL).self_compose(24)
    pmf = composed._pmf_remove
    assert pmf.size > pld.EPSILON_SCAN_MIN_SIZE
    # Mass at infinite loss above delta: no finite epsilon; a mass just below it: a finite one.
    heavy = pld_pmf.DensePLDPmf(pmf._discretization, pmf._lower_loss, pmf._probs, 2e-5, True)
    assert pld._epsilon_for_delta(heavy, 1e-5) == heavy.get_epsilon_for_delta(1e-5) == np.inf
    light = pld_pmf.DensePLDPmf(pmf._discretization, pmf._lower_loss, pmf._probs, 0.99e-5, True)
    assert pld._epsilon_for_delta(light, 1e-5) == light.get_epsilon_for_delta(1e-5)
    # An estimate that stops far too early only costs more passes: the scan continues to the true stop.
    original = pld.EPSILON_SCAN_WINDOW
    try:
        pld.EPSILON_SCAN_WINDOW = 3
        assert pld._epsilon_for_delta(pmf, 1e-5) == pmf.get_epsilon_for_delta(1e-5)
    finally:
        pld.EPSILON_SCAN_WINDOW = original


def test_the_epsilon_comparison_can_fail() -> None:
    """A distribution with one point's probability moved by a part in 1e9 gives another epsilon."""
    composed = _library(1.47, 0.09, PLD_INTERVAL).self_compose(78)
    pmf = composed._pmf_remove
    expected = pmf.get_epsilon_for_delta(1e-5)
    probs = pmf._probs.copy()
    top = int(np.argmax(np.cumsum(probs[::-1]) > 1e-5))  # a point in the scanned upper tail
    probs[len(probs) - 1 - top] *= 1 + 1e-9
    moved = pld_pmf.DensePLDPmf(pmf._discretization, pmf._lower_loss, probs, pmf._infinity_mass, True)
    assert pld._epsilon_for_delta(moved, 1e-5) != expected


@pytest.mark.parametrize("scale", [0.3, 1.0, 2.19, 40.0])
def test_the_normal_distribution_is_scipys_frozen_one_bit_for_bit(scale: float) -> None:
    from scipy import stats

    frozen, ours = stats.norm(scale=scale), pld._Normal(scale)
    x = np.concatenate((np.linspace(-80, 80, 20001), [-np.inf, np.inf, -0.0, 0.0, 1e-300, np.nan]))
    p = np.concatenate((np.logspace(-300, 0, 4001), 1 - np.logspace(-16, -1, 500), [0.0, 1.0, 0.5]))
    for ours_values, theirs in (
        (ours.cdf(x), frozen.cdf(x)),
        (ours.logcdf(x), frozen.logcdf(x)),
        (ours.ppf(p), frozen.ppf(p)),
    ):
        np.testing.assert_array_equal(ours_values, theirs)
    for value in (-3.5, 0.0, 2.25):
        assert ours.cdf(value) == frozen.cdf(value) and ours.logcdf(value) == frozen.logcdf(value)
        assert type(ours.cdf(value)) is type(frozen.cdf(value))
    assert ours.ppf(np.exp(-50.0)) == frozen.ppf(np.exp(-50.0))
