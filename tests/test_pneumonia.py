"""The ``pneumonia`` scenario: the file found where a user puts it and checksum-verified, hospitals as documented.

The PneumoniaMNIST file is never committed; these tests read it from ``$FEDTRANSFER_PNEUMONIA_DIR``
(``.ci/run`` exports it) or the shared data folder beside the repository, and are skipped only
when it is in neither place.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from common.data import pneumonia
from common.data.scenarios import load_scenario, scenario_names
from common.data.site_data import DataError

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get(pneumonia.DIR_ENV) or REPO.parent / "shared" / "data" / "pneumoniamnist")
pytestmark = pytest.mark.skipif(
    not (DATA_DIR / pneumonia.FILE_NAME).is_file(),
    reason=f"the PneumoniaMNIST file is absent ({DATA_DIR}; set {pneumonia.DIR_ENV})",
)


@pytest.fixture
def no_data_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(pneumonia.DIR_ENV, raising=False)
    monkeypatch.delenv(pneumonia.SHARED_DIR_ENV, raising=False)


@pytest.fixture(scope="module")
def arrays() -> dict[str, np.ndarray]:
    return pneumonia.load_pneumoniamnist(DATA_DIR)


def test_the_file_is_found_by_data_dir_or_either_variable(tmp_path: Path, no_data_env, monkeypatch) -> None:
    folder = tmp_path / "data" / pneumonia.SUBDIRECTORY
    folder.mkdir(parents=True)
    (folder / pneumonia.FILE_NAME).symlink_to(DATA_DIR / pneumonia.FILE_NAME)
    assert pneumonia.find_file(folder) == folder / pneumonia.FILE_NAME
    assert pneumonia.find_file(tmp_path / "data") == folder / pneumonia.FILE_NAME  # its pneumoniamnist/ subfolder
    monkeypatch.setenv(pneumonia.DIR_ENV, str(folder))
    assert pneumonia.find_file() == folder / pneumonia.FILE_NAME
    monkeypatch.delenv(pneumonia.DIR_ENV)
    monkeypatch.setenv(pneumonia.SHARED_DIR_ENV, str(tmp_path / "data"))  # beside the heart-disease files
    assert pneumonia.find_file() == folder / pneumonia.FILE_NAME


def test_a_missing_file_says_where_it_goes(tmp_path: Path, no_data_env) -> None:
    with pytest.raises(pneumonia.PneumoniaDataMissing, match=f"{pneumonia.FILE_NAME} not found.*{pneumonia.DIR_ENV}"):
        load_scenario("pneumonia", data_dir=tmp_path)


def test_a_file_with_another_checksum_is_refused(tmp_path: Path, no_data_env) -> None:
    content = bytearray((DATA_DIR / pneumonia.FILE_NAME).read_bytes())
    content[-100] ^= 1
    (tmp_path / pneumonia.FILE_NAME).write_bytes(bytes(content))
    with pytest.raises(DataError, match="sha256"):
        pneumonia.load_pneumoniamnist(tmp_path)


def test_the_official_splits_are_read_as_documented(arrays) -> None:
    counts = {split: np.bincount(arrays[f"{split}_y"]).tolist() for split in ("train", "val", "test")}
    assert counts == {"train": [1214, 3494], "val": [135, 389], "test": [234, 390]}
    assert arrays["train_x"].shape == (4708, 1, 28, 28) and arrays["train_x"].dtype == np.float32
    assert 0.0 <= arrays["train_x"].min() and arrays["train_x"].max() <= 1.0


def test_hospitals_hold_disjoint_rows_with_their_documented_skew(arrays) -> None:
    rows = pneumonia.hospital_rows(arrays["train_y"], arrays["test_y"], seed=0)
    train_sets = [set(rows.source.tolist())] + [set(train.tolist()) for train, _ in rows.targets]
    assert sum(len(s) for s in train_sets) == len(set().union(*train_sets))
    tests = [test for _, test in rows.targets]
    assert sorted(np.concatenate(tests).tolist()) == list(range(len(arrays["test_y"])))  # the whole test split, once
    assert len(rows.source) == pneumonia.SOURCE_IMAGES
    for target, (train, test) in zip(pneumonia.TARGETS, rows.targets):
        assert len(train) == target.train_images
        assert arrays["train_y"][train].mean() == pytest.approx(target.pneumonia_rate, abs=0.01)
        assert arrays["test_y"][test].mean() == pytest.approx(target.pneumonia_rate, abs=0.05)
    other = pneumonia.hospital_rows(arrays["train_y"], arrays["test_y"], seed=1)
    assert not np.array_equal(other.source, rows.source)


def test_scenario_source_is_unaltered_and_targets_are_shifted(arrays) -> None:
    scenario = load_scenario("pneumonia", seed=0, data_dir=DATA_DIR)
    assert "pneumonia" in scenario_names()
    assert scenario.model.arch == "torchvision:resnet18" and scenario.transfer_policy == "head"
    assert scenario.input_shape == (1, 28, 28) and scenario.class_names == ("normal", "pneumonia")
    assert "CC BY 4.0" in scenario.data_licence
    rows = pneumonia.hospital_rows(arrays["train_y"], arrays["test_y"], seed=0)
    assert np.array_equal(scenario.source.train.x, arrays["train_x"][rows.source])
    assert np.array_equal(scenario.source.test.x, arrays["test_x"])
    for site, (train, _) in zip(scenario.sites, rows.targets):
        assert site.train.x.shape == (len(train), 1, 28, 28)
        assert np.array_equal(site.train.y, arrays["train_y"][train])
        assert not np.allclose(site.train.x, arrays["train_x"][train], atol=0.02)  # the acquisition shift
        assert 0.0 <= site.train.x.min() and site.train.x.max() <= 1.0
    again = load_scenario("pneumonia", seed=0, data_dir=DATA_DIR)
    assert all(np.array_equal(a.train.x, b.train.x) for a, b in zip(scenario.sites, again.sites))
    mean = scenario.model.args["mean"]
    assert mean == [pytest.approx(float(scenario.source.train.x.mean()))] * 3
