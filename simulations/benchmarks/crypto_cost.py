"""The cost of the encrypted, signed channel: throughput, share of a round, bytes on the wire.

1. Seal and open throughput (MB/s = 10^6 payload bytes per second) of ``common/security/envelope.py``
   on encoded ``SiteReply`` payloads carrying real trainable tensors: each offline
   scenario's default-policy update, and a bulk update of a wide model from the zoo.
2. The share of a round's wall time spent on crypto: real local DP rounds of the wdbc
   site (``client/private_round.py train_round``: budget guard, Opacus, ledger) against the
   signing, verifying, sealing and opening that round needs, on both ends.
3. Uplink bytes: the sealed reply against Flower's plain ArrayRecord of the same tensors,
   and against sending the full model (see ``payloads``).
"""

from __future__ import annotations

import copy
import logging
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

from client.dp_training import dp_train, sample_rate_and_steps
from client.fine_tune import train_config
from client.local_data import Features
from client.private_round import train_round
from client.session import SiteSession, site_session
from common.data.scenarios import Scenario, load_scenario
from common.data.site_data import dataset_fingerprint
from common.model.training import TrainConfig, as_tensors, compute_features, use_one_torch_thread
from common.model.transfer import TransferPolicy, state_fingerprint
from common.model.zoo import FedModel, build_model
from common.privacy.egress import check_reply
from common.privacy.noise import SecureRandom
from common.privacy.policy import PrivacyRequest
from common.privacy.report import sign_report, verify_report
from common.protocol import (
    INSTRUCTION_KINDS,
    REPLY_KINDS,
    STATUS_OK,
    RoundInstruction,
    SiteReply,
    instruction_payload,
    parse_instruction_payload,
)
from common.security.envelope import (
    BROADCAST,
    EnvelopeContext,
    open_envelope,
    seal,
    sign_instruction,
    verify_instruction,
)
from common.security.keys import Identity
from common.settings import RunSettings
from simulations.benchmarks.harness import prewrite_policies
from simulations.benchmarks.payloads import (
    TRAFFIC_HEADERS,
    Parties,
    PolicyTraffic,
    policy_traffic,
    reply_context,
    reply_payload,
    scenario_model,
    traffic_notes,
    traffic_rows,
    valid_policies,
)
from simulations.benchmarks.report import (
    Machine,
    bench_command,
    header,
    markdown_table,
    result_head,
    this_machine,
    timed,
    write_result,
)
from simulations.sites import materialize_sites

logger = logging.getLogger(__name__)

NAME = "crypto"
THROUGHPUT_SCENARIOS = ("wdbc", "synthetic-imaging")
TRAFFIC_POLICIES = ("head", "last:1", "full")
BULK_HIDDEN = (1024, 1024)
QUICK_BULK_HIDDEN = (128, 128)
ROUND_SCENARIO = "wdbc"
CRYPTO_STEPS = (
    "sign instruction",
    "verify instruction",
    "sign privacy report",
    "seal reply",
    "open reply",
    "verify privacy report",
)
#: The reply's encoding and the egress rule, checked at both ends: timed, but not crypto.
PROTOCOL_STEPS = ("check egress (site)", "encode reply", "decode reply", "check egress (coordinator)")


@dataclass(frozen=True)
class Throughput:
    """Seal and open of one payload: median milliseconds and MB/s of payload."""

    payload: str
    payload_bytes: int
    envelope_bytes: int
    repetitions: int
    seal_ms: float
    open_ms: float
    seal_mb_s: float
    open_mb_s: float
    seal_open_mb_s: float


@dataclass(frozen=True)
class RoundShare:
    """Median seconds of a real local DP round and of the crypto work around it."""

    scenario: str
    site: str
    transfer_policy: str
    accountant: str
    rounds_timed: int
    first_round_seconds: float
    round_seconds: float
    dp_train_seconds: float
    crypto_seconds: float
    crypto_share: float
    crypto_share_of_dp_train: float
    reply_payload_bytes: int
    reply_envelope_bytes: int
    step_ms: dict[str, float]


