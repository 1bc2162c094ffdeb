"""DP cost per local round: DP-SGD against plain SGD, per Opacus grad-sample mode, and cached features.

For each case (a scenario, its model and a transfer policy) these variants of one local round
on the scenario's first target site run side by side, interleaved, on fresh copies of one
model:

- ``plain_uncached``: ``train_plain`` on the whole model (frozen part has requires_grad off),
  fed raw inputs, so the frozen backbone runs at every step;
- ``plain_cached``: ``compute_features`` of the frozen part once, ``train_plain`` on the
  trainable part;
- ``dp_uncached``: ``dp_train`` (Opacus DP-SGD, the mode ``grad_sample_mode`` picks) on the
  whole model, fed raw inputs;
- ``dp_cached:MODE`` for each grad-sample mode that can train the part (Opacus's ``hooks``, ``ew``,
  ``functorch``, ``ghost``; ours: ``direct`` and ``ghost-direct`` where every trainable layer has an
  Opacus grad sampler, ``linear`` where only a last linear layer trains):
  ``compute_features`` once, ``dp_train`` on the trainable part in that mode; ``dp_cached`` is the
  one ``grad_sample_mode`` picks, as the site runs it.

The cached variants include the one feature pass in their time (a site caches features
across rounds, so this is the worst round). ``dp_setup`` is ``dp_train`` for zero steps: the
fixed per-round cost of wrapping the module (Opacus's grad-sample module and optimizer), shown
apart so the per-step cost of DP can be read off. DP-SGD draws its Poisson batches and Gaussian
noise from ``SecureRandom`` (the operating system's CSPRNG), as every real site does, so its
cost is in the DP figures; the sample rate comes from the site's declared size (its training
rows rounded to 10), as at a site. Reported: medians and their ratios, against the targets
DP <= 1.5x non-DP for the ``head`` policy and <= 2x for ``last:k`` (cached features), and
caching >= 5x faster than the uncached DP round.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from client.dp_training import (
    GRAD_SAMPLE_MODES,
    GradSampleMode,
    dp_train,
    grad_sample_mode,
    sample_rate_and_steps,
    supported_modes,
)
from common.data.scenarios import load_scenario
from common.model.training import TrainConfig, as_tensors, compute_features, train_plain, use_one_torch_thread
from common.model.transfer import TransferPolicy
from common.model.zoo import FedModel, build_model
from common.privacy.noise import SecureRandom
from common.settings import RunSettings
from simulations.benchmarks.communication import heart_data_dir
from simulations.benchmarks.report import (
    Machine,
    bench_command,
    header,
    interleaved,
    markdown_table,
    result_head,
    this_machine,
    timed,
    write_result,
)
from simulations.sites import declared_size

logger = logging.getLogger(__name__)

NAME = "dp"
#: DP / non-DP targets (cached features) by transfer policy: ``head`` and ``last:k``; others are reported only.
TARGET_DP_OVER_PLAIN = {"head": 1.5, "last": 2.0}
TARGET_CACHE_SPEEDUP = 5.0
NOISE_MULTIPLIER = 1.0
VARIANTS = ("plain_uncached", "plain_cached", "dp_uncached", "dp_cached", "dp_setup")
#: (scenario, transfer policy or the scenario's default): the zoo's mlp, cnn and logreg.
CASES: tuple[tuple[str, str | None], ...] = (
    ("wdbc", None),
    ("synthetic-imaging", None),
    ("synthetic-imaging", "head"),
    ("heart-disease", None),
)
QUICK_CASES: tuple[tuple[str, str | None], ...] = (("wdbc", None), ("synthetic-imaging", None))
NEEDS_DATA = {"heart-disease"}


@dataclass(frozen=True)
class DpCase:
    """One scenario and policy: median seconds per local round of each variant, and their ratios."""

    scenario: str
    arch: str
    transfer_policy: str
    default_transfer_policy: bool
    site: str
    train_examples: int
    steps_per_round: int
    seconds: dict[str, float]
    modes: list[str]
    mode: str
    fastest_mode: str
    mode_over_plain: dict[str, float]
    target_dp_over_plain: float | None
    dp_over_plain: float
    dp_over_plain_uncached: float
    dp_over_plain_without_setup: float
    cache_speedup_dp: float
    cache_speedup_plain: float
    meets_dp_target: bool
    meets_cache_target: bool


def target_for(transfer: TransferPolicy) -> float | None:
    """The DP / non-DP target of a transfer policy (``head`` or ``last:k``), None if it has none."""
    return TARGET_DP_OVER_PLAIN.get(str(transfer).split(":")[0])


def _modes(base: FedModel, transfer: TransferPolicy, x: torch.Tensor) -> tuple[GradSampleMode, ...]:
    """The grad-sample modes that can train the trainable part of ``base`` under ``transfer``."""
    probe = copy.deepcopy(base)
    transfer.apply(probe)
    frozen, trainable = transfer.split(probe)
    return supported_modes(trainable, compute_features(frozen, x[:1]))


def _variants(
    base: FedModel, transfer: TransferPolicy, x: torch.Tensor, y: torch.Tensor, config: TrainConfig
) -> dict[str, Callable[[], float]]:
    max_grad_norm = RunSettings().max_grad_norm
    declared = declared_size(len(y))
    sample_rate, steps = sample_rate_and_steps(declared, config.batch_size, config.epochs)

    def prepared() -> tuple[FedModel, torch.nn.Module, torch.nn.Module]:
        model = copy.deepcopy(base)
        transfer.apply(model)
        frozen, trainable = transfer.split(model)
        return model, frozen, trainable

    def private(
        module: torch.nn.Module, inputs: torch.Tensor, round_steps: int = steps, mode: GradSampleMode | None = None
    ) -> None:
        dp_train(
            module,
            inputs,
            y,
            config,
            noise_multiplier=NOISE_MULTIPLIER,
            max_grad_norm=max_grad_norm,
            sample_rate=sample_rate,
            steps=round_steps,
            expected_batch_size=sample_rate * declared,
            source=SecureRandom(),
            mode=mode,
        )

    def plain_uncached() -> float:
        model, _, _ = prepared()
        return timed(lambda: train_plain(model, x, y, config))

    def plain_cached() -> float:
        _, frozen, trainable = prepared()
        return timed(lambda: train_plain(trainable, compute_features(frozen, x), y, config))

    def dp_uncached() -> float:
        model, _, _ = prepared()
        return timed(lambda: private(model, x))

    def dp_cached(mode: GradSampleMode) -> Callable[[], float]:
        def variant() -> float:
            _, frozen, trainable = prepared()
            return timed(lambda: private(trainable, compute_features(frozen, x), mode=mode))

        return variant

    def dp_setup() -> float:
        _, frozen, trainable = prepared()
        features = compute_features(frozen, x)
        return timed(lambda: private(trainable, features, round_steps=0))

    return {
        "plain_uncached": plain_uncached,
        "plain_cached": plain_cached,
        "dp_uncached": dp_uncached,
        "dp_setup": dp_setup,
        **{f"dp_cached:{mode}": dp_cached(mode) for mode in _modes(base, transfer, x)},
    }


def measure_case(
    scenario_name: str, policy_text: str | None, config: TrainConfig, repetitions: int, warmup: int, seed: int
) -> DpCase:
    """Time one local round of every variant on the scenario's first target site."""
    scenario = load_scenario(
        scenario_name, seed=seed, data_dir=heart_data_dir() if scenario_name in NEEDS_DATA else None
    )
    site = scenario.sites[0]
    transfer = TransferPolicy.parse(policy_text or scenario.transfer_policy)
    torch.manual_seed(seed)
    base = build_model(scenario.model.arch, scenario.input_shape, len(scenario.class_names), scenario.model.args)
    x, y = as_tensors(site.train.x, site.train.y)
    measured = interleaved(_variants(base, transfer, x, y, config), repetitions, warmup)
    probe = copy.deepcopy(base)
    transfer.apply(probe)
    frozen, trainable = transfer.split(probe)
    mode = grad_sample_mode(trainable, compute_features(frozen, x[:1]))
    modes = {m: measured[f"dp_cached:{m}"] for m in _modes(base, transfer, x)}
    seconds = (
        {v: measured[v] for v in VARIANTS if v in measured}
        | {"dp_cached": modes[mode]}
        | {f"dp_cached:{m}": t for m, t in modes.items()}
    )
    _, steps = sample_rate_and_steps(declared_size(len(y)), config.batch_size, config.epochs)
    dp_over_plain = seconds["dp_cached"] / seconds["plain_cached"]
    cache_speedup_dp = seconds["dp_uncached"] / seconds["dp_cached"]
    target = target_for(transfer)
    case = DpCase(
        scenario=scenario.name,
        arch=scenario.model.arch,
        transfer_policy=str(transfer),
        default_transfer_policy=str(transfer) == scenario.transfer_policy,
        site=site.name,
        train_examples=len(y),
        steps_per_round=steps,
        seconds=seconds,
        modes=list(modes),
        mode=mode,
        fastest_mode=min(modes, key=modes.__getitem__),
        mode_over_plain={m: t / seconds["plain_cached"] for m, t in modes.items()},
        target_dp_over_plain=target,
        dp_over_plain=dp_over_plain,
        dp_over_plain_uncached=seconds["dp_uncached"] / seconds["plain_uncached"],
        dp_over_plain_without_setup=(seconds["dp_cached"] - seconds["dp_setup"]) / seconds["plain_cached"],
        cache_speedup_dp=cache_speedup_dp,
        cache_speedup_plain=seconds["plain_uncached"] / seconds["plain_cached"],
        meets_dp_target=target is not None and dp_over_plain <= target,
        meets_cache_target=cache_speedup_dp >= TARGET_CACHE_SPEEDUP,
    )
    logger.info(
        "dp cost %s %s: DP/plain %.2fx (%s; fastest %s), cache speed-up %.2fx",
        case.scenario,
        case.transfer_policy,
        case.dp_over_plain,
        case.mode,
        case.fastest_mode,
        case.cache_speedup_dp,
    )
    return case


