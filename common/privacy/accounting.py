"""Privacy accounting over a DP-SGD history: pure functions, no state.

A *history* is the list of DP phases that touched one dataset, one :class:`Step` per
ledger entry: ``(noise_multiplier, sample_rate, steps)``, the triple Opacus keeps in
``accountant.history`` (a DP release is one Gaussian mechanism: one step at sample rate
1). Epsilon is always obtained by composing the whole history; per-round epsilons are
never added (adding them overstates the spend and hides the real composition).

Three accountants, as a site's policy names them:

- ``"pld"`` (the default): privacy loss distributions with Google's ``dp-accounting``
  (Koskela et al.; Doroshenko et al. 2022), discretised at ``PLD_INTERVAL`` with the
  pessimistic rounding, so the value is an upper bound; tight, and fast enough to account
  a round in tens of milliseconds and to calibrate a run's noise in a fraction of a second.
- ``"prv"``: Opacus's privacy random variables (Gopi et al. 2021); tight too, its upper
  bound includes its own discretisation error (``eps_error`` = 0.01), and ten times slower.
- ``"rdp"``: Opacus's Renyi DP (Mironov 2017); looser.

PRV needs a discretisation grid whose size grows with the epsilon of the history and
with the number of steps. When that grid would be too large to evaluate reliably,
:func:`compose_epsilon` raises :class:`AccountingError` rather than returning a number it
could not compute; the site can then switch its policy to another accountant.

:func:`independent_epsilon` recomputes epsilon with a code base other than the one the
ledger used, for audits and tests: dp-accounting's PLD or RDP for Opacus ledgers, and
Opacus's PRV estimate for ``pld`` ledgers.
"""

from __future__ import annotations

import copy
import functools
import logging
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import dp_accounting
import numpy as np
from dp_accounting.pld import privacy_loss_distribution
from dp_accounting.rdp import RdpAccountant
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.analysis import rdp as rdp_analysis
from opacus.accountants.analysis.prv import (
    PoissonSubsampledGaussianPRV,
    compute_safe_domain_size,
)
from scipy import optimize, special

from common.errors import PrivacyError
from common.privacy import pld
from common.privacy.rdp import subsampled_gaussian_rdp

log = logging.getLogger(__name__)

Accountant = Literal["pld", "prv", "rdp"]
ACCOUNTANTS: tuple[Accountant, ...] = ("pld", "prv", "rdp")
DEFAULT_ACCOUNTANT: Accountant = "pld"
#: dp-accounting's discretisation of the privacy loss for ``pld``: with the pessimistic rounding
#: the epsilon is an upper bound, within 1e-3 of the finest grid's for our histories.
PLD_INTERVAL = 1e-3
#: The coarser grid a PLD calibration searches on before it brackets its answer at ``PLD_INTERVAL``.
PLD_SEARCH_INTERVAL = 1e-2
#: The coarse search stops when its next secant step on log(sigma) is below this (there the
#: secant's landing is far more accurate than the step), after at most this many evaluations.
PLD_SEARCH_STEP = 0.01
PLD_SEARCH_EVALUATIONS = 8
#: The reference column of the ledger shows each history under another, cheap accountant.
REFERENCE: dict[str, Accountant] = {"pld": "rdp", "prv": "rdp", "rdp": "pld"}

#: Absolute epsilon error PRV is asked for (Opacus's default); the reported value
#: is an upper bound that already includes it.
PRV_EPS_ERROR = 0.01
#: Largest PRV discretisation grid we evaluate (points). About 10 s and a few
#: hundred MB on one CPU core; beyond it PRV is refused with AccountingError.
PRV_MAX_GRID_POINTS = 4_000_000
#: During calibration, candidate noise levels whose PRV grid exceeds this are
#: treated as "does not fit". That can only make the chosen sigma larger (more
#: private), never smaller, and keeps calibration fast.
PRV_CALIBRATION_GRID_POINTS = 1_500_000

#: Calibration searches sigma in [max(min_noise, SIGMA_FLOOR), SIGMA_CEILING].
SIGMA_FLOOR = 0.01
SIGMA_CEILING = 1000.0
#: Calibration stops when the bracket [lo, hi] satisfies hi - lo <= SIGMA_REL_TOL * hi;
#: the returned sigma is hi rounded up to SIGMA_DECIMALS decimals, and is always
#: one at which the composed epsilon was computed and found within the target.
SIGMA_REL_TOL = 0.002
#: How much of what the prior leaves of the target a PLD calibration certified without a bracket may leave
#: unspent: what SIGMA_REL_TOL allows at the slope of 2 typical of log epsilon against log sigma.
ROOM_REL_TOL = 0.004
#: Fine evaluations that may certify so: the coarse estimate, then one Newton step from it.
CERTIFY_EVALUATIONS = 2
#: Above this target a search after a prior starts from RDP, not from Gaussian DP (exp(epsilon) stays finite).
GAUSSIAN_GUESS_MAX_EPSILON = 50.0
SIGMA_DECIMALS = 4


