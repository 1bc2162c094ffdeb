"""Calibrated noise multipliers kept in the site's state, so a later run or process need not search again.

A calibration (:func:`~common.privacy.accounting.calibrate_noise`) is a pure function of its
inputs: the prior phases, the planned phase's sample rate and steps, the target epsilon, delta,
the accountant and the policy's noise floor, and of the code that searched (the accountants'
libraries and the search's grid and tolerance). :class:`CalibrationStore` keeps one small JSON
file per distinct input under the site's state directory, named by the SHA-256 of the canonical
JSON of that whole key, so a changed policy, target, data size or library finds no stored value
and calibrates afresh.

A stored value is never trusted as such: before it is used it is **re-certified** by one
evaluation of the accountant (the composed epsilon at the stored sigma must be within the
target, and sigma at or above the floor). A value that fails (an edited file) is logged and
replaced by a fresh calibration. The certifying evaluation is the composition of the run's
whole planned phase, which the run's last admission computes anyway, so within one process it
is paid once. The files are a cache: an unreadable one counts as absent, and they are replaced
atomically with `write_atomic`, as every other file a site keeps (losing one would cost a calibration,
never privacy).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from common.io import canonical_json, parse_json, write_atomic
from common.privacy import accounting
from common.privacy.accounting import Accountant, Step

log = logging.getLogger(__name__)

CALIBRATIONS_DIR = "calibrations"


@functools.cache
def search_code() -> str:
    """What, besides its inputs, decides a calibration: the accountants' libraries and the search's constants."""
    return canonical_json(
        {
            "dp-accounting": metadata.version("dp-accounting"),
            "opacus": metadata.version("opacus"),
            "pld-interval": accounting.PLD_INTERVAL,
            "pld-search-interval": accounting.PLD_SEARCH_INTERVAL,
            "prv-eps-error": accounting.PRV_EPS_ERROR,
            "sigma-decimals": accounting.SIGMA_DECIMALS,
            "sigma-rel-tol": accounting.SIGMA_REL_TOL,
        }
    ).decode("ascii")


@dataclass(frozen=True)
class CalibrationKey:
    """Everything one calibrated noise multiplier depends on; ``prior`` as merged, sorted phases."""

    prior: tuple[tuple[float, float, int], ...]
    sample_rate: float
    planned_steps: int
    target_epsilon: float
    delta: float
    accountant: str
    min_noise: float
    code: str

    @classmethod
    def of(
        cls,
        prior: Sequence[Step],
        sample_rate: float,
        planned_steps: int,
        target_epsilon: float,
        delta: float,
        accountant: Accountant,
        min_noise: float,
    ) -> CalibrationKey:
        return cls(
            prior=accounting.merged_phases(prior),
            sample_rate=float(sample_rate),
            planned_steps=int(planned_steps),
            target_epsilon=float(target_epsilon),
            delta=float(delta),
            accountant=str(accountant),
            min_noise=float(min_noise),
            code=search_code(),
        )

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["prior"] = [list(phase) for phase in self.prior]
        return data

    def digest(self) -> str:
        return hashlib.sha256(canonical_json(self.to_dict())).hexdigest()


class CalibrationStore:
    """The calibrated noise multipliers of one site state directory (``directory``: its calibrations folder)."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)

    def _path(self, key: CalibrationKey) -> Path:
        return self.directory / f"{key.digest()}.json"

    def stored(self, key: CalibrationKey) -> float | None:
        """The noise multiplier stored for ``key`` as written, or None (absent or unreadable: logged)."""
        path = self._path(key)
        try:
            data = parse_json(path.read_bytes())
            sigma = data["noise_multiplier"]
            if data["key"] != key.to_dict() or not isinstance(sigma, float) or not math.isfinite(sigma):
                raise ValueError("it holds another key or no finite noise multiplier")
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("%s: stored calibration unreadable (%s); calibrating afresh", path, exc)
            return None
        return sigma

    def _save(self, key: CalibrationKey, sigma: float) -> None:
        record = {"key": key.to_dict(), "noise_multiplier": sigma, "created": datetime.now(UTC).isoformat()}
        path = self._path(key)
        try:
            self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            # A cache: a file lost or torn in a crash is unreadable or absent, and the next run calibrates again.
            write_atomic(path, json.dumps(record, indent=2).encode("utf-8"), durable=False)
        except OSError as exc:
            log.warning("%s: could not store the calibration (%s); the next run will calibrate again", path, exc)

    def noise_multiplier(
        self,
        prior: Sequence[Step],
        sample_rate: float,
        planned_steps: int,
        target_epsilon: float,
        delta: float,
        accountant: Accountant,
        min_noise: float = 0.0,
    ) -> float:
        """What :func:`~common.privacy.accounting.calibrate_noise` answers: stored and re-certified, or calibrated.

        Raises :class:`~common.privacy.accounting.BudgetExhausted` as ``calibrate_noise`` does.
        """
        key = CalibrationKey.of(prior, sample_rate, planned_steps, target_epsilon, delta, accountant, min_noise)
        sigma = self.stored(key)
        if sigma is not None:
            if self._certified(key, sigma):
                return sigma
            log.warning(
                "%s: stored noise multiplier %.4f does not certify for its inputs (epsilon over %.4f or under the "
                "floor %.4f); calibrating afresh",
                self._path(key),
                sigma,
                key.target_epsilon,
                key.min_noise,
            )
        sigma = accounting.calibrate_noise(
            prior, sample_rate, planned_steps, target_epsilon, delta, accountant, min_noise=min_noise
        )
        self._save(key, sigma)
        return sigma

    @staticmethod
    def _certified(key: CalibrationKey, sigma: float) -> bool:
        """One accountant evaluation: does ``sigma`` keep the prior plus the planned phase within the target?"""
        if not (max(key.min_noise, accounting.SIGMA_FLOOR) <= sigma <= accounting.SIGMA_CEILING):
            return False
        history = [*(Step(s, q, n) for s, q, n in key.prior), Step(sigma, key.sample_rate, key.planned_steps)]
        try:
            return accounting.compose_epsilon(history, key.delta, key.accountant) <= key.target_epsilon
        except accounting.AccountingError:
            return False
