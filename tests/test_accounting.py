"""Tests for common.privacy.accounting: composition, reference numbers, cross-checks, calibration."""

from __future__ import annotations

import copy

import pytest
from opacus.accountants import PRVAccountant, RDPAccountant

from common.privacy.accounting import (
    AccountingError,
    BudgetExhausted,
    Step,
    _calibrate,
    calibrate_noise,
    compose_epsilon,
    independent_epsilon,
    reference_epsilon,
)

DELTA = 1e-5


@pytest.mark.parametrize("accountant_cls,name", [(RDPAccountant, "rdp"), (PRVAccountant, "prv")])
def test_fresh_accountant_per_round_equals_single_accountant(accountant_cls, name):
    # A site restarts between rounds: a fresh Opacus accountant per round with the
    # stored history restored (deep-copied) must give exactly the single-accountant epsilon.
    rounds = [(1.1, 0.02, 60), (1.1, 0.02, 60), (0.9, 0.04, 30)]
    single = accountant_cls()
    stored_history: list = []
    per_round_eps = []
    for sigma, q, steps in rounds:
        for _ in range(steps):
            single.step(noise_multiplier=sigma, sample_rate=q)
        fresh = accountant_cls()
        fresh.load_state_dict({"history": copy.deepcopy(stored_history), "mechanism": name})
        round_only = accountant_cls()
        for _ in range(steps):
            fresh.step(noise_multiplier=sigma, sample_rate=q)
            round_only.step(noise_multiplier=sigma, sample_rate=q)
        stored_history = copy.deepcopy(fresh.state_dict()["history"])
        per_round_eps.append(round_only.get_epsilon(DELTA))
        assert fresh.get_epsilon(DELTA) == pytest.approx(single.get_epsilon(DELTA), rel=1e-12)
    history = [Step(s, q, n) for s, q, n in rounds]
    composed = compose_epsilon(history, DELTA, name)
    assert composed == pytest.approx(single.get_epsilon(DELTA), rel=1e-9)
    # Summing per-round epsilons overstates the spend. Measured here: rdp composed
    # 3.15 vs summed 5.60; prv composed 2.57 vs summed 4.30.
    assert sum(per_round_eps) > composed * 1.3


@pytest.mark.parametrize(
    "accountant,steps,expected",
    [("rdp", 100, 1.214), ("rdp", 1000, 2.101), ("rdp", 10000, 6.713), ("prv", 100, 0.728), ("prv", 1000, 1.838)],
)
def test_reference_numbers(accountant, steps, expected):
    # DESIGN.md section 5: q=0.01, sigma=1.0, delta=1e-5. PRV at 10000 steps (6.198)
    # takes seconds and is left to the benchmarks.
    assert compose_epsilon([Step(1.0, 0.01, steps)], DELTA, accountant) == pytest.approx(expected, abs=2e-3)


def test_empty_history_and_merging():
    assert compose_epsilon([], DELTA, "prv") == 0.0
    assert compose_epsilon([Step(1.0, 0.01, 0)], DELTA, "rdp") == 0.0
    split = [Step(1.0, 0.01, 40), Step(1.2, 0.01, 10), Step(1.0, 0.01, 60)]
    merged = [Step(1.0, 0.01, 100), Step(1.2, 0.01, 10)]
    assert compose_epsilon(split, DELTA, "prv") == pytest.approx(compose_epsilon(merged, DELTA, "prv"), rel=1e-9)


@pytest.mark.parametrize(("steps", "expected"), [(100, 0.718), (1000, 1.828), (10000, 6.188)])
def test_pld_reference_numbers(steps, expected):
    # DESIGN.md section 5: dp-accounting's PLD at its finest grid gives 0.718/1.828/6.188; ours is
    # discretised at 1e-3 with the pessimistic rounding: an upper bound within a few thousandths.
    epsilon = compose_epsilon([Step(1.0, 0.01, steps)], DELTA, "pld")
    assert expected - 1e-3 <= epsilon <= expected + 5e-3


def test_reference_epsilon_is_the_ledgers_other_accountant():
    history = [Step(1.0, 0.01, 100)]
    assert reference_epsilon(history, DELTA, "prv") == ("rdp", pytest.approx(1.214, abs=2e-3))
    assert reference_epsilon(history, DELTA, "pld") == ("rdp", pytest.approx(1.214, abs=2e-3))
    assert reference_epsilon(history, DELTA, "rdp") == ("pld", pytest.approx(0.718, abs=5e-3))


