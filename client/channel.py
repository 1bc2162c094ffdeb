"""The site's end of the application-level channel: verify what comes in, seal what goes out.

Incoming: the instruction must carry the coordinator's signature (checked against the
signed federation manifest the site holds), for a round newer than the last one accepted,
and the weights attached must be the ones signed. The run id is the coordinator's, signed
in the instruction: the first verified instruction of a Flower run pins it, and every later
message of that Flower run must carry the same. Only the signed configuration reaches the
training code.

Outgoing: one :class:`~common.protocol.SiteReply` per instruction. Its privacy report
declares every value with its egress kind and is signed by the site; the reply is checked
against the egress rule and sealed to the coordinator. Whatever goes wrong at the site,
the coordinator gets a reply that says only what kind of problem it was (the details,
which may name records or values, stay in the site's log): an error's text never leaves.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from flwr.app import ConfigRecord, Context, Message, RecordDict

from client.private_round import Outcome
from client.session import SiteSession, site_session
from common.errors import DeploymentError, SecurityError
from common.model.transfer import state_fingerprint
from common.privacy.egress import EgressViolation, check_reply
from common.privacy.report import sign_report
from common.protocol import (
    ARRAYS,
    CONFIG,
    INSTRUCTION_KINDS,
    REPLY_KINDS,
    SEALED,
    SIGNED_INSTRUCTION,
    STATUS_ERROR,
    InstructionError,
    RoundInstruction,
    SiteReply,
    parse_instruction_payload,
)
from common.security.envelope import (
    EnvelopeContext,
    EnvelopeError,
    seal,
    signed_context,
    verify_instruction,
)

log = logging.getLogger(__name__)

LAST_ROUND = "fedtransfer-last-accepted-round"
RUN_ID = "run-id"  # in LAST_ROUND: the coordinator's run id this Flower run pinned
Handler = Callable[[SiteSession, RoundInstruction, Message, Context], Outcome]


class InstructionRefused(SecurityError):
    """The site refused an instruction: unsigned, forged, replayed or not matching its weights."""


class SiteUnavailable(DeploymentError):
    """The site cannot answer at all (its configuration or keys do not load); the message is public."""


def _accepted(context: Context) -> ConfigRecord:
    """What this Flower run accepted so far: the last round per phase and the coordinator's run id."""
    return context.state[LAST_ROUND] if LAST_ROUND in context.state else ConfigRecord()


def _verified(msg: Message, context: Context, session: SiteSession, phase: str) -> RoundInstruction:
    config = msg.content[CONFIG]
    blob = config.get(SIGNED_INSTRUCTION)
    if not isinstance(blob, bytes):
        raise InstructionRefused("the instruction is not signed by the coordinator")
    last = _accepted(context)
    try:
        # the run id the signature must cover: the one this Flower run pinned, else the one claimed (then verified)
        run_id = str(last[RUN_ID]) if RUN_ID in last else signed_context(blob).run_id
        expected = EnvelopeContext(
            run_id=run_id,
            server_round=int(last.get(phase, 0)) + 1,
            site_id=session.site_id,
            kind=INSTRUCTION_KINDS[phase],
            base_model=str(config.get("base-fingerprint", "")),
        )
        signed, arrays_fingerprint = parse_instruction_payload(
            verify_instruction(blob, expected, session.manifest.coordinator)
        )
        instruction = RoundInstruction.from_config(signed)
    except (EnvelopeError, InstructionError, ValueError) as err:
        raise InstructionRefused(f"{type(err).__name__}: {err}") from None
    if instruction.run_id != run_id:
        raise InstructionRefused(f"signed configuration names run {instruction.run_id!r}, its envelope run {run_id}")
    plain = {k: v for k, v in config.items() if k != SIGNED_INSTRUCTION}
    if plain != signed:
        changed = sorted(k for k in set(plain) | set(signed) if plain.get(k) != signed.get(k))
        raise InstructionRefused(f"instruction fields {changed} differ from what the coordinator signed")
    if state_fingerprint(msg.content[ARRAYS].to_torch_state_dict()) != arrays_fingerprint:
        raise InstructionRefused("the weights attached are not the ones the coordinator signed")
    if instruction.server_round < expected.server_round:
        raise InstructionRefused(f"signed configuration names round {instruction.server_round}, not a new round")
    last[phase] = instruction.server_round
    last[RUN_ID] = run_id
    context.state[LAST_ROUND] = last
    msg.content[CONFIG] = ConfigRecord(signed)
    return instruction


