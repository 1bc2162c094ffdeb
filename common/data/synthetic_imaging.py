"""A small synthetic medical imaging task, generated offline and deterministically for a seed.

Single-channel 24x24 images of smooth, textured "tissue". Class 1 ("lesion") holds a bright
round blob of random position, size and brightness; class 0 holds none but may hold a
thin bright line ("vessel") as a distractor. Each target site images through its own
scanner: a contrast gain, an intensity offset, a blur and a noise level (see SCANNERS),
and has its own lesion prevalence (label skew).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.model_selection import train_test_split

from common.data.scenario import ModelSpec, Scenario, standardise
from common.data.site_data import SiteData, Split

IMAGE_SIZE = 24
INPUT_SHAPE = (1, IMAGE_SIZE, IMAGE_SIZE)
CLASS_NAMES = ("no lesion", "lesion")
SOURCE_IMAGES = 800
SITE_IMAGES = 320
TEST_FRACTION = 0.3
DISTRACTOR_RATE = 0.5


@dataclass(frozen=True)
class Scanner:
    """How a site's scanner alters an image: ``gain * blur(image) + offset + noise``."""

    name: str
    gain: float
    offset: float
    blur_sigma: float
    noise_std: float
    lesion_rate: float


SOURCE_SCANNER = Scanner("source", gain=1.0, offset=0.0, blur_sigma=0.0, noise_std=0.05, lesion_rate=0.5)
SCANNERS = (
    Scanner("site-1", gain=0.7, offset=0.15, blur_sigma=0.0, noise_std=0.05, lesion_rate=0.3),
    Scanner("site-2", gain=1.0, offset=0.0, blur_sigma=1.2, noise_std=0.05, lesion_rate=0.5),
    Scanner("site-3", gain=1.1, offset=-0.05, blur_sigma=0.0, noise_std=0.11, lesion_rate=0.6),
    Scanner("site-4", gain=1.2, offset=0.15, blur_sigma=0.7, noise_std=0.07, lesion_rate=0.4),
)


def _blur_matrix(sigma: float, size: int = IMAGE_SIZE) -> np.ndarray:
    """A (size, size) Gaussian smoothing operator with renormalised rows (no dark borders)."""
    if sigma <= 0:
        return np.eye(size)
    grid = np.arange(size)
    kernel = np.exp(-0.5 * ((grid[:, None] - grid[None, :]) / sigma) ** 2)
    return kernel / kernel.sum(axis=1, keepdims=True)


def _blur(images: np.ndarray, sigma: float) -> np.ndarray:
    matrix = _blur_matrix(sigma)
    return matrix @ images @ matrix.T


def _tissue(rng: np.random.Generator, n: int) -> np.ndarray:
    texture = _blur(rng.normal(size=(n, IMAGE_SIZE, IMAGE_SIZE)), 1.5)
    texture /= texture.std(axis=(1, 2), keepdims=True)
    return 0.35 + 0.08 * texture


def _lesions(rng: np.random.Generator, n: int) -> np.ndarray:
    grid = np.arange(IMAGE_SIZE, dtype=np.float64)
    centre = rng.uniform(4, IMAGE_SIZE - 4, size=(n, 2))
    radius = rng.uniform(1.5, 3.5, size=n)
    brightness = rng.uniform(0.3, 0.6, size=n)
    rows = (grid[None, :] - centre[:, :1]) ** 2
    cols = (grid[None, :] - centre[:, 1:]) ** 2
    squared = rows[:, :, None] + cols[:, None, :]
    return brightness[:, None, None] * np.exp(-0.5 * squared / radius[:, None, None] ** 2)


def _vessels(rng: np.random.Generator, n: int) -> np.ndarray:
    grid = np.arange(IMAGE_SIZE, dtype=np.float64)
    angle = rng.uniform(0, np.pi, size=n)
    offset = rng.uniform(-6, 6, size=n)
    brightness = rng.uniform(0.15, 0.35, size=n)
    centred = grid - IMAGE_SIZE / 2
    distance = (
        centred[None, :, None] * np.cos(angle)[:, None, None]
        + centred[None, None, :] * np.sin(angle)[:, None, None]
        - offset[:, None, None]
    )
    return brightness[:, None, None] * np.exp(-0.5 * (distance / 0.7) ** 2)


def _generate(rng: np.random.Generator, n: int, scanner: Scanner) -> Split:
    positives = int(round(n * scanner.lesion_rate))
    y = np.zeros(n, dtype=np.int64)
    y[:positives] = 1
    y = rng.permutation(y)
    images = _tissue(rng, n)
    images += _lesions(rng, n) * (y == 1)[:, None, None]
    images += _vessels(rng, n) * ((y == 0) & (rng.random(n) < DISTRACTOR_RATE))[:, None, None]
    images = scanner.gain * _blur(images, scanner.blur_sigma) + scanner.offset
    images += rng.normal(scale=scanner.noise_std, size=images.shape)
    return Split(images[:, None].astype(np.float32), y)


def _train_test(split: Split, rng: np.random.Generator) -> tuple[Split, Split]:
    train, test = train_test_split(
        np.arange(len(split)), test_size=TEST_FRACTION, stratify=split.y, random_state=int(rng.integers(2**31))
    )
    return Split(split.x[train], split.y[train]), Split(split.x[test], split.y[test])


def generate_imaging(seed: int = 0) -> tuple[SiteData, tuple[SiteData, ...]]:
    """The source domain and the 4 target sites (raw intensities, not yet normalised)."""
    rng = np.random.default_rng([seed, 20240917])
    source = SiteData(SOURCE_SCANNER.name, *_train_test(_generate(rng, SOURCE_IMAGES, SOURCE_SCANNER), rng))
    sites = tuple(
        SiteData(scanner.name, *_train_test(_generate(rng, SITE_IMAGES, scanner), rng)) for scanner in SCANNERS
    )
    return source, sites


def imaging_scenario(seed: int, data_dir: Path | None, private: bool) -> Scenario:
    source, sites = generate_imaging(seed)
    mean, std = float(source.train.x.mean()), float(source.train.x.std())
    return Scenario(
        name="synthetic-imaging",
        description=(
            "Synthetic 24x24 grey-level scans: lesion (bright blob) vs none (maybe a vessel-like line); "
            "4 sites with scanner shifts (contrast, offset, blur, noise) and lesion rates 0.3/0.5/0.6/0.4"
        ),
        source=standardise(source, mean, std),
        sites=tuple(standardise(site, mean, std) for site in sites),
        input_shape=INPUT_SHAPE,
        class_names=CLASS_NAMES,
        feature_names=None,
        model=ModelSpec("cnn", {}),
        transfer_policy="last:1",
        source_description=f"synthetic reference scanner, {len(source.train)} training images, seed {seed}",
        preprocessing=f"pixel intensities standardised with the source training mean {mean:.4f} and std {std:.4f}",
        public_data=True,
        recipe={"batch_size": 64},  # chosen on validation splits by `fedtransfer bench transfer` (BENCHMARKS.md)
    )
