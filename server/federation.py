"""One federated run at the coordinator: base model in, adapted model and run record out."""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord
from flwr.serverapp import Grid
from safetensors.numpy import load_file, save

from common.data.scenario import Scenario
from common.data.scenarios import load_scenario
from common.errors import DeploymentError
from common.interrupt import RunInterrupted, StopRequest
from common.io import make_output_dir, write_atomic
from common.model.checkpoint import ModelCard, card_digest, load_checkpoint, save_checkpoint
from common.model.metrics import classification_metrics
from common.model.pretraining import pretrain_source
from common.model.training import as_tensors, predict_proba
from common.model.transfer import PolicyParseError, TransferPolicy, state_fingerprint
from common.model.zoo import FedModel
from common.privacy.policy import PrivacyRequest
from common.progress import ROUNDS, progress
from common.protocol import RoundInstruction
from common.run_record import COMPLETED, FAILED, INTERRUPTED, RUN_RECORD_FILE, RUNNING, STOPPED, RunRecord
from common.security.keys import (
    COORDINATOR_NAME,
    Identity,
    passphrase_from_env,
    read_identity,
)
from common.security.manifest import Manifest, read_manifest
from common.settings import RunSettings
from server.channel import CoordinatorChannel, UpdateLimits, update_bound
from server.interruptible_grid import InterruptibleGrid
from server.report import write_report
from server.strategy import (
    BasePayload,
    SiteAwareStrategy,
    TooFewSites,
    flower_strategy,
    server_optimiser_args,
)

log = logging.getLogger(__name__)

SOURCE_MODEL_DIR = "source-model"
FINAL_MODEL_DIR = "final-model"
ROUND_CHECKPOINT_DIR = "checkpoints"
STRATEGY_STATE_FILE = "strategy-state.safetensors"


class FederationFailed(DeploymentError):
    """No round produced a usable global model."""


def _scenario(settings: RunSettings) -> Scenario | None:
    if not settings.scenario:
        return None
    return load_scenario(
        settings.scenario,
        seed=settings.seed,
        data_dir=Path(settings.data_dir) if settings.data_dir else None,
        private=not settings.per_site_scaling,
    )


def base_checkpoint(settings: RunSettings, scenario: Scenario | None, out: Path) -> Path:
    """The checkpoint to start from: the one given, or the scenario's source model pretrained now."""
    if settings.checkpoint:
        return Path(settings.checkpoint).expanduser()
    if scenario is None:
        raise FederationFailed("no checkpoint given and no scenario to pretrain one from: set checkpoint or scenario")
    pretrain_source(scenario, out / SOURCE_MODEL_DIR, seed=settings.seed)
    return out / SOURCE_MODEL_DIR


def coordinator_keys(settings: RunSettings) -> tuple[Identity, Manifest]:
    """The coordinator's identity and the signed manifest of the federation (simulated sites have them too)."""
    if not settings.coordinator_keys or not settings.manifest:
        raise FederationFailed(
            "a run needs the coordinator's keys and the federation manifest: set run-config coordinator-keys "
            "(a directory made by `fedtransfer keys coordinator`) and manifest; `fedtransfer simulate` makes "
            "both for simulated sites"
        )
    identity = read_identity(Path(settings.coordinator_keys).expanduser(), COORDINATOR_NAME, passphrase_from_env())
    manifest = read_manifest(Path(settings.manifest).expanduser(), identity.public().fingerprint())
    return identity, manifest


@dataclass(frozen=True)
class ResumePoint:
    """Where an interrupted run stands: its record, last completed round, weights and strategy state."""

    record: RunRecord
    completed: int
    model: FedModel
    strategy_state: dict[str, np.ndarray]

    @property
    def last_round_begun(self) -> int:
        """Sites may have spent budget in a round that never completed: its number is never reused."""
        return max([self.completed, *(r.server_round for r in self.record.abandoned_rounds)])


def completed_round(record: RunRecord, out: Path) -> int:
    """The last round of the run whose global model and strategy state were fully written (0: none)."""
    return max(
        (
            r.server_round
            for r in record.rounds
            if r.aggregated_sites and (_round_dir(out, r.server_round) / STRATEGY_STATE_FILE).is_file()
        ),
        default=0,
    )