def _median_ms(action: Callable[[], object], repetitions: int) -> float:
    return 1000 * statistics.median(timed(action) for _ in range(repetitions))


def _repetitions(action: Callable[[], object], budget_seconds: float) -> int:
    first = max(timed(action), 1e-6)
    return int(min(200, max(3, budget_seconds / first)))


def measure_throughput(label: str, tensors: dict[str, torch.Tensor], site_id: str, budget_seconds: float) -> Throughput:
    """Time seal and open of the reply payload holding ``tensors``."""
    parties = Parties.generate(site_id)
    context = reply_context(site_id, state_fingerprint(tensors))
    payload = reply_payload(site_id, tensors)
    recipient = parties.coordinator.public()
    sites = {site_id: parties.site.public()}
    envelope = seal(payload, context, parties.site, recipient)
    repetitions = _repetitions(lambda: seal(payload, context, parties.site, recipient), budget_seconds)
    seal_ms = _median_ms(lambda: seal(payload, context, parties.site, recipient), repetitions)
    open_ms = _median_ms(lambda: open_envelope(envelope, context, parties.coordinator, sites), repetitions)
    megabytes = len(payload) / 1e6
    return Throughput(
        payload=label,
        payload_bytes=len(payload),
        envelope_bytes=len(envelope),
        repetitions=repetitions,
        seal_ms=seal_ms,
        open_ms=open_ms,
        seal_mb_s=megabytes / (seal_ms / 1000),
        open_mb_s=megabytes / (open_ms / 1000),
        seal_open_mb_s=megabytes / ((seal_ms + open_ms) / 1000),
    )


def _throughputs(quick: bool, seed: int) -> list[Throughput]:
    budget = 0.05 if quick else 0.5
    results = []
    for name in THROUGHPUT_SCENARIOS:
        scenario = load_scenario(name, seed=seed)
        tensors = TransferPolicy.parse(scenario.transfer_policy).trainable_state(scenario_model(scenario, seed))
        results.append(
            measure_throughput(f"{name} {scenario.transfer_policy} update", tensors, scenario.sites[0].name, budget)
        )
    hidden = QUICK_BULK_HIDDEN if quick else BULK_HIDDEN
    torch.manual_seed(seed)
    wide = build_model("mlp", (30,), 2, {"hidden": list(hidden)})
    label = f"bulk: mlp {'x'.join(map(str, hidden))}, full"
    results.append(measure_throughput(label, TransferPolicy("full").trainable_state(wide), "hospital-a", budget))
    return results


def _features(scenario: Scenario, model: FedModel, transfer: TransferPolicy) -> Features:
    site = scenario.sites[0]
    frozen, _ = transfer.split(model)
    train_x, train_y = as_tensors(site.train.x, site.train.y)
    test_x, test_y = as_tensors(site.test.x, site.test.y)
    return Features(compute_features(frozen, train_x), train_y, compute_features(frozen, test_x), test_y)


def _timed(clock: dict[str, float], name: str, action: Callable[..., Any], *args: Any) -> Any:
    """Call ``action(*args)`` and record its wall time in ``clock[name]``."""
    start = time.perf_counter()
    value = action(*args)
    clock[name] = time.perf_counter() - start
    return value


def _verify(blob: bytes, expected: EnvelopeContext, coordinator: Any, weights: str) -> None:
    _, arrays = parse_instruction_payload(verify_instruction(blob, expected, coordinator))
    if arrays != weights:
        raise RuntimeError("benchmark instruction does not match its weights")


