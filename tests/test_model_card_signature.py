"""The base model's card is covered by the coordinator's signature (security review finding 7).

A relay that rewrites the card (class names, preprocessing, architecture arguments) is refused
before the site uses anything in it, and a card whose architecture arguments do not fit the
weights is refused without building the model for real.
"""

from __future__ import annotations

import json

import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict

from client.model_state import STATE_CARD, BaseModelMismatch, adopt_base, round_model
from common.model.checkpoint import card_digest, make_card
from common.model.transfer import TransferPolicy, state_fingerprint
from common.model.zoo import build_model
from common.protocol import ARRAYS, BASE_CARD, BASE_MODEL, RoundInstruction
from common.security.tensors import tensors_to_bytes


def _base():
    model = build_model("mlp", (30,), 2, {"hidden": [8]})
    card = make_card(
        model,
        tensors_to_bytes(model.state_dict()),
        arch="mlp",
        arch_args={"hidden": [8]},
        input_shape=[30],
        class_names=["benign", "malignant"],
        source_description="test source",
        preprocessing="z-score with the source's mean and spread",
        default_transfer_policy="head",
    )
    return model, card


def _instruction(model, card_json: str) -> RoundInstruction:
    transfer = TransferPolicy.parse("head")
    return RoundInstruction(
        server_round=1,
        rounds=1,
        transfer_policy="head",
        base_fingerprint=state_fingerprint(model.state_dict()),
        base_card_sha256=card_digest(card_json),
        frozen_fingerprint=state_fingerprint(transfer.frozen_state(model)),
        local_epochs=1,
        batch_size=8,
        lr=0.05,
        optimizer="sgd",
        proximal_mu=0.0,
        seed=1,
        personalise_epochs=0,
        dp=1,
        run_id="r" * 32,
    )


def _first_contact(model, card_json: str) -> RecordDict:
    trainable = TransferPolicy.parse("head").trainable_state(model)
    return RecordDict(
        {
            BASE_MODEL: ArrayRecord(model.state_dict()),
            BASE_CARD: ConfigRecord({"json": card_json}),
            ARRAYS: ArrayRecord(trainable),
        }
    )


def _context() -> Context:
    return Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})


def test_the_signed_card_is_adopted_and_used_each_round() -> None:
    model, card = _base()
    sent = card.to_json()
    context = _context()
    instruction = _instruction(model, sent)
    adopt_base(_first_contact(model, sent), context, instruction)
    _, used, _ = round_model(_first_contact(model, sent), context, instruction)
    assert used.class_names == ["benign", "malignant"]


@pytest.mark.parametrize(
    "field, value",
    [("class_names", ["malignant", "benign"]), ("preprocessing", "none"), ("arch_args", {"hidden": [9]})],
)
def test_a_card_rewritten_on_the_way_is_refused_before_use(field, value) -> None:
    model, card = _base()
    signed = card.to_json()
    rewritten = json.loads(signed)
    rewritten[field] = value
    context = _context()
    with pytest.raises(BaseModelMismatch, match="card was changed on the way"):
        adopt_base(_first_contact(model, json.dumps(rewritten)), context, _instruction(model, signed))
    assert STATE_CARD not in context.state


def test_a_stored_card_changed_between_rounds_is_refused() -> None:
    model, card = _base()
    signed = card.to_json()
    context = _context()
    instruction = _instruction(model, signed)
    adopt_base(_first_contact(model, signed), context, instruction)
    rewritten = json.loads(signed)
    rewritten["class_names"] = ["malignant", "benign"]
    context.state[STATE_CARD] = ConfigRecord({"json": json.dumps(rewritten)})
    with pytest.raises(BaseModelMismatch, match="card was changed on the way"):
        round_model(_first_contact(model, signed), context, instruction)


def test_architecture_arguments_that_do_not_fit_the_weights_allocate_nothing() -> None:
    """Even a signed card (a faulty coordinator) with huge arch_args is refused on the meta device.

    Built for real, two hidden layers of 2**20 units need 4 TiB; the refusal must come from the shape
    check, not from the allocator.
    """
    model, card = _base()
    huge = json.loads(card.to_json())
    huge["arch_args"] = {"hidden": [2**20, 2**20]}
    sent = json.dumps(huge)
    context = _context()
    with pytest.raises(BaseModelMismatch, match="does not fit the architecture"):
        adopt_base(_first_contact(model, sent), context, _instruction(model, sent))
    assert STATE_CARD not in context.state
