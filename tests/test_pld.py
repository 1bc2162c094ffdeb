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
        args = dict(sensitivity=1, sampling_prob=0.25, adjacency_type=adjacency)
        ours = pld._ArrayGaussianPrivacyLoss(2.0, **args)
        theirs = GaussianPrivacyLoss(2.0, **args)
        for epsilon in (-1.0, 0.0, 0.1, 0.2876820724517809, 1.5):
            assert ours.get_delta_for_epsilon(epsilon) == theirs.get_delta_for_epsilon(epsilon)
        assert isinstance(ours.get_delta_for_epsilon(0.5), float)


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