def _markdown(machine: Machine, result: dict[str, Any], cases: list[DpCase]) -> str:
    lines = [
        header(
            "DP cost per local round", machine, bench_command(NAME, result["quick"], result["seed"]), result["quick"]
        )
    ]
    config = result["config"]
    lines.append(
        f"One local round on each scenario's first target site: {config['epochs']} epoch(s), batch "
        f"{config['batch_size']}, "
        f"{config['optimizer']} lr {config['lr']}; DP-SGD with noise multiplier {NOISE_MULTIPLIER}, clipping norm "
        f"{config['max_grad_norm']}, Poisson sampling at the rate of the site's declared size, sampling and noise from "
        f"the operating system's CSPRNG (`SecureRandom`, as at every real site). Median of {result['repetitions']} "
        f"interleaved repetitions after {result['warmup']} warm-up. Cached variants include their one feature pass; "
        "`dp_cached` is the grad-sample mode the site picks (`grad_sample_mode`); `dp_setup` is `dp_train` for zero "
        "steps (module wrapping only), the fixed part of every DP round.\n"
    )
    rows = [
        [
            c.scenario,
            c.arch,
            c.transfer_policy + (" (default)" if c.default_transfer_policy else ""),
            c.train_examples,
            c.steps_per_round,
            *(f"{c.seconds[v] * 1000:.1f}" for v in VARIANTS),
        ]
        for c in cases
    ]
    lines.append("Median milliseconds per local round:\n")
    lines.append(
        markdown_table(
            ["scenario", "model", "transfer policy", "examples", "steps", *(f"{v} ms" for v in VARIANTS)], rows
        )
    )
    mode_rows = [
        [
            c.scenario,
            c.transfer_policy,
            *(
                f"{c.seconds[f'dp_cached:{m}'] * 1000:.1f} ({c.mode_over_plain[m]:.2f}x)" if m in c.modes else "-"
                for m in GRAD_SAMPLE_MODES
            ),
            c.fastest_mode,
            c.mode,
        ]
        for c in cases
    ]
    lines.append(
        "\nGrad-sample modes side by side (cached DP round, ms, and its ratio to `plain_cached`; `direct` and "
        "`ghost-direct` where every trainable layer has an Opacus grad sampler, `linear` where a last linear layer "
        "alone trains):\n"
    )
    lines.append(
        markdown_table(
            ["scenario", "transfer policy", *(f"{m} ms" for m in GRAD_SAMPLE_MODES), "fastest", "picked"], mode_rows
        )
    )
    ratio_rows = [
        [
            c.scenario,
            c.transfer_policy,
            f"{c.dp_over_plain:.2f}x",
            "-" if c.target_dp_over_plain is None else f"<= {c.target_dp_over_plain:g}x",
            "-" if c.target_dp_over_plain is None else ("yes" if c.meets_dp_target else "NO"),
            f"{c.dp_over_plain_uncached:.2f}x",
            f"{c.dp_over_plain_without_setup:.2f}x",
            f"{c.cache_speedup_dp:.2f}x",
            "yes" if c.meets_cache_target else "NO",
            f"{c.cache_speedup_plain:.2f}x",
        ]
        for c in cases
    ]
    lines.append("\nRatios (same process, same data, same model):\n")
    lines.append(
        markdown_table(
            [
                "scenario",
                "transfer policy",
                "DP / non-DP (cached)",
                "target",
                "met",
                "DP / non-DP (uncached)",
                "DP minus dp_setup / non-DP (cached)",
                "cache speed-up, DP",
                f">= {TARGET_CACHE_SPEEDUP}x",
                "cache speed-up, non-DP",
            ],
            ratio_rows,
        )
    )
    if result["skipped"]:
        lines.append("\nNot measured: " + "; ".join(f"{s['scenario']} ({s['reason']})" for s in result["skipped"]))
    return "\n".join(lines)


