"""The ``pneumonia`` scenario: real paediatric chest X-rays (PneumoniaMNIST, 28x28), a ResNet-18 source model.

PneumoniaMNIST (MedMNIST v2; Kermany et al., Cell 2018; CC BY 4.0) comes from one hospital,
so the hospitals here are synthetic splits of its official training split:

- the **source** hospital (the coordinator's, or one consenting hospital): a random part of
  the official training split at the split's pneumonia rate; the coordinator pretrains a
  torchvision ResNet-18 on it from scratch and tests it on the whole official test split,
  unaltered (the figure MedMNIST v2 reports, about 0.944 AUC for ResNet-18 at 28x28);
- three **target** hospitals made from the rest of the training split, each with its own
  label skew (pneumonia rate) and acquisition shift (:data:`TARGETS`: gamma, contrast, blur,
  detector noise, detector offset), each tested on its own part of the official test split
  with the same skew and shift.

The model takes the 28x28 images at their size: the standard torchvision ResNet-18 (its
stem reduces 28x28 to 7x7; ``layer4`` works at 1x1), grey repeated to three channels and
normalised with the source's training mean and std, inside the model (its input adapter).
Resizing to 224 would cost 64 times the compute for every feature on 2 CPU cores; changing
the stem (a 3x3 stride-1 convolution, as MedMNIST's own 28x28 ResNet does) would make the
architecture differ from torchvision's, so ImageNet or other torchvision checkpoints could no
longer be dropped in with ``fedtransfer import-model``.

The file is read from ``data_dir`` (``--data-dir``), ``$FEDTRANSFER_PNEUMONIA_DIR`` or
``$FEDTRANSFER_DATA_DIR`` (each checked itself and in a ``pneumoniamnist/`` subfolder) and
verified against its sha256; it is never downloaded and never committed.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.data.scenario import ModelSpec, Scenario
from common.data.site_data import DataError, DataFileNotFound, SiteData, Split

FILE_NAME = "pneumoniamnist.npz"
SUBDIRECTORY = "pneumoniamnist"
SHA256 = "d0bfa3330f26554c4117328b1117f52bfb3746404b0594c58f37a09b4314d396"
DIR_ENV = "FEDTRANSFER_PNEUMONIA_DIR"
SHARED_DIR_ENV = "FEDTRANSFER_DATA_DIR"
CLASS_NAMES = ("normal", "pneumonia")
INPUT_SHAPE = (1, 28, 28)
LICENCE = "CC BY 4.0 (PneumoniaMNIST, MedMNIST v2, Yang et al. 2023; images from Kermany et al., Cell 2018, CC BY 4.0)"
SOURCE_IMAGES = 1300
#: Pretraining of the source ResNet-18 (non-private, the coordinator's own data): few epochs, on 2 CPU cores; the
#: epoch with the best AUC on a tenth of the source held out is kept.
PRETRAIN = {"epochs": 4, "batch_size": 32, "lr": 1e-3, "optimizer": "adam", "validation_fraction": 0.1, "patience": 2}
MEDMNIST_RESNET18_28_AUC = 0.944


class PneumoniaDataMissing(DataFileNotFound):
    """The PneumoniaMNIST file is not in any of the places it is looked for."""


@dataclass(frozen=True)
class Acquisition:
    """A target hospital: its share of patients with pneumonia and how its X-ray system alters an image.

    In [0, 1] intensity: ``clip(contrast * (blur(x ** gamma) - 0.5) + 0.5 + offset + noise)``.
    """

    name: str
    train_images: int
    pneumonia_rate: float
    gamma: float = 1.0
    contrast: float = 1.0
    blur_sigma: float = 0.0
    noise_std: float = 0.0
    offset: float = 0.0

    def apply(self, images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        x = np.power(images, self.gamma)
        x = _blur(x, self.blur_sigma)
        x = self.contrast * (x - 0.5) + 0.5 + self.offset
        if self.noise_std > 0:
            x = x + rng.normal(scale=self.noise_std, size=x.shape)
        return np.clip(x, 0.0, 1.0)

    def describe(self) -> str:
        parts = [f"pneumonia rate {self.pneumonia_rate:.2f}"]
        for label, value, neutral in (
            ("gamma", self.gamma, 1.0),
            ("contrast", self.contrast, 1.0),
            ("blur sigma", self.blur_sigma, 0.0),
            ("noise sd", self.noise_std, 0.0),
            ("offset", self.offset, 0.0),
        ):
            if value != neutral:
                parts.append(f"{label} {value:g}")
        return f"{self.name} ({', '.join(parts)})"


TARGETS = (
    Acquisition("hospital-a", 850, 0.45, gamma=1.5, contrast=0.8, offset=0.06),
    Acquisition("hospital-b", 900, 0.85, blur_sigma=1.0, noise_std=0.04),
    Acquisition("hospital-c", 600, 0.60, gamma=0.7, noise_std=0.08, offset=-0.05),
)


def _blur(images: np.ndarray, sigma: float) -> np.ndarray:
    if sigma <= 0:
        return images
    grid = np.arange(images.shape[-1])
    kernel = np.exp(-0.5 * ((grid[:, None] - grid[None, :]) / sigma) ** 2)
    kernel /= kernel.sum(axis=1, keepdims=True)
    return kernel @ images @ kernel.T


def _candidates(data_dir: Path | None) -> list[Path]:
    roots = [data_dir, os.environ.get(DIR_ENV) or None, os.environ.get(SHARED_DIR_ENV) or None]
    return [p for root in roots if root is not None for p in (Path(root), Path(root) / SUBDIRECTORY)]


def find_file(data_dir: Path | None = None) -> Path:
    """The PneumoniaMNIST file: in ``data_dir``, ``$FEDTRANSFER_PNEUMONIA_DIR`` or ``$FEDTRANSFER_DATA_DIR``."""
    candidates = _candidates(data_dir)
    for folder in candidates:
        if (folder / FILE_NAME).is_file():
            return folder / FILE_NAME
    where = ", ".join(str(c) for c in candidates) or "nowhere (no folder given)"
    raise PneumoniaDataMissing(
        f"{FILE_NAME} not found (looked in {where}); put the file in a folder and pass it with --data-dir or "
        f"{DIR_ENV} (see docs/data.md: pneumonia)"
    )


def load_pneumoniamnist(data_dir: Path | None = None) -> dict[str, np.ndarray]:
    """The official splits as float32 images in [0, 1], shape (n, 1, 28, 28), and int64 labels (1 = pneumonia)."""
    path = find_file(data_dir)
    content = path.read_bytes()
    digest = hashlib.sha256(content).hexdigest()
    if digest != SHA256:
        raise DataError(
            f"{path} has sha256 {digest}, expected {SHA256}: it is not the PneumoniaMNIST file this scenario is "
            "defined on (see docs/data.md); replace it"
        )
    arrays = {}
    with np.load(path, allow_pickle=False) as archive:
        for split in ("train", "val", "test"):
            arrays[f"{split}_x"] = (archive[f"{split}_images"].astype(np.float32) / 255.0)[:, None]
            arrays[f"{split}_y"] = archive[f"{split}_labels"].reshape(-1).astype(np.int64)
    return arrays


def _take(rng: np.random.Generator, pools: dict[int, np.ndarray], count: int, rate: float, name: str) -> np.ndarray:
    wanted = {1: int(round(count * rate))}
    wanted[0] = count - wanted[1]
    taken = []
    for label in (0, 1):
        if wanted[label] > len(pools[label]):
            raise DataError(f"{name}: needs {wanted[label]} images of class {label}, {len(pools[label])} are left")
        taken.append(pools[label][: wanted[label]])
        pools[label] = pools[label][wanted[label] :]
    return rng.permutation(np.concatenate(taken))


def _pools(rng: np.random.Generator, y: np.ndarray) -> dict[int, np.ndarray]:
    return {label: rng.permutation(np.flatnonzero(y == label)) for label in (0, 1)}


@dataclass(frozen=True)
class HospitalRows:
    """Which rows of the official splits each hospital holds: the source's training rows, each target's pair."""

    source: np.ndarray
    targets: tuple[tuple[np.ndarray, np.ndarray], ...]


def hospital_rows(train_y: np.ndarray, test_y: np.ndarray, seed: int) -> HospitalRows:
    """The source's training rows (at the split's pneumonia rate) and each target's training and test rows."""
    rng = np.random.default_rng([seed, 2018])
    train_pools = _pools(rng, train_y)
    source = _take(rng, train_pools, SOURCE_IMAGES, float(train_y.mean()), "source")
    test_pools = _pools(rng, test_y)
    targets = []
    for target, test_size in zip(TARGETS, _test_sizes(len(test_y))):
        train_rows = _take(rng, train_pools, target.train_images, target.pneumonia_rate, target.name)
        if target is TARGETS[-1]:
            test_rows = rng.permutation(np.concatenate([test_pools[0], test_pools[1]]))
        else:
            test_rows = _take(rng, test_pools, test_size, target.pneumonia_rate, target.name)
        targets.append((train_rows, test_rows))
    return HospitalRows(source, tuple(targets))


