"""The ``wdbc`` scenario: Wisconsin diagnostic breast cancer, bundled in scikit-learn (offline).

A source hospital and 4 target hospitals with covariate shift (tumour-size preference, lab
calibration) and label skew, every site z-scored with the source's training statistics.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from sklearn.datasets import load_breast_cancer

from common.data.scenario import ModelSpec, Scenario, standardise, stratified


@dataclass(frozen=True)
class WdbcSite:
    """A wdbc target hospital: malignant rate, tumour-size preference and lab calibration.

    ``size_preference`` > 0 favours large tumours (by mean radius within each class), < 0
    small ones. ``gain`` multiplies and ``shift_sd`` offsets (in source standard deviations)
    the named measurement in its "mean" and "worst" columns, like a differently calibrated lab.
    """

    name: str
    malignant_rate: float
    size_preference: float
    gain: dict[str, float] = field(default_factory=dict)
    shift_sd: dict[str, float] = field(default_factory=dict)


WDBC_SOURCE_FRACTION = 0.35
WDBC_SOURCE_MALIGNANT_RATE = 0.30
WDBC_TEST_FRACTION = 0.3
WDBC_SITES = (
    WdbcSite("hospital-a", 0.20, -1.0),
    WdbcSite("hospital-b", 0.35, -0.3, gain={"texture": 1.3}, shift_sd={"smoothness": -0.8, "concave points": 0.6}),
    WdbcSite("hospital-c", 0.50, 0.3, shift_sd={"compactness": 1.0, "concavity": 0.8, "symmetry": 0.8}),
    WdbcSite("hospital-d", 0.70, 1.0, gain={"radius": 0.85, "perimeter": 0.85, "area": 0.75}),
)


def _measurement_columns(feature_names: list[str], measurement: str) -> list[int]:
    return [i for i, name in enumerate(feature_names) if name in (f"mean {measurement}", f"worst {measurement}")]


def _calibrate(x: np.ndarray, site: WdbcSite, feature_names: list[str], source_std: np.ndarray) -> np.ndarray:
    x = x.copy()
    for measurement, gain in site.gain.items():
        x[:, _measurement_columns(feature_names, measurement)] *= gain
    for measurement, shift in site.shift_sd.items():
        columns = _measurement_columns(feature_names, measurement)
        x[:, columns] += shift * source_std[columns]
    return x


def _draw(rng: np.random.Generator, pool: np.ndarray, size_z: np.ndarray, count: int, preference: float) -> np.ndarray:
    weights = np.exp(1.5 * preference * size_z[pool])
    return rng.choice(pool, size=min(count, len(pool)), replace=False, p=weights / weights.sum())


def wdbc_scenario(seed: int, data_dir: Path | None, private: bool) -> Scenario:
    data = load_breast_cancer()
    feature_names = [str(name) for name in data.feature_names]
    x = data.data.astype(np.float64)
    y = (data.target == 0).astype(np.int64)
    rng = np.random.default_rng([seed, 569])
    radius = x[:, feature_names.index("mean radius")]
    size_z = np.zeros(len(y))
    for label in (0, 1):
        members = y == label
        size_z[members] = (radius[members] - radius[members].mean()) / radius[members].std()

    n_source = int(round(WDBC_SOURCE_FRACTION * len(y)))
    n_source_malignant = int(round(WDBC_SOURCE_MALIGNANT_RATE * n_source))
    pools = {label: rng.permutation(np.flatnonzero(y == label)) for label in (0, 1)}
    source_rows = np.concatenate([pools[1][:n_source_malignant], pools[0][: n_source - n_source_malignant]])
    pools = {1: pools[1][n_source_malignant:], 0: pools[0][n_source - n_source_malignant :]}

    rates = np.array([site.malignant_rate for site in WDBC_SITES])
    per_site = int(min(len(pools[1]) / rates.sum(), len(pools[0]) / (1 - rates).sum()))
    source = stratified("source", x[source_rows], y[source_rows], WDBC_TEST_FRACTION, seed)
    mean, std = source.train.x.mean(axis=0), source.train.x.std(axis=0)

    sites = []
    for site in WDBC_SITES:
        wanted = {1: int(round(per_site * site.malignant_rate))}
        wanted[0] = per_site - wanted[1]
        rows = []
        for label in (1, 0):
            chosen = _draw(rng, pools[label], size_z, wanted[label], site.size_preference)
            pools[label] = np.setdiff1d(pools[label], chosen)
            rows.append(chosen)
        members = np.concatenate(rows)
        site_x = _calibrate(x[members], site, feature_names, std)
        sites.append(standardise(stratified(site.name, site_x, y[members], WDBC_TEST_FRACTION, seed), mean, std))

    return Scenario(
        name="wdbc",
        description=(
            "Wisconsin diagnostic breast cancer (569 tumours, 30 features) split into a source hospital and "
            "4 target hospitals with covariate shift (tumour-size preference, lab calibration) and label skew "
            "(malignant rates 0.20/0.35/0.50/0.70)"
        ),
        source=standardise(source, mean, std),
        sites=tuple(sites),
        input_shape=(len(feature_names),),
        class_names=("benign", "malignant"),
        feature_names=tuple(feature_names),
        model=ModelSpec("mlp", {"hidden": [32, 16]}),
        transfer_policy="head",
        source_description=(
            f"wdbc source hospital: {len(source.train)} training tumours (malignant rate "
            f"{source.train.y.mean():.2f}), seed {seed}"
        ),
        preprocessing=(
            "label 1 = malignant, 0 = benign (sklearn's target inverted); every site's features z-scored with "
            "the source training mean and std"
        ),
        public_data=True,
    )
