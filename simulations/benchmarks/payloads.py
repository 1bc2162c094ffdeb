"""Bytes on the wire per site per round: Flower's plain ArrayRecord against our sealed reply.

Shared by the ``crypto`` and ``comm`` benchmarks. Flower 1.42 moves a message's records as
an object tree (ArrayRecord -> Array -> ArrayChunk; a ConfigRecord is one object), each
object pushed in its own ``PushObjectRequest``. :func:`flower_wire_bytes` measures a record
that way (see ``WIRE_MEASURE``). A sealed reply travels as ``ConfigRecord({"site-id",
"envelope"})`` (see ``client/channel.py``), so it is measured the same way.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from flwr.app import ArrayRecord, ConfigRecord
from flwr.proto.message_pb2 import PushObjectRequest
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects, get_object_tree

from common.data.scenarios import Scenario
from common.model.transfer import PolicyParseError, TransferPolicy, state_fingerprint
from common.model.zoo import FedModel, build_model
from common.protocol import REPLY_KINDS, STATUS_OK, SiteReply
from common.security.envelope import EnvelopeContext, envelope_overhead, seal
from common.security.keys import Identity

WIRE_MEASURE = (
    "Flower 1.42's object transport: for every distinct object of the record (ArrayRecord, Array, ArrayChunk; "
    "or one ConfigRecord) the protobuf size of the PushObjectRequest carrying its id and deflated content, plus "
    "the ObjectTree listed in the message push. Per-request node/run/session ids and gRPC, HTTP/2 and TLS framing "
    "are left out on both sides alike."
)
BENCH_RUN_ID = secrets.token_hex(16)  # a coordinator-chosen run id, as in a real run
BENCH_ROUND = 1


def flower_wire_bytes(record: ArrayRecord | ConfigRecord) -> int:
    """Bytes Flower 1.42 pushes for ``record`` (see ``WIRE_MEASURE``)."""
    objects = get_all_nested_objects(record)
    pushed = sum(
        PushObjectRequest(object_id=object_id, object_content=obj.deflate()).ByteSize()
        for object_id, obj in objects.items()
    )
    return pushed + get_object_tree(record).ByteSize()


@dataclass(frozen=True)
class Parties:
    """A site and the coordinator it seals to (fresh keys, for measuring only)."""

    site: Identity
    coordinator: Identity

    @classmethod
    def generate(cls, site_id: str) -> Parties:
        return cls(Identity.generate(site_id), Identity.generate("coordinator"))


def reply_context(site_id: str, base_model: str) -> EnvelopeContext:
    """The context a site's train reply is bound to."""
    return EnvelopeContext(BENCH_RUN_ID, BENCH_ROUND, site_id, REPLY_KINDS["train"], base_model)


def reply_payload(site_id: str, tensors: Mapping[str, torch.Tensor]) -> bytes:
    """The encoded train reply that carries ``tensors`` and nothing else (no values, an empty report)."""
    return SiteReply(site_id, "train", STATUS_OK, "", {}, "", dict(tensors)).encode()


def sealed_reply(tensors: Mapping[str, torch.Tensor], context: EnvelopeContext, parties: Parties) -> bytes:
    """The envelope of a reply that carries ``tensors`` and an empty report."""
    return seal(reply_payload(context.site_id, tensors), context, parties.site, parties.coordinator.public())


def sealed_record(site_id: str, envelope: bytes) -> ConfigRecord:
    """The record a sealed reply travels in, as the site's secure channel builds it."""
    return ConfigRecord({"site-id": site_id, "envelope": envelope})


@dataclass(frozen=True)
class PolicyTraffic:
    """Uplink bytes of one site in one round under one transfer policy.

    ``plain_wire``: Flower's ArrayRecord of the trainable tensors. ``sealed_wire``: the sealed
    reply carrying the same tensors. ``fixed_wire``: the sealed reply carrying no tensors at
    all (envelope header, AES-GCM tag, signature, the reply's header and framing, record
    framing): the fixed header. Both leave out the values and the signed privacy report a real
    reply adds (a few hundred bytes; the ``crypto`` benchmark measures a real one).
    ``overhead_fraction`` = (sealed - fixed - plain) / plain (negative: the sealed form is smaller).
    ``full_wire`` and ``full_sealed_wire``: every parameter of the model as
    Flower's ArrayRecord and as a sealed reply; the ``full_over_*`` ratios are the saving of
    the policy against sending the full model in the same form.
    """

    scenario: str
    arch: str
    transfer_policy: str
    default_transfer_policy: bool
    trainable_params: int
    total_params: int
    tensor_bytes: int
    plain_wire: int
    envelope_bytes: int
    envelope_header: int
    sealed_wire: int
    fixed_wire: int
    overhead_fraction: float
    sealed_over_plain: float
    full_wire: int
    full_sealed_wire: int
    trainable_fraction: float
    full_over_plain: float
    full_over_sealed: float
    meets_overhead_target: bool


OVERHEAD_TARGET = 0.01


def valid_policies(model: FedModel, wanted: Sequence[str]) -> list[str]:
    """The policies of ``wanted`` this model supports, without a ``last:K`` that equals ``full``."""
    full = set(TransferPolicy("full").trainable_names(model))
    kept: list[str] = []
    for text in wanted:
        transfer = TransferPolicy.parse(text)
        try:
            names = set(transfer.trainable_names(model))
        except PolicyParseError:
            continue
        if transfer.kind == "last" and names == full:
            continue
        if str(transfer) not in kept:
            kept.append(str(transfer))
    return kept


