"""Smoke runs of every registered benchmark: the files, the keys, sane numbers (never speed)."""

from __future__ import annotations

import argparse
import importlib
import json
import math
from pathlib import Path
from typing import Any

import pytest

from common.cli import bench as cli_bench
from simulations.benchmarks import _MODULES, BENCHMARKS
from tests.conftest import numbers_in

pytestmark = pytest.mark.slow

TOP_KEYS = {"benchmark", "quick", "seed", "machine"}
MACHINE_KEYS = {"platform", "cores", "torch", "python", "torch_threads", "load_average"}
TRAFFIC_KEYS = {
    "scenario",
    "arch",
    "transfer_policy",
    "default_transfer_policy",
    "trainable_params",
    "total_params",
    "tensor_bytes",
    "plain_wire",
    "envelope_bytes",
    "envelope_header",
    "sealed_wire",
    "fixed_wire",
    "overhead_fraction",
    "sealed_over_plain",
    "full_wire",
    "full_sealed_wire",
    "trainable_fraction",
    "full_over_plain",
    "full_over_sealed",
    "meets_overhead_target",
}
POSITIVE_TRAFFIC = (
    "trainable_params",
    "total_params",
    "tensor_bytes",
    "plain_wire",
    "envelope_bytes",
    "envelope_header",
    "sealed_wire",
    "fixed_wire",
    "sealed_over_plain",
    "full_wire",
    "full_sealed_wire",
    "trainable_fraction",
    "full_over_plain",
    "full_over_sealed",
)


OWN = {"dp", "crypto", "comm"}  # the other benchmarks have their own smoke tests


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, dict[str, Any]]]:
    out = tmp_path_factory.mktemp("bench")
    return out, {name: BENCHMARKS[name](out, quick=True, seed=0) for name in OWN}


def _positive(record: dict[str, Any], keys: tuple[str, ...]) -> None:
    for key in keys:
        assert record[key] > 0 and math.isfinite(record[key]), f"{key} = {record[key]!r}"


def test_registry_names_match_modules() -> None:
    assert OWN <= set(BENCHMARKS) == set(_MODULES)
    for module in _MODULES.values():
        assert callable(importlib.import_module(module).run), module
    for name in OWN:
        assert importlib.import_module(_MODULES[name]).NAME == name


def test_every_benchmark_writes_json_and_markdown(results: tuple[Path, dict[str, dict[str, Any]]]) -> None:
    out, figures = results
    for name, result in figures.items():
        written = json.loads((out / f"{name}.json").read_text())
        assert written == json.loads(json.dumps(result))
        assert TOP_KEYS <= set(written) and written["benchmark"] == name and written["quick"] is True
        assert MACHINE_KEYS <= set(written["machine"])
        assert all(math.isfinite(n) for n in numbers_in(written)), f"{name}: a figure is NaN or infinite"
        markdown = (out / f"{name}.md").read_text()
        assert f"fedtransfer bench {name} --quick" in markdown
        assert written["machine"]["platform"] in markdown and "|---" in markdown


def test_dp_figures(results: tuple[Path, dict[str, dict[str, Any]]]) -> None:
    dp = results[1]["dp"]
    assert {"repetitions", "warmup", "config", "targets", "cases"} <= set(dp)
    assert {(c["scenario"], c["transfer_policy"]) for c in dp["cases"]} >= {
        ("wdbc", "head"),
        ("synthetic-imaging", "last:1"),
    }
    for case in dp["cases"]:
        assert set(case["modes"]) <= set(dp["modes"])
        modes = {f"dp_cached:{mode}" for mode in case["modes"]}
        assert (
            set(case["seconds"]) == {"plain_uncached", "plain_cached", "dp_uncached", "dp_cached", "dp_setup"} | modes
        )
        assert (
            case["mode"] in case["modes"]
            and case["seconds"]["dp_cached"] == case["seconds"][f"dp_cached:{case['mode']}"]
        )
        assert case["fastest_mode"] in case["modes"] and set(case["mode_over_plain"]) == set(case["modes"])
        if case["transfer_policy"] == "head" or case["transfer_policy"].startswith("last:"):
            assert ("linear" in case["modes"]) == (case["transfer_policy"] == "head")
        _positive(case["seconds"], tuple(case["seconds"]))
        _positive(
            case,
            (
                "train_examples",
                "steps_per_round",
                "dp_over_plain",
                "dp_over_plain_uncached",
                "cache_speedup_dp",
                "cache_speedup_plain",
            ),
        )
        assert case["dp_over_plain"] == pytest.approx(case["seconds"]["dp_cached"] / case["seconds"]["plain_cached"])


