"""Private personalisation (``personalise-fraction``): planned in the budget, recorded before its release, audited."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import client.private_round as private_round
from client.app import app as client_app
from client.budget import BudgetGuard, Reservation
from client.private_round import personalisation_reservation
from common.privacy.accounting import BudgetExhausted, Step, compose_epsilon
from common.privacy.audit import run_audit
from common.privacy.ledger import EVALUATE, LEDGER_FILE, PERSONALISE, PERSONALISED_EVALUATE, TRAIN, Ledger
from common.privacy.policy import PrivacyRequest, SitePolicy, write_policy
from common.protocol import RoundInstruction
from common.security.keys import Identity, read_identity
from common.settings import RunSettings, SettingsError
from simulations.inprocess import DirectGrid, run_on_grid

DATASET = "d" * 64
SITE = Identity.generate("site-a")
#: Personalised results leave a site only as a DP evaluation release: only sites that release evaluations personalise.
POLICY = SitePolicy(max_epsilon=2.0, delta=1e-5, accountant="rdp", evaluation="dp")
REQUEST = PrivacyRequest(target_epsilon=1.0, delta=1e-5, max_grad_norm=1.0, planned_rounds=3)
Q, STEPS = 0.1, 30
RESERVE = Reservation(fraction=0.5, sample_rate=1.0, steps=10)


def _guard(state_dir: Path, policy: SitePolicy = POLICY) -> BudgetGuard:
    return BudgetGuard(state_dir, policy, DATASET, SITE)


def _rounds(guard: BudgetGuard, plan, rounds: int = 3) -> None:
    for server_round in range(1, rounds + 1):
        with guard.spend(plan, TRAIN, server_round) as record:
            record(STEPS, "m" * 64)


def test_plan_reserves_the_personalisation_within_the_run_target(tmp_path: Path) -> None:
    guard = _guard(tmp_path)
    plain = guard.plan_run("run-plain", REQUEST, Q, STEPS)
    plan = _guard(tmp_path / "other").plan_run("run-p", REQUEST, Q, STEPS, RESERVE)
    step = plan.personalisation
    assert step is not None and (step.sample_rate, step.steps) == (1.0, 10)
    assert plain.personalisation is None
    assert plan.noise_multiplier > plain.noise_multiplier  # the rounds get only part of the budget
    assert _guard(tmp_path / "other").stored_plan("run-p") == plan  # survives a restart
    assert plan.to_dict()["personalise_steps"] == 10
    release = Step(plan.release_noise_multiplier, 1.0, plan.release_counts[PERSONALISED_EVALUATE])
    total = compose_epsilon([Step(plan.noise_multiplier, Q, 3 * STEPS), release, step], 1e-5, "rdp")
    assert (
        0.99 < total <= 1.0
    )  # composed, not summed: rounds, the copy's evaluation and personalisation reach the target


def test_personalisation_spend_is_recorded_once_and_stays_within_target(tmp_path: Path) -> None:
    guard = _guard(tmp_path)
    plan = guard.plan_run("run-p", REQUEST, Q, STEPS, RESERVE)
    _rounds(guard, plan)
    after_rounds = guard.spent()
    with guard.spend(plan, PERSONALISE, 3) as record:
        entry = record(10, "p" * 64)
    assert entry.kind == PERSONALISE and entry.server_round == 3
    entries = Ledger(tmp_path).entries(DATASET)
    assert [e.kind for e in entries] == [TRAIN] * 3 + [PERSONALISE]
    assert after_rounds < entry.epsilon <= REQUEST.target_epsilon
    assert entry.epsilon == pytest.approx(compose_epsilon(Ledger(tmp_path).history(DATASET), 1e-5, "rdp"))
    with pytest.raises(BudgetExhausted, match="already used its 1 planned personalise slot"):
        with guard.spend(plan, PERSONALISE, 3):
            pytest.fail("a run personalises once")
    with pytest.raises(BudgetExhausted):  # more steps than reserved are never recorded
        other = _guard(tmp_path / "b")
        plan_b = other.plan_run("run-b", REQUEST, Q, STEPS, RESERVE)
        with other.spend(plan_b, PERSONALISE, 3) as record:
            record(11, "p" * 64)
    assert Ledger(tmp_path / "b").entries() == []


def test_no_reservation_no_personalisation_and_the_cap_holds(tmp_path: Path) -> None:
    guard = _guard(tmp_path)
    plain = guard.plan_run("run-plain", REQUEST, Q, STEPS)
    with pytest.raises(BudgetExhausted, match="planned no personalise"):
        with guard.spend(plain, PERSONALISE, 3):
            pytest.fail("not reserved")
    # a later run on a dataset already near its cap: rounds + personalisation stay under the cap
    _rounds(guard, plain)
    spent = guard.spent()
    tight = SitePolicy(max_epsilon=spent + 0.4, delta=1e-5, accountant="rdp", evaluation="dp")
    guard = _guard(tmp_path, tight)
    plan = guard.plan_run("run-2", REQUEST, Q, STEPS, RESERVE)
    _rounds(guard, plan)
    with guard.spend(plan, PERSONALISE, 3) as record:
        entry = record(10, "p" * 64)
    assert entry.epsilon <= tight.max_epsilon


def test_a_site_that_releases_no_evaluation_reserves_no_personalisation(tmp_path: Path) -> None:
    silent = SitePolicy(max_epsilon=2.0, delta=1e-5, accountant="rdp", evaluation="none")
    plan = _guard(tmp_path, silent).plan_run("run-p", REQUEST, Q, STEPS, RESERVE)
    assert plan.personalisation is None and plan.release_counts == {}


def _instruction(dp: int, fraction: float, epochs: int) -> RoundInstruction:
    return RoundInstruction(
        server_round=1,
        rounds=3,
        transfer_policy="head",
        base_fingerprint="b" * 64,
        base_card_sha256="c" * 64,
        frozen_fingerprint="f" * 64,
        local_epochs=1,
        batch_size=8,
        lr=0.1,
        optimizer="sgd",
        proximal_mu=0.0,
        seed=0,
        personalise_epochs=epochs,
        dp=dp,
        run_id="r",
        personalise_fraction=fraction,
    )


def test_reservation_only_for_private_runs_and_settings_validate() -> None:
    assert personalisation_reservation(_instruction(0, 0.5, 10), 30) is None
    assert personalisation_reservation(_instruction(1, 0.0, 10), 30) is None
    assert personalisation_reservation(_instruction(1, 0.5, 0), 30) is None
    assert personalisation_reservation(_instruction(1, 0.5, 10), 30) == Reservation(0.5, 1.0, 10)
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
        write_policy(
            SitePolicy(
                max_epsilon=2.0, delta=1e-5, max_grad_norm=1.0, accountant="rdp", declared_size=120, evaluation="dp"
            ),
            policy,
        )
    seen: list[int] = []
    original = private_round.noisy_counts

    def spy(counts, noise_multiplier, source):  # every release: a personalised copy's only after its spend is on disk
        ledgers = [root / "sites" / f"site-{i}" / "state" / LEDGER_FILE for i in range(3)]  # read raw: the lock is held
        seen.append(
            sum(
                json.loads(line)["kind"] == PERSONALISE
                for path in ledgers
                if path.exists()
                for line in path.read_text().splitlines()
            )
        )
        return original(counts, noise_multiplier, source)

    settings = RunSettings(
        scenario=str(study),
        rounds=2,
        local_epochs=1,
        out=str(root / "out"),
        sim_root=str(root / "sites"),
        min_sites=3,
        expected_sites=3,
        target_epsilon=1.0,
        delta=1e-5,
        max_grad_norm=1.0,
        personalise_epochs=5,
        personalise_fraction=0.4,
        personalise_lr=0.5,
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(private_round, "noisy_counts", spy)
        record = run_on_grid(DirectGrid(client_app, num_nodes=3, run_id=7301), settings)
    return root, record, seen


def _ledger(root: Path, site: int) -> Ledger:
    return Ledger(root / "sites" / f"site-{site}" / "state")


@pytest.mark.federation
def test_private_run_reports_personalised_metrics_after_recording_the_spend(personalised_run) -> None:
    root, record, seen = personalised_run
    assert record.status == "completed"
    last = record.round(2)
    for site in ("site-0", "site-1", "site-2"):
        assert "accuracy" in last.sites[site].personalised  # derived by the coordinator from the site's noisy release
        assert "personalised-eval-counts" in last.sites[site].evaluate.values
        assert record.round(1).sites[site].evaluate is None  # the run asks for one evaluation, after its last round
    assert seen[1::2] == [
        1,
        2,
        3,
    ]  # the n-th personalised copy was released only after n personalisation entries existed
    for site in range(3):
        entries = _ledger(root, site).entries()
        assert [(e.kind, e.server_round) for e in entries] == [
            (TRAIN, 1),
            (TRAIN, 2),
            (EVALUATE, 2),
            (PERSONALISE, 2),
            (PERSONALISED_EVALUATE, 2),
        ]
        assert entries[-1].epsilon <= 1.0 and entries[-1].epsilon > entries[1].epsilon
        assert last.sites[f"site-{site}"].evaluate.report["epsilon"] == pytest.approx(entries[-1].epsilon)
        # what the coordinator shows as spent is the ledger's total, personalisation included, not the rounds' alone
        assert last.sites[f"site-{site}"].epsilon() == pytest.approx(entries[-1].epsilon)
        assert f"{entries[-1].epsilon:.3f}" in (root / "out" / "report.md").read_text()


@pytest.mark.federation
def test_audit_passes_on_a_run_with_private_personalisation(personalised_run) -> None:
    root, _, _ = personalised_run
    report = run_audit([root / "sites" / f"site-{i}" for i in range(3)] + [root / "out"])
    assert report.passed, [f"{f.where}: {f.message}" for f in report.failures()]
    assert all(b.rounds == 2 and b.releases == 2 and b.spent_claimed <= 1.0 for b in report.budgets)
    assert not any("no report" in f.message for f in report.findings)  # the personalisation's spend was reported too


@pytest.mark.federation
def test_audit_fails_a_second_personalisation_of_one_run(personalised_run, tmp_path: Path) -> None:
    import shutil

    root, _, _ = personalised_run
    state = tmp_path / "site-0" / "state"
    shutil.copytree(root / "sites" / "site-0" / "state", state)
    ledger = Ledger(state, signer=read_identity(root / "sites" / "site-0" / "keys", "site-0"))
    last = next(e for e in reversed(ledger.entries()) if e.kind == PERSONALISE)
    fields = {
        k: getattr(last, k)
        for k in (
            "dataset_id",
            "run_id",
            "server_round",
            "noise_multiplier",
            "sample_rate",
            "steps",
            "max_grad_norm",
            "delta",
            "accountant",
            "reference_epsilon",
            "reference_accountant",
            "model_fingerprint",
            "kind",
            "noise",
        )
    }
    history = [*ledger.history(last.dataset_id), last.to_step()]
    with ledger.lock():
        ledger.append(**fields, epsilon=compose_epsilon(history, last.delta, "rdp"))
    report = run_audit([state])
    assert any("personalisation" in f.message and "twice" in f.message for f in report.failures())