def resume_point(out: Path) -> ResumePoint:
    """The last round of the run in ``out`` whose checkpoint was fully written."""
    if not (out / RUN_RECORD_FILE).is_file():
        raise FederationFailed(f"nothing to resume in {out}: it holds no {RUN_RECORD_FILE}")
    record = RunRecord.load(out / RUN_RECORD_FILE)
    completed = completed_round(record, out)
    if not completed:
        raise FederationFailed(f"the run in {out} completed no round; start it again instead of resuming")
    model, _ = load_checkpoint(_round_dir(out, completed))
    record.abandoned_rounds += [r for r in record.rounds if r.server_round > completed]
    record.rounds = [r for r in record.rounds if r.server_round <= completed]
    record.status, record.stop_reason, record.finished = RUNNING, "", ""
    return ResumePoint(record, completed, model, load_file(str(_round_dir(out, completed) / STRATEGY_STATE_FILE)))


def _round_dir(out: Path, server_round: int) -> Path:
    return out / ROUND_CHECKPOINT_DIR / f"round-{server_round}"


def _save_strategy_state(state: dict[str, np.ndarray], directory: Path) -> None:
    write_atomic(directory / STRATEGY_STATE_FILE, save({k: np.ascontiguousarray(v) for k, v in state.items()}))


@dataclass(frozen=True)
class RunStart:
    """What a run starts from: its settings (a resumed run's own), output folder, base model and keys."""

    settings: RunSettings
    out: Path
    resumed: ResumePoint | None
    scenario: Scenario | None
    checkpoint: Path
    model: FedModel
    card: ModelCard
    transfer: TransferPolicy
    identity: Identity
    manifest: Manifest

    @property
    def offset(self) -> int:
        """Rounds already begun before this start (their numbers are never reused)."""
        return self.resumed.last_round_begun if self.resumed else 0


def start_run(settings: RunSettings) -> RunStart:
    """Resolve the settings, the output folder, the base model and the coordinator's keys."""
    out = make_output_dir(settings.output_dir())
    resumed = resume_point(out) if settings.resume else None
    if resumed is not None:
        settings = RunSettings(**{**resumed.record.settings, "resume": True, "out": str(out)})
        log.info("resuming run %s after round %d of %d", resumed.record.run_id, resumed.completed, settings.rounds)
    scenario = _scenario(settings)
    checkpoint = base_checkpoint(settings, scenario, out)
    model, card = load_checkpoint(checkpoint)
    transfer = TransferPolicy.parse(settings.transfer_policy or card.default_transfer_policy)
    if resumed is not None and transfer.kind == "lora":
        raise PolicyParseError(
            f"a {transfer} run cannot be resumed: its round checkpoints hold the adapters folded into the base "
            "weights, not the adapters themselves; start the run again"
        )
    identity, manifest = coordinator_keys(settings)
    return RunStart(settings, out, resumed, scenario, checkpoint, model, card, transfer, identity, manifest)


def new_run_id() -> str:
    """A run id chosen by the coordinator: 128 random bits, so no relay can predict or reuse one."""
    return secrets.token_hex(16)


def round_instruction(start: RunStart, run_id: str) -> RoundInstruction:
    """The instruction every site receives (the coordinator signs it per message, with the round number)."""
    settings = start.settings
    return RoundInstruction(
        server_round=0,
        rounds=settings.rounds,
        transfer_policy=str(start.transfer),
        base_fingerprint=start.card.model_fingerprint,
        base_card_sha256=card_digest(start.card.to_json()),
        frozen_fingerprint=state_fingerprint(start.transfer.frozen_state(start.model)),
        local_epochs=settings.local_epochs,
        local_steps=settings.local_steps,
        batch_size=settings.batch_size,
        lr=settings.lr,
        optimizer=settings.optimizer,
        proximal_mu=settings.proximal_mu if settings.strategy == "fedprox" else 0.0,
        seed=settings.seed,
        personalise_epochs=settings.personalise_epochs,
        personalise_fraction=settings.personalise_fraction,
        personalise_lr=settings.personalise_lr,
        dp=int(settings.dp),
        run_id=run_id,
        federated_evaluation=settings.federated_evaluation,
        release_loss=int(settings.release_loss),
        reproducible_noise=int(settings.reproducible_noise),
        class_weights=settings.class_weights,
    )


def _new_record(start: RunStart, run_id: str) -> RunRecord:
    card = start.card
    return RunRecord(
        run_id=run_id,
        settings=start.settings.__dict__ | {"checkpoint": str(start.checkpoint)},
        base_model={
            "path": str(start.checkpoint),
            "fingerprint": card.model_fingerprint,
            "weights_sha256": card.weights_sha256,
            "source": card.source_description,
        },
        transfer_policy=str(start.transfer),
        strategy=start.settings.strategy,
        manifest=start.manifest.to_json(),
        traffic=traffic(start.transfer, start.model),
    )


