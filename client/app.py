"""The fedtransfer ClientApp: a data site fine-tunes the shared model on its own data."""

from __future__ import annotations

import dataclasses
import json

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.fine_tune import evaluate as evaluate_model
from client.fine_tune import personalised_metrics, train_config
from client.private_round import personalisation_reservation, personalise_privately, train_round
from client.local_data import frozen_features, load_local_data
from client.secure_channel import secure_channel
from client.model_state import adopt_base, round_model, trainable_record
from client.site import resolve_site
from common.model.training import use_one_torch_thread
from common.data.site_config import SiteConfig
from common.privacy.policy import load_policy
from common.protocol import ARRAYS, CONFIG, METRICS, SITE, STATUS_OK, RoundInstruction, site_status

use_one_torch_thread()
app = ClientApp()


def _prepare(msg: Message, context: Context):
    instruction = RoundInstruction.from_config(msg.content[CONFIG])
    site = resolve_site(context.node_config, instruction.sim_root)
    adopt_base(msg.content, context, instruction)
    model, card, policy = round_model(msg.content, context, instruction)
    local = load_local_data(site, card)
    return instruction, site, local, model, policy, frozen_features(local, model, policy)


@app.train(mods=[secure_channel])
def train(msg: Message, context: Context) -> Message:
    instruction, site, local, model, policy, features = _prepare(msg, context)
    outcome = train_round(
        site,
        local.dataset_id,
        model,
        policy,
        features,
        train_config(instruction),
        dict(msg.content[CONFIG].items()),
        dp_requested=bool(instruction.dp),
        run_key=instruction.run_key,
        server_round=instruction.server_round,
        noise_seed=simulation_noise_seed(context, instruction),
        personalisation=personalisation_reservation(
            bool(instruction.dp), instruction.personalise_fraction, instruction.personalise_epochs, len(features.train_y)
        ),
    )
    examples = len(features.train_y) if outcome.status == STATUS_OK else 0
    content = RecordDict(
        {
            METRICS: MetricRecord({"num-examples": examples, "train-loss": outcome.mean_loss, "steps": outcome.steps}),
            SITE: ConfigRecord(site_status(site.site_id, outcome.status, outcome.reason) | {"privacy": json.dumps(outcome.privacy)}),
        }
    )
    if outcome.status == STATUS_OK:
        content[ARRAYS] = trainable_record(model, policy)
    return Message(content=content, reply_to=msg)


def simulation_noise_seed(context: Context, instruction: RoundInstruction) -> int | None:
    """Reproducible DP noise for a simulated site (one stream per site and round); None, so
    unpredictable noise from the OS, for a deployed site."""
    if "partition-id" not in context.node_config:
        return None
    return (instruction.seed * 1_000_003 + int(context.node_config["partition-id"])) * 10_007 + instruction.server_round


def _personalisation_round(instruction: RoundInstruction) -> bool:
    """Personalisation, when asked for, follows the evaluation of the last round."""
    return instruction.personalise_epochs > 0 and instruction.server_round == instruction.num_rounds


def personalise_now(instruction: RoundInstruction, site: SiteConfig) -> bool:
    """Personalise after the last round, and only in a non-private run the site's policy allows.

    A personalised head is trained on the site's records without DP; its test metrics would
    leave the site outside any DP guarantee, so a private run never computes them (it may
    personalise privately instead: :func:`personalise_privately_now`).
    """
    return _personalisation_round(instruction) and not instruction.dp and load_policy(site.policy_path).allow_non_private


def personalise_privately_now(instruction: RoundInstruction) -> bool:
    """After the last round of a private run that reserved a private personalisation
    (``personalise-fraction`` > 0): DP-SGD on the head's bias, spend recorded before the metrics leave."""
    return _personalisation_round(instruction) and bool(instruction.dp) and instruction.personalise_fraction > 0


def personalise_noise_seed(context: Context, instruction: RoundInstruction) -> int | None:
    """A simulated site's personalisation noise stream, apart from its training rounds' streams."""
    seed = simulation_noise_seed(context, instruction)
    return None if seed is None else seed + (1 << 50)


@app.evaluate(mods=[secure_channel])
def evaluate(msg: Message, context: Context) -> Message:
    instruction, site, local, model, policy, features = _prepare(msg, context)
    metrics = evaluate_model(model, policy, features)
    if personalise_now(instruction, site):
        metrics |= personalised_metrics(model, policy, features, train_config(instruction, instruction.personalise_epochs))
    elif personalise_privately_now(instruction):
        config = train_config(instruction, instruction.personalise_epochs)
        if instruction.personalise_lr > 0:
            config = dataclasses.replace(config, lr=instruction.personalise_lr)
        metrics |= personalise_privately(
            site, local.dataset_id, model, policy, features, config, instruction.run_key, instruction.server_round,
            personalise_noise_seed(context, instruction),
        )
    metrics["num-examples"] = len(features.test_y)
    content = RecordDict({METRICS: MetricRecord(metrics), SITE: ConfigRecord(site_status(site.site_id))})
    return Message(content=content, reply_to=msg)
