"""The site's budget guard: plans, admits and records the privacy spend of one dataset.

Flow for one run on one dataset::

    guard = BudgetGuard(state_dir, policy, dataset_id, identity)
    plan = guard.plan_run(run_id, request, sample_rate, steps, noise=...)   # once per run
    with guard.spend(plan, TRAIN, server_round) as record:  # holds the ledger lock
        ...train with plan.noise_multiplier...
        entry = record(steps_taken, model_fingerprint) # durable before it returns
    ...only now seal and send the update...

Everything a run may spend on the dataset is planned at its first round, in phases:
the training rounds, the DP releases it may make (evaluations, training losses;
``release_share`` of the run's budget), and an optional private personalisation after the
last round (its ``fraction``). Each phase's noise multiplier is calibrated so that the phases
up to it compose to at most their cumulative share of both the run's limit and what is
left of the dataset's cap, so the whole plan fits both. The plan is stored, so a
restarted site reuses it instead of recalibrating; each calibrated noise multiplier is
stored too (``common.privacy.calibrations``), so a later run with the same inputs, in any
process, re-certifies it with one accountant evaluation instead of searching.

Every spend is admitted under the ledger lock only if the entry kind still has a planned
slot in this run, this run's own composed epsilon stays within its limit (the smallest of
the request, the policy's ``max_epsilon_per_run`` and the cap) and the dataset's whole
history stays within the cap. Two runs on one dataset can never both spend the last of
the budget. The ledger's head is signed with the site's key on every append; a ledger
whose signature fails is refused before anything is planned or spent.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from common.errors import PrivacyError
from common.io import parse_json, write_atomic
from common.privacy.accounting import (
    Accountant,
    AccountingError,
    BudgetExhausted,
    Step,
    compose_epsilon,
    reference_epsilon,
)
from common.privacy.calibrations import CALIBRATIONS_DIR, CalibrationStore
from common.privacy.ledger import (
    EVALUATE,
    LOSS,
    PERSONALISE,
    PERSONALISED_EVALUATE,
    TRAIN,
    Ledger,
    LedgerEntry,
)
from common.privacy.policy import (
    EffectiveSettings,
    PrivacyRequest,
    SitePolicy,
    effective_settings,
)
from common.privacy.releases import release_sensitivity
from common.security.keys import Identity

log = logging.getLogger(__name__)

PLANS_DIR = "plans"
_SAFE_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
#: Slack when checking a run's composed epsilon against the limit its plan was calibrated to.
_LIMIT_SLACK = 1e-9


class PlanConflict(PrivacyError):
    """A stored plan for this run id belongs to another dataset or is unreadable."""


@dataclass(frozen=True)
class Reservation:
    """A private personalisation the run reserves: ``steps`` DP-SGD steps at ``sample_rate``
    after the last round, given ``fraction`` of the run's budget (0 < fraction < 1)."""

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
    """Everything one run may spend on one dataset, fixed at its first round."""

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
    #: DP releases: one noise multiplier, and how many of each release kind the run may make.
    release_noise_multiplier: float = 0.0
    release_counts: dict[str, int] = field(default_factory=dict)
    #: Where the run's randomness comes from: "csprng", or "seeded" (reproducible, not private).
    noise: str = "csprng"

    @property
    def personalisation(self) -> Step | None:
        """The reserved personalisation phase, or None."""
        if self.personalise_steps < 1:
            return None
        return Step(self.personalise_noise_multiplier, self.personalise_sample_rate, self.personalise_steps)

    def slots(self, kind: str) -> int:
        """How many ledger entries of ``kind`` the run may write on this dataset."""
        if kind == TRAIN:
            return self.settings.planned_rounds
        if kind == PERSONALISE:
            return 1 if self.personalisation else 0
        return self.release_counts.get(kind, 0)

    def step(self, kind: str, steps: int | None = None) -> Step:
        """The DP phase one entry of ``kind`` composes into the history (at most the planned steps)."""
        if kind == TRAIN:
            return Step(self.noise_multiplier, self.sample_rate, self.steps_per_round if steps is None else steps)
        if kind == PERSONALISE:
            planned = self.personalisation or Step(1.0, 1.0, 0)
            return Step(planned.noise_multiplier, planned.sample_rate, planned.steps if steps is None else steps)
        return Step(self.release_noise_multiplier, 1.0, 1)

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
            "release_noise_multiplier": self.release_noise_multiplier,
            "release_counts": dict(self.release_counts),
            "noise": self.noise,
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
            release_noise_multiplier=float(data.get("release_noise_multiplier", 0.0)),
            release_counts={str(k): int(v) for k, v in data.get("release_counts", {}).items()},
            noise=str(data.get("noise", "csprng")),
        )


