"""Attacks on the channel between coordinator and sites, one per round of a real in-process federation.

Site 0 is the target (or, for a malicious-site attack, the attacker); sites 1 and 2 stay
honest. Each attacked round must drop site 0's contribution with its own specific reason
and still aggregate the two honest sites.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
import torch
from flwr.app import ConfigRecord, Message, RecordDict

from client.app import app as client_app
from common.data.scenarios import load_scenario
from common.model.transfer import state_fingerprint
from common.privacy.egress import NOT_PRIVATE, PUBLIC, declaration
from common.privacy.report import sign_report
from common.protocol import ARRAYS, CONFIG, SEALED, SIGNED_INSTRUCTION, SiteReply, instruction_payload
from common.security.envelope import EnvelopeContext, seal, sign_instruction
from common.security.keys import Identity, read_identity
from common.security.manifest import Manifest
from common.settings import RunSettings
from server.federation import run_federation
from simulations.inprocess import DirectGrid, run_on_grid
from simulations.sites import materialize_sites, prepare_sites

pytestmark = pytest.mark.federation

ATTACKER = 101  # node id of site 0


def _sealed(reply: Message) -> ConfigRecord:
    return reply.content[SEALED]


def _with_envelope(reply: Message, blob: bytes, site_id: str | None = None) -> Message:
    sealed = _sealed(reply)
    record = ConfigRecord({"site-id": site_id or str(sealed["site-id"]), "envelope": blob})
    return Message(content=RecordDict({SEALED: record}), reply_to=_original[id(reply)])


_original: dict[int, Message] = {}


class Campaign:
    """Runs one attack per round against site 0 and remembers what it saw."""

    def __init__(self, root: Path, grid: DirectGrid) -> None:
        self.root = root
        self.grid = grid
        self.round = 0
        self.previous_reply: Message | None = None
        self.attacks: dict[int, str] = {}
        self.study = root / "study" / "study.toml"

    def site_key(self) -> Identity:
        return read_identity(self.root / "sites" / "site-0" / "keys", "site-0")

    def manifest(self) -> Manifest:
        return Manifest.from_json((self.root / "sites" / "site-0" / "keys" / "manifest.json").read_text(), None)

    def coordinator_public(self):
        return self.manifest().coordinator

    def base_fingerprint(self, msg: Message) -> str:
        return str(msg.content[CONFIG]["base-fingerprint"])

    def crafted(
        self,
        msg: Message,
        tensors: dict[str, torch.Tensor],
        site: Identity | None = None,
        other_run: bool = False,
        recipient=None,
        values: dict | None = None,
        report_payload: bytes | None = None,
    ) -> bytes:
        """An update built by site 0 itself (a malicious but authenticated site) or by an impostor.

        ``values`` replace the reply's values (encoded as given, NaN included); ``report_payload`` replaces the
        signed report's JSON with any bytes (still signed by the site).
        """
        site = site or self.site_key()
        server_round = int(msg.content[CONFIG]["server-round"])
        base = self.base_fingerprint(msg)
        run_id = "0" * 32 if other_run else str(msg.content[CONFIG]["run-id"])
        declared = self.manifest().declared_size("site-0")
        values = values or {"num-examples": declared, "steps": 1}
        report = {
            "phase": "train",
            "status": "ok",
            "dp": False,
            "dataset-id": "a" * 64,
            "declared-size": values["num-examples"] if isinstance(values["num-examples"], int) else declared,
            "egress": {
                "update": declaration(NOT_PRIVATE, "plain SGD"),
                "num-examples": declaration(PUBLIC, "declared"),
                "steps": declaration(PUBLIC, "planned"),
            },
        }
        signed = sign_report(report, run_id, server_round, base, site)
        if report_payload is not None:
            context = EnvelopeContext(run_id, server_round, site.name, "privacy-report", base)
            signed = base64.b64encode(sign_instruction(report_payload, context, site)).decode()
        reply = SiteReply(site.name, "train", "ok", "", {"num-examples": declared, "steps": 1}, signed, tensors)
        payload = reply.encode()
        if values["num-examples"] != declared:
            header = json.dumps(
                {
                    "site-id": site.name,
                    "phase": "train",
                    "status": "ok",
                    "reason": "",
                    "values": values,
                    "report": signed,
                }
            ).encode()
            payload = b"FTR2" + len(header).to_bytes(4, "big") + header + payload[8 + int.from_bytes(payload[4:8]) :]
        context = EnvelopeContext(run_id, server_round, site.name, "train-reply", base)
        return seal(payload, context, site, recipient or self.coordinator_public())


def _honest_shapes(msg: Message) -> dict[str, torch.Tensor]:
    return msg.content["arrays"].to_torch_state_dict()


def _flip(blob: bytes, position: int) -> bytes:
    data = bytearray(blob)
    data[position % len(data)] ^= 0x10
    return bytes(data)


UPLINK_ATTACKS = {
    "flipped-bit": (
        "MalformedEnvelope|BadSignature|DecryptionFailed",
        lambda c, msg, reply: _with_envelope(
            reply, _flip(_sealed(reply)["envelope"], len(_sealed(reply)["envelope"]) // 2)
        ),
    ),
    "truncated": ("MalformedEnvelope", lambda c, msg, reply: _with_envelope(reply, _sealed(reply)["envelope"][:-40])),
    "replayed-round": (
        "ReplayedEnvelope",
        lambda c, msg, reply: _with_envelope(reply, _sealed(c.previous_reply)["envelope"]),
    ),
    "other-run": (
        "ReplayedEnvelope",
        lambda c, msg, reply: _with_envelope(reply, c.crafted(msg, _honest_shapes(msg), other_run=True)),
    ),
    "unknown-key": (
        "BadSignature",
        lambda c, msg, reply: _with_envelope(
            reply, c.crafted(msg, _honest_shapes(msg), site=Identity.generate("site-0"))
        ),
    ),
    "relabelled": (
        "UnknownSigner",
        lambda c, msg, reply: _with_envelope(reply, _sealed(reply)["envelope"], site_id="site-1"),
    ),
    "wrong-recipient": (
        "WrongRecipient|DecryptionFailed",
        lambda c, msg, reply: _with_envelope(
            reply, c.crafted(msg, _honest_shapes(msg), recipient=Identity.generate("coordinator").public())
        ),
    ),
    "nan-weights": (
        "NaN or Inf",
        lambda c, msg, reply: _with_envelope(
            reply, c.crafted(msg, {k: torch.full_like(v, float("nan")) for k, v in _honest_shapes(msg).items()})
        ),
    ),
    "wrong-shapes": (
        "expected",
        lambda c, msg, reply: _with_envelope(
            reply, c.crafted(msg, {k: torch.zeros(*v.shape, 2) for k, v in _honest_shapes(msg).items()})
        ),
    ),
    "huge-norm": (
        "exceeds the bound",
        lambda c, msg, reply: _with_envelope(
            reply, c.crafted(msg, {k: v + 1e3 for k, v in _honest_shapes(msg).items()})
        ),
    ),
    "oversized": ("PayloadTooLarge", lambda c, msg, reply: _with_envelope(reply, b"\0" * (64 * 2**20 + 1))),
    # security review finding 2: 2,000 nested levels in a 4 KB header, no key needed; then inside a signed report
    "nested-header": ("MalformedEnvelope", lambda c, msg, reply: _with_envelope(reply, _nested_header_envelope())),
    "nested-report": (
        "ReportInvalid",
        lambda c, msg, reply: _with_envelope(
            reply, c.crafted(msg, _honest_shapes(msg), report_payload=b"[" * 5000 + b"]" * 5000)
        ),
    ),
    # security review finding 3: aggregation weights the site chose
    "nan-weight": (
        "not a finite number",
        lambda c, msg, reply: _with_envelope(
            reply, c.crafted(msg, _honest_shapes(msg), values={"num-examples": float("nan"), "steps": 1})
        ),
    ),
    "negative-weight": (
        "aggregation weight",
        lambda c, msg, reply: _with_envelope(
            reply, c.crafted(msg, _honest_shapes(msg), values={"num-examples": -179.9, "steps": 1})
        ),
    ),
    "other-weight": (
        "differs from the size",
        lambda c, msg, reply: _with_envelope(
            reply,
            c.crafted(
                msg, _honest_shapes(msg), values={"num-examples": c.manifest().declared_size("site-0") * 50, "steps": 1}
            ),
        ),
    ),
}


def _nested_header_envelope() -> bytes:
    header = b"[" * 2000 + b"]" * 2000
    return b"FTEV" + bytes([1, 1]) + len(header).to_bytes(2, "big") + header + bytes(8) + bytes(64)


def _forged_signature(c: Campaign, msg: Message) -> Message:
    config = dict(msg.content[CONFIG].items())
    context = EnvelopeContext(
        str(config["run-id"]), int(config["server-round"]), "*", "train-instruction", c.base_fingerprint(msg)
    )
    plain = {k: v for k, v in config.items() if k != SIGNED_INSTRUCTION}
    payload = json.dumps({"config": plain, "arrays": "0" * 64}, sort_keys=True).encode()
    config[SIGNED_INSTRUCTION] = sign_instruction(payload, context, Identity.generate("coordinator"))
    return _replace_config(msg, config)


def _weaker_privacy(c: Campaign, msg: Message) -> Message:
    config = dict(msg.content[CONFIG].items())
    config["dp-target-epsilon"] = 50.0
    config["dp"] = 0
    return _replace_config(msg, config)


def _unsigned(c: Campaign, msg: Message) -> Message:
    config = dict(msg.content[CONFIG].items())
    del config[SIGNED_INSTRUCTION]
    return _replace_config(msg, config)


def _redirected_root(c: Campaign, msg: Message) -> Message:
    """Security review finding 6: the relay points the site at a federation it wrote and signs what it likes."""
    relay = materialize_sites(load_scenario(str(c.study)), c.root / "relay-sites", "relay", allow_non_private=True)
    config = dict(msg.content[CONFIG].items())
    config.update({"sim-root": str(c.root / "relay-sites"), "dp": 0})
    context = EnvelopeContext(
        str(config["run-id"]), int(config["server-round"]), "*", "train-instruction", c.base_fingerprint(msg)
    )
    plain = {k: v for k, v in config.items() if k != SIGNED_INSTRUCTION}
    arrays = state_fingerprint(msg.content[ARRAYS].to_torch_state_dict())
    config[SIGNED_INSTRUCTION] = sign_instruction(instruction_payload(plain, arrays), context, relay.coordinator)
    return _replace_config(msg, config)


def _replace_config(msg: Message, config: dict) -> Message:
    content = RecordDict({**dict(msg.content.items()), CONFIG: ConfigRecord(config)})
    return Message(content=content, message_type=msg.metadata.message_type, dst_node_id=msg.metadata.dst_node_id)


DOWNLINK_ATTACKS = {
    "forged-instruction": ("BadSignature", _forged_signature),
    "weaker-privacy": ("differ from what the coordinator signed", _weaker_privacy),
    "unsigned-instruction": ("not signed by the coordinator", _unsigned),
    "redirected-root": ("BadSignature", _redirected_root),
}


@pytest.fixture(scope="module")
def campaign(tmp_path_factory: pytest.TempPathFactory):
    from tests.conftest import write_shifted_study

    root = tmp_path_factory.mktemp("attacks")
    study = write_shifted_study(root / "study")
    grid = DirectGrid(client_app, num_nodes=3)
    attacks = list(UPLINK_ATTACKS) + list(DOWNLINK_ATTACKS)
    c = Campaign(root, grid)
    schedule = {round_ + 2: name for round_, name in enumerate(attacks)}  # round 1 stays honest

    def on_instruction(node: int, msg: Message) -> Message:
        if msg.metadata.message_type == "train":
            c.round = int(msg.content[CONFIG]["server-round"])
        name = schedule.get(c.round)
        if node == ATTACKER and msg.metadata.message_type == "train" and name in DOWNLINK_ATTACKS:
            return DOWNLINK_ATTACKS[name][1](c, msg)
        return msg

    def on_reply(node: int, reply: Message) -> Message:
        if node != ATTACKER or reply.metadata.message_type != "train" or reply.has_error():
            return reply
        _original[id(reply)] = next(m for n, m in reversed(grid.delivered) if n == node)
        name = schedule.get(c.round)
        result = reply
        if name in UPLINK_ATTACKS:
            result = UPLINK_ATTACKS[name][1](c, _original[id(reply)], reply)
        c.previous_reply = reply
        return result

    grid.on_instruction = on_instruction
    grid.on_reply = on_reply
    settings = RunSettings(
        scenario=str(study),
        rounds=len(attacks) + 1,
        local_epochs=1,
        out=str(root / "out"),
        sim_root=str(root / "sites"),
        min_sites=2,
        expected_sites=3,
        dp=False,
        max_update_norm=50.0,
    )
    record = run_on_grid(grid, settings)
    return record, schedule


def test_honest_first_round_aggregates_everyone(campaign) -> None:
    record, _ = campaign
    assert record.round(1).aggregated_sites == ["site-0", "site-1", "site-2"]
    assert record.status == "completed"


@pytest.mark.parametrize("attack", list(UPLINK_ATTACKS) + list(DOWNLINK_ATTACKS))
def test_attack_is_rejected_with_its_reason_and_the_round_goes_on(campaign, attack: str) -> None:
    record, schedule = campaign
    server_round = next(r for r, name in schedule.items() if name == attack)
    current = record.round(server_round)
    expected = (UPLINK_ATTACKS | DOWNLINK_ATTACKS)[attack][0]
    victim = current.sites["site-0"]
    assert victim.status in ("rejected", "failed"), victim
    assert any(part in victim.reason for part in expected.split("|")), victim.reason
    assert current.aggregated_sites == ["site-1", "site-2"]
    assert current.sites["site-1"].status == "ok" and current.sites["site-2"].status == "ok"


def test_a_relay_written_site_folder_is_never_used(campaign, tmp_path_factory) -> None:
    record, schedule = campaign
    relay_sites = next(p for p in tmp_path_factory.getbasetemp().rglob("relay-sites"))
    written = sorted(p.name for p in relay_sites.rglob("state/*"))
    assert written and written == ["privacy-policy.toml"] * len(written), written  # nothing trained there


def test_signed_privacy_reports_are_kept_in_the_run_record(campaign) -> None:
    record, _ = campaign
    reply = record.round(1).sites["site-1"].train
    assert base64.b64decode(reply.report_signed)[:4] == b"FTEV"
    assert reply.report["dp"] is False


def test_the_run_record_says_who_joined_as_which_node_with_which_key(campaign) -> None:
    """Security review: who joined. Attacks in later rounds (impostors, relabelled replies) change none of it."""
    record, _ = campaign
    keys = Path(record.settings["sim_root"]) / "site-0" / "keys"
    manifest = Manifest.from_json((keys / "manifest.json").read_text(), None)
    assert sorted(record.participants) == ["site-0", "site-1", "site-2"]
    for name, joined in record.participants.items():
        assert joined.key_fingerprint == manifest.site(name).fingerprint()
        assert joined.joined_round == 1 and joined.joined.endswith("+00:00")
    assert record.participants["site-0"].node_id == ATTACKER
    assert len({joined.node_id for joined in record.participants.values()}) == 3


def test_a_relay_that_reuses_a_run_number_cannot_replay_across_runs(tmp_path: Path) -> None:
    """Security review finding 8: the run id that blocks cross-run replay was the relay's own run number.

    The relay gives two runs the same Flower run number, replays site-0's round-1 reply of the first
    run into the second, and hands site-1 the first run's round-2 instruction in the second run.
    """
    from tests.conftest import write_shifted_study

    study = write_shifted_study(tmp_path / "study", sites=2)
    settings = RunSettings(
        scenario=str(study), rounds=2, local_epochs=1, sim_root=str(tmp_path / "sites"), min_sites=1, dp=False
    )
    first = DirectGrid(client_app, num_nodes=2, run_id=4242)
    kept: dict[str, RecordDict] = {}  # copies: the apps replace records of the messages they handle

    def keep_instruction(node: int, msg: Message) -> Message:
        if node == 102 and msg.metadata.message_type == "train" and msg.content[CONFIG]["server-round"] == 2:
            kept["instruction"] = RecordDict(dict(msg.content.items()))
        return msg

    def keep_reply(node: int, reply: Message) -> Message:
        current = next(m for n, m in reversed(first.delivered) if n == node)
        if node == 101 and reply.metadata.message_type == "train" and current.content[CONFIG]["server-round"] == 1:
            kept["reply"] = RecordDict(dict(reply.content.items()))
        return reply

    first.on_instruction, first.on_reply = keep_instruction, keep_reply
    deployed = prepare_sites(settings)  # one federation, its keys kept across runs as in a deployment
    first.place_sites(tmp_path / "sites")
    earlier = run_federation(first, deployed.with_(out=str(tmp_path / "first")), 4242)
    second = DirectGrid(client_app, num_nodes=2, run_id=4242)

    def replay_instruction(node: int, msg: Message) -> Message:
        if node == 102 and msg.metadata.message_type == "train" and msg.content[CONFIG]["server-round"] == 2:
            return Message(content=kept["instruction"], message_type="train", dst_node_id=node)
        return msg

    def replay_reply(node: int, reply: Message) -> Message:
        current = next(m for n, m in reversed(second.delivered) if n == node)
        if node == 101 and reply.metadata.message_type == "train" and current.content[CONFIG]["server-round"] == 1:
            return Message(content=kept["reply"], reply_to=current)
        return reply

    second.on_instruction, second.on_reply = replay_instruction, replay_reply
    second.place_sites(tmp_path / "sites")
    later = run_federation(second, deployed.with_(out=str(tmp_path / "second")), 4242)
    assert earlier.run_id != later.run_id and earlier.round(1).flower_run_id == later.round(1).flower_run_id == 4242
    replayed_reply = later.round(1).sites["node-101"]  # its first reply did not prove who node 101 is
    assert replayed_reply.status == "rejected" and "ReplayedEnvelope" in replayed_reply.reason, replayed_reply
    replayed_instruction = later.round(2).sites["site-1"]
    assert replayed_instruction.status == "failed", replayed_instruction
    assert f"belongs to run {earlier.run_id}, not the current run {later.run_id}" in replayed_instruction.reason
