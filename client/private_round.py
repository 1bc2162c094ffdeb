"""One training round at a site, under the site's own privacy policy and budget.

Order of events: read the site's policy, take the stricter of policy and request,
calibrate the noise once per run, ask the budget guard for admission, train with
DP-SGD while holding the ledger lock, record the spend durably, and only then return
the update to be sealed and sent. A round that would exceed the cap is declined.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from client.budget import BudgetGuard
from client.dp_training import dp_train, sample_rate_and_steps
from client.fine_tune import fine_tune
from client.local_data import Features
from common.accounting import BudgetExhausted
from common.ledger import NON_PRIVATE_DIR, write_atomic
from common.models import FedModel
from common.protocol import STATUS_DECLINED, STATUS_OK
from common.site_config import SiteConfig
from common.site_policy import PrivacyRequest, SitePolicy, load_policy
from common.training import TrainConfig
from common.transfer import TransferPolicy, state_fingerprint

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
) -> RoundOutcome:
    """Fine-tune ``model`` in place under the site's policy; the spend is on disk before this returns."""
    site_policy = load_policy(site.policy_path)
    if not dp_requested and site_policy.allow_non_private:
        return _train_without_dp(site, dataset_id, model, policy, features, config)
    overridden = () if dp_requested else ("dp",)
    if _non_private_marker(site, dataset_id).exists():
        return _declined("this dataset was once trained without DP at this site; no DP guarantee can be given for it", {})
    request = PrivacyRequest.from_config(request_config)
    guard = BudgetGuard(site.state_dir, site_policy, dataset_id)
    sample_rate, steps = sample_rate_and_steps(len(features.train_y), config.batch_size, config.epochs)
    try:
        plan = guard.plan_run(run_key, request, sample_rate, steps)
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
