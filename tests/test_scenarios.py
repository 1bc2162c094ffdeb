"""The scenario registry, the built-in scenarios and bring-your-own scenario files."""

from __future__ import annotations

import csv
import io
import os
import re
import runpy
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from common.cli import main as cli
from common.data import heart_disease
from common.data.scenarios import Scenario, ScenarioError, load_scenario, scenario_names
from common.data.site_data import DataError, DataFileNotFound, MissingValues
from common.model.pretraining import pretrain_source

HEART_DIR = Path(
    os.environ.get("FEDTRANSFER_DATA_DIR")
    or Path(__file__).resolve().parents[2] / "shared" / "data" / "fed-heart-disease"
)
SHARED = HEART_DIR.parent
needs_heart = pytest.mark.skipif(
    not HEART_DIR.is_dir(),
    reason=f"Fed-Heart-Disease files not available at {HEART_DIR} (no network downloads in tests)",
)
DOCS = Path(__file__).resolve().parents[1] / "docs" / "data.md"


def _splits(scenario: Scenario) -> list:
    parts = [scenario.source] if scenario.source is not None else []
    return parts + list(scenario.sites)


def _assert_valid(scenario: Scenario) -> None:
    for site in _splits(scenario):
        for split in (site.train, site.test):
            assert split.x.dtype == np.float32 and split.y.dtype == np.int64
            assert split.x.shape[1:] == scenario.input_shape
            assert np.isfinite(split.x).all()
            assert set(np.unique(split.y)) <= set(range(len(scenario.class_names)))
    names = [site.name for site in scenario.sites]
    assert len(set(names)) == len(names)


def test_registry_names() -> None:
    assert scenario_names() == ["wdbc", "heart-disease", "heart-disease-flamby", "synthetic-imaging", "pneumonia"]
    with pytest.raises(ScenarioError, match="unknown scenario"):
        load_scenario("mnist")


@pytest.mark.parametrize("name", ["wdbc", "synthetic-imaging"])
def test_deterministic_for_a_seed(name: str) -> None:
    first, again, other = load_scenario(name, seed=3), load_scenario(name, seed=3), load_scenario(name, seed=4)
    for a, b in zip(_splits(first), _splits(again)):
        np.testing.assert_array_equal(a.train.x, b.train.x)
        np.testing.assert_array_equal(a.test.y, b.test.y)
    assert not np.array_equal(first.sites[0].train.x, other.sites[0].train.x)


def test_wdbc_shapes_shift_and_label_skew() -> None:
    scenario = load_scenario("wdbc", seed=0)
    _assert_valid(scenario)
    assert scenario.input_shape == (30,) and len(scenario.feature_names) == 30
    assert scenario.class_names == ("benign", "malignant")
    assert scenario.model.arch == "mlp" and scenario.model.args == {"hidden": [32, 16]}
    assert scenario.transfer_policy in ("head", "last:1")
    assert len(scenario.sites) == 4
    source_rows = len(scenario.source.train) + len(scenario.source.test)
    assert 0.3 < source_rows / 569 < 0.4
    np.testing.assert_allclose(scenario.source.train.x.mean(axis=0), 0, atol=1e-5)
    rates = [np.concatenate([s.train.y, s.test.y]).mean() for s in scenario.sites]
    np.testing.assert_allclose(rates, [0.2, 0.35, 0.5, 0.7], atol=0.02)
    for site in scenario.sites:
        total = len(site.train) + len(site.test)
        assert 0.65 < len(site.train) / total < 0.75
        assert abs(site.train.y.mean() - site.test.y.mean()) < 0.05
    radius = scenario.feature_names.index("mean radius")
    benign_radius = [s.train.x[s.train.y == 0, radius].mean() for s in scenario.sites]
    assert benign_radius[0] < benign_radius[-1]


def test_wdbc_sites_disjoint() -> None:
    scenario = load_scenario("wdbc", seed=1)
    uncalibrated = [i for i, name in enumerate(scenario.feature_names) if "fractal dimension" in name]
    seen: set[tuple[float, ...]] = set()
    for site in [scenario.source, *scenario.sites]:
        rows = np.concatenate([site.train.x, site.test.x])[:, uncalibrated].round(4)
        values = {tuple(row) for row in rows.tolist()}
        assert len(values) == len(rows) and not values & seen
        seen |= values


