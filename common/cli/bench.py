"""``fedtransfer bench NAME``: run a benchmark, write its JSON and Markdown, print its tables."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.markdown import Markdown

from common.cli.console import console

COMMANDS = ("bench",)
DEFAULT_OUT = "fedtransfer-runs/benchmarks"


def _cmd_bench(args: argparse.Namespace) -> int:
    from simulations.benchmarks import BENCHMARKS, run_benchmark

    names = list(BENCHMARKS) if args.name == "all" else [args.name]
    out = Path(args.out)
    for name in names:
        variant = " (quick smoke variant: figures not worth quoting)" if args.quick else ""
        console.print(f"[bold]fedtransfer bench {name}[/bold]{variant}: measuring, seed {args.seed}")
        run_benchmark(name, out, quick=args.quick, seed=args.seed)
        console.print(Markdown((out / f"{name}.md").read_text(encoding="utf-8")))
    written = ", ".join(f"{name}.json, {name}.md" for name in names)
    console.print(f"Figures written to {out}: {written}")
    return 0


def add_commands(commands: argparse._SubParsersAction) -> None:
    from simulations.benchmarks import BENCHMARKS

    bench = commands.add_parser(
        "bench",
        help="measure DP, crypto and communication costs on this machine",
        description=(
            "Run a benchmark (or all): figures are measured side by side in one process and reported as ratios, "
            "written as NAME.json and NAME.md in --out, and printed."
        ),
    )
    bench.add_argument("name", choices=[*BENCHMARKS, "all"], help="which benchmark: %(choices)s")
    bench.add_argument("--out", default=DEFAULT_OUT, help="directory for NAME.json and NAME.md (default: %(default)s)")
    bench.add_argument(
        "--quick", action="store_true", help="a fast smoke variant (few repetitions; for tests, not for quoting)"
    )
    bench.add_argument("--seed", type=int, default=0, help="seed for data, models and DP noise (default: %(default)s)")
    bench.set_defaults(func=_cmd_bench)
