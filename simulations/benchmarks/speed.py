"""Per-round wall time of our ClientApp against a minimal Flower + Opacus app of the same shape.

Both federations run the same scenario sites (the same data files), the same model and
starting weights, the same rounds, local epochs, batch size, learning rate, clipping norm and
noise multiplier, over the same in-process transport (``DirectGrid``), one after the other
in one process: wdbc, whose four sites share a sample rate (and so one memoised calibration in
this process), then in the full variant heart-disease, whose three sites differ in size and
each calibrate their own noise, as deployed sites do, and pneumonia, whose sites compute a
pretrained ResNet-18's frozen features of their chest X-rays (once; the peer runs the backbone
at every step) and train its head (each scenario when its data files are present).

- **ours**: ``run_federation`` (ServerApp logic, strategy wrapper, envelopes) and
  ``client.app.app`` (secure channel, budget guard, cached frozen features, DP-SGD on the
  trainable part with the operating system's CSPRNG as at a real site, signed ledger, egress
  rule, and after the last round a federated evaluation released as a DP-noisy histogram).
- **minimal peer** (written here): Flower's FedAvg and a bare ClientApp that, every round,
  builds the model, loads the weights, makes a fresh ``PrivacyEngine``, runs the full model
  forward at every step (frozen layers included) with DP-SGD (Opacus's seeded,
  non-cryptographic generator), gets the round's epsilon with the same accountant (the
  engine's; for PLD, which Opacus lacks, dp-accounting's over the engine's history), and replies with the
  plain weights; after the last round it evaluates (exact accuracy); no envelope, no ledger,
  no policy.

A round's time is from the end of one round's central evaluation to the next. Our time is
also broken down by timing calls around the real functions (wrapped for the run, never
edited): data, training, evaluation, DP accounting, crypto, codec and egress rule, ledger,
server bookkeeping; the rest is Flower (messages, records, strategy) and glue, not instrumented.
"""

from __future__ import annotations

import logging
import statistics
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

import dp_accounting
import torch
from dp_accounting.pld import PLDAccountant
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp.strategy import FedAvg
from opacus import PrivacyEngine
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import client.app
import client.budget
import client.channel
import client.private_round
import server.channel
import server.federation
from client.session import SiteSession
from common.data.scenarios import load_scenario
from common.data.site_config import simulated_site_dir
from common.data.site_data import SiteData, load_site_data
from common.errors import DataError
from common.model.checkpoint import ModelCard, load_checkpoint
from common.model.pretraining import pretrain_source
from common.model.training import as_tensors, predict_proba, use_one_torch_thread
from common.model.transfer import TransferPolicy
from common.privacy.accounting import DEFAULT_ACCOUNTANT, PLD_INTERVAL, forget_memoised
from common.privacy.calibrations import CalibrationStore
from common.privacy.ledger import TRAIN, Ledger
from common.protocol import SiteReply
from common.run_record import RunRecord
from common.settings import RunSettings
from simulations.benchmarks.harness import (
    Stopwatch,
    bar_plot,
    instrumented,
    prewrite_policies,
    round_clock,
    run_inprocess,
)
from simulations.benchmarks.report import (
    header,
    markdown_table,
    result_head,
    this_machine,
    write_result,
)
from simulations.inprocess import DirectGrid

logger = logging.getLogger(__name__)

NAME = "speed"
SCENARIO = "wdbc"
#: Measured after SCENARIO in the full variant, when their data files are present, with the heading of each.
OTHER_SCENARIOS = (
    # Sites of different sizes, so no two share a calibration.
    ("heart-disease", "Sites of different sizes"),
    # A local round that computes something: a ResNet-18's frozen features (once, then cached), its head trained.
    ("pneumonia", "A pretrained backbone"),
)
DELTA = 1e-5

#: What each category times: (module or class, attribute) wrapped for the run.
CATEGORIES: dict[str, tuple[tuple[Any, str], ...]] = {
    "data": ((client.app, "load_local_data"), (client.app, "frozen_features"), (SiteSession, "dataset")),
    "training": ((client.private_round, "dp_train"), (client.private_round, "fine_tune")),
    "evaluation": ((client.private_round, "evaluation_histogram"), (client.private_round, "noisy_counts")),
    "DP accounting": (
        (CalibrationStore, "noise_multiplier"),
        (client.budget, "compose_epsilon"),
        (client.budget, "reference_epsilon"),
    ),
    "crypto": (
        (client.channel, "seal"),
        (client.channel, "verify_instruction"),
        (client.channel, "sign_report"),
        (server.channel, "open_envelope"),
        (server.channel, "sign_instruction"),
        (server.channel, "verify_report"),
    ),
    "codec and egress rule": (
        (SiteReply, "encode"),
        (SiteReply, "decode"),
        (client.channel, "check_reply"),
        (server.channel, "check_reply"),
    ),
    "ledger": ((Ledger, "append"), (Ledger, "entries")),
    "server bookkeeping": ((server.federation, "save_checkpoint"), (RunRecord, "save")),
}
OTHER = "Flower and the rest"


