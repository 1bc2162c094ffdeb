"""Tensors to bytes and back with safetensors: a data-only format, never pickle."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

from common.errors import SecurityError


class TensorFormatError(SecurityError):
    """Bytes that should hold safetensors-encoded tensors do not."""


def tensors_to_bytes(tensors: Mapping[str, torch.Tensor]) -> bytes:
    """Serialise named dense tensors (copied to contiguous CPU memory) to bytes."""
    prepared: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        if not isinstance(name, str):
            raise TypeError(f"tensor names must be str, got {type(name).__name__}")
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name!r} is a {type(tensor).__name__}, not a torch.Tensor")
        if tensor.layout != torch.strided:
            raise TypeError(f"{name!r} is a {tensor.layout} tensor; only dense tensors are supported")
        prepared[name] = tensor.detach().cpu().clone(memory_format=torch.contiguous_format)
    return save(prepared)


def tensors_from_bytes(data: bytes) -> dict[str, torch.Tensor]:
    """Inverse of :func:`tensors_to_bytes`; :class:`TensorFormatError` on malformed bytes."""
    if not isinstance(data, (bytes, bytearray)):
        raise TypeError(f"expected bytes, got {type(data).__name__}")
    try:
        return load(bytes(data))
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise TensorFormatError(f"not a valid safetensors payload: {exc}") from exc
