"""Private personalisation (``personalise-fraction``): planned in the run budget, recorded before its metrics leave, audited."""

from __future__ import annotations

from pathlib import Path

import pytest

import client.private_round as private_round
from client.app import app as client_app
from client.budget import PERSONALISE_KIND, TRAIN_KIND, BudgetGuard, Reservation
from client.private_round import personalisation_reservation
from common.privacy.accounting import BudgetExhausted, Step, compose_epsilon
from common.privacy.audit import run_audit
from common.privacy.ledger import Ledger
from common.settings import RunSettings, SettingsError
from common.privacy.policy import PrivacyRequest, SitePolicy, write_policy
from server.federation import run_federation
from simulations.inprocess import DirectGrid

DATASET = "d" * 64
POLICY = SitePolicy(max_epsilon=2.0, delta=1e-5, accountant="rdp")
REQUEST = PrivacyRequest(target_epsilon=1.0, delta=1e-5, max_grad_norm=1.0, planned_rounds=3)
Q, STEPS = 0.1, 30
RESERVE = Reservation(fraction=0.5, sample_rate=1.0, steps=10)


def _rounds(guard: BudgetGuard, plan, rounds: int = 3) -> None:
    for server_round in range(1, rounds + 1):
        with guard.spend(plan, server_round) as record:
            record(STEPS, "m" * 64)


def test_plan_reserves_the_personalisation_within_the_run_target(tmp_path: Path) -> None:
    guard = BudgetGuard(tmp_path, POLICY, DATASET)
    plain = guard.plan_run("run-plain", REQUEST, Q, STEPS)
    plan = BudgetGuard(tmp_path / "other", POLICY, DATASET).plan_run("run-p", REQUEST, Q, STEPS, RESERVE)
    step = plan.personalisation
    assert step is not None and (step.sample_rate, step.steps) == (1.0, 10)
    assert plain.personalisation is None
    assert plan.noise_multiplier > plain.noise_multiplier  # the rounds get only part of the budget
    assert BudgetGuard(tmp_path / "other", POLICY, DATASET).stored_plan("run-p") == plan  # survives a restart
    assert plan.to_dict()["personalise_steps"] == 10
    total = compose_epsilon([Step(plan.noise_multiplier, Q, 3 * STEPS), step], 1e-5, "rdp")
    assert 0.99 < total <= 1.0  # composed, not summed: rounds + personalisation reach the target


def test_personalisation_spend_is_recorded_once_and_stays_within_target(tmp_path: Path) -> None:
    guard = BudgetGuard(tmp_path, POLICY, DATASET)
    plan = guard.plan_run("run-p", REQUEST, Q, STEPS, RESERVE)
    _rounds(guard, plan)
    after_rounds = guard.spent()
    with guard.spend_personalisation(plan, 3) as record:
        entry = record(10, "p" * 64)
    assert entry.kind == PERSONALISE_KIND and entry.server_round == 3
    entries = Ledger(tmp_path).entries(DATASET)
    assert [e.kind for e in entries] == [TRAIN_KIND] * 3 + [PERSONALISE_KIND]
    assert after_rounds < entry.epsilon <= REQUEST.target_epsilon
    assert entry.epsilon == pytest.approx(compose_epsilon(Ledger(tmp_path).history(DATASET), 1e-5, "rdp"))
    with pytest.raises(BudgetExhausted, match="already spent its personalisation"):
        with guard.spend_personalisation(plan, 3):
            pytest.fail("a run personalises once")
    with pytest.raises(BudgetExhausted):  # more steps than reserved are never recorded
        other = BudgetGuard(tmp_path / "b", POLICY, DATASET)
        plan_b = other.plan_run("run-b", REQUEST, Q, STEPS, RESERVE)
        with other.spend_personalisation(plan_b, 3) as record:
            record(11, "p" * 64)
    assert Ledger(tmp_path / "b").entries() == []


def test_no_reservation_no_personalisation_and_the_cap_holds(tmp_path: Path) -> None:
    guard = BudgetGuard(tmp_path, POLICY, DATASET)
    plain = guard.plan_run("run-plain", REQUEST, Q, STEPS)
    with pytest.raises(BudgetExhausted, match="reserved no private personalisation"):
        with guard.spend_personalisation(plain, 3):
            pytest.fail("not reserved")
    # a later run on a dataset already near its cap: rounds + personalisation stay under the cap
    _rounds(guard, plain)
    spent = guard.spent()
    tight = SitePolicy(max_epsilon=spent + 0.4, delta=1e-5, accountant="rdp")
    guard = BudgetGuard(tmp_path, tight, DATASET)
    plan = guard.plan_run("run-2", REQUEST, Q, STEPS, RESERVE)
    _rounds(guard, plan)
    with guard.spend_personalisation(plan, 3) as record:
        entry = record(10, "p" * 64)
    assert entry.epsilon <= tight.max_epsilon