def _dp_train_alone(
    model: FedModel,
    transfer: TransferPolicy,
    features: Features,
    config: TrainConfig,
    max_grad_norm: float,
    declared: int,
) -> None:
    """The round's DP-SGD alone (noise multiplier 1, CSPRNG noise): no guard, no ledger."""
    _, trainable = transfer.split(copy.deepcopy(model))
    sample_rate, steps = sample_rate_and_steps(declared, config.batch_size, config.epochs, config.steps)
    dp_train(
        trainable,
        features.train_x,
        features.train_y,
        config,
        noise_multiplier=1.0,
        max_grad_norm=max_grad_norm,
        sample_rate=sample_rate,
        steps=steps,
        expected_batch_size=sample_rate * declared,
        source=SecureRandom(),
    )


def _bench_site(scenario: Scenario, root: Path, accountant: str) -> tuple[SiteSession, Identity]:
    """The scenario's first simulated site (its simulated policy, using ``accountant``) and the coordinator."""
    prewrite_policies(root, scenario, allow_non_private=False, accountant=accountant)
    federation = materialize_sites(scenario, root, "bench", allow_non_private=False)
    return site_session({"partition-id": 0}, str(root)), federation.coordinator


def measure_round_share(rounds: int, seed: int, accountant: str = "prv") -> RoundShare:
    """Real local DP rounds of the wdbc site, each wrapped in the crypto work of a round.

    The first round calibrates the run's noise (once per run) and is reported apart; the
    medians are over the ``rounds`` that follow (over the first round if ``rounds`` is 0, the
    quick variant). ``dp_train`` alone is timed beside each round on a copy of the model, to
    show what the round costs beyond DP-SGD itself. Noise comes from the CSPRNG, as at a real site.
    """
    scenario = load_scenario(ROUND_SCENARIO, seed=seed)
    settings = RunSettings()
    transfer = TransferPolicy.parse(scenario.transfer_policy)
    model = scenario_model(scenario, seed)
    transfer.apply(model)
    base = state_fingerprint(model.state_dict())
    run_id = f"{7_000_000 + seed:x}"
    total = rounds + 1
    first_timed = 2 if rounds > 0 else 1
    samples: dict[str, list[float]] = {step: [] for step in (*CRYPTO_STEPS, *PROTOCOL_STEPS, "round", "dp_train")}
    first_round = 0.0
    sizes = (0, 0)
    with tempfile.TemporaryDirectory(prefix="fedtransfer-bench-") as root:
        session, coordinator = _bench_site(scenario, Path(root), accountant)
        site_id, manifest = session.site_id, session.manifest
        features = _features(scenario, model, transfer)
        dataset = session.dataset(dataset_fingerprint(session.config.data_path))
        declared = session.policy.declared_size or len(features.train_y)
        for server_round in range(1, total + 1):
            clock: dict[str, float] = {}
            step = partial(_timed, clock)
            instruction = RoundInstruction(
                server_round=server_round,
                rounds=total,
                transfer_policy=str(transfer),
                base_fingerprint=base,
                base_card_sha256="c" * 64,
                frozen_fingerprint=state_fingerprint(transfer.frozen_state(model)),
                local_epochs=settings.local_epochs,
                batch_size=settings.batch_size,
                lr=settings.lr,
                optimizer=settings.optimizer,
                proximal_mu=0.0,
                seed=seed,
                personalise_epochs=0,
                dp=1,
                run_id=run_id,
                federated_evaluation="none",
            )
            request = PrivacyRequest(
                settings.target_epsilon,
                settings.delta,
                settings.max_grad_norm,
                total,
                evaluations=instruction.evaluations,
            )
            config = instruction.to_config() | request.to_config()
            downlink = EnvelopeContext(run_id, server_round, BROADCAST, INSTRUCTION_KINDS["train"], base)
            weights = state_fingerprint(transfer.trainable_state(model))
            blob = step(
                "sign instruction", sign_instruction, instruction_payload(config, weights), downlink, coordinator
            )
            expected_in = EnvelopeContext(run_id, server_round, site_id, INSTRUCTION_KINDS["train"], base)

            step("verify instruction", _verify, blob, expected_in, manifest.coordinator, weights)
            hyper = train_config(instruction)
            outcome = step(
                "round", train_round, session, dataset, model, transfer, features, hyper, instruction, config
            )
            if outcome.status != STATUS_OK:
                raise RuntimeError(f"the benchmark site declined round {server_round}: {outcome.reason}")
            step("dp_train", _dp_train_alone, model, transfer, features, hyper, settings.max_grad_norm, declared)
            # the report as client.channel builds it: the outcome's public fields, phase, status and egress declaration
            report = {**outcome.report(), "phase": "train", "status": outcome.status, "egress": dict(outcome.egress)}
            has_tensors = bool(outcome.tensors)
            step("check egress (site)", check_reply, "train", outcome.status, outcome.values, has_tensors, report)
            signed = step("sign privacy report", sign_report, report, run_id, server_round, base, session.identity)
            reply = SiteReply(site_id, "train", outcome.status, outcome.reason, outcome.values, signed, outcome.tensors)
            payload = step("encode reply", reply.encode)
            uplink = EnvelopeContext(run_id, server_round, site_id, REPLY_KINDS["train"], base)
            envelope = step("seal reply", seal, payload, uplink, session.identity, manifest.coordinator)
            sizes = (len(payload), len(envelope))
            opened = step("open reply", open_envelope, envelope, uplink, coordinator, manifest.sites)
            received = step("decode reply", SiteReply.decode, opened)
            site_key = manifest.site(site_id)
            verified = step(
                "verify privacy report", verify_report, received.report, run_id, server_round, base, site_key
            )
            step(
                "check egress (coordinator)",
                check_reply,
                "train",
                received.status,
                received.values,
                bool(received.tensors),
                verified,
            )
            if server_round == 1:
                first_round = clock["round"]
            if server_round >= first_timed:
                for name, seconds in clock.items():
                    samples[name].append(seconds)
    crypto_per_round = [sum(samples[s][i] for s in CRYPTO_STEPS) for i in range(len(samples["round"]))]
    shares = [c / (c + r) for c, r in zip(crypto_per_round, samples["round"])]
    training_shares = [c / (c + t) for c, t in zip(crypto_per_round, samples["dp_train"])]
    share = RoundShare(
        scenario=scenario.name,
        site=site_id,
        transfer_policy=str(transfer),
        accountant=accountant,
        rounds_timed=len(samples["round"]),
        first_round_seconds=first_round,
        round_seconds=statistics.median(samples["round"]),
        dp_train_seconds=statistics.median(samples["dp_train"]),
        crypto_seconds=statistics.median(crypto_per_round),
        crypto_share=statistics.median(shares),
        crypto_share_of_dp_train=statistics.median(training_shares),
        reply_payload_bytes=sizes[0],
        reply_envelope_bytes=sizes[1],
        step_ms={name: 1000 * statistics.median(samples[name]) for name in (*CRYPTO_STEPS, *PROTOCOL_STEPS)},
    )
    logger.info("crypto share of a %s round: %.2f%%", share.scenario, 100 * share.crypto_share)
    return share


