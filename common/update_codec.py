"""The plaintext inside a sealed reply: a JSON report and (for training) the trainable tensors.

Layout: ``b"FTUP"`` | u32 report length | report (UTF-8 JSON object) | safetensors bytes.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from typing import Any

import torch

from common.security.tensors import TensorFormatError, tensors_from_bytes, tensors_to_bytes

_MAGIC = b"FTUP"
_LEN = struct.Struct(">I")


class UpdateFormatError(ValueError):
    """A decrypted reply is not a well-formed fedtransfer update."""


def encode_update(report: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> bytes:
    text = json.dumps(report, sort_keys=True, allow_nan=True).encode()
    return _MAGIC + _LEN.pack(len(text)) + text + tensors_to_bytes(tensors)


def decode_update(data: bytes) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    if len(data) < len(_MAGIC) + _LEN.size or not data.startswith(_MAGIC):
        raise UpdateFormatError("update does not start with the fedtransfer update marker")
    (length,) = _LEN.unpack_from(data, len(_MAGIC))
    start = len(_MAGIC) + _LEN.size
    if start + length > len(data):
        raise UpdateFormatError("update report is truncated")
    try:
        report = json.loads(data[start : start + length])
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UpdateFormatError(f"update report is not JSON: {err}") from err
    if not isinstance(report, dict):
        raise UpdateFormatError("update report must be a JSON object")
    try:
        tensors = tensors_from_bytes(data[start + length :])
    except TensorFormatError as err:
        raise UpdateFormatError(str(err)) from err
    return report, tensors
