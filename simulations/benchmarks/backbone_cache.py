"""Feature caching on a frozen ResNet-18: one DP round with the frozen backbone run at every step, and cached.

At a ``pneumonia`` target hospital (its training X-rays), with the ``head`` policy, one round
of DP-SGD (one epoch of Poisson batches of 32, as at a site; one torch thread, as a site's
ClientApp runs) is timed four ways, side by side and interleaved so that drifting load hits
all alike:

- **uncached**: ``dp_train`` on the whole model, whose frozen backbone runs on every batch;
- **cached, first round**: the backbone's features computed once (``FeatureCache``), then
  DP-SGD on the head alone;
- **cached, later rounds**: DP-SGD on the head with the features from memory;
- **spilled, later rounds**: the same with the features read back memory-mapped from disk
  (a memory budget of 0).

With the same seeded noise, the head the cached round trains equals the uncached one's (the
largest difference is reported). The model is the scenario's ResNet-18 at the data's 28x28
and, as an imported ImageNet model would be used, resized to 224x224 (fewer images in the
quick variant). Peak memory is the process's maximum resident set size.
"""

from __future__ import annotations

import copy
import logging
import resource
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from client.dp_training import dp_train, sample_rate_and_steps
from client.feature_cache import FeatureCache, Features
from common.data.pneumonia import DIR_ENV, pneumonia_scenario
from common.model.training import TrainConfig, as_tensors, compute_features, use_one_torch_thread
from common.model.transfer import TransferPolicy
from common.model.zoo import FedModel, build_model
from common.privacy.noise import SeededRandom
from simulations.benchmarks.report import (
    header,
    interleaved,
    markdown_table,
    result_head,
    this_machine,
    timed,
    write_result,
)

logger = logging.getLogger(__name__)

NAME = "backbone-cache"
BATCH = 32
ROUNDS = 5
TARGET_RATIO = 5.0
SIZES = {False: ((0, None), (224, 200)), True: ((0, 200), (224, 48))}  # (resize, images) per variant
REPETITIONS = {False: 3, True: 1}


@dataclass(frozen=True)
class Row:
    """One input size: seconds of each round kind, the ratios, and the exactness check."""

    resize: int
    images: int
    feature_bytes: int
    uncached: float
    cached_first: float
    cached_later: float
    spilled_later: float
    later_ratio: float
    spilled_ratio: float
    rounds_ratio: float
    max_weight_difference: float


def _dp_round(module: torch.nn.Module, inputs: torch.Tensor, labels: torch.Tensor, seed: int) -> None:
    rate, steps = sample_rate_and_steps(len(labels), BATCH, 1)
    dp_train(
        module,
        inputs,
        labels,
        TrainConfig(epochs=1, batch_size=BATCH, lr=0.1),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        sample_rate=rate,
        steps=steps,
        expected_batch_size=rate * len(labels),
        source=SeededRandom(seed),
    )


def _fresh(base: FedModel, transfer: TransferPolicy) -> tuple[FedModel, torch.nn.Sequential, torch.nn.Sequential]:
    model = copy.deepcopy(base)
    transfer.apply(model)
    frozen, trainable = transfer.split(model)
    return model, frozen, trainable


