"""The coordinator's run record: per-round, per-site metrics and statuses, saved as JSON."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields, is_dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from common.io import parse_json, write_atomic

RUN_RECORD_FILE = "run-record.json"
RUN_RECORD_FORMAT = 5

#: How a run stands: running; completed (every round); stopped (too few sites, the last global model kept);
#: interrupted (by the operator: resumable from its last completed round); failed (no global model).
RUNNING, COMPLETED, STOPPED, INTERRUPTED, FAILED = "running", "completed", "stopped", "interrupted", "failed"


def utc_now() -> str:
    """The current time in UTC, to the second (ISO 8601), as the run record writes it."""
    return datetime.now(UTC).isoformat(timespec="seconds")


def _plain(value: Any) -> Any:
    """JSON-ready copy of ``value`` in one pass: dataclasses as dicts, non-finite floats as None."""
    if is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


@dataclass
class Reply:
    """One site's verified reply in one phase: exactly the values it released and its signed privacy report.

    ``values`` hold only what the report's egress declaration lists (checked when the reply
    was opened); ``report`` is the report's verified content and ``report_signed`` the
    site's signature over it, which anyone holding the manifest can check again.
    """

    status: str
    reason: str = ""
    values: dict[str, Any] = field(default_factory=dict)
    report: dict[str, Any] = field(default_factory=dict)
    report_signed: str = ""


@dataclass
class SiteRound:
    """One site's part in one round: overall status (ok, declined, rejected, failed, no-reply), its train and
    evaluate replies, and the metrics the coordinator derived from the released evaluation counts."""

    status: str = "ok"
    reason: str = ""
    train: Reply | None = None
    evaluate: Reply | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    personalised: dict[str, float] = field(default_factory=dict)
    update_norm: float | None = None  # L2 distance of its training update from the global model (when opened)

    def epsilon(self) -> float | None:
        """The dataset's cumulative epsilon after this round, as the site's signed reports state it."""
        values = [r.report.get("epsilon") for r in (self.train, self.evaluate) if r is not None]
        numbers = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
        return float(max(numbers)) if numbers else None

    def private(self) -> bool:
        """False if a reply of this round says the site trained without DP."""
        return all(r.report.get("dp", True) is not False for r in (self.train, self.evaluate) if r is not None)


@dataclass
class Participant:
    """Who a site proved to be when it joined: its Flower node, its key's fingerprint, and when (UTC) and in
    which round its first verified reply from that node arrived."""

    node_id: int
    key_fingerprint: str
    joined: str
    joined_round: int


@dataclass
class RoundRecord:
    server_round: int
    sites: dict[str, SiteRound] = field(default_factory=dict)
    central: dict[str, float] = field(default_factory=dict)
    aggregated_sites: list[str] = field(default_factory=list)
    flower_run_id: int = 0  # the Flower (SuperLink) run that executed this round (a resumed run has several)


@dataclass
class RunRecord:
    run_id: str  # chosen by the coordinator (128 random bits, hex); binds every envelope, report and ledger entry
    settings: dict[str, Any]
    base_model: dict[str, Any]
    transfer_policy: str
    strategy: str
    started: str = field(default_factory=utc_now)
    status: str = RUNNING
    stop_reason: str = ""
    rounds: list[RoundRecord] = field(default_factory=list)
    final_checkpoint: str = ""
    finished: str = ""
    manifest: str = ""
    max_update_norm: float = 0.0  # the update-norm bound applied: max-update-norm, or the transfer policy's default
    abandoned_rounds: list[RoundRecord] = field(default_factory=list)  # begun but not completed before a resume
    #: Every site that joined, by name: the node it proved to be (kept across a resume), key and time.
    participants: dict[str, Participant] = field(default_factory=dict)
    #: Filled by ``fedtransfer simulate`` only: the global model of each round evaluated directly on each simulated
    #: site's test split by the simulator, which holds every site's data ({round: {site: metrics}}). Nothing here
    #: came from a site; a deployed coordinator cannot compute it.
    simulator_evaluation: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    #: Filled by ``fedtransfer simulate`` only: every method (baselines, the federated model, the personalised
    #: copies as released) on every site's test split, every metric, bootstrap intervals; see simulations/comparison.py.
    simulator_comparison: dict[str, Any] = field(default_factory=dict)
    #: What travels per site: the trainable tensors each round (each way) and the base model once per run
    #: (``update-bytes-per-site-per-round``, ``base-model-bytes-per-site``, tensor bytes before sealing).
    traffic: dict[str, int] = field(default_factory=dict)
    format: int = RUN_RECORD_FORMAT

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
        self.status, self.stop_reason, self.finished = status, reason, utc_now()

    def to_json(self) -> str:
        return json.dumps(_plain(self), indent=2, sort_keys=True)

    def save(self, directory: Path) -> Path:
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / RUN_RECORD_FILE
        write_atomic(path, self.to_json().encode("utf-8"), mode=0o644)
        return path

    @classmethod
    def load(cls, path: Path) -> RunRecord:
        raw = parse_json(Path(path).read_bytes())
        if raw.get("format") != RUN_RECORD_FORMAT:
            raise ValueError(
                f"{path}: run record format {raw.get('format', 1)}, this version reads format "
                f"{RUN_RECORD_FORMAT}; read it with the fedtransfer version that wrote it"
            )

        def reply(value: dict[str, Any] | None) -> Reply | None:
            return None if value is None else Reply(**value)

        def site(value: dict[str, Any]) -> SiteRound:
            return SiteRound(**{**value, "train": reply(value.get("train")), "evaluate": reply(value.get("evaluate"))})

        def rounds(key: str) -> list[RoundRecord]:
            return [
                RoundRecord(
                    server_round=r["server_round"],
                    sites={k: site(v) for k, v in r["sites"].items()},
                    central=r["central"],
                    aggregated_sites=r["aggregated_sites"],
                    flower_run_id=r.get("flower_run_id", 0),
                )
                for r in raw.pop(key, [])
            ]

        participants = {name: Participant(**value) for name, value in raw.pop("participants", {}).items()}
        return cls(
            rounds=rounds("rounds"), abandoned_rounds=rounds("abandoned_rounds"), participants=participants, **raw
        )
