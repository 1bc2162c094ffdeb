"""The site's budget guard: plans, admits and records the privacy spend of one dataset.

Flow for one run on one dataset::

    guard = BudgetGuard(state_dir, policy, dataset_id)
    plan = guard.plan_run(run_id, request, sample_rate, steps_per_round)  # once per run
    admission = guard.admit(plan, server_round)        # cheap pre-check, never raises
    with guard.spend(plan, server_round) as record:    # holds the ledger lock
        ...train with plan.noise_multiplier...
        entry = record(steps_taken, model_fingerprint) # durable before it returns
    ...only now seal and send the update...

The noise multiplier is calibrated once per run for all its planned rounds, against
both the run's target and what is left of the dataset's cumulative cap, and the plan
is stored so a restarted site reuses it. Spending is serialised by the ledger lock,
so two runs on one dataset can never both spend the last of the budget.

A run may also reserve a private personalisation after its last round
(``plan_run(..., personalisation=Reservation(...))``): the rounds are then calibrated
for a share of the run's budget and the personalisation's own noise for the rest, so
the composed history of rounds plus personalisation stays within the run's target and
the dataset's cap. ``spend_personalisation`` records it, as an entry of kind
``personalise``, before anything it produced leaves the site.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from common.privacy.accounting import (
    Accountant,
    AccountingError,
    BudgetExhausted,
    Step,
    calibrate_noise,
    compose_epsilon,
    reference_epsilon,
)
from common.privacy.ledger import Ledger, LedgerEntry, write_atomic
from common.privacy.policy import (
    EffectiveSettings,
    PrivacyRequest,
    SitePolicy,
    effective_settings,
)

log = logging.getLogger(__name__)

PLANS_DIR = "plans"
TRAIN_KIND = "train"
PERSONALISE_KIND = "personalise"
LEDGER_KINDS = (TRAIN_KIND, PERSONALISE_KIND)
_SAFE_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class PlanConflict(Exception):
    """A stored plan for this run id belongs to another dataset or is unreadable."""


@dataclass(frozen=True)
class Reservation:
    """A private personalisation the run reserves: ``steps`` DP-SGD steps at ``sample_rate``
    after the last round, given ``fraction`` of the run's budget (0 < fraction < 1).

    The rounds are calibrated alone to (1 - fraction) of the run's target (and of what is
    left of the cap); the personalisation's noise is then calibrated so that the composed
    history (earlier spend + rounds + personalisation) reaches at most the target and cap.
    """

    fraction: float
    sample_rate: float
    steps: int

    def __post_init__(self) -> None:
        if not (math.isfinite(self.fraction) and 0 < self.fraction < 1):
            raise ValueError(f"personalisation fraction must be in (0, 1), got {self.fraction!r}")
        if not (math.isfinite(self.sample_rate) and 0 < self.sample_rate <= 1):
            raise ValueError(f"personalisation sample rate must be in (0, 1], got {self.sample_rate!r}")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"personalisation steps must be a positive integer, got {self.steps!r}")


@dataclass(frozen=True)
class RunPlan:
    """The DP-SGD settings of one run on one dataset, fixed at its first round."""

    run_id: str
    dataset_id: str
    noise_multiplier: float
    sample_rate: float
    steps_per_round: int
    settings: EffectiveSettings
    prior_epsilon: float
    #: The reserved personalisation (noise 0 and steps 0: none reserved).
    personalise_noise_multiplier: float = 0.0
    personalise_sample_rate: float = 1.0
    personalise_steps: int = 0
    personalise_fraction: float = 0.0

    @property
    def personalisation(self) -> Step | None:
        """The reserved personalisation phase, or None."""
        if self.personalise_steps < 1:
            return None
        return Step(self.personalise_noise_multiplier, self.personalise_sample_rate, self.personalise_steps)

    def to_dict(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "dataset_id": self.dataset_id,
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate,
            "steps_per_round": self.steps_per_round,
            "settings": self.settings.to_dict(),
            "prior_epsilon": self.prior_epsilon,
            "personalise_noise_multiplier": self.personalise_noise_multiplier,
            "personalise_sample_rate": self.personalise_sample_rate,
            "personalise_steps": self.personalise_steps,
            "personalise_fraction": self.personalise_fraction,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunPlan:
        return cls(
            run_id=str(data["run_id"]),
            dataset_id=str(data["dataset_id"]),
            noise_multiplier=float(data["noise_multiplier"]),
            sample_rate=float(data["sample_rate"]),
            steps_per_round=int(data["steps_per_round"]),
            settings=EffectiveSettings.from_dict(data["settings"]),
            prior_epsilon=float(data["prior_epsilon"]),
            personalise_noise_multiplier=float(data.get("personalise_noise_multiplier", 0.0)),
            personalise_sample_rate=float(data.get("personalise_sample_rate", 1.0)),
            personalise_steps=int(data.get("personalise_steps", 0)),
            personalise_fraction=float(data.get("personalise_fraction", 0.0)),
        )


@dataclass(frozen=True)
class Admission:
    """Whether one round may train, and why; epsilons under the policy's accountant."""

    admitted: bool
    reason: str
    spent_epsilon: float
    projected_epsilon: float
    cap_epsilon: float