@dataclass(frozen=True)
class SpeedConfig:
    sites: int
    rounds: int
    local_epochs: int
    batch_size: int
    lr: float
    max_grad_norm: float
    target_epsilon: float
    accountant: str


FULL = SpeedConfig(
    sites=4,
    rounds=3,
    local_epochs=2,
    batch_size=16,
    lr=0.05,
    max_grad_norm=1.0,
    target_epsilon=3.0,
    accountant=DEFAULT_ACCOUNTANT,
)
#: Pairs (ours, then the peer) run one after the other; medians are reported.
REPETITIONS = 3
QUICK = SpeedConfig(
    sites=2, rounds=2, local_epochs=1, batch_size=16, lr=0.05, max_grad_norm=1.0, target_epsilon=3.0, accountant="rdp"
)


# --- the minimal peer -------------------------------------------------------------------

peer_app = ClientApp()


@lru_cache(maxsize=64)
def _peer_card(checkpoint: str) -> ModelCard:
    return load_checkpoint(Path(checkpoint))[1]


@lru_cache(maxsize=64)
def _peer_data(sim_root: str, partition: int, checkpoint: str) -> SiteData:
    card = _peer_card(checkpoint)
    return load_site_data(
        simulated_site_dir(Path(sim_root), partition) / "data",
        tuple(card.input_shape),
        card.num_classes,
        require_two_train_classes=False,
    )


def _peer_model(msg: Message) -> tuple[nn.Module, ConfigRecord]:
    config = msg.content["config"]
    model = _peer_card(str(config["checkpoint"])).build()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    TransferPolicy.parse(str(config["transfer-policy"])).apply(model)
    return model, config


@peer_app.train()
def _peer_train(msg: Message, context: Context) -> Message:
    model, config = _peer_model(msg)
    partition = int(context.node_config["partition-id"])
    data = _peer_data(str(config["sim-root"]), partition, str(config["checkpoint"]))
    x, y = as_tensors(data.train.x, data.train.y)
    generator = torch.Generator().manual_seed(int(config["seed"]) * 1_000_003 + int(config["server-round"]))
    loader = DataLoader(TensorDataset(x, y), batch_size=int(config["batch-size"]), generator=generator)
    optimizer = torch.optim.SGD(
        [p for p in model.parameters() if p.requires_grad], lr=float(config["lr"]), momentum=0.9
    )
    accountant = str(config["accountant"])
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Secure RNG turned off.*")
        engine = PrivacyEngine(accountant="rdp" if accountant == "pld" else accountant)
        module, dp_optimizer, dp_loader = engine.make_private(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=float(config["noise-multipliers"][partition]),
            max_grad_norm=float(config["max-grad-norm"]),
            noise_generator=generator,
        )
    loss_fn = nn.CrossEntropyLoss()
    module.train()
    for _ in range(int(config["local-epochs"])):
        for xb, yb in dp_loader:
            if len(yb) == 0:
                continue
            dp_optimizer.zero_grad()
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*Full backward hook is firing.*")
                loss_fn(module(xb), yb).backward()
            dp_optimizer.step()
    epsilon = _peer_epsilon(engine, accountant, float(config["delta"]))
    content = RecordDict(
        {
            "arrays": ArrayRecord(model.state_dict()),
            "metrics": MetricRecord({"num-examples": len(y), "epsilon": float(epsilon)}),
        }
    )
    return Message(content=content, reply_to=msg)


def _peer_epsilon(engine: PrivacyEngine, accountant: str, delta: float) -> float:
    """The round's epsilon as a minimal app gets it: from Opacus's engine, or for PLD (which Opacus lacks)
    from dp-accounting's PLDAccountant over the engine's history, at our discretisation."""
    if accountant != "pld":
        return float(engine.get_epsilon(delta))
    pld = PLDAccountant(value_discretization_interval=PLD_INTERVAL)
    for sigma, q, steps in engine.accountant.history:
        pld.compose(
            dp_accounting.SelfComposedDpEvent(
                dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps
            )
        )
    return float(pld.get_epsilon(delta))