@pytest.mark.parametrize(
    "history",
    [
        [Step(1.0, 0.01, 100)],
        [Step(0.8, 0.05, 200)],
        [Step(1.5, 0.1, 50), Step(1.2, 0.02, 300)],
    ],
)
def test_cross_check_with_dp_accounting(history):
    # PRV vs dp-accounting PLD: both numerically tight for the same mechanism. Opacus
    # PRV returns an upper bound padded by its eps_error (0.01) and both discretise, so
    # we allow 0.02 + 1 % (reference case: 0.728 vs 0.718). PRV must not be far below
    # PLD either (that would be an under-estimate).
    prv = compose_epsilon(history, DELTA, "prv")
    pld = independent_epsilon(history, DELTA, "pld")
    assert abs(prv - pld) <= 0.02 + 0.01 * pld
    # RDP vs dp-accounting RDP: same analysis, different order grids (dp-accounting's
    # is finer, so it may be slightly lower); allow 3 %.
    rdp = compose_epsilon(history, DELTA, "rdp")
    rdp_independent = independent_epsilon(history, DELTA, "rdp")
    assert abs(rdp - rdp_independent) <= 0.03 * rdp_independent
    # Our PLD (dp-accounting, coarse pessimistic grid) against Opacus's PRV estimate, the audit's
    # independent check of PLD ledgers: never more than PRV's own error below it.
    ours = compose_epsilon(history, DELTA, "pld")
    assert (
        independent_epsilon(history, DELTA, "prv") - 0.01 <= ours <= independent_epsilon(history, DELTA, "prv") + 0.02
    )


def test_prv_refuses_histories_it_cannot_evaluate():
    with pytest.raises(AccountingError, match="rdp"):
        compose_epsilon([Step(0.5, 0.5, 10000)], DELTA, "prv")


@pytest.mark.parametrize("accountant", ["rdp", "prv", "pld"])
def test_calibrate_noise_is_tight(accountant):
    q, steps, target = 0.05, 200, 3.0
    sigma = calibrate_noise([], q, steps, target, DELTA, accountant)
    assert compose_epsilon([Step(sigma, q, steps)], DELTA, accountant) <= target
    assert compose_epsilon([Step(sigma * 0.99, q, steps)], DELTA, accountant) > target


def test_calibrate_noise_prior_spend_reduces_room():
    q, steps = 0.05, 100
    fresh = calibrate_noise([], q, steps, 4.0, DELTA, "rdp")
    prior = [Step(1.2, 0.05, 200)]
    with_prior = calibrate_noise(prior, q, steps, 4.0, DELTA, "rdp")
    assert with_prior > fresh
    assert compose_epsilon([*prior, Step(with_prior, q, steps)], DELTA, "rdp") <= 4.0


@pytest.mark.parametrize("accountant", ["rdp", "pld", "prv"])
def test_calibrate_noise_respects_min_noise(accountant):
    # A floor that fits is the answer; one that does not is never returned.
    assert calibrate_noise([], 0.01, 10, 8.0, DELTA, accountant, min_noise=2.0) == 2.0
    sigma = calibrate_noise([], 0.25, 24, 2.7, DELTA, accountant, min_noise=0.5)
    assert sigma > 0.5 and compose_epsilon([Step(sigma, 0.25, 24)], DELTA, accountant) <= 2.7


def test_calibrate_noise_exhausted():
    prior = [Step(0.8, 0.1, 500)]
    spent = compose_epsilon(prior, DELTA, "rdp")
    with pytest.raises(BudgetExhausted, match="already spent"):
        calibrate_noise(prior, 0.05, 100, spent * 0.9, DELTA, "rdp")
    with pytest.raises(BudgetExhausted, match="cap"):
        calibrate_noise(prior, 0.05, 100, spent, DELTA, "rdp")


def test_calibrations_are_memoised_across_sites_sharing_their_inputs():
    prior = [Step(1.2, 0.05, 200)]
    first = calibrate_noise(prior, 0.05, 100, 4.0, DELTA, "pld")
    assert calibrate_noise(list(prior), 0.05, 100, 4.0, DELTA, "pld") == first
    assert _calibrate.cache_info().hits >= 1


