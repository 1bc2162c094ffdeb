"""Checkpoints: a safetensors weights file plus a JSON model card.

The card records the architecture and its arguments (for a pretrained family, the input
adaptation every site applies), input shape, class names, the sha256 of the weights file,
a fingerprint of the tensors, where the weights came from, their licence and pretraining
data, and their lineage. Loading checks the card against the weights and refuses anything
that does not match; it never unpickles.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from common.errors import ConfigurationError
from common.io import JsonError, parse_json, write_atomic
from common.model.transfer import state_fingerprint
from common.model.zoo import FedModel, UnknownArchitecture, build_model
from common.security.tensors import (
    TensorFormatError,
    tensors_from_bytes,
    tensors_to_bytes,
)

WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "model-card.json"
CARD_FORMAT = 1


class CheckpointError(ConfigurationError):
    """A checkpoint cannot be used; the message says which file and why."""


class CheckpointNotFound(CheckpointError):
    pass


class CardInvalid(CheckpointError):
    pass


class WeightsHashMismatch(CheckpointError):
    pass


class CorruptWeights(CheckpointError):
    pass


class ArchitectureMismatch(CheckpointError):
    pass


@dataclass(frozen=True)
class ModelCard:
    """What a set of weights is, where it came from, and how to check it."""

    arch: str
    arch_args: dict[str, Any]
    input_shape: list[int]
    class_names: list[str]
    weights_sha256: str
    model_fingerprint: str
    source_description: str
    preprocessing: str = ""
    feature_names: list[str] | None = None
    default_transfer_policy: str = "full"
    #: Class shares of the source training labels (public): the prior of class-weighted fine-tuning.
    class_prior: list[float] | None = None
    #: The licence of the weights (and of the data they were pretrained on, where it binds them).
    licence: str = ""
    #: What the weights were pretrained on, for a reader of the card (e.g. "ImageNet-1k", a source hospital).
    pretraining_data: str = ""
    created: str = ""
    lineage: dict[str, Any] = field(default_factory=dict)
    format: int = CARD_FORMAT

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, origin: str = "model card") -> ModelCard:
        try:
            raw = parse_json(text)
        except JsonError as err:
            raise CardInvalid(f"{origin} is not valid JSON: {err}") from err
        if not isinstance(raw, dict):
            raise CardInvalid(f"{origin} must hold a JSON object")
        if "default_policy" in raw and "default_transfer_policy" not in raw:  # the name before fedtransfer 0.2
            raw["default_transfer_policy"] = raw.pop("default_policy")
        known = set(cls.__dataclass_fields__)
        unknown = set(raw) - known
        if unknown:
            raise CardInvalid(f"{origin} has unknown fields {sorted(unknown)}")
        if type(raw.get("format")) is not int or raw.get("format") != CARD_FORMAT:
            raise CardInvalid(f"{origin} has format {raw.get('format')!r}; this version reads format {CARD_FORMAT}")
        try:
            card = cls(**raw)
        except TypeError as err:
            raise CardInvalid(f"{origin} is missing fields: {err}") from err
        if not isinstance(card.arch, str) or not isinstance(card.arch_args, dict):
            raise CardInvalid(f"{origin}: arch must be a name and arch_args an object")
        if not isinstance(card.input_shape, list) or not all(isinstance(d, int) and d > 0 for d in card.input_shape):
            raise CardInvalid(f"{origin}: input_shape must be a list of positive integers")
        if not isinstance(card.class_names, list) or len(card.class_names) < 2:
            raise CardInvalid(f"{origin}: class_names must list at least two classes")
        return card

    def build(self) -> FedModel:
        try:
            return build_model(self.arch, self.input_shape, self.num_classes, self.arch_args)
        except UnknownArchitecture as err:
            raise ArchitectureMismatch(str(err)) from err


def card_digest(card_json: str) -> str:
    """The sha256 of a model card's JSON text, as signed in every round instruction."""
    return hashlib.sha256(card_json.encode()).hexdigest()


def make_card(model: FedModel, weights: bytes, **fields: Any) -> ModelCard:
    """A card for ``model`` whose weights file holds ``weights``."""
    fields.setdefault("created", datetime.now(UTC).isoformat(timespec="seconds"))
    return ModelCard(
        weights_sha256=hashlib.sha256(weights).hexdigest(),
        model_fingerprint=state_fingerprint(model.state_dict()),
        **fields,
    )


def save_checkpoint(model: FedModel, directory: Path, **card_fields: Any) -> ModelCard:
    """Write ``model`` and its card to ``directory`` (created if needed), atomically per file."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    data = tensors_to_bytes(model.state_dict())
    card = make_card(model, data, **card_fields)
    write_atomic(directory / WEIGHTS_FILE, data)
    write_atomic(directory / CARD_FILE, card.to_json().encode())
    return card


def load_card(directory: Path) -> ModelCard:
    path = Path(directory) / CARD_FILE
    if not path.is_file():
        raise CheckpointNotFound(
            f"no model card at {path}: a checkpoint directory holds {CARD_FILE} and {WEIGHTS_FILE}"
        )
    return ModelCard.from_json(path.read_text(), origin=str(path))


def load_checkpoint(directory: Path) -> tuple[FedModel, ModelCard]:
    """Load and validate a checkpoint; every mismatch is a ``CheckpointError``."""
    directory = Path(directory)
    card = load_card(directory)
    weights_path = directory / WEIGHTS_FILE
    if not weights_path.is_file():
        raise CheckpointNotFound(f"no weights file at {weights_path}")
    data = weights_path.read_bytes()
    actual = hashlib.sha256(data).hexdigest()
    if actual != card.weights_sha256:
        raise WeightsHashMismatch(
            f"{weights_path} has sha256 {actual[:16]}..., but its card says {card.weights_sha256[:16]}...: "
            "the weights were changed or belong to another card"
        )
    try:
        state = tensors_from_bytes(data)
    except TensorFormatError as err:
        raise CorruptWeights(f"{weights_path} is not a readable safetensors file: {err}") from err
    model = card.build()
    check_state_matches(model, state, origin=str(weights_path))
    model.load_state_dict(state, strict=True)
    if state_fingerprint(model.state_dict()) != card.model_fingerprint:
        raise WeightsHashMismatch(f"tensor fingerprint of {weights_path} does not match its card")
    return model, card


def check_state_matches(model: FedModel, state: dict[str, torch.Tensor], origin: str) -> None:
    """Raise ``ArchitectureMismatch`` unless ``state`` has exactly the model's names, shapes and dtypes."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing or extra:
        raise ArchitectureMismatch(
            f"{origin} does not fit the architecture in its card: missing {missing[:5]}, unexpected {extra[:5]}"
        )
    for name, tensor in expected.items():
        if tuple(state[name].shape) != tuple(tensor.shape) or state[name].dtype != tensor.dtype:
            raise ArchitectureMismatch(
                f"{origin}: tensor {name!r} has shape {tuple(state[name].shape)} {state[name].dtype}, "
                f"the architecture needs {tuple(tensor.shape)} {tensor.dtype}"
            )
