"""The run's metric plot: a line per site for a few sites, their mean and spread for many."""

from __future__ import annotations

from pathlib import Path

import pytest
from matplotlib import pyplot as plt

from common.run_record import RoundRecord, RunRecord, SiteRound
from server import report


def _record(sites: int) -> RunRecord:
    record = RunRecord(run_id="0" * 32, settings={}, base_model={}, transfer_policy="head", strategy="fedavg")
    for server_round in (1, 2, 3):
        record.rounds.append(
            RoundRecord(
                server_round,
                sites={
                    f"site-{k:04d}": SiteRound(metrics={"roc-auc": 0.5 + k / (2 * sites), "f1": 0.6})
                    for k in range(sites)
                },
                central={"roc-auc": 0.7},
            )
        )
    return record


def _legend_labels(monkeypatch: pytest.MonkeyPatch, record: RunRecord, path: Path) -> list[str]:
    labels: list[str] = []
    close = plt.close

    def keep_labels(fig) -> None:
        labels.extend(text.get_text() for text in fig.axes[0].get_legend().get_texts())
        close(fig)

    monkeypatch.setattr(report.plt, "close", keep_labels)
    report.plot_metrics(record, path)
    assert path.stat().st_size > 0
    return labels


def test_a_few_sites_get_a_line_each(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    labels = _legend_labels(monkeypatch, _record(3), tmp_path / "few.png")
    assert labels == ["site-0000", "site-0001", "site-0002", "source (central)"]


def test_many_sites_get_their_mean_and_spread_not_a_legend_entry_each(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    labels = _legend_labels(monkeypatch, _record(report.MAX_LABELLED_SITES + 1), tmp_path / "many.png")
    assert labels == ["10th and 90th percentiles", f"mean of {report.MAX_LABELLED_SITES + 1} sites", "source (central)"]
