"""Import a pretrained model from a local weights file into a fedtransfer checkpoint.

The weights file is a torchvision-format ``.pth``/``.pt`` state dict, read with
``torch.load(weights_only=True)`` (a file holding Python objects beyond tensors is refused,
never unpickled), or a ``.safetensors`` file. Its names and shapes are checked against the
architecture (the head may have any number of classes: it is replaced), mapped onto the
model's named stages, and the first convolution is summed over its input channels for
``channels = "sum"``. The model gets a new, seeded head for the scenario's classes and its
input adapter; the checkpoint's card records the architecture, the adaptation, the weights
file's name and sha256, its licence and pretraining data. Nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import logging
import re
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from pickle import UnpicklingError  # only the error torch.load(weights_only=True) raises
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from common.model.backbones import (
    TIMM,
    TORCHVISION,
    InputOptions,
    split_arch,
    stage_prefixes,
    torchvision_spec,
)
from common.model.checkpoint import ArchitectureMismatch, CheckpointError, ModelCard, save_checkpoint
from common.model.torchvision_import import timm, torchvision
from common.model.zoo import FedModel, build_model

log = logging.getLogger(__name__)

TORCH_SUFFIXES = (".pth", ".pt")
SAFETENSORS_SUFFIX = ".safetensors"
_WRAPPERS = ("state_dict", "model_state_dict", "model")
_SHOWN = 3


class WeightsFileNotFound(CheckpointError):
    """The weights file to import is not where it was said to be."""


class WeightsRefused(CheckpointError):
    """The weights file is not a plain state dict of tensors (``torch.load(weights_only=True)`` refused it)."""


class WeightsMismatch(ArchitectureMismatch):
    """The weights file was made for another architecture."""


@dataclass(frozen=True)
class ImportRequest:
    """What to import and how to adapt it (``fedtransfer import-model``'s options)."""

    arch: str
    weights: Path
    input_shape: tuple[int, ...]
    class_names: tuple[str, ...]
    channels: str = ""
    resize: int = 0
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    groupnorm_stages: tuple[str, ...] = ()
    licence: str = ""
    pretraining_data: str = ""
    default_transfer_policy: str = "head"
    seed: int = 0
    extra_lineage: dict[str, Any] = field(default_factory=dict)

    def arch_args(self) -> dict[str, Any]:
        args: dict[str, Any] = {"resize": self.resize}
        if self.channels:
            args["channels"] = self.channels
        if self.mean:
            args["mean"] = list(self.mean)
        if self.std:
            args["std"] = list(self.std)
        if self.groupnorm_stages:
            args["groupnorm_stages"] = list(self.groupnorm_stages)
        options = InputOptions.from_args(self.input_shape, args)
        return {**args, "channels": options.channels, "mean": list(options.mean), "std": list(options.std)}


def read_weights(path: Path, arch: str) -> dict[str, torch.Tensor]:
    """The tensors of a weights file (never unpickled), unwrapped from a ``{"state_dict": ...}`` checkpoint."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise WeightsFileNotFound(
            f"no weights file at {path}: put the {arch} weights file there (a torchvision .pth state dict or a "
            ".safetensors file; fedtransfer never downloads weights)"
        )
    if path.suffix == SAFETENSORS_SUFFIX:
        try:
            loaded: Any = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as err:
            raise WeightsRefused(f"{path} is not a readable safetensors file: {err}") from None
    else:
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
        except (UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile) as err:
            first = re.sub(r"\x1b\[[0-9;]*m", "", str(err)).strip().split(". ")[0] or type(err).__name__
            raise WeightsRefused(
                f"{path} was refused by torch.load(weights_only=True) and was not unpickled ({first[:120]}); "
                "save only the tensors (torch.save(model.state_dict(), path)) or convert the file to safetensors"
            ) from None
    for key in _WRAPPERS:
        if isinstance(loaded, dict) and isinstance(loaded.get(key), dict):
            loaded = loaded[key]
            break
    if not isinstance(loaded, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in loaded.items()
    ):
        raise WeightsRefused(f"{path} does not hold a state dict (names to tensors); save model.state_dict() instead")
    return {k.removeprefix("module."): v for k, v in loaded.items()}


def _mismatch(path: Path, arch: str, expected: Mapping[str, torch.Tensor], given: Mapping[str, torch.Tensor]) -> None:
    missing = [k for k in expected if k not in given]
    extra = [k for k in given if k not in expected]
    if missing or extra:
        raise WeightsMismatch(
            f"{path} was made for another architecture than {arch}: missing {missing[:_SHOWN]}, "
            f"unexpected {extra[:_SHOWN]} ({len(missing)} missing, {len(extra)} unexpected tensors)"
        )
    wrong = [
        f"{k} {tuple(given[k].shape)} (needs {tuple(v.shape)})"
        for k, v in expected.items()
        if tuple(given[k].shape) != tuple(v.shape)
    ]
    if wrong:
        raise WeightsMismatch(f"{path} was made for another architecture than {arch}: {'; '.join(wrong[:_SHOWN])}")


def _torchvision_names(arch: str, path: Path, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Check a torchvision state dict against ``arch`` (any head size) and rename it onto the model's stages."""
    spec = torchvision_spec(arch)
    head_weight = state.get(f"{spec.head}.weight")
    classes = int(head_weight.shape[0]) if head_weight is not None and head_weight.ndim == 2 else 1000
    reference = torchvision().models.get_model(split_arch(arch)[1], weights=None, num_classes=classes)
    _mismatch(path, arch, reference.state_dict(), state)
    renamed = {}
    for name, tensor in state.items():
        for old, new in stage_prefixes(arch):
            if name.startswith(old):
                renamed[new + name[len(old) :]] = tensor
                break
    return renamed


def _timm_names(arch: str, path: Path, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Check a timm state dict against ``arch`` (its classifier left out) and rename it onto the ``features`` stage."""
    name = split_arch(arch)[1]
    reference = timm().create_model(name, pretrained=False, num_classes=0).state_dict()
    classifier = {k for k in state if k not in reference}
    _mismatch(path, arch, reference, {k: v for k, v in state.items() if k not in classifier})
    return {f"backbone.features.{k}": v for k, v in state.items() if k not in classifier}


def _renamed(arch: str, name: str) -> str:
    for old, new in stage_prefixes(arch):
        if name.startswith(old):
            return new + name[len(old) :]
    return name


def adapted_state(
    model: FedModel, arch: str, path: Path, state: Mapping[str, torch.Tensor], args: Mapping[str, Any]
) -> dict[str, torch.Tensor]:
    """The model's state with the imported weights in place of its random initialisation (its new head kept).

    The BatchNorm tensors of stages that became GroupNorm are left out: those GroupNorm layers stay
    freshly initialised, as Opacus's ``ModuleValidator.fix`` made them.
    """
    family = split_arch(arch)[0]
    renamed = _torchvision_names(arch, path, state) if family == TORCHVISION else _timm_names(arch, path, state)
    if args.get("channels") == "sum":
        first = _renamed(arch, f"{torchvision_spec(arch).first_conv}.weight")
        renamed[first] = renamed[first].sum(dim=1, keepdim=True)
    groupnorm = {
        f"{name}.{part}"
        for name, module in model.named_modules()
        if isinstance(module, nn.GroupNorm)
        for part in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    }
    result = model.state_dict()
    for name, tensor in renamed.items():
        if name.startswith("head.") or name.endswith("num_batches_tracked") or name in groupnorm:
            continue
        if name not in result or tuple(result[name].shape) != tuple(tensor.shape):
            raise WeightsMismatch(f"{path}: tensor {name!r} {tuple(tensor.shape)} has no place in the {arch} model")
        result[name] = tensor.to(result[name].dtype)
    return result


def import_model(request: ImportRequest, out_dir: Path) -> ModelCard:
    """Build the architecture, load the weights file into it, and write a checkpoint with its card."""
    family, _ = split_arch(request.arch)
    args = request.arch_args()
    state = read_weights(request.weights, request.arch)
    torch.manual_seed(request.seed)
    model = build_model(request.arch, request.input_shape, len(request.class_names), args)
    model.load_state_dict(adapted_state(model, request.arch, request.weights, state, args), strict=True)
    options = InputOptions.from_args(request.input_shape, args)
    preprocessing = options.describe()
    if request.groupnorm_stages:
        log.warning(
            "stages %s: BatchNorm replaced by freshly initialised GroupNorm (Opacus ModuleValidator.fix); their "
            "pretrained normalisation is lost and must be learned again",
            ", ".join(request.groupnorm_stages),
        )
        preprocessing += (
            f"; BatchNorm of stages {list(request.groupnorm_stages)} replaced by fresh GroupNorm (ModuleValidator.fix)"
        )
    preprocessing += (
        f"; every {'other ' if request.groupnorm_stages else ''}BatchNorm normalises with its pretrained statistics "
        "(FixedBatchNorm2d)"
    )
    content = Path(request.weights).expanduser().read_bytes()
    return save_checkpoint(
        model,
        out_dir,
        arch=request.arch,
        arch_args=args,
        input_shape=list(request.input_shape),
        class_names=list(request.class_names),
        source_description=f"{request.arch} weights from {Path(request.weights).name}"
        + (f", pretrained on {request.pretraining_data}" if request.pretraining_data else ""),
        preprocessing=preprocessing,
        default_transfer_policy=request.default_transfer_policy,
        licence=request.licence,
        pretraining_data=request.pretraining_data,
        lineage={
            "kind": "imported",
            "family": family,
            "weights_file": Path(request.weights).name,
            "weights_file_sha256": hashlib.sha256(content).hexdigest(),
            "head": f"new linear head for {len(request.class_names)} classes, seed {request.seed}",
            **request.extra_lineage,
        },
    )


def torchvision_state_dict(model: FedModel, arch: str) -> dict[str, torch.Tensor]:
    """``model``'s state under torchvision's names (its head as the classifier): what ``torch.save`` would write."""
    state = model.state_dict()
    result = {}
    for name, tensor in state.items():
        for old, new in stage_prefixes(arch):
            if name.startswith(new):
                result[old + name[len(new) :]] = tensor.detach().clone()
                break
    for name in list(result):
        if name.endswith("running_var"):
            result[name.removesuffix("running_var") + "num_batches_tracked"] = torch.tensor(0)
    return result


def parse_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(part) for part in text.replace("x", ",").split(",") if part.strip())
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        raise CheckpointError(f"input shape {text!r} is not channels,height,width (for example 1,28,28)")
    return shape


def parse_floats(text: str, what: str) -> tuple[float, ...]:
    try:
        return tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise CheckpointError(f"{what} {text!r} is not a comma-separated list of numbers") from None


def timm_default_size(arch: str) -> int:
    """The input side a timm model was pretrained at (its default configuration)."""
    config = timm().create_model(split_arch(arch)[1], pretrained=False, num_classes=0).pretrained_cfg
    return int(config.get("input_size", (3, 224, 224))[-1])


def native_size(arch: str) -> int:
    family, _ = split_arch(arch)
    return torchvision_spec(arch).native_size if family != TIMM else timm_default_size(arch)


def class_list(names: Sequence[str]) -> tuple[str, ...]:
    classes = tuple(n.strip() for n in names if n.strip())
    if len(classes) < 2:
        raise CheckpointError(f"classes {list(names)} must name at least two classes (for example normal,pneumonia)")
    return classes
