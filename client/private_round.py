"""What a site does for one instruction, under its own privacy policy and budget.

Training: take the stricter of policy and request, plan the run once (every DP-SGD round
and DP release it may make), admit the round under the ledger lock, train with DP-SGD,
record the spend durably, and only then hand back the update. Evaluation: release a noisy
histogram of the test predictions through the Gaussian mechanism, recorded in the ledger
first; a run that reserved a private personalisation also fine-tunes the bias of a copy's
head with DP-SGD after its last round and releases that copy's histogram the same way.

Each operation returns an :class:`Outcome`: the values that leave, each declared with
its egress kind (:mod:`common.privacy.egress`), and the privacy report's public fields.
Nothing computed from the site's records leaves in any other form.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from client.budget import BudgetGuard, PlanConflict, Reservation, RunPlan
from client.dp_training import dp_train, sample_rate_and_steps
from client.fine_tune import evaluation_histogram, fine_tune, personalised_copy
from client.local_data import Features
from client.model_state import finite_trainable_state
from client.session import DatasetIdentity, SiteSession
from common.io import write_atomic
from common.model.training import TrainConfig, compute_features
from common.model.transfer import TransferPolicy, state_fingerprint
from common.model.zoo import FedModel
from common.privacy.accounting import BudgetExhausted
from common.privacy.egress import NOT_PRIVATE, PUBLIC, RELEASE, UPDATE, declaration
from common.privacy.ledger import (
    EVALUATE,
    LOSS,
    NON_PRIVATE_DIR,
    PERSONALISE,
    PERSONALISED_EVALUATE,
    TRAIN,
    LedgerEntry,
)
from common.privacy.noise import RandomSource, SecureRandom, SeededRandom
from common.privacy.policy import PrivacyRequest
from common.privacy.releases import noisy_counts, noisy_mean_loss
from common.protocol import STATUS_DECLINED, STATUS_OK, RoundInstruction

log = logging.getLogger(__name__)

MAX_USEFUL_NOISE = 20.0  # above this noise multiplier an update is noise, not signal: decline instead


@dataclass
class Outcome:
    """What the site did for one instruction, before the reply is signed and sealed."""

    status: str
    reason: str = ""
    values: dict[str, Any] = field(default_factory=dict)
    egress: dict[str, str] = field(default_factory=dict)
    releases: dict[str, int] = field(default_factory=dict)
    spends: list[LedgerEntry] = field(default_factory=list)
    privacy: dict[str, Any] = field(default_factory=dict)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    def public(self, name: str, value: Any, detail: str) -> None:
        self.values[name] = value
        self.egress[name] = declaration(PUBLIC, detail)

    def released(self, name: str, value: Any, entry: LedgerEntry) -> None:
        """A DP release, already recorded in the ledger as ``entry``."""
        self.spends.append(entry)
        self.values[name] = value
        self.egress[name] = declaration(
            RELEASE,
            f"Gaussian mechanism, noise multiplier {entry.noise_multiplier:.4g}, sensitivity "
            f"{entry.max_grad_norm:g}, ledger entry {entry.index}",
        )
        self.releases[name] = entry.index

    def report(self) -> dict[str, Any]:
        """The privacy report's fields this outcome contributes (the channel adds phase, status and egress)."""
        report = dict(self.privacy)
        if self.spends:
            report["spends"] = [spend_summary(e) for e in self.spends]
            report["releases"] = dict(self.releases)
        return report


def spend_summary(entry: LedgerEntry) -> dict[str, Any]:
    """What a report says of one ledger entry: enough to find it in the ledger and to recompute its epsilon."""
    return {
        "kind": entry.kind,
        "ledger-index": entry.index,
        "ledger-hash": entry.hash,
        "noise-multiplier": entry.noise_multiplier,
        "sample-rate": entry.sample_rate,
        "steps": entry.steps,
        "clip": entry.max_grad_norm,
    }


