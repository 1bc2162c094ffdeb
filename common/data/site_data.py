"""A site's own data files: formats, validation on load, deterministic writing, fingerprint.

Two formats are accepted:

* CSV: a header row, one named label column, every other column a numeric feature.
  For image models the features are the flattened pixels (C*H*W columns).
* NPZ: arrays ``x`` (n, *input_shape) and ``y`` (n,), stored without pickling.
  For single-channel image models ``x`` may also be (n, H, W).

A site is either a directory holding ``train.csv|train.npz`` and ``test.csv|test.npz``,
or one file that is split reproducibly (stratified, seeded) into train and test.
Every problem is reported as a :class:`DataError` subclass whose message names the file
and what to fix, so a hospital's data steward can act on it without reading code.
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import math
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.model_selection import train_test_split

from common.errors import DataError as FamilyDataError
from common.io import write_atomic

logger = logging.getLogger(__name__)

MIN_ROWS = 10
FORMATS = (".csv", ".npz")
MISSING_MARKERS = frozenset({"", "na", "n/a", "nan", "null", "none", "?", "-"})
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)


class DataError(FamilyDataError):
    """A site's data file cannot be used; the message names the file and the fix."""


class DataFileNotFound(DataError):
    """The data file or directory does not exist, or a train/test file is missing."""


class UnsupportedFormat(DataError):
    """The file is not a readable CSV or NPZ (wrong extension, pickled/object arrays, corrupt)."""


class MissingLabelColumn(DataError):
    """The CSV has no column with the configured label name (or the NPZ has no ``y``)."""


class NonNumericValue(DataError):
    """A feature cell is text or infinite instead of a finite number."""


class MissingValues(DataError):
    """A cell is empty or NaN (or a row is shorter than the header)."""


class ShapeMismatch(DataError):
    """The feature count or image shape differs from the model card's input shape."""


class SingleClass(DataError):
    """The training data holds fewer than two classes, so nothing can be learned."""


class TooFewRows(DataError):
    """Fewer than MIN_ROWS rows in the file, or fewer than 2 in a train/test split."""


class BadLabel(DataError):
    """A label is not an integer in 0..num_classes-1."""


@dataclass(frozen=True, eq=False)
class Split:
    """One split of a site's data: features ``x`` (float32) and labels ``y`` (int64)."""

    x: np.ndarray
    y: np.ndarray

    def __post_init__(self) -> None:
        object.__setattr__(self, "x", np.ascontiguousarray(self.x, dtype=np.float32))
        object.__setattr__(self, "y", np.ascontiguousarray(self.y, dtype=np.int64))
        if self.y.ndim != 1 or len(self.x) != len(self.y):
            raise ValueError(f"x has {len(self.x)} rows but y has shape {self.y.shape}")

    def __len__(self) -> int:
        return len(self.y)


@dataclass(frozen=True, eq=False)
class SiteData:
    """A site's training and test data."""

    name: str
    train: Split
    test: Split


def _split_file_name(path: Path, stem: str) -> Path:
    found = [path / f"{stem}{ext}" for ext in FORMATS if (path / f"{stem}{ext}").is_file()]
    if not found:
        raise DataFileNotFound(
            f"{path}: no {stem}.csv or {stem}.npz in this directory; a site directory needs "
            "train.csv|train.npz and test.csv|test.npz (or pass a single .csv/.npz file to split)"
        )
    if len(found) > 1:
        raise UnsupportedFormat(f"{path}: both {found[0].name} and {found[1].name} exist; keep exactly one {stem} file")
    return found[0]


def site_files(path: Path) -> list[Path]:
    """The data file(s) of a site: ``[file]`` or ``[train, test]`` for a directory."""
    path = Path(path)
    if path.is_dir():
        return [_split_file_name(path, "train"), _split_file_name(path, "test")]
    if not path.exists():
        raise DataFileNotFound(f"{path}: file or directory not found; check the path in your configuration")
    if path.suffix.lower() not in FORMATS:
        raise UnsupportedFormat(
            f"{path}: unsupported file type {path.suffix!r}; use a .csv (header + label column) or an .npz (arrays x, "
            "y)"
        )
    return [path]


SHOWN_MISSING = 10