def split_hospitals(arrays: dict[str, np.ndarray], seed: int) -> tuple[SiteData, tuple[SiteData, ...]]:
    """The source hospital (unaltered) and the target hospitals (skewed and shifted), for ``seed``."""
    train_x, train_y, test_x, test_y = arrays["train_x"], arrays["train_y"], arrays["test_x"], arrays["test_y"]
    rows = hospital_rows(train_y, test_y, seed)
    noise = np.random.default_rng([seed, 2018, 1])
    source = SiteData("source", Split(train_x[rows.source], train_y[rows.source]), Split(test_x, test_y))
    sites = tuple(
        SiteData(
            target.name,
            Split(target.apply(train_x[train_rows], noise), train_y[train_rows]),
            Split(target.apply(test_x[test_rows], noise), test_y[test_rows]),
        )
        for target, (train_rows, test_rows) in zip(TARGETS, rows.targets)
    )
    return source, sites


def _test_sizes(total: int) -> list[int]:
    share = total // len(TARGETS)
    return [share] * (len(TARGETS) - 1) + [total - share * (len(TARGETS) - 1)]


def pneumonia_scenario(seed: int, data_dir: Path | None, private: bool) -> Scenario:
    source, sites = split_hospitals(load_pneumoniamnist(data_dir), seed)
    mean, std = float(source.train.x.mean()), float(source.train.x.std())
    targets = "; ".join(t.describe() for t in TARGETS)
    return Scenario(
        name="pneumonia",
        description=(
            "PneumoniaMNIST chest X-rays (28x28): ResNet-18 pretrained at a source hospital, 3 target hospitals "
            f"with label skew and acquisition shifts: {targets}"
        ),
        source=source,
        sites=sites,
        input_shape=INPUT_SHAPE,
        class_names=CLASS_NAMES,
        feature_names=None,
        model=ModelSpec(
            "torchvision:resnet18",
            {"channels": "repeat", "resize": 0, "mean": [mean] * 3, "std": [std] * 3},
        ),
        pretrain=dict(PRETRAIN),
        transfer_policy="head",
        # chosen on validation splits by `fedtransfer bench transfer` (BENCHMARKS.md); each site weighs the classes
        # by the mix its policy declares
        recipe={"class_weights": "balanced"},
        source_description=(
            f"PneumoniaMNIST source hospital: {len(source.train)} training X-rays of the official training split "
            f"(pneumonia rate {source.train.y.mean():.2f}), seed {seed}; tested on the whole official test split"
        ),
        preprocessing=(
            "pixels / 255; target hospitals' images altered by their acquisition (gamma, contrast, blur, noise, "
            f"offset; see docs/data.md); the model's input adapter repeats the grey channel to 3 and normalises with "
            f"the source training mean {mean:.4f} and std {std:.4f}"
        ),
        data_licence=LICENCE,
    )
