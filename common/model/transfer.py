"""Transfer policies: which part of a pretrained model trains and travels.

- ``head``: the head only;
- ``last:K``: the last K parametrised backbone stages (ResNet's ``layer4`` is one stage) and the head;
- ``full``: everything;
- ``bias``: every bias (BatchNorm shifts included) and the head (BitFit);
- ``lora:R``: rank-R LoRA adapters (through ``peft``) on every linear and (ungrouped)
  convolution layer of the backbone, and the head; the base weights stay frozen.

A policy splits a model into a frozen prefix of stages and a trainable suffix with
``model(x) == trainable(frozen(x))``, so a site can compute the frozen features once and
train the suffix alone. Only the trainable tensors travel. ``lora:R`` adds tensors to the
model (:meth:`TransferPolicy.attach`); the base model's own state (:meth:`base_state`)
keeps its names, and :meth:`merged` folds the adapters into the base weights, giving a
plain model of the card's architecture for checkpoints.
"""

from __future__ import annotations

import copy
import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from common.errors import ConfigurationError
from common.model.zoo import FedModel

LORA_INIT_SEED = 0
_LORA_MARK = ".lora_"
_BASE_LAYER = ".base_layer."


class PolicyParseError(ConfigurationError, ValueError):
    """A transfer policy string is not one of ``head``, ``last:K``, ``full``, ``bias``, ``lora:R``."""


def _count(text: str, prefix: str) -> int:
    try:
        return int(text[len(prefix) :])
    except ValueError:
        return -1


