"""The fedtransfer ClientApp: a data site fine-tunes the shared model on its own data."""

from __future__ import annotations

import logging

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.fine_tune import evaluate as evaluate_model
from client.fine_tune import fine_tune, personalised_metrics, train_config
from client.local_data import frozen_features, load_local_data
from client.secure_channel import secure_channel
from client.model_state import adopt_base, round_model, trainable_record
from client.site import resolve_site
from common.training import use_one_torch_thread
from common.protocol import ARRAYS, CONFIG, METRICS, SITE, RoundInstruction, site_status

log = logging.getLogger(__name__)

use_one_torch_thread()
app = ClientApp()


def _prepare(msg: Message, context: Context):
    instruction = RoundInstruction.from_config(msg.content[CONFIG])
    site = resolve_site(context.node_config, instruction.sim_root)
    adopt_base(msg.content, context, instruction)
    model, card, policy = round_model(msg.content, context, instruction)
    local = load_local_data(site, card)
    return instruction, site, model, policy, frozen_features(local, model, policy)


@app.train(mods=[secure_channel])
def train(msg: Message, context: Context) -> Message:
    instruction, site, model, policy, features = _prepare(msg, context)
    stats = fine_tune(model, policy, features, train_config(instruction))
    log.info("site %s round %d: %d steps, mean loss %.4f", site.site_id, instruction.server_round, stats.steps, stats.mean_loss)
    content = RecordDict(
        {
            ARRAYS: trainable_record(model, policy),
            METRICS: MetricRecord({"num-examples": stats.examples, "train-loss": stats.mean_loss, "steps": stats.steps}),
            SITE: ConfigRecord(site_status(site.site_id)),
        }
    )
    return Message(content=content, reply_to=msg)


@app.evaluate(mods=[secure_channel])
def evaluate(msg: Message, context: Context) -> Message:
    instruction, site, model, policy, features = _prepare(msg, context)
    metrics = evaluate_model(model, policy, features)
    if instruction.personalise_epochs > 0 and instruction.server_round == instruction.num_rounds:
        metrics |= personalised_metrics(model, policy, features, train_config(instruction, instruction.personalise_epochs))
    metrics["num-examples"] = len(features.test_y)
    content = RecordDict({METRICS: MetricRecord(metrics), SITE: ConfigRecord(site_status(site.site_id))})
    return Message(content=content, reply_to=msg)