def test_reservation_only_for_private_runs_and_settings_validate() -> None:
    assert personalisation_reservation(False, 0.5, 10, 30) is None
    assert personalisation_reservation(True, 0.0, 10, 30) is None
    assert personalisation_reservation(True, 0.5, 0, 30) is None
    assert personalisation_reservation(True, 0.5, 10, 30) == Reservation(0.5, 1.0, 10)
    with pytest.raises(SettingsError):
        RunSettings(personalise_fraction=1.0)
    with pytest.raises(SettingsError):
        RunSettings(personalise_lr=-1.0)


@pytest.fixture(scope="module")
def personalised_run(tmp_path_factory: pytest.TempPathFactory):
    from tests.conftest import write_shifted_study

    root = tmp_path_factory.mktemp("private-personalisation")
    study = write_shifted_study(root / "study")
    for site in range(3):
        policy = root / "sites" / f"site-{site}" / "state" / "privacy-policy.toml"
        policy.parent.mkdir(parents=True)
        write_policy(SitePolicy(max_epsilon=2.0, delta=1e-5, max_grad_norm=1.0, accountant="rdp"), policy)
    seen: list[int] = []
    original = private_round.evaluate

    def spy(model, policy, features):  # called when the personalised copy is scored: its spend must be on disk
        seen.append(sum(e.kind == PERSONALISE_KIND for i in range(3) for e in _ledger(root, i).entries()))
        return original(model, policy, features)

    settings = RunSettings(
        scenario=str(study), num_server_rounds=2, local_epochs=1, out=str(root / "out"), sim_root=str(root / "sites"),
        min_sites=3, expected_sites=3, target_epsilon=1.0, delta=1e-5, max_grad_norm=1.0,
        personalise_epochs=5, personalise_fraction=0.4, personalise_lr=0.5,
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(private_round, "evaluate", spy)
        record = run_federation(DirectGrid(client_app, num_nodes=3, run_id=7301), settings, 7301)
    return root, record, seen


def _ledger(root: Path, site: int) -> Ledger:
    return Ledger(root / "sites" / f"site-{site}" / "state")


def test_private_run_reports_personalised_metrics_after_recording_the_spend(personalised_run) -> None:
    root, record, seen = personalised_run
    assert record.status == "completed"
    last = record.round(2)
    for site in ("site-0", "site-1", "site-2"):
        assert 0 <= last.sites[site].evaluate["p-accuracy"] <= 1
        assert "p-accuracy" not in record.round(1).sites[site].evaluate
    assert seen == [1, 2, 3]  # the n-th personalised copy was scored only after n personalisation entries existed
    for site in range(3):
        entries = _ledger(root, site).entries()
        assert [(e.kind, e.server_round) for e in entries] == [(TRAIN_KIND, 1), (TRAIN_KIND, 2), (PERSONALISE_KIND, 2)]
        assert entries[-1].epsilon <= 1.0 and entries[-1].epsilon > entries[1].epsilon
        assert last.sites[f"site-{site}"].evaluate["p-epsilon"] == pytest.approx(entries[-1].epsilon)
        # what the coordinator shows as spent is the ledger's total, personalisation included, not the rounds' alone
        assert last.sites[f"site-{site}"].epsilon() == pytest.approx(entries[-1].epsilon)
        assert f"{entries[-1].epsilon:.3f}" in (root / "out" / "report.md").read_text()


def test_audit_passes_on_a_run_with_private_personalisation(personalised_run) -> None:
    root, _, _ = personalised_run
    report = run_audit([root / "sites" / f"site-{i}" for i in range(3)] + [root / "out"])
    assert report.passed, [f"{f.where}: {f.message}" for f in report.failures()]
    assert all(b.rounds == 2 and b.spent_claimed <= 1.0 for b in report.budgets)
    assert sum("private personalisation" in f.message for f in report.findings) == 3


def test_audit_fails_a_second_personalisation_of_one_run(personalised_run, tmp_path: Path) -> None:
    import shutil

    root, _, _ = personalised_run
    state = tmp_path / "site-0" / "state"
    shutil.copytree(root / "sites" / "site-0" / "state", state)
    ledger = Ledger(state)
    last = ledger.entries()[-1]
    fields = {k: getattr(last, k) for k in (
        "dataset_id", "run_id", "server_round", "noise_multiplier", "sample_rate", "steps", "max_grad_norm", "delta",
        "accountant", "reference_epsilon", "reference_accountant", "model_fingerprint", "kind")}
    history = [*ledger.history(last.dataset_id), last.to_step()]
    with ledger.lock():
        ledger.append(**fields, epsilon=compose_epsilon(history, last.delta, "rdp"))
    report = run_audit([state])
    assert any("personalisation" in f.message and "twice" in f.message for f in report.failures())