@dataclass(frozen=True)
class TransferPolicy:
    """What trains: ``kind`` is ``head``, ``last`` (``blocks`` = K), ``full``, ``bias`` or ``lora`` (``blocks`` = R)."""

    kind: str
    blocks: int = 0

    @classmethod
    def parse(cls, text: str) -> TransferPolicy:
        text = text.strip()
        if text in ("head", "full", "bias"):
            return cls(text)
        for kind in ("last", "lora"):
            if text.startswith(f"{kind}:") and _count(text, f"{kind}:") >= 1:
                return cls(kind, _count(text, f"{kind}:"))
        raise PolicyParseError(
            f"transfer policy {text!r} is not one of 'head', 'last:K' (K >= 1), 'full', 'bias', 'lora:R' (R >= 1)"
        )

    def __str__(self) -> str:
        return f"{self.kind}:{self.blocks}" if self.kind in ("last", "lora") else self.kind

    # --- LoRA adapters ---------------------------------------------------------------

    def attach(self, model: FedModel) -> None:
        """Give ``model`` its rank-R LoRA adapters (``lora:R`` only; once; the same initial values everywhere)."""
        if self.kind != "lora" or has_adapters(model):
            return
        targets = [
            name
            for name, module in model.backbone.named_modules()
            if isinstance(module, nn.Linear) or (isinstance(module, nn.Conv2d) and module.groups == 1)
        ]
        if not targets:
            return
        from common.model.torchvision_import import peft

        library = peft()
        config = library.LoraConfig(
            r=self.blocks,
            lora_alpha=self.blocks,
            lora_dropout=0.0,
            bias="none",
            target_modules="|".join(re.escape(name) for name in targets),
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(LORA_INIT_SEED)
            library.inject_adapter_in_model(config, model.backbone)

    def merged(self, model: FedModel) -> FedModel:
        """``model`` as a plain model of its card's architecture: a copy with the LoRA adapters folded in."""
        if not has_adapters(model):
            return model
        from common.model.torchvision_import import peft

        plain = copy.deepcopy(model)
        layer_type = peft().tuners.tuners_utils.BaseTunerLayer
        for parent in list(plain.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, layer_type):
                    child.merge()
                    setattr(parent, name, child.get_base_layer())
        for param in plain.parameters():
            param.requires_grad_(True)
        return plain

    # --- names and the split ---------------------------------------------------------

    @staticmethod
    def _stage(model: FedModel, name: str) -> int | None:
        """Index of the backbone stage that holds parameter ``name`` (None for the head)."""
        if not name.startswith("backbone."):
            return None
        return list(model.backbone._modules).index(name.split(".")[1])

    def trainable_names(self, model: FedModel) -> list[str]:
        """Names (in ``model.state_dict()``) of the parameters that train and travel."""
        self.attach(model)
        names = [name for name, _ in model.named_parameters()]
        if self.kind == "full":
            return names
        if self.kind == "last":
            cut = self.split_index(model)
            return [n for n in names if (self._stage(model, n) or 0) >= cut or n.startswith("head.")]
        if self.kind == "bias":
            return [n for n in names if n.endswith(".bias") or n.startswith("head.")]
        if self.kind == "lora":
            return [n for n in names if _LORA_MARK in n or n.startswith("head.")]
        return [n for n in names if n.startswith("head.")]

    def split_index(self, model: FedModel) -> int:
        """Index of the first backbone stage that trains (``len(backbone)`` when only the head trains)."""
        if self.kind == "full":
            return 0
        if self.kind == "last":
            blocks = model.parametrised_blocks()
            if self.blocks > len(blocks):
                raise PolicyParseError(
                    f"policy {self} asks for {self.blocks} trainable blocks (stages) but the model has {len(blocks)}"
                )
            return blocks[-self.blocks]
        stages = [self._stage(model, n) for n in self.trainable_names(model)] if self.kind != "head" else []
        return min((s for s in stages if s is not None), default=len(model.backbone))

    def split(self, model: FedModel) -> tuple[nn.Sequential, nn.Sequential]:
        """Return (frozen, trainable) modules sharing the model's parameters."""
        cut = self.split_index(model)
        frozen = nn.Sequential(*list(model.backbone)[:cut])
        trainable = nn.Sequential(*list(model.backbone)[cut:], model.head)
        return frozen, trainable

    def apply(self, model: FedModel) -> None:
        """Freeze everything outside the trainable part; keep frozen blocks in eval mode."""
        trainable = set(self.trainable_names(model))
        for name, param in model.named_parameters():
            param.requires_grad_(name in trainable)
        frozen, _ = self.split(model)
        frozen.eval()

    # --- states ----------------------------------------------------------------------

    def trainable_state(self, model: FedModel) -> dict[str, torch.Tensor]:
        names = self.trainable_names(model)
        state = model.state_dict()
        return {name: state[name].detach().clone() for name in names}

    def base_state(self, model: FedModel) -> dict[str, torch.Tensor]:
        """The base model's own state under its own names: LoRA adapters left out."""
        return base_state(model)

    def frozen_state(self, model: FedModel) -> dict[str, torch.Tensor]:
        trainable = set(self.trainable_names(model))
        return {k: v for k, v in base_state(model).items() if k not in trainable}

    def load_trainable(self, model: FedModel, state: Mapping[str, torch.Tensor]) -> None:
        """Load trainable tensors into ``model`` (adapters attached first); every name must be one the policy trains."""
        expected = set(self.trainable_names(model))
        if set(state) != expected:
            missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
            raise PolicyParseError(
                f"trainable tensors do not fit policy {self}: missing {missing[:4]}, unexpected {extra[:4]}"
            )
        model.load_state_dict(dict(state), strict=False)


def has_adapters(model: nn.Module) -> bool:
    return any(_LORA_MARK in name for name, _ in model.named_parameters())


def base_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` without LoRA adapters, under the base model's own names."""
    state = model.state_dict()
    if not has_adapters(model):
        return state
    return {k.replace(_BASE_LAYER, "."): v for k, v in state.items() if _LORA_MARK not in k}


def state_fingerprint(state: Mapping[str, torch.Tensor]) -> str:
    """sha256 over names, dtypes, shapes and bytes of tensors, in name order."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()