def traffic(transfer: TransferPolicy, model: FedModel) -> dict[str, int]:
    """Tensor bytes per site: the trainable tensors every round (down and up alike) and the base model once."""
    trainable = transfer.trainable_state(model)
    base = transfer.base_state(model)
    return {
        "trainable-tensors": len(trainable),
        "trainable-parameters": sum(t.numel() for t in trainable.values()),
        "update-bytes-per-site-per-round": sum(t.numel() * t.element_size() for t in trainable.values()),
        "base-model-bytes-per-site": sum(t.numel() * t.element_size() for t in base.values()),
    }


def _site_aware_strategy(
    start: RunStart, run_id: str, flower_run_id: int, instruction: RoundInstruction, record: RunRecord
) -> SiteAwareStrategy:
    settings = start.settings
    trainable = start.transfer.trainable_state(start.model)
    limits = UpdateLimits(
        shapes={name: t.shape for name, t in trainable.items()},
        dtypes={name: t.dtype for name, t in trainable.items()},
        max_norm=update_bound(settings, start.transfer),
        num_classes=start.card.num_classes,
    )
    record.max_update_norm = limits.max_norm
    personalises = settings.personalise_epochs > 0 and (settings.personalise_fraction > 0 or not settings.dp)
    strategy = SiteAwareStrategy(
        flower_strategy(
            settings.strategy,
            settings.min_sites,
            settings.proximal_mu,
            server_optimiser_args(settings.server_lr, settings.server_tau, settings.server_beta_2),
        ),
        CoordinatorChannel(start.identity, start.manifest, run_id, start.card.model_fingerprint, limits),
        BasePayload(ArrayRecord(start.transfer.base_state(start.model)), start.card.to_json()),
        record,
        settings.min_sites,
        persist=lambda: record.save(start.out),
        round_offset=start.offset,
        expected_sites=settings.expected_sites,
        site_wait=settings.round_timeout,
        evaluates=lambda server_round: (
            instruction.evaluates(server_round) or (server_round == settings.rounds and personalises)
        ),
        flower_run_id=flower_run_id,
    )
    if start.resumed is not None:
        strategy.load_state(start.resumed.strategy_state)
        strategy.latest_arrays = ArrayRecord(start.transfer.trainable_state(start.resumed.model))
    return strategy


def _global_model(start: RunStart, arrays: ArrayRecord) -> FedModel:
    """The base model with the trainable tensors of ``arrays``, as a plain model of the card's architecture
    (LoRA adapters folded into the base weights)."""
    model = start.card.build()
    model.load_state_dict(start.transfer.base_state(start.model), strict=True)
    start.transfer.load_trainable(model, arrays.to_torch_state_dict())
    return start.transfer.merged(model)


