"""The scenario registry: the built-in scenarios by name, or a bring-your-own ``scenario.toml``.

Built-in scenarios are ``wdbc`` (embedded, offline), ``heart-disease`` and
``heart-disease-flamby`` (FLamby's Fed-Heart-Disease), ``synthetic-imaging`` and ``pneumonia``
(PneumoniaMNIST chest X-rays, a ResNet-18). A path
ending in ``.toml`` loads a bring-your-own scenario (see docs/data.md).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from common.data.heart_disease import (
    heart_disease_flamby_scenario,
    heart_disease_scenario,
)
from common.data.pneumonia import pneumonia_scenario
from common.data.scenario import Scenario, ScenarioError
from common.data.study import load_study
from common.data.synthetic_imaging import imaging_scenario
from common.data.wdbc import wdbc_scenario

logger = logging.getLogger(__name__)

_BUILTINS: dict[str, Callable[[int, Path | None, bool], Scenario]] = {
    "wdbc": wdbc_scenario,
    "heart-disease": heart_disease_scenario,
    "heart-disease-flamby": heart_disease_flamby_scenario,
    "synthetic-imaging": imaging_scenario,
    "pneumonia": pneumonia_scenario,
}


def scenario_names() -> list[str]:
    """Names of the built-in scenarios."""
    return list(_BUILTINS)


def load_scenario(name_or_path: str, seed: int = 0, data_dir: Path | None = None, private: bool = True) -> Scenario:
    """A built-in scenario by name, or a bring-your-own scenario from a ``.toml`` path.

    ``private=False`` (the run setting ``per-site-scaling``, for non-private reproduction runs
    only) preprocesses with statistics of the sites' own records where a published protocol
    does so (FLamby's per-centre z-scoring); every other run scales with public values.
    """
    text = str(name_or_path)
    if text.endswith(".toml"):
        scenario = load_study(Path(text), seed)
    elif text in _BUILTINS:
        scenario = _BUILTINS[text](seed, Path(data_dir) if data_dir is not None else None, private)
    else:
        raise ScenarioError(
            f"unknown scenario {text!r}; use one of {scenario_names()} or a path to a scenario .toml file"
        )
    logger.debug(
        "scenario %s: %d sites, source %s",
        scenario.name,
        len(scenario.sites),
        "none" if scenario.source is None else len(scenario.source.train),
    )
    return scenario
