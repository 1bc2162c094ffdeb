"""A wrapper around a Flower strategy that knows about sites, the base model and bad replies.

It sends the full base model to each node once per run, reads every reply's site id and
status, drops declined, failed and invalid replies (recording why), and hands only the
good ones to Flower's own strategy (FedAvg, FedProx, FedAdam, ...) to aggregate.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdam, FedAvg, FedMedian, FedProx, FedYogi, Strategy

from common.protocol import ARRAYS, BASE_CARD, BASE_MODEL, METRICS, SITE, STATUS_DECLINED, STATUS_OK
from server.run_record import RunRecord

log = logging.getLogger(__name__)


class TooFewSites(RuntimeError):
    """Fewer sites than the configured minimum contributed to a round."""


@dataclass(frozen=True)
class BasePayload:
    """The full base model and its card, sent to each node on first contact."""

    arrays: ArrayRecord
    card_json: str


def flower_strategy(name: str, min_sites: int, min_available: int, proximal_mu: float) -> Strategy:
    """One of Flower's own strategies, configured for fedtransfer's record keys."""
    common = dict(min_train_nodes=min_sites, min_evaluate_nodes=min_sites, min_available_nodes=min_available)
    if name == "fedavg":
        return FedAvg(**common)
    if name == "fedprox":
        return FedProx(proximal_mu=proximal_mu, **common)
    if name == "fedadam":
        return FedAdam(**common)
    if name == "fedyogi":
        return FedYogi(**common)
    if name == "fedmedian":
        return FedMedian(**common)
    raise ValueError(f"unknown strategy {name!r}")


class SiteAwareStrategy(Strategy):
    """Delegates aggregation to ``inner`` after checking and recording every reply."""

    def __init__(self, inner: Strategy, base: BasePayload, expected: dict[str, torch.Size], record: RunRecord, min_sites: int) -> None:
        self.inner = inner
        self.base = base
        self.expected = expected
        self.record = record
        self.min_sites = min_sites
        self.latest_arrays: ArrayRecord | None = None
        self._has_base: set[int] = set()
        self._sites_by_node: dict[int, str] = {}
        self._sent: set[int] = set()

    def summary(self) -> None:
        self.inner.summary()

    def _with_base(self, messages: Iterable[Message]) -> list[Message]:
        out = []
        self._sent = set()
        for msg in messages:
            node = msg.metadata.dst_node_id
            self._sent.add(node)
            if node in self._has_base:
                out.append(msg)
                continue
            content = RecordDict(dict(msg.content.items()))
            content[BASE_MODEL] = self.base.arrays
            content[BASE_CARD] = ConfigRecord({"json": self.base.card_json})
            out.append(Message(content=content, message_type=msg.metadata.message_type, dst_node_id=node))
        return out

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        return self._with_base(self.inner.configure_train(server_round, arrays, config, grid))

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        return self._with_base(self.inner.configure_evaluate(server_round, arrays, config, grid))

    def _node_name(self, node: int) -> str:
        return self._sites_by_node.get(node, f"node-{node}")

    def _sort(self, server_round: int, replies: Iterable[Message], phase: str) -> list[Message]:
        """Record every reply's outcome; return the replies fit to aggregate."""
        good = []
        replied = set()
        for msg in replies:
            node = msg.metadata.src_node_id
            replied.add(node)
            if msg.has_error():
                site = self.record.site_round(server_round, self._node_name(node))
                site.status, site.reason = "failed", f"{phase}: {msg.error.reason}"
                log.warning("round %d %s: %s failed: %s", server_round, phase, self._node_name(node), msg.error.reason)
                continue
            status = msg.content[SITE] if SITE in msg.content else ConfigRecord()
            site_id = str(status.get("site-id", f"node-{node}"))
            self._sites_by_node[node] = site_id
            self._has_base.add(node)
            site = self.record.site_round(server_round, site_id)
            metrics = dict(msg.content[METRICS]) if METRICS in msg.content else {}
            if phase == "train":
                site.train = metrics
            else:
                site.evaluate = metrics
            state = str(status.get("status", ""))
            if state == STATUS_DECLINED:
                site.status, site.reason = STATUS_DECLINED, str(status.get("reason", ""))
                log.warning("round %d: site %s declined: %s", server_round, site_id, site.reason)
                continue
            problem = self._problem(msg, phase) if state == STATUS_OK else f"unknown reply status {state!r}"
            if problem:
                site.status, site.reason = "rejected", problem
                log.warning("round %d %s: rejected reply from %s: %s", server_round, phase, site_id, problem)
                continue
            good.append(msg)
        for node in self._sent - replied:
            site = self.record.site_round(server_round, self._node_name(node))
            site.status, site.reason = "no-reply", f"{phase}: no reply before the round timeout"
        return good

    def _problem(self, msg: Message, phase: str) -> str:
        if METRICS not in msg.content or "num-examples" not in msg.content[METRICS]:
            return "reply has no metrics with num-examples"
        if phase != "train":
            return ""
        if ARRAYS not in msg.content or len(msg.content.array_records) != 1:
            return "reply must carry exactly one ArrayRecord of trainable weights"
        state = msg.content[ARRAYS].to_torch_state_dict()
        if set(state) != set(self.expected):
            return f"weights named {sorted(state)[:3]}... do not match the trainable part {sorted(self.expected)[:3]}..."
        for name, tensor in state.items():
            if tensor.shape != self.expected[name]:
                return f"weight {name} has shape {tuple(tensor.shape)}, expected {tuple(self.expected[name])}"
            if not bool(torch.isfinite(tensor).all()):
                return f"weight {name} holds NaN or Inf"
        return ""

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        good = self._sort(server_round, replies, "train")
        self.record.round(server_round).aggregated_sites = sorted(str(m.content[SITE]["site-id"]) for m in good)
        if len(good) < self.min_sites:
            raise TooFewSites(
                f"round {server_round}: only {len(good)} site(s) sent usable updates, fewer than min-sites={self.min_sites}"
            )
        arrays, metrics = self.inner.aggregate_train(server_round, good)
        if arrays is not None:
            self.latest_arrays = arrays
        return arrays, metrics

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        good = self._sort(server_round, replies, "evaluate")
        return self.inner.aggregate_evaluate(server_round, good) if good else None
