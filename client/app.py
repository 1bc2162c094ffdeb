"""The fedtransfer ClientApp: a data site fine-tunes the shared model on its own data."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from client.channel import answer
from client.feature_cache import SPILL_DIR_NAME
from client.fine_tune import class_prior, train_config
from client.local_data import Features, frozen_features, load_local_data
from client.model_state import adopt_base, round_model
from client.private_round import Outcome, evaluate_round, train_round
from client.session import DatasetIdentity, SiteSession
from common.data.site_config import SIM_ROOT_ENV
from common.model.training import use_one_torch_thread
from common.model.transfer import TransferPolicy
from common.model.zoo import FedModel
from common.protocol import CONFIG, RoundInstruction

use_one_torch_thread()
app = ClientApp()


def _prepare(
    session: SiteSession, instruction: RoundInstruction, msg: Message, context: Context
) -> tuple[DatasetIdentity, FedModel, TransferPolicy, Features, tuple[float, ...]]:
    adopt_base(msg.content, context, instruction)
    model, card, transfer = round_model(msg.content, context, instruction)
    local = load_local_data(session.config, card)
    prior = class_prior(session.policy, card) if instruction.class_weights != "none" else ()
    features = frozen_features(local, model, transfer, session.config.state_dir / SPILL_DIR_NAME)
    return session.dataset(local.content_hash), model, transfer, features, prior


def _train(session: SiteSession, instruction: RoundInstruction, msg: Message, context: Context) -> Outcome:
    dataset, model, transfer, features, prior = _prepare(session, instruction, msg, context)
    return train_round(
        session,
        dataset,
        model,
        transfer,
        features,
        train_config(instruction, prior),
        instruction,
        dict(msg.content[CONFIG].items()),
    )


def _evaluate(session: SiteSession, instruction: RoundInstruction, msg: Message, context: Context) -> Outcome:
    dataset, model, transfer, features, prior = _prepare(session, instruction, msg, context)
    last = instruction.server_round == instruction.rounds and instruction.personalise_epochs > 0
    personalise = train_config(instruction, prior, instruction.personalise_epochs) if last else None
    return evaluate_round(session, dataset, model, transfer, features, instruction, personalise)


def _serve(bound: ClientApp, sim_root: Callable[[], str]) -> ClientApp:
    @bound.train()
    def train(msg: Message, context: Context) -> Message:
        return answer(msg, context, "train", _train, sim_root())

    @bound.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return answer(msg, context, "evaluate", _evaluate, sim_root())

    return bound


_serve(app, lambda: os.environ.get(SIM_ROOT_ENV, ""))


def make_client_app(sim_root: Path) -> ClientApp:
    """A ClientApp whose simulated nodes (identified by partition id) find their site folder under ``sim_root``."""
    root = str(Path(sim_root).resolve())
    return _serve(ClientApp(), lambda: root)