class BudgetExhausted(PrivacyError):
    """The privacy budget cannot accommodate the requested training."""


class AccountingError(PrivacyError):
    """An accountant could not compute a trustworthy epsilon for this history."""


@dataclass(frozen=True)
class Step:
    """One DP-SGD phase: ``steps`` optimiser steps at one noise level and sample rate."""

    noise_multiplier: float
    sample_rate: float
    steps: int

    def __post_init__(self) -> None:
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier > 0):
            raise ValueError(f"noise_multiplier must be a positive finite number, got {self.noise_multiplier!r}")
        if not (math.isfinite(self.sample_rate) and 0 < self.sample_rate <= 1):
            raise ValueError(f"sample_rate must be in (0, 1], got {self.sample_rate!r}")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 0:
            raise ValueError(f"steps must be a non-negative integer, got {self.steps!r}")


History = list[Step]


def _check_delta(delta: float) -> None:
    if not (math.isfinite(delta) and 0 < delta < 1):
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")


def _check_accountant(accountant: str) -> None:
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {accountant!r}")


def _merged(history: Sequence[Step]) -> list[tuple[float, float, int]]:
    """Opacus-style history with equal (sigma, q) phases merged.

    Composition is commutative and a phase of n steps is the n-fold self-composition,
    so merging is exact; it matters for PRV, whose cost grows with each distinct phase.
    """
    totals: dict[tuple[float, float], int] = {}
    for step in history:
        if not isinstance(step, Step):
            raise TypeError(f"history entries must be Step, got {type(step).__name__}")
        if step.steps:
            key = (float(step.noise_multiplier), float(step.sample_rate))
            totals[key] = totals.get(key, 0) + step.steps
    return [(sigma, q, n) for (sigma, q), n in totals.items()]


def merged_phases(history: Sequence[Step]) -> tuple[tuple[float, float, int], ...]:
    """The history as composition sees it: equal (sigma, q) phases merged, sorted; what memos and stores key on."""
    return tuple(sorted(_merged(history)))


def _prv_grid_points(phases: list[tuple[float, float, int]], delta: float) -> float:
    """Size of the grid Opacus's PRVAccountant would discretise this history on."""
    delta_error = delta / 1000
    prvs = [PoissonSubsampledGaussianPRV(q, sigma) for sigma, q, _ in phases]
    counts = [n for _, _, n in phases]
    half_width = compute_safe_domain_size(prvs, counts, PRV_EPS_ERROR, delta_error)
    mesh = PRV_EPS_ERROR / math.sqrt(sum(counts) * math.log(12 / delta_error) / 2)
    return 2 * half_width / mesh


def _compose(history: Sequence[Step], delta: float, accountant: Accountant, max_grid_points: float) -> float:
    _check_delta(delta)
    _check_accountant(accountant)
    # Only PRV has a grid limit: other accountants share one memo entry per history.
    limit = max_grid_points if accountant == "prv" else math.inf
    return _compose_phases(merged_phases(history), delta, accountant, limit)


@functools.lru_cache(maxsize=1024)
def _compose_phases(
    phases: tuple[tuple[float, float, int], ...], delta: float, accountant: Accountant, max_grid_points: float
) -> float:
    """Epsilon of merged phases; pure, so a site that checks, records and re-checks one
    history in a round pays for each accountant evaluation once."""
    phases = list(phases)
    if not phases:
        return 0.0
    with warnings.catch_warnings():
        # Opacus warns when the optimal RDP order sits at the edge of its grid (the bound
        # is then looser, never wrong) and numpy warns on overflow in PRV tails.
        warnings.simplefilter("ignore")
        if accountant == "rdp":
            epsilon = _rdp_epsilon(phases, delta)
        elif accountant == "pld":
            epsilon = _pld_epsilon(phases, delta, PLD_INTERVAL)
        else:
            points = _prv_grid_points(phases, delta)
            if points > max_grid_points:
                raise AccountingError(
                    f"the PRV accountant cannot evaluate this history reliably: it would need "
                    f"{points:.3g} grid points (limit {max_grid_points:.3g}) for "
                    f"{sum(n for *_, n in phases)} steps in {len(phases)} phase(s); this happens "
                    'for very large epsilons or very many steps. Use accountant = "rdp".'
                )
            prv = PRVAccountant()
            prv.history = copy.deepcopy(phases)
            try:
                epsilon = float(prv.get_epsilon(delta, eps_error=PRV_EPS_ERROR))
            except (ArithmeticError, ValueError, RuntimeError, MemoryError) as exc:
                raise AccountingError(
                    f'the PRV accountant failed on this history ({exc!r}); use accountant = "rdp".'
                ) from exc
    if not (math.isfinite(epsilon) and epsilon >= 0):
        raise AccountingError(f"the {accountant} accountant returned an invalid epsilon {epsilon!r} for this history")
    return epsilon