@peer_app.evaluate()
def _peer_evaluate(msg: Message, context: Context) -> Message:
    model, config = _peer_model(msg)
    data = _peer_data(str(config["sim-root"]), int(context.node_config["partition-id"]), str(config["checkpoint"]))
    x, y = as_tensors(data.test.x, data.test.y)
    accuracy = float((predict_proba(model, x).argmax(axis=1) == y.numpy()).mean())
    return Message(
        content=RecordDict({"metrics": MetricRecord({"num-examples": len(y), "accuracy": accuracy})}), reply_to=msg
    )


def _run_peer(
    checkpoint: Path, sim_root: Path, transfer: str, cfg: SpeedConfig, noise: list[float], seed: int
) -> list[float]:
    model, _ = load_checkpoint(checkpoint)
    ends: dict[int, float] = {}

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        ends[server_round] = time.perf_counter()
        return None

    base = ConfigRecord(
        {
            "checkpoint": str(checkpoint),
            "sim-root": str(sim_root),
            "transfer-policy": transfer,
            "seed": seed,
            "lr": cfg.lr,
            "batch-size": cfg.batch_size,
            "local-epochs": cfg.local_epochs,
            "max-grad-norm": cfg.max_grad_norm,
            "noise-multipliers": noise,
            "accountant": cfg.accountant,
            "delta": DELTA,
            "server-round": 0,
        }
    )
    strategy = _PeerFedAvg(
        cfg.rounds, min_train_nodes=cfg.sites, min_evaluate_nodes=cfg.sites, min_available_nodes=cfg.sites
    )
    strategy.start(
        grid=DirectGrid(peer_app, num_nodes=cfg.sites, run_id=4343),
        initial_arrays=ArrayRecord(model.state_dict()),
        num_rounds=cfg.rounds,
        train_config=base,
        evaluate_config=base,
        evaluate_fn=evaluate_fn,
    )
    return [ends[r] - ends[r - 1] for r in range(1, cfg.rounds + 1)]


class _PeerFedAvg(FedAvg):
    """FedAvg that tells the peer's clients the round number (for their sampling seed) and, as our
    coordinator does by default, asks for a federated evaluation after the last round only."""

    def __init__(self, num_rounds: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.num_rounds = num_rounds

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Any) -> Any:
        return super().configure_train(
            server_round, arrays, ConfigRecord({**dict(config.items()), "server-round": server_round}), grid
        )

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Any) -> Any:
        if server_round < self.num_rounds:
            return []
        return super().configure_evaluate(server_round, arrays, config, grid)


# --- the benchmark ----------------------------------------------------------------------


def _train_noise(sim_root: Path, index: int) -> float:
    """The noise multiplier site ``index`` calibrated for its training rounds (its ledger's first training entry)."""
    entries = Ledger(simulated_site_dir(sim_root, index) / "state").entries()
    return next(e.noise_multiplier for e in entries if e.kind == TRAIN)


def _targets() -> tuple[list[tuple[Any, str, str]], list[str]]:
    targets, missing = [], []
    for category, places in CATEGORIES.items():
        for owner, name in places:
            if hasattr(owner, name):
                targets.append((owner, name, category))
            else:
                missing.append(f"{getattr(owner, '__name__', owner)}.{name}")
    return targets, missing


def _markdown(result: dict[str, Any], machine_text: str) -> str:
    lines = [machine_text, *_scenario_lines(result)]
    if result["not_instrumented"]:
        lines += ["", f"Functions not found in this checkout (not timed): {', '.join(result['not_instrumented'])}."]
    titles = dict(OTHER_SCENARIOS)
    for other in result["other_scenarios"]:
        lines += [
            "",
            f"### {titles[other['scenario']]}: `{other['scenario']}`",
            "",
            *_scenario_lines(other),
        ]
    if result["skipped_scenarios"]:
        lines += ["", f"Not measured: {'; '.join(result['skipped_scenarios'])}."]
    lines += ["", "![per-round wall time](speed-rounds.png)"]
    return "\n".join(lines)


