"""Tests for client.budget: planning, admission, durable spending, concurrency."""

from __future__ import annotations

import multiprocessing

import pytest

from client.budget import BudgetGuard, RunPlan
from common.privacy.accounting import BudgetExhausted, Step, compose_epsilon
from common.privacy.ledger import EVALUATE, TRAIN, Ledger
from common.privacy.policy import PrivacyRequest, SitePolicy, effective_settings
from common.security.keys import Identity

DATASET = "c" * 64
SITE = Identity.generate("site-a")
POLICY = SitePolicy(max_epsilon=2.5, delta=1e-5, accountant="rdp", min_noise_multiplier=0.5)
REQUEST = PrivacyRequest(target_epsilon=2.0, delta=1e-4, max_grad_norm=5.0, planned_rounds=3)
Q, STEPS = 0.05, 40


def guard_at(state_dir, policy: SitePolicy = POLICY) -> BudgetGuard:
    return BudgetGuard(state_dir, policy, DATASET, SITE)


def run_rounds(guard: BudgetGuard, plan: RunPlan, rounds) -> None:
    for r in rounds:
        assert guard.admit(plan, r).admitted
        with guard.spend(plan, TRAIN, r) as record:
            record(STEPS, "m" * 64)


def test_spend_survives_restart_and_next_run_has_less_room(tmp_path):
    guard = guard_at(tmp_path)
    first = guard.plan_run("run-1", REQUEST, Q, STEPS)
    assert first.settings.delta == 1e-5 and "delta" in first.settings.overridden
    assert first.settings.max_grad_norm == 1.0
    run_rounds(guard, first, [1, 2, 3])
    spent = guard.spent()
    assert 1.9 < spent <= 2.0  # the run used (almost) exactly its target
    restarted = guard_at(tmp_path)
    assert restarted.spent() == pytest.approx(spent)
    second = restarted.plan_run("run-2", REQUEST, Q, STEPS)
    assert second.prior_epsilon == pytest.approx(spent)
    assert second.noise_multiplier > first.noise_multiplier  # run 1 spent 2.0 of the cap of 2.5
    run_rounds(restarted, second, [1, 2, 3])
    assert guard_at(tmp_path).spent() <= POLICY.max_epsilon
    entries = Ledger(tmp_path, site_key=SITE.public()).entries(DATASET)
    assert [e.epsilon for e in entries] == sorted(e.epsilon for e in entries)
    assert entries[-1].reference_accountant == "pld"


def test_plan_is_stable_across_restarts(tmp_path):
    plan = guard_at(tmp_path).plan_run("run-7", REQUEST, Q, STEPS)
    with guard_at(tmp_path).spend(plan, TRAIN, 1) as record:
        record(STEPS, "m" * 64)
    other_request = PrivacyRequest(target_epsilon=0.5, delta=1e-5, max_grad_norm=1.0, planned_rounds=9)
    again = guard_at(tmp_path).plan_run("run-7", other_request, Q, STEPS)
    assert again == plan
    assert (tmp_path / "plans" / "run-7.json").exists()


def test_replay_and_round_limit_are_refused(tmp_path):
    guard = guard_at(tmp_path)
    plan = guard.plan_run("run-1", REQUEST, Q, STEPS)
    run_rounds(guard, plan, [1])
    replay = guard.admit(plan, 1)
    assert not replay.admitted and "already recorded" in replay.reason
    with pytest.raises(BudgetExhausted, match="already recorded"):
        with guard.spend(plan, TRAIN, 1):
            pytest.fail("must not train a replayed round")
    run_rounds(guard, plan, [2, 3])
    extra = guard.admit(plan, 4)
    assert not extra.admitted and "planned train slot" in extra.reason


def capped(cap: float) -> SitePolicy:
    """A policy whose lifetime cap is also its per-run limit: only the cap binds."""
    return SitePolicy(max_epsilon=cap, delta=1e-5, accountant="rdp", max_epsilon_per_run=cap)