def _pld_epsilon(phases: list[tuple[float, float, int]], delta: float, interval: float, library: bool = False) -> float:
    """dp-accounting's PLD epsilon of merged phases, pessimistic (an upper bound).

    The same steps, in the same order, as ``PLDAccountant`` takes for the ComposedDpEvent of
    the phases (identity, then each Poisson-subsampled Gaussian self-composed ``n`` times), the
    distributions built, self-composed and composed by :mod:`common.privacy.pld` (dp-accounting's
    arithmetic with its per-point loops vectorised; ``tests/test_pld.py`` checks every probability against the
    library's own), or with ``library`` by dp-accounting's own functions (for the audit). The
    phase PLDs are memoised, so a round that adds steps to a known (sigma, q) pays for one
    self-composition, not a new distribution.
    """
    composed = privacy_loss_distribution.identity(value_discretization_interval=interval)
    for sigma, q, n in phases:
        phase = _phase_pld(sigma, q, n, interval, library)
        composed = composed.compose(phase) if library else pld.compose(composed, phase)
    return float(composed.get_epsilon_for_delta(delta) if library else pld.epsilon_for_delta(composed, delta))


@functools.lru_cache(maxsize=64)
def _gaussian_pld(
    sigma: float, q: float, interval: float, library: bool
) -> privacy_loss_distribution.PrivacyLossDistribution:
    """One Poisson-subsampled Gaussian step (add-or-remove neighbours, pessimistic), as PLDAccountant builds it."""
    if library:
        return privacy_loss_distribution.from_gaussian_mechanism(
            standard_deviation=sigma,
            value_discretization_interval=interval,
            sampling_prob=q,
            neighboring_relation=dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE,
        )
    return pld.subsampled_gaussian(sigma, q, interval)


@functools.lru_cache(maxsize=128)
def _phase_pld(
    sigma: float, q: float, n: int, interval: float, library: bool
) -> privacy_loss_distribution.PrivacyLossDistribution:
    """``n`` steps of :func:`_gaussian_pld` (PLD objects are immutable: compose returns a new one)."""
    one = _gaussian_pld(sigma, q, interval, library)
    return one.self_compose(n) if library else pld.self_compose(one, n)


@functools.lru_cache(maxsize=16384)
def _rdp_at(q: float, sigma: float, order: float) -> float:
    """Opacus's RDP of one subsampled Gaussian step at one order (memoised), computed by :mod:`common.privacy.rdp`."""
    return subsampled_gaussian_rdp(q, sigma, float(order))


_DEFAULT_ORDERS = tuple(float(a) for a in RDPAccountant.DEFAULT_ALPHAS)
#: Where the RDP epsilon is computed first: spread over the default orders, so that most others are bounded out.
_FIRST_ORDERS = (2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 24.0, 32.0, 48.0, 63.0)
#: An order is left out only if its bound exceeds the best epsilon by this relative margin (rounding, never more).
_RDP_BOUND_MARGIN = 1e-9


def _rdp_epsilon(phases: list[tuple[float, float, int]], delta: float) -> float:
    """Opacus's RDPAccountant epsilon of merged phases, computed where it can be the minimum.

    RDPAccountant sums each phase's RDP (``compute_rdp``: one step's value times the steps) at
    its default orders and converts the sum at every order, keeping the smallest epsilon. Here
    the sums are computed first at a few spread orders (:data:`_FIRST_ORDERS`), then, from the
    lowest order up, only at orders whose epsilon could still be the smallest: RDP never decreases
    with the order (and is at least 0), so the sum at the nearest computed order below bounds an
    order's epsilon from below, and an order whose bound exceeds the best epsilon so far (by more
    than rounding) is left out. Orders left out cannot hold the minimum, so the value is
    RDPAccountant's own, from the same per-order values.
    """

    def rdp(order: float) -> float:
        return sum(_rdp_at(q, sigma, order) * n for sigma, q, n in phases)

    def conversion(order: float) -> float:
        return -(math.log(delta) + math.log(order)) / (order - 1) + math.log((order - 1) / order)

    sums = {order: rdp(order) for order in _FIRST_ORDERS}
    firsts = [value + conversion(order) for order, value in sums.items() if not math.isnan(value)]
    best = min(firsts, default=math.inf)
    below = 0.0
    for order in _DEFAULT_ORDERS:
        if order in sums:
            below = sums[order]
            continue
        if below + conversion(order) > best + _RDP_BOUND_MARGIN * max(1.0, abs(best)):
            continue
        below = sums[order] = rdp(order)
        epsilon = below + conversion(order)
        if epsilon < best:
            best = epsilon
    chosen = sorted(sums)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        eps, _ = rdp_analysis.get_privacy_spent(orders=chosen, rdp=[sums[a] for a in chosen], delta=delta)
    return float(eps)


