"""Empirical privacy audit in one training run (Steinke, Nasr, Jagielski 2023).

The accounting audit checks the arithmetic; this one checks that the site's real DP-SGD
code path (:func:`client.dp_training.dp_train`: Opacus clipping, noise, Poisson
sampling) delivers the privacy the accountant claims. It trains a small *twin* of a
site's model once, with m canaries each included independently with probability 1/2,
then tries to tell from the final weights which canaries were in. If the guesses are
too good for an (epsilon, delta)-DP algorithm, the run leaks more than accounted.

The twin (built so the test has power with final weights only):

- a logistic regression (``nn.Linear(d, 2)``, no bias) on tabular-like Gaussian features
  with a linear label rule, plus one extra feature column per canary that is zero for
  every real record;
- canary i is a record that is ``CANARY_SCALE`` in column i and zero elsewhere, with label
  1: its clipped gradient lies entirely in column i of the weights, where no real record
  contributes, so that column's change is the canary's summed updates plus the noise;
- score of canary i: the change of the class-1 minus class-0 weight in column i (the
  logit margin the canary pushes up); the auditor guesses the k highest scores "in" and
  the k lowest "out";
- full-batch Poisson sampling (q = 1), so each step is a Gaussian mechanism on the canary
  and the final weights reveal their sum: the setting where one run resolves epsilon best.

The bound (their Theorem and Appendix D): if the algorithm is (epsilon, delta)-DP, the
number W of correct guesses among r satisfies
``P[W >= v] <= P[Binomial(r, e^eps / (1 + e^eps)) >= v] + 2 m delta alpha``, with
``alpha = max_i P[v - i <= Binomial < v] / i``. The lower bound is the largest epsilon
this p-value rejects at the chosen confidence. A few k are tried, with a Bonferroni
correction, so choosing the best k does not inflate the confidence.

A positive control trains the same twin with the noise switched off while claiming the
same accounted epsilon (what a run whose noise silently failed would record). It must be
flagged, or the audit has no power and proves nothing.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
import torch
from scipy.stats import binom
from torch import nn

from client.dp_training import dp_train
from common.errors import PrivacyError
from common.model.training import TrainConfig
from common.privacy.accounting import DEFAULT_ACCOUNTANT, Accountant, Step, calibrate_noise, compose_epsilon
from common.privacy.noise import SeededRandom

log = logging.getLogger(__name__)

#: Value of a canary's one non-zero feature: large enough that its gradient is always clipped.
CANARY_SCALE = 10.0
#: Fractions of m tried as the number of "in" (and of "out") guesses; Bonferroni-corrected.
GUESS_FRACTIONS = (0.025, 0.05, 0.1, 0.2, 0.3, 0.4)


class CanaryAuditError(PrivacyError):
    """The empirical audit cannot be run with these settings."""


@dataclass(frozen=True)
class CanaryConfig:
    """Settings of the one-run audit; the defaults run in a few seconds on 2 cores."""

    canaries: int = 1000
    real_records: int = 300
    real_features: int = 10
    steps: int = 50
    target_epsilon: float = 2.0
    delta: float = 1e-5
    max_grad_norm: float = 1.0
    lr: float = 0.1
    accountant: Accountant = DEFAULT_ACCOUNTANT
    confidence: float = 0.95
    seed: int = 0

    def __post_init__(self) -> None:
        if self.canaries < 40:
            raise CanaryAuditError(f"need at least 40 canaries for the guess grid, got {self.canaries}")
        if not 0 < self.confidence < 1:
            raise CanaryAuditError(f"confidence must be in (0, 1), got {self.confidence}")
        if self.steps < 1 or self.real_records < 1 or self.real_features < 1:
            raise CanaryAuditError("steps, real_records and real_features must be positive")
        if not (0 < self.delta < 1 and self.target_epsilon > 0 and self.max_grad_norm > 0):
            raise CanaryAuditError("delta must be in (0, 1); target_epsilon and max_grad_norm positive")


@dataclass(frozen=True)
class CanaryRun:
    """One audited training run: what was accounted, what the canaries showed."""

    label: str
    canaries: int
    included: int
    noise_multiplier: float
    steps: int
    sample_rate: float
    delta: float
    accounted_epsilon: float
    lower_bound: float
    guesses: int
    correct: int
    confidence: float
    seconds: float
    verdict: Literal["consistent", "VIOLATION"]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class EmpiricalAudit:
    """The honest run and the noise-off control; passes if the first is consistent and the second flagged."""

    honest: CanaryRun
    control: CanaryRun

    @property
    def passed(self) -> bool:
        return self.honest.verdict == "consistent" and self.control.verdict == "VIOLATION"

    def explanation(self) -> str:
        if self.honest.verdict == "VIOLATION":
            return (
                f"the DP training path leaks more than accounted: epsilon >= {self.honest.lower_bound:.2f} "
                f"at {self.honest.confidence:.0%} confidence, but the accountant claims "
                f"{self.honest.accounted_epsilon:.2f}. Do not train until this is explained."
            )
        if self.control.verdict != "VIOLATION":
            return (
                "the noise-off control was not flagged, so this audit had no power and proves "
                "nothing; increase the canaries or the steps"
            )
        return (
            f"consistent: epsilon lower bound {self.honest.lower_bound:.2f} <= accounted "
            f"{self.honest.accounted_epsilon:.2f}; the noise-off control was caught "
            f"(lower bound {self.control.lower_bound:.2f})"
        )


def p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """Probability of v or more correct guesses out of r under (epsilon, delta)-DP with m canaries."""
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= v <= r <= m, got v={v}, r={r}, m={m}")
    if v == 0:
        return 1.0
    q = 1.0 / (1.0 + math.exp(-epsilon))
    tail = float(binom.sf(v - 1, r, q))
    below = binom.pmf(np.arange(v - 1, -1, -1), r, q)
    alpha = float(np.max(np.cumsum(below) / np.arange(1, v + 1)))
    return min(1.0, tail + 2 * m * delta * alpha)


def epsilon_lower_bound(m: int, r: int, v: int, delta: float, significance: float) -> float:
    """Largest epsilon at which v correct guesses of r have p-value below ``significance`` (0 if none)."""
    if p_value(m, r, v, 0.0, delta) >= significance:
        return 0.0
    low, high = 0.0, 1.0
    while p_value(m, r, v, high, delta) < significance:
        low, high = high, 2 * high
        if high > 100:
            return low
    while high - low > 1e-4:
        middle = (low + high) / 2
        if p_value(m, r, v, middle, delta) < significance:
            low = middle
        else:
            high = middle
    return low


@dataclass(frozen=True)
class _Twin:
    features: torch.Tensor
    labels: torch.Tensor
    included: np.ndarray
    offset: int


def _build_twin(config: CanaryConfig) -> _Twin:
    generator = torch.Generator().manual_seed(config.seed)
    m, d = config.canaries, config.real_features
    real = torch.randn(config.real_records, d, generator=generator)
    rule = torch.randn(d, generator=generator)
    real_labels = (real @ rule > 0).long()
    included = (torch.rand(m, generator=generator) < 0.5).numpy()
    chosen = np.flatnonzero(included)
    canaries = torch.zeros(len(chosen), d + m)
    canaries[torch.arange(len(chosen)), torch.as_tensor(d + chosen)] = CANARY_SCALE
    features = torch.cat([torch.cat([real, torch.zeros(config.real_records, m)], dim=1), canaries])
    labels = torch.cat([real_labels, torch.ones(len(chosen), dtype=torch.long)])
    return _Twin(features, labels, included, d)


def _guess(scores: np.ndarray, included: np.ndarray, config: CanaryConfig) -> tuple[float, int, int]:
    """Best Bonferroni-corrected lower bound over the guess grid: (bound, guesses, correct)."""
    m = config.canaries
    order = np.argsort(-scores, kind="stable")
    significance = (1 - config.confidence) / len(GUESS_FRACTIONS)
    best = (0.0, 0, 0)
    for fraction in GUESS_FRACTIONS:
        k = max(1, int(fraction * m))
        correct = int(included[order[:k]].sum() + (~included[order[-k:]]).sum())
        bound = epsilon_lower_bound(m, 2 * k, correct, config.delta, significance)
        if bound > best[0] or best[1] == 0:
            best = (bound, 2 * k, correct)
    return best


def _audit_once(config: CanaryConfig, label: str, noise_multiplier: float, accounted: float | None) -> CanaryRun:
    twin = _build_twin(config)
    width = config.real_features + config.canaries
    model = nn.Linear(width, 2, bias=False)
    with torch.no_grad():
        model.weight.zero_()
    start = model.weight.detach().clone()
    train = TrainConfig(epochs=config.steps, batch_size=len(twin.labels), lr=config.lr, seed=config.seed)
    began = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a small model: extra threads only contend (20x slower on a busy 2-core machine)
    try:
        stats = dp_train(  # the twin is synthetic: seeded randomness makes the audit repeatable
            model,
            twin.features,
            twin.labels,
            train,
            noise_multiplier=noise_multiplier,
            max_grad_norm=config.max_grad_norm,
            sample_rate=1.0,
            steps=config.steps,
            expected_batch_size=float(len(twin.labels)),
            source=SeededRandom(config.seed),
        )
    finally:
        torch.set_num_threads(threads)
    change = (model.weight.detach() - start)[:, twin.offset :]
    scores = (change[1] - change[0]).numpy()
    bound, guesses, correct = _guess(scores, twin.included, config)
    if accounted is None:
        accounted = compose_epsilon(
            [Step(noise_multiplier, stats.sample_rate, stats.steps)], config.delta, config.accountant
        )
    verdict: Literal["consistent", "VIOLATION"] = "VIOLATION" if bound > accounted else "consistent"
    run = CanaryRun(
        label=label,
        canaries=config.canaries,
        included=int(twin.included.sum()),
        noise_multiplier=noise_multiplier,
        steps=stats.steps,
        sample_rate=stats.sample_rate,
        delta=config.delta,
        accounted_epsilon=accounted,
        lower_bound=bound,
        guesses=guesses,
        correct=correct,
        confidence=config.confidence,
        seconds=time.perf_counter() - began,
        verdict=verdict,
    )
    log.info(
        "canary audit (%s): noise %.4f, accounted epsilon %.3f, lower bound %.3f from %d/%d correct guesses: %s",
        label,
        noise_multiplier,
        accounted,
        bound,
        correct,
        guesses,
        verdict,
    )
    return run


def run_canary_audit(config: CanaryConfig | None = None) -> EmpiricalAudit:
    """Calibrate the twin's noise to ``target_epsilon``, audit one honest run and the noise-off control."""
    config = config or CanaryConfig()
    sigma = calibrate_noise(
        prior=[],
        sample_rate=1.0,
        planned_steps=config.steps,
        target_epsilon=config.target_epsilon,
        delta=config.delta,
        accountant=config.accountant,
    )
    honest = _audit_once(config, "honest", sigma, None)
    control = _audit_once(config, "noise-off control", 0.0, honest.accounted_epsilon)
    return EmpiricalAudit(honest, control)
