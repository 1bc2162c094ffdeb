"""One training round at a site, under the site's own privacy policy and budget.

Order of events: read the site's policy, take the stricter of policy and request,
calibrate the noise once per run, ask the budget guard for admission, train with
DP-SGD while holding the ledger lock, record the spend durably, and only then return
the update to be sealed and sent. A round that would exceed the cap is declined.

A private run may also reserve a private personalisation (``personalise-fraction``):
after the last round the site fine-tunes the bias of its copy's head with DP-SGD, at the
noise its plan calibrated for it, records that spend in its ledger and only then
reports the personalised copy's metrics. The personalised weights never leave the site.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from client.budget import BudgetGuard, PlanConflict, Reservation
from client.dp_training import dp_train, sample_rate_and_steps
from client.fine_tune import evaluate, fine_tune
from client.local_data import Features
from common.privacy.accounting import BudgetExhausted
from common.privacy.ledger import NON_PRIVATE_DIR, write_atomic
from common.model.zoo import FedModel
from common.protocol import STATUS_DECLINED, STATUS_OK
from common.data.site_config import SiteConfig
from common.privacy.policy import PrivacyRequest, SitePolicy, load_policy
from common.model.training import TrainConfig, compute_features
from common.model.transfer import TransferPolicy, state_fingerprint

log = logging.getLogger(__name__)

MAX_USEFUL_NOISE = 20.0  # above this noise multiplier an update is noise, not signal: decline instead


@dataclass(frozen=True)
class RoundOutcome:
    """What the site did: ``ok`` (trained) or ``declined``, with its privacy report."""

    status: str
    reason: str
    steps: int
    mean_loss: float
    privacy: dict[str, Any] = field(default_factory=dict)


def _declined(reason: str, privacy: dict[str, Any]) -> RoundOutcome:
    log.warning("declining this round: %s", reason)
    return RoundOutcome(STATUS_DECLINED, reason, 0, math.nan, privacy)


def _non_private_marker(site: SiteConfig, dataset_id: str) -> Path:
    return site.state_dir / NON_PRIVATE_DIR / dataset_id


def train_round(
    site: SiteConfig,
    dataset_id: str,
    model: FedModel,
    policy: TransferPolicy,
    features: Features,
    config: TrainConfig,
    request_config: dict[str, Any],
    dp_requested: bool,
    run_key: str,
    server_round: int,
    noise_seed: int | None,
    personalisation: Reservation | None = None,
) -> RoundOutcome:
    """Fine-tune ``model`` in place under the site's policy; the spend is on disk before this returns.

    ``personalisation`` (private runs only) is reserved in the run's plan at its first round.
    """
    site_policy = load_policy(site.policy_path)
    if not dp_requested and site_policy.allow_non_private:
        return _train_without_dp(site, dataset_id, model, policy, features, config)
    overridden = () if dp_requested else ("dp",)
    if _non_private_marker(site, dataset_id).exists():
        return _declined("this dataset was once trained without DP at this site; no DP guarantee can be given for it", {})
    request = PrivacyRequest.from_config(request_config)
    guard = BudgetGuard(site.state_dir, site_policy, dataset_id)
    sample_rate, steps = sample_rate_and_steps(len(features.train_y), config.batch_size, config.epochs, config.steps)
    try:
        plan = guard.plan_run(run_key, request, sample_rate, steps, personalisation)
    except BudgetExhausted as err:
        return _declined(str(err), _budget(guard, site_policy))
    if plan.noise_multiplier > MAX_USEFUL_NOISE:
        return _declined(
            f"the budget left ({plan.settings.cap_epsilon - plan.prior_epsilon:.3g} of cap {plan.settings.cap_epsilon:g}) "
            f"only allows noise multiplier {plan.noise_multiplier:.3g} for this run, which would drown the update",
            _budget(guard, site_policy),
        )
    _, trainable = policy.split(model)
    try:  # spend() admits the round under the ledger lock, or raises BudgetExhausted
        with guard.spend(plan, server_round) as record:
            stats = dp_train(
                trainable,
                features.train_x,
                features.train_y,
                config,
                noise_multiplier=plan.noise_multiplier,
                max_grad_norm=plan.settings.max_grad_norm,
                prior=guard.ledger.history(dataset_id),
                accountant=plan.settings.accountant,
                noise_seed=noise_seed,
            )
            entry = record(stats.steps, state_fingerprint(policy.trainable_state(model)))
    except BudgetExhausted as err:
        return _declined(str(err), _budget(guard, site_policy))
    privacy = {
        "dp": True,
        "dataset-id": dataset_id,
        "epsilon": entry.epsilon,
        "delta": entry.delta,
        "accountant": entry.accountant,
        "reference-epsilon": entry.reference_epsilon,
        "reference-accountant": entry.reference_accountant,
        "cap-epsilon": plan.settings.cap_epsilon,
        "run-target-epsilon": plan.settings.run_target_epsilon,
        "noise-multiplier": entry.noise_multiplier,
        "sample-rate": entry.sample_rate,
        "steps": entry.steps,
        "max-grad-norm": entry.max_grad_norm,
        "ledger-index": entry.index,
        "ledger-hash": entry.hash,
        "overridden": [*overridden, *plan.settings.overridden],
    }
    log.info("site %s round %d: epsilon %.3f of cap %.3f (delta %g, %s)", site.site_id, server_round, entry.epsilon, plan.settings.cap_epsilon, entry.delta, entry.accountant)
    return RoundOutcome(STATUS_OK, "", stats.steps, stats.mean_loss, privacy)


def _budget(guard: BudgetGuard, site_policy: SitePolicy) -> dict[str, Any]:
    return {
        "dp": True,
        "dataset-id": guard.dataset_id,
        "epsilon": guard.spent(),
        "delta": site_policy.delta,
        "accountant": site_policy.accountant,
        "cap-epsilon": site_policy.max_epsilon,
    }


def _train_without_dp(site: SiteConfig, dataset_id: str, model: FedModel, policy: TransferPolicy, features: Features, config: TrainConfig) -> RoundOutcome:
    marker = _non_private_marker(site, dataset_id)
    marker.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(marker, b"trained without differential privacy: this dataset has no DP guarantee\n")
    stats = fine_tune(model, policy, features, config)
    log.warning("site %s trained WITHOUT differential privacy (its policy allows it)", site.site_id)
    return RoundOutcome(STATUS_OK, "", stats.steps, stats.mean_loss, {"dp": False, "dataset-id": dataset_id, "epsilon": math.inf})


def personalisation_reservation(dp: bool, fraction: float, epochs: int, examples: int) -> Reservation | None:
    """The private personalisation a private run reserves: ``epochs`` full-batch DP-SGD steps
    (sample rate 1) on the head's bias with ``fraction`` of the run's budget; None if not asked."""
    if not dp or fraction <= 0 or epochs < 1 or examples < 1:
        return None
    sample_rate, steps = sample_rate_and_steps(examples, examples, epochs)
    return Reservation(fraction, sample_rate, steps)


def personalise_privately(
    site: SiteConfig,
    dataset_id: str,
    model: FedModel,
    policy: TransferPolicy,
    features: Features,
    config: TrainConfig,
    run_key: str,
    server_round: int,
    noise_seed: int | None,
) -> dict[str, float]:
    """DP-SGD on the bias of a private copy's head, with the run's reserved personalisation.

    The spend is appended to the ledger (kind ``personalise``) before the copy is evaluated;
    returns its test metrics as ``p-*`` (and the dataset's epsilon after it as
    ``p-epsilon``), or {} if the run reserved none, already spent it, or the budget refuses.
    """
    site_policy = load_policy(site.policy_path)
    guard = BudgetGuard(site.state_dir, site_policy, dataset_id)
    try:
        plan = guard.stored_plan(run_key)
    except PlanConflict as err:
        log.warning("no private personalisation: %s", err)
        return {}
    step = plan.personalisation if plan is not None else None
    if plan is None or step is None or model.head.bias is None:
        log.warning("site %s: no private personalisation: run %s reserved no private personalisation in its plan "
                    "(or its model head has no bias)", site.site_id, run_key)
        return {}
    local = copy.deepcopy(model)
    _, trainable = policy.split(local)
    head = local.head
    body = trainable[:-1]
    for param in trainable.parameters():
        param.requires_grad_(False)
    head.bias.requires_grad_(True)
    x = compute_features(body, features.train_x)
    head_config = TrainConfig(
        epochs=step.steps, batch_size=max(len(features.train_y), 1), lr=config.lr, optimizer=config.optimizer, seed=config.seed,
    )
    try:
        with guard.spend_personalisation(plan, server_round) as record:
            stats = dp_train(
                head,
                x,
                features.train_y,
                head_config,
                noise_multiplier=step.noise_multiplier,
                max_grad_norm=plan.settings.max_grad_norm,
                prior=guard.ledger.history(dataset_id),
                accountant=plan.settings.accountant,
                noise_seed=noise_seed,
            )
            entry = record(stats.steps, state_fingerprint({"head.bias": head.bias.detach()}))
    except BudgetExhausted as err:
        log.warning("site %s: no private personalisation: %s", site.site_id, err)
        return {}
    log.info("site %s personalised privately: epsilon %.3f of cap %.3f", site.site_id, entry.epsilon, plan.settings.cap_epsilon)
    metrics = {f"p-{k}": v for k, v in evaluate(local, policy, features).items()}
    metrics["p-epsilon"] = entry.epsilon
    return metrics
