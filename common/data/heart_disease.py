"""FLamby Fed-Heart-Disease: the UCI Heart Disease files of 4 hospitals, FLamby's preprocessing.

Preprocessing follows FLamby's ``fed_heart_disease`` dataset: drop columns slope, ca,
thal (10, 11, 12); drop rows with a missing value; label = num > 0; per-centre 66/34
split with ``train_test_split(random_state=43)``, stratified when both classes have more
than 2 rows; one-hot ``cp`` and ``restecg`` dropping the first level (13 features);
z-score each centre with the mean and (unbiased) std of its own train split, plus 1e-9.

FLamby's per-centre z-scoring computes statistics from each centre's private records
before any DP, so it is used only for non-private reproduction runs (``scaling =
"per-centre"``). Private runs scale with public values instead: Cleveland's training
statistics where Cleveland is the coordinator's source (``"source"``), or fixed clinical
reference values chosen without looking at any centre (``"reference"``).

The raw files are looked up in ``data_dir``, else ``$FEDTRANSFER_DATA_DIR``, else a cache
directory where they are downloaded from UCI and checked against known checksums.
"""

from __future__ import annotations

import hashlib
import logging
import os
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.model_selection import train_test_split

from common.data.scenario import ModelSpec, Scenario
from common.data.site_data import DataError, DataFileNotFound, SiteData, Split
from common.io import write_atomic

logger = logging.getLogger(__name__)

UCI_BASE_URL = "https://archive.ics.uci.edu/ml/machine-learning-databases/heart-disease/"
DATA_DIR_ENV = "FEDTRANSFER_DATA_DIR"
SUBDIRECTORY = "fed-heart-disease"
TRAIN_FRACTION = 0.66
SPLIT_RANDOM_STATE = 43
STD_EPSILON = 1e-9
FEATURE_NAMES = (
    "age",
    "sex",
    "trestbps",
    "chol",
    "fbs",
    "thalach",
    "exang",
    "oldpeak",
    "cp_2",
    "cp_3",
    "cp_4",
    "restecg_1",
    "restecg_2",
)
CLASS_NAMES = ("no disease", "disease")
_DROPPED_COLUMNS = (10, 11, 12)
_RAW_COLUMNS = 14


@dataclass(frozen=True)
class Centre:
    """One hospital of Fed-Heart-Disease and the checksums of its raw UCI file."""

    key: str
    name: str
    file_name: str
    md5: str
    sha256: str


CENTRES = (
    Centre(
        "cleveland",
        "Cleveland",
        "processed.cleveland.data",
        "2d91a8ff69cfd9616aa47b59d6f843db",
        "a74b7efa387bc9d108d7d0115d831fe9b414b29ae7124f331b622b4efa0427c8",
    ),
    Centre(
        "hungarian",
        "Hungary",
        "processed.hungarian.data",
        "22e96bee155b5973568101c93b3705f6",
        "d1ad108f785768cd3d7e82dc522e6f5a61eea93cccfb3a46ee8076f73fc3d796",
    ),
    Centre(
        "switzerland",
        "Switzerland",
        "processed.switzerland.data",
        "9a87f7577310b3917730d06ba9349e20",
        "834a405ccf5b66ab4056bb77794adc8df0b7125186454c0a1d002d33c6c3b314",
    ),
    Centre(
        "va",
        "VA",
        "processed.va.data",
        "4249d03ca7711e84f4444768c9426170",
        "e7c93d8d0d2acdadfa4c5e8de768e2191e7f618b952e29623f1f0d5949ff6b8f",
    ),
)


class DownloadError(DataError):
    """The UCI files could not be downloaded, or their checksums do not match."""


@dataclass(frozen=True)
class CentreRows:
    """A centre's kept rows before encoding: raw line numbers, train mask, features, labels."""

    centre: Centre
    line_index: np.ndarray
    is_train: np.ndarray
    raw: np.ndarray
    y: np.ndarray


def default_cache_dir() -> Path:
    """Where downloaded files are kept: ``$XDG_CACHE_HOME/fedtransfer/heart-disease`` (``~/.cache``)."""
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "fedtransfer" / "heart-disease"


def _checksum_problem(content: bytes, centre: Centre) -> str | None:
    md5 = hashlib.md5(content, usedforsecurity=False).hexdigest()
    sha256 = hashlib.sha256(content).hexdigest()
    if md5 == centre.md5 and sha256 == centre.sha256:
        return None
    return f"md5 {md5} / sha256 {sha256}, expected md5 {centre.md5} / sha256 {centre.sha256}"


def _files_in(directory: Path) -> Path | None:
    for candidate in (directory, directory / SUBDIRECTORY):
        if all((candidate / c.file_name).is_file() for c in CENTRES):
            return candidate
    return None