def run_federation(grid: Grid, settings: RunSettings, flower_run_id: int, stop: StopRequest | None = None) -> RunRecord:
    """Run ``settings.rounds`` rounds on the sites ``grid`` reaches; write everything to ``settings.out``.

    The coordinator chooses the run id (:func:`new_run_id`); ``flower_run_id``, the SuperLink's number
    for this Flower run, is only noted in the record. With ``settings.resume`` the run recorded in
    ``settings.out`` continues from its last completed round, with that run's id, settings, keys and
    round numbers, so the sites keep their run plan and nothing they recorded is rolled back. Once
    ``stop`` is requested the run stops waiting for the sites, abandons the round in progress and
    ends "interrupted". A ``grid`` that already is an :class:`InterruptibleGrid` (watching ``stop``)
    is used as it is, so its own way of sending, such as a window of instructions in flight, stays.
    """
    if stop is not None and not isinstance(grid, InterruptibleGrid):
        grid = InterruptibleGrid(grid, stop)
    start = start_run(settings)
    settings, out, card = start.settings, start.out, start.card
    run_id = start.resumed.record.run_id if start.resumed else new_run_id()
    instruction = round_instruction(start, run_id)
    request = PrivacyRequest(
        settings.target_epsilon,
        settings.delta,
        settings.max_grad_norm,
        settings.rounds,
        evaluations=instruction.evaluations,
        release_loss=settings.release_loss,
    )
    round_config = instruction.to_config() | request.to_config()
    record = start.resumed.record if start.resumed else _new_record(start, run_id)
    strategy = _site_aware_strategy(start, run_id, flower_run_id, instruction, record)
    trainable = start.transfer.trainable_state(start.model)
    log.info(
        "run %s (Flower run %d): %s from %s, transfer policy %s (%d of %d parameters travel), strategy %s",
        run_id,
        flower_run_id,
        settings.scenario or "deployment",
        start.checkpoint,
        start.transfer,
        sum(t.numel() for t in trainable.values()),
        sum(t.numel() for t in start.model.state_dict().values()),
        settings.strategy,
        extra=progress(ROUNDS, completed=start.offset, total=settings.rounds),
    )

    def central_evaluate(flower_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if flower_round == 0 and start.resumed is not None:
            return None  # the resumed starting point was evaluated and saved before the interruption
        server_round = flower_round + start.offset
        current = _global_model(start, arrays)
        if server_round > 0:
            save_checkpoint(current, _round_dir(out, server_round), **_card_fields(card, record, server_round))
            _save_strategy_state(strategy.state(), _round_dir(out, server_round))
        metrics = None
        if start.scenario is not None and start.scenario.source is not None:
            source = start.scenario.source.test
            values = classification_metrics(source.y, predict_proba(current, as_tensors(source.x, source.y)[0]))
            record.round(server_round).central = values
            metrics = MetricRecord(values)
        record.save(out)
        log.info(
            "round %d/%d done%s",
            server_round,
            settings.rounds,
            _round_summary(record, server_round),
            extra=progress(ROUNDS, completed=server_round, total=settings.rounds),
        )
        return metrics

    try:
        try:
            strategy.start(
                grid=grid,
                initial_arrays=strategy.latest_arrays if start.resumed else ArrayRecord(trainable),
                num_rounds=settings.rounds - start.offset,
                timeout=settings.round_timeout,
                train_config=ConfigRecord(round_config),
                evaluate_config=ConfigRecord(round_config),
                evaluate_fn=central_evaluate,
            )
        except TooFewSites as err:
            log.error("%s; stopping and saving the last global model", err)
            record.finish(STOPPED, str(err))
        except RunInterrupted as err:
            return _interrupted(start, record, str(err))
        else:
            record.finish(COMPLETED)
        return _finish(start, strategy, record, run_id)
    except FederationFailed:
        raise  # _finish recorded it
    except Exception as err:
        record.finish(FAILED, f"the coordinator stopped on an unexpected {type(err).__name__}: {str(err)[:300]}")
        record.save(out)
        raise


def _interrupted(start: RunStart, record: RunRecord, reason: str) -> RunRecord:
    """End the run as interrupted: the round in progress is abandoned; the completed rounds' checkpoints stay."""
    completed = completed_round(record, start.out)
    record.finish(INTERRUPTED, f"{reason}; rounds completed: {completed} of {start.settings.rounds}")
    record.save(start.out)
    log.warning("run %s interrupted after round %d of %d", record.run_id, completed, start.settings.rounds)
    return record


def _finish(start: RunStart, strategy: SiteAwareStrategy, record: RunRecord, run_id: str) -> RunRecord:
    """Save the final global model, the record and the report; a run without any global model failed."""
    out = start.out
    if strategy.latest_arrays is None:
        record.finish(FAILED, record.stop_reason or "no round produced an aggregated update")
        record.save(out)
        raise FederationFailed(
            f"run {run_id} produced no global model: {record.stop_reason}; see {out / RUN_RECORD_FILE}"
        )
    completed = max((r.server_round for r in record.rounds if r.aggregated_sites), default=0)
    save_checkpoint(
        _global_model(start, strategy.latest_arrays),
        out / FINAL_MODEL_DIR,
        **_card_fields(start.card, record, completed),
    )
    record.final_checkpoint = str(out / FINAL_MODEL_DIR)
    record.save(out)
    write_report(record, out)
    return record


def _card_fields(card: ModelCard, record: RunRecord, rounds: int) -> dict:
    return dict(
        arch=card.arch,
        arch_args=card.arch_args,
        input_shape=card.input_shape,
        class_names=card.class_names,
        feature_names=card.feature_names,
        source_description=card.source_description,
        preprocessing=card.preprocessing,
        default_transfer_policy=record.transfer_policy,
        class_prior=card.class_prior,
        licence=card.licence,
        pretraining_data=card.pretraining_data,
        lineage={
            "kind": "federated",
            "base_model_fingerprint": card.model_fingerprint,
            "base_weights_sha256": card.weights_sha256,
            "run_id": record.run_id,
            "rounds": rounds,
            "sites": sorted({s for r in record.rounds for s in r.aggregated_sites}),
            "strategy": record.strategy,
            "transfer-policy": record.transfer_policy,
        },
    )


def _round_summary(record: RunRecord, server_round: int) -> str:
    if server_round == 0:
        return " (base model)"
    current = record.round(server_round)
    parts = [
        f"{site}: {r.status}"
        + (f" AUC {r.metrics['roc-auc']:.3f} (DP-released)" if isinstance(r.metrics.get("roc-auc"), float) else "")
        + (f" eps {r.epsilon():.2f}" if r.epsilon() is not None else "")
        for site, r in sorted(current.sites.items())
    ]
    return " | " + ", ".join(parts)
