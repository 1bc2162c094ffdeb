"""The coordinator's end of the application-level channel: sign instructions, open sealed replies.

Opening a reply checks, in order: the envelope (site signature, decryption, run, round,
kind, base model), the reply's format, the site's signed privacy report, the egress rule
(:func:`common.privacy.egress.check_reply`: every value is declared and of an allowed
kind), the aggregation weight (the site's public declared size), and for a training
update its names, shapes, dtypes, finiteness and distance from the global model. Any
failure is one :class:`ReplyRejected` naming the site and the reason; nothing raises past it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message

from common.errors import SecurityError
from common.model.metrics import counts_shape
from common.model.transfer import TransferPolicy, state_fingerprint
from common.privacy.egress import EgressViolation, check_reply
from common.privacy.report import ReportInvalid, verify_report
from common.protocol import (
    INSTRUCTION_KINDS,
    REPLY_KINDS,
    SEALED,
    SIGNED_INSTRUCTION,
    STATUS_OK,
    ReplyFormatError,
    SiteReply,
    instruction_payload,
)
from common.run_record import Reply
from common.security.envelope import (
    BROADCAST,
    EnvelopeContext,
    EnvelopeError,
    open_envelope,
    sign_instruction,
)
from common.security.keys import Identity, validate_name
from common.security.manifest import SIZE_RANGE, Manifest, ManifestError
from common.settings import RunSettings


class ReplyRejected(SecurityError):
    """A reply was dropped; ``site`` and ``reason`` say whose and why."""

    def __init__(self, site: str, reason: str) -> None:
        super().__init__(f"reply from {site} rejected: {reason}")
        self.site = site
        self.reason = reason


@dataclass(frozen=True)
class OpenedReply:
    """A verified reply: who sent it, what it released (with its signed report), and the update tensors."""

    site_id: str
    reply: Reply
    tensors: dict[str, torch.Tensor]
    update_norm: float | None = None  # L2 distance of a training update from the global model

    @property
    def weight(self) -> int:
        """The site's public declared size: its aggregation weight."""
        return int(self.reply.values["num-examples"])


@dataclass(frozen=True)
class UpdateLimits:
    """What a training update must look like to be aggregated."""

    shapes: dict[str, torch.Size]
    dtypes: dict[str, torch.dtype]
    max_norm: float  # bound on ||update - global|| (see update_bound)
    max_bytes: int = 64 * 2**20
    num_classes: int = 2  # released evaluation histograms have counts_shape(num_classes)


#: The default bound on an update's L2 distance from the global model, per transfer policy kind: three times
#: the largest honest update measured on the built-in scenarios at the default lr, local epochs and batch size,
#: with and without DP (``fedtransfer bench update-norms``, BENCHMARKS.md). ``max-update-norm`` overrides it.
DEFAULT_UPDATE_BOUNDS = {"head": 27.0, "last": 20.0, "full": 55.0, "bias": 26.0, "lora": 18.0}


def update_bound(settings: RunSettings, transfer: TransferPolicy) -> float:
    """The run's bound: ``max-update-norm`` if set (> 0), else the measured default for the transfer policy,
    scaled up when the run lets a site move further than the defaults did: a larger lr, more local epochs or a
    smaller batch (more steps per epoch) by the ratio of lr x epochs / batch size to the defaults'."""
    if settings.max_update_norm > 0:
        return settings.max_update_norm
    defaults = RunSettings()
    epochs = 1.0 if settings.local_steps else settings.local_epochs / defaults.local_epochs
    reach = (settings.lr / defaults.lr) * epochs * (defaults.batch_size / settings.batch_size)
    return DEFAULT_UPDATE_BOUNDS[transfer.kind] * max(1.0, reach)