def test_synthetic_imaging_shapes_and_shift() -> None:
    scenario = load_scenario("synthetic-imaging", seed=0)
    _assert_valid(scenario)
    assert scenario.input_shape[0] == 1 and len(scenario.input_shape) == 3
    assert scenario.model.arch == "cnn" and scenario.feature_names is None
    for site in _splits(scenario):
        assert 200 <= len(site.train) + len(site.test) <= 1000
        assert 0.2 < site.train.y.mean() < 0.8
    lesion_rates = [site.train.y.mean() for site in scenario.sites]
    assert len({round(r, 1) for r in lesion_rates}) > 2
    brightness = [site.train.x.mean() for site in scenario.sites]
    assert max(brightness) - min(brightness) > 0.5
    lesion = scenario.source.train.x[scenario.source.train.y == 1].max(axis=(1, 2, 3)).mean()
    plain = scenario.source.train.x[scenario.source.train.y == 0].max(axis=(1, 2, 3)).mean()
    assert lesion > plain


# --- heart disease ------------------------------------------------------------------


@needs_heart
def test_flamby_split_matches_reference_rows() -> None:
    reference = list(csv.DictReader((HEART_DIR / "flamby_split_seed43.csv").open()))
    expected_counts = [(199, 104), (172, 89), (30, 16), (85, 45)]
    for number, (rows, counts) in enumerate(zip(heart_disease.read_centres(SHARED), expected_counts)):
        assert (int(rows.is_train.sum()), int((~rows.is_train).sum())) == counts
        theirs = [
            (int(r["line_index"]), r["set"], int(r["label_binary"])) for r in reference if int(r["center"]) == number
        ]
        mine = [(int(i), "train" if t else "test", int(y)) for i, t, y in zip(rows.line_index, rows.is_train, rows.y)]
        assert mine == theirs


@needs_heart
def test_heart_disease_scenarios() -> None:
    transfer = load_scenario("heart-disease", data_dir=HEART_DIR)
    flamby = load_scenario("heart-disease-flamby", data_dir=SHARED, private=False)  # FLamby's own protocol: no DP
    for scenario in (transfer, flamby):
        _assert_valid(scenario)
        assert scenario.input_shape == (13,) and scenario.model.arch == "logreg" and scenario.transfer_policy == "full"
    assert transfer.source.name == "Cleveland"
    assert [s.name for s in transfer.sites] == ["Hungary", "Switzerland", "VA"]
    assert flamby.source is None
    assert [(len(s.train), len(s.test)) for s in flamby.sites] == [(199, 104), (172, 89), (30, 16), (85, 45)]
    for site in flamby.sites:
        mean = site.train.x.mean(axis=0)
        assert np.all(np.abs(mean) < 1e-5)
    assert flamby.sites[0].train.x.std(axis=0, ddof=1) == pytest.approx(np.ones(13), abs=1e-5)
    assert "NON-PRIVATE runs only" in flamby.preprocessing


@needs_heart
def test_private_runs_scale_with_public_statistics_only() -> None:
    """FLamby z-scores each centre with its own private records; private runs must not (the guarantee covers rows)."""
    transfer = load_scenario("heart-disease", data_dir=HEART_DIR)
    cleveland = transfer.source.train.x
    assert np.all(np.abs(cleveland.mean(axis=0)) < 1e-5)  # the source's own statistics: public to the coordinator
    for site in transfer.sites:  # the targets are scaled with Cleveland's, so their own means are not 0
        assert np.abs(site.train.x.mean(axis=0)).max() > 0.1
    raw = load_scenario("heart-disease", data_dir=HEART_DIR, private=False).sites[0]
    assert not np.allclose(raw.train.x, transfer.sites[0].train.x)
    flamby = load_scenario("heart-disease-flamby", data_dir=SHARED)
    assert "reference values" in flamby.preprocessing and "NON-PRIVATE" not in flamby.preprocessing
    assert all(np.abs(site.train.x.mean(axis=0)).max() > 1e-3 for site in flamby.sites)


