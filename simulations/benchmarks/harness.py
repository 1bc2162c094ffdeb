"""What the federated benchmarks share: in-process runs, site policies, scores, ledgers, timers and plots.

``flamby``, ``transfer-privacy``, ``dropouts``, ``speed`` and ``scale`` drive the real
ServerApp logic (``server.federation.run_federation``) and the real ClientApp
(``client.app.app``); this module holds the pieces they have in common so each benchmark
module is one idea.

Sites never release exact metrics on their data (only DP-noisy evaluation histograms), so
a benchmark that measures utility scores the models itself, as the simulator that holds
every site's test split: :func:`site_scores` and :func:`final_model_scores`.
"""

from __future__ import annotations

import inspect
import logging
import math
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from client.app import app as client_app  # noqa: E402
from common.data.scenarios import Scenario  # noqa: E402
from common.data.site_config import simulated_site_dir, site_dir  # noqa: E402
from common.data.site_data import SiteData  # noqa: E402
from common.model.checkpoint import load_checkpoint  # noqa: E402
from common.model.metrics import classification_metrics  # noqa: E402
from common.model.training import as_tensors, predict_proba  # noqa: E402
from common.model.zoo import FedModel  # noqa: E402
from common.privacy.ledger import Ledger  # noqa: E402
from common.privacy.policy import write_policy  # noqa: E402
from common.run_record import RunRecord  # noqa: E402
from common.settings import RunSettings  # noqa: E402
from simulations.inprocess import DirectGrid, run_on_grid  # noqa: E402
from simulations.sites import simulated_policy  # noqa: E402

logger = logging.getLogger(__name__)

POLICY_FILE = "privacy-policy.toml"
SERVER_LOGGER = "server.federation"


def prewrite_policies(sim_root: Path, scenario: Scenario, allow_non_private: bool, **changes: Any) -> None:
    """Give each simulated site of ``scenario`` its simulated policy with ``changes`` before its first run.

    The simulated policy (``simulations.sites.simulated_policy``) carries the site's declared
    size; a site keeps a policy it already has, so ``materialize_sites`` leaves these alone.
    """
    for site in scenario.sites:
        state = site_dir(sim_root, site.name) / "state"
        state.mkdir(parents=True, exist_ok=True)
        write_policy(replace(simulated_policy(site, scenario, allow_non_private), **changes), state / POLICY_FILE)


def run_inprocess(settings: RunSettings, num_sites: int, run_id: int = 4242) -> RunRecord:
    """One federated run through the real apps over ``DirectGrid`` (no Flower engine)."""
    grid = DirectGrid(client_app, num_nodes=num_sites, run_id=run_id)
    return run_on_grid(grid, settings)


def site_scores(model: FedModel, sites: Sequence[SiteData], metric: str = "accuracy") -> dict[str, float]:
    """``{site: metric}`` of ``model`` on each site's test split, computed exactly by the simulator."""
    scores = {}
    for site in sites:
        x, _ = as_tensors(site.test.x, site.test.y)
        scores[site.name] = classification_metrics(site.test.y, predict_proba(model, x))[metric]
    return scores


def final_model_scores(record: RunRecord, sites: Sequence[SiteData], metric: str = "accuracy") -> dict[str, float]:
    """``{site: metric}`` of a run's final global model on each site's test split (the simulator's evaluation)."""
    model, _ = load_checkpoint(Path(record.final_checkpoint))
    return site_scores(model, sites, metric)


def released_personalised(record: RunRecord, metric: str = "accuracy") -> dict[str, float]:
    """``{site: metric}`` of the personalised copies, as the sites released them (the last round that has any).

    Derived by the coordinator from each site's released evaluation histogram: DP-noisy in a
    private run, exact in a run without DP.
    """
    for current in reversed(record.rounds):
        values = {site: r.personalised[metric] for site, r in current.sites.items() if metric in r.personalised}
        if values:
            return values
    return {}


def ledger_epsilons(sim_root: Path, num_sites: int) -> list[float]:
    """The largest recorded epsilon in each site's ledger (its dataset's total spend), NaN if it spent none."""
    spent = []
    for index in range(num_sites):
        entries = Ledger(simulated_site_dir(sim_root, index) / "state").entries()
        spent.append(max((e.epsilon for e in entries), default=math.nan))
    return spent


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value) of the finite values."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return math.nan, math.nan
    return statistics.fmean(finite), statistics.stdev(finite) if len(finite) > 1 else 0.0


def fmt(value: float, digits: int = 3) -> str:
    return "n/a" if not math.isfinite(value) else f"{value:.{digits}f}"


# --- timing -----------------------------------------------------------------------------


