"""The scenario registry: a source domain for pretraining plus the target sites.

Built-in scenarios are ``wdbc`` (embedded, offline), ``heart-disease`` and
``heart-disease-flamby`` (FLamby's Fed-Heart-Disease) and ``synthetic-imaging``. A path
ending in ``.toml`` loads a bring-your-own scenario (see docs/data.md).
"""

from __future__ import annotations

import logging
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.datasets import load_breast_cancer
from sklearn.model_selection import train_test_split

from common.data import heart_disease

from common.data import synthetic_imaging
from common.data.site_data import SiteData, Split, csv_feature_names, infer_input_shape, load_site_data, site_files

logger = logging.getLogger(__name__)

ARCHITECTURES = ("logreg", "mlp", "cnn")


class ScenarioError(Exception):
    """A scenario name is unknown or a scenario file is incomplete or inconsistent."""


@dataclass(frozen=True)
class ModelSpec:
    """The model architecture of a scenario and its keyword arguments."""

    arch: str
    args: dict = field(default_factory=dict)


@dataclass(frozen=True, eq=False)
class Scenario:
    """A transfer-learning scenario: optional source domain, target sites, model and policy."""

    name: str
    description: str
    source: SiteData | None
    sites: tuple[SiteData, ...]
    input_shape: tuple[int, ...]
    class_names: tuple[str, ...]
    feature_names: tuple[str, ...] | None
    model: ModelSpec
    policy: str
    source_description: str
    preprocessing: str
    #: Built-in generated or bundled public data: the only data a run may train on with reproducible
    #: (seeded, NOT private) noise, and only when asked.
    public_data: bool = False


def _standardise(site: SiteData, mean: np.ndarray, std: np.ndarray) -> SiteData:
    return SiteData(
        site.name,
        Split((site.train.x - mean) / std, site.train.y),
        Split((site.test.x - mean) / std, site.test.y),
    )


def _stratified(name: str, x: np.ndarray, y: np.ndarray, test_fraction: float, seed: int) -> SiteData:
    train, test = train_test_split(
        np.arange(len(y)), test_size=test_fraction, stratify=y, random_state=seed
    )
    return SiteData(name, Split(x[train], y[train]), Split(x[test], y[test]))


# --- wdbc -----------------------------------------------------------------------------

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


