"""Nothing leaves a site outside its privacy budget: regression tests made from an outside audit's attacks.

Each value a site sends is the DP update, a public value, or a DP release recorded in its
ledger first; every kind of reply goes through the one egress rule at both ends.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from scipy.stats import beta

import client.private_round as private_round
from client.app import app as client_app
from client.dp_training import dp_train, sample_rate_and_steps
from common.data.site_config import site_dir
from common.data.site_data import dataset_fingerprint
from common.model.metrics import LOGIT_EDGES, evaluation_counts
from common.model.training import TrainConfig, use_one_torch_thread
from common.model.transfer import state_fingerprint
from common.privacy.accounting import Step, compose_epsilon
from common.privacy.dataset_id import dataset_key, keyed_id
from common.privacy.egress import RELEASE, VALUES, EgressViolation, check_reply
from common.privacy.ledger import EVALUATE, PERSONALISE, PERSONALISED_EVALUATE, TRAIN, Ledger
from common.privacy.noise import SecureRandom, SeededRandom
from common.privacy.policy import SitePolicy, write_policy
from common.privacy.releases import LOSS_BOUND, noisy_mean_loss
from common.protocol import ARRAYS, CONFIG, SIGNED_INSTRUCTION, instruction_payload
from common.run_record import RunRecord
from common.security.envelope import BROADCAST, EnvelopeContext, sign_instruction
from common.security.keys import COORDINATOR_NAME, read_identity
from common.settings import RunSettings
from simulations.inprocess import DirectGrid, run_on_grid
from simulations.sites import COORDINATOR_KEYS_DIR
from tests.conftest import write_shifted_study

FIRST_NODE = 101
DECLARED = {0: 100, 1: 120, 2: 120}  # site 0 declares fewer rows than it holds: only the declaration may leave
CAPS = {0: 10.0, 1: 10.0, 2: 0.05}  # no run fits site 2's cap: it declines to train, and so to evaluate
BROKEN_SITE, BROKEN_ROUND = 1, 2  # its data breaks before round 2's evaluation: an error reply


@pytest.fixture(scope="module")
def every_reply(tmp_path_factory: pytest.TempPathFactory):
    """A private run whose replies include every kind: train and evaluate ok, declines, a personalisation, an error."""
    root = tmp_path_factory.mktemp("egress")
    study = write_shifted_study(root / "study", sites=3)
    sim_root = root / "sites"
    for site, cap in CAPS.items():
        path = site_dir(sim_root, f"site-{site}") / "state" / "privacy-policy.toml"
        path.parent.mkdir(parents=True)
        write_policy(
            SitePolicy(
                max_epsilon=cap,
                delta=1e-5,
                accountant="rdp",
                declared_size=DECLARED[site],
                evaluation="dp",
                max_evaluations_per_run=2,
                allow_loss_release=True,
            ),
            path,
        )
    grid = DirectGrid(client_app, num_nodes=3)
    saved: dict[str, bytes] = {}

    def break_data(node: int, msg: Message) -> Message:
        data = site_dir(sim_root, f"site-{BROKEN_SITE}") / "data" / "test.npz"
        is_target = node == FIRST_NODE + BROKEN_SITE and msg.metadata.message_type == "evaluate"
        if is_target and int(msg.content[CONFIG]["server-round"]) == BROKEN_ROUND:
            saved["test.npz"] = data.read_bytes()
            data.write_bytes(b"not an npz archive")
        elif saved:
            data.write_bytes(saved.pop("test.npz"))
        return msg

    grid.on_instruction = break_data
    settings = RunSettings(
        scenario=str(study),
        rounds=2,
        local_epochs=1,
        out=str(root / "out"),
        sim_root=str(sim_root),
        min_sites=2,
        expected_sites=3,
        target_epsilon=2.0,
        federated_evaluation="every",
        release_loss=True,
        personalise_epochs=3,
        personalise_fraction=0.3,
    )
    record = run_on_grid(grid, settings)
    return root, record


def _replies(record):
    return [
        (r.server_round, site, phase, reply)
        for r in record.rounds
        for site, s in sorted(r.sites.items())
        for phase, reply in (("train", s.train), ("evaluate", s.evaluate))
        if reply is not None
    ]


@pytest.mark.federation
def test_every_reply_kind_passes_the_egress_rule_and_declares_each_value(every_reply) -> None:
    _, record = every_reply
    kinds = set()
    for _, _, phase, reply in _replies(record):
        check_reply(phase, reply.status, reply.values, phase == "train" and reply.status == "ok", reply.report)
        kinds.add((phase, reply.status, "personalised-eval-counts" in reply.values))
        for name in reply.values:
            assert name in VALUES and name in reply.report["egress"]
            if reply.report["egress"][name].startswith(RELEASE):
                assert reply.report["releases"][name] in {s["ledger-index"] for s in reply.report["spends"]}
    assert kinds >= {
        ("train", "ok", False),
        ("train", "declined", False),
        ("evaluate", "ok", False),
        ("evaluate", "ok", True),
        ("evaluate", "declined", False),
        ("evaluate", "error", False),
    }, kinds


@pytest.mark.federation
def test_train_replies_carry_no_raw_loss_no_exact_count_and_a_public_sample_rate(every_reply) -> None:
    root, record = every_reply
    for _, site, phase, reply in _replies(record):
        if phase != "train" or reply.status != "ok":
            continue
        index = int(site.split("-")[1])
        assert set(reply.values) == {"num-examples", "steps", "train-loss"}
        assert reply.values["num-examples"] == DECLARED[index]  # site 0 holds 120 training rows and says 100
        [train] = [s for s in reply.report["spends"] if s["kind"] == TRAIN]
        rate, _ = sample_rate_and_steps(DECLARED[index], 16, 1)
        assert train["sample-rate"] == rate
        assert reply.report["egress"]["train-loss"].startswith("dp-release: Gaussian mechanism")
    ledger = Ledger(site_dir(root / "sites", "site-0") / "state")
    kinds = [e.kind for e in ledger.entries()]
    assert kinds.count("train-loss") == 2 and kinds.count(EVALUATE) == 2


@pytest.mark.federation
def test_errors_say_only_what_kind_of_problem_it_was(every_reply) -> None:
    _, record = every_reply
    error = record.round(BROKEN_ROUND).sites[f"site-{BROKEN_SITE}"].evaluate
    assert error.status == "error" and error.values == {} and error.report["egress"] == {}
    assert "UnsupportedFormat" in error.reason and "npz" not in error.reason.replace("UnsupportedFormat", "")


@pytest.mark.federation
def test_the_run_record_holds_only_declared_values(every_reply) -> None:
    root, _ = every_reply
    raw = json.loads((root / "out" / "run-record.json").read_text())
    for r in raw["rounds"]:
        for site in r["sites"].values():
            for phase in ("train", "evaluate"):
                reply = site[phase]
                if reply:
                    assert set(reply) == {"status", "reason", "values", "report", "report_signed"}
                    assert set(reply["values"]) <= set(reply["report"]["egress"])


@pytest.mark.federation
def test_a_site_never_sends_a_value_it_did_not_declare(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    study = write_shifted_study(tmp_path / "study", sites=2)
    original = private_round.train_round

    def leaky(*args, **kwargs):
        outcome = original(*args, **kwargs)
        outcome.values["exact-train-rows"] = 120  # a careless change adds a value without declaring it
        return outcome

    monkeypatch.setattr("client.app.train_round", leaky)
    settings = RunSettings(
        scenario=str(study),
        rounds=1,
        local_epochs=1,
        out=str(tmp_path / "out"),
        sim_root=str(tmp_path / "sites"),
        min_sites=1,
        expected_sites=2,
        target_epsilon=1.0,
    )
    grid = DirectGrid(client_app, num_nodes=2)
    with pytest.raises(Exception, match="no global model"):
        run_on_grid(grid, settings)
    reasons = [s.reason for s in RunRecord.load(tmp_path / "out" / "run-record.json").round(1).sites.values()]
    assert all("broke the egress rule" in reason for reason in reasons), reasons


def test_the_egress_rule_rejects_undeclared_misdeclared_and_unaccounted_values() -> None:
    report = {
        "phase": "train",
        "status": "ok",
        "dp": True,
        "egress": {"update": "dp-update: x", "num-examples": "public: declared", "steps": "public: planned"},
    }
    check_reply("train", "ok", {"num-examples": 10, "steps": 4}, True, report)
    with pytest.raises(EgressViolation, match="declares"):
        check_reply("train", "ok", {"num-examples": 10, "steps": 4, "train-loss": 0.3}, True, report)
    with pytest.raises(EgressViolation, match="declared 'public'"):
        check_reply(
            "train",
            "ok",
            {"num-examples": 10, "steps": 4, "train-loss": 0.3},
            True,
            {**report, "egress": {**report["egress"], "train-loss": "public: the raw loss"}},
        )
    with pytest.raises(EgressViolation, match="names no ledger entry"):
        check_reply(
            "train",
            "ok",
            {"num-examples": 10, "steps": 4, "train-loss": 0.3},
            True,
            {**report, "egress": {**report["egress"], "train-loss": "dp-release: trust me"}},
        )
    with pytest.raises(EgressViolation, match="outside the egress rule"):
        check_reply("train", "ok", {"num-examples": 10, "steps": 4}, True, {**report, "dataset-sha256": "ab" * 32})
    with pytest.raises(EgressViolation, match="may not carry"):
        check_reply(
            "evaluate", "ok", {"steps": 4}, False, {**report, "phase": "evaluate", "egress": {"steps": "public: x"}}
        )


# the loss: not released by default; released only with accounted noise ---------------------------


def _loss_membership(noise_multiplier: float, trials: int = 1000) -> tuple[float, float]:
    """Released mean losses of 60 rows with and without one mislabelled row (its loss clipped at the bound):
    (TPR lower bound, FPR upper bound) at 95% of the best threshold at a 1% false-positive rate."""
    source = SeededRandom(7)  # a test of the mechanism: reproducible draws are fine here
    base = torch.full((60,), 0.4)
    with_row = torch.cat([base, torch.tensor([LOSS_BOUND * 3])])  # the mislabelled patient: a huge loss, clipped
    out = np.array([noisy_mean_loss(base, 60, noise_multiplier, source) for _ in range(trials)])
    inside = np.array([noisy_mean_loss(with_row, 60, noise_multiplier, source) for _ in range(trials)])
    threshold = np.quantile(out, 0.99)
    fp, tp = int((out > threshold).sum()), int((inside > threshold).sum())
    tpr_low = beta.ppf(0.025, tp, trials - tp + 1) if tp else 0.0
    fpr_high = beta.ppf(0.975, fp + 1, trials - fp)
    return tpr_low, fpr_high


def test_the_loss_membership_attack_gains_no_more_than_the_accounted_epsilon() -> None:
    sigma, delta = 4.0, 1e-5
    accounted = compose_epsilon([Step(sigma, 1.0, 1)], delta, "rdp")
    tpr, fpr = _loss_membership(sigma)
    lower_bound = math.log(max(tpr - delta, 1e-12) / fpr)
    assert lower_bound <= accounted, (lower_bound, accounted)
    # the same test on the raw loss (noise off), as the train replies used to send it, has all the power it needs
    tpr, fpr = _loss_membership(1e-9)
    assert math.log((tpr - delta) / fpr) > 3.0


# dataset identity ------------------------------------------------------------------------------


def test_the_dataset_identity_is_not_a_function_of_the_content(tmp_path: Path) -> None:
    data = tmp_path / "data.csv"
    data.write_text("f0,label\n" + "\n".join(f"{i},{i % 2}" for i in range(20)) + "\n")
    content = dataset_fingerprint(data)
    here, there = (keyed_id(dataset_key(tmp_path / name), content) for name in ("site-a", "site-b"))
    assert here != there != content and here != hashlib.sha256(data.read_bytes()).hexdigest()
    assert keyed_id(dataset_key(tmp_path / "site-a"), content) == here  # stable at the site
    assert (tmp_path / "site-a" / "dataset-id.key").stat().st_mode & 0o777 == 0o600


@pytest.mark.federation
def test_reports_and_ledgers_carry_the_keyed_identity_only(every_reply) -> None:
    root, record = every_reply
    for index in (0, 1):  # site 2 never trained
        content = dataset_fingerprint(site_dir(root / "sites", f"site-{index}") / "data")
        entries = Ledger(site_dir(root / "sites", f"site-{index}") / "state").entries()
        assert entries and all(e.dataset_id != content for e in entries)
        assert content not in (root / "out" / "run-record.json").read_text()


# noise -----------------------------------------------------------------------------------------


class CountingSource(SecureRandom):
    def __init__(self) -> None:
        super().__init__()
        self.draws: list[int] = []

    def normal(self, shape, std, dtype=torch.float32):
        self.draws.append(math.prod(shape))
        return super().normal(shape, std, dtype)


def test_every_accounted_step_adds_noise_empty_batches_included() -> None:
    use_one_torch_thread()
    x, y = torch.randn(40, 5), torch.randint(0, 2, (40,))
    source = CountingSource()
    model = torch.nn.Linear(5, 2)
    before = copy.deepcopy(model.state_dict())
    stats = dp_train(
        model,
        x,
        y,
        TrainConfig(epochs=1, batch_size=1, lr=0.1),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        sample_rate=1 / 40,
        steps=200,
        expected_batch_size=1.0,
        source=source,
    )
    assert stats.steps - stats.updates > 30  # batch size 1: about 37% of the steps drew an empty batch
    assert source.draws == [5 * 2 + 2] * 200  # at every step one draw covers every weight and bias
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_two_identical_runs_on_real_data_give_different_updates() -> None:
    use_one_torch_thread()
    x, y = torch.randn(40, 5, generator=torch.Generator().manual_seed(0)), torch.arange(40) % 2
    weights = []
    for _ in range(2):
        model = torch.nn.Linear(5, 2)
        torch.nn.init.zeros_(model.weight)
        torch.nn.init.zeros_(model.bias)
        dp_train(
            model,
            x,
            y,
            TrainConfig(epochs=1, batch_size=8, lr=0.1),
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            sample_rate=0.2,
            steps=5,
            expected_batch_size=8.0,
            source=SecureRandom(),
        )
        weights.append(model.weight.detach().clone())
    assert not torch.equal(weights[0], weights[1])


@pytest.mark.federation
def test_the_run_uses_the_csprng_unless_reproducible_noise_is_asked_for_and_allowed(every_reply) -> None:
    root, _ = every_reply
    for index in (0, 1):
        assert {e.noise for e in Ledger(site_dir(root / "sites", f"site-{index}") / "state").entries()} == {"csprng"}


# the crafted evaluation head --------------------------------------------------------------------


@pytest.mark.federation
def test_a_crafted_evaluation_head_gets_noisy_counts_only(tmp_path: Path) -> None:
    """The coordinator signs a head that puts every record in one bin: the exact counts would give the
    number of positive test rows at every site. It gets noisy counts, recorded in the ledger first."""
    study = write_shifted_study(tmp_path / "study", sites=2)
    sim_root = tmp_path / "sites"
    for site in range(2):
        path = site_dir(sim_root, f"site-{site}") / "state" / "privacy-policy.toml"
        path.parent.mkdir(parents=True)
        write_policy(
            SitePolicy(max_epsilon=10.0, delta=1e-5, accountant="rdp", declared_size=120, evaluation="dp"), path
        )
    grid = DirectGrid(client_app, num_nodes=2)

    def craft(node: int, msg: Message) -> Message:
        if msg.metadata.message_type != "evaluate":
            return msg
        coordinator = read_identity(sim_root / COORDINATOR_KEYS_DIR, COORDINATOR_NAME)
        arrays = {name: torch.zeros_like(t) for name, t in msg.content[ARRAYS].to_torch_state_dict().items()}
        arrays["head.bias"] = torch.tensor([0.0, 1.0])  # logit 1 for everyone: every record in one bin
        plain = {k: v for k, v in msg.content[CONFIG].items() if k != SIGNED_INSTRUCTION}
        context = EnvelopeContext(
            str(plain["run-id"]),
            int(plain["server-round"]),
            BROADCAST,
            "evaluate-instruction",
            str(plain["base-fingerprint"]),
        )
        signed = sign_instruction(instruction_payload(plain, state_fingerprint(arrays)), context, coordinator)
        content = RecordDict(
            {
                **dict(msg.content.items()),
                ARRAYS: ArrayRecord(arrays),
                CONFIG: ConfigRecord({**plain, SIGNED_INSTRUCTION: signed}),
            }
        )
        return Message(content=content, message_type="evaluate", dst_node_id=node)

    grid.on_instruction = craft
    settings = RunSettings(
        scenario=str(study),
        rounds=1,
        local_epochs=1,
        out=str(tmp_path / "out"),
        sim_root=str(sim_root),
        min_sites=2,
        expected_sites=2,
        target_epsilon=2.0,
        transfer_policy="head",
    )
    record = run_on_grid(grid, settings)
    for site in range(2):
        reply = record.round(1).sites[f"site-{site}"].evaluate
        assert reply.status == "ok"
        released = np.asarray(reply.values["eval-counts"])
        data = np.load(site_dir(sim_root, f"site-{site}") / "data" / "test.npz")
        exact = evaluation_counts(data["y"], np.tile([1 / (1 + math.e), math.e / (1 + math.e)], (len(data["y"]), 1)))
        assert exact[:, LOGIT_EDGES.index(1.0) + 1].sum() == len(data["y"])  # the crafted head's exact counts
        noise = released - exact
        assert np.all(np.abs(noise) > 1e-9) and np.std(noise) > 1.0  # every cell noisy, at the planned scale
        entry = Ledger(site_dir(sim_root, f"site-{site}") / "state").entries()[-1]
        assert entry.kind == EVALUATE and reply.report["releases"]["eval-counts"] == entry.index


@pytest.mark.federation
def test_personalisation_spends_are_reported_with_the_release(every_reply) -> None:
    _, record = every_reply
    reply = record.round(2).sites["site-0"].evaluate
    kinds = [s["kind"] for s in reply.report["spends"]]
    assert kinds == [EVALUATE, PERSONALISE, PERSONALISED_EVALUATE]
