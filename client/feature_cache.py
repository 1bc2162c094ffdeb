"""The frozen prefix's features of a site's data, computed once and kept within a memory budget.

A frozen prefix is a fixed function of each record, so its outputs can be computed once per
site and reused by every round while the prefix is unchanged (DP-SGD then runs on the
trainable suffix alone: the same guarantee, far less work). Entries are keyed by the
dataset's content hash, the frozen prefix's structure (its modules, the input adapter's
settings among them) and weights, and the transfer policy.

Memory: entries live in memory up to :data:`DEFAULT_MEMORY_BYTES` in all (the environment
variable ``FEDTRANSFER_FEATURE_CACHE_MB`` changes it). The budget is 512 MiB because a site
shares its memory with the model and with Opacus's per-sample gradients (a batch of 64 on
ResNet-18's ``layer4`` alone holds 2 GiB of them): it keeps the features of a 260,000-image
site under a frozen ResNet-18 (2 KiB per image), but not those of ``layer3`` at 224x224
(196 KiB per image, 2,700 images per 512 MiB). Above the budget the least recently used
entries are *spilled* to disk, to ``.npy`` files under the site's own state directory (never
pickled, read back memory-mapped, so the operating system pages them in as batches need
them); an entry larger than the whole budget goes to disk at once. Spilled values are the
computed ones bit for bit, so training on them is exact. A spilled entry is found again by
its key, by a later process too (a deployed SuperNode may start one per message); a site
keeps at most :data:`DISK_ENTRIES` spilled entries, the oldest removed first.
"""

from __future__ import annotations

import atexit
import hashlib
import logging
import os
import shutil
import tempfile
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)

MEMORY_ENV = "FEDTRANSFER_FEATURE_CACHE_MB"
DEFAULT_MEMORY_BYTES = 512 * 2**20
DISK_ENTRIES = 8
SPILL_DIR_NAME = "feature-cache"


@dataclass(frozen=True)
class Features:
    """Frozen-prefix outputs for the train and test splits, with labels."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def memory_budget() -> int:
    """Bytes of features kept in memory: ``$FEDTRANSFER_FEATURE_CACHE_MB`` MiB, else 512 MiB."""
    text = os.environ.get(MEMORY_ENV, "")
    try:
        return int(float(text) * 2**20) if text else DEFAULT_MEMORY_BYTES
    except ValueError:
        log.warning("%s=%r is not a number of MiB; using %d MiB", MEMORY_ENV, text, DEFAULT_MEMORY_BYTES >> 20)
        return DEFAULT_MEMORY_BYTES


def _private_temporary_dir() -> Path:
    path = Path(tempfile.mkdtemp(prefix="fedtransfer-features-"))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


class FeatureCache:
    """In-memory features up to ``memory_bytes``, the rest spilled to ``.npy`` files (see the module docstring)."""

    def __init__(self, memory_bytes: int | None = None) -> None:
        self.memory_bytes = memory_budget() if memory_bytes is None else memory_bytes
        self._memory: OrderedDict[str, tuple[Features, Path]] = OrderedDict()
        self._fallback_dir: Path | None = None
        self.computed = 0
        self.spilled = 0

    @staticmethod
    def key(*parts: str) -> str:
        return hashlib.sha256("\0".join(parts).encode()).hexdigest()

    def in_memory(self) -> int:
        return sum(features.nbytes for features, _ in self._memory.values())

    def get(self, key: str, compute: Callable[[], Features], spill_dir: Path | None = None) -> Features:
        """The features for ``key``: from memory, from a spilled file, or ``compute()``d now."""
        folder = self._folder(spill_dir)
        if key in self._memory:
            self._memory.move_to_end(key)
            return self._memory[key][0]
        if (folder / key).is_dir():
            return _read(folder / key)
        features = compute()
        self.computed += 1
        if features.nbytes > self.memory_bytes:
            log.info("features of %.1f MiB exceed the cache's %.0f MiB: kept on disk", *_mib(features, self))
            self._spill(key, features, folder)
            return _read(folder / key)
        while self._memory and self.in_memory() + features.nbytes > self.memory_bytes:
            old_key, (old, old_folder) = self._memory.popitem(last=False)
            self._spill(old_key, old, old_folder)
        self._memory[key] = (features, folder)
        return features

    def _folder(self, spill_dir: Path | None) -> Path:
        if spill_dir is not None:
            return Path(spill_dir)
        if self._fallback_dir is None:
            self._fallback_dir = _private_temporary_dir()
        return self._fallback_dir

    def _spill(self, key: str, features: Features, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        target = folder / key
        if target.is_dir():
            return
        staging = Path(tempfile.mkdtemp(prefix=f".{key[:16]}-", dir=folder))
        for name, tensor in features.tensors().items():
            with open(staging / f"{name}.npy", "wb") as handle:
                np.save(handle, tensor.numpy(), allow_pickle=False)
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(staging, target)
        self.spilled += 1
        _prune(folder)


def _read(directory: Path) -> Features:
    """Memory-mapped, copy-on-write views of a spilled entry (writable for torch, never written back)."""
    os.utime(directory)
    arrays = {f.name: np.load(directory / f"{f.name}.npy", mmap_mode="c", allow_pickle=False) for f in fields(Features)}
    return Features(**{name: torch.from_numpy(array) for name, array in arrays.items()})


def _prune(folder: Path) -> None:
    entries = sorted((p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")), key=_mtime)
    for old in entries[:-DISK_ENTRIES]:
        shutil.rmtree(old, ignore_errors=True)


def _mtime(path: Path) -> float:
    return path.stat().st_mtime


def _mib(features: Features, cache: FeatureCache) -> tuple[float, float]:
    return features.nbytes / 2**20, cache.memory_bytes / 2**20
