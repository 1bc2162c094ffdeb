"""Benchmarks: figures measured side by side in one process run, written as JSON and Markdown.

Each benchmark module has ``run(out_dir, quick=False, seed=0) -> dict`` and writes
``<name>.json`` and ``<name>.md`` into ``out_dir``. ``BENCHMARKS`` maps the names
``fedtransfer bench`` accepts to those run functions; a module is imported only when its
benchmark runs, so listing the names stays cheap.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

Benchmark = Callable[..., dict[str, Any]]

_MODULES = {
    "dp": "simulations.benchmarks.dp_cost",
    "crypto": "simulations.benchmarks.crypto_cost",
    "comm": "simulations.benchmarks.communication",
    "dropouts": "simulations.benchmarks.dropouts",
    "flamby": "simulations.benchmarks.flamby",
    "transfer-privacy": "simulations.benchmarks.transfer_privacy",
    "evaluation-cost": "simulations.benchmarks.evaluation_cost",
    "speed": "simulations.benchmarks.speed",
    "scale": "simulations.benchmarks.scale",
    "transfer": "simulations.benchmarks.transfer",
    "update-norms": "simulations.benchmarks.update_norms",
    "deployment": "simulations.benchmarks.deployment",
    "backbone-cache": "simulations.benchmarks.backbone_cache",
    "pneumonia": "simulations.benchmarks.pneumonia",
}


def _deferred(module: str) -> Benchmark:
    def run(out_dir: Path, quick: bool = False, seed: int = 0) -> dict[str, Any]:
        return importlib.import_module(module).run(Path(out_dir), quick=quick, seed=seed)

    run.__doc__ = f"Run ``{module}.run``."
    return run


BENCHMARKS: dict[str, Benchmark] = {name: _deferred(module) for name, module in _MODULES.items()}


def run_benchmark(name: str, out_dir: Path, quick: bool = False, seed: int = 0) -> dict[str, Any]:
    """Run the benchmark ``name`` (a key of ``BENCHMARKS``) and return its figures."""
    if name not in BENCHMARKS:
        raise KeyError(f"unknown benchmark {name!r}; choose from {', '.join(BENCHMARKS)}")
    return BENCHMARKS[name](out_dir, quick=quick, seed=seed)