def download(directory: Path, base_url: str = UCI_BASE_URL, timeout: float = 30.0) -> Path:
    """Download the 4 raw files into ``directory``, keeping only files whose checksums match."""
    directory.mkdir(parents=True, exist_ok=True)
    for centre in CENTRES:
        target = directory / centre.file_name
        if target.is_file() and _checksum_problem(target.read_bytes(), centre) is None:
            continue
        url = base_url.rstrip("/") + "/" + centre.file_name
        logger.info("downloading %s", url)
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:
                content = response.read()
        except (OSError, ValueError) as err:
            raise DownloadError(
                f"cannot download {url} ({err}). Without internet access, get the 4 files "
                f"processed.{{cleveland,hungarian,switzerland,va}}.data from the UCI Heart Disease dataset "
                f"and pass their folder with --data-dir or the {DATA_DIR_ENV} environment variable"
            ) from None
        problem = _checksum_problem(content, centre)
        if problem is not None:
            raise DownloadError(
                f"{url}: downloaded file has {problem}; it was not kept. Retry later or pass verified files "
                f"with --data-dir / {DATA_DIR_ENV}"
            )
        write_atomic(target, content, mode=0o644)
    return directory


def resolve_data_dir(data_dir: Path | None = None, base_url: str = UCI_BASE_URL) -> Path:
    """The folder holding the 4 raw files: data_dir, else $FEDTRANSFER_DATA_DIR, else the download cache."""
    explicit = data_dir if data_dir is not None else os.environ.get(DATA_DIR_ENV) or None
    if explicit is not None:
        found = _files_in(Path(explicit))
        if found is None:
            raise DataFileNotFound(
                f"{explicit}: the Fed-Heart-Disease files {[c.file_name for c in CENTRES]} are not in this folder "
                f"(nor in its {SUBDIRECTORY}/ subfolder); check --data-dir / {DATA_DIR_ENV}"
            )
        return found
    cache = default_cache_dir()
    return _files_in(cache) or download(cache, base_url)


def _read_centre(path: Path, centre: Centre) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    content = path.read_bytes()
    problem = _checksum_problem(content, centre)
    if problem is not None:
        raise DataError(f"{path}: file has {problem}; it is not the UCI original. Replace it with the original file")
    lines, rows = [], []
    for number, line in enumerate(content.decode("ascii").splitlines()):
        cells = line.strip().split(",")
        if len(cells) != _RAW_COLUMNS:
            continue
        kept = [cell for i, cell in enumerate(cells) if i not in _DROPPED_COLUMNS]
        if "?" in kept:
            continue
        lines.append(number)
        rows.append([float(cell) for cell in kept])
    table = np.asarray(rows, dtype=np.float64)
    return np.asarray(lines, dtype=np.int64), table[:, :-1], (table[:, -1] > 0).astype(np.int64)


def _flamby_train_mask(y: np.ndarray) -> np.ndarray:
    counts = np.bincount(y, minlength=2)
    stratify = y if (counts > 0).sum() > 1 and all(c > 2 for c in counts if c > 0) else None
    _, test_index = train_test_split(
        np.arange(len(y)),
        test_size=1.0 - TRAIN_FRACTION,
        train_size=TRAIN_FRACTION,
        random_state=SPLIT_RANDOM_STATE,
        shuffle=True,
        stratify=stratify,
    )
    mask = np.ones(len(y), dtype=bool)
    mask[test_index] = False
    return mask


def _one_hot(raw: np.ndarray) -> np.ndarray:
    numeric = raw[:, [0, 1, 3, 4, 5, 7, 8, 9]]
    cp = np.stack([raw[:, 2] == level for level in (2.0, 3.0, 4.0)], axis=1)
    restecg = np.stack([raw[:, 6] == level for level in (1.0, 2.0)], axis=1)
    return np.concatenate([numeric, cp, restecg], axis=1)


def read_centres(data_dir: Path | None = None) -> list[CentreRows]:
    """Each centre's kept rows with FLamby's train/test assignment (before encoding)."""
    folder = resolve_data_dir(data_dir)
    result = []
    for centre in CENTRES:
        lines, raw, y = _read_centre(folder / centre.file_name, centre)
        result.append(CentreRows(centre, lines, _flamby_train_mask(y), raw, y))
    return result


def _zscored(x: np.ndarray, train: np.ndarray) -> np.ndarray:
    """``x`` z-scored with the mean and unbiased std of ``train`` (FLamby adds 1e-9 to the std)."""
    return (x - train.mean(axis=0)) / (train.std(axis=0, ddof=1) + STD_EPSILON)


def _standardised(rows: CentreRows) -> SiteData:
    x = _one_hot(rows.raw)
    x = _zscored(x, x[rows.is_train])
    return SiteData(
        rows.centre.name,
        Split(x[rows.is_train], rows.y[rows.is_train]),
        Split(x[~rows.is_train], rows.y[~rows.is_train]),
    )


#: Public reference values for ``scaling = "reference"`` (centre, scale) per encoded feature, fixed a
#: priori from typical adult clinical values (age in years, blood pressure in mm Hg, cholesterol in
#: mg/dl, maximum heart rate in beats per minute, ST depression in mm); binary and one-hot features
#: are centred at 0.5. No centre's data went into them.
REFERENCE_SCALING = (
    (55.0, 10.0),
    (0.5, 0.5),
    (130.0, 20.0),
    (220.0, 60.0),
    (0.5, 0.5),
    (140.0, 25.0),
    (0.5, 0.5),
    (1.0, 1.2),
    (0.5, 0.5),
    (0.5, 0.5),
    (0.5, 0.5),
    (0.5, 0.5),
    (0.5, 0.5),
)
SCALINGS = ("per-centre", "source", "reference")