def forget_memoised() -> None:
    """Drop every memoised composition, calibration, privacy loss distribution and RDP value, as a new process
    starts (a benchmark measuring a first run calls it; a long-lived process may, to bound memory)."""
    for memo in (_compose_phases, _calibrate, _gaussian_pld, _phase_pld, _rdp_at, _binomial_terms):
        memo.cache_clear()


def compose_epsilon(history: Sequence[Step], delta: float, accountant: Accountant) -> float:
    """Epsilon of the whole history at ``delta``, composed afresh by ``accountant``.

    An empty history (or one with only zero-step phases) spends 0.0.
    Raises :class:`AccountingError` if the accountant cannot produce a trustworthy value.
    """
    return _compose(history, delta, accountant, PRV_MAX_GRID_POINTS)


def reference_epsilon(history: Sequence[Step], delta: float, accountant: Accountant) -> tuple[str, float]:
    """The epsilon of ``history`` under the ledger's reference accountant (:data:`REFERENCE`): ``(name, epsilon)``."""
    _check_accountant(accountant)
    other = REFERENCE[accountant]
    return other, compose_epsilon(history, delta, other)


IndependentMethod = Literal["pld", "rdp", "prv"]


def independent_epsilon(history: Sequence[Step], delta: float, method: IndependentMethod = "pld") -> float:
    """Epsilon of ``history`` recomputed for an audit by a code base the ledger did not use.

    ``"pld"``: dp-accounting's privacy loss distributions at its default (finest) grid, for
    Opacus PRV ledgers; ``"rdp"``: dp-accounting's RDP (a finer order grid than Opacus's), for
    RDP ledgers; ``"prv"``: Opacus's PRV central estimate (within its 0.01 error of the
    true value), for ``pld`` ledgers, which dp-accounting wrote.
    """
    _check_delta(delta)
    phases = _merged(history)
    if not phases:
        return 0.0
    if method == "prv":
        prv = PRVAccountant()
        prv.history = copy.deepcopy(phases)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return float(prv.get_epsilon(delta, eps_error=PRV_EPS_ERROR)) - PRV_EPS_ERROR  # its bound, unpadded
    if method == "pld":
        return _pld_epsilon(phases, delta, 1e-4, library=True)
    if method != "rdp":
        raise ValueError(f"method must be 'pld', 'rdp' or 'prv', got {method!r}")
    event = dp_accounting.ComposedDpEvent(
        [
            dp_accounting.SelfComposedDpEvent(
                dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), n
            )
            for sigma, q, n in phases
        ]
    )
    accountant = RdpAccountant()
    accountant.compose(event)
    return float(accountant.get_epsilon(delta))


#: RDP orders for a calibration's starting guess: integers only, whose RDP has a closed form (fast).
GUESS_ORDERS = (*range(2, 64), 80, 96, 128, 192, 256)


def _integer_rdp(q: float, sigma: float, orders: tuple[float, ...]) -> np.ndarray:
    """RDP of one subsampled Gaussian step at integer orders >= 2, in closed form and vectorised.

    For an integer order a (Mironov, Talwar and Zhang 2019, section 3.3):
    RDP(a) = log(sum_k C(a, k) (1 - q)^(a - k) q^k exp((k^2 - k) / (2 sigma^2))) / (a - 1).
    The same values as Opacus's ``compute_rdp`` at these orders, in a fraction of the time;
    used only for a calibration's starting guess.
    """
    alphas = np.asarray(orders, dtype=float)
    if q >= 1.0:
        return alphas / (2 * sigma**2)
    binomial, growth = _binomial_terms(q, tuple(orders))
    terms = binomial + growth / (2 * sigma**2)
    largest = np.max(terms, axis=1, keepdims=True)
    return (np.log(np.sum(np.exp(terms - largest), axis=1)) + largest[:, 0]) / (alphas - 1)


@functools.lru_cache(maxsize=64)
def _binomial_terms(q: float, orders: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray]:
    """What :func:`_integer_rdp` sums, less its sigma: log(C(a, k) (1 - q)^(a - k) q^k) for each order a (a
    row) and k (a column; -inf where k > a), and k^2 - k."""
    alphas = np.asarray(orders, dtype=float)
    k = np.arange(int(alphas.max()) + 1, dtype=float)
    a = alphas[:, None]
    binomial = (
        special.gammaln(a + 1)
        - special.gammaln(k + 1)
        - special.gammaln(np.maximum(a - k, 0) + 1)
        + np.maximum(a - k, 0) * math.log1p(-q)
        + k * math.log(q)
    )
    return np.where(k <= a, binomial, -np.inf), k * k - k


