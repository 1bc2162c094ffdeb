"""An in-process Flower simulation, end to end: 3 sites x 2 rounds, encrypted and signed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from common.model.checkpoint import load_checkpoint
from common.model.transfer import TransferPolicy
from common.settings import RunSettings
from simulations.simulate import simulate

pytestmark = pytest.mark.slow


def test_three_sites_two_rounds_adapt_the_trainable_part_only(shifted_study: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = simulate(RunSettings(scenario=str(shifted_study), rounds=2, local_epochs=3, lr=0.2, out=str(out)))

    record = result.record
    assert record.status == "completed"
    assert [r.server_round for r in record.rounds] == [0, 1, 2]
    for r in record.rounds[1:]:
        assert r.aggregated_sites == ["site-0", "site-1", "site-2"]
        assert all(s.status == "ok" for s in r.sites.values())

    source, _ = load_checkpoint(out / "source-model")
    final, card = load_checkpoint(out / "final-model")
    transfer = TransferPolicy.parse("last:1")
    trainable = set(transfer.trainable_names(source))
    for name, tensor in source.state_dict().items():
        if name in trainable:
            assert not torch.equal(tensor, final.state_dict()[name]), f"{name} should have been adapted"
        else:
            assert torch.equal(tensor, final.state_dict()[name]), f"frozen {name} changed"
    assert card.lineage["rounds"] == 2
    assert card.lineage["sites"] == ["site-0", "site-1", "site-2"]
    assert (
        card.lineage["base_model_fingerprint"]
        == json.loads((out / "source-model" / "model-card.json").read_text())["model_fingerprint"]
    )

    methods = {m.method: m for m in result.comparison}
    assert list(methods) == ["source as-is", "local-only", "local-only (DP)", "federated", "pooled"]
    assert methods["federated"].mean("roc-auc") > methods["source as-is"].mean("roc-auc") + 0.05, methods
    assert result.metric == "roc-auc"
    for scores in methods.values():
        assert set(scores.sites) == {"site-0", "site-1", "site-2"}
        for site, metrics in scores.sites.items():
            assert {"roc-auc", "balanced-accuracy", "f1", "sensitivity", "specificity", "accuracy"} <= set(metrics)
            low, high = scores.intervals[site]["balanced-accuracy"]
            assert low <= metrics["balanced-accuracy"] <= high
    assert methods["local-only (DP)"].privacy.startswith("DP, epsilon 3") and methods["pooled"].privacy == "no DP"
    saved = json.loads((out / "run-record.json").read_text())["simulator_comparison"]
    assert saved["metric"] == "roc-auc" and [m["method"] for m in saved["methods"]] == list(methods)
    report = (out / "report.md").read_text()
    assert report.count("| federated |") == 2 and "bootstrap 95% intervals" in report
    assert "## Sites that joined" in report and all(f"| {site} | " in report for site in ("site-0", "site-2"))
    assert (out / "metrics.png").stat().st_size > 0 and (out / "comparison.png").stat().st_size > 0