def _missing_error(path: Path, count: int, first: list[str]) -> MissingValues:
    """One error for every missing cell of a file: how many, and the first ten."""
    shown = "; ".join(first[:SHOWN_MISSING]) + ("; ..." if count > SHOWN_MISSING else "")
    return MissingValues(
        f"{path}: {count} missing value{'s' if count != 1 else ''} (empty, NA or NaN): {shown}; "
        "fill them in or remove those rows"
    )


def _parse_cell(text: str, path: Path, line: int, column: str) -> float:
    """A cell's number; NaN for a missing cell (the caller collects them)."""
    cell = text.strip()
    if cell.lower() in MISSING_MARKERS:
        return math.nan
    try:
        value = float(cell)
    except ValueError:
        raise NonNumericValue(
            f"{path}: line {line}, column {column!r} holds {text!r}, which is not a number; "
            "encode categories as numbers (e.g. one-hot) and remove units or text"
        ) from None
    if math.isinf(value):
        raise NonNumericValue(f"{path}: line {line}, column {column!r} is infinite ({text!r}); use a finite number")
    return value


def _read_csv_header(path: Path) -> list[str]:
    with path.open(newline="", encoding="utf-8-sig") as handle:
        header = next(csv.reader(handle), None)
    if not header:
        raise TooFewRows(f"{path}: the file is empty; it needs a header row and at least {MIN_ROWS} data rows")
    return [name.strip() for name in header]


def csv_feature_names(path: Path, label_column: str = "label") -> list[str]:
    """The feature column names of a CSV file, in file order (the label column removed)."""
    header = _read_csv_header(Path(path))
    return [name for name in header if name != label_column]


def _label_index(path: Path, header: list[str], label_column: str) -> int:
    if label_column in header:
        return header.index(label_column)
    hint = ""
    if len(header) == 1 and any(sep in header[0] for sep in ";\t|"):
        hint = " The header looks like it uses ';', tab or '|' as separator; save the file comma-separated."
    raise MissingLabelColumn(
        f"{path}: no label column {label_column!r} in the header {header[:8]}{'...' if len(header) > 8 else ''}; "
        f"rename your outcome column to {label_column!r} or set label_column in the scenario.{hint}"
    )


def _read_csv(path: Path, label_column: str) -> tuple[np.ndarray, np.ndarray]:
    header = _read_csv_header(path)
    label_at = _label_index(path, header, label_column)
    rows: list[list[float]] = []
    labels: list[float] = []
    missing: list[str] = []
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.reader(handle)
        next(reader)
        for cells in reader:
            line = reader.line_num
            if not cells or all(not cell.strip() for cell in cells):
                continue
            if len(cells) < len(header):
                missing += [f"line {line} column {name!r} (short row)" for name in header[len(cells) :]]
                continue
            if len(cells) > len(header):
                raise UnsupportedFormat(
                    f"{path}: line {line} has {len(cells)} cells but the header has {len(header)} columns; "
                    "remove the extra cells or quote values that contain commas"
                )
            values = [_parse_cell(cell, path, line, header[i]) for i, cell in enumerate(cells)]
            missing += [f"line {line} column {header[i]!r}" for i, value in enumerate(values) if math.isnan(value)]
            labels.append(values.pop(label_at))
            rows.append(values)
    if missing:
        raise _missing_error(path, len(missing), missing)
    x = np.asarray(rows, dtype=np.float64).reshape(len(rows), len(header) - 1)
    return x, np.asarray(labels, dtype=np.float64)


