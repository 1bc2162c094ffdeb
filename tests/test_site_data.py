"""Loading, validating, writing and fingerprinting a site's own data files."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest

from common.data.site_data import (
    MIN_ROWS,
    BadLabel,
    DataError,
    DataFileNotFound,
    MissingLabelColumn,
    MissingValues,
    NonNumericValue,
    ShapeMismatch,
    SingleClass,
    SiteData,
    Split,
    TooFewRows,
    UnsupportedFormat,
    dataset_fingerprint,
    infer_input_shape,
    load_site_data,
    write_site_data,
)


def _rows(n: int = 20, d: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, d)).round(4), np.arange(n) % 2


def _write_csv(path: Path, x: np.ndarray, y: np.ndarray, header: list[str] | None = None) -> Path:
    header = header or [f"f{i}" for i in range(x.shape[1])] + ["label"]
    lines = [",".join(header)] + [",".join([*map(str, row), str(label)]) for row, label in zip(x, y)]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_csv_single_file_split_reproducible(tmp_path: Path) -> None:
    x, y = _rows(40)
    path = _write_csv(tmp_path / "site.csv", x, y)
    site = load_site_data(path, (3,), 2, seed=1)
    again = load_site_data(path, (3,), 2, seed=1)
    assert site.name == "site"
    assert len(site.train) == 30 and len(site.test) == 10
    assert site.train.x.dtype == np.float32 and site.train.y.dtype == np.int64
    np.testing.assert_array_equal(site.train.x, again.train.x)
    assert np.bincount(site.test.y).tolist() == [5, 5]
    every = np.concatenate([site.train.x, site.test.x])
    np.testing.assert_allclose(np.sort(every[:, 0]), np.sort(x[:, 0]), rtol=1e-6)
    other = load_site_data(path, (3,), 2, seed=2)
    assert not np.array_equal(site.train.x, other.train.x)


def test_csv_label_column_anywhere_and_custom_name(tmp_path: Path) -> None:
    path = tmp_path / "s.csv"
    path.write_text("outcome,a,b\n" + "".join(f"{i % 2},{i},{2 * i}\n" for i in range(12)))
    site = load_site_data(path, (2,), 2, label_column="outcome")
    row = site.train.x[0]
    assert row[1] == 2 * row[0]


def test_npz_and_csv_directory_round_trip(tmp_path: Path) -> None:
    x, y = _rows(30)
    site = SiteData("h", Split(x[:20], y[:20]), Split(x[20:], y[20:]))
    write_site_data(site, tmp_path / "npz", feature_names=["a", "b", "c"])
    loaded = load_site_data(tmp_path / "npz", (3,), 2)
    assert loaded.name == "npz"
    np.testing.assert_array_equal(loaded.train.x, site.train.x)
    np.testing.assert_array_equal(loaded.test.y, site.test.y)
    (tmp_path / "csv").mkdir()
    _write_csv(tmp_path / "csv" / "train.csv", x[:20], y[:20])
    _write_csv(tmp_path / "csv" / "test.csv", x[20:], y[20:])
    from_csv = load_site_data(tmp_path / "csv", (3,), 2)
    np.testing.assert_array_equal(from_csv.train.x, site.train.x)
    assert infer_input_shape(tmp_path / "csv") == (3,)
    assert infer_input_shape(tmp_path / "npz") == (3,)


def test_image_npz_shapes(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    y = np.arange(20) % 2
    np.savez(tmp_path / "img.npz", x=rng.random((20, 8, 8)), y=y)
    site = load_site_data(tmp_path / "img.npz", (1, 8, 8), 2)
    assert site.train.x.shape[1:] == (1, 8, 8)
    with pytest.raises(ShapeMismatch, match=r"\(1, 6, 6\)"):
        load_site_data(tmp_path / "img.npz", (1, 6, 6), 2)
    flat = _write_csv(tmp_path / "flat.csv", rng.random((20, 16)).round(3), y)
    assert load_site_data(flat, (1, 4, 4), 2).train.x.shape[1:] == (1, 4, 4)


def test_write_is_deterministic(tmp_path: Path) -> None:
    x, y = _rows(30)
    site = SiteData("h", Split(x[:20], y[:20]), Split(x[20:], y[20:]))
    write_site_data(site, tmp_path / "a")
    first = dataset_fingerprint(tmp_path / "a")
    (tmp_path / "a" / "train.npz").unlink()
    write_site_data(site, tmp_path / "a")
    write_site_data(site, tmp_path / "b")
    assert dataset_fingerprint(tmp_path / "a") == first == dataset_fingerprint(tmp_path / "b")
    assert (tmp_path / "a" / "test.npz").read_bytes() == (tmp_path / "b" / "test.npz").read_bytes()
    with zipfile.ZipFile(tmp_path / "a" / "train.npz") as archive:
        assert {info.date_time for info in archive.infolist()} == {(1980, 1, 1, 0, 0, 0)}
    changed = SiteData("h", Split(x[:20] + 1, y[:20]), site.test)
    write_site_data(changed, tmp_path / "a")
    assert dataset_fingerprint(tmp_path / "a") != first


def test_fingerprint_of_single_file_is_its_sha256(tmp_path: Path) -> None:
    import hashlib

    x, y = _rows()
    path = _write_csv(tmp_path / "s.csv", x, y)
    assert dataset_fingerprint(path) == hashlib.sha256(path.read_bytes()).hexdigest()


# --- validation errors ---------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataFileNotFound, match="nope.csv"):
        load_site_data(tmp_path / "nope.csv", (3,), 2)
    (tmp_path / "dir").mkdir()
    _write_csv(tmp_path / "dir" / "train.csv", *_rows())
    with pytest.raises(DataFileNotFound, match="test.csv or test.npz"):
        load_site_data(tmp_path / "dir", (3,), 2)


def test_unsupported_extension(tmp_path: Path) -> None:
    path = tmp_path / "site.xlsx"
    path.write_bytes(b"x")
    with pytest.raises(UnsupportedFormat, match=r"\.xlsx"):
        load_site_data(path, (3,), 2)


def test_missing_label_column(tmp_path: Path) -> None:
    path = _write_csv(tmp_path / "s.csv", *_rows(), header=["a", "b", "c", "target"])
    with pytest.raises(MissingLabelColumn, match="'label'"):
        load_site_data(path, (3,), 2)
    semicolon = tmp_path / "semi.csv"
    semicolon.write_text("a;b;label\n" + "1;2;0\n" * 12)
    with pytest.raises(MissingLabelColumn, match="separator"):
        load_site_data(semicolon, (2,), 2)
    np.savez(tmp_path / "noy.npz", x=np.zeros((12, 3)))
    with pytest.raises(MissingLabelColumn, match="'y'"):
        load_site_data(tmp_path / "noy.npz", (3,), 2)


def test_non_numeric_value_names_line_and_column(tmp_path: Path) -> None:
    x, y = _rows()
    path = _write_csv(tmp_path / "s.csv", x, y)
    lines = path.read_text().splitlines()
    cells = lines[4].split(",")
    cells[1] = "12 mg/dl"
    lines[4] = ",".join(cells)
    path.write_text("\n".join(lines))
    with pytest.raises(NonNumericValue, match=r"line 5, column 'f1'.*12 mg/dl"):
        load_site_data(path, (3,), 2)


def test_infinite_value_refused(tmp_path: Path) -> None:
    x, y = _rows()
    x[3, 2] = np.inf
    with pytest.raises(NonNumericValue, match="infinite"):
        load_site_data(_write_csv(tmp_path / "s.csv", x, y), (3,), 2)


@pytest.mark.parametrize("cell", ["", "NA", "nan", "?"])
def test_missing_values_in_csv(tmp_path: Path, cell: str) -> None:
    x, y = _rows()
    path = _write_csv(tmp_path / "s.csv", x, y)
    lines = path.read_text().splitlines()
    cells = lines[7].split(",")
    cells[2] = cell
    lines[7] = ",".join(cells)
    path.write_text("\n".join(lines))
    with pytest.raises(MissingValues, match=r"1 missing value \(empty, NA or NaN\): line 8 column 'f2'; fill"):
        load_site_data(path, (3,), 2)


def test_every_missing_cell_is_counted_and_the_first_ten_named(tmp_path: Path) -> None:
    rows = "\n".join(f"{i},,{i % 2}" if i % 3 else f"{i},NA,{i % 2}" for i in range(30))
    path = tmp_path / "s.csv"
    path.write_text("a,b,label\n" + rows + "\n")
    with pytest.raises(MissingValues) as caught:
        load_site_data(path, (2,), 2)
    message = str(caught.value)
    assert "30 missing values" in message and message.count("column 'b'") == 10 and "; ..." in message
    assert "line 2 column 'b'" in message and "line 12 column 'b'" not in message


def test_grey_images_without_a_channel_axis_are_accepted(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    path = tmp_path / "site.npz"
    np.savez(path, x=rng.random((20, 6, 6)).astype("float32"), y=np.arange(20) % 2)
    shape = infer_input_shape(path)
    assert shape == (1, 6, 6)
    assert load_site_data(path, shape, 2).train.x.shape[1:] == (1, 6, 6)


def test_short_row_and_nan_in_npz(tmp_path: Path) -> None:
    path = tmp_path / "s.csv"
    path.write_text("a,b,label\n" + "1,2,0\n1,2,1\n" * 6 + "1,0\n")
    with pytest.raises(MissingValues, match="line 14"):
        load_site_data(path, (2,), 2)
    x, y = _rows()
    x[5, 1] = np.nan
    np.savez(tmp_path / "n.npz", x=x, y=y)
    with pytest.raises(MissingValues, match="row 5"):
        load_site_data(tmp_path / "n.npz", (3,), 2)


def test_wrong_feature_count(tmp_path: Path) -> None:
    path = _write_csv(tmp_path / "s.csv", *_rows(d=4))
    with pytest.raises(ShapeMismatch, match=r"4 features.*\(3,\)"):
        load_site_data(path, (3,), 2)


def test_wrong_image_shape(tmp_path: Path) -> None:
    np.savez(tmp_path / "img.npz", x=np.zeros((20, 1, 10, 10)), y=np.arange(20) % 2)
    with pytest.raises(ShapeMismatch, match=r"\(1, 12, 12\)"):
        load_site_data(tmp_path / "img.npz", (1, 12, 12), 2)


def test_single_class(tmp_path: Path) -> None:
    x, _ = _rows()
    with pytest.raises(SingleClass, match="two classes"):
        load_site_data(_write_csv(tmp_path / "s.csv", x, np.ones(20, dtype=int)), (3,), 2)
    (tmp_path / "d").mkdir()
    y = np.arange(20) % 2
    _write_csv(tmp_path / "d" / "train.csv", x[:10], np.zeros(10, dtype=int))
    _write_csv(tmp_path / "d" / "test.csv", x[10:], y[10:])
    with pytest.raises(SingleClass, match="train.csv"):
        load_site_data(tmp_path / "d", (3,), 2)
    relaxed = load_site_data(tmp_path / "d", (3,), 2, require_two_train_classes=False)
    assert set(relaxed.train.y) == {0}
    _write_csv(tmp_path / "d" / "test.csv", x[10:], np.zeros(10, dtype=int))
    with pytest.raises(SingleClass):
        load_site_data(tmp_path / "d", (3,), 2, require_two_train_classes=False)


def test_too_few_rows(tmp_path: Path) -> None:
    x, y = _rows(MIN_ROWS - 1)
    with pytest.raises(TooFewRows, match=f"{MIN_ROWS - 1} data rows"):
        load_site_data(_write_csv(tmp_path / "s.csv", x, y), (3,), 2)
    (tmp_path / "d").mkdir()
    x, y = _rows(20)
    _write_csv(tmp_path / "d" / "train.csv", x[:19], y[:19])
    _write_csv(tmp_path / "d" / "test.csv", x[19:], y[19:])
    with pytest.raises(TooFewRows, match="test split has 1 rows"):
        load_site_data(tmp_path / "d", (3,), 2)
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(TooFewRows, match="empty"):
        load_site_data(empty, (3,), 2)


@pytest.mark.parametrize("bad", [2, -1, 0.5])
def test_bad_label(tmp_path: Path, bad: float) -> None:
    x, y = _rows()
    y = y.astype(float)
    y[6] = bad
    with pytest.raises(BadLabel, match=r"row 6.*0\.\.1"):
        load_site_data(_write_csv(tmp_path / "s.csv", x, y), (3,), 2)


def test_object_npz_refused_without_unpickling(tmp_path: Path) -> None:
    x = np.empty(20, dtype=object)
    x[:] = [{"evil": i} for i in range(20)]
    np.savez(tmp_path / "obj.npz", x=x, y=np.arange(20) % 2)
    with pytest.raises(UnsupportedFormat, match="pickled or object"):
        load_site_data(tmp_path / "obj.npz", (3,), 2)
    np.save(tmp_path / "pickled.npy", x, allow_pickle=True)
    (tmp_path / "pickled.npy").rename(tmp_path / "pickled.npz")
    with pytest.raises(UnsupportedFormat):
        load_site_data(tmp_path / "pickled.npz", (3,), 2)
    (tmp_path / "junk.npz").write_bytes(b"not a zip at all")
    with pytest.raises(UnsupportedFormat):
        load_site_data(tmp_path / "junk.npz", (3,), 2)


def test_text_npz_refused(tmp_path: Path) -> None:
    np.savez(tmp_path / "t.npz", x=np.full((20, 3), "a"), y=np.arange(20) % 2)
    with pytest.raises(NonNumericValue, match="dtype"):
        load_site_data(tmp_path / "t.npz", (3,), 2)


def test_all_errors_are_data_errors() -> None:
    for kind in (
        DataFileNotFound,
        UnsupportedFormat,
        MissingLabelColumn,
        NonNumericValue,
        MissingValues,
        ShapeMismatch,
        SingleClass,
        TooFewRows,
        BadLabel,
    ):
        assert issubclass(kind, DataError)