def _measure(base: FedModel, x: torch.Tensor, y: torch.Tensor, repetitions: int, work: Path) -> Row:
    transfer = TransferPolicy.parse("head")
    empty = x[:0]

    def features_of(frozen: torch.nn.Sequential) -> Features:
        return Features(compute_features(frozen, x), y, compute_features(frozen, empty), y[:0])

    def uncached() -> float:
        model, _, _ = _fresh(base, transfer)
        return timed(lambda: _dp_round(model, x, y, 1))

    def cached_first() -> float:
        _, frozen, trainable = _fresh(base, transfer)
        cache = FeatureCache()

        def run() -> None:
            features = cache.get("first", lambda: features_of(frozen), work)
            _dp_round(trainable, features.train_x, y, 1)

        return timed(run)

    _, frozen, _ = _fresh(base, transfer)
    in_memory = FeatureCache().get("mem", lambda: features_of(frozen), work)
    spilled_cache = FeatureCache(memory_bytes=0)
    spilled_cache.get("disk", lambda: features_of(frozen), work)

    def later(spilled: bool) -> float:
        _, _, trainable = _fresh(base, transfer)

        def run() -> None:
            features = spilled_cache.get("disk", lambda: features_of(frozen), work) if spilled else in_memory
            _dp_round(trainable, features.train_x, y, 1)

        return timed(run)

    times = interleaved(
        {
            "uncached": uncached,
            "cached_first": cached_first,
            "cached_later": lambda: later(False),
            "spilled_later": lambda: later(True),
        },
        repetitions,
    )
    whole, _, _ = _fresh(base, transfer)
    _dp_round(whole, x, y, 7)
    head_only, _, trainable = _fresh(base, transfer)
    _dp_round(trainable, in_memory.train_x, y, 7)
    difference = float((whole.head.weight - head_only.head.weight).abs().max())
    rounds = ROUNDS * times["uncached"] / (times["cached_first"] + (ROUNDS - 1) * times["cached_later"])
    return Row(
        resize=int(base.backbone.input.size),
        images=len(y),
        feature_bytes=in_memory.nbytes,
        uncached=times["uncached"],
        cached_first=times["cached_first"],
        cached_later=times["cached_later"],
        spilled_later=times["spilled_later"],
        later_ratio=times["uncached"] / times["cached_later"],
        spilled_ratio=times["uncached"] / times["spilled_later"],
        rounds_ratio=rounds,
        max_weight_difference=difference,
    )


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run(out_dir: Path, quick: bool = False, seed: int = 0) -> dict[str, Any]:
    use_one_torch_thread()
    machine = this_machine()
    scenario = pneumonia_scenario(seed, None, True)
    site = scenario.sites[0]
    rows = []
    with tempfile.TemporaryDirectory(prefix="fedtransfer-backbone-cache-") as work:
        for resize, images in SIZES[quick]:
            torch.manual_seed(seed)
            base = build_model(scenario.model.arch, scenario.input_shape, 2, {**scenario.model.args, "resize": resize})
            x, y = as_tensors(site.train.x[:images], site.train.y[:images])
            rows.append(_measure(base.eval(), x, y, REPETITIONS[quick], Path(work)))
            logger.info("backbone-cache: %dx%d done", resize or 28, resize or 28)
    result: dict[str, Any] = {
        **result_head(NAME, quick, seed, machine),
        "site": site.name,
        "batch": BATCH,
        "rounds": ROUNDS,
        "target_ratio": TARGET_RATIO,
        "rows": [asdict(r) for r in rows],
        "met": all(r.later_ratio >= TARGET_RATIO for r in rows),
        "peak_rss_mib": _peak_mib(),
    }
    return write_result(
        out_dir,
        NAME,
        result,
        _markdown(result, rows, header("Feature caching on a frozen ResNet-18", machine, result["command"], quick)),
    )


def _markdown(result: dict[str, Any], rows: list[Row], text: str) -> str:
    table = markdown_table(
        [
            "input",
            "images",
            "features MiB",
            "uncached s",
            "cached 1st s",
            "cached later s",
            "spilled later s",
            "later speed-up",
            "spilled speed-up",
            f"{ROUNDS} rounds speed-up",
            "max weight diff",
        ],
        [
            [
                f"{r.resize or 28}x{r.resize or 28}",
                r.images,
                f"{r.feature_bytes / 2**20:.2f}",
                f"{r.uncached:.2f}",
                f"{r.cached_first:.2f}",
                f"{r.cached_later:.3f}",
                f"{r.spilled_later:.3f}",
                f"{r.later_ratio:.0f}x",
                f"{r.spilled_ratio:.0f}x",
                f"{r.rounds_ratio:.1f}x",
                f"{r.max_weight_difference:.1e}",
            ]
            for r in rows
        ],
    )
    verdict = "MET" if result["met"] else "NOT met"
    return "\n".join(
        [
            text,
            f"One DP-SGD round (one epoch, Poisson batches of {BATCH}, noise multiplier 1, clipping 1) of the `head` "
            f"policy on `{result['site']}`'s training X-rays, the scenario's ResNet-18 frozen; median seconds of "
            "interleaved repetitions. 'Cached 1st' computes the features and trains; 'later' rounds reuse them from "
            "memory, 'spilled' from memory-mapped files. The speed-up over "
            f"{ROUNDS} rounds is {ROUNDS} uncached rounds against one first and {ROUNDS - 1} later cached rounds. "
            "'Max weight diff' is the largest difference between the heads the uncached and the cached round train "
            "with the same seeded noise (float rounding of batched against per-batch backbone passes).",
            "",
            table,
            "",
            f"Target: a cached DP round at least {TARGET_RATIO:g}x faster than an uncached one: **{verdict}** "
            f"(later rounds). Peak resident memory of the benchmark process: {result['peak_rss_mib']:.0f} MiB.",
        ]
    )


def available() -> str:
    """Why the benchmark cannot run here, or '' (it needs the PneumoniaMNIST file)."""
    from common.data.pneumonia import PneumoniaDataMissing, find_file

    try:
        find_file(None)
    except PneumoniaDataMissing as err:
        return f"{err} (set {DIR_ENV})"
    return ""