def _rdp_solver(
    prior: list[Step], sample_rate: float, planned_steps: int, delta: float, exact: bool
) -> Callable[[float], float]:
    """Epsilon of prior + planned phase as a function of sigma, by Opacus's RDP analysis.

    ``exact``: RDPAccountant's value (the ``rdp`` accountant); otherwise at the integer
    :data:`GUESS_ORDERS`, in closed form (a calibration's starting guess).
    """
    if exact:

        def exact_epsilon(sigma: float) -> float:
            phases = sorted(_merged([*prior, Step(sigma, sample_rate, planned_steps)]))
            eps = _rdp_epsilon(phases, delta)
            return eps if math.isfinite(eps) else math.inf

        return exact_epsilon
    prior_rdp = sum((_integer_rdp(q, s, GUESS_ORDERS) * n for s, q, n in _merged(prior)), np.zeros(len(GUESS_ORDERS)))

    def epsilon(sigma: float) -> float:
        rdp = prior_rdp + _integer_rdp(sample_rate, sigma, GUESS_ORDERS) * planned_steps
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            eps, _ = rdp_analysis.get_privacy_spent(orders=list(GUESS_ORDERS), rdp=rdp, delta=delta)
        return float(eps) if math.isfinite(eps) else math.inf

    return epsilon


def _grid_up(sigma: float) -> float:
    """Round sigma up to the calibration grid of SIGMA_DECIMALS decimals."""
    scale = 10**SIGMA_DECIMALS
    return math.ceil(round(sigma * scale, 6)) / scale


def _solve(
    epsilon_of: Callable[[float], float],
    target: float,
    lo: float,
    hi: float,
    guess: float,
    slope: float,
    rel_tol: float = SIGMA_REL_TOL,
) -> tuple[float, float]:
    """Smallest fitting sigma in (lo, hi] on the SIGMA_DECIMALS grid, to ``rel_tol``.

    Requires ``epsilon_of(hi) <= target < epsilon_of(lo)``. Works on
    f(x) = log(epsilon(e^x) / target), smooth, decreasing and nearly linear in x:
    Newton steps from ``guess`` with the assumed ``slope``, each aimed slightly past
    the predicted root (or, when the root is predicted within tolerance of the sigma just
    evaluated, at the far edge of the tolerance, so one more evaluation can close the
    bracket), until the root is bracketed; then Illinois regula falsi, with a
    probe just inside the bracket once the predicted root is within tolerance of one
    end, and bisection while an end is infinite. Every evaluated sigma is on the grid,
    so the returned end is a value whose epsilon was computed. Returns it and the
    last secant slope (to start a search with another accountant).
    """
    grid = 10.0**-SIGMA_DECIMALS
    f_lo, f_hi = math.inf, -math.inf
    last_side = ""
    measured = slope

    def evaluate(sigma: float) -> None:
        nonlocal lo, hi, f_lo, f_hi, last_side, measured
        eps = epsilon_of(sigma)
        f = math.log(eps / target) if eps > 0 else -math.inf
        for end_sigma, end_f in ((lo, f_lo), (hi, f_hi)):
            if math.isfinite(f) and math.isfinite(end_f) and end_f != f:
                measured = (end_f - f) / (math.log(end_sigma) - math.log(sigma))
        if f <= 0:
            hi, f_hi = sigma, f
            if last_side == "hi" and math.isfinite(f_lo):
                f_lo /= 2
            last_side = "hi"
        else:
            lo, f_lo = sigma, f
            if last_side == "lo":
                f_hi /= 2
            last_side = "lo"

    def closed() -> bool:
        return hi - lo <= max(rel_tol * hi, 1.5 * grid)

    def inside(sigma: float) -> float:
        sigma = _grid_up(sigma)
        return sigma if lo < sigma < hi else _grid_up(math.sqrt(lo * hi))

    sigma = _grid_up(guess)
    for _ in range(4):
        if closed() or not lo < sigma < hi:
            break
        evaluate(sigma)
        f_now = f_hi if last_side == "hi" else f_lo
        if not math.isfinite(f_now) or (math.isfinite(f_lo) and math.isfinite(f_hi)):
            break
        root = sigma * math.exp(-f_now / measured)
        # A root predicted from close by is trusted more: the step past it shrinks to a quarter.
        past = rel_tol / 4 if abs(f_now) <= 10 * rel_tol else rel_tol
        if last_side == "hi":
            edge = hi * (1 - 0.9 * rel_tol)
            sigma = _grid_up(edge if root >= hi * (1 - rel_tol) else root * (1 - past))
        else:
            edge = lo * (1 + 0.9 * rel_tol)
            sigma = _grid_up(edge if root <= lo * (1 + rel_tol) else root * (1 + past))
    while not closed():
        if not (math.isfinite(f_lo) and math.isfinite(f_hi)) or f_lo == f_hi:
            evaluate(inside(math.sqrt(lo * hi)))
            continue
        a, b = math.log(lo), math.log(hi)
        root = math.exp(b - f_hi * (b - a) / (f_hi - f_lo))
        if hi - root <= rel_tol * hi:
            candidate = hi * (1 - 0.9 * rel_tol)
        elif root - lo <= rel_tol * hi:
            candidate = lo * (1 + 0.9 * rel_tol)
        else:
            candidate = root
        evaluate(inside(candidate))
    return hi, measured