@dataclass(frozen=True)
class Admission:
    """Whether one spend may happen, and why; epsilons under the policy's accountant."""

    admitted: bool
    reason: str
    spent_epsilon: float
    projected_epsilon: float
    cap_epsilon: float


@dataclass(frozen=True)
class _Phase:
    """One planned phase for calibration: its sample rate and total steps, and its share of the budget."""

    sample_rate: float
    steps: int
    share: float


#: The entry kinds whose planned count the site's policy may lower below the run's request: the
#: field ``EffectiveSettings.overridden`` names then, and the policy keys that lower it.
_LOWERED_BY = {
    TRAIN: ("planned_rounds", "max_rounds_per_run"),
    EVALUATE: ("evaluations", "evaluation, max_evaluations_per_run"),
    LOSS: ("release_loss", "allow_loss_release"),
}


def _lowered_by_policy(plan: RunPlan, kind: str) -> str:
    """Why a run has fewer ``kind`` slots than it asked for, if the site's policy lowered them when it was planned."""
    if kind not in _LOWERED_BY or _LOWERED_BY[kind][0] not in plan.settings.overridden:
        return ""
    keys = _LOWERED_BY[kind][1]
    return f" (the site's policy, {keys}, allowed fewer than the run asked for when it was planned)"


class BudgetGuard:
    """Enforces the site's caps for one dataset (``dataset_id``, keyed; ``aliases``: the ids its older
    ledger entries were recorded under, which count all the same)."""

    def __init__(
        self, state_dir: Path, policy: SitePolicy, dataset_id: str, identity: Identity, aliases: Sequence[str] = ()
    ) -> None:
        if not dataset_id:
            raise ValueError("dataset_id must be a non-empty string")
        self.state_dir = Path(state_dir)
        self.policy = policy
        self.dataset_id = dataset_id
        self.dataset_ids = (dataset_id, *(a for a in aliases if a != dataset_id))
        self.ledger = Ledger(self.state_dir, signer=identity)
        self.ledger.initialise()
        self.calibrations = CalibrationStore(self.state_dir / CALIBRATIONS_DIR)

    def history(self) -> list[Step]:
        """The dataset's whole DP history (verified ledger, signed head)."""
        return [e.to_step() for e in self._entries()]

    def _entries(self) -> list[LedgerEntry]:
        return [e for e in self.ledger.entries() if e.dataset_id in self.dataset_ids]

    # planning -----------------------------------------------------------------------

    def _plan_path(self, run_id: str) -> Path:
        name = run_id if _SAFE_RUN_ID.match(run_id) else hashlib.sha256(run_id.encode()).hexdigest()
        return self.state_dir / PLANS_DIR / f"{name}.json"

    def _stored_plan(self, run_id: str) -> RunPlan | None:
        path = self._plan_path(run_id)
        try:
            plan = RunPlan.from_dict(parse_json(path.read_bytes()))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise PlanConflict(
                f"{path}: the stored plan of run {run_id!r} is unreadable ({exc}); the site "
                "will not recalibrate an existing run. Remove the file only if that run never "
                "trained on this dataset."
            ) from exc
        if plan.run_id != run_id or plan.dataset_id not in self.dataset_ids:
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
        self,
        run_id: str,
        request: PrivacyRequest,
        sample_rate: float,
        steps_per_round: int,
        personalisation: Reservation | None = None,
        noise: str = "csprng",
    ) -> RunPlan:
        """Calibrate the run's noise once (or return its stored plan).

        Raises BudgetExhausted if no noise keeps every phase within its share of the run's
        limit and of what is left of the cap.
        """
        if steps_per_round < 1:
            raise ValueError(f"steps_per_round must be at least 1, got {steps_per_round}")
        with self.ledger.lock():
            stored = self._stored_plan(run_id)
            if stored is not None:
                if stored.settings != effective_settings(self.policy, request) or (
                    stored.sample_rate,
                    stored.steps_per_round,
                ) != (sample_rate, steps_per_round):
                    log.warning(
                        "run %s: request or data shape differs from the stored plan; "
                        "keeping the stored plan (noise %.4f)",
                        run_id,
                        stored.noise_multiplier,
                    )
                return stored
            plan = self._calibrate(
                run_id,
                effective_settings(self.policy, request),
                sample_rate,
                steps_per_round,
                personalisation if self.policy.evaluation == "dp" else None,
                noise,
            )
            path = self._plan_path(run_id)
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            record = {**plan.to_dict(), "created": datetime.now(UTC).isoformat()}
            write_atomic(path, json.dumps(record, indent=2).encode("utf-8"))
        settings = plan.settings
        log.info(
            "run %s on dataset %s: noise multiplier %.4f for %d rounds x %d steps at q=%g, %d DP release(s) at "
            "noise %.4f (run limit %.3f, spent %.3f of cap %.3f, %s)",
            run_id,
            self.dataset_id[:12],
            plan.noise_multiplier,
            settings.planned_rounds,
            steps_per_round,
            sample_rate,
            sum(plan.release_counts.values()),
            plan.release_noise_multiplier,
            settings.run_target_epsilon,
            plan.prior_epsilon,
            settings.cap_epsilon,
            settings.accountant,
        )
        return plan

    def _calibrate(
        self,
        run_id: str,
        settings: EffectiveSettings,
        sample_rate: float,
        steps_per_round: int,
        personalisation: Reservation | None,
        noise: str,
    ) -> RunPlan:
        """The plan's noise multipliers, phase by phase (rounds, releases, personalisation)."""
        counts = {
            EVALUATE: settings.evaluations,
            LOSS: settings.planned_rounds if settings.release_loss else 0,
            PERSONALISED_EVALUATE: 1 if personalisation else 0,
        }
        releases = sum(counts.values())
        release_share = settings.release_share if releases else 0.0
        personal_share = personalisation.fraction if personalisation else 0.0
        rounds_share = 1.0 - release_share - personal_share
        if rounds_share <= 0:
            raise BudgetExhausted(
                f"run {run_id}: the release share {release_share:g} and the personalisation fraction "
                f"{personal_share:g} leave nothing of the run's budget for training"
            )
        phases = [  # the rounds first: each phase's share is cumulative, and the first pays composition's fixed cost
            _Phase(sample_rate, steps_per_round * settings.planned_rounds, rounds_share),
            _Phase(1.0, releases, release_share),
            _Phase(personalisation.sample_rate, personalisation.steps, personal_share) if personalisation else None,
        ]
        prior = self.history()
        prior_epsilon = compose_epsilon(prior, settings.delta, settings.accountant)
        sigmas: list[float] = []
        planned: list[Step] = []
        cumulative = 0.0
        try:
            for phase in phases:
                if phase is None or phase.steps == 0:
                    sigmas.append(0.0)
                    continue
                cumulative += phase.share
                common = dict(
                    sample_rate=phase.sample_rate,
                    planned_steps=phase.steps,
                    delta=settings.delta,
                    accountant=settings.accountant,
                    min_noise=settings.min_noise_multiplier,
                )
                share = min(cumulative, 1.0)
                sigma = self.calibrations.noise_multiplier(
                    prior=planned, target_epsilon=share * settings.run_target_epsilon, **common
                )
                cap_target = prior_epsilon + share * (settings.cap_epsilon - prior_epsilon)
                whole = [*prior, *planned, Step(sigma, phase.sample_rate, phase.steps)]
                if not self._fits(whole, settings, cap_target):
                    # Only a dataset with earlier runs can need more noise for the cap than for the run's limit.
                    cap_sigma = self.calibrations.noise_multiplier(
                        prior=[*prior, *planned], target_epsilon=cap_target, **common
                    )
                    sigma = max(sigma, cap_sigma)
                sigmas.append(sigma)
                planned.append(Step(sigma, phase.sample_rate, phase.steps))
        except BudgetExhausted as exc:
            raise BudgetExhausted(f"dataset {self.dataset_id[:12]}...: run {run_id} cannot be planned: {exc}") from exc
        rounds_sigma, release_sigma, personal_sigma = sigmas
        return RunPlan(
            run_id=run_id,
            dataset_id=self.dataset_id,
            noise_multiplier=rounds_sigma,
            sample_rate=sample_rate,
            steps_per_round=steps_per_round,
            settings=settings,
            prior_epsilon=prior_epsilon,
            personalise_noise_multiplier=personal_sigma,
            personalise_sample_rate=personalisation.sample_rate if personalisation else 1.0,
            personalise_steps=personalisation.steps if personalisation else 0,
            personalise_fraction=personal_share,
            release_noise_multiplier=release_sigma,
            release_counts={kind: n for kind, n in counts.items() if n},
            noise=noise,
        )

    @staticmethod
    def _fits(history: list[Step], settings: EffectiveSettings, target: float) -> bool:
        try:
            return compose_epsilon(history, settings.delta, settings.accountant) <= target
        except AccountingError:
            return False

    # admission and spending ---------------------------------------------------------

    def _limits(self, plan: RunPlan) -> tuple[float, float, float, Accountant]:
        """Cap, run limit, delta and accountant: the stricter of the plan and today's policy."""
        return (
            min(plan.settings.cap_epsilon, self.policy.max_epsilon),
            min(plan.settings.run_target_epsilon, self.policy.run_limit),
            min(plan.settings.delta, self.policy.delta),
            self.policy.accountant,
        )

    def _check(self, plan: RunPlan, kind: str, server_round: int, step: Step) -> Admission:
        """The admission decision for one entry of ``kind``; the caller holds the ledger lock."""
        cap, run_limit, delta, accountant = self._limits(plan)
        entries = self._entries()
        history = [e.to_step() for e in entries]
        spent = compose_epsilon(history, delta, accountant)
        this_run = [e for e in entries if e.run_id == plan.run_id]
        same_kind = [e for e in this_run if e.kind == kind]
        what = "this round" if kind == TRAIN else f"this {kind}"
        reason = ""
        if plan.dataset_id not in self.dataset_ids:
            reason = f"plan of run {plan.run_id} is for another dataset"
        elif kind != PERSONALISE and any(e.server_round == server_round for e in same_kind):
            reason = (
                f"{kind} of round {server_round} of run {plan.run_id} was already recorded (replayed "
                "instruction); refusing to do it twice"
            )
        elif len(same_kind) >= plan.slots(kind):
            reason = (
                f"run {plan.run_id} already used its {plan.slots(kind)} planned {kind} slot(s) on this dataset"
                if plan.slots(kind)
                else f"run {plan.run_id} planned no {kind} on this dataset"
            ) + _lowered_by_policy(plan, kind)
        if reason:
            return Admission(False, reason, spent, math.nan, cap)
        projected = compose_epsilon([*history, step], delta, accountant)
        if projected > cap:
            return Admission(
                False,
                f"privacy budget exhausted: {what} would bring the dataset to epsilon {projected:.4f}, over the "
                f"site's cap of {cap:.4f} (already spent {spent:.4f}, {accountant}, delta={delta:g})",
                spent,
                projected,
                cap,
            )
        run_total = compose_epsilon([*(e.to_step() for e in this_run), step], delta, accountant)
        if run_total > run_limit + _LIMIT_SLACK:
            return Admission(
                False,
                f"{what} would bring run {plan.run_id} to epsilon {run_total:.4f}, over its limit of {run_limit:.4f}",
                spent,
                projected,
                cap,
            )
        return Admission(True, "within budget", spent, projected, cap)

    def admit(self, plan: RunPlan, server_round: int, kind: str = TRAIN) -> Admission:
        """Would one entry of ``kind`` at the planned steps be admitted? Never raises for a refusal."""
        with self.ledger.lock():
            return self._check(plan, kind, server_round, plan.step(kind))

    @contextmanager
    def spend(self, plan: RunPlan, kind: str, server_round: int) -> Iterator[Callable[[int, str], LedgerEntry]]:
        """Hold the ledger lock while the caller trains or releases; yields ``record(steps, fingerprint)``.

        Raises BudgetExhausted on entry if the spend is not admitted. ``record`` appends it
        durably at the steps actually taken (never more than planned; 1 for a release), or
        raises BudgetExhausted / LedgerError and writes nothing; it may be called once. Send
        or report what the spend produced only after it returned.
        """
        with self.ledger.lock():
            admission = self._check(plan, kind, server_round, plan.step(kind))
            if not admission.admitted:
                raise BudgetExhausted(admission.reason)
            yield self._recorder(plan, kind, server_round)

    def spent(self) -> float:
        """Epsilon spent on this dataset so far (policy accountant and delta)."""
        return compose_epsilon(self.history(), self.policy.delta, self.policy.accountant)

    def _recorder(self, plan: RunPlan, kind: str, server_round: int) -> Callable[[int, str], LedgerEntry]:
        """``record(steps, fingerprint)`` for one admitted spend; the caller holds the ledger lock."""
        recorded: list[LedgerEntry] = []
        planned = plan.step(kind)
        what = f"{kind} of round {server_round}"

        def record(steps_taken: int, fingerprint: str) -> LedgerEntry:
            if recorded:
                raise RuntimeError(f"{what} of run {plan.run_id} is already recorded")
            if isinstance(steps_taken, bool) or not isinstance(steps_taken, int) or steps_taken < 1:
                raise ValueError(f"steps_taken must be a positive integer, got {steps_taken!r}")
            if steps_taken > planned.steps:
                raise BudgetExhausted(
                    f"{what} took {steps_taken} steps but run {plan.run_id} was calibrated for {planned.steps}; "
                    "not recorded, nothing is sent"
                )
            cap, _, delta, accountant = self._limits(plan)
            step = plan.step(kind, steps_taken)
            history = [*self.history(), step]
            epsilon = compose_epsilon(history, delta, accountant)
            if epsilon > cap:
                raise BudgetExhausted(
                    f"recording {what} would bring the dataset to epsilon {epsilon:.4f}, over the cap "
                    f"of {cap:.4f}; not recorded, nothing is sent"
                )
            try:
                ref_name, ref_epsilon = reference_epsilon(history, delta, accountant)
            except AccountingError as exc:
                # The reference column is informational; the cap was checked above.
                log.warning("reference epsilon unavailable: %s", exc)
                ref_name, ref_epsilon = f"{'rdp' if accountant == 'prv' else 'prv'}-unavailable", -1.0
            entry = self.ledger.append(
                dataset_id=self.dataset_id,
                run_id=plan.run_id,
                server_round=server_round,
                noise_multiplier=step.noise_multiplier,
                sample_rate=step.sample_rate,
                steps=step.steps,
                max_grad_norm=plan.settings.max_grad_norm
                if kind in (TRAIN, PERSONALISE)
                else release_sensitivity(kind),
                delta=delta,
                epsilon=epsilon,
                accountant=accountant,
                reference_epsilon=ref_epsilon,
                reference_accountant=ref_name,
                model_fingerprint=fingerprint,
                kind=kind,
                noise=plan.noise,
            )
            recorded.append(entry)
            return entry

        return record
