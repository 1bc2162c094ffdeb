"""The site's copy of the base model, and the model each round trains or evaluates.

The full base model arrives once per run (first contact) and is kept in the run's
``context.state``; later messages carry only the trainable weights. Every message names
the base-model fingerprint and the frozen-part fingerprint, and the site checks both.
"""

from __future__ import annotations

import torch
from flwr.app import ConfigRecord, Context, RecordDict

from common.errors import SecurityError
from common.model.checkpoint import ArchitectureMismatch, ModelCard, card_digest, check_state_matches
from common.model.transfer import TransferPolicy, state_fingerprint
from common.model.zoo import FedModel
from common.protocol import ARRAYS, BASE_CARD, BASE_MODEL, RoundInstruction

STATE_BASE = "fedtransfer-base-model"
STATE_CARD = "fedtransfer-base-card"


class ModelStateError(SecurityError):
    """The model the coordinator sent cannot be used at this site."""


class BaseModelMissing(ModelStateError):
    pass


class BaseModelMismatch(ModelStateError):
    pass


class TrainableArraysInvalid(ModelStateError):
    pass


def adopt_base(content: RecordDict, context: Context, instruction: RoundInstruction) -> None:
    """Keep the base model sent on first contact, after checking it against the signed instruction.

    The card's text must hash to the signed ``base-card-sha256`` before anything in it is used, and
    the weights must fit the card's architecture built on the meta device, so no allocation follows
    from arguments that were not checked first.
    """
    if BASE_MODEL not in content:
        return
    card_json = str(content[BASE_CARD]["json"])
    card = _signed_card(card_json, instruction, origin="base model card from the coordinator")
    state = content[BASE_MODEL].to_torch_state_dict()
    fingerprint = state_fingerprint(state)
    if fingerprint != instruction.base_fingerprint or fingerprint != card.model_fingerprint:
        raise BaseModelMismatch(
            f"the base model received has fingerprint {fingerprint[:16]}..., but the instruction names "
            f"{instruction.base_fingerprint[:16]}... and its card {card.model_fingerprint[:16]}...: refusing it"
        )
    try:
        with torch.device("meta"):
            skeleton = card.build()
        check_state_matches(skeleton, state, origin="base model from the coordinator")
    except ArchitectureMismatch as err:
        raise BaseModelMismatch(str(err)) from err
    context.state[STATE_BASE] = content[BASE_MODEL]
    context.state[STATE_CARD] = ConfigRecord({"json": card_json})


def round_model(
    content: RecordDict, context: Context, instruction: RoundInstruction
) -> tuple[FedModel, ModelCard, TransferPolicy]:
    """The base model with this round's trainable weights loaded, checked on the way."""
    if STATE_BASE not in context.state:
        raise BaseModelMissing("this site holds no base model for this run; the coordinator must send it first")
    card = _signed_card(str(context.state[STATE_CARD]["json"]), instruction, origin="stored base model card")
    base_state = context.state[STATE_BASE].to_torch_state_dict()
    if card.model_fingerprint != instruction.base_fingerprint:
        raise BaseModelMismatch(
            f"the coordinator names base model {instruction.base_fingerprint[:16]}..., "
            f"this site holds {card.model_fingerprint[:16]}..."
        )
    model = card.build()
    model.load_state_dict(base_state, strict=True)
    transfer = TransferPolicy.parse(instruction.transfer_policy)
    frozen = state_fingerprint(transfer.frozen_state(model))
    if frozen != instruction.frozen_fingerprint:
        raise BaseModelMismatch(
            f"frozen-part fingerprint {frozen[:16]}... differs from the coordinator's "
            f"{instruction.frozen_fingerprint[:16]}... for transfer policy {transfer}"
        )
    trainable = content[ARRAYS].to_torch_state_dict()
    check_trainable(model, transfer, trainable)
    model.load_state_dict(trainable, strict=False)
    transfer.apply(model)
    return model, card, transfer


def _signed_card(card_json: str, instruction: RoundInstruction, origin: str) -> ModelCard:
    """The card, once its text matches the sha256 the coordinator signed in ``instruction``."""
    digest = card_digest(card_json)
    if digest != instruction.base_card_sha256:
        raise BaseModelMismatch(
            f"{origin} has sha256 {digest[:16]}..., but the signed instruction names "
            f"{instruction.base_card_sha256[:16]}...: the card was changed on the way; refusing it"
        )
    return ModelCard.from_json(card_json, origin=origin)


def check_trainable(model: FedModel, transfer: TransferPolicy, trainable: dict[str, torch.Tensor]) -> None:
    expected = transfer.trainable_state(model)
    if set(trainable) != set(expected):
        raise TrainableArraysInvalid(
            f"trainable weights name {sorted(trainable)[:4]}..., transfer policy {transfer} needs "
            f"{sorted(expected)[:4]}..."
        )
    for name, tensor in trainable.items():
        if tensor.shape != expected[name].shape or tensor.dtype != expected[name].dtype:
            raise TrainableArraysInvalid(
                f"trainable weight {name!r} is {tuple(tensor.shape)} {tensor.dtype}, "
                f"expected {tuple(expected[name].shape)} {expected[name].dtype}"
            )
        if not bool(torch.isfinite(tensor).all()):
            raise TrainableArraysInvalid(f"trainable weight {name!r} holds NaN or Inf")


def finite_trainable_state(model: FedModel, transfer: TransferPolicy) -> dict[str, torch.Tensor]:
    """The trainable weights to send; TrainableArraysInvalid if training made any of them NaN or Inf."""
    state = transfer.trainable_state(model)
    if not all(bool(torch.isfinite(t).all()) for t in state.values()):
        raise TrainableArraysInvalid("training produced NaN or Inf weights; not sending them")
    return state
