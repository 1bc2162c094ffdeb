"""Tests for common.privacy.calibrations: stored calibrations, keyed by every input, re-certified before use."""

from __future__ import annotations

import json

import pytest

from client.budget import BudgetGuard
from common.privacy import accounting, calibrations
from common.privacy.accounting import BudgetExhausted, Step, calibrate_noise, compose_epsilon, forget_memoised
from common.privacy.calibrations import CALIBRATIONS_DIR, CalibrationKey, CalibrationStore
from common.privacy.policy import PrivacyRequest, SitePolicy
from common.security.keys import Identity

DELTA = 1e-5
ARGS = dict(prior=[], sample_rate=0.05, planned_steps=100, target_epsilon=3.0, delta=DELTA, accountant="rdp")
SITE = Identity.generate("site-a")
POLICY = SitePolicy(max_epsilon=10.0, delta=1e-5, accountant="rdp", min_noise_multiplier=0.5)
REQUEST = PrivacyRequest(target_epsilon=2.0, delta=1e-5, max_grad_norm=1.0, planned_rounds=3)


@pytest.fixture
def searches(monkeypatch):
    """Every search the store asks of the accountant, as a new process would (nothing memoised)."""
    forget_memoised()
    calls: list[dict] = []
    original = accounting.calibrate_noise

    def counting(*args, **kwargs):
        calls.append(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(accounting, "calibrate_noise", counting)
    yield calls
    forget_memoised()


def test_a_stored_calibration_is_reused_by_a_new_process(tmp_path, searches):
    first = CalibrationStore(tmp_path).noise_multiplier(**ARGS)
    assert len(searches) == 1 and first == calibrate_noise(**ARGS)
    forget_memoised()
    assert CalibrationStore(tmp_path).noise_multiplier(**ARGS) == first
    assert len(searches) == 1  # re-certified, not searched


@pytest.mark.parametrize(
    "change",
    [
        {"target_epsilon": 2.5},
        {"min_noise": 2.0},  # the policy's floor
        {"delta": 1e-6},
        {"accountant": "pld"},
        {"sample_rate": 0.06},
        {"planned_steps": 120},
        {"prior": [Step(1.0, 0.05, 10)]},
    ],
)
def test_any_changed_input_calibrates_afresh(tmp_path, searches, change):
    store = CalibrationStore(tmp_path)
    store.noise_multiplier(**ARGS)
    changed = {**ARGS, **change}
    assert store.noise_multiplier(**changed) == calibrate_noise(**changed)
    assert len(searches) == 2


def test_another_library_version_is_another_key(monkeypatch):
    key = CalibrationKey.of(**{**ARGS, "min_noise": 0.0})
    calibrations.search_code.cache_clear()
    monkeypatch.setattr(calibrations.metadata, "version", lambda name: "0.0.0")
    try:
        assert CalibrationKey.of(**{**ARGS, "min_noise": 0.0}).digest() != key.digest()
    finally:
        calibrations.search_code.cache_clear()


def _stored_file(directory):
    (path,) = directory.glob("*.json")
    return path


def test_an_edited_value_that_does_not_fit_is_recalibrated(tmp_path, searches, caplog):
    store = CalibrationStore(tmp_path)
    sigma = store.noise_multiplier(**ARGS)
    path = _stored_file(tmp_path)
    record = json.loads(path.read_text())
    record["noise_multiplier"] = sigma * 0.9  # less noise than the target allows
    path.write_text(json.dumps(record))
    assert compose_epsilon([Step(sigma * 0.9, 0.05, 100)], DELTA, "rdp") > 3.0
    assert store.noise_multiplier(**ARGS) == sigma
    assert len(searches) == 2 and "does not certify" in caplog.text
    assert json.loads(path.read_text())["noise_multiplier"] == sigma


@pytest.mark.parametrize("content", [b"", b"{not json", b'{"key": {}, "noise_multiplier": 1.5}'])
def test_an_unreadable_or_foreign_file_counts_as_absent(tmp_path, searches, content):
    store = CalibrationStore(tmp_path)
    sigma = store.noise_multiplier(**ARGS)
    _stored_file(tmp_path).write_bytes(content)
    assert store.noise_multiplier(**ARGS) == sigma
    assert len(searches) == 2


def test_the_store_is_a_cache_written_without_fsync(tmp_path, searches, monkeypatch):
    # A file a crash loses or truncates is absent or unreadable (above): the next run calibrates again.
    import common.io

    synced: list[int] = []
    monkeypatch.setattr(common.io.os, "fsync", lambda fd: synced.append(fd))
    store = CalibrationStore(tmp_path)
    sigma = store.noise_multiplier(**ARGS)
    assert synced == [] and json.loads(_stored_file(tmp_path).read_text())["noise_multiplier"] == sigma
    common.io.write_atomic(tmp_path / "durable.json", b"{}")
    assert len(synced) == 2  # everything else: the file, then its folder


def test_an_exhausted_budget_is_not_stored(tmp_path):
    prior = [Step(0.8, 0.1, 500)]
    spent = compose_epsilon(prior, DELTA, "rdp")
    with pytest.raises(BudgetExhausted):
        CalibrationStore(tmp_path).noise_multiplier(**{**ARGS, "prior": prior, "target_epsilon": spent})
    assert not list(tmp_path.glob("*.json"))


def test_the_next_run_of_a_site_plans_without_searching(tmp_path, searches):
    dataset = "d" * 64
    first = BudgetGuard(tmp_path, POLICY, dataset, SITE).plan_run("run-1", REQUEST, 0.05, 40)
    searched = len(searches)
    assert searched >= 1 and list((tmp_path / CALIBRATIONS_DIR).glob("*.json"))
    forget_memoised()
    second = BudgetGuard(tmp_path, POLICY, dataset, SITE).plan_run("run-2", REQUEST, 0.05, 40)
    assert len(searches) == searched
    assert (second.noise_multiplier, second.release_noise_multiplier) == (
        first.noise_multiplier,
        first.release_noise_multiplier,
    )
    stricter = SitePolicy(max_epsilon=10.0, delta=1e-5, accountant="rdp", min_noise_multiplier=1.5)
    third = BudgetGuard(tmp_path, stricter, dataset, SITE).plan_run("run-3", REQUEST, 0.05, 40)
    assert len(searches) > searched and third.noise_multiplier >= 1.5
