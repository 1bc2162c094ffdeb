"""Transfer policies: which part of a pretrained model trains and travels.

``head`` trains the head only, ``last:K`` the last K parametrised backbone blocks and the
head, ``full`` everything. A policy splits a model into a frozen prefix and a trainable
suffix with ``model(x) == trainable(frozen(x))``, so a site can compute the frozen
features once and train the suffix alone.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from common.errors import ConfigurationError
from common.model.zoo import FedModel


class PolicyParseError(ConfigurationError, ValueError):
    """A transfer policy string is not ``head``, ``last:K`` or ``full``."""


@dataclass(frozen=True)
class TransferPolicy:
    """What trains: ``kind`` is ``head``, ``last`` (with ``blocks`` = K) or ``full``."""

    kind: str
    blocks: int = 0

    @classmethod
    def parse(cls, text: str) -> TransferPolicy:
        text = text.strip()
        if text in ("head", "full"):
            return cls(text)
        if text.startswith("last:"):
            try:
                k = int(text.split(":", 1)[1])
            except ValueError:
                k = -1
            if k >= 1:
                return cls("last", k)
        raise PolicyParseError(f"transfer policy {text!r} is not one of 'head', 'last:K' (K >= 1), 'full'")

    def __str__(self) -> str:
        return f"last:{self.blocks}" if self.kind == "last" else self.kind

    def split_index(self, model: FedModel) -> int:
        """Index of the first backbone block that trains (``len(backbone)`` for ``head``)."""
        if self.kind == "full":
            return 0
        if self.kind == "head":
            return len(model.backbone)
        blocks = model.parametrised_blocks()
        if self.blocks > len(blocks):
            raise PolicyParseError(
                f"policy {self} asks for {self.blocks} trainable blocks but the model has {len(blocks)}"
            )
        return blocks[-self.blocks]

    def split(self, model: FedModel) -> tuple[nn.Sequential, nn.Sequential]:
        """Return (frozen, trainable) modules sharing the model's parameters."""
        cut = self.split_index(model)
        frozen = nn.Sequential(*list(model.backbone)[:cut])
        trainable = nn.Sequential(*list(model.backbone)[cut:], model.head)
        return frozen, trainable

    def trainable_names(self, model: FedModel) -> list[str]:
        """Names (in ``model.state_dict()``) of the parameters that train and travel."""
        cut = self.split_index(model)
        names = []
        for name, _ in model.named_parameters():
            if name.startswith("head."):
                names.append(name)
            elif int(name.split(".")[1]) >= cut:
                names.append(name)
        return names

    def apply(self, model: FedModel) -> None:
        """Freeze everything outside the trainable part; keep frozen blocks in eval mode."""
        trainable = set(self.trainable_names(model))
        for name, param in model.named_parameters():
            param.requires_grad_(name in trainable)
        frozen, _ = self.split(model)
        frozen.eval()

    def trainable_state(self, model: FedModel) -> dict[str, torch.Tensor]:
        state = model.state_dict()
        return {name: state[name].detach().clone() for name in self.trainable_names(model)}

    def frozen_state(self, model: FedModel) -> dict[str, torch.Tensor]:
        trainable = set(self.trainable_names(model))
        return {k: v for k, v in model.state_dict().items() if k not in trainable}


def state_fingerprint(state: Mapping[str, torch.Tensor]) -> str:
    """sha256 over names, dtypes, shapes and bytes of tensors, in name order."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()
