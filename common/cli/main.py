"""The ``fedtransfer`` command line: one module per command, wired here."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from rich.logging import RichHandler
from rich.text import Text

from common.cli import audit as cli_audit
from common.cli import bench as cli_bench
from common.cli import deploy as cli_deploy
from common.cli import import_model as cli_import_model
from common.cli import keys as cli_keys
from common.cli import pretrain as cli_pretrain
from common.cli import simulate as cli_simulate
from common.cli.console import log_console
from common.errors import ConfigurationError, FedtransferError

FLOWER_ENV = {
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
}


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (exit status 2) and ``-v`` accepted before or after any command."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.add_argument(
            "-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="show Flower's and Ray's own logs"
        )

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(ConfigurationError.exit_status, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _setup_logging(verbose: bool) -> None:
    for key, value in FLOWER_ENV.items():
        os.environ.setdefault(key, value)
    handler = RichHandler(console=log_console, show_path=False, markup=False)
    logging.basicConfig(level=logging.WARNING, handlers=[handler], format="%(message)s", force=True)
    for name in ("common", "server", "client", "simulations"):
        logging.getLogger(name).setLevel(logging.INFO)
    import flwr.supercore.logger  # noqa: F401  (creates Flower's console handler before we tune it)

    flower = logging.getLogger("flwr")
    flower.propagate = False
    for flower_handler in flower.handlers:  # fedtransfer reports every round and site itself
        flower_handler.setLevel(logging.INFO if verbose else logging.ERROR)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="fedtransfer", description="Federated, differentially private transfer learning for hospitals."
    )
    parser.set_defaults(verbose=False)
    commands = parser.add_subparsers(dest="command", required=True)
    for module in (cli_simulate, cli_pretrain, cli_import_model, cli_keys, cli_deploy, cli_audit, cli_bench):
        module.add_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    try:
        return args.func(args)
    except FedtransferError as err:
        message = Text.assemble(("error", "bold red"), f" ({type(err).__name__}): {err}")
        log_console.print(message, highlight=False, soft_wrap=True)
        return err.exit_status


if __name__ == "__main__":
    sys.exit(main())