def _scenario_lines(result: dict[str, Any]) -> list[str]:
    """The settings, per-round table, ratios and breakdown of one scenario's measurement."""
    cfg = result["config"]
    ours, peer = result["ours"]["round_seconds"], result["peer"]["round_seconds"]
    round_rows = [[r + 1, f"{ours[r]:.3f}", f"{peer[r]:.3f}", f"{ours[r] / peer[r]:.2f}x"] for r in range(len(ours))]
    total = result["ours"]["total_seconds"]
    breakdown_rows = [
        [category, f"{seconds:.3f}", f"{100 * seconds / total:.1f}%", result["breakdown"]["calls"].get(category, 0)]
        for category, seconds in result["breakdown"]["seconds"].items()
    ]
    return [
        f"Scenario `{result['scenario']}` ({cfg['sites']} sites, model {result['model']}, transfer policy "
        f"{result['transfer-policy']}), "
        f"{cfg['rounds']} rounds "
        "of "
        f"{cfg['local_epochs']} local epoch(s), batch {cfg['batch_size']}, SGD lr {cfg['lr']:g}, DP-SGD clipping "
        f"{cfg['max_grad_norm']:g} at the noise multipliers our sites calibrated for epsilon {cfg['target_epsilon']:g} "
        f"({', '.join(f'{n:.3f}' for n in result['noise_multipliers'])}); accountant **{cfg['accountant']}** on both "
        "sides "
        "(ours: the site policy; peer: its PrivacyEngine, or for pld dp-accounting's PLDAccountant over the engine's "
        f"history). Both over `DirectGrid` in one process: {result['repetitions']} repetition(s) of ours then the "
        "peer, each on fresh site folders, medians reported; before each of ours the accounting memos are "
        "forgotten (`forget_memoised`), so every repetition is a first run as in a new process. The "
        "simulated sites share that process, so `common.privacy.accounting`'s memoised compositions computed for one "
        "site are reused by another with the same sample rate and steps; deployed sites each pay for their own. "
        "Our sites draw "
        "their DP noise from the operating system's CSPRNG (as deployed), the peer from Opacus's seeded generator; "
        "both federations evaluate after the last round only (ours as a DP-noisy histogram, the peer exactly).",
        "",
        markdown_table(["round", "ours s", "minimal peer s", "ours / peer"], round_rows),
        "",
        f"Ratio of medians: **{result['ratio_median']:.2f}x**; rounds after the first: "
        f"{result['ratio_after_first']:.2f}x "
        f"(our first round also calibrates the run's noise). Whole run: ours {total:.2f} s, peer "
        f"{result['peer']['total_seconds']:.2f} s (medians): **{result['ratio_total']:.2f}x** (per repetition: "
        f"{', '.join(f'{r:.2f}x' for r in result['ratio_total_runs'])}).",
        "",
        f"Where our {total:.2f} s went (all rounds, median over repetitions; exclusive time, a nested timed call "
        "counts once):",
        "",
        markdown_table(["part", "seconds", "share", "calls"], breakdown_rows),
        "",
        "data: `load_local_data` + `frozen_features` + the keyed dataset id; training: `dp_train` (or `fine_tune`); "
        "evaluation: the sites' evaluation histograms and their Gaussian noise; DP accounting: the calibrations "
        "(`CalibrationStore.noise_multiplier`: stored and re-certified, or calibrated and stored), "
        "`compose_epsilon`, `reference_epsilon` (the ledger records the epsilon under the other accountant too); "
        "crypto: "
        "seal, open, sign and verify of instructions, replies and privacy reports; codec and egress rule: `SiteReply` "
        "encode/decode and the egress check at both ends; ledger: `Ledger.append` (with its signed head) and reads; "
        "server bookkeeping: "
        f"round checkpoints and the run record; {OTHER}: message building, Flower records and strategy, glue (not "
        "instrumented).",
    ]


def _our_run(
    root: Path, rep: int, scenario: Any, checkpoint: Path, cfg: SpeedConfig, seed: int, targets: list
) -> tuple[list[float], Stopwatch, list[float], Path]:
    """One run of ours on fresh sites, accounting memos forgotten (a first run, as in a new process)."""
    forget_memoised()
    sim_root = root / f"sites-{rep}"
    prewrite_policies(
        sim_root, scenario, allow_non_private=False, accountant=cfg.accountant, max_grad_norm=cfg.max_grad_norm
    )
    settings = RunSettings(
        scenario=scenario.name,
        checkpoint=str(checkpoint),
        rounds=cfg.rounds,
        local_epochs=cfg.local_epochs,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        optimizer="sgd",
        strategy="fedavg",
        dp=True,
        target_epsilon=cfg.target_epsilon,
        delta=DELTA,
        max_grad_norm=cfg.max_grad_norm,
        seed=seed,
        out=str(root / f"out-{rep}"),
        sim_root=str(sim_root),
        min_sites=cfg.sites,
        expected_sites=cfg.sites,
    )
    stopwatch = Stopwatch()
    with round_clock() as clock, instrumented(stopwatch, targets):
        run_inprocess(settings, cfg.sites)
    noise = [_train_noise(sim_root, i) for i in range(cfg.sites)]
    return clock.round_seconds(), stopwatch, noise, sim_root