@pytest.mark.parametrize(
    "history",
    [
        [Step(2.03, 0.25, 8)] * 3,
        [Step(1.5, 0.1, 50), Step(1.2, 0.02, 300), Step(3.0, 1.0, 1)],
        [Step(0.8, 0.05, 200), Step(5.0, 1.0, 1), Step(0.8, 0.05, 10)],
    ],
)
def test_memoised_compositions_are_the_accountants_own_values(history):
    # PLD from memoised phase distributions, RDP from memoised one-step curves: bit for bit what
    # dp-accounting's PLDAccountant and Opacus's RDPAccountant give for the merged history.
    import dp_accounting
    from dp_accounting.pld import PLDAccountant

    from common.privacy.accounting import PLD_INTERVAL, _merged

    phases = sorted(_merged(history))
    pld = PLDAccountant(value_discretization_interval=PLD_INTERVAL)
    pld.compose(
        dp_accounting.ComposedDpEvent(
            [
                dp_accounting.SelfComposedDpEvent(
                    dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), n
                )
                for sigma, q, n in phases
            ]
        )
    )
    rdp = RDPAccountant()
    rdp.history = copy.deepcopy(phases)
    for _ in range(2):  # the second time from the memo
        assert compose_epsilon(history, DELTA, "pld") == pld.get_epsilon(DELTA)
        assert compose_epsilon(history, DELTA, "rdp") == rdp.get_epsilon(DELTA)


@pytest.mark.parametrize(("q", "sigma"), [(0.25, 2.19), (0.01, 1.0), (1.0, 3.0), (1 / 14, 0.8), (0.001, 50.0)])
def test_integer_order_rdp_matches_opacus(q, sigma):
    import numpy as np
    from opacus.accountants.analysis import rdp as rdp_analysis

    from common.privacy.accounting import GUESS_ORDERS, _integer_rdp

    expected = rdp_analysis.compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=list(GUESS_ORDERS))
    np.testing.assert_allclose(_integer_rdp(q, sigma, GUESS_ORDERS), expected, rtol=1e-7)


@pytest.mark.parametrize("accountant", ["pld", "prv"])
def test_calibration_after_a_prior_spend_is_tight(accountant):
    # A release (one Gaussian step at sample rate 1) calibrated into what a run's rounds left of its target.
    prior = [Step(2.19, 0.25, 24)]
    target = compose_epsilon(prior, DELTA, accountant) + 0.3
    sigma = calibrate_noise(prior, 1.0, 1, target, DELTA, accountant)
    assert compose_epsilon([*prior, Step(sigma, 1.0, 1)], DELTA, accountant) <= target
    assert compose_epsilon([*prior, Step(sigma * 0.99, 1.0, 1)], DELTA, accountant) > target


def test_rdp_from_the_orders_that_can_hold_the_minimum_is_rdpaccountants():
    # The rdp accountant skips the fractional orders whose epsilon a lower bound already excludes:
    # the value must stay RDPAccountant's own, on small and large epsilons alike.
    import random

    from common.privacy.accounting import _merged

    rng = random.Random(7)
    for _ in range(12):
        history = [
            Step(
                round(rng.uniform(0.3, 20), 3),
                rng.choice([1.0, 0.5, 0.25, 0.1, 0.01, 1 / 14]),
                rng.randint(1, 3000),
            )
            for _ in range(rng.randint(1, 3))
        ]
        delta = rng.choice([1e-3, 1e-5, 1e-6])
        accountant = RDPAccountant()
        accountant.history = copy.deepcopy(sorted(_merged(history)))
        assert compose_epsilon(history, delta, "rdp") == accountant.get_epsilon(delta), history


