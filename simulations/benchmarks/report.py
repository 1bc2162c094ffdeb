"""What every benchmark shares: the machine it ran on, interleaved timings, and its output files.

A benchmark measures things side by side in one process run and reports their ratios; it
writes ``<name>.json`` (the figures) and ``<name>.md`` (tables naming the machine).
"""

from __future__ import annotations

import json
import logging
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Machine:
    """Where a benchmark ran; the load average says whether other jobs shared the machine."""

    platform: str
    cores: int
    torch: str
    python: str
    torch_threads: int
    load_average: tuple[float, float, float]

    def describe(self) -> str:
        load = ", ".join(f"{value:.2f}" for value in self.load_average)
        return (
            f"`{self.platform}`, {self.cores} cores, torch {self.torch} ({self.torch_threads} intra-op thread(s)), "
            f"Python {self.python}; load average at start {load}"
        )


def this_machine() -> Machine:
    """Describe the machine now (call it at the start of a benchmark)."""
    return Machine(
        platform=platform.platform(),
        cores=os.cpu_count() or 1,
        torch=torch.__version__,
        python=sys.version.split()[0],
        torch_threads=torch.get_num_threads(),
        load_average=tuple(round(v, 2) for v in os.getloadavg()),
    )


def timed(action: Callable[[], object]) -> float:
    """Wall-clock seconds ``action`` takes."""
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def interleaved(variants: Mapping[str, Callable[[], float]], repetitions: int, warmup: int = 1) -> dict[str, float]:
    """Median seconds of each variant, running them in turn so drifting load hits all alike.

    Each variant does its own untimed setup and returns the seconds of the part it measures.
    """
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for repetition in range(warmup + repetitions):
        for name, variant in variants.items():
            seconds = variant()
            if repetition >= warmup:
                samples[name].append(seconds)
    return {name: statistics.median(values) for name, values in samples.items()}


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub Markdown table; numbers right-aligned."""

    def cell(value: Any) -> str:
        return str(value).replace("|", "\\|")

    numeric = [
        all(isinstance(row[i], (int, float)) or _looks_numeric(row[i]) for row in rows) for i in range(len(headers))
    ]
    lines = [
        "| " + " | ".join(cell(h) for h in headers) + " |",
        "|" + "|".join("---:" if right else "---" for right in numeric) + "|",
    ]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _looks_numeric(value: Any) -> bool:
    text = str(value).rstrip("x%").replace(",", "")
    try:
        float(text)
    except ValueError:
        return False
    return True


def write_result(out_dir: Path, name: str, result: dict[str, Any], markdown: str) -> dict[str, Any]:
    """Write ``out_dir/<name>.json`` and ``out_dir/<name>.md``; return ``result``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    (out_dir / f"{name}.md").write_text(markdown.rstrip() + "\n", encoding="utf-8")
    logger.info("benchmark %s: wrote %s and %s", name, out_dir / f"{name}.json", out_dir / f"{name}.md")
    return result


def bench_command(name: str, quick: bool, seed: int) -> str:
    """The CLI command that reproduces a benchmark's figures."""
    return f"fedtransfer bench {name}{' --quick' if quick else ''} --seed {seed}"


def header(title: str, machine: Machine, command: str, quick: bool) -> str:
    """The opening lines of a benchmark's Markdown: what, where, how it was produced."""
    variant = " (quick smoke variant: too few repetitions to quote)" if quick else ""
    return f"## {title}{variant}\n\nMachine: {machine.describe()}.\n\nProduced by `{command}`.\n"


def machine_record(machine: Machine) -> dict[str, Any]:
    return asdict(machine)


def result_head(name: str, quick: bool, seed: int, machine: Machine) -> dict[str, Any]:
    """The keys every benchmark's JSON opens with: which benchmark, its variant and seed, the machine, the command."""
    return {
        "benchmark": name,
        "quick": quick,
        "seed": seed,
        "machine": machine_record(machine),
        "command": bench_command(name, quick, seed),
    }