def fixed_plan(run_id: str, sigma: float, cap: float) -> RunPlan:
    policy = capped(cap)
    request = PrivacyRequest(target_epsilon=cap, delta=1e-5, max_grad_norm=1.0, planned_rounds=10)
    return RunPlan(run_id, DATASET, sigma, Q, STEPS, effective_settings(policy, request), 0.0)


def test_cap_reached_refuses_with_reason_and_never_exceeds(tmp_path):
    sigma = 1.0
    one, two = (compose_epsilon([Step(sigma, Q, STEPS * n)], 1e-5, "rdp") for n in (2, 3))
    cap = (one + two) / 2  # room for exactly two rounds
    guard = guard_at(tmp_path, capped(cap))
    plan = fixed_plan("run-1", sigma, cap)
    run_rounds(guard, plan, [1, 2])
    refused = guard.admit(plan, 3)
    assert not refused.admitted
    assert "budget exhausted" in refused.reason and f"{cap:.4f}" in refused.reason
    assert refused.projected_epsilon > cap >= refused.spent_epsilon
    with pytest.raises(BudgetExhausted):
        with guard.spend(plan, TRAIN, 3):
            pytest.fail("must not train over the cap")
    assert guard.spent() <= cap
    assert len(Ledger(tmp_path).entries()) == 2
    # The officer tightens the policy below what is already spent: nothing more fits.
    tightened = guard_at(tmp_path, SitePolicy(max_epsilon=one, delta=1e-5, accountant="rdp"))
    assert not tightened.admit(plan, 3).admitted
    with pytest.raises(BudgetExhausted, match="already spent"):
        tightened.plan_run(
            "run-2", PrivacyRequest(target_epsilon=cap, delta=1e-5, max_grad_norm=1.0, planned_rounds=1), Q, STEPS
        )


def test_record_refuses_more_steps_than_planned(tmp_path):
    guard = guard_at(tmp_path)
    plan = guard.plan_run("run-1", REQUEST, Q, STEPS)
    with guard.spend(plan, TRAIN, 1) as record:
        with pytest.raises(BudgetExhausted, match="calibrated"):
            record(STEPS + 1, "m" * 64)
    assert Ledger(tmp_path).entries() == []


def _race(state_dir, cap, run_id, barrier, queue):
    guard = guard_at(state_dir, capped(cap))
    plan = fixed_plan(run_id, 1.0, cap)
    barrier.wait()
    try:
        with guard.spend(plan, TRAIN, 1) as record:
            record(STEPS, "m" * 64)
        queue.put("recorded")
    except BudgetExhausted:
        queue.put("refused")