def _guess(
    phases: tuple[tuple[float, float, int], ...],
    sample_rate: float,
    planned_steps: int,
    target_epsilon: float,
    room: float,
    delta: float,
    accountant: Accountant,
    lo: float,
    start: float,
) -> tuple[float, float]:
    """Where a PLD or PRV calibration starts: a sigma at or a little above the answer, and the local slope.

    PRV starts from the PLD calibration (both are tight, PRV pads its bound by its error); PLD after a
    prior from :func:`_gaussian_dp_guess`; PLD without one from RDP at integer orders (looser, so its
    sigma is larger). PLD then refines it on a coarse grid (:func:`_coarse_pld_guess`).
    """
    if accountant == "prv":
        try:
            return _calibrate(phases, sample_rate, planned_steps, target_epsilon, delta, "pld", lo), -1.5
        except BudgetExhausted:
            pass
    if phases:
        gaussian = _gaussian_dp_guess(target_epsilon - room, target_epsilon, delta, sample_rate, planned_steps)
        if gaussian is not None:
            return min(max(gaussian, lo), SIGMA_CEILING), -2.0
    rdp_epsilon = _rdp_solver([], sample_rate, planned_steps, delta, exact=False)
    if rdp_epsilon(SIGMA_CEILING) > room:
        return SIGMA_CEILING / 2, -1.5
    rdp_lo = lo if rdp_epsilon(lo) > room else SIGMA_FLOOR / 2
    return _solve(rdp_epsilon, room, rdp_lo, SIGMA_CEILING, start, -1.5)


def _gaussian_dp_guess(spent: float, target: float, delta: float, sample_rate: float, steps: int) -> float | None:
    """The planned phase's sigma were every mechanism Gaussian DP (Dong, Roth and Su 2019), or None.

    The prior's mu and the target's from their epsilons at ``delta``; the phase gets
    sqrt(mu_target^2 - mu_prior^2), the mu of the two composed; its sigma is sqrt(steps) / mu at
    sample rate 1, otherwise from the central limit approximation of Poisson-subsampled DP-SGD,
    mu = q sqrt(steps (exp(1 / sigma^2) - 1)). Within a few percent for a release after a run's
    rounds (a single Gaussian step composed with many), where RDP for the release alone is off
    several-fold; only where a search starts.
    """
    if not 0 < spent < target <= GAUSSIAN_GUESS_MAX_EPSILON:
        return None
    try:
        mu = math.sqrt(_gaussian_mu(target, delta) ** 2 - _gaussian_mu(spent, delta) ** 2)
    except ValueError:
        return None
    if sample_rate >= 1:
        return math.sqrt(steps) / mu
    return 1 / math.sqrt(math.log1p((mu / sample_rate) ** 2 / steps))


def _gaussian_mu(epsilon: float, delta: float) -> float:
    """The mu of the Gaussian mechanism that is exactly (epsilon, delta)-DP."""

    def excess(mu: float) -> float:
        return float(special.ndtr(-epsilon / mu + mu / 2) - math.exp(epsilon) * special.ndtr(-epsilon / mu - mu / 2))

    return optimize.brentq(lambda mu: excess(mu) - delta, 1e-6, 100.0, xtol=1e-10)


def _coarse_pld_guess(
    phases: tuple[tuple[float, float, int], ...],
    sample_rate: float,
    planned_steps: int,
    room: float,
    delta: float,
    lo: float,
    guess: float,
    slope: float,
) -> tuple[float, float]:
    """Where the planned phase's share of the composed epsilon on the :data:`PLD_SEARCH_INTERVAL` grid fills
    ``room`` (what the prior leaves of the target at :data:`PLD_INTERVAL`), and the local slope.

    The share (composed epsilon less the prior's, both on the coarse grid) costs a fraction of a
    fine evaluation and lands within a few hundredths of a percent of the fine one; the fine search
    that follows then typically needs two evaluations: one that fits and one just below that does
    not. Only where the search starts depends on it: every sigma a calibration returns was
    evaluated at :data:`PLD_INTERVAL`.
    """
    spent = _pld_epsilon(list(phases), delta, PLD_SEARCH_INTERVAL) if phases else 0.0
    prior = [Step(sigma, q, n) for sigma, q, n in phases]

    def excess(sigma: float) -> float:
        merged = sorted(_merged([*prior, Step(sigma, sample_rate, planned_steps)]))
        return max(_pld_epsilon(merged, delta, PLD_SEARCH_INTERVAL) - spent, 0.0)

    crossing, slope = _crossing(excess, room, lo, guess, slope)
    # A little above the estimate, so the first fine evaluation fits and the second, just below, closes.
    return crossing * (1 + SIGMA_REL_TOL / 4), slope


