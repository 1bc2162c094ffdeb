"""Tests for client.budget: planning, admission, durable spending, concurrency."""

from __future__ import annotations

import multiprocessing

import pytest

from client.budget import BudgetGuard, RunPlan
from common.privacy.accounting import BudgetExhausted, Step, compose_epsilon
from common.privacy.ledger import Ledger
from common.privacy.policy import PrivacyRequest, SitePolicy, effective_settings

DATASET = "c" * 64
POLICY = SitePolicy(max_epsilon=2.5, delta=1e-5, accountant="rdp", min_noise_multiplier=0.5)
REQUEST = PrivacyRequest(target_epsilon=2.0, delta=1e-4, max_grad_norm=5.0, planned_rounds=3)
Q, STEPS = 0.05, 40


def run_rounds(guard: BudgetGuard, plan: RunPlan, rounds) -> None:
    for r in rounds:
        assert guard.admit(plan, r).admitted
        with guard.spend(plan, r) as record:
            record(STEPS, "m" * 64)


def test_spend_survives_restart_and_next_run_has_less_room(tmp_path):
    guard = BudgetGuard(tmp_path, POLICY, DATASET)
    first = guard.plan_run("run-1", REQUEST, Q, STEPS)
    assert first.settings.delta == 1e-5 and "delta" in first.settings.overridden
    assert first.settings.max_grad_norm == 1.0
    run_rounds(guard, first, [1, 2, 3])
    spent = guard.spent()
    assert 1.9 < spent <= 2.0  # the run used (almost) exactly its target
    restarted = BudgetGuard(tmp_path, POLICY, DATASET)
    assert restarted.spent() == pytest.approx(spent)
    second = restarted.plan_run("run-2", REQUEST, Q, STEPS)
    assert second.prior_epsilon == pytest.approx(spent)
    assert second.noise_multiplier > first.noise_multiplier  # run 1 spent 2.0 of the cap of 2.5
    run_rounds(restarted, second, [1, 2, 3])
    assert BudgetGuard(tmp_path, POLICY, DATASET).spent() <= POLICY.max_epsilon
    entries = Ledger(tmp_path).entries(DATASET)
    assert [e.epsilon for e in entries] == sorted(e.epsilon for e in entries)
    assert entries[-1].reference_accountant == "prv"


def test_plan_is_stable_across_restarts(tmp_path):
    plan = BudgetGuard(tmp_path, POLICY, DATASET).plan_run("run-7", REQUEST, Q, STEPS)
    with BudgetGuard(tmp_path, POLICY, DATASET).spend(plan, 1) as record:
        record(STEPS, "m" * 64)
    other_request = PrivacyRequest(target_epsilon=0.5, delta=1e-5, max_grad_norm=1.0,
                                   planned_rounds=9)
    again = BudgetGuard(tmp_path, POLICY, DATASET).plan_run("run-7", other_request, Q, STEPS)
    assert again == plan
    assert (tmp_path / "plans" / "run-7.json").exists()


def test_replay_and_round_limit_are_refused(tmp_path):
    guard = BudgetGuard(tmp_path, POLICY, DATASET)
    plan = guard.plan_run("run-1", REQUEST, Q, STEPS)
    run_rounds(guard, plan, [1])
    replay = guard.admit(plan, 1)
    assert not replay.admitted and "already recorded" in replay.reason
    with pytest.raises(BudgetExhausted, match="already recorded"):
        with guard.spend(plan, 1):
            pytest.fail("must not train a replayed round")
    run_rounds(guard, plan, [2, 3])
    extra = guard.admit(plan, 4)
    assert not extra.admitted and "planned rounds" in extra.reason


def fixed_plan(run_id: str, sigma: float, cap: float) -> RunPlan:
    policy = SitePolicy(max_epsilon=cap, delta=1e-5, accountant="rdp")
    request = PrivacyRequest(target_epsilon=cap, delta=1e-5, max_grad_norm=1.0, planned_rounds=10)
    return RunPlan(run_id, DATASET, sigma, Q, STEPS, effective_settings(policy, request), 0.0)


def test_cap_reached_refuses_with_reason_and_never_exceeds(tmp_path):
    sigma = 1.0
    one, two = (compose_epsilon([Step(sigma, Q, STEPS * n)], 1e-5, "rdp") for n in (2, 3))
    cap = (one + two) / 2  # room for exactly two rounds
    policy = SitePolicy(max_epsilon=cap, delta=1e-5, accountant="rdp")
    guard = BudgetGuard(tmp_path, policy, DATASET)
    plan = fixed_plan("run-1", sigma, cap)
    run_rounds(guard, plan, [1, 2])
    refused = guard.admit(plan, 3)
    assert not refused.admitted
    assert "budget exhausted" in refused.reason and f"{cap:.4f}" in refused.reason
    assert refused.projected_epsilon > cap >= refused.spent_epsilon
    with pytest.raises(BudgetExhausted):
        with guard.spend(plan, 3):
            pytest.fail("must not train over the cap")
    assert guard.spent() <= cap
    assert len(Ledger(tmp_path).entries()) == 2
    # The officer tightens the policy below what is already spent: nothing more fits.
    tightened = BudgetGuard(tmp_path, SitePolicy(max_epsilon=one, delta=1e-5, accountant="rdp"),
                            DATASET)
    assert not tightened.admit(plan, 3).admitted
    with pytest.raises(BudgetExhausted, match="already spent"):
        tightened.plan_run("run-2", PrivacyRequest(target_epsilon=cap, delta=1e-5,
                                                   max_grad_norm=1.0, planned_rounds=1), Q, STEPS)


def test_record_refuses_more_steps_than_planned(tmp_path):
    guard = BudgetGuard(tmp_path, POLICY, DATASET)
    plan = guard.plan_run("run-1", REQUEST, Q, STEPS)
    with guard.spend(plan, 1) as record:
        with pytest.raises(BudgetExhausted, match="calibrated"):
            record(STEPS + 1, "m" * 64)
    assert Ledger(tmp_path).entries() == []


def _race(state_dir, cap, run_id, barrier, queue):
    guard = BudgetGuard(state_dir, SitePolicy(max_epsilon=cap, delta=1e-5, accountant="rdp"),
                        DATASET)
    plan = fixed_plan(run_id, 1.0, cap)
    barrier.wait()
    try:
        with guard.spend(plan, 1) as record:
            record(STEPS, "m" * 64)
        queue.put("recorded")
    except BudgetExhausted:
        queue.put("refused")


def test_two_processes_race_for_the_last_round(tmp_path):
    one, two = (compose_epsilon([Step(1.0, Q, STEPS * n)], 1e-5, "rdp") for n in (1, 2))
    cap = (one + two) / 2  # room for exactly one round
    ctx = multiprocessing.get_context("fork")
    barrier, queue = ctx.Barrier(2), ctx.Queue()
    workers = [ctx.Process(target=_race, args=(tmp_path, cap, f"run-{i}", barrier, queue))
               for i in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
    assert sorted(queue.get(timeout=5) for _ in workers) == ["recorded", "refused"]
    assert len(Ledger(tmp_path).entries()) == 1