def _traffic(seed: int) -> list[PolicyTraffic]:
    rows = []
    for name in THROUGHPUT_SCENARIOS:
        scenario = load_scenario(name, seed=seed)
        policies = valid_policies(scenario_model(scenario, seed), [scenario.transfer_policy, *TRAFFIC_POLICIES])
        rows += policy_traffic(scenario, policies, seed)
    return rows


def _markdown(
    machine: Machine,
    result: dict[str, Any],
    throughputs: list[Throughput],
    share: RoundShare,
    traffic: list[PolicyTraffic],
) -> str:
    lines = [
        header(
            "Crypto cost: envelope throughput, share of a round, bytes on the wire",
            machine,
            bench_command(NAME, result["quick"], result["seed"]),
            result["quick"],
        )
    ]
    lines.append(
        "Seal (X25519 + HKDF-SHA256 + AES-256-GCM + Ed25519 sign) and open (verify + decrypt) of reply "
        "payloads (encoded `SiteReply`s carrying real trainable tensors); median of the repetitions shown; "
        "MB = 10^6 payload bytes.\n"
    )
    lines.append(
        markdown_table(
            [
                "payload",
                "payload B",
                "envelope B",
                "reps",
                "seal ms",
                "open ms",
                "seal MB/s",
                "open MB/s",
                "seal+open MB/s",
            ],
            [
                [
                    t.payload,
                    f"{t.payload_bytes:,}",
                    f"{t.envelope_bytes:,}",
                    t.repetitions,
                    f"{t.seal_ms:.3f}",
                    f"{t.open_ms:.3f}",
                    f"{t.seal_mb_s:.1f}",
                    f"{t.open_mb_s:.1f}",
                    f"{t.seal_open_mb_s:.1f}",
                ]
                for t in throughputs
            ],
        )
    )
    lines.append(
        f"\nShare of a round spent on crypto: real local DP rounds of {share.scenario} site {share.site} (policy "
        f"{share.transfer_policy}, {share.accountant} accountant; `train_round`: budget guard, Opacus DP-SGD, privacy "
        f"accounting, durable signed ledger; noise from the operating system's CSPRNG, as at a real site) against the "
        f"signing, verification, sealing and opening of that round on both ends (the reply's encoding and the egress "
        f"rule's checks at both ends are timed apart and not counted as crypto; the ledger's own head signature is "
        f"part of the round). Medians over {share.rounds_timed} round(s)"
        f"{' after the first' if not result['quick'] else ''}; the first round also calibrates the run's noise and "
        "took "
        f"{share.first_round_seconds:.2f} s. "
        f"`dp_train` alone (the same DP-SGD without the guard and ledger) is timed beside each round.\n"
    )
    lines.append(
        markdown_table(
            [
                "local DP round ms",
                "dp_train alone ms",
                "crypto ms",
                "crypto share of round",
                "crypto share vs dp_train alone",
            ],
            [
                [
                    f"{1000 * share.round_seconds:.1f}",
                    f"{1000 * share.dp_train_seconds:.1f}",
                    f"{1000 * share.crypto_seconds:.3f}",
                    f"{100 * share.crypto_share:.3f}%",
                    f"{100 * share.crypto_share_of_dp_train:.2f}%",
                ]
            ],
        )
    )
    lines.append(
        f"\nCrypto, encoding and egress-check steps of that round, median ms. The real reply (status, declared size "
        f"and steps, the signed privacy report with its egress declaration, and the trainable tensors) is "
        f"{share.reply_payload_bytes:,} B, sealed {share.reply_envelope_bytes:,} B.\n"
    )
    steps = (*CRYPTO_STEPS, *PROTOCOL_STEPS)
    lines.append(markdown_table(list(steps), [[f"{share.step_ms[s]:.3f}" for s in steps]]))
    lines.append("\n" + traffic_notes(traffic) + "\n")
    lines.append(markdown_table(TRAFFIC_HEADERS, traffic_rows(traffic)))
    return "\n".join(lines)


def run(out_dir: Path, quick: bool = False, seed: int = 0) -> dict[str, Any]:
    """Measure the channel's cost; write ``crypto.json`` and ``crypto.md``."""
    use_one_torch_thread()
    machine = this_machine()
    throughputs = _throughputs(quick, seed)
    share = measure_round_share(rounds=0 if quick else 7, seed=seed, accountant="rdp" if quick else "prv")
    traffic = _traffic(seed)
    result: dict[str, Any] = {
        **result_head(NAME, quick, seed, machine),
        "throughput": [asdict(t) for t in throughputs],
        "round_share": asdict(share),
        "traffic": [asdict(t) for t in traffic],
    }
    return write_result(out_dir, NAME, result, _markdown(machine, result, throughputs, share, traffic))