def _declined(reason: str, privacy: dict[str, Any]) -> Outcome:
    log.warning("declining: %s", reason)
    return Outcome(STATUS_DECLINED, reason, privacy=privacy)


def random_source(session: SiteSession, instruction: RoundInstruction, phase: str) -> RandomSource:
    """The OS's CSPRNG; a seeded generator only if the run asks for reproducible noise and the policy allows it."""
    if instruction.reproducible_noise and session.policy.allow_reproducible_noise:
        text = f"{instruction.seed}|{session.site_id}|{instruction.server_round}|{phase}"
        return SeededRandom(int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") >> 1)
    return SecureRandom()


def _overridden(session: SiteSession, instruction: RoundInstruction, dp_honoured: bool) -> list[str]:
    extra = [] if dp_honoured else ["dp"]
    if instruction.reproducible_noise and not session.policy.allow_reproducible_noise:
        extra.append("reproducible_noise")
    return extra


def _non_private_marker(session: SiteSession, dataset: DatasetIdentity):
    markers = session.config.state_dir / NON_PRIVATE_DIR
    return [markers / dataset_id for dataset_id in (dataset.keyed, *dataset.aliases)]


def _once_non_private(session: SiteSession, dataset: DatasetIdentity) -> bool:
    return any(marker.exists() for marker in _non_private_marker(session, dataset))


def _guard(session: SiteSession, dataset: DatasetIdentity) -> BudgetGuard:
    return BudgetGuard(session.config.state_dir, session.policy, dataset.keyed, session.identity, dataset.aliases)


def _budget(session: SiteSession, dataset: DatasetIdentity, guard: BudgetGuard | None) -> dict[str, Any]:
    """The public budget summary a decline reports."""
    summary: dict[str, Any] = {
        "dp": True,
        "dataset-id": dataset.keyed,
        "delta": session.policy.delta,
        "accountant": session.policy.accountant,
        "cap-epsilon": session.policy.max_epsilon,
    }
    if guard is not None:
        summary["epsilon"] = guard.spent()
    return summary


def _entry_report(entry: LedgerEntry, plan: RunPlan, session: SiteSession, overridden: list[str]) -> dict[str, Any]:
    """The report's public fields after ``entry``, the last spend of the reply."""
    return {
        "dp": True,
        "dataset-id": entry.dataset_id,
        "epsilon": entry.epsilon,
        "delta": entry.delta,
        "accountant": entry.accountant,
        "reference-epsilon": entry.reference_epsilon,
        "reference-accountant": entry.reference_accountant,
        "cap-epsilon": plan.settings.cap_epsilon,
        "run-target-epsilon": plan.settings.run_target_epsilon,
        "overridden": [*overridden, *plan.settings.overridden],
        "noise": entry.noise,
        "declared-size": session.policy.declared_size,
    }


def personalisation_reservation(instruction: RoundInstruction, declared_size: int) -> Reservation | None:
    """The private personalisation a private run reserves: ``personalise-epochs`` full-batch DP-SGD
    steps (sample rate 1) on the head's bias with ``personalise-fraction`` of the run's budget."""
    if not instruction.dp or instruction.personalise_fraction <= 0 or instruction.personalise_epochs < 1:
        return None
    sample_rate, steps = sample_rate_and_steps(declared_size, declared_size, instruction.personalise_epochs)
    return Reservation(instruction.personalise_fraction, sample_rate, steps)


def _declared_size(session: SiteSession) -> int:
    size = session.policy.declared_size
    if size is None:
        raise PlanConflict(
            f"{session.config.policy_path}: [privacy] declared_size is missing. Declare the public, rounded "
            "number of training records (for example to the nearest 50): the coordinator weights this site "
            "by it and the DP sample rate is set from it, so the exact count never leaves"
        )
    enrolled = session.manifest.declared_size(session.site_id)
    if enrolled is not None and enrolled != size:
        raise PlanConflict(
            f"{session.config.policy_path}: declared_size {size} differs from the size {enrolled} this site "
            "enrolled with (the federation manifest); the coordinator would drop every update. Enrol the new size "
            "with the coordinator (fedtransfer keys enrol) or restore the old declaration"
        )
    return size


def train_round(
    session: SiteSession,
    dataset: DatasetIdentity,
    model: FedModel,
    transfer: TransferPolicy,
    features: Features,
    config: TrainConfig,
    instruction: RoundInstruction,
    request_config: dict[str, Any],
) -> Outcome:
    """Fine-tune ``model`` in place under the site's policy; the spend is on disk before this returns."""
    declared = _declared_size(session)
    if abs(len(features.train_y) - declared) > declared:
        log.warning(
            "site %s: %d training records, far from the declared size %d; update declared_size in %s",
            session.site_id,
            len(features.train_y),
            declared,
            session.config.policy_path,
        )
    if not instruction.dp and session.policy.allow_non_private:
        return _train_without_dp(session, dataset, model, transfer, features, config, declared)
    overridden = _overridden(session, instruction, dp_honoured=bool(instruction.dp))
    if _once_non_private(session, dataset):
        return _declined(
            "this dataset was once trained without DP at this site; no DP guarantee can be given for it",
            _budget(session, dataset, None),
        )
    guard = _guard(session, dataset)
    request = PrivacyRequest.from_config(request_config)
    sample_rate, steps = sample_rate_and_steps(declared, config.batch_size, config.epochs, config.steps)
    source = random_source(session, instruction, "train")
    try:
        plan = guard.plan_run(
            instruction.run_id,
            request,
            sample_rate,
            steps,
            personalisation_reservation(instruction, declared),
            noise=source.kind,
        )
    except BudgetExhausted as err:
        return _declined(str(err), _budget(session, dataset, guard))
    if plan.noise_multiplier > MAX_USEFUL_NOISE:
        return _declined(
            f"the budget left ({plan.settings.cap_epsilon - plan.prior_epsilon:.3g} of cap "
            f"{plan.settings.cap_epsilon:g}) "
            f"only allows noise multiplier {plan.noise_multiplier:.3g} for this run, which would drown the update",
            _budget(session, dataset, guard),
        )
    _, trainable = transfer.split(model)
    try:  # spend() admits the round under the ledger lock, or raises BudgetExhausted
        with guard.spend(plan, TRAIN, instruction.server_round) as record:
            stats = dp_train(
                trainable,
                features.train_x,
                features.train_y,
                config,
                noise_multiplier=plan.noise_multiplier,
                max_grad_norm=plan.settings.max_grad_norm,
                sample_rate=plan.sample_rate,
                steps=plan.steps_per_round,
                expected_batch_size=plan.sample_rate * declared,
                source=source,
            )
            entry = record(stats.steps, state_fingerprint(transfer.trainable_state(model)))
    except BudgetExhausted as err:
        return _declined(str(err), _budget(session, dataset, guard))
    log.info(
        "site %s round %d: epsilon %.3f of cap %.3f (delta %g, %s); local mean loss %.4f (kept at the site)",
        session.site_id,
        instruction.server_round,
        entry.epsilon,
        plan.settings.cap_epsilon,
        entry.delta,
        entry.accountant,
        stats.mean_loss,
    )
    outcome = Outcome(
        STATUS_OK,
        spends=[entry],
        privacy=_entry_report(entry, plan, session, overridden) | {"grad-sample-mode": stats.grad_sample_mode},
    )
    outcome.tensors = finite_trainable_state(model, transfer)
    outcome.egress["update"] = declaration(
        UPDATE,
        f"DP-SGD: noise multiplier {entry.noise_multiplier:.4g}, clipping {entry.max_grad_norm:g}, "
        f"{entry.steps} steps at sample rate {entry.sample_rate:.4g}, ledger entry {entry.index}",
    )
    outcome.public("num-examples", declared, "declared size (site policy declared_size)")
    outcome.public("steps", stats.steps, "planned DP-SGD steps (instruction and declared size)")
    if plan.settings.release_loss:
        _release_loss(guard, plan, instruction, trainable, features, declared, source, outcome)
    return outcome


def _release_loss(
    guard: BudgetGuard,
    plan: RunPlan,
    instruction: RoundInstruction,
    trainable: nn.Module,
    features: Features,
    declared: int,
    source: RandomSource,
    outcome: Outcome,
) -> None:
    """A DP training loss after the round, recorded in the ledger before it joins the reply."""
    with torch.no_grad():
        trainable.eval()
        losses = nn.functional.cross_entropy(trainable(features.train_x), features.train_y, reduction="none")
    try:
        with guard.spend(plan, LOSS, instruction.server_round) as record:
            value = noisy_mean_loss(losses, declared, plan.release_noise_multiplier, source)
            entry = record(1, hashlib.sha256(repr(value).encode()).hexdigest())
    except BudgetExhausted as err:
        log.warning("no DP training loss this round: %s", err)
        return
    outcome.released("train-loss", value, entry)
    outcome.privacy["epsilon"] = entry.epsilon
    outcome.privacy["reference-epsilon"] = entry.reference_epsilon


def _train_without_dp(
    session: SiteSession,
    dataset: DatasetIdentity,
    model: FedModel,
    transfer: TransferPolicy,
    features: Features,
    config: TrainConfig,
    declared: int,
) -> Outcome:
    for marker in _non_private_marker(session, dataset)[:1]:
        marker.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(marker, b"trained without differential privacy: this dataset has no DP guarantee\n")
    stats = fine_tune(model, transfer, features, config)
    log.warning("site %s trained WITHOUT differential privacy (its policy allows it)", session.site_id)
    outcome = Outcome(STATUS_OK, privacy={"dp": False, "dataset-id": dataset.keyed, "declared-size": declared})
    outcome.tensors = finite_trainable_state(model, transfer)
    outcome.egress["update"] = declaration(
        NOT_PRIVATE, "plain SGD without DP (the site's policy allows non-private runs)"
    )
    outcome.public("num-examples", declared, "declared size (site policy declared_size)")
    outcome.public("steps", stats.steps, "plain SGD steps")
    return outcome


def evaluate_round(
    session: SiteSession,
    dataset: DatasetIdentity,
    model: FedModel,
    transfer: TransferPolicy,
    features: Features,
    instruction: RoundInstruction,
    personalise: TrainConfig | None,
) -> Outcome:
    """The federated evaluation of one round (a DP release), and after the last round the private personalisation."""
    if session.policy.evaluation == "none":
        return _declined(
            f'site policy {session.config.policy_path.name}: evaluation = "none" (no federated '
            "evaluation at this site)",
            _budget(session, dataset, None),
        )
    declared = _declared_size(session)
    if _once_non_private(session, dataset):
        if instruction.dp or not session.policy.allow_non_private:
            return _declined(
                "this dataset was once trained without DP at this site; nothing about it is released",
                _budget(session, dataset, None),
            )
        return _evaluate_without_dp(dataset, model, transfer, features, declared, personalise)
    guard = _guard(session, dataset)
    try:
        plan = guard.stored_plan(instruction.run_id)
    except PlanConflict as err:
        return _declined(str(err), _budget(session, dataset, guard))
    if plan is None:
        return _declined(
            f"run {instruction.run_id} has no plan at this site (it trained no round), so nothing "
            "about its data is released",
            _budget(session, dataset, guard),
        )
    source = random_source(session, instruction, "evaluate")
    outcome = Outcome(STATUS_OK)
    last: LedgerEntry | None = None
    if plan.slots(EVALUATE):
        last = (
            _release_histogram(
                guard,
                plan,
                EVALUATE,
                instruction.server_round,
                model,
                transfer,
                features,
                source,
                "eval-counts",
                outcome,
            )
            or last
        )
    if personalise is not None and plan.personalisation is not None:
        copy_ = _personalise(guard, plan, session, model, transfer, features, personalise, instruction, source, outcome)
        if copy_ is not None:
            last = (
                _release_histogram(
                    guard,
                    plan,
                    PERSONALISED_EVALUATE,
                    instruction.server_round,
                    copy_,
                    transfer,
                    features,
                    source,
                    "personalised-eval-counts",
                    outcome,
                )
                or last
            )
    if last is None:
        return _declined(
            outcome.reason or f"run {instruction.run_id} has no DP evaluation left at this site",
            _budget(session, dataset, guard),
        )
    outcome.public("num-examples", declared, "declared size (site policy declared_size)")
    outcome.privacy = _entry_report(
        max(outcome.spends, key=lambda e: e.index), plan, session, _overridden(session, instruction, True)
    )
    return outcome


def _release_histogram(
    guard: BudgetGuard,
    plan: RunPlan,
    kind: str,
    server_round: int,
    model: FedModel,
    transfer: TransferPolicy,
    features: Features,
    source: RandomSource,
    name: str,
    outcome: Outcome,
) -> LedgerEntry | None:
    counts = evaluation_histogram(model, transfer, features)
    try:
        with guard.spend(plan, kind, server_round) as record:
            value = noisy_counts(counts, plan.release_noise_multiplier, source)
            entry = record(1, state_fingerprint(transfer.trainable_state(model)))
    except BudgetExhausted as err:
        log.warning("no %s release: %s", kind, err)
        outcome.reason = str(err)
        return None
    outcome.released(name, value, entry)
    return entry


def _personalise(
    guard: BudgetGuard,
    plan: RunPlan,
    session: SiteSession,
    model: FedModel,
    transfer: TransferPolicy,
    features: Features,
    config: TrainConfig,
    instruction: RoundInstruction,
    source: RandomSource,
    outcome: Outcome,
) -> FedModel | None:
    """DP-SGD on the bias of a private copy's head, at the noise the run's plan reserved; None if refused."""
    step = plan.personalisation
    local = personalised_copy(model, bias_only=True)
    if step is None or local.head.bias is None:
        return None
    _, trainable = transfer.split(local)
    x = compute_features(trainable[:-1], features.train_x)
    try:
        with guard.spend(plan, PERSONALISE, instruction.server_round) as record:
            stats = dp_train(
                local.head,
                x,
                features.train_y,
                config,
                noise_multiplier=step.noise_multiplier,
                max_grad_norm=plan.settings.max_grad_norm,
                sample_rate=step.sample_rate,
                steps=step.steps,
                expected_batch_size=step.sample_rate * _declared_size(session),
                source=source,
            )
            entry = record(stats.steps, state_fingerprint({"head.bias": local.head.bias.detach()}))
    except BudgetExhausted as err:
        log.warning("site %s: no private personalisation: %s", session.site_id, err)
        return None
    outcome.spends.append(entry)
    log.info(
        "site %s personalised privately: epsilon %.3f of cap %.3f",
        session.site_id,
        entry.epsilon,
        plan.settings.cap_epsilon,
    )
    return local


def _evaluate_without_dp(
    dataset: DatasetIdentity,
    model: FedModel,
    transfer: TransferPolicy,
    features: Features,
    declared: int,
    personalise: TrainConfig | None,
) -> Outcome:
    """Exact histograms of a dataset that has no DP guarantee any more (a non-private run its policy allowed)."""
    outcome = Outcome(STATUS_OK, privacy={"dp": False, "dataset-id": dataset.keyed, "declared-size": declared})
    counts = {"eval-counts": evaluation_histogram(model, transfer, features)}
    if personalise is not None:
        local = personalised_copy(model, bias_only=False)
        fine_tune(local, transfer, features, personalise)
        counts["personalised-eval-counts"] = evaluation_histogram(local, transfer, features)
    for name, value in counts.items():
        outcome.values[name] = value.tolist()
        outcome.egress[name] = declaration(NOT_PRIVATE, "exact counts (the dataset was trained without DP)")
    outcome.public("num-examples", declared, "declared size (site policy declared_size)")
    return outcome
