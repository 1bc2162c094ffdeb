"""The coordinator's run record: per-round, per-site metrics and statuses, saved as JSON."""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

RUN_RECORD_FILE = "run-record.json"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _finite_or_none(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite_or_none(v) for v in value]
    return value


@dataclass
class SiteRound:
    """One site's part in one round: status (ok, declined, rejected, failed, no-reply) and metrics."""

    status: str = "ok"
    reason: str = ""
    train: dict[str, float] = field(default_factory=dict)
    evaluate: dict[str, float] = field(default_factory=dict)
    privacy: dict[str, Any] = field(default_factory=dict)
    privacy_signed: str = ""

    def epsilon(self) -> float | None:
        """The dataset's cumulative epsilon after this round: the signed train report's, or later the
        private personalisation's (``p-epsilon``, reported with evaluation after the last round)."""
        values = [v for v in (self.privacy.get("epsilon"), self.evaluate.get("p-epsilon"))
                  if isinstance(v, (int, float)) and not isinstance(v, bool)]
        return float(max(values)) if values else None


@dataclass
class RoundRecord:
    server_round: int
    sites: dict[str, SiteRound] = field(default_factory=dict)
    central: dict[str, float] = field(default_factory=dict)
    aggregated_sites: list[str] = field(default_factory=list)
    flower_run_id: int = 0  # the Flower run that executed this round (a resumed run has several)


@dataclass
class RunRecord:
    run_id: int
    settings: dict[str, Any]
    base_model: dict[str, Any]
    policy: str
    strategy: str
    started: str = field(default_factory=_now)
    status: str = "running"
    stop_reason: str = ""
    rounds: list[RoundRecord] = field(default_factory=list)
    final_checkpoint: str = ""
    finished: str = ""
    manifest: str = ""
    abandoned_rounds: list[RoundRecord] = field(default_factory=list)  # begun but not completed before a resume
    site_nodes: dict[str, int] = field(default_factory=dict)  # the Flower node each site proved to be, kept across a resume

    def round(self, server_round: int) -> RoundRecord:
        for record in self.rounds:
            if record.server_round == server_round:
                return record
        record = RoundRecord(server_round)
        self.rounds.append(record)
        self.rounds.sort(key=lambda r: r.server_round)
        return record

    def site_round(self, server_round: int, site_id: str) -> SiteRound:
        return self.round(server_round).sites.setdefault(site_id, SiteRound())

    def site_ids(self) -> list[str]:
        return sorted({s for r in self.rounds for s in r.sites})

    def finish(self, status: str, reason: str = "") -> None:
        self.status, self.stop_reason, self.finished = status, reason, _now()

    def to_json(self) -> str:
        return json.dumps(_finite_or_none(asdict(self)), indent=2, sort_keys=True)

    def save(self, directory: Path) -> Path:
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / RUN_RECORD_FILE
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".run-record.")
        with os.fdopen(fd, "w") as handle:
            handle.write(self.to_json())
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: Path) -> "RunRecord":
        raw = json.loads(Path(path).read_text())

        def rounds(key: str) -> list[RoundRecord]:
            return [
                RoundRecord(
                    server_round=r["server_round"],
                    sites={k: SiteRound(**v) for k, v in r["sites"].items()},
                    central=r["central"],
                    aggregated_sites=r["aggregated_sites"],
                    flower_run_id=r.get("flower_run_id", 0),
                )
                for r in raw.pop(key, [])
            ]

        site_nodes = {site: int(node) for site, node in raw.pop("site_nodes", {}).items()}
        return cls(rounds=rounds("rounds"), abandoned_rounds=rounds("abandoned_rounds"), site_nodes=site_nodes, **raw)