@dataclass
class Stopwatch:
    """Exclusive time per category: a timed call nested in another counts only for the inner one."""

    seconds: dict[str, float] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)
    _stack: list[list[float]] = field(default_factory=list)

    @contextmanager
    def measure(self, category: str) -> Iterator[None]:
        frame = [0.0]  # seconds spent in nested measured calls
        self._stack.append(frame)
        start = time.perf_counter()
        try:
            yield
        finally:
            elapsed = time.perf_counter() - start
            self._stack.pop()
            self.seconds[category] = self.seconds.get(category, 0.0) + elapsed - frame[0]
            self.calls[category] = self.calls.get(category, 0) + 1
            if self._stack:
                self._stack[-1][0] += elapsed


@contextmanager
def instrumented(stopwatch: Stopwatch, targets: Sequence[tuple[Any, str, str]]) -> Iterator[Stopwatch]:
    """Wrap ``owner.name`` (a module function or a class method) in ``stopwatch`` under a category.

    The originals are restored on exit; no library code is edited.
    """
    originals = []
    for owner, name, category in targets:
        original = inspect.getattr_static(owner, name)
        originals.append((owner, name, original))
        setattr(owner, name, _timed_attribute(stopwatch, original, category))
    try:
        yield stopwatch
    finally:
        for owner, name, original in reversed(originals):
            setattr(owner, name, original)


def _timed_attribute(stopwatch: Stopwatch, original: Any, category: str) -> Any:
    """``original`` (a function, or a class's classmethod or staticmethod) timed under ``category``."""
    if isinstance(original, (classmethod, staticmethod)):
        return type(original)(_timed_call(stopwatch, original.__func__, category))
    return _timed_call(stopwatch, original, category)


def _timed_call(stopwatch: Stopwatch, function: Callable[..., Any], category: str) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with stopwatch.measure(category):
            return function(*args, **kwargs)

    return wrapper


class RoundClock(logging.Handler):
    """Timestamps of the coordinator's "round N/M done" log lines: the end of each round."""

    def __init__(self) -> None:
        super().__init__(level=logging.INFO)
        self.done: dict[int, float] = {}

    def emit(self, record: logging.LogRecord) -> None:
        if str(record.msg).startswith("round ") and record.args and isinstance(record.args[0], int):
            self.done[record.args[0]] = time.perf_counter()

    def round_seconds(self) -> list[float]:
        """Wall seconds of rounds 1, 2, ...: from the end of one round (round 0 = base model) to the next."""
        rounds = sorted(self.done)
        return [self.done[r] - self.done[p] for p, r in zip(rounds, rounds[1:])]


@contextmanager
def round_clock() -> Iterator[RoundClock]:
    """Listen to the coordinator's round log lines for the duration of the block."""
    clock = RoundClock()
    server_log = logging.getLogger(SERVER_LOGGER)
    level = server_log.level
    server_log.addHandler(clock)
    if server_log.getEffectiveLevel() > logging.INFO:
        server_log.setLevel(logging.INFO)
    try:
        yield clock
    finally:
        server_log.removeHandler(clock)
        server_log.setLevel(level)


# --- plots ------------------------------------------------------------------------------


def bar_plot(
    path: Path,
    labels: Sequence[str],
    series: dict[str, Sequence[float]],
    ylabel: str,
    title: str,
    reference: dict[str, float] | None = None,
) -> Path:
    """Grouped bars, one group per label, one bar per series; optional horizontal reference lines."""
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(labels) + 3), 4.0))
    width = 0.8 / max(1, len(series))
    for offset, (name, values) in enumerate(series.items()):
        xs = [i + (offset - (len(series) - 1) / 2) * width for i in range(len(labels))]
        ax.bar(xs, [v if math.isfinite(v) else 0.0 for v in values], width=width, label=name)
    for name, value in (reference or {}).items():
        ax.axhline(value, linestyle="--", linewidth=1, color="grey")
        ax.annotate(name, (len(labels) - 0.5, value), fontsize=7, ha="right", va="bottom")
    ax.set_xticks(range(len(labels)), labels, rotation=20, ha="right", fontsize=8)
    return _save(fig, ax, path, ylabel, title)


def line_plot(
    path: Path,
    xs: Sequence[float],
    series: dict[str, Sequence[float]],
    xlabel: str,
    ylabel: str,
    title: str,
    xlog: bool = False,
    xticklabels: Sequence[str] | None = None,
) -> Path:
    """One line per series over shared x values (NaN points are left out)."""
    fig, ax = plt.subplots(figsize=(6.5, 4.0))
    for name, values in series.items():
        points = [(x, v) for x, v in zip(xs, values) if math.isfinite(v)]
        if points:
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name)
    if xlog:
        ax.set_xscale("log")
    if xticklabels is not None:
        ax.minorticks_off()
        ax.set_xticks(list(xs), list(xticklabels))
    ax.set_xlabel(xlabel)
    return _save(fig, ax, path, ylabel, title)


def _save(fig: plt.Figure, ax: plt.Axes, path: Path, ylabel: str, title: str) -> Path:
    """Label, title and legend, then write the figure to ``path`` and close it."""
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
