"""A wrapper around a Flower strategy that knows about sites, the base model and bad replies.

It signs every instruction, sends the full base model to each node once per run, opens
and validates every sealed reply, drops declined, failed and invalid ones (recording
why), and hands only plain, checked ArrayRecords to Flower's own strategy (FedAvg,
FedProx, FedAdam, ...) to aggregate.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
    Strategy,
)

from common.errors import DeploymentError
from common.model.metrics import metrics_from_counts
from common.protocol import (
    ARRAYS,
    BASE_CARD,
    BASE_MODEL,
    CONFIG,
    METRICS,
    STATUS_DECLINED,
    STATUS_ERROR,
    STATUS_OK,
)
from common.run_record import Participant, RunRecord, SiteRound, utc_now
from server.channel import CoordinatorChannel, ReplyRejected

log = logging.getLogger(__name__)


OPTIMIZER_STATE = ("m_t", "v_t")  # what Flower's FedOpt family (FedAdam, FedYogi, FedAdagrad) carries across rounds


class TooFewSites(DeploymentError):
    """Fewer sites than the configured minimum contributed to a round."""


@dataclass(frozen=True)
class BasePayload:
    """The full base model and its card, sent to each node on first contact."""

    arrays: ArrayRecord
    card_json: str


def server_optimiser_args(server_lr: float, server_tau: float, server_beta_2: float) -> dict[str, float]:
    """Flower's FedOpt keyword arguments (eta, tau, beta_2) for the settings given; 0 keeps Flower's default."""
    chosen = {"eta": server_lr, "tau": server_tau, "beta_2": server_beta_2}
    return {key: value for key, value in chosen.items() if value > 0}


def flower_strategy(
    name: str, min_sites: int, proximal_mu: float, server_args: dict[str, float] | None = None
) -> Strategy:
    """One of Flower's strategies, waiting for ``min_sites`` nodes (``SiteAwareStrategy`` bounds the wait for more).

    ``server_args`` (see ``server_optimiser_args``) go to FedAdam, FedYogi or FedAdagrad.
    """
    common = dict(min_train_nodes=min_sites, min_evaluate_nodes=min_sites, min_available_nodes=min_sites)
    server_args = server_args or {}
    if name == "fedavg":
        return FedAvg(**common)
    if name == "fedprox":
        return FedProx(proximal_mu=proximal_mu, **common)
    if name == "fedadam":
        return FedAdam(**server_args, **common)
    if name == "fedyogi":
        return FedYogi(**server_args, **common)
    if name == "fedadagrad":
        return FedAdagrad(**server_args, **common)
    if name == "fedmedian":
        return FedMedian(**common)
    if name == "fedtrimmedavg":
        return FedTrimmedAvg(beta=0.2, **common)
    if name == "krum":
        return Krum(num_malicious_nodes=1, **common)
    raise ValueError(f"unknown strategy {name!r}")


class SiteAwareStrategy(Strategy):
    """Delegates aggregation to ``inner`` after opening, checking and recording every reply."""

    def __init__(
        self,
        inner: Strategy,
        channel: CoordinatorChannel,
        base: BasePayload,
        record: RunRecord,
        min_sites: int,
        persist: Callable[[], None],
        round_offset: int = 0,
        expected_sites: int = 0,
        site_wait: float = 600.0,
        evaluates: Callable[[int], bool] = lambda server_round: True,
        flower_run_id: int = 0,
    ) -> None:
        self.inner = inner
        self.flower_run_id = flower_run_id
        self.evaluates = evaluates
        self.expected_sites = max(expected_sites, min_sites)
        self.site_wait = site_wait
        self._started = False
        self.persist = persist
        self.round_offset = round_offset
        self.channel = channel
        self.base = base
        self.record = record
        self.min_sites = min_sites
        self.latest_arrays: ArrayRecord | None = None
        self._global: dict[str, torch.Tensor] = {}
        self._has_base: set[int] = set()
        self._sites_by_node: dict[int, str] = {
            joined.node_id: site for site, joined in record.participants.items()
        }  # a resumed run knows them
        self._sent: set[int] = set()

    def summary(self) -> None:
        self.inner.summary()

    def _outgoing(
        self, messages: Iterable[Message], arrays: ArrayRecord, phase: str, server_round: int
    ) -> list[Message]:
        out = []
        self._sent = set()
        signed = None
        for msg in messages:
            node = msg.metadata.dst_node_id
            self._sent.add(node)
            if signed is None:
                signed = self.channel.sign(msg.content[CONFIG], arrays, phase, server_round)
            content = RecordDict({**dict(msg.content.items()), CONFIG: signed})
            if node not in self._has_base:
                content[BASE_MODEL] = self.base.arrays
                content[BASE_CARD] = ConfigRecord({"json": self.base.card_json})
            out.append(Message(content=content, message_type=msg.metadata.message_type, dst_node_id=node))
        return out

    def _await_sites(self, grid: Grid, server_round: int, wanted: int) -> None:
        """Wait up to ``site_wait`` seconds for ``wanted`` sites; go on with at least ``min_sites``, else stop.

        Flower's own strategies wait for ``min_available_nodes`` without a limit, so a hospital
        that went down for good would hang the run; the inner strategy is therefore built with
        ``min_sites`` and every wait is bounded here.
        """
        deadline = time.monotonic() + self.site_wait
        connected = len(list(grid.get_node_ids()))
        while connected < wanted and time.monotonic() < deadline:
            time.sleep(1.0)
            connected = len(list(grid.get_node_ids()))
        if connected < self.min_sites:
            raise TooFewSites(
                f"round {server_round}: only {connected} site(s) connected within {self.site_wait:g} s, "
                f"fewer than min-sites={self.min_sites}"
            )
        if connected < self.expected_sites:
            log.warning(
                "round %d: %d of %d expected site(s) connected; going on without the rest",
                server_round,
                connected,
                self.expected_sites,
            )

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        server_round += self.round_offset
        # before the first round sites may still be starting: wait for all expected; later, not for a site that is gone
        self._await_sites(grid, server_round, self.expected_sites if not self._started else self.min_sites)
        self._started = True
        self._global = arrays.to_torch_state_dict()
        messages = self.inner.configure_train(server_round, arrays, config, grid)
        self.record.round(server_round).flower_run_id = self.flower_run_id
        self.persist()  # durably note the round began: sites may spend budget on it from now on
        return self._outgoing(messages, arrays, "train", server_round)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        server_round += self.round_offset
        if not self.evaluates(server_round):
            self._sent = set()
            return []  # each federated evaluation is a DP release at the sites: ask only when the run plans one
        self._await_sites(grid, server_round, self.min_sites)
        return self._outgoing(
            self.inner.configure_evaluate(server_round, arrays, config, grid), arrays, "evaluate", server_round
        )

    def _learn_site(self, server_round: int, node: int, site_id: str) -> None:
        """Map a node to the site it proved to be; an earlier entry under its node id this round moves to the site."""
        known = self.record.participants.get(site_id)  # a site maps to one node: the record holds the reverse map
        if known is not None and known.node_id != node and self._sites_by_node.get(known.node_id) == site_id:
            del self._sites_by_node[known.node_id]
        self._sites_by_node[node] = site_id
        if known is None or known.node_id != node:
            fingerprint = self.channel.manifest.site(site_id).fingerprint()
            self.record.participants[site_id] = Participant(node, fingerprint, utc_now(), server_round)
            log.info("round %d: %s joined as node %d (key %s)", server_round, site_id, node, fingerprint[:16])
        current = self.record.round(server_round)
        earlier = current.sites.pop(f"node-{node}", None)
        if earlier is not None and site_id not in current.sites:
            current.sites[site_id] = earlier

    def _node_name(self, node: int) -> str:
        return self._sites_by_node.get(node, f"node-{node}")

    def _mark(self, server_round: int, site_id: str, status: str, reason: str) -> None:
        """Record a site's problem in a round; the first one (training's, usually) stays its status."""
        site = self.record.site_round(server_round, site_id)
        if site.status == STATUS_OK:
            site.status, site.reason = status, reason
        log.warning("round %d: %s %s: %s", server_round, site_id, status, reason)

    def _sort(self, server_round: int, replies: Iterable[Message], phase: str) -> list[Message]:
        """Open and record every reply; return plain replies fit to aggregate (their weight the declared size)."""
        good: list[Message] = []
        replied: set[int] = set()
        seen: set[str] = set()
        for msg in replies:
            node = msg.metadata.src_node_id
            replied.add(node)
            if msg.has_error():
                self._mark(server_round, self._node_name(node), "failed", f"{phase}: {msg.error.reason}")
                continue
            try:
                opened = self.channel.open(msg, phase, server_round, self._global)
            except ReplyRejected as err:
                sender = self._sites_by_node.get(node, f"node-{node}")
                claim = "" if err.site == sender else f" (claims to be {err.site})"
                self._mark(server_round, sender, "rejected", f"{phase}{claim}: {err.reason}")
                continue
            except Exception as err:  # noqa: BLE001 - whatever a reply holds, it is one dropped reply, never a crash
                log.exception("round %d: the reply of node %d could not be opened", server_round, node)
                reason = f"{phase}: the reply could not be opened ({type(err).__name__})"
                self._mark(server_round, self._node_name(node), "rejected", reason)
                continue
            if opened.site_id in seen:
                self._mark(server_round, opened.site_id, "rejected", f"{phase}: a second reply in one round")
                continue
            seen.add(opened.site_id)
            self._learn_site(server_round, node, opened.site_id)
            if (
                opened.reply.status != STATUS_ERROR
            ):  # after an error the site may not hold the base model: send it again
                self._has_base.add(node)
            site = self.record.site_round(server_round, opened.site_id)
            setattr(site, phase, opened.reply)
            if opened.update_norm is not None:
                site.update_norm = opened.update_norm
            if opened.reply.status == STATUS_DECLINED:
                if phase == "train":
                    self._mark(server_round, opened.site_id, STATUS_DECLINED, f"{phase}: {opened.reply.reason}")
                else:  # a site may release no evaluation (its policy's choice); the reply keeps the reason
                    log.info(
                        "round %d: %s released no evaluation: %s", server_round, opened.site_id, opened.reply.reason
                    )
                continue
            if opened.reply.status != STATUS_OK:
                self._mark(server_round, opened.site_id, "failed", f"{phase}: {opened.reply.reason}")
                continue
            if phase == "evaluate":
                _derive_metrics(site, opened.reply.values)
            content = RecordDict({METRICS: MetricRecord({"num-examples": opened.weight})})
            if phase == "train":
                content[ARRAYS] = ArrayRecord(opened.tensors)
            msg.content = content
            good.append(msg)
        for node in self._sent - replied:
            self._mark(server_round, self._node_name(node), "no-reply", f"{phase}: no reply before the round timeout")
        # Flower samples nodes in random order; a fixed order makes float sums, and so runs, reproducible.
        return sorted(good, key=lambda m: self._sites_by_node[m.metadata.src_node_id])

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        server_round += self.round_offset
        good = self._sort(server_round, replies, "train")
        if len(good) < self.min_sites:
            raise TooFewSites(
                f"round {server_round}: only {len(good)} site(s) sent usable updates, fewer than "
                f"min-sites={self.min_sites}"
            )
        self.record.round(server_round).aggregated_sites = sorted(
            self._sites_by_node[m.metadata.src_node_id] for m in good
        )
        arrays, metrics = self.inner.aggregate_train(server_round, good)
        if arrays is not None:
            arrays = self._model_dtypes(arrays)
            self.latest_arrays = arrays
        return arrays, metrics

    def state(self) -> dict[str, np.ndarray]:
        """The inner strategy's own state (FedAdam/FedYogi moments), to checkpoint with the model."""
        return {
            f"{attr}/{k}": v for attr in OPTIMIZER_STATE for k, v in (getattr(self.inner, attr, None) or {}).items()
        }

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        for attr in OPTIMIZER_STATE:
            values = {k.split("/", 1)[1]: v for k, v in state.items() if k.startswith(f"{attr}/")}
            if values:
                setattr(self.inner, attr, values)

    def _model_dtypes(self, arrays: ArrayRecord) -> ArrayRecord:
        """Some strategies (FedAdam, FedYogi) aggregate in float64; the model keeps its own dtypes."""
        dtypes = self.channel.limits.dtypes
        return ArrayRecord({name: tensor.to(dtypes[name]) for name, tensor in arrays.to_torch_state_dict().items()})

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Record each site's released evaluation, per site in the run record (no exact pooled metric exists)."""
        self._sort(server_round + self.round_offset, replies, "evaluate")
        return None


def _derive_metrics(site: SiteRound, values: dict) -> None:
    """The metrics the coordinator derives from a site's released (noisy) evaluation counts: post-processing."""
    if "eval-counts" in values:
        site.metrics = metrics_from_counts(np.asarray(values["eval-counts"], dtype=np.float64))
    if "personalised-eval-counts" in values:
        site.personalised = metrics_from_counts(np.asarray(values["personalised-eval-counts"], dtype=np.float64))
