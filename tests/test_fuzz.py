"""Drop, never crash: whatever bytes arrive, opening them raises one of our own errors or succeeds.

Property-based (hypothesis) over envelopes, signed instructions, decrypted replies, signed privacy
reports and whole Flower reply messages at the coordinator, both from outsiders (no key) and from a
site that holds a valid key and signs whatever it likes. The strategy wrapper turns every one of
them into at most one dropped reply with a reason.
"""

from __future__ import annotations

import base64
import json
import math
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common import MessageType
from flwr.supercore.task_identity import TaskIdentity
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from common.privacy.egress import EgressViolation, check_reply
from common.privacy.report import ReportInvalid, verify_report
from common.protocol import SEALED, ReplyFormatError, SiteReply
from common.run_record import RunRecord
from common.security.envelope import (
    EnvelopeContext,
    EnvelopeError,
    open_envelope,
    seal,
    sign_instruction,
    verify_instruction,
)
from common.security.keys import Identity
from common.security.manifest import sign_manifest
from server.channel import CoordinatorChannel, OpenedReply, ReplyRejected, UpdateLimits
from server.strategy import BasePayload, SiteAwareStrategy, flower_strategy

COORDINATOR, SITE = Identity.generate("coordinator"), Identity.generate("site-0")
MANIFEST = sign_manifest("fuzz", COORDINATOR, [SITE.public()])
RUN, ROUND, BASE = "5eed", 3, "ab" * 32
REPLY = EnvelopeContext(RUN, ROUND, "site-0", "train-reply", BASE)
SHAPES = {"head.weight": torch.Size([2, 3]), "head.bias": torch.Size([2])}
GLOBAL = {name: torch.zeros(shape) for name, shape in SHAPES.items()}
LIMITS = UpdateLimits(SHAPES, {name: torch.float32 for name in SHAPES}, max_norm=10.0, max_bytes=2**20)
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)


def _honest_reply() -> bytes:
    report = {
        "phase": "train",
        "status": "ok",
        "dp": False,
        "declared-size": 10,
        "egress": {"update": "not-private: x", "num-examples": "public: x", "steps": "public: x"},
    }
    signed = sign_instruction(
        json.dumps(report).encode(), EnvelopeContext(RUN, ROUND, "site-0", "privacy-report", BASE), SITE
    )
    return SiteReply(
        "site-0",
        "train",
        "ok",
        "",
        {"num-examples": 10, "steps": 1},
        base64.b64encode(signed).decode(),
        {name: torch.zeros(shape) for name, shape in SHAPES.items()},
    ).encode()


HONEST = seal(_honest_reply(), REPLY, SITE, COORDINATOR.public())


@FUZZ
@given(position=st.integers(min_value=0), value=st.integers(min_value=0, max_value=255), cut=st.integers(0, 600))
def test_a_changed_or_cut_envelope_is_an_envelope_error(position: int, value: int, cut: int) -> None:
    blob = bytearray(HONEST)
    blob[position % len(blob)] = value
    for candidate in (bytes(blob), HONEST[: len(HONEST) - cut]):
        if candidate == HONEST:
            continue
        try:
            open_envelope(candidate, REPLY, COORDINATOR, MANIFEST.sites)
        except EnvelopeError:
            continue
        raise AssertionError("a changed envelope opened")


@FUZZ
@given(data=st.binary(max_size=5000), header=json_values)
def test_arbitrary_bytes_and_headers_are_envelope_errors(data: bytes, header: Any) -> None:
    text = json.dumps(header).encode()[:4096]
    framed = b"FTEV\x01\x01" + len(text).to_bytes(2, "big") + text + len(data).to_bytes(8, "big") + data + bytes(64)
    for blob in (data, b"FTEV" + data, framed, framed.replace(b"\x01\x01", b"\x01\x02", 1)):
        for opener in (
            lambda b: open_envelope(b, REPLY, COORDINATOR, MANIFEST.sites),
            lambda b: verify_instruction(b, REPLY, COORDINATOR.public()),
        ):
            try:
                opener(blob)
            except EnvelopeError:
                continue
            raise AssertionError("arbitrary bytes were accepted")


@FUZZ
@given(depth=st.integers(min_value=17, max_value=2040))
def test_deep_json_in_an_unsigned_header_is_one_malformed_envelope(depth: int) -> None:
    header = b"[" * depth + b"]" * depth
    blob = b"FTEV\x01\x01" + len(header).to_bytes(2, "big") + header + bytes(8) + bytes(64)
    try:
        open_envelope(blob, REPLY, COORDINATOR, MANIFEST.sites)
    except EnvelopeError as err:
        assert type(err).__name__ == "MalformedEnvelope"
    else:
        raise AssertionError("opened")


@FUZZ
@given(header=json_values, tail=st.binary(max_size=200), raw=st.binary(max_size=300))
def test_a_decrypted_reply_is_a_site_reply_or_a_format_error(header: Any, tail: bytes, raw: bytes) -> None:
    text = json.dumps(header).encode()
    for data in (b"FTR2" + len(text).to_bytes(4, "big") + text + tail, raw, b"FTR2" + raw):
        try:
            reply = SiteReply.decode(data)
        except ReplyFormatError:
            continue
        assert isinstance(reply.values, dict) and isinstance(reply.tensors, dict)


