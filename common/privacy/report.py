"""A site's privacy report for one round, signed by the site so anyone holding the manifest can check it.

The report (JSON) travels inside the sealed update and is also kept, signed, in the
coordinator's run record, so a privacy officer can later compare it with the site's
ledger without trusting the coordinator. The signature uses the envelope module's
signed-statement format with kind ``privacy-report``, bound to run, round, site and
base model.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

from common.errors import SecurityError
from common.io import JsonError, parse_json
from common.security.envelope import (
    EnvelopeContext,
    EnvelopeError,
    sign_instruction,
    signed_context,
    verify_instruction,
)
from common.security.keys import Identity, PublicIdentity

REPORT_KIND = "privacy-report"


class ReportInvalid(SecurityError):
    """A signed privacy report does not verify or does not parse."""


def sign_report(report: dict[str, Any], run_id: str, server_round: int, base_model: str, site: Identity) -> str:
    """The report signed by ``site``, as base64 text for JSON files."""
    context = EnvelopeContext(run_id, server_round, site.name, REPORT_KIND, base_model)
    payload = json.dumps(report, sort_keys=True, allow_nan=False).encode()
    return base64.b64encode(sign_instruction(payload, context, site)).decode()


def verify_report(signed: str, run_id: str, server_round: int, base_model: str, site: PublicIdentity) -> dict[str, Any]:
    """The report, if ``site`` signed it for exactly this run, round and base model."""
    try:
        blob = base64.b64decode(signed, validate=True)
        context = EnvelopeContext(run_id, server_round, site.name, REPORT_KIND, base_model)
        payload = verify_instruction(blob, context, site)
    except (binascii.Error, ValueError, EnvelopeError) as err:
        raise ReportInvalid(f"privacy report of {site.name} for run {run_id} round {server_round}: {err}") from err
    header_round = signed_context(blob).server_round
    if header_round != server_round:
        raise ReportInvalid(f"privacy report of {site.name} is signed for round {header_round}, not {server_round}")
    try:
        report = parse_json(payload)
    except JsonError as err:
        raise ReportInvalid(f"privacy report of {site.name} does not parse: {err}") from None
    if not isinstance(report, dict):
        raise ReportInvalid(f"privacy report of {site.name} is not a JSON object")
    return report
