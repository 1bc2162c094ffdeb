"""What travels in a Flower message between coordinator and site, named in one place."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import MISSING, asdict, dataclass, fields
from typing import Any

ARRAYS = "arrays"          # ArrayRecord: the trainable weights
CONFIG = "config"          # ConfigRecord: the round instruction
BASE_MODEL = "base-model"  # ArrayRecord: the full base model, sent on first contact only
BASE_CARD = "base-card"    # ConfigRecord: {"json": model card}, beside BASE_MODEL
METRICS = "metrics"        # MetricRecord in replies
SITE = "site"              # ConfigRecord in replies: site id and status

STATUS_OK = "ok"
STATUS_DECLINED = "declined"


class InstructionError(ValueError):
    """A round instruction from the coordinator is malformed."""


@dataclass(frozen=True)
class RoundInstruction:
    """Everything a site needs for one train or evaluate round; sent in every message."""

    server_round: int
    num_rounds: int
    policy: str
    base_fingerprint: str
    frozen_fingerprint: str
    local_epochs: int
    batch_size: int
    lr: float
    optimizer: str
    proximal_mu: float
    seed: int
    personalise_epochs: int
    dp: int
    run_key: str
    sim_root: str = ""
    local_steps: int = 0
    personalise_fraction: float = 0.0
    personalise_lr: float = 0.0

    def to_config(self) -> dict[str, Any]:
        return {k.replace("_", "-"): v for k, v in asdict(self).items()}

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "RoundInstruction":
        values = {}
        for field in fields(cls):
            key = field.name.replace("_", "-")
            if key not in config:
                if field.default is not MISSING:
                    continue
                raise InstructionError(f"round instruction lacks {key!r}")
            kind = {"int": int, "float": float, "str": str}[field.type]
            value = config[key]
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if not isinstance(value, kind) or isinstance(value, bool):
                raise InstructionError(f"round instruction field {key!r} must be {field.type}, got {value!r}")
            values[field.name] = value
        return cls(**values)


def site_status(site_id: str, status: str = STATUS_OK, reason: str = "") -> dict[str, str]:
    return {"site-id": site_id, "status": status, "reason": reason}


SIGNED_INSTRUCTION = "signed-instruction"  # key in CONFIG: the coordinator-signed instruction blob
SEALED = "sealed"                           # ConfigRecord in replies: {"site-id": str, "envelope": bytes}
INSTRUCTION_KINDS = {"train": "train-instruction", "evaluate": "evaluate-instruction"}
REPLY_KINDS = {"train": "train-reply", "evaluate": "evaluate-reply"}


def instruction_payload(config: Mapping[str, Any], arrays_fingerprint: str) -> bytes:
    """The bytes the coordinator signs: the round instruction and the fingerprint of the weights sent with it."""
    body = {"config": {k: v for k, v in config.items() if k != SIGNED_INSTRUCTION}, "arrays": arrays_fingerprint}
    return json.dumps(body, sort_keys=True).encode()


def parse_instruction_payload(payload: bytes) -> tuple[dict[str, Any], str]:
    try:
        body = json.loads(payload)
        return dict(body["config"]), str(body["arrays"])
    except (ValueError, KeyError, TypeError) as err:
        raise InstructionError(f"signed instruction payload is malformed: {err}") from err