class BudgetGuard:
    """Enforces the site's cumulative privacy cap for one dataset."""

    def __init__(self, state_dir: Path, policy: SitePolicy, dataset_id: str) -> None:
        if not dataset_id:
            raise ValueError("dataset_id must be a non-empty string")
        self.state_dir = Path(state_dir)
        self.policy = policy
        self.dataset_id = dataset_id
        self.ledger = Ledger(self.state_dir)

    # planning -----------------------------------------------------------------------

    def _plan_path(self, run_id: str) -> Path:
        name = run_id if _SAFE_RUN_ID.match(run_id) else hashlib.sha256(run_id.encode()).hexdigest()
        return self.state_dir / PLANS_DIR / f"{name}.json"

    def _stored_plan(self, run_id: str) -> RunPlan | None:
        path = self._plan_path(run_id)
        try:
            plan = RunPlan.from_dict(json.loads(path.read_text(encoding="utf-8")))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise PlanConflict(
                f"{path}: the stored plan of run {run_id!r} is unreadable ({exc}); the site "
                "will not recalibrate an existing run. Remove the file only if that run never "
                "trained on this dataset."
            ) from exc
        if plan.run_id != run_id or plan.dataset_id != self.dataset_id:
            raise PlanConflict(
                f"{path}: run {run_id!r} was planned for dataset {plan.dataset_id[:12]}..., "
                f"not {self.dataset_id[:12]}...; a run trains on one dataset per site"
            )
        return plan

    def stored_plan(self, run_id: str) -> RunPlan | None:
        """The plan stored for ``run_id`` on this dataset, or None (raises PlanConflict)."""
        with self.ledger.lock():
            return self._stored_plan(run_id)

    def plan_run(
        self, run_id: str, request: PrivacyRequest, sample_rate: float, steps_per_round: int,
        personalisation: Reservation | None = None,
    ) -> RunPlan:
        """Calibrate the run's noise once (or return its stored plan).

        With ``personalisation``, the rounds get (1 - fraction) of the budget and the
        reserved personalisation the rest (see :class:`Reservation`). Raises
        BudgetExhausted if no noise multiplier keeps both this run within its target and
        the dataset within its cap.
        """
        if steps_per_round < 1:
            raise ValueError(f"steps_per_round must be at least 1, got {steps_per_round}")
        with self.ledger.lock():
            stored = self._stored_plan(run_id)
            if stored is not None:
                if stored.settings != effective_settings(self.policy, request) or (
                    stored.sample_rate, stored.steps_per_round
                ) != (sample_rate, steps_per_round):
                    log.warning(
                        "run %s: request or data shape differs from the stored plan; "
                        "keeping the stored plan (noise %.4f)", run_id, stored.noise_multiplier,
                    )
                return stored
            settings = effective_settings(self.policy, request)
            prior = self.ledger.history(self.dataset_id)
            prior_epsilon = compose_epsilon(prior, settings.delta, settings.accountant)
            planned_steps = steps_per_round * settings.planned_rounds
            common = dict(
                sample_rate=sample_rate, planned_steps=planned_steps, delta=settings.delta,
                accountant=settings.accountant, min_noise=settings.min_noise_multiplier,
            )
            share = 1.0 - personalisation.fraction if personalisation else 1.0
            rounds_cap = prior_epsilon + share * (settings.cap_epsilon - prior_epsilon)
            personal: dict[str, Any] = {}
            try:
                sigma_run = calibrate_noise(prior=[], target_epsilon=share * settings.run_target_epsilon,
                                            **common)
                sigma_cap = calibrate_noise(prior=prior, target_epsilon=rounds_cap, **common)
                if personalisation:
                    rounds = Step(max(sigma_run, sigma_cap), sample_rate, planned_steps)
                    reserved = dict(
                        sample_rate=personalisation.sample_rate, planned_steps=personalisation.steps,
                        delta=settings.delta, accountant=settings.accountant,
                        min_noise=settings.min_noise_multiplier,
                    )
                    sigma_p = max(
                        calibrate_noise(prior=[rounds], target_epsilon=settings.run_target_epsilon, **reserved),
                        calibrate_noise(prior=[*prior, rounds], target_epsilon=settings.cap_epsilon, **reserved),
                    )
                    personal = dict(
                        personalise_noise_multiplier=sigma_p, personalise_sample_rate=personalisation.sample_rate,
                        personalise_steps=personalisation.steps, personalise_fraction=personalisation.fraction,
                    )
            except BudgetExhausted as exc:
                raise BudgetExhausted(
                    f"dataset {self.dataset_id[:12]}...: run {run_id} cannot be planned: {exc}"
                ) from exc
            plan = RunPlan(
                run_id=run_id,
                dataset_id=self.dataset_id,
                noise_multiplier=max(sigma_run, sigma_cap),
                sample_rate=sample_rate,
                steps_per_round=steps_per_round,
                settings=settings,
                prior_epsilon=prior_epsilon,
                **personal,
            )
            path = self._plan_path(run_id)
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            record = {**plan.to_dict(), "created": datetime.now(timezone.utc).isoformat()}
            write_atomic(path, json.dumps(record, indent=2).encode("utf-8"))
        log.info(
            "run %s on dataset %s: noise multiplier %.4f for %d rounds x %d steps at q=%g "
            "(run target %.3f, spent %.3f of cap %.3f, %s)",
            run_id, self.dataset_id[:12], plan.noise_multiplier, settings.planned_rounds,
            steps_per_round, sample_rate, settings.run_target_epsilon, prior_epsilon,
            settings.cap_epsilon, settings.accountant,
        )
        return plan

    # admission and spending ---------------------------------------------------------

    def _limits(self, plan: RunPlan) -> tuple[float, float, Accountant]:
        """Cap, delta and accountant for a plan: the stricter of the plan and today's policy."""
        return (
            min(plan.settings.cap_epsilon, self.policy.max_epsilon),
            min(plan.settings.delta, self.policy.delta),
            self.policy.accountant,
        )

    def _admission(
        self, plan: RunPlan, step: Step, what: str, refusal: Callable[[list[LedgerEntry], float, Accountant], str]
    ) -> Admission:
        """Admit ``step`` of ``plan`` if ``refusal`` finds no reason (given this dataset's entries, delta and
        accountant) and the dataset stays within its cap; the caller holds the ledger lock."""
        cap, delta, accountant = self._limits(plan)
        entries = self.ledger.entries(self.dataset_id)
        history = [e.to_step() for e in entries]
        spent = compose_epsilon(history, delta, accountant)
        reason = (f"plan of run {plan.run_id} is for another dataset" if plan.dataset_id != self.dataset_id
                  else refusal(entries, delta, accountant))
        if reason:
            return Admission(False, reason, spent, math.nan, cap)
        projected = compose_epsilon([*history, step], delta, accountant)
        if projected > cap:
            return Admission(
                False,
                f"privacy budget exhausted: {what} would bring the dataset to epsilon {projected:.4f}, over the "
                f"site's cap of {cap:.4f} (already spent {spent:.4f}, {accountant}, delta={delta:g})",
                spent, projected, cap,
            )
        return Admission(True, "within budget", spent, projected, cap)

    def _check(self, plan: RunPlan, server_round: int, steps: int) -> Admission:
        """The admission decision for a training round; the caller holds the ledger lock."""
        planned_rounds = plan.settings.planned_rounds

        def refusal(entries: list[LedgerEntry], delta: float, accountant: Accountant) -> str:
            this_run = [e for e in entries if e.run_id == plan.run_id and e.kind == TRAIN_KIND]
            if any(e.server_round == server_round for e in this_run):
                return (f"round {server_round} of run {plan.run_id} was already recorded (replayed "
                        "instruction); refusing to train on it twice")
            if len(this_run) >= planned_rounds:
                return f"run {plan.run_id} already used its {planned_rounds} planned rounds on this dataset"
            return ""

        return self._admission(plan, Step(plan.noise_multiplier, plan.sample_rate, steps), "this round", refusal)

    def admit(self, plan: RunPlan, server_round: int) -> Admission:
        """Would this round, at the planned steps, stay within the cap? Never raises for a refusal."""
        with self.ledger.lock():
            return self._check(plan, server_round, plan.steps_per_round)

    @contextmanager
    def spend(
        self, plan: RunPlan, server_round: int
    ) -> Iterator[Callable[[int, str], LedgerEntry]]:
        """Hold the ledger lock while the caller trains; yields ``record(steps, fingerprint)``.

        Raises BudgetExhausted on entry if the round is not admitted. ``record`` appends
        the round durably (or raises BudgetExhausted / LedgerError and writes nothing);
        it may be called once. Send the update only after it returned.
        """
        with self.ledger.lock():
            admission = self._check(plan, server_round, plan.steps_per_round)
            if not admission.admitted:
                raise BudgetExhausted(admission.reason)
            planned = Step(plan.noise_multiplier, plan.sample_rate, plan.steps_per_round)
            yield self._recorder(plan, server_round, planned, TRAIN_KIND, f"round {server_round}", "do not send")

    def spent(self) -> float:
        """Epsilon spent on this dataset so far (policy accountant and delta)."""
        history = self.ledger.history(self.dataset_id)
        return compose_epsilon(history, self.policy.delta, self.policy.accountant)

    # private personalisation ----------------------------------------------------------

    def _check_personalisation(self, plan: RunPlan) -> Admission:
        """Admission of the run's reserved personalisation; the caller holds the ledger lock."""
        step = plan.personalisation
        if step is None:
            return Admission(False, f"run {plan.run_id} reserved no private personalisation in its plan",
                             math.nan, math.nan, self._limits(plan)[0])

        def refusal(entries: list[LedgerEntry], delta: float, accountant: Accountant) -> str:
            if any(e.run_id == plan.run_id and e.kind == PERSONALISE_KIND for e in entries):
                return f"run {plan.run_id} already spent its personalisation on this dataset"
            this_run = [e.to_step() for e in entries if e.run_id == plan.run_id]
            run_total = compose_epsilon([*this_run, step], delta, accountant)
            if run_total > plan.settings.run_target_epsilon:
                return (f"personalisation would bring run {plan.run_id} to epsilon {run_total:.4f}, over its "
                        f"target of {plan.settings.run_target_epsilon:.4f}")
            return ""

        return self._admission(plan, step, "personalisation", refusal)

    @contextmanager
    def spend_personalisation(
        self, plan: RunPlan, server_round: int
    ) -> Iterator[Callable[[int, str], LedgerEntry]]:
        """Like :meth:`spend`, for the run's reserved personalisation (ledger kind ``personalise``).

        Raises BudgetExhausted on entry if it is not reserved, already spent, or would
        exceed the run's target or the cap. ``record(steps, fingerprint)`` appends it
        durably; report anything derived from the personalised model only after it returned.
        """
        with self.ledger.lock():
            admission = self._check_personalisation(plan)
            step = plan.personalisation
            if not admission.admitted or step is None:  # a plan without a reservation is never admitted
                raise BudgetExhausted(admission.reason)
            yield self._recorder(plan, server_round, step, PERSONALISE_KIND, "the personalisation", "report nothing")

    def _recorder(
        self, plan: RunPlan, server_round: int, planned: Step, kind: str, what: str, otherwise: str
    ) -> Callable[[int, str], LedgerEntry]:
        """``record(steps, fingerprint)`` for one planned phase; the caller holds the ledger lock.

        It appends the phase durably, once, at the steps actually taken (never more than
        planned), or raises BudgetExhausted / LedgerError and writes nothing.
        """
        recorded: list[LedgerEntry] = []

        def record(steps_taken: int, model_fingerprint: str) -> LedgerEntry:
            if recorded:
                raise RuntimeError(f"{what} of run {plan.run_id} is already recorded")
            if isinstance(steps_taken, bool) or not isinstance(steps_taken, int) or steps_taken < 1:
                raise ValueError(f"steps_taken must be a positive integer, got {steps_taken!r}")
            if steps_taken > planned.steps:
                raise BudgetExhausted(
                    f"{what} took {steps_taken} steps but run {plan.run_id} was calibrated for {planned.steps}; "
                    f"not recorded, {otherwise}"
                )
            cap, delta, accountant = self._limits(plan)
            history = [*self.ledger.history(self.dataset_id), Step(planned.noise_multiplier, planned.sample_rate, steps_taken)]
            epsilon = compose_epsilon(history, delta, accountant)
            if epsilon > cap:
                raise BudgetExhausted(
                    f"recording {what} would bring the dataset to epsilon {epsilon:.4f}, over the cap "
                    f"of {cap:.4f}; not recorded, {otherwise}"
                )
            try:
                ref_name, ref_epsilon = reference_epsilon(history, delta, accountant)
            except AccountingError as exc:
                # The reference column is informational; the cap was checked above.
                log.warning("reference epsilon unavailable: %s", exc)
                ref_name, ref_epsilon = f"{'rdp' if accountant == 'prv' else 'prv'}-unavailable", -1.0
            entry = self.ledger.append(
                dataset_id=self.dataset_id, run_id=plan.run_id, server_round=server_round,
                noise_multiplier=planned.noise_multiplier, sample_rate=planned.sample_rate,
                steps=steps_taken, max_grad_norm=plan.settings.max_grad_norm, delta=delta,
                epsilon=epsilon, accountant=accountant,
                reference_epsilon=ref_epsilon, reference_accountant=ref_name,
                model_fingerprint=model_fingerprint, kind=kind,
            )
            recorded.append(entry)
            return entry

        return record