def load_heart_disease(data_dir: Path | None = None, scaling: str = "per-centre") -> list[SiteData]:
    """The 4 centres (Cleveland, Hungary, Switzerland, VA) with FLamby's preprocessing and split.

    ``scaling``: ``"per-centre"`` (FLamby's, each centre's own train statistics: non-private
    runs only), ``"source"`` (Cleveland's train statistics for every centre), ``"reference"``
    (:data:`REFERENCE_SCALING`).
    """
    if scaling not in SCALINGS:
        raise ValueError(f"scaling must be one of {SCALINGS}, got {scaling!r}")
    centres = read_centres(data_dir)
    if scaling == "per-centre":
        return [_standardised(rows) for rows in centres]
    if scaling == "source":
        train = _one_hot(centres[0].raw)[centres[0].is_train]
        mean, std = train.mean(axis=0), train.std(axis=0, ddof=1) + STD_EPSILON
    else:
        mean, std = (np.asarray(column) for column in zip(*REFERENCE_SCALING))
    return [_scaled(rows, mean, std) for rows in centres]


def _scaled(rows: CentreRows, mean: np.ndarray, std: np.ndarray) -> SiteData:
    x = (_one_hot(rows.raw) - mean) / std
    return SiteData(
        rows.centre.name,
        Split(x[rows.is_train], rows.y[rows.is_train]),
        Split(x[~rows.is_train], rows.y[~rows.is_train]),
    )


def pooled_train_split(data_dir: Path | None = None) -> Split:
    """All centres' train rows z-scored with the pooled train mean and std: FLamby's pooled training data."""
    centres = read_centres(data_dir)
    x = np.concatenate([_one_hot(rows.raw)[rows.is_train] for rows in centres])
    y = np.concatenate([rows.y[rows.is_train] for rows in centres])
    return Split(_zscored(x, x), y)


_COMMON_STEPS = (
    "FLamby Fed-Heart-Disease: dropped slope, ca, thal; dropped rows with missing values; label = num > 0; "
    "per-centre 66/34 train/test split (random_state=43, stratified when both classes have > 2 rows); "
    "one-hot cp (levels 2,3,4) and restecg (levels 1,2); "
)
PREPROCESSING = {
    "per-centre": _COMMON_STEPS + "each centre z-scored with its own train mean and unbiased std (+1e-9), "
    "FLamby's choice: statistics of private records, used in NON-PRIVATE runs only",
    "source": _COMMON_STEPS + "every centre z-scored with Cleveland's (the source's) train mean and unbiased std "
    "(public to the coordinator; no target centre's data used)",
    "reference": _COMMON_STEPS + "every centre scaled with fixed clinical reference values (no centre's data used)",
}


# --- scenarios ----------------------------------------------------------------------


def heart_disease_scenario(seed: int, data_dir: Path | None, private: bool) -> Scenario:
    scaling = "source" if private else "per-centre"
    cleveland, *others = load_heart_disease(data_dir, scaling)
    return Scenario(
        name="heart-disease",
        description=(
            "UCI Heart Disease: pretrain on Cleveland, transfer to Hungary, Switzerland and VA Long Beach "
            "(FLamby Fed-Heart-Disease preprocessing and split)"
        ),
        source=cleveland,
        sites=tuple(others),
        input_shape=(len(FEATURE_NAMES),),
        class_names=CLASS_NAMES,
        feature_names=FEATURE_NAMES,
        model=ModelSpec("logreg", {}),
        transfer_policy="full",
        source_description=f"Cleveland Clinic Foundation, {len(cleveland.train)} training patients (FLamby split)",
        preprocessing=PREPROCESSING[scaling],
        # chosen on validation splits by `fedtransfer bench transfer` ("balanced + private personalisation";
        # BENCHMARKS.md), with each site's class weights from the class mix its policy declares
        recipe={
            "class_weights": "balanced",
            "personalise_fraction": 0.3,
            "personalise_epochs": 10,
            "personalise_lr": 0.5,
        },
    )


def heart_disease_flamby_scenario(seed: int, data_dir: Path | None, private: bool) -> Scenario:
    scaling = "reference" if private else "per-centre"
    centres = load_heart_disease(data_dir, scaling)
    return Scenario(
        name="heart-disease-flamby",
        description="FLamby Fed-Heart-Disease benchmark: all 4 hospitals as sites, trained from scratch",
        source=None,
        sites=tuple(centres),
        input_shape=(len(FEATURE_NAMES),),
        class_names=CLASS_NAMES,
        feature_names=FEATURE_NAMES,
        model=ModelSpec("logreg", {}),
        transfer_policy="full",
        source_description="none (trained from scratch)",
        preprocessing=PREPROCESSING[scaling],
    )
