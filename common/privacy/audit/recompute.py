"""Independent recomputation: epsilons with Google's dp-accounting, rounds left with the site's own accountant."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis import rdp as rdp_analysis

from common.privacy.accounting import (
    AccountingError,
    Step,
    compose_epsilon,
    independent_epsilon,
)
from common.privacy.audit.model import MAX_ROUNDS_LEFT, Method


class Accounting:
    """Memoised independent and Opacus epsilons (the same history recurs across sites)."""

    def __init__(self) -> None:
        self._independent: dict[tuple[Any, ...], float] = {}
        self._rounds_left: dict[tuple[Any, ...], tuple[int, bool]] = {}

    @staticmethod
    def _key(history: Sequence[Step]) -> tuple[tuple[float, float, int], ...]:
        totals: dict[tuple[float, float], int] = {}
        for step in history:
            key = (step.noise_multiplier, step.sample_rate)
            totals[key] = totals.get(key, 0) + step.steps
        return tuple(sorted((s, q, n) for (s, q), n in totals.items() if n))

    def independent(self, history: Sequence[Step], delta: float, method: Method) -> float:
        key = (self._key(history), delta, method)
        if key not in self._independent:
            self._independent[key] = independent_epsilon(history, delta, method)
        return self._independent[key]

    @staticmethod
    def fits(history: Sequence[Step], delta: float, accountant: str, cap: float) -> bool:
        try:
            return compose_epsilon(history, delta, accountant) <= cap  # type: ignore[arg-type]
        except AccountingError:
            return False

    def rounds_left(
        self, history: Sequence[Step], step: Step, delta: float, accountant: str, cap: float
    ) -> tuple[int, bool]:
        """Largest n with history + n x step within cap, by the site's own accountant.

        RDP is linear in the steps, so its answer comes from two RDP curves at once; it is
        never more than PRV's (RDP is the looser bound). For a PRV site the search then
        gallops and bisects upward from there with PRV. Returns (n, at_least).
        """
        key = (self._key(history), step, delta, accountant, cap)
        if key not in self._rounds_left:
            rdp_n, at_least = rdp_rounds_left(history, step, delta, cap)
            if accountant == "rdp" or at_least:
                self._rounds_left[key] = (rdp_n, at_least)
            else:
                self._rounds_left[key] = self._search_up(history, step, delta, accountant, cap, rdp_n)
        return self._rounds_left[key]

    def _search_up(
        self, history: Sequence[Step], step: Step, delta: float, accountant: str, cap: float, low: int
    ) -> tuple[int, bool]:
        def fits(n: int) -> bool:
            extra = Step(step.noise_multiplier, step.sample_rate, step.steps * n)
            return self.fits([*history, extra], delta, accountant, cap)

        if not fits(low):
            low, high = 0, low
        else:
            width, high = 1, low + 1
            while fits(high):
                low, width = high, width * 2
                if low >= MAX_ROUNDS_LEFT:
                    return MAX_ROUNDS_LEFT, True
                high = min(low + width, MAX_ROUNDS_LEFT + 1)
        while high - low > 1:
            middle = (low + high) // 2
            if fits(middle):
                low = middle
            else:
                high = middle
        return low, False


def rdp_rounds_left(history: Sequence[Step], step: Step, delta: float, cap: float) -> tuple[int, bool]:
    """Rounds left under Opacus's RDP analysis (the sums RDPAccountant forms), by bisection."""
    orders = RDPAccountant.DEFAULT_ALPHAS
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = sum(
            (
                rdp_analysis.compute_rdp(
                    q=s.sample_rate, noise_multiplier=s.noise_multiplier, steps=s.steps, orders=orders
                )
                for s in history
                if s.steps
            ),
            np.zeros(len(orders)),
        )
        per_round = rdp_analysis.compute_rdp(
            q=step.sample_rate, noise_multiplier=step.noise_multiplier, steps=step.steps, orders=orders
        )

    def fits(n: int) -> bool:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            eps, _ = rdp_analysis.get_privacy_spent(orders=orders, rdp=base + n * per_round, delta=delta)
        return bool(math.isfinite(eps) and eps <= cap)

    if fits(MAX_ROUNDS_LEFT):
        return MAX_ROUNDS_LEFT, True
    low, high = 0, MAX_ROUNDS_LEFT
    if not fits(0):
        return 0, False
    while high - low > 1:
        middle = (low + high) // 2
        if fits(middle):
            low = middle
        else:
            high = middle
    return low, False