@needs_heart
def test_heart_data_dir_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDTRANSFER_DATA_DIR", str(SHARED))
    assert len(load_scenario("heart-disease-flamby").sites) == 4


def test_heart_missing_data_dir_is_clear(tmp_path: Path) -> None:
    with pytest.raises(DataFileNotFound, match="FEDTRANSFER_DATA_DIR"):
        load_scenario("heart-disease", data_dir=tmp_path)


@needs_heart
def test_heart_download_from_file_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FEDTRANSFER_DATA_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    folder = heart_disease.download(tmp_path / "dl", base_url=HEART_DIR.as_uri())
    assert sorted(p.name for p in folder.iterdir()) == sorted(c.file_name for c in heart_disease.CENTRES)

    real_urlopen = urllib.request.urlopen

    def local(url: str, timeout: float) -> object:
        return real_urlopen(HEART_DIR.as_uri() + "/" + url.rsplit("/", 1)[1], timeout=timeout)

    monkeypatch.setattr(urllib.request, "urlopen", local)
    scenario = load_scenario("heart-disease-flamby")
    assert len(scenario.sites) == 4
    assert (tmp_path / "cache" / "fedtransfer" / "heart-disease" / "processed.va.data").is_file()


def test_heart_download_checksum_mismatch_not_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout: io.BytesIO(b"tampered"))
    with pytest.raises(DataError, match="not kept"):
        heart_disease.download(tmp_path / "dl")
    assert not list((tmp_path / "dl").iterdir())


def test_heart_download_offline_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(url: str, timeout: float) -> object:
        raise urllib.error.URLError("network unreachable")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    monkeypatch.delenv("FEDTRANSFER_DATA_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    with pytest.raises(DataError, match="--data-dir or the FEDTRANSFER_DATA_DIR"):
        load_scenario("heart-disease")


def test_heart_modified_local_file_rejected(tmp_path: Path) -> None:
    for centre in heart_disease.CENTRES:
        (tmp_path / centre.file_name).write_text("63,1,1,145,233,1,2,150,0,2.3,3,0,6,0\n")
    with pytest.raises(DataError, match="not the UCI original"):
        load_scenario("heart-disease", data_dir=tmp_path)


# --- bring your own -----------------------------------------------------------------


def _build_docs_example(root: Path) -> Path:
    blocks = re.findall(r"```\w+ file=(\S+)\n(.*?)```", DOCS.read_text(), flags=re.S)
    assert {name for name, _ in blocks} >= {"scenario.toml", "data/source.csv", "make_site_c.py"}
    for name, body in blocks:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(body)
    return root / "scenario.toml"


def test_docs_example_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    toml = _build_docs_example(tmp_path)
    monkeypatch.chdir(tmp_path)
    runpy.run_path(str(tmp_path / "make_site_c.py"))
    scenario = load_scenario(str(toml), seed=0)
    _assert_valid(scenario)
    assert scenario.name == "my-study"
    assert scenario.input_shape == (3,)
    assert scenario.feature_names == ("age", "systolic_bp", "biomarker")
    assert scenario.class_names == ("negative", "positive")
    assert scenario.model.arch == "mlp" and scenario.model.args == {"hidden": [32, 16]}
    assert scenario.transfer_policy == "head"
    assert [s.name for s in scenario.sites] == ["hospital-a", "hospital-b", "hospital-c"]
    assert (len(scenario.source.train), len(scenario.source.test)) == (12, 4)
    assert (len(scenario.sites[1].train), len(scenario.sites[1].test)) == (10, 4)
    assert scenario.source_description == "national registry extract, 16 patients"
    site_a = scenario.sites[0]
    every = np.concatenate([site_a.train.x, site_a.test.x])
    assert np.isclose(every[:, 2], 2.14).sum() == 1 and np.isclose(every[:, 1], 160).sum() == 1


def _write_toml(tmp_path: Path, text: str) -> str:
    toml = _build_docs_example(tmp_path)
    toml.write_text(text)
    return str(toml)


BASE = """
[scenario]
name = "s"
class_names = ["a", "b"]
[model]
arch = "{arch}"
transfer_policy = "{policy}"
[[sites]]
name = "x"
path = "data/site_a.csv"
"""
MLP = BASE.format(arch="mlp", policy="head")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (BASE.format(arch="resnet", policy="head"), "arch 'resnet' is unknown"),
        (BASE.format(arch="mlp", policy="top"), "transfer_policy 'top'"),
        (BASE.format(arch="cnn", policy="head"), "needs image data"),
        (BASE.format(arch="mlp", policy="head").replace('name = "s"\n', ""), "missing key 'name'"),
        (BASE.format(arch="mlp", policy="head").replace("[model]", "[modell]"), r"unknown table\(s\) \[modell\]"),
        (
            BASE.format(arch="mlp", policy="head").replace("transfer_policy", "polcy"),
            "unknown key 'polcy' in \\[model\\]",
        ),
        (BASE.format(arch="logreg", policy="head").replace("[model]", "[model]\nhidden = [8]"), "unknown key 'hidden'"),
        (
            BASE.format(arch="mlp", policy="head").replace("[model]", 'lable_column = "y"\n[model]'),
            "unknown key 'lable_column' in \\[scenario\\] \\(did you mean 'label_column'\\?\\)",
        ),
        (
            BASE.format(arch="mlp", policy="head").replace('arch = "mlp"', 'arhc = "mlp"'),
            "missing key 'arch' in \\[model\\]",
        ),
        (BASE.format(arch="mlp", policy="head") + "[pretrain]\nepochs = 0\n", r"\[pretrain\] epochs must be"),
        (BASE.format(arch="mlp", policy="head") + "[pretrain]\nepoch = 5\n", "unknown key 'epoch' in \\[pretrain\\]"),
        (BASE.format(arch="mlp", policy="head").split("[[sites]]")[0], r"no \[\[sites\]\]"),
        (BASE.format(arch="mlp", policy="head") + '[[sites]]\nname = "x"\npath = "data/site_a.csv"\n', "unique"),
        ("[scenario\n", "not valid TOML"),
    ],
)
def test_toml_errors(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ScenarioError, match=message):
        load_scenario(_write_toml(tmp_path, text))


