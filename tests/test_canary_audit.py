"""The one-run canary audit: its bound, and its power on the site's real DP-SGD code path."""

from __future__ import annotations

import math

import pytest

from client.canary_audit import (
    CanaryAuditError,
    CanaryConfig,
    _audit_once,
    epsilon_lower_bound,
    p_value,
    run_canary_audit,
)
from common.privacy.accounting import calibrate_noise


def test_p_value_without_delta_is_the_binomial_tail() -> None:
    # all r guesses right under pure eps-DP: probability q^r with q = e^eps / (1 + e^eps)
    q = math.exp(1.0) / (1 + math.exp(1.0))
    assert p_value(1000, 50, 50, 1.0, 0.0) == pytest.approx(q**50, rel=1e-9)
    assert p_value(1000, 50, 0, 1.0, 0.0) == 1.0
    assert p_value(1000, 50, 50, 1.0, 1e-3) > p_value(1000, 50, 50, 1.0, 0.0)  # delta only weakens the test


def test_lower_bound_matches_the_closed_form_and_is_monotone() -> None:
    # 100 of 100 correct, delta = 0: q^100 = 0.05 exactly at the bound
    q = 0.05 ** (1 / 100)
    assert epsilon_lower_bound(1000, 100, 100, 0.0, 0.05) == pytest.approx(math.log(q / (1 - q)), abs=1e-3)
    bounds = [epsilon_lower_bound(1000, 200, v, 1e-5, 0.05) for v in (100, 130, 160, 190)]
    assert bounds[0] == 0.0  # chance-level guessing proves nothing
    assert bounds == sorted(bounds) and bounds[-1] > bounds[1] > 0


def test_config_is_validated() -> None:
    with pytest.raises(CanaryAuditError, match="at least 40 canaries"):
        CanaryConfig(canaries=10)


def test_honest_run_passes_and_noise_off_control_is_flagged() -> None:
    audit = run_canary_audit(CanaryConfig())
    honest, control = audit.honest, audit.control
    assert honest.noise_multiplier > 1 and control.noise_multiplier == 0.0
    assert honest.accounted_epsilon == pytest.approx(2.0, abs=0.01)
    assert honest.lower_bound <= honest.accounted_epsilon and honest.verdict == "consistent"
    assert control.accounted_epsilon == honest.accounted_epsilon
    assert control.lower_bound > 4 and control.verdict == "VIOLATION"
    assert audit.passed and "control was caught" in audit.explanation()


def test_a_run_that_claims_less_than_it_spends_is_flagged() -> None:
    # noise for epsilon 20, ledger claims 1: the audit must see through the claim
    config = CanaryConfig(seed=3)
    sigma = calibrate_noise([], 1.0, config.steps, 20.0, config.delta, "prv")
    run = _audit_once(config, "under-claimed", sigma, accounted=1.0)
    assert run.verdict == "VIOLATION" and run.lower_bound > 1.0