class CoordinatorChannel:
    """Signs every instruction of one run and opens every reply, against the signed manifest."""

    def __init__(
        self, identity: Identity, manifest: Manifest, run_id: str, base_fingerprint: str, limits: UpdateLimits
    ) -> None:
        self.identity = identity
        self.manifest = manifest
        self.run_id = run_id
        self.base_fingerprint = base_fingerprint
        self.limits = limits

    def sign(self, config: ConfigRecord, arrays: ArrayRecord, phase: str, server_round: int) -> ConfigRecord:
        """A copy of ``config`` carrying the coordinator's signature over it and ``arrays``."""
        plain = dict(config.items())
        payload = instruction_payload(plain, state_fingerprint(arrays.to_torch_state_dict()))
        context = EnvelopeContext(self.run_id, server_round, BROADCAST, INSTRUCTION_KINDS[phase], self.base_fingerprint)
        blob = sign_instruction(payload, context, self.identity)
        return ConfigRecord({**plain, SIGNED_INSTRUCTION: blob})

    def open(self, msg: Message, phase: str, server_round: int, global_state: dict[str, torch.Tensor]) -> OpenedReply:
        """Verify, decrypt and validate one reply; ``ReplyRejected`` names the site and the reason."""
        if SEALED not in msg.content:
            raise ReplyRejected(
                f"node-{msg.metadata.src_node_id}", "reply is not sealed (an unencrypted reply is never accepted)"
            )
        sealed = msg.content[SEALED]
        site_id = str(sealed.get("site-id", f"node-{msg.metadata.src_node_id}"))
        blob = sealed.get("envelope", b"")
        if not isinstance(blob, bytes):
            raise ReplyRejected(site_id[:64], "sealed envelope is not bytes")
        try:
            validate_name(site_id)
        except ValueError:
            raise ReplyRejected(site_id[:64], "site id in the reply is not a valid site name") from None
        expected = EnvelopeContext(self.run_id, server_round, site_id, REPLY_KINDS[phase], self.base_fingerprint)
        try:
            reply = SiteReply.decode(
                open_envelope(blob, expected, self.identity, self.manifest.sites, max_bytes=self.limits.max_bytes)
            )
            report = verify_report(
                reply.report, self.run_id, server_round, self.base_fingerprint, self.manifest.site(site_id)
            )
            if reply.site_id != site_id or reply.phase != phase:
                raise ReplyFormatError(f"the sealed reply names site {reply.site_id!r}, phase {reply.phase!r}")
            check_reply(phase, reply.status, reply.values, bool(reply.tensors), report)
        except (EnvelopeError, ReplyFormatError, ReportInvalid, ManifestError, EgressViolation) as err:
            raise ReplyRejected(site_id, f"{type(err).__name__}: {err}") from err
        if reply.status == STATUS_OK:
            self._check_weight(site_id, reply.values.get("num-examples"), report.get("declared-size"))
            self._check_counts(site_id, reply.values)
        norm = (
            self._check_update(site_id, reply.tensors, global_state)
            if phase == "train" and reply.status == STATUS_OK
            else None
        )
        return OpenedReply(
            site_id, Reply(reply.status, reply.reason, reply.values, report, reply.report), reply.tensors, norm
        )

    def _check_weight(self, site_id: str, weight: object, reported: object) -> None:
        """The aggregation weight is the site's public declared size: an integer in range, the one its signed
        report states, and the one it declared when it enrolled (the manifest), when the manifest lists one."""
        low, high = SIZE_RANGE
        if type(weight) is not int or not low <= weight <= high:
            raise ReplyRejected(site_id, f"aggregation weight {weight!r} is not a declared size in [{low}, {high}]")
        if reported != weight:
            raise ReplyRejected(
                site_id,
                f"aggregation weight {weight} differs from the declared size {reported!r} in the site's signed report",
            )
        enrolled = self.manifest.declared_size(site_id)
        if enrolled is not None and weight != enrolled:
            raise ReplyRejected(
                site_id,
                f"aggregation weight {weight} differs from the size {enrolled} the site declared in the federation "
                "manifest; the site must enrol its new size with the coordinator",
            )

    def _check_counts(self, site_id: str, values: dict) -> None:
        """Released evaluation histograms must have the model's shape (they are turned into metrics)."""
        rows, columns = counts_shape(self.limits.num_classes)
        for name in ("eval-counts", "personalised-eval-counts"):
            counts = values.get(name)
            if counts is None:
                continue
            if not (
                isinstance(counts, list)
                and len(counts) == rows
                and all(isinstance(row, list) and len(row) == columns for row in counts)
                and all(isinstance(v, (int, float)) and not isinstance(v, bool) for row in counts for v in row)
            ):
                raise ReplyRejected(site_id, f"{name} is not a {rows} x {columns} histogram")

    def _check_update(
        self, site_id: str, tensors: dict[str, torch.Tensor], global_state: dict[str, torch.Tensor]
    ) -> float:
        limits = self.limits
        if set(tensors) != set(limits.shapes):
            raise ReplyRejected(
                site_id,
                f"update names {sorted(tensors)[:3]}... do not match the trainable part {sorted(limits.shapes)[:3]}...",
            )
        squared = 0.0
        for name, tensor in tensors.items():
            if tensor.shape != limits.shapes[name] or tensor.dtype != limits.dtypes[name]:
                raise ReplyRejected(
                    site_id,
                    f"{name} is {tuple(tensor.shape)} {tensor.dtype}, expected {tuple(limits.shapes[name])} "
                    f"{limits.dtypes[name]}",
                )
            if not bool(torch.isfinite(tensor).all()):
                raise ReplyRejected(site_id, f"{name} holds NaN or Inf")
            squared += float((tensor.double() - global_state[name].double()).pow(2).sum())
        norm = math.sqrt(squared)
        if norm > limits.max_norm:
            raise ReplyRejected(
                site_id,
                f"update norm {norm:.3g} exceeds the bound {limits.max_norm:.3g}; if honest sites meet this, "
                "raise max-update-norm (docs/security.md)",
            )
        return norm
