"""DP cost per local round: DP-SGD against plain SGD, and cached frozen features against none.

For each case (a scenario, its model and a transfer policy) four variants of one local round
on the scenario's first target site run side by side, interleaved, on fresh copies of one
model:

- ``plain_uncached``: ``train_plain`` on the whole model (frozen part has requires_grad off),
  fed raw inputs, so the frozen backbone runs at every step;
- ``plain_cached``: ``compute_features`` of the frozen part once, ``train_plain`` on the
  trainable part;
- ``dp_uncached``: ``dp_train`` (Opacus DP-SGD) on the whole model, fed raw inputs;
- ``dp_cached``: ``compute_features`` once, ``dp_train`` on the trainable part, as the site does.

The cached variants include the one feature pass in their time (a site caches features
across rounds, so this is the worst round). A fifth variant, ``dp_setup``, is ``dp_train``
for zero steps: the fixed per-round cost of wrapping the module (Opacus's ``GradSampleModule``
and ``DPOptimizer``), shown apart so the per-step cost of DP can be read off. DP-SGD draws
its Poisson batches and Gaussian noise from ``SecureRandom`` (the operating system's CSPRNG),
as every real site does, so its cost is in the DP figures; the sample rate comes from the
site's declared size (its training rows rounded to 10), as at a site. Reported: medians and
their ratios, against the targets DP <= 1.5x non-DP and caching >= 5x faster than the uncached
DP round.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from client.dp_training import dp_train, sample_rate_and_steps
from common.data.scenarios import load_scenario
from common.model.training import TrainConfig, as_tensors, compute_features, train_plain, use_one_torch_thread
from common.model.transfer import TransferPolicy
from common.model.zoo import FedModel, build_model
from common.privacy.noise import SecureRandom
from common.settings import RunSettings
from simulations.benchmarks.report import (
    Machine,
    bench_command,
    header,
    interleaved,
    machine_record,
    markdown_table,
    this_machine,
    timed,
    write_result,
)
from simulations.sites import declared_size

logger = logging.getLogger(__name__)

NAME = "dp"
TARGET_DP_OVER_PLAIN = 1.5
TARGET_CACHE_SPEEDUP = 5.0
NOISE_MULTIPLIER = 1.0
VARIANTS = ("plain_uncached", "plain_cached", "dp_uncached", "dp_cached", "dp_setup")
CASES: tuple[tuple[str, str | None], ...] = (("wdbc", None), ("synthetic-imaging", None), ("synthetic-imaging", "head"))
QUICK_CASES: tuple[tuple[str, str | None], ...] = (("wdbc", None), ("synthetic-imaging", None))


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
    dp_over_plain: float
    dp_over_plain_uncached: float
    dp_over_plain_without_setup: float
    cache_speedup_dp: float
    cache_speedup_plain: float
    meets_dp_target: bool
    meets_cache_target: bool


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

    def private(module: torch.nn.Module, inputs: torch.Tensor, round_steps: int = steps) -> None:
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

    def dp_cached() -> float:
        _, frozen, trainable = prepared()
        return timed(lambda: private(trainable, compute_features(frozen, x)))

    def dp_setup() -> float:
        _, frozen, trainable = prepared()
        features = compute_features(frozen, x)
        return timed(lambda: private(trainable, features, round_steps=0))

    return {
        "plain_uncached": plain_uncached,
        "plain_cached": plain_cached,
        "dp_uncached": dp_uncached,
        "dp_cached": dp_cached,
        "dp_setup": dp_setup,
    }


def measure_case(
    scenario_name: str, policy_text: str | None, config: TrainConfig, repetitions: int, warmup: int, seed: int
) -> DpCase:
    """Time one local round of the four variants on the scenario's first target site."""
    scenario = load_scenario(scenario_name, seed=seed)
    site = scenario.sites[0]
    transfer = TransferPolicy.parse(policy_text or scenario.transfer_policy)
    torch.manual_seed(seed)
    base = build_model(scenario.model.arch, scenario.input_shape, len(scenario.class_names), scenario.model.args)
    x, y = as_tensors(site.train.x, site.train.y)
    seconds = interleaved(_variants(base, transfer, x, y, config), repetitions, warmup)
    _, steps = sample_rate_and_steps(declared_size(len(y)), config.batch_size, config.epochs)
    dp_over_plain = seconds["dp_cached"] / seconds["plain_cached"]
    cache_speedup_dp = seconds["dp_uncached"] / seconds["dp_cached"]
    case = DpCase(
        scenario=scenario.name,
        arch=scenario.model.arch,
        transfer_policy=str(transfer),
        default_transfer_policy=str(transfer) == scenario.transfer_policy,
        site=site.name,
        train_examples=len(y),
        steps_per_round=steps,
        seconds=seconds,
        dp_over_plain=dp_over_plain,
        dp_over_plain_uncached=seconds["dp_uncached"] / seconds["plain_uncached"],
        dp_over_plain_without_setup=(seconds["dp_cached"] - seconds["dp_setup"]) / seconds["plain_cached"],
        cache_speedup_dp=cache_speedup_dp,
        cache_speedup_plain=seconds["plain_uncached"] / seconds["plain_cached"],
        meets_dp_target=dp_over_plain <= TARGET_DP_OVER_PLAIN,
        meets_cache_target=cache_speedup_dp >= TARGET_CACHE_SPEEDUP,
    )
    logger.info(
        "dp cost %s %s: DP/plain %.2fx, cache speed-up %.2fx",
        case.scenario,
        case.transfer_policy,
        case.dp_over_plain,
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
        f"`dp_setup` is `dp_train` for zero steps (module wrapping only), the fixed part of every DP round.\n"
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
    ratio_rows = [
        [
            c.scenario,
            c.transfer_policy,
            f"{c.dp_over_plain:.2f}x",
            "yes" if c.meets_dp_target else "NO",
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
                f"<= {TARGET_DP_OVER_PLAIN}x",
                "DP / non-DP (uncached)",
                "DP minus dp_setup / non-DP (cached)",
                "cache speed-up, DP",
                f">= {TARGET_CACHE_SPEEDUP}x",
                "cache speed-up, non-DP",
            ],
            ratio_rows,
        )
    )
    return "\n".join(lines)


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
    cases = [
        measure_case(name, transfer, config, repetitions, warmup, seed)
        for name, transfer in (QUICK_CASES if quick else CASES)
    ]
    result: dict[str, Any] = {
        "benchmark": NAME,
        "quick": quick,
        "seed": seed,
        "machine": machine_record(machine),
        "repetitions": repetitions,
        "warmup": warmup,
        "config": {**asdict(config), "noise_multiplier": NOISE_MULTIPLIER, "max_grad_norm": settings.max_grad_norm},
        "targets": {"dp_over_plain_max": TARGET_DP_OVER_PLAIN, "cache_speedup_min": TARGET_CACHE_SPEEDUP},
        "cases": [asdict(case) for case in cases],
    }
    return write_result(out_dir, NAME, result, _markdown(machine, result, cases))