def test_crypto_figures(results: tuple[Path, dict[str, dict[str, Any]]]) -> None:
    crypto = results[1]["crypto"]
    assert {"throughput", "round_share", "traffic"} <= set(crypto)
    for row in crypto["throughput"]:
        _positive(
            row,
            (
                "payload_bytes",
                "envelope_bytes",
                "repetitions",
                "seal_ms",
                "open_ms",
                "seal_mb_s",
                "open_mb_s",
                "seal_open_mb_s",
            ),
        )
        assert row["envelope_bytes"] > row["payload_bytes"]
    share = crypto["round_share"]
    _positive(
        share,
        (
            "rounds_timed",
            "first_round_seconds",
            "round_seconds",
            "dp_train_seconds",
            "crypto_seconds",
            "crypto_share",
            "crypto_share_of_dp_train",
            "reply_payload_bytes",
            "reply_envelope_bytes",
        ),
    )
    assert share["crypto_share"] < 1
    _positive(share["step_ms"], tuple(share["step_ms"]))
    assert {r["transfer_policy"] for r in crypto["traffic"] if r["scenario"] == "wdbc"} == {"head", "last:1", "full"}
    for row in crypto["traffic"]:
        assert TRAFFIC_KEYS <= set(row)
        _positive(row, POSITIVE_TRAFFIC)


def test_comm_figures(results: tuple[Path, dict[str, dict[str, Any]]]) -> None:
    comm = results[1]["comm"]
    assert {"traffic", "skipped"} <= set(comm)
    measured = {r["scenario"] for r in comm["traffic"]} | {s["scenario"] for s in comm["skipped"]}
    assert measured == {"wdbc", "heart-disease", "synthetic-imaging"}
    for row in comm["traffic"]:
        assert TRAFFIC_KEYS <= set(row)
        _positive(row, POSITIVE_TRAFFIC)
        assert row["trainable_params"] <= row["total_params"]
        if row["transfer_policy"] == "full":
            assert row["trainable_params"] == row["total_params"]


def test_comm_skips_heart_disease_without_its_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDTRANSFER_DATA_DIR", str(tmp_path / "nowhere"))
    result = BENCHMARKS["comm"](tmp_path, quick=True)
    assert [s["scenario"] for s in result["skipped"]] == ["heart-disease"]
    assert "Skipped heart-disease" in (tmp_path / "comm.md").read_text()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedtransfer")
    cli_bench.add_commands(parser.add_subparsers(dest="command", required=True))
    return parser


def test_cli_runs_a_benchmark_and_prints_its_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = _parser().parse_args(["bench", "comm", "--out", str(tmp_path), "--quick", "--seed", "1"])
    assert args.func(args) == 0
    assert json.loads((tmp_path / "comm.json").read_text())["seed"] == 1
    printed = capsys.readouterr().out
    assert "Communication per transfer policy" in printed and "wdbc" in printed


def test_cli_refuses_an_unknown_benchmark() -> None:
    with pytest.raises(SystemExit):
        _parser().parse_args(["bench", "nonsense"])
    assert _parser().parse_args(["bench", "all"]).name == "all"