@pytest.mark.parametrize(
    ("prior", "sample_rate", "steps", "target"),
    [
        ([], 0.25, 24, 2.7),  # the quick start's rounds: 3 rounds of 8 steps at q = 0.25
        ([Step(2.19, 0.25, 24)], 1.0, 1, 3.0),  # its evaluation release, into what the rounds left
        ([], 0.05, 200, 3.0),
        ([], 0.0625, 66, 2.7),  # a heart-disease site's rounds
    ],
)
def test_pld_calibration_searches_coarse_and_certifies_once(monkeypatch, prior, sample_rate, steps, target):
    # The search runs on a coarse PLD grid; one evaluation at PLD_INTERVAL certifies its estimate:
    # it fits and spends at least 1 - ROOM_REL_TOL of what the prior leaves.
    from common.privacy import accounting
    from common.privacy.accounting import PLD_INTERVAL, ROOM_REL_TOL, forget_memoised

    forget_memoised()
    fine: set[tuple] = set()
    original = accounting._pld_epsilon

    def counting(phases, delta, interval, library=False):
        if interval == PLD_INTERVAL:
            fine.add(tuple(phases))
        return original(phases, delta, interval, library)

    monkeypatch.setattr(accounting, "_pld_epsilon", counting)
    sigma = calibrate_noise(prior, sample_rate, steps, target, DELTA, "pld", min_noise=0.5)
    monkeypatch.undo()
    forget_memoised()
    candidates = {p for p in fine if any(s == sigma for s, *_ in p)}
    assert candidates, "the returned sigma was evaluated on the fine grid"
    assert len(fine - {tuple(sorted((s.noise_multiplier, s.sample_rate, s.steps) for s in prior))}) == 1
    spent = compose_epsilon(prior, DELTA, "pld")
    epsilon = compose_epsilon([*prior, Step(sigma, sample_rate, steps)], DELTA, "pld")
    assert spent + (1 - ROOM_REL_TOL) * (target - spent) <= epsilon <= target


def test_a_coarse_estimate_that_leaves_room_unspent_is_certified_one_newton_step_on(monkeypatch):
    # An estimate 1% too noisy fits but spends too little of the target: one Newton step from it, with
    # the coarse search's slope, lands on a sigma that spends at least 1 - ROOM_REL_TOL of it.
    from common.privacy import accounting
    from common.privacy.accounting import PLD_INTERVAL, ROOM_REL_TOL, forget_memoised

    forget_memoised()
    exact = calibrate_noise([], 0.25, 24, 2.7, DELTA, "pld")
    forget_memoised()
    fine: list[float] = []
    original = accounting._pld_epsilon

    def counting(phases, delta, interval, library=False):
        if interval == PLD_INTERVAL:
            fine.append(phases[0][0])
        return original(phases, delta, interval, library)

    coarse = accounting._coarse_pld_guess
    monkeypatch.setattr(accounting, "_pld_epsilon", counting)
    monkeypatch.setattr(accounting, "_coarse_pld_guess", lambda *args: (exact * 1.01, coarse(*args)[1]))
    sigma = calibrate_noise([], 0.25, 24, 2.7, DELTA, "pld")
    monkeypatch.undo()
    forget_memoised()
    assert len(fine) == 2 and fine[0] >= exact * 1.01
    assert sigma == fine[1] < exact * 1.01
    assert (1 - ROOM_REL_TOL) * 2.7 <= compose_epsilon([Step(sigma, 0.25, 24)], DELTA, "pld") <= 2.7


def test_a_coarse_estimate_that_leaves_room_unspent_is_bracketed_at_the_fine_grid(monkeypatch):
    # Where neither the estimate nor one Newton step spends enough of the target (here: no Newton step),
    # the fine search brackets the answer as before, to within SIGMA_REL_TOL of a sigma that does not fit.
    from common.privacy import accounting
    from common.privacy.accounting import SIGMA_REL_TOL, forget_memoised

    forget_memoised()
    exact = calibrate_noise([], 0.25, 24, 2.7, DELTA, "pld")
    forget_memoised()
    monkeypatch.setattr(accounting, "CERTIFY_EVALUATIONS", 1)
    monkeypatch.setattr(accounting, "_coarse_pld_guess", lambda *args: (exact * 1.01, -1.5))
    sigma = calibrate_noise([], 0.25, 24, 2.7, DELTA, "pld")
    monkeypatch.undo()
    forget_memoised()
    assert sigma < exact * 1.01 and compose_epsilon([Step(sigma, 0.25, 24)], DELTA, "pld") <= 2.7
    below = round(sigma * (1 - SIGMA_REL_TOL) - 1e-4, 4)
    assert compose_epsilon([Step(below, 0.25, 24)], DELTA, "pld") > 2.7