def _skip_reason(name: str) -> str | None:
    if name in NEEDS_DATA and not heart_data_dir().is_dir():
        return f"the Fed-Heart-Disease files are not at {heart_data_dir()} (set FEDTRANSFER_DATA_DIR)"
    return None


def run(out_dir: Path, quick: bool = False, seed: int = 0) -> dict[str, Any]:
    """Measure the DP and feature-cache cost of a local round; write ``dp.json`` and ``dp.md``."""
    use_one_torch_thread()
    machine = this_machine()
    settings = RunSettings()
    config = TrainConfig(
        epochs=1 if quick else settings.local_epochs,
        batch_size=settings.batch_size,
        lr=settings.lr,
        optimizer=settings.optimizer,
        seed=seed,
    )
    repetitions, warmup = (1, 0) if quick else (7, 1)
    chosen = QUICK_CASES if quick else CASES
    skipped = [{"scenario": name, "reason": _skip_reason(name)} for name, _ in chosen if _skip_reason(name)]
    cases = [
        measure_case(name, transfer, config, repetitions, warmup, seed)
        for name, transfer in chosen
        if not _skip_reason(name)
    ]
    result: dict[str, Any] = {
        **result_head(NAME, quick, seed, machine),
        "repetitions": repetitions,
        "warmup": warmup,
        "config": {**asdict(config), "noise_multiplier": NOISE_MULTIPLIER, "max_grad_norm": settings.max_grad_norm},
        "targets": {"dp_over_plain_max": TARGET_DP_OVER_PLAIN, "cache_speedup_min": TARGET_CACHE_SPEEDUP},
        "modes": list(GRAD_SAMPLE_MODES),
        "cases": [asdict(case) for case in cases],
        "skipped": skipped,
    }
    return write_result(out_dir, NAME, result, _markdown(machine, result, cases))