def _read_npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        archive = np.load(path, allow_pickle=False)
        if not isinstance(archive, np.lib.npyio.NpzFile):
            raise UnsupportedFormat(f"{path}: not an .npz archive; save it with numpy.savez(path, x=..., y=...)")
        with archive:
            if "y" not in archive.files:
                raise MissingLabelColumn(
                    f"{path}: no array 'y' (the labels); save with numpy.savez(path, x=..., y=...)"
                )
            if "x" not in archive.files:
                raise UnsupportedFormat(
                    f"{path}: no array 'x' (the features); save with numpy.savez(path, x=..., y=...)"
                )
            x, y = archive["x"], archive["y"]
    except ValueError as err:
        raise UnsupportedFormat(
            f"{path}: holds pickled or object-dtype arrays, which are refused for safety ({err}); "
            "save plain numeric arrays, e.g. numpy.savez(path, x=x.astype('float32'), y=y.astype('int64'))"
        ) from None
    except (OSError, zipfile.BadZipFile, EOFError) as err:
        raise UnsupportedFormat(f"{path}: cannot read the .npz archive ({err}); re-save it with numpy.savez") from None
    for key, array in (("x", x), ("y", y)):
        if not (np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_):
            raise NonNumericValue(f"{path}: array {key!r} has dtype {array.dtype}, not numbers; convert it to numbers")
    if y.ndim != 1 or len(y) != len(x):
        raise ShapeMismatch(f"{path}: 'y' has shape {y.shape} but needs one label per row of 'x' (shape ({len(x)},))")
    return x.astype(np.float64), y.astype(np.float64)


def _check_features(x: np.ndarray, path: Path, input_shape: tuple[int, ...]) -> np.ndarray:
    n = len(x)
    if x.ndim == 2 and len(input_shape) > 1 and x.shape[1] == math.prod(input_shape):
        x = x.reshape((n, *input_shape))
    elif len(input_shape) == 3 and input_shape[0] == 1 and x.shape[1:] == input_shape[1:]:
        x = x[:, None]
    if x.shape[1:] != input_shape:
        what = "features" if len(input_shape) == 1 else "values per image"
        got = x.shape[1] if x.ndim == 2 else x.shape[1:]
        raise ShapeMismatch(
            f"{path}: rows have shape {x.shape[1:]} ({got} {what}) but the model expects input shape "
            f"{input_shape}; provide exactly the features/image size listed in the model card"
        )
    nan = np.isnan(x)
    if nan.any():
        first = [f"row {p[0]} feature {tuple(p[1:])}" for p in np.argwhere(nan)[:SHOWN_MISSING].tolist()]
        raise _missing_error(path, int(nan.sum()), first)
    if np.isinf(x).any():
        position = np.argwhere(np.isinf(x))[0].tolist()
        raise NonNumericValue(
            f"{path}: row {position[0]} (0-based), feature index {tuple(position[1:])} is infinite; "
            "fill in or remove that row"
        )
    return x


def _check_labels(y: np.ndarray, path: Path, num_classes: int) -> np.ndarray:
    bad = ~np.isfinite(y) | (y != np.round(y)) | (y < 0) | (y > num_classes - 1)
    if bad.any():
        row = int(np.argmax(bad))
        raise BadLabel(
            f"{path}: label of row {row} (0-based) is {y[row]!r}; labels must be integers 0..{num_classes - 1} "
            f"({num_classes} classes)"
        )
    return y.astype(np.int64)


def _load_file(path: Path, input_shape: tuple[int, ...], num_classes: int, label_column: str) -> Split:
    if path.suffix.lower() == ".csv":
        x, y = _read_csv(path, label_column)
    else:
        x, y = _read_npz(path)
    x = _check_features(x, path, input_shape)
    return Split(x, _check_labels(y, path, num_classes))


def _require_rows(split: Split, path: Path, what: str) -> None:
    if len(split) < 2:
        raise TooFewRows(f"{path}: the {what} split has {len(split)} rows; it needs at least 2. Add more rows")


def _split_single(split: Split, path: Path, test_fraction: float, seed: int) -> tuple[Split, Split]:
    counts = np.bincount(split.y)
    stratify = split.y if counts[counts > 0].min() >= 2 else None
    index_train, index_test = train_test_split(
        np.arange(len(split)), test_size=test_fraction, random_state=seed, shuffle=True, stratify=stratify
    )
    return Split(split.x[index_train], split.y[index_train]), Split(split.x[index_test], split.y[index_test])