def _crossing(
    epsilon_of: Callable[[float], float], target: float, lo: float, guess: float, slope: float
) -> tuple[float, float]:
    """Where ``epsilon_of`` crosses ``target``, estimated by secant steps on log(sigma), and the last slope.

    Works on f(x) = log(epsilon(e^x) / target), smooth and nearly linear in x. From ``guess``
    (Newton with ``slope``), then secants through the last two evaluations, clamped to
    [``lo``, :data:`SIGMA_CEILING`] and halved back toward the last evaluation where f is not
    finite. Stops when the next step is below :data:`PLD_SEARCH_STEP` and returns where that step
    lands, rounded up to the grid, without evaluating it: only an estimate, for a search that
    certifies its answer itself. At most :data:`PLD_SEARCH_EVALUATIONS` evaluations.
    """
    lo_x, hi_x = math.log(lo), math.log(SIGMA_CEILING)
    x = math.log(min(max(guess, lo), SIGMA_CEILING))
    f = _log_ratio(epsilon_of(math.exp(x)), target)
    if not math.isfinite(f):
        return math.exp(x), slope
    for _ in range(PLD_SEARCH_EVALUATIONS - 1):
        step = -f / slope
        landing = min(max(x + step, lo_x), hi_x)
        if abs(landing - x) <= PLD_SEARCH_STEP:
            return min(_grid_up(math.exp(landing)), SIGMA_CEILING), slope
        f_new = _log_ratio(epsilon_of(math.exp(landing)), target)
        while not math.isfinite(f_new) and abs(landing - x) > PLD_SEARCH_STEP:
            landing = (landing + x) / 2
            f_new = _log_ratio(epsilon_of(math.exp(landing)), target)
        if not math.isfinite(f_new) or f_new == f:
            break
        slope = (f_new - f) / (landing - x)
        if slope >= 0:  # not the decreasing curve this assumes: let the caller search from here
            return math.exp(landing), -1.5
        x, f = landing, f_new
    return min(_grid_up(math.exp(x)), SIGMA_CEILING), slope


def _certify(excess: Callable[[float], float], room: float, lo: float, guess: float, slope: float) -> float | None:
    """A sigma that fits and spends at least ``1 - ROOM_REL_TOL`` of ``room``, shown at the fine grid: the coarse
    estimate ``guess``, or else one Newton step from it (with the coarse search's ``slope`` of log epsilon in
    log sigma) aimed at ``1 - ROOM_REL_TOL / 2`` of the room; None if neither is."""
    candidate = _grid_up(guess)
    for _ in range(CERTIFY_EVALUATIONS):
        if not lo < candidate <= SIGMA_CEILING:
            return None
        spent = excess(candidate)
        if room * (1 - ROOM_REL_TOL) <= spent <= room:
            return candidate
        if not (0 < spent < math.inf and slope < 0):
            return None
        candidate = _grid_up(candidate * math.exp(math.log(room * (1 - ROOM_REL_TOL / 2) / spent) / slope))
    return None


def _log_ratio(value: float, target: float) -> float:
    return math.log(value / target) if value > 0 else -math.inf


def calibrate_noise(
    prior: Sequence[Step],
    sample_rate: float,
    planned_steps: int,
    target_epsilon: float,
    delta: float,
    accountant: Accountant,
    min_noise: float = 0.0,
) -> float:
    """Smallest noise multiplier that keeps ``prior`` plus the planned phase within target.

    Returns sigma >= ``min_noise`` with ``compose_epsilon(prior + [Step(sigma,
    sample_rate, planned_steps)]) <= target_epsilon``; the epsilon is computed at the
    returned value itself. Sigma lies on a grid of ``SIGMA_DECIMALS`` decimals
    (candidates are rounded up) and is close to the smallest fitting value in one of two
    ways, each shown at the accountant's own grid: the search stopped within a relative
    ``SIGMA_REL_TOL`` (0.2 %) of a sigma known not to fit; or (PLD) the coarse search's
    estimate, or one Newton step from it, fits and spends at least ``1 - ROOM_REL_TOL`` (99.6 %)
    of what the prior leaves of the target, which its evaluation shows. For PLD and PRV the search
    starts from a cheap RDP calibration at integer orders; PLD then searches on a coarse grid
    (:data:`PLD_SEARCH_INTERVAL`), tries the floor ``min_noise`` at :data:`PLD_INTERVAL` only
    where that search puts the answer within ``SIGMA_REL_TOL`` of it, and brackets the answer at
    :data:`PLD_INTERVAL` only if the certification fails. Typical cost: a few RDP, two to eight
    coarse PLD and one or two PLD (three to five PRV) evaluations. Results are memoised: sites that share (prior, q,
    steps, target) calibrate once per process.

    Raises :class:`BudgetExhausted` if the prior history alone already reaches the
    target, or if even sigma = ``SIGMA_CEILING`` does not fit.
    """
    _check_accountant(accountant)
    _check_delta(delta)
    if not (math.isfinite(target_epsilon) and target_epsilon > 0):
        raise ValueError(f"target_epsilon must be a positive finite number, got {target_epsilon!r}")
    if isinstance(planned_steps, bool) or not isinstance(planned_steps, int) or planned_steps < 1:
        raise ValueError(f"planned_steps must be a positive integer, got {planned_steps!r}")
    if not (math.isfinite(min_noise) and 0 <= min_noise <= SIGMA_CEILING):
        raise ValueError(f"min_noise must be in [0, {SIGMA_CEILING}], got {min_noise!r}")
    if not (math.isfinite(sample_rate) and 0 < sample_rate <= 1):
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate!r}")
    prior_phases = merged_phases(prior)
    return _calibrate(
        prior_phases, float(sample_rate), planned_steps, float(target_epsilon), delta, accountant, float(min_noise)
    )