@FUZZ
@given(report=json_values, values=json_values, raw=st.binary(max_size=200), deep=st.integers(0, 4000))
@example(
    report={"phase": "train", "status": "ok", "egress": {"update": "dp-update: x"}, "spends": 5},
    values={},
    raw=b"",
    deep=0,
)
@example(
    report={"phase": "train", "status": "ok", "egress": {"update": "dp-update: x"}, "spends": [{"ledger-index": [1]}]},
    values={},
    raw=b"",
    deep=0,
)
def test_a_signed_report_of_any_content_is_a_report_error_or_an_egress_verdict(
    report: Any, values: Any, raw: bytes, deep: int
) -> None:
    context = EnvelopeContext(RUN, ROUND, "site-0", "privacy-report", BASE)
    for payload in (json.dumps(report).encode(), raw, b"[" * deep + b"]" * deep):
        signed = base64.b64encode(sign_instruction(payload, context, SITE)).decode()
        try:
            content = verify_report(signed, RUN, ROUND, BASE, SITE.public())
            check_reply("train", "ok", values if isinstance(values, dict) else {}, True, content)
        except (ReportInvalid, EgressViolation):
            continue


def _message(content: RecordDict) -> Message:
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 0
    return Message(content, reply_to=Message(RecordDict(), dst_node_id=101, message_type=MessageType.TRAIN))


def _crafted(header: dict[str, Any], tensors: bytes) -> bytes:
    text = json.dumps(header).encode()
    return seal(b"FTR2" + len(text).to_bytes(4, "big") + text + tensors, REPLY, SITE, COORDINATOR.public())


reply_headers = st.fixed_dictionaries(
    {
        "site-id": st.sampled_from(["site-0", "site-1", ""]) | st.text(max_size=5),
        "phase": st.sampled_from(["train", "evaluate"]) | st.text(max_size=5),
        "status": st.sampled_from(["ok", "declined", "error"]),
        "reason": st.text(max_size=10),
        "values": st.dictionaries(
            st.sampled_from(["num-examples", "steps", "eval-counts", "train-loss", "x"]), json_values, max_size=4
        ),
        "report": st.just(SiteReply.decode(_honest_reply()).report) | st.text(max_size=5),
    }
)


def _strategy() -> SiteAwareStrategy:
    record = RunRecord(RUN, {}, {}, "head", "fedavg")
    return SiteAwareStrategy(
        flower_strategy("fedavg", 1, 0.0),
        CoordinatorChannel(COORDINATOR, MANIFEST, RUN, BASE, LIMITS),
        BasePayload(ArrayRecord({}), "{}"),
        record,
        1,
        persist=lambda: None,
    )


@FUZZ
@given(
    header=reply_headers,
    tensors=st.sampled_from([_honest_reply()[8 + int.from_bytes(_honest_reply()[4:8]) :], b"", b"\x00" * 16]),
    site_id=st.sampled_from(["site-0", "site-1", "../x", ""]),
    kind=st.sampled_from(["config", "metrics", "arrays"]),
)
def test_any_reply_message_is_opened_or_dropped_with_a_reason(
    header: dict[str, Any], tensors: bytes, site_id: str, kind: str
) -> None:
    blob = _crafted(header, tensors)
    records = {
        "config": ConfigRecord({"site-id": site_id, "envelope": blob}),
        "metrics": MetricRecord({"site-id": 1.0}),
        "arrays": ArrayRecord({"envelope": torch.zeros(1)}),
    }
    message = _message(RecordDict({SEALED: records[kind]}))
    channel = CoordinatorChannel(COORDINATOR, MANIFEST, RUN, BASE, LIMITS)
    try:
        opened = channel.open(message, "train", ROUND, GLOBAL)
    except ReplyRejected as err:
        assert err.reason
    else:
        assert isinstance(opened, OpenedReply) and opened.site_id == "site-0"
        assert math.isfinite(opened.weight) and opened.weight > 0
    strategy = _strategy()
    strategy._global = GLOBAL
    strategy._sent = {101}
    good = strategy._sort(ROUND, [message], "train")
    site = strategy.record.round(ROUND).sites
    assert len(good) + sum(s.status != "ok" for s in site.values()) >= 1
    assert all(s.reason for s in site.values() if s.status != "ok")


def _evaluate_reply(counts: Any) -> Message:
    context = EnvelopeContext(RUN, ROUND, "site-0", "privacy-report", BASE)
    report = {
        "phase": "evaluate",
        "status": "ok",
        "dp": True,
        "declared-size": 10,
        "spends": [{"ledger-index": 4, "kind": "evaluate", "noise-multiplier": 3.0}],
        "releases": {"eval-counts": 4},
        "egress": {"num-examples": "public: x", "eval-counts": "dp-release: x"},
    }
    signed = base64.b64encode(sign_instruction(json.dumps(report).encode(), context, SITE)).decode()
    reply = SiteReply("site-0", "evaluate", "ok", "", {"num-examples": 10, "eval-counts": counts}, signed)
    blob = seal(
        reply.encode(), EnvelopeContext(RUN, ROUND, "site-0", "evaluate-reply", BASE), SITE, COORDINATOR.public()
    )
    return _message(RecordDict({SEALED: ConfigRecord({"site-id": "site-0", "envelope": blob})}))


def test_a_released_histogram_of_the_wrong_shape_is_dropped_not_turned_into_metrics() -> None:
    channel = CoordinatorChannel(COORDINATOR, MANIFEST, RUN, BASE, LIMITS)
    assert channel.open(_evaluate_reply([[1.0] * 8, [2.0] * 8]), "evaluate", ROUND, GLOBAL).weight == 10
    for counts in ([1.0, 2.0], [[1.0] * 8], [[1.0] * 8, [2.0] * 7], [[[1.0]] * 8, [[2.0]] * 8]):
        strategy = _strategy()
        strategy._sent = {101}
        assert strategy._sort(ROUND, [_evaluate_reply(counts)], "evaluate") == []
        (site,) = strategy.record.round(ROUND).sites.values()
        assert site.status == "rejected" and "histogram" in site.reason, site
