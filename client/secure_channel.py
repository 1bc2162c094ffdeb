"""The site's end of the application-level channel, as a Flower client mod.

Incoming: the instruction must carry the coordinator's signature (checked against the
signed federation manifest the site holds), for this run, for a round newer than the
last one accepted, and the weights attached must be the ones signed. Only the signed
configuration reaches the training code. Outgoing: the reply (report and trainable
weights) is sealed to the coordinator and signed with the site's key.
"""

from __future__ import annotations

import json

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp.typing import ClientAppCallable

from client.site import resolve_site
from common.security.envelope import EnvelopeContext, seal, verify_instruction
from common.security.keys import Identity, passphrase_from_env, read_identity
from common.security.manifest import Manifest, read_manifest
from common.protocol import (
    ARRAYS,
    CONFIG,
    INSTRUCTION_KINDS,
    METRICS,
    REPLY_KINDS,
    SEALED,
    SIGNED_INSTRUCTION,
    SITE,
    InstructionError,
    parse_instruction_payload,
)
from common.data.site_config import SiteConfig
from common.privacy.report import sign_report
from common.model.transfer import state_fingerprint
from common.update_codec import encode_update

LAST_ROUND = "fedtransfer-last-accepted-round"


class InstructionRefused(Exception):
    """The site refused an instruction: unsigned, forged, replayed or not matching its weights."""


def site_keys(site: SiteConfig) -> tuple[Identity, Manifest]:
    identity = read_identity(site.keys_dir, site.site_id, passphrase_from_env())
    manifest = read_manifest(site.manifest, site.coordinator_fingerprint)
    return identity, manifest


def _verified_config(msg: Message, context: Context, site: SiteConfig, manifest: Manifest, phase: str) -> ConfigRecord:
    config = msg.content[CONFIG]
    blob = config.get(SIGNED_INSTRUCTION)
    if not isinstance(blob, bytes):
        raise InstructionRefused(f"site {site.site_id}: the instruction is not signed by the coordinator; refusing it")
    last = context.state[LAST_ROUND] if LAST_ROUND in context.state else ConfigRecord()
    expected = EnvelopeContext(
        run_id=context.run_id,
        server_round=int(last.get(phase, 0)) + 1,
        site_id=site.site_id,
        kind=INSTRUCTION_KINDS[phase],
        base_model=str(config.get("base-fingerprint", "")),
    )
    payload = verify_instruction(blob, expected, manifest.coordinator)
    signed, arrays_fingerprint = parse_instruction_payload(payload)
    plain = {k: v for k, v in config.items() if k != SIGNED_INSTRUCTION}
    if plain != signed:
        changed = sorted(k for k in set(plain) | set(signed) if plain.get(k) != signed.get(k))
        raise InstructionRefused(f"site {site.site_id}: instruction fields {changed} differ from what the coordinator signed; refusing it")
    if state_fingerprint(msg.content[ARRAYS].to_torch_state_dict()) != arrays_fingerprint:
        raise InstructionRefused(f"site {site.site_id}: the weights attached are not the ones the coordinator signed")
    round_ = signed.get("server-round")
    if not isinstance(round_, int) or round_ < expected.server_round:
        raise InstructionRefused(f"site {site.site_id}: signed configuration names round {round_!r}, not a new round")
    last[phase] = round_
    context.state[LAST_ROUND] = last
    return ConfigRecord(signed)


def secure_channel(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Verify the coordinator's instruction, run the app, seal its reply."""
    phase = msg.metadata.message_type
    if phase not in INSTRUCTION_KINDS:
        raise InstructionRefused(f"message type {phase!r} is not one fedtransfer answers")
    config = msg.content[CONFIG]
    sim_root = config.get("sim-root", "")
    site = resolve_site(context.node_config, sim_root if isinstance(sim_root, str) else "")
    identity, manifest = site_keys(site)
    try:
        msg.content[CONFIG] = _verified_config(msg, context, site, manifest, phase)
    except InstructionError as err:
        raise InstructionRefused(f"site {site.site_id}: {err}") from err
    reply = call_next(msg, context)
    if reply.has_error():
        return reply
    signed = msg.content[CONFIG]
    report = {**dict(reply.content[SITE]), "metrics": dict(reply.content[METRICS])}
    tensors = reply.content[ARRAYS].to_torch_state_dict() if ARRAYS in reply.content else {}
    context_out = EnvelopeContext(
        run_id=context.run_id,
        server_round=int(signed["server-round"]),
        site_id=site.site_id,
        kind=REPLY_KINDS[phase],
        base_model=str(signed["base-fingerprint"]),
    )
    if "privacy" in report:
        report["privacy"] = sign_report(json.loads(str(report["privacy"])), context.run_id, context_out.server_round, context_out.base_model, identity)
    blob = seal(encode_update(report, tensors), context_out, identity, manifest.coordinator)
    return Message(content=RecordDict({SEALED: ConfigRecord({"site-id": site.site_id, "envelope": blob})}), reply_to=msg)