def test_two_processes_race_for_the_last_round(tmp_path):
    one, two = (compose_epsilon([Step(1.0, Q, STEPS * n)], 1e-5, "rdp") for n in (1, 2))
    cap = (one + two) / 2  # room for exactly one round
    ctx = multiprocessing.get_context("fork")
    barrier, queue = ctx.Barrier(2), ctx.Queue()
    workers = [ctx.Process(target=_race, args=(tmp_path, cap, f"run-{i}", barrier, queue)) for i in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
    assert sorted(queue.get(timeout=5) for _ in workers) == ["recorded", "refused"]
    assert len(Ledger(tmp_path).entries()) == 1


def test_one_run_never_spends_more_than_the_policys_per_run_limit(tmp_path):
    policy = SitePolicy(max_epsilon=10.0, delta=1e-5, accountant="rdp", max_epsilon_per_run=1.5)
    greedy = PrivacyRequest(target_epsilon=1_000_000.0, delta=1e-5, max_grad_norm=1.0, planned_rounds=3)
    guard = guard_at(tmp_path, policy)
    plan = guard.plan_run("greedy", greedy, Q, STEPS)
    assert plan.settings.run_target_epsilon == 1.5 and "target_epsilon" in plan.settings.overridden
    run_rounds(guard, plan, [1, 2, 3])
    assert guard.spent() <= 1.5
    # a plan forged to spend more is refused by admission, which checks the run's own composition
    forged = RunPlan("forged", DATASET, 0.6, Q, STEPS, effective_settings(policy, greedy), 0.0)
    refused = guard.admit(forged, 1)
    assert not refused.admitted and "over its limit of 1.5000" in refused.reason


def test_releases_are_planned_within_the_run_and_admitted_only_as_planned(tmp_path):
    policy = SitePolicy(max_epsilon=10.0, delta=1e-5, accountant="rdp", evaluation="dp", max_evaluations_per_run=2)
    request = PrivacyRequest(target_epsilon=2.0, delta=1e-5, max_grad_norm=1.0, planned_rounds=2, evaluations=3)
    guard = guard_at(tmp_path, policy)
    plan = guard.plan_run("run-1", request, Q, STEPS)
    assert plan.release_counts == {EVALUATE: 2} and "evaluations" in plan.settings.overridden
    assert plan.release_noise_multiplier > plan.noise_multiplier  # one release costs like a full-batch step
    run_rounds(guard, plan, [1, 2])
    for server_round in (1, 2):
        with guard.spend(plan, EVALUATE, server_round) as record:
            entry = record(1, "e" * 64)
        assert (entry.kind, entry.sample_rate, entry.steps, entry.max_grad_norm) == (EVALUATE, 1.0, 1, 1.0)
    assert not guard.admit(plan, 3, EVALUATE).admitted
    history = [e.to_step() for e in Ledger(tmp_path).entries()]
    assert compose_epsilon(history, 1e-5, "rdp") <= 2.0  # rounds and releases together within the run's target


def test_a_refused_evaluation_says_the_sites_policy_planned_fewer_than_the_run_asked(tmp_path):
    """federated-evaluation "every" asks for one DP evaluation per round; a policy that keeps the default
    max_evaluations_per_run of 1 plans one slot, and the refusals that follow name the policy as the reason."""
    request = PrivacyRequest(target_epsilon=2.0, delta=1e-5, max_grad_norm=1.0, planned_rounds=3, evaluations=3)
    lowered = SitePolicy(max_epsilon=10.0, delta=1e-5, accountant="rdp", evaluation="dp")  # allows 1 per run
    guard = guard_at(tmp_path / "lowered", lowered)
    plan = guard.plan_run("run-1", request, Q, STEPS)
    assert plan.slots(EVALUATE) == 1 and "evaluations" in plan.settings.overridden
    run_rounds(guard, plan, [1])
    with guard.spend(plan, EVALUATE, 1) as record:
        record(1, "e" * 64)
    refused = guard.admit(plan, 2, EVALUATE)
    assert not refused.admitted
    assert "already used its 1 planned evaluate slot(s)" in refused.reason
    assert "max_evaluations_per_run" in refused.reason and "fewer than the run asked for" in refused.reason
    with pytest.raises(BudgetExhausted, match="max_evaluations_per_run"):
        with guard.spend(plan, EVALUATE, 2):
            pytest.fail("must not release an evaluation the plan has no slot for")

    allowed = SitePolicy(max_epsilon=10.0, delta=1e-5, accountant="rdp", evaluation="dp", max_evaluations_per_run=3)
    guard = guard_at(tmp_path / "allowed", allowed)
    plan = guard.plan_run("run-1", request, Q, STEPS)
    assert plan.slots(EVALUATE) == 3 and "evaluations" not in plan.settings.overridden
    run_rounds(guard, plan, [1, 2, 3])
    for server_round in (1, 2, 3):
        with guard.spend(plan, EVALUATE, server_round) as record:
            record(1, "e" * 64)
    refused = guard.admit(plan, 4, EVALUATE)
    assert not refused.admitted and "already used its 3 planned evaluate slot(s)" in refused.reason
    assert "policy" not in refused.reason  # the run planned what it asked for: nothing to blame on the policy