def test_a_bad_scenario_file_is_one_line_with_status_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _write_toml(tmp_path, BASE.format(arch="mlp", policy="head").replace("transfer_policy", "polcy"))
    assert cli.main(["pretrain", "--scenario", path, "--out", str(tmp_path / "ckpt")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "unknown key 'polcy' in [model]" in err and "transfer_policy" in err


def test_pretrain_table_tunes_the_source_model(tmp_path: Path) -> None:
    text = BASE.format(arch="mlp", policy="head").replace(
        "[[sites]]", "[pretrain]\nepochs = 3\npatience = 0\n[[sites]]"
    )
    text = text.replace("[[sites]]", '[source]\npath = "data/source.csv"\n[[sites]]', 1)
    scenario = load_scenario(_write_toml(tmp_path, text))
    assert scenario.pretrain == {"epochs": 3, "patience": 0}
    card = pretrain_source(scenario, tmp_path / "ckpt", seed=0)
    assert card.lineage["epochs_trained"] == 3 and card.lineage["pretrain"]["epochs"] == 3
    assert {"source_validation", "source_test"} <= set(card.lineage) and len(card.class_prior) == 2
    assert card.lineage["validation_examples"] == 3 and card.lineage["train_examples"] == 9  # 20% of 12 held out


def test_toml_without_source_and_data_errors(tmp_path: Path) -> None:
    path = _write_toml(tmp_path, BASE.format(arch="logreg", policy="full"))
    scenario = load_scenario(path)
    assert scenario.source is None and scenario.source_description.startswith("none")
    (tmp_path / "data" / "site_a.csv").write_text("age,systolic_bp,label,biomarker\n" + "1,2,0,\n" * 12)
    with pytest.raises(MissingValues, match="site_a.csv"):
        load_scenario(path)
    with pytest.raises(ScenarioError, match="not found"):
        load_scenario(str(tmp_path / "absent.toml"))