def _wdbc(seed: int, data_dir: Path | None, private: bool) -> Scenario:
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
    pools = {1: pools[1][n_source_malignant:], 0: pools[0][n_source - n_source_malignant:]}

    rates = np.array([site.malignant_rate for site in WDBC_SITES])
    per_site = int(min(len(pools[1]) / rates.sum(), len(pools[0]) / (1 - rates).sum()))
    source = _stratified("source", x[source_rows], y[source_rows], WDBC_TEST_FRACTION, seed)
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
        sites.append(_standardise(_stratified(site.name, site_x, y[members], WDBC_TEST_FRACTION, seed), mean, std))

    return Scenario(
        name="wdbc",
        description=(
            "Wisconsin diagnostic breast cancer (569 tumours, 30 features) split into a source hospital and "
            "4 target hospitals with covariate shift (tumour-size preference, lab calibration) and label skew "
            "(malignant rates 0.20/0.35/0.50/0.70)"
        ),
        source=_standardise(source, mean, std),
        sites=tuple(sites),
        input_shape=(len(feature_names),),
        class_names=("benign", "malignant"),
        feature_names=tuple(feature_names),
        model=ModelSpec("mlp", {"hidden": [32, 16]}),
        policy="head",
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


# --- heart disease --------------------------------------------------------------------

def _heart(seed: int, data_dir: Path | None, private: bool) -> Scenario:
    scaling = "source" if private else "per-centre"
    cleveland, *others = heart_disease.load_heart_disease(data_dir, scaling)
    return Scenario(
        name="heart-disease",
        description=(
            "UCI Heart Disease: pretrain on Cleveland, transfer to Hungary, Switzerland and VA Long Beach "
            "(FLamby Fed-Heart-Disease preprocessing and split)"
        ),
        source=cleveland,
        sites=tuple(others),
        input_shape=(len(heart_disease.FEATURE_NAMES),),
        class_names=heart_disease.CLASS_NAMES,
        feature_names=heart_disease.FEATURE_NAMES,
        model=ModelSpec("logreg", {}),
        policy="full",
        source_description=f"Cleveland Clinic Foundation, {len(cleveland.train)} training patients (FLamby split)",
        preprocessing=heart_disease.PREPROCESSING[scaling],
    )


def _heart_flamby(seed: int, data_dir: Path | None, private: bool) -> Scenario:
    scaling = "reference" if private else "per-centre"
    centres = heart_disease.load_heart_disease(data_dir, scaling)
    return Scenario(
        name="heart-disease-flamby",
        description="FLamby Fed-Heart-Disease benchmark: all 4 hospitals as sites, trained from scratch",
        source=None,
        sites=tuple(centres),
        input_shape=(len(heart_disease.FEATURE_NAMES),),
        class_names=heart_disease.CLASS_NAMES,
        feature_names=heart_disease.FEATURE_NAMES,
        model=ModelSpec("logreg", {}),
        policy="full",
        source_description="none (trained from scratch)",
        preprocessing=heart_disease.PREPROCESSING[scaling],
    )


# --- synthetic imaging ----------------------------------------------------------------

def _imaging(seed: int, data_dir: Path | None, private: bool) -> Scenario:
    source, sites = synthetic_imaging.generate_imaging(seed)
    mean, std = float(source.train.x.mean()), float(source.train.x.std())
    return Scenario(
        name="synthetic-imaging",
        description=(
            "Synthetic 24x24 grey-level scans: lesion (bright blob) vs none (maybe a vessel-like line); "
            "4 sites with scanner shifts (contrast, offset, blur, noise) and lesion rates 0.3/0.5/0.6/0.4"
        ),
        source=_standardise(source, mean, std),
        sites=tuple(_standardise(site, mean, std) for site in sites),
        input_shape=synthetic_imaging.INPUT_SHAPE,
        class_names=synthetic_imaging.CLASS_NAMES,
        feature_names=None,
        model=ModelSpec("cnn", {}),
        policy="last:1",
        source_description=f"synthetic reference scanner, {len(source.train)} training images, seed {seed}",
        preprocessing=f"pixel intensities standardised with the source training mean {mean:.4f} and std {std:.4f}",
        public_data=True,
    )


_BUILTINS: dict[str, Callable[[int, Path | None, bool], Scenario]] = {
    "wdbc": _wdbc,
    "heart-disease": _heart,
    "heart-disease-flamby": _heart_flamby,
    "synthetic-imaging": _imaging,
}


def scenario_names() -> list[str]:
    """Names of the built-in scenarios."""
    return list(_BUILTINS)


# --- bring your own -------------------------------------------------------------------

def _table(document: dict[str, Any], key: str, file: Path) -> dict[str, Any]:
    value = document.get(key)
    if not isinstance(value, dict):
        raise ScenarioError(f"{file}: missing [{key}] table; see docs/data.md for a complete example")
    return value


def _required(table: dict[str, Any], key: str, where: str, file: Path, kind: type = str) -> Any:
    if key not in table:
        raise ScenarioError(f"{file}: missing key {key!r} in {where}; see docs/data.md")
    value = table[key]
    if not isinstance(value, kind):
        raise ScenarioError(f"{file}: {where} {key} must be a {kind.__name__}, got {value!r}")
    return value


def _check_policy(policy: Any, file: Path) -> str:
    if policy in ("head", "full"):
        return policy
    if isinstance(policy, str) and policy.startswith("last:") and policy[5:].isdigit() and int(policy[5:]) >= 1:
        return policy
    raise ScenarioError(f"{file}: [model] policy {policy!r} must be 'head', 'last:K' (K >= 1) or 'full'")


def _model_spec(table: dict[str, Any], file: Path) -> tuple[ModelSpec, str]:
    arch = _required(table, "arch", "[model]", file)
    if arch not in ARCHITECTURES:
        raise ScenarioError(f"{file}: [model] arch {arch!r} is unknown; use one of {list(ARCHITECTURES)}")
    policy = _check_policy(table.get("policy", "head"), file)
    args = {key: value for key, value in table.items() if key not in ("arch", "policy")}
    return ModelSpec(arch, args), policy


def _check_shape(arch: str, shape: tuple[int, ...], file: Path) -> None:
    if arch == "cnn" and len(shape) != 3:
        raise ScenarioError(
            f"{file}: arch 'cnn' needs image data (x of shape (n, C, H, W)); the data has rows of shape {shape}"
        )
    if arch != "cnn" and len(shape) != 1:
        raise ScenarioError(
            f"{file}: arch {arch!r} needs tabular data (n, features); the data has rows of shape {shape}; "
            "use arch = 'cnn' for images"
        )


def _load_toml(file: Path, seed: int) -> Scenario:
    if not file.is_file():
        raise ScenarioError(f"{file}: scenario file not found")
    try:
        document = tomllib.loads(file.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise ScenarioError(f"{file}: not valid TOML ({err})") from None
    head = _table(document, "scenario", file)
    name = _required(head, "name", "[scenario]", file)
    class_names = tuple(str(c) for c in _required(head, "class_names", "[scenario]", file, list))
    if len(class_names) < 2:
        raise ScenarioError(f"{file}: [scenario] class_names needs at least 2 names, got {list(class_names)}")
    label_column = head.get("label_column", "label")
    model, policy = _model_spec(_table(document, "model", file), file)

    source_table = document.get("source")
    if source_table is not None and not isinstance(source_table, dict):
        raise ScenarioError(f"{file}: [source] must be a table with a 'path'")
    site_tables = document.get("sites")
    if not isinstance(site_tables, list) or not site_tables:
        raise ScenarioError(f"{file}: no [[sites]] entries; add at least one target site with name and path")
    entries = []
    for position, table in enumerate(site_tables, start=1):
        where = f"[[sites]] entry {position}"
        entries.append((_required(table, "name", where, file), file.parent / _required(table, "path", where, file)))
    names = [entry[0] for entry in entries]
    if len(set(names)) != len(names):
        raise ScenarioError(f"{file}: site names must be unique, got {names}")
    source_path = file.parent / _required(source_table, "path", "[source]", file) if source_table else None

    first = source_path or entries[0][1]
    shape = tuple(head["input_shape"]) if "input_shape" in head else infer_input_shape(first, label_column)
    _check_shape(model.arch, shape, file)
    first_file = site_files(first)[0]
    feature_names = (
        tuple(csv_feature_names(first_file, label_column)) if first_file.suffix.lower() == ".csv" else None
    )

    def load(path: Path, site_name: str) -> SiteData:
        return load_site_data(path, shape, len(class_names), label_column=label_column, name=site_name, seed=seed)

    source = load(source_path, source_table.get("name", "source")) if source_path else None
    return Scenario(
        name=name,
        description=head.get("description", ""),
        source=source,
        sites=tuple(load(path, site_name) for site_name, path in entries),
        input_shape=shape,
        class_names=class_names,
        feature_names=feature_names,
        model=model,
        policy=policy,
        source_description=(source_table or {}).get(
            "description", f"source data {source_path.name}" if source_path else "none (trained from scratch)"
        ),
        preprocessing=head.get("preprocessing", "none: features used as provided by each site"),
    )


def load_scenario(name_or_path: str, seed: int = 0, data_dir: Path | None = None, private: bool = True) -> Scenario:
    """A built-in scenario by name, or a bring-your-own scenario from a ``.toml`` path.

    ``private=False`` (the run setting ``per-site-scaling``, for non-private reproduction runs
    only) preprocesses with statistics of the sites' own records where a published protocol
    does so (FLamby's per-centre z-scoring); every other run scales with public values.
    """
    text = str(name_or_path)
    if text.endswith(".toml"):
        scenario = _load_toml(Path(text), seed)
    elif text in _BUILTINS:
        scenario = _BUILTINS[text](seed, Path(data_dir) if data_dir is not None else None, private)
    else:
        raise ScenarioError(
            f"unknown scenario {text!r}; use one of {scenario_names()} or a path to a scenario .toml file"
        )
    logger.debug("scenario %s: %d sites, source %s", scenario.name, len(scenario.sites),
                "none" if scenario.source is None else len(scenario.source.train))
    return scenario
