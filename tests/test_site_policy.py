"""Tests for common.privacy.policy: loading, writing, request validation, stricter-wins."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.privacy.policy import (
    PolicyError,
    PrivacyRequest,
    SitePolicy,
    effective_settings,
    load_policy,
    write_policy,
)


def test_write_then_load_round_trips(tmp_path):
    policy = SitePolicy(
        max_epsilon=6.5,
        delta=1e-6,
        accountant="rdp",
        min_noise_multiplier=0.8,
        max_grad_norm=2.0,
        max_rounds_per_run=20,
    )
    path = tmp_path / "policy.toml"
    write_policy(policy, path)
    assert "# Cumulative epsilon cap" in path.read_text()
    assert load_policy(path) == policy
    write_policy(SitePolicy(max_epsilon=3.0, delta=1e-5), path)
    assert load_policy(path).max_rounds_per_run is None


@pytest.mark.parametrize(
    "body,key",
    [
        ("[privacy]\nmax_epsilon = 8.0\ndelta = 1e-5\nmax_epsilom = 3\n", "max_epsilom"),
        ("[privacy]\nmax_epsilon = 0\ndelta = 1e-5\n", "max_epsilon"),
        ("[privacy]\nmax_epsilon = -1.0\ndelta = 1e-5\n", "max_epsilon"),
        ("[privacy]\nmax_epsilon = nan\ndelta = 1e-5\n", "max_epsilon"),
        ("[privacy]\nmax_epsilon = 8.0\ndelta = 0.5\n", "delta"),
        ("[privacy]\nmax_epsilon = 8.0\n", "delta"),
        ('[privacy]\nmax_epsilon = 8.0\ndelta = 1e-5\naccountant = "gdp"\n', "accountant"),
        ("[privacy]\nmax_epsilon = 8.0\ndelta = 1e-5\nmax_rounds_per_run = 0\n", "max_rounds_per_run"),
        ("[privacy]\nmax_epsilon = true\ndelta = 1e-5\n", "max_epsilon"),
        ("[privacy]\nmax_epsilon = 8.0\ndelta = 1e-5\nmin_noise_multiplier = -0.1\n", "min_noise_multiplier"),
        ("[privcy]\nmax_epsilon = 8.0\n", "privcy"),
        ("max_epsilon = 8.0\n", "max_epsilon"),
        ("[privacy\n", "TOML"),
    ],
)
def test_invalid_files_name_the_file_and_key(tmp_path, body, key):
    path = tmp_path / "site.toml"
    path.write_text(body)
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    assert str(path) in str(info.value) and key in str(info.value)


def test_missing_file(tmp_path):
    with pytest.raises(PolicyError, match="not found"):
        load_policy(tmp_path / "absent.toml")


def test_request_config_round_trip_and_garbage():
    request = PrivacyRequest(target_epsilon=3.0, delta=1e-5, max_grad_norm=1.0, planned_rounds=5)
    assert PrivacyRequest.from_config({**request.to_config(), "lr": 0.1}) == request
    for key, bad in [
        ("dp-target-epsilon", math.nan),
        ("dp-target-epsilon", -1.0),
        ("dp-delta", 1.5),
        ("dp-max-grad-norm", math.inf),
        ("dp-planned-rounds", 2.5),
        ("dp-planned-rounds", True),
        ("dp-delta", "1e-5"),
    ]:
        with pytest.raises(PolicyError, match=key):
            PrivacyRequest.from_config({**request.to_config(), key: bad})
    config = request.to_config()
    del config["dp-delta"]
    with pytest.raises(PolicyError, match="missing"):
        PrivacyRequest.from_config(config)


policies = st.builds(
    SitePolicy,
    max_epsilon=st.floats(0.01, 100.0),
    delta=st.floats(1e-12, 1e-2),
    accountant=st.sampled_from(["prv", "rdp"]),
    min_noise_multiplier=st.floats(0.0, 100.0),
    max_grad_norm=st.floats(1e-3, 1e4),
    max_rounds_per_run=st.one_of(st.none(), st.integers(1, 100_000)),
    max_epsilon_per_run=st.floats(0.01, 100.0),
)
requests = st.builds(
    PrivacyRequest,
    target_epsilon=st.floats(1e-6, 1e6),
    delta=st.floats(1e-15, 0.999),
    max_grad_norm=st.floats(1e-3, 1e4),
    planned_rounds=st.integers(1, 100_000),
)


@settings(max_examples=300, deadline=None)
@given(policy=policies, request=requests)
def test_stricter_always_wins(policy, request):
    eff = effective_settings(policy, request)
    assert eff.run_target_epsilon <= policy.max_epsilon and eff.run_target_epsilon <= request.target_epsilon
    assert eff.cap_epsilon == policy.max_epsilon
    assert eff.delta <= policy.delta and eff.delta <= request.delta
    assert eff.max_grad_norm <= policy.max_grad_norm and eff.max_grad_norm <= request.max_grad_norm
    assert eff.planned_rounds <= request.planned_rounds
    if policy.max_rounds_per_run is not None:
        assert eff.planned_rounds <= policy.max_rounds_per_run
    assert eff.min_noise_multiplier == policy.min_noise_multiplier
    assert eff.accountant == policy.accountant
    assert eff.run_target_epsilon <= policy.max_epsilon_per_run
    assert ("target_epsilon" in eff.overridden) == (policy.run_limit < request.target_epsilon)
    assert ("delta" in eff.overridden) == (policy.delta < request.delta)