def every_policy(model: FedModel) -> list[str]:
    """``head``, every ``last:K`` the model has and ``full``."""
    return valid_policies(
        model, ["head", *(f"last:{k}" for k in range(1, len(model.parametrised_blocks()) + 1)), "full"]
    )


def scenario_model(scenario: Scenario, seed: int) -> FedModel:
    torch.manual_seed(seed)
    return build_model(scenario.model.arch, scenario.input_shape, len(scenario.class_names), scenario.model.args)


def policy_traffic(scenario: Scenario, policies: Sequence[str], seed: int) -> list[PolicyTraffic]:
    """Uplink bytes per site per round for each policy of ``policies`` on the scenario's model."""
    model = scenario_model(scenario, seed)
    site_id = scenario.sites[0].name
    parties = Parties.generate(site_id)
    full_state = model.state_dict()
    context = reply_context(site_id, state_fingerprint(full_state))
    fixed_wire = flower_wire_bytes(sealed_record(site_id, sealed_reply({}, context, parties)))
    full_wire = flower_wire_bytes(ArrayRecord(full_state))
    full_sealed_wire = flower_wire_bytes(sealed_record(site_id, sealed_reply(full_state, context, parties)))
    total_params = sum(t.numel() for t in full_state.values())
    rows = []
    for text in policies:
        transfer = TransferPolicy.parse(text)
        tensors = transfer.trainable_state(model)
        payload = reply_payload(site_id, tensors)
        envelope = seal(payload, context, parties.site, parties.coordinator.public())
        plain_wire = flower_wire_bytes(ArrayRecord(tensors))
        sealed_wire = flower_wire_bytes(sealed_record(site_id, envelope))
        overhead = (sealed_wire - fixed_wire - plain_wire) / plain_wire
        trainable_params = sum(t.numel() for t in tensors.values())
        rows.append(
            PolicyTraffic(
                scenario=scenario.name,
                arch=scenario.model.arch,
                transfer_policy=str(transfer),
                default_transfer_policy=str(transfer) == scenario.transfer_policy,
                trainable_params=trainable_params,
                total_params=total_params,
                tensor_bytes=sum(t.numel() * t.element_size() for t in tensors.values()),
                plain_wire=plain_wire,
                envelope_bytes=len(envelope),
                envelope_header=envelope_overhead(len(payload), context),
                sealed_wire=sealed_wire,
                fixed_wire=fixed_wire,
                overhead_fraction=overhead,
                sealed_over_plain=sealed_wire / plain_wire,
                full_wire=full_wire,
                full_sealed_wire=full_sealed_wire,
                trainable_fraction=trainable_params / total_params,
                full_over_plain=full_wire / plain_wire,
                full_over_sealed=full_sealed_wire / sealed_wire,
                meets_overhead_target=overhead <= OVERHEAD_TARGET,
            )
        )
    return rows


TRAFFIC_HEADERS = (
    "scenario",
    "model",
    "transfer policy",
    "trainable / all params",
    "raw tensor B",
    "Flower ArrayRecord B",
    "sealed reply B",
    "sealed / plain",
    "overhead beyond fixed header",
    "full model ArrayRecord B",
    "full model sealed B",
    "saving vs full (ArrayRecord)",
    "saving vs full (sealed)",
)


def traffic_rows(rows: Sequence[PolicyTraffic]) -> list[list[object]]:
    """Table rows for ``TRAFFIC_HEADERS``."""
    return [
        [
            r.scenario,
            r.arch,
            r.transfer_policy + (" (default)" if r.default_transfer_policy else ""),
            f"{r.trainable_params:,} / {r.total_params:,} ({100 * r.trainable_fraction:.1f}%)",
            f"{r.tensor_bytes:,}",
            f"{r.plain_wire:,}",
            f"{r.sealed_wire:,}",
            f"{r.sealed_over_plain:.3f}x",
            f"{100 * r.overhead_fraction:+.2f}%",
            f"{r.full_wire:,}",
            f"{r.full_sealed_wire:,}",
            f"{r.full_over_plain:.2f}x",
            f"{r.full_over_sealed:.2f}x",
        ]
        for r in rows
    ]


def traffic_notes(rows: Sequence[PolicyTraffic]) -> str:
    """How the byte columns were measured, and the fixed header."""
    fixed = sorted({r.fixed_wire for r in rows})
    header = sorted({r.envelope_header for r in rows})
    return (
        f"Bytes per site per round, uplink (the downlink carries the same trainable ArrayRecord plus a signed "
        f"instruction). Wire measure: {WIRE_MEASURE} Fixed header of a sealed reply (no tensors): "
        f"{', '.join(map(str, fixed))} B on the wire, of which the envelope's own header, AES-GCM tag and Ed25519 "
        f"signature are {', '.join(map(str, header))} B. Target: sealed <= plain + {100 * OVERHEAD_TARGET:.0f}% + "
        f"fixed header. A Flower ArrayRecord spends a few hundred bytes per tensor (an npy header, JSON metadata and "
        "64-hex "
        f"object ids for the Array and its chunks) where safetensors spends a short JSON entry, so for these small "
        f"models the sealed reply is the smaller one. Saving vs full: every parameter sent in the same form, over this "
        f"policy's trainable part."
    )