def _public_error(err: Exception) -> str:
    """What the coordinator may learn of a failure: its kind, never its text (unless it is about the instruction)."""
    if isinstance(err, InstructionRefused):
        return f"instruction refused: {err}"
    return f"the site could not complete this instruction ({type(err).__name__}); the details are in the site's own log"


def answer(msg: Message, context: Context, phase: str, handler: Handler, sim_root: str = "") -> Message:
    """Verify the instruction, run ``handler``, and seal its outcome (or a public error) to the coordinator.

    ``sim_root`` is where this machine's simulated sites live (local configuration, never a message's).
    """
    if phase not in INSTRUCTION_KINDS:
        raise SiteUnavailable(f"message type {phase!r} is not one fedtransfer answers")
    try:
        session = site_session(context.node_config, sim_root)
    except Exception as err:  # noqa: BLE001 - nothing is sealed without the site's keys; say only what failed
        log.exception("this site cannot load its configuration, keys, manifest or policy")
        raise SiteUnavailable(
            f"the site cannot load its configuration or keys ({type(err).__name__}); "
            "the details are in the site's own log"
        ) from None
    instruction: RoundInstruction | None = None
    try:
        instruction = _verified(msg, context, session, phase)
        outcome = handler(session, instruction, msg, context)
    except Exception as err:  # noqa: BLE001 - any failure becomes one error reply that carries no private detail
        log.exception("site %s: %s instruction failed", session.site_id, phase)
        outcome = Outcome(STATUS_ERROR, _public_error(err))
    return _sealed(msg, context, session, phase, instruction, outcome)


def _claimed_run_id(config: ConfigRecord, context: Context) -> str:
    """The run to address a refusal to when the instruction did not verify: the pinned one, else what it claims."""
    last = _accepted(context)
    if RUN_ID in last:
        return str(last[RUN_ID])
    blob = config.get(SIGNED_INSTRUCTION)
    try:
        return signed_context(blob).run_id if isinstance(blob, bytes) else str(config.get("run-id", ""))
    except EnvelopeError:
        return str(config.get("run-id", ""))


def _report(phase: str, outcome: Outcome) -> dict:
    return {**outcome.report(), "phase": phase, "status": outcome.status, "egress": dict(outcome.egress)}


def _sealed(
    msg: Message,
    context: Context,
    session: SiteSession,
    phase: str,
    instruction: RoundInstruction | None,
    outcome: Outcome,
) -> Message:
    config = msg.content[CONFIG]
    claimed_round = config.get("server-round")
    server_round = (
        instruction.server_round
        if instruction
        else (claimed_round if isinstance(claimed_round, int) and 0 <= claimed_round < 2**32 else 0)
    )
    base_model = instruction.base_fingerprint if instruction else str(config.get("base-fingerprint", ""))
    run_id = instruction.run_id if instruction else _claimed_run_id(config, context)
    try:
        envelope = EnvelopeContext(run_id, server_round, session.site_id, REPLY_KINDS[phase], base_model)
    except ValueError:
        raise SiteUnavailable(
            f"{outcome.reason}; the instruction names no valid round and base model to reply to"
        ) from None
    report = _report(phase, outcome)
    try:
        check_reply(phase, outcome.status, outcome.values, bool(outcome.tensors), report)
    except EgressViolation:
        log.exception("site %s: the reply broke the egress rule; sending an error instead", session.site_id)
        outcome = Outcome(STATUS_ERROR, "the site's reply broke the egress rule and was not sent")
        report = _report(phase, outcome)
    reply = SiteReply(
        site_id=session.site_id,
        phase=phase,
        status=outcome.status,
        reason=outcome.reason,
        values=outcome.values,
        report=sign_report(report, run_id, server_round, base_model, session.identity),
        tensors=outcome.tensors,
    )
    blob = seal(reply.encode(), envelope, session.identity, session.manifest.coordinator)
    return Message(
        content=RecordDict({SEALED: ConfigRecord({"site-id": session.site_id, "envelope": blob})}), reply_to=msg
    )