def _measure(name: str, cfg: SpeedConfig, repetitions: int, seed: int, targets: list) -> dict[str, Any]:
    """Ours, then the peer, on the same sites of scenario ``name``, ``repetitions`` times: medians and breakdown."""
    scenario = load_scenario(name, seed=seed)
    ours_runs: list[list[float]] = []
    peer_runs: list[list[float]] = []
    breakdowns: list[dict[str, float]] = []
    calls: dict[str, int] = {}
    with tempfile.TemporaryDirectory(prefix="fedtransfer-speed-") as work:
        root = Path(work)
        checkpoint = root / "source-model"
        card = pretrain_source(scenario, checkpoint, seed=seed)
        for rep in range(repetitions):
            ours, stopwatch, noise, sim_root = _our_run(root, rep, scenario, checkpoint, cfg, seed, targets)
            peer = _run_peer(checkpoint, sim_root, card.default_transfer_policy, cfg, noise, seed)
            ours_runs.append(ours)
            peer_runs.append(peer)
            parts = {category: stopwatch.seconds.get(category, 0.0) for category in CATEGORIES}
            parts[OTHER] = max(0.0, sum(ours) - sum(parts.values()))
            breakdowns.append(parts)
            calls = dict(stopwatch.calls)
            logger.info("speed %s repetition %d: ours %.2f s, peer %.2f s", name, rep + 1, sum(ours), sum(peer))
    ours = [statistics.median(r[i] for r in ours_runs) for i in range(cfg.rounds)]
    peer = [statistics.median(r[i] for r in peer_runs) for i in range(cfg.rounds)]
    totals = [sum(r) for r in ours_runs]
    peer_totals = [sum(r) for r in peer_runs]
    breakdown = {category: statistics.median(b[category] for b in breakdowns) for category in breakdowns[0]}
    return {
        "scenario": name,
        "model": card.arch,
        "transfer-policy": card.default_transfer_policy,
        "config": asdict(cfg),
        "repetitions": repetitions,
        "noise_multipliers": noise,
        "ours": {"round_seconds": ours, "total_seconds": statistics.median(totals), "runs": ours_runs},
        "peer": {"round_seconds": peer, "total_seconds": statistics.median(peer_totals), "runs": peer_runs},
        "ratio_median": statistics.median(ours) / statistics.median(peer),
        "ratio_after_first": (statistics.median(ours[1:]) / statistics.median(peer[1:]))
        if len(ours) > 1
        else statistics.median(ours) / statistics.median(peer),
        "ratio_total": statistics.median(totals) / statistics.median(peer_totals),
        "ratio_total_runs": [a / b for a, b in zip(totals, peer_totals)],
        "breakdown": {"seconds": breakdown, "calls": calls},
    }


def run(out_dir: Path, quick: bool = False, seed: int = 0) -> dict[str, Any]:
    """Run ours, then the peer, on the same sites, ``REPETITIONS`` times, on SCENARIO and (full variant, its data
    present) OTHER_SCENARIOS; write ``speed.json``, ``speed.md`` and ``speed-rounds.png``."""
    use_one_torch_thread()
    machine = this_machine()
    out_dir = Path(out_dir)
    cfg = QUICK if quick else FULL
    repetitions = 1 if quick else REPETITIONS
    targets, missing = _targets()
    primary = _measure(SCENARIO, cfg, repetitions, seed, targets)
    others: list[dict[str, Any]] = []
    skipped: list[str] = []
    for name, _ in () if quick else OTHER_SCENARIOS:
        try:
            sites = len(load_scenario(name, seed=seed).sites)
        except DataError as exc:
            skipped.append(f"`{name}` ({exc})")
        else:
            others.append(_measure(name, replace(cfg, sites=sites), repetitions, seed, targets))
    result: dict[str, Any] = {
        **result_head(NAME, quick, seed, machine),
        **primary,
        "other_scenarios": others,
        "skipped_scenarios": skipped,
        "not_instrumented": missing,
    }
    parts = (primary, *others)
    bar_plot(
        out_dir / "speed-rounds.png",
        [f"{part['scenario']} round {r + 1}" for part in parts for r in range(part["config"]["rounds"])],
        {
            "ours": [t for part in parts for t in part["ours"]["round_seconds"]],
            "minimal Flower + Opacus peer": [t for part in parts for t in part["peer"]["round_seconds"]],
        },
        "wall seconds",
        "Per-round wall time: " + ", ".join(f"{part['scenario']} ({part['config']['sites']} sites)" for part in parts),
    )
    result["plots"] = ["speed-rounds.png"]
    text = header("Speed against a minimal Flower + Opacus peer", machine, result["command"], quick)
    return write_result(out_dir, NAME, result, _markdown(result, text))
