"""What travels in a Flower message between coordinator and site, named in one place.

Downlink, a :class:`RoundInstruction` (signed by the coordinator) and the trainable weights;
uplink, one :class:`SiteReply` per instruction, sealed to the coordinator. A site builds
its reply once, checks it against the egress rule (:mod:`common.privacy.egress`) and seals
it; the coordinator opens it into the same type and checks it again.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any

import torch

from common.errors import SecurityError
from common.io import JsonError, parse_json
from common.security.tensors import (
    TensorFormatError,
    tensors_from_bytes,
    tensors_to_bytes,
)
from common.settings import FEDERATED_EVALUATION

ARRAYS = "arrays"  # ArrayRecord: the trainable weights
CONFIG = "config"  # ConfigRecord: the round instruction
BASE_MODEL = "base-model"  # ArrayRecord: the full base model, sent on first contact only
BASE_CARD = "base-card"  # ConfigRecord: {"json": model card}, beside BASE_MODEL
METRICS = "metrics"  # MetricRecord the coordinator hands to Flower's strategy (aggregation weight)

STATUS_OK = "ok"
STATUS_DECLINED = "declined"
STATUS_ERROR = "error"


class InstructionError(SecurityError, ValueError):
    """A round instruction from the coordinator is malformed."""


@dataclass(frozen=True)
class RoundInstruction:
    """Everything a site needs for one train or evaluate round; sent in every message."""

    server_round: int
    rounds: int
    transfer_policy: str
    base_fingerprint: str
    #: sha256 of the base model's card exactly as sent: the signature covers class names, preprocessing, arch args.
    base_card_sha256: str
    frozen_fingerprint: str
    local_epochs: int
    batch_size: int
    lr: float
    optimizer: str
    proximal_mu: float
    seed: int
    personalise_epochs: int
    dp: int
    run_id: str
    local_steps: int = 0
    personalise_fraction: float = 0.0
    personalise_lr: float = 0.0
    federated_evaluation: str = "last"
    release_loss: int = 0
    reproducible_noise: int = 0
    class_weights: str = "none"

    def __post_init__(self) -> None:
        if self.federated_evaluation not in FEDERATED_EVALUATION:
            raise InstructionError(
                f"federated-evaluation {self.federated_evaluation!r} is not one of {FEDERATED_EVALUATION}"
            )

    def evaluates(self, server_round: int) -> bool:
        """Whether the coordinator asks for a federated evaluation after ``server_round``."""
        if self.federated_evaluation == "every":
            return server_round >= 1
        return self.federated_evaluation == "last" and server_round == self.rounds

    @property
    def evaluations(self) -> int:
        """How many federated evaluations the run asks each site for."""
        return {"every": self.rounds, "last": 1, "none": 0}[self.federated_evaluation]

    def to_config(self) -> dict[str, Any]:
        return {k.replace("_", "-"): v for k, v in asdict(self).items()}

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> RoundInstruction:
        values = {}
        for spec in fields(cls):
            key = spec.name.replace("_", "-")
            if key not in config:
                if spec.default is not MISSING:
                    continue
                raise InstructionError(f"round instruction lacks {key!r}")
            kind = {"int": int, "float": float, "str": str}[spec.type]
            value = config[key]
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if not isinstance(value, kind) or isinstance(value, bool):
                raise InstructionError(f"round instruction field {key!r} must be {spec.type}, got {value!r}")
            values[spec.name] = value
        return cls(**values)


SIGNED_INSTRUCTION = "signed-instruction"  # key in CONFIG: the coordinator-signed instruction blob
SEALED = "sealed"  # ConfigRecord in replies: {"site-id": str, "envelope": bytes}
INSTRUCTION_KINDS = {"train": "train-instruction", "evaluate": "evaluate-instruction"}
REPLY_KINDS = {"train": "train-reply", "evaluate": "evaluate-reply"}


def instruction_payload(config: Mapping[str, Any], arrays_fingerprint: str) -> bytes:
    """The bytes the coordinator signs: the round instruction and the fingerprint of the weights sent with it."""
    body = {"config": {k: v for k, v in config.items() if k != SIGNED_INSTRUCTION}, "arrays": arrays_fingerprint}
    return json.dumps(body, sort_keys=True).encode()


def parse_instruction_payload(payload: bytes) -> tuple[dict[str, Any], str]:
    try:
        body = parse_json(payload)
        return dict(body["config"]), str(body["arrays"])
    except (JsonError, KeyError, TypeError, ValueError) as err:
        raise InstructionError(f"signed instruction payload is malformed: {err}") from err


class ReplyFormatError(SecurityError, ValueError):
    """A decrypted reply is not a well-formed :class:`SiteReply`."""


_REPLY_MAGIC = b"FTR2"
_REPLY_LEN = struct.Struct(">I")
_REPLY_FIELDS = ("site-id", "phase", "status", "reason", "values", "report")


@dataclass(frozen=True)
class SiteReply:
    """Everything a site sends for one instruction.

    ``values`` are the released values (see :data:`common.privacy.egress.VALUES`), ``report``
    the site's signed privacy report (base64; it declares every value's egress kind),
    ``tensors`` the trainable weights after DP-SGD (train replies with status ok only).
    """

    site_id: str
    phase: str
    status: str
    reason: str
    values: dict[str, Any]
    report: str
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    def encode(self) -> bytes:
        """``FTR2`` | u32 header length | header (JSON) | safetensors of ``tensors``."""
        header = json.dumps(
            {
                "site-id": self.site_id,
                "phase": self.phase,
                "status": self.status,
                "reason": self.reason,
                "values": self.values,
                "report": self.report,
            },
            sort_keys=True,
            allow_nan=False,
        ).encode()
        return _REPLY_MAGIC + _REPLY_LEN.pack(len(header)) + header + tensors_to_bytes(self.tensors)

    @classmethod
    def decode(cls, data: bytes) -> SiteReply:
        if len(data) < len(_REPLY_MAGIC) + _REPLY_LEN.size or not data.startswith(_REPLY_MAGIC):
            raise ReplyFormatError("the reply does not start with the fedtransfer reply marker")
        (length,) = _REPLY_LEN.unpack_from(data, len(_REPLY_MAGIC))
        start = len(_REPLY_MAGIC) + _REPLY_LEN.size
        if start + length > len(data):
            raise ReplyFormatError("the reply header is truncated")
        try:
            header = parse_json(data[start : start + length])
            tensors = tensors_from_bytes(data[start + length :])
        except (JsonError, TensorFormatError) as err:
            raise ReplyFormatError(f"the reply is malformed: {err}") from None
        if not isinstance(header, dict) or set(header) != set(_REPLY_FIELDS):
            raise ReplyFormatError(f"the reply header must hold exactly {list(_REPLY_FIELDS)}")
        texts = [header[k] for k in ("site-id", "phase", "status", "reason", "report")]
        if not all(isinstance(v, str) for v in texts) or not isinstance(header["values"], dict):
            raise ReplyFormatError("the reply header has fields of the wrong type")
        return cls(
            header["site-id"],
            header["phase"],
            header["status"],
            header["reason"],
            header["values"],
            header["report"],
            tensors,
        )
