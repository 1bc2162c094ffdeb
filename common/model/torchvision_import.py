"""The one place fedtransfer imports torchvision, and the packages that import it themselves (timm, peft).

Why this module exists: torch is pinned to a CPU build (2.13.0+cpu), while the torchvision
wheel that matches it (0.28.0) ships a C++ extension linked against CUDA libraries. That
extension cannot load beside the CPU torch, so torchvision never registers its custom
operators (``torchvision::nms`` and friends), and ``import torchvision`` then fails inside
``torchvision/_meta_registrations.py``, which registers meta kernels for those operators:
"operator torchvision::nms does not exist". fedtransfer needs none of them: the
classification models (ResNet, DenseNet, EfficientNet, MobileNet) are pure Python.

The workaround: before the first import of torchvision, put an empty module in
``sys.modules`` under the name ``torchvision._meta_registrations``, so that import is a no-op.
Detection ops (``torchvision.ops.nms``, ``roi_align``) stay unusable; nothing here calls them.
timm and peft (through transformers) import torchvision when it is installed, so they are
imported through this module too. Every other module gets these packages from the functions
below, never by importing them directly.
"""

from __future__ import annotations

import importlib
import sys
import types
from types import ModuleType

from common.errors import ConfigurationError

_META_REGISTRATIONS = "torchvision._meta_registrations"


class OptionalPackageMissing(ConfigurationError):
    """An optional package (timm) is not installed."""


def _without_meta_registrations() -> None:
    if "torchvision" not in sys.modules and _META_REGISTRATIONS not in sys.modules:
        sys.modules[_META_REGISTRATIONS] = types.ModuleType(_META_REGISTRATIONS)


def torchvision() -> ModuleType:
    """The ``torchvision`` package, importable beside the CPU build of torch (see the module docstring)."""
    _without_meta_registrations()
    return importlib.import_module("torchvision")


def timm() -> ModuleType:
    """The ``timm`` package (the optional extra ``fedtransfer[timm]``)."""
    _without_meta_registrations()
    try:
        return importlib.import_module("timm")
    except ModuleNotFoundError as err:
        raise OptionalPackageMissing(
            f"timm models need the optional package timm ({err}); install it with "
            "`.venv/bin/pip install -e '.[timm]'` (it keeps the installed torch)"
        ) from None


def peft() -> ModuleType:
    """The ``peft`` package, for the ``lora:r`` transfer policy."""
    _without_meta_registrations()
    return importlib.import_module("peft")