@functools.lru_cache(maxsize=256)
def _calibrate(
    phases: tuple[tuple[float, float, int], ...],
    sample_rate: float,
    planned_steps: int,
    target_epsilon: float,
    delta: float,
    accountant: Accountant,
    min_noise: float,
) -> float:
    prior = [Step(sigma, q, n) for sigma, q, n in phases]
    spent = compose_epsilon(prior, delta, accountant)
    if spent >= target_epsilon:
        raise BudgetExhausted(
            f"privacy budget exhausted: epsilon already spent is {spent:.4f} "
            f"({accountant}, delta={delta:g}), at or above the cap of {target_epsilon:.4f}"
        )
    exhausted = BudgetExhausted(
        f"privacy budget exhausted: epsilon already spent is {spent:.4f} "
        f"({accountant}, delta={delta:g}) of a cap of {target_epsilon:.4f}; even noise "
        f"multiplier {SIGMA_CEILING:g} for {planned_steps} steps at sample rate "
        f"{sample_rate:g} would exceed it"
    )
    computed: dict[float, float] = {}

    def numeric_epsilon(sigma: float) -> float:
        """PLD or PRV epsilon of prior + the planned phase at ``sigma`` (inf where PRV cannot evaluate it)."""
        if sigma not in computed:
            history = [*prior, Step(sigma, sample_rate, planned_steps)]
            try:
                computed[sigma] = _compose(history, delta, accountant, PRV_CALIBRATION_GRID_POINTS)
            except AccountingError:
                computed[sigma] = math.inf
        return computed[sigma]

    lo = max(min_noise, SIGMA_FLOOR)
    start = min(max(1.0, lo * 1.5), SIGMA_CEILING / 2)
    if accountant == "rdp":
        rdp_epsilon = _rdp_solver(prior, sample_rate, planned_steps, delta, exact=True)
        if rdp_epsilon(lo) <= target_epsilon:
            return float(lo)
        if rdp_epsilon(SIGMA_CEILING) > target_epsilon:
            raise exhausted
        sigma, _ = _solve(rdp_epsilon, target_epsilon, lo, SIGMA_CEILING, start, -1.5)
        verified = compose_epsilon([*prior, Step(sigma, sample_rate, planned_steps)], delta, "rdp")
    else:
        # The search runs on the planned phase's share of the composed epsilon (its excess over the
        # prior's), which behaves like a power of sigma whatever the prior spent; the predicate is
        # exactly "composed epsilon <= target".
        room = target_epsilon - spent

        def excess(sigma: float) -> float:
            epsilon = numeric_epsilon(sigma)
            if epsilon > target_epsilon:
                return max(epsilon - spent, math.nextafter(room, math.inf))
            return min(max(epsilon - spent, 0.0), room)

        guess, slope = _guess(phases, sample_rate, planned_steps, target_epsilon, room, delta, accountant, lo, start)
        plausible_floor = 2 * lo
        if accountant == "pld":
            guess, slope = _coarse_pld_guess(phases, sample_rate, planned_steps, room, delta, lo, guess, slope)
            plausible_floor = lo * (1 + SIGMA_REL_TOL)
        # The floor is only tried numerically when the guess (for PLD, the coarse search's estimate) says
        # it is plausible; skipping it can only end the search a little above the floor, never below a
        # fitting sigma.
        if guess <= plausible_floor and excess(lo) <= room:
            return float(lo)
        # PLD: one or two fine evaluations certify a sigma that fits and leaves at most ROOM_REL_TOL of
        # the room unspent; otherwise the fine search brackets the answer.
        certified = _certify(excess, room, lo, guess, slope) if accountant == "pld" else None
        sigma = certified if certified is not None else _solve(excess, room, lo, SIGMA_CEILING, guess, slope)[0]
        verified = numeric_epsilon(sigma)
    if verified > target_epsilon:
        raise exhausted
    log.debug(
        "calibrated sigma=%.6g for %d steps at q=%g to epsilon<=%g (%s, prior spend %.4f)",
        sigma,
        planned_steps,
        sample_rate,
        target_epsilon,
        accountant,
        spent,
    )
    return float(sigma)
