"""The egress rule: every value a site sends is one of four kinds, and is declared as such.

1. ``dp-update``: the trainable weights after DP-SGD;
2. ``public``: protocol constants, values the coordinator sent, and the site's own public
   declarations (its policy file);
3. ``dp-release``: the output of a Gaussian mechanism whose spend was composed into the
   dataset's history and written to the ledger before the value left;
4. ``not-private``: an exact value from a dataset that has no DP guarantee any more (a run
   without DP that the site's policy allowed; the audit fails such datasets).

Nothing else may leave. :data:`VALUES` lists every value a reply may carry, with its kind;
:data:`REPORT_FIELDS` every field of the site's signed privacy report (all public). The
report's ``egress`` field declares, for each value of that very reply, its kind and
mechanism; ``releases`` gives each DP release's noise, sensitivity and ledger entry.
:func:`check_reply` enforces all of it, at the site before a reply is sealed and at the
coordinator after it is opened, so one definition governs both ends. ``docs/privacy.md``
shows the same table.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from common.errors import PrivacyError
from common.privacy.ledger import RELEASE_KINDS

UPDATE, PUBLIC, RELEASE, NOT_PRIVATE = "dp-update", "public", "dp-release", "not-private"
KINDS = (UPDATE, PUBLIC, RELEASE, NOT_PRIVATE)
PHASES = ("train", "evaluate")
STATUSES = ("ok", "declined", "error")


class EgressViolation(PrivacyError, ValueError):
    """A reply carries a value the egress rule does not allow, or does not declare what it carries."""


@dataclass(frozen=True)
class Rule:
    """How one value may leave: its kind in a private reply, the phases that carry it, what it is."""

    kind: str
    phases: tuple[str, ...]
    meaning: str


#: The values a reply may carry (``update`` is the tensors; the rest are numbers or lists of numbers).
VALUES: dict[str, Rule] = {
    "update": Rule(
        UPDATE,
        ("train",),
        "the trainable weights after local DP-SGD (Opacus: per-record clipping, "
        "Gaussian noise at every step, empty batches included, Poisson sampling)",
    ),
    "num-examples": Rule(
        PUBLIC,
        ("train", "evaluate"),
        "the site's declared size (policy `declared_size`), its aggregation weight; never the exact count",
    ),
    "steps": Rule(PUBLIC, ("train",), "DP-SGD steps of the round: planned from the instruction and the declared size"),
    "train-loss": Rule(
        RELEASE,
        ("train",),
        "mean training loss after the round: per-record loss clipped to [0, 5], "
        "summed, Gaussian noise, divided by the declared size (only if asked and the policy allows)",
    ),
    "eval-counts": Rule(
        RELEASE,
        ("evaluate",),
        "histogram of the test split by true class and class-1 logit bin "
        "(two classes) or predicted class, Gaussian noise in every cell",
    ),
    "personalised-eval-counts": Rule(
        RELEASE, ("evaluate",), "the same histogram for the site's privately personalised copy (which never leaves)"
    ),
}

#: Every field of the signed privacy report: all public (data-independent, or the site's declarations).
REPORT_FIELDS: dict[str, str] = {
    "phase": "train or evaluate (the instruction's)",
    "status": "ok, declined or error",
    "dp": "whether the dataset is trained with DP",
    "dataset-id": "HMAC of the files' hash under a site-held key: stable at the site, unrelated to the content",
    "epsilon": "the dataset's cumulative epsilon after this reply (composed from its whole ledger history)",
    "delta": "delta of that epsilon",
    "accountant": "the site's accountant (prv or rdp)",
    "reference-epsilon": "the same history under the other accountant",
    "reference-accountant": "which accountant that is",
    "cap-epsilon": "the site's lifetime cap (its policy)",
    "run-target-epsilon": "the most this run may spend (request, policy per-run limit and cap, the smallest)",
    "overridden": "request fields the site's policy overrode",
    "noise": "csprng, or seeded (reproducible: NOT private)",
    "grad-sample-mode": "how the clipped per-record gradients were computed (Opacus's hooks, ew, functorch or ghost; "
    "direct: Opacus's grad samplers without backward hooks; linear: the factorised clipping of a last linear layer; "
    "chosen from the model and transfer policy)",
    "declared-size": "the site's declared size",
    "spends": "every ledger entry this reply caused: kind, index, hash, noise multiplier, sample rate, steps, "
    "clipping norm or sensitivity (all planned from public values)",
    "releases": "for each DP-released value, the index of the ledger entry that recorded it",
    "egress": "this declaration: each value of the reply with its kind and mechanism",
}


def declaration(kind: str, detail: str) -> str:
    """The text a report's ``egress`` field holds for one value: ``"<kind>: <mechanism>"``."""
    if kind not in KINDS:
        raise ValueError(f"unknown egress kind {kind!r}")
    return f"{kind}: {detail}"