def load_site_data(
    path: Path,
    input_shape: Sequence[int],
    num_classes: int,
    label_column: str = "label",
    name: str | None = None,
    test_fraction: float = 0.25,
    seed: int = 0,
    require_two_train_classes: bool = True,
) -> SiteData:
    """Load and validate a site's data (a directory with train/test files, or one file to split).

    ``require_two_train_classes=False`` accepts a site whose own train split holds one class
    (as long as train and test together hold two), like FLamby's Switzerland centre.
    """
    path = Path(path)
    shape = tuple(int(d) for d in input_shape)
    files = site_files(path)
    if len(files) == 1:
        whole = _load_file(files[0], shape, num_classes, label_column)
        if len(whole) < MIN_ROWS:
            raise TooFewRows(f"{path}: {len(whole)} data rows; at least {MIN_ROWS} are needed. Add more rows")
        if len(np.unique(whole.y)) < 2:
            raise SingleClass(
                f"{path}: every row has label {int(whole.y[0])}; training needs at least two classes. "
                "Add rows of the other class(es)"
            )
        train, test = _split_single(whole, path, test_fraction, seed)
    else:
        train = _load_file(files[0], shape, num_classes, label_column)
        test = _load_file(files[1], shape, num_classes, label_column)
        if len(train) + len(test) < MIN_ROWS:
            raise TooFewRows(
                f"{path}: {len(train)} train + {len(test)} test rows; at least {MIN_ROWS} are needed. Add more rows"
            )
    _require_rows(train, files[0], "train")
    _require_rows(test, files[-1], "test")
    single_class_train = len(np.unique(train.y)) < 2
    if single_class_train and (require_two_train_classes or len(np.union1d(train.y, test.y)) < 2):
        raise SingleClass(
            f"{files[0]}: every training row has label {int(train.y[0])}; training needs at least two classes. "
            "Add rows of the other class(es)"
        )
    if single_class_train:
        logger.warning("%s: every training row has label %d; local training sees one class", files[0], train.y[0])
    site = SiteData(name or (path.stem if path.is_file() else path.name), train, test)
    logger.debug("loaded site %s from %s: %d train / %d test rows", site.name, path, len(train), len(test))
    return site


def _npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as archive:
        for key in sorted(arrays):
            member = io.BytesIO()
            np.lib.format.write_array(member, np.ascontiguousarray(arrays[key]), allow_pickle=False)
            info = zipfile.ZipInfo(f"{key}.npy", date_time=_ZIP_DATE)
            info.create_system = 3
            info.external_attr = 0o644 << 16
            info.compress_type = zipfile.ZIP_STORED
            archive.writestr(info, member.getvalue())
    return buffer.getvalue()


def _write_if_changed(target: Path, content: bytes) -> None:
    if not (target.is_file() and target.read_bytes() == content):
        write_atomic(target, content, mode=0o644)


def write_site_data(site: SiteData, directory: Path, feature_names: Sequence[str] | None = None) -> None:
    """Write ``directory/train.npz`` and ``directory/test.npz`` with deterministic bytes."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for stem, split in (("train", site.train), ("test", site.test)):
        arrays = {"x": split.x.astype(np.float32), "y": split.y.astype(np.int64)}
        if feature_names is not None:
            arrays["feature_names"] = np.asarray([str(n) for n in feature_names], dtype=np.str_)
        _write_if_changed(directory / f"{stem}.npz", _npz_bytes(arrays))
    logger.debug("wrote site %s to %s", site.name, directory)


def dataset_fingerprint(path: Path) -> str:
    """sha256 hex of a site's data file(s): the dataset identity a privacy budget follows."""
    path = Path(path)
    files = site_files(path)
    digest = hashlib.sha256()
    if path.is_dir():
        for file in sorted(files, key=lambda f: f.name):
            content = file.read_bytes()
            digest.update(f"{file.name}\0{len(content)}\0".encode())
            digest.update(content)
    else:
        digest.update(files[0].read_bytes())
    return digest.hexdigest()


def infer_input_shape(path: Path, label_column: str = "label") -> tuple[int, ...]:
    """The per-row input shape of a site's data: (n_features,) for CSV, x.shape[1:] for NPZ."""
    first = site_files(Path(path))[0]
    if first.suffix.lower() == ".csv":
        header = _read_csv_header(first)
        _label_index(first, header, label_column)
        return (len(header) - 1,)
    x, _ = _read_npz(first)
    if x.ndim == 3:  # (n, H, W): one grey channel
        return (1, *(int(d) for d in x.shape[1:]))
    return tuple(int(d) for d in x.shape[1:])