def _numbers(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, (int, float)):
        return math.isfinite(value)
    if isinstance(value, list):
        return all(_numbers(v) for v in value)
    return False


def check_reply(
    phase: str, status: str, values: Mapping[str, Any], has_update: bool, report: Mapping[str, Any]
) -> None:
    """Raise :class:`EgressViolation` unless every value of the reply is allowed and declared.

    ``values`` are the reply's values (``update`` excluded, ``has_update`` says whether
    tensors travel); ``report`` is the signed privacy report's content.
    """
    if phase not in PHASES or status not in STATUSES:
        raise EgressViolation(f"reply phase {phase!r} / status {status!r} is not one the protocol knows")
    unknown = sorted(set(report) - set(REPORT_FIELDS))
    if unknown:
        raise EgressViolation(f"the privacy report holds fields outside the egress rule: {unknown}")
    if report.get("phase") != phase or report.get("status") != status:
        raise EgressViolation("the privacy report's phase and status differ from the reply's")
    carried = set(values) | ({"update"} if has_update else set())
    if "update" in values:
        raise EgressViolation("the update travels as tensors, never as a value")
    if carried and status != "ok":
        raise EgressViolation(f"a {status} reply carries values {sorted(carried)}")
    for name in sorted(carried):
        rule = VALUES.get(name)
        if rule is None or phase not in rule.phases:
            raise EgressViolation(f"a {phase} reply may not carry {name!r}")
        if name != "update" and not _numbers(values[name]):
            raise EgressViolation(f"value {name!r} is not a finite number or a list of them")
    declared = report.get("egress")
    if not isinstance(declared, dict) or set(declared) != carried:
        got = sorted(declared) if isinstance(declared, dict) else declared
        raise EgressViolation(f"the report declares {got} but the reply carries {sorted(carried)}")
    private = report.get("dp") is not False
    releases = report.get("releases", {})
    listed = report.get("spends", [])
    if not isinstance(listed, list):
        raise EgressViolation("the report's spends are not a list")
    spends = {
        s.get("ledger-index"): s for s in listed if isinstance(s, dict) and isinstance(s.get("ledger-index"), int)
    }
    for name in sorted(carried):
        text = declared[name]
        kind = text.split(":", 1)[0] if isinstance(text, str) else None
        allowed = VALUES[name].kind if private else NOT_PRIVATE
        if kind != allowed and not (not private and kind == PUBLIC and VALUES[name].kind == PUBLIC):
            raise EgressViolation(f"{name!r} is declared {kind!r}; the rule allows {allowed!r} here")
        if kind == RELEASE:
            index = releases.get(name) if isinstance(releases, dict) else None
            spend = spends.get(index) if isinstance(index, int) else None
            if not (
                spend
                and spend.get("kind") in RELEASE_KINDS
                and _numbers(spend.get("noise-multiplier"))
                and spend["noise-multiplier"] > 0
            ):
                raise EgressViolation(f"DP release {name!r} names no ledger entry of a release with its noise")
